//! Push subscriptions for online devices. Push is an optimisation: a
//! subscriber that falls behind is told to resync from its checkpoint
//! instead of slowing senders or growing memory.

use crate::{Entry, SyncEntry, UserId};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use hashbrown::HashMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A new, durable entry of the user's sync timeline.
    Entry { user: UserId, entry: SyncEntry },
    /// A new, durable entry of one of the user's read-fan-out groups.
    Group { user: UserId, entry: Entry },
    /// Pushes were dropped because this subscriber fell behind: sync from
    /// the device's checkpoint.
    Resync,
}

/// Where a subscription's pushes go. The IM worker that makes an entry
/// durable calls [`push`](PushSink::push) on its own thread, so an
/// implementation must be short and must never block: queue the push for
/// its consumer and wake it (the server's event loops do exactly that: one
/// cross-thread step from the worker to the connection).
pub trait PushSink: Send + Sync {
    /// Offer one push. Return `false` once the subscriber is gone (the
    /// registry then forgets it); a subscriber without room drops the push
    /// and owes its device a [`Push::Resync`], but stays subscribed.
    fn push(&self, p: Push) -> bool;

    /// Gone for good (unsubscribed, connection closed): the registry drops
    /// it at the next registration for the same user, at the next push,
    /// or when its owner calls [`crate::Im::release_sinks`] after closing
    /// it, so subscribing and unsubscribing quiet users does not grow it.
    fn is_closed(&self) -> bool {
        false
    }
}

#[derive(Default)]
struct Slot {
    overflowed: AtomicBool,
    closed: AtomicBool,
}

/// The channel-backed sink behind [`Subscription`].
struct ChannelSink {
    tx: Sender<Push>,
    slot: Arc<Slot>,
}

impl PushSink for ChannelSink {
    fn is_closed(&self) -> bool {
        self.slot.closed.load(Ordering::Acquire)
    }

    fn push(&self, p: Push) -> bool {
        if self.slot.closed.load(Ordering::Acquire) {
            return false;
        }
        if self.slot.overflowed.load(Ordering::Acquire) {
            return true;
        }
        match self.tx.try_send(p) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.slot.overflowed.store(true, Ordering::Release);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// A subscriber's end of a channel subscription (blocking consumers,
/// tests, the in-process bench). Dropping it unsubscribes.
pub struct Subscription {
    rx: Receiver<Push>,
    slot: Arc<Slot>,
}

impl Subscription {
    /// The next push, waiting up to `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Push> {
        if let Some(p) = self.try_recv() {
            return Some(p);
        }
        match self.rx.recv_timeout(timeout) {
            Ok(p) => Some(p),
            Err(_) => self.try_recv(),
        }
    }

    /// The next push if one is waiting.
    pub fn try_recv(&self) -> Option<Push> {
        if let Ok(p) = self.rx.try_recv() {
            return Some(p);
        }
        // Queue drained: report the overflow (after everything queued
        // before it) and resume pushes.
        if self.slot.overflowed.swap(false, Ordering::AcqRel) {
            return Some(Push::Resync);
        }
        None
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.slot.closed.store(true, Ordering::Release);
    }
}

type Subs = HashMap<UserId, Vec<Arc<dyn PushSink>>>;

pub(crate) struct Subscribers {
    shards: Vec<Mutex<Subs>>,
    /// Registered sinks (a gone one counts until released, or its user's
    /// next push or subscription).
    count: AtomicUsize,
    capacity: usize,
}

impl Subscribers {
    pub(crate) fn new(shards: usize, capacity: usize) -> Self {
        Subscribers {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            count: AtomicUsize::new(0),
            capacity,
        }
    }

    /// A channel subscription holding up to `subscriber_capacity` pushes.
    pub(crate) fn subscribe(&self, user: UserId, shard: usize) -> Subscription {
        let (tx, rx) = crossbeam_channel::bounded(self.capacity);
        let slot = Arc::new(Slot::default());
        self.register(
            user,
            shard,
            Arc::new(ChannelSink {
                tx,
                slot: slot.clone(),
            }),
        );
        Subscription { rx, slot }
    }

    pub(crate) fn register(&self, user: UserId, shard: usize, sink: Arc<dyn PushSink>) {
        self.count.fetch_add(1, Ordering::AcqRel);
        let mut g = self.shards[shard].lock();
        let list = g.entry(user).or_default();
        let before = list.len();
        list.retain(|s| !s.is_closed());
        self.count.fetch_sub(before - list.len(), Ordering::AcqRel);
        list.push(sink);
    }

    /// Drop `user`'s closed sinks now (its last one gone: the user too),
    /// rather than at its next push or subscription, which may never come.
    pub(crate) fn release(&self, shard: usize, user: UserId) {
        let mut g = self.shards[shard].lock();
        let Some(list) = g.get_mut(&user) else {
            return;
        };
        let before = list.len();
        list.retain(|s| !s.is_closed());
        self.count.fetch_sub(before - list.len(), Ordering::AcqRel);
        if list.is_empty() {
            g.remove(&user);
        }
    }

    /// The users with a registered sink (a gone one counts until
    /// released, or its user's next push or subscription).
    pub(crate) fn users(&self) -> Vec<UserId> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().keys().copied().collect::<Vec<_>>())
            .collect()
    }

    /// Does `user` have a registered sink now?
    pub(crate) fn has(&self, shard: usize, user: UserId) -> bool {
        self.shards[shard].lock().contains_key(&user)
    }

    /// Any registered sink at all (skips building pushes otherwise).
    pub(crate) fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Offer `make()` to every sink of `user`; never blocks. Whether the
    /// user still has a sink.
    pub(crate) fn push(&self, shard: usize, user: UserId, make: impl Fn() -> Push) -> bool {
        let mut g = self.shards[shard].lock();
        let Some(list) = g.get_mut(&user) else {
            return false;
        };
        let before = list.len();
        list.retain(|sink| sink.push(make()));
        self.count.fetch_sub(before - list.len(), Ordering::AcqRel);
        if list.is_empty() {
            g.remove(&user);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Default)]
    struct Sink(AtomicBool);

    impl PushSink for Sink {
        fn push(&self, _: Push) -> bool {
            !self.0.load(Ordering::Acquire)
        }
        fn is_closed(&self) -> bool {
            self.0.load(Ordering::Acquire)
        }
    }

    /// Quiet users subscribed and unsubscribed one after another (each a
    /// new user, none ever pushed to) leave nothing behind once released;
    /// a user's open sink stays.
    #[test]
    fn released_users_leave_nothing_behind() {
        let subs = Subscribers::new(4, 8);
        let kept = Arc::new(Sink::default());
        subs.register(7, 7 % 4, kept.clone());
        for user in 100..10_100u64 {
            let sink = Arc::new(Sink::default());
            subs.register(user, (user % 4) as usize, sink.clone());
            sink.0.store(true, Ordering::Release);
            subs.release((user % 4) as usize, user);
        }
        let closed_too = Arc::new(Sink::default());
        subs.register(7, 7 % 4, closed_too.clone());
        closed_too.0.store(true, Ordering::Release);
        subs.release(7 % 4, 7);
        assert_eq!(subs.users(), vec![7]);
        assert_eq!(subs.count.load(Ordering::Acquire), 1);
        kept.0.store(true, Ordering::Release);
        subs.release(7 % 4, 7);
        assert!(subs.users().is_empty());
        assert!(!subs.any());
    }
}
