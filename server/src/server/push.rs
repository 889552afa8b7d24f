//! A subscription's sink: the IM worker that made an entry durable offers
//! it here, on its own thread; the sink queues it for the connection's
//! event loop and wakes the loop (coalesced: one wake-up per drain, not
//! per push). That is the push path's only cross-thread step; the loop
//! encodes the frame into the connection's output, behind nothing but
//! output already there, and it leaves with that output in one write.
//!
//! The bound is the connection's output in bytes (`MAX_QUEUED_BYTES`,
//! shared with its replies): a push that does not fit is dropped and the
//! subscription owes one `resync`, which the loop sends once the client
//! has read its output down to half the bound. Nothing else of that
//! subscription is sent meanwhile.

use super::conn::MAX_QUEUED_BYTES;
use super::convert::ToWire;
use super::event_loop::{Key, LoopHandle, Msg};
use crate::protocol::push_frame_len;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use timeline_im::{Push, PushSink};

/// Output bytes of one connection not yet written: replies and pushes in
/// its output buffer plus pushes on their way to its loop.
#[derive(Default)]
pub(crate) struct Queued(AtomicUsize);

impl Queued {
    pub(crate) fn add(&self, n: usize) -> usize {
        self.0.fetch_add(n, Ordering::AcqRel) + n
    }
    pub(crate) fn sub(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::AcqRel);
    }
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

pub(crate) struct SubSink {
    lp: Arc<LoopHandle>,
    key: Key,
    /// Tells this subscription from a later one with the same request id.
    pub serial: u64,
    queued: Arc<Queued>,
    /// The client's HELLO `max_frame`: a larger push becomes a resync.
    client_max: usize,
    closed: AtomicBool,
    overflowed: AtomicBool,
}

impl SubSink {
    pub(crate) fn new(
        lp: Arc<LoopHandle>,
        key: Key,
        serial: u64,
        queued: Arc<Queued>,
        client_max: usize,
    ) -> Self {
        SubSink {
            lp,
            key,
            serial,
            queued,
            client_max,
            closed: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
        }
    }

    /// Unsubscribed or the connection closed: the server then has the IM
    /// layer forget it (`Im::release_sinks`).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Start dropping; on the first drop, make the loop look at the
    /// connection (its output may be empty, so nothing else would).
    fn overflow(&self) {
        if !self.overflowed.swap(true, Ordering::AcqRel) {
            self.lp.post(Msg::Look { key: self.key });
        }
    }

    /// Did pushes get dropped since the last call? (The loop then sends
    /// one `resync`.)
    pub(crate) fn take_overflow(&self) -> bool {
        self.overflowed.load(Ordering::Acquire) && self.overflowed.swap(false, Ordering::AcqRel)
    }
}

impl PushSink for SubSink {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn push(&self, p: Push) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        if self.overflowed.load(Ordering::Acquire) {
            return true; // owes a resync already; nothing else until then
        }
        let p = p.wire();
        let len = push_frame_len(&p);
        if len > self.client_max {
            // Too large for the client: it reads the entry with SYNC.
            self.overflow();
            return true;
        }
        if self.queued.add(len) > MAX_QUEUED_BYTES {
            self.queued.sub(len);
            self.overflow();
            return true;
        }
        self.lp.post(Msg::Push {
            key: self.key,
            serial: self.serial,
            push: p,
            len,
        });
        true
    }
}
