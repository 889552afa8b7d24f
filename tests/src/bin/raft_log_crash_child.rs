//! The process `tests/raft_log_kill9.rs` kills with SIGKILL.
//!
//! Usage: `raft-log-crash-child <data dir> <seed> <ack log>`
//!
//! Runs [`PARTITIONS`] single-node openraft groups on one engine, their logs
//! in `timeline_cluster::log_store` (one flusher), and writes to all of them
//! at once forever: `client_write` of an `Append` whose payload names the
//! partition, the run's seed and a counter. After each write openraft
//! acknowledged (committed: on disk, as the log store reported), it writes
//! `partition index payload` to the ack log (no fsync: a SIGKILL does not
//! lose the page cache). The state machine is the engine-backed one
//! (`timeline_cluster::state_machine`), with a snapshot every 500 entries,
//! so logs are purged while it runs.
//!
//! Exit codes (the parent only ever kills): 2 bad usage, 3 the engine or a
//! log store did not open, 4 a group did not start or a write failed.
#![allow(clippy::unwrap_used)]

use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use timeline_cluster::log_store::{Flusher, LogStore};
use timeline_cluster::state_machine::StateMachine;
use timeline_cluster::{Command, TypeConfig};
use timeline_tests::raft::{raft_engine, NoPeers};

/// Groups written to at once.
pub const PARTITIONS: u64 = 4;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: raft-log-crash-child <data dir> <seed> <ack log>");
        std::process::exit(2);
    }
    let seed = args[2].clone();
    let acks = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args[3])
            .unwrap(),
    ));
    let engine = Arc::new(raft_engine(args[1].as_ref()).unwrap_or_else(|e| {
        eprintln!("engine: {e}");
        std::process::exit(3)
    }));
    let flusher = Flusher::start().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let config = Arc::new(
            Config {
                snapshot_policy: SnapshotPolicy::LogsSinceLast(500),
                max_in_snapshot_log_to_keep: 100,
                ..Default::default()
            }
            .validate()
            .unwrap(),
        );
        let mut tasks = Vec::new();
        for p in 0..PARTITIONS {
            let ls = LogStore::open(engine.clone(), flusher.clone(), p).unwrap_or_else(|e| {
                eprintln!("log store {p}: {e}");
                std::process::exit(3)
            });
            let sm = StateMachine::open(engine.clone(), p).unwrap_or_else(|e| {
                eprintln!("state machine {p}: {e}");
                std::process::exit(3)
            });
            let raft = Raft::<TypeConfig>::new(1, config.clone(), NoPeers, ls, sm)
                .await
                .unwrap();
            // Already initialized after the first run: that error is expected.
            let _ = raft
                .initialize(BTreeMap::from([(1, BasicNode::default())]))
                .await;
            if let Err(e) = raft
                .wait(Some(Duration::from_secs(10)))
                .state(ServerState::Leader, "leader")
                .await
            {
                eprintln!("group {p} did not elect itself: {e}");
                std::process::exit(4);
            }
            let (acks, seed) = (acks.clone(), seed.clone());
            tasks.push(tokio::spawn(async move {
                for k in 0u64.. {
                    let payload = format!("{p}:{seed}:{k}").into_bytes();
                    let cmd = Command::Append {
                        keyspace: 0,
                        id: p,
                        payload: payload.clone(),
                    };
                    let r = raft.client_write(cmd).await.unwrap_or_else(|e| {
                        eprintln!("group {p}: write {k}: {e}");
                        std::process::exit(4)
                    });
                    let line = format!(
                        "{p} {} {}\n",
                        r.log_id.index,
                        String::from_utf8_lossy(&payload)
                    );
                    acks.lock().unwrap().write_all(line.as_bytes()).unwrap();
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}
