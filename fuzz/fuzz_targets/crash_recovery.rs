//! Fuzzer-driven appends, syncs, clock advances, clean reopens, reads and
//! power cuts on a `MemIo` engine, run in the one model world
//! (`timeline_tests::model`, which tests/tests/model.rs drives with
//! proptest): consecutive seqs, exact bytes, and after a crash (optionally
//! with torn unsynced tails) a prefix that keeps every acknowledged record
//! and invents none.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use timeline_engine::TimelineId;
use timeline_tests::model::{Op, Settings, World};

/// Timelines: `k % 8`: bit 2 picks the keyspace, bits 0..2 the id.
const TLS: u8 = 8;

fn tl(k: u8) -> TimelineId {
    let k = k % TLS;
    let id = match k & 3 {
        3 => u64::MAX,
        x => x as u64,
    };
    if k & 4 == 0 {
        TimelineId::store(id)
    } else {
        TimelineId::sync(id)
    }
}

#[derive(Arbitrary, Debug)]
enum FuzzOp {
    Append { tl: u8, len: u16, group: bool },
    Batch { items: Vec<(u8, u16)>, group: bool },
    Sync,
    Crash { torn: bool, seed: u64 },
    Reopen,
    /// Advance the clock by `secs` and run `maintain` (time rolls, sealing).
    Advance { secs: u8 },
    Read { tl: u8, from: u8, limit: u8, forward: bool },
}

/// The model's steps for one fuzzer op (a read is a scan and a get).
fn ops(op: FuzzOp) -> Vec<Op> {
    match op {
        FuzzOp::Append { tl: k, len, group } => vec![Op::Append {
            tl: tl(k),
            len: len as usize % 3000,
            durable: group,
        }],
        FuzzOp::Batch { items, group } => vec![Op::Batch {
            items: items
                .into_iter()
                .take(24)
                .map(|(k, len)| (tl(k), len as usize % 1500))
                .collect(),
            durable: group,
        }],
        FuzzOp::Sync => vec![Op::Sync],
        FuzzOp::Crash { torn, seed } => vec![Op::Crash { torn, seed }],
        FuzzOp::Reopen => vec![Op::Reopen],
        FuzzOp::Advance { secs } => vec![Op::Advance {
            ms: secs as u64 * 1000,
        }],
        FuzzOp::Read {
            tl: k,
            from,
            limit,
            forward,
        } => vec![
            Op::Scan {
                tl: tl(k),
                from: from as u64,
                limit: limit as usize % 50,
                forward,
            },
            Op::Get {
                tl: tl(k),
                seq: from as u64,
            },
        ],
    }
}

fuzz_target!(|input: Vec<FuzzOp>| {
    let mut w = World::new(Settings {
        shards: 1,
        sync_ttl_ms: None,
        segment_window: Some(Duration::from_secs(10)),
    });
    for op in input.into_iter().take(64).flat_map(ops) {
        w.apply(&op);
    }
    w.finish();
});
