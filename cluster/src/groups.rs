//! Read fan-out across nodes (docs/scaling.md, "Read fan-out across
//! nodes"): a group created with more members than the server's
//! `--hybrid-threshold` is a read-fan-out group ([`CONV_READ_GROUP`]).
//!
//! - Its `Created` event is delivered to every member's sync timeline, as
//!   any conversation's. Applying that delivery also lists the group among
//!   the user's: a record `conv` in timeline `user` of [`IM_GROUPS`], in
//!   the user's partition, kept forever (the sync TTL does not drop it).
//! - Its messages are stored in its partition only: one entry, no outbox
//!   and nothing to deliver; a `SEND` is answered once the entry is
//!   applied.
//! - A user's `SYNC`, on the user partition's leader, reads the user's
//!   groups from that replica, then a page of each from the group
//!   partition's leader: one request per leader node, all at once (here,
//!   or over the peer connection: [`KIND_GROUP_READ`]), each node
//!   confirming its leadership of each partition once before reading:
//!   each page is linearizable on its own.
//! - Push: the group partition's leader tells the nodes with members
//!   subscribed of each new message and membership change (module
//!   [`crate::members`]; [`KIND_GROUP_PUSH`]; who they are: module
//!   [`crate::interest`]); a node pushes it to the members subscribed
//!   there ([`crate::im::DeliveryHook::group_message`]). A hint,
//!   as every push: lost with the leader or a peer link.
//!
//! [`CONV_READ_GROUP`]: crate::im::CONV_READ_GROUP
//! [`IM_GROUPS`]: crate::log_store::IM_GROUPS

use crate::im::read::{self, ReadError};
use crate::im::StoreEvent;
use crate::net::{KIND_GROUP_PUSH, KIND_GROUP_READ};
use crate::node::{ClusterError, Inner};
use crate::partition::{partition_of, PartitionId};
use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use timeline_engine::{Direction, Keyspace, TimelineId};

/// A page of group `conv` for `user`: up to `limit` events after seq
/// `after` inside the user's stays, less their ends (a member's join and
/// removal reach it through its sync timeline; module
/// [`crate::members`]); `limit` 0: only the last seq it may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRead {
    pub conv: u64,
    pub user: u64,
    pub after: u64,
    pub limit: u32,
}

/// One group's page: its events after the asked seq, in seq order, and
/// the last seq the user may read there when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPage {
    pub conv: u64,
    pub events: Vec<(u64, StoreEvent)>,
    pub last: u64,
    /// The seqs among `events` whose messages are recalled (their
    /// payload is to be withheld).
    pub recalled: Vec<u64>,
}

/// A page as it travels: the stored records (write id and event), and
/// which of them are recalled.
#[derive(Debug, Serialize, Deserialize)]
struct RawPage {
    records: Vec<(u64, Vec<u8>)>,
    last: u64,
    recalled: Vec<u64>,
}

/// Why a group was not read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Refusal {
    /// It does not lead the group's partition (the leader it knows of).
    NotLeader(Option<NodeId>),
    Failed(String),
}

/// A read-fan-out group's new message, as told to every node.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct GroupEvent {
    conv: u64,
    conv_seq: u64,
    ev: StoreEvent,
}

/// Attempts at a group's page (each follows the leader the last named).
const READ_ATTEMPTS: usize = 3;

fn read_failed(p: PartitionId, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Storage {
        partition: p,
        message: e.to_string(),
    }
}

/// The group reads one node answers in one request: groups whose
/// partitions it leads, in the user's order, sharing `budget` events.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Batch {
    reads: Vec<GroupRead>,
    budget: u32,
}

/// Read `req` from this node's replica, once this node confirmed it leads
/// the group's partition.
async fn read_here(
    inner: &Arc<Inner>,
    p: PartitionId,
    req: &GroupRead,
) -> Result<RawPage, ClusterError> {
    inner.linearize(Keyspace::STORE.0, req.conv).await?;
    read_blocking(inner, p, *req).await
}

