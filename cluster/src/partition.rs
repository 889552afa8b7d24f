//! Partitions: which partition a timeline belongs to, and which nodes hold
//! each partition.
//!
//! `P` (the number of partitions) is fixed when the cluster is created: a
//! timeline's partition is `hash(keyspace, id) % P`, so changing `P` would
//! move almost every timeline. Choose it for the largest cluster the data
//! will grow to: each node should hold tens of partitions, so that adding
//! a node moves whole partitions in small steps (64 partitions × 3
//! replicas over 3 nodes is 64 replicas each; over 32 nodes, 6). The hash
//! is SplitMix64's finalizer, not `std`'s `DefaultHasher`, whose output may
//! change between Rust releases: a timeline must land in the same
//! partition on every node and every build.

use crate::NodeId;
use std::collections::BTreeMap;

/// Default number of partitions.
pub const DEFAULT_PARTITIONS: u32 = 64;
/// Default replicas per partition.
pub const DEFAULT_REPLICAS: usize = 3;

/// A partition's number, `0..P`.
pub type PartitionId = u32;

/// The partition of timeline (`keyspace`, `id`) among `partitions`: the
/// protocol's routing hash (clients compute it too).
pub use timeline_protocol::partition_of;

/// Why a placement change was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("node {0} is already a member")]
    NodeExists(NodeId),
    #[error("node {0} is not a member")]
    NoSuchNode(NodeId),
    #[error("{nodes} node(s) cannot hold {replicas} distinct replicas of a partition")]
    TooFewNodes { nodes: usize, replicas: usize },
    #[error("partition {0} does not exist")]
    NoSuchPartition(PartitionId),
    #[error("node {node} already holds a replica of partition {partition}")]
    AlreadyReplica {
        node: NodeId,
        partition: PartitionId,
    },
}

/// The partition → replicas map, with the version every change bumps (the
/// document the cluster keeps in etcd; a node or client holding an older
/// version learns the newer one from a `MOVED` answer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionMap {
    pub version: u64,
    pub replicas_per_partition: usize,
    /// Each partition's replicas; the first is the preferred leader.
    pub partitions: Vec<Vec<NodeId>>,
}

impl PartitionMap {
    /// A map of `partitions` partitions over `nodes`, `replicas` each on
    /// distinct nodes, spread round-robin (each node leads and holds as
    /// many partitions as any other, within one).
    pub fn new(partitions: u32, replicas: usize, nodes: &[NodeId]) -> Result<Self, PlacementError> {
        let mut nodes = nodes.to_vec();
        nodes.sort_unstable();
        nodes.dedup();
        if nodes.len() < replicas || replicas == 0 {
            return Err(PlacementError::TooFewNodes {
                nodes: nodes.len(),
                replicas,
            });
        }
        let partitions = (0..partitions as usize)
            .map(|p| {
                (0..replicas)
                    .map(|r| nodes[(p + r) % nodes.len()])
                    .collect()
            })
            .collect();
        Ok(PartitionMap {
            version: 1,
            replicas_per_partition: replicas,
            partitions,
        })
    }

