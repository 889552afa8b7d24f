//! What a request does: decode, handshake, access control, then the engine
//! or IM call. Runs on the connection's event loop and never blocks it:
//! - answered at once: small reads (`GET`, `LAST_SEQ`, `MEMBERS`),
//!   buffered appends, `SUBSCRIBE`; `SYNC`, `HISTORY`, `SCAN` and
//!   `CONVERSATIONS` too with `--reads inline`, else on the read pool (a
//!   write read after them waits for them);
//! - completed later through the IM layer's completion handle (`SEND`,
//!   membership changes, marks, recall) or the engine's ticket waited on by
//!   the blocking pool (group commit); the reply keeps its place in order;
//! - a *barrier* (own-fdatasync append, membership change, mark, recall,
//!   create) also holds back the requests read after it until it is done,
//!   so they see its effect; `SEND` and group-commit `APPEND` do not, so a
//!   pipelining client keeps many in flight.

use super::conn::{Conn, Sub, MAX_SUBSCRIPTIONS};
use super::convert::{FromWire, ToWire};
use super::errors::ToReply;
use super::event_loop::{Key, LoopHandle, Msg};
use super::push::SubSink;
use super::{Counters, Shared};
use crate::protocol::token::{self, Role};
use crate::protocol::{
    self, ErrorCode, ErrorReply, Identity, Opcode, ProtocolError, Request, RequestFrame, Response,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use timeline_engine::{AppendTicket, Durability, Engine, SeqId, TimelineId};
use timeline_im::{ImError, Pending};

/// What a request needs besides its connection.
pub(crate) struct Ctx<'a> {
    pub sh: &'a Arc<Shared>,
    pub lp: &'a Arc<LoopHandle>,
}

/// Where a deferred answer goes. It holds the counters and the loop, not
/// the server's `Shared`: an IM callback still pending at shutdown must not
/// keep the IM layer alive (it owns the callback: a cycle).
pub(crate) struct Answer {
    counters: Arc<Counters>,
    lp: Arc<LoopHandle>,
    key: Key,
    slot: u64,
    id: u64,
    op: Opcode,
    /// A read (counted in the connection's reads in flight until it is
    /// answered: `MAX_READS_IN_FLIGHT`).
    read: bool,
    /// The client's frame limit, if the answer is checked against it
    /// here (`RESPONSE_TOO_LARGE`) rather than by the caller.
    max_frame: Option<usize>,
    /// Posted: an answer dropped unposted (a callback never called, a job
    /// that panicked) posts `INTERNAL` instead, so the connection's later
    /// replies, which wait behind its slot, are not held for good.
    posted: bool,
    /// The request ids a run of pipelined `APPEND`s answers in this one
    /// slot (empty: the answer is `id`'s alone).
    run: Vec<u64>,
}

impl Drop for Answer {
    fn drop(&mut self) {
        if self.posted {
            return;
        }
        let e = ErrorReply::new(
            ErrorCode::INTERNAL,
            0,
            "the request's answer was lost (a server bug): it may or may not have taken effect",
        );
        let ids = match self.run.is_empty() {
            true => vec![self.id],
            false => std::mem::take(&mut self.run),
        };
        let mut frame = Vec::new();
        for &id in &ids {
            e.clone().encode_frame(id, self.op, &mut frame);
        }
        // A loop that is gone (the server stopping, a cluster node's
        // runtime dropping what it held) has nobody to tell.
        if self.post(frame) {
            tracing::error!(request = self.id, op = %self.op, "a request's answer was lost (a bug): answered INTERNAL");
            self.counters
                .errors
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
        }
    }
}

impl Answer {
    pub(crate) fn new(ctx: &Ctx<'_>, key: Key, slot: u64, id: u64, op: Opcode) -> Answer {
        Answer {
            counters: ctx.sh.counters.clone(),
            lp: ctx.lp.clone(),
            key,
            slot,
            id,
            op,
            read: false,
            max_frame: None,
            posted: false,
            run: Vec::new(),
        }
    }

    /// A deferred answer whose response is checked against the client's
    /// frame limit (a cluster node's answers).
    pub(crate) fn deferred(ctx: &Ctx<'_>, conn: &mut Conn, id: u64, op: Opcode) -> Answer {
        let mut a = Answer::new(ctx, conn.key, conn.defer(), id, op);
        a.max_frame = Some(conn.session.client_max);
        a
    }

    /// [`Answer::deferred`] for a write whose effect the connection's next
    /// requests must see: nothing read after it runs until it is answered
    /// (as the single node's IM barriers).
    pub(crate) fn barrier(ctx: &Ctx<'_>, conn: &mut Conn, id: u64, op: Opcode) -> Answer {
        let mut a = Answer::new(ctx, conn.key, conn.defer_barrier(), id, op);
        a.max_frame = Some(conn.session.client_max);
        a
    }

    /// [`Answer::deferred`] for a read: the connection has at most
    /// `MAX_READS_IN_FLIGHT` of them out, and a write sent after it waits
    /// for its answer (as reads on the read pool).
    pub(crate) fn read(ctx: &Ctx<'_>, conn: &mut Conn, id: u64, op: Opcode) -> Answer {
        let mut a = Answer::new(ctx, conn.key, conn.defer_read(), id, op);
        a.read = true;
        a.max_frame = Some(conn.session.client_max);
        a
    }

