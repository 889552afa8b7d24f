//! Placement acted on: turning the partition map in etcd into the Raft
//! groups' memberships.
//!
//! The map says where each partition's replicas should be; openraft's
//! membership says where they are. Every node runs one task that, when a
//! newer map arrives and once a second (a timer: a new leader must finish
//! a change its predecessor left half done), walks its partitions:
//!
//! | this node, for partition `p` | it does |
//! |---|---|
//! | is a replica in the map, runs no group | opens the group, empty: the leader fills it (log entries, or a snapshot) |
//! | leads `p`, membership ≠ the map's replicas | adds each new replica as a learner and waits until it has caught up, then changes the membership to the map's replicas (openraft's joint consensus; a leader that removes itself steps down once the change is committed), then removes learners the map does not place there |
//! | is not a replica in the map, not a voter of its group's committed or effective membership | shuts the group down and releases its log; its records stay on disk |
//! | is not a replica in the map, still a voter, knowing no leader for 5 s (the leader stops sending to a removed replica) | shuts the group down, keeping its log (the group may still count it) |
//! | is not a replica in the map, runs no group, keeps its log (the row above, or a replica moved away while this node was down) | asks the map's replicas every 5 s for their committed membership config; releases the log once one answers with a config without this node, at or after the newest config this node knows ([`release_kept`]) |
//!
//! One change per partition is under way at a time. A node that starts
//! with an existing map that holds none of its replicas asks for its share
//! ([`join`]): replicas move to it from the most loaded nodes, in one map
//! transaction.

use crate::meta::{Meta, MetaError, NodeMark};
use crate::node::{ClusterError, Inner};
use crate::partition::{PartitionId, PartitionMap, PlacementError};
use crate::{NodeId, TypeConfig};
use openraft::{BasicNode, LogId, Raft, ServerState};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a new replica may take to catch up before the change is
/// abandoned (and tried again on the next round).
const CATCH_UP: Duration = Duration::from_secs(60);

/// A node's placement state: the wake-up for a new map, and the partitions
/// whose membership change is under way.
#[derive(Default)]
pub(crate) struct Placement {
    pub(crate) changed: tokio::sync::Notify,
    pub(crate) busy: parking_lot::Mutex<HashSet<PartitionId>>,
    /// Groups outside the map that know no leader, since when.
    pub(crate) leaderless: parking_lot::Mutex<HashMap<PartitionId, Instant>>,
    /// Logs of partitions this node runs no group of that it still keeps
    /// (it stood down as a voter, or the replica moved away while it was
    /// down): each pins the oldest log segments of its shard, and with
    /// them every later one, until released.
    kept: parking_lot::Mutex<HashMap<PartitionId, KeptLog>>,
    /// Kept logs released since start.
    released: std::sync::atomic::AtomicU64,
    /// Outboxes of replicas given up here not closed yet, and when to ask
    /// again whether their records were delivered (module `outbox`: until
    /// closed, they pin `im-outbox`'s oldest segments).
    closing: parking_lot::Mutex<HashMap<PartitionId, Closing>>,
    /// Outboxes closed since start.
    closed: std::sync::atomic::AtomicU64,
}

/// A log kept without its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeptLog {
    /// The newest membership config this node knows of the group (the log
    /// id of its entry): an answer is only taken from a committed config
    /// at or after it, not from a replica that lags behind the config that
    /// added this node.
    known: Option<LogId<NodeId>>,
    stage: Kept,
}

/// Where a kept log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// To ask the map's replicas about from then on.
    Waiting(Instant),
    /// Asking.
    Asking,
    /// A replica's committed config, at or after the newest this node
    /// knows, leaves it out: no config can count it again, so the log
    /// goes (on the placement task, which alone opens groups).
    Unneeded,
}

/// How often a kept log's partition is asked about.
const ASK_EVERY: Duration = Duration::from_secs(5);

/// How long one replica gets to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Note that this node keeps partition `p`'s log without running its
/// group; `known`: the newest membership config it knows of the group.
pub(crate) fn keep_log(inner: &Inner, p: PartitionId, known: Option<LogId<NodeId>>) {
    let stage = Kept::Waiting(Instant::now());
    inner
        .placement
        .kept
        .lock()
        .insert(p, KeptLog { known, stage });
}

