//! Fault injection at every I/O call (issue 10, item 2). A fixed workload
//! (appends in all three durability modes, batches across shards and
//! keyspaces, segment rolls, seals, TTL drops by a manual clock, syncs, a
//! close with its checkpoint) runs on the in-memory backend after recovering
//! an existing directory; a fault-free run counts its I/O calls, then the
//! sweep fails call N for every N (create, write, set_len, fdatasync,
//! directory sync, rename, unlink, mmap), once as a transient EIO and, on a
//! stride, as a dead device (every call from N on fails) and as a full disk.
//!
//! For every N: every call returns (no panic) a typed error or success;
//! after the first error the shard keeps working or refuses clearly
//! (`Poisoned`, `Io`, `Closed`: never `Corruption`); then the directory is
//! reopened twice, as the process restarting (everything handed to the OS
//! kept) and as a power cut (only what was fdatasynced kept), and:
//! * every acknowledged append that was durable (its own or a group-commit
//!   fdatasync, or a later successful `sync`) is there with its exact bytes;
//!   after a restart every acknowledged append is (buffered ones too);
//! * nothing unverified is returned: every record is one that was appended
//!   to that timeline at that seq (payloads name their attempt);
//! * each timeline is an unbroken run of seqs, and appends continue after it.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::io::{FailAt, IoOp, MemFaults, MemIo};
use timeline_engine::{
    Clock, Config, Direction, Durability, Engine, Error, Keyspace, ManualClock, SeqId, TimelineId,
};

const TIMELINES: u64 = 10;
const ROUNDS: u64 = 40;
const TTL_S: u64 = 40;

fn root() -> PathBuf {
    PathBuf::from("/db")
}

fn cfg(mem: &MemIo, clock: &ManualClock) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 2;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    *c.keyspace_mut(Keyspace::SYNC) = c
        .keyspace(Keyspace::SYNC)
        .clone()
        .with_ttl(Some(Duration::from_secs(TTL_S)));
    c.max_payload = 2048;
    c.io = Some(Arc::new(mem.clone()));
    c.clock = Arc::new(clock.clone());
    c
}

fn tl(i: u64) -> TimelineId {
    if i.is_multiple_of(2) {
        TimelineId::store(i / 2 + 1)
    } else {
        TimelineId::sync(i / 2 + 1)
    }
}

/// A payload naming its timeline, seq and attempt, 40..1,500 bytes long
/// (so segments fill and roll within the workload).
fn payload(t: TimelineId, seq: SeqId, attempt: u64) -> Vec<u8> {
    let mut v = format!("k{}t{}s{seq}a{attempt}|", t.keyspace.0, t.id).into_bytes();
    let len = 40 + ((seq * 7919 + attempt * 104_729 + t.id * 31) % 1460) as usize;
    let mut x = seq ^ (attempt << 32) ^ t.id;
    while v.len() < len {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        v.push((x >> 56) as u8);
    }
    v
}

/// What the workload did, as the caller saw it.
#[derive(Default)]
struct Log {
    /// Every payload tried at a seq (a failed append may leave its record).
    tried: BTreeMap<(TimelineId, SeqId), BTreeSet<Vec<u8>>>,
    /// Acknowledged appends: seq → (payload, durable when acknowledged).
    acked: BTreeMap<(TimelineId, SeqId), (Vec<u8>, bool)>,
    /// The next seq each timeline hands out, as far as the caller knows.
    next: BTreeMap<TimelineId, SeqId>,
    attempts: u64,
    errors: Vec<String>,
}

impl Log {
    /// Payloads for `items`, recorded as tried (seqs as the caller expects
    /// them: a failed append consumes none).
    fn prepare(&mut self, items: &[TimelineId]) -> Vec<(TimelineId, SeqId, Vec<u8>)> {
        let mut next = self.next.clone();
        let mut out = Vec::new();
        for &t in items {
            let s = next.get(&t).copied().unwrap_or(1);
            next.insert(t, s + 1);
            self.attempts += 1;
            let p = payload(t, s, self.attempts);
            self.tried.entry((t, s)).or_default().insert(p.clone());
            out.push((t, s, p));
        }
        out
    }

