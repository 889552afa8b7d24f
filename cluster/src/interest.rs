//! Which nodes want a read-fan-out group's pushes (docs/scaling.md, "Read
//! fan-out across nodes", "Interest").
//!
//! Before, a group's leader told every node of each message: N − 1 peer
//! calls per message, whoever was subscribed where. Now a node tells the
//! group's partition which groups it has subscribers in, and the leader
//! tells only those nodes:
//!
//! - **Registering.** A node registers the groups its subscribers are in
//!   ([`crate::im::DeliveryHook::watched_groups`]) with *every replica* of
//!   each group's partition, as the map it holds names them (peer kind
//!   [`KIND_INTEREST`]; one call per node, all its groups), so that a
//!   replica that becomes the leader knows them already. A group first
//!   watched here is registered at once ([`register`]: a `SUBSCRIBE`
//!   answers after it); every group watched is registered again every
//!   `renew` ([`renew`]); an entry not renewed lapses after
//!   [`LAPSE_RENEWALS`] × `renew` (the node's subscribers left, or the
//!   node is gone).
//! - **Telling.** The leader tells the nodes whose interest in the group
//!   is live ([`Interest::targets`]). It tells every node, as before, while
//!   its table may lack someone: for 2 × `renew` after this node opened
//!   the partition's group (a restart or a new replica, which the others'
//!   renewals have not reached yet), and while the map it holds does not
//!   list it among the partition's replicas (a replica being moved away
//!   still leading: renewals go to the map's replicas).
//!
//! Soft state only: nothing is written, and a lost registration costs
//! pushes (hints), never a message (the device's `SYNC` reads it).

use crate::net::KIND_INTEREST;
use crate::node::Inner;
use crate::partition::{partition_of, PartitionId};
use crate::NodeId;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use timeline_engine::Keyspace;

/// Groups an interest table holds at most (about 100 MB at 3 nodes
/// each): past it, the groups it lacks are told to every node, as
/// before interest was registered.
pub(crate) const MAX_GROUPS: usize = 1 << 20;

/// An interest not renewed for this many periods lapses.
pub(crate) const LAPSE_RENEWALS: u32 = 3;

/// How long a `SUBSCRIBE` waits for its groups' registration at most (a
/// replica out of reach is registered with at the next renewal).
pub(crate) const REGISTER_WAIT: Duration = Duration::from_millis(500);

/// The peer request: node `node` has subscribers in `convs`, for `ttl_ms`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Register {
    node: NodeId,
    ttl_ms: u64,
    convs: Vec<u64>,
}

/// This node's interest table (as a replica of the groups' partitions)
/// and what it registers (as a node with subscribers).
pub(crate) struct Interest {
    renew: Duration,
    /// Group → the nodes interested in it, each until when.
    table: Mutex<HashMap<u64, Vec<(NodeId, Instant)>>>,
    /// When this node last opened each partition's group.
    opened: Mutex<HashMap<PartitionId, Instant>>,
    pub(crate) counters: Counters,
}

/// `STATS`: `cluster_group_pushes_sent`, `cluster_group_pushes_broadcast`,
/// `cluster_groups_watched`.
#[derive(Default)]
pub(crate) struct Counters {
    /// Peer calls telling a node of a group message, since start.
    pub(crate) sent: AtomicU64,
    /// Group messages told to every node (the table may lack someone).
    pub(crate) broadcast: AtomicU64,
    /// Groups this node registered at its last renewal.
    pub(crate) watched: AtomicU64,
}

