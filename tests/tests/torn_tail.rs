//! Power cuts on the in-memory backend: whatever was synced survives with
//! its exact bytes, unsynced tails (whole, partial or torn mid-record) are cut
//! at the last valid record, seqs stay consecutive and appends continue from
//! `last_seq + 1`. Also: cuts in the middle of sealing and a log file torn
//! before its header.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use timeline_engine::io::{MemFaults, MemIo};
use timeline_engine::Keyspace;
use timeline_engine::{Config, Direction, Durability, Engine, Error, TimelineId};
use timeline_tests::{payload, timeline};

fn root() -> PathBuf {
    PathBuf::from("/db")
}

fn cfg(mem: &MemIo, seg: u64) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 2;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = seg;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = seg;
    c.max_payload = 1024;
    c.io = Some(Arc::new(mem.clone()));
    c
}

/// (ks, tl) -> last seq the test knows about.
type Model = BTreeMap<(u8, u64), u64>;

fn append_round(e: &Engine, model: &mut Model, round: u64, timelines: u64, d: Durability) {
    let mut attempted = Model::new();
    try_round(e, model, &mut attempted, round, timelines, d).unwrap();
}

fn bump(m: &mut Model, k: (u8, u64), v: u64) {
    let x = m.entry(k).or_default();
    *x = (*x).max(v);
}

/// One round: a batch of 8 items over both keyspaces and several shards
/// (some timelines twice), then a single append. `model` is updated only by
/// appends that returned Ok; `attempted` by every append tried.
fn try_round(
    e: &Engine,
    model: &mut Model,
    attempted: &mut Model,
    round: u64,
    timelines: u64,
    d: Durability,
) -> Result<(), Error> {
    let mut items: Vec<(u8, u64, u64)> = Vec::new();
    for i in 0..8u64 {
        let tl = (round * 7 + i * 3) % timelines;
        let ks = ((round + i) % 2) as u8;
        let next = model.get(&(ks, tl)).copied().unwrap_or(0)
            + 1
            + items.iter().filter(|x| x.0 == ks && x.1 == tl).count() as u64;
        items.push((ks, tl, next));
    }
    let payloads: Vec<Vec<u8>> = items
        .iter()
        .map(|&(ks, tl, s)| payload(ks, tl, s))
        .collect();
    let batch: Vec<(TimelineId, &[u8])> = items
        .iter()
        .zip(&payloads)
        .map(|(&(ks, tl, _), p)| (timeline(ks, tl), p.as_slice()))
        .collect();
    for &(ks, tl, s) in &items {
        bump(attempted, (ks, tl), s);
    }
    let seqs = e.append_batch(&batch, d)?;
    for (&(ks, tl, s), got) in items.iter().zip(&seqs) {
        assert_eq!(*got, s, "ks {ks} tl {tl}");
        model.insert((ks, tl), s);
    }
    let tl = round % timelines;
    let ks = (round % 2) as u8;
    let s = model.get(&(ks, tl)).copied().unwrap_or(0) + 1;
    bump(attempted, (ks, tl), s);
    assert_eq!(e.append_with(timeline(ks, tl), &payload(ks, tl, s), d)?, s);
    model.insert((ks, tl), s);
    Ok(())
}

/// Check that every timeline is an unbroken run 1..=last of generated
/// payloads, with `synced[t] <= last <= appended[t]`. Returns the recovered model.
fn check_recovered(e: &Engine, synced: &Model, appended: &Model, what: &str) -> Model {
    let mut out = Model::new();
    for (&(ks, tl), &max) in appended {
        let t = timeline(ks, tl);
        let last = e.last_seq(t);
        let min = synced.get(&(ks, tl)).copied().unwrap_or(0);
        assert!(
            last >= min,
            "{what}: ks {ks} tl {tl}: synced {min} but last_seq {last}"
        );
        assert!(
            last <= max,
            "{what}: ks {ks} tl {tl}: last_seq {last} > appended {max}"
        );
        let recs = e
            .scan(t, 1, 100_000, Direction::Forward)
            .unwrap_or_else(|err| panic!("{what}: scan ks {ks} tl {tl}: {err}"));
        assert_eq!(recs.len() as u64, last, "{what}: ks {ks} tl {tl}");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "{what}: ks {ks} tl {tl}");
            assert!(
                r.payload == payload(ks, tl, r.seq),
                "{what}: ks {ks} tl {tl} seq {}: garbage payload",
                r.seq
            );
        }
        assert!(e.get(t, last + 1).unwrap().is_none());
        out.insert((ks, tl), last);
    }
    out
}

