//! One event loop: an epoll instance (`mio::Poll`, edge-triggered), the
//! connections it owns in a slab, an inbox that other threads post to
//! (new connections, completions, pushes, stop) with a coalescing waker,
//! and a heap of connection deadlines. It sleeps only in `poll`, until
//! readiness, a post or the next deadline.

use super::conn::{Conn, Deadline, Sub, Timeouts};
use super::dispatch;
use super::{Counters, Shared};
use crate::protocol::Push;
use crate::protocol::{ErrorCode, ErrorReply, Opcode};
use crossbeam_channel::{unbounded, Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use timeline_im::RoomWaker;

const WAKER: Token = Token(usize::MAX);
const LISTENER: Token = Token(usize::MAX - 1);

/// Bytes one `read` takes; also the loop's shared scratch buffer.
const READ_CHUNK: usize = 64 << 10;
/// Reads one connection gets per turn before the others get theirs.
const READS_PER_TURN: usize = 4;
/// A shutdown waits this long for connections to take their output, then
/// closes those owed no more answers (`fire_timers`).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// ... and this long, from its start, for the answers still owed (a
/// request that runs for minutes; a cluster write whose leader lost its
/// quorum may never be answered): then closes every connection.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(300);
/// After accept fails for want of descriptors, try again this much later
/// (the pending connection stays in the backlog; no new edge would come).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A connection's address across threads: its slab index and a
/// generation, so a completion for a closed connection never reaches a
/// new one in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    pub idx: usize,
    pub gen: u64,
}

/// What other threads hand a loop.
pub(crate) enum Msg {
    /// A connection accepted by loop 0.
    Conn(Accepted),
    /// The answer of a deferred request (its encoded frame); `slot` is
    /// the connection's reply slot.
    Done {
        key: Key,
        slot: u64,
        frame: Vec<u8>,
        /// A read from the read pool (the connection's writes wait for it).
        read: bool,
    },
    /// A push for a subscription (`len` bytes, already counted against the
    /// connection's output bound).
    Push {
        key: Key,
        serial: u64,
        push: Push,
        len: usize,
    },
    /// A subscription started dropping pushes: flush the connection so its
    /// `resync` goes out once there is room.
    Look {
        key: Key,
    },
    /// A cluster node registered its interest in a subscribing user's
    /// groups: open subscription `id` (the `SUBSCRIBE` in `slot`).
    Subscribed {
        key: Key,
        slot: u64,
        id: u64,
        user: u64,
        registered: Vec<u64>,
    },
    /// An IM worker that was full has room: run the connections that
    /// stopped on it again.
    Room,
    Stop,
}

/// An accepted connection on its way to its loop, counted in
/// `connections_open`: dropped before the loop takes it (the loop has
/// stopped), it is uncounted again.
pub(crate) struct Accepted {
    stream: Option<TcpStream>,
    counters: Arc<Counters>,
}

impl Accepted {
    fn take(mut self) -> TcpStream {
        self.stream.take().expect("taken once")
    }
}

impl Drop for Accepted {
    fn drop(&mut self) {
        if self.stream.is_some() {
            self.counters.open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The thread-safe end of a loop.
pub(crate) struct LoopHandle {
    tx: Sender<Msg>,
    waker: Waker,
    /// A wake-up is on its way: posts skip the waker's syscall.
    armed: AtomicBool,
    /// Given to the IM layer when a worker is full: posts [`Msg::Room`].
    pub(crate) room: RoomWaker,
}

impl LoopHandle {
    /// `false` if the loop is gone (nothing to tell).
    pub(crate) fn post(&self, m: Msg) -> bool {
        if self.tx.send(m).is_err() {
            return false;
        }
        if !self.armed.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "cannot wake an event loop");
            }
        }
        true
    }

    pub(crate) fn stop(&self) {
        self.post(Msg::Stop);
    }
}

