//! W2 `read`: range reads, forward and newest-first, after a W1 load.

use super::append::{self, rate};
use super::{base_line, keyspace, open_engine, rng_for, split, timeline, DataDir, Picker};
use crate::report::{new_histogram, Reporter};
use crate::sysinfo::{count_files, peak_rss_bytes, DiskIo};
use crate::{Flags, Result};
use hdrhistogram::Histogram;
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use timeline_engine::{Direction, Engine, Keyspace, Record};

/// Verification errors printed to stderr before going quiet.
const MAX_PRINTED_ERRORS: u64 = 10;

/// `timeline-bench read`: returns the number of verification errors.
pub fn run(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let dir = DataDir::new(flags)?;
    let (engine, open_secs) = open_engine(flags, &dir.path)?;
    let ks = keyspace(flags);
    let existing = engine.stats().keyspace(ks).timelines;
    let in_process = existing == 0;
    if in_process {
        eprintln!(
            "read: loading {} messages of {} B into {} timelines (batch {}, {} thread(s), durability {})",
            flags.messages,
            flags.payload,
            flags.timelines,
            flags.batch,
            flags.threads,
            super::durability(flags).name()
        );
        let io0 = DiskIo::now();
        let load = append::load(flags, &engine)?;
        engine.sync()?;
        let seal_secs = super::seal_if_asked(flags, &engine)?;
        let mut line = append::result_line(flags, &engine, &load, "append");
        line.seal_secs = seal_secs;
        line.set_disk_io(io0, DiskIo::now());
        line.phase = Some("load".into());
        line.files = Some(count_files(&dir.path));
        rep.push(line)?;
    } else {
        eprintln!(
            "read: {} holds {existing} {} timelines (opened in {open_secs:.3} s); skipping the load",
            dir.path.display(),
            ks.name()
        );
    }

    // Timelines with data, assuming W1's id space 0..timelines.
    let t = Instant::now();
    let tls: Vec<(u64, u64)> = (0..flags.timelines)
        .filter_map(|id| {
            let last = engine.last_seq(timeline(ks, id));
            (last > 0).then_some((id, last))
        })
        .collect();
    if tls.is_empty() {
        return Err(format!(
            "no {} timeline among ids 0..{} has data (the engine reports {existing}); is --timelines right?",
            ks.name(),
            flags.timelines
        )
        .into());
    }
    eprintln!(
        "read: {} timelines with data (listed in {:.3} s)",
        tls.len(),
        t.elapsed().as_secs_f64()
    );
    if !in_process && flags.warm {
        let t = Instant::now();
        let mut n = 0u64;
        for &(id, last) in &tls {
            n += engine
                .scan(timeline(ks, id), 1, last as usize, Direction::Forward)?
                .len() as u64;
        }
        eprintln!(
            "read: warmed by reading {n} records in {:.3} s",
            t.elapsed().as_secs_f64()
        );
    }

    let expect_payload = in_process.then_some(flags.payload);
    let fwd = flags.reads - flags.reads / 2;
    let mut errors = 0;
    for (dirn, name, n) in [
        (Direction::Forward, "forward", fwd),
        (Direction::Backward, "backward", flags.reads / 2),
    ] {
        let r = reads(flags, &engine, ks, &tls, dirn, n, expect_payload)?;
        errors += r.errors;
        let mut line = base_line(flags, "read", &engine);
        line.direction = Some(name.into());
        line.ops = n;
        line.secs = r.secs;
        line.ops_per_sec = rate(n, r.secs);
        line.messages = Some(r.records);
        line.messages_per_sec = Some(rate(r.records, r.secs));
        line.set_latency(&r.hist);
        line.errors = Some(r.errors);
        line.read_len = Some(flags.read_len);
        line.timelines_with_data = Some(tls.len() as u64);
        line.index_bytes = Some(engine.stats().total().index_bytes);
        line.peak_rss_bytes = Some(peak_rss_bytes());
        line.files = Some(count_files(&dir.path));
        rep.push(line)?;
    }
    engine.close()?;
    Ok(errors)
}

