//! TTL retention of the sync keyspace with a manual clock: whole segments
//! whose newest record is older than the TTL are deleted, the first retained
//! seq of every timeline follows, forward reads below it are `Truncated`, the
//! store keyspace keeps everything, and all of it holds after a reopen.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::format::{parse_file_name, FileName};
use timeline_engine::Keyspace;
use timeline_engine::{Config, Direction, Durability, Engine, Error, ManualClock, TimelineId};
use timeline_tests::payload;

const TIMELINES: u64 = 120;
const SHARDS: usize = 2;
const TTL_S: u64 = 80;
const STEP_MS: u64 = 10_000; // = the window (TTL / 8)

fn cfg(clock: &ManualClock) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = SHARDS;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 4 << 20;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 4 << 20;
    c.max_payload = 1024;
    c.clock = Arc::new(clock.clone());
    *c.keyspace_mut(Keyspace::SYNC) = c
        .keyspace(Keyspace::SYNC)
        .clone()
        .with_ttl(Some(Duration::from_secs(TTL_S)));
    c
}

/// Timeline `tl` gets a record in round `r` unless it skips it: some
/// timelines skip every third round, some stop for good after round 8 (and expire completely at round 16).
fn writes(tl: u64, r: u64) -> usize {
    if (tl % 10 == 9 && r > 8) || (tl.is_multiple_of(3) && r % 3 == 1) {
        0
    } else {
        1 + (tl + r) as usize % 3
    }
}

/// Per sync timeline: the round of each of its records (index = seq - 1).
type Rounds = BTreeMap<u64, Vec<u64>>;

/// Segment files (`.log`, `.seg`) in a shard directory; other files the
/// engine may keep there (checkpoints) are not segments.
fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|d| {
            let name = d.as_ref().unwrap().file_name();
            matches!(
                parse_file_name(name.to_str().unwrap()),
                Some(FileName::Log(_) | FileName::Sealed(_))
            )
        })
        .count()
}

fn shard_files(root: &Path, ks: &str) -> Vec<usize> {
    (0..SHARDS)
        .map(|s| files_in(&root.join(ks).join(format!("{s:03}"))))
        .collect()
}

fn round(e: &Engine, r: u64, rounds: &mut Rounds, store: &mut BTreeMap<u64, u64>) {
    let mut keep = Vec::new();
    for tl in 0..TIMELINES {
        for _ in 0..writes(tl, r) {
            let v = rounds.entry(tl).or_default();
            v.push(r);
            let seq = v.len() as u64;
            keep.push((TimelineId::sync(tl), payload(1, tl, seq), seq));
            let s = store.entry(tl).or_default();
            *s += 1;
            keep.push((TimelineId::store(tl), payload(0, tl, *s), *s));
        }
    }
    let items: Vec<(TimelineId, &[u8])> = keep.iter().map(|(t, p, _)| (*t, p.as_slice())).collect();
    let seqs = e.append_batch(&items, Durability::Buffered).unwrap();
    for ((_, _, want), got) in keep.iter().zip(seqs) {
        assert_eq!(got, *want);
    }
}

/// After round `n` (clock at start + n steps) and maintenance, round `k`'s
/// segment is gone iff `k + 8 <= n`: its newest record is at step k, and it
/// expires once `k * STEP + TTL <= n * STEP`.
fn check(e: &Engine, root: &Path, n: u64, rounds: &Rounds, store: &BTreeMap<u64, u64>, what: &str) {
    let first_kept_round = n.saturating_sub(7);
    // One segment per round in each sync shard: rounds first_kept..n-1 sealed, round n active.
    let expect_files = (n - first_kept_round) as usize + 1;
    assert_eq!(
        shard_files(root, "sync"),
        vec![expect_files; SHARDS],
        "{what}: sync files after round {n}"
    );
    assert_eq!(
        shard_files(root, "store"),
        vec![1; SHARDS],
        "{what}: store files (one active log each)"
    );
    for tl in 0..TIMELINES {
        let t = TimelineId::sync(tl);
        let v = &rounds[&tl];
        let last = v.len() as u64;
        let first = v
            .iter()
            .position(|&r| r >= first_kept_round)
            .map(|i| i as u64 + 1)
            .unwrap_or(last + 1);
        assert_eq!(e.last_seq(t), last, "{what}: tl {tl}");
        assert_eq!(
            e.first_retained_seq(t).unwrap(),
            first,
            "{what}: tl {tl} first retained"
        );
        if first > 1 {
            for from in [1, first - 1] {
                match e.scan(t, from, 10, Direction::Forward) {
                    Err(Error::Truncated {
                        first_retained,
                        requested,
                        ..
                    }) => {
                        assert_eq!(first_retained, first, "{what}: tl {tl}");
                        assert_eq!(requested, from);
                    }
                    other => {
                        panic!("{what}: tl {tl}: forward scan from {from} < {first}: {other:?}")
                    }
                }
                assert!(
                    matches!(e.get(t, from), Err(Error::Truncated { .. })),
                    "{what}: tl {tl} get {from}"
                );
            }
        }
        let kept = e.scan(t, first, 10_000, Direction::Forward).unwrap();
        assert_eq!(kept.len() as u64, last + 1 - first, "{what}: tl {tl}");
        for (i, r) in kept.iter().enumerate() {
            assert_eq!(r.seq, first + i as u64);
            assert!(
                r.payload == payload(1, tl, r.seq),
                "{what}: tl {tl} seq {}",
                r.seq
            );
        }
        let back = e.scan(t, u64::MAX, 10_000, Direction::Backward).unwrap();
        assert_eq!(
            back.len() as u64,
            last + 1 - first,
            "{what}: tl {tl} backward"
        );
        // Store keyspace unaffected.
        let st = TimelineId::store(tl);
        let sl = store[&tl];
        assert_eq!(e.last_seq(st), sl);
        assert_eq!(e.first_retained_seq(st).unwrap(), 1);
        let all = e.scan(st, 1, 10_000, Direction::Forward).unwrap();
        assert_eq!(all.len() as u64, sl, "{what}: store tl {tl}");
        assert!(all.iter().all(|r| r.payload == payload(0, tl, r.seq)));
    }
}

