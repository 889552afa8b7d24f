//! `abuse`: well-behaved clients under abuse (issue 10, item 7). Starts
//! `timeline-server` with 50 direct conversations of 20 messages each, and
//! measures `--connections` C (default 4) good connections, each pipelining
//! `--pipeline` P (default 16) `SYNC`s (a page of 20 entries), for
//! `--secs` S seconds (default 5) three times: before the abuse, during it,
//! after it; a good sender `SEND`s 500 messages/s throughout (reads keep
//! the server's data, hence its memory, from growing with the load, so the
//! RSS figures show what the abuse costs). The abusers, all at once:
//! - 10,000 sockets that connect and never send `HELLO` (`--silent`);
//! - connect-and-drop storms (10,000/s);
//! - garbage: random bytes, before and after a `HELLO`;
//! - headers announcing a 4 GiB frame;
//! - 200 connections that send half of a 1 MiB frame and stall;
//! - 100 connections subscribed to every receiver that never read.
//!
//! Reports the good clients' throughput and reply p99 in each phase (and
//! the ratios to the first), and the server's RSS before, at its peak
//! during, and after the abusers left (once `connections_open` is back to
//! the good clients). Exit status 2 if a good client got an error.

use super::{rng_for, DataDir};
use crate::report::Reporter;
use crate::sysinfo::{cpu_secs, rss_of};
use crate::targets::net::Proc;
use crate::targets::server::{spawn_server, stat, stats};
use crate::{Flags, Result};
use hdrhistogram::Histogram;
use rand::Rng;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timeline_server::protocol::{self, ConvKind, Hello, Request, RequestFrame, Response};
use timeline_server::Client;

const CONVS: u64 = 50;
/// The storms' pace: connect-and-drop 100 per 10 ms tick (10,000/s); the
/// garbage and 4 GiB-header loops wait up to a tick for the server's answer.
const TICK: Duration = Duration::from_millis(10);
const STORM_PER_TICK: usize = 100;

/// What the good clients did in one phase.
struct Phase {
    name: &'static str,
    sends: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    rss_peak: u64,
    /// CPU seconds of the server process and of this one (good clients,
    /// abusers) during the phase: on a shared machine the abusers' own CPU
    /// is taken from everybody.
    cpu_server: f64,
    cpu_bench: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.sends as f64 / self.secs.max(1e-9)
    }
}

/// One good connection for `secs`: pipelined `SYNC`s (a page of 20 from
/// checkpoint 0 of a receiver), reply latency recorded.
fn good(addr: &str, k: u64, secs: Duration, pipeline: usize) -> Result<(u64, Histogram<u64>, u64)> {
    let mut c = Client::connect(addr, b"")?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut inflight = VecDeque::new();
    let (mut n, mut errors) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut i = k;
    while t0.elapsed() < secs || !inflight.is_empty() {
        while t0.elapsed() < secs && inflight.len() < pipeline {
            let user = 2 * (1 + i % CONVS);
            c.queue(&Request::Sync {
                user,
                checkpoint: 0,
                limit: 20,
                groups: vec![],
            });
            inflight.push_back(Instant::now());
            i += 1;
        }
        c.flush()?;
        let Some(at) = inflight.pop_front() else {
            break;
        };
        match c.recv() {
            Ok(Response::Sync(p)) if p.entries.len() == 20 => {
                n += 1;
                h.record(at.elapsed().as_micros().max(1) as u64)?;
            }
            Ok(r) => return Err(format!("SYNC answered {r:?}").into()),
            Err(e) if e.code().is_some() => errors += 1,
            Err(e) => return Err(format!("a good client lost its connection: {e}").into()),
        }
    }
    Ok((n, h, errors))
}

/// The well-behaved sender: `SEND`s paced at `RATE` per second (they feed
/// the subscribers, including the ones that never read); counts errors.
fn paced_sender(addr: &str, stop: &AtomicBool, cmid: &AtomicU64) -> Result<u64> {
    const RATE: u64 = 500;
    let mut c = Client::connect(addr, b"")?;
    let (t0, mut sent, mut errors) = (Instant::now(), 0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let due = t0 + Duration::from_micros(sent * 1_000_000 / RATE);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w); // pacing the load generator, not serving
        }
        let conv = 1 + sent % CONVS;
        let id = cmid.fetch_add(1, Ordering::Relaxed);
        match c.call(&Request::Send {
            conv,
            sender: 2 * conv - 1,
            client_msg_id: id,
            payload: &[b'p'; 100],
        }) {
            Ok(_) => {}
            Err(e) if e.code().is_some() => errors += 1,
            Err(e) => return Err(format!("the paced sender lost its connection: {e}").into()),
        }
        sent += 1;
    }
    Ok(errors)
}

