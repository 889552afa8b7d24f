//! Cluster metadata in etcd: who is a member (leased records), and the
//! partition → replicas map with its version.
//!
//! Keys, under `/timeline/<cluster>/`:
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `nodes/<id, 20 digits>` | [`NodeRecord`] (JSON) | the node's lease: gone `lease_ttl` after the node stops renewing |
//! | `map` | [`PartitionMap`] (JSON) | created once by a transaction that only succeeds if it is absent; changed only by a transaction that compares the whole previous value |
//! | `initial-map` | the map as it was created (JSON) | written in the same transaction as `map`, never changed: who initializes each partition's group |
//!
//! etcd is not on the data path: a node that loses etcd keeps serving the
//! partitions it leads with the addresses it last saw; only membership and
//! placement changes wait for etcd (docs/scaling.md, "etcd unavailable").

use crate::partition::PartitionMap;
use crate::NodeId;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use std::collections::BTreeMap;
use std::time::Duration;

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Where clients reach it (the binary protocol).
    pub client: String,
    /// Where peers reach it (Raft RPCs).
    pub raft: String,
}

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd holds an undecodable {what}: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("the partition map changed under this change (now version {0}); retry on the new map")]
    Conflict(u64),
    #[error("node {0} is registered again: it is not gone")]
    Registered(crate::NodeId),
    #[error("node {0} has no replaced mark (an operator removed it): it stays out")]
    NotReplaced(crate::NodeId),
}

/// What a map change records about one node, besides the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMark {
    /// Nothing.
    Unchanged,
    /// The node is taken out because it is gone: the change applies only
    /// while the node has no membership record, and leaves a `replaced`
    /// mark, so that the node, if it was running cut off from etcd, adds
    /// itself back when it registers again.
    Replaced(NodeId),
    /// The node is put back, or an operator decided its place: any
    /// `replaced` mark goes.
    Settled(NodeId),
    /// The node puts itself back because it was replaced: the change
    /// applies only while its `replaced` mark is there, and removes it (an
    /// operator's `remove-node` in between clears the mark: it stays out).
    Rejoin(NodeId),
}

/// A handle on the cluster's keys in etcd (cheap to clone).
#[derive(Clone)]
pub struct Meta {
    client: Client,
    root: String,
}

