//! One worker per shard. Worker `p` is the only writer of shard `p`'s
//! conversation timelines, journal and catalog (store keyspace) and of its
//! users' sync timelines (sync keyspace). A send travels:
//!
//! 1. caller → the conversation's worker (`requests` mailbox; blocks when
//!    full: backpressure);
//! 2. that worker writes a batch: journal intent + conversation records +
//!    catalog records in one engine write, durable per the configured
//!    durability; publishes the conversations' watermarks;
//! 3. it hands one `Delivery` per receiving shard to that shard's worker
//!    (`deliveries` mailbox, never blocking: a full mailbox keeps the
//!    delivery in a local FIFO outbox, since two workers blocked on each
//!    other's full mailboxes would deadlock);
//! 4. each receiving worker appends the sync entries (one engine write per
//!    drained set), makes them durable, publishes its users' watermarks,
//!    pushes to subscribers and arrives on the batch's latch;
//! 5. the last arrival acknowledges the senders and marks the batch done in
//!    the owner's completion window; the owner journals "done" marks.
//!
//! A sync write that fails (a full disk, an I/O error) never drops its
//! delivery: the receiving worker keeps it, and every delivery after it, in
//! its FIFO of undelivered work (so each user's entries stay in order) and
//! retries on a backoff timer until the write succeeds. Until then the
//! batches involved are *deferred*: their senders are answered at once with
//! `FanoutFailed` (stored, delivery pending), the batch does not finish, so
//! the journal's done mark stays below it and recovery re-drives it after a
//! crash. While any worker is stalled, an owner that cannot start a batch
//! answers queued requests with the stall's error instead of letting their
//! senders block.

use crate::directory::{self, covers, is_current};
use crate::entry::{
    self, CatalogRecord, ConvKind, EventKind, IntentOp, JournalRecord, StoreEntry, SyncRecord,
};
use crate::fanout::mailbox::PushError;
use crate::fanout::watermark::Latch;
use crate::subscribe::Push;
use crate::{
    bump, Body, ConvId, Entry, EntryMode, ImError, Reply, Result, SendAck, Shared, SyncEntry,
    UserId,
};
use hashbrown::HashMap;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timeline_engine::Durability;
use timeline_engine::Keyspace;
use timeline_engine::{SeqId, TimelineId};

pub(crate) enum Request {
    Send {
        conv: ConvId,
        sender: UserId,
        cmid: u64,
        payload: Vec<u8>,
        reply: Reply<SendAck>,
    },
    Create {
        conv: ConvId,
        kind: ConvKind,
        members: Vec<UserId>,
        reply: Reply<SeqId>,
    },
    Member {
        conv: ConvId,
        user: UserId,
        add: bool,
        reply: Reply<SeqId>,
    },
    Recall {
        conv: ConvId,
        user: UserId,
        target: SeqId,
        reply: Reply<SeqId>,
    },
    /// Read marker or delete-for-me: handled by the user's worker.
    UserMark {
        user: UserId,
        conv: ConvId,
        seq: SeqId,
        delete: bool,
        reply: Reply<SeqId>,
    },
}

enum Ack {
    Send(Reply<SendAck>, SendAck),
    Seq(Reply<SeqId>, SeqId),
}

impl Request {
    /// Answer without doing anything (the layer cannot take it now).
    fn reject(self, e: &ImError) {
        match self {
            Request::Send { reply, .. } => {
                let _ = reply.send(Err(e.duplicate()));
            }
            Request::Create { reply, .. }
            | Request::Member { reply, .. }
            | Request::Recall { reply, .. }
            | Request::UserMark { reply, .. } => {
                let _ = reply.send(Err(e.duplicate()));
            }
        }
    }
}

impl Ack {
    /// Answer a stored op: `pending` says its delivery is not durable yet.
    fn send(self, pending: Option<&str>) {
        match self {
            Ack::Send(r, a) => {
                // A retry shares its original's fate: never an Ok for a
                // message whose fan-out is not durable.
                let _ = r.send(match pending {
                    Some(why) => Err(ImError::FanoutFailed {
                        conv: a.conv,
                        seq: a.seq,
                        reason: why.to_string(),
                    }),
                    _ => Ok(a),
                });
            }
            Ack::Seq(r, s) => {
                let _ = r.send(match pending {
                    Some(why) => Err(ImError::FanoutFailed {
                        conv: 0,
                        seq: s,
                        reason: why.to_string(),
                    }),
                    None => Ok(s),
                });
            }
        }
    }

    /// The batch was not written: the request failed as a whole, with the
    /// engine's own error (a full disk stays `StorageFull`).
    fn fail(self, e: &ImError) {
        match self {
            Ack::Send(r, _) => {
                let _ = r.send(Err(e.duplicate()));
            }
            Ack::Seq(r, _) => {
                let _ = r.send(Err(e.duplicate()));
            }
        }
    }
}

#[derive(Default)]
struct BatchState {
    /// Every delivery is durable; the acks went out as `Ok`.
    completed: bool,
    /// A delivery failed and is being retried: the acks went out as
    /// pending (`FanoutFailed`), and so does every later retry's, until
    /// `completed`.
    deferred: Option<String>,
    acks: Vec<Ack>,
}

/// A read-fan-out entry to push to a group's online members at completion.
struct GroupPush {
    members: Vec<UserId>,
    entry: Entry,
}

/// One fan-out batch: what one worker wrote with one engine write.
pub(crate) struct Batch {
    owner: usize,
    no: u64,
    latch: Latch,
    state: Mutex<BatchState>,
    group_push: Vec<GroupPush>,
}

