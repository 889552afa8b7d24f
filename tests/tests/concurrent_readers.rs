//! Readers running against writers, rolls, sealing and TTL drops never see
//! a partial record, a gap, a wrong payload or a seq above what the writer
//! acknowledged, and never wait for a writer to finish.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timeline_engine::Keyspace;
use timeline_engine::*;

const TIMELINES: u64 = 64;

fn payload(tl: TimelineId, seq: u64) -> Vec<u8> {
    let len = (tl.id * 31 + seq * 7) % 200;
    let mut v = format!("{}:{}:{}|", tl.keyspace.0, tl.id, seq).into_bytes();
    v.extend((0..len).map(|i| (i as u8) ^ (seq as u8)));
    v
}

fn tl(i: u64) -> TimelineId {
    if i.is_multiple_of(2) {
        TimelineId::store(i / 2)
    } else {
        TimelineId::sync(i / 2)
    }
}

#[test]
fn readers_see_consistent_prefixes_while_segments_roll_and_seal() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::default();
    cfg.shards = 2;
    cfg.keyspace_mut(Keyspace::STORE).segment_bytes = 128 << 10;
    cfg.keyspace_mut(Keyspace::SYNC).segment_bytes = 128 << 10;
    cfg.max_payload = 4096;
    cfg.maintenance_interval = Duration::from_millis(5);
    let engine = Engine::open(dir.path(), cfg).unwrap();
    // Per timeline: highest seq acknowledged to a writer.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..TIMELINES).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(4);

    let mut writers = Vec::new();
    for w in 0..2u64 {
        let (e, acked, stop) = (engine.clone(), acked.clone(), stop.clone());
        writers.push(std::thread::spawn(move || {
            // Writer w owns timelines with i % 2 == w, so it knows the next seq.
            let mine: Vec<u64> = (0..TIMELINES).filter(|i| i % 2 == w).collect();
            let mut next: Vec<u64> = vec![1; TIMELINES as usize];
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let batch: Vec<u64> = (0..8).map(|j| mine[(k + j * 5) % mine.len()]).collect();
                k += 3;
                let mut seen = std::collections::HashMap::new();
                let items: Vec<(TimelineId, Vec<u8>)> = batch
                    .iter()
                    .map(|&i| {
                        let c = seen.entry(i).or_insert(next[i as usize]);
                        let p = payload(tl(i), *c);
                        *c += 1;
                        (tl(i), p)
                    })
                    .collect();
                let refs: Vec<(TimelineId, &[u8])> =
                    items.iter().map(|(t, p)| (*t, p.as_slice())).collect();
                let seqs = e.append_batch(&refs, Durability::Buffered).unwrap();
                for (&i, s) in batch.iter().zip(seqs) {
                    assert_eq!(s, next[i as usize], "writer got a non-consecutive seq");
                    next[i as usize] += 1;
                    acked[i as usize].fetch_max(s, Ordering::Release);
                }
            }
        }));
    }

    let mut readers = Vec::new();
    for r in 0..2u64 {
        let (e, acked, stop) = (engine.clone(), acked.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut x = r + 1;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = x % TIMELINES;
                let t = tl(i);
                let floor = acked[i as usize].load(Ordering::Acquire);
                let last = e.last_seq(t);
                assert!(
                    last >= floor,
                    "last_seq {last} below an acknowledged seq {floor}"
                );
                if last == 0 {
                    continue;
                }
                let from = 1 + (x >> 20) % last;
                let fwd = e.scan(t, from, 25, Direction::Forward).unwrap();
                assert!(!fwd.is_empty());
                for (k, rec) in fwd.iter().enumerate() {
                    assert_eq!(rec.seq, from + k as u64, "{t:?}: gap in forward scan");
                    assert_eq!(
                        rec.payload,
                        payload(t, rec.seq),
                        "{t:?} seq {}: wrong bytes",
                        rec.seq
                    );
                }
                let back = e.scan(t, u64::MAX, 25, Direction::Backward).unwrap();
                let top = back[0].seq;
                assert!(
                    top >= last,
                    "{t:?}: newest page starts at {top}, below last_seq {last}"
                );
                for (k, rec) in back.iter().enumerate() {
                    assert_eq!(rec.seq, top - k as u64, "{t:?}: gap in backward scan");
                    assert_eq!(rec.payload, payload(t, rec.seq));
                }
                let g = e.get(t, from).unwrap().unwrap();
                assert_eq!(g.payload, payload(t, from));
                reads += 3;
            }
            reads
        }));
    }
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    let st = engine.stats();
    assert!(reads > 1000, "readers made too little progress: {reads}");
    assert!(
        st.keyspace(Keyspace::STORE).sealed_segments > 2
            && st.keyspace(Keyspace::SYNC).sealed_segments > 2,
        "no sealing happened: {st:?}"
    );
    // Everything acknowledged is there after a clean reopen too.
    engine.close().unwrap();
    let mut cfg = Config::default();
    cfg.background = false;
    let e = Engine::open(dir.path(), cfg).unwrap();
    for i in 0..TIMELINES {
        let t = tl(i);
        let a = acked[i as usize].load(Ordering::Acquire);
        assert_eq!(e.last_seq(t), a);
        let all = e.scan(t, 1, usize::MAX, Direction::Forward).unwrap();
        assert_eq!(all.len() as u64, a);
        for rec in all {
            assert_eq!(rec.payload, payload(t, rec.seq));
        }
    }
}
