//! W2 `read`: range reads, forward and newest-first, after a W1 load.

use super::append::{self, rate};
use super::{
    base_line, keyspace, ks_name, open_engine, rng_for, timed_threads, timeline, DataDir, Picker,
};
use crate::report::Reporter;
use crate::sysinfo::{count_files, peak_rss_bytes, DiskIo};
use crate::{Flags, Result};
use hdrhistogram::Histogram;
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use timeline_engine::{Direction, Record};

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
            ks_name(ks)
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
            ks_name(ks),
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
        let r = reads(flags, &tls, dirn, n, expect_payload, |id, from, len, d| {
            Ok(engine.scan(timeline(ks, id), from, len, d)?)
        })?;
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

pub(crate) struct Reads {
    pub hist: Histogram<u64>,
    pub records: u64,
    pub errors: u64,
    pub secs: f64,
}

/// `n` timed range reads over `flags.threads` threads: a random timeline
/// of `tls` (id, last seq) and a random start in it, `--read-len` records in
/// direction `dirn` through `scan(id, from, len, dirn)`, each page checked.
/// Both targets run this with the same seeds, so they read the same pages.
pub(crate) fn reads<S>(
    flags: &Flags,
    tls: &[(u64, u64)],
    dirn: Direction,
    n: u64,
    expect_payload: Option<usize>,
    scan: S,
) -> Result<Reads>
where
    S: Fn(u64, u64, usize, Direction) -> Result<Vec<Record>> + Sync,
{
    let picker = Picker::new(tls.len() as u64, flags.zipf)?;
    let printed = AtomicU64::new(0);
    let stream = if dirn == Direction::Forward {
        1000
    } else {
        2000
    };
    let t = timed_threads(flags, n, |thread, share, hist| {
        let mut rng = rng_for(flags.seed, stream + thread);
        let (mut records, mut errors) = (0u64, 0u64);
        for _ in 0..share {
            let (id, last) = tls[picker.pick(&mut rng) as usize];
            let from = rng.gen_range(1..=last);
            let arg = if dirn == Direction::Backward && from == last {
                u64::MAX
            } else {
                from
            };
            let t0 = Instant::now();
            let res = scan(id, arg, flags.read_len, dirn);
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
                    eprintln!(
                        "read error: timeline {id} ({last} records), from {arg} {dirn:?}: {p}"
                    );
                }
            }
        }
        Ok((records, errors))
    })?;
    Ok(Reads {
        hist: t.hist,
        records: t.counts.0,
        errors: t.counts.1,
        secs: t.secs,
    })
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
