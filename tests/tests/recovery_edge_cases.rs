//! Edge cases of recovery and rolling that once lost or wedged data, one
//! regression test each: log segments that recovery keeps as frozen are
//! synced before anything chained on them is acknowledged (they were not,
//! so a group-committed append could be lost in a power cut); a roll that
//! fails half way (disk full) leaves no file that makes later rolls fail; a
//! log-kind seal after a torn write stops at the last valid record (it put
//! the footer before leftover garbage, wedging sealing and reopen).
#![allow(clippy::unwrap_used)]
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::io::{MemFaults, MemIo};
use timeline_engine::Keyspace;
use timeline_engine::*;

fn cfg(mem: &MemIo, background: bool) -> Config {
    let mut c = Config::default();
    c.io = Some(Arc::new(mem.clone()));
    c.background = background;
    c.maintenance_interval = Duration::from_secs(3600);
    c.shards = 1;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c.max_payload = 1024;
    c
}

/// A: after a kill -9, a recovered *frozen* log is neither synced nor
/// registered as retired; an acknowledged append chained on it is cut by
/// the torn-tail rule after a power cut.
#[test]
fn recovered_frozen_logs_are_synced_before_appends_chained_on_them() {
    let mut lost = 0;
    let runs = 40;
    for _ in 0..runs {
        let mem = MemIo::new();
        let e = Engine::open("/r", cfg(&mem, false)).unwrap();
        // Fill gen 0 to within 4096 bytes of its capacity, no roll, Buffered.
        let mut n = 0u64;
        loop {
            e.append_with(TimelineId::store(1), &[1u8; 300], Durability::Buffered)
                .unwrap();
            n += 1;
            if 64 + 340 * n > (64 << 10) - 4096 {
                break;
            }
        }
        // kill -9: no close, no drop-sync; page cache (MemIo live state) kept.
        std::mem::forget(e);
        // Reopen (background: sealing of the recovered frozen log happens later).
        let e = Engine::open("/r", cfg(&mem, true)).unwrap();
        let s = e
            .append_with(TimelineId::store(1), b"acked", Durability::GroupCommit)
            .unwrap();
        assert_eq!(s, n + 1);
        let image = mem.crash(); // power cut
        std::mem::forget(e);
        let e = Engine::open("/r", cfg(&image, false)).unwrap();
        if e.last_seq(TimelineId::store(1)) < s {
            lost += 1;
        }
        std::mem::forget(e);
    }
    assert_eq!(lost, 0, "{lost}/{runs} runs lost a group-committed append");
}

/// B: a roll whose new-file header write fails leaves the file behind and
/// does not advance next_gen: every later roll fails with AlreadyExists.
#[test]
fn a_roll_that_fails_half_way_does_not_wedge_later_rolls() {
    let mem = MemIo::new();
    let e = Engine::open("/b", cfg(&mem, false)).unwrap();
    let tl = TimelineId::store(1);
    let mut n = 0u64;
    loop {
        e.append_with(tl, &[1u8; 300], Durability::Buffered)
            .unwrap();
        n += 1;
        if 64 + 340 * (n + 1) > (64 << 10) {
            break;
        }
    }
    mem.set_faults(MemFaults {
        fail_writes_after_bytes: Some(mem.bytes_written()),
        ..MemFaults::default()
    });
    let r = e.append_with(tl, &[1u8; 300], Durability::Buffered);
    assert!(r.is_err(), "expected ENOSPC: {r:?}");
    mem.set_faults(MemFaults::default()); // space is back
    let r2 = e.append_with(tl, &[1u8; 300], Durability::Buffered);
    assert!(
        r2.is_ok(),
        "engine did not go on once space was back: {r2:?}"
    );
}