/// How long a voter the map no longer places here may know no leader
/// before it stops (a leader does not send to a replica it removed; an
/// election among the replicas takes well under a second).
const STAND_DOWN_AFTER: Duration = Duration::from_secs(5);

/// What a node's placement looks like now (for `STATS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlacementStatus {
    /// Groups this node runs.
    pub groups: u64,
    /// Groups it leads.
    pub leading: u64,
    /// The sum of its groups' current Raft terms: it grows by one with
    /// each election a group here takes part in (a new replica starts
    /// at its group's term).
    pub terms: u64,
    /// Groups it leads whose membership is not yet the map's replicas.
    pub pending: u64,
    /// Logs it keeps of partitions it no longer runs, until their groups'
    /// committed memberships leave it out.
    pub kept: u64,
    /// Such logs released since start.
    pub released: u64,
    /// Outboxes of replicas it gave up that wait for a replica's word that
    /// their last records were delivered (module `outbox`).
    pub outboxes_closing: u64,
    /// Outboxes of replicas it gave up closed since start.
    pub outboxes_closed: u64,
}

/// A placement change an operator (or a joining node) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Move replicas to a new node until it holds its share.
    AddNode(NodeId),
    /// Move every replica of a node to the other live nodes of the map
    /// (then it may be stopped).
    RemoveNode(NodeId),
    /// Move one replica of a partition.
    Move {
        partition: PartitionId,
        from: NodeId,
        to: NodeId,
    },
}

/// Apply `change` to the map in etcd, as one transaction on the whole
/// previous map, retried (on the newer map) if another change got there
/// first. The new map and the moves: (partition, from, to).
///
/// `RemoveNode` moves the replicas to live nodes of the map only (those
/// whose lease is alive now): never onto a node that is down.
pub async fn apply(meta: &Meta, change: Change) -> Result<(PartitionMap, Moves), ClusterError> {
    let live: BTreeSet<NodeId> = match change {
        Change::RemoveNode(_) => meta.nodes().await?.into_keys().collect(),
        _ => BTreeSet::new(),
    };
    let mark = match change {
        Change::AddNode(n) | Change::RemoveNode(n) => NodeMark::Settled(n),
        Change::Move { .. } => NodeMark::Unchanged,
    };
    let r = apply_with(meta, mark, |new| match change {
        Change::AddNode(n) => new.add_node(n),
        Change::RemoveNode(n) => new.replace_node(n, &live),
        Change::Move {
            partition,
            from,
            to,
        } => {
            new.move_replica(partition, from, to)?;
            Ok(vec![(partition, from, to)])
        }
    })
    .await;
    // A node already out of the map (replaced while gone) is refused as
    // not a member, but the operator's word still clears its mark: if it
    // was only cut off, it must not add itself back.
    if let (Change::RemoveNode(n), Err(ClusterError::Placement(PlacementError::NoSuchNode(_)))) =
        (change, &r)
    {
        meta.clear_replaced(n).await?;
    }
    r
}

