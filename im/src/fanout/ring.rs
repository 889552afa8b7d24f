//! The bounded queue under every [`Mailbox`](super::mailbox::Mailbox): a
//! fixed ring of slots, each with a stamp that says whose turn the slot is
//! (Dmitry Vyukov's bounded MPMC queue, the design crossbeam's `ArrayQueue`
//! also follows).
//!
//! It is ours rather than crossbeam's for one reason: it is built on the
//! [`crate::sync`] facade, so under loom the model checks its atomics and its
//! slot accesses (a read of a slot that does not happen-after the write is a
//! loom failure), and the mutation test can weaken its orderings too. With
//! crossbeam's queue, loom had to treat the hand-off as a mutex and could not
//! see a weakened ordering on either side of it.
//!
//! Positions are unbounded counters (`tail` for the next push, `head` for the
//! next pop); position `p` lives in slot `p % cap`. A slot's stamp is:
//! * `2p`: empty, ready for the push at position `p`;
//! * `2p + 1`: holding the item pushed at `p`, ready for the pop at `p`;
//! * (after that pop) `2(p + cap)`: empty, ready for the push one lap later.
//!
//! (Vyukov's original stamps `p` and `p + 1` cannot tell "full" from "free
//! for the next push" when the capacity is 1; doubling can, for every
//! capacity, which the mailboxes need: a capacity of 1 is how the server's
//! backpressure test fills a worker.)
//!
//! A push claims its position with a CAS on `tail`, writes the slot, then
//! publishes it with a `Release` store of the stamp; a pop sees it with an
//! `Acquire` load of the stamp, claims with a CAS on `head`, moves the item
//! out, and frees the slot with a `Release` store. The CASes only arbitrate
//! between producers (or consumers): the stamps carry every happens-before
//! edge, so the CASes can be `Relaxed`.
//!
//! Like crossbeam's queue, it can report `Full` while the pop that frees the
//! slot is still under way, and `None` while an earlier push is still
//! writing its slot: each producer notifies the consumer after its own
//! publish, and each consumer calls `made_room` after its pops, so the
//! mailbox's protocol never sleeps on such a transient answer.
//!
//! Positions wrap after 2^64 pushes (stamps, doubled, at 2^63; centuries at
//! a billion per second): with a capacity that is not a power of two,
//! `pos % cap` jumps at the wrap, which is the only bound on a ring's life.

use crate::sync::{ord, AtomicUsize, Ordering, UnsafeCell};
use crossbeam::utils::CachePadded;
use std::mem::MaybeUninit;

