//! Store-then-sync on a full disk: a message that reached its conversation's
//! store timeline reaches every member's sync timeline once there is room
//! again, without a restart and across one, and every failed send says the
//! truth (`StorageFull`: not stored; `FanoutFailed`: stored, delivery still
//! pending and retried by the layer itself).
//!
//! Regression: a delivery whose sync write failed used to be dropped (its
//! batch counted as finished, the journal's done mark moved past it), so the
//! message stayed in the history and out of the members' sync timelines for
//! good; a retry answered `duplicate` and repaired nothing; and a send whose
//! store write hit the full disk was answered `InvalidArgument`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timeline_engine::io::{MemFaults, MemIo};
use timeline_engine::Keyspace;
use timeline_engine::{Config, Durability, Error};
use timeline_im::*;

const GROUP: ConvId = 1;
const DIRECT: ConvId = 2;
const GROUP_MEMBERS: [UserId; 4] = [10, 11, 12, 13];
const DIRECT_MEMBERS: [UserId; 2] = [10, 20];

fn root() -> PathBuf {
    PathBuf::from("/im")
}

fn cfg(mem: &MemIo) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 3;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c.max_payload = 1024;
    c.io = Some(Arc::new(mem.clone()));
    c
}

fn open(mem: &MemIo) -> Im {
    let ic = ImConfig {
        durability: Durability::GroupCommit,
        ..Default::default()
    };
    Im::open(root(), cfg(mem), ic).unwrap()
}

fn is_storage_full(e: &ImError) -> bool {
    matches!(e, ImError::Engine(Error::Io { source, .. })
        if source.kind() == std::io::ErrorKind::StorageFull)
}

/// What the sender was told about one `(conv, sender, cmid)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked(u64),
    Pending(u64),
    NotStored,
}

struct Sent {
    conv: ConvId,
    sender: UserId,
    cmid: u64,
    outcome: Outcome,
}

fn members(conv: ConvId) -> &'static [UserId] {
    if conv == GROUP {
        &GROUP_MEMBERS
    } else {
        &DIRECT_MEMBERS
    }
}

fn body(conv: ConvId, sender: UserId, cmid: u64) -> Vec<u8> {
    format!(
        "c{conv}u{sender}m{cmid}|{}",
        "x".repeat((cmid % 97) as usize)
    )
    .into_bytes()
}

/// Send until the disk refuses a few times in a row; returns what was sent.
fn fill(im: &Im, next_cmid: &mut u64) -> Vec<Sent> {
    let mut out = Vec::new();
    let mut refusals = 0;
    // Long enough past the first refusal to fill an owner's window of
    // in-flight batches (24), so requests meet the stalled-worker path.
    while refusals < 40 && out.len() < 5_000 {
        *next_cmid += 1;
        let cmid = *next_cmid;
        let conv = if cmid.is_multiple_of(3) {
            DIRECT
        } else {
            GROUP
        };
        let sender = members(conv)[(cmid as usize) % members(conv).len()];
        let outcome = match im.send(conv, sender, cmid, &body(conv, sender, cmid)) {
            Ok(a) => {
                assert!(!a.duplicate, "a new cmid answered duplicate");
                Outcome::Acked(a.seq)
            }
            Err(ImError::FanoutFailed { seq, .. }) => {
                refusals += 1;
                Outcome::Pending(seq)
            }
            Err(e) if is_storage_full(&e) => {
                refusals += 1;
                Outcome::NotStored
            }
            Err(e) => panic!(
                "cmid {cmid}: a full disk must answer StorageFull or FanoutFailed, got {e:?}"
            ),
        };
        if !matches!(outcome, Outcome::Acked(_)) {
            retry_stored_while_full(im, &out);
        }
        out.push(Sent {
            conv,
            sender,
            cmid,
            outcome,
        });
    }
    out
}