/// After recovery, appends continue at last_seq + 1 on every timeline.
fn check_appends_continue(e: &Engine, model: &mut Model) {
    for (&(ks, tl), last) in model.iter_mut() {
        let s = e
            .append_with(
                timeline(ks, tl),
                &payload(ks, tl, *last + 1),
                Durability::Buffered,
            )
            .unwrap();
        assert_eq!(s, *last + 1, "ks {ks} tl {tl}");
        *last = s;
    }
}

#[test]
fn synced_survives_unsynced_is_cut() {
    let mem = MemIo::new();
    let e = Engine::open(root(), cfg(&mem, 1 << 20)).unwrap();
    let mut model = Model::new();
    for r in 0..40 {
        append_round(&e, &mut model, r, 30, Durability::Buffered);
    }
    e.sync().unwrap();
    let synced = model.clone();
    for r in 40..60 {
        append_round(&e, &mut model, r, 30, Durability::Buffered);
    }
    let image = mem.crash();
    drop(e);
    let e = Engine::open(root(), cfg(&image, 1 << 20)).unwrap();
    // No roll happened (1 MiB segments): exactly the synced state survives.
    let mut rec = check_recovered(&e, &synced, &model, "plain crash");
    for (k, v) in &synced {
        assert_eq!(
            rec[k], *v,
            "{k:?}: unsynced records survived a crash without torn tails"
        );
    }
    for k in model.keys() {
        if !synced.contains_key(k) {
            assert_eq!(rec[k], 0);
        }
    }
    check_appends_continue(&e, &mut rec);
    e.sync().unwrap();
    let image2 = image.crash();
    drop(e);
    let e = Engine::open(root(), cfg(&image2, 1 << 20)).unwrap();
    let rec2 = check_recovered(&e, &rec, &rec, "second crash");
    assert_eq!(rec2, rec);
}

#[test]
fn group_commit_acks_survive() {
    let mem = MemIo::new();
    let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
    let mut model = Model::new();
    for r in 0..300 {
        append_round(&e, &mut model, r, 25, Durability::GroupCommit);
    }
    let image = mem.crash();
    drop(e);
    let e = Engine::open(root(), cfg(&image, 64 << 10)).unwrap();
    let rec = check_recovered(&e, &model, &model, "group commit");
    assert_eq!(rec, model);
}

/// Many seeds of torn (partially persisted) unsynced tails, with small
/// segments so rolls and seals happen between syncs.
#[test]
fn torn_tails_over_many_seeds() {
    for seed in 1..=50u64 {
        let mem = MemIo::with_faults(MemFaults {
            torn_tail_on_crash: true,
            seed,
            ..MemFaults::default()
        });
        let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
        let mut model = Model::new();
        let mut synced = Model::new();
        let rounds = 40 + seed * 7 % 200;
        for r in 0..rounds {
            append_round(&e, &mut model, r, 20, Durability::Buffered);
            if r % 37 == seed % 37 {
                e.sync().unwrap();
                synced = model.clone();
            }
        }
        let image = mem.crash();
        drop(e);
        let what = format!("seed {seed}");
        let e = Engine::open(root(), cfg(&image, 64 << 10))
            .unwrap_or_else(|err| panic!("{what}: open: {err}"));
        let mut rec = check_recovered(&e, &synced, &model, &what);
        check_appends_continue(&e, &mut rec);
        // Crash again, nothing synced since the recovery except what the
        // recovery itself made durable.
        let recovered_before = rec.clone();
        let image2 = image.crash();
        drop(e);
        let e = Engine::open(root(), cfg(&image2, 64 << 10))
            .unwrap_or_else(|err| panic!("{what}: reopen: {err}"));
        let what2 = format!("{what}, second crash");
        let mut synced2 = Model::new();
        for (k, v) in &recovered_before {
            synced2.insert(*k, v - 1); // what recovery found is durable
        }
        check_recovered(&e, &synced2, &recovered_before, &what2);
    }
}

