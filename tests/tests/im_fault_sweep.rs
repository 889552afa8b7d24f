//! Fault injection at every I/O call of the IM layer (issue 10, item 2):
//! `Im::open` recovering an existing directory, then sends in direct,
//! write-fan-out and read-fan-out conversations, membership changes and
//! read markers, on the in-memory backend; a fault-free run counts the I/O
//! calls, then call N fails for every N (a transient EIO) and, on a stride,
//! from N on (a dead device, a full disk).
//!
//! For every N:
//! * every failed call says a truthful, typed thing: an I/O error or a full
//!   disk when nothing was stored, `FanoutFailed` when the message is
//!   stored and its delivery pending; never `InvalidArgument` or
//!   `Corrupt` for an I/O fault;
//! * then the process "dies" (the IM layer is dropped) and the directory is
//!   reopened without faults, as it stands (a restart) and as a power cut
//!   leaves it (only what was fdatasynced), and `Im::open` must complete
//!   every delivery: each acknowledged send is in its conversation at the
//!   seq it was acknowledged with, every stored write-fan-out entry is in
//!   every member's sync timeline exactly once (store-then-sync, whatever
//!   failed), nothing is stored twice;
//! * a retry of every send with its `client_msg_id` answers the stored seq
//!   for what was stored and stores the rest once.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use timeline_engine::io::{FailAt, MemFaults, MemIo};
use timeline_engine::{Config, Durability, Engine, Error};
use timeline_im::{Im, ImConfig, ImError};
use timeline_tests::im_check::{check_fanout, Key};
use timeline_tests::{
    im_crash_convs, im_mem_cfg, IM_CRASH_CHURN, IM_CRASH_CHURNERS, IM_CRASH_THRESHOLD,
};

const ROUNDS: u64 = 12;

fn root() -> PathBuf {
    PathBuf::from("/im")
}

fn cfg(mem: &MemIo) -> (Config, ImConfig) {
    im_mem_cfg(mem)
}

fn open(mem: &MemIo) -> Result<Im, ImError> {
    let (c, ic) = cfg(mem);
    Im::open(root(), c, ic)
}

fn body(k: Key) -> Vec<u8> {
    let mut v = format!("c{}s{}m{}|", k.0, k.1, k.2).into_bytes();
    v.resize(60 + (k.2 as usize * 37) % 400, b'.');
    v
}

/// Whether an error is something an I/O fault may truthfully cause.
fn truthful(e: &ImError) -> bool {
    matches!(
        e,
        ImError::Engine(Error::Io { .. } | Error::Poisoned { .. } | Error::Closed)
            | ImError::FanoutFailed { .. }
            | ImError::Closed
    )
}

#[derive(Default)]
struct Log {
    acked: HashMap<Key, u64>,
    tried: Vec<Key>,
    errors: Vec<String>,
}

impl Log {
    fn failed(&mut self, e: ImError, what: &str) {
        assert!(truthful(&e), "{what}: an I/O fault answered as {e:?}");
        self.errors.push(e.to_string());
    }
}

fn create_all(im: &Im) {
    for (conv, kind, members) in im_crash_convs() {
        im.create_conversation(conv, kind, &members).unwrap();
    }
}

/// Sends into every conversation (several in flight), churn in the
/// membership group, read markers. `base`: cmids of this phase start here.
fn workload(im: &Im, base: u64, log: &mut Log) {
    let convs = im_crash_convs();
    for r in 0..ROUNDS {
        let mut pending = Vec::new();
        for (i, (conv, _, members)) in convs.iter().enumerate() {
            let sender = members[(r as usize + i) % members.len()];
            let k = (*conv, sender, base + r * 100 + i as u64);
            log.tried.push(k);
            match im.send_async(k.0, k.1, k.2, &body(k)) {
                Ok(p) => pending.push((k, p)),
                Err(e) => log.failed(e, "send"),
            }
        }
        for (k, p) in pending {
            match p.wait() {
                Ok(ack) => {
                    log.acked.insert(k, ack.seq);
                }
                Err(e) => log.failed(e, "send"),
            }
        }
        let u = IM_CRASH_CHURNERS[r as usize % IM_CRASH_CHURNERS.len()];
        let change = if r % 2 == 0 {
            im.add_member(IM_CRASH_CHURN, u)
        } else {
            im.remove_member(IM_CRASH_CHURN, u)
        };
        match change {
            Ok(_) | Err(ImError::AlreadyMember { .. } | ImError::NotMember { .. }) => {}
            Err(e) => log.failed(e, "membership"),
        }
        let (conv, _, members) = &convs[r as usize % convs.len()];
        match im.mark_read(members[0], *conv, u64::MAX) {
            Ok(_) | Err(ImError::NotMember { .. }) => {}
            Err(e) => log.failed(e, "mark_read"),
        }
    }
}

