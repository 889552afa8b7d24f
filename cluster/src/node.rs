//! A cluster node: the Raft groups of the partitions it holds, on one
//! engine, with one peer listener, one connection per peer, one log
//! flusher (a thread per engine shard) and one small tokio runtime (two
//! threads) for all of them.
//!
//! Start-up ([`Node::start`]): connect to etcd, publish this node under a
//! lease, form the map (the first node to see `R` members creates it in a
//! transaction; everyone else reads it), open a group for every partition
//! the map gives this node, and have each partition's first replica
//! initialize its group the first time it ever runs. A background task
//! renews the lease, and another watches the cluster's keys, keeping the
//! peers' addresses and the map up to date; a third acts on the map
//! (`reconcile`).
//!
//! The data path ([`Node::append`], [`Node::linearize`]) takes callbacks,
//! so the server's event loops never wait on the runtime.

use crate::coalesce::Queues;
use crate::log_store::{Flusher, LogStore};
use crate::meta::{Meta, MetaError, NodeRecord};
use crate::net::{self, Groups, Network, PeerAddrs, Transport};
use crate::partition::{partition_of, PartitionId, PartitionMap, PlacementError};
use crate::state_machine::StateMachine;
use crate::{Command, NodeId, TypeConfig};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, LogId, Raft, SnapshotPolicy};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timeline_engine::Engine;
use tokio::runtime::Runtime;

/// How a node joins its cluster.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// The cluster's name: its keys in etcd live under `/timeline/<name>/`.
    pub cluster: String,
    /// etcd endpoints (`host:port`).
    pub etcd: Vec<String>,
    /// Where this node listens for peers (`host:port`; port 0 picks one).
    pub raft_listen: String,
    /// P, used only by the node that creates the map; afterwards the map's
    /// own count rules.
    pub partitions: u32,
    /// R: replicas per partition.
    pub replicas: usize,
    /// A node that has not renewed its lease for this long is gone.
    pub lease_ttl: Duration,
    /// Leader heartbeats (openraft sends one per group and follower).
    pub heartbeat: Duration,
    /// A follower that heard nothing for a random time in this range
    /// starts an election.
    pub election_timeout: (Duration, Duration),
    /// How long start-up waits for `R` members to form the cluster.
    pub formation_timeout: Duration,
    /// Entries applied since the last snapshot that trigger a new one (the
    /// log is purged up to the snapshot, less `keep_in_log`).
    pub snapshot_every: u64,
    pub keep_in_log: u64,
    /// Where snapshot files are made while one is sent or received
    /// (unlinked at once; `None`: the system's temporary directory). The
    /// server uses `<data dir>/raft-snapshots`: a snapshot is as large as
    /// its partition, so it belongs on the data disk, not a RAM `/tmp`.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// How often every group snapshots and purges its log through what
    /// it had applied one period before (so that the log's disk space is
    /// reclaimed for partitions that never reach `snapshot_every`).
    pub log_reclaim_every: Duration,
    /// A node of the map whose lease has been gone this long is replaced:
    /// its replicas move to the live nodes (module `replace`). `None`:
    /// never (an operator runs `timeline-placement remove-node`).
    pub replace_after: Option<Duration>,
    /// How often a leader looks for partitions to hand to their preferred
    /// replica (the map's first; module `rebalance`). `None`: never.
    pub leader_rebalance_every: Option<Duration>,
    /// How often a node registers again the read-fan-out groups it has
    /// subscribers in with their partitions' replicas (module `interest`;
    /// unrenewed for three periods, an interest lapses).
    pub interest_renew: Duration,
    /// The secret nodes prove to each other on every peer connection (the
    /// server gives its `--auth` secret; none: no proof, module `hello`).
    pub peer_secret: crate::hello::PeerSecret,
    /// The data directory whose file system's free space is watched
    /// (module `space`; `None`: not watched). The server gives its
    /// `--data-dir`.
    pub data_dir: Option<std::path::PathBuf>,
    /// New client writes are refused (`STORAGE_FULL`) while fewer bytes
    /// than this are free on `data_dir` (0: never).
    pub min_free_space: u64,
}

/// The default of [`NodeConfig::min_free_space`]: 64 MiB.
pub const DEFAULT_MIN_FREE_SPACE: u64 = 64 << 20;

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            cluster: "timeline".into(),
            etcd: vec!["127.0.0.1:2379".into()],
            raft_listen: "127.0.0.1:0".into(),
            partitions: crate::partition::DEFAULT_PARTITIONS,
            replicas: crate::partition::DEFAULT_REPLICAS,
            lease_ttl: Duration::from_secs(3),
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(500)),
            formation_timeout: Duration::from_secs(60),
            snapshot_every: 20_000,
            keep_in_log: 2_000,
            snapshot_dir: None,
            log_reclaim_every: Duration::from_secs(60),
            replace_after: Some(DEFAULT_REPLACE_AFTER),
            leader_rebalance_every: Some(DEFAULT_LEADER_REBALANCE_EVERY),
            interest_renew: Duration::from_secs(5),
            peer_secret: Default::default(),
            data_dir: None,
            min_free_space: DEFAULT_MIN_FREE_SPACE,
        }
    }
}

/// How long a node's lease may be gone before it is replaced (as
/// CockroachDB's `server.time_until_store_dead`): long enough for a
/// restart or a reboot, short enough that a second failure is unlikely
/// meanwhile.
pub const DEFAULT_REPLACE_AFTER: Duration = Duration::from_secs(300);

/// How often a leader looks for partitions to hand back to their preferred
/// replica (as Kafka's `leader.imbalance.check.interval.seconds`, 300 s
/// there): long enough that a node just back has caught up, short enough
/// that its share of the load returns within a minute.
pub const DEFAULT_LEADER_REBALANCE_EVERY: Duration = Duration::from_secs(30);

/// Most appends one entry carries (a bound on an entry's size and on the
/// replies that wait for it; well under `MAX_BATCH`).
const MAX_ENTRY_ITEMS: usize = 1024;
/// Most conversation writes in one entry: each is applied on its own (a
/// membership read, a retry check, store and outbox records), all under
/// the partition's state lock, so fewer than appends.
const MAX_IM_ITEMS: usize = 128;
/// Most member ids the node's read-path members cache holds (about 8 MB
/// of ids, as each partition's state machine).
const CONV_MEMBERS_CACHE: usize = 1 << 20;

/// Heartbeat rounds a linearizable read tries before `NO_LEADER`.
const LINEARIZE_ATTEMPTS: usize = 3;

/// What a cluster operation answers instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Another node leads the partition (or, if this node holds no replica
    /// of it, may know who does): ask it.
    #[error("MOVED {partition} {addr}")]
    Moved {
        partition: PartitionId,
        addr: String,
        version: u64,
    },
    /// The write reached the group, but this node stopped leading before it
    /// was committed: it may or may not be applied.
    #[error("partition {partition}: leadership changed while the write was pending; it may or may not be applied")]
    Uncertain { partition: PartitionId },
    /// Not a write a partition may take (a keyspace the node's engine does
    /// not have, or one of the cluster's own): refused before it is
    /// proposed, since every replica would fail to apply it.
    #[error("{0}")]
    InvalidArgument(String),
    /// A raw write to a conversation's store timeline, refused when it
    /// was applied (the conversation was created first).
    #[error("{0}")]
    Forbidden(String),
    /// The partition is electing a leader; retry shortly.
    #[error("partition {partition} has no leader at the moment (an election is under way)")]
    NoLeader { partition: PartitionId },
    #[error("raft: {0}")]
    Raft(String),
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    #[error("placement: {0}")]
    Placement(#[from] PlacementError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the cluster did not form: {0}")]
    Formation(String),
    #[error("storage of partition {partition}: {message}")]
    Storage { partition: u32, message: String },
    /// The node's data disk has fewer than `reserve` bytes free: new
    /// writes are refused (module `space`), nothing was done.
    #[error("partition {partition}: this node's disk is full ({free} bytes free, {reserve} kept in reserve); retry later")]
    StorageFull {
        partition: PartitionId,
        free: u64,
        reserve: u64,
    },
}

