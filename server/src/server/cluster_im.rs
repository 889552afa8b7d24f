//! A cluster node's IM commands (docs/scaling.md, "IM across partitions";
//! docs/protocol.md §15): conversations live in their conversation's
//! partition, sync timelines in their user's.
//!
//! - `CREATE_CONVERSATION`, `SEND`: to the conversation partition's
//!   leader; answered once the entry is stored and delivered to every
//!   member's sync timeline (`FANOUT_FAILED` with the seq if the
//!   deliveries take longer than 2 s: they go on). A group above the
//!   hybrid threshold is read fan-out: a `SEND` to it is answered once
//!   stored, and told to every node for push (`timeline_cluster::groups`).
//! - `SYNC`: the user partition's leader: the sync timeline, then (once
//!   it is drained) pages of the user's read-fan-out groups, each read
//!   from its group's leader; messages the user deleted for itself shown
//!   `Deleted` in both (its deletes are in its own partition).
//! - `HISTORY`, `MEMBERS`: the conversation partition's leader.
//! - `RECALL`: as `SEND` (a recall event, delivered like a message).
//! - `MARK_READ`, `DELETE_FOR_USER`: the user partition's leader, once
//!   the conversation's leader answered membership and its last seq
//!   (`timeline_cluster::marks`).
//! - `CONVERSATIONS`: the user partition's leader lists the user's
//!   conversations and read markers; each conversation's leader counts
//!   its unread entries (`timeline_cluster::conversations`).
//!
//! - `SUBSCRIBE`: served by any node (the dispatcher's own path): a node
//!   pushes every sync entry a replica on it applies, so subscribe on a
//!   node holding the user's partition (its leader: the client routes
//!   there). A push is a hint, as everywhere: `SYNC` from the device's
//!   checkpoint is the truth.
//!
//! Reads run after the leader confirmed its leadership (linearizable),
//! on the server's read pool (not the node's runtime:
//! [`super::cluster::off_runtime`]), from the node's engine.