/// `tear_next_write` cuts a write mid-record: the append fails, the torn
/// bytes may even be synced, and recovery cuts them off.
#[test]
fn torn_write_mid_record() {
    for tear in [1usize, 7, 39, 40, 41, 100, 333] {
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem, 1 << 20)).unwrap();
        let mut model = Model::new();
        for r in 0..20 {
            append_round(&e, &mut model, r, 10, Durability::Buffered);
        }
        e.sync().unwrap();
        let tl = TimelineId::store(3);
        let before = e.last_seq(tl);
        mem.set_faults(MemFaults {
            tear_next_write: Some(tear),
            ..MemFaults::default()
        });
        let big = payload(0, 3, before + 1);
        let r = e.append_with(tl, &big, Durability::Buffered);
        assert!(matches!(r, Err(Error::Io { .. })), "tear {tear}: {r:?}");
        // Nothing was published: no seq consumed, readers see the old state.
        assert_eq!(e.last_seq(tl), before);
        assert!(e.get(tl, before + 1).unwrap().is_none());
        // Sync the torn bytes to disk, then crash.
        e.sync().unwrap();
        let image = mem.crash();
        drop(e);
        let e = Engine::open(root(), cfg(&image, 1 << 20)).unwrap();
        let mut rec = check_recovered(&e, &model, &model, &format!("tear {tear}"));
        assert_eq!(rec, model);
        check_appends_continue(&e, &mut rec);
        drop(e);

        // Same tear, but the engine keeps going: the next write overwrites the torn bytes.
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem, 1 << 20)).unwrap();
        let mut model = Model::new();
        for r in 0..5 {
            append_round(&e, &mut model, r, 10, Durability::Buffered);
        }
        mem.set_faults(MemFaults {
            tear_next_write: Some(tear),
            ..MemFaults::default()
        });
        let s = model.get(&(0, 3)).copied().unwrap_or(0);
        assert!(e
            .append_with(tl, &payload(0, 3, s + 1), Durability::Buffered)
            .is_err());
        for r in 5..30 {
            append_round(&e, &mut model, r, 10, Durability::GroupCommit);
        }
        let image = mem.crash();
        drop(e);
        let e = Engine::open(root(), cfg(&image, 1 << 20)).unwrap();
        let rec = check_recovered(&e, &model, &model, &format!("tear {tear} then continue"));
        assert_eq!(rec, model);
    }
}

fn shard_dirs(mem: &MemIo) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for ks in ["store", "sync"] {
        for s in 0..2 {
            let d = root().join(ks).join(format!("{s:03}"));
            if !mem.file_names(&d).is_empty() {
                v.push(d);
            }
        }
    }
    v
}

