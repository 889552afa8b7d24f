//! Inputs and conditions the engine must refuse cleanly: oversized payloads,
//! a full disk (typed StorageFull error, still readable, appends resume
//! once space is back, no seq consumed by a failed append), failing syncs
//! (a group-commit append is never acknowledged).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use timeline_engine::io::{MemFaults, MemIo};
use timeline_engine::Keyspace;
use timeline_engine::{Config, Direction, Durability, Engine, Error, TimelineId};
use timeline_tests::{payload, timeline};

fn root() -> PathBuf {
    PathBuf::from("/db")
}

fn cfg(mem: &MemIo) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 2;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c.max_payload = 1024;
    c.io = Some(Arc::new(mem.clone()));
    c
}

type Model = BTreeMap<(u8, u64), u64>;

fn check_all(e: &Engine, model: &Model, what: &str) {
    for (&(ks, tl), &last) in model {
        let t = timeline(ks, tl);
        assert_eq!(e.last_seq(t), last, "{what}: ks {ks} tl {tl}");
        let recs = e.scan(t, 1, 100_000, Direction::Forward).unwrap();
        assert_eq!(recs.len() as u64, last, "{what}: ks {ks} tl {tl}");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "{what}");
            assert!(
                r.payload == payload(ks, tl, r.seq),
                "{what}: ks {ks} tl {tl} seq {}",
                r.seq
            );
        }
    }
}

#[test]
fn oversized_payload_is_rejected_and_nothing_written() {
    let mem = MemIo::new();
    let e = Engine::open(root(), cfg(&mem)).unwrap();
    let t = TimelineId::store(1);
    assert_eq!(e.append(t, b"ok").unwrap(), 1);
    e.sync().unwrap();
    let written = mem.bytes_written();
    let big = vec![7u8; 1025];
    for d in [
        Durability::Buffered,
        Durability::GroupCommit,
        Durability::Sync,
    ] {
        match e.append_with(t, &big, d) {
            Err(Error::PayloadTooLarge { len, max }) => assert_eq!((len, max), (1025, 1024)),
            other => panic!("{d:?}: {other:?}"),
        }
    }
    // In a batch, one oversized item rejects the whole batch up front.
    let items: Vec<(TimelineId, &[u8])> = vec![
        (t, b"a"),
        (TimelineId::sync(2), &big),
        (TimelineId::sync(3), b"c"),
    ];
    assert!(matches!(
        e.append_batch(&items, Durability::Buffered),
        Err(Error::PayloadTooLarge { .. })
    ));
    assert!(matches!(
        e.append_async(&items),
        Err(Error::PayloadTooLarge { .. })
    ));
    assert_eq!(
        mem.bytes_written(),
        written,
        "a rejected payload wrote bytes"
    );
    assert_eq!(e.last_seq(t), 1);
    assert_eq!(e.last_seq(TimelineId::sync(3)), 0);
    // Exactly max_payload is fine.
    assert_eq!(e.append(t, &big[..1024]).unwrap(), 2);
    assert_eq!(e.get(t, 2).unwrap().unwrap().payload, big[..1024].to_vec());
    // An invalid configuration is refused too.
    let mut c = cfg(&mem);
    c.max_payload = 64 << 10;
    assert!(matches!(
        Engine::open("/other", c),
        Err(Error::InvalidArgument(_))
    ));
}

fn is_storage_full(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
}

/// Fill the disk at many different points (inside a record batch, at a
/// segment roll, while sealing), then lift the fault: every append that
/// returned Ok is readable, a failed append consumed no seq, and appends
/// work again with consecutive seqs.
#[test]
fn full_disk_is_storage_full_and_recoverable() {
    let (failures, _) = full_disk_sweep();
    if !failures.is_empty() {
        panic!("{} problem(s):\n{}", failures.len(), failures.join("\n"));
    }
}

/// The same sweep, checking that an append that returned an error consumed
/// no seq even when the error came from sealing the segment it filled.
#[test]
fn failed_append_consumes_no_seq_even_when_sealing_fails() {
    let (_, consumed) = full_disk_sweep();
    if !consumed.is_empty() {
        panic!("{} problem(s):\n{}", consumed.len(), consumed.join("\n"));
    }
}

