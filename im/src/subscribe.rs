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

#[derive(Default)]
struct Slot {
    overflowed: AtomicBool,
    closed: AtomicBool,
}

/// A subscriber's end. Dropping it unsubscribes.
pub struct Subscription {
    rx: Receiver<Push>,
    slot: Arc<Slot>,
    count: Arc<AtomicUsize>,
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
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

type Subs = HashMap<UserId, Vec<(Sender<Push>, Arc<Slot>)>>;

pub(crate) struct Subscribers {
    shards: Vec<Mutex<Subs>>,
    count: Arc<AtomicUsize>,
    capacity: usize,
}

impl Subscribers {
    pub(crate) fn new(shards: usize, capacity: usize) -> Self {
        Subscribers {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            count: Arc::new(AtomicUsize::new(0)),
            capacity,
        }
    }

    pub(crate) fn subscribe(&self, user: UserId, shard: usize) -> Subscription {
        let (tx, rx) = crossbeam_channel::bounded(self.capacity);
        let slot = Arc::new(Slot::default());
        self.count.fetch_add(1, Ordering::AcqRel);
        self.shards[shard]
            .lock()
            .entry(user)
            .or_default()
            .push((tx, slot.clone()));
        Subscription {
            rx,
            slot,
            count: self.count.clone(),
        }
    }

    /// Any live subscription at all (skips building pushes otherwise).
    pub(crate) fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Offer `make()` to every subscription of `user`; never blocks.
    pub(crate) fn push(&self, shard: usize, user: UserId, make: impl Fn() -> Push) {
        let mut g = self.shards[shard].lock();
        let Some(list) = g.get_mut(&user) else {
            return;
        };
        list.retain(|(tx, slot)| {
            if slot.closed.load(Ordering::Acquire) {
                return false;
            }
            if slot.overflowed.load(Ordering::Acquire) {
                return true;
            }
            match tx.try_send(make()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    slot.overflowed.store(true, Ordering::Release);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        if list.is_empty() {
            g.remove(&user);
        }
    }
}
