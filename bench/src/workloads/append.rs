//! W1 `append`.

use super::{
    base_line, durability, keyspace, open_engine, rng_for, timed_threads, timeline, DataDir,
    Payloads, Picker,
};
use crate::report::{Reporter, ResultLine};
use crate::sysinfo::{count_files, peak_rss_bytes, DiskIo};
use crate::{DurabilityArg, Flags, Result};
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::time::Instant;
use timeline_engine::{AppendTicket, Engine, TimelineId};

/// What the timed part of a W1 run measured.
pub struct Load {
    pub messages: u64,
    pub calls: u64,
    pub secs: f64,
    pub hist: Histogram<u64>,
}

/// `timeline-bench append`: returns the number of errors (always 0; engine
/// errors abort the run).
pub fn run(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let dir = DataDir::new(flags)?;
    let (engine, _) = open_engine(flags, &dir.path)?;
    eprintln!(
        "append: {} messages of {} B to {} timelines, batch {}, {} thread(s), durability {}, io {}",
        flags.messages,
        flags.payload,
        flags.timelines,
        flags.batch,
        flags.threads,
        durability(flags).name(),
        engine.io_name()
    );
    let io0 = DiskIo::now();
    let cpu0 = crate::sysinfo::cpu_secs(None);
    let load = load(flags, &engine)?;
    eprintln!("append: timed section {:.3} s; syncing", load.secs);
    let t = Instant::now();
    engine.sync()?;
    let sync_secs = t.elapsed().as_secs_f64();
    let seal_secs = super::seal_if_asked(flags, &engine)?;
    // Over the load, the sync that finishes it and (with --seal) sealing and
    // regrouping: as RocksDB's CPU covers its load, flush and compactions.
    let load_cpu = crate::sysinfo::cpu_secs(None) - cpu0;
    let mut line = result_line(flags, &engine, &load, "append");
    line.seal_secs = seal_secs;
    line.set_disk_io(io0, DiskIo::now());
    line.sync_secs = Some(sync_secs);
    // The engine runs on the bench's own threads: the process's CPU.
    line.process_cpu_secs = Some(round3(load_cpu));
    let (a, f) = crate::sysinfo::rss_split();
    line.rss_anon_bytes = Some(a);
    line.rss_file_bytes = Some(f);
    let t = Instant::now();
    engine.close()?;
    line.close_secs = Some(t.elapsed().as_secs_f64());
    eprintln!(
        "append: sync {sync_secs:.3} s, close {:.3} s",
        t.elapsed().as_secs_f64()
    );
    line.files = Some(count_files(&dir.path));
    line.peak_rss_bytes = Some(peak_rss_bytes());
    rep.push(line)?;
    Ok(0)
}

/// A result line for a finished load, from a stats snapshot taken now
/// (call after `Engine::sync`). `files` is counted from the directory.
pub fn result_line(flags: &Flags, engine: &Engine, load: &Load, workload: &str) -> ResultLine {
    let st = engine.stats();
    let ks = st.keyspace(keyspace(flags)).clone();
    let total = st.total();
    let payload_bytes = load.messages * flags.payload as u64;
    let mut line = base_line(flags, workload, engine);
    line.ops = load.messages;
    line.secs = load.secs;
    line.ops_per_sec = rate(load.messages, load.secs);
    line.messages = Some(load.messages);
    line.messages_per_sec = Some(rate(load.messages, load.secs));
    line.calls = Some(load.calls);
    line.set_latency(&load.hist);
    line.bytes_written = Some(ks.bytes_written);
    line.bytes_written_total = Some(total.bytes_written);
    line.payload_bytes = Some(payload_bytes);
    line.record_bytes = Some(ks.record_bytes);
    line.write_amplification = Some(round3(ks.write_amplification()));
    line.bytes_per_payload_byte = Some(round3(if payload_bytes == 0 {
        0.0
    } else {
        ks.bytes_written as f64 / payload_bytes as f64
    }));
    line.sealed_segments = Some(ks.sealed_segments);
    line.fsyncs = Some(ks.fsyncs);
    line.index_bytes = Some(total.index_bytes);
    line.timelines_with_data = Some(ks.timelines);
    line.batch = Some(flags.batch);
    line.in_flight = Some(flags.in_flight);
    line.peak_rss_bytes = Some(peak_rss_bytes());
    line
}

pub fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n as f64 / secs).round()
    } else {
        0.0
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The timed W1 loop over `--threads` threads.
pub fn load(flags: &Flags, engine: &Engine) -> Result<Load> {
    let payloads = Payloads::new(flags.payload, flags.seed);
    let picker = Picker::new(flags.timelines, flags.zipf)?;
    let t = timed_threads(flags, flags.messages, |thread, n, hist| {
        Ok((
            append_thread(flags, engine, &payloads, &picker, thread, n, hist)?,
            0,
        ))
    })?;
    Ok(Load {
        messages: flags.messages,
        calls: t.counts.0,
        secs: t.secs,
        hist: t.hist,
    })
}

/// One thread's share: `n` messages in batches; returns the number of calls.
fn append_thread(
    flags: &Flags,
    engine: &Engine,
    payloads: &Payloads,
    picker: &Picker,
    thread: u64,
    n: u64,
    hist: &mut Histogram<u64>,
) -> Result<u64> {
    let mut rng = rng_for(flags.seed, thread);
    let ks = keyspace(flags);
    let d = durability(flags);
    let pipelined = flags.durability == DurabilityArg::Group && flags.in_flight > 1;
    let max_tickets = (flags.in_flight / flags.batch).max(1);
    let mut tickets: VecDeque<(Instant, AppendTicket)> = VecDeque::with_capacity(max_tickets);
    let mut items: Vec<(TimelineId, &[u8])> = Vec::with_capacity(flags.batch);
    let mut left = n;
    let mut calls = 0u64;
    while left > 0 {
        let b = (flags.batch as u64).min(left);
        items.clear();
        for _ in 0..b {
            items.push((timeline(ks, picker.pick(&mut rng)), payloads.pick(&mut rng)));
        }
        if pipelined {
            if tickets.len() >= max_tickets {
                if let Some((t0, tk)) = tickets.pop_front() {
                    tk.wait()?;
                    hist.saturating_record(t0.elapsed().as_nanos() as u64);
                }
            }
            let t0 = Instant::now();
            let tk = engine.append_async(&items)?;
            tickets.push_back((t0, tk));
        } else {
            let t0 = Instant::now();
            engine.append_batch(&items, d)?;
            hist.saturating_record(t0.elapsed().as_nanos() as u64);
        }
        left -= b;
        calls += 1;
    }
    while let Some((t0, tk)) = tickets.pop_front() {
        tk.wait()?;
        hist.saturating_record(t0.elapsed().as_nanos() as u64);
    }
    Ok(calls)
}
