//! Planning: queued requests become validated ops with their seqs, cut
//! into batches (membership changes are batches of their own).

use super::{Ack, Mark, MemberChange, Request, Worker, MAX_WRITE_BYTES};
use crate::directory::is_current;
use crate::entry::{ConvKind, EventKind, IntentOp, StoreEntry};
use crate::{Body, ConvId, ImError, Reply, Result, SendAck, UserId};
use hashbrown::HashMap;
use timeline_engine::{SeqId, TimelineId};

/// What a conversation op does.
pub(super) enum Event {
    Message {
        sender: UserId,
        cmid: u64,
    },
    Recall {
        user: UserId,
        target: SeqId,
    },
    Created {
        kind: ConvKind,
        members: Vec<UserId>,
    },
    Member {
        user: UserId,
        change: MemberChange,
    },
}

/// A conversation operation of a batch, validated, with its seq and the
/// body its store record carries (the message, or a creation's members).
pub(super) struct Op {
    pub conv: ConvId,
    pub seq: SeqId,
    pub event: Event,
    pub body: Vec<u8>,
    pub ack: Option<Ack>,
}

impl Op {
    pub fn kind(&self) -> EventKind {
        match self.event {
            Event::Message { .. } => EventKind::Message,
            Event::Recall { .. } => EventKind::Recall,
            Event::Created { .. } => EventKind::Created,
            Event::Member {
                change: MemberChange::Add,
                ..
            } => EventKind::MemberAdded,
            Event::Member {
                change: MemberChange::Remove,
                ..
            } => EventKind::MemberRemoved,
        }
    }

    /// The store record's fields (see `StoreEntry`).
    pub fn store_entry(&self) -> StoreEntry<'_> {
        let (sender, cmid, arg) = match self.event {
            Event::Message { sender, cmid } => (sender, cmid, 0),
            Event::Recall { user, target } => (user, 0, target),
            Event::Created { kind, .. } => (0, 0, kind as u64),
            Event::Member { user, .. } => (0, 0, user),
        };
        StoreEntry {
            kind: self.kind(),
            sender,
            cmid,
            arg,
            body: &self.body,
        }
    }

    pub fn intent(&self) -> IntentOp {
        let e = self.store_entry();
        IntentOp {
            conv: self.conv,
            seq: self.seq,
            kind: e.kind,
            sender: e.sender,
            cmid: e.cmid,
            arg: e.arg,
        }
    }

    /// What a push of this op's entry says.
    pub fn push_body(&self) -> Body {
        match &self.event {
            Event::Message { .. } => Body::Message(self.body.clone()),
            Event::Created { kind, .. } => Body::Created { kind: *kind },
            Event::Member {
                user,
                change: MemberChange::Add,
            } => Body::MemberAdded(*user),
            Event::Member {
                user,
                change: MemberChange::Remove,
            } => Body::MemberRemoved(*user),
            Event::Recall { target, .. } => Body::Recall { target: *target },
        }
    }
}

/// The next seq of each conversation within one batch.
#[derive(Default)]
struct Seqs(HashMap<ConvId, SeqId>);

impl Seqs {
    fn take(&mut self, w: &Worker, conv: ConvId) -> SeqId {
        let s = self
            .0
            .entry(conv)
            .or_insert_with(|| w.sh.engine.last_seq(TimelineId::store(conv)) + 1);
        let seq = *s;
        *s += 1;
        seq
    }
}

/// The batch being planned.
#[derive(Default)]
struct Run {
    ops: Vec<Op>,
    /// Retries of sends made earlier in this same batch.
    extra: Vec<Ack>,
    seqs: Seqs,
    bytes: usize,
}

impl Worker {
    /// Turn the backlog into batches (as many as the window has room for).
    pub(super) fn handle_requests(&mut self) {
        let mut run = Run::default();
        let mut marks = Vec::new();
        while let Some(r) = self.backlog.pop_front() {
            match r {
                Request::UserMark {
                    user,
                    conv,
                    seq,
                    mark,
                    reply,
                } => marks.push((user, conv, seq, mark, reply)),
                Request::Send {
                    conv,
                    sender,
                    cmid,
                    payload,
                    reply,
                } => self.plan_send(&mut run, conv, sender, cmid, payload, reply),
                Request::Recall {
                    conv,
                    user,
                    target,
                    reply,
                } => match self.check_recall(conv, user, target).and_then(|()| {
                    // A recall of the same message earlier in this run (on
                    // another connection) is not in the recalled set yet.
                    let twice = run.ops.iter().any(|o| {
                        o.conv == conv
                            && matches!(o.event, Event::Recall { target: t, .. } if t == target)
                    });
                    match twice {
                        true => Err(ImError::InvalidArgument(format!(
                            "message {target} is already recalled"
                        ))),
                        false => Ok(()),
                    }
                }) {
                    Err(e) => {
                        reply.send(Err(e));
                    }
                    Ok(()) => {
                        let seq = run.seqs.take(self, conv);
                        run.ops.push(Op {
                            conv,
                            seq,
                            event: Event::Recall { user, target },
                            body: Vec::new(),
                            ack: Some(Ack::Seq(reply, seq)),
                        });
                    }
                },
                r @ (Request::Create { .. } | Request::Member { .. }) => {
                    // Membership changes are batches of their own: every op
                    // before them fans out to the old members, every op
                    // after to the new ones.
                    self.write_run(&mut run);
                    if !self.has_room() {
                        self.backlog.push_front(r);
                        break;
                    }
                    if let Some(op) = self.membership_op(r) {
                        self.write_batch(vec![op], Vec::new());
                    }
                    if !self.has_room() {
                        break;
                    }
                }
            }
            if run.ops.len() >= self.sh.cfg.max_batch || run.bytes >= MAX_WRITE_BYTES / 2 {
                self.write_run(&mut run);
                if !self.has_room() {
                    break;
                }
            }
        }
        self.write_run(&mut run);
        if !marks.is_empty() {
            self.user_marks(marks);
        }
    }