use super::cluster::off_runtime;
use super::conn::Conn;
use super::convert::ToWire;
use super::dispatch::{page_limit, Answer, Ctx};
use super::errors::ToReply;
use crate::protocol::{
    Body, ConvKind, Entry, ErrorCode, ErrorReply, GroupPage, HistoryFrom, HistoryPage, Identity,
    Request, Response, SendAck, SyncEntry, SyncReply,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use timeline_cluster::conversations::ConvLine;
use timeline_cluster::groups::GroupRead;
use timeline_cluster::im::read::{self, ReadError};
use timeline_cluster::im::{
    Delivery, ImRefusal, StoreEvent, CONV_DIRECT, CONV_GROUP, CONV_READ_GROUP, KIND_CREATED,
    KIND_DELETED_MARKER, KIND_MEMBER_ADDED, KIND_MEMBER_REMOVED, KIND_MESSAGE, KIND_READ_MARKER,
    KIND_RECALL, RECORD_OVERHEAD,
};
use timeline_cluster::members::{covers, upper, MembersCache};
use timeline_cluster::state_machine::payload_of;
use timeline_cluster::ClusterError;
use timeline_cluster::{ImOutcome, Mark, Node};
use timeline_engine::{Direction, Engine, Keyspace, TimelineId};

fn refusal(r: &ImRefusal) -> ErrorReply {
    let (code, arg) = match r {
        ImRefusal::Exists(c) => (ErrorCode::CONVERSATION_EXISTS, *c),
        ImRefusal::NoConversation(c) => (ErrorCode::NO_SUCH_CONVERSATION, *c),
        ImRefusal::NotMember { user, .. } => (ErrorCode::NOT_MEMBER, *user),
        ImRefusal::AlreadyMember { user, .. } => (ErrorCode::ALREADY_MEMBER, *user),
        ImRefusal::Damaged(_) => (ErrorCode::CORRUPTION, 0),
        ImRefusal::TooLarge { max, .. } => (ErrorCode::PAYLOAD_TOO_LARGE, *max as u64),
        ImRefusal::Invalid(_) => (ErrorCode::INVALID_ARGUMENT, 0),
    };
    ErrorReply::new(code, arg, r.to_string())
}

fn read_failed(e: ReadError) -> ErrorReply {
    match e {
        ReadError::Engine(e) => e.reply(),
        ReadError::Damaged(m) => ErrorReply::new(ErrorCode::CORRUPTION, 0, m),
    }
}

/// A conversation write's answer: `ok` with the conv seq and duplicate flag.
fn written(
    r: Result<ImOutcome, timeline_cluster::ClusterError>,
    ok: impl FnOnce(u64, bool) -> Response,
) -> Result<Response, ErrorReply> {
    match r.map_err(|e| e.reply())? {
        ImOutcome::Done {
            conv_seq,
            duplicate,
        } => Ok(ok(conv_seq, duplicate)),
        ImOutcome::Pending { conv_seq, .. } => Err(ErrorReply::new(
            ErrorCode::FANOUT_FAILED,
            conv_seq,
            "stored; delivery to the members' sync timelines is still under way and goes on (a SEND retried with the same client_msg_id answers once it is delivered)",
        )),
        ImOutcome::Refused(r) => Err(refusal(&r)),
    }
}

/// Run an IM request on a cluster node; `None` if `r` is not one it serves.
pub(crate) fn execute(
    ctx: &Ctx<'_>,
    conn: &mut Conn,
    id: u64,
    node: &Node,
    r: &Request<'_>,
) -> Option<Result<(), ErrorReply>> {
    if let Err(e) = check_ids(r) {
        return Some(Err(e));
    }
    let op = r.opcode();
    let sh = ctx.sh;
    match r {
        Request::CreateConversation {
            conv,
            kind,
            members,
        } => {
            let mut m = members.clone();
            m.sort_unstable();
            m.dedup();
            let direct = matches!(kind, ConvKind::Direct);
            // A group above the hybrid threshold is read fan-out.
            let kind = match kind {
                ConvKind::Direct => CONV_DIRECT,
                ConvKind::Group if m.len() > sh.im.config().hybrid_threshold => CONV_READ_GROUP,
                ConvKind::Group => CONV_GROUP,
            };
            // The Created record holds the members (8 bytes each).
            let most = max_members(sh.im.engine().config().max_payload);
            if m.is_empty() || (direct && m.len() != 2) || m.len() > most {
                return Some(Err(ErrorReply::new(
                    ErrorCode::INVALID_ARGUMENT,
                    0,
                    format!("a direct conversation has exactly two members, a group 1 to {most} on this node"),
                )));
            }
            let conv = *conv;
            let a = Answer::barrier(ctx, conn, id, op);
            node.im_create(conv, kind, m, move |r| {
                a.reply(written(r, |seq, _| Response::CreateConversation(seq)))
            });
        }
        Request::Send {
            conv,
            sender,
            client_msg_id,
            payload,
        } => {
            let max = sh
                .im
                .engine()
                .config()
                .max_payload
                .saturating_sub(RECORD_OVERHEAD);
            if payload.len() > max {
                return Some(Err(ErrorReply::new(
                    ErrorCode::PAYLOAD_TOO_LARGE,
                    max as u64,
                    format!(
                        "payload of {} bytes; a cluster node takes {max}",
                        payload.len()
                    ),
                )));
            }
            let conv = *conv;
            let a = Answer::deferred(ctx, conn, id, op);
            let counters = sh.counters.clone();
            node.im_send(conv, *sender, *client_msg_id, payload.to_vec(), move |r| {
                if let Ok(
                    ImOutcome::Done {
                        duplicate: false, ..
                    }
                    | ImOutcome::Pending {
                        duplicate: false, ..
                    },
                ) = &r
                {
                    counters.cluster_im.messages.fetch_add(1, Ordering::Relaxed);
                }
                a.reply(written(r, |seq, duplicate| {
                    Response::Send(SendAck {
                        conv,
                        seq,
                        duplicate,
                    })
                }))
            });
        }
        Request::Sync {
            user,
            checkpoint,
            limit,
            groups,
        } => {
            let (user, checkpoint) = (*user, *checkpoint);
            let limit = page_limit(sh, conn, *limit);
            let engine = node.engine().clone();
            let asked = groups.clone();
            let weak = Arc::downgrade(ctx.sh);
            let a = Answer::read(ctx, conn, id, op);
            let counters = sh.counters.clone();
            node.linearize(
                Keyspace::SYNC.0,
                user,
                off_runtime(sh, move |r: Result<(), ClusterError>| {
                    // Served here (a node that does not lead answers MOVED).
                    if r.is_ok() {
                        counters
                            .cluster_im
                            .sync_calls
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // The user's groups are read before its sync timeline: a
                    // group listed meanwhile (a join, a switch to read
                    // fan-out) is paged only once the entries written before
                    // its listing are in this reply or an earlier one.
                    let reply = r.map_err(|e| e.reply()).and_then(|()| {
                        let mine = read::groups_of(&engine, user).map_err(read_failed)?;
                        Ok((mine, sync(&engine, user, checkpoint, limit)?))
                    });
                    match reply {
                        // Groups are served once the sync timeline is drained,
                        // as on a single node.
                        Ok((mine, s)) if !s.has_more && s.truncated.is_none() => {
                            with_groups(weak, engine, (user, mine), &asked, limit, s, a)
                        }
                        Ok((_, s)) => answer_sync(&engine, user, s, a),
                        Err(e) => a.reply(Err(e)),
                    }
                }),
            );
        }
        Request::History {
            conv,
            user,
            from,
            limit,
        } => {
            let (conv, user, from) = (*conv, *user, *from);
            let limit = page_limit(sh, conn, *limit);
            let engine = node.engine().clone();
            let members = node.conv_members();
            let weak = Arc::downgrade(ctx.sh);
            let a = Answer::read(ctx, conn, id, op);
            node.linearize(
                Keyspace::STORE.0,
                conv,
                off_runtime(sh, move |r: Result<(), ClusterError>| {
                    let page = r.map_err(|e| e.reply()).and_then(|()| {
                        let read = (&engine, &*members);
                        history(read, conv, user, from, limit)
                    });
                    match page {
                        Ok(p) if p.entries.iter().any(|e| deletable(&e.body)) => {
                            with_deletes(weak, user, conv, p, a)
                        }
                        r => a.reply(r.map(Response::History)),
                    }
                }),
            );
        }
        Request::Recall { conv, user, target } => {
            let a = Answer::barrier(ctx, conn, id, op);
            node.im_recall(*conv, *user, *target, move |r| {
                a.reply(written(r, |seq, _| Response::Recall(seq)))
            });
        }
        Request::MarkRead { user, conv, seq } => {
            let a = Answer::barrier(ctx, conn, id, op);
            node.im_mark(*user, *conv, *seq, Mark::Read, move |r| {
                a.reply(written(r, |seq, _| Response::MarkRead(seq)))
            });
        }
        Request::DeleteForUser { user, conv, seq } => {
            let a = Answer::barrier(ctx, conn, id, op);
            node.im_mark(*user, *conv, *seq, Mark::Delete, move |r| {
                a.reply(written(r, |seq, _| Response::DeleteForUser(seq)))
            });
        }
        Request::Conversations { user } => {
            let a = Answer::read(ctx, conn, id, op);
            node.conversations(
                *user,
                off_runtime(sh, move |r: Result<Vec<ConvLine>, ClusterError>| {
                    a.reply(r.map_err(|e| e.reply()).map(|lines| {
                        Response::Conversations(lines.into_iter().map(conv_summary).collect())
                    }))
                }),
            );
        }
        Request::AddMember { conv, user } | Request::RemoveMember { conv, user } => {
            let add = matches!(r, Request::AddMember { .. });
            let a = Answer::barrier(ctx, conn, id, op);
            let threshold = sh.im.config().hybrid_threshold as u64;
            node.im_member(*conv, *user, add, threshold, move |r| {
                a.reply(written(r, |seq, _| match add {
                    true => Response::AddMember(seq),
                    false => Response::RemoveMember(seq),
                }))
            });
        }
        Request::Members { conv } => {
            let conv = *conv;
            let engine = node.engine().clone();
            let members = node.conv_members();
            // A user token lists only the conversations it is in (§12).
            let asker = match conn.session.id {
                Some(Identity::User(u)) => Some(u),
                _ => None,
            };
            let a = Answer::read(ctx, conn, id, op);
            node.linearize(
                Keyspace::STORE.0,
                conv,
                off_runtime(sh, move |r: Result<(), ClusterError>| {
                    a.reply(r.map_err(|e| e.reply()).and_then(|()| {
                        let found = members.get(&engine, conv).map_err(read_failed)?;
                        match (found, asker) {
                            // A conversation the user is not in is not told
                            // apart from a missing one, as on a single node.
                            (Ok(m), Some(u)) if !m.is_current(u) => Err(not_in(u)),
                            (Err(_), Some(u)) => Err(not_in(u)),
                            (Ok(m), _) => Ok(Response::Members(m.current())),
                            (Err(r), None) => Err(refusal(&r)),
                        }
                    }))
                }),
            );
        }
        _ => return None,
    }
    Some(Ok(()))
}

/// Conversation and user ids stay below 2^63, as on a single node
/// (protocol.md §11): the same requests are refused `INVALID_ARGUMENT`.
fn check_ids(r: &Request<'_>) -> Result<(), ErrorReply> {
    let ids: Vec<(&str, u64)> = match r {
        Request::CreateConversation { conv, members, .. } => {
            std::iter::once(("conversation", *conv))
                .chain(members.iter().map(|&m| ("user", m)))
                .collect()
        }
        Request::History { conv, user, .. }
        | Request::AddMember { conv, user }
        | Request::RemoveMember { conv, user } => vec![("conversation", *conv), ("user", *user)],
        Request::Sync { user, .. }
        | Request::MarkRead { user, .. }
        | Request::DeleteForUser { user, .. }
        | Request::Conversations { user } => vec![("user", *user)],
        _ => Vec::new(),
    };
    match ids.into_iter().find(|&(_, id)| id > timeline_im::MAX_ID) {
        None => Ok(()),
        Some((what, id)) => Err(ErrorReply::new(
            ErrorCode::INVALID_ARGUMENT,
            0,
            format!(
                "{what} id {id} is above {} (the top half is reserved)",
                timeline_im::MAX_ID
            ),
        )),
    }
}

/// `MEMBERS` with user `u`'s token of a conversation it is not in.
fn not_in(u: u64) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::FORBIDDEN,
        0,
        format!("user {u} may not list the members of a conversation it is not in"),
    )
}

