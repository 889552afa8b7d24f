//! Index lookups: the in-memory timeline table, and a sealed segment's
//! fence + mapped-index search.
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use timeline_engine::index::{Pos, TimelineTable};
use timeline_engine::io::MemIo;
use timeline_engine::Keyspace;
use timeline_engine::{Config, Direction, Durability, Engine, TimelineId};

fn table(c: &mut Criterion) {
    let t = TimelineTable::new();
    let n = 1_000_000u64;
    for id in 0..n {
        let i = t.find_or_insert(id);
        t.with(i, |m| m.publish(1, Pos { gen: 0, off: 64 }));
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    c.bench_function("timeline_table_lookup_1M", |b| {
        b.iter(|| t.snapshot(black_box(rng.gen_range(0..n))))
    });
}

fn sealed_get(c: &mut Criterion) {
    // 100k timelines x 10 records, all in sealed (grouped) segments.
    let mut cfg = Config::default();
    cfg.io = Some(Arc::new(MemIo::new()));
    cfg.background = false;
    cfg.keyspace_mut(Keyspace::STORE).segment_bytes = 16 << 20;
    let e = Engine::open("/bench", cfg).expect("open");
    let payload = [1u8; 100];
    let items: Vec<(TimelineId, &[u8])> = (0..1000u64)
        .map(|i| (TimelineId::store(i), &payload[..]))
        .collect();
    for round in 0..1000u64 {
        let batch: Vec<(TimelineId, &[u8])> = items
            .iter()
            .map(|(t, p)| (TimelineId::store(t.id + (round % 100) * 1000), *p))
            .collect();
        e.append_batch(&batch, Durability::Buffered)
            .expect("append");
    }
    e.maintain().expect("maintain");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    c.bench_function("get_sealed_or_active_100k_timelines", |b| {
        b.iter(|| {
            e.get(
                TimelineId::store(rng.gen_range(0..100_000)),
                rng.gen_range(1..=10),
            )
        })
    });
    c.bench_function("scan20_backward_100k_timelines", |b| {
        b.iter(|| {
            e.scan(
                TimelineId::store(rng.gen_range(0..100_000)),
                u64::MAX,
                20,
                Direction::Backward,
            )
        })
    });
}

criterion_group!(benches, table, sealed_get);
criterion_main!(benches);