/// The part of a batch one receiving shard must write.
pub(crate) struct Delivery {
    batch: Arc<Batch>,
    items: Vec<Item>,
    /// `(item, recipient)` of the first entry not yet durable.
    next: (usize, usize),
}

impl Delivery {
    fn new(batch: Arc<Batch>, items: Vec<Item>) -> Self {
        Delivery {
            batch,
            items,
            next: (0, 0),
        }
    }
    fn is_written(&self) -> bool {
        self.next.0 >= self.items.len()
    }
}

/// A receiving worker whose last sync write failed.
struct Stall {
    retry_at: Instant,
    backoff: Duration,
    reason: String,
}

const FIRST_RETRY: Duration = Duration::from_millis(2);
const MAX_RETRY: Duration = Duration::from_millis(500);

struct Item {
    record: Arc<Vec<u8>>,
    recipients: Arc<Vec<directory::Recipient>>,
    /// For push (built only while someone is subscribed).
    entry: Option<Arc<Entry>>,
}

/// Worker-local state (recovery builds it).
pub(crate) struct WorkerState {
    pub next_batch: u64,
    pub dedup: HashMap<(ConvId, UserId, u64), (SeqId, u64)>,
    pub dedup_order: VecDeque<(u64, (ConvId, UserId, u64))>,
    pub last_done_written: u64,
    inflight: HashMap<u64, Arc<Batch>>,
    backlog: VecDeque<Request>,
    outbox: VecDeque<(usize, Delivery)>,
    /// Deliveries to this shard not yet durable, in arrival order.
    undelivered: VecDeque<Delivery>,
    stall: Option<Stall>,
    done_mark_failing: bool,
    last_done_ms: u64,
    last_prune_ms: u64,
}

impl WorkerState {
    pub(crate) fn new(next_batch: u64) -> Self {
        WorkerState {
            next_batch,
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            last_done_written: next_batch - 1,
            inflight: HashMap::new(),
            backlog: VecDeque::new(),
            outbox: VecDeque::new(),
            undelivered: VecDeque::new(),
            stall: None,
            done_mark_failing: false,
            last_done_ms: 0,
            last_prune_ms: 0,
        }
    }
}

/// Largest engine write the workers build (sync deliveries are split).
const MAX_WRITE_BYTES: usize = 8 << 20;

pub(crate) fn run(sh: Arc<Shared>, p: usize, mut st: WorkerState) {
    let me = &sh.workers[p];
    let mut released = false;
    loop {
        let mut progress = pump(&sh, p, &mut st);
        if st.outbox.is_empty() && me.window.has_room(st.next_batch) {
            while st.backlog.len() < sh.cfg.max_batch {
                match me.requests.pop() {
                    Some(r) => st.backlog.push_back(r),
                    None => break,
                }
            }
            if !st.backlog.is_empty() {
                me.requests.made_room();
                handle_requests(&sh, p, &mut st);
                progress = true;
            }
        } else {
            progress |= reject_while_stalled(&sh, p, &mut st);
        }
        housekeeping(&sh, p, &mut st, !progress);
        if progress {
            continue;
        }
        if me.requests.is_closed()
            && me.requests.len() == 0
            && st.backlog.is_empty()
            && st.outbox.is_empty()
            && (me.window.done() + 1 == st.next_batch || unfinished_are_deferred(&st))
            && (st.undelivered.is_empty() || st.stall.is_some())
        {
            if !released {
                released = true;
                if sh.busy_workers.fetch_sub(1, Ordering::AcqRel) == 1 {
                    for w in &sh.workers {
                        w.signal.notify();
                    }
                }
            }
            if sh.busy_workers.load(Ordering::Acquire) == 0 && me.deliveries.len() == 0 {
                housekeeping(&sh, p, &mut st, true);
                if !st.undelivered.is_empty() {
                    // Their batches have no done mark: the next open
                    // re-drives them from the journal.
                    tracing::warn!(
                        shard = p,
                        deliveries = st.undelivered.len(),
                        "closing with sync deliveries pending; recovery completes them"
                    );
                }
                return;
            }
        }
        idle_wait(&sh, p, &st);
    }
}

/// Sleep until there is work: a wake-up, or the stall's retry time.
fn idle_wait(sh: &Shared, p: usize, st: &WorkerState) {
    let me = &sh.workers[p];
    if !st.outbox.is_empty() {
        // A receiving worker is full: it drains on its own; retry soon.
        std::thread::sleep(Duration::from_micros(50));
    } else if let Some(s) = &st.stall {
        me.signal
            .wait_timeout(s.retry_at.saturating_duration_since(Instant::now()));
    } else {
        me.signal.wait();
    }
}

/// The one delivery-draining step (the main loop and the fan-out-switch
/// wait both use it): hand the outbox on, take the deliveries other workers
/// sent, write what is due. True if anything moved.
fn pump(sh: &Shared, p: usize, st: &mut WorkerState) -> bool {
    let me = &sh.workers[p];
    let mut progress = flush_outbox(sh, st);
    let mut popped = 0;
    while popped < 256 {
        match me.deliveries.pop() {
            Some(d) => {
                st.undelivered.push_back(d);
                popped += 1;
            }
            None => break,
        }
    }
    if popped > 0 {
        me.deliveries.made_room();
        progress = true;
    }
    progress | write_due(sh, p, st)
}