/// Most members a cluster node's conversation takes: what one `Created`
/// record holds, at most 10,000.
fn max_members(max_payload: usize) -> usize {
    (max_payload.saturating_sub(RECORD_OVERHEAD + 1) / 8).min(10_000)
}

/// What a stored or delivered record of `kind` says (an entry's body).
fn im_body(kind: u8, body: Vec<u8>) -> timeline_im::Body {
    use timeline_im::Body as B;
    match kind {
        KIND_CREATED => B::Created {
            kind: match body.first() {
                Some(&CONV_DIRECT) => timeline_im::ConvKind::Direct,
                _ => timeline_im::ConvKind::Group,
            },
        },
        KIND_RECALL => B::Recall {
            target: body
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes),
        },
        KIND_READ_MARKER => B::ReadMarker,
        KIND_DELETED_MARKER => B::DeletedMarker,
        KIND_MEMBER_ADDED => B::MemberAdded(user_of(&body)),
        KIND_MEMBER_REMOVED => B::MemberRemoved(user_of(&body)),
        _ => B::Message(body),
    }
}

/// The user a membership event's body names (its first 8 bytes).
fn user_of(body: &[u8]) -> u64 {
    body.get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn body_of(kind: u8, body: Vec<u8>) -> Body {
    im_body(kind, body).wire()
}

/// A `CONVERSATIONS` line.
fn conv_summary(l: timeline_cluster::conversations::ConvLine) -> crate::protocol::ConvSummary {
    crate::protocol::ConvSummary {
        conv: l.conv,
        kind: match l.kind {
            CONV_DIRECT => ConvKind::Direct,
            _ => ConvKind::Group,
        },
        last_seq: l.last_seq,
        read_seq: l.read_seq,
        unread: l.unread,
        member: l.member,
        read_fanout: l.read_fanout,
    }
}

/// Answer `s` with pages of `user`'s read-fan-out groups added (from the
/// groups' partitions' leaders), in what is left of `limit`: every group
/// it was ever in (a former member's pages end where it left). A group
/// the device has no checkpoint for starts after the user's join (its
/// `Created` event or `MemberAdded`, which came through the sync
/// timeline).
fn with_groups(
    weak: std::sync::Weak<super::Shared>,
    engine: Arc<Engine>,
    (user, mine): (u64, Vec<(u64, bool)>),
    asked: &[(u64, u64)],
    limit: usize,
    mut s: SyncReply,
    a: Answer,
) {
    let sh = match alive(&weak) {
        Ok(sh) => sh,
        Err(e) => return a.reply(Err(e)),
    };
    let Some(node) = sh.cluster.as_ref().filter(|_| !mine.is_empty()) else {
        return answer_sync(&engine, user, s, a);
    };
    let reqs = mine
        .into_iter()
        .map(|(conv, _)| GroupRead {
            conv,
            user,
            after: asked.iter().find(|g| g.0 == conv).map_or(1, |g| g.1).max(1),
            limit: u32::MAX,
        })
        .collect();
    let budget = limit.saturating_sub(s.entries.len());
    node.group_pages(
        reqs,
        budget,
        off_runtime(
            &sh,
            move |r: Result<(Vec<timeline_cluster::groups::GroupPage>, bool), ClusterError>| match r
            {
                Ok((pages, more)) => {
                    s.has_more |= more;
                    s.groups = pages.into_iter().map(group_page).collect();
                    answer_sync(&engine, user, s, a)
                }
                Err(e) => a.reply(Err(e.reply())),
            },
        ),
    );
}

/// Answer a `SYNC` page (sync entries and group pages) with the user's own
/// recalls and deletes shown, both lists read once.
fn answer_sync(engine: &Engine, user: u64, mut s: SyncReply, a: Answer) {
    let entries = s
        .entries
        .iter_mut()
        .map(|e| &mut e.entry)
        .chain(s.groups.iter_mut().flat_map(|g| g.entries.iter_mut()));
    let shown = hide_recalled_and_deleted(engine, user, entries);
    a.reply(shown.map(|()| Response::Sync(s)))
}

/// The server, unless it is stopping (then the reply to give).
fn alive(weak: &std::sync::Weak<super::Shared>) -> Result<Arc<super::Shared>, ErrorReply> {
    weak.upgrade()
        .ok_or_else(|| ErrorReply::new(ErrorCode::CLOSED, 0, "the server is stopping"))
}

fn group_page(p: timeline_cluster::groups::GroupPage) -> GroupPage {
    let checkpoint = p.events.last().map_or(0, |(seq, _)| *seq);
    let conv = p.conv;
    GroupPage {
        conv,
        has_more: checkpoint < p.last,
        checkpoint,
        entries: p
            .events
            .into_iter()
            .map(|(conv_seq, ev)| Entry {
                conv,
                conv_seq,
                sender: ev.sender,
                timestamp_ms: ev.ts,
                // Read from the store now: a recalled message withheld,
                // as `HISTORY` does.
                body: if ev.kind == KIND_MESSAGE && p.recalled.contains(&conv_seq) {
                    Body::Recalled
                } else {
                    body_of(ev.kind, ev.body)
                },
            })
            .collect(),
    }
}

/// A user's sync page after `checkpoint`.
fn sync(
    engine: &Arc<Engine>,
    user: u64,
    checkpoint: u64,
    limit: usize,
) -> Result<SyncReply, ErrorReply> {
    let tl = TimelineId::new(Keyspace::SYNC, user);
    let from = checkpoint.saturating_add(1);
    // No up-front `first_retained_seq` (it walks the timeline's segments):
    // a scan from below what the sync TTL kept says where data starts, and
    // the reply says so with no entries and the checkpoint unchanged, as
    // on a single node (the device roams with HISTORY, then syncs on).
    let recs = match limit {
        0 => Vec::new(),
        _ => match engine.scan(tl, from, limit, Direction::Forward) {
            Err(timeline_engine::Error::Truncated { first_retained, .. }) => {
                return Ok(SyncReply {
                    has_more: true,
                    checkpoint,
                    entries: Vec::new(),
                    truncated: Some(first_retained),
                    groups: Vec::new(),
                });
            }
            r => r.map_err(|e| e.reply())?,
        },
    };
    let mut entries = Vec::with_capacity(recs.len());
    for r in recs {
        let d = payload_of(&r.payload)
            .and_then(|b| Delivery::from_sync_record(user, b))
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::CORRUPTION,
                    0,
                    format!("user {user}'s sync entry {} does not decode", r.seq),
                )
            })?;
        entries.push(SyncEntry {
            seq: r.seq,
            entry: Entry {
                conv: d.conv,
                conv_seq: d.conv_seq,
                sender: d.sender,
                timestamp_ms: d.ts,
                body: body_of(d.kind, d.body),
            },
        });
    }
    let last = entries.last().map_or(checkpoint, |e| e.seq);
    Ok(SyncReply {
        has_more: engine.last_seq(tl) > last,
        checkpoint: last,
        entries,
        truncated: None,
        groups: Vec::new(),
    })
}