/// What a conversation write answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImOutcome {
    /// Stored at `conv_seq` and in every member's sync timeline.
    Done { conv_seq: u64, duplicate: bool },
    /// Stored at `conv_seq` (`duplicate`: by an earlier try); its
    /// deliveries are still under way (they go on, and a new leader
    /// re-drives them).
    Pending { conv_seq: u64, duplicate: bool },
    /// Refused: nothing written.
    Refused(crate::im::ImRefusal),
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A client's append waiting to be proposed, and who to tell.
type Waiting = (
    crate::BatchItem,
    Box<dyn FnOnce(Result<u64, ClusterError>) + Send>,
);

/// A conversation write waiting to be proposed, and who to tell.
type ImWaiting = (crate::ConvWrite, ImDone);
type ImDone = Box<dyn FnOnce(Result<ImOutcome, ClusterError>) + Send>;

/// Entries this node proposed as a leader, and of them the conversation
/// writes' entries with the writes they carried.
#[derive(Default)]
struct Proposed {
    entries: AtomicU64,
    conv_entries: AtomicU64,
    conv_writes: AtomicU64,
}

impl ClusterError {
    /// The same answer for another waiter of the entry (the data path's
    /// errors are plain values; others travel as their message).
    pub(crate) fn copy(&self) -> ClusterError {
        match self {
            ClusterError::Moved {
                partition,
                addr,
                version,
            } => ClusterError::Moved {
                partition: *partition,
                addr: addr.clone(),
                version: *version,
            },
            ClusterError::Uncertain { partition } => ClusterError::Uncertain {
                partition: *partition,
            },
            ClusterError::NoLeader { partition } => ClusterError::NoLeader {
                partition: *partition,
            },
            ClusterError::InvalidArgument(m) => ClusterError::InvalidArgument(m.clone()),
            ClusterError::Forbidden(m) => ClusterError::Forbidden(m.clone()),
            ClusterError::StorageFull {
                partition,
                free,
                reserve,
            } => ClusterError::StorageFull {
                partition: *partition,
                free: *free,
                reserve: *reserve,
            },
            other => ClusterError::Raft(other.to_string()),
        }
    }
}

pub(crate) struct Inner {
    pub(crate) id: NodeId,
    /// The keyspaces raw appends may write: the engine's, less the raft ones.
    data_keyspaces: Vec<u8>,
    /// Per partition, the appends waiting for its next entry.
    proposals: Queues<Waiting>,
    /// Per partition, the conversation writes waiting for its next entry.
    im_proposals: Queues<ImWaiting>,
    /// What this node proposed as a leader since start (`STATS`).
    proposed: Proposed,
    /// Leadership handovers to preferred replicas (module `rebalance`),
    /// and how often to look for them (`None`: never).
    pub(crate) handovers: crate::rebalance::Handovers,
    pub(crate) rebalance_every: Option<Duration>,
    /// Conversations' members as this node's engine holds them, for the
    /// read paths (pages, probes, summaries, delivery rounds, `HISTORY`).
    pub(crate) conv_members: Arc<crate::members::MembersCache>,
    pub(crate) groups: Arc<Groups>,
    addrs: Arc<PeerAddrs>,
    /// Every member seen since start (kept after its lease goes: a node
    /// that is down is still a replica, and comes back at the same place).
    pub(crate) members: RwLock<BTreeMap<NodeId, NodeRecord>>,
    pub(crate) map: RwLock<PartitionMap>,
    /// What opens a partition's group on this node.
    factory: GroupFactory,
    /// Placement: woken when a newer map arrives, and what is under way.
    pub(crate) placement: crate::reconcile::Placement,
    /// The outbox deliverers and the `SEND`s waiting on them.
    pub(crate) deliveries: crate::delivery::Deliveries,
    /// Read-fan-out group messages being told to peers.
    pub(crate) group_pushes: std::sync::atomic::AtomicUsize,
    /// Which nodes want which groups' pushes (module `interest`).
    pub(crate) interest: crate::interest::Interest,
    /// Page reads on the blocking pool at once, at most (module
    /// `groups`, `conversations`): more wait here, so that they cannot
    /// take the pool's threads from the storage work that also runs there.
    pub(crate) blocking_reads: tokio::sync::Semaphore,
    /// Live members seen, and gone nodes replaced (module `replace`).
    pub(crate) replace: crate::replace::Counters,
    /// A handle on each open group's log and state machine (its reclaim
    /// renews an idle log's purge record, [`LogStore::renew_purge`], and
    /// an idle outbox's done mark, [`StateMachine::renew_done`]; the votes
    /// and applied states are renewed for every partition,
    /// [`crate::raft_state::Renewal`]).
    pub(crate) storage: parking_lot::Mutex<HashMap<PartitionId, GroupStorage>>,
    /// The data disk's free space, and new writes refused below the
    /// reserve (module `space`).
    pub(crate) space: crate::space::Space,
    /// Groups that stopped on a storage error, until reopened (module
    /// `revive`).
    pub(crate) stopped: crate::revive::Stopped,
}

/// Opens a partition's Raft group on this node's engine.
struct GroupFactory {
    engine: Arc<Engine>,
    /// The push hook every group's state machine calls.
    hook: crate::im::HookSlot,
    snapshot_dir: std::path::PathBuf,
    snapshots: Arc<crate::snapshot::Counters>,
    flusher: Arc<Flusher>,
    transport: Arc<Transport>,
    config: Arc<openraft::Config>,
    /// The leader leases of this node's groups (reads without a round).
    leases: Arc<crate::lease::Leases>,
}

/// A running node. Dropping it stops its groups and tasks.
pub struct Node {
    rt: Option<Runtime>,
    inner: Arc<Inner>,
    flusher: Arc<Flusher>,
    raft_addr: String,
}

impl Node {
    /// Join (or form) the cluster described by `cfg` with `engine`, telling
    /// clients to reach this node at `client_addr`.
    pub fn start(
        engine: Arc<Engine>,
        cfg: NodeConfig,
        client_addr: String,
    ) -> Result<Node, ClusterError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cluster")
            .enable_all()
            .build()?;
        let flusher = Flusher::with_lanes(engine.shard_count())?;
        let (inner, raft_addr) = rt.block_on(boot(engine, &cfg, client_addr, flusher.clone()))?;
        Ok(Node {
            rt: Some(rt),
            inner,
            flusher,
            raft_addr,
        })
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Where peers reach this node.
    pub fn raft_addr(&self) -> &str {
        &self.raft_addr
    }

    /// P and the map's version.
    pub fn shape(&self) -> (u32, u64) {
        let m = self.inner.map.read();
        (m.len(), m.version)
    }

    pub fn partition_of(&self, keyspace: u8, id: u64) -> PartitionId {
        partition_of(keyspace, id, self.inner.map.read().len())
    }

    /// Whether [`Node::append`] takes a payload of `len` bytes for
    /// `keyspace` (`InvalidArgument` if not), before anything is proposed.
    pub fn check_append(&self, keyspace: u8, len: usize) -> Result<(), ClusterError> {
        if !self.inner.data_keyspaces.contains(&keyspace) {
            return Err(ClusterError::InvalidArgument(format!(
                "keyspace {keyspace} is not a data keyspace of this cluster (it has {:?})",
                self.inner.data_keyspaces
            )));
        }
        let max = crate::entry_budget(self.inner.engine().config().max_payload);
        if len + crate::ITEM_OVERHEAD > max {
            return Err(ClusterError::InvalidArgument(format!(
                "a payload of {len} bytes; a cluster node's entries carry at most {}",
                max.saturating_sub(crate::ITEM_OVERHEAD)
            )));
        }
        Ok(())
    }

    /// `Ok` if this node leads the partition of timeline (`keyspace`,
    /// `id`) now; else the `MOVED` or `NO_LEADER` a client gets (nothing
    /// done). Leadership can still be lost before a later proposal.
    pub fn check_leads(&self, keyspace: u8, id: u64) -> Result<(), ClusterError> {
        self.inner
            .check_leads(self.partition_of(keyspace, id))
            .map(|_| ())
    }

    /// Append through the partition's Raft group; `done` gets the SeqId once
    /// a quorum has the entry in its log and this node has applied it.
    pub fn append(
        &self,
        keyspace: u8,
        id: u64,
        payload: Vec<u8>,
        done: impl FnOnce(Result<u64, ClusterError>) + Send + 'static,
    ) {
        if let Err(e) = self.check_append(keyspace, payload.len()) {
            return done(Err(e));
        }
        let p = self.partition_of(keyspace, id);
        if let Err(e) = self.inner.admit(p) {
            return done(Err(e));
        }
        let item = crate::BatchItem {
            keyspace,
            id,
            payload,
        };
        match self.inner.proposals.push(p, (item, Box::new(done))) {
            Ok(false) => {}
            Ok(true) => {
                let inner = self.inner.clone();
                self.spawn(async move { inner.propose(p).await });
            }
            Err((_, done)) => done(Err(ClusterError::Raft(format!("no partition {p}")))),
        }
    }

