//! One connection's state on its event loop: unprocessed input, output
//! not yet written, the replies still owed in request order, its
//! subscriptions and its deadlines. No thread and no socket timeout: the
//! loop calls in on readiness, completions and timers.
//!
//! Replies: a request answered at once is encoded straight into the
//! output, unless an earlier request is still owed an answer; then it
//! waits in `slots` behind it. A deferred request holds an empty slot that
//! its completion fills; the ready prefix of `slots` moves to the output.
//! A *barrier* slot (an own-fdatasync append, a membership change)
//! also holds back the requests read after it until it completes, so they
//! see its effect (docs/protocol.md §4).

use super::event_loop::Key;
use super::push::{Queued, SubSink};
use crate::protocol::Push;
use crate::protocol::{encode_push_frame, push_frame_len, ErrorCode, ErrorReply, Identity, Opcode};
use mio::net::TcpStream;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Output one connection may have queued (replies and pushes) before the
/// server stops reading its requests and drops its pushes.
pub(crate) const MAX_QUEUED_BYTES: usize = 4 << 20;

/// Subscriptions one connection may hold.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 16;

/// An output buffer larger than this is given back once written out (idle
/// connections hold no big buffers).
const KEEP_OUT: usize = 16 << 10;

/// A place in the reply order. Every frame held here is already counted in
/// `queued`, so the output bound covers what waits as well as what is
/// written.
enum Slot {
    /// A deferred answer not there yet.
    Waiting,
    /// A reply or a push waiting for the slots before it.
    Ready(Vec<u8>),
}

/// Reads one connection may have on the read pool at once (each answer
/// can be up to the client's frame limit, and is counted only once there).
pub(crate) const MAX_READS_IN_FLIGHT: usize = 16;

/// An input buffer larger than this is given back once empty.
const KEEP_IN: usize = 64 << 10;

pub(crate) struct Sub {
    /// The subscription id: the request id of its SUBSCRIBE.
    pub id: u64,
    /// Whose pushes it takes.
    pub user: u64,
    pub sink: Arc<SubSink>,
    /// Its SUBSCRIBE reply's slot while that reply waits behind earlier
    /// ones: pushes queue behind it until then (they follow the reply).
    pub reply_slot: Option<u64>,
}

/// What the handshake settled.
pub(crate) struct Session {
    pub id: Option<Identity>,
    /// The largest frame the client accepts (HELLO `max_frame`).
    pub client_max: usize,
    /// When the token expires, with auth on (fixed at the `HELLO`).
    pub token_deadline: Option<Instant>,
}

/// Why a deadline fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadline {
    Handshake,
    Idle,
    Write,
    TokenExpired,
    /// A frame begun and not finished (the memory it holds is released).
    PartialFrame,
}

