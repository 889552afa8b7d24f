//! Model-based property test: random sequences of append, batch append, get,
//! scan (both directions), clean reopen, power-cut crash (through the
//! in-memory backend) and clock advances past the sync TTL, run in the one
//! model world (`timeline_tests::model`, which the `crash_recovery` fuzz
//! target drives too) and checked against a plain `Vec` per timeline.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use timeline_engine::TimelineId;
use timeline_tests::model::{Op, Settings, World};

const TTL_MS: u64 = 80_000;

fn tl_strategy() -> impl Strategy<Value = TimelineId> {
    (any::<bool>(), 0u64..6).prop_map(|(s, id)| {
        if s {
            TimelineId::sync(id)
        } else {
            TimelineId::store(id)
        }
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (tl_strategy(), 0usize..3000, any::<bool>()).prop_map(|(tl, len, durable)| Op::Append { tl, len, durable }),
        4 => (proptest::collection::vec((tl_strategy(), 0usize..1500), 1..20), any::<bool>())
            .prop_map(|(items, durable)| Op::Batch { items, durable }),
        4 => (tl_strategy(), 0u64..80).prop_map(|(tl, seq)| Op::Get { tl, seq }),
        4 => (tl_strategy(), 0u64..90, 1usize..40, any::<bool>())
            .prop_map(|(tl, from, limit, forward)| Op::Scan {
                tl,
                // Newest-first from 0 means "from the newest".
                from: if from == 0 && !forward { u64::MAX } else { from },
                limit,
                forward,
            }),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(torn, seed)| Op::Crash { torn, seed }),
        2 => (1_000u64..40_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn run(ops: Vec<Op>) {
    let mut w = World::new(Settings {
        shards: 2,
        sync_ttl_ms: Some(TTL_MS),
        segment_window: None,
    });
    for op in &ops {
        w.apply(op);
    }
    w.finish();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op_strategy(), 1..250)) {
        run(ops);
    }
}
