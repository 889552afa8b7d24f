//! A user's conversation list across nodes (`CONVERSATIONS`;
//! docs/scaling.md, "A user's conversations").
//!
//! - The user's partition knows which conversations the user is in: each
//!   `Created` delivery (and the user's own `MemberAdded`) applied there
//!   lists the conversation and its kind
//!   in the user's [`IM_CONVS`] timeline (in the order joined), and the
//!   user's read markers are in its [`IM_READS`] timeline.
//! - Each conversation's last seq and unread count are its partition's:
//!   the user partition's leader asks **one request per leader node**
//!   (of at most 65,536 conversations), all at once (here, or over the peer link as [`KIND_CONV_SUMMARY`]); that
//!   node confirms its leadership of each partition once, then counts, for
//!   each conversation, the entries after the user's read marker, inside
//!   the user's stays (module [`crate::members`]), that the user did not
//!   send, and says whether the user is a member now. A conversation whose leader moved meanwhile is
//!   asked again where the answer pointed (three rounds at most).
//!
//! [`IM_CONVS`]: crate::log_store::IM_CONVS
//! [`IM_READS`]: crate::log_store::IM_READS

use crate::groups::{ask_peer, batch_answer, no_moved, Confirmed, Refusal};
use crate::im::read;
use crate::net::KIND_CONV_SUMMARY;
use crate::node::{ClusterError, Inner};
use crate::partition::{partition_of, PartitionId};
use crate::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use timeline_engine::Keyspace;

/// One line of a user's conversation list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvLine {
    pub conv: u64,
    /// The conversation kind (`im::CONV_*`).
    pub kind: u8,
    pub last_seq: u64,
    pub read_seq: u64,
    /// Entries after `read_seq`, up to `last_seq`, inside the user's
    /// stays, the user did not send.
    pub unread: u64,
    /// A member now (else a former one: `last_seq` is where it left).
    pub member: bool,
    /// Read fan-out now (created so, or switched when it grew).
    pub read_fanout: bool,
}

/// What one conversation's leader is asked: the entries after `read`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct SummaryRead {
    conv: u64,
    user: u64,
    read: u64,
}

/// Its answer: the last seq the user's stays reach, the unread count,
/// whether the user is a member now and the group read fan-out.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Summary {
    last: u64,
    unread: u64,
    member: bool,
    read_fanout: bool,
}

/// `r` from this node's replica (its leadership confirmed).
fn summary(inner: &Inner, r: &SummaryRead) -> Result<Summary, read::ReadError> {
    let e = inner.engine();
    let m = inner
        .conv_members
        .get(e, r.conv)?
        .map_err(|x| read::ReadError::Damaged(format!("conversation {}: {x}", r.conv)))?;
    let stays = m.stays(r.user);
    let (last, unread) = read::unread(e, r.conv, r.user, r.read, &stays)?;
    Ok(Summary {
        last,
        unread,
        member: m.is_current(r.user),
        read_fanout: m.read_since() != 0,
    })
}

type Answers = Vec<Result<Summary, Refusal>>;

/// Rounds of asking (each follows the leaders the last one named).
const ROUNDS: usize = 3;

/// Most summaries one peer request carries (a bound on what a peer's
/// request can make a node do).
const MAX_READS: usize = 65_536;