pub(crate) struct Conn {
    pub stream: TcpStream,
    pub key: Key,
    pub queued: Arc<Queued>,
    /// Bytes read and not yet executed (a partial frame, or requests held
    /// behind a barrier or by backpressure).
    pub input: Vec<u8>,
    out: Vec<u8>,
    wpos: usize,
    slots: VecDeque<Slot>,
    first_slot: u64,
    barrier: Option<u64>,
    /// Reads on the read pool not answered yet: writes wait for them.
    reads_in_flight: usize,
    /// The next request's IM worker was full: the request stays unread
    /// until the loop's room waker runs (`dispatch::admit`).
    pub im_busy: bool,
    /// On the loop's list of connections waiting for IM room.
    pub im_listed: bool,
    pub session: Session,
    pub subs: Vec<Sub>,
    pub next_serial: u64,
    /// The socket may have more to read (edge-triggered readiness).
    pub can_read: bool,
    /// The client shut its sending side: execute what it sent, answer,
    /// then close.
    pub eof: bool,
    /// No more reading: close once everything owed is written.
    closing: bool,
    /// Shutdown: no more reading; answer what was read, then `CLOSED`.
    pub draining: bool,
    pub created: Instant,
    pub last_input: Instant,
    /// Since when the server, reading, has found nothing more of a frame
    /// begun (`None` while it is paused: then the client is not to blame).
    pub partial_since: Option<Instant>,
    stalled_since: Option<Instant>,
    /// The deadline this connection has in the loop's timer heap.
    pub timer_at: Option<Instant>,
    /// Has output to write at the end of this loop turn.
    pub dirty: bool,
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, key: Key, default_max: usize) -> Conn {
        let now = Instant::now();
        Conn {
            stream,
            key,
            queued: Arc::new(Queued::default()),
            input: Vec::new(),
            out: Vec::new(),
            wpos: 0,
            slots: VecDeque::new(),
            first_slot: 0,
            barrier: None,
            reads_in_flight: 0,
            im_busy: false,
            im_listed: false,
            session: Session {
                id: None,
                client_max: default_max,
                token_deadline: None,
            },
            subs: Vec::new(),
            next_serial: 0,
            can_read: true,
            eof: false,
            closing: false,
            draining: false,
            created: now,
            last_input: now,
            partial_since: None,
            stalled_since: None,
            timer_at: None,
            dirty: false,
        }
    }

    // ---- replies, in request order ----

    /// Answer a request now: `encode` appends its frame.
    pub(crate) fn reply(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        if self.slots.is_empty() {
            let before = self.out.len();
            encode(&mut self.out);
            self.queued.add(self.out.len() - before);
            self.dirty = true;
        } else {
            let mut b = Vec::new();
            encode(&mut b);
            self.queued.add(b.len());
            self.slots.push_back(Slot::Ready(b));
        }
    }

    pub(crate) fn error(&mut self, id: u64, op: Opcode, e: ErrorReply) {
        self.reply(|b| e.encode_frame(id, op, b));
    }

    /// Hold a place for an answer that comes later; returns its slot.
    pub(crate) fn defer(&mut self) -> u64 {
        self.slots.push_back(Slot::Waiting);
        self.first_slot + self.slots.len() as u64 - 1
    }

    /// [`defer`](Self::defer), and execute nothing read after it until it
    /// completes.
    pub(crate) fn defer_barrier(&mut self) -> u64 {
        let s = self.defer();
        self.barrier = Some(s);
        s
    }

    /// [`defer`](Self::defer) a read sent to the read pool.
    pub(crate) fn defer_read(&mut self) -> u64 {
        self.reads_in_flight += 1;
        self.defer()
    }

    pub(crate) fn read_done(&mut self) {
        self.reads_in_flight = self.reads_in_flight.saturating_sub(1);
    }

    /// Reads of this connection still on the read pool.
    pub(crate) fn reads_in_flight(&self) -> usize {
        self.reads_in_flight
    }

    /// The answer of slot `slot` arrived.
    pub(crate) fn complete(&mut self, slot: u64, frame: Vec<u8>) {
        let Some(i) = slot.checked_sub(self.first_slot) else {
            return;
        };
        if let Some(s) = self.slots.get_mut(i as usize) {
            self.queued.add(frame.len());
            *s = Slot::Ready(frame);
        }
        if self.barrier == Some(slot) {
            self.barrier = None;
        }
        while !matches!(self.slots.front(), None | Some(Slot::Waiting)) {
            if let Some(Slot::Ready(f)) = self.slots.pop_front() {
                self.out.extend_from_slice(&f);
            }
            self.first_slot += 1;
            self.dirty = true;
        }
    }

    /// Answers still owed (in flight or waiting behind one).
    pub(crate) fn owed(&self) -> usize {
        self.slots.len()
    }

    /// Execute nothing more for now: a barrier is pending, the output is
    /// over its bound, too many answers are owed, or the connection ends.
    pub(crate) fn paused(&self, max_owed: usize) -> bool {
        self.closing
            || self.barrier.is_some()
            || self.queued.get() > MAX_QUEUED_BYTES
            || self.slots.len() >= max_owed
            || self.reads_in_flight >= MAX_READS_IN_FLIGHT
            || self.im_busy
    }

    /// The next request is a write held until the reads before it are
    /// answered (a read never sees a write sent after it).
    pub(crate) fn write_held(&self) -> bool {
        self.reads_in_flight > 0 && super::dispatch::is_write(&self.input)
    }

    /// Read more from the socket now? Not while paused, and not while
    /// input is held behind reads (the input would grow without bound).
    pub(crate) fn wants_read(&self, max_owed: usize) -> bool {
        self.can_read && !self.draining && !self.paused(max_owed) && !self.write_held()
    }

    /// A whole frame is waiting in the input (read, not executed).
    pub(crate) fn has_whole_frame(&self) -> bool {
        matches!(
            crate::protocol::peek_len(&self.input),
            Some(n) if self.input.len() as u64 >= n
        )
    }

    /// Give a large input buffer back once it is empty.
    pub(crate) fn trim_input(&mut self) {
        if self.input.is_empty() && self.input.capacity() > KEEP_IN {
            self.input = Vec::new();
        }
    }

    /// Stop reading; close once everything owed is written.
    pub(crate) fn close_after(&mut self) {
        self.closing = true;
        self.dirty = true;
    }

    /// After the client's EOF: once every whole frame it sent is executed
    /// and nothing is owed, end the connection (after writing).
    pub(crate) fn close_if_done_after_eof(&mut self, max_owed: usize) {
        if self.eof
            && !self.closing
            && self.slots.is_empty()
            && !self.paused(max_owed)
            && !self.has_whole_frame()
        {
            self.close_after();
        }
    }

    /// Ending: it reads nothing more.
    pub(crate) fn closing(&self) -> bool {
        self.closing
    }

    /// Everything owed is written and the connection is to end.
    pub(crate) fn finished(&self) -> bool {
        self.closing && self.slots.is_empty() && self.wpos == self.out.len()
    }

    /// Say `code` about the whole connection (request id 0) and close.
    pub(crate) fn fail_connection(&mut self, code: ErrorCode, msg: impl Into<String>) {
        let e = ErrorReply::new(code, 0, msg);
        self.reply(|b| e.encode_frame(0, Opcode(0), b));
        self.close_after();
    }

    // ---- pushes ----

    /// A push for subscription `serial` arrived from an IM worker; its
    /// `len` bytes are already counted in `queued`.
    pub(crate) fn push(&mut self, serial: u64, p: &Push, len: usize) -> bool {
        let Some(i) = self.subs.iter().position(|s| s.sink.serial == serial) else {
            self.queued.sub(len); // unsubscribed meanwhile
            self.dirty = true;
            return false;
        };
        if self.closing {
            // Nothing follows a connection's last frame (CLOSED, TIMEOUT).
            self.queued.sub(len);
            return false;
        }
        let id = self.subs[i].id;
        let behind_reply = self.subs[i]
            .reply_slot
            .is_some_and(|s| s >= self.first_slot);
        let first = self.first_slot;
        let waiting_reply = self.subs[i]
            .reply_slot
            .and_then(|s| s.checked_sub(first))
            .and_then(|k| self.slots.get_mut(k as usize));
        if behind_reply {
            // Right behind its SUBSCRIBE reply (and the pushes already
            // there), in that reply's own slot: it leaves with the reply,
            // not behind requests read since. (The reply is always there:
            // SUBSCRIBE fills its slot at once.)
            match waiting_reply {
                Some(Slot::Ready(buf)) => encode_push_frame(id, p, buf),
                _ => {
                    self.queued.sub(len);
                    return false;
                }
            }
        } else {
            self.subs[i].reply_slot = None;
            encode_push_frame(id, p, &mut self.out);
            self.dirty = true;
        }
        true
    }

    /// Subscriptions that dropped pushes get their one `resync` once the
    /// client has read its output down to half the bound.
    fn send_resyncs(&mut self) -> u64 {
        if self.queued.get() > MAX_QUEUED_BYTES / 2 || self.closing {
            return 0;
        }
        let mut n = 0;
        for s in &self.subs {
            let live = s.reply_slot.is_none_or(|r| r < self.first_slot);
            if live && s.sink.take_overflow() {
                let len = push_frame_len(&Push::Resync);
                encode_push_frame(s.id, &Push::Resync, &mut self.out);
                self.queued.add(len);
                n += 1;
            }
        }
        n
    }

    // ---- the socket ----

    /// Let go of the written front of the output once it is at least half
    /// of it: a client that reads steadily but never quite catches up
    /// would otherwise keep every byte ever sent to it in the buffer (the
    /// 4 MiB bound counts only unsent bytes). Each byte is moved at most
    /// once per halving, so the cost stays linear in the bytes sent.
    fn drop_written(&mut self) {
        if self.wpos >= KEEP_OUT && self.wpos * 2 >= self.out.len() {
            self.out.drain(..self.wpos);
            self.wpos = 0;
        }
    }

    /// Write what the output holds; `Err` = the connection is dead.
    /// Returns the resyncs it queued (they go out with the next write).
    pub(crate) fn flush(&mut self, now: Instant) -> std::io::Result<u64> {
        self.dirty = false;
        let mut resyncs = self.send_resyncs();
        loop {
            while self.wpos < self.out.len() {
                match self.stream.write(&self.out[self.wpos..]) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.wpos += n;
                        self.queued.sub(n);
                        self.stalled_since = None;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.stalled_since.get_or_insert(now);
                        self.drop_written();
                        return Ok(resyncs);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.out.clear();
            self.wpos = 0;
            if self.out.capacity() > KEEP_OUT {
                self.out = Vec::new();
            }
            self.stalled_since = None;
            let more = self.send_resyncs();
            if more == 0 {
                return Ok(resyncs);
            }
            resyncs += more;
        }
    }

    // ---- deadlines ----

    /// The earliest deadline this connection has now.
    pub(crate) fn deadline(&self, t: &Timeouts) -> Option<(Instant, Deadline)> {
        let mut best: Option<(Instant, Deadline)> = None;
        let mut consider = |at: Instant, why| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, why));
            }
        };
        if self.session.id.is_none() && !self.closing {
            consider(self.created + t.handshake, Deadline::Handshake);
        } else if self.subs.is_empty() && !self.closing {
            consider(self.last_input + t.idle, Deadline::Idle);
        }
        if let Some(s) = self.stalled_since {
            consider(s + t.write, Deadline::Write);
        }
        if let Some(since) = self.partial_since.filter(|_| !self.closing) {
            consider(since + t.write, Deadline::PartialFrame);
        }
        if let Some(at) = self.session.token_deadline.filter(|_| !self.closing) {
            consider(at, Deadline::TokenExpired);
        }
        best
    }
}

/// The timeouts of the configuration.
pub(crate) struct Timeouts {
    pub handshake: Duration,
    pub idle: Duration,
    pub write: Duration,
}
