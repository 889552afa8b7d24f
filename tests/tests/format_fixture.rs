//! The on-disk format version 1 is frozen: a data directory written by this
//! version is checked in (`tests/fixtures/format-v1/`) and must keep opening
//! with exactly its contents. It holds both keyspaces, grouped and log-kind
//! sealed segments, an index checkpoint written by a TTL drop, and active
//! logs. Regenerate only when the format version changes:
//! `cargo test -p timeline-tests --test format_fixture -- --ignored regenerate`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::Keyspace;
use timeline_engine::*;

const START_MS: u64 = 1_700_000_000_000;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/format-v1")
}

fn cfg(clock: &ManualClock) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 2;
    c.clock = Arc::new(clock.clone());
    c.max_payload = 1024;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::STORE).segment_window = Duration::from_secs(10);
    *c.keyspace_mut(Keyspace::SYNC) =
        KeyspaceConfig::sync().with_ttl(Some(Duration::from_secs(80)));
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c
}

fn payload(tl: TimelineId, seq: u64) -> Vec<u8> {
    // The fixture was written when keyspaces were an enum printed as
    // `Store` / `Sync`: its payloads keep those names.
    let name = if tl.keyspace == Keyspace::STORE {
        "Store"
    } else {
        "Sync"
    };
    let mut v = format!("v1 {name} {} {seq} ", tl.id).into_bytes();
    v.extend((0..(seq * 7 + tl.id) % 300).map(|i| (i as u8).wrapping_mul(31) ^ seq as u8));
    v
}

/// What the fixture holds: (timeline, first retained seq, last seq).
fn expected() -> Vec<(TimelineId, u64, u64)> {
    let mut v = Vec::new();
    for id in 0..8 {
        v.push((TimelineId::store(id), 1, 60));
    }
    for id in 0..8 {
        // Round 0 of the sync keyspace expired (20 records each).
        v.push((TimelineId::sync(id), 21, 60));
    }
    v
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
#[ignore = "writes the checked-in fixture; run only when the format version changes"]
fn regenerate() {
    let dir = fixture_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let clock = ManualClock::new(START_MS);
    let e = Engine::open(&dir, cfg(&clock)).unwrap();
    for round in 0..3u64 {
        for seq in round * 20 + 1..=round * 20 + 20 {
            for id in 0..8 {
                for tl in [TimelineId::store(id), TimelineId::sync(id)] {
                    assert_eq!(
                        e.append_with(tl, &payload(tl, seq), Durability::Buffered)
                            .unwrap(),
                        seq
                    );
                }
            }
        }
        clock.advance_ms(11_000);
        e.maintain().unwrap();
    }
    clock.advance_ms(50_000);
    assert!(e.maintain().unwrap().dropped > 0);
    e.close().unwrap();
}

#[test]
fn format_v1_fixture_opens_with_its_contents() {
    let src = fixture_dir();
    assert!(
        src.join("engine.meta").is_file(),
        "fixture missing: {}",
        src.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&src, tmp.path());
    let names: Vec<String> = walk(tmp.path());
    for want in [".seg", ".log", ".ckpt"] {
        assert!(
            names.iter().any(|n| n.ends_with(want)),
            "fixture lacks a {want} file: {names:?}"
        );
    }
    // A clock long after the fixture was written: the sync keyspace's TTL
    // has passed for everything, but nothing is dropped until maintenance.
    let clock = ManualClock::new(START_MS + 82_000);
    let e = Engine::open(tmp.path(), cfg(&clock)).unwrap();
    for (tl, first, last) in expected() {
        assert_eq!(e.last_seq(tl), last, "{tl:?}");
        assert_eq!(e.first_retained_seq(tl).unwrap(), first, "{tl:?}");
        let all = e.scan(tl, first, 1000, Direction::Forward).unwrap();
        assert_eq!(all.len() as u64, last - first + 1, "{tl:?}");
        for r in &all {
            assert_eq!(r.payload, payload(tl, r.seq), "{tl:?} seq {}", r.seq);
        }
        let page = e.scan(tl, u64::MAX, 5, Direction::Backward).unwrap();
        assert_eq!(page.first().map(|r| r.seq), Some(last));
    }
    // And it takes new appends.
    assert_eq!(
        e.append_with(TimelineId::store(0), b"new", Durability::GroupCommit)
            .unwrap(),
        61
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}