/// Write the undelivered FIFO now unless a stall's retry time is ahead
/// (then only defer what just arrived behind it).
fn write_due(sh: &Shared, q: usize, st: &mut WorkerState) -> bool {
    if st.undelivered.is_empty() {
        return false;
    }
    match &st.stall {
        Some(s) if Instant::now() < s.retry_at => {
            let why = s.reason.clone();
            for d in &st.undelivered {
                defer(&d.batch, &why);
            }
            false
        }
        _ => write_deliveries(sh, q, st),
    }
}

/// Every batch this owner started and has not seen finish is deferred (its
/// delivery waits on a stalled worker): nothing more can finish before
/// shutdown, and recovery will.
fn unfinished_are_deferred(st: &WorkerState) -> bool {
    st.inflight.values().all(|b| {
        let s = b.state.lock();
        s.completed || s.deferred.is_some()
    })
}

/// While some worker cannot write, an owner with no room for a new batch
/// answers its queued requests with that worker's error rather than
/// leaving their senders blocked until the disk has room again.
fn reject_while_stalled(sh: &Shared, p: usize, st: &mut WorkerState) -> bool {
    if sh.stalled.load(Ordering::Acquire) == 0 {
        return false;
    }
    let Some(e) = sh.last_stall.lock().as_ref().map(ImError::duplicate) else {
        return false;
    };
    let me = &sh.workers[p];
    let mut any = false;
    // Bounded: senders may keep queueing while this runs.
    for _ in 0..st.backlog.len() + sh.cfg.queue_capacity {
        let Some(r) = st.backlog.pop_front().or_else(|| me.requests.pop()) else {
            break;
        };
        any = true;
        let stored = match &r {
            Request::Send {
                conv, sender, cmid, ..
            } => st.dedup.get(&(*conv, *sender, *cmid)).copied(),
            _ => None,
        };
        match (r, stored) {
            // A retry of a stored message is never told "not stored": it
            // gets its seq (delivered) or FanoutFailed (still pending).
            (Request::Send { conv, reply, .. }, Some((seq, batch))) => {
                let ack = SendAck {
                    conv,
                    seq,
                    duplicate: true,
                };
                ack_when_done(sh, p, st, batch, Ack::Send(reply, ack));
            }
            (r, _) => r.reject(&e),
        }
    }
    if any {
        me.requests.made_room();
    }
    any
}

/// Mark `b` deferred (once) and tell its waiting senders.
fn defer(b: &Batch, why: &str) {
    let acks = {
        let mut s = b.state.lock();
        if s.completed || s.deferred.is_some() {
            return;
        }
        s.deferred = Some(why.to_string());
        std::mem::take(&mut s.acks)
    };
    for a in acks {
        a.send(Some(why));
    }
}

fn flush_outbox(sh: &Shared, st: &mut WorkerState) -> bool {
    let mut any = false;
    while let Some((q, d)) = st.outbox.pop_front() {
        match sh.workers[q].deliveries.try_push(d) {
            Ok(()) => any = true,
            Err(PushError::Full(d)) | Err(PushError::Closed(d)) => {
                st.outbox.push_front((q, d));
                break;
            }
        }
    }
    any
}

/// Done marks and dedup expiry.
fn housekeeping(sh: &Shared, p: usize, st: &mut WorkerState, idle: bool) {
    let done = sh.workers[p].window.done();
    let now = sh.now_ms();
    if done > st.last_done_written && (idle || now >= st.last_done_ms + 50) {
        let mut b = Vec::with_capacity(9);
        JournalRecord::Done { batch: done }.encode_into(&mut b);
        // A hint for recovery (less to re-check); losing it is harmless.
        match sh
            .engine
            .append_with(TimelineId::store(sh.journal[p]), &b, Durability::Buffered)
        {
            Ok(_) => {
                bump(&sh.stats.meta_writes, 1);
                st.done_mark_failing = false;
                st.last_done_written = done;
                st.last_done_ms = now;
            }
            Err(e) => {
                // Retried at the next pass; say so once per failing spell.
                if !st.done_mark_failing {
                    tracing::warn!(error = %e, "journal done mark failed; retrying");
                }
                st.done_mark_failing = true;
            }
        }
        st.inflight.retain(|&n, _| n > done);
    }
    if now >= st.last_prune_ms + 1000 {
        st.last_prune_ms = now;
        let window = sh
            .cfg
            .dedup_window
            .or(sh.engine.config().keyspace(Keyspace::SYNC).ttl)
            .map(|d| d.as_millis() as u64);
        if let Some(w) = window {
            while let Some(&(ts, key)) = st.dedup_order.front() {
                if ts.saturating_add(w) >= now {
                    break;
                }
                st.dedup_order.pop_front();
                st.dedup.remove(&key);
            }
        }
    }
}

/// A conversation operation of a batch, validated, with its seq.
struct Op {
    conv: ConvId,
    seq: SeqId,
    kind: EventKind,
    sender: UserId,
    cmid: u64,
    arg: u64,
    body: Vec<u8>,
    ack: Option<Ack>,
    /// Membership change: (user, add).
    member: Option<(UserId, bool)>,
    created: Option<(ConvKind, Vec<UserId>)>,
}

