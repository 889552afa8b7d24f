//! `timeline-cluster`: the scale-out layer (issue 12), under construction.
//!
//! Timelines (store and sync, conversations and users) hash into `P`
//! virtual partitions ([`partition`]); each partition is to be one openraft
//! group of `R` replicas on distinct nodes, whose Raft log lives in the
//! engine, one timeline per partition ([`log_store`]). What is built so far:
//!
//! - [`partition`]: the hash of a timeline to its partition, and the
//!   partition → replicas map with its version and placement changes (the
//!   document etcd will hold);
//! - [`log_store`]: openraft's `RaftLogStorage` on the engine, for every
//!   partition of a node on one engine (no file, thread or lock per
//!   partition): entries, truncations and purges are records of the
//!   partition's log timeline, replayed in order on open; the vote and the
//!   committed id are records of two meta timelines; appends are
//!   group-committed (`append_async`), and openraft is told an append is
//!   flushed when the engine's fdatasync covering it returns;
//! - [`state_machine`]: openraft's state machine on the engine: an applied
//!   `Append` writes (Raft index, payload) to its timeline, idempotently,
//!   so replicas hold the same records with the same SeqIds; snapshots carry
//!   the partition's records and bring a lagging replica up by appending
//!   what it lacks.
//!
//! Not built yet: the network between nodes, etcd, routing (`MOVED`), IM
//! across partitions, and a node that runs all this (docs/scaling.md).

pub mod log_store;
pub mod meta;
pub mod net;
pub mod node;
pub mod partition;
pub mod state_machine;

pub use node::{ClusterError, Node, NodeConfig};

/// What the unit tests of this crate share.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod testkit {
    use std::sync::Arc;
    use timeline_engine::Engine;

    /// An engine with the default keyspaces and the raft ones.
    pub fn engine(dir: &std::path::Path) -> Arc<Engine> {
        let mut cfg = timeline_engine::Config::default();
        cfg.keyspaces.extend(crate::log_store::keyspaces());
        Arc::new(Engine::open(dir, cfg).unwrap())
    }

    /// Run a future to completion on a fresh single-thread runtime.
    pub fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }
}

use std::io::Cursor;

/// A node of the cluster.
pub type NodeId = u64;

/// What a partition's log replicates: the writes of its timelines.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// Append one payload to a timeline (`keyspace`, `id`) of the partition.
    Append {
        keyspace: u8,
        id: u64,
        payload: Vec<u8>,
    },
}

/// What applying a [`Command`] answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// The SeqId the append got (0 for entries that are not appends).
    pub seq: u64,
}

openraft::declare_raft_types!(
    /// The cluster's openraft types: u64 node ids, basic nodes (an address).
    pub TypeConfig:
        D = Command,
        R = Applied,
);
