//! A cluster node's requests (`--cluster`): raw timeline commands go
//! through the timeline's partition's Raft group (docs/scaling.md).
//!
//! - `APPEND`: replicated; answered with its SeqId once a quorum logged it
//!   and this node applied it, or with `MOVED` (another node leads) or
//!   `NO_LEADER` (an election is on). The request's durability byte is not
//!   used: a cluster append is durable when a quorum's logs are.
//! - `GET`, `SCAN`, `LAST_SEQ`: served by the leader once its lease, or
//!   else a heartbeat round, confirms it still leads (linearizable;
//!   `timeline_cluster`'s `lease` module), from its engine, with the Raft
//!   index stripped from each record.
//! - `CLUSTER_MAP`: the map version, P and the leaders this node knows.
//! - `CREATE_CONVERSATION`, `SEND`, `RECALL`, `ADD_MEMBER`,
//!   `REMOVE_MEMBER`, `SYNC`, `HISTORY`, `MEMBERS`, `MARK_READ`,
//!   `DELETE_FOR_USER`, `CONVERSATIONS`: the conversation or user
//!   partition's leader (`cluster_im`; `SYNC` adds the user's
//!   read-fan-out groups' pages, read from their leaders; a mark asks the
//!   conversation's leader first).
//! - `APPEND_BATCH`: every item's partition must be led by this node
//!   (else `MOVED` or `NO_LEADER` for the first that is not, and nothing is
//!   written); each item then joins its partition's next entry, as an
//!   `APPEND` does, and the reply is every seq once all are applied (the
//!   first error otherwise: like a single node's batch, not atomic).

use super::conn::Conn;
use super::convert::{FromWire, ToWire};
use super::dispatch::{check_raw_write, scan, Answer, Ctx};
use super::errors::ToReply;
use crate::protocol::{routing, ErrorCode, ErrorReply, Opcode, Request, Response};
use std::sync::Arc;
use timeline_cluster::im::read as im_read;
use timeline_cluster::state_machine::payload_of;
use timeline_cluster::{ClusterError, Node};
use timeline_engine::{Engine, Keyspace, Record};

impl ToReply for ClusterError {
    fn reply(&self) -> ErrorReply {
        match self {
            ClusterError::Moved {
                partition,
                addr,
                version,
            } => ErrorReply::new(
                ErrorCode::MOVED,
                *version,
                routing::moved_message(*partition, addr),
            ),
            ClusterError::Uncertain { partition } => ErrorReply::new(
                ErrorCode::UNCERTAIN,
                u64::from(*partition),
                self.to_string(),
            ),
            ClusterError::NoLeader { partition } => ErrorReply::new(
                ErrorCode::NO_LEADER,
                u64::from(*partition),
                self.to_string(),
            ),
            ClusterError::InvalidArgument(m) => {
                ErrorReply::new(ErrorCode::INVALID_ARGUMENT, 0, m.clone())
            }
            ClusterError::Forbidden(m) => ErrorReply::new(ErrorCode::FORBIDDEN, 0, m.clone()),
            ClusterError::StorageFull { partition, .. } => ErrorReply::new(
                ErrorCode::STORAGE_FULL,
                u64::from(*partition),
                self.to_string(),
            ),
            _ => ErrorReply::new(ErrorCode::INTERNAL, 0, self.to_string()),
        }
    }
}

/// `f`, to be called with a cluster node's answer, made to run on the
/// server's read pool (its blocking pool with `--reads inline`) rather
/// than where the answer lands: the node's runtime, whose two threads
/// also run every group's Raft timers and heartbeats. For reads of pages
/// (`SCAN`, `SYNC`, `HISTORY`, `MEMBERS`, `CONVERSATIONS`; a `GET` or a
/// `LAST_SEQ` reads one record or a number, and stays: the hand-off
/// would cost more than the read). Reading and
/// encoding pages there held them up for seconds under heavy reads, and
/// the node's groups lost their leaders (docs/scaling.md, "Reads and the Raft runtime").
pub(crate) fn off_runtime<T: Send + 'static>(
    sh: &super::Shared,
    f: impl FnOnce(T) + Send + 'static,
) -> impl FnOnce(T) + Send + 'static {
    let pool = sh.read_pool.as_ref().unwrap_or(&sh.pool).spawner();
    move |r| pool.spawn(move || f(r))
}

