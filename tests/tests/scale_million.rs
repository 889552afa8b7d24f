//! A million timelines cost no files, no file descriptors and no memory
//! mappings of their own, and at most 64 bytes of index memory each plus one
//! byte per message.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use timeline_engine::Keyspace;
use timeline_engine::{Config, Durability, Engine, TimelineId};
use timeline_tests::count_files;

const TIMELINES: u64 = 1_000_000;
const BATCH: u64 = 1_000;

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

fn tl(i: u64) -> TimelineId {
    if i.is_multiple_of(2) {
        TimelineId::store(i)
    } else {
        TimelineId::sync(i)
    }
}

/// Payload of message `k` (0 or 1) of timeline `i`: 8 bytes.
fn msg(i: u64, k: u64) -> [u8; 8] {
    (i * 2 + k).to_le_bytes()
}

/// Append timelines `from..to`: one message each, a second for every third.
fn fill(e: &Engine, from: u64, to: u64) -> u64 {
    let mut n = 0;
    let mut start = from;
    while start < to {
        let end = (start + BATCH).min(to);
        let mut items: Vec<(TimelineId, [u8; 8])> = Vec::with_capacity(2 * BATCH as usize);
        for i in start..end {
            items.push((tl(i), msg(i, 0)));
            if i.is_multiple_of(3) {
                items.push((tl(i), msg(i, 1)));
            }
        }
        let refs: Vec<(TimelineId, &[u8])> = items.iter().map(|(t, p)| (*t, &p[..])).collect();
        let seqs = e.append_batch(&refs, Durability::Buffered).unwrap();
        assert_eq!(seqs.len(), refs.len());
        n += refs.len() as u64;
        start = end;
    }
    n
}

fn snapshot(dir: &Path) -> (usize, usize, usize) {
    (count_files(dir), fds(), maps())
}

#[test]
fn a_million_timelines_cost_no_files_fds_or_mappings() {
    let dir = tempfile::tempdir().unwrap();
    // Default shards; segments large enough that nothing rolls by size
    // (about 56 MB of records spread over 2 x 4 shards).
    let mut cfg = Config::default();
    cfg.background = false;
    cfg.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 20;
    cfg.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 20;
    let e = Engine::open(dir.path(), cfg).unwrap();
    let mut messages = fill(&e, 0, 1_000);
    let small = snapshot(dir.path());
    let st_small = e.stats().total();
    assert_eq!(st_small.timelines, 1_000);

    messages += fill(&e, 1_000, TIMELINES);
    let big = snapshot(dir.path());
    let st = e.stats().total();
    eprintln!(
        "scale_million: after 1k timelines files/fds/maps = {small:?}, after 1M = {big:?}; \
         index_bytes {} ({:.1} B/timeline), {messages} messages",
        st.index_bytes,
        st.index_bytes as f64 / st.timelines as f64
    );
    assert_eq!(st.timelines, TIMELINES);
    assert_eq!(st.records, messages);
    assert_eq!(
        st.sealed_segments, 0,
        "a segment rolled by size: the file count below would not be comparable"
    );
    assert_eq!(
        big.0, small.0,
        "files in the data dir grew with the number of timelines"
    );
    assert_eq!(
        big.1, small.1,
        "open file descriptors grew with the number of timelines"
    );
    // The allocator may map a few more arenas for a larger heap; per-timeline
    // (or per-thousand-timeline) mappings would add hundreds.
    assert!(
        big.2 <= small.2 + 16,
        "memory mappings grew from {} to {}",
        small.2,
        big.2
    );
    // Target: at most 64 B per timeline plus 1 B per message.
    assert!(
        st.index_bytes <= 64 * st.timelines + st.records,
        "index_bytes {} for {} timelines and {} messages",
        st.index_bytes,
        st.timelines,
        st.records
    );

    // Spot-check contents.
    for i in (0..TIMELINES).step_by(9_973) {
        let want = if i.is_multiple_of(3) { 2 } else { 1 };
        assert_eq!(e.last_seq(tl(i)), want, "timeline {i}");
        assert_eq!(e.get(tl(i), 1).unwrap().unwrap().payload, msg(i, 0));
        if want == 2 {
            assert_eq!(e.get(tl(i), 2).unwrap().unwrap().payload, msg(i, 1));
        }
    }
    e.close().unwrap();
}