/// A message (recalled or not) the user may have deleted for itself.
fn deletable(b: &Body) -> bool {
    matches!(b, Body::Message(_) | Body::Recalled)
}

/// Show the messages among `entries` recalled since they were delivered
/// as `Recalled`, and those `user` deleted for itself as `Deleted`, as on
/// a single node. Both lists are kept in the user's own partition, which
/// this node leads (a `SYNC` is served there): local reads, an index
/// lookup each for a user with none.
fn hide_recalled_and_deleted<'a>(
    engine: &Engine,
    user: u64,
    entries: impl Iterator<Item = &'a mut Entry>,
) -> Result<(), ErrorReply> {
    let mut entries = entries.filter(|e| deletable(&e.body)).peekable();
    if entries.peek().is_none() {
        return Ok(());
    }
    let set = |v: Vec<(u64, u64)>| v.into_iter().collect::<HashSet<(u64, u64)>>();
    let recalled = set(read::recalled(engine, user).map_err(read_failed)?);
    let deleted = set(read::deleted(engine, user).map_err(read_failed)?);
    for e in entries {
        let at = (e.conv, e.conv_seq);
        if deleted.contains(&at) {
            e.body = Body::Deleted;
        } else if recalled.contains(&at) {
            e.body = Body::Recalled;
        }
    }
    Ok(())
}