/// Returns (other problems, appends that failed but consumed seqs).
fn full_disk_sweep() -> (Vec<String>, Vec<String>) {
    let mut failures = Vec::new();
    let mut consumed = Vec::new();
    // Budgets from early on to well past the first few rolls (64 KiB segments).
    for budget in (2_000u64..400_000).step_by(9_973) {
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem)).unwrap();
        let base = mem.bytes_written();
        mem.set_faults(MemFaults {
            fail_writes_after_bytes: Some(base + budget),
            ..MemFaults::default()
        });
        let mut model = Model::new();
        let mut hit = None;
        'fill: for i in 0..100_000u64 {
            // Mostly single appends; every seventh a batch over both keyspaces.
            let batch = if i % 7 == 3 { 2 + (i % 5) as usize } else { 1 };
            let mut keys = Vec::new();
            for j in 0..batch as u64 {
                let ks = ((i + j) % 2) as u8;
                let tl = (i * 3 + j * 7) % 17;
                if keys.iter().any(|&(k, t, _)| (k, t) == (ks, tl)) {
                    continue;
                }
                keys.push((ks, tl, model.get(&(ks, tl)).copied().unwrap_or(0) + 1));
            }
            let ps: Vec<Vec<u8>> = keys.iter().map(|&(k, t, s)| payload(k, t, s)).collect();
            let items: Vec<(TimelineId, &[u8])> = keys
                .iter()
                .zip(&ps)
                .map(|(&(k, t, _), p)| (timeline(k, t), p.as_slice()))
                .collect();
            let d = if i.is_multiple_of(3) {
                Durability::GroupCommit
            } else {
                Durability::Buffered
            };
            match e.append_batch(&items, d) {
                Ok(seqs) => {
                    for (&(k, t, s), got) in keys.iter().zip(seqs) {
                        assert_eq!(got, s);
                        model.insert((k, t), s);
                    }
                }
                Err(err) => {
                    hit = Some((i, err, keys));
                    break 'fill;
                }
            }
        }
        let (i, err, keys) = hit.expect("the disk never filled");
        let what = format!("budget {budget} (failed at append {i})");
        if !is_storage_full(&err) {
            failures.push(format!("{what}: expected Io(StorageFull), got {err:?}"));
            continue;
        }
        // Still readable. A failed single append consumed no seq. A failed
        // batch may have left whole parts written (documented: a batch is
        // not atomic across shards), but never a seq without its record.
        for &(k, t, s) in &keys {
            let last = e.last_seq(timeline(k, t));
            let acked = model.get(&(k, t)).copied().unwrap_or(0);
            if keys.len() == 1 && last != acked {
                consumed.push(format!(
                    "{what}: ks {k} tl {t}: single append failed with {err} but consumed a seq (last_seq {last}, acked {acked})"
                ));
            }
            assert!(
                last >= acked && last <= s,
                "{what}: ks {k} tl {t}: last_seq {last}, acked {acked}, attempted {s}"
            );
            model.insert((k, t), last);
        }
        if keys.len() > 1
            && keys
                .iter()
                .all(|&(k, t, s)| e.last_seq(timeline(k, t)) == s)
        {
            failures.push(format!(
                "{what}: batch of {} returned {err} but every item was written (seqs consumed, records readable)",
                keys.len()
            ));
        }
        check_all(&e, &model, &what);
        // Lift the fault: appends work again and continue the seqs.
        mem.set_faults(MemFaults::default());
        let mut resumed = true;
        for round in 0..200u64 {
            let (k, t) = ((round % 2) as u8, round % 17);
            let s = e.last_seq(timeline(k, t)) + 1;
            match e.append_with(timeline(k, t), &payload(k, t, s), Durability::GroupCommit) {
                Ok(got) => {
                    assert_eq!(got, s, "{what}");
                    model.insert((k, t), s);
                }
                Err(err2) => {
                    failures.push(format!(
                        "{what}: append after the disk has space again failed: {err2}"
                    ));
                    resumed = false;
                    break;
                }
            }
        }
        if resumed {
            check_all(&e, &model, &what);
            // And it all survives a crash and reopen.
            let image = mem.crash();
            drop(e);
            let e = Engine::open(root(), cfg(&image)).unwrap();
            check_all(&e, &model, &format!("{what}, reopened"));
        }
    }
    (failures, consumed)
}

/// Failing fdatasync: a group-commit (or sync) append is never acknowledged,
/// later appends fail too (the shard is poisoned), reads keep working, and
/// what was acknowledged before survives a reopen.
#[test]
fn failing_syncs_never_acknowledge() {
    for d in [Durability::GroupCommit, Durability::Sync] {
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem)).unwrap();
        let t = TimelineId::sync(4);
        for s in 1..=10u64 {
            assert_eq!(e.append_with(t, &payload(1, 4, s), d).unwrap(), s);
        }
        mem.set_faults(MemFaults {
            fail_syncs: true,
            ..MemFaults::default()
        });
        for s in 11..=15u64 {
            match e.append_with(t, &payload(1, 4, s), d) {
                Ok(seq) => panic!("{d:?}: append acknowledged (seq {seq}) while fdatasync fails"),
                Err(Error::Poisoned { .. } | Error::Io { .. }) => {}
                Err(other) => panic!("{d:?}: unexpected error {other:?}"),
            }
        }
        if d == Durability::GroupCommit {
            // Published but never synced bytes: sync() cannot succeed.
            assert!(
                e.sync().is_err(),
                "{d:?}: sync() succeeded while fdatasync fails"
            );
        }
        // Batches over both keyspaces: also never Ok with a failing sync.
        let items: Vec<(TimelineId, &[u8])> = vec![(TimelineId::store(1), b"x"), (t, b"y")];
        assert!(e.append_batch(&items, d).is_err(), "{d:?}");
        // Even once syncs work again, the poisoned shard refuses appends
        // (its earlier writes may have been dropped by the kernel).
        mem.set_faults(MemFaults::default());
        assert!(
            e.append_with(t, b"later", d).is_err(),
            "{d:?}: poisoned shard accepted an append"
        );
        // Reads still work.
        for s in 1..=10u64 {
            assert_eq!(e.get(t, s).unwrap().unwrap().payload, payload(1, 4, s));
        }
        let image = mem.crash();
        drop(e);
        let e = Engine::open(root(), cfg(&image)).unwrap();
        let last = e.last_seq(t);
        assert!(last >= 10, "{d:?}: acknowledged appends lost");
        for s in 1..=last {
            let r = e.get(t, s).unwrap().unwrap();
            assert_eq!(r.payload, payload(1, 4, s), "{d:?}");
        }
        // A fresh open is healthy again.
        assert_eq!(
            e.append_with(t, &payload(1, 4, last + 1), d).unwrap(),
            last + 1
        );
    }
}
