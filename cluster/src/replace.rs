//! Replacing a node that is gone.
//!
//! A member whose lease in etcd has lapsed is *down*, not yet *gone*: it may
//! be restarting, and moving its replicas costs a full copy of each. Once it
//! has been away for `replace_after` ([`crate::NodeConfig`];
//! `--replace-after`, 5 minutes by default, as CockroachDB's
//! `server.time_until_store_dead`), its replicas move to the live nodes of
//! the map in one map transaction ([`PartitionMap::replace_node`]). The
//! groups then act on the new map as on any placement change
//! ([`crate::reconcile`]): each new replica catches up as a learner, then
//! joint consensus takes the gone node out, with a quorum of the replicas
//! that are up.
//!
//! - **Who acts**: the lowest-id live node of the map. Every node reads the
//!   members once a second and keeps its own clock of who is absent since
//!   when; only the actor uses it. Two nodes that both believe they act do
//!   no harm: the change is a transaction on the whole previous map, and the
//!   later one finds the node already out of it.
//! - **etcd away**: a read of the members that fails restarts every clock,
//!   so time without etcd never counts toward gone (and no change could be
//!   made anyway).
//! - **Not enough live nodes** (R or fewer, counting the gone one): nothing
//!   moves; the refusal is logged once per node.
//! - A replaced node that starts again is outside the map, so it adds
//!   itself back ([`crate::reconcile::join`]) and takes its share like a new
//!   node. So does one that was running all along, cut off from etcd or
//!   paused: the replacement leaves a `replaced` mark in etcd, and a node
//!   that registers again after its lease lapsed, finds the mark and is
//!   outside the map, joins again. An operator's `remove-node` clears the
//!   mark: a node being retired does not come back.
//!
//! [`PartitionMap::replace_node`]: crate::partition::PartitionMap::replace_node

use crate::meta::Meta;
use crate::node::{ClusterError, Inner};
use crate::partition::PlacementError;
use crate::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a node reads who is live.
const EVERY: Duration = Duration::from_secs(1);

/// What `STATS` shows of this.
#[derive(Default)]
pub(crate) struct Counters {
    /// Members whose lease was alive at the last read (routing prefers
    /// them; `STATS` counts them).
    pub(crate) live: parking_lot::RwLock<BTreeSet<NodeId>>,
    /// Gone nodes this node took out of the map.
    pub(crate) replaced: AtomicU64,
    /// Times this node found itself replaced when it registered again, and
    /// added itself back.
    pub(crate) rejoined: AtomicU64,
}

/// Since when each node of the map has been seen absent (this node's clock).
#[derive(Debug, Default)]
pub(crate) struct Absences {
    since: BTreeMap<NodeId, Instant>,
}

impl Absences {
    /// Take in a read of the live members made at `now`: a node of the map
    /// that is not live starts its clock (or keeps it running); a live one,
    /// or one no longer in the map, loses it.
    pub(crate) fn observe(&mut self, in_map: &[NodeId], live: &BTreeSet<NodeId>, now: Instant) {
        self.since
            .retain(|n, _| in_map.contains(n) && !live.contains(n));
        for &n in in_map {
            if !live.contains(&n) {
                self.since.entry(n).or_insert(now);
            }
        }
    }

    /// Restart every clock (the members could not be read).
    pub(crate) fn forget(&mut self) {
        self.since.clear();
    }

    /// The nodes absent for at least `after` at `now`.
    pub(crate) fn gone(&self, after: Duration, now: Instant) -> Vec<NodeId> {
        self.since
            .iter()
            .filter(|(_, &t)| now.saturating_duration_since(t) >= after)
            .map(|(&n, _)| n)
            .collect()
    }
}

/// Whether `me` is the node that replaces: the lowest-id live node of the
/// map (`in_map` sorted, as [`crate::partition::PartitionMap::nodes`] gives it).
pub(crate) fn acts(me: NodeId, in_map: &[NodeId], live: &BTreeSet<NodeId>) -> bool {
    in_map.iter().find(|n| live.contains(n)) == Some(&me)
}