/// Power cuts at every point of a run with many small segments: after each
/// API call the image is what a cut at that moment leaves (everything
/// between two calls, including sealing, ran to completion or not at all
/// in the durable image only as far as it synced). With syncs failing half
/// way through sealing, the cut leaves half-sealed states.
#[test]
fn crash_during_sealing() {
    // 1) Images taken right after appends that froze and sealed a segment.
    let mem = MemIo::new();
    let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
    let mut model = Model::new();
    let mut images = 0;
    for r in 0..600 {
        append_round(&e, &mut model, r, 12, Durability::GroupCommit);
        if r.is_multiple_of(23) {
            let image = mem.crash();
            let e2 = Engine::open(root(), cfg(&image, 64 << 10)).unwrap();
            let rec = check_recovered(&e2, &model, &model, &format!("image at round {r}"));
            assert_eq!(rec, model);
            images += 1;
        }
    }
    assert!(
        e.stats().total().sealed_segments > 5,
        "{:?}",
        e.stats().total()
    );
    assert!(images > 10);
    drop(e);

    // 2) Fail syncs from some point on: sealing (or the roll before it)
    //    fails half way; the cut image must still recover every acked append.
    for fail_after_round in [3u64, 50, 97, 150, 211] {
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
        let mut acked = Model::new();
        let mut attempted = Model::new();
        let mut failed = false;
        for r in 0..400 {
            if r == fail_after_round {
                mem.set_faults(MemFaults {
                    fail_syncs: true,
                    ..MemFaults::default()
                });
            }
            match try_round(
                &e,
                &mut acked,
                &mut attempted,
                r,
                12,
                Durability::GroupCommit,
            ) {
                Ok(()) => assert!(
                    r < fail_after_round,
                    "round {r}: append acked after syncs started failing"
                ),
                Err(err) => {
                    assert!(
                        matches!(err, Error::Io { .. } | Error::Poisoned { .. }),
                        "{err:?}"
                    );
                    failed = true;
                    break;
                }
            }
        }
        assert!(
            failed,
            "fail_after_round {fail_after_round}: failing syncs never surfaced"
        );
        let image = mem.crash();
        drop(e);
        let e = Engine::open(root(), cfg(&image, 64 << 10))
            .unwrap_or_else(|err| panic!("fail_after_round {fail_after_round}: open: {err}"));
        check_recovered(
            &e,
            &acked,
            &attempted,
            &format!("syncs failing from round {fail_after_round}"),
        );
    }
}

/// A log segment created (header written, name synced) but cut before its
/// header reached the disk, or with a partial header.
#[test]
fn log_torn_before_header() {
    for keep in [0u64, 1, 20, 63] {
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
        let mut model = Model::new();
        for r in 0..30 {
            append_round(&e, &mut model, r, 12, Durability::Buffered);
        }
        e.close().unwrap();
        let image = mem.crash();
        // Add a newer log file in every shard, torn before its header.
        for d in shard_dirs(&image) {
            let names = image.file_names(&d);
            let max_gen = names
                .iter()
                .filter_map(|n| n.split('.').next()?.parse::<u32>().ok())
                .max()
                .unwrap();
            let newest = d.join(format!("{max_gen:010}.log"));
            let path = d.join(format!("{:010}.log", max_gen + 1));
            copy_file(&image, &newest, &path, keep);
        }
        let e = Engine::open(root(), cfg(&image, 64 << 10))
            .unwrap_or_else(|err| panic!("keep {keep}: {err}"));
        let mut rec = check_recovered(&e, &model, &model, &format!("torn header, {keep} bytes"));
        assert_eq!(rec, model);
        check_appends_continue(&e, &mut rec);
        e.close().unwrap();
        let image2 = image.crash();
        let e = Engine::open(root(), cfg(&image2, 64 << 10)).unwrap();
        let rec2 = check_recovered(
            &e,
            &rec,
            &rec,
            &format!("torn header, {keep} bytes, reopen"),
        );
        assert_eq!(rec2, rec);
    }
}

/// Write the first `len` bytes of `from` to a new file `to` (durably).
fn copy_file(mem: &MemIo, from: &Path, to: &Path, len: u64) {
    use timeline_engine::io::{Io, OpenMode};
    let src = mem.open(from, OpenMode::Existing).unwrap();
    let bytes = src.map().unwrap();
    let dst = mem.open(to, OpenMode::CreateNew).unwrap();
    dst.write_and_sync(&bytes[..len as usize], 0).unwrap();
    mem.sync_dir(to.parent().unwrap()).unwrap();
}

