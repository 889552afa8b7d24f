//! The IM layer on damaged records: the IM decoders on arbitrary bytes, then
//! a small IM directory (in memory) whose conversation, sync, catalog and
//! journal timelines get fuzzer-chosen records appended behind the layer's
//! back. Reopening must either fail with an error or open, and every read
//! must return a value or an error: never a panic, never a hang.
#![no_main]

use timeline_engine::Keyspace;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use timeline_im::entry::{CatalogRecord, JournalRecord, StoreEntry, SyncRecord};
use timeline_im::{reserved_timelines, ConvKind, HistoryFrom, Im, ImConfig};
use timeline_engine::io::MemIo;
use timeline_engine::*;

const ROOT: &str = "/im";

fn config(mem: &MemIo) -> Config {
    let mut c = Config::default();
    c.io = Some(Arc::new(mem.clone()));
    c.clock = Arc::new(ManualClock::new(1_700_000_000_000));
    c.background = false;
    c.shards = 2;
    c.max_payload = 4096;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c
}

fn im_config() -> ImConfig {
    ImConfig {
        hybrid_threshold: 2,
        durability: Durability::Buffered,
        ..Default::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = StoreEntry::decode(data);
    let _ = SyncRecord::decode(data);
    let _ = JournalRecord::decode(data);
    let _ = CatalogRecord::decode(data);

    let mem = MemIo::new();
    {
        let im = Im::open(ROOT, config(&mem), im_config()).expect("fresh open");
        im.create_conversation(1, ConvKind::Direct, &[1, 2])
            .expect("create");
        im.create_conversation(2, ConvKind::Group, &[1, 2, 3])
            .expect("create");
        im.send(1, 1, 1, b"a").expect("send");
        im.send(2, 3, 1, b"b").expect("send");
        im.mark_read(2, 1, 2).expect("mark");
        im.close().expect("close");
    }
    {
        // Append the fuzzer's records: first byte picks the timeline, the
        // next the length.
        let engine = Engine::open(ROOT, config(&mem)).expect("engine open");
        let mut targets = reserved_timelines(&engine);
        targets.extend([
            TimelineId::store(1),
            TimelineId::store(2),
            TimelineId::sync(1),
            TimelineId::sync(2),
            TimelineId::sync(3),
        ]);
        let mut rest = data;
        while rest.len() >= 2 {
            let tl = targets[rest[0] as usize % targets.len()];
            let n = (rest[1] as usize).min(rest.len() - 2);
            let _ = engine.append_with(tl, &rest[2..2 + n], Durability::Buffered);
            rest = &rest[2 + n..];
        }
        engine.close().expect("engine close");
    }
    if let Ok(im) = Im::open(ROOT, config(&mem), im_config()) {
        for u in 1..=3 {
            let _ = im.sync(u, 0, 100, &[]);
            let _ = im.sync(u, 1, 100, &[(2, 0)]);
            let _ = im.conversations(u);
            for c in 1..=2 {
                let _ = im.history(c, u, HistoryFrom::Before(u64::MAX), 10);
                let _ = im.history(c, u, HistoryFrom::After(0), 10);
            }
        }
        let _ = im.send(1, 1, 2, b"c");
        let _ = im.send(1, 1, 1, b"a");
        let _ = im.recall(1, 1, 2);
        let _ = im.add_member(2, 4);
        let _ = im.close();
    }
});