    /// Create conversation `conv` in its partition; `done` once it is
    /// delivered to every member's sync timeline (or `Pending` after
    /// [`crate::delivery::FANOUT_WAIT`]: delivery goes on).
    pub fn im_create(
        &self,
        conv: u64,
        kind: u8,
        members: Vec<u64>,
        done: impl FnOnce(Result<ImOutcome, ClusterError>) + Send + 'static,
    ) {
        let cmd = crate::ConvWrite::Create {
            conv,
            kind,
            members,
            ts: now_ms(),
        };
        self.im_write(conv, cmd, done);
    }

    /// A message to `conv` (store, then every member's sync timeline): as
    /// [`Node::im_create`]; a retry with the same (sender, client_msg_id)
    /// answers the first one's seq, `duplicate`.
    pub fn im_send(
        &self,
        conv: u64,
        sender: u64,
        client_msg_id: u64,
        payload: Vec<u8>,
        done: impl FnOnce(Result<ImOutcome, ClusterError>) + Send + 'static,
    ) {
        let cmd = crate::ConvWrite::Send {
            conv,
            sender,
            client_msg_id,
            payload,
            ts: now_ms(),
        };
        self.im_write(conv, cmd, done);
    }

    /// `user` recalls its message `target` of `conv`: as
    /// [`Node::im_send`] (module [`crate::marks`]); `done` gets the recall
    /// event's seq.
    pub fn im_recall(
        &self,
        conv: u64,
        user: u64,
        target: u64,
        done: impl FnOnce(Result<ImOutcome, ClusterError>) + Send + 'static,
    ) {
        let cmd = crate::ConvWrite::Recall {
            conv,
            user,
            target,
            ts: now_ms(),
        };
        self.im_write(conv, cmd, done);
    }

    /// `user` joins (`add`) or leaves group `conv`: as [`Node::im_send`]
    /// (module [`crate::members`]; an add past `threshold` members switches
    /// a write-fan-out group to read fan-out); `done` gets the
    /// `MemberAdded` or `MemberRemoved` event's seq.
    pub fn im_member(
        &self,
        conv: u64,
        user: u64,
        add: bool,
        threshold: u64,
        done: impl FnOnce(Result<ImOutcome, ClusterError>) + Send + 'static,
    ) {
        let cmd = crate::ConvWrite::Member {
            conv,
            user,
            add,
            threshold,
            ts: now_ms(),
        };
        self.im_write(conv, cmd, done);
    }

    /// `user`'s read marker or delete-for-me in `conv`, through the user's
    /// partition (module [`crate::marks`]); `done` gets the read marker
    /// now, or the `DeletedMarker`'s seq in the user's sync timeline.
    pub fn im_mark(
        &self,
        user: u64,
        conv: u64,
        seq: u64,
        mark: crate::Mark,
        done: impl FnOnce(Result<ImOutcome, ClusterError>) + Send + 'static,
    ) {
        let p = self.partition_of(timeline_engine::Keyspace::SYNC.0, user);
        if let Err(e) = self.inner.admit(p) {
            return done(Err(e));
        }
        let inner = self.inner.clone();
        self.spawn(async move {
            done(crate::marks::mark(inner, user, conv, seq, mark).await);
        });
    }

    /// The seqs of `conv` that `user` deleted for itself, from the leader
    /// of the user's partition (here, or asked over the peer link), once
    /// it confirmed its leadership (module [`crate::marks`]).
    pub fn user_deletes(
        &self,
        user: u64,
        conv: u64,
        done: impl FnOnce(Result<Vec<u64>, ClusterError>) + Send + 'static,
    ) {
        let inner = self.inner.clone();
        self.spawn(async move {
            done(crate::marks::deletes(&inner, user, conv).await);
        });
    }

    /// `user`'s conversations (module [`crate::conversations`]), once this
    /// node confirmed it leads the user's partition (else `MOVED` or
    /// `NO_LEADER` for it).
    pub fn conversations(
        &self,
        user: u64,
        done: impl FnOnce(Result<Vec<crate::conversations::ConvLine>, ClusterError>) + Send + 'static,
    ) {
        let inner = self.inner.clone();
        self.spawn(async move {
            let r = match inner
                .linearize(timeline_engine::Keyspace::SYNC.0, user)
                .await
            {
                Ok(()) => crate::conversations::list(inner, user).await,
                Err(e) => Err(e),
            };
            done(r);
        });
    }

    fn im_write(
        &self,
        conv: u64,
        cmd: crate::ConvWrite,
        done: impl FnOnce(Result<ImOutcome, ClusterError>) + Send + 'static,
    ) {
        let p = self.partition_of(timeline_engine::Keyspace::STORE.0, conv);
        if let Err(e) = self.inner.admit(p) {
            return done(Err(e));
        }
        match self.inner.im_proposals.push(p, (cmd, Box::new(done))) {
            Ok(false) => {}
            Ok(true) => {
                let inner = self.inner.clone();
                self.spawn(im_propose(inner, p));
            }
            Err((_, done)) => done(Err(ClusterError::Raft(format!("no partition {p}")))),
        }
    }

    /// The read-fan-out groups `user` was ever in, each with whether it is
    /// in it now, from this node's replica of the user's partition
    /// (current after [`Node::linearize`] on the user's sync timeline;
    /// empty on a node holding no replica of it).
    pub fn read_groups(&self, user: u64) -> Result<Vec<(u64, bool)>, crate::im::read::ReadError> {
        crate::groups::groups_of(&self.inner, user)
    }

    /// Pages of read-fan-out groups from their partitions' leaders, in
    /// order, sharing `budget` events: `done` gets the pages that have
    /// events and whether any group has more than was read.
    pub fn group_pages(
        &self,
        reqs: Vec<crate::groups::GroupRead>,
        budget: usize,
        done: impl FnOnce(Result<(Vec<crate::groups::GroupPage>, bool), ClusterError>) + Send + 'static,
    ) {
        let inner = self.inner.clone();
        self.spawn(async move {
            done(crate::groups::pages(inner, reqs, budget).await);
        });
    }

    /// Register this node's interest in read-fan-out groups `convs` with
    /// their partitions' replicas (module `interest`: a group a subscriber
    /// here is the first to need); `done` runs once each replica answered
    /// or after `interest::REGISTER_WAIT`.
    pub fn watch_groups(&self, convs: Vec<u64>, done: impl FnOnce() + Send + 'static) {
        let inner = self.inner.clone();
        self.spawn(async move {
            crate::interest::register(&inner, convs).await;
            done();
        });
    }

    /// Group pushes (module `interest`): peer calls telling a node of a
    /// group message and messages told to every node, since start; groups
    /// this node registered at its last renewal.
    pub fn group_interest(&self) -> (u64, u64, u64) {
        let c = &self.inner.interest.counters;
        (
            c.sent.load(Ordering::Relaxed),
            c.broadcast.load(Ordering::Relaxed),
            c.watched.load(Ordering::Relaxed),
        )
    }

    /// Have `hook` told of every sync entry applied on this node from now
    /// on (once; later calls are ignored).
    pub fn set_delivery_hook(&self, hook: Arc<dyn crate::im::DeliveryHook>) {
        let _ = self.inner.factory.hook.set(hook);
    }

    /// This node's engine (the server reads conversations and sync
    /// timelines from it after [`Node::linearize`]).
    pub fn engine(&self) -> &Arc<Engine> {
        self.inner.engine()
    }

    /// Confirm this node still leads the timeline's partition (a heartbeat
    /// round to a quorum), so that a read done after `done(Ok(()))` sees
    /// every append acknowledged before the call.
    pub fn linearize(
        &self,
        keyspace: u8,
        id: u64,
        done: impl FnOnce(Result<(), ClusterError>) + Send + 'static,
    ) {
        let inner = self.inner.clone();
        self.spawn(async move {
            done(inner.linearize(keyspace, id).await);
        });
    }