/// The listener and where accepted connections go (loop 0 only).
struct Acceptor {
    listener: TcpListener,
    loops: Arc<Vec<Arc<LoopHandle>>>,
    next: usize,
    retry_at: Option<Instant>,
    /// Accepts are failing for want of descriptors or memory (logged once
    /// when it starts and once when it ends, not at every retry).
    starved: bool,
}

pub(crate) struct EventLoop {
    index: usize,
    sh: Arc<Shared>,
    poll: Poll,
    handle: Arc<LoopHandle>,
    inbox: Receiver<Msg>,
    conns: Slab<Conn>,
    next_gen: u64,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    acceptor: Option<Acceptor>,
    scratch: Vec<u8>,
    /// Connections with output to write at the end of the turn.
    dirty: Vec<usize>,
    /// Connections with more to read or execute: served next turn.
    again: Vec<usize>,
    /// Connections stopped on a full IM worker (`Conn::im_busy`).
    im_waiting: Vec<Key>,
    /// Connections added that had no `HELLO` yet, oldest first (entries of
    /// connections since closed or handshaken are dropped lazily).
    handshaking: VecDeque<Key>,
    stopping: Option<Instant>,
    /// The shutdown's grace ran out (its sweep is done).
    past_grace: bool,
}

impl EventLoop {
    pub(crate) fn new(index: usize, sh: Arc<Shared>) -> std::io::Result<EventLoop> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let (tx, inbox) = unbounded();
        Ok(EventLoop {
            index,
            sh,
            poll,
            handle: Arc::new_cyclic(|me: &Weak<LoopHandle>| {
                let me = me.clone();
                LoopHandle {
                    tx,
                    waker,
                    armed: AtomicBool::new(false),
                    room: Arc::new(move || {
                        if let Some(lp) = me.upgrade() {
                            lp.post(Msg::Room);
                        }
                    }),
                }
            }),
            im_waiting: Vec::new(),
            handshaking: VecDeque::new(),
            inbox,
            conns: Slab::new(),
            next_gen: 0,
            timers: BinaryHeap::new(),
            acceptor: None,
            scratch: vec![0; READ_CHUNK],
            dirty: Vec::new(),
            again: Vec::new(),
            stopping: None,
            past_grace: false,
        })
    }

    pub(crate) fn index(&self) -> usize {
        self.index
    }

    pub(crate) fn handle(&self) -> Arc<LoopHandle> {
        self.handle.clone()
    }

    /// Make this loop the acceptor, handing connections out over `loops`.
    pub(crate) fn listen(
        &mut self,
        mut listener: TcpListener,
        loops: Arc<Vec<Arc<LoopHandle>>>,
    ) -> std::io::Result<()> {
        self.poll
            .registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        self.acceptor = Some(Acceptor {
            listener,
            loops,
            next: 0,
            retry_at: None,
            starved: false,
        });
        Ok(())
    }

    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "event loop poll failed");
                    self.begin_stop(Instant::now());
                }
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    WAKER => {}
                    LISTENER => self.accept(now),
                    Token(idx) => self.on_ready(
                        idx,
                        ev.is_readable() || ev.is_read_closed(),
                        ev.is_writable() || ev.is_error(),
                    ),
                }
            }
            self.drain_inbox(now);
            let mut again = std::mem::take(&mut self.again);
            again.sort_unstable();
            again.dedup(); // one pump (one share of reads) per turn each
            for idx in again {
                self.pump(idx, now);
            }
            self.evict_handshaking();
            self.fire_timers(now);
            self.retry_accept(now);
            self.flush_dirty(now);
            if self.stopping.is_some() && self.conns.is_empty() {
                return;
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() || !self.dirty.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let retry = self.acceptor.as_ref().and_then(|a| a.retry_at);
        let grace = self.stopping.map(|s| match self.past_grace {
            false => s + SHUTDOWN_GRACE,
            true => s + SHUTDOWN_LIMIT,
        });
        for t in [retry, grace].into_iter().flatten() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next.map(|t| t.saturating_duration_since(Instant::now()))
    }

    // ---- accepting ----

    fn accept(&mut self, now: Instant) {
        let Some(mut a) = self.acceptor.take() else {
            return;
        };
        if self.stopping.is_none() {
            self.accept_all(&mut a, now);
        }
        self.acceptor = Some(a);
    }

    fn accept_all(&mut self, a: &mut Acceptor, now: Instant) {
        let sh = self.sh.clone();
        let c = &sh.counters;
        loop {
            match a.listener.accept() {
                Ok((stream, _peer)) => {
                    if a.starved {
                        a.starved = false;
                        tracing::info!("accepting connections again");
                    }
                    if c.open.load(Ordering::Acquire) >= sh.cfg.max_connections {
                        c.refused.fetch_add(1, Ordering::Relaxed);
                        refuse(stream, sh.cfg.max_connections);
                        continue;
                    }
                    c.open.fetch_add(1, Ordering::AcqRel);
                    c.connections.fetch_add(1, Ordering::Relaxed);
                    let accepted = Accepted {
                        stream: Some(stream),
                        counters: c.clone(),
                    };
                    let to = a.next % a.loops.len();
                    a.next = a.next.wrapping_add(1);
                    if to == self.index {
                        self.add_conn(accepted, now);
                    } else {
                        a.loops[to].post(Msg::Conn(accepted));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if is_resource_error(&e) => {
                    if !a.starved {
                        a.starved = true;
                        tracing::warn!(error = %e, "accept failed; retrying every 100 ms until it works");
                    }
                    a.retry_at = Some(now + ACCEPT_RETRY);
                    return;
                }
                // A connection that died in the backlog: take the next.
                Err(e) => tracing::debug!(error = %e, "accept failed"),
            }
        }
    }

    fn retry_accept(&mut self, now: Instant) {
        let due = self
            .acceptor
            .as_ref()
            .and_then(|a| a.retry_at)
            .is_some_and(|t| t <= now);
        if due {
            if let Some(a) = self.acceptor.as_mut() {
                a.retry_at = None;
            }
            self.accept(now);
        }
    }

    fn add_conn(&mut self, accepted: Accepted, now: Instant) {
        let mut stream = accepted.take();
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let idx = entry.key();
        let r = self.poll.registry().register(
            &mut stream,
            Token(idx),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot register a connection");
            self.sh.counters.open.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.next_gen += 1;
        let key = Key {
            idx,
            gen: self.next_gen,
        };
        let mut conn = Conn::new(stream, key, crate::protocol::DEFAULT_MAX_FRAME);
        conn.created = now;
        conn.last_input = now;
        if self.stopping.is_some() {
            conn.draining = true;
        }
        entry.insert(conn);
        // Counted against `--max-handshaking` at the end of this turn, once
        // its first bytes were read: a `HELLO` already there is served.
        self.handshaking.push_back(key);
        self.arm(idx);
        // Its first bytes may be there already (an edge we must not miss).
        self.again.push(idx);
    }

    /// Over this loop's share of `--max-handshaking`: close the connections
    /// that have waited longest for their `HELLO`. Once a turn, after the
    /// connections accepted in it were read: a burst of clients that each
    /// sent `HELLO` at once is served, not evicted unread.
    fn evict_handshaking(&mut self) {
        let budget = self
            .sh
            .cfg
            .max_handshaking
            .div_ceil(self.sh.io_threads)
            .max(1);
        if self.handshaking.len() <= budget {
            return;
        }
        let conns = &self.conns;
        self.handshaking.retain(|k| {
            conns
                .get(k.idx)
                .is_some_and(|c| c.key.gen == k.gen && c.session.id.is_none() && !c.closing())
        });
        while self.handshaking.len() > budget {
            let Some(k) = self.handshaking.pop_front() else {
                break;
            };
            let Some(c) = self.live(k) else { continue };
            c.fail_connection(
                ErrorCode::TIMEOUT,
                "no HELLO while newer connections waited",
            );
            self.sh.counters.evicted.fetch_add(1, Ordering::Relaxed);
            self.after_change(k.idx);
        }
    }

    // ---- readiness ----

    fn on_ready(&mut self, idx: usize, readable: bool, writable: bool) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        if readable {
            c.can_read = true;
            self.again.push(idx);
        }
        if writable {
            self.mark_dirty(idx);
        }
    }

    /// Execute what was read and read more, within one turn's share.
    fn pump(&mut self, idx: usize, now: Instant) {
        let max_owed = self.sh.cfg.max_queued_replies.max(1);
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        let ctx = dispatch::Ctx {
            sh: &self.sh,
            lp: &self.handle,
        };
        if !c.input.is_empty() && !c.paused(max_owed) {
            let input = std::mem::take(&mut c.input);
            let used = dispatch::execute_input(&ctx, c, &input);
            c.input = input;
            c.input.drain(..used);
        }
        let mut reads = 0;
        while c.wants_read(max_owed) {
            if reads == READS_PER_TURN {
                self.again.push(idx);
                break;
            }
            reads += 1;
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    // The client is done sending: answer what it sent.
                    c.can_read = false;
                    c.eof = true;
                }
                Ok(n) => {
                    c.last_input = now;
                    c.partial_since = None;
                    if c.input.is_empty() {
                        let used = dispatch::execute_input(&ctx, c, &self.scratch[..n]);
                        c.input.extend_from_slice(&self.scratch[used..n]);
                    } else {
                        c.input.extend_from_slice(&self.scratch[..n]);
                        let input = std::mem::take(&mut c.input);
                        let used = dispatch::execute_input(&ctx, c, &input);
                        c.input = input;
                        c.input.drain(..used);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    c.can_read = false;
                    if !c.input.is_empty() && !c.has_whole_frame() {
                        c.partial_since.get_or_insert(now);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "read failed");
                    self.close(idx);
                    return;
                }
            }
        }
        self.after_change(idx);
    }

    /// Bookkeeping after a connection's state moved: shutdown's `CLOSED`,
    /// its deadline, its output.
    fn after_change(&mut self, idx: usize) {
        let max_owed = self.sh.cfg.max_queued_replies.max(1);
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        if c.im_busy && !c.im_listed {
            c.im_listed = true;
            self.im_waiting.push(c.key);
            self.sh.counters.im_full.fetch_add(1, Ordering::Relaxed);
        }
        if c.paused(max_owed) {
            c.partial_since = None; // not reading: the client is not to blame
        }
        c.close_if_done_after_eof(max_owed);
        c.trim_input();
        if c.draining && c.owed() == 0 && !c.paused(max_owed) && !c.has_whole_frame() {
            // Every request read is answered: say why nothing more will be.
            c.fail_connection(ErrorCode::CLOSED, "the server is shutting down");
        }
        if c.dirty {
            self.mark_dirty(idx);
        }
        self.arm(idx);
    }

    fn mark_dirty(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx) {
            c.dirty = true;
            self.dirty.push(idx);
        }
    }

    fn flush_dirty(&mut self, now: Instant) {
        let max_owed = self.sh.cfg.max_queued_replies.max(1);
        let mut list = std::mem::take(&mut self.dirty);
        list.sort_unstable();
        list.dedup();
        for idx in list {
            let Some(c) = self.conns.get_mut(idx) else {
                continue;
            };
            let was_paused = c.paused(max_owed);
            match c.flush(now) {
                Ok(resyncs) => {
                    if resyncs > 0 {
                        self.sh
                            .counters
                            .resyncs
                            .fetch_add(resyncs, Ordering::Relaxed);
                        // Written with the next turn's flush.
                        self.dirty.push(idx);
                    }
                    if c.finished() {
                        self.close(idx);
                        continue;
                    }
                    if was_paused && !c.paused(max_owed) {
                        self.again.push(idx); // reads resume next turn
                    }
                    self.arm(idx);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "write failed");
                    self.close(idx);
                }
            }
        }
    }

    // ---- the inbox ----

    fn drain_inbox(&mut self, now: Instant) {
        // Clear before draining: a post after this either is drained below
        // or wakes the next poll.
        self.handle.armed.store(false, Ordering::Release);
        while let Ok(m) = self.inbox.try_recv() {
            match m {
                Msg::Conn(s) => self.add_conn(s, now),
                Msg::Done {
                    key,
                    slot,
                    frame,
                    read,
                } => {
                    if let Some(c) = self.live(key) {
                        if read {
                            c.read_done();
                        }
                        c.complete(slot, frame);
                        // A barrier or a held write may have lifted:
                        // continue the input (pump ends in after_change).
                        self.again.push(key.idx);
                    }
                }
                Msg::Subscribed {
                    key,
                    slot,
                    id,
                    user,
                    registered,
                } => {
                    if let Some(c) = self.conns.get_mut(key.idx).filter(|c| c.key.gen == key.gen) {
                        let ctx = dispatch::Ctx {
                            sh: &self.sh,
                            lp: &self.handle,
                        };
                        dispatch::start_subscription(&ctx, c, id, user, Some(slot), &registered);
                        // The barrier lifted: continue the input.
                        self.again.push(key.idx);
                    }
                }
                Msg::Push {
                    key,
                    serial,
                    push,
                    len,
                } => {
                    let pushed = self
                        .live(key)
                        .map(|c| (c.push(serial, &push, len), c.dirty));
                    if let Some((sent, dirty)) = pushed {
                        if sent {
                            self.sh.counters.pushes.fetch_add(1, Ordering::Relaxed);
                        } else {
                            // Dropped: the output shrank; it may unpause.
                            self.again.push(key.idx);
                        }
                        if dirty {
                            self.mark_dirty(key.idx);
                        }
                    }
                }
                Msg::Look { key } => {
                    if self.live(key).is_some() {
                        self.mark_dirty(key.idx);
                    }
                }
                Msg::Room => {
                    for key in std::mem::take(&mut self.im_waiting) {
                        if let Some(c) = self.live(key) {
                            c.im_busy = false;
                            c.im_listed = false;
                            self.again.push(key.idx);
                        }
                    }
                }
                Msg::Stop => self.begin_stop(now),
            }
        }
    }

    fn live(&mut self, key: Key) -> Option<&mut Conn> {
        self.conns.get_mut(key.idx).filter(|c| c.key.gen == key.gen)
    }

    fn begin_stop(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(now);
        if let Some(mut a) = self.acceptor.take() {
            let _ = self.poll.registry().deregister(&mut a.listener);
        }
        let idxs: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
        for idx in idxs {
            if let Some(c) = self.conns.get_mut(idx) {
                c.draining = true;
            }
            self.again.push(idx);
        }
    }

    // ---- deadlines ----

    fn timeouts(&self) -> Timeouts {
        let cfg = &self.sh.cfg;
        Timeouts {
            handshake: cfg.handshake_timeout,
            idle: cfg.idle_timeout,
            write: cfg.write_timeout,
        }
    }

    /// Put the connection's earliest deadline in the heap, unless an
    /// earlier entry of it is there already (stale entries are skipped
    /// when they come up).
    fn arm(&mut self, idx: usize) {
        let t = self.timeouts();
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        if let Some((at, _)) = c.deadline(&t) {
            if c.timer_at.is_none_or(|cur| at < cur) {
                c.timer_at = Some(at);
                self.timers.push(Reverse((at, idx, c.key.gen)));
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        if let Some(s) = self.stopping.filter(|&s| now >= s + SHUTDOWN_LIMIT) {
            tracing::warn!(
                after = ?now.duration_since(s),
                connections = self.conns.len(),
                "shutdown: answers still owed; closing the connections"
            );
            let idxs: Vec<usize> = self.conns.iter().map(|(i, _)| i).collect();
            for idx in idxs {
                self.close(idx);
            }
            return;
        }
        if let Some(s) = self.stopping.filter(|_| !self.past_grace) {
            if now >= s + SHUTDOWN_GRACE {
                // A connection owed no answer is only waiting for its client
                // to take its output: closed. One still owed answers (a
                // request that takes minutes, a million-member create) keeps
                // it until they and `CLOSED` are written; a client that
                // stops reading them meets the write deadline.
                self.past_grace = true;
                let idle: Vec<usize> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.owed() == 0)
                    .map(|(i, _)| i)
                    .collect();
                for idx in idle {
                    self.close(idx);
                }
            }
        }
        while let Some(Reverse((at, idx, gen))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let t = self.timeouts();
            let Some(c) = self.conns.get_mut(idx).filter(|c| c.key.gen == gen) else {
                continue;
            };
            if c.timer_at != Some(at) {
                continue; // stale: a later entry stands for it
            }
            c.timer_at = None;
            match c.deadline(&t) {
                Some((due, why)) if due <= now => self.expire(idx, why),
                _ => self.arm(idx),
            }
        }
    }

    fn expire(&mut self, idx: usize, why: Deadline) {
        let Some(c) = self.conns.get_mut(idx) else {
            return;
        };
        self.sh.counters.timeouts.fetch_add(1, Ordering::Relaxed);
        match why {
            Deadline::Write => {
                tracing::debug!("client does not read its replies: disconnected");
                self.close(idx);
                return;
            }
            Deadline::Handshake => c.fail_connection(ErrorCode::TIMEOUT, "no HELLO in time"),
            Deadline::Idle => c.fail_connection(ErrorCode::TIMEOUT, "idle connection closed"),
            Deadline::PartialFrame => {
                c.fail_connection(ErrorCode::TIMEOUT, "a frame was left unfinished")
            }
            Deadline::TokenExpired => {
                c.fail_connection(ErrorCode::UNAUTHORIZED, "the connection's token expired")
            }
        }
        self.after_change(idx);
    }

    fn close(&mut self, idx: usize) {
        if !self.conns.contains(idx) {
            return;
        }
        let mut c = self.conns.remove(idx);
        for Sub { sink, user, .. } in c.subs.drain(..) {
            sink.close();
            self.sh.im.release_sinks(user);
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        discard_unread(&mut c.stream);
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        self.sh.counters.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Read and drop what the client sent that was not read (bounded: 64 KiB),
/// before the socket closes. A socket closed with unread input sends the
/// client a reset instead of an orderly end, and a reset can make the
/// client lose what it had not read yet: the last replies, the `CLOSED`
/// or `TIMEOUT` or `TOO_MANY_CONNECTIONS` that says why.
fn discard_unread(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Descriptors or memory ran out: accept again after a pause.
fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_codes::EMFILE | libc_codes::ENFILE | libc_codes::ENOBUFS | libc_codes::ENOMEM)
    )
}

/// The errno values of `is_resource_error` (Linux).
mod libc_codes {
    pub const EMFILE: i32 = 24;
    pub const ENFILE: i32 = 23;
    pub const ENOBUFS: i32 = 105;
    pub const ENOMEM: i32 = 12;
}

/// Too many connections: say so (request id 0: about the connection) and
/// close. One non-blocking write: the frame is far smaller than a fresh
/// socket's buffer.
fn refuse(mut stream: TcpStream, max: usize) {
    let mut b = Vec::new();
    ErrorReply::new(
        ErrorCode::TOO_MANY_CONNECTIONS,
        0, // the table marks arg unused; the limit is in the message
        format!("the server takes at most {max} connections"),
    )
    .encode_frame(0, Opcode(0), &mut b);
    let _ = stream.write(&b);
    discard_unread(&mut stream);
}