    /// Encode the outcome and hand it to the connection's loop.
    pub(crate) fn send<T, E: ToReply>(self, r: Result<T, E>, ok: impl FnOnce(T) -> Response) {
        self.reply(r.map(ok).map_err(|e| e.reply()));
    }

    /// Encode a response or an error and hand it to the connection's loop.
    pub(crate) fn reply(mut self, r: Result<Response, ErrorReply>) {
        let r = match self.max_frame {
            Some(max) => r.and_then(|resp| fits(resp, max)),
            None => r,
        };
        let mut frame = Vec::new();
        match r {
            Ok(resp) => resp.encode_frame(self.id, &mut frame),
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                e.encode_frame(self.id, self.op, &mut frame);
            }
        }
        self.post(frame);
    }

    /// Hand the answer's frame to the connection's loop (once): `false`
    /// if the loop is gone.
    fn post(&mut self, frame: Vec<u8>) -> bool {
        if std::mem::replace(&mut self.posted, true) {
            return false;
        }
        self.lp.post(Msg::Done {
            key: self.key,
            slot: self.slot,
            frame,
            read: self.read,
        })
    }

    /// Answer when the IM layer's handle completes.
    fn on_im<T: Send + 'static>(
        self,
        p: Pending<T>,
        ok: impl FnOnce(T) -> Response + Send + 'static,
    ) {
        p.on_ready(move |r| self.send(r, ok));
    }
}