    /// The map version, P, and each partition's leader's client address
    /// as far as this node knows (a partition it does not hold is given
    /// with its first replica: a hint the client checks by asking).
    pub fn leaders(&self) -> (u64, u32, Vec<(PartitionId, String)>) {
        let map = self.inner.map.read().clone();
        let out = (0..map.len())
            // A partition whose group here stopped is left out, as in an
            // election (module `revive`).
            .filter(|&p| !self.inner.stopped.contains(p))
            .filter_map(|p| self.inner.leader_of(p, &map).map(|(_, addr)| (p, addr)))
            .collect();
        (map.version, map.len(), out)
    }

    /// Snapshots this node's groups sent (files made, bytes) and installed.
    pub fn snapshots(&self) -> (u64, u64, u64) {
        let c = &self.inner.factory.snapshots;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (g(&c.sent), g(&c.bytes_sent), g(&c.installed))
    }

    /// Conversations' members as this node's engine holds them
    /// ([`crate::members::MembersCache::get`] with [`Node::engine`]: a
    /// conversation's are current once [`Node::linearize`] confirmed the
    /// leadership of its partition).
    pub fn conv_members(&self) -> Arc<crate::members::MembersCache> {
        self.inner.conv_members.clone()
    }

    /// Leadership handovers to a preferred replica since start: done, and
    /// not done (module `rebalance`).
    pub fn handovers(&self) -> (u64, u64) {
        let h = &self.inner.handovers;
        (
            h.done.load(Ordering::Relaxed),
            h.failed.load(Ordering::Relaxed),
        )
    }

    /// This build's fingerprint, and the peer connections refused since
    /// start for another build (module `net`, "the hello").
    pub fn peer_builds(&self) -> (u64, u64) {
        (net::build(), self.inner.factory.transport.refusals.count())
    }

    /// Partitions this node handed to another voter because its own disk
    /// was below the reserve, since start (module `rebalance`).
    pub fn leaders_shed(&self) -> u64 {
        self.inner.handovers.shed.load(Ordering::Relaxed)
    }

    /// The data disk as writes see it (module `space`): bytes free as last
    /// read (`None`: not known), the reserve, and the writes refused for
    /// want of it since start.
    pub fn space(&self) -> (Option<u64>, u64, u64) {
        self.inner.space.counters()
    }

    /// Groups stopped on a storage error now, and since start stopped and
    /// reopened (module `revive`).
    pub fn stopped_groups(&self) -> (u64, u64, u64) {
        self.inner.stopped.counters()
    }

    /// Entries this node proposed as a leader since start (every kind),
    /// and of them the conversation writes' entries and the writes they
    /// carried (several concurrent writes to a partition share one).
    pub fn proposed(&self) -> (u64, u64, u64) {
        let c = &self.inner.proposed;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (g(&c.entries), g(&c.conv_entries), g(&c.conv_writes))
    }

    /// Linearizable reads confirmed by a leader lease, and by a heartbeat
    /// round (`crate::lease`), since start.
    pub fn reads(&self) -> (u64, u64) {
        let l = &self.inner.factory.leases;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (g(&l.by_lease), g(&l.by_round))
    }

    /// Members whose lease was alive at the last read (once a second), gone
    /// nodes this node replaced since start, and times this node, replaced
    /// while it ran cut off, added itself back.
    pub fn liveness(&self) -> (u64, u64, u64) {
        let r = &self.inner.replace;
        let live = r.live.read().len() as u64;
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        (live, count(&r.replaced), count(&r.rejoined))
    }

    /// Groups run, led, and led with a membership change still to make.
    pub fn placement(&self) -> crate::reconcile::PlacementStatus {
        crate::reconcile::status(&self.inner)
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.rt {
            rt.spawn(f);
        }
    }

