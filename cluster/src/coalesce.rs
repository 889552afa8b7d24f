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
//! same lock, so an item is never left with no drain to take it.

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