/// When a token that expires at `exp_unix` (seconds since the epoch)
/// runs out, as an instant: computed once, at the `HELLO`, so the
/// connection's deadline does not move (`None`: beyond any timer, 2^32 s).
fn token_deadline(exp_unix: u64) -> Option<Instant> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(exp_unix).saturating_sub(now);
    (left < Duration::from_secs(1 << 32)).then(|| Instant::now() + left)
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Execute the whole frames at the start of `input` until the connection
/// pauses; returns the bytes consumed.
pub(crate) fn execute_input(ctx: &Ctx<'_>, conn: &mut Conn, input: &[u8]) -> usize {
    let max_owed = ctx.sh.cfg.max_queued_replies.max(1);
    let mut pos = 0;
    while pos < input.len() && !conn.paused(max_owed) {
        // Writes wait for the connection's reads on the read pool.
        if conn.reads_in_flight() > 0 && is_write(&input[pos..]) {
            break;
        }
        // Before the handshake a header is enough: another opcode is
        // refused without waiting for its body, and a HELLO may be small
        // only, so a stranger cannot make the server hold a large frame.
        if conn.session.id.is_none() && refused_before_hello(ctx, conn, &input[pos..]) {
            return input.len();
        }
        // Pipelined single APPENDs become one engine batch.
        let used = append_run(ctx, conn, &input[pos..]);
        if used > 0 {
            pos += used;
            continue;
        }
        match protocol::decode(&input[pos..], ctx.sh.cfg.max_frame) {
            Ok(Some((f, used))) => {
                handle(ctx, conn, &f);
                if conn.im_busy {
                    // Its IM worker is full: the frame stays unread and is
                    // executed again once the worker has room.
                    break;
                }
                pos += used;
                ctx.sh.counters.requests.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => break,
            Err(e) => {
                // Too large: the stream position is lost. Answer, close.
                ctx.sh.counters.errors.fetch_add(1, Ordering::Relaxed);
                let (id, op) = match &e {
                    ProtocolError::FrameTooLarge {
                        request_id, opcode, ..
                    } => (*request_id, *opcode),
                    _ => (0, Opcode(0)),
                };
                conn.error(id, op, ErrorReply::from(&e));
                conn.close_after();
                return input.len();
            }
        }
    }
    pos
}

/// The largest frame a connection may send before its `HELLO` succeeded
/// (a `HELLO` is at most 16 + 63 bytes: protocol.md §3).
pub(crate) const MAX_FRAME_BEFORE_HELLO: usize = 256;

/// Before the handshake: the frame at the start of `input` ends the
/// connection at its header if it is not a `HELLO` (`HANDSHAKE_REQUIRED`)
/// or is a `HELLO` over [`MAX_FRAME_BEFORE_HELLO`] (`FRAME_TOO_LARGE`).
/// `true` if it did (the rest of the input is discarded).
fn refused_before_hello(ctx: &Ctx<'_>, conn: &mut Conn, input: &[u8]) -> bool {
    let Some((h, total)) = protocol::peek_header(input) else {
        return false;
    };
    let (op, id) = (h.opcode, h.request_id);
    let reply = if op != Opcode::HELLO {
        ErrorReply::new(ErrorCode::HANDSHAKE_REQUIRED, 0, "send HELLO first")
    } else if total > MAX_FRAME_BEFORE_HELLO as u64 {
        ErrorReply::new(
            ErrorCode::FRAME_TOO_LARGE,
            MAX_FRAME_BEFORE_HELLO as u64,
            format!("a HELLO frame of {total} bytes (at most {MAX_FRAME_BEFORE_HELLO})"),
        )
    } else {
        return false;
    };
    ctx.sh.counters.errors.fetch_add(1, Ordering::Relaxed);
    conn.error(id, op, reply);
    conn.close_after();
    true
}

/// Does the frame at the start of `input` change data? (Its opcode; a
/// partial header is not a write yet.)
pub(crate) fn is_write(input: &[u8]) -> bool {
    let Some(op) = input.get(4..6) else {
        return false;
    };
    let op = Opcode(u16::from_le_bytes([op[0], op[1]]));
    [
        Opcode::APPEND,
        Opcode::APPEND_BATCH,
        Opcode::SEND,
        Opcode::MARK_READ,
        Opcode::RECALL,
        Opcode::DELETE_FOR_USER,
        Opcode::CREATE_CONVERSATION,
        Opcode::ADD_MEMBER,
        Opcode::REMOVE_MEMBER,
    ]
    .contains(&op)
}

/// One frame. A frame whose IM worker is full is left for later: it sets
/// `conn.im_busy` and changes nothing (see [`admit`]).
fn handle(ctx: &Ctx<'_>, conn: &mut Conn, f: &protocol::Frame<'_>) {
    let sh = ctx.sh;
    let (id, op) = (f.header.request_id, f.header.opcode);
    if id == 0 {
        // Reserved for the server's errors about the connection (§2),
        // whatever the opcode; before a handshake, a bad HELLO: closed.
        sh.counters.errors.fetch_add(1, Ordering::Relaxed);
        let e = ErrorReply::new(ErrorCode::MALFORMED_FRAME, 0, "request id 0 is reserved");
        conn.error(id, op, e);
        if conn.session.id.is_none() {
            conn.close_after();
        }
        return;
    }
    let req = match RequestFrame::decode(f) {
        Ok(r) => r,
        Err(e) => {
            sh.counters.errors.fetch_add(1, Ordering::Relaxed);
            // Before a handshake anything undecodable ends the connection:
            // a bad HELLO says what was wrong with it, any other opcode
            // (known or not) that HELLO comes first (protocol.md §3).
            let shook = conn.session.id.is_some();
            let reply = if shook && op == Opcode::HELLO {
                // The first HELLO stands, whatever this one holds.
                ErrorReply::new(
                    ErrorCode::INVALID_ARGUMENT,
                    0,
                    "a second HELLO on this connection",
                )
            } else if shook || op == Opcode::HELLO {
                ErrorReply::from(&e)
            } else {
                ErrorReply::new(ErrorCode::HANDSHAKE_REQUIRED, 0, "send HELLO first")
            };
            conn.error(id, op, reply);
            if !shook {
                conn.close_after();
            }
            return;
        }
    };
    let identity = match (&req.request, conn.session.id) {
        (Request::Hello(h), None) => return hello(sh, conn, id, h),
        (Request::Hello(_), Some(_)) => {
            sh.counters.errors.fetch_add(1, Ordering::Relaxed);
            let e = ErrorReply::new(
                ErrorCode::INVALID_ARGUMENT,
                0,
                "a second HELLO on this connection",
            );
            return conn.error(id, op, e);
        }
        (_, None) => {
            sh.counters.errors.fetch_add(1, Ordering::Relaxed);
            let e = ErrorReply::new(ErrorCode::HANDSHAKE_REQUIRED, 0, "send HELLO first");
            conn.error(id, op, e);
            return conn.close_after();
        }
        (_, Some(i)) => i,
    };
    let r =
        authorize(sh, identity, &req.request).and_then(|()| execute(ctx, conn, id, req.request));
    if let Err(e) = r {
        sh.counters.errors.fetch_add(1, Ordering::Relaxed);
        conn.error(id, op, e);
    }
}

fn hello(sh: &Shared, conn: &mut Conn, id: u64, h: &protocol::Hello<'_>) {
    let reply = check_hello(sh, h);
    match reply {
        Ok((identity, expires, reply)) => {
            conn.session.id = Some(identity);
            conn.session.token_deadline = expires.and_then(token_deadline);
            // 0 is the protocol's 16 MiB; either way clamped to the
            // server's own limit: reply sizing (SCAN, SYNC pages) trusts
            // this number.
            let asked = match h.max_frame {
                0 => protocol::DEFAULT_MAX_FRAME,
                n => n as usize,
            };
            conn.session.client_max = asked.min(sh.cfg.max_frame);
            conn.reply(|b| Response::Hello(reply).encode_frame(id, b));
        }
        Err(e) => {
            sh.counters.errors.fetch_add(1, Ordering::Relaxed);
            conn.error(id, Opcode::HELLO, e);
            conn.close_after();
        }
    }
}

type HelloOk = (Identity, Option<u64>, protocol::HelloReply);

/// The smallest `max_frame` a client may ask for in its `HELLO` (0 aside):
/// the server's own replies (errors, `resync`) must fit it.
pub(crate) const MIN_CLIENT_MAX_FRAME: usize = 1024;

fn check_hello(sh: &Shared, h: &protocol::Hello<'_>) -> Result<HelloOk, ErrorReply> {
    if h.version != protocol::PROTOCOL_VERSION {
        return Err(ErrorReply::new(
            ErrorCode::UNSUPPORTED_VERSION,
            u64::from(protocol::PROTOCOL_VERSION),
            format!(
                "this server speaks protocol version {}",
                protocol::PROTOCOL_VERSION
            ),
        ));
    }
    if h.max_frame != 0 && (h.max_frame as usize) < MIN_CLIENT_MAX_FRAME {
        return Err(ErrorReply::new(
            ErrorCode::INVALID_ARGUMENT,
            0,
            format!(
                "max_frame {} is below {MIN_CLIENT_MAX_FRAME}: not even an error reply would fit",
                h.max_frame
            ),
        ));
    }
    let (identity, expires) = match &sh.cfg.auth_secret {
        None => (Identity::Anonymous, None),
        Some(secret) => {
            let c = token::verify(secret, h.token, now_unix()).map_err(|e| ErrorReply::from(&e))?;
            let i = match c.role {
                Role::User => Identity::User(c.user),
                Role::Admin => Identity::Admin(c.user),
            };
            (i, Some(c.expires_unix))
        }
    };
    let reply = protocol::HelloReply {
        version: protocol::PROTOCOL_VERSION,
        max_frame: sh.cfg.max_frame.min(u32::MAX as usize) as u32,
        identity,
    };
    Ok((identity, expires, reply))
}

/// docs/protocol.md §12: a user token acts as its own user only.
fn authorize(sh: &Shared, identity: Identity, r: &Request<'_>) -> Result<(), ErrorReply> {
    let me = match identity {
        Identity::Anonymous | Identity::Admin(_) => return Ok(()),
        Identity::User(u) => u,
    };
    let deny = |what: &str| {
        Err(ErrorReply::new(
            ErrorCode::FORBIDDEN,
            0,
            format!("user {me} may not {what}"),
        ))
    };
    let own = |u: u64, what: &str| if u == me { Ok(()) } else { deny(what) };
    match r {
        Request::Ping(_)
        | Request::Hello(_)
        | Request::Unsubscribe { .. }
        | Request::ClusterMap => Ok(()),
        Request::Sync { user, .. } => own(*user, "sync another user"),
        Request::Subscribe { user } => own(*user, "subscribe to another user"),
        Request::Conversations { user } => own(*user, "list another user's conversations"),
        Request::MarkRead { user, .. } => own(*user, "mark for another user"),
        Request::DeleteForUser { user, .. } => own(*user, "delete for another user"),
        Request::Send { sender, .. } => own(*sender, "send as another user"),
        Request::Recall { user, .. } => own(*user, "recall as another user"),
        Request::History { user, .. } => own(*user, "read history as another user"),
        // A cluster node checks at the conversation's leader
        // (`cluster_im`), where the members are.
        Request::Members { .. } if sh.cluster.is_some() => Ok(()),
        Request::Members { conv } => match sh.im.members(*conv) {
            Ok(m) if m.contains(&me) => Ok(()),
            _ => deny("list the members of a conversation it is not in"),
        },
        _ => deny("use raw timelines, membership administration or STATS (admin only)"),
    }
}

fn durability(sh: &Shared, d: Option<protocol::Durability>) -> Durability {
    d.map(FromWire::native).unwrap_or(sh.cfg.default_durability)
}

/// Raw access stays out of the IM layer's own timelines: the store
/// keyspace's top half (catalog, journal) and every user's sync timeline
/// belong to it, and one foreign record there breaks a user's `SYNC`.
pub(crate) fn check_raw_write(sh: &Shared, t: protocol::TimelineId) -> Result<(), ErrorReply> {
    if sh.im.owns(t.native()) {
        return Err(ErrorReply::new(
            ErrorCode::FORBIDDEN,
            0,
            format!(
                "timeline {}:{} belongs to the IM layer (raw writes go to other ids or keyspaces)",
                t.keyspace.0, t.id
            ),
        ));
    }
    Ok(())
}

/// Run an authorized request: answer it now, or leave a slot that its
/// completion fills.
fn execute(ctx: &Ctx<'_>, conn: &mut Conn, id: u64, r: Request<'_>) -> Result<(), ErrorReply> {
    let sh = ctx.sh;
    let im = &sh.im;
    // IM writes never wait for a full worker on the loop (see `admit`).
    let nw = im.no_wait(&ctx.lp.room);
    let engine: &Engine = im.engine();
    let ie = |e: ImError| e.reply();
    let ee = |e: timeline_engine::Error| e.reply();
    let key = conn.key;
    if let Some(node) = &sh.cluster {
        if super::cluster::routed(&r) {
            return super::cluster::execute(ctx, conn, id, node, r);
        }
    }
    let resp = match r {
        Request::Hello(_) => return Err(ErrorReply::new(ErrorCode::INVALID_ARGUMENT, 0, "HELLO")),
        Request::Ping(b) => Response::Ping(b.to_vec()),
        Request::Stats => Response::Stats(super::stats(sh)),
        Request::ClusterMap => match &sh.cluster {
            Some(node) => super::cluster::map_reply(node),
            None => return Err(super::cluster::single_node()),
        },
        Request::Append {
            timeline,
            durability: d,
            payload,
        } => {
            check_raw_write(sh, timeline)?;
            return append(
                ctx,
                conn,
                id,
                false,
                durability(sh, d),
                &[(timeline.native(), payload)],
            );
        }
        Request::AppendBatch {
            durability: d,
            items,
        } => {
            for (t, _) in &items {
                check_raw_write(sh, *t)?;
            }
            // The reply (a seq per item) must fit the client's frame: say
            // so before anything is written.
            let reply = protocol::HEADER_LEN + 4 + 8 * items.len();
            if reply > conn.session.client_max {
                let max = conn.session.client_max;
                return Err(ErrorReply::new(
                    ErrorCode::RESPONSE_TOO_LARGE,
                    max as u64,
                    format!(
                        "the reply to {} items is {reply} bytes; the client accepts {max}: send smaller batches",
                        items.len()
                    ),
                ));
            }
            let items: Vec<(TimelineId, &[u8])> =
                items.iter().map(|(t, p)| (t.native(), *p)).collect();
            return append(ctx, conn, id, true, durability(sh, d), &items);
        }
        Request::Get { timeline, seq } => {
            Response::Get(engine.get(timeline.native(), seq).map_err(ee)?.wire())
        }
        Request::Scan {
            timeline,
            from,
            limit,
            direction,
        } if sh.read_pool.is_some() => {
            let max = conn.session.client_max;
            return off_loop(ctx, conn, id, Opcode::SCAN, move |sh| {
                let (t, d) = (timeline.native(), direction.native());
                scan(sh.im.engine(), max, 0, t, from, limit, d).map(|r| Response::Scan(r.wire()))
            });
        }
        Request::Scan {
            timeline,
            from,
            limit,
            direction,
        } => Response::Scan(
            scan(
                engine,
                conn.session.client_max,
                0,
                timeline.native(),
                from,
                limit,
                direction.native(),
            )?
            .wire(),
        ),
        Request::LastSeq { timeline } => Response::LastSeq(engine.last_seq(timeline.native())),
        Request::Send {
            conv,
            sender,
            client_msg_id,
            payload,
        } => {
            let r = nw.send_async(conv, sender, client_msg_id, payload);
            let Some(p) = admit(conn, r)? else {
                return Ok(());
            };
            let slot = conn.defer();
            Answer::new(ctx, key, slot, id, Opcode::SEND).on_im(p, |a| Response::Send(a.wire()));
            return Ok(());
        }
        Request::Sync {
            user,
            checkpoint,
            limit,
            groups,
        } if sh.read_pool.is_some() => {
            let limit = page_limit(sh, conn, limit);
            return off_loop(ctx, conn, id, Opcode::SYNC, move |sh| {
                sh.im
                    .sync(user, checkpoint, limit, &groups)
                    .map(|r| Response::Sync(r.wire()))
                    .map_err(|e| e.reply())
            });
        }
        Request::Sync {
            user,
            checkpoint,
            limit,
            groups,
        } => Response::Sync(
            im.sync(user, checkpoint, page_limit(sh, conn, limit), &groups)
                .map_err(ie)?
                .wire(),
        ),
        Request::History {
            conv,
            user,
            from,
            limit,
        } if sh.read_pool.is_some() => {
            let limit = page_limit(sh, conn, limit);
            return off_loop(ctx, conn, id, Opcode::HISTORY, move |sh| {
                sh.im
                    .history(conv, user, from.native(), limit)
                    .map(|r| Response::History(r.wire()))
                    .map_err(|e| e.reply())
            });
        }
        Request::History {
            conv,
            user,
            from,
            limit,
        } => Response::History(
            im.history(conv, user, from.native(), page_limit(sh, conn, limit))
                .map_err(ie)?
                .wire(),
        ),
        Request::Conversations { user } if sh.read_pool.is_some() => {
            // It reads each conversation's unread entries (whose they are).
            return off_loop(ctx, conn, id, Opcode::CONVERSATIONS, move |sh| {
                sh.im
                    .conversations(user)
                    .map(|r| Response::Conversations(r.wire()))
                    .map_err(|e| e.reply())
            });
        }
        Request::Conversations { user } => {
            Response::Conversations(im.conversations(user).map_err(ie)?.wire())
        }
        Request::MarkRead { user, conv, seq } => {
            let Some(p) = admit(conn, nw.mark_read_async(user, conv, seq))? else {
                return Ok(());
            };
            return barrier(ctx, conn, id, Opcode::MARK_READ, p, Response::MarkRead);
        }
        Request::Recall { conv, user, target } => {
            let Some(p) = admit(conn, nw.recall_async(conv, user, target))? else {
                return Ok(());
            };
            return barrier(ctx, conn, id, Opcode::RECALL, p, Response::Recall);
        }
        Request::DeleteForUser { user, conv, seq } => {
            let r = nw.delete_for_user_async(user, conv, seq);
            let Some(p) = admit(conn, r)? else {
                return Ok(());
            };
            let op = Opcode::DELETE_FOR_USER;
            return barrier(ctx, conn, id, op, p, Response::DeleteForUser);
        }
        Request::CreateConversation {
            conv,
            kind,
            members,
        } => {
            // Several IM steps when the member list is long: on the pool.
            let slot = conn.defer_barrier();
            let a = Answer::new(ctx, key, slot, id, Opcode::CREATE_CONVERSATION);
            let sh2 = sh.clone();
            sh.creates.as_ref().unwrap_or(&sh.pool).spawn(move || {
                let r = sh2.im.create_conversation(conv, kind.native(), &members);
                a.send(r, Response::CreateConversation);
            });
            return Ok(());
        }
        Request::AddMember { conv, user } => {
            let Some(p) = admit(conn, nw.add_member_async(conv, user))? else {
                return Ok(());
            };
            return barrier(ctx, conn, id, Opcode::ADD_MEMBER, p, Response::AddMember);
        }
        Request::RemoveMember { conv, user } => {
            let Some(p) = admit(conn, nw.remove_member_async(conv, user))? else {
                return Ok(());
            };
            let op = Opcode::REMOVE_MEMBER;
            return barrier(ctx, conn, id, op, p, Response::RemoveMember);
        }
        Request::Members { conv } => Response::Members(im.members(conv).map_err(ie)?),
        Request::Subscribe { user } => return subscribe(ctx, conn, id, user),
        Request::Unsubscribe { subscription } => {
            let Some(i) = conn.subs.iter().position(|s| s.id == subscription) else {
                return Err(ErrorReply::new(
                    ErrorCode::INVALID_ARGUMENT,
                    0,
                    format!("no subscription {subscription} on this connection"),
                ));
            };
            // Pushes of it still on their way are dropped by serial.
            let sub = conn.subs.swap_remove(i);
            sub.sink.close();
            ctx.sh.im.release_sinks(sub.user);
            Response::Unsubscribe
        }
    };
    let resp = fits(resp, conn.session.client_max)?;
    conn.reply(|b| resp.encode_frame(id, b));
    Ok(())
}

/// `resp`, or RESPONSE_TOO_LARGE if it exceeds the client's frame limit.
fn fits(resp: Response, max: usize) -> Result<Response, ErrorReply> {
    if resp.encoded_len() > max {
        return Err(ErrorReply::new(
            ErrorCode::RESPONSE_TOO_LARGE,
            max as u64,
            format!(
                "the reply is {} bytes; the client accepts {max}",
                resp.encoded_len()
            ),
        ));
    }
    Ok(resp)
}

/// Run a read on the read pool; its reply keeps its place in order.
fn off_loop(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    id: u64,
    op: Opcode,
    read: impl FnOnce(&Shared) -> Result<Response, ErrorReply> + Send + 'static,
) -> Result<(), ErrorReply> {
    let max = conn.session.client_max;
    let slot = conn.defer_read();
    let mut a = Answer::new(ctx, conn.key, slot, id, op);
    a.read = true;
    let sh = ctx.sh.clone();
    let job = move || {
        let r = read(&sh).and_then(|resp| fits(resp, max));
        a.reply(r);
    };
    match &ctx.sh.read_pool {
        Some(p) => p.spawn(job),
        None => job(),
    }
    Ok(())
}

/// The outcome of an IM write submitted without waiting: `None` when its
/// worker is full. The connection then stops (`im_busy`, so it reads
/// nothing more) with the request left unread; the loop's room waker runs
/// it again once the worker has room. A full worker is backpressure that
/// reaches the client through TCP, never a blocked loop.
fn admit<T>(conn: &mut Conn, r: Result<T, ImError>) -> Result<Option<T>, ErrorReply> {
    match r {
        Ok(t) => Ok(Some(t)),
        Err(ImError::Busy) => {
            conn.im_busy = true;
            Ok(None)
        }
        Err(e) => Err(e.reply()),
    }
}

/// An IM request whose effect the connection's next requests must see.
fn barrier<T: Send + 'static>(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    id: u64,
    op: Opcode,
    p: Pending<T>,
    ok: impl FnOnce(T) -> Response + Send + 'static,
) -> Result<(), ErrorReply> {
    let slot = conn.defer_barrier();
    Answer::new(ctx, conn.key, slot, id, op).on_im(p, ok);
    Ok(())
}