/// Apply the change `edit` makes to a copy of the current map, as [`apply`]
/// does (`edit` runs again on a newer map after a conflict), recording
/// `mark` in the same transaction.
pub(crate) async fn apply_with(
    meta: &Meta,
    mark: NodeMark,
    edit: impl Fn(&mut PartitionMap) -> Result<Moves, PlacementError>,
) -> Result<(PartitionMap, Moves), ClusterError> {
    for _ in 0..16 {
        let Some(old) = meta.map().await? else {
            return Err(ClusterError::Formation(
                "the cluster has no partition map yet".into(),
            ));
        };
        let mut new = old.clone();
        let moves = edit(&mut new)?;
        match meta.replace_map_marking(&old, &new, mark).await {
            Ok(()) => return Ok((new, moves)),
            Err(MetaError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ClusterError::Formation(
        "the map kept changing under this change (16 tries)".into(),
    ))
}

/// Replica moves: (partition, from, to).
pub type Moves = Vec<(PartitionId, NodeId, NodeId)>;

/// Put node `id` into the map if it holds nothing there yet.
pub(crate) async fn join(meta: &Meta, id: NodeId) -> Result<(), ClusterError> {
    match apply(meta, Change::AddNode(id)).await {
        Ok((map, moves)) => {
            tracing::info!(
                node = id,
                version = map.version,
                moves = moves.len(),
                "joined the map"
            );
            Ok(())
        }
        Err(ClusterError::Placement(PlacementError::NodeExists(_))) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The placement task of a node: a round on every new map and every second.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = inner.placement.changed.notified() => {}
        }
        round(&inner).await;
    }
}

/// The map's replicas of `p`, if this node knows the map.
fn target(inner: &Inner, p: PartitionId) -> Option<BTreeSet<NodeId>> {
    let map = inner.map.read();
    map.partitions
        .get(p as usize)
        .map(|r| r.iter().copied().collect())
}

/// Whether group `g`'s membership already is `target` (one config, those
/// voters).
pub(crate) fn settled(g: &Raft<TypeConfig>, target: &BTreeSet<NodeId>) -> bool {
    let m = g.metrics().borrow().membership_config.clone();
    let joint = m.membership().get_joint_config();
    joint.len() == 1 && joint[0] == *target && stray_learners(g, target).is_empty()
}

/// Learners of `g` the map does not place there (added to catch up, then
/// placed elsewhere): the leader would replicate to them forever.
fn stray_learners(g: &Raft<TypeConfig>, target: &BTreeSet<NodeId>) -> BTreeSet<NodeId> {
    let m = g.metrics().borrow().membership_config.clone();
    let learners = m.membership().learner_ids().collect::<BTreeSet<_>>();
    learners.difference(target).copied().collect()
}

/// One pass over this node's partitions.
async fn round(inner: &Arc<Inner>) {
    if let Some(every) = inner.rebalance_every {
        crate::rebalance::maybe_start(inner, every);
    }
    let p_count = inner.map.read().len();
    for p in 0..p_count {
        if inner.stopped.contains(p) {
            // Its group stopped on a storage error: module `revive` reopens
            // it (and wakes this loop) once the disk has room.
            continue;
        }
        let Some(target) = target(inner, p) else {
            continue;
        };
        let mine = target.contains(&inner.id);
        let Some(g) = inner.group(p) else {
            if !mine {
                release_kept(inner, p).await;
                close_outbox(inner, p);
                continue;
            }
            {
                // A close under way: open next round, not under it.
                let mut closing = inner.placement.closing.lock();
                if closing.get(&p) == Some(&Closing::Asking) {
                    continue;
                }
                closing.remove(&p);
            }
            inner.placement.kept.lock().remove(&p);
            match inner.open_group(p, false).await {
                Ok(_) => tracing::info!(partition = p, "took a replica: the group is open"),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot open a new replica")
                }
            }
            continue;
        };
        let (state, leader) = {
            let m = g.metrics();
            let m = m.borrow();
            (m.state, m.current_leader)
        };
        if mine || leader.is_some() {
            inner.placement.leaderless.lock().remove(&p);
        }
        if state == ServerState::Leader {
            // Re-drive what a previous leader left undelivered.
            let e = inner.engine();
            let undelivered = crate::im::read::done(e, p)
                .is_ok_and(|(d, _)| crate::im::read::outbox_last(e, p) > d);
            if undelivered {
                crate::delivery::kick(inner, p);
            }
            if !settled(&g, &target) && inner.placement.busy.lock().insert(p) {
                let inner = inner.clone();
                tokio::spawn(async move {
                    if let Err(e) = change(&inner, p, &g, target).await {
                        tracing::warn!(partition = p, error = %e, "membership change not done; retrying");
                    }
                    inner.placement.busy.lock().remove(&p);
                });
            }
        } else if !mine {
            give_up(inner, p, g).await;
        }
    }
}

/// A group this node runs but the map no longer places here, not led
/// here. A voter of its committed or its effective membership may still
/// be counted by the group (its acknowledgements made entries committed):
/// once it has known no leader for `STAND_DOWN_AFTER` (a leader does not
/// send to a replica it removed) it stops, but its log stays. Otherwise (a
/// learner, or a replica never added) it stops and its log is released.
async fn give_up(inner: &Inner, p: PartitionId, g: Raft<TypeConfig>) {
    let id = inner.id;
    let voter = g
        .with_raft_state(move |st| {
            let ms = &st.membership_state;
            [ms.committed(), ms.effective()]
                .iter()
                .any(|m| m.membership().voter_ids().any(|v| v == id))
        })
        .await
        .unwrap_or(true);
    if !voter {
        inner.placement.leaderless.lock().remove(&p);
        retire(inner, p, g, true).await;
        return;
    }
    if g.metrics().borrow().current_leader.is_some() {
        return;
    }
    let since = *inner
        .placement
        .leaderless
        .lock()
        .entry(p)
        .or_insert_with(Instant::now);
    if since.elapsed() >= STAND_DOWN_AFTER {
        inner.placement.leaderless.lock().remove(&p);
        retire(inner, p, g, false).await;
    }
}