    fn has_room(&self) -> bool {
        self.sh.workers[self.p].window.has_room(self.next_batch)
    }

    fn write_run(&mut self, run: &mut Run) {
        if !run.ops.is_empty() || !run.extra.is_empty() {
            let r = std::mem::take(run);
            self.write_batch(r.ops, r.extra);
        }
    }

    fn plan_send(
        &mut self,
        run: &mut Run,
        conv: ConvId,
        sender: UserId,
        cmid: u64,
        payload: Vec<u8>,
        reply: Reply<SendAck>,
    ) {
        // A retry first: its sender may have left since (it gets its
        // message's seq, not NOT_MEMBER).
        let key = (conv, sender, cmid);
        if let Some(&(seq, batch)) = self.dedup.get(&key) {
            let dup = SendAck {
                conv,
                seq,
                duplicate: true,
            };
            if batch == self.next_batch {
                run.extra.push(Ack::Send(reply, dup)); // retried within this very batch
            } else {
                self.ack_when_done(batch, Ack::Send(reply, dup));
            }
            return;
        }
        if let Err(e) = self.check_member(conv, sender) {
            reply.send(Err(e));
            return;
        }
        let seq = run.seqs.take(self, conv);
        self.dedup.insert(key, (seq, self.next_batch));
        self.dedup_order.push_back((self.sh.now_ms(), key));
        run.bytes += payload.len();
        let ack = SendAck {
            conv,
            seq,
            duplicate: false,
        };
        run.ops.push(Op {
            conv,
            seq,
            event: Event::Message { sender, cmid },
            body: payload,
            ack: Some(Ack::Send(reply, ack)),
        });
    }

    fn check_member(&self, conv: ConvId, user: UserId) -> Result<()> {
        let convs = self.sh.dir.convs[self.p].read();
        let c = convs.get(&conv).ok_or(ImError::NoSuchConversation(conv))?;
        match c.members.get(&user) {
            Some(iv) if is_current(iv) => Ok(()),
            _ => Err(ImError::NotMember { conv, user }),
        }
    }

    fn check_recall(&self, conv: ConvId, user: UserId, target: SeqId) -> Result<()> {
        self.check_member(conv, user)?;
        if self.sh.dir.convs[self.p]
            .read()
            .get(&conv)
            .is_some_and(|c| c.recalled.contains(&target))
        {
            return Err(ImError::InvalidArgument(format!(
                "message {target} is already recalled"
            )));
        }
        let rec = self
            .sh
            .engine
            .get(TimelineId::store(conv), target)?
            .ok_or_else(|| ImError::InvalidArgument(format!("no message {target} in {conv}")))?;
        let e = StoreEntry::decode(&rec.payload)?;
        if e.kind != EventKind::Message || e.sender != user {
            return Err(ImError::InvalidArgument(format!(
                "seq {target} is not a message of user {user}"
            )));
        }
        Ok(())
    }

    /// Validate a create or membership request into its op (or answer it).
    fn membership_op(&self, r: Request) -> Option<Op> {
        let convs = self.sh.dir.convs[self.p].read();
        match r {
            Request::Create {
                conv,
                kind,
                members,
                reply,
            } => {
                let last = self.sh.engine.last_seq(TimelineId::store(conv));
                if convs.contains_key(&conv) {
                    reply.send(Err(ImError::ConversationExists(conv)));
                    return None;
                }
                if last != 0 {
                    reply.send(Err(ImError::InvalidArgument(format!(
                        "store timeline {conv} already holds records not written by the IM layer"
                    ))));
                    return None;
                }
                let body = members.iter().flat_map(|m| m.to_le_bytes()).collect();
                Some(Op {
                    conv,
                    seq: 1,
                    event: Event::Created { kind, members },
                    body,
                    ack: Some(Ack::Seq(reply, 1)),
                })
            }
            Request::Member {
                conv,
                user,
                change,
                reply,
            } => {
                let Some(c) = convs.get(&conv) else {
                    reply.send(Err(ImError::NoSuchConversation(conv)));
                    return None;
                };
                if c.kind == ConvKind::Direct {
                    reply.send(Err(ImError::InvalidArgument(
                        "members of a direct conversation cannot change".into(),
                    )));
                    return None;
                }
                let current = c.members.get(&user).is_some_and(is_current);
                let refusal = match change {
                    MemberChange::Add if current => Some(ImError::AlreadyMember { conv, user }),
                    MemberChange::Remove if !current => Some(ImError::NotMember { conv, user }),
                    _ => None,
                };
                if let Some(e) = refusal {
                    reply.send(Err(e));
                    return None;
                }
                let seq = self.sh.engine.last_seq(TimelineId::store(conv)) + 1;
                Some(Op {
                    conv,
                    seq,
                    event: Event::Member { user, change },
                    body: Vec::new(),
                    ack: Some(Ack::Seq(reply, seq)),
                })
            }
            other => {
                // Not a membership request: unreachable by construction.
                other.reject(&ImError::InvalidArgument("not a membership request".into()));
                None
            }
        }
    }
}

/// A mark request waiting for its user's worker.
pub(super) type MarkRequest = (UserId, ConvId, SeqId, Mark, Reply<SeqId>);
