//! Recalls, read markers and deletes-for-me across nodes (docs/scaling.md,
//! "IM across partitions").
//!
//! - **Recall**: an entry of the conversation's partition
//!   ([`Command::ImRecall`]). Applying it checks that the target is the
//!   user's message and not recalled yet, lists it in the conversation's
//!   [`IM_RECALLS`] timeline, and stores a recall event, delivered to the
//!   members' sync timelines as a message is (a read-fan-out group's is
//!   stored only, and told to every node for push).
//! - **Read marker, delete-for-me**: an entry of the user's partition
//!   ([`Command::ImMark`]), since the mark is written to the user's sync
//!   timeline (and a read marker to the user's [`IM_READS`] timeline).
//!   Before proposing it, the user partition's leader asks the
//!   conversation partition's leader ([`ConvInfo`]: here, or over the
//!   peer link as [`KIND_CONV_INFO`]) whether the user was ever a member,
//!   the last seq its stays reach (module [`crate::members`]) and whether
//!   they cover the seq named. Stays below the conversation's last seq
//!   never change (a membership change takes the next seq), so that
//!   answer still holds when the entry is applied, which checks the mark
//!   against it the same way on every replica. A former member marks
//!   within its stays, as on a single node.
//!
//! [`IM_RECALLS`]: crate::log_store::IM_RECALLS
//! [`IM_READS`]: crate::log_store::IM_READS

use crate::groups::{ask_peer, no_moved, Confirmed, Refusal};
use crate::im::read::{self, ReadError};
use crate::im::ImRefusal;
use crate::members::{covers, upper};
use crate::net::{KIND_CONV_INFO, KIND_DELETES};
use crate::node::{now_ms, ClusterError, ImOutcome, Inner};
use crate::partition::{partition_of, PartitionId};
use crate::{Command, Mark};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use timeline_engine::{Keyspace, TimelineId};

/// What a conversation's leader answers about it for a user's mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvInfo {
    /// The user was a member at some seq.
    pub member: bool,
    /// The last seq the user's stays reach (the conversation's last seq
    /// for a member now).
    pub last: u64,
    /// The seq asked about is inside the user's stays.
    pub covered: bool,
}

/// A conversation probe as it travels.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Probe {
    conv: u64,
    user: u64,
    seq: u64,
}

type ProbeAnswer = Result<Result<ConvInfo, ImRefusal>, Refusal>;

/// Attempts at a probe (each follows the leader the last one named).
const ATTEMPTS: usize = 3;

/// The probe from this node's replica (its leadership confirmed).
fn info_local(inner: &Inner, pr: &Probe) -> Result<Result<ConvInfo, ImRefusal>, ReadError> {
    let e = inner.engine();
    Ok(inner.conv_members.get(e, pr.conv)?.map(|m| {
        let stays = m.stays(pr.user);
        ConvInfo {
            member: !stays.is_empty(),
            last: upper(
                &stays,
                e.last_seq(TimelineId::new(Keyspace::STORE, pr.conv)),
            ),
            covered: covers(&stays, pr.seq),
        }
    }))
}

/// Answer `pr` here if this node leads the conversation's partition `p`
/// (and confirms it with a quorum).
async fn answer_here(inner: &Inner, p: PartitionId, pr: &Probe) -> ProbeAnswer {
    Confirmed::default().leads(inner, p, pr.conv).await?;
    info_local(inner, pr).map_err(|e| Refusal::Failed(e.to_string()))
}

/// A peer's probe (the peer RPC's handler).
pub(crate) async fn serve_probe(inner: Arc<Inner>, body: Vec<u8>) -> Vec<u8> {
    let answer: ProbeAnswer = match bincode::deserialize::<Probe>(&body) {
        Err(e) => Err(Refusal::Failed(format!(
            "undecodable conversation probe: {e}"
        ))),
        Ok(pr) => {
            let p = partition_of(Keyspace::STORE.0, pr.conv, inner.map.read().len());
            answer_here(&inner, p, &pr).await
        }
    };
    bincode::serialize(&answer).unwrap_or_default()
}

/// Conversation `conv` as its partition's leader sees it for `user`.
async fn probe(
    inner: &Arc<Inner>,
    conv: u64,
    user: u64,
    seq: u64,
) -> Result<Result<ConvInfo, ImRefusal>, ClusterError> {
    let p = partition_of(Keyspace::STORE.0, conv, inner.map.read().len());
    let pr = Probe { conv, user, seq };
    at_leader(inner, p, KIND_CONV_INFO, &pr, || answer_here(inner, p, &pr)).await
}

