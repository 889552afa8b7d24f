//! A bounded multi-producer mailbox for one consumer thread.
//!
//! * Producers never lose a wake-up: a push followed by [`Signal::notify`]
//!   either finds the consumer awake (it will see the item on its next pass)
//!   or wakes it. The consumer may serve several mailboxes with one
//!   [`Signal`].
//! * When the queue is full, [`Mailbox::push`] blocks the producer until the
//!   consumer makes room (backpressure: nothing is dropped). A producer that
//!   must not block (a worker, which also has its own mailboxes to serve)
//!   registers its own [`Signal`] with [`Mailbox::notify_on_room`] and
//!   sleeps on it: room or new work wakes it, no polling. A caller that
//!   must never block at all (a server's event loop) registers a callback
//!   instead and retries when it runs.
//!   [`Mailbox::try_push`] hands the item back instead (workers use it for
//!   worker-to-worker traffic, where blocking could deadlock two workers that
//!   feed each other).
//!
//! Memory ordering: every decision to sleep or to wake is made with a
//! read-modify-write on one atomic (RMWs on one location are totally ordered
//! and always read the latest value), never with a plain load racing a store
//! on another location, which is the lost-wake-up pattern.

use super::ring::Ring;
use crate::sync::{self, ord, AtomicBool, AtomicUsize, Condvar, Mutex};

const EMPTY: usize = 0;
const NOTIFIED: usize = 1;
const PARKED: usize = 2;

/// A wake-up token for one consumer: `notify` before `wait` makes `wait`
/// return at once (like `Thread::unpark`), so a notification is never lost.
pub(crate) struct Signal {
    state: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl Default for Signal {
    fn default() -> Self {
        Signal {
            state: AtomicUsize::new(EMPTY),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }
}

impl Signal {
    /// Wake the consumer (or leave a token for its next `wait`).
    pub(crate) fn notify(&self) {
        // AcqRel: the producer's push happens-before the consumer's return
        // from `wait` (it acquires this swap's value).
        if self.state.swap(NOTIFIED, ord!("signal.notify", AcqRel)) == PARKED {
            // The consumer holds `lock` from its PARKED CAS until the condvar
            // releases it, so taking the lock here means it is waiting.
            let _g = sync::lock(&self.lock);
            self.cv.notify_one();
        }
    }

    /// Sleep until notified (returns at once if a token is pending).
    pub(crate) fn wait(&self) {
        self.wait_inner(None)
    }

    /// Sleep until notified or until `d` has passed (a retry timer).
    pub(crate) fn wait_timeout(&self, d: std::time::Duration) {
        self.wait_inner(Some(d))
    }

    fn wait_inner(&self, timeout: Option<std::time::Duration>) {
        if self
            .state
            .compare_exchange(
                NOTIFIED,
                EMPTY,
                ord!("signal.wait.take", AcqRel),
                ord!("signal.wait.take.fail", Acquire),
            )
            .is_ok()
        {
            return;
        }
        let mut g = sync::lock(&self.lock);
        match self.state.compare_exchange(
            EMPTY,
            PARKED,
            ord!("signal.wait.park", AcqRel),
            ord!("signal.wait.park.fail", Acquire),
        ) {
            Ok(_) => {}
            Err(_) => {
                // A notify slipped in: consume it.
                self.state.swap(EMPTY, ord!("signal.wait.slipped", AcqRel));
                return;
            }
        }
        loop {
            g = match timeout {
                None => sync::wait(&self.cv, g),
                Some(d) => {
                    let g = sync::wait_timeout(&self.cv, g, d);
                    // Timed out (or woke): leave PARKED either way. A failed
                    // CAS means a notify came in: consume its token below.
                    if self
                        .state
                        .compare_exchange(
                            PARKED,
                            EMPTY,
                            ord!("signal.timeout.unpark", AcqRel),
                            ord!("signal.timeout.unpark.fail", Acquire),
                        )
                        .is_ok()
                    {
                        return;
                    }
                    g
                }
            };
            if self
                .state
                .compare_exchange(
                    NOTIFIED,
                    EMPTY,
                    ord!("signal.wake.take", AcqRel),
                    ord!("signal.wake.take.fail", Acquire),
                )
                .is_ok()
            {
                return;
            }
            // Spurious wake-up: still PARKED.
        }
    }
}

/// A caller to tell, once, that a full mailbox has room again.
pub(crate) enum RoomWaiter {
    /// A worker sleeping on its signal.
    Signal(sync::Arc<Signal>),
    /// A caller that must never block (an event loop): a callback that
    /// schedules its retry.
    Call(std::sync::Arc<dyn Fn() + Send + Sync>),
}

impl RoomWaiter {
    fn same(&self, other: &RoomWaiter) -> bool {
        match (self, other) {
            (RoomWaiter::Signal(a), RoomWaiter::Signal(b)) => sync::Arc::ptr_eq(a, b),
            (RoomWaiter::Call(a), RoomWaiter::Call(b)) => {
                std::ptr::addr_eq(std::sync::Arc::as_ptr(a), std::sync::Arc::as_ptr(b))
            }
            _ => false,
        }
    }

    fn wake(self) {
        match self {
            RoomWaiter::Signal(s) => s.notify(),
            RoomWaiter::Call(f) => f(),
        }
    }
}

/// Why a push did not take.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PushError<T> {
    Full(T),
    Closed(T),
}

pub(crate) struct Mailbox<T> {
    queue: Ring<T>,
    consumer: sync::Arc<Signal>,
    /// Producers blocked in `push` on a full queue, plus signals waiting for
    /// room (`notify_on_room`).
    waiting: AtomicUsize,
    /// Who to tell when room is made (under the lock the blocked
    /// producers' condvar uses).
    space_lock: Mutex<Vec<RoomWaiter>>,
    space: Condvar,
    closed: AtomicBool,
}

impl<T> Mailbox<T> {
    pub(crate) fn new(capacity: usize, consumer: sync::Arc<Signal>) -> Self {
        Mailbox {
            queue: Ring::new(capacity),
            consumer,
            waiting: AtomicUsize::new(0),
            space_lock: Mutex::new(Vec::new()),
            space: Condvar::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Push without blocking; a full or closed mailbox hands the item back.
    pub(crate) fn try_push(&self, t: T) -> Result<(), PushError<T>> {
        if self.closed.load(ord!("mailbox.try_push.closed", Acquire)) {
            return Err(PushError::Closed(t));
        }
        match self.queue.push(t) {
            Ok(()) => {
                self.consumer.notify();
                Ok(())
            }
            Err(t) => Err(PushError::Full(t)),
        }
    }

    /// Push, waiting while the mailbox is full (backpressure). Fails only
    /// once the mailbox is closed.
    pub(crate) fn push(&self, mut t: T) -> Result<(), T> {
        loop {
            match self.try_push(t) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(x)) => return Err(x),
                Err(PushError::Full(x)) => t = x,
            }
            let g = sync::lock(&self.space_lock);
            // Announce before retrying: either the retry sees the consumer's
            // pop, or the consumer's RMW in `made_room` sees this one (both
            // are RMWs on `waiting`, so one of them comes second and reads
            // the other) and it notifies under `space_lock`, which we hold
            // until `wait` releases it.
            self.waiting
                .fetch_add(1, ord!("mailbox.push.announce", AcqRel));
            let retry = if self.closed.load(ord!("mailbox.push.closed", Acquire)) {
                Err(t)
            } else {
                self.queue.push(t)
            };
            match retry {
                Ok(()) => {
                    self.waiting
                        .fetch_sub(1, ord!("mailbox.push.retract_pushed", AcqRel));
                    drop(g);
                    self.consumer.notify();
                    return Ok(());
                }
                Err(x) => {
                    t = x;
                    if self.closed.load(ord!("mailbox.push.closed_again", Acquire)) {
                        self.waiting
                            .fetch_sub(1, ord!("mailbox.push.retract_closed", AcqRel));
                        return Err(t);
                    }
                    let g = sync::wait(&self.space, g);
                    self.waiting
                        .fetch_sub(1, ord!("mailbox.push.retract_woken", AcqRel));
                    drop(g);
                }
            }
        }
    }

