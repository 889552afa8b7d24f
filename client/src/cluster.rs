//! A client of a cluster: keeps the partition map, sends each raw-timeline
//! request straight to its partition's leader, and follows `MOVED`
//! (docs/protocol.md §15).
//!
//! Retries are only automatic where nothing was done: `MOVED` and
//! `NO_LEADER` (the request was refused), a connection that could not be
//! made, and reads. A write whose connection broke after it was sent, or
//! that got `UNCERTAIN`, may or may not be applied; the caller gets the
//! error and decides (read the timeline back before writing again).

use crate::{Client, ClientError, Result};
use protocol::{routing, ErrorCode, Request, Response};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use timeline_protocol as protocol;

/// Counts of what the routing did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteStats {
    pub moved: u64,
    pub no_leader: u64,
    pub reconnects: u64,
    pub map_fetches: u64,
}

/// A routing client over a cluster's nodes.
pub struct ClusterClient {
    seeds: Vec<String>,
    token: Vec<u8>,
    conns: HashMap<String, Client>,
    partitions: u32,
    version: u64,
    leaders: Vec<Option<String>>,
    /// How long one call keeps retrying refusals (`MOVED` loops,
    /// elections, nodes that are down).
    pub retry_for: Duration,
    /// See [`ClusterClient::set_reply_timeout`].
    reply_timeout: Option<Duration>,
    pub stats: RouteStats,
}

/// The timeline whose partition serves a request: a raw request's own; a
/// conversation's store timeline; a user's sync timeline for `SYNC`.
fn timeline_of(r: &Request<'_>) -> Option<protocol::TimelineId> {
    match r {
        Request::AppendBatch { items, .. } => items.first().map(|(t, _)| *t),
        Request::Append { timeline, .. }
        | Request::Get { timeline, .. }
        | Request::Scan { timeline, .. }
        | Request::LastSeq { timeline } => Some(*timeline),
        Request::CreateConversation { conv, .. }
        | Request::Send { conv, .. }
        | Request::Recall { conv, .. }
        | Request::AddMember { conv, .. }
        | Request::RemoveMember { conv, .. }
        | Request::History { conv, .. }
        | Request::Members { conv } => Some(protocol::TimelineId::store(*conv)),
        // A user's own marks go to its partition (protocol.md §15).
        Request::MarkRead { user, .. }
        | Request::DeleteForUser { user, .. }
        | Request::Conversations { user } => Some(protocol::TimelineId::sync(*user)),
        // A node pushes the sync entries its replicas apply: subscribe
        // where the user's sync timeline is led (protocol.md §15).
        Request::Sync { user, .. } | Request::Subscribe { user } => {
            Some(protocol::TimelineId::sync(*user))
        }
        _ => None,
    }
}

impl ClusterClient {
    /// Connect to any of `seeds` (`host:port`) and fetch the map.
    pub fn connect(seeds: &[String], token: &[u8]) -> Result<ClusterClient> {
        let mut c = ClusterClient {
            seeds: seeds.to_vec(),
            token: token.to_vec(),
            conns: HashMap::new(),
            partitions: 0,
            version: 0,
            leaders: Vec::new(),
            retry_for: Duration::from_secs(10),
            reply_timeout: None,
            stats: RouteStats::default(),
        };
        c.refresh()?;
        Ok(c)
    }

    /// How long one node may take to answer a request before the call
    /// gives up on that connection (`None`, the default: forever). A read
    /// then tries another node; a write fails with
    /// [`ClientError::TimedOut`](crate::ClientError::TimedOut), its outcome
    /// unknown.
    pub fn set_reply_timeout(&mut self, t: Option<Duration>) {
        self.reply_timeout = t;
        for c in self.conns.values_mut() {
            c.set_reply_timeout(t);
        }
    }

    /// P and the map version as last fetched.
    pub fn shape(&self) -> (u32, u64) {
        (self.partitions, self.version)
    }

    fn conn(&mut self, addr: &str) -> Result<&mut Client> {
        if !self.conns.contains_key(addr) {
            let mut c = Client::connect(addr, &self.token)?;
            c.set_reply_timeout(self.reply_timeout);
            self.stats.reconnects += 1;
            self.conns.insert(addr.to_string(), c);
        }
        self.conns
            .get_mut(addr)
            .ok_or_else(|| ClientError::Unexpected("connection vanished".into()))
    }