/// Answer `page` with the messages `user` deleted for itself shown
/// `Deleted` (as on a single node), read from the leader of the user's
/// partition.
fn with_deletes(
    weak: std::sync::Weak<super::Shared>,
    user: u64,
    conv: u64,
    mut page: HistoryPage,
    a: Answer,
) {
    let sh = match alive(&weak) {
        Ok(sh) => sh,
        Err(e) => return a.reply(Err(e)),
    };
    let Some(node) = sh.cluster.as_ref() else {
        return a.reply(Ok(Response::History(page)));
    };
    node.user_deletes(
        user,
        conv,
        off_runtime(&sh, move |r: Result<Vec<u64>, ClusterError>| {
            a.reply(r.map_err(|e| e.reply()).map(|deleted| {
                let deleted: HashSet<u64> = deleted.into_iter().collect();
                for e in &mut page.entries {
                    if deletable(&e.body) && deleted.contains(&e.conv_seq) {
                        e.body = Body::Deleted;
                    }
                }
                Response::History(page)
            }))
        }),
    );
}

/// A page of a conversation's history, for a member or a former one:
/// inside its stays (`[join, leave]`, as on a single node).
fn history(
    (engine, members): (&Arc<Engine>, &MembersCache),
    conv: u64,
    user: u64,
    from: HistoryFrom,
    limit: usize,
) -> Result<HistoryPage, ErrorReply> {
    let members = members
        .get(engine, conv)
        .map_err(read_failed)?
        .map_err(|r| refusal(&r))?;
    let stays = members.stays(user);
    if stays.is_empty() {
        return Err(refusal(&ImRefusal::NotMember { conv, user }));
    }
    let tl = TimelineId::new(Keyspace::STORE, conv);
    let hi = upper(&stays, engine.last_seq(tl));
    let lo = engine
        .first_retained_seq(tl)
        .map_err(|e| e.reply())?
        .max(stays[0].0);
    // A start between two stays moves to the nearest stay in the paging
    // direction, so a page holds an entry whenever one is left.
    let (start, dir) = match from {
        HistoryFrom::Before(s) => {
            let s = s.saturating_sub(1).min(hi);
            let s = stays
                .iter()
                .rev()
                .find(|st| st.0 <= s)
                .map_or(0, |st| st.1.min(s));
            (s, Direction::Backward)
        }
        HistoryFrom::After(s) => {
            let s = s.saturating_add(1).max(lo);
            let s = stays
                .iter()
                .find(|st| st.1 >= s)
                .map_or(u64::MAX, |st| st.0.max(s));
            (s, Direction::Forward)
        }
    };
    let in_range = start >= lo && start <= hi;
    let recs = if limit == 0 || !in_range {
        Vec::new()
    } else {
        let n = (limit as u64).min(match dir {
            Direction::Forward => hi - start + 1,
            Direction::Backward => start - lo + 1,
        });
        engine
            .scan(tl, start, n as usize, dir)
            .map_err(|e| e.reply())?
    };
    let edge = recs.last().map(|r| r.seq);
    let recs: Vec<_> = recs.into_iter().filter(|r| covers(&stays, r.seq)).collect();
    let recalled: HashSet<u64> = match recs.is_empty() {
        true => HashSet::new(),
        false => read::recalls(engine, conv)
            .map_err(read_failed)?
            .into_iter()
            .map(|(_, t)| t)
            .collect(),
    };
    let mut entries = Vec::with_capacity(recs.len());
    for r in &recs {
        let (_, ev): (u64, StoreEvent) =
            read::decode_event(&r.payload, conv, r.seq).map_err(read_failed)?;
        let body = if ev.kind == KIND_MESSAGE && recalled.contains(&r.seq) {
            Body::Recalled
        } else {
            body_of(ev.kind, ev.body)
        };
        entries.push(Entry {
            conv,
            conv_seq: r.seq,
            sender: ev.sender,
            timestamp_ms: ev.ts,
            body,
        });
    }
    let has_more = match (edge, dir) {
        (Some(e), Direction::Forward) => e < hi,
        (Some(e), Direction::Backward) => e > lo,
        (None, _) => limit == 0 && in_range,
    };
    Ok(HistoryPage { entries, has_more })
}