fn append(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    id: u64,
    batch: bool,
    d: Durability,
    items: &[(TimelineId, &[u8])],
) -> Result<(), ErrorReply> {
    let engine = ctx.sh.im.engine();
    let ee = |e: timeline_engine::Error| e.reply();
    let (op, ok): (Opcode, fn(Vec<SeqId>) -> Response) = if batch {
        (Opcode::APPEND_BATCH, Response::AppendBatch)
    } else {
        (Opcode::APPEND, |s| {
            Response::Append(s.first().copied().unwrap_or(0))
        })
    };
    match d {
        Durability::Buffered => {
            let seqs = engine
                .append_batch(items, Durability::Buffered)
                .map_err(ee)?;
            conn.reply(|b| ok(seqs).encode_frame(id, b));
        }
        Durability::GroupCommit => {
            let ticket = engine.append_async(items).map_err(ee)?;
            let slot = conn.defer();
            wait_ticket(ctx.sh, Answer::new(ctx, conn.key, slot, id, op), ticket, ok);
        }
        Durability::Sync => {
            // Its own fdatasync, on the pool; later requests wait for it.
            let owned: Vec<(TimelineId, Vec<u8>)> =
                items.iter().map(|(t, p)| (*t, p.to_vec())).collect();
            let slot = conn.defer_barrier();
            let a = Answer::new(ctx, conn.key, slot, id, op);
            let sh = ctx.sh.clone();
            ctx.sh.pool.spawn(move || {
                let refs: Vec<(TimelineId, &[u8])> =
                    owned.iter().map(|(t, p)| (*t, p.as_slice())).collect();
                let r = sh.im.engine().append_batch(&refs, Durability::Sync);
                a.send(r, ok);
            });
        }
    }
    Ok(())
}