/// A node's replacement task: reads the live members every second (for
/// `STATS`, and the clocks) and, with `after` set, replaces the nodes gone
/// that long.
pub(crate) async fn run(meta: Meta, inner: Arc<Inner>, after: Option<Duration>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut absences = Absences::default();
    let mut refused = BTreeSet::new();
    loop {
        tick.tick().await;
        let live: BTreeSet<NodeId> = match meta.nodes().await {
            Ok(nodes) => nodes.into_keys().collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the members: absence clocks restart");
                absences.forget();
                continue;
            }
        };
        inner.replace.live.write().clone_from(&live);
        let in_map = inner.map.read().nodes();
        let now = Instant::now();
        absences.observe(&in_map, &live, now);
        let Some(after) = after else { continue };
        if !acts(inner.id, &in_map, &live) {
            continue;
        }
        for n in absences.gone(after, now) {
            replace(&meta, &inner, n, &live, after, &mut refused).await;
        }
    }
}

/// Take gone node `n` out of the map, its replicas to `live` nodes.
async fn replace(
    meta: &Meta,
    inner: &Inner,
    n: NodeId,
    live: &BTreeSet<NodeId>,
    after: Duration,
    refused: &mut BTreeSet<NodeId>,
) {
    match crate::reconcile::apply_with(meta, crate::meta::NodeMark::Replaced(n), |m| {
        m.replace_node(n, live)
    })
    .await
    {
        Ok((map, moves)) => {
            tracing::warn!(
                node = n,
                ?after,
                version = map.version,
                moves = moves.len(),
                "replaced a node gone for longer than replace_after: its replicas move to live nodes"
            );
            inner.replace.replaced.fetch_add(1, Ordering::Relaxed);
            refused.remove(&n);
            inner.placement.changed.notify_one();
        }
        // Another node did it first, or the node is back.
        Err(ClusterError::Placement(PlacementError::NoSuchNode(_)))
        | Err(ClusterError::Meta(crate::meta::MetaError::Registered(_))) => {}
        Err(e) => {
            if refused.insert(n) {
                tracing::warn!(node = n, error = %e, "cannot replace a gone node (retrying every second)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_gone_only_after_a_continuous_absence() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let after = Duration::from_secs(10);
        let mut a = Absences::default();
        let map = [1, 2, 3, 4];
        let live = |v: &[u64]| v.iter().copied().collect::<BTreeSet<_>>();
        a.observe(&map, &live(&[1, 2, 3]), s(0));
        a.observe(&map, &live(&[1, 2, 3]), s(9));
        assert!(a.gone(after, s(9)).is_empty());
        // Back for one read: the clock restarts.
        a.observe(&map, &live(&[1, 2, 3, 4]), s(9));
        a.observe(&map, &live(&[1, 2, 3]), s(12));
        assert!(a.gone(after, s(21)).is_empty());
        assert_eq!(a.gone(after, s(22)), vec![4]);
        // etcd away: every clock restarts.
        a.forget();
        a.observe(&map, &live(&[1, 2, 3]), s(30));
        assert!(a.gone(after, s(39)).is_empty());
        assert_eq!(a.gone(after, s(40)), vec![4]);
        // Out of the map (replaced): no longer counted.
        a.observe(&[1, 2, 3], &live(&[1, 2, 3]), s(41));
        assert!(a.gone(after, s(100)).is_empty());
    }

    #[test]
    fn the_lowest_live_node_of_the_map_acts() {
        let live = |v: &[u64]| v.iter().copied().collect::<BTreeSet<_>>();
        let map = [1, 2, 3, 4];
        assert!(acts(2, &map, &live(&[2, 3, 4])));
        assert!(!acts(3, &map, &live(&[2, 3, 4])));
        // A live node outside the map (being retired) does not.
        assert!(!acts(0, &map, &live(&[0, 2, 3])));
        assert!(acts(2, &map, &live(&[0, 2, 3])));
        assert!(!acts(1, &map, &live(&[])));
    }
}
