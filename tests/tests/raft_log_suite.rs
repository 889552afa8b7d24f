//! openraft's own storage test suite (`openraft::testing::Suite`) against
//! the engine-backed log store and state machine: every case builds a fresh
//! engine in a temporary directory.
#![allow(clippy::unwrap_used)]

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use std::sync::Arc;
use timeline_cluster::log_store::{Flusher, LogStore};
use timeline_cluster::state_machine::StateMachine;
use timeline_cluster::{NodeId, TypeConfig};
use timeline_tests::raft::raft_engine;

/// A fresh engine per case; the guard keeps the directory and the flusher.
struct Builder;

type Guard = (tempfile::TempDir, Arc<Flusher>);

impl StoreBuilder<TypeConfig, LogStore, StateMachine, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(raft_engine(dir.path()).unwrap());
        let flusher = Flusher::start().unwrap();
        let ls = LogStore::open(engine.clone(), flusher.clone(), 7)?;
        let sm = StateMachine::open(engine, 7)?;
        Ok(((dir, flusher), ls, sm))
    }
}

#[test]
fn openraft_storage_suite_passes_on_the_engine() {
    Suite::test_all(Builder).unwrap();
}