fn handle_requests(sh: &Shared, p: usize, st: &mut WorkerState) {
    let mut run: Vec<Op> = Vec::new();
    let mut extra: Vec<Ack> = Vec::new();
    let mut marks = Vec::new();
    let mut next_seq: HashMap<ConvId, SeqId> = HashMap::new();
    let mut run_bytes = 0usize;
    while let Some(r) = st.backlog.pop_front() {
        match r {
            Request::UserMark {
                user,
                conv,
                seq,
                delete,
                reply,
            } => marks.push((user, conv, seq, delete, reply)),
            Request::Send {
                conv,
                sender,
                cmid,
                payload,
                reply,
            } => {
                if let Err(e) = check_member(sh, p, conv, sender) {
                    let _ = reply.send(Err(e));
                    continue;
                }
                let key = (conv, sender, cmid);
                if let Some(&(seq, batch)) = st.dedup.get(&key) {
                    let ack = Ack::Send(
                        reply,
                        SendAck {
                            conv,
                            seq,
                            duplicate: true,
                        },
                    );
                    if batch == st.next_batch {
                        extra.push(ack); // retried within this very batch
                    } else {
                        ack_when_done(sh, p, st, batch, ack);
                    }
                    continue;
                }
                let seq = take_seq(sh, &mut next_seq, conv);
                st.dedup.insert(key, (seq, st.next_batch));
                st.dedup_order.push_back((sh.now_ms(), key));
                run_bytes += payload.len();
                run.push(Op {
                    conv,
                    seq,
                    kind: EventKind::Message,
                    sender,
                    cmid,
                    arg: 0,
                    body: payload,
                    ack: Some(Ack::Send(
                        reply,
                        SendAck {
                            conv,
                            seq,
                            duplicate: false,
                        },
                    )),
                    member: None,
                    created: None,
                });
            }
            Request::Recall {
                conv,
                user,
                target,
                reply,
            } => match check_recall(sh, p, conv, user, target) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(()) => {
                    let seq = take_seq(sh, &mut next_seq, conv);
                    run.push(Op {
                        conv,
                        seq,
                        kind: EventKind::Recall,
                        sender: user,
                        cmid: 0,
                        arg: target,
                        body: Vec::new(),
                        ack: Some(Ack::Seq(reply, seq)),
                        member: None,
                        created: None,
                    });
                }
            },
            r @ (Request::Create { .. } | Request::Member { .. }) => {
                // Membership changes are batches of their own: every op
                // before them fans out to the old members, every op after
                // to the new ones.
                if !run.is_empty() || !extra.is_empty() {
                    write_batch(
                        sh,
                        p,
                        st,
                        std::mem::take(&mut run),
                        std::mem::take(&mut extra),
                    );
                    next_seq.clear();
                    run_bytes = 0;
                }
                if !sh.workers[p].window.has_room(st.next_batch) {
                    st.backlog.push_front(r);
                    break;
                }
                if let Some(op) = membership_op(sh, p, r) {
                    write_batch(sh, p, st, vec![op], Vec::new());
                }
                next_seq.clear();
                if !sh.workers[p].window.has_room(st.next_batch) {
                    break;
                }
            }
        }
        if run.len() >= sh.cfg.max_batch || run_bytes >= MAX_WRITE_BYTES / 2 {
            write_batch(
                sh,
                p,
                st,
                std::mem::take(&mut run),
                std::mem::take(&mut extra),
            );
            next_seq.clear();
            run_bytes = 0;
            if !sh.workers[p].window.has_room(st.next_batch) {
                break;
            }
        }
    }
    if !run.is_empty() || !extra.is_empty() {
        write_batch(sh, p, st, run, extra);
    }
    if !marks.is_empty() {
        user_marks(sh, p, marks);
    }
}

fn take_seq(sh: &Shared, next: &mut HashMap<ConvId, SeqId>, conv: ConvId) -> SeqId {
    let s = next
        .entry(conv)
        .or_insert_with(|| sh.engine.last_seq(TimelineId::store(conv)) + 1);
    let seq = *s;
    *s += 1;
    seq
}

fn check_member(sh: &Shared, p: usize, conv: ConvId, user: UserId) -> Result<()> {
    let convs = sh.dir.convs[p].read();
    let c = convs.get(&conv).ok_or(ImError::NoSuchConversation(conv))?;
    match c.members.get(&user) {
        Some(iv) if is_current(iv) => Ok(()),
        _ => Err(ImError::NotMember { conv, user }),
    }
}

