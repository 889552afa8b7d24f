//! The process `tests/crash_kill9.rs` kills with SIGKILL.
//!
//! Usage: `crash-child <data dir> <seed> <ack log>`
//!
//! Opens the engine on the data directory (background maintenance, small
//! segments so sealing happens while it runs) and appends forever from three
//! threads with group commit: single appends and batches of up to 16 items.
//! Thread `k` owns the timelines `tl % 3 == k` of both keyspaces, so it knows
//! the seq the engine must assign next and can derive the payload from it
//! ([`timeline_tests::payload`]). After each acknowledged append it writes
//! the `(keyspace, timeline, seq)` triples to the ack log (one `write_all`
//! per append, no fsync: a SIGKILL does not lose the page cache).
//!
//! Exit codes (the parent treats any exit as a failure, it only ever kills):
//! 2 bad usage, 3 the engine assigned an unexpected seq, 4 an append failed,
//! 5 the engine did not open.
#![allow(clippy::unwrap_used)]

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use timeline_engine::{Durability, Engine};
use timeline_tests::{crash_cfg, format_acks, payload, timeline, Ack, CRASH_TIMELINES};

const THREADS: u64 = 3;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: crash-child <data dir> <seed> <ack log>");
        std::process::exit(2);
    }
    let dir = args[1].clone();
    let seed: u64 = args[2].parse().unwrap_or_else(|_| std::process::exit(2));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args[3])
        .unwrap_or_else(|e| {
            eprintln!("cannot open ack log: {e}");
            std::process::exit(2)
        });
    let log = Arc::new(Mutex::new(log));
    let engine = match Engine::open(&dir, crash_cfg(true)) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("crash-child: open failed: {e}");
            std::process::exit(5);
        }
    };
    let handles: Vec<_> = (0..THREADS)
        .map(|k| {
            let engine = engine.clone();
            let log = log.clone();
            std::thread::spawn(move || run(engine, k, seed, log))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    // The threads never return.
    std::process::exit(4);
}

fn run(engine: Engine, k: u64, seed: u64, log: Arc<Mutex<File>>) {
    let mut rng = SmallRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(k));
    let owned: Vec<(u8, u64)> = (0..CRASH_TIMELINES)
        .filter(|tl| tl % THREADS == k)
        .flat_map(|tl| [(0u8, tl), (1u8, tl)])
        .collect();
    let mut next: HashMap<(u8, u64), u64> = owned
        .iter()
        .map(|&(ks, tl)| ((ks, tl), engine.last_seq(timeline(ks, tl)) + 1))
        .collect();
    let mut line = Vec::new();
    loop {
        let n = if rng.gen_bool(0.4) {
            1
        } else {
            rng.gen_range(2..=16)
        };
        let mut acks = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        for _ in 0..n {
            let key = owned[rng.gen_range(0..owned.len())];
            let seq = next.get_mut(&key).unwrap();
            acks.push(Ack {
                ks: key.0,
                tl: key.1,
                seq: *seq,
            });
            payloads.push(payload(key.0, key.1, *seq));
            *seq += 1;
        }
        let got = if n == 1 {
            let a = acks[0];
            engine
                .append_with(timeline(a.ks, a.tl), &payloads[0], Durability::GroupCommit)
                .map(|s| vec![s])
        } else {
            let items: Vec<_> = acks
                .iter()
                .zip(&payloads)
                .map(|(a, p)| (timeline(a.ks, a.tl), p.as_slice()))
                .collect();
            engine.append_batch(&items, Durability::GroupCommit)
        };
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                eprintln!("crash-child: append failed: {e}");
                std::process::exit(4);
            }
        };
        let want: Vec<u64> = acks.iter().map(|a| a.seq).collect();
        if got != want {
            eprintln!("crash-child: engine assigned seqs {got:?}, expected {want:?} for {acks:?}");
            std::process::exit(3);
        }
        line.clear();
        format_acks(&acks, &mut line);
        let mut f = log.lock().unwrap();
        f.write_all(&line).unwrap();
        f.flush().unwrap();
    }
}
