//! Print memory after opening an existing data directory (diagnostics).
fn rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Rss"))
        .collect::<Vec<_>>()
        .join(" ")
}
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: open_rss DIR")?;
    println!("before: {}", rss());
    let t = std::time::Instant::now();
    let e = timeline_engine::Engine::open(&dir, timeline_engine::Config::default())?;
    println!("open {:?}: {}", t.elapsed(), rss());
    let tl = |i| timeline_engine::TimelineId::store(i);
    for i in 0..1000u64 {
        let _ = e.first_retained_seq(tl(i * 97));
    }
    println!("1000 first_retained: {}", rss());
    for i in 0..1000u64 {
        let _ = e.scan(
            tl(i * 89),
            u64::MAX,
            20,
            timeline_engine::Direction::Backward,
        );
    }
    println!("1000 backward scans: {}", rss());
    drop(e);
    Ok(())
}
