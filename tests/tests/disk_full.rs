//! The engine on a real full disk (a small tmpfs): appends fail with
//! `StorageFull` while it is full and go on as soon as a little room is
//! back, less than a segment's worth; every acknowledged record reads back
//! with its bytes, before and after a reopen.
//!
//! Regression: sealing a segment of a keyspace that regroups copies it
//! into a new file, and a failed copy's partial file stayed until the next
//! try. On a nearly full disk every try (each roll, each maintenance pass)
//! took whatever room there was and failed, so appends kept failing until
//! a whole segment's worth was free, and a drop that would have freed room
//! waited behind the failed seal.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use timeline_engine::{Config, Durability, Engine, Keyspace, TimelineId};
use timeline_tests::cluster::Tmpfs;

const SEGMENT: u64 = 1 << 20;
const TIMELINES: u64 = 64;
/// Room given back each time the disk is full: a quarter of a segment.
const FREED: u64 = SEGMENT / 4;

fn cfg() -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 1;
    c.max_payload = 4096;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = SEGMENT;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = SEGMENT;
    assert!(c.keyspace_mut(Keyspace::STORE).regroup);
    c
}

fn body(tl: u64, seq: u64) -> Vec<u8> {
    let mut v = format!("t{tl}s{seq}|").into_bytes();
    v.resize(1000, (tl + seq) as u8);
    v
}

/// Append round-robin to the store timelines until the disk is full;
/// `acked` gets each acknowledged (timeline, seq). Any error other than a
/// full disk's fails the test. Returns how many were acknowledged.
fn fill(e: &Engine, acked: &mut Vec<(u64, u64)>) -> usize {
    let before = acked.len();
    for i in 0u64.. {
        let tl = i % TIMELINES;
        let seq = e.last_seq(TimelineId::store(tl)) + 1;
        match e.append_with(
            TimelineId::store(tl),
            &body(tl, seq),
            Durability::GroupCommit,
        ) {
            Ok(got) => {
                assert_eq!(got, seq);
                acked.push((tl, seq));
            }
            Err(x) if x.is_storage_full() => break,
            Err(x) => panic!("append {tl}/{seq} failed otherwise than for room: {x}"),
        }
        assert!(i < 100_000, "the disk never filled");
    }
    acked.len() - before
}

fn check(e: &Engine, acked: &[(u64, u64)]) {
    for &(tl, seq) in acked {
        let r = e.get(TimelineId::store(tl), seq).unwrap();
        let r = r.unwrap_or_else(|| panic!("acknowledged {tl}/{seq} missing"));
        assert_eq!(r.payload, body(tl, seq), "{tl}/{seq}");
    }
    for tl in 0..TIMELINES {
        let last = acked.iter().filter(|a| a.0 == tl).map(|a| a.1).max();
        assert_eq!(
            e.last_seq(TimelineId::store(tl)),
            last.unwrap_or(0),
            "timeline {tl}"
        );
    }
}

fn shrink(path: &Path, by: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(by)).unwrap();
}

/// A disk of 8 MiB with a 2 MiB ballast, segments of 1 MiB: filled, then
/// given back a quarter of a segment at a time (less than a seal's copy
/// needs), four times. Each time a maintenance pass (the background
/// thread's retry) succeeds and appends take the room again.
#[test]
fn appends_go_on_when_less_than_a_segment_is_freed_on_a_full_disk() {
    let root = tempfile::tempdir().unwrap();
    let at = root.path().join("disk");
    std::fs::create_dir(&at).unwrap();
    let Some(disk) = Tmpfs::mount(&at, "8m") else {
        eprintln!("engine disk full: SKIPPED: cannot mount a tmpfs (needs root; CI runs as root)");
        return;
    };
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; 2 << 20]).unwrap();
    let dir = disk.path().join("db");
    let e = Engine::open(&dir, cfg()).unwrap();
    let mut acked = Vec::new();
    let first = fill(&e, &mut acked);
    assert!(
        first > 1000,
        "only {first} appends before the disk was full"
    );
    for round in 0..4 {
        shrink(&ballast, FREED);
        let free = disk.free();
        let m = e.maintain();
        assert!(
            m.is_ok(),
            "round {round}: maintenance with {free} bytes free: {m:?}"
        );
        let more = fill(&e, &mut acked);
        let payload = more as u64 * 1000;
        eprintln!("round {round}: {free} bytes freed, {more} appends ({payload} bytes) took them");
        assert!(
            payload >= FREED / 2,
            "round {round}: {FREED} bytes freed, only {payload} bytes of appends took them"
        );
    }
    let st = e.stats().keyspace(Keyspace::STORE);
    assert!(
        st.seals_in_log_order > 0,
        "no segment was sealed in log order: the test did not reach a full disk with a segment to seal ({st:?})"
    );
    check(&e, &acked);
    std::fs::remove_file(&ballast).unwrap();
    e.maintain().unwrap();
    e.close().unwrap();
    let e = Engine::open(&dir, cfg()).unwrap();
    check(&e, &acked);
    let tl = TimelineId::store(0);
    let next = e.last_seq(tl) + 1;
    assert_eq!(e.append_with(tl, b"after", Durability::Sync).unwrap(), next);
    eprintln!(
        "{} acknowledged appends read back after a reopen; {} of {} segments sealed in log order",
        acked.len(),
        st.seals_in_log_order,
        st.sealed_segments
    );
}