/// `req` answered by partition `p`'s leader: `here` if this node leads
/// it, else asked over the peer link as `kind`; three attempts, each
/// following the leader the last one named. Never `MOVED`: the caller
/// was asked for another partition.
async fn at_leader<Q, A, Fut>(
    inner: &Arc<Inner>,
    p: PartitionId,
    kind: u8,
    req: &Q,
    here: impl Fn() -> Fut,
) -> Result<A, ClusterError>
where
    Q: Serialize,
    A: serde::de::DeserializeOwned,
    Fut: std::future::Future<Output = Result<A, Refusal>>,
{
    let mut hint = None;
    for _ in 0..ATTEMPTS {
        let answer = if inner.leads(p) {
            here().await
        } else {
            let Some(node) = hint
                .or_else(|| inner.leader_hint(p))
                .filter(|&n| n != inner.id)
            else {
                return Err(ClusterError::NoLeader { partition: p });
            };
            ask_peer::<_, Result<A, Refusal>>(inner, node, p, kind, req)
                .await
                .map_err(no_moved)?
        };
        match answer {
            Ok(r) => return Ok(r),
            Err(Refusal::NotLeader(l)) => hint = l,
            Err(Refusal::Failed(m)) => return Err(ClusterError::Raft(m)),
        }
    }
    Err(ClusterError::NoLeader { partition: p })
}

/// A user's deletes in a conversation, as asked of its partition's leader.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct DeletesRead {
    user: u64,
    conv: u64,
}

type DeletesAnswer = Result<Vec<u64>, Refusal>;

/// Answer `r` here if this node leads the user's partition `p` (and
/// confirms it with a quorum).
async fn deletes_here(inner: &Inner, p: PartitionId, r: &DeletesRead) -> DeletesAnswer {
    if !inner.leads(p) {
        return Err(Refusal::NotLeader(
            inner.leader_hint(p).filter(|&l| l != inner.id),
        ));
    }
    inner
        .linearize(Keyspace::SYNC.0, r.user)
        .await
        .map_err(|e| match e {
            ClusterError::Moved { .. } | ClusterError::NoLeader { .. } => Refusal::NotLeader(None),
            e => Refusal::Failed(e.to_string()),
        })?;
    read::deletes(inner.engine(), r.user, r.conv).map_err(|e| Refusal::Failed(e.to_string()))
}

/// A peer's request for a user's deletes (the peer RPC's handler).
pub(crate) async fn serve_deletes(inner: Arc<Inner>, body: Vec<u8>) -> Vec<u8> {
    let answer: DeletesAnswer = match bincode::deserialize::<DeletesRead>(&body) {
        Err(e) => Err(Refusal::Failed(format!("undecodable deletes request: {e}"))),
        Ok(r) => {
            let p = partition_of(Keyspace::SYNC.0, r.user, inner.map.read().len());
            deletes_here(&inner, p, &r).await
        }
    };
    bincode::serialize(&answer).unwrap_or_default()
}

/// The seqs of `conv` that `user` deleted for itself, from the leader of
/// the user's partition.
pub(crate) async fn deletes(
    inner: &Arc<Inner>,
    user: u64,
    conv: u64,
) -> Result<Vec<u64>, ClusterError> {
    let p = partition_of(Keyspace::SYNC.0, user, inner.map.read().len());
    let r = DeletesRead { user, conv };
    at_leader(inner, p, KIND_DELETES, &r, || deletes_here(inner, p, &r)).await
}

/// `user`'s `mark` of `seq` in `conv`: proposed to the user's partition
/// (which this node must lead: else `MOVED` for it) once the
/// conversation's leader answered. `Done` carries the read marker now
/// (a read) or the `DeletedMarker`'s sync seq (a delete).
pub(crate) async fn mark(
    inner: Arc<Inner>,
    user: u64,
    conv: u64,
    seq: u64,
    mark: Mark,
) -> Result<ImOutcome, ClusterError> {
    let up = partition_of(Keyspace::SYNC.0, user, inner.map.read().len());
    inner.check_leads(up)?;
    // A `MOVED` naming the conversation's leader would send the client
    // away from the user's.
    let info = match probe(&inner, conv, user, seq).await.map_err(no_moved)? {
        Err(r) => return Ok(ImOutcome::Refused(r)),
        Ok(i) if !i.member => return Ok(ImOutcome::Refused(ImRefusal::NotMember { conv, user })),
        // A seq between two stays (the apply checks 1 ≤ seq ≤ last).
        Ok(i) if mark == Mark::Delete && seq <= i.last && !i.covered => {
            return Ok(ImOutcome::Refused(ImRefusal::Invalid(format!(
                "user {user} cannot see seq {seq} of conversation {conv}"
            ))))
        }
        Ok(i) => i,
    };
    let cmd = Command::ImMark {
        user,
        conv,
        seq,
        mark,
        last: info.last,
        ts: now_ms(),
    };
    let a = inner.submit(up, cmd).await?;
    match a.im {
        None => Err(ClusterError::Raft("the entry answered nothing".into())),
        Some(Err(r)) => Ok(ImOutcome::Refused(r)),
        Some(Ok(ia)) => Ok(ImOutcome::Done {
            conv_seq: ia.conv_seq,
            duplicate: false,
        }),
    }
}