    pub fn len(&self) -> u32 {
        self.partitions.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// The replicas of timeline (`keyspace`, `id`)'s partition.
    pub fn replicas_of(&self, keyspace: u8, id: u64) -> (PartitionId, &[NodeId]) {
        let p = partition_of(keyspace, id, self.len());
        (p, &self.partitions[p as usize])
    }

    /// The nodes that hold at least one replica.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.partitions.iter().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Replicas per node.
    pub fn load(&self) -> BTreeMap<NodeId, usize> {
        let mut m = BTreeMap::new();
        for &n in self.partitions.iter().flatten() {
            *m.entry(n).or_insert(0) += 1;
        }
        m
    }

    /// Move one replica of `partition` from `from` to `to` (a node not yet
    /// holding it). The new version is returned.
    pub fn move_replica(
        &mut self,
        partition: PartitionId,
        from: NodeId,
        to: NodeId,
    ) -> Result<u64, PlacementError> {
        let reps = self
            .partitions
            .get_mut(partition as usize)
            .ok_or(PlacementError::NoSuchPartition(partition))?;
        if reps.contains(&to) {
            return Err(PlacementError::AlreadyReplica {
                node: to,
                partition,
            });
        }
        let slot = reps
            .iter_mut()
            .find(|n| **n == from)
            .ok_or(PlacementError::NoSuchNode(from))?;
        *slot = to;
        self.version += 1;
        Ok(self.version)
    }

    /// Add node `n`: replicas move to it from the most loaded nodes until it
    /// holds its share (within one of the others). Returns the moves made.
    pub fn add_node(
        &mut self,
        n: NodeId,
    ) -> Result<Vec<(PartitionId, NodeId, NodeId)>, PlacementError> {
        if self.nodes().contains(&n) {
            return Err(PlacementError::NodeExists(n));
        }
        let total = self.partitions.len() * self.replicas_per_partition;
        let share = total / (self.nodes().len() + 1);
        let mut moves = Vec::new();
        while self.load().get(&n).copied().unwrap_or(0) < share {
            let load = self.load();
            let Some((&busiest, _)) = load.iter().filter(|(&k, _)| k != n).max_by_key(|(_, &c)| c)
            else {
                break;
            };
            let Some(p) = (0..self.len()).find(|&p| {
                let r = &self.partitions[p as usize];
                r.contains(&busiest) && !r.contains(&n)
            }) else {
                break;
            };
            self.move_replica(p, busiest, n)?;
            moves.push((p, busiest, n));
        }
        Ok(moves)
    }

    /// Remove node `n`: each of its replicas moves to the least loaded node
    /// that does not hold that partition. Returns the moves made.
    pub fn remove_node(
        &mut self,
        n: NodeId,
    ) -> Result<Vec<(PartitionId, NodeId, NodeId)>, PlacementError> {
        let others: Vec<NodeId> = self.nodes().into_iter().filter(|&x| x != n).collect();
        self.move_all_to(n, &others)
    }

    /// Replace node `n`, which is gone: each of its replicas moves to the
    /// least loaded node of the map that is in `live` (the members whose
    /// leases are alive) and does not hold that partition. A node that is
    /// down as well, or live but outside the map (being retired), takes
    /// nothing. Returns the moves made.
    pub fn replace_node(
        &mut self,
        n: NodeId,
        live: &std::collections::BTreeSet<NodeId>,
    ) -> Result<Vec<(PartitionId, NodeId, NodeId)>, PlacementError> {
        let others: Vec<NodeId> = self
            .nodes()
            .into_iter()
            .filter(|&x| x != n && live.contains(&x))
            .collect();
        self.move_all_to(n, &others)
    }

    /// Move every replica of `n` to the least loaded of `to` that does not
    /// hold its partition; all or nothing.
    fn move_all_to(
        &mut self,
        n: NodeId,
        to: &[NodeId],
    ) -> Result<Vec<(PartitionId, NodeId, NodeId)>, PlacementError> {
        if !self.nodes().contains(&n) {
            return Err(PlacementError::NoSuchNode(n));
        }
        let too_few = PlacementError::TooFewNodes {
            nodes: to.len(),
            replicas: self.replicas_per_partition,
        };
        if to.len() < self.replicas_per_partition {
            return Err(too_few);
        }
        let mut next = self.clone();
        let mut moves = Vec::new();
        for p in 0..next.len() {
            if !next.partitions[p as usize].contains(&n) {
                continue;
            }
            let load = next.load();
            let dest = to
                .iter()
                .copied()
                .filter(|o| !next.partitions[p as usize].contains(o))
                .min_by_key(|o| (load.get(o).copied().unwrap_or(0), *o))
                .ok_or_else(|| too_few.clone())?;
            next.move_replica(p, n, dest)?;
            moves.push((p, n, dest));
        }
        *self = next;
        Ok(moves)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn distinct(m: &PartitionMap) -> bool {
        m.partitions.iter().all(|r| {
            let mut v = r.clone();
            v.sort_unstable();
            v.dedup();
            v.len() == r.len()
        })
    }

    #[test]
    fn timelines_spread_evenly_and_stay_put() {
        let mut counts = vec![0u32; 64];
        for id in 0..64_000u64 {
            counts[partition_of(1, id, 64) as usize] += 1;
        }
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*lo > 800 && *hi < 1200, "{lo}..{hi}");
        // Fixed: the same inputs always give the same partition.
        assert_eq!(partition_of(0, 42, 64), partition_of(0, 42, 64));
        assert_ne!(
            (0..100).map(|i| partition_of(0, i, 64)).collect::<Vec<_>>(),
            (0..100).map(|i| partition_of(1, i, 64)).collect::<Vec<_>>(),
            "the keyspace is part of the key"
        );
    }

    #[test]
    fn placement_keeps_replicas_distinct_and_load_even() {
        let mut m = PartitionMap::new(64, 3, &[1, 2, 3]).unwrap();
        assert!(distinct(&m));
        assert_eq!(
            m.load().values().copied().collect::<Vec<_>>(),
            vec![64, 64, 64]
        );
        let moves = m.add_node(4).unwrap();
        assert_eq!(moves.len(), 48, "a quarter of the 192 replicas");
        assert!(distinct(&m));
        let load = m.load();
        assert!(load.values().all(|&c| c == 48), "{load:?}");
        assert_eq!(m.version, 1 + 48);
        m.remove_node(2).unwrap();
        assert!(distinct(&m) && !m.nodes().contains(&2));
        assert!(m.load().values().all(|&c| c == 64), "{:?}", m.load());
        assert_eq!(
            m.remove_node(1),
            Err(PlacementError::TooFewNodes {
                nodes: 2,
                replicas: 3
            })
        );
        assert!(PartitionMap::new(8, 3, &[1, 2]).is_err());
        assert_eq!(m.add_node(3), Err(PlacementError::NodeExists(3)));
    }

    #[test]
    fn a_gone_node_is_replaced_by_live_members_of_the_map_only() {
        let mut m = PartitionMap::new(64, 3, &[1, 2, 3, 4, 5]).unwrap();
        let before = m.clone();
        // 5 is gone; 4 is down too; 9 is live but outside the map.
        let live = [1, 2, 3, 9].into_iter().collect();
        let moves = m.replace_node(5, &live).unwrap();
        assert!(distinct(&m) && !m.nodes().contains(&5) && !m.nodes().contains(&9));
        assert_eq!(moves.len(), before.load()[&5]);
        assert!(moves
            .iter()
            .all(|&(_, from, to)| from == 5 && to != 4 && to <= 3));
        assert_eq!(
            m.load()[&4],
            before.load()[&4],
            "a node that is down takes nothing"
        );
        // Two live nodes of the map cannot hold three replicas: nothing moves.
        let mut m = before.clone();
        let live = [1, 2, 9].into_iter().collect();
        assert_eq!(
            m.replace_node(5, &live),
            Err(PlacementError::TooFewNodes {
                nodes: 2,
                replicas: 3
            })
        );
        assert_eq!(m, before);
        // Three live nodes, but one of them already holds every partition
        // the gone node shares with it: each move still finds a node.
        let mut m = PartitionMap::new(8, 3, &[1, 2, 3, 4]).unwrap();
        let live = [1, 2, 3].into_iter().collect();
        m.replace_node(4, &live).unwrap();
        assert!(distinct(&m));
        assert_eq!(m.nodes(), vec![1, 2, 3]);
        assert_eq!(m.replace_node(4, &live), Err(PlacementError::NoSuchNode(4)));
    }
}