/// Partition `p`, which this node neither runs nor is placed on: if it
/// keeps its log, ask the map's replicas about it (every `ASK_EVERY`), and
/// release the log once one answered with a committed membership config
/// that leaves this node out and is at or after the newest config this
/// node knows. Until then the group may still count this node (a change a
/// dead leader left half done) and its log must stay. A config committed
/// after every config that counted this node, and without it, ends that:
/// a later config counts it again only by adding it anew, as a learner,
/// which the map does by placing the partition here (then this node opens
/// the group and nothing is kept). An older config (a replica lagging
/// behind the one that added this node) proves nothing.
async fn release_kept(inner: &Arc<Inner>, p: PartitionId) {
    let kept = inner.placement.kept.lock().get(&p).copied();
    let Some(k) = kept else { return };
    match k.stage {
        Kept::Asking => {}
        Kept::Waiting(at) => {
            if at <= Instant::now() {
                inner.placement.kept.lock().insert(
                    p,
                    KeptLog {
                        stage: Kept::Asking,
                        ..k
                    },
                );
                tokio::spawn(ask_about(inner.clone(), p, k.known));
            }
        }
        Kept::Unneeded => {
            inner.placement.kept.lock().remove(&p);
            match retire_log(inner, p).await {
                Ok(()) => {
                    give_up_outbox(inner, p).await;
                    inner
                        .placement
                        .released
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        partition = p,
                        "released a kept log: a committed membership leaves this node out"
                    )
                }
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "kept log not released");
                    keep_log(inner, p, k.known);
                }
            }
        }
    }
}

/// Partition `p`'s replica kept with its log (the group may count this
/// node again): its delivered outbox records go, the rest stays.
pub(crate) fn keep_outbox(inner: &Inner, p: PartitionId) {
    if let Err(e) = crate::outbox::release(inner.engine(), p) {
        tracing::warn!(partition = p, error = %e, "kept outbox not released");
    }
}

/// Partition `p`'s replica is given up here (its log retired): close its
/// outbox once a replica of the group says its last record was delivered
/// ([`close_outbox`]; asked even where this replica's own mark covers it,
/// which is the usual case: one path, and one peer round per replica
/// given up). One closed before has its releases declared again (they
/// are in memory only).
pub(crate) async fn give_up_outbox(inner: &Inner, p: PartitionId) {
    let e = inner.engine().clone();
    // Ok(true): closed before; Ok(false): to close.
    let closed = tokio::task::spawn_blocking(move || {
        if !crate::outbox::closed(&e, p)? {
            return Ok(false);
        }
        let (_, wid) = crate::outbox::done(&e, p)?;
        let last = e.last_seq(crate::outbox::outbox_timeline(p));
        crate::outbox::close(&e, p, wid, last).map(|c| c == crate::outbox::Closed::Before)
    })
    .await;
    match closed {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            let due = Closing::Due(Instant::now());
            inner.placement.closing.lock().insert(p, due);
        }
        Ok(Err(e)) => tracing::warn!(partition = p, error = %e, "outbox not closed"),
        Err(e) => tracing::warn!(partition = p, error = %e, "outbox not closed"),
    }
}

/// Where a given-up replica's outbox not closed yet stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Ask the group's replicas from then on.
    Due(Instant),
    /// Asking, or closing: the partition's group is not opened here
    /// meanwhile (a close releases the outbox as it was when asked about).
    Asking,
}