/// C: a torn (partial) write in the sync keyspace leaves garbage past the
/// published end of the log; log-kind sealing appends the index at the
/// published end, so the garbage trails the footer.
#[test]
fn a_log_kind_seal_after_a_torn_write_ignores_the_garbage() {
    let mem = MemIo::new();
    let e = Engine::open("/c", cfg(&mem, false)).unwrap();
    let tl = TimelineId::sync(1);
    e.append_with(tl, &[1u8; 300], Durability::Buffered)
        .unwrap();
    let big: Vec<(TimelineId, &[u8])> = (0..10).map(|_| (tl, &[2u8; 300][..])).collect();
    mem.set_faults(MemFaults {
        tear_next_write: Some(3000),
        ..MemFaults::default()
    });
    assert!(e.append_batch(&big, Durability::Buffered).is_err());
    mem.set_faults(MemFaults::default());
    e.append_with(tl, &[3u8; 10], Durability::Buffered).unwrap();
    let r = e.seal_active();
    eprintln!("seal_active: {r:?}");
    let r2 = e.seal_active();
    eprintln!("seal_active again: {r2:?}");
    e.close().unwrap();
    let r3 = Engine::open("/c", cfg(&mem, false));
    eprintln!("reopen: {:?}", r3.as_ref().map(|_| ()));
    assert!(r.is_ok() && r3.is_ok());
}

/// `append_at` starts an empty timeline at a given SeqId (a replica
/// restored from another's data where retention had dropped the start):
/// the timeline reads from there, continues from there, and is the same
/// after its segments are sealed and after a crash and reopen; it is
/// refused on a timeline that has a record, and for seq 0.
#[test]
fn append_at_starts_an_empty_timeline_at_a_seq_that_survives_sealing_and_reopen() {
    let mem = MemIo::new();
    let e = Engine::open("/a", cfg(&mem, false)).unwrap();
    let (t, other) = (TimelineId::sync(7), TimelineId::sync(8));
    assert_eq!(
        e.append_at(t, 1000, b"first", Durability::Buffered)
            .unwrap(),
        1000
    );
    // Enough to roll several 64 KiB segments, interleaved with another
    // timeline.
    for i in 0..600u64 {
        let p = vec![i as u8; 300];
        assert_eq!(
            e.append_with(t, &p, Durability::Buffered).unwrap(),
            1001 + i
        );
        e.append_with(other, &p, Durability::Buffered).unwrap();
    }
    let check = |e: &Engine| {
        assert_eq!(e.last_seq(t), 1600);
        assert_eq!(e.first_retained_seq(t).unwrap(), 1000);
        let all = e.scan(t, 1, 2000, Direction::Forward).unwrap();
        assert_eq!(all.len(), 601);
        assert_eq!((all[0].seq, &all[0].payload[..]), (1000, &b"first"[..]));
        for (k, r) in all.iter().enumerate() {
            assert_eq!(r.seq, 1000 + k as u64);
        }
        let back = e.scan(t, u64::MAX, 3, Direction::Backward).unwrap();
        assert_eq!(
            back.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1600, 1599, 1598]
        );
        assert_eq!(e.get(t, 1300).unwrap().unwrap().payload, vec![43u8; 300]);
        assert_eq!(e.last_seq(other), 600);
    };
    check(&e);
    e.maintain().unwrap(); // seal what rolled
    check(&e);
    assert!(matches!(
        e.append_at(t, 5000, b"x", Durability::Buffered),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        e.append_at(TimelineId::sync(9), 0, b"x", Durability::Buffered),
        Err(Error::InvalidArgument(_))
    ));
    e.append_at(TimelineId::sync(10), 3, b"x", Durability::GroupCommit)
        .unwrap();
    std::mem::forget(e); // kill -9
    let e = Engine::open("/a", cfg(&mem, false)).unwrap();
    check(&e);
    assert_eq!(e.last_seq(TimelineId::sync(10)), 3);
    assert_eq!(e.append(t, b"next").unwrap(), 1601);
    e.close().unwrap();
    let e = Engine::open("/a", cfg(&mem, false)).unwrap();
    assert_eq!(e.last_seq(t), 1601);
    assert_eq!(e.first_retained_seq(t).unwrap(), 1000);
}