/// Pushes the sync entries this node's replicas apply to the devices
/// subscribed here (through the IM layer's subscriber registry).
pub(crate) struct PushHook(pub(crate) std::sync::Weak<super::Shared>);

impl timeline_cluster::im::DeliveryHook for PushHook {
    fn delivered(&self, seq: u64, d: &Delivery) {
        let Some(sh) = self.0.upgrade() else { return };
        sh.counters
            .cluster_im
            .sync_writes
            .fetch_add(1, Ordering::Relaxed);
        // Built only for a user with a device subscribed here.
        let here = sh.im.push_to(d.user, || {
            let body = im_body(d.kind, d.body.clone());
            timeline_im::Push::Entry {
                user: d.user,
                entry: timeline_im::SyncEntry {
                    seq,
                    entry: timeline_im::Entry {
                        conv: d.conv,
                        conv_seq: d.conv_seq,
                        sender: d.sender,
                        timestamp_ms: d.ts,
                        body,
                    },
                },
            }
        });
        if here && d.lists_group() && sh.group_watch.add(d.conv, d.user) {
            // The first subscriber here in this group: register the interest.
            if let Some(node) = &sh.cluster {
                node.watch_groups(vec![d.conv], || {});
            }
        }
        if d.leaves() == Some(CONV_READ_GROUP) {
            sh.group_watch.forget(d.conv, &[d.user]);
        }
    }