    /// Stop every group (each finishes what it is doing), then the tasks.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Dropped on a runtime thread (the last reference to the
                // server went with a callback of this node's): nothing may
                // block here. What was acknowledged is on disk already.
                self.inner.groups.write().clear();
                rt.shutdown_background();
                return;
            }
            let groups: Vec<Raft<TypeConfig>> =
                self.inner.groups.read().values().cloned().collect();
            rt.block_on(async {
                for g in groups {
                    let _ = g.shutdown().await;
                }
            });
            self.inner.groups.write().clear();
            rt.shutdown_timeout(Duration::from_secs(2));
            self.flusher.stop();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    pub(crate) fn group(&self, p: PartitionId) -> Option<Raft<TypeConfig>> {
        self.groups.read().get(&p).cloned()
    }

    /// The leader group `g` knows of. A leader that stepped down (removed
    /// from the group by a placement change) still holds its own vote, so
    /// openraft's `current_leader` names it until an election: it is not
    /// taken for the leader unless it is one.
    fn known_leader(&self, g: &Raft<TypeConfig>) -> Option<NodeId> {
        let m = g.metrics().borrow().clone();
        match m.current_leader {
            Some(l) if l == self.id && m.state != openraft::ServerState::Leader => None,
            l => l,
        }
    }

    /// Who leads `p`, by this node's knowledge: (node, client address).
    fn leader_of(&self, p: PartitionId, map: &PartitionMap) -> Option<(NodeId, String)> {
        let node = match self.group(p) {
            Some(g) => self.known_leader(&g)?,
            None => self.replica_hint(p, map)?,
        };
        let addr = self.members.read().get(&node)?.client.clone();
        Some((node, addr))
    }

    /// For a partition this node holds no replica of: a replica of the map
    /// to send its clients to (it leads, or knows who does). The first
    /// whose lease is alive, else the first with a known address (a node
    /// placed there may never have registered). Never this node: placed
    /// here but not opened yet, it would send a client back to itself.
    fn replica_hint(&self, p: PartitionId, map: &PartitionMap) -> Option<NodeId> {
        let replicas = map.partitions.get(p as usize)?;
        let members = self.members.read();
        let live = self.replace.live.read();
        let known = |n: &&NodeId| **n != self.id && members.contains_key(n);
        replicas
            .iter()
            .filter(known)
            .find(|n| live.contains(n))
            .or_else(|| replicas.iter().find(known))
            .copied()
    }

    /// The answer for a partition this node does not lead.
    fn redirect(&self, p: PartitionId, leader: Option<NodeId>) -> ClusterError {
        let map = self.map.read();
        let node = leader.or_else(|| {
            if self.group(p).is_some() {
                None // a replica without a leader: an election is on
            } else {
                self.replica_hint(p, &map)
            }
        });
        match node.and_then(|n| self.members.read().get(&n).map(|r| r.client.clone())) {
            Some(addr) => ClusterError::Moved {
                partition: p,
                addr,
                version: map.version,
            },
            None => ClusterError::NoLeader { partition: p },
        }
    }

    /// Propose partition `p`'s waiting appends, one entry at a time, until
    /// none are left.
    async fn propose(&self, p: PartitionId) {
        let _draining = self.proposals.draining(p);
        // As many as fit one log record (at least one: a payload alone
        // always fits, `Node::append` saw to it).
        let budget = crate::entry_budget(self.engine().config().max_payload);
        loop {
            let mut used = 0;
            let Some(batch) = self.proposals.take(p, MAX_ENTRY_ITEMS, |(it, _)| {
                used += it.payload.len() + crate::ITEM_OVERHEAD;
                used <= budget
            }) else {
                return;
            };
            let (items, dones): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let kept: Vec<(u8, u64)> = items.iter().map(|it| (it.keyspace, it.id)).collect();
            match self.write(p, items).await {
                Ok(seqs) => {
                    for ((done, it), seq) in dones.into_iter().zip(&kept).zip(seqs) {
                        // 0: nothing written (`StateMachine::a_conversation`).
                        done(match seq {
                            0 => Err(ClusterError::Forbidden(format!(
                                "timeline {}:{} is conversation {}'s store timeline (raw writes go to other ids or keyspaces)",
                                it.0, it.1, it.1
                            ))),
                            seq => Ok(seq),
                        });
                    }
                }
                Err(e) => {
                    for done in dones {
                        done(Err(e.copy()));
                    }
                }
            }
        }
    }

    /// One entry of appends through `p`'s group; their SeqIds.
    async fn write(
        &self,
        p: PartitionId,
        items: Vec<crate::BatchItem>,
    ) -> Result<Vec<u64>, ClusterError> {
        let n = items.len();
        let r = self.submit(p, Command::Batch(items)).await?;
        if r.seqs.len() == n {
            Ok(r.seqs)
        } else {
            Err(ClusterError::Raft(format!(
                "a batch of {n} applied as {} appends",
                r.seqs.len()
            )))
        }
    }

    /// One entry through `p`'s group, if this node leads it; what applying
    /// it answered.
    pub(crate) async fn submit(
        &self,
        p: PartitionId,
        cmd: Command,
    ) -> Result<crate::Applied, ClusterError> {
        // Not the leader by its own account: nothing is proposed, so the
        // client may go elsewhere. Past this point a failure is uncertain.
        let g = self.check_leads(p)?;
        self.proposed.entries.fetch_add(1, Ordering::Relaxed);
        let Some(r) = while_leading(&g, g.client_write(cmd)).await else {
            return Err(ClusterError::Uncertain { partition: p });
        };
        match r {
            Ok(r) => Ok(r.data),
            // Leadership lost, or the group shut down (a placement change
            // took the replica away) or stopped (a failed write: module
            // `revive`), with the entry possibly proposed.
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))
            | Err(RaftError::Fatal(_)) => Err(ClusterError::Uncertain { partition: p }),
            Err(e) => Err(ClusterError::Raft(e.to_string())),
        }
    }

    /// Whether a new client write to `p` may be taken here: while the disk
    /// is below its reserve (module `space`), `STORAGE_FULL` if this node
    /// leads `p`, else the redirect a write would get anyway (the leader
    /// elsewhere may have room).
    pub(crate) fn admit(&self, p: PartitionId) -> Result<(), ClusterError> {
        if !self.space.low() {
            return Ok(());
        }
        self.check_leads(p)?;
        self.space.admit(p)
    }

    /// The answer for `p` when this node runs no group of it: `NO_LEADER`
    /// while its group here is stopped by a failed write (module
    /// `revive`), else where it may be led. Asked after the lookup: a
    /// group is in the stopped set before it leaves the groups (both
    /// under the groups' lock), so a lookup that missed it sees the stop.
    fn redirect_missing(&self, p: PartitionId) -> ClusterError {
        if self.stopped.contains(p) {
            return ClusterError::NoLeader { partition: p };
        }
        self.redirect(p, None)
    }

    /// `p`'s group if this node leads it by its own account; else the
    /// redirect to give (`MOVED`, or `NO_LEADER` in an election).
    pub(crate) fn check_leads(&self, p: PartitionId) -> Result<Raft<TypeConfig>, ClusterError> {
        let Some(g) = self.group(p) else {
            return Err(self.redirect_missing(p));
        };
        if self.handovers.handing(p) {
            // Stepping aside for the preferred replica: ask again shortly.
            return Err(ClusterError::NoLeader { partition: p });
        }
        let leader = self.known_leader(&g);
        if leader != Some(self.id) {
            return Err(self.redirect(p, leader));
        }
        Ok(g)
    }

    /// Whether this node leads `p` now.
    pub(crate) fn leads(&self, p: PartitionId) -> bool {
        self.group(p)
            .is_some_and(|g| g.metrics().borrow().state == openraft::ServerState::Leader)
    }

    /// The node that leads `p` as far as this one knows (its own group's
    /// view, else the map's first replica).
    pub(crate) fn leader_hint(&self, p: PartitionId) -> Option<NodeId> {
        match self.group(p) {
            Some(g) => self.known_leader(&g),
            None => self.replica_hint(p, &self.map.read()),
        }
    }

    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.factory.engine
    }

    /// The node's leader leases (and its followers' last-heard instants).
    pub(crate) fn leases(&self) -> Arc<crate::lease::Leases> {
        self.factory.leases.clone()
    }

    /// openraft's `election_timeout_max`: also how long a follower keeps
    /// refusing votes after it last heard from its leader (its lease).
    pub(crate) fn election_timeout_max(&self) -> Duration {
        Duration::from_millis(self.factory.config.election_timeout_max)
    }

    pub(crate) fn transport(&self) -> &Arc<Transport> {
        &self.factory.transport
    }

    /// The push hook, once the server set it.
    pub(crate) fn hook(&self) -> Option<&Arc<dyn crate::im::DeliveryHook>> {
        self.factory.hook.get()
    }

    pub(crate) async fn linearize(&self, keyspace: u8, id: u64) -> Result<(), ClusterError> {
        let p = partition_of(keyspace, id, self.map.read().len());
        let Some(g) = self.group(p) else {
            return Err(self.redirect_missing(p));
        };
        if self.handovers.handing(p) {
            // No read either: a heartbeat round would renew the followers'
            // lease of this leader and hold up the preferred replica.
            return Err(ClusterError::NoLeader { partition: p });
        }
        let leases = &self.factory.leases;
        let held = leases.holds(p, self.id, &g.metrics().borrow(), Instant::now());
        leases.count(held);
        if held {
            return Ok(());
        }
        // A quorum that does not answer one heartbeat round in time (a busy
        // peer: openraft's deadline is one heartbeat interval) is asked
        // again, a bounded number of times, before the read is refused.
        for _ in 0..LINEARIZE_ATTEMPTS - 1 {
            match g.ensure_linearizable().await {
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => continue,
                r => return self.linearized(p, r),
            }
        }
        let r = g.ensure_linearizable().await;
        self.linearized(p, r)
    }

    fn linearized<T>(
        &self,
        p: PartitionId,
        r: Result<T, RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>>,
    ) -> Result<(), ClusterError> {
        match r {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(self.redirect(p, f.leader_id.filter(|&l| l != self.id)))
            }
            // Or the group here stopped (a failed write: module `revive`):
            // nothing was read, ask again.
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))
            | Err(RaftError::Fatal(_)) => Err(ClusterError::NoLeader { partition: p }),
        }
    }

    /// Open partition `p`'s group on this node (its log, its state machine)
    /// and add it to the groups served; it has whatever state its storage
    /// holds (none for a replica this node just took: the leader fills it).
    /// Refused if the node serves a group of `p` already, or if `p`'s group
    /// stopped on a storage error and this is not `revive` reopening it
    /// (`reopening`): two instances would write the same log and timelines.
    pub(crate) async fn open_group(
        &self,
        p: PartitionId,
        reopening: bool,
    ) -> Result<Raft<TypeConfig>, ClusterError> {
        let refused = |why: &str| ClusterError::Raft(format!("partition {p}: {why}"));
        {
            let groups = self.groups.read();
            if groups.contains_key(&p) {
                return Err(refused("its group is open here already"));
            }
            if self.stopped.contains(p) != reopening {
                return Err(refused(
                    "its stopped group is reopened by the supervisor only",
                ));
            }
        }
        let f = &self.factory;
        let (ls, sm) = open_storage(&f.engine, &f.flusher, p)?;
        let alive = crate::revive::Instance::of(&ls, &sm);
        let sm = sm
            .with_hook(f.hook.clone())
            .with_snapshot_dir(f.snapshot_dir.clone())
            .with_counters(f.snapshots.clone());
        let net = Network {
            transport: f.transport.clone(),
            partition: p,
            leases: f.leases.clone(),
        };
        let storage = GroupStorage {
            log: ls.clone(),
            sm: sm.clone(),
        };
        let raft = Raft::new(self.id, f.config.clone(), net, ls, sm)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let taken = {
            let mut groups = self.groups.write();
            let taken = groups.contains_key(&p);
            if !taken {
                self.stopped.opened(p, alive);
                self.interest.opened(p);
                self.storage.lock().insert(p, storage);
                groups.insert(p, raft.clone());
            }
            taken
        };
        if taken {
            let _ = raft.shutdown().await;
            return Err(refused("another instance was opened meanwhile"));
        }
        Ok(raft)
    }

    /// Take in what etcd says now: members (addresses) and the map.
    async fn refresh(&self, meta: &Meta) -> Result<(), MetaError> {
        let nodes = meta.nodes().await?;
        {
            let mut addrs = self.addrs.write();
            let mut members = self.members.write();
            for (id, rec) in nodes {
                addrs.insert(id, rec.raft.clone());
                members.insert(id, rec);
            }
        }
        if let Some(m) = meta.map().await? {
            let mut cur = self.map.write();
            if m.version > cur.version {
                tracing::info!(from = cur.version, to = m.version, "a new partition map");
                *cur = m;
                self.placement.changed.notify_one();
            }
        }
        Ok(())
    }
}