/// A directory with the conversations and a first phase of messages.
fn base() -> MemIo {
    let mem = MemIo::new();
    let im = open(&mem).unwrap();
    create_all(&im);
    let mut log = Log::default();
    workload(&im, 1_000_000, &mut log);
    assert!(log.errors.is_empty(), "{:?}", log.errors);
    im.close().unwrap();
    mem.crash()
}

/// One run from `base` with `fault`; returns the image as the process left
/// it, the log, and how many I/O calls it made.
fn run(base: &MemIo, fault: Option<FailAt>) -> (MemIo, Log, u64) {
    let mem = base.crash();
    mem.set_faults(MemFaults {
        fail_at: fault,
        ..MemFaults::default()
    });
    let mut log = Log::default();
    match open(&mem) {
        Ok(im) => {
            workload(&im, 0, &mut log);
            drop(im); // the process ends without a clean close
        }
        Err(e) => log.failed(e, "open"),
    }
    let calls = mem.calls(&[]);
    mem.set_faults(MemFaults::default());
    (mem, log, calls)
}

/// Reopen without faults and check store-then-sync and every ack; then
/// retry every send of the run and check again.
fn check(mem: &MemIo, log: &Log, what: &str) -> usize {
    let convs = im_crash_convs();
    let im = open(mem).unwrap_or_else(|e| panic!("{what}: reopen without faults: {e}"));
    let (_, stored) = check_fanout(im.engine(), &convs, IM_CRASH_THRESHOLD, true, what);
    for (k, seq) in &log.acked {
        assert_eq!(
            stored.get(k),
            Some(seq),
            "{what}: acknowledged {k:?} lost or moved"
        );
    }
    for k in &log.tried {
        let ack = im
            .send(k.0, k.1, k.2, &body(*k))
            .unwrap_or_else(|e| panic!("{what}: retry of {k:?} without faults: {e}"));
        if let Some(&s) = stored.get(k) {
            assert!(
                ack.duplicate && ack.seq == s,
                "{what}: retry of stored {k:?}: {ack:?}, stored at {s}"
            );
        }
    }
    let (_, again) = check_fanout(im.engine(), &convs, IM_CRASH_THRESHOLD, true, what);
    for k in &log.tried {
        assert!(
            again.contains_key(k),
            "{what}: {k:?} not stored after its retry"
        );
    }
    im.close().unwrap();
    log.acked.len()
}

fn sweep(kinds: &[(&str, bool, bool)], stride: u64) {
    let base = base();
    let (_, clean, calls) = run(&base, None);
    assert!(clean.errors.is_empty(), "{:?}", clean.errors);
    assert!(calls > 100, "the workload makes {calls} I/O calls");
    let (mut failed_runs, mut acks) = (0, 0);
    for &(name, sticky, full) in kinds {
        let mut n = 1;
        while n <= calls {
            let fault = FailAt {
                nth: n,
                ops: Vec::new(),
                sticky,
                full,
            };
            let (mem, log, _) = run(&base, Some(fault));
            failed_runs += usize::from(!log.errors.is_empty());
            let what = format!("{name} at call {n} of {calls}");
            let image = mem.crash();
            acks += check(&mem, &log, &format!("{what}, restart"));
            acks += check(&image, &log, &format!("{what}, power cut"));
            n += stride;
        }
    }
    assert!(
        failed_runs > 0,
        "no injected fault reached a caller: the sweep tested nothing"
    );
    eprintln!(
        "{calls} calls per run; {failed_runs} runs saw an error; {acks} acknowledged sends checked"
    );
}

#[test]
fn im_every_io_call_failing_once_keeps_store_then_sync() {
    sweep(&[("transient EIO", false, false)], 1);
}

#[test]
fn im_a_device_that_dies_or_fills_at_any_call_keeps_store_then_sync() {
    sweep(
        &[("dead device", true, false), ("full disk", true, true)],
        4,
    );
}

/// The checker itself sees a missing delivery (else the sweep is blind).
#[test]
fn the_checker_sees_a_missing_delivery() {
    let mem = base();
    let (c, _) = cfg(&mem);
    let e = Engine::open(root(), c).unwrap();
    let (missing, _) = check_fanout(&e, &im_crash_convs(), IM_CRASH_THRESHOLD, false, "base");
    assert_eq!(missing, 0);
    // Store one more message by hand, with no sync entries: one missing
    // delivery per member.
    let se = timeline_im::entry::StoreEntry {
        kind: timeline_im::EventKind::Message,
        sender: 100,
        cmid: 42,
        arg: 0,
        body: b"orphan",
    };
    let mut b = Vec::new();
    se.encode_into(&mut b);
    e.append_with(timeline_engine::TimelineId::store(1), &b, Durability::Sync)
        .unwrap();
    let (missing, _) = check_fanout(&e, &im_crash_convs(), IM_CRASH_THRESHOLD, false, "orphan");
    assert_eq!(missing, 2, "a direct conversation has two members");
}
