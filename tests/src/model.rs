//! The one model world of the engine: an `Engine` on a `MemIo` file system
//! and a `ManualClock`, driven by [`Op`]s and checked after each against a
//! plain `Vec` of payloads per timeline. `tests/tests/model.rs` (proptest)
//! and `fuzz/fuzz_targets/crash_recovery.rs` (libFuzzer) both run it, so a
//! rule the model learns is learned by both.
//!
//! What it checks:
//! - every append succeeds and gets the next consecutive seq;
//! - reads return exactly the model's bytes, with `Truncated` only below
//!   what retention (TTL) may have dropped, and nothing dropped before its
//!   TTL (the store keyspace never drops);
//! - after a power cut (optionally with torn unsynced tails) each timeline
//!   holds a prefix of what was appended that includes every
//!   `GroupCommit`-acknowledged record and everything before an explicit
//!   `sync` or a clean reopen; nothing never appended appears (payloads
//!   carry an epoch bumped at every crash, so a lost record that came back
//!   at its old seq would differ).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::io::{MemFaults, MemIo};
use timeline_engine::{
    Clock, Config, Direction, Durability, Engine, Error, Keyspace, KeyspaceConfig, ManualClock,
    TimelineId,
};

const DIR: &str = "/model";
const T0: u64 = 1_700_000_000_000;

/// One step of a run.
#[derive(Debug, Clone)]
pub enum Op {
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
    /// Advance the clock and run `maintain` (time rolls, sealing, TTL).
    Advance {
        ms: u64,
    },
}

/// How the world's engine is configured.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub shards: usize,
    /// The sync keyspace's TTL (`None`: keeps everything).
    pub sync_ttl_ms: Option<u64>,
    /// Both keyspaces' segment window (`None`: the defaults).
    pub segment_window: Option<Duration>,
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

/// The deterministic payload of `seq` of `tl`, written in crash epoch `epoch`.
pub fn payload(tl: TimelineId, seq: u64, len: usize, epoch: u64) -> Vec<u8> {
    let mut x = tl.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ ((tl.keyspace.0 as u64) << 60)
        ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407);
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

/// The engine, its file system and clock, and the model.
pub struct World {
    settings: Settings,
    mem: MemIo,
    clock: ManualClock,
    engine: Option<Engine>,
    model: BTreeMap<TimelineId, ModelTl>,
    epoch: u64,
}

fn durability(durable: bool) -> Durability {
    if durable {
        Durability::GroupCommit
    } else {
        Durability::Buffered
    }
}

impl World {
    /// A fresh world with an open engine.
    pub fn new(settings: Settings) -> World {
        let mut w = World {
            settings,
            mem: MemIo::new(),
            clock: ManualClock::new(T0),
            engine: None,
            model: BTreeMap::new(),
            epoch: 0,
        };
        w.open();
        w
    }

    fn config(&self) -> Config {
        let s = self.settings;
        let mut c = Config::default();
        c.io = Some(Arc::new(self.mem.clone()));
        c.clock = Arc::new(self.clock.clone());
        c.background = false;
        c.shards = s.shards;
        c.max_payload = 4096;
        *c.keyspace_mut(Keyspace::SYNC) =
            KeyspaceConfig::sync().with_ttl(s.sync_ttl_ms.map(Duration::from_millis));
        for k in &mut c.keyspaces {
            k.segment_bytes = 64 << 10;
            if let Some(w) = s.segment_window {
                k.segment_window = w;
            }
        }
        c
    }

    fn e(&self) -> &Engine {
        self.engine.as_ref().expect("engine open")
    }

    fn open(&mut self) {
        match Engine::open(DIR, self.config()) {
            Ok(e) => self.engine = Some(e),
            Err(err) => panic!("recovery failed: {err}"),
        }
    }

    fn mark_all_durable(&mut self) {
        for m in self.model.values_mut() {
            m.durable = m.recs.len();
        }
    }

    fn check_all(&mut self) {
        let tls: Vec<_> = self.model.keys().copied().collect();
        for tl in tls {
            self.check_timeline(tl);
        }
    }

    /// Power cut now: the image keeps what was synced (and, with `torn`,
    /// random prefixes of the unsynced tails); reopen it and reconcile.
    fn crash(&mut self, torn: bool, seed: u64) {
        // Armed on the live file system before the cut: the image `crash()`
        // returns has no unsynced bytes left to tear.
        self.mem.set_faults(MemFaults {
            torn_tail_on_crash: torn,
            seed,
            ..MemFaults::default()
        });
        let image = self.mem.crash();
        // The old engine writes into the old image only (on drop, too).
        let old = self.engine.take();
        self.mem = image;
        self.epoch += 1;
        self.open();
        drop(old);
        let e = self.e().clone();
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
        self.check_all();
    }

    /// Last seq, retention bounds and TTL of one timeline.
    fn check_timeline(&mut self, tl: TimelineId) {
        let e = self.e().clone();
        let now = self.clock.now_ms();
        let ttl = self.settings.sync_ttl_ms;
        let m = self.model.entry(tl).or_default();
        assert_eq!(e.last_seq(tl), m.recs.len() as u64, "{tl:?} last_seq");
        let first = e.first_retained_seq(tl).unwrap();
        assert!(
            first >= m.first_retained.max(1),
            "{tl:?}: first_retained went backwards"
        );
        assert!(first <= m.recs.len() as u64 + 1);
        if tl.keyspace == Keyspace::STORE || ttl.is_none() {
            assert_eq!(first, 1, "{tl:?}: a keyspace without TTL dropped data");
        }
        for (i, (_, ts)) in m.recs.iter().enumerate() {
            if (i as u64 + 1) < first {
                let ttl = ttl.unwrap_or(u64::MAX);
                assert!(
                    ts.saturating_add(ttl) <= now,
                    "{tl:?}: seq {} dropped before its TTL",
                    i + 1
                );
            }
        }
        m.first_retained = first;
    }

