//! Model-based property test: random sequences of append, batch append, get,
//! scan (both directions), clean reopen, power-cut crash (through the
//! in-memory backend) and clock advances past the sync TTL, checked against a
//! plain `Vec` per timeline.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::io::{MemFaults, MemIo};
use timeline_engine::Keyspace;
use timeline_engine::*;

const TTL_MS: u64 = 80_000;
const DIR: &str = "/model";

#[derive(Debug, Clone)]
enum Op {
    Append {
        tl: TimelineId,
        len: usize,
        durable: bool,
    },
    Batch {
        items: Vec<(TimelineId, usize)>,
        durable: bool,
    },
    Get {
        tl: TimelineId,
        seq: u64,
    },
    Scan {
        tl: TimelineId,
        from: u64,
        limit: usize,
        forward: bool,
    },
    Sync,
    Reopen,
    Crash {
        torn: bool,
        seed: u64,
    },
    Advance {
        ms: u64,
    },
}

fn tl_strategy() -> impl Strategy<Value = TimelineId> {
    (any::<bool>(), 0u64..6).prop_map(|(s, id)| {
        if s {
            TimelineId::sync(id)
        } else {
            TimelineId::store(id)
        }
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (tl_strategy(), 0usize..3000, any::<bool>()).prop_map(|(tl, len, durable)| Op::Append { tl, len, durable }),
        4 => (proptest::collection::vec((tl_strategy(), 0usize..1500), 1..20), any::<bool>())
            .prop_map(|(items, durable)| Op::Batch { items, durable }),
        4 => (tl_strategy(), 0u64..80).prop_map(|(tl, seq)| Op::Get { tl, seq }),
        4 => (tl_strategy(), 0u64..90, 1usize..40, any::<bool>())
            .prop_map(|(tl, from, limit, forward)| Op::Scan { tl, from, limit, forward }),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(torn, seed)| Op::Crash { torn, seed }),
        2 => (1_000u64..40_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What the model knows of one timeline.
#[derive(Default, Debug)]
struct ModelTl {
    /// (payload, append time) for seq = index + 1.
    recs: Vec<(Vec<u8>, u64)>,
    /// Appends up to this count are durable (a power cut keeps them).
    durable: usize,
    /// First seq retention may have dropped up to (monotone, from the engine).
    first_retained: u64,
}

fn payload(tl: TimelineId, seq: u64, len: usize) -> Vec<u8> {
    let mut x = tl.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq ^ ((tl.keyspace.0 as u64) << 60);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn config(mem: &MemIo, clock: &ManualClock) -> Config {
    let mut c = Config::default();
    c.io = Some(Arc::new(mem.clone()));
    c.clock = Arc::new(clock.clone());
    c.background = false;
    c.shards = 2;
    c.max_payload = 4096;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    *c.keyspace_mut(Keyspace::SYNC) =
        KeyspaceConfig::sync().with_ttl(Some(Duration::from_millis(TTL_MS)));
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c
}

struct World {
    mem: MemIo,
    clock: ManualClock,
    engine: Option<Engine>,
    model: BTreeMap<TimelineId, ModelTl>,
}

impl World {
    fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.engine = Some(Engine::open(DIR, config(&self.mem, &self.clock)).unwrap());
    }

    fn mark_all_durable(&mut self) {
        for m in self.model.values_mut() {
            m.durable = m.recs.len();
        }
    }

    /// After a crash: each timeline keeps a prefix that includes everything durable.
    fn reconcile_after_crash(&mut self) {
        let e = self.engine.clone().unwrap();
        for (tl, m) in self.model.iter_mut() {
            let last = e.last_seq(*tl) as usize;
            assert!(
                last >= m.durable,
                "{tl:?}: lost durable appends: last {last}, durable {}",
                m.durable
            );
            assert!(
                last <= m.recs.len(),
                "{tl:?}: invented records: last {last} > {}",
                m.recs.len()
            );
            m.recs.truncate(last);
            m.durable = last;
        }
    }

    fn check_timeline(&mut self, tl: TimelineId) {
        let e = self.engine.clone().unwrap();
        let now = self.clock.now_ms();
        let m = self.model.entry(tl).or_default();
        assert_eq!(e.last_seq(tl), m.recs.len() as u64, "{tl:?} last_seq");
        let first = e.first_retained_seq(tl).unwrap();
        assert!(
            first >= m.first_retained.max(1),
            "{tl:?}: first_retained went backwards"
        );
        assert!(first <= m.recs.len() as u64 + 1);
        if tl.keyspace == Keyspace::STORE {
            assert_eq!(first, 1, "store keyspace dropped data");
        }
        // Nothing younger than the TTL may be gone.
        for (i, (_, ts)) in m.recs.iter().enumerate() {
            if (i as u64 + 1) < first {
                assert!(
                    ts + TTL_MS <= now,
                    "{tl:?}: seq {} dropped before its TTL",
                    i + 1
                );
            }
        }
        m.first_retained = first;
    }
}

fn run(ops: Vec<Op>) {
    let mem = MemIo::new();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut w = World {
        mem,
        clock,
        engine: None,
        model: BTreeMap::new(),
    };
    w.reopen();
    for op in ops {
        match op {
            Op::Append { tl, len, durable } => {
                let m = w.model.entry(tl).or_default();
                let seq = m.recs.len() as u64 + 1;
                let p = payload(tl, seq, len);
                let d = if durable {
                    Durability::GroupCommit
                } else {
                    Durability::Buffered
                };
                let got = w.engine().append_with(tl, &p, d).unwrap();
                assert_eq!(got, seq, "{tl:?}: SeqIds must be consecutive");
                let m = w.model.get_mut(&tl).unwrap();
                m.recs.push((p, w.clock.now_ms()));
                if durable {
                    m.durable = m.recs.len();
                }
            }
            Op::Batch { items, durable } => {
                let mut payloads = Vec::new();
                let mut next: BTreeMap<TimelineId, u64> = BTreeMap::new();
                for (tl, len) in &items {
                    let base = w.model.get(tl).map(|m| m.recs.len() as u64).unwrap_or(0);
                    let n = next.entry(*tl).or_insert(base);
                    *n += 1;
                    payloads.push((*tl, *n, payload(*tl, *n, *len)));
                }
                let refs: Vec<(TimelineId, &[u8])> = payloads
                    .iter()
                    .map(|(t, _, p)| (*t, p.as_slice()))
                    .collect();
                let d = if durable {
                    Durability::GroupCommit
                } else {
                    Durability::Buffered
                };
                let seqs = w.engine().append_batch(&refs, d).unwrap();
                for ((tl, want, p), got) in payloads.into_iter().zip(seqs) {
                    assert_eq!(got, want, "{tl:?}: batch SeqIds");
                    let m = w.model.entry(tl).or_default();
                    m.recs.push((p, w.clock.now_ms()));
                    if durable {
                        m.durable = m.recs.len();
                    }
                }
            }
            Op::Get { tl, seq } => {
                w.check_timeline(tl);
                let m = &w.model[&tl];
                let r = w.engine().get(tl, seq);
                if seq == 0 || seq > m.recs.len() as u64 {
                    assert!(matches!(r, Ok(None)), "{tl:?} get {seq}: {r:?}");
                } else if seq < m.first_retained {
                    assert!(
                        matches!(r, Err(Error::Truncated { .. })),
                        "{tl:?} get {seq}: {r:?}"
                    );
                } else {
                    let r = r.unwrap().unwrap();
                    assert_eq!(r.seq, seq);
                    assert_eq!(
                        r.payload,
                        m.recs[seq as usize - 1].0,
                        "{tl:?} seq {seq} payload"
                    );
                    assert_eq!(r.timestamp_ms, m.recs[seq as usize - 1].1);
                }
            }
            Op::Scan {
                tl,
                from,
                limit,
                forward,
            } => {
                w.check_timeline(tl);
                let m = &w.model[&tl];
                let last = m.recs.len() as u64;
                let first = m.first_retained;
                if forward {
                    let r = w.engine().scan(tl, from, limit, Direction::Forward);
                    let lo = from.max(1);
                    if lo < first && lo <= last {
                        match r {
                            Err(Error::Truncated { first_retained, .. }) => {
                                assert_eq!(first_retained, first)
                            }
                            other => {
                                panic!("{tl:?} scan from {from}: expected Truncated, got {other:?}")
                            }
                        }
                    } else {
                        let r = r.unwrap();
                        let want: Vec<u64> = (lo..=last).take(limit).collect();
                        assert_eq!(
                            r.iter().map(|x| x.seq).collect::<Vec<_>>(),
                            want,
                            "{tl:?} fwd from {from}"
                        );
                        for x in &r {
                            assert_eq!(x.payload, m.recs[x.seq as usize - 1].0);
                        }
                    }
                } else {
                    let from = if from == 0 { u64::MAX } else { from };
                    let r = w
                        .engine()
                        .scan(tl, from, limit, Direction::Backward)
                        .unwrap();
                    let hi = from.min(last);
                    let want: Vec<u64> = (first.max(1)..=hi).rev().take(limit).collect();
                    assert_eq!(
                        r.iter().map(|x| x.seq).collect::<Vec<_>>(),
                        want,
                        "{tl:?} back from {from}"
                    );
                    for x in &r {
                        assert_eq!(x.payload, m.recs[x.seq as usize - 1].0);
                    }
                }
            }
            Op::Sync => {
                w.engine().sync().unwrap();
                w.mark_all_durable();
            }
            Op::Reopen => {
                w.engine.take().unwrap().close().unwrap();
                w.mark_all_durable();
                w.reopen();
                let tls: Vec<_> = w.model.keys().copied().collect();
                for tl in tls {
                    w.check_timeline(tl);
                }
            }
            Op::Crash { torn, seed } => {
                // Torn tails must be armed before the power cut: the image
                // `crash()` returns has no unsynced bytes left to tear.
                w.mem.set_faults(MemFaults {
                    torn_tail_on_crash: torn,
                    seed,
                    ..MemFaults::default()
                });
                let image = w.mem.crash();
                // The old engine keeps writing into the old image only; drop it.
                let old = w.engine.take().unwrap();
                w.mem = image;
                w.reopen();
                drop(old);
                w.reconcile_after_crash();
                let tls: Vec<_> = w.model.keys().copied().collect();
                for tl in tls {
                    w.check_timeline(tl);
                }
            }
            Op::Advance { ms } => {
                w.clock.advance_ms(ms);
                w.engine().maintain().unwrap();
                let tls: Vec<_> = w.model.keys().copied().collect();
                for tl in tls {
                    w.check_timeline(tl);
                }
            }
        }
    }
    // Final full check of every timeline.
    let tls: Vec<_> = w.model.keys().copied().collect();
    for tl in tls {
        w.check_timeline(tl);
        let m = &w.model[&tl];
        let first = m.first_retained;
        let all = w
            .engine()
            .scan(tl, first, 100_000, Direction::Forward)
            .unwrap();
        assert_eq!(
            all.len() as u64,
            (m.recs.len() as u64 + 1).saturating_sub(first)
        );
        for x in all {
            assert_eq!(x.payload, m.recs[x.seq as usize - 1].0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op_strategy(), 1..250)) {
        run(ops);
    }
}
