//! The append path: single and 64-item batch appends, buffered, on a real
//! temp dir with the default backend. (The in-memory test backend is not a
//! fair floor: its own bookkeeping costs more than a pwrite.)
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use timeline_engine::{Config, Durability, Engine, TimelineId};

fn engine(dir: &std::path::Path) -> Engine {
    Engine::open(dir, Config::default()).expect("open")
}

fn append(c: &mut Criterion) {
    let payload = [9u8; 100];
    {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = engine(tmp.path());
        let name = "disk";
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut g = c.benchmark_group(format!("append_{name}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("single_100B", |b| {
            b.iter(|| {
                e.append_with(
                    TimelineId::store(rng.gen_range(0..100_000)),
                    &payload,
                    Durability::Buffered,
                )
            })
        });
        g.throughput(Throughput::Elements(64));
        g.bench_function("batch64_100B", |b| {
            b.iter_batched(
                || {
                    (0..64)
                        .map(|_| (TimelineId::store(rng.gen_range(0..100_000)), &payload[..]))
                        .collect::<Vec<_>>()
                },
                |items| e.append_batch(&items, Durability::Buffered),
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, append);
criterion_main!(benches);