/// An open group's log and state machine, as the node keeps them besides
/// its Raft handle.
#[derive(Clone)]
pub(crate) struct GroupStorage {
    pub(crate) log: LogStore,
    pub(crate) sm: StateMachine,
}

/// Partition `p`'s log and state machine on this node, as its group opens
/// them. A replica this node gave up (its log retired) and now takes again
/// starts as a new replica would: its old membership is forgotten
/// ([`StateMachine::forget_membership`]), so it is a learner until the
/// leader's entries or snapshot say otherwise.
pub fn open_storage(
    engine: &Arc<Engine>,
    flusher: &Arc<Flusher>,
    p: PartitionId,
) -> Result<(LogStore, StateMachine), ClusterError> {
    let storage = |e: openraft::StorageError<NodeId>| ClusterError::Storage {
        partition: p,
        message: e.to_string(),
    };
    let ls = LogStore::open(engine.clone(), flusher.clone(), u64::from(p)).map_err(storage)?;
    let sm = StateMachine::open(engine.clone(), u64::from(p)).map_err(storage)?;
    if ls.was_retired() {
        sm.forget_membership().map_err(storage)?;
        tracing::info!(
            partition = p,
            "a replica given up before is taken again: it starts as a learner"
        );
    }
    Ok((ls, sm))
}

/// The newest membership config partition `p`'s log on this node knows
/// (its applied state's, or a later one among its unpurged entries): the
/// log id of its entry.
async fn newest_config(
    engine: &Arc<Engine>,
    flusher: &Arc<Flusher>,
    p: PartitionId,
) -> Result<Option<LogId<NodeId>>, ClusterError> {
    use openraft::storage::RaftStateMachine;
    use openraft::{EntryPayload, RaftLogReader};
    let storage = |e: openraft::StorageError<NodeId>| ClusterError::Storage {
        partition: p,
        message: e.to_string(),
    };
    let (mut ls, mut sm) = open_storage(engine, flusher, p)?;
    let (_, applied) = sm.applied_state().await.map_err(storage)?;
    let entries = ls.try_get_log_entries(..).await.map_err(storage)?;
    let in_log = entries
        .iter()
        .rev()
        .find(|e| matches!(e.payload, EntryPayload::Membership(_)))
        .map(|e| e.log_id);
    Ok((*applied.log_id()).max(in_log))
}