/// A multi-record write cut short (a full disk's short write) can leave
/// whole records of it in the file, checksums and all. They are not
/// acknowledged, so they must not come back: not when the engine stops
/// right after (before, recovery kept them), and not behind a later,
/// shorter write (before, recovery found them chained on and either
/// brought them back or refused to open).
#[test]
fn a_torn_batch_leaves_none_of_its_records() {
    let tl = TimelineId::store(3);
    for next_write in [false, true] {
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem, 1 << 20)).unwrap();
        let mut model = Model::new();
        for r in 0..3 {
            append_round(&e, &mut model, r, 10, Durability::Buffered);
        }
        e.sync().unwrap();
        let before = e.last_seq(tl);
        // Four records of one timeline in one write (about 260 bytes
        // each); torn after two whole ones.
        let recs: Vec<Vec<u8>> = (1..=4).map(|i| vec![i as u8; 200]).collect();
        let items: Vec<(TimelineId, &[u8])> = recs.iter().map(|p| (tl, p.as_slice())).collect();
        mem.set_faults(MemFaults {
            tear_next_write: Some(580),
            ..MemFaults::default()
        });
        assert!(e.append_batch(&items, Durability::Buffered).is_err());
        assert_eq!(e.last_seq(tl), before, "nothing published");
        if next_write {
            // One shorter record where the batch began.
            let seq = e.append_with(tl, b"after", Durability::Buffered).unwrap();
            assert_eq!(seq, before + 1);
        }
        // A kill -9: every byte written stays (the page cache survives).
        let image = mem.crash_with(|_, _, now| now.to_vec());
        drop(e);
        let e = Engine::open(root(), cfg(&image, 1 << 20))
            .unwrap_or_else(|err| panic!("next write {next_write}: reopen: {err}"));
        let want = before + u64::from(next_write);
        assert_eq!(
            e.last_seq(tl),
            want,
            "next write {next_write}: a refused record came back"
        );
        if next_write {
            assert_eq!(e.get(tl, want).unwrap().unwrap().payload, b"after".to_vec());
        }
        assert!(e.get(tl, want + 1).unwrap().is_none());
        let seq = e.append_with(tl, b"goes on", Durability::Buffered).unwrap();
        assert_eq!(seq, want + 1);
    }
}

/// An own-fdatasync append first syncs the segments a roll retired. If
/// that fdatasync fails, a full disk's `ENOSPC` included, the kernel may
/// have dropped their dirty pages: the shard is poisoned (before, a full
/// disk's failure there was taken for a failed write, and a later group
/// sync could vouch for pages that were gone).
#[test]
fn a_failed_sync_of_retired_segments_poisons_the_shard_even_on_a_full_disk() {
    use timeline_engine::io::{FailAt, IoOp};
    let mem = MemIo::new();
    // Segments of 64 KiB: the rounds below roll some.
    let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
    let mut model = Model::new();
    let tl = timeline(0, 3);
    let mut r = 0;
    // Roll at least once without syncing, so that a retired segment waits.
    while e.stats().keyspace(Keyspace::STORE).sealed_segments == 0 && r < 400 {
        append_round(&e, &mut model, r, 10, Durability::Buffered);
        r += 1;
    }
    mem.set_faults(MemFaults {
        fail_at: Some(FailAt {
            nth: 1,
            ops: vec![IoOp::Sync],
            sticky: false,
            full: true,
        }),
        ..MemFaults::default()
    });
    let got = e.append_with(tl, b"own sync", Durability::Sync);
    assert!(got.is_err(), "{got:?}");
    mem.set_faults(MemFaults::default());
    let next = e.append_with(tl, b"next", Durability::GroupCommit);
    assert!(matches!(next, Err(Error::Poisoned { .. })), "{next:?}");
}

/// A shard poisoned by a failed fdatasync does not seal a segment in log
/// order: after that failure its log's pages on disk are unknown, and a
/// new fdatasync of the same file would report success (fsyncgate). Left
/// a log, recovery cuts it at its first bad record; renamed a sealed
/// segment, it would be trusted whole. Regression: the retry after the
/// failed seal appended the index, synced and renamed the log.
#[test]
fn a_poisoned_shard_seals_no_segment_in_log_order() {
    use timeline_engine::io::{FailAt, IoOp};
    let mem = MemIo::new();
    let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
    let tl = TimelineId::sync(7);
    let dir = root()
        .join("sync")
        .join(format!("{:03}", e.shard_index(tl)));
    let has = |ext: &str| {
        mem.file_names(&dir)
            .iter()
            .filter(|n| n.ends_with(ext))
            .count()
    };
    // Every fdatasync fails: the roll's inline seal (log order: the sync
    // keyspace does not regroup) fails at its fdatasync and poisons.
    mem.set_faults(MemFaults {
        fail_at: Some(FailAt {
            nth: 1,
            ops: vec![IoOp::Sync],
            sticky: true,
            full: false,
        }),
        ..MemFaults::default()
    });
    let mut n = 0;
    while has(".log") < 2 {
        let got = e.append_with(tl, &payload(1, 7, n + 1), Durability::Buffered);
        assert!(got.is_ok(), "append {n}: {got:?}");
        n += 1;
        assert!(n < 10_000, "no roll");
    }
    assert_eq!(has(".seg"), 0, "sealed despite the failed fdatasync");
    mem.set_faults(MemFaults::default());
    let m = e.maintain();
    assert!(matches!(m, Err(Error::Poisoned { .. })), "{m:?}");
    assert_eq!(has(".seg"), 0, "a poisoned shard sealed its log in place");
    assert_eq!(has(".log"), 2);
}