/// A given-up replica's outbox not closed yet: every `ASK_EVERY`, ask the
/// map's replicas of `p` whether its last record was delivered, and close
/// it once one says so. Its records are then known
/// delivered: a replica taken again later skips them by the close mark.
fn close_outbox(inner: &Arc<Inner>, p: PartitionId) {
    {
        let mut closing = inner.placement.closing.lock();
        match closing.get_mut(&p) {
            Some(c) if matches!(*c, Closing::Due(at) if at <= Instant::now()) => {
                *c = Closing::Asking
            }
            _ => return,
        }
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let closed = ask_and_close(&inner, p).await;
        let mut closing = inner.placement.closing.lock();
        match closed {
            true => {
                closing.remove(&p);
            }
            false => {
                closing.insert(p, Closing::Due(Instant::now() + ASK_EVERY));
            }
        }
    });
}

/// [`close_outbox`]'s asking and closing: whether it is closed.
async fn ask_and_close(inner: &Arc<Inner>, p: PartitionId) -> bool {
    let e = inner.engine().clone();
    let last = e.last_seq(crate::outbox::outbox_timeline(p));
    let wid = match crate::outbox::last_wid(&e, p) {
        Ok(w) => w,
        Err(x) => {
            tracing::warn!(partition = p, error = %x, "outbox not closed");
            return false;
        }
    };
    for node in target(inner, p).unwrap_or_default() {
        if node == inner.id {
            continue;
        }
        let ask = crate::rebalance::Ask::Delivered(wid);
        if !matches!(
            crate::rebalance::ask(inner, node, p, ask).await,
            crate::rebalance::Answer::Done
        ) {
            continue;
        }
        let e = e.clone();
        let closed =
            tokio::task::spawn_blocking(move || crate::outbox::close(&e, p, wid, last)).await;
        return match closed {
            Ok(Ok(crate::outbox::Closed::Grew)) => false,
            Ok(Ok(c)) => {
                if c == crate::outbox::Closed::Now {
                    inner.placement.closed.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(
                    partition = p,
                    node,
                    "closed the outbox of a replica given up"
                );
                true
            }
            Ok(Err(x)) => {
                tracing::warn!(partition = p, error = %x, "outbox not closed");
                false
            }
            Err(x) => {
                tracing::warn!(partition = p, error = %x, "outbox not closed");
                false
            }
        };
    }
    false
}

/// Write `p`'s retire record and release its log (on the blocking pool:
/// it waits for a group commit).
async fn retire_log(inner: &Inner, p: PartitionId) -> std::io::Result<()> {
    let engine = inner.engine().clone();
    tokio::task::spawn_blocking(move || crate::log_store::retire(&engine, u64::from(p)))
        .await
        .map_err(std::io::Error::other)?
}

/// What [`crate::net::KIND_MEMBERSHIP`] answers: the log id of the group's
/// committed membership config here and the voters of each of its halves
/// (`None`: no group here).
pub(crate) type CommittedVoters = Option<(Option<LogId<NodeId>>, Vec<NodeId>)>;

/// Ask the map's other replicas of `p` about its committed membership
/// (see [`release_kept`]); `known`: the newest config this node knows.
async fn ask_about(inner: Arc<Inner>, p: PartitionId, known: Option<LogId<NodeId>>) {
    let me = inner.id;
    let replicas = target(&inner, p).unwrap_or_default();
    let mut verdict = Kept::Waiting(Instant::now() + ASK_EVERY);
    for n in replicas.into_iter().filter(|&n| n != me) {
        let call = inner
            .transport()
            .im_call(n, crate::net::KIND_MEMBERSHIP, p, Vec::new());
        let Ok(Ok(body)) = tokio::time::timeout(ASK_TIMEOUT, call).await else {
            continue;
        };
        // A group that knows no committed config (one reopened after it
        // was retired, until the leader says) answers no voters.
        if let Ok(Some((at, voters))) = bincode::deserialize::<CommittedVoters>(&body) {
            if !voters.is_empty() && !voters.contains(&me) && at >= known {
                verdict = Kept::Unneeded;
                break;
            }
        }
    }
    let mut kept = inner.placement.kept.lock();
    if let Some(k) = kept.get_mut(&p).filter(|k| k.stage == Kept::Asking) {
        k.stage = verdict;
    }
}

/// Answer [`crate::net::KIND_MEMBERSHIP`] for partition `p`.
pub(crate) async fn serve_membership(inner: Arc<Inner>, p: PartitionId) -> Vec<u8> {
    let answer: CommittedVoters = match inner.group(p) {
        None => None,
        Some(g) => g
            .with_raft_state(|st| {
                let c = st.membership_state.committed();
                let voters = c
                    .membership()
                    .get_joint_config()
                    .iter()
                    .flatten()
                    .copied()
                    .collect::<BTreeSet<NodeId>>();
                (*c.log_id(), voters.into_iter().collect())
            })
            .await
            .ok(),
    };
    bincode::serialize(&answer).unwrap_or_default()
}

/// As `p`'s leader: make the group's membership the map's `target`.
async fn change(
    inner: &Inner,
    p: PartitionId,
    g: &Raft<TypeConfig>,
    target: BTreeSet<NodeId>,
) -> Result<(), ClusterError> {
    let voters: BTreeSet<NodeId> = g
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    for &n in target.difference(&voters) {
        let addr = inner
            .members
            .read()
            .get(&n)
            .map(|r| r.raft.clone())
            .ok_or_else(|| ClusterError::Raft(format!("node {n} has not registered")))?;
        tracing::info!(partition = p, node = n, "adding a replica: catching it up");
        match tokio::time::timeout(CATCH_UP, g.add_learner(n, BasicNode::new(addr), true)).await {
            Ok(r) => r.map_err(|e| ClusterError::Raft(e.to_string()))?,
            Err(_) => {
                return Err(ClusterError::Raft(format!(
                    "node {n} did not catch up within {CATCH_UP:?}"
                )))
            }
        };
    }
    crate::node::while_leading(g, g.change_membership(target.clone(), false))
        .await
        .ok_or_else(|| ClusterError::Raft("leadership lost during the change".into()))?
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
    let stray = stray_learners(g, &target);
    if !stray.is_empty() {
        crate::node::while_leading(
            g,
            g.change_membership(openraft::ChangeMembers::RemoveNodes(stray), false),
        )
        .await
        .ok_or_else(|| ClusterError::Raft("leadership lost during the change".into()))?
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
    }
    tracing::info!(partition = p, ?target, "membership is the map's");
    Ok(())
}

/// Stop serving a partition this node no longer holds; with `release`
/// (no longer a voter: checked before) its log goes too.
async fn retire(inner: &Inner, p: PartitionId, g: Raft<TypeConfig>, release: bool) {
    // The newest config the group knew here (the effective one).
    let known = *g.metrics().borrow().membership_config.log_id();
    inner.groups.write().remove(&p);
    inner.stopped.closed(p);
    let _ = g.shutdown().await;
    if let Some(s) = inner.storage.lock().remove(&p) {
        s.log.close();
    }
    if !release {
        keep_log(inner, p, known);
        keep_outbox(inner, p);
    } else if let Err(e) = retire_log(inner, p).await {
        tracing::warn!(partition = p, error = %e, "retired log not released");
    } else {
        give_up_outbox(inner, p).await;
    }
    let partitions = inner.map.read().len();
    if let Some(h) = inner.hook() {
        h.partition_left(p, partitions);
    }
    tracing::info!(
        partition = p,
        release,
        "gave up a replica: the group is shut down"
    );
}

/// This node's groups, those it leads, and those whose change is pending.
pub(crate) fn status(inner: &Inner) -> PlacementStatus {
    let groups: Vec<(PartitionId, Raft<TypeConfig>)> = inner
        .groups
        .read()
        .iter()
        .map(|(p, g)| (*p, g.clone()))
        .collect();
    let mut s = PlacementStatus {
        groups: groups.len() as u64,
        kept: inner.placement.kept.lock().len() as u64,
        released: inner
            .placement
            .released
            .load(std::sync::atomic::Ordering::Relaxed),
        outboxes_closing: inner.placement.closing.lock().len() as u64,
        outboxes_closed: inner
            .placement
            .closed
            .load(std::sync::atomic::Ordering::Relaxed),
        ..Default::default()
    };
    for (p, g) in groups {
        let (state, term) = {
            let rx = g.metrics();
            let m = rx.borrow();
            (m.state, m.current_term)
        };
        s.terms = s.terms.saturating_add(term);
        if state != ServerState::Leader {
            continue;
        }
        s.leading += 1;
        if !target(inner, p).is_some_and(|t| settled(&g, &t)) {
            s.pending += 1;
        }
    }
    s
}