fn phase(name: &'static str, flags: &Flags, addr: &str, pid: u32) -> Result<Phase> {
    let secs = Duration::from_secs(flags.secs.unwrap_or(5));
    let conns = flags.connections.unwrap_or(4) as u64;
    let pipeline = flags.pipeline.unwrap_or(16);
    let t0 = Instant::now();
    let (cs0, cb0) = (cpu_secs(Some(pid)), cpu_secs(None));
    let handles: Vec<_> = (0..conns)
        .map(|k| {
            let addr = addr.to_string();
            std::thread::spawn(move || {
                good(&addr, k * 7, secs, pipeline).map_err(|e| e.to_string())
            })
        })
        .collect();
    let mut rss_peak = 0;
    while handles.iter().any(|h| !h.is_finished()) {
        rss_peak = rss_peak.max(rss_of(Some(pid)));
        std::thread::sleep(Duration::from_millis(100)); // sampling, not serving
    }
    let took = t0.elapsed().as_secs_f64();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut sends, mut errors) = (0, 0);
    for h in handles {
        let (n, hist, e) = h.join().map_err(|_| "a good client panicked")??;
        sends += n;
        errors += e;
        all.add(hist)?;
    }
    Ok(Phase {
        name,
        sends,
        secs: took,
        p50_us: all.value_at_quantile(0.5) as f64,
        p99_us: all.value_at_quantile(0.99) as f64,
        errors,
        rss_peak,
        cpu_server: cpu_secs(Some(pid)) - cs0,
        cpu_bench: cpu_secs(None) - cb0,
    })
}

fn hello_frame(id: u64) -> Vec<u8> {
    let mut b = Vec::new();
    RequestFrame {
        id,
        request: Request::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            max_frame: 0,
            token: b"",
        }),
    }
    .encode_into(&mut b);
    b
}

/// Read and drop whatever the server sends, for at most `wait`.
fn drain(s: &mut TcpStream, wait: Duration) {
    let _ = s.set_read_timeout(Some(wait));
    let mut b = [0u8; 4096];
    while let Ok(n) = s.read(&mut b) {
        if n == 0 {
            break;
        }
    }
}

/// One abuser's loop: the server's address, and when to stop.
type Abuser = Box<dyn Fn(&str, &AtomicBool, &Volume) + Send>;

/// How much abuse was sent: the abusers count as they go, so a run with
/// niced abusers shows what volume it still reached.
#[derive(Default)]
struct Volume {
    connects: AtomicU64,
    garbage_bytes: AtomicU64,
    huge_headers: AtomicU64,
}