    /// Fetch the map from the first node that answers (seeds, then the
    /// leaders already known).
    pub fn refresh(&mut self) -> Result<()> {
        let mut tried: Vec<String> = self.seeds.clone();
        for a in self.leaders.iter().flatten() {
            if !tried.contains(a) {
                tried.push(a.clone());
            }
        }
        let mut last = None;
        for addr in tried {
            let r = self.conn(&addr).and_then(|c| c.call(&Request::ClusterMap));
            match r {
                Ok(Response::ClusterMap { partitions, .. })
                    if partitions > routing::MAX_PARTITIONS =>
                {
                    last = Some(ClientError::Unexpected(format!(
                        "{addr} sent a map of {partitions} partitions (at most {})",
                        routing::MAX_PARTITIONS
                    )));
                }
                Ok(Response::ClusterMap {
                    version,
                    partitions,
                    leaders,
                }) => {
                    self.stats.map_fetches += 1;
                    self.partitions = partitions;
                    self.version = version;
                    self.leaders = vec![None; partitions as usize];
                    for (a, p) in leaders {
                        if let Some(slot) = self.leaders.get_mut(p as usize) {
                            *slot = Some(a);
                        }
                    }
                    return Ok(());
                }
                Ok(other) => last = Some(ClientError::Unexpected(format!("{other:?}"))),
                Err(e) => {
                    self.conns.remove(&addr);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Unexpected("no seed address".into())))
    }

    fn route(&self, r: &Request<'_>) -> String {
        let hint = timeline_of(r).and_then(|t| {
            let p = routing::partition_of(t.keyspace.0, t.id, self.partitions);
            self.leaders.get(p as usize).cloned().flatten()
        });
        hint.or_else(|| self.seeds.first().cloned())
            .unwrap_or_default()
    }

    /// Send one request to the node that leads its timeline's partition,
    /// following `MOVED` and waiting out elections for up to `retry_for`.
    /// An `APPEND_BATCH` goes as one batch per partition it touches (a
    /// node takes only items of partitions it leads), the seqs merged in
    /// item order; like a single node's batch it is not atomic: after an
    /// error, the batches sent before it stay written.
    pub fn call(&mut self, r: &Request<'_>) -> Result<Response> {
        if let Request::AppendBatch { durability, items } = r {
            return self.append_batch(*durability, items);
        }
        self.call_one(r)
    }

    fn append_batch(
        &mut self,
        durability: Option<protocol::Durability>,
        items: &[(protocol::TimelineId, &[u8])],
    ) -> Result<Response> {
        let mut by_partition: Vec<(u32, Vec<usize>)> = Vec::new();
        for (i, (t, _)) in items.iter().enumerate() {
            let p = routing::partition_of(t.keyspace.0, t.id, self.partitions);
            match by_partition.iter_mut().find(|(q, _)| *q == p) {
                Some((_, v)) => v.push(i),
                None => by_partition.push((p, vec![i])),
            }
        }
        let mut seqs = vec![0; items.len()];
        for (_, idx) in by_partition {
            let part = Request::AppendBatch {
                durability,
                items: idx.iter().map(|&i| items[i]).collect(),
            };
            match self.call_one(&part)? {
                Response::AppendBatch(got) if got.len() == idx.len() => {
                    for (k, &i) in idx.iter().enumerate() {
                        seqs[i] = got[k];
                    }
                }
                other => {
                    return Err(ClientError::Unexpected(format!(
                        "APPEND_BATCH of {} items answered {other:?}",
                        idx.len()
                    )))
                }
            }
        }
        Ok(Response::AppendBatch(seqs))
    }

    fn call_one(&mut self, r: &Request<'_>) -> Result<Response> {
        let deadline = Instant::now() + self.retry_for;
        let is_write = matches!(
            r,
            Request::Append { .. }
                | Request::AppendBatch { .. }
                | Request::Send { .. }
                | Request::CreateConversation { .. }
                | Request::Recall { .. }
                | Request::AddMember { .. }
                | Request::RemoveMember { .. }
                | Request::DeleteForUser { .. }
        );
        let mut addr = self.route(r);
        let mut pause = Duration::from_millis(20);
        loop {
            let (err, sent) = match self.conn(&addr) {
                Ok(c) => match c.call(r) {
                    Ok(resp) => return Ok(resp),
                    Err(e) => (e, true),
                },
                Err(e) => (e, false),
            };
            let retry_now = match &err {
                ClientError::Server {
                    code: ErrorCode::MOVED,
                    arg,
                    message,
                } => match routing::parse_moved(message) {
                    Some((p, to)) => {
                        self.stats.moved += 1;
                        if let Some(slot) = self.leaders.get_mut(p as usize) {
                            *slot = Some(to.to_string());
                        }
                        self.version = self.version.max(*arg);
                        let again = to != addr;
                        addr = to.to_string();
                        again
                    }
                    None => return Err(err),
                },
                ClientError::Server {
                    code: ErrorCode::NO_LEADER,
                    ..
                } => {
                    self.stats.no_leader += 1;
                    false
                }
                ClientError::Server { .. } => return Err(err),
                // A broken connection: the request's outcome is unknown if
                // it was a write that went out.
                _ => {
                    self.conns.remove(&addr);
                    if sent && is_write {
                        return Err(err);
                    }
                    // Try another node next (it answers or redirects).
                    let i = self
                        .seeds
                        .iter()
                        .position(|s| *s == addr)
                        .map_or(0, |i| i + 1);
                    if let Some(s) = self.seeds.get(i % self.seeds.len().max(1)) {
                        addr = s.clone();
                    }
                    false
                }
            };
            if Instant::now() > deadline {
                return Err(err);
            }
            if !retry_now {
                // A client's backoff between refusals (an election takes
                // hundreds of ms): a timer by design, not a readiness poll.
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}