    /// The devices subscribed here to a user of the partition get one
    /// `resync`: this node pushes nothing of theirs any more, so they
    /// should `SYNC` and subscribe again at the partition's leader.
    fn partition_left(&self, partition: u32, partitions: u32) {
        let Some(sh) = self.0.upgrade() else { return };
        let sync = crate::protocol::Keyspace::SYNC.0;
        for user in sh.im.subscribed_users() {
            if timeline_cluster::partition::partition_of(sync, user, partitions) == partition {
                sh.im.push_to(user, || timeline_im::Push::Resync);
                sh.group_watch.forget_user(user);
            }
        }
    }

    fn watched_groups(&self) -> Vec<u64> {
        self.0
            .upgrade()
            .map(|sh| sh.group_watch.watched())
            .unwrap_or_default()
    }

    fn group_message(&self, conv: u64, conv_seq: u64, ev: &StoreEvent) {
        let Some(sh) = self.0.upgrade() else { return };
        // A member's own join or removal reaches it through its sync
        // timeline (pushed as an entry), not as a group entry; a removed
        // member gets no push of the group from here on (its own removal's
        // delivery may come later: its partition may be slower).
        let names =
            matches!(ev.kind, KIND_MEMBER_ADDED | KIND_MEMBER_REMOVED).then(|| user_of(&ev.body));
        if let (KIND_MEMBER_REMOVED, Some(u)) = (ev.kind, names) {
            sh.group_watch.forget(conv, &[u]);
        }
        let mut gone = Vec::new();
        for user in sh.group_watch.members(conv) {
            if names == Some(user) {
                continue;
            }
            let pushed = sh.im.push_to(user, || timeline_im::Push::Group {
                user,
                entry: timeline_im::Entry {
                    conv,
                    conv_seq,
                    sender: ev.sender,
                    timestamp_ms: ev.ts,
                    body: im_body(ev.kind, ev.body.clone()),
                },
            });
            if !pushed {
                gone.push(user);
            }
        }
        // Not one that subscribed again meanwhile (its subscription adds
        // it back to the watch after registering its sink).
        sh.group_watch
            .forget_unless(conv, &gone, |u| sh.im.has_subscriber(u));
    }
}

/// Whom a read-fan-out group's message is pushed to on this node: the
/// users subscribed here, by group. Filled when a user subscribes (its
/// groups, from this node's replica of its partition) and when a user
/// subscribed here joins a group; a user found without a subscriber at a
/// push is dropped (a hint, as every push).
#[derive(Default)]
pub(crate) struct GroupWatch(std::sync::Mutex<HashMap<u64, HashSet<u64>>>);

