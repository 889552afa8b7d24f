//! `timeline-cluster`: the scale-out layer (issue 12; docs/scaling.md).
//!
//! Timelines hash into `P` partitions ([`partition`]); each partition is an
//! openraft group of `R` replicas on distinct nodes, whose Raft log lives in
//! the engine, one timeline per partition. A node hosts many partitions on
//! one engine, one small runtime and one connection per peer:
//!
//! - [`partition`]: the partition → replicas map with its version and
//!   placement changes (the document etcd holds);
//! - [`log_store`]: openraft's `RaftLogStorage` on the engine (entries,
//!   truncations and purges as records replayed on open; group-committed
//!   appends flushed by a thread per engine shard; purged records
//!   released to the engine, which drops their segments);
//! - [`state_machine`]: applying an entry appends to the partition's
//!   timelines with a write id, idempotently, so replicas hold the same
//!   records with the same SeqIds; snapshots bring a lagging replica up;
//! - [`snapshot`]: a snapshot as a file streamed out of the engine (each
//!   timeline's retained seq range, checksummed), made when it is sent;
//! - [`net`]: openraft's RPCs over one multiplexed TCP connection per pair
//!   of nodes;
//! - [`meta`]: membership leases and the map in etcd;
//! - [`im`]: conversations across partitions: store events, outbox
//!   records and deliveries to members' partitions, and the hook that
//!   tells the server of each sync entry applied (push);
//! - [`outbox`]: a partition's outbox and done mark on a replica, seqs
//!   local and write ids shared, and what of them is released;
//! - [`delivery`]: a conversation partition leader's deliverer, and the
//!   queue that merges deliveries into a member partition's entries;
//! - [`groups`]: read fan-out across nodes: a user's groups, pages read
//!   from the groups' leaders, a group's messages told to every node;
//! - [`marks`]: recalls (the conversation's partition) and a user's read
//!   markers and deletes-for-me (the user's partition, checked against
//!   the conversation's leader first);
//! - [`conversations`]: a user's conversation list, with each one's last
//!   seq and unread count asked of its leader;
//! - [`node`]: a running node: its groups, start-up (forming the map),
//!   routing answers (`MOVED`, `NO_LEADER`, `UNCERTAIN`) and the proposing
//!   of concurrent appends, and of concurrent conversation writes, as one
//!   entry per partition;
//! - `coalesce`: the per-partition queues those entries (and the
//!   deliveries' entries) are taken from, one entry in flight at a time;
//! - `retries`: a `SEND`'s retry check from a kept window of the
//!   conversation's newest records instead of a scan of them;
//! - [`reconcile`]: placement acted on: a new map becomes membership
//!   changes of the groups (new replicas caught up as learners first), and
//!   a node that starts outside the map asks for its share;
//! - `rebalance`: a leader hands a partition to its preferred replica
//!   (the map's first) when that one is alive and caught up;
//! - [`replace`]: a node whose lease has been gone for `replace_after` is
//!   taken out of the map, its replicas moved to live nodes;
//! - `space` and `revive`: a full disk: new writes refused below a reserve
//!   of free space, and groups that stopped on a failed write reopened
//!   once there is room.
//!
//! Not built yet: membership changes across partitions; snapshots as raw segment byte ranges (docs/scaling.md,
//! "Not built yet").

pub(crate) mod coalesce;
pub mod conversations;
pub mod delivery;
pub mod groups;
pub mod hello;
pub mod im;
pub(crate) mod interest;
pub(crate) mod lease;
pub mod log_store;
pub mod marks;
pub mod members;
pub mod meta;
pub mod net;
pub mod node;
pub mod outbox;
pub mod partition;
pub mod raft_state;
pub(crate) mod rebalance;
pub mod reconcile;
pub(crate) mod replace;
pub(crate) mod retries;
pub(crate) mod revive;
pub mod snapshot;
pub(crate) mod space;
pub mod state_machine;