/// [`read_local`] on the runtime's blocking pool: a page can be
/// megabytes, and the runtime's worker threads run every group's Raft
/// timers and heartbeats (docs/scaling.md, "Reads and the Raft runtime").
async fn read_blocking(
    inner: &Arc<Inner>,
    p: PartitionId,
    req: GroupRead,
) -> Result<RawPage, ClusterError> {
    if req.limit == 0 {
        // Its last seq only: no page to read.
        return read_local(inner, p, &req);
    }
    let _slot = inner.blocking_reads.acquire().await;
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || read_local(&inner, p, &req))
        .await
        .unwrap_or_else(|e| Err(read_failed(p, e)))
}

/// Read `req` from this node's engine (its leadership confirmed): from
/// the first of the user's stays that has seqs after `req.after`, within
/// that stay (the next page reads the next one).
fn read_local(inner: &Inner, p: PartitionId, req: &GroupRead) -> Result<RawPage, ClusterError> {
    let e = inner.engine();
    let tl = TimelineId::new(Keyspace::STORE, req.conv);
    let found = inner.conv_members.get(e, req.conv);
    let (stays, since) = match found.map_err(|e| read_failed(p, e))? {
        Ok(m) => (m.stays(req.user), m.read_since()),
        Err(r) => return Err(read_failed(p, r)),
    };
    let len = e.last_seq(tl);
    // Each stay's seqs a page may show: (join, leave), both ends excluded,
    // from where the group is read fan-out (what came before went to the
    // members' sync timelines).
    let open: Vec<(u64, u64)> = stays
        .iter()
        .map(|&(join, leave)| {
            let from = (join + 1).max(since.max(1));
            (from, leave.saturating_sub(1).min(len))
        })
        .filter(|&(a, b)| a <= b)
        .collect();
    let last = open.last().map_or(0, |s| s.1);
    let next = open.iter().find(|s| s.1 > req.after);
    let (Some(&(lo, hi)), true) = (next, req.limit > 0) else {
        return Ok(RawPage {
            records: Vec::new(),
            last,
            recalled: Vec::new(),
        });
    };
    let from = req.after.saturating_add(1).max(lo);
    let limit = (req.limit as u64).min(hi - from + 1) as usize;
    let recs = match e.scan(tl, from, limit, Direction::Forward) {
        // A store with a TTL dropped the start: read from what it kept.
        Err(timeline_engine::Error::Truncated { first_retained, .. }) => {
            e.scan(tl, first_retained, limit, Direction::Forward)
        }
        r => r,
    }
    .map_err(|e| read_failed(p, e))?;
    let recs: Vec<_> = recs.into_iter().filter(|r| r.seq <= hi).collect();
    let recalled = match (recs.first(), recs.last()) {
        (Some(a), Some(b)) => read::recalls(e, req.conv)
            .map_err(|e| read_failed(p, e))?
            .into_iter()
            .map(|(_, t)| t)
            .filter(|t| (a.seq..=b.seq).contains(t))
            .collect(),
        _ => Vec::new(),
    };
    Ok(RawPage {
        records: recs
            .into_iter()
            .map(|r| (r.seq, r.payload.to_vec()))
            .collect(),
        last,
        recalled,
    })
}

/// `reads` from this node (each group's partition led here, confirmed
/// once per partition), in order, sharing `budget`: once it is spent, a
/// group is read for its last seq only.
async fn read_batch_here(
    inner: &Arc<Inner>,
    reads: &[GroupRead],
    budget: usize,
) -> Vec<Result<RawPage, Refusal>> {
    let parts = inner.map.read().len();
    let mut checked = Confirmed::default();
    let mut left = budget;
    let mut out = Vec::with_capacity(reads.len());
    for r in reads {
        let p = partition_of(Keyspace::STORE.0, r.conv, parts);
        if let Err(e) = checked.leads(inner, p, r.conv).await {
            out.push(Err(e));
            continue;
        }
        let req = GroupRead {
            limit: r.limit.min(left.min(u32::MAX as usize) as u32),
            ..*r
        };
        match read_blocking(inner, p, req).await {
            Ok(raw) => {
                left -= raw.records.len().min(left);
                out.push(Ok(raw));
            }
            Err(e) => out.push(Err(Refusal::Failed(e.to_string()))),
        }
    }
    out
}

