//! Record codec: encode and decode+verify of a 100-byte-payload record.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use timeline_engine::format::record::{decode, encode_to_vec, RecordHeader};

fn codec(c: &mut Criterion) {
    let payload = vec![7u8; 100];
    let h = RecordHeader {
        len: 100,
        timeline: 42,
        seq: 7,
        ts_ms: 1_700_000_000_000,
        prev: 64,
        anchor: 0,
    };
    let mut g = c.benchmark_group("record_codec");
    g.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(256);
    g.bench_function("encode_100B", |b| {
        b.iter(|| {
            buf.clear();
            encode_to_vec(black_box(&h), black_box(&payload), &mut buf);
            black_box(buf.len())
        })
    });
    let mut enc = Vec::new();
    encode_to_vec(&h, &payload, &mut enc);
    g.bench_function("decode_verify_100B", |b| {
        b.iter(|| decode(black_box(&enc)).map(|(h, p)| h.seq + p.len() as u64))
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