/// `fut` (a write or a membership change proposed through `g`), unless
/// `g` stops leading under the vote it has now (or shuts down) first:
/// then `None`, and what was proposed may or may not be committed.
/// openraft 0.9 answers a pending write when its entry is applied or
/// truncated, but not when a snapshot from the next leader covers it (a
/// deposed leader whose log the new one had purged past): that write
/// would wait forever.
pub(crate) async fn while_leading<F: std::future::Future>(
    g: &Raft<TypeConfig>,
    fut: F,
) -> Option<F::Output> {
    let mut server = g.server_metrics();
    let vote = server.borrow_and_update().vote;
    let lost = async move {
        loop {
            {
                let m = server.borrow_and_update();
                if m.state != openraft::ServerState::Leader || m.vote != vote {
                    return;
                }
            }
            if server.changed().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        biased;
        r = fut => Some(r),
        () = lost => None,
    }
}

/// Propose partition `p`'s waiting conversation writes, one entry at a
/// time (a lone write as itself, several as one [`Command::ImBatch`]),
/// until none are left; then answer each as [`im_written`].
async fn im_propose(inner: Arc<Inner>, p: PartitionId) {
    let _draining = inner.im_proposals.draining(p);
    let budget = crate::entry_budget(inner.engine().config().max_payload);
    loop {
        let mut used = 0usize;
        let Some(batch) = inner.im_proposals.take(p, MAX_IM_ITEMS, |(c, _)| {
            used = used.saturating_add(entry_size(c) + crate::ITEM_OVERHEAD);
            used <= budget
        }) else {
            return;
        };
        let (mut cmds, dones): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        if let Err(e) = inner.check_leads(p) {
            // Not led here: nothing proposed, nothing counted.
            for done in dones {
                done(Err(e.copy()));
            }
            continue;
        }
        let count = &inner.proposed;
        count.conv_entries.fetch_add(1, Ordering::Relaxed);
        count
            .conv_writes
            .fetch_add(cmds.len() as u64, Ordering::Relaxed);
        let convs: Vec<u64> = cmds.iter().map(|c| c.conv()).collect();
        let n = cmds.len();
        let r = match cmds.pop() {
            Some(cmd) if n == 1 => inner
                .submit(p, Command::from(cmd))
                .await
                .map(|a| vec![a.im]),
            Some(last) => {
                cmds.push(last);
                inner
                    .submit(p, Command::ImBatch(cmds))
                    .await
                    .and_then(|a| match a.ims.len() == n {
                        true => Ok(a.ims),
                        false => Err(ClusterError::Raft(format!(
                            "{n} conversation writes applied as {}",
                            a.ims.len()
                        ))),
                    })
            }
            None => continue,
        };
        match r {
            Ok(ims) => {
                for ((done, conv), im) in dones.into_iter().zip(convs).zip(ims) {
                    im_written(&inner, p, conv, im, done);
                }
            }
            Err(e) => {
                for done in dones {
                    done(Err(e.copy()));
                }
            }
        }
    }
}

/// A conversation write of `conv` (partition `p`) applied as `im`: its
/// answer now (a refusal, a read-fan-out group's message), or once it is
/// delivered to every member's partition (`Pending` after
/// [`crate::delivery::FANOUT_WAIT`]: delivery goes on).
fn im_written(
    inner: &Arc<Inner>,
    p: PartitionId,
    conv: u64,
    im: Option<Result<crate::ImApplied, crate::im::ImRefusal>>,
    done: ImDone,
) {
    match im {
        None => done(Err(ClusterError::Raft("the entry answered nothing".into()))),
        Some(Err(r)) => done(Ok(ImOutcome::Refused(r))),
        Some(Ok(ia)) if ia.group => {
            // A read-fan-out group's message: stored is done.
            if !ia.duplicate {
                crate::groups::announce(inner, conv, ia.conv_seq);
            }
            done(Ok(ImOutcome::Done {
                conv_seq: ia.conv_seq,
                duplicate: ia.duplicate,
            }))
        }
        Some(Ok(ia)) => {
            // A read-fan-out group's membership change: its members read
            // it in their pages; those subscribed are told at once (a
            // removed user is forgotten for push before the group's next
            // messages are told).
            if ia.announce {
                crate::groups::announce(inner, conv, ia.conv_seq);
            }
            crate::delivery::kick(inner, p);
            let wait = crate::delivery::FANOUT_WAIT;
            crate::delivery::wait(inner, p, ia.outbox, wait, move |delivered| {
                done(Ok(if delivered {
                    ImOutcome::Done {
                        conv_seq: ia.conv_seq,
                        duplicate: ia.duplicate,
                    }
                } else {
                    ImOutcome::Pending {
                        conv_seq: ia.conv_seq,
                        duplicate: ia.duplicate,
                    }
                }))
            });
        }
    }
}

/// The bytes `c` takes in a log record (bincode, as the log writes it).
fn entry_size(c: &crate::ConvWrite) -> usize {
    bincode::serialized_size(c).map_or(usize::MAX, |n| n as usize)
}

fn raft_config(cfg: &NodeConfig) -> Result<Arc<openraft::Config>, ClusterError> {
    let c = openraft::Config {
        cluster_name: cfg.cluster.clone(),
        heartbeat_interval: cfg.heartbeat.as_millis() as u64,
        election_timeout_min: cfg.election_timeout.0.as_millis() as u64,
        election_timeout_max: cfg.election_timeout.1.as_millis() as u64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
        max_in_snapshot_log_to_keep: cfg.keep_in_log,
        ..Default::default()
    };
    Ok(Arc::new(
        c.validate()
            .map_err(|e| ClusterError::Raft(e.to_string()))?,
    ))
}

async fn boot(
    engine: Arc<Engine>,
    cfg: &NodeConfig,
    client_addr: String,
    flusher: Arc<Flusher>,
) -> Result<(Arc<Inner>, String), ClusterError> {
    let started = Instant::now();
    // One deadline for every etcd wait of the start-up.
    let deadline = started + cfg.formation_timeout;
    let meta = connect_meta(cfg, deadline).await?;
    let listener = tokio::net::TcpListener::bind(&cfg.raft_listen).await?;
    let raft_addr = listener.local_addr()?.to_string();
    let me = NodeRecord {
        id: cfg.id,
        client: client_addr,
        raft: raft_addr.clone(),
    };
    let lease = until_reached(deadline, || meta.register(&me, cfg.lease_ttl)).await?;
    let map = form(&meta, cfg, deadline).await?;
    let data_keyspaces = engine
        .keyspaces()
        .map(|(k, _)| k.0)
        .filter(|&k| !crate::log_store::is_own(k))
        .collect();
    let addrs: Arc<PeerAddrs> = Arc::new(RwLock::new(BTreeMap::new()));
    let inner = Arc::new(Inner {
        id: cfg.id,
        data_keyspaces,
        proposals: Queues::new(map.len()),
        im_proposals: Queues::new(map.len()),
        proposed: Default::default(),
        handovers: Default::default(),
        rebalance_every: cfg.leader_rebalance_every,
        conv_members: Arc::new(crate::members::MembersCache::new(CONV_MEMBERS_CACHE)),
        groups: Arc::new(RwLock::new(HashMap::new())),
        storage: Default::default(),
        addrs: addrs.clone(),
        members: RwLock::new(BTreeMap::new()),
        map: RwLock::new(map.clone()),
        factory: GroupFactory {
            engine,
            hook: Default::default(),
            snapshot_dir: cfg.snapshot_dir.clone().unwrap_or_else(std::env::temp_dir),
            snapshots: Default::default(),
            flusher,
            transport: Transport::new(addrs, cfg.peer_secret.clone()),
            config: raft_config(cfg)?,
            leases: Arc::new(crate::lease::Leases::for_timeouts(cfg.election_timeout.0)),
        },
        placement: Default::default(),
        deliveries: crate::delivery::Deliveries::new(map.len()),
        group_pushes: Default::default(),
        interest: crate::interest::Interest::new(cfg.interest_renew),
        blocking_reads: tokio::sync::Semaphore::new(BLOCKING_READS),
        replace: Default::default(),
        space: crate::space::Space::new(cfg.data_dir.clone(), cfg.min_free_space),
        stopped: Default::default(),
    });
    inner.refresh(&meta).await?;
    let svc = Arc::downgrade(&inner);
    let im: net::ImFn = Arc::new(move |kind, p, body| {
        let svc = svc.upgrade();
        Box::pin(async move {
            match (svc, kind) {
                (Some(inner), net::KIND_DELIVER) => crate::delivery::serve(inner, p, body).await,
                (Some(inner), net::KIND_GROUP_READ) => crate::groups::serve_read(inner, body).await,
                (Some(inner), net::KIND_GROUP_PUSH) => crate::groups::serve_push(inner, body).await,
                (Some(inner), net::KIND_CONV_INFO) => crate::marks::serve_probe(inner, body).await,
                (Some(inner), net::KIND_CONV_SUMMARY) => {
                    crate::conversations::serve(inner, body).await
                }
                (Some(inner), net::KIND_DELETES) => crate::marks::serve_deletes(inner, body).await,
                (Some(inner), net::KIND_MEMBERSHIP) => {
                    crate::reconcile::serve_membership(inner, p).await
                }
                (Some(inner), net::KIND_HANDOVER) => crate::rebalance::serve(inner, p, body).await,
                (Some(inner), net::KIND_INTEREST) => crate::interest::serve(inner, body).await,
                _ => Vec::new(),
            }
        })
    });
    let votes = net::VoteGate {
        from: started + cfg.election_timeout.1,
        leases: inner.factory.leases.clone(),
    };
    let refusals = inner.factory.transport.refusals.clone();
    tokio::spawn(net::serve(
        listener,
        inner.groups.clone(),
        im,
        votes,
        refusals,
        cfg.peer_secret.clone(),
    ));
    let initial = meta.initial_map().await?;
    for (p, replicas) in map.partitions.iter().enumerate() {
        if !replicas.contains(&cfg.id) {
            // A replica this node gave up before: its log is released, and
            // its outbox closed (module `outbox`). A log kept (a voter that
            // stood down, or a replica moved away while this node was
            // down) waits for the group's word, its outbox too.
            let p = p as PartitionId;
            if crate::log_store::release_if_retired(inner.engine(), u64::from(p))? {
                let known = newest_config(inner.engine(), &inner.factory.flusher, p).await?;
                crate::reconcile::keep_log(&inner, p, known);
                crate::reconcile::keep_outbox(&inner, p);
            } else {
                crate::reconcile::give_up_outbox(&inner, p).await;
            }
            continue;
        }
        let p = p as PartitionId;
        let raft = inner.open_group(p, false).await?;
        // Only the map the cluster was formed with says who starts a group
        // (a replica placed later joins a group that exists, through its
        // leader: initializing it would start a second, empty group), and
        // with which voters: the initial replicas, with no addresses (the
        // transport has its own), so that whoever initializes writes the
        // same first entry, which openraft allows. The first initial
        // replica that the map it read still places there does it at once
        // (so leaders start spread as the map's first replicas are); any
        // other initial replica placed there does it if the group is still
        // not formed after `FORMATION_FALLBACK` (nodes that read different
        // maps could each leave it to another).
        let Some(voters0) = initial
            .as_ref()
            .or(Some(&map))
            .filter(|m| m.version == 1)
            .and_then(|m| m.partitions.get(p as usize))
            .filter(|r| r.contains(&cfg.id))
            .cloned()
        else {
            continue;
        };
        if voters0.iter().find(|n| replicas.contains(n)) == Some(&cfg.id) {
            initialize(&raft, &voters0, p).await?;
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(FORMATION_FALLBACK).await;
                if let Err(e) = initialize(&raft, &voters0, p).await {
                    tracing::warn!(partition = p, error = %e, "cannot start the group");
                }
            });
        }
    }
    if !map.nodes().contains(&cfg.id) {
        crate::reconcile::join(&meta, cfg.id).await?;
        inner.refresh(&meta).await?;
    }
    tokio::spawn(crate::reconcile::run(inner.clone()));
    tokio::spawn(reclaim_logs(Arc::downgrade(&inner), cfg.log_reclaim_every));
    tokio::spawn(crate::revive::supervise(Arc::downgrade(&inner)));
    tokio::spawn(crate::interest::renew(Arc::downgrade(&inner)));
    tokio::spawn(keep_lease(
        meta.clone(),
        me,
        lease,
        cfg.lease_ttl,
        Arc::downgrade(&inner),
    ));
    tokio::spawn(crate::replace::run(
        meta.clone(),
        inner.clone(),
        cfg.replace_after,
    ));
    tokio::spawn(watch(meta, inner.clone()));
    tracing::info!(node = cfg.id, %raft_addr, groups = inner.groups.read().len(), version = map.version, "cluster node up");
    Ok((inner, raft_addr))
}

/// Page reads a node runs on its blocking pool at once.
const BLOCKING_READS: usize = 16;

/// How long an initial replica that is not the partition's first waits
/// for the group to be formed before it initializes it itself.
const FORMATION_FALLBACK: Duration = Duration::from_secs(3);

/// Start partition `p`'s group with `voters` unless it is formed already
/// (by this node before, or by another initial replica's leader).
async fn initialize(
    raft: &Raft<TypeConfig>,
    voters: &[NodeId],
    p: PartitionId,
) -> Result<(), ClusterError> {
    if raft
        .is_initialized()
        .await
        .map_err(|e| ClusterError::Raft(e.to_string()))?
    {
        return Ok(());
    }
    let members: BTreeMap<NodeId, BasicNode> =
        voters.iter().map(|n| (*n, BasicNode::default())).collect();
    match raft.initialize(members).await {
        Ok(()) | Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {
            Ok(())
        }
        Err(e) => Err(ClusterError::Raft(format!("initialize partition {p}: {e}"))),
    }
}