/// Does a cluster node route this request (rather than answer it itself)?
pub(crate) fn routed(r: &Request<'_>) -> bool {
    !matches!(
        r,
        Request::Hello(_)
            | Request::Ping(_)
            | Request::Stats
            | Request::ClusterMap
            | Request::Subscribe { .. }
            | Request::Unsubscribe { .. }
    )
}

/// The `CLUSTER_MAP` reply.
pub(crate) fn map_reply(node: &Node) -> Response {
    let (version, partitions, leaders) = node.leaders();
    Response::ClusterMap {
        version,
        partitions,
        leaders: leaders
            .into_iter()
            .map(|(p, addr)| (addr, u64::from(p)))
            .collect(),
    }
}

fn not_supported(op: Opcode) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::NOT_SUPPORTED,
        0,
        format!("{op} is not served by a cluster node yet (docs/scaling.md)"),
    )
}

/// A raw write stays out of a conversation's store timeline (§8), as
/// this node's replica knows it: the leader's, since a write is taken
/// only there. (One racing the conversation's creation passes here and
/// is refused where it is applied: `StateMachine::a_conversation`.)
fn check_not_conversation(node: &Node, t: crate::protocol::TimelineId) -> Result<(), ErrorReply> {
    let t = t.native();
    if t.keyspace == Keyspace::STORE && im_read::is_conversation(node.engine(), t.id) {
        return Err(ErrorReply::new(
            ErrorCode::FORBIDDEN,
            0,
            format!(
                "timeline {}:{} is conversation {}'s store timeline (raw writes go to other ids or keyspaces)",
                t.keyspace.0, t.id, t.id
            ),
        ));
    }
    Ok(())
}

/// The record as the client appended it.
fn strip(mut r: Record) -> Result<Record, ErrorReply> {
    match payload_of(&r.payload) {
        Some(p) => {
            r.payload = p.to_vec();
            Ok(r)
        }
        None => Err(ErrorReply::new(
            ErrorCode::CORRUPTION,
            0,
            format!("record {} has no Raft index", r.seq),
        )),
    }
}

/// Run a routed request.
pub(crate) fn execute(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    id: u64,
    node: &Node,
    r: Request<'_>,
) -> Result<(), ErrorReply> {
    if let Some(done) = super::cluster_im::execute(ctx, conn, id, node, &r) {
        return done;
    }
    let sh = ctx.sh;
    let op = r.opcode();
    // Reads hold the engine where they finish (the runtime, or the pool:
    // `off_runtime`).
    let engine = || -> Arc<Engine> { sh.im.engine_handle() };
    match r {
        Request::Append {
            timeline, payload, ..
        } => {
            check_raw_write(sh, timeline)?;
            check_not_conversation(node, timeline)?;
            check_payload(sh, payload.len())?;
            let a = Answer::deferred(ctx, conn, id, op);
            let t = timeline.native();
            node.append(t.keyspace.0, t.id, payload.to_vec(), move |r| {
                a.send(r, Response::Append)
            });
        }
        Request::AppendBatch { items, .. } => {
            let max_frame = conn.session.client_max;
            let items = batch_items(sh, node, max_frame, &items)?;
            let gather = Gather::new(Answer::deferred(ctx, conn, id, op), items.len());
            for (i, (t, payload)) in items.into_iter().enumerate() {
                let g = gather.clone();
                node.append(t.keyspace.0, t.id, payload, move |r| g.done(i, r));
            }
        }
        Request::Get { timeline, seq } => {
            let engine = engine();
            let a = Answer::read(ctx, conn, id, op);
            let t = timeline.native();
            // One record (at most the payload limit): read where the
            // confirmation lands, as `LAST_SEQ`; pages go to the pool.
            node.linearize(t.keyspace.0, t.id, move |r| {
                a.reply(r.map_err(|e| e.reply()).and_then(|()| {
                    let rec = engine.get(t, seq).map_err(|e| e.reply())?;
                    Ok(Response::Get(rec.map(strip).transpose()?.wire()))
                }))
            });
        }
        Request::Scan {
            timeline,
            from,
            limit,
            direction,
        } => {
            let engine = engine();
            let a = Answer::read(ctx, conn, id, op);
            let (t, max) = (timeline.native(), conn.session.client_max);
            node.linearize(
                t.keyspace.0,
                t.id,
                off_runtime(sh, move |r: Result<(), ClusterError>| {
                    a.reply(r.map_err(|e| e.reply()).and_then(|()| {
                        let recs = scan(&engine, max, 8, t, from, limit, direction.native())?;
                        let recs: Result<Vec<Record>, ErrorReply> =
                            recs.into_iter().map(strip).collect();
                        Ok(Response::Scan(recs?.wire()))
                    }))
                }),
            );
        }
        Request::LastSeq { timeline } => {
            let engine = engine();
            let a = Answer::read(ctx, conn, id, op);
            let t = timeline.native();
            node.linearize(t.keyspace.0, t.id, move |r| {
                a.reply(
                    r.map_err(|e| e.reply())
                        .map(|()| Response::LastSeq(engine.last_seq(t))),
                )
            });
        }
        _ => return Err(not_supported(op)),
    }
    Ok(())
}