struct Reads {
    hist: Histogram<u64>,
    records: u64,
    errors: u64,
    secs: f64,
}

fn reads(
    flags: &Flags,
    engine: &Engine,
    ks: Keyspace,
    tls: &[(u64, u64)],
    dirn: Direction,
    n: u64,
    expect_payload: Option<usize>,
) -> Result<Reads> {
    let picker = Picker::new(tls.len() as u64, flags.zipf)?;
    let barrier = std::sync::Barrier::new(flags.threads);
    let printed = AtomicU64::new(0);
    let stream = if dirn == Direction::Forward {
        1000
    } else {
        2000
    };
    type Out = (Histogram<u64>, u64, u64, Instant, Instant);
    let results: Vec<Result<Out>> = std::thread::scope(|s| {
        let handles: Vec<_> = split(n, flags.threads)
            .into_iter()
            .enumerate()
            .map(|(t, share)| {
                let (picker, barrier, printed) = (&picker, &barrier, &printed);
                s.spawn(move || -> Result<Out> {
                    let mut rng = rng_for(flags.seed, stream + t as u64);
                    let mut hist = new_histogram()?;
                    let (mut records, mut errors) = (0u64, 0u64);
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..share {
                        let (id, last) = tls[picker.pick(&mut rng) as usize];
                        let tl = timeline(ks, id);
                        let from = rng.gen_range(1..=last);
                        let arg = if dirn == Direction::Backward && from == last { u64::MAX } else { from };
                        let t0 = Instant::now();
                        let res = engine.scan(tl, arg, flags.read_len, dirn);
                        hist.saturating_record(t0.elapsed().as_nanos() as u64);
                        let problem = match res {
                            Ok(page) => {
                                records += page.len() as u64;
                                check_page(&page, dirn, from, last, flags.read_len, expect_payload)
                            }
                            Err(e) => Some(format!("scan failed: {e}")),
                        };
                        if let Some(p) = problem {
                            errors += 1;
                            if printed.fetch_add(1, Ordering::Relaxed) < MAX_PRINTED_ERRORS {
                                eprintln!("read error: timeline {id} ({last} records), from {arg} {dirn:?}: {p}");
                            }
                        }
                    }
                    Ok((hist, records, errors, start, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("read thread panicked".into()))
            })
            .collect()
    });
    let mut out = Reads {
        hist: new_histogram()?,
        records: 0,
        errors: 0,
        secs: 0.0,
    };
    let (mut first, mut end) = (None::<Instant>, None::<Instant>);
    for r in results {
        let (h, rec, err, a, b) = r?;
        out.hist.add(&h)?;
        out.records += rec;
        out.errors += err;
        first = Some(first.map_or(a, |f| f.min(a)));
        end = Some(end.map_or(b, |l| l.max(b)));
    }
    if let (Some(a), Some(b)) = (first, end) {
        out.secs = b.duration_since(a).as_secs_f64();
    }
    Ok(out)
}

/// `None` if the page is what a read of `len` from `from` must return.
pub(crate) fn check_page(
    page: &[Record],
    dirn: Direction,
    from: u64,
    last: u64,
    len: usize,
    expect_payload: Option<usize>,
) -> Option<String> {
    let want = match dirn {
        Direction::Forward => (last - from + 1).min(len as u64),
        Direction::Backward => from.min(len as u64),
    };
    if page.len() as u64 != want {
        return Some(format!("{} records, expected {want}", page.len()));
    }
    for (i, r) in page.iter().enumerate() {
        let seq = match dirn {
            Direction::Forward => from + i as u64,
            Direction::Backward => from - i as u64,
        };
        if r.seq != seq {
            return Some(format!("record {i} has seq {}, expected {seq}", r.seq));
        }
        if let Some(p) = expect_payload {
            if r.payload.len() != p {
                return Some(format!(
                    "record {i} (seq {seq}) has a {} B payload, expected {p}",
                    r.payload.len()
                ));
            }
        }
    }
    None
}