    /// Take one item (consumer side). Call [`made_room`](Self::made_room)
    /// after a run of pops so blocked producers can go on.
    pub(crate) fn pop(&self) -> Option<T> {
        self.queue.pop()
    }

    /// Wake producers blocked on a full queue, and the signals waiting for
    /// room, if any.
    pub(crate) fn made_room(&self) {
        // An RMW, not a load: see `push`.
        if self.waiting.fetch_add(0, ord!("mailbox.made_room", AcqRel)) > 0 {
            self.wake_all();
        }
    }

    /// Wake every producer blocked in `push` and every registered signal
    /// (each registration is good for one wake-up).
    fn wake_all(&self) {
        let mut g = sync::lock(&self.space_lock);
        let waiters = std::mem::take(&mut *g);
        self.waiting
            .fetch_sub(waiters.len(), ord!("mailbox.wake_all", AcqRel));
        self.space.notify_all();
        drop(g);
        for w in waiters {
            w.wake();
        }
    }

    /// Wake `w` the next time the consumer makes room (once). The caller
    /// retries its push after registering, then sleeps (or returns): a pop
    /// between its failed push and the registration is seen by the retry, a
    /// later one by `made_room` (both sides RMW `waiting`, as in `push`).
    /// A waiter already registered is not added twice.
    pub(crate) fn notify_on_room(&self, w: RoomWaiter) {
        let mut g = sync::lock(&self.space_lock);
        if g.iter().any(|x| x.same(&w)) {
            return;
        }
        self.waiting
            .fetch_add(1, ord!("mailbox.notify_on_room", AcqRel));
        g.push(w);
    }

    /// Refuse further pushes; wake the consumer and every blocked producer.
    /// Items already queued stay poppable.
    pub(crate) fn close(&self) {
        self.closed.store(true, ord!("mailbox.close", Release));
        self.consumer.notify();
        self.wake_all();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(ord!("mailbox.is_closed", Acquire))
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}