impl Volume {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Lower the calling thread's CPU priority (Linux: nice applies per
/// thread). Through `renice` on the thread's id rather than `setpriority`:
/// the workspace denies unsafe code. A failure is reported, not fatal.
fn nice_this_thread(nice: i32) {
    if nice == 0 {
        return;
    }
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok());
    let ok = tid.is_some_and(|tid| {
        std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-p", &tid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!("abuse: could not renice an abuser thread to {nice}");
    }
}

/// The abusers; each runs until `stop`.
fn abusers(
    addr: &str,
    flags: &Flags,
    stop: &Arc<AtomicBool>,
    vol: &Arc<Volume>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut v = Vec::new();
    let nice = flags.abuser_nice.unwrap_or(0);
    let spawn = |v: &mut Vec<_>, f: Abuser| {
        let (addr, stop, vol) = (addr.to_string(), stop.clone(), vol.clone());
        v.push(std::thread::spawn(move || {
            nice_this_thread(nice);
            f(&addr, &stop, &vol)
        }));
    };
    let silent = flags.silent.unwrap_or(10_000);
    spawn(
        &mut v,
        Box::new(move |a, stop, vol| {
            let mut held = Vec::new();
            while held.len() < silent as usize && !stop.load(Ordering::Relaxed) {
                if let Ok(s) = TcpStream::connect(a) {
                    Volume::add(&vol.connects, 1);
                    held.push(s)
                }
            }
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }),
    );
    spawn(
        &mut v,
        Box::new(|a, stop, vol| {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..STORM_PER_TICK {
                    if TcpStream::connect(a).is_ok() {
                        Volume::add(&vol.connects, 1);
                    }
                }
                std::thread::sleep(TICK);
            }
        }),
    );
    let seed = flags.seed;
    spawn(
        &mut v,
        Box::new(move |a, stop, vol| {
            let mut rng = rng_for(seed, 77);
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(a) else {
                    continue;
                };
                Volume::add(&vol.connects, 1);
                if rng.gen_bool(0.5) {
                    let _ = s.write_all(&hello_frame(1));
                }
                let junk: Vec<u8> = (0..rng.gen_range(1..65_536)).map(|_| rng.gen()).collect();
                if s.write_all(&junk).is_ok() {
                    Volume::add(&vol.garbage_bytes, junk.len() as u64);
                }
                drain(&mut s, TICK);
            }
        }),
    );
    spawn(
        &mut v,
        Box::new(|a, stop, vol| {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(a) else {
                    continue;
                };
                Volume::add(&vol.connects, 1);
                let mut b = hello_frame(1);
                // A header announcing a 4 GiB frame (len, opcode PING, id 2).
                b.extend_from_slice(&u32::MAX.to_le_bytes());
                b.extend_from_slice(&[0x02, 0x00, 0, 0]);
                b.extend_from_slice(&2u64.to_le_bytes());
                if s.write_all(&b).is_ok() {
                    Volume::add(&vol.huge_headers, 1);
                }
                drain(&mut s, TICK);
            }
        }),
    );
    spawn(
        &mut v,
        Box::new(|a, stop, vol| {
            let mut held = Vec::new();
            let mut frame = Vec::new();
            RequestFrame {
                id: 2,
                request: Request::Ping(&vec![0u8; 1 << 20]),
            }
            .encode_into(&mut frame);
            for _ in 0..200 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = TcpStream::connect(a) else {
                    continue;
                };
                Volume::add(&vol.connects, 1);
                let _ = s.write_all(&hello_frame(1));
                let _ = s.write_all(&frame[..frame.len() / 2]);
                held.push(s);
            }
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }),
    );
    spawn(
        &mut v,
        Box::new(|a, stop, vol| {
            let mut held = Vec::new();
            for k in 0..100u64 {
                let Ok(mut s) = TcpStream::connect(a) else {
                    continue;
                };
                Volume::add(&vol.connects, 1);
                let mut b = hello_frame(1);
                RequestFrame {
                    id: 2,
                    request: Request::Subscribe {
                        user: 2 * (1 + k % CONVS),
                    },
                }
                .encode_into(&mut b);
                let _ = s.write_all(&b);
                held.push(s); // never read
            }
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }),
    );
    v
}

/// Wait (bounded) until only `n` connections are open, then settle.
fn wait_for_open(c: &mut Client, n: u64, limit: Duration) -> Result<u64> {
    let t0 = Instant::now();
    loop {
        let open = stat(&stats(c)?, "connections_open");
        if open <= n || t0.elapsed() > limit {
            return Ok(open);
        }
        std::thread::sleep(Duration::from_millis(200)); // control loop, not serving
    }
}

fn setup(addr: &str) -> Result<()> {
    let mut c = Client::connect(addr, b"")?;
    for conv in 1..=CONVS {
        c.call(&Request::CreateConversation {
            conv,
            kind: ConvKind::Direct,
            members: vec![2 * conv - 1, 2 * conv],
        })
        .map_err(|e| format!("creating conversation {conv}: {e}"))?;
        for i in 0..20 {
            c.call(&Request::Send {
                conv,
                sender: 2 * conv - 1,
                client_msg_id: 1 << 40 | conv << 8 | i,
                payload: &[b's'; 100],
            })
            .map_err(|e| format!("preloading conversation {conv}: {e}"))?;
        }
    }
    Ok(())
}

fn print(p: &Phase, base: &Phase) {
    timeline_client::outln!(
        "abuse: {:<6} {:>9.0} syncs/s ({:.2}x)  reply p50 {:>8.0} us  p99 {:>8.0} us ({:.2}x)  errors {}  server RSS peak {:.1} MiB  CPU server {:.0}% bench {:.0}%",
        p.name, p.rate(), p.rate() / base.rate().max(1e-9), p.p50_us, p.p99_us, p.p99_us / base.p99_us.max(1.0), p.errors,
        p.rss_peak as f64 / (1 << 20) as f64,
        100.0 * p.cpu_server / p.secs,
        100.0 * p.cpu_bench / p.secs
    );
}