impl GroupWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HashSet<u64>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watch `conv` for `user`: `true` if no one here watched it before.
    fn add(&self, conv: u64, user: u64) -> bool {
        let mut g = self.lock();
        let set = g.entry(conv).or_default();
        let fresh = set.is_empty();
        set.insert(user);
        fresh
    }

    /// The groups watched here (this node's interest).
    fn watched(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    fn members(&self, conv: u64) -> Vec<u64> {
        self.lock()
            .get(&conv)
            .map(|u| u.iter().copied().collect())
            .unwrap_or_default()
    }

    fn forget(&self, conv: u64, users: &[u64]) {
        if users.is_empty() {
            return;
        }
        let mut g = self.lock();
        if let Some(set) = g.get_mut(&conv) {
            for u in users {
                set.remove(u);
            }
            if set.is_empty() {
                g.remove(&conv);
            }
        }
    }

    /// [`GroupWatch::forget`] those of `users` for whom `keep` is false,
    /// asked under the watch's lock: a user whose subscription registered
    /// its sink before this runs is kept, one that registers after it is
    /// added back by that subscription.
    fn forget_unless(&self, conv: u64, users: &[u64], keep: impl Fn(u64) -> bool) {
        if users.is_empty() {
            return;
        }
        let mut g = self.lock();
        if let Some(set) = g.get_mut(&conv) {
            for &u in users {
                if !keep(u) {
                    set.remove(&u);
                }
            }
            if set.is_empty() {
                g.remove(&conv);
            }
        }
    }

    /// Stop watching any group for `user` (this node no longer applies
    /// its sync timeline, so it would not see it leave one).
    fn forget_user(&self, user: u64) {
        self.lock().retain(|_, set| {
            set.remove(&user);
            !set.is_empty()
        });
    }

    /// `user` subscribed on this node: watch the groups it is in (those
    /// this node's replica of the user's partition lists; none without
    /// one). Returns those no one here watched before.
    pub(crate) fn subscribed(&self, node: &Node, user: u64) -> Vec<u64> {
        let mut fresh = Vec::new();
        for conv in groups_listed(node, user) {
            if self.add(conv, user) {
                fresh.push(conv);
            }
        }
        fresh
    }

    /// The groups `user` is in that no one here watches yet (what a
    /// `SUBSCRIBE` registers before it is answered).
    pub(crate) fn unwatched(&self, node: &Node, user: u64) -> Vec<u64> {
        let listed = groups_listed(node, user);
        let g = self.lock();
        listed
            .into_iter()
            .filter(|c| g.get(c).is_none_or(|s| s.is_empty()))
            .collect()
    }
}

/// The read-fan-out groups this node's replica of `user`'s partition
/// lists as current (none without a replica; logged if unreadable).
fn groups_listed(node: &Node, user: u64) -> Vec<u64> {
    match node.read_groups(user) {
        Ok(groups) => groups.into_iter().filter(|g| g.1).map(|g| g.0).collect(),
        Err(e) => {
            tracing::warn!(user, error = %e, "read-fan-out groups not watched");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;
    use timeline_engine::{Config, Durability, ManualClock};

    /// A user's sync record as a cluster replica stores it (write id, then
    /// the delivery).
    fn record(conv_seq: u64) -> Vec<u8> {
        let d = Delivery {
            user: 5,
            conv: 9,
            conv_seq,
            sender: 1,
            ts: 0,
            kind: KIND_MESSAGE,
            body: b"hi".to_vec(),
        };
        let mut b = conv_seq.to_le_bytes().to_vec();
        b.extend_from_slice(&d.sync_record());
        b
    }

    #[test]
    fn a_sync_below_what_the_ttl_kept_is_truncated_with_no_entries() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_700_000_000_000);
        let mut c = Config::default();
        c.background = false;
        c.shards = 1;
        c.clock = Arc::new(clock.clone());
        *c.keyspace_mut(Keyspace::SYNC) = c
            .keyspace(Keyspace::SYNC)
            .clone()
            .with_ttl(Some(Duration::from_secs(80)));
        let e = Arc::new(Engine::open(dir.path(), c).unwrap());
        let tl = TimelineId::new(Keyspace::SYNC, 5);
        // Seqs 1–3 in one window, 4–6 in the next; then the first expires.
        for round in 0..2u64 {
            for i in 1..=3 {
                e.append_batch(&[(tl, &record(round * 3 + i))], Durability::Buffered)
                    .unwrap();
            }
            clock.advance_ms(10_000);
        }
        clock.advance_ms(65_000);
        e.maintain().unwrap();
        assert_eq!(e.first_retained_seq(tl).unwrap(), 4, "seqs 1-3 expired");

        // As on a single node (protocol §8): no entries, the checkpoint
        // where it was, has_more, and where the data starts.
        for checkpoint in [0, 2] {
            let r = sync(&e, 5, checkpoint, 10).unwrap();
            assert_eq!(r.truncated, Some(4), "checkpoint {checkpoint}");
            assert!(r.entries.is_empty());
            assert_eq!(r.checkpoint, checkpoint);
            assert!(r.has_more);
        }
        // From first_retained - 1 (what the reply tells the device): the rest.
        let r = sync(&e, 5, 3, 10).unwrap();
        assert_eq!(r.truncated, None);
        let seqs: Vec<u64> = r.entries.iter().map(|x| x.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6]);
        assert_eq!((r.checkpoint, r.has_more), (6, false));
        // Paged, and past the end.
        let r = sync(&e, 5, 3, 2).unwrap();
        assert_eq!((r.checkpoint, r.has_more, r.entries.len()), (5, true, 2));
        let r = sync(&e, 5, 6, 10).unwrap();
        assert_eq!((r.checkpoint, r.has_more, r.entries.len()), (6, false, 0));
    }
}
