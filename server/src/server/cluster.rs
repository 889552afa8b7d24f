//! A cluster node's requests (`--cluster`): raw timeline commands go
//! through the timeline's partition's Raft group (docs/scaling.md).
//!
//! - `APPEND`: replicated; answered with its SeqId once a quorum logged it
//!   and this node applied it, or with `MOVED` (another node leads) or
//!   `NO_LEADER` (an election is on). The request's durability byte is not
//!   used: a cluster append is durable when a quorum's logs are.
//! - `GET`, `SCAN`, `LAST_SEQ`: served by the leader after a heartbeat
//!   round confirms it still leads (linearizable), from its engine, with
//!   the Raft index stripped from each record.
//! - `CLUSTER_MAP`: the map version, P and the leaders this node knows.
//! - `CREATE_CONVERSATION`, `SEND`, `SYNC`, `HISTORY`, `MEMBERS`: the
//!   conversation or user partition's leader (`cluster_im`).
//! - `APPEND_BATCH` and the other IM commands answer `NOT_SUPPORTED` (not
//!   built for a cluster yet).

use super::conn::Conn;
use super::convert::{FromWire, ToWire};
use super::dispatch::{check_raw_write, scan, Answer, Ctx};
use super::errors::ToReply;
use crate::protocol::{routing, ErrorCode, ErrorReply, Opcode, Request, Response};
use std::sync::Arc;
use timeline_cluster::state_machine::payload_of;
use timeline_cluster::{ClusterError, Node};
use timeline_engine::{Engine, Record};

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
            _ => ErrorReply::new(ErrorCode::INTERNAL, 0, self.to_string()),
        }
    }
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
    // Reads finish on the runtime's threads and hold the engine there.
    let engine = || -> Arc<Engine> { sh.im.engine_handle() };
    match r {
        Request::Append {
            timeline, payload, ..
        } => {
            check_raw_write(sh, timeline)?;
            // Its Raft entry is one engine record: the payload and the
            // entry's framing.
            let max = timeline_cluster::entry_budget(sh.im.engine().config().max_payload)
                .saturating_sub(timeline_cluster::ITEM_OVERHEAD);
            if payload.len() > max {
                return Err(ErrorReply::new(
                    ErrorCode::PAYLOAD_TOO_LARGE,
                    max as u64,
                    format!(
                        "payload of {} bytes; a cluster node takes {max}",
                        payload.len()
                    ),
                ));
            }
            let a = Answer::new(ctx, conn.key, conn.defer(), id, op);
            let t = timeline.native();
            node.append(t.keyspace.0, t.id, payload.to_vec(), move |r| {
                a.send(r, Response::Append)
            });
        }
        Request::Get { timeline, seq } => {
            let engine = engine();
            let a = Answer::new(ctx, conn.key, conn.defer(), id, op);
            let t = timeline.native();
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
            let a = Answer::new(ctx, conn.key, conn.defer(), id, op);
            let (t, max) = (timeline.native(), conn.session.client_max);
            node.linearize(t.keyspace.0, t.id, move |r| {
                a.reply(r.map_err(|e| e.reply()).and_then(|()| {
                    let recs = scan(&engine, max, t, from, limit, direction.native())?;
                    let recs: Result<Vec<Record>, ErrorReply> =
                        recs.into_iter().map(strip).collect();
                    Ok(Response::Scan(recs?.wire()))
                }))
            });
        }
        Request::LastSeq { timeline } => {
            let engine = engine();
            let a = Answer::new(ctx, conn.key, conn.defer(), id, op);
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

/// `CLUSTER_MAP` on a single node.
pub(crate) fn single_node() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::NOT_SUPPORTED,
        0,
        "this server is a single node (started without --cluster)",
    )
}
