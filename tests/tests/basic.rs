//! Basic behaviour of the public API on a real directory.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use timeline_engine::Keyspace;
use timeline_engine::*;

fn small_cfg() -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 2;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c.max_payload = 1024;
    c
}

#[test]
fn append_get_scan_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut expect: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 50];
    {
        let e = Engine::open(dir.path(), small_cfg()).unwrap();
        for i in 0..5000u64 {
            let t = i * 7 % 50;
            let p = format!("msg-{t}-{i}").into_bytes();
            let ks = if t.is_multiple_of(2) {
                TimelineId::store(t)
            } else {
                TimelineId::sync(t)
            };
            let seq = e.append_with(ks, &p, Durability::Buffered).unwrap();
            expect[t as usize].push(p);
            assert_eq!(seq, expect[t as usize].len() as u64);
        }
        let st = e.stats();
        assert!(st.keyspace(Keyspace::STORE).sealed_segments > 0, "{st:?}");
        check(&e, &expect);
        e.close().unwrap();
    }
    let e = Engine::open(dir.path(), small_cfg()).unwrap();
    check(&e, &expect);
}

fn check(e: &Engine, expect: &[Vec<Vec<u8>>]) {
    for (t, msgs) in expect.iter().enumerate() {
        let t = t as u64;
        let tl = if t.is_multiple_of(2) {
            TimelineId::store(t)
        } else {
            TimelineId::sync(t)
        };
        assert_eq!(e.last_seq(tl), msgs.len() as u64);
        assert_eq!(e.first_retained_seq(tl).unwrap(), 1);
        for (i, m) in msgs.iter().enumerate() {
            let r = e.get(tl, i as u64 + 1).unwrap().unwrap();
            assert_eq!(r.seq, i as u64 + 1, "timeline {t}");
            assert_eq!(&r.payload, m, "timeline {t} seq {}", i + 1);
        }
        let all = e.scan(tl, 1, 10_000, Direction::Forward).unwrap();
        assert_eq!(all.len(), msgs.len());
        let back = e.scan(tl, u64::MAX, 7, Direction::Backward).unwrap();
        assert_eq!(back.len(), 7.min(msgs.len()));
        assert_eq!(back[0].seq, msgs.len() as u64);
        let mid = e.scan(tl, 40, 20, Direction::Forward).unwrap();
        assert_eq!(mid.first().map(|r| r.seq), Some(40));
        assert_eq!(mid.len(), 20);
    }
}

#[test]
fn ttl_drops_old_segments_and_reports_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_000_000);
    let mut c = small_cfg();
    c.clock = std::sync::Arc::new(clock.clone());
    *c.keyspace_mut(Keyspace::SYNC) = c
        .keyspace(Keyspace::SYNC)
        .clone()
        .with_ttl(Some(Duration::from_secs(80)));
    let e = Engine::open(dir.path(), c).unwrap();
    let tl = TimelineId::sync(9);
    for _ in 0..100 {
        e.append_with(tl, b"old", Durability::Buffered).unwrap();
    }
    clock.advance_ms(11_000); // past the 10 s window: the next append rolls
    e.maintain().unwrap();
    for _ in 0..100 {
        e.append_with(tl, b"new", Durability::Buffered).unwrap();
    }
    clock.advance_ms(75_000);
    let m = e.maintain().unwrap();
    assert!(m.dropped >= 1, "{m:?}");
    assert_eq!(e.first_retained_seq(tl).unwrap(), 101);
    match e.scan(tl, 50, 10, Direction::Forward) {
        Err(Error::Truncated { first_retained, .. }) => assert_eq!(first_retained, 101),
        other => panic!("expected Truncated, got {other:?}"),
    }
    let r = e.scan(tl, 101, 10, Direction::Forward).unwrap();
    assert_eq!(r[0].seq, 101);
    let b = e.scan(tl, 105, 100, Direction::Backward).unwrap();
    assert_eq!(b.len(), 5);
    // The store keyspace keeps everything.
    assert_eq!(e.first_retained_seq(TimelineId::store(9)).unwrap(), 1);
}

/// `append_batch_expecting`: a batch whose every item lands where it was
/// expected is written; one item that would not (a record appended
/// meanwhile) refuses the whole batch with `NotLast`, nothing of it
/// written; a batch over two shards is refused. What the IM layer's
/// batches rely on so that a record appended to a conversation from
/// outside never leaves part of a batch stored.
#[test]
fn a_batch_with_expected_seqs_is_written_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::open(dir.path(), small_cfg()).unwrap();
    // Timelines of one shard.
    let shard = e.shard_index(TimelineId::store(1));
    let ids: Vec<u64> = (1..)
        .filter(|&i| e.shard_index(TimelineId::store(i)) == shard)
        .take(3)
        .collect();
    let (a, b, c) = (
        TimelineId::store(ids[0]),
        TimelineId::store(ids[1]),
        TimelineId::store(ids[2]),
    );
    let d = Durability::GroupCommit;
    let got = e.append_batch_expecting(&[(a, b"a1"), (b, b"b1"), (b, b"b2")], &[0, 1, 2], d);
    assert_eq!(got.unwrap(), vec![1, 1, 2]);
    // Someone appends to `b` meanwhile: `b` is not where it was expected.
    assert_eq!(e.append_with(b, b"foreign", d).unwrap(), 3);
    let got = e.append_batch_expecting(&[(a, b"a2"), (b, b"b3"), (c, b"c1")], &[0, 3, 0], d);
    assert!(
        matches!(got, Err(Error::NotLast { timeline, expected: 2, last: 3 }) if timeline == b.id),
        "{got:?}"
    );
    for (tl, last) in [(a, 1), (b, 3), (c, 0)] {
        assert_eq!(
            e.last_seq(tl),
            last,
            "{tl:?}: part of a refused batch was written"
        );
    }
    // Where it stands now, it goes in.
    let got = e.append_batch_expecting(&[(a, b"a2"), (b, b"b4"), (c, b"c1")], &[2, 4, 1], d);
    assert_eq!(got.unwrap(), vec![2, 4, 1]);
    assert_eq!(e.get(b, 4).unwrap().unwrap().payload, b"b4");
    let other = (1..)
        .map(TimelineId::store)
        .find(|&t| e.shard_index(t) != shard)
        .unwrap();
    let got = e.append_batch_expecting(&[(a, b"x"), (other, b"y")], &[0, 0], d);
    assert!(matches!(got, Err(Error::InvalidArgument(_))), "{got:?}");
    let got = e.append_batch_expecting(&[(a, b"x")], &[0, 0], d);
    assert!(matches!(got, Err(Error::InvalidArgument(_))), "{got:?}");
}
