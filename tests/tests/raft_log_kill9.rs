//! A crash test of the Raft log and state machine on the engine that really
//! crashes: a child runs four single-node openraft groups on one engine
//! (snapshots and log purges included) and writes to them until it is
//! killed with SIGKILL at a random moment. The test then opens each
//! partition's log store and state machine on the directory and checks:
//! each log is an unbroken run of indexes; every write openraft
//! acknowledged is in the log (unless purged) at its index with its exact
//! bytes, and in its partition's timeline exactly once; the timeline's
//! indexes strictly increase. The next child continues on the same
//! directory, so every restart re-applies entries the state machine had
//! already written, which must not be written twice.
#![allow(clippy::unwrap_used)]

use openraft::storage::RaftLogStorage;
use openraft::{EntryPayload, RaftLogReader};
use rand::{Rng, SeedableRng};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use timeline_cluster::log_store::{Flusher, LogStore};
use timeline_cluster::state_machine::{write_id, StateMachine};
use timeline_cluster::Command as Cmd;
use timeline_tests::raft::raft_engine;

/// Kill cycles (`RAFT_CRASH_CYCLES` for a longer soak).
fn cycles() -> usize {
    std::env::var("RAFT_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

#[test]
fn kill9_loses_no_acknowledged_raft_write() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ack_path = tmp.path().join("acks.log");
    let err_path = tmp.path().join("child.stderr");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4af7);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut checked = 0usize;
    let mut in_purged_log = 0usize;
    for cycle in 0..cycles() {
        let stderr = std::fs::File::create(&err_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_raft-log-crash-child"))
            .arg(&data)
            .arg(cycle.to_string())
            .arg(&ack_path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..=900)));
        let early = child.try_wait().unwrap();
        child.kill().unwrap_or(());
        let status = child.wait().unwrap();
        let child_err = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(
            early.is_none() && status.signal() == Some(libc::SIGKILL),
            "cycle {cycle}: child exited by itself ({status:?}): {child_err}"
        );
        let acks = std::fs::read_to_string(&ack_path).unwrap();
        let engine =
            Arc::new(raft_engine(&data).unwrap_or_else(|e| panic!("cycle {cycle}: recovery: {e}")));
        let flusher = Flusher::start().unwrap();
        let mut logs: Vec<LogStore> = (0..4)
            .map(|p| LogStore::open(engine.clone(), flusher.clone(), p).unwrap())
            .collect();
        let mut entries = Vec::new();
        for ls in &mut logs {
            let st = rt.block_on(ls.get_log_state()).unwrap();
            let es = rt.block_on(ls.try_get_log_entries(..)).unwrap();
            // openraft writes its first entry (the membership) at index 0.
            let first = st.last_purged_log_id.map_or(0, |l| l.index + 1);
            for (k, e) in es.iter().enumerate() {
                assert_eq!(
                    e.log_id.index,
                    first + k as u64,
                    "cycle {cycle}: a hole in the log"
                );
            }
            assert_eq!(
                es.last().map(|e| e.log_id),
                st.last_log_id.filter(|_| !es.is_empty())
            );
            entries.push(es);
        }
        // The partitions' timelines, as the state machines wrote them.
        let data: Vec<std::collections::HashMap<u64, Vec<u8>>> = (0..4)
            .map(|p| {
                let recs = StateMachine::open(engine.clone(), p)
                    .unwrap()
                    .records(0, p)
                    .unwrap();
                for w in recs.windows(2) {
                    assert!(
                        w[0].0 < w[1].0,
                        "cycle {cycle}: partition {p}: index {} after {}",
                        w[1].0,
                        w[0].0
                    );
                }
                recs.into_iter().collect()
            })
            .collect();
        // A torn last line (killed mid-write) is ignored.
        for line in acks.lines().filter(|l| l.split(' ').count() == 3) {
            let mut f = line.split(' ');
            let p: usize = f.next().unwrap().parse().unwrap();
            let index: u64 = f.next().unwrap().parse().unwrap();
            let payload = f.next().unwrap().as_bytes();
            assert_eq!(
                data[p].get(&write_id(index, 0)).map(|v| v.as_slice()),
                Some(payload),
                "cycle {cycle}: acknowledged write {line:?} is not in its timeline"
            );
            let purged = entries[p].first().is_none_or(|e| index < e.log_id.index);
            in_purged_log += usize::from(purged);
            if !purged {
                let e = entries[p]
                    .iter()
                    .find(|e| e.log_id.index == index)
                    .unwrap_or_else(|| {
                        panic!("cycle {cycle}: acknowledged write {line:?} lost from the log")
                    });
                match &e.payload {
                    EntryPayload::Normal(Cmd::Append { payload: got, .. }) => {
                        assert_eq!(got, payload, "cycle {cycle}: {line:?}")
                    }
                    other => panic!("cycle {cycle}: {line:?} is {other:?}"),
                }
            }
            checked += 1;
        }
        drop(logs);
        flusher.stop();
        Arc::try_unwrap(engine).ok().unwrap().close().unwrap();
    }
    eprintln!(
        "{} cycles: {checked} acknowledged writes checked ({in_purged_log} of them only in their timeline: their log was purged)",
        cycles()
    );
    assert!(
        in_purged_log > 0,
        "no snapshot purged a log: the purge path went untested"
    );
    assert!(checked > 100, "only {checked} acknowledged writes checked");
}