/// An append with its own fdatasync (`Durability::Sync`): a full disk's
/// `ENOSPC` from its fdatasync poisons the shard, like any failed
/// fdatasync (the kernel may have dropped dirty pages); the same error
/// from its write does not (the append fails, the next one goes in).
/// Regression: the write and its fdatasync could not be told apart, and
/// an `ENOSPC` from either was taken for the write's.
#[test]
fn an_own_sync_append_is_poisoned_by_its_fdatasync_not_by_its_write() {
    use timeline_engine::io::{FailAt, IoOp};
    for op in [IoOp::Write, IoOp::Sync] {
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
        let tl = timeline(0, 3);
        e.append_with(tl, b"first", Durability::Sync).unwrap();
        mem.set_faults(MemFaults {
            fail_at: Some(FailAt {
                nth: 1,
                ops: vec![op],
                sticky: false,
                full: true,
            }),
            ..MemFaults::default()
        });
        let got = e.append_with(tl, b"refused", Durability::Sync);
        assert!(
            matches!(&got, Err(x) if x.is_storage_full()),
            "{op:?}: {got:?}"
        );
        let next = e.append_with(tl, b"next", Durability::Sync);
        match op {
            IoOp::Sync => assert!(
                matches!(next, Err(Error::Poisoned { .. })),
                "{op:?}: {next:?}"
            ),
            _ => assert_eq!(next.unwrap(), 2, "{op:?}"),
        }
    }
}

/// `Engine::sync` with one shard poisoned still makes the others' appends
/// durable (a shutdown's last sync), then reports the poisoned one.
/// Regression: it returned at the first poisoned shard, and appends of the
/// shards after it were lost to a power cut.
#[test]
fn a_poisoned_shard_does_not_keep_the_others_from_a_sync() {
    use timeline_engine::io::{FailAt, IoOp};
    let mem = MemIo::new();
    let e = Engine::open(root(), cfg(&mem, 64 << 10)).unwrap();
    // Shard 0 of the store keyspace is poisoned by a failed own-sync append.
    let bad = (0..)
        .map(|i| timeline(0, i))
        .find(|&t| e.shard_index(t) == 0)
        .unwrap();
    e.append_with(bad, b"first", Durability::Sync).unwrap();
    mem.set_faults(MemFaults {
        fail_at: Some(FailAt {
            nth: 1,
            ops: vec![IoOp::Sync],
            sticky: false,
            full: false,
        }),
        ..MemFaults::default()
    });
    assert!(e.append_with(bad, b"lost", Durability::Sync).is_err());
    mem.set_faults(MemFaults::default());
    // Buffered appends to every shard of the sync keyspace, after it.
    let good: Vec<TimelineId> = (0..8).map(|i| timeline(1, i)).collect();
    for &t in &good {
        e.append_with(t, b"kept", Durability::Buffered).unwrap();
    }
    let synced = e.sync();
    assert!(matches!(synced, Err(Error::Poisoned { .. })), "{synced:?}");
    let after = mem.crash();
    drop(e);
    let e = Engine::open(root(), cfg(&after, 64 << 10)).unwrap();
    for &t in &good {
        assert_eq!(e.last_seq(t), 1, "{t:?}: lost to the cut though synced");
    }
}