/// A raw append's payload fits its Raft entry, which is one engine record:
/// the payload and the entry's framing.
fn check_payload(sh: &super::Shared, len: usize) -> Result<(), ErrorReply> {
    let max = timeline_cluster::entry_budget(sh.im.engine().config().max_payload)
        .saturating_sub(timeline_cluster::ITEM_OVERHEAD);
    if len > max {
        return Err(ErrorReply::new(
            ErrorCode::PAYLOAD_TOO_LARGE,
            max as u64,
            format!("payload of {len} bytes; a cluster node takes {max}"),
        ));
    }
    Ok(())
}

/// An `APPEND_BATCH`'s items, checked as a whole before any is proposed:
/// raw writes allowed, the reply fits the client's frame, every payload
/// fits an entry, every partition led here.
fn batch_items(
    sh: &super::Shared,
    node: &Node,
    max_frame: usize,
    items: &[(crate::protocol::TimelineId, &[u8])],
) -> Result<Vec<(timeline_engine::TimelineId, Vec<u8>)>, ErrorReply> {
    let reply = crate::protocol::HEADER_LEN + 4 + 8 * items.len();
    if reply > max_frame {
        return Err(ErrorReply::new(
            ErrorCode::RESPONSE_TOO_LARGE,
            max_frame as u64,
            format!(
                "the reply to {} items is {reply} bytes; the client accepts {max_frame}: send smaller batches",
                items.len()
            ),
        ));
    }
    for (t, payload) in items {
        check_raw_write(sh, *t)?;
        check_not_conversation(node, *t)?;
        check_payload(sh, payload.len())?;
        let n = t.native();
        node.check_append(n.keyspace.0, payload.len())
            .and_then(|()| node.check_leads(n.keyspace.0, n.id))
            .map_err(|e| e.reply())?;
    }
    Ok(items
        .iter()
        .map(|(t, p)| (t.native(), p.to_vec()))
        .collect())
}

/// An `APPEND_BATCH` in flight: its items' seqs as their entries apply;
/// answered when the last one is in (the first error, if any failed).
#[derive(Clone)]
struct Gather(Arc<std::sync::Mutex<GatherState>>);

struct GatherState {
    seqs: Vec<u64>,
    left: usize,
    failed: Option<ErrorReply>,
    answer: Option<Answer>,
}

impl Gather {
    fn new(answer: Answer, n: usize) -> Gather {
        let g = Gather(Arc::new(std::sync::Mutex::new(GatherState {
            seqs: vec![0; n],
            left: n,
            failed: None,
            answer: Some(answer),
        })));
        if n == 0 {
            g.finish(&mut g.lock());
        }
        g
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GatherState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn done(&self, i: usize, r: Result<u64, ClusterError>) {
        let mut st = self.lock();
        match r {
            Ok(seq) => st.seqs[i] = seq,
            Err(e) => {
                st.failed.get_or_insert_with(|| e.reply());
            }
        }
        st.left -= 1;
        if st.left == 0 {
            self.finish(&mut st);
        }
    }

    fn finish(&self, st: &mut GatherState) {
        if let Some(a) = st.answer.take() {
            match st.failed.take() {
                Some(e) => a.reply(Err(e)),
                None => a.reply(Ok(Response::AppendBatch(std::mem::take(&mut st.seqs)))),
            }
        }
    }
}

/// `CLUSTER_MAP` on a single node.
pub(crate) fn single_node() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::NOT_SUPPORTED,
        0,
        "this server is a single node (started without --cluster)",
    )
}