/// Answer once the ticket is durable: at once if it already is, else from
/// the pool (whose wait may lead the shared fdatasync).
fn wait_ticket(
    sh: &Shared,
    a: Answer,
    ticket: AppendTicket,
    ok: impl FnOnce(Vec<SeqId>) -> Response + Send + 'static,
) {
    if ticket.is_durable() {
        return a.send(ticket.wait(), ok);
    }
    sh.pool.spawn(move || a.send(ticket.wait(), ok));
}

/// Replies of a run of pipelined single APPENDs, in order.
fn many_appends(seqs: Vec<SeqId>, ids: &[u64], b: &mut Vec<u8>) {
    for (id, s) in ids.iter().zip(seqs) {
        Response::Append(s).encode_frame(*id, b);
    }
}

/// If the input starts with two or more pipelined single APPENDs of the
/// same (non-`sync`) durability, write them with one engine batch (one
/// write, one shared fdatasync) and queue their replies; returns the bytes
/// consumed (0: nothing coalesced, handle the next frame on its own).
/// Anything unusual (an oversized payload, an IM-owned timeline, a frame
/// that does not decode, a user token) ends the run and goes through the
/// normal path, so errors stay per request.
fn append_run(ctx: &Ctx<'_>, conn: &mut Conn, input: &[u8]) -> usize {
    let sh = ctx.sh;
    // A cluster node sends each APPEND through its partition's group.
    if sh.cluster.is_some() {
        return 0;
    }
    if !matches!(
        conn.session.id,
        Some(Identity::Anonymous) | Some(Identity::Admin(_))
    ) {
        return 0;
    }
    let max_payload = sh.im.engine().config().max_payload;
    let mut pos = 0;
    let mut ids = Vec::new();
    let mut items = Vec::new();
    let mut dur = None;
    while ids.len() < 4096 {
        let Ok(Some((f, used))) = protocol::decode(&input[pos..], sh.cfg.max_frame) else {
            break;
        };
        if f.header.opcode != Opcode::APPEND {
            break;
        }
        let Ok(RequestFrame {
            id,
            request:
                Request::Append {
                    timeline,
                    durability: d,
                    payload,
                },
        }) = RequestFrame::decode(&f)
        else {
            break;
        };
        let d = durability(sh, d);
        let unusual = d == Durability::Sync
            || payload.len() > max_payload
            || sh.im.owns(timeline.native())
            || dur.is_some_and(|x| x != d);
        if unusual {
            break;
        }
        dur = Some(d);
        ids.push(id);
        items.push((timeline.native(), payload));
        pos += used;
    }
    if ids.len() < 2 {
        return 0;
    }
    sh.counters
        .requests
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    let engine = sh.im.engine();
    let r = match dur {
        Some(Durability::GroupCommit) => engine.append_async(&items).map(Ok),
        _ => engine.append_batch(&items, Durability::Buffered).map(Err),
    };
    match r {
        Ok(Ok(ticket)) => {
            let slot = conn.defer();
            let mut a = Answer::new(ctx, conn.key, slot, 0, Opcode::APPEND);
            // The run's ids travel in its answer (a lost one says INTERNAL
            // to each).
            a.run = ids;
            let done = |r: timeline_engine::Result<Vec<SeqId>>, mut a: Answer| {
                let mut frame = Vec::with_capacity(a.run.len() * 24);
                match r {
                    Ok(seqs) => many_appends(seqs, &a.run, &mut frame),
                    Err(e) => append_errors(&a.run, &e, &a.counters, &mut frame),
                }
                a.post(frame);
            };
            if ticket.is_durable() {
                done(ticket.wait(), a);
            } else {
                sh.pool.spawn(move || done(ticket.wait(), a));
            }
        }
        Ok(Err(seqs)) => conn.reply(|b| many_appends(seqs, &ids, b)),
        Err(e) => conn.reply(|b| append_errors(&ids, &e, &sh.counters, b)),
    }
    pos
}

