//! A replica given up and taken again starts as a learner, not as the
//! leader it once was.
//!
//! A node that led a partition and then gave its replica up while
//! running (its log retired, its vote and applied state left on disk) can
//! be handed the same partition again: a node that was replaced and comes
//! back, for one, or a replica moved away and back. openraft 0.9 restores a node whose last vote is a
//! committed one for itself *as leader* at start; with the membership it
//! had then it would lead a group that removed it and take writes no
//! quorum will ever commit (seen in the replacement test: four clients
//! waited forever on such a node). `timeline_cluster::node::open_storage`
//! forgets that membership; this test fails without it (the reopened group
//! leads again and takes the write).
#![allow(clippy::unwrap_used)]

use openraft::{BasicNode, Config, Raft, ServerState};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use timeline_cluster::log_store::{self, Flusher};
use timeline_cluster::node::open_storage;
use timeline_cluster::{Command, TypeConfig};
use timeline_tests::raft::{raft_engine, NoPeers};

#[test]
fn a_retired_leader_taken_again_starts_as_a_learner() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(raft_engine(dir.path()).unwrap());
    let flusher = Flusher::start().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = Arc::new(Config::default().validate().unwrap());
    let write = |k: u64| Command::Append {
        keyspace: 0,
        id: 7,
        payload: format!("w{k}").into_bytes(),
    };
    rt.block_on(async {
        // A single-voter group that leads, writes, and persists its applied
        // state (a snapshot) with itself the voter.
        let (ls, sm) = open_storage(&engine, &flusher, 0).unwrap();
        let raft = Raft::<TypeConfig>::new(1, config.clone(), NoPeers, ls, sm)
            .await
            .unwrap();
        raft.initialize(BTreeMap::from([(1, BasicNode::default())]))
            .await
            .unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .state(ServerState::Leader, "leader")
            .await
            .unwrap();
        for k in 0..5 {
            raft.client_write(write(k)).await.unwrap();
        }
        raft.trigger().snapshot().await.unwrap();
        // (The metrics may trail the writes' answers: wait until the
        // snapshot covers everything applied.)
        let applied = raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= 6) && m.snapshot == m.last_applied,
                "a snapshot of every entry",
            )
            .await
            .unwrap()
            .last_applied;
        raft.shutdown().await.unwrap();

        // Reopened as it is: it leads again at once (openraft restores it).
        let (ls, sm) = open_storage(&engine, &flusher, 0).unwrap();
        let raft = Raft::<TypeConfig>::new(1, config.clone(), NoPeers, ls, sm)
            .await
            .unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .state(ServerState::Leader, "leader after a plain restart")
            .await
            .unwrap();
        raft.shutdown().await.unwrap();

        // Given up (as reconcile does once it is no longer a voter), then
        // taken again; and once more, as if the node restarted before any
        // leader reached it (the log is no longer retired then: openraft
        // purged it to what was applied; the membership stays forgotten).
        log_store::retire(&engine, 0).unwrap();
        for round in 0..2 {
            let (ls, sm) = open_storage(&engine, &flusher, 0).unwrap();
            assert_eq!(ls.was_retired(), round == 0);
            let raft = Raft::<TypeConfig>::new(1, config.clone(), NoPeers, ls, sm)
                .await
                .unwrap();
            raft.wait(Some(Duration::from_secs(10)))
                .state(ServerState::Learner, "a learner")
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let m = raft.metrics().borrow().clone();
            assert_eq!(
                m.membership_config.membership().voter_ids().count(),
                0,
                "round {round}: {m:?}"
            );
            assert_eq!(m.last_applied, applied, "what it applied stays");
            // It takes no write: it is nobody's leader.
            let r = tokio::time::timeout(Duration::from_secs(5), raft.client_write(write(99)))
                .await
                .expect("a write to a learner is answered");
            assert!(r.is_err(), "round {round}: a learner took a write: {r:?}");
            raft.shutdown().await.unwrap();
        }
    });
    // The data applied before is still there, once.
    let page = engine
        .scan(
            timeline_engine::TimelineId::new(timeline_engine::Keyspace(0), 7),
            1,
            100,
            timeline_engine::Direction::Forward,
        )
        .unwrap();
    assert_eq!(page.len(), 5);
    flusher.stop();
}
