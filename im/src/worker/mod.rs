//! One worker per shard. Worker `p` is the only writer of shard `p`'s
//! conversation timelines, journal and catalog (store keyspace) and of its
//! users' sync timelines (sync keyspace). A send travels:
//!
//! 1. caller → the conversation's worker (`requests` mailbox; blocks when
//!    full: backpressure);
//! 2. that worker plans a batch ([`plan`]) and writes it ([`batch`]):
//!    journal intent + conversation records + catalog records in one engine
//!    write, durable per the configured durability; applies it to the
//!    directory and publishes the conversations' watermarks;
//! 3. it hands one `Delivery` per receiving shard to that shard's worker
//!    (`deliveries` mailbox, never blocking: a full mailbox keeps the
//!    delivery in a local FIFO outbox, since two workers blocked on each
//!    other's full mailboxes would deadlock);
//! 4. each receiving worker appends the sync entries ([`deliver`]: one
//!    engine write per drained set), makes them durable, publishes its
//!    users' watermarks, pushes to subscribers and arrives on the batch's
//!    latch;
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
//! senders block (a retry of a stored message still gets its seq).
//!
//! Read markers and deletes-for-me are the user's worker's ([`marks`]).

mod batch;
mod deliver;
mod marks;
mod plan;

pub(crate) use batch::apply_op;
pub(crate) use deliver::Delivery;

use crate::entry::{ConvKind, JournalRecord};
use crate::fanout::mailbox::{PushError, RoomWaiter};
use crate::{bump, ConvId, ImError, Reply, SendAck, Shared, UserId};
use batch::Batch;
use deliver::Inbox;
use hashbrown::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use timeline_engine::{Durability, Keyspace, SeqId, TimelineId};

/// Add or remove a group member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemberChange {
    Add,
    Remove,
}

/// What a user marks in one of its conversations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// Read up to a seq (the read marker only moves forward).
    Read,
    /// One message deleted for this user only.
    Delete,
}

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
        change: MemberChange,
        reply: Reply<SeqId>,
    },
    Recall {
        conv: ConvId,
        user: UserId,
        target: SeqId,
        reply: Reply<SeqId>,
    },
    /// Handled by the user's worker.
    UserMark {
        user: UserId,
        conv: ConvId,
        seq: SeqId,
        mark: Mark,
        reply: Reply<SeqId>,
    },
}

impl Request {
    /// Answer without doing anything (the layer cannot take it now).
    fn reject(self, e: &ImError) {
        match self {
            Request::Send { reply, .. } => {
                reply.send(Err(e.duplicate()));
            }
            Request::Create { reply, .. }
            | Request::Member { reply, .. }
            | Request::Recall { reply, .. }
            | Request::UserMark { reply, .. } => {
                reply.send(Err(e.duplicate()));
            }
        }
    }
}

/// The answer a stored op owes its caller.
enum Ack {
    Send(Reply<SendAck>, SendAck),
    Seq(Reply<SeqId>, SeqId),
}