/// While the disk refuses writes, a retry of a message that is stored must
/// still answer with its seq (acked, or FanoutFailed while pending), never
/// `StorageFull` ("not stored").
fn retry_stored_while_full(im: &Im, sent: &[Sent]) {
    for s in sent.iter().rev().take(3) {
        let seq = match s.outcome {
            Outcome::Acked(q) | Outcome::Pending(q) => q,
            Outcome::NotStored => continue,
        };
        match im.send(s.conv, s.sender, s.cmid, &body(s.conv, s.sender, s.cmid)) {
            Ok(a) => assert!(a.duplicate && a.seq == seq, "cmid {}: {a:?}", s.cmid),
            Err(ImError::FanoutFailed { seq: got, .. }) => assert_eq!(got, seq),
            Err(e) => panic!(
                "cmid {} (stored at {seq}): retry on a full disk said {e:?}",
                s.cmid
            ),
        }
    }
}

/// Retry every unacknowledged send with its own cmid until it is acked
/// (bounded). A stored one must come back `duplicate` with its seq.
fn settle(im: &Im, sent: &mut [Sent]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for s in sent.iter_mut() {
        loop {
            let r = im.send(s.conv, s.sender, s.cmid, &body(s.conv, s.sender, s.cmid));
            match (r, s.outcome) {
                (Ok(a), Outcome::Pending(seq)) => {
                    assert!(
                        a.duplicate && a.seq == seq,
                        "cmid {}: {a:?} vs {seq}",
                        s.cmid
                    );
                    s.outcome = Outcome::Acked(seq);
                }
                (Ok(a), Outcome::Acked(seq)) => {
                    assert!(
                        a.duplicate && a.seq == seq,
                        "cmid {}: {a:?} vs {seq}",
                        s.cmid
                    )
                }
                // Not stored before: either stored now, or (a torn-off
                // prefix survived) a duplicate of the seq it got.
                (Ok(a), Outcome::NotStored) => s.outcome = Outcome::Acked(a.seq),
                (Err(ImError::FanoutFailed { .. }), _) => {
                    assert!(
                        Instant::now() < deadline,
                        "cmid {}: delivery never completed",
                        s.cmid
                    );
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                // Not stored: STORAGE_FULL says "retry later" (until the
                // stalled delivery's next retry finds the room).
                (Err(e), Outcome::NotStored) if is_storage_full(&e) => {
                    assert!(Instant::now() < deadline, "cmid {}: never stored", s.cmid);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                (Err(e), o) => panic!("cmid {} ({o:?}): retry with room failed: {e:?}", s.cmid),
            }
            break;
        }
    }
}

/// Every message in each conversation's history is in each member's sync
/// timeline exactly once, and every acknowledged send is in the history.
fn check(im: &Im, sent: &[Sent], what: &str) -> usize {
    let mut in_sync: BTreeMap<UserId, BTreeMap<(ConvId, u64), usize>> = BTreeMap::new();
    let users: std::collections::BTreeSet<UserId> = GROUP_MEMBERS
        .iter()
        .chain(&DIRECT_MEMBERS)
        .copied()
        .collect();
    for u in users {
        let mut cp = 0;
        loop {
            let page = im.sync(u, cp, 1000, &[]).unwrap();
            for e in &page.entries {
                if matches!(e.entry.body, Body::Message(_)) {
                    *in_sync
                        .entry(u)
                        .or_default()
                        .entry((e.entry.conv, e.entry.conv_seq))
                        .or_default() += 1;
                }
            }
            cp = page.checkpoint;
            if !page.has_more {
                break;
            }
        }
    }
    let mut stored = 0;
    for conv in [GROUP, DIRECT] {
        let reader = members(conv)[0];
        let page = im
            .history(conv, reader, HistoryFrom::After(0), 100_000)
            .unwrap();
        for e in &page.entries {
            let Body::Message(b) = &e.body else { continue };
            stored += 1;
            for &m in members(conv) {
                let n = in_sync
                    .get(&m)
                    .and_then(|s| s.get(&(conv, e.conv_seq)))
                    .copied();
                assert_eq!(
                    n,
                    Some(1),
                    "{what}: conv {conv} seq {} ({:?}) is stored but user {m} has it {n:?} times",
                    e.conv_seq,
                    String::from_utf8_lossy(&b[..b.len().min(16)])
                );
            }
        }
        for s in sent.iter().filter(|s| s.conv == conv) {
            if let Outcome::Acked(seq) = s.outcome {
                let e = page.entries.iter().find(|e| e.conv_seq == seq);
                let want = body(s.conv, s.sender, s.cmid);
                assert!(
                    matches!(e.map(|e| &e.body), Some(Body::Message(b)) if *b == want),
                    "{what}: acked cmid {} seq {seq} is not in the history as sent",
                    s.cmid
                );
            }
        }
    }
    stored
}

fn create(im: &Im) {
    im.create_conversation(GROUP, ConvKind::Group, &GROUP_MEMBERS)
        .unwrap();
    im.create_conversation(DIRECT, ConvKind::Direct, &DIRECT_MEMBERS)
        .unwrap();
}

fn set_budget(mem: &MemIo, round: u64) {
    // Budgets that land the fault at every kind of point: inside a store
    // write, between a store write and its sync deliveries, inside those.
    let budget = 150 + (round * 1_733) % 9_000;
    mem.set_faults(MemFaults {
        fail_writes_after_bytes: Some(mem.bytes_written() + budget),
        ..MemFaults::default()
    });
}

/// 24 rounds of fill-and-free in one process: the layer repairs itself.
#[test]
fn full_disk_stored_messages_reach_every_member_without_restart() {
    let mem = MemIo::new();
    let im = open(&mem);
    create(&im);
    let mut cmid = 0;
    let mut all = Vec::new();
    let mut pending_seen = 0;
    for round in 0..24 {
        set_budget(&mem, round);
        let mut sent = fill(&im, &mut cmid);
        pending_seen += sent
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Pending(_)))
            .count();
        mem.set_faults(MemFaults::default());
        settle(&im, &mut sent);
        all.extend(sent);
        check(&im, &all, &format!("round {round}"));
    }
    assert!(
        pending_seen > 0,
        "no round stored a message whose delivery then failed: the test did not reach the bug"
    );
    im.close().unwrap();
    let im = open(&mem);
    let stored = check(&im, &all, "after reopen");
    assert!(stored > 100, "only {stored} messages stored");
}