impl Meta {
    /// Connect to `endpoints` (`host:port`, any member of the etcd cluster).
    pub async fn connect(endpoints: &[String], cluster: &str) -> Result<Meta, MetaError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2));
        let client = Client::connect(endpoints, Some(opts)).await?;
        Ok(Meta {
            client,
            root: format!("/timeline/{cluster}/"),
        })
    }

    fn node_key(&self, id: NodeId) -> String {
        format!("{}nodes/{id:020}", self.root)
    }

    fn map_key(&self) -> String {
        format!("{}map", self.root)
    }

    fn initial_key(&self) -> String {
        format!("{}initial-map", self.root)
    }

    fn replaced_key(&self, id: NodeId) -> String {
        format!("{}replaced/{id:020}", self.root)
    }

    /// The prefix every key of this cluster starts with (to watch).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Publish `rec` under a new lease of `ttl`; returns the lease id.
    pub async fn register(&self, rec: &NodeRecord, ttl: Duration) -> Result<i64, MetaError> {
        let mut c = self.client.clone();
        let lease = c.lease_grant(ttl.as_secs().max(1) as i64, None).await?.id();
        let value = serde_json::to_vec(rec).map_err(|source| MetaError::Decode {
            what: "node record",
            source,
        })?;
        c.put(
            self.node_key(rec.id),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
        Ok(lease)
    }

    /// Renew `lease` once; `false` if etcd says it has expired.
    pub async fn renew(&self, lease: i64) -> Result<bool, MetaError> {
        let mut c = self.client.clone();
        // Opening etcd-client's keep-alive sends the first renewal, and it
        // fails (an error, not a TTL of 0) when the lease is gone: ask etcd
        // which it was, so an expired lease is not taken for etcd away.
        match c.lease_keep_alive(lease).await {
            Ok(_) => Ok(true),
            Err(e) => match c.lease_time_to_live(lease, None).await {
                Ok(r) if r.ttl() <= 0 => Ok(false),
                _ => Err(e.into()),
            },
        }
    }

    /// The members whose leases are alive.
    pub async fn nodes(&self) -> Result<BTreeMap<NodeId, NodeRecord>, MetaError> {
        let mut c = self.client.clone();
        let r = c
            .get(
                format!("{}nodes/", self.root),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let mut out = BTreeMap::new();
        for kv in r.kvs() {
            let rec: NodeRecord =
                serde_json::from_slice(kv.value()).map_err(|source| MetaError::Decode {
                    what: "node record",
                    source,
                })?;
            out.insert(rec.id, rec);
        }
        Ok(out)
    }

    /// The partition map, if the cluster has been formed.
    pub async fn map(&self) -> Result<Option<PartitionMap>, MetaError> {
        self.read_map(self.map_key()).await
    }

    /// The map as the cluster was formed with (`None` for a cluster formed
    /// by a build before it was kept).
    pub async fn initial_map(&self) -> Result<Option<PartitionMap>, MetaError> {
        self.read_map(self.initial_key()).await
    }

    async fn read_map(&self, key: String) -> Result<Option<PartitionMap>, MetaError> {
        let mut c = self.client.clone();
        let r = c.get(key, None).await?;
        match r.kvs().first() {
            None => Ok(None),
            Some(kv) => serde_json::from_slice(kv.value())
                .map(Some)
                .map_err(|source| MetaError::Decode {
                    what: "partition map",
                    source,
                }),
        }
    }

    /// Create the map if there is none; `false` if another node's came
    /// first (then read that one).
    pub async fn create_map(&self, map: &PartitionMap) -> Result<bool, MetaError> {
        let value = serde_json::to_vec(map).map_err(|source| MetaError::Decode {
            what: "partition map",
            source,
        })?;
        let key = self.map_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(key, value.clone(), None),
                TxnOp::put(self.initial_key(), value, None),
            ]);
        let mut c = self.client.clone();
        Ok(c.txn(txn).await?.succeeded())
    }

    /// Replace `old` by `new` in one transaction that only succeeds if the
    /// stored map is still exactly `old` (so two concurrent placement
    /// changes cannot both apply to the same version).
    pub async fn replace_map(
        &self,
        old: &PartitionMap,
        new: &PartitionMap,
    ) -> Result<(), MetaError> {
        self.replace_map_marking(old, new, NodeMark::Unchanged)
            .await
    }

    /// [`Meta::replace_map`], recording in the same transaction what
    /// `mark` says about one node.
    pub async fn replace_map_marking(
        &self,
        old: &PartitionMap,
        new: &PartitionMap,
        mark: NodeMark,
    ) -> Result<(), MetaError> {
        let enc = |m: &PartitionMap| {
            serde_json::to_vec(m).map_err(|source| MetaError::Decode {
                what: "partition map",
                source,
            })
        };
        let key = self.map_key();
        let mut when = vec![Compare::value(key.clone(), CompareOp::Equal, enc(old)?)];
        let mut then = vec![TxnOp::put(key, enc(new)?, None)];
        match mark {
            NodeMark::Unchanged => {}
            NodeMark::Replaced(n) => {
                when.push(Compare::version(self.node_key(n), CompareOp::Equal, 0));
                then.push(TxnOp::put(
                    self.replaced_key(n),
                    new.version.to_string(),
                    None,
                ));
            }
            NodeMark::Settled(n) => then.push(TxnOp::delete(self.replaced_key(n), None)),
            NodeMark::Rejoin(n) => {
                when.push(Compare::version(
                    self.replaced_key(n),
                    CompareOp::Greater,
                    0,
                ));
                then.push(TxnOp::delete(self.replaced_key(n), None));
            }
        }
        let txn = Txn::new().when(when).and_then(then);
        let mut c = self.client.clone();
        if c.txn(txn).await?.succeeded() {
            return Ok(());
        }
        let now = self.map().await?;
        match (now, mark) {
            (Some(m), NodeMark::Replaced(n)) if m == *old => Err(MetaError::Registered(n)),
            (Some(m), NodeMark::Rejoin(n)) if m == *old => Err(MetaError::NotReplaced(n)),
            (now, _) => Err(MetaError::Conflict(now.map_or(0, |m| m.version))),
        }
    }

    /// Remove node `id`'s `replaced` mark (an operator retires a node that
    /// was already replaced).
    pub async fn clear_replaced(&self, id: NodeId) -> Result<(), MetaError> {
        let mut c = self.client.clone();
        c.delete(self.replaced_key(id), None).await?;
        Ok(())
    }

    /// Whether node `id` was taken out of the map because it was gone, and
    /// has not been put back (or removed by an operator) since.
    pub async fn was_replaced(&self, id: NodeId) -> Result<bool, MetaError> {
        let mut c = self.client.clone();
        let r = c.get(self.replaced_key(id), None).await?;
        Ok(!r.kvs().is_empty())
    }

    /// A stream of the cluster's key changes (any member or the map).
    pub async fn watch(&self) -> Result<etcd_client::WatchStream, MetaError> {
        let mut c = self.client.clone();
        Ok(c.watch(
            self.root.clone(),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await?)
    }
}