impl Ack {
    /// Answer a stored op: `pending` says its delivery is not durable yet.
    fn send(self, pending: Option<&str>) {
        // A retry shares its original's fate: never an Ok for a message
        // whose fan-out is not durable.
        let pending_error = |conv, seq, why: &str| ImError::FanoutFailed {
            conv,
            seq,
            reason: why.to_string(),
        };
        match self {
            Ack::Send(r, a) => {
                r.send(match pending {
                    Some(why) => Err(pending_error(a.conv, a.seq, why)),
                    None => Ok(a),
                });
            }
            Ack::Seq(r, s) => {
                r.send(match pending {
                    Some(why) => Err(pending_error(0, s, why)),
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
                r.send(Err(e.duplicate()));
            }
            Ack::Seq(r, _) => {
                r.send(Err(e.duplicate()));
            }
        }
    }
}

/// The idempotency key of a send.
type SendKey = (ConvId, UserId, u64);

/// What recovery hands a worker: where batch numbering resumes and the
/// dedup map of the window.
pub(crate) struct Recovered {
    pub next_batch: u64,
    pub dedup: HashMap<SendKey, (SeqId, u64)>,
    pub dedup_order: VecDeque<(u64, SendKey)>,
}

impl Recovered {
    pub(crate) fn new(next_batch: u64) -> Self {
        Recovered {
            next_batch,
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
        }
    }
}

/// Largest engine write the workers build (sync deliveries are split).
const MAX_WRITE_BYTES: usize = 8 << 20;

/// The worker of shard `p` (its thread owns it).
pub(crate) struct Worker {
    sh: Arc<Shared>,
    p: usize,
    next_batch: u64,
    /// `(conv, sender, cmid)` → (seq, batch) within the dedup window.
    dedup: HashMap<SendKey, (SeqId, u64)>,
    dedup_order: VecDeque<(u64, SendKey)>,
    last_done_written: u64,
    done_mark_failing: bool,
    last_done_ms: u64,
    last_prune_ms: u64,
    /// Batches this worker owns that may not have finished.
    inflight: HashMap<u64, Arc<Batch>>,
    backlog: VecDeque<Request>,
    /// Deliveries for other workers whose mailboxes were full.
    outbox: VecDeque<(usize, Delivery)>,
    /// Deliveries to this shard, and its stall.
    inbox: Inbox,
}

impl Worker {
    pub(crate) fn new(sh: Arc<Shared>, p: usize, r: Recovered) -> Self {
        Worker {
            sh,
            p,
            last_done_written: r.next_batch - 1,
            next_batch: r.next_batch,
            dedup: r.dedup,
            dedup_order: r.dedup_order,
            done_mark_failing: false,
            last_done_ms: 0,
            last_prune_ms: 0,
            inflight: HashMap::new(),
            backlog: VecDeque::new(),
            outbox: VecDeque::new(),
            inbox: Inbox::default(),
        }
    }

    pub(crate) fn run(mut self) {
        let sh = self.sh.clone();
        let me = &sh.workers[self.p];
        let mut released = false;
        loop {
            let mut progress = self.pump();
            if self.outbox.is_empty() && me.window.has_room(self.next_batch) {
                while self.backlog.len() < sh.cfg.max_batch {
                    match me.requests.pop() {
                        Some(r) => self.backlog.push_back(r),
                        None => break,
                    }
                }
                if !self.backlog.is_empty() {
                    me.requests.made_room();
                    self.handle_requests();
                    progress = true;
                }
            } else {
                progress |= self.reject_while_stalled();
            }
            self.housekeeping(!progress);
            if progress {
                continue;
            }
            if self.quiescent() {
                if !released {
                    released = true;
                    if sh.busy_workers.fetch_sub(1, Ordering::AcqRel) == 1 {
                        for w in &sh.workers {
                            w.signal.notify();
                        }
                    }
                }
                if sh.busy_workers.load(Ordering::Acquire) == 0 && me.deliveries.len() == 0 {
                    self.housekeeping(true);
                    self.inbox.warn_left_to_recovery(self.p);
                    return;
                }
            }
            self.idle_wait();
        }
    }

    /// Shutting down, and nothing more this worker can finish: no request
    /// left, and every batch it started finished or deferred (its delivery
    /// waits on a stalled worker; recovery completes it).
    fn quiescent(&self) -> bool {
        let me = &self.sh.workers[self.p];
        me.requests.is_closed()
            && me.requests.len() == 0
            && self.backlog.is_empty()
            && self.outbox.is_empty()
            && (me.window.done() + 1 == self.next_batch || self.unfinished_are_deferred())
            && self.inbox.settled()
    }

    fn unfinished_are_deferred(&self) -> bool {
        self.inflight.values().all(|b| b.is_finished_or_deferred())
    }

    /// Sleep until there is work: a wake-up, room in a full receiving
    /// worker, or the stall's retry time. Never a sleep-poll.
    fn idle_wait(&mut self) {
        let sh = self.sh.clone();
        let me = &sh.workers[self.p];
        if let Some(&(q, _)) = self.outbox.front() {
            // A receiving worker is full: ask it to wake us when it makes
            // room, then try once more (room made before the registration).
            sh.workers[q]
                .deliveries
                .notify_on_room(RoomWaiter::Signal(me.signal.clone()));
            if self.flush_outbox() {
                return;
            }
        }
        match self.inbox.retry_at() {
            Some(at) => me
                .signal
                .wait_timeout(at.saturating_duration_since(Instant::now())),
            None => me.signal.wait(),
        }
    }

    /// The one delivery-draining step (the main loop and the fan-out-switch
    /// wait both use it): hand the outbox on, take the deliveries other
    /// workers sent, write what is due. True if anything moved.
    fn pump(&mut self) -> bool {
        let sh = self.sh.clone();
        let me = &sh.workers[self.p];
        let mut progress = self.flush_outbox();
        let mut popped = 0;
        while popped < 256 {
            match me.deliveries.pop() {
                Some(d) => {
                    self.inbox.push(d);
                    popped += 1;
                }
                None => break,
            }
        }
        if popped > 0 {
            me.deliveries.made_room();
            progress = true;
        }
        progress | self.inbox.write_due(&self.sh, self.p)
    }

    fn flush_outbox(&mut self) -> bool {
        let mut any = false;
        while let Some((q, d)) = self.outbox.pop_front() {
            match self.sh.workers[q].deliveries.try_push(d) {
                Ok(()) => any = true,
                Err(PushError::Full(d)) | Err(PushError::Closed(d)) => {
                    self.outbox.push_front((q, d));
                    break;
                }
            }
        }
        any
    }

    /// Hand a delivery to worker `q` (our own inbox if `q` is us).
    fn hand_over(&mut self, q: usize, d: Delivery) {
        if q == self.p {
            self.inbox.push(d);
            self.inbox.write_due(&self.sh, self.p);
        } else if self.outbox.is_empty() {
            match self.sh.workers[q].deliveries.try_push(d) {
                Ok(()) => {}
                Err(PushError::Full(d)) | Err(PushError::Closed(d)) => {
                    self.outbox.push_back((q, d))
                }
            }
        } else {
            self.outbox.push_back((q, d));
        }
    }

    /// While some worker cannot write, an owner with no room for a new
    /// batch answers its queued requests with that worker's error rather
    /// than leaving their senders blocked until the disk has room again.
    fn reject_while_stalled(&mut self) -> bool {
        let sh = self.sh.clone();
        if sh.stalled.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Some(e) = sh.last_stall.lock().as_ref().map(ImError::duplicate) else {
            return false;
        };
        let me = &sh.workers[self.p];
        let mut any = false;
        // Bounded: senders may keep queueing while this runs.
        for _ in 0..self.backlog.len() + sh.cfg.queue_capacity {
            let Some(r) = self.backlog.pop_front().or_else(|| me.requests.pop()) else {
                break;
            };
            any = true;
            let stored = match &r {
                Request::Send {
                    conv, sender, cmid, ..
                } => self.dedup.get(&(*conv, *sender, *cmid)).copied(),
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
                    self.ack_when_done(batch, Ack::Send(reply, ack));
                }
                (r, _) => r.reject(&e),
            }
        }
        if any {
            me.requests.made_room();
        }
        any
    }

    /// Answer `ack` once batch `batch` is done (now, if it already is; at
    /// once with `FanoutFailed` if it is deferred).
    fn ack_when_done(&self, batch: u64, ack: Ack) {
        if batch <= self.sh.workers[self.p].window.done() {
            return ack.send(None);
        }
        match self.inflight.get(&batch) {
            Some(b) => b.ack_when_done(ack),
            None => ack.send(None),
        }
    }

    /// Done marks and dedup expiry.
    fn housekeeping(&mut self, idle: bool) {
        let sh = self.sh.clone();
        let done = sh.workers[self.p].window.done();
        let now = sh.now_ms();
        if done > self.last_done_written && (idle || now >= self.last_done_ms + 50) {
            let mut b = Vec::with_capacity(9);
            JournalRecord::Done { batch: done }.encode_into(&mut b);
            let journal = TimelineId::store(sh.journal[self.p]);
            // A hint for recovery (less to re-check); losing it is harmless.
            match sh.engine.append_with(journal, &b, Durability::Buffered) {
                Ok(_) => {
                    bump(&sh.stats.meta_writes, 1);
                    self.done_mark_failing = false;
                    self.last_done_written = done;
                    self.last_done_ms = now;
                }
                Err(e) => {
                    // Retried at the next pass; say so once per failing spell.
                    if !self.done_mark_failing {
                        tracing::warn!(error = %e, "journal done mark failed; retrying");
                    }
                    self.done_mark_failing = true;
                }
            }
            self.inflight.retain(|&n, _| n > done);
        }
        if now >= self.last_prune_ms + 1000 {
            self.last_prune_ms = now;
            let window = sh
                .cfg
                .dedup_window
                .or(sh.engine.config().keyspace(Keyspace::SYNC).ttl)
                .map(|d| d.as_millis() as u64);
            if let Some(w) = window {
                while let Some(&(ts, key)) = self.dedup_order.front() {
                    if ts.saturating_add(w) >= now {
                        break;
                    }
                    self.dedup_order.pop_front();
                    self.dedup.remove(&key);
                }
            }
        }
    }
}

fn write_engine(sh: &Shared, items: &[(TimelineId, &[u8])]) -> timeline_engine::Result<Vec<SeqId>> {
    sh.engine.append_batch(items, sh.cfg.durability)
}
