//! Writes waiting for a partition's next Raft entry.
//!
//! A node proposes each partition's writes of one kind one entry at a
//! time: while an entry is in flight, what arrives gathers here and goes as
//! the next entry (one log write and one replication round for many
//! clients). Three kinds use it: `APPEND`s ([`crate::node`]), conversation
//! writes (`SEND`, create, recall, join or leave: [`crate::node`]) and
//! deliveries to a member partition ([`crate::delivery`]).
//!
//! The caller that queues into an idle partition starts its drain; the
//! drain [`Queues::take`]s an entry's worth at a time until nothing waits,
//! and the same call that finds the queue empty marks it idle, under the
//! same lock, so an item is never left with no drain to take it. A drain
//! holds a [`Draining`] guard: if it unwinds (a callback panicked), the
//! queue is marked idle, so the next push starts another drain instead of
//! waiting forever on a dead one.

use crate::partition::PartitionId;
use parking_lot::Mutex;

struct Slot<T> {
    waiting: Vec<T>,
    proposing: bool,
}

/// Per partition (index = partition id), the items waiting for its next
/// entry.
pub(crate) struct Queues<T> {
    slots: Vec<Mutex<Slot<T>>>,
}

impl<T> Queues<T> {
    pub(crate) fn new(partitions: u32) -> Queues<T> {
        Queues {
            slots: (0..partitions)
                .map(|_| {
                    Mutex::new(Slot {
                        waiting: Vec::new(),
                        proposing: false,
                    })
                })
                .collect(),
        }
    }

    /// Queue `item` for partition `p`: `Ok(true)` if no drain is running
    /// (the caller starts one), `Err(item)` for a partition past the map.
    pub(crate) fn push(&self, p: PartitionId, item: T) -> Result<bool, T> {
        let Some(slot) = self.slots.get(p as usize) else {
            return Err(item);
        };
        let mut s = slot.lock();
        s.waiting.push(item);
        Ok(!std::mem::replace(&mut s.proposing, true))
    }

    /// The guard a drain of `p` holds while it runs.
    pub(crate) fn draining(&self, p: PartitionId) -> Draining<'_, T> {
        Draining { q: self, p }
    }

    /// The next entry's items, oldest first: those for which `fits` holds
    /// in order, at most `most`, and at least one; `None` when nothing
    /// waits (the drain ends, and the next push starts another).
    pub(crate) fn take(
        &self,
        p: PartitionId,
        most: usize,
        mut fits: impl FnMut(&T) -> bool,
    ) -> Option<Vec<T>> {
        let mut s = self.slots.get(p as usize)?.lock();
        if s.waiting.is_empty() {
            s.proposing = false;
            return None;
        }
        let n = s
            .waiting
            .iter()
            .take(most)
            .take_while(|t| fits(t))
            .count()
            .max(1);
        Some(s.waiting.drain(..n).collect())
    }
}

/// See the module docs.
pub(crate) struct Draining<'a, T> {
    q: &'a Queues<T>,
    p: PartitionId,
}

impl<T> Drop for Draining<'_, T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(slot) = self.q.slots.get(self.p as usize) {
                slot.lock().proposing = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_push_starts_a_drain_and_an_empty_take_ends_it() {
        let q = Queues::new(2);
        assert_eq!(q.push(1, 10), Ok(true));
        assert_eq!(q.push(1, 11), Ok(false), "a drain is running");
        assert_eq!(q.push(0, 5), Ok(true), "partitions are independent");
        assert_eq!(q.push(2, 7), Err(7), "no partition 2");
        assert_eq!(q.take(1, 10, |_| true), Some(vec![10, 11]));
        assert_eq!(q.take(1, 10, |_| true), None);
        assert_eq!(q.push(1, 12), Ok(true), "the drain ended");
    }

    #[test]
    fn a_drain_that_panics_leaves_the_queue_to_the_next_push() {
        let q = Queues::new(1);
        assert_eq!(q.push(0, 1), Ok(true));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _d = q.draining(0);
            let _ = q.take(0, 10, |_| true);
            panic!("a callback panicked");
        }));
        assert!(r.is_err());
        assert_eq!(q.push(0, 2), Ok(true), "a new drain starts");
        // A drain that ends normally leaves it to `take`.
        {
            let _d = q.draining(0);
            assert_eq!(q.take(0, 10, |_| true), Some(vec![2]));
        }
        assert_eq!(q.push(0, 3), Ok(false), "still draining: take saw it first");
    }

    #[test]
    fn an_entry_takes_what_fits_and_at_least_one() {
        let q = Queues::new(1);
        for v in [4, 4, 4, 9, 1] {
            let _ = q.push(0, v);
        }
        let mut used = 0;
        let budget = |used: &mut i32, v: &i32| {
            *used += v;
            *used <= 8
        };
        assert_eq!(q.take(0, 10, |v| budget(&mut used, v)), Some(vec![4, 4]));
        used = 0;
        assert_eq!(q.take(0, 1, |v| budget(&mut used, v)), Some(vec![4]));
        used = 0;
        assert_eq!(
            q.take(0, 10, |v| budget(&mut used, v)),
            Some(vec![9]),
            "one item alone goes even past the budget"
        );
        assert_eq!(q.take(0, 10, |_| false), Some(vec![1]));
        assert_eq!(q.take(0, 10, |_| true), None);
    }
}