struct Slot<T> {
    stamp: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

pub(crate) struct Ring<T> {
    /// The position of the next push.
    tail: CachePadded<AtomicUsize>,
    /// The position of the next pop.
    head: CachePadded<AtomicUsize>,
    slots: Box<[Slot<T>]>,
}

// SAFETY: a `Ring` moves `T`s between threads (hence `T: Send`) and never
// hands out a reference to one. Each slot's value is accessed by exactly one
// thread at a time: the one whose CAS claimed the slot's position, between
// the stamp it observed (Acquire) and the stamp it stores (Release).
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for Ring<T> {}
// SAFETY: as for `Send`: shared access goes through the stamp protocol.
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for Ring<T> {}

impl<T> Ring<T> {
    /// A ring holding at most `cap` items (at least 1).
    pub(crate) fn new(cap: usize) -> Self {
        let slots = (0..cap.max(1))
            .map(|i| Slot {
                stamp: AtomicUsize::new(empty(i)),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Ring {
            tail: CachePadded::new(AtomicUsize::new(0)),
            head: CachePadded::new(AtomicUsize::new(0)),
            slots,
        }
    }

    fn slot(&self, pos: usize) -> &Slot<T> {
        &self.slots[pos % self.slots.len()]
    }

    /// Claim the next position of `cursor` (`tail` or `head`) whose slot is
    /// stamped `ready(pos)`, loading stamps with `load`. `None` when that
    /// slot is still a lap behind: full for a push, empty for a pop.
    fn claim(
        &self,
        cursor: &AtomicUsize,
        ready: impl Fn(usize) -> usize,
        load: Ordering,
    ) -> Option<(usize, &Slot<T>)> {
        let mut pos = cursor.load(Ordering::Relaxed);
        loop {
            let slot = self.slot(pos);
            let stamp = slot.stamp.load(load);
            let want = ready(pos);
            if stamp == want {
                match cursor.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Some((pos, slot)),
                    Err(now) => pos = now,
                }
            } else if before(stamp, want) {
                return None;
            } else {
                // Another thread took `pos`: go on from the current cursor.
                pos = cursor.load(Ordering::Relaxed);
            }
        }
    }

    /// Push `t`, or hand it back if the ring is full.
    pub(crate) fn push(&self, t: T) -> Result<(), T> {
        // Acquire: the pop that freed the slot (a lap ago) has finished
        // moving its item out before we overwrite it.
        let Some((pos, slot)) = self.claim(&self.tail, empty, ord!("ring.push.stamp", Acquire))
        else {
            return Err(t); // the slot still holds the item of one lap ago
        };
        // SAFETY: our CAS claimed position `pos`, and its stamp says the slot
        // is empty: no other thread reads or writes it until we store the
        // next stamp.
        #[allow(unsafe_code)]
        slot.value.with_mut(|p| unsafe { (*p).write(t) });
        // Release: the write above happens-before the pop that acquires this
        // stamp.
        slot.stamp
            .store(empty(pos) | 1, ord!("ring.push.publish", Release));
        Ok(())
    }

    /// Take the oldest item, if any (`None` also while the push at the head
    /// is still writing its slot).
    pub(crate) fn pop(&self) -> Option<T> {
        // Acquire: the push's write of the slot happens-before our read.
        let (pos, slot) = self.claim(
            &self.head,
            |p| empty(p) | 1,
            ord!("ring.pop.stamp", Acquire),
        )?;
        // SAFETY: our CAS claimed position `pos`, and its stamp says the push
        // into it has published: the slot holds an initialised item that
        // only we take.
        #[allow(unsafe_code)]
        let t = slot.value.with_mut(|p| unsafe { (*p).assume_init_read() });
        // Release: our move out happens-before the push that reuses the slot
        // one lap later.
        slot.stamp.store(
            empty(pos.wrapping_add(self.slots.len())),
            ord!("ring.pop.free", Release),
        );
        Some(t)
    }

    /// The number of items claimed and not yet popped (an item still being
    /// written counts). Exact for the consumer when producers are quiet;
    /// otherwise a snapshot.
    pub(crate) fn len(&self) -> usize {
        let head = self.head.load(Ordering::SeqCst);
        let tail = self.tail.load(Ordering::SeqCst);
        tail.wrapping_sub(head).min(self.slots.len())
    }
}

/// The stamp of a slot free for the push at `pos`.
fn empty(pos: usize) -> usize {
    pos.wrapping_mul(2)
}

/// Whether stamp `a` comes before stamp `b` (modulo the wrap).
fn before(a: usize, b: usize) -> bool {
    (a.wrapping_sub(b) as isize) < 0
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // Under loom, a model that failed unwinds through this drop with the
        // model's state already torn down; touching the cells again would
        // panic inside the panic and abort the mutation test. Leak instead.
        #[cfg(loom)]
        if std::thread::panicking() {
            return;
        }
        while self.pop().is_some() {}
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Ring;
    use std::sync::Arc;

    #[test]
    fn fifo_up_to_capacity_then_full() {
        for cap in [1usize, 2, 3, 7] {
            let r = Ring::new(cap);
            for lap in 0..5 {
                for i in 0..cap {
                    assert_eq!(r.push(lap * 100 + i), Ok(()));
                }
                assert_eq!(r.push(9999), Err(9999), "cap {cap}: full");
                assert_eq!(r.len(), cap);
                for i in 0..cap {
                    assert_eq!(r.pop(), Some(lap * 100 + i));
                }
                assert_eq!(r.pop(), None);
                assert_eq!(r.len(), 0);
            }
        }
    }

    #[test]
    fn capacity_zero_means_one() {
        let r = Ring::new(0);
        assert_eq!(r.push(1), Ok(()));
        assert_eq!(r.push(2), Err(2));
    }

    #[test]
    fn drop_drops_the_items_left() {
        let item = Arc::new(());
        let r = Ring::new(4);
        for _ in 0..3 {
            r.push(item.clone()).unwrap();
        }
        drop(r.pop());
        assert_eq!(Arc::strong_count(&item), 3);
        drop(r);
        assert_eq!(Arc::strong_count(&item), 1);
    }

    #[test]
    fn many_producers_one_consumer_lose_and_reorder_nothing() {
        const PRODUCERS: usize = 4;
        const EACH: usize = 50_000;
        let r = Arc::new(Ring::new(8));
        let hs: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let mut v = Box::new((p, i));
                        while let Err(x) = r.push(v) {
                            v = x;
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut next = [0usize; PRODUCERS];
        let mut got = 0;
        while got < PRODUCERS * EACH {
            match r.pop() {
                Some(b) => {
                    let (p, i) = *b;
                    assert_eq!(i, next[p], "producer {p}'s items in order");
                    next[p] += 1;
                    got += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(r.pop(), None);
    }
}