/// `reads` from this node's replicas (each partition's leadership
/// confirmed once, then every summary read on the blocking pool: counting
/// unread entries can take long, and the runtime's worker threads run
/// every group's Raft timers; docs/scaling.md, "Reads and the Raft
/// runtime").
async fn here(inner: &Arc<Inner>, reads: &[SummaryRead]) -> Answers {
    let parts = inner.map.read().len();
    let mut confirmed = Confirmed::default();
    let mut leads = Vec::with_capacity(reads.len());
    for r in reads {
        let p = partition_of(Keyspace::STORE.0, r.conv, parts);
        leads.push(confirmed.leads(inner, p, r.conv).await);
    }
    let _slot = inner.blocking_reads.acquire().await;
    let (inner, reads) = (inner.clone(), reads.to_vec());
    let n = reads.len();
    tokio::task::spawn_blocking(move || {
        reads
            .iter()
            .zip(leads)
            .map(|(r, led)| {
                led.and_then(|()| summary(&inner, r).map_err(|e| Refusal::Failed(e.to_string())))
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| vec![Err(Refusal::Failed(e.to_string())); n])
}

/// A peer's summaries (the peer RPC's handler).
pub(crate) async fn serve(inner: Arc<Inner>, body: Vec<u8>) -> Vec<u8> {
    let answer: Result<Answers, String> = match bincode::deserialize::<Vec<SummaryRead>>(&body) {
        Err(e) => Err(format!("undecodable conversation summaries: {e}")),
        Ok(r) if r.len() > MAX_READS => Err(format!("{} summaries in one request", r.len())),
        Ok(r) => Ok(here(&inner, &r).await),
    };
    bincode::serialize(&answer).unwrap_or_default()
}

/// Ask node `node` for `reads`; `p` names the partition a failure is
/// reported for.
async fn ask(
    inner: &Inner,
    node: NodeId,
    p: PartitionId,
    reads: Vec<SummaryRead>,
) -> Result<Answers, ClusterError> {
    let n = reads.len();
    batch_answer(
        ask_peer(inner, node, p, KIND_CONV_SUMMARY, &reads).await?,
        n,
    )
}

/// The summaries of `reads`, in order: each asked of its conversation's
/// leader, one request per node per round.
async fn summaries(
    inner: &Arc<Inner>,
    reads: &[SummaryRead],
) -> Result<Vec<Summary>, ClusterError> {
    let parts = inner.map.read().len();
    let part = |r: &SummaryRead| partition_of(Keyspace::STORE.0, r.conv, parts);
    let mut out: Vec<Option<Summary>> = vec![None; reads.len()];
    let mut hints: Vec<Option<NodeId>> = vec![None; reads.len()];
    for _ in 0..ROUNDS {
        let mut by_node: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
        for (i, r) in reads.iter().enumerate().filter(|(i, _)| out[*i].is_none()) {
            let p = part(r);
            let node = match hints[i] {
                Some(n) => n,
                None if inner.leads(p) => inner.id,
                None => inner
                    .leader_hint(p)
                    .filter(|&n| n != inner.id)
                    .ok_or(ClusterError::NoLeader { partition: p })?,
            };
            by_node.entry(node).or_default().push(i);
        }
        if by_node.is_empty() {
            break;
        }
        let mut tasks = Vec::with_capacity(by_node.len());
        // A peer takes at most MAX_READS per request.
        let requests = by_node.into_iter().flat_map(|(node, idx)| {
            idx.chunks(MAX_READS)
                .map(|c| (node, c.to_vec()))
                .collect::<Vec<_>>()
        });
        for (node, idx) in requests {
            let asked: Vec<SummaryRead> = idx.iter().map(|&i| reads[i]).collect();
            let (inner, p) = (inner.clone(), part(&asked[0]));
            tasks.push(tokio::spawn(async move {
                let answers = if node == inner.id {
                    Ok(here(&inner, &asked).await)
                } else {
                    ask(&inner, node, p, asked).await
                };
                (idx, answers)
            }));
        }
        for t in tasks {
            let (idx, answers) = t
                .await
                .map_err(|e| ClusterError::Raft(format!("summary task: {e}")))?;
            for (i, a) in idx.into_iter().zip(answers?) {
                match a {
                    Ok(s) => out[i] = Some(s),
                    Err(Refusal::NotLeader(l)) => hints[i] = l.filter(|&n| n != inner.id),
                    Err(Refusal::Failed(m)) => return Err(ClusterError::Raft(m)),
                }
            }
        }
    }
    out.into_iter()
        .zip(reads)
        .map(|(s, r)| s.ok_or(ClusterError::NoLeader { partition: part(r) }))
        .collect()
}

/// `user`'s conversations in the order joined, from this node's replica
/// of the user's partition (which the caller confirmed this node leads),
/// each with its last seq and unread count from its leader.
pub(crate) async fn list(inner: Arc<Inner>, user: u64) -> Result<Vec<ConvLine>, ClusterError> {
    let storage = |e: read::ReadError| ClusterError::Storage {
        partition: partition_of(Keyspace::SYNC.0, user, inner.map.read().len()),
        message: e.to_string(),
    };
    let convs = read::convs_of(inner.engine(), user).map_err(storage)?;
    let marks = read::read_markers(inner.engine(), user).map_err(storage)?;
    let reads: Vec<SummaryRead> = convs
        .iter()
        .map(|&(conv, _)| SummaryRead {
            conv,
            user,
            read: marks.get(&conv).copied().unwrap_or(0),
        })
        .collect();
    // A `MOVED` naming a conversation's leader would send the client away
    // from the user's.
    let sums = summaries(&inner, &reads).await.map_err(no_moved)?;
    Ok(convs
        .into_iter()
        .zip(reads)
        .zip(sums)
        .map(|(((conv, kind), r), s)| ConvLine {
            conv,
            kind,
            last_seq: s.last,
            read_seq: r.read,
            unread: s.unread,
            member: s.member,
            read_fanout: s.read_fanout,
        })
        .collect())
}
