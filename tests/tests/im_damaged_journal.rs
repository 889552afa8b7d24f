//! A damaged journal claiming an enormous batch number is refused at open
//! with a clear error. Regression: a batch number of 2^40 or more wrapped
//! the completion window's packed `done` field, the workers never had room
//! for a new batch, and the next `send` waited forever (found by the
//! `im_records` fuzz target in CI's smoke run).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::io::MemIo;
use timeline_engine::{Config, Durability, Engine};
use timeline_im::entry::JournalRecord;
use timeline_im::{reserved_timelines, ConvKind, Im, ImConfig, ImError};

fn cfg(mem: &MemIo) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 2;
    c.io = Some(Arc::new(mem.clone()));
    c
}

/// A directory with one conversation and one message, whose journals then
/// get an intent claiming `batch` appended behind the layer's back.
fn damaged(batch: u64) -> MemIo {
    let mem = MemIo::new();
    let im = Im::open("/j", cfg(&mem), ImConfig::default()).unwrap();
    im.create_conversation(1, ConvKind::Direct, &[1, 2])
        .unwrap();
    im.send(1, 1, 1, b"a").unwrap();
    im.close().unwrap();
    let e = Engine::open(Path::new("/j"), cfg(&mem)).unwrap();
    let mut b = Vec::new();
    JournalRecord::Intent {
        batch,
        ops: Vec::new(),
    }
    .encode_into(&mut b);
    // Every reserved timeline: catalogs refuse the record as corrupt, the
    // journals take it as an intent.
    for tl in reserved_timelines(&e).into_iter().skip(1).step_by(2) {
        e.append_with(tl, &b, Durability::Sync).unwrap();
    }
    e.close().unwrap();
    mem
}

/// Run `f` on a thread and fail (rather than hang the suite) past `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("the IM layer hung")
}

#[test]
fn a_journal_claiming_a_batch_past_the_window_is_refused() {
    for batch in [1 << 40, 1 << 41, u64::MAX - 1, u64::MAX] {
        let mem = damaged(batch);
        let r = within(20, move || {
            Im::open("/j", cfg(&mem), ImConfig::default()).map(drop)
        });
        assert!(
            matches!(&r, Err(ImError::InvalidArgument(m)) if m.contains("damaged")),
            "batch {batch}: {r:?}"
        );
    }
}

#[test]
fn a_large_but_valid_batch_number_keeps_working() {
    let mem = damaged((1 << 40) - 1_000);
    within(20, move || {
        let im = Im::open("/j", cfg(&mem), ImConfig::default()).unwrap();
        let a = im.send(1, 2, 7, b"still works").unwrap();
        assert!(!a.duplicate);
        assert_eq!(
            im.send(1, 1, 1, b"a").unwrap().seq,
            2,
            "the old send is remembered"
        );
        im.close().unwrap();
    });
}
