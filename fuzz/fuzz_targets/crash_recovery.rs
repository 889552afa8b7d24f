//! Fuzzer-driven appends, syncs, clock advances, clean reopens and power cuts
//! on a `MemIo` engine, checked against a model (a `Vec` of payloads per
//! timeline, like tests/tests/model.rs):
//!
//! - every append succeeds and gets the next consecutive seq;
//! - after a crash (optionally with torn unsynced tails) the engine reopens,
//!   and each timeline holds a prefix of what was appended that includes every
//!   GroupCommit-acknowledged record and everything before an explicit
//!   `sync` (or a clean reopen); nothing that was never appended appears;
//! - every read returns exactly the model's bytes.
#![no_main]

use timeline_engine::Keyspace;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::io::{MemFaults, MemIo};
use timeline_engine::*;

const ROOT: &str = "/cr";
const T0: u64 = 1_700_000_000_000;
/// Timelines: `k % 8`: bit 2 picks the keyspace, bits 0..2 the id.
const TLS: u8 = 8;

fn tl(k: u8) -> TimelineId {
    let k = k % TLS;
    let id = match k & 3 {
        3 => u64::MAX,
        x => x as u64,
    };
    if k & 4 == 0 {
        TimelineId::store(id)
    } else {
        TimelineId::sync(id)
    }
}

fn config(mem: &MemIo, clock: &ManualClock) -> Config {
    let mut c = Config::default();
    c.io = Some(Arc::new(mem.clone()));
    c.clock = Arc::new(clock.clone());
    c.background = false;
    c.shards = 1;
    c.max_payload = 4096;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::STORE).segment_window = Duration::from_secs(10);
    *c.keyspace_mut(Keyspace::SYNC) = KeyspaceConfig::sync().with_ttl(None);
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_window = Duration::from_secs(10);
    c
}

#[derive(Arbitrary, Debug)]
enum Op {
    Append { tl: u8, len: u16, group: bool },
    Batch { items: Vec<(u8, u16)>, group: bool },
    Sync,
    Crash { torn: bool, seed: u64 },
    Reopen,
    /// Advance the clock by `secs` and run `maintain` (time rolls, sealing).
    Advance { secs: u8 },
    Read { tl: u8, from: u8, limit: u8, forward: bool },
}

#[derive(Default, Clone)]
struct ModelTl {
    recs: Vec<Vec<u8>>,
    /// A power cut keeps at least this many.
    durable: usize,
}