/// The partitions whose leadership a request confirmed (once each: a
/// heartbeat round per partition, however many of its conversations the
/// request reads).
#[derive(Default)]
pub(crate) struct Confirmed(HashMap<PartitionId, Result<(), Refusal>>);

impl Confirmed {
    /// `Ok` if this node leads `p` (the partition of conversation `conv`)
    /// and confirmed it with a quorum; else who it thinks leads.
    pub(crate) async fn leads(
        &mut self,
        inner: &Inner,
        p: PartitionId,
        conv: u64,
    ) -> Result<(), Refusal> {
        if !inner.leads(p) {
            return Err(Refusal::NotLeader(
                inner.leader_hint(p).filter(|&l| l != inner.id),
            ));
        }
        if let Some(c) = self.0.get(&p) {
            return c.clone();
        }
        let c = inner
            .linearize(Keyspace::STORE.0, conv)
            .await
            .map_err(|e| match e {
                ClusterError::Moved { .. } | ClusterError::NoLeader { .. } => {
                    Refusal::NotLeader(None)
                }
                e => Refusal::Failed(e.to_string()),
            });
        self.0.insert(p, c.clone());
        c
    }
}

/// A peer's group reads (the peer RPC's handler).
pub(crate) async fn serve_read(inner: Arc<Inner>, body: Vec<u8>) -> Vec<u8> {
    let answer: Result<Vec<Result<RawPage, Refusal>>, String> =
        match bincode::deserialize::<Batch>(&body) {
            Err(e) => Err(format!("undecodable group reads: {e}")),
            Ok(b) if b.reads.len() > MAX_BATCH_READS => {
                Err(format!("{} group reads in one request", b.reads.len()))
            }
            Ok(b) => Ok(read_batch_here(&inner, &b.reads, b.budget as usize).await),
        };
    bincode::serialize(&answer).unwrap_or_default()
}

/// Most group reads one request carries (a bound on what a peer's request
/// can make a node do).
const MAX_BATCH_READS: usize = 65_536;

/// Decode a page's records.
fn decode(p: PartitionId, conv: u64, raw: RawPage) -> Result<GroupPage, ClusterError> {
    let mut events = Vec::with_capacity(raw.records.len());
    for (seq, b) in raw.records {
        let (_, ev) = read::decode_event(&b, conv, seq).map_err(|e| read_failed(p, e))?;
        events.push((seq, ev));
    }
    Ok(GroupPage {
        conv,
        events,
        last: raw.last,
        recalled: raw.recalled,
    })
}

/// `req`'s page from the group partition's leader, wherever it is.
async fn read_one(inner: &Arc<Inner>, req: GroupRead) -> Result<GroupPage, ClusterError> {
    let p = partition_of(Keyspace::STORE.0, req.conv, inner.map.read().len());
    let mut hint = None;
    for _ in 0..READ_ATTEMPTS {
        let raw = if inner.leads(p) {
            read_here(inner, p, &req).await?
        } else {
            let Some(node) = hint
                .or_else(|| inner.leader_hint(p))
                .filter(|&n| n != inner.id)
            else {
                return Err(ClusterError::NoLeader { partition: p });
            };
            let mut answers = ask(inner, node, p, vec![req], req.limit as usize).await?;
            match answers.pop() {
                Some(Ok(raw)) => raw,
                Some(Err(Refusal::NotLeader(l))) => {
                    hint = l;
                    continue;
                }
                Some(Err(Refusal::Failed(m))) => return Err(ClusterError::Raft(m)),
                None => return Err(ClusterError::Raft("an empty group read answer".into())),
            }
        };
        return decode(p, req.conv, raw);
    }
    Err(ClusterError::NoLeader { partition: p })
}