pub use node::{ClusterError, ImOutcome, Node, NodeConfig};

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

    /// One shard, 64 KiB segments, no background maintenance: the tests
    /// call it and see segments dropped.
    pub fn small_segments(dir: &std::path::Path) -> Arc<Engine> {
        let mut cfg = timeline_engine::Config {
            shards: 1,
            background: false,
            max_payload: 4096,
            ..Default::default()
        };
        let mut ks = crate::log_store::keyspaces();
        for k in &mut ks {
            k.segment_bytes = 64 << 10;
        }
        cfg.keyspaces.extend(ks);
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
    /// Appends to timelines of the partition, applied in order as one
    /// entry: what a node coalesces from concurrent clients (at most
    /// [`MAX_BATCH`] items).
    Batch(Vec<BatchItem>),
    /// Create conversation `conv` (its partition's entry): its store
    /// timeline's seq 1, and an outbox record to deliver it to `members`.
    ImCreate {
        conv: u64,
        kind: u8,
        members: Vec<u64>,
        ts: u64,
    },
    /// A message to `conv` (its partition's entry): stored at the next
    /// conv seq with an outbox record, unless (sender, client_msg_id) is
    /// among the conversation's recent messages (then its seq again).
    ImSend {
        conv: u64,
        sender: u64,
        client_msg_id: u64,
        payload: Vec<u8>,
        ts: u64,
    },
    /// Sync entries for users of this partition (from conversations'
    /// partitions), each applied unless the user already has it.
    Deliver(Vec<im::Delivery>),
    /// The outbox is delivered through its record `upto` (its seq), whose
    /// message has write id `wid`.
    Delivered { upto: u64, wid: u64 },
    /// `user` recalls its message `target` of `conv` (its partition's
    /// entry): a recall event stored and delivered like a message.
    ImRecall {
        conv: u64,
        user: u64,
        target: u64,
        ts: u64,
    },
    /// `user`'s read marker or delete-for-me in `conv` (the user's
    /// partition's entry), checked against `last`: the conversation's last
    /// seq, as its partition's leader answered just before (module
    /// [`marks`]).
    ImMark {
        user: u64,
        conv: u64,
        seq: u64,
        mark: Mark,
        last: u64,
        ts: u64,
    },
    /// `user` joins (`add`) or leaves group `conv` (its partition's
    /// entry): the change listed, then its event stored and delivered to
    /// the members at its seq, the user included (module [`members`]). An
    /// add that takes a write-fan-out group past `threshold` members (the
    /// proposing node's hybrid threshold) switches it to read fan-out.
    ImMember {
        conv: u64,
        user: u64,
        add: bool,
        threshold: u64,
        ts: u64,
    },
    /// Conversation writes of the partition, applied in order as one
    /// entry, item `i` with write id (index, `i`) as if each were an entry
    /// of its own: what a node coalesces from concurrent clients.
    ImBatch(Vec<ConvWrite>),
}

/// One conversation write of a [`Command::ImBatch`]: the four commands
/// such a batch holds (as [`Command::ImCreate`], [`Command::ImSend`],
/// [`Command::ImRecall`], [`Command::ImMember`]) and nothing else, so a
/// batch cannot nest (a peer's frame of batches within batches would
/// take the decoder's stack, as deep as it is long).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConvWrite {
    Create {
        conv: u64,
        kind: u8,
        members: Vec<u64>,
        ts: u64,
    },
    Send {
        conv: u64,
        sender: u64,
        client_msg_id: u64,
        payload: Vec<u8>,
        ts: u64,
    },
    Recall {
        conv: u64,
        user: u64,
        target: u64,
        ts: u64,
    },
    Member {
        conv: u64,
        user: u64,
        add: bool,
        threshold: u64,
        ts: u64,
    },
}