/// Fill the disk, then lose power while it is still full (pending
/// deliveries in memory only), and reopen with room: recovery re-drives
/// every delivery that never became durable.
#[test]
fn full_disk_then_crash_recovery_delivers_every_stored_message() {
    let mut mem = MemIo::new();
    let mut cmid = 0;
    let mut all: Vec<Sent> = Vec::new();
    {
        let im = open(&mem);
        create(&im);
        im.close().unwrap();
    }
    for round in 0..20 {
        let im = open(&mem);
        set_budget(&mem, round * 7 + 3);
        let sent = fill(&im, &mut cmid);
        all.extend(sent);
        // Power cut while full: only what was fdatasynced survives.
        let image = mem.crash();
        drop(im);
        mem = image;
        let im = open(&mem);
        // What survived: a send acked before the cut survives (group commit).
        settle(&im, &mut all);
        check(&im, &all, &format!("round {round}"));
        im.close().unwrap();
    }
}

/// Closing while sync writes still fail, with sends in flight, returns (the
/// pending deliveries are left to recovery), and reopening with room
/// delivers every stored message. (The race a review found here, an owner
/// asleep on a batch that another worker then defers without waking it, is
/// timing-dependent and not reproduced deterministically by this test; the
/// fix is that `Batch::defer` and a new stall wake the owners.)
#[test]
fn close_while_full_with_sends_in_flight_returns_and_recovery_delivers() {
    for round in 0..8 {
        let mem = MemIo::new();
        let im = open(&mem);
        create(&im);
        set_budget(&mem, round * 5 + 1);
        let mut cmid = 0;
        let mut all = fill(&im, &mut cmid);
        // More sends in flight behind the stall, not waited for.
        let inflight: Vec<_> = (0..20u64)
            .map(|k| {
                let c = 100_000 + k;
                all.push(Sent {
                    conv: GROUP,
                    sender: 10,
                    cmid: c,
                    outcome: Outcome::NotStored,
                });
                im.send_async(GROUP, 10, c, &body(GROUP, 10, c))
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(im.close());
        });
        let closed = rx.recv_timeout(Duration::from_secs(30));
        assert!(
            closed.is_ok(),
            "round {round}: close hung with the disk full"
        );
        drop(inflight);
        // Power stays on; room comes back; reopen re-drives the fan-out.
        mem.set_faults(MemFaults::default());
        let im = open(&mem);
        settle(&im, &mut all);
        check(&im, &all, &format!("round {round} after reopen"));
        im.close().unwrap();
    }
}