    fn outcome(
        &mut self,
        e: &Engine,
        items: &[(TimelineId, SeqId, Vec<u8>)],
        r: Result<Vec<SeqId>, Error>,
        durable: bool,
    ) {
        match r {
            Ok(seqs) => {
                for ((t, s, p), got) in items.iter().zip(seqs) {
                    assert_eq!(
                        got, *s,
                        "{t:?}: a failed append consumed a seq (errors so far: {:?})",
                        self.errors
                    );
                    self.acked.insert((*t, *s), (p.clone(), durable));
                    self.next.insert(*t, s + 1);
                }
            }
            Err(x) => {
                self.error(x);
                // A batch is not atomic across shards: the shards that
                // took their part handed out those seqs.
                for (t, _, _) in items {
                    self.next.insert(*t, e.last_seq(*t) + 1);
                }
            }
        }
    }

    fn error(&mut self, e: Error) {
        assert!(
            !matches!(
                e,
                Error::Corruption { .. } | Error::UnsupportedVersion { .. }
            ),
            "an injected I/O fault reported as damage: {e}"
        );
        self.errors.push(e.to_string());
    }

    /// A successful `sync` makes every acknowledged append durable.
    fn all_durable(&mut self) {
        for v in self.acked.values_mut() {
            v.1 = true;
        }
    }
}

fn append(e: &Engine, log: &mut Log, items: &[TimelineId], d: Durability) {
    let prepared = log.prepare(items);
    let batch: Vec<(TimelineId, &[u8])> = prepared.iter().map(|(t, _, p)| (*t, &p[..])).collect();
    let r = match d {
        Durability::GroupCommit => e.append_async(&batch).and_then(|t| t.wait()),
        d => e.append_batch(&batch, d),
    };
    log.outcome(e, &prepared, r, d != Durability::Buffered);
}

/// The workload after `open`: ~250 appends, rolls, seals, two TTL drops.
fn workload(e: &Engine, clock: &ManualClock, log: &mut Log) {
    for r in 0..ROUNDS {
        let d = [
            Durability::Sync,
            Durability::GroupCommit,
            Durability::Buffered,
        ][(r % 3) as usize];
        for i in 0..3 {
            append(e, log, &[tl((r * 3 + i) % TIMELINES)], d);
        }
        if r % 4 == 0 {
            let items: Vec<TimelineId> = (0..5).map(|i| tl((r + i * 3) % TIMELINES)).collect();
            append(e, log, &items, Durability::Sync);
        }
        clock.advance_ms(2_500);
        if r % 5 == 4 {
            if let Err(x) = e.maintain() {
                log.error(x);
            }
        }
        if r % 13 == 12 {
            if let Err(x) = e.seal_active() {
                log.error(x);
            }
        }
        if r % 9 == 8 {
            match e.sync() {
                Ok(()) => log.all_durable(),
                Err(x) => log.error(x),
            }
        }
    }
}

/// A directory with data in both keyspaces and sealed segments: what each
/// run recovers first.
fn base() -> (MemIo, ManualClock, Log) {
    let mem = MemIo::new();
    let clock = ManualClock::new(1_000_000);
    let e = Engine::open(root(), cfg(&mem, &clock)).unwrap();
    let mut log = Log::default();
    workload(&e, &clock, &mut log);
    e.sync().unwrap();
    log.all_durable();
    assert!(log.errors.is_empty());
    drop(e);
    (mem.crash(), clock, log)
}

/// Reopen the image without faults and check it against `log`.
/// `restart`: the process died, the OS kept every write.
fn check(mem: &MemIo, clock: &ManualClock, log: &Log, restart: bool, what: &str) -> usize {
    let e = Engine::open(root(), cfg(mem, clock))
        .unwrap_or_else(|x| panic!("{what}: reopen without faults failed: {x}"));
    let timelines: BTreeSet<TimelineId> = log
        .next
        .keys()
        .copied()
        .chain((0..TIMELINES).map(tl))
        .collect();
    let mut checked = 0;
    for &t in &timelines {
        let last = e.last_seq(t);
        let first = e.first_retained_seq(t).unwrap();
        let mut recs = Vec::new();
        let mut from = first.max(1);
        while from <= last {
            let page = e
                .scan(t, from, 512, Direction::Forward)
                .unwrap_or_else(|x| panic!("{what}: scan {t:?} from {from}: {x}"));
            let Some(l) = page.last() else { break };
            from = l.seq + 1;
            recs.extend(page);
        }
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(
                r.seq,
                first.max(1) + i as u64,
                "{what}: {t:?}: a gap in the seqs"
            );
            let tried = log.tried.get(&(t, r.seq));
            assert!(
                tried.is_some_and(|s| s.contains(&r.payload[..])),
                "{what}: {t:?} seq {}: a record that was never appended there",
                r.seq
            );
        }
        for (&(t2, s), (p, durable)) in log.acked.range((t, 0)..=(t, u64::MAX)) {
            debug_assert_eq!(t2, t);
            if s < first {
                continue; // dropped by the TTL
            }
            if *durable || restart {
                let got = recs.iter().find(|r| r.seq == s);
                assert!(
                    got.is_some_and(|r| r.payload == *p),
                    "{what}: {t:?} seq {s}: acknowledged ({}) and {}",
                    if *durable { "durable" } else { "buffered" },
                    if got.is_some() { "changed" } else { "lost" }
                );
                checked += 1;
            }
        }
        // Appends continue right after what recovery found.
        let s = e.append_with(t, b"after", Durability::Buffered).unwrap();
        assert_eq!(s, last + 1, "{what}: {t:?}");
    }
    checked
}