#[test]
fn ttl_drops_expired_segments_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let clock = ManualClock::new(1_700_000_000_000);
    let mut rounds = Rounds::new();
    let mut store = BTreeMap::new();
    let e = Engine::open(root, cfg(&clock)).unwrap();
    let mut dropped = 0;
    for n in 0..=14u64 {
        if n > 0 {
            clock.advance_ms(STEP_MS);
        }
        round(&e, n, &mut rounds, &mut store);
        let m = e.maintain().unwrap();
        dropped += m.dropped;
        check(&e, root, n, &rounds, &store, &format!("round {n}"));
    }
    assert_eq!(
        dropped,
        7 * SHARDS,
        "rounds 0..=6 expired in each sync shard"
    );
    assert_eq!(
        e.stats().keyspace(Keyspace::SYNC).dropped_segments,
        dropped as u64
    );
    assert_eq!(e.stats().keyspace(Keyspace::STORE).dropped_segments, 0);
    e.close().unwrap();

    // Reopen: same retention view.
    let e = Engine::open(root, cfg(&clock)).unwrap();
    check(&e, root, 14, &rounds, &store, "after reopen");
    // Time goes on after the reopen: the next steps drop more.
    for n in 15..=17u64 {
        clock.advance_ms(STEP_MS);
        round(&e, n, &mut rounds, &mut store);
        e.maintain().unwrap();
        check(
            &e,
            root,
            n,
            &rounds,
            &store,
            &format!("round {n} after reopen"),
        );
    }
    e.close().unwrap();
}

/// A sync timeline whose records have all expired keeps its seq position:
/// `last_seq` stays, `first_retained_seq` is `last + 1`, and the next append
/// gets `last + 1` — also after a reopen.
#[test]
fn fully_expired_timeline_keeps_its_seqs_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let quiet = TimelineId::sync(5);
    let busy = TimelineId::sync(6);
    {
        let e = Engine::open(dir.path(), cfg(&clock)).unwrap();
        for i in 1..=10u64 {
            assert_eq!(
                e.append_with(quiet, &payload(1, 5, i), Durability::Buffered)
                    .unwrap(),
                i
            );
        }
        for _ in 0..10 {
            clock.advance_ms(STEP_MS);
            e.append_with(busy, b"tick", Durability::Buffered).unwrap();
            e.maintain().unwrap();
        }
        assert_eq!(e.last_seq(quiet), 10);
        assert_eq!(e.first_retained_seq(quiet).unwrap(), 11);
        assert!(matches!(
            e.scan(quiet, 1, 5, Direction::Forward),
            Err(Error::Truncated {
                first_retained: 11,
                ..
            })
        ));
        e.close().unwrap();
    }
    let e = Engine::open(dir.path(), cfg(&clock)).unwrap();
    assert_eq!(
        e.last_seq(quiet),
        10,
        "a fully expired timeline forgot its last seq on reopen"
    );
    assert_eq!(e.first_retained_seq(quiet).unwrap(), 11);
    assert_eq!(
        e.append_with(quiet, b"after", Durability::Buffered)
            .unwrap(),
        11,
        "seq reused after TTL + reopen"
    );
}