impl ConvWrite {
    /// The conversation it is for.
    pub fn conv(&self) -> u64 {
        match self {
            ConvWrite::Create { conv, .. }
            | ConvWrite::Send { conv, .. }
            | ConvWrite::Recall { conv, .. }
            | ConvWrite::Member { conv, .. } => *conv,
        }
    }
}

impl From<ConvWrite> for Command {
    /// The entry of its own the write would be.
    fn from(w: ConvWrite) -> Command {
        match w {
            ConvWrite::Create {
                conv,
                kind,
                members,
                ts,
            } => Command::ImCreate {
                conv,
                kind,
                members,
                ts,
            },
            ConvWrite::Send {
                conv,
                sender,
                client_msg_id,
                payload,
                ts,
            } => Command::ImSend {
                conv,
                sender,
                client_msg_id,
                payload,
                ts,
            },
            ConvWrite::Recall {
                conv,
                user,
                target,
                ts,
            } => Command::ImRecall {
                conv,
                user,
                target,
                ts,
            },
            ConvWrite::Member {
                conv,
                user,
                add,
                threshold,
                ts,
            } => Command::ImMember {
                conv,
                user,
                add,
                threshold,
                ts,
            },
        }
    }
}

/// A user's own mark in a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mark {
    /// Read through a seq: the marker moves forward only, never past the
    /// conversation's last seq.
    Read,
    /// One message deleted for this user only.
    Delete,
}

/// One append of a [`Command::Batch`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchItem {
    pub keyspace: u8,
    pub id: u64,
    pub payload: Vec<u8>,
}

/// What a Raft entry's log record adds to what it carries (the log id,
/// bincode's tags and lengths), with room to spare. Every entry's log
/// record is one engine record, so a client's payload may be at most the
/// engine's `max_payload` less this, and entries that carry many items
/// are cut to fit ([`entry_budget`]).
pub const ENTRY_OVERHEAD: usize = 256;

/// What one item costs in an entry beyond its payload (a batch item's
/// keyspace, id and length; a delivery's ids, time, kind and length).
pub const ITEM_OVERHEAD: usize = 64;

/// The bytes of items one entry may carry on an engine whose records hold
/// `max_payload` bytes.
pub fn entry_budget(max_payload: usize) -> usize {
    max_payload.saturating_sub(ENTRY_OVERHEAD)
}

/// Most appends in one entry: an item's position within its entry is the
/// low 16 bits of its write id (`state_machine`).
pub const MAX_BATCH: usize = 1 << 16;

/// What applying a [`Command`] answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// The SeqId the append got (0 for entries that are not appends; the
    /// first item's for a batch).
    pub seq: u64,
    /// A batch's SeqIds, in item order (empty otherwise).
    #[serde(default)]
    pub seqs: Vec<u64>,
    /// A conversation write: its outbox record's seq (what the delivery
    /// is waited on by), whether it was a retry, or why it was refused.
    #[serde(default)]
    pub im: Option<Result<ImApplied, im::ImRefusal>>,
    /// A [`Command::ImBatch`]'s answers, in item order (`im` of each).
    #[serde(default)]
    pub ims: Vec<Option<Result<ImApplied, im::ImRefusal>>>,
}

/// What a conversation write became.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImApplied {
    pub conv_seq: u64,
    /// The outbox record's seq of this message (0: nothing to deliver, a
    /// message to a read-fan-out group).
    pub outbox: u64,
    pub duplicate: bool,
    /// A message to a read-fan-out group (stored in its partition only).
    #[serde(default)]
    pub group: bool,
    /// A membership change of a read-fan-out group: told to the nodes for
    /// push once stored (its delivery reaches the user it names only).
    #[serde(default)]
    pub announce: bool,
}

openraft::declare_raft_types!(
    /// The cluster's openraft types: u64 node ids, basic nodes (an address).
    pub TypeConfig:
        D = Command,
        R = Applied,
        SnapshotData = crate::snapshot::SnapshotFile,
);
