//! A power cut after a segment roll may keep the new segment's pages (the
//! kernel wrote them back on its own) while losing the unsynced tail of the
//! old one, because a roll does not fdatasync the old segment. Recovery must
//! treat the orphaned records as a torn tail (nothing after them was ever
//! acknowledged as durable), never refuse to open, and keep every
//! group-committed append.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;
use timeline_engine::io::{MemFaults, MemIo};
use timeline_engine::Keyspace;
use timeline_engine::*;

fn cfg(mem: &MemIo) -> Config {
    let mut c = Config::default();
    c.io = Some(Arc::new(mem.clone()));
    // Background sealing that never runs on its own: frozen segments stay
    // unsynced logs until the crash.
    c.background = true;
    c.maintenance_interval = Duration::from_secs(3600);
    c.shards = 1;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.max_payload = 1024;
    c
}

#[test]
fn older_segment_torn_newer_segment_kept() {
    let mut recovered_gap_cases = 0;
    for seed in 0..60u64 {
        let mem = MemIo::new();
        let e = Engine::open("/wb", cfg(&mem)).unwrap();
        let mut durable = [0u64; 8];
        let mut written = [0u64; 8];
        // Durable prefix.
        for i in 0..40u64 {
            let t = i % 8;
            let s = e
                .append_with(
                    TimelineId::store(t),
                    &[t as u8; 300],
                    Durability::GroupCommit,
                )
                .unwrap();
            durable[t as usize] = s;
            written[t as usize] = s;
        }
        // Buffered appends across at least one roll (64 KiB segments).
        for i in 0..600u64 {
            let t = (i * 5 + seed) % 8;
            let s = e
                .append_with(TimelineId::store(t), &[t as u8; 300], Durability::Buffered)
                .unwrap();
            written[t as usize] = s;
        }
        assert!(
            e.stats().keyspace(Keyspace::STORE).files >= 3,
            "expected a roll: {:?}",
            e.stats().keyspace(Keyspace::STORE)
        );
        mem.set_faults(MemFaults {
            torn_tail_on_crash: true,
            seed,
            ..MemFaults::default()
        });
        let image = mem.crash();
        drop(e);
        let e = Engine::open("/wb", cfg(&image)).unwrap();
        for t in 0..8u64 {
            let tl = TimelineId::store(t);
            let last = e.last_seq(tl);
            assert!(
                last >= durable[t as usize],
                "seed {seed}: timeline {t} lost durable appends"
            );
            assert!(last <= written[t as usize]);
            let all = e.scan(tl, 1, usize::MAX, Direction::Forward).unwrap();
            assert_eq!(all.len() as u64, last, "seed {seed}: timeline {t} has gaps");
            for (i, r) in all.iter().enumerate() {
                assert_eq!(r.seq, i as u64 + 1);
                assert_eq!(r.payload, vec![t as u8; 300]);
            }
            if last < written[t as usize] {
                recovered_gap_cases += 1;
            }
        }
        // And it keeps working.
        let s = e
            .append_with(TimelineId::store(0), b"after", Durability::GroupCommit)
            .unwrap();
        assert_eq!(s, e.last_seq(TimelineId::store(0)));
        e.close().unwrap();
    }
    assert!(
        recovered_gap_cases > 0,
        "the torn tails never cut anything: the test is not testing"
    );
}