/// Ask node `node` for `reads` (one request); `p` names the partition a
/// failure is reported for.
async fn ask(
    inner: &Inner,
    node: NodeId,
    p: PartitionId,
    reads: Vec<GroupRead>,
    budget: usize,
) -> Result<Vec<Result<RawPage, Refusal>>, ClusterError> {
    let n = reads.len();
    let batch = Batch {
        reads,
        budget: budget.min(u32::MAX as usize) as u32,
    };
    batch_answer(ask_peer(inner, node, p, KIND_GROUP_READ, &batch).await?, n)
}

/// Send `req` to node `node` as an IM peer request of `kind` and decode
/// its answer; `p` names the partition a failure is reported for (a
/// leader out of reach is as good as none: `NO_LEADER`, retry later).
pub(crate) async fn ask_peer<Q: Serialize, A: serde::de::DeserializeOwned>(
    inner: &Inner,
    node: NodeId,
    p: PartitionId,
    kind: u8,
    req: &Q,
) -> Result<A, ClusterError> {
    let body = bincode::serialize(req).map_err(|e| ClusterError::Raft(e.to_string()))?;
    let reply = match inner.transport().im_call(node, kind, 0, body).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(partition = p, node, kind, error = %e, "peer request failed");
            return Err(ClusterError::NoLeader { partition: p });
        }
    };
    bincode::deserialize(&reply)
        .map_err(|e| ClusterError::Raft(format!("peer reply of kind {kind}: {e}")))
}

/// A batched peer answer: one per item asked (`n`), or the node's error.
pub(crate) fn batch_answer<T>(a: Result<Vec<T>, String>, n: usize) -> Result<Vec<T>, ClusterError> {
    match a {
        Ok(a) if a.len() == n => Ok(a),
        Ok(a) => Err(ClusterError::Raft(format!(
            "{} answers for {n} items asked",
            a.len()
        ))),
        Err(m) => Err(ClusterError::Raft(m)),
    }
}

/// The pages of `reqs`, in order, sharing `budget` events: a group read
/// once the budget is spent is asked only for its last seq. The pages
/// that have events, and whether any group has more than was read.
///
/// One request per leader node, all at once (each node shares the whole
/// budget among its groups; the pages are then cut to the budget in the
/// user's order, so a node may read up to one budget more than is sent).
/// A group whose leader moved meanwhile is read again on its own.
pub(crate) async fn pages(
    inner: Arc<Inner>,
    reqs: Vec<GroupRead>,
    budget: usize,
) -> Result<(Vec<GroupPage>, bool), ClusterError> {
    let parts = inner.map.read().len();
    let part = |r: &GroupRead| partition_of(Keyspace::STORE.0, r.conv, parts);
    let mut by_node: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
    for (i, r) in reqs.iter().enumerate() {
        let p = part(r);
        let node = if inner.leads(p) {
            inner.id
        } else {
            inner
                .leader_hint(p)
                .filter(|&n| n != inner.id)
                .ok_or(ClusterError::NoLeader { partition: p })?
        };
        by_node.entry(node).or_default().push(i);
    }
    let mut tasks = Vec::with_capacity(by_node.len());
    for (node, idx) in by_node {
        let reads: Vec<GroupRead> = idx.iter().map(|&i| reqs[i]).collect();
        let (inner, p) = (inner.clone(), part(&reads[0]));
        tasks.push(tokio::spawn(async move {
            let answers = if node == inner.id {
                Ok(read_batch_here(&inner, &reads, budget).await)
            } else {
                ask(&inner, node, p, reads, budget).await
            };
            (idx, answers)
        }));
    }
    let mut answers: Vec<Option<Result<RawPage, Refusal>>> =
        (0..reqs.len()).map(|_| None).collect();
    for t in tasks {
        let (idx, a) = t
            .await
            .map_err(|e| ClusterError::Raft(format!("group read task: {e}")))?;
        for (i, r) in idx.into_iter().zip(a.map_err(no_moved)?) {
            answers[i] = Some(r);
        }
    }
    let mut out = Vec::new();
    let mut left = budget;
    let mut more = false;
    for (r, a) in reqs.into_iter().zip(answers) {
        let p = part(&r);
        let mut page = match a {
            Some(Ok(raw)) => decode(p, r.conv, raw)?,
            Some(Err(Refusal::Failed(m))) => return Err(ClusterError::Raft(m)),
            // Its leader moved: on its own, from where the leader is now.
            Some(Err(Refusal::NotLeader(_))) | None => {
                let one = GroupRead {
                    limit: r.limit.min(left.min(u32::MAX as usize) as u32),
                    ..r
                };
                read_one(&inner, one).await.map_err(no_moved)?
            }
        };
        page.events.truncate(left);
        left -= page.events.len();
        let through = page.events.last().map_or(r.after, |(s, _)| *s);
        more |= through < page.last;
        if !page.events.is_empty() {
            out.push(page);
        }
    }
    Ok((out, more))
}