fn check_recall(sh: &Shared, p: usize, conv: ConvId, user: UserId, target: SeqId) -> Result<()> {
    check_member(sh, p, conv, user)?;
    if sh.dir.convs[p]
        .read()
        .get(&conv)
        .is_some_and(|c| c.recalled.contains(&target))
    {
        return Err(ImError::InvalidArgument(format!(
            "message {target} is already recalled"
        )));
    }
    let rec = sh
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
fn membership_op(sh: &Shared, p: usize, r: Request) -> Option<Op> {
    let convs = sh.dir.convs[p].read();
    match r {
        Request::Create {
            conv,
            kind,
            members,
            reply,
        } => {
            let last = sh.engine.last_seq(TimelineId::store(conv));
            if convs.contains_key(&conv) {
                let _ = reply.send(Err(ImError::ConversationExists(conv)));
                return None;
            }
            if last != 0 {
                let _ = reply.send(Err(ImError::InvalidArgument(format!(
                    "store timeline {conv} already holds records not written by the IM layer"
                ))));
                return None;
            }
            let mut body = Vec::with_capacity(members.len() * 8);
            for m in &members {
                body.extend_from_slice(&m.to_le_bytes());
            }
            Some(Op {
                conv,
                seq: 1,
                kind: EventKind::Created,
                sender: 0,
                cmid: 0,
                arg: kind as u64,
                body,
                ack: Some(Ack::Seq(reply, 1)),
                member: None,
                created: Some((kind, members)),
            })
        }
        Request::Member {
            conv,
            user,
            add,
            reply,
        } => {
            let Some(c) = convs.get(&conv) else {
                let _ = reply.send(Err(ImError::NoSuchConversation(conv)));
                return None;
            };
            if c.kind == ConvKind::Direct {
                let _ = reply.send(Err(ImError::InvalidArgument(
                    "members of a direct conversation cannot change".into(),
                )));
                return None;
            }
            let current = c.members.get(&user).is_some_and(is_current);
            if add && current {
                let _ = reply.send(Err(ImError::AlreadyMember { conv, user }));
                return None;
            }
            if !add && !current {
                let _ = reply.send(Err(ImError::NotMember { conv, user }));
                return None;
            }
            let seq = sh.engine.last_seq(TimelineId::store(conv)) + 1;
            Some(Op {
                conv,
                seq,
                kind: if add {
                    EventKind::MemberAdded
                } else {
                    EventKind::MemberRemoved
                },
                sender: 0,
                cmid: 0,
                arg: user,
                body: Vec::new(),
                ack: Some(Ack::Seq(reply, seq)),
                member: Some((user, add)),
                created: None,
            })
        }
        other => {
            // Not a membership request: unreachable by construction.
            drop(other);
            None
        }
    }
}

/// Answer `ack` once batch `batch` is done (now, if it already is).
fn ack_when_done(sh: &Shared, p: usize, st: &WorkerState, batch: u64, ack: Ack) {
    if batch <= sh.workers[p].window.done() {
        return ack.send(None);
    }
    match st.inflight.get(&batch) {
        Some(b) => {
            let mut s = b.state.lock();
            if s.completed {
                drop(s);
                ack.send(None);
            } else if let Some(why) = s.deferred.clone() {
                // Stored, delivery still pending: say so now, not when the
                // disk has room again.
                drop(s);
                ack.send(Some(&why));
            } else {
                s.acks.push(ack);
            }
        }
        None => ack.send(None),
    }
}

fn write_engine(sh: &Shared, items: &[(TimelineId, &[u8])]) -> timeline_engine::Result<Vec<SeqId>> {
    sh.engine.append_batch(items, sh.cfg.durability)
}

/// The catalog records an op implies, given its conversation's mode after it.
fn catalog_records(op: &Op, read_since: u64, out: &mut Vec<Vec<u8>>) {
    let mut put = |r: CatalogRecord| {
        let mut b = Vec::with_capacity(48);
        r.encode_into(&mut b);
        out.push(b);
    };
    if let Some((kind, members)) = &op.created {
        for &m in members {
            put(CatalogRecord::Member {
                conv: op.conv,
                user: m,
                at: op.seq,
                add: true,
                kind: *kind,
                read_since,
            });
        }
    }
    if let Some((user, add)) = op.member {
        put(CatalogRecord::Member {
            conv: op.conv,
            user,
            at: op.seq,
            add,
            kind: ConvKind::Group,
            read_since,
        });
    }
    if op.kind == EventKind::Recall {
        put(CatalogRecord::Recall {
            conv: op.conv,
            target: op.arg,
            at: op.seq,
        });
    }
}

/// The read-fan-out start a membership op leaves its conversation with.
fn read_since_after(sh: &Shared, p: usize, op: &Op) -> u64 {
    let t = sh.cfg.hybrid_threshold;
    if let Some((ConvKind::Group, members)) = &op.created {
        return if members.len() > t { op.seq + 1 } else { 0 };
    }
    let convs = sh.dir.convs[p].read();
    let Some(c) = convs.get(&op.conv) else {
        return 0;
    };
    if c.read_since != 0 {
        return c.read_since;
    }
    match op.member {
        Some((_, true)) if c.kind == ConvKind::Group && c.current + 1 > t => op.seq + 1,
        _ => 0,
    }
}

/// Apply a written op to the directory (membership, mode, recalls).
pub(crate) fn apply_op(sh: &Shared, p: usize, op_conv: ConvId, rec: &CatalogRecord) {
    let mut convs = sh.dir.convs[p].write();
    match *rec {
        CatalogRecord::Member {
            conv,
            user,
            at,
            add,
            kind,
            read_since,
        } => {
            debug_assert_eq!(conv, op_conv);
            let c = convs
                .entry(conv)
                .or_insert_with(|| directory::Conv::new(kind, sh.shards));
            let q = sh.user_shard(user);
            directory::apply_member(c, conv, user, q, at, add, &sh.dir.users[q]);
            let mark_read_group = |u: UserId| {
                let mut g = sh.dir.users[sh.user_shard(u)].write();
                let us = g.entry(u).or_default();
                if !us.read_groups.contains(&conv) {
                    us.read_groups.push(conv);
                }
            };
            if read_since != 0 && c.read_since == 0 {
                // The switch: every current member now reads this group.
                c.read_since = read_since;
                for r in c.recipients.iter().flat_map(|v| v.iter()) {
                    mark_read_group(r.0);
                }
            } else if c.read_since != 0 && add {
                mark_read_group(user);
            }
        }
        CatalogRecord::Recall { conv, target, .. } => {
            if let Some(c) = convs.get_mut(&conv) {
                if c.recalled.insert(target) {
                    sh.recalls.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        _ => {}
    }
}

fn write_batch(sh: &Shared, p: usize, st: &mut WorkerState, ops: Vec<Op>, extra: Vec<Ack>) {
    let no = st.next_batch;
    st.next_batch += 1;
    let now = sh.now_ms();
    // 1. One engine write: intent, conversation records, catalog records.
    let intent = JournalRecord::Intent {
        batch: no,
        ops: ops
            .iter()
            .map(|o| IntentOp {
                conv: o.conv,
                seq: o.seq,
                kind: o.kind,
                sender: o.sender,
                cmid: o.cmid,
                arg: o.arg,
            })
            .collect(),
    };
    let mut ib = Vec::new();
    intent.encode_into(&mut ib);
    let stored: Vec<Vec<u8>> = ops
        .iter()
        .map(|o| {
            let e = StoreEntry {
                kind: o.kind,
                sender: o.sender,
                cmid: o.cmid,
                arg: o.arg,
                body: &o.body,
            };
            let mut b = Vec::with_capacity(e.encoded_len());
            e.encode_into(&mut b);
            b
        })
        .collect();
    let mut cat = Vec::new();
    let mut cat_for_op = Vec::with_capacity(ops.len());
    let mut switches = false;
    for o in &ops {
        let before = cat.len();
        if o.created.is_some() || o.member.is_some() || o.kind == EventKind::Recall {
            let rs = read_since_after(sh, p, o);
            switches |= rs != 0 && !is_read_fanout(sh, p, o.conv);
            catalog_records(o, rs, &mut cat);
        }
        cat_for_op.push(before..cat.len());
    }
    let mut items: Vec<(TimelineId, &[u8])> = Vec::with_capacity(1 + ops.len() + cat.len());
    if !ops.is_empty() {
        items.push((TimelineId::store(sh.journal[p]), &ib));
    }
    for (o, b) in ops.iter().zip(&stored) {
        items.push((TimelineId::store(o.conv), b));
    }
    for b in &cat {
        items.push((TimelineId::store(sh.catalog[p]), b));
    }
    let res = if items.is_empty() {
        Ok(Vec::new())
    } else {
        write_engine(sh, &items)
    };
    let res = res.map_err(ImError::from).and_then(|seqs| {
        // The worker is the only writer of these timelines: the engine must
        // have assigned exactly the seqs the intent announced.
        for (k, o) in ops.iter().enumerate() {
            if seqs.get(1 + k) != Some(&o.seq) {
                return Err(ImError::InvalidArgument(format!(
                    "conversation {} was appended to outside the IM layer",
                    o.conv
                )));
            }
        }
        Ok(())
    });
    if let Err(e) = res {
        for o in ops {
            if o.kind == EventKind::Message {
                st.dedup.remove(&(o.conv, o.sender, o.cmid));
            }
            if let Some(a) = o.ack {
                a.fail(&e);
            }
        }
        // Retries of this batch's sends were not written either (they used
        // to be acknowledged with the seq that was never stored).
        for a in extra {
            a.fail(&e);
        }
        sh.workers[p].window.complete(no);
        return;
    }
    bump(&sh.stats.meta_writes, 1 + cat.len() as u64);
    bump(&sh.stats.stored, ops.len() as u64);
    // 2. Durable: apply to the directory, then publish the watermarks.
    let mut removed: Vec<(ConvId, UserId)> = Vec::new();
    for (o, range) in ops.iter().zip(&cat_for_op) {
        for b in &cat[range.clone()] {
            if let Ok(rec) = CatalogRecord::decode(b) {
                apply_op(sh, p, o.conv, &rec);
            }
        }
        if let Some((u, false)) = o.member {
            removed.push((o.conv, u));
        }
    }
    let subs = sh.subs.any();
    let mut per_shard: Vec<Vec<Item>> = (0..sh.shards).map(|_| Vec::new()).collect();
    let mut group_push = Vec::new();
    let mut read_deliveries = 0u64;
    let mut messages = 0u64;
    {
        let convs = sh.dir.convs[p].read();
        for (o, b) in ops.iter().zip(&stored) {
            let Some(c) = convs.get(&o.conv) else {
                continue;
            };
            c.visible.publish(o.seq);
            if o.kind == EventKind::Message {
                messages += 1;
            }
            let entry = subs.then(|| {
                Arc::new(Entry {
                    conv: o.conv,
                    conv_seq: o.seq,
                    sender: o.sender,
                    timestamp_ms: now,
                    body: body_of(o),
                })
            });
            if !c.is_write_fanout(o.seq) {
                read_deliveries += c.current as u64;
                if subs {
                    if let Some(e) = &entry {
                        group_push.push(GroupPush {
                            members: c
                                .recipients
                                .iter()
                                .flat_map(|v| v.iter().map(|r| r.0))
                                .collect(),
                            entry: (**e).clone(),
                        });
                    }
                }
                continue;
            }
            let mut rb = Vec::new();
            match sh.cfg.entries {
                EntryMode::Copy => {
                    let mut se = StoreEntry::decode(b).unwrap_or(StoreEntry {
                        kind: o.kind,
                        sender: o.sender,
                        cmid: o.cmid,
                        arg: o.arg,
                        body: &o.body,
                    });
                    se.body = entry::sync_body(&se);
                    SyncRecord::Copy {
                        conv: o.conv,
                        seq: o.seq,
                        ts_ms: now,
                        entry: se,
                    }
                    .encode_into(&mut rb)
                }
                EntryMode::Reference => SyncRecord::Ref {
                    conv: o.conv,
                    seq: o.seq,
                }
                .encode_into(&mut rb),
            }
            let rb = Arc::new(rb);
            for (q, users) in c.recipients.iter().enumerate() {
                let mut rcpt = users.clone();
                for &(rc, u) in &removed {
                    if rc == o.conv && sh.user_shard(u) == q && o.member.is_some() {
                        // The removed member receives its removal.
                        if let Some(us) = sh.dir.users[q].read().get(&u) {
                            Arc::make_mut(&mut rcpt).push((u, us.visible.clone()));
                        }
                    }
                }
                if rcpt.is_empty() {
                    continue;
                }
                per_shard[q].push(Item {
                    record: rb.clone(),
                    recipients: rcpt,
                    entry: if subs { entry.clone() } else { None },
                });
            }
        }
    }
    bump(&sh.stats.messages, messages);
    bump(&sh.stats.read_fanout_deliveries, read_deliveries);
    let targets = per_shard.iter().filter(|v| !v.is_empty()).count();
    let mut acks: Vec<Ack> = ops.into_iter().filter_map(|o| o.ack).collect();
    acks.extend(extra);
    let batch = Arc::new(Batch {
        owner: p,
        no,
        latch: Latch::new(targets + 1),
        state: Mutex::new(BatchState {
            acks,
            ..Default::default()
        }),
        group_push,
    });
    st.inflight.insert(no, batch.clone());
    // 3. Hand the deliveries over; our own shard's inline.
    for (q, items) in per_shard.into_iter().enumerate() {
        if items.is_empty() {
            continue;
        }
        let d = Delivery::new(batch.clone(), items);
        if q == p {
            st.undelivered.push_back(d);
            write_due(sh, p, st);
        } else if st.outbox.is_empty() {
            match sh.workers[q].deliveries.try_push(d) {
                Ok(()) => {}
                Err(PushError::Full(d)) | Err(PushError::Closed(d)) => st.outbox.push_back((q, d)),
            }
        } else {
            st.outbox.push_back((q, d));
        }
    }
    if batch.latch.arrive() {
        finish_batch(sh, &batch);
    }
    if switches {
        // The conversation turns to read fan-out with this batch: its later
        // entries are read from the store, so they must not become visible
        // before this batch's (write fan-out) entries are in every member's
        // sync timeline, or a device could see them out of order. Rare (once
        // per group), so the owner waits, but keeps flushing its outbox and
        // delivering what other workers send it: two workers waiting like
        // this at once each need the other's deliveries (a deadlock the
        // W3 benchmark found when the wait only flushed the outbox).
        // If the batch is deferred (a stall), the wait lasts until the
        // disk has room; requests meanwhile get the stall's error, and a
        // shutdown leaves the batch to recovery.
        while sh.workers[p].window.done() < no {
            if pump(sh, p, st) | reject_while_stalled(sh, p, st) {
                continue;
            }
            if sh.closing.load(Ordering::Acquire) && batch.state.lock().deferred.is_some() {
                break;
            }
            idle_wait(sh, p, st);
        }
    }
}

fn is_read_fanout(sh: &Shared, p: usize, conv: ConvId) -> bool {
    sh.dir.convs[p]
        .read()
        .get(&conv)
        .is_some_and(|c| c.read_since != 0)
}

fn body_of(o: &Op) -> Body {
    match o.kind {
        EventKind::Message => Body::Message(o.body.clone()),
        EventKind::Created => Body::Created {
            kind: o.created.as_ref().map_or(ConvKind::Group, |c| c.0),
        },
        EventKind::MemberAdded => Body::MemberAdded(o.arg),
        EventKind::MemberRemoved => Body::MemberRemoved(o.arg),
        EventKind::Recall => Body::Recall { target: o.arg },
    }
}

fn finish_batch(sh: &Shared, b: &Batch) {
    let acks = {
        let mut s = b.state.lock();
        s.completed = true;
        std::mem::take(&mut s.acks)
    };
    for gp in &b.group_push {
        for &u in &gp.members {
            sh.subs.push(sh.user_shard(u), u, || Push::Group {
                user: u,
                entry: gp.entry.clone(),
            });
        }
    }
    let w = &sh.workers[b.owner];
    w.window.complete(b.no);
    w.signal.notify();
    for a in acks {
        a.send(None);
    }
}

/// Write the undelivered FIFO of shard `q` front to back, one engine write
/// per `MAX_WRITE_BYTES`: publish, push, and arrive on each batch whose
/// delivery is complete. Stops at the first failed write and stalls (the
/// entries not written stay queued, in order). True if anything was written.
fn write_deliveries(sh: &Shared, q: usize, st: &mut WorkerState) -> bool {
    type Owner<'a> = (&'a directory::Recipient, Option<&'a Arc<Entry>>);
    let mut wrote = false;
    while !st.undelivered.is_empty() {
        // `ends[k]`: where delivery k stands once this write is durable.
        let mut ends: Vec<(usize, usize)> = Vec::new();
        let res = {
            let mut items: Vec<(TimelineId, &[u8])> = Vec::new();
            let mut owners: Vec<Owner<'_>> = Vec::new();
            let mut bytes = 0usize;
            'build: for d in &st.undelivered {
                let (mut i, mut r) = d.next;
                while let Some(it) = d.items.get(i) {
                    while let Some(rc) = it.recipients.get(r) {
                        if bytes >= MAX_WRITE_BYTES {
                            ends.push((i, r));
                            break 'build;
                        }
                        items.push((TimelineId::sync(rc.0), &it.record[..]));
                        owners.push((rc, it.entry.as_ref()));
                        bytes += it.record.len() + 64;
                        r += 1;
                    }
                    i += 1;
                    r = 0;
                }
                ends.push((i, 0));
            }
            if items.is_empty() {
                Ok(()) // only finished deliveries left: pop them below
            } else {
                write_engine(sh, &items).map(|seqs| publish(sh, q, &owners, &seqs))
            }
        };
        if let Err(e) = res {
            stall(sh, st, e);
            return wrote;
        }
        wrote = true;
        if st.stall.take().is_some() {
            sh.stalled.fetch_sub(1, Ordering::AcqRel);
            tracing::info!(shard = q, "sync deliveries resumed");
        }
        for (d, end) in st.undelivered.iter_mut().zip(ends) {
            d.next = end;
        }
        while st.undelivered.front().is_some_and(Delivery::is_written) {
            if let Some(d) = st.undelivered.pop_front() {
                if d.batch.latch.arrive() {
                    finish_batch(sh, &d.batch);
                }
            }
        }
    }
    wrote
}

/// Sync entries just made durable: raise each user's watermark, push.
fn publish(
    sh: &Shared,
    q: usize,
    owners: &[(&directory::Recipient, Option<&Arc<Entry>>)],
    seqs: &[SeqId],
) {
    bump(&sh.stats.sync_writes, seqs.len() as u64);
    for (&(r, _), &seq) in owners.iter().zip(seqs) {
        r.1.publish(seq);
    }
    if sh.subs.any() {
        for (&((u, _), e), &seq) in owners.iter().zip(seqs) {
            let u = *u;
            if let Some(e) = e {
                sh.subs.push(q, u, || Push::Entry {
                    user: u,
                    entry: SyncEntry {
                        seq,
                        entry: (**e).clone(),
                    },
                });
            }
        }
    }
}

/// A sync write failed: keep everything queued, retry after a backoff,
/// and tell the senders of every queued batch that delivery is pending.
fn stall(sh: &Shared, st: &mut WorkerState, e: timeline_engine::Error) {
    let backoff = st
        .stall
        .as_ref()
        .map_or(FIRST_RETRY, |s| (s.backoff * 2).min(MAX_RETRY));
    if st.stall.is_none() {
        sh.stalled.fetch_add(1, Ordering::AcqRel);
        tracing::error!(error = %e, "sync delivery failed; retrying until it is durable");
    }
    let reason = e.to_string();
    *sh.last_stall.lock() = Some(ImError::Engine(e));
    for d in &st.undelivered {
        defer(&d.batch, &reason);
    }
    st.stall = Some(Stall {
        retry_at: Instant::now() + backoff,
        backoff,
        reason,
    });
}

/// Read markers and deletes-for-me of users owned by shard `q`.
fn user_marks(sh: &Shared, q: usize, marks: Vec<(UserId, ConvId, SeqId, bool, Reply<SeqId>)>) {
    for (user, conv, seq, delete, reply) in marks {
        let r = user_mark(sh, q, user, conv, seq, delete);
        let _ = reply.send(r);
    }
}

fn user_mark(
    sh: &Shared,
    q: usize,
    user: UserId,
    conv: ConvId,
    seq: SeqId,
    delete: bool,
) -> Result<SeqId> {
    let p = sh.conv_shard(conv);
    let (visible, iv) = {
        let convs = sh.dir.convs[p].read();
        let c = convs.get(&conv).ok_or(ImError::NoSuchConversation(conv))?;
        let iv = c
            .members
            .get(&user)
            .cloned()
            .ok_or(ImError::NotMember { conv, user })?;
        (c.visible.get(), iv)
    };
    let upper = visible.min(iv.last().map_or(0, |l| l.1));
    let target = if delete {
        if seq == 0 || seq > upper || !covers(&iv, seq) {
            return Err(ImError::InvalidArgument(format!(
                "user {user} cannot see seq {seq} of conversation {conv}"
            )));
        }
        seq
    } else {
        let old = sh.dir.users[q]
            .read()
            .get(&user)
            .and_then(|u| u.read.get(&conv).copied())
            .unwrap_or(0);
        let new = seq.min(upper).max(old);
        if new == old {
            return Ok(old);
        }
        new
    };
    let cat = if delete {
        CatalogRecord::Delete {
            user,
            conv,
            seq: target,
        }
    } else {
        CatalogRecord::ReadMark {
            user,
            conv,
            seq: target,
        }
    };
    let mut cb = Vec::with_capacity(32);
    cat.encode_into(&mut cb);
    write_engine(sh, &[(TimelineId::store(sh.catalog[q]), &cb)])?;
    let rec = if delete {
        SyncRecord::Deleted { conv, seq: target }
    } else {
        SyncRecord::ReadMarker { conv, seq: target }
    };
    let mut sb = Vec::with_capacity(17);
    rec.encode_into(&mut sb);
    let s = write_engine(sh, &[(TimelineId::sync(user), &sb)])?;
    bump(&sh.stats.meta_writes, 1);
    bump(&sh.stats.sync_writes, 1);
    let sync_seq = s.first().copied().unwrap_or(0);
    {
        let mut users = sh.dir.users[q].write();
        let u = users.entry(user).or_default();
        if delete {
            u.deleted.insert((conv, target));
        } else {
            u.read.insert(conv, target);
        }
        u.visible.publish(sync_seq);
    }
    if sh.subs.any() {
        let entry = Entry {
            conv,
            conv_seq: target,
            sender: user,
            timestamp_ms: sh.now_ms(),
            body: if delete {
                Body::DeletedMarker
            } else {
                Body::ReadMarker
            },
        };
        sh.subs.push(q, user, || Push::Entry {
            user,
            entry: SyncEntry {
                seq: sync_seq,
                entry: entry.clone(),
            },
        });
    }
    Ok(target)
}