/// A read marker or a delete-for-me refused on a full disk, then a power
/// cut: after recovery the mark is either not applied, or applied and in
/// the user's sync timeline for its other devices to learn. The two
/// records (sync entry, catalog record) are two writes; the write that
/// fails is the first, then the second. Regression: the catalog record
/// went first, so a sync write refused after it left a mark that recovery
/// applied and no device ever learned.
#[test]
fn a_mark_refused_on_a_full_disk_is_never_applied_unannounced() {
    use timeline_engine::io::{FailAt, IoOp};
    const USER: UserId = 10;
    for (nth, delete) in [(1, false), (2, false), (1, true), (2, true)] {
        let mem = MemIo::new();
        let im = open(&mem);
        create(&im);
        for cmid in 1..=3 {
            im.send(GROUP, 11, cmid, &body(GROUP, 11, cmid)).unwrap();
        }
        let seq = 2;
        // Closed and opened again: no journal mark of the sends is still to
        // be written, and the mark's two writes are the next ones (user 13
        // shows it).
        im.close().unwrap();
        let im = open(&mem);
        mem.set_faults(MemFaults::default());
        im.mark_read(13, GROUP, 1).unwrap();
        assert_eq!(mem.calls(&[IoOp::Write]), 2, "a read mark's writes");
        mem.set_faults(MemFaults {
            fail_at: Some(FailAt {
                nth,
                ops: vec![IoOp::Write],
                sticky: false,
                full: true,
            }),
            ..MemFaults::default()
        });
        let got = match delete {
            true => im.delete_for_user(USER, GROUP, seq),
            false => im.mark_read(USER, GROUP, seq),
        };
        let what = format!(
            "write {nth} of a {} fails",
            if delete { "delete" } else { "read mark" }
        );
        assert!(got.as_ref().is_err_and(is_storage_full), "{what}: {got:?}");
        let im = Im::open(
            root(),
            cfg(&mem.crash()),
            ImConfig {
                durability: Durability::GroupCommit,
                ..Default::default()
            },
        )
        .unwrap();
        let applied = match delete {
            true => im
                .history(GROUP, USER, HistoryFrom::After(0), 10)
                .unwrap()
                .entries
                .iter()
                .any(|e| e.conv_seq == seq && e.body == Body::Deleted),
            false => im
                .conversations(USER)
                .unwrap()
                .iter()
                .any(|c| c.conv == GROUP && c.read_seq >= seq),
        };
        let marker = match delete {
            true => Body::DeletedMarker,
            false => Body::ReadMarker,
        };
        let announced =
            im.sync(USER, 0, 100, &[]).unwrap().entries.iter().any(|e| {
                e.entry.conv == GROUP && e.entry.conv_seq == seq && e.entry.body == marker
            });
        eprintln!("{what}: applied after recovery {applied}, in the sync timeline {announced}");
        assert!(
            !applied || announced,
            "{what}: applied after recovery, but not in the user's sync timeline"
        );
    }
}