impl Interest {
    pub(crate) fn new(renew: Duration) -> Interest {
        Interest {
            renew: renew.max(Duration::from_millis(10)),
            table: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    /// This node opened partition `p`'s group now.
    pub(crate) fn opened(&self, p: PartitionId) {
        self.opened.lock().insert(p, Instant::now());
    }

    /// `node` is interested in `convs` until `until`. A group new to a
    /// full table ([`MAX_GROUPS`]) is not added: while the table is full,
    /// a group it lacks is told to every node ([`Interest::targets`]).
    fn note(&self, node: NodeId, convs: &[u64], until: Instant) {
        let mut t = self.table.lock();
        for &conv in convs {
            if t.len() >= MAX_GROUPS && !t.contains_key(&conv) {
                continue;
            }
            let nodes = t.entry(conv).or_default();
            match nodes.iter_mut().find(|(n, _)| *n == node) {
                Some(e) => e.1 = e.1.max(until),
                None => nodes.push((node, until)),
            }
        }
    }

    /// Drop what lapsed (each renewal period).
    fn sweep(&self, now: Instant) {
        self.table.lock().retain(|_, nodes| {
            nodes.retain(|(_, until)| *until > now);
            !nodes.is_empty()
        });
        let warm = self.warm_up();
        self.opened
            .lock()
            .retain(|_, at| now.duration_since(*at) < warm);
    }

    /// Whom the leader of `conv`'s partition `p` tells of its message,
    /// besides itself: `None` for every node (its table may lack someone:
    /// `p`'s group opened here lately, or `in_map` is false: the map this
    /// node holds does not place `p` here).
    pub(crate) fn targets(
        &self,
        conv: u64,
        p: PartitionId,
        in_map: bool,
        me: NodeId,
    ) -> Option<Vec<NodeId>> {
        let now = Instant::now();
        let warming = self
            .opened
            .lock()
            .get(&p)
            .is_some_and(|at| now.duration_since(*at) < self.warm_up());
        if warming || !in_map {
            self.counters.broadcast.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let t = self.table.lock();
        match t.get(&conv) {
            Some(nodes) => Some(
                nodes
                    .iter()
                    .filter(|(n, until)| *until > now && *n != me)
                    .map(|(n, _)| *n)
                    .collect(),
            ),
            None if t.len() >= MAX_GROUPS => {
                drop(t);
                self.counters.broadcast.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => Some(Vec::new()),
        }
    }

    fn lapse(&self) -> Duration {
        self.renew * LAPSE_RENEWALS
    }

    /// How long after opening a group its table may still lack a node:
    /// every node's renewal has reached it within two periods.
    fn warm_up(&self) -> Duration {
        2 * self.renew
    }
}

/// Register `convs` with every replica of their partitions (this node's
/// own table directly); returns once each answered, or after
/// [`REGISTER_WAIT`].
pub(crate) async fn register(inner: &Arc<Inner>, convs: Vec<u64>) {
    if convs.is_empty() {
        return;
    }
    let by_node = by_replica(inner, &convs);
    let mut calls = tokio::task::JoinSet::new();
    for (node, convs) in by_node {
        let inner = inner.clone();
        calls.spawn(async move { tell(&inner, node, convs).await });
    }
    let _ = tokio::time::timeout(REGISTER_WAIT, async {
        while calls.join_next().await.is_some() {}
    })
    .await;
    // Calls still out finish on their own (dropping the set would abort
    // them); a registration that arrives late is as good.
    calls.detach_all();
}

/// Every `renew`: register the groups this node's subscribers are in
/// again, and drop the table's lapsed entries. Ends with the node.
pub(crate) async fn renew(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => i.interest.renew,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.interest.sweep(Instant::now());
        let convs = inner.hook().map(|h| h.watched_groups()).unwrap_or_default();
        inner
            .interest
            .counters
            .watched
            .store(convs.len() as u64, Ordering::Relaxed);
        for (node, convs) in by_replica(&inner, &convs) {
            let inner = inner.clone();
            tokio::spawn(async move { tell(&inner, node, convs).await });
        }
    }
}

/// `convs` by the replicas of their partitions, as this node's map says.
fn by_replica(inner: &Inner, convs: &[u64]) -> BTreeMap<NodeId, Vec<u64>> {
    let map = inner.map.read();
    let mut by_node: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
    for &conv in convs {
        let p = partition_of(Keyspace::STORE.0, conv, map.len());
        for &n in map.partitions.get(p as usize).into_iter().flatten() {
            by_node.entry(n).or_default().push(conv);
        }
    }
    by_node
}

/// Register `convs` with `node` (this one: directly).
async fn tell(inner: &Arc<Inner>, node: NodeId, convs: Vec<u64>) {
    let lapse = inner.interest.lapse();
    if node == inner.id {
        inner.interest.note(node, &convs, Instant::now() + lapse);
        return;
    }
    let req = Register {
        node: inner.id,
        ttl_ms: lapse.as_millis().min(u128::from(u64::MAX)) as u64,
        convs,
    };
    let Ok(body) = bincode::serialize(&req) else {
        return;
    };
    if let Err(e) = inner
        .transport()
        .im_call(node, KIND_INTEREST, 0, body)
        .await
    {
        tracing::debug!(node, error = %e, "group interest not registered");
    }
}

/// The longest interest a peer may ask for (a peer's renewal period is
/// its own configuration; this bounds what a bad value costs).
const MAX_TTL: Duration = Duration::from_secs(600);

/// Answer [`KIND_INTEREST`]: note the peer's interest (the reply is empty;
/// an undecodable body, or one naming a node this one never saw as a
/// member, is ignored).
pub(crate) async fn serve(inner: Arc<Inner>, body: Vec<u8>) -> Vec<u8> {
    let Ok(r) = bincode::deserialize::<Register>(&body) else {
        return Vec::new();
    };
    if inner.members.read().contains_key(&r.node) {
        let ttl = Duration::from_millis(r.ttl_ms).min(MAX_TTL);
        inner.interest.note(r.node, &r.convs, Instant::now() + ttl);
    }
    Vec::new()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_tells_the_nodes_whose_interest_is_live() {
        let i = Interest::new(Duration::from_millis(100));
        let now = Instant::now();
        i.note(2, &[7, 8], now + Duration::from_secs(60));
        i.note(3, &[7], now + Duration::from_secs(60));
        i.note(4, &[7], now); // lapsed already
        i.note(1, &[7], now + Duration::from_secs(60)); // this node: never told
        let mut t = i.targets(7, 0, true, 1).unwrap();
        t.sort_unstable();
        assert_eq!(t, vec![2, 3]);
        assert_eq!(i.targets(8, 0, true, 1).unwrap(), vec![2]);
        assert_eq!(i.targets(9, 0, true, 1).unwrap(), Vec::<NodeId>::new());
        assert_eq!(i.counters.broadcast.load(Ordering::Relaxed), 0);
        // A renewal extends an entry, never shortens it.
        i.note(2, &[8], now);
        assert_eq!(i.targets(8, 0, true, 1).unwrap(), vec![2]);
        i.sweep(now + Duration::from_secs(61));
        assert!(i.table.lock().is_empty());
    }

    #[test]
    fn every_node_is_told_while_the_table_may_lack_someone() {
        let i = Interest::new(Duration::from_millis(100));
        i.note(2, &[7], Instant::now() + Duration::from_secs(60));
        i.opened(5);
        assert_eq!(i.targets(7, 5, true, 1), None, "opened lately");
        assert_eq!(i.targets(7, 4, false, 1), None, "not a replica in the map");
        assert_eq!(i.targets(7, 4, true, 1), Some(vec![2]));
        assert_eq!(i.counters.broadcast.load(Ordering::Relaxed), 2);
        i.opened
            .lock()
            .insert(5, Instant::now() - Duration::from_millis(250));
        assert_eq!(
            i.targets(7, 5, true, 1),
            Some(vec![2]),
            "warm after 2 renewals"
        );
        i.sweep(Instant::now());
        assert!(i.opened.lock().is_empty());
    }

    #[test]
    fn a_full_table_tells_every_node_of_the_groups_it_lacks() {
        let i = Interest::new(Duration::from_millis(100));
        let until = Instant::now() + Duration::from_secs(60);
        let convs: Vec<u64> = (0..MAX_GROUPS as u64).collect();
        i.note(2, &convs, until);
        i.note(3, &[5, u64::MAX], until); // 5 is there; u64::MAX does not fit
        assert_eq!(i.table.lock().len(), MAX_GROUPS);
        let mut t = i.targets(5, 0, true, 1).unwrap();
        t.sort_unstable();
        assert_eq!(t, vec![2, 3]);
        assert_eq!(i.targets(u64::MAX, 0, true, 1), None);
        assert_eq!(i.counters.broadcast.load(Ordering::Relaxed), 1);
    }
}