/// Every APPEND of a failed run gets the error (nothing is retried: a batch
/// is not atomic across shards, so a retry could store some twice).
fn append_errors(ids: &[u64], e: &timeline_engine::Error, counters: &Counters, b: &mut Vec<u8>) {
    let r = e.reply();
    counters
        .errors
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    for &id in ids {
        r.clone().encode_frame(id, Opcode::APPEND, b);
    }
}

fn subscribe(ctx: &Ctx<'_>, conn: &mut Conn, id: u64, user: u64) -> Result<(), ErrorReply> {
    let invalid = |m: String| Err(ErrorReply::new(ErrorCode::INVALID_ARGUMENT, 0, m));
    if user > timeline_im::MAX_ID {
        return invalid(format!(
            "user id {user} is above {} (the top half is reserved)",
            timeline_im::MAX_ID
        ));
    }
    if conn.subs.len() >= MAX_SUBSCRIPTIONS {
        return invalid(format!(
            "at most {MAX_SUBSCRIPTIONS} subscriptions per connection"
        ));
    }
    if conn.subs.iter().any(|s| s.id == id) {
        return invalid(format!("a live subscription already uses request id {id}"));
    }
    // A cluster node first registers its interest in the user's
    // read-fan-out groups that no subscriber here watches yet with their
    // partitions (docs/scaling.md, "Interest"), so that their messages
    // are pushed here from the reply on; nothing read after the
    // `SUBSCRIBE` runs before it.
    if let Some(node) = &ctx.sh.cluster {
        let fresh = ctx.sh.group_watch.unwatched(node, user);
        if !fresh.is_empty() {
            let slot = conn.defer_barrier();
            let (lp, key) = (ctx.lp.clone(), conn.key);
            node.watch_groups(fresh.clone(), move || {
                lp.post(Msg::Subscribed {
                    key,
                    slot,
                    id,
                    user,
                    registered: fresh,
                });
            });
            return Ok(());
        }
    }
    start_subscription(ctx, conn, id, user, None, &[]);
    Ok(())
}

