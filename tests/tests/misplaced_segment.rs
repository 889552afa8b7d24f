//! Regression (found by the `open_damaged` fuzz target): a sealed segment
//! copied from the store keyspace's directory over one in the sync
//! keyspace's verified byte for byte, so `Engine::open` accepted it and
//! `get(sync(1), 47)` returned the store timeline's record. Segment headers
//! name their keyspace and shard; recovery now checks them against where
//! the file was found.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use timeline_engine::io::{Io, MemIo, OpenMode};
use timeline_engine::*;

fn cfg(mem: &MemIo) -> Config {
    let mut c = Config::default();
    c.io = Some(Arc::new(mem.clone()));
    c.background = false;
    c.shards = 1;
    c
}

fn copy(mem: &MemIo, from: &Path, to: &Path) {
    let src = mem.open(from, OpenMode::Existing).unwrap();
    let mut b = vec![0u8; src.len().unwrap() as usize];
    src.read_at(&mut b, 0).unwrap();
    let _ = mem.remove_file(to);
    let dst = mem.open(to, OpenMode::CreateNew).unwrap();
    dst.write_at(&b, 0).unwrap();
    dst.sync_data().unwrap();
    mem.sync_dir(to.parent().unwrap()).unwrap();
}

fn build(mem: &MemIo) {
    let e = Engine::open("/m", cfg(mem)).unwrap();
    for seq in 0..50u64 {
        for id in 0..3 {
            e.append_with(
                TimelineId::store(id),
                format!("STORE {id} {seq}").as_bytes(),
                Durability::Buffered,
            )
            .unwrap();
            e.append_with(
                TimelineId::sync(id),
                format!("SYNC {id} {seq}").as_bytes(),
                Durability::Buffered,
            )
            .unwrap();
        }
    }
    e.seal_active().unwrap();
    e.close().unwrap();
}

#[test]
fn sealed_segment_from_the_other_keyspace_is_rejected() {
    let mem = MemIo::new();
    build(&mem);
    let name = |ks: &str| {
        let dir = format!("/m/{ks}/000");
        let f = mem
            .file_names(Path::new(&dir))
            .into_iter()
            .find(|n| n.ends_with(".seg"))
            .unwrap();
        Path::new(&dir).join(f)
    };
    copy(&mem, &name("store"), &name("sync"));
    match Engine::open("/m", cfg(&mem)) {
        Err(e) => assert!(e.is_corruption(), "{e}"),
        Ok(e) => panic!(
            "opened with a misplaced segment; sync(1) seq 1 = {:?}",
            e.get(TimelineId::sync(1), 1)
        ),
    }
}

#[test]
fn log_segment_from_another_shard_is_rejected() {
    let mem = MemIo::new();
    let mut c = cfg(&mem);
    c.shards = 2;
    let e = Engine::open("/m", c.clone()).unwrap();
    for id in 0..20u64 {
        e.append_with(TimelineId::store(id), b"x", Durability::Buffered)
            .unwrap();
    }
    e.close().unwrap();
    let log = |shard: &str| {
        let dir = format!("/m/store/{shard}");
        let f = mem
            .file_names(Path::new(&dir))
            .into_iter()
            .find(|n| n.ends_with(".log"))
            .unwrap();
        Path::new(&dir).join(f)
    };
    copy(&mem, &log("000"), &log("001"));
    match Engine::open("/m", c) {
        Err(e) => assert!(e.is_corruption(), "{e}"),
        Ok(_) => panic!("opened with a log segment from another shard"),
    }
}