pub fn run(flags: &Flags, _rep: &mut Reporter) -> Result<u64> {
    if flags.addr.is_some() {
        return Err(
            "abuse starts its own server (it reads the server's RSS): it takes no --addr".into(),
        );
    }
    let _ = rlimit::increase_nofile_limit(19_500);
    let dir = DataDir::new(flags)?;
    let extra = vec!["--max-connections".to_string(), "12000".to_string()];
    let (proc, addr): (Proc, String) = spawn_server(flags, &dir.path, &extra)?;
    let pid = proc.pid();
    setup(&addr)?;
    let cmid = Arc::new(AtomicU64::new(1));
    let quit = Arc::new(AtomicBool::new(false));
    let sender = {
        let (a, q, m) = (addr.clone(), quit.clone(), cmid.clone());
        std::thread::spawn(move || paced_sender(&a, &q, &m).map_err(|e| e.to_string()))
    };
    let before = phase("before", flags, &addr, pid)?;
    let rss_before = rss_of(Some(pid));
    let stop = Arc::new(AtomicBool::new(false));
    let vol = Arc::new(Volume::default());
    let threads = abusers(&addr, flags, &stop, &vol);
    std::thread::sleep(Duration::from_secs(1)); // the abuse builds up
    let (c0, g0, h0) = (
        Volume::get(&vol.connects),
        Volume::get(&vol.garbage_bytes),
        Volume::get(&vol.huge_headers),
    );
    let t_during = Instant::now();
    let during = phase("during", flags, &addr, pid)?;
    // The counts cover the whole phase call (its setup too): divide by it.
    let phase_secs = t_during.elapsed().as_secs_f64();
    let per_s = |now: u64, then: u64| (now - then) as f64 / phase_secs.max(1e-9);
    let connects_s = per_s(Volume::get(&vol.connects), c0);
    let garbage_mib_s = per_s(Volume::get(&vol.garbage_bytes), g0) / (1 << 20) as f64;
    let headers_s = per_s(Volume::get(&vol.huge_headers), h0);
    let mut admin = Client::connect(addr.as_str(), b"")?;
    let st = stats(&mut admin)?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let open = wait_for_open(&mut admin, 2, Duration::from_secs(60))?; // admin + paced sender
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_of(Some(pid));
    let after = phase("after", flags, &addr, pid)?;
    quit.store(true, Ordering::Relaxed);
    let sender_errors = sender.join().map_err(|_| "the paced sender panicked")??;
    proc.stop()?;
    for p in [&before, &during, &after] {
        print(p, &before);
    }
    let nice = flags.abuser_nice.unwrap_or(0);
    timeline_client::outln!(
        "abuse: abusers at nice {nice}; during the measured phase they made {connects_s:.0} connections/s, sent {garbage_mib_s:.1} MiB/s of garbage and {headers_s:.0} 4 GiB headers/s"
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    timeline_client::outln!(
        "abuse: server RSS before {:.1} MiB, peak during {:.1} MiB, after the abusers left {:.1} MiB ({:.2}x before; {open} connections open); during: handshakes_evicted {}, timeouts {}, resyncs {}, request_errors {}",
        mib(rss_before), mib(during.rss_peak), mib(rss_after), rss_after as f64 / rss_before.max(1) as f64,
        stat(&st, "handshakes_evicted"), stat(&st, "timeouts"), stat(&st, "resyncs"), stat(&st, "request_errors")
    );
    if flags.json {
        let j = serde_json::json!({
            "workload": "abuse",
            "syncs_per_sec": [before.rate(), during.rate(), after.rate()],
            "reply_p99_us": [before.p99_us, during.p99_us, after.p99_us],
            "cpu_server_pct": [100.0 * before.cpu_server / before.secs, 100.0 * during.cpu_server / during.secs, 100.0 * after.cpu_server / after.secs],
            "cpu_bench_pct": [100.0 * before.cpu_bench / before.secs, 100.0 * during.cpu_bench / during.secs, 100.0 * after.cpu_bench / after.secs],
            "throughput_ratio": during.rate() / before.rate().max(1e-9),
            "p99_ratio": during.p99_us / before.p99_us.max(1.0),
            "rss_before": rss_before, "rss_peak_during": during.rss_peak, "rss_after": rss_after,
            "handshakes_evicted": stat(&st, "handshakes_evicted"),
            "abuser_nice": nice,
            "abuse_connects_per_sec": connects_s,
            "abuse_garbage_mib_per_sec": garbage_mib_s,
            "abuse_huge_headers_per_sec": headers_s,
        });
        timeline_client::outln!("{j}");
    }
    Ok(before.errors + during.errors + after.errors + sender_errors)
}