/// `append_after` appends only while the timeline's last SeqId is the one
/// given (0: empty): after another append it writes nothing and says so;
/// what it wrote with `Sync` is there after a kill.
#[test]
fn append_after_writes_only_while_the_last_seq_is_the_one_given() {
    let mem = MemIo::new();
    let e = Engine::open("/after", cfg(&mem, false)).unwrap();
    let t = TimelineId::sync(3);
    assert_eq!(
        e.append_after(t, 1, b"x", Durability::Buffered).unwrap(),
        None
    );
    assert_eq!(
        e.append_after(t, 0, b"a", Durability::GroupCommit).unwrap(),
        Some(1)
    );
    assert_eq!(e.append_with(t, b"b", Durability::Buffered).unwrap(), 2);
    // A renewal that read seq 1 comes too late: nothing lands after "b".
    assert_eq!(e.append_after(t, 1, b"a", Durability::Sync).unwrap(), None);
    assert_eq!(e.last_seq(t), 2);
    assert_eq!(
        e.append_after(t, 2, b"b", Durability::Sync).unwrap(),
        Some(3)
    );
    let all: Vec<Vec<u8>> = e
        .scan(t, 1, 10, Direction::Forward)
        .unwrap()
        .into_iter()
        .map(|r| r.payload)
        .collect();
    assert_eq!(all, vec![b"a".to_vec(), b"b".to_vec(), b"b".to_vec()]);
    std::mem::forget(e); // kill -9: the synced copy is there
    let e = Engine::open("/after", cfg(&mem, false)).unwrap();
    assert_eq!(e.last_seq(t), 3);
    assert_eq!(
        e.append_after(t, 3, b"c", Durability::Buffered).unwrap(),
        Some(4)
    );
}

/// `release` lets maintenance drop the oldest sealed segments whose every
/// record was released, and only those (a prefix: a segment holding a
/// record still needed keeps itself and every newer one). What was
/// dropped reads as `Truncated`; the rest reads, also after a reopen
/// (where nothing is released until the owner says so again).
#[test]
fn released_records_free_their_segments_oldest_first() {
    let mem = MemIo::new();
    let e = Engine::open("/rel", cfg(&mem, false)).unwrap();
    let (a, b) = (TimelineId::store(1), TimelineId::store(2));
    // b has one record, in the first segment only.
    e.append_with(b, b"pin", Durability::Buffered).unwrap();
    for i in 0..1000u64 {
        e.append_with(a, &[i as u8; 300], Durability::Buffered)
            .unwrap();
    }
    e.maintain().unwrap();
    let dropped = |e: &Engine| e.stats().total().dropped_segments;
    // A released only through 10: nothing can go.
    e.release(a, 10);
    e.maintain().unwrap();
    assert_eq!(dropped(&e), 0);
    // Everything of a released, but b's record pins the first segment.
    e.release(a, 1000);
    e.maintain().unwrap();
    assert_eq!(dropped(&e), 0, "b's record pins the oldest segment");
    e.release(b, 1);
    e.maintain().unwrap();
    let n = dropped(&e);
    assert!(n >= 2, "dropped {n} segments");
    let first = e.first_retained_seq(a).unwrap();
    assert!(first > 1 && first <= 1000, "first retained {first}");
    assert!(matches!(
        e.scan(a, 1, 10, Direction::Forward),
        Err(Error::Truncated { .. })
    ));
    let rest = e.scan(a, first, 2000, Direction::Forward).unwrap();
    assert_eq!(rest.len() as u64, 1000 - first + 1);
    assert_eq!(rest.last().unwrap().payload, vec![(999 % 256) as u8; 300]);
    e.close().unwrap();
    let e = Engine::open("/rel", cfg(&mem, false)).unwrap();
    assert_eq!(e.first_retained_seq(a).unwrap(), first);
    assert_eq!(e.last_seq(a), 1000);
    e.maintain().unwrap();
    assert_eq!(dropped(&e), 0, "nothing released since the reopen");
    assert_eq!(e.append(a, b"more").unwrap(), 1001);
}