    fn append(&mut self, tl: TimelineId, len: usize, durable: bool) {
        let seq = self.model.entry(tl).or_default().recs.len() as u64 + 1;
        let p = payload(tl, seq, len, self.epoch);
        let got = self
            .e()
            .append_with(tl, &p, durability(durable))
            .unwrap_or_else(|err| panic!("{tl:?}: append: {err}"));
        assert_eq!(got, seq, "{tl:?}: SeqIds must be consecutive");
        let now = self.clock.now_ms();
        let m = self.model.entry(tl).or_default();
        m.recs.push((p, now));
        if durable {
            m.durable = m.recs.len();
        }
    }

    fn batch(&mut self, items: &[(TimelineId, usize)], durable: bool) {
        if items.is_empty() {
            return;
        }
        let mut next: BTreeMap<TimelineId, u64> = BTreeMap::new();
        let mut ps = Vec::new();
        for &(tl, len) in items {
            let base = self.model.get(&tl).map_or(0, |m| m.recs.len() as u64);
            let n = next.entry(tl).or_insert(base);
            *n += 1;
            ps.push((tl, *n, payload(tl, *n, len, self.epoch)));
        }
        let refs: Vec<(TimelineId, &[u8])> = ps.iter().map(|(t, _, p)| (*t, &p[..])).collect();
        let seqs = self
            .e()
            .append_batch(&refs, durability(durable))
            .unwrap_or_else(|err| panic!("batch append: {err}"));
        assert_eq!(seqs.len(), ps.len());
        let now = self.clock.now_ms();
        for ((tl, want, p), got) in ps.into_iter().zip(seqs) {
            assert_eq!(got, want, "{tl:?}: batch SeqIds");
            let m = self.model.entry(tl).or_default();
            m.recs.push((p, now));
            if durable {
                m.durable = m.recs.len();
            }
        }
    }

    fn get(&mut self, tl: TimelineId, seq: u64) {
        self.check_timeline(tl);
        let m = &self.model[&tl];
        let r = self.e().get(tl, seq);
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
            let (p, ts) = &m.recs[seq as usize - 1];
            assert!(r.payload == *p, "{tl:?} seq {seq} payload");
            assert_eq!(r.timestamp_ms, *ts);
        }
    }

    fn scan(&mut self, tl: TimelineId, from: u64, limit: usize, forward: bool) {
        self.check_timeline(tl);
        let m = &self.model[&tl];
        let (last, first) = (m.recs.len() as u64, m.first_retained.max(1));
        let (r, want) = if forward {
            let r = self.e().scan(tl, from, limit, Direction::Forward);
            let lo = from.max(1);
            if lo < first && lo <= last {
                match r {
                    Err(Error::Truncated { first_retained, .. }) => {
                        assert_eq!(first_retained, first);
                        return;
                    }
                    other => panic!("{tl:?} scan from {from}: expected Truncated, got {other:?}"),
                }
            }
            (r, (lo..=last).take(limit).collect::<Vec<u64>>())
        } else {
            let r = self.e().scan(tl, from, limit, Direction::Backward);
            let hi = from.min(last);
            (r, (first..=hi).rev().take(limit).collect())
        };
        let r = r.unwrap_or_else(|err| panic!("{tl:?}: scan: {err}"));
        let seqs: Vec<u64> = r.iter().map(|x| x.seq).collect();
        assert_eq!(
            seqs, want,
            "{tl:?} scan from {from} limit {limit} fwd {forward}"
        );
        for x in &r {
            assert!(
                x.payload == m.recs[x.seq as usize - 1].0,
                "{tl:?} seq {} payload",
                x.seq
            );
        }
    }

    /// Run one step and check what it touched.
    pub fn apply(&mut self, op: &Op) {
        match op {
            &Op::Append { tl, len, durable } => self.append(tl, len, durable),
            Op::Batch { items, durable } => self.batch(items, *durable),
            &Op::Get { tl, seq } => self.get(tl, seq),
            &Op::Scan {
                tl,
                from,
                limit,
                forward,
            } => self.scan(tl, from, limit, forward),
            Op::Sync => {
                self.e().sync().unwrap_or_else(|err| panic!("sync: {err}"));
                self.mark_all_durable();
            }
            Op::Reopen => {
                let e = self.engine.take().expect("engine");
                e.close().unwrap_or_else(|err| panic!("close: {err}"));
                self.mark_all_durable();
                self.open();
                self.check_all();
            }
            &Op::Crash { torn, seed } => self.crash(torn, seed),
            &Op::Advance { ms } => {
                self.clock.advance_ms(ms);
                self.e()
                    .maintain()
                    .unwrap_or_else(|err| panic!("maintain: {err}"));
                self.check_all();
            }
        }
    }

    /// The end of a run: every timeline read whole against the model, then
    /// a power cut right now keeps every durable record.
    pub fn finish(mut self) {
        self.check_all();
        for (tl, m) in &self.model {
            let first = m.first_retained.max(1);
            let all = self
                .e()
                .scan(*tl, first, usize::MAX, Direction::Forward)
                .unwrap_or_else(|err| panic!("{tl:?}: full scan: {err}"));
            assert_eq!(
                all.len() as u64,
                (m.recs.len() as u64 + 1).saturating_sub(first),
                "{tl:?}: full scan length"
            );
            for x in all {
                assert!(
                    x.payload == m.recs[x.seq as usize - 1].0,
                    "{tl:?} seq {}",
                    x.seq
                );
            }
        }
        self.crash(false, 0);
    }
}