/// Open subscription `id` to `user` and answer it, in `slot` if it was
/// deferred; `registered`: groups whose interest the caller registered.
pub(crate) fn start_subscription(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    id: u64,
    user: u64,
    slot: Option<u64>,
    registered: &[u64],
) {
    // The reply goes first; pushes follow it (they queue behind it while
    // it waits behind earlier replies).
    let reply_slot = slot.or_else(|| (conn.owed() > 0).then(|| conn.defer()));
    match reply_slot {
        Some(slot) => {
            let mut b = Vec::new();
            Response::Subscribe.encode_frame(id, &mut b);
            conn.complete(slot, b);
        }
        None => conn.reply(|b| Response::Subscribe.encode_frame(id, b)),
    }
    conn.next_serial += 1;
    let sink = Arc::new(SubSink::new(
        ctx.lp.clone(),
        conn.key,
        conn.next_serial,
        conn.queued.clone(),
        conn.session.client_max,
    ));
    ctx.sh.im.subscribe_sink(user, sink.clone());
    if let Some(node) = &ctx.sh.cluster {
        // A group the user joined meanwhile: registered now, not waited for.
        let mut fresh = ctx.sh.group_watch.subscribed(node, user);
        fresh.retain(|c| !registered.contains(c));
        if !fresh.is_empty() {
            node.watch_groups(fresh, || {});
        }
    }
    conn.subs.push(Sub {
        id,
        user,
        sink,
        reply_slot,
    });
}

