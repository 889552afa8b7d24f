//! Marks that readers and recovery trust.
//!
//! * [`Watermark`]: "everything up to here is durable and may be shown". A
//!   writer publishes it only after the data below it is durable; a reader
//!   that loads it may read every record at or below it.
//! * [`Latch`]: the last of N parties to finish a piece of work learns that
//!   it is the last (a fan-out batch is done when every shard it touched has
//!   made its deliveries durable).
//! * [`CompletionWindow`]: batches numbered 1, 2, 3, ... finish out of order;
//!   the window reports the highest `n` with every batch `<= n` finished.
//!   Recovery restarts fan-out after that mark.

use crate::sync::{ord, AtomicU64, AtomicUsize};

/// A monotone "visible through" mark.
#[derive(Debug, Default)]
pub(crate) struct Watermark(AtomicU64);

impl Watermark {
    pub(crate) fn new(v: u64) -> Self {
        Watermark(AtomicU64::new(v))
    }
    /// Raise the mark to `v` (never lowers it). Release: every write the
    /// publisher made before this call (the engine append of the records,
    /// their fdatasync) happens-before a reader's `get` that returns `>= v`.
    pub(crate) fn publish(&self, v: u64) {
        self.0.fetch_max(v, ord!("watermark.publish", Release));
    }
    /// Acquire: pairs with `publish`.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(ord!("watermark.get", Acquire))
    }
}

/// A countdown of `n` arrivals; exactly one `arrive` returns `true`.
#[derive(Debug)]
pub(crate) struct Latch(AtomicUsize);

impl Latch {
    pub(crate) fn new(n: usize) -> Self {
        Latch(AtomicUsize::new(n))
    }
    /// AcqRel: the last arriver acquires every earlier arriver's writes (its
    /// deliveries and their watermarks) before it acknowledges the batch.
    pub(crate) fn arrive(&self) -> bool {
        self.0.fetch_sub(1, ord!("latch.arrive", AcqRel)) == 1
    }
}

/// Bits of the window word that hold finished-but-not-contiguous batches.
pub(crate) const WINDOW: u64 = 24;
/// Batch numbers must stay below this (the `done` field's 40 bits, less a
/// window).
pub(crate) const MAX_BATCH: u64 = (1 << (64 - WINDOW)) - WINDOW - 1;
const MASK: u64 = (1 << WINDOW) - 1;

/// Out-of-order completion of numbered batches, as one atomic word:
/// `done << 24 | bitmap`, where bit `i` of the bitmap means batch
/// `done + 1 + i` finished. One CAS updates both, so two completers can never
/// each leave the other's batch behind (the lost-advance race of a separate
/// flag array and counter). The owner starts batch `n` only while
/// `n <= done + WINDOW` ([`has_room`](Self::has_room)).
#[derive(Debug)]
pub(crate) struct CompletionWindow(AtomicU64);

impl CompletionWindow {
    /// All batches `<= done` are finished.
    pub(crate) fn new(done: u64) -> Self {
        CompletionWindow(AtomicU64::new(done << WINDOW))
    }

    /// The highest `n` with every batch `<= n` finished.
    pub(crate) fn done(&self) -> u64 {
        self.0.load(ord!("window.done", Acquire)) >> WINDOW
    }

    /// May batch `n` be started?
    pub(crate) fn has_room(&self, n: u64) -> bool {
        n <= self.done() + WINDOW
    }

    /// Mark batch `n` finished; returns the new contiguous mark.
    pub(crate) fn complete(&self, n: u64) -> u64 {
        let mut cur = self.0.load(ord!("window.complete.load", Acquire));
        loop {
            let done = cur >> WINDOW;
            if n <= done {
                return done; // finished twice (recovery re-drives): no-op
            }
            let off = n - done - 1;
            assert!(
                off < WINDOW,
                "batch {n} started beyond the window (done {done})"
            );
            let mut bits = (cur & MASK) | (1 << off);
            let mut d = done;
            while bits & 1 == 1 {
                bits >>= 1;
                d += 1;
            }
            let next = (d << WINDOW) | bits;
            match self.0.compare_exchange_weak(
                cur,
                next,
                ord!("window.complete.cas", AcqRel),
                ord!("window.complete.cas.fail", Acquire),
            ) {
                Ok(_) => return d,
                Err(x) => cur = x,
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn window_advances_over_out_of_order_completions() {
        let w = CompletionWindow::new(10);
        assert_eq!(w.complete(12), 10);
        assert_eq!(w.complete(13), 10);
        assert!(w.has_room(34) && !w.has_room(35));
        assert_eq!(w.complete(11), 13);
        assert_eq!(w.complete(11), 13);
        assert_eq!(w.done(), 13);
    }

    #[test]
    fn latch_has_one_last_arriver() {
        let l = Latch::new(3);
        assert_eq!([l.arrive(), l.arrive(), l.arrive()], [false, false, true]);
    }
}