fn payload(t: TimelineId, seq: u64, len: usize, nonce: u64) -> Vec<u8> {
    let mut x = t.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ ((t.keyspace.0 as u64) << 62)
        ^ nonce.wrapping_mul(0xA24B_AED4_963E_E407);
    x |= 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct World {
    mem: MemIo,
    clock: ManualClock,
    engine: Option<Engine>,
    model: Vec<ModelTl>,
    /// Bumped on every crash so payloads re-appended at a lost seq differ
    /// from the lost ones (a resurrected lost record would be caught).
    epoch: u64,
}

impl World {
    fn e(&self) -> &Engine {
        self.engine.as_ref().expect("engine open")
    }

    fn open(&mut self) {
        match Engine::open(ROOT, config(&self.mem, &self.clock)) {
            Ok(e) => self.engine = Some(e),
            Err(err) => panic!("recovery failed: {err}"),
        }
    }

    fn check(&self, k: u8) {
        let t = tl(k);
        let m = &self.model[k as usize];
        let e = self.e();
        assert_eq!(e.last_seq(t), m.recs.len() as u64, "{t:?}: last_seq");
        let all = e
            .scan(t, 1, usize::MAX, Direction::Forward)
            .unwrap_or_else(|err| panic!("{t:?}: full scan: {err}"));
        assert_eq!(all.len(), m.recs.len(), "{t:?}: full scan length");
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "{t:?}: scan seqs");
            assert!(r.payload == m.recs[i], "{t:?}: seq {} payload differs", r.seq);
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut w = World {
        mem: MemIo::new(),
        clock: ManualClock::new(T0),
        engine: None,
        model: vec![ModelTl::default(); TLS as usize],
        epoch: 0,
    };
    w.open();
    for op in ops.into_iter().take(64) {
        match op {
            Op::Append { tl: k, len, group } => {
                let k = k % TLS;
                let t = tl(k);
                let m = &w.model[k as usize];
                let seq = m.recs.len() as u64 + 1;
                let p = payload(t, seq, len as usize % 3000, w.epoch);
                let d = if group {
                    Durability::GroupCommit
                } else {
                    Durability::Buffered
                };
                let got = w
                    .e()
                    .append_with(t, &p, d)
                    .unwrap_or_else(|err| panic!("{t:?}: append: {err}"));
                assert_eq!(got, seq, "{t:?}: seqs must be consecutive");
                let m = &mut w.model[k as usize];
                m.recs.push(p);
                if group {
                    m.durable = m.recs.len();
                }
            }
            Op::Batch { items, group } => {
                let mut next: Vec<u64> = w.model.iter().map(|m| m.recs.len() as u64).collect();
                let mut ps = Vec::new();
                for (k, len) in items.into_iter().take(24) {
                    let k = k % TLS;
                    next[k as usize] += 1;
                    ps.push((k, next[k as usize], payload(tl(k), next[k as usize], len as usize % 1500, w.epoch)));
                }
                if ps.is_empty() {
                    continue;
                }
                let refs: Vec<(TimelineId, &[u8])> =
                    ps.iter().map(|(k, _, p)| (tl(*k), p.as_slice())).collect();
                let d = if group {
                    Durability::GroupCommit
                } else {
                    Durability::Buffered
                };
                let seqs = w
                    .e()
                    .append_batch(&refs, d)
                    .unwrap_or_else(|err| panic!("batch append: {err}"));
                assert_eq!(seqs.len(), ps.len());
                for ((k, want, p), got) in ps.into_iter().zip(seqs) {
                    assert_eq!(got, want, "{:?}: batch seqs", tl(k));
                    let m = &mut w.model[k as usize];
                    m.recs.push(p);
                    if group {
                        m.durable = m.recs.len();
                    }
                }
            }
            Op::Sync => {
                w.e().sync().unwrap_or_else(|err| panic!("sync: {err}"));
                for m in &mut w.model {
                    m.durable = m.recs.len();
                }
            }
            Op::Reopen => {
                let e = w.engine.take().expect("engine");
                e.close().unwrap_or_else(|err| panic!("close: {err}"));
                for m in &mut w.model {
                    m.durable = m.recs.len();
                }
                w.open();
                for k in 0..TLS {
                    w.check(k);
                }
            }
            Op::Crash { torn, seed } => {
                // Faults set on the live file system before the cut, so a
                // torn crash keeps random prefixes of the unsynced tails.
                w.mem.set_faults(MemFaults {
                    torn_tail_on_crash: torn,
                    seed,
                    ..MemFaults::default()
                });
                let image = w.mem.crash();
                let old = w.engine.take();
                w.mem = image;
                w.epoch += 1;
                w.open();
                // The old engine syncs into the old image only on drop.
                drop(old);
                let e = w.e().clone();
                for k in 0..TLS {
                    let t = tl(k);
                    let m = &mut w.model[k as usize];
                    let last = e.last_seq(t) as usize;
                    assert!(
                        last >= m.durable,
                        "{t:?}: lost acknowledged appends: last {last}, durable {}",
                        m.durable
                    );
                    assert!(
                        last <= m.recs.len(),
                        "{t:?}: invented records: last {last} > appended {}",
                        m.recs.len()
                    );
                    m.recs.truncate(last);
                    m.durable = last;
                }
                for k in 0..TLS {
                    w.check(k);
                }
            }
            Op::Advance { secs } => {
                w.clock.advance_ms(secs as u64 * 1000);
                w.e().maintain().unwrap_or_else(|err| panic!("maintain: {err}"));
            }
            Op::Read {
                tl: k,
                from,
                limit,
                forward,
            } => {
                let k = k % TLS;
                let t = tl(k);
                let m = &w.model[k as usize];
                let last = m.recs.len() as u64;
                let from = from as u64;
                let limit = limit as usize % 50;
                let dir = if forward {
                    Direction::Forward
                } else {
                    Direction::Backward
                };
                let got = w
                    .e()
                    .scan(t, from, limit, dir)
                    .unwrap_or_else(|err| panic!("{t:?}: scan: {err}"));
                let want: Vec<u64> = if forward {
                    (from.max(1)..=last).take(limit).collect()
                } else {
                    (1..=from.min(last)).rev().take(limit).collect()
                };
                let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
                assert_eq!(seqs, want, "{t:?}: scan from {from} limit {limit} {dir:?}");
                for r in &got {
                    assert!(r.payload == m.recs[r.seq as usize - 1], "{t:?}: seq {} payload", r.seq);
                }
                match w.e().get(t, from) {
                    Ok(Some(r)) => {
                        assert!(from >= 1 && from <= last, "{t:?}: get({from}) returned a record");
                        assert!(r.payload == m.recs[from as usize - 1], "{t:?}: get({from}) payload");
                    }
                    Ok(None) => assert!(from == 0 || from > last, "{t:?}: get({from}) = None"),
                    Err(err) => panic!("{t:?}: get({from}): {err}"),
                }
            }
        }
    }
    // Final: a power cut right now keeps every durable record.
    if let Some(e) = w.engine.take() {
        let image = w.mem.crash();
        w.mem = image;
        w.open();
        drop(e);
        for k in 0..TLS {
            let t = tl(k);
            let last = w.e().last_seq(t) as usize;
            let m = &mut w.model[k as usize];
            assert!(last >= m.durable && last <= m.recs.len(), "{t:?}: final crash: last {last}");
            m.recs.truncate(last);
        }
        for k in 0..TLS {
            w.check(k);
        }
    }
});