/// The caller was asked for the user's timeline: a `MOVED` naming a
/// group's leader would send it away from the user's.
pub(crate) fn no_moved(e: ClusterError) -> ClusterError {
    match e {
        ClusterError::Moved { partition, .. } => ClusterError::NoLeader { partition },
        e => e,
    }
}

/// The read-fan-out groups `user` was ever in, each with whether it is
/// in it now, from this node's replica.
pub(crate) fn groups_of(inner: &Inner, user: u64) -> Result<Vec<(u64, bool)>, ReadError> {
    read::groups_of(inner.engine(), user)
}

/// Tell the nodes with subscribers in group `conv` (this one too) of its
/// new message at `conv_seq`, so that each pushes it to the members
/// subscribed there; every node while this one's interest table may lack
/// someone (module [`crate::interest`]).
pub(crate) fn announce(inner: &Arc<Inner>, conv: u64, conv_seq: u64) {
    let ev = match read::event(inner.engine(), conv, conv_seq) {
        Ok(Some((_, ev))) => ev,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(conv, conv_seq, error = %e, "group message not pushed");
            return;
        }
    };
    if let Some(h) = inner.hook() {
        h.group_message(conv, conv_seq, &ev);
    }
    let Ok(body) = bincode::serialize(&GroupEvent { conv, conv_seq, ev }) else {
        return;
    };
    let peers: Vec<NodeId> = {
        let map = inner.map.read();
        let (p, replicas) = map.replicas_of(Keyspace::STORE.0, conv);
        let in_map = replicas.contains(&inner.id);
        match inner.interest.targets(conv, p, in_map, inner.id) {
            Some(nodes) => nodes,
            None => inner
                .members
                .read()
                .keys()
                .copied()
                .filter(|&n| n != inner.id)
                .collect(),
        }
    };
    for node in peers {
        // A hint: with this many already in flight (a peer slow or gone,
        // each call up to its 5 s deadline) it is dropped, not queued.
        if inner.group_pushes.fetch_add(1, Ordering::AcqRel) >= MAX_PUSHES_IN_FLIGHT {
            inner.group_pushes.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        inner.interest.counters.sent.fetch_add(1, Ordering::Relaxed);
        let (inner, body) = (inner.clone(), body.clone());
        tokio::spawn(async move {
            let _ = inner
                .transport()
                .im_call(node, KIND_GROUP_PUSH, 0, body)
                .await;
            inner.group_pushes.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Group messages being told to peers at once, at most.
const MAX_PUSHES_IN_FLIGHT: usize = 4096;

/// A peer's group message (the peer RPC's handler): pushed to the members
/// subscribed here.
pub(crate) async fn serve_push(inner: Arc<Inner>, body: Vec<u8>) -> Vec<u8> {
    if let (Ok(g), Some(h)) = (bincode::deserialize::<GroupEvent>(&body), inner.hook()) {
        h.group_message(g.conv, g.conv_seq, &g.ev);
    }
    Vec::new()
}
