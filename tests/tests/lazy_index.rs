//! A sealed segment already covered by an index checkpoint is opened by its
//! header and footer alone; its index is verified on first use. Damage to
//! that index must then be a `Corruption` error for the reads that need it,
//! never wrong data, and must not take the rest of the engine down.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::format::segment::{Footer, FOOTER_LEN};
use timeline_engine::io::{Io, MemIo, OpenMode};
use timeline_engine::Keyspace;
use timeline_engine::*;

#[test]
fn damaged_index_of_a_checkpointed_segment_fails_reads_not_open() {
    let mem = MemIo::new();
    let clock = ManualClock::new(1_000_000);
    let mut c = Config::default();
    c.io = Some(Arc::new(mem.clone()));
    c.clock = Arc::new(clock.clone());
    c.background = false;
    c.shards = 1;
    *c.keyspace_mut(Keyspace::SYNC) =
        KeyspaceConfig::sync().with_ttl(Some(Duration::from_secs(80)));
    let e = Engine::open("/li", c.clone()).unwrap();
    // Three sealed sync segments, 10 s apart; then expire the first, which
    // writes a checkpoint covering all three.
    for round in 0..3u64 {
        for id in 0..20u64 {
            e.append_with(
                TimelineId::sync(id),
                format!("r{round} t{id}").as_bytes(),
                Durability::Buffered,
            )
            .unwrap();
        }
        clock.advance_ms(11_000);
        e.maintain().unwrap();
    }
    clock.advance_ms(50_000);
    let m = e.maintain().unwrap();
    assert_eq!(m.dropped, 1, "{m:?}");
    e.close().unwrap();
    let dir = Path::new("/li/sync/000");
    let names = mem.file_names(dir);
    assert!(names.iter().any(|n| n.ends_with(".ckpt")), "{names:?}");
    let mut segs: Vec<_> = names
        .iter()
        .filter(|n| n.ends_with(".seg"))
        .cloned()
        .collect();
    segs.sort();
    // Damage one index entry (not its timeline id) of the newest sealed segment.
    let path = dir.join(segs.last().unwrap());
    let f = mem.open(&path, OpenMode::Existing).unwrap();
    let mut b = vec![0u8; f.len().unwrap() as usize];
    f.read_at(&mut b, 0).unwrap();
    let footer = Footer::decode_from_file(&b).unwrap();
    assert!(b.len() > FOOTER_LEN);
    mem.flip_bit(&path, footer.index_off + 8 * 40 + 12, 3);

    let e = Engine::open("/li", c).unwrap();
    let mut corrupt = 0;
    for id in 0..20u64 {
        match e.get(TimelineId::sync(id), 3) {
            Err(err) => {
                assert!(err.is_corruption(), "{err}");
                corrupt += 1;
            }
            Ok(r) => panic!("read through a damaged index returned {r:?}"),
        }
        // The store keyspace and everything not behind that index still work.
        assert_eq!(e.last_seq(TimelineId::sync(id)), 3);
    }
    assert_eq!(corrupt, 20);
    e.append_with(
        TimelineId::store(1),
        b"still writable",
        Durability::Buffered,
    )
    .unwrap();
}