/// etcd, retried until `formation_timeout` (it may still be starting).
async fn connect_meta(cfg: &NodeConfig, deadline: Instant) -> Result<Meta, ClusterError> {
    loop {
        match Meta::connect(&cfg.etcd, &cfg.cluster).await {
            Ok(m) => return Ok(m),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(e) => {
                tracing::info!(error = %e, "etcd not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// `call` again while etcd cannot be reached (it may be starting, or
/// restarting), until `deadline`: a start-up wait, not a serving path.
/// Any other error, or one at the deadline, is returned.
async fn until_reached<T, F, Fut>(deadline: Instant, mut call: F) -> Result<T, MetaError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, MetaError>>,
{
    loop {
        match call().await {
            Err(MetaError::Etcd(e)) if unreachable(&e) && Instant::now() < deadline => {
                tracing::info!(error = %e, "etcd not reachable; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

/// An etcd error that says it could not be reached or did not answer in
/// time (worth a retry), rather than that it refused the request.
fn unreachable(e: &etcd_client::Error) -> bool {
    // gRPC status codes: 4 deadline exceeded, 14 unavailable.
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(i32::from(s.code()), 4 | 14),
        _ => false,
    }
}

/// The map: read it, or create it once `R` members are registered. A
/// start-up wait (bounded by `formation_timeout`), not a serving path.
async fn form(
    meta: &Meta,
    cfg: &NodeConfig,
    deadline: Instant,
) -> Result<PartitionMap, ClusterError> {
    loop {
        if let Some(m) = until_reached(deadline, || meta.map()).await? {
            return Ok(m);
        }
        let nodes: Vec<NodeId> = until_reached(deadline, || meta.nodes())
            .await?
            .into_keys()
            .collect();
        if nodes.len() >= cfg.replicas {
            let m = PartitionMap::new(cfg.partitions, cfg.replicas, &nodes)?;
            if until_reached(deadline, || meta.create_map(&m)).await? {
                tracing::info!(version = m.version, ?nodes, "created the partition map");
                return Ok(m);
            }
            continue; // another node created it first: read theirs
        }
        if Instant::now() > deadline {
            return Err(ClusterError::Formation(format!(
                "{} of {} members registered after {:?}",
                nodes.len(),
                cfg.replicas,
                cfg.formation_timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every `every`, each group on this node snapshots (cheap: an engine
/// sync and the applied state) and purges its log through what it had
/// applied a period earlier. A partition with little traffic never
/// reaches `snapshot_every`, and its old entries would pin the log's
/// oldest segments forever (the engine reclaims only a prefix of them):
/// this bounds how long any entry stays, at the cost of a snapshot for a
/// replica more than a period behind. Then every vote and applied state
/// unchanged for half a `raft-state` segment window is written again, so
/// that the old copies go (module `raft_state`).
async fn reclaim_logs(inner: std::sync::Weak<Inner>, every: Duration) {
    let mut prev: HashMap<PartitionId, u64> = HashMap::new();
    let mut renewal = None;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let groups: Vec<(PartitionId, Raft<TypeConfig>)> = strong
            .groups
            .read()
            .iter()
            .map(|(p, g)| (*p, g.clone()))
            .collect();
        let engine = strong.factory.engine.clone();
        let partitions = strong.map.read().len();
        drop(strong);
        if groups.is_empty() {
            tokio::time::sleep(every).await;
        }
        // Spread over the period: one group's snapshot (an engine sync)
        // at a time, not every group's at once.
        let gap = every / (groups.len() as u32 + 1);
        for (p, g) in groups {
            tokio::time::sleep(gap).await;
            let m = g.metrics().borrow().clone();
            let index = |l: Option<LogId<NodeId>>| l.map_or(0, |l| l.index);
            let before = prev.insert(p, index(m.last_applied)).unwrap_or(0);
            let storage = strong_storage(&inner, p);
            if let Some(s) = &storage {
                // An idle outbox's done mark must not pin the old
                // segments of `im-outbox` either. (On the blocking pool:
                // it waits for a group commit.)
                let sm = s.sm.clone();
                // The error as text: openraft's is large to move around.
                let renewed =
                    tokio::task::spawn_blocking(move || sm.renew_done().map_err(|e| e.to_string()))
                        .await;
                match renewed {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(partition = p, error = %e, "cannot renew the outbox's done mark")
                    }
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "renewing the outbox's done mark panicked")
                    }
                }
            }
            let log = storage.map(|s| s.log);
            if before <= index(m.purged) {
                // Idle: its purge record must not pin the old segments.
                // (On the blocking pool: it waits for a group commit.)
                if let Some(log) = log {
                    let renewed = tokio::task::spawn_blocking(move || log.renew_purge()).await;
                    if let Ok(Err(e)) = renewed {
                        tracing::warn!(partition = p, error = %e, "cannot renew the log's purge record");
                    }
                }
                continue;
            }
            if index(m.snapshot) < before {
                let _ = g.trigger().snapshot().await;
            }
            // Clamped by openraft to the snapshot it has: a snapshot
            // still being built is purged through next time.
            let _ = g.trigger().purge_log(before).await;
        }
        // Every partition's, held here or not: a replica given up keeps
        // its vote and applied state, and they must not pin segments
        // either. (On the blocking pool: an engine sync.)
        let renewed = tokio::task::spawn_blocking(move || {
            let mut r = renewal.unwrap_or_else(|| crate::raft_state::Renewal::for_engine(&engine));
            let n = r.pass(&engine, partitions);
            (r, n)
        })
        .await;
        renewal = match renewed {
            Ok((r, Ok(_))) => Some(r),
            Ok((r, Err(e))) => {
                tracing::warn!(error = %e, "cannot renew the votes and applied states");
                Some(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the votes and applied states panicked");
                None
            }
        };
    }
}

/// Partition `p`'s log and state machine, if the node is still up and
/// runs its group.
fn strong_storage(inner: &std::sync::Weak<Inner>, p: PartitionId) -> Option<GroupStorage> {
    inner.upgrade()?.storage.lock().get(&p).cloned()
}

/// Renew the lease a third of its TTL apart; if it expired (etcd was away
/// longer than the TTL, or the process was paused), register again under a
/// new one. A node that was replaced meanwhile (gone past `replace_after`
/// while it ran cut off) then adds itself back, as it would on a restart;
/// one an operator removed stays out.
async fn keep_lease(
    meta: Meta,
    me: NodeRecord,
    mut lease: i64,
    ttl: Duration,
    inner: std::sync::Weak<Inner>,
) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rejoin = false;
    loop {
        tick.tick().await;
        match meta.renew(lease).await {
            Ok(true) => {}
            Ok(false) => match meta.register(&me, ttl).await {
                Ok(l) => {
                    tracing::warn!(node = me.id, "lease had expired: registered again");
                    lease = l;
                    rejoin = true;
                }
                Err(e) => tracing::warn!(error = %e, "cannot register again"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot renew the membership lease"),
        }
        if rejoin {
            let Some(inner) = inner.upgrade() else { return };
            match rejoin_if_replaced(&meta, &inner).await {
                Ok(()) => rejoin = false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check whether this node was replaced (retrying)")
                }
            }
        }
    }
}

/// After registering again: if this node was replaced while it was away
/// and is still outside the map, put it back in (`add_node`).
async fn rejoin_if_replaced(meta: &Meta, inner: &Arc<Inner>) -> Result<(), ClusterError> {
    let in_map = meta
        .map()
        .await?
        .is_some_and(|m| m.nodes().contains(&inner.id));
    if in_map || !meta.was_replaced(inner.id).await? {
        return Ok(());
    }
    tracing::warn!(
        node = inner.id,
        "replaced while cut off: adding itself back to the map"
    );
    let id = inner.id;
    let mark = crate::meta::NodeMark::Rejoin(id);
    match crate::reconcile::apply_with(meta, mark, |m| m.add_node(id)).await {
        Ok(_) | Err(ClusterError::Placement(PlacementError::NodeExists(_))) => {}
        Err(ClusterError::Meta(MetaError::NotReplaced(_))) => {
            tracing::warn!(
                node = id,
                "an operator removed this node meanwhile: it stays out"
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    inner
        .replace
        .rejoined
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    inner.refresh(meta).await?;
    inner.placement.changed.notify_one();
    Ok(())
}

/// Follow the cluster's keys: on any change, re-read members and the map.
/// If the watch breaks (etcd away), retry it on a timer.
async fn watch(meta: Meta, inner: Arc<Inner>) {
    loop {
        match meta.watch().await {
            Ok(mut s) => {
                while let Ok(Some(_)) = s.message().await {
                    if let Err(e) = inner.refresh(&meta).await {
                        tracing::warn!(error = %e, "cannot read the cluster's metadata");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot watch etcd"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = inner.refresh(&meta).await;
    }
}