/// Entries a SYNC or HISTORY page may hold so that its reply fits the
/// client's frame limit even if every entry has the largest payload (the IM
/// layer pages by count; a client asking for more gets `has_more`).
pub(crate) fn page_limit(sh: &Shared, conn: &Conn, asked: u32) -> usize {
    let per = sh.cfg.engine.max_payload + 128;
    (asked as usize).min((conn.session.client_max / per).max(1))
}

/// A SCAN read in pages, refused with RESPONSE_TOO_LARGE as soon as the
/// records exceed what the client accepts (never built whole first).
///
/// The reply is exactly 16 (header) + 4 (count) + Σ (20 + payload) bytes;
/// `hidden` is what each stored record holds that the reply leaves out (a
/// cluster node's 8-byte write id).
pub(crate) fn scan(
    engine: &Engine,
    client_max: usize,
    hidden: usize,
    timeline: TimelineId,
    from: u64,
    limit: u32,
    direction: timeline_engine::Direction,
) -> Result<Vec<timeline_engine::Record>, ErrorReply> {
    use timeline_engine::Direction;
    let mut out: Vec<timeline_engine::Record> = Vec::new();
    let mut bytes = protocol::HEADER_LEN + 4;
    let mut next = from;
    let mut left = limit as usize;
    while left > 0 {
        let want = left.min(1024);
        let page = engine
            .scan(timeline, next, want, direction)
            .map_err(|e| e.reply())?;
        let Some(last) = page.last() else { break };
        let n = page.len();
        next = match direction {
            Direction::Forward => last.seq.saturating_add(1),
            Direction::Backward => last.seq.saturating_sub(1),
        };
        for r in page {
            bytes += 20 + r.payload.len().saturating_sub(hidden);
            if bytes > client_max {
                return Err(ErrorReply::new(
                    ErrorCode::RESPONSE_TOO_LARGE,
                    client_max as u64,
                    "the records asked for exceed the client's frame limit: ask for fewer",
                ));
            }
            out.push(r);
        }
        left -= n;
        if n < want || next == 0 {
            break;
        }
    }
    Ok(out)
}