/// One run with `fault`: recover `base`, run the workload, close.
fn run(base: &MemIo, clock: &ManualClock, fault: Option<FailAt>) -> (MemIo, ManualClock, Log, u64) {
    let mem = base.crash(); // an independent copy
    let clock = ManualClock::new(clock.now_ms());
    mem.set_faults(MemFaults {
        fail_at: fault,
        ..MemFaults::default()
    });
    let mut log = Log::default();
    match Engine::open(root(), cfg(&mem, &clock)) {
        Ok(e) => {
            // The timelines continue from what recovery found.
            for i in 0..TIMELINES {
                log.next.insert(tl(i), e.last_seq(tl(i)) + 1);
            }
            workload(&e, &clock, &mut log);
            match e.close() {
                Ok(()) => log.all_durable(),
                Err(x) => log.error(x),
            }
        }
        Err(x) => log.error(x),
    }
    let calls = mem.calls(&[]);
    mem.set_faults(MemFaults::default());
    (mem, clock, log, calls)
}

/// The base image's acknowledged records, as the run's log must also keep
/// them (they were durable before the run).
fn merge_base(log: &mut Log, base: &Log) {
    for (k, v) in &base.tried {
        log.tried.entry(*k).or_default().extend(v.iter().cloned());
    }
    for (k, (p, _)) in &base.acked {
        log.acked.entry(*k).or_insert((p.clone(), true));
    }
}

fn sweep(kinds: &[(&str, bool, bool)], stride: u64) {
    let (base_mem, clock, base_log) = base();
    let (_, _, clean, calls) = run(&base_mem, &clock, None);
    assert!(clean.errors.is_empty(), "{:?}", clean.errors);
    assert!(calls > 200, "the workload makes {calls} I/O calls");
    let mut failed_runs = 0;
    let mut checked = 0;
    for &(name, sticky, full) in kinds {
        let mut n = 1;
        while n <= calls {
            let fault = FailAt {
                nth: n,
                ops: Vec::new(),
                sticky,
                full,
            };
            let (mem, clock, mut log, _) = run(&base_mem, &clock, Some(fault));
            if !log.errors.is_empty() {
                failed_runs += 1;
            }
            merge_base(&mut log, &base_log);
            let what = format!("{name} at call {n} of {calls}");
            let image = mem.crash();
            checked += check(&mem, &clock, &log, true, &format!("{what}, restart"));
            checked += check(&image, &clock, &log, false, &format!("{what}, power cut"));
            n += stride;
        }
    }
    assert!(
        failed_runs > 0,
        "no injected fault surfaced: the sweep tested nothing"
    );
    eprintln!("{calls} calls per run; {failed_runs} runs saw an error; {checked} acknowledged records checked");
}

#[test]
fn every_io_call_failing_once_loses_nothing_acknowledged() {
    sweep(&[("transient EIO", false, false)], 1);
}

#[test]
fn a_device_that_dies_or_fills_at_any_call_loses_nothing_acknowledged() {
    sweep(
        &[("dead device", true, false), ("full disk", true, true)],
        3,
    );
}

/// The kinds the sweep reaches: every kind the workload uses is failed at
/// least once (else the sweep would be blind to it).
#[test]
fn the_workload_makes_every_kind_of_call() {
    let (base_mem, clock, _) = base();
    let mem = base_mem.crash();
    mem.set_faults(MemFaults::default());
    let clock = ManualClock::new(clock.now_ms());
    let e = Engine::open(root(), cfg(&mem, &clock)).unwrap();
    let mut log = Log::default();
    for i in 0..TIMELINES {
        log.next.insert(tl(i), e.last_seq(tl(i)) + 1);
    }
    workload(&e, &clock, &mut log);
    e.close().unwrap();
    for op in IoOp::ALL {
        assert!(mem.calls(&[op]) > 0, "the workload never calls {op:?}");
    }
}
