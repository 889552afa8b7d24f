//! The synchronisation facade: every primitive the lock-free fan-out code
//! ([`crate::fanout`]) uses comes from here. Under `RUSTFLAGS="--cfg loom"`
//! these are [loom]'s model-checked versions, so the production code, not a
//! copy of it, is what the loom tests explore (tokio's `loom/` pattern).
//!
//! The bounded queue is crossbeam's `ArrayQueue` in production. Under loom it
//! is a mutex around a `VecDeque` with the same capacity semantics: loom cannot
//! see inside crossbeam, so the model treats the queue as what crossbeam
//! guarantees (a linearizable bounded MPMC queue) and checks the protocol built
//! around it (wake-ups, backpressure, close, watermarks).

#[cfg(loom)]
pub(crate) use loom::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
pub(crate) use std::sync::{
    atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    Arc, Condvar, Mutex, MutexGuard,
};

#[cfg(not(loom))]
pub(crate) use crossbeam::queue::ArrayQueue;

/// A memory ordering of the fan-out path, named by its site: exactly
/// `Ordering::$o` in production; under loom, the ordering the mutation test
/// (`fanout::loom_tests::loom_each_ordering_is_needed`) weakens that site to,
/// so it can show which orderings a model needs.
macro_rules! ord {
    ($site:literal, $o:ident) => {
        $crate::sync::ordering($site, $crate::sync::Ordering::$o)
    };
}
pub(crate) use ord;

#[cfg(not(loom))]
#[inline(always)]
pub(crate) fn ordering(_site: &'static str, o: Ordering) -> Ordering {
    o
}

// The site weakened under loom: per test thread (loom runs a model's threads
// on the thread that calls it), so tests running in parallel are not
// affected. The sites reached: std primitives, outside the model.
#[cfg(loom)]
thread_local! {
    static WEAKEN: std::cell::Cell<Option<(&'static str, Ordering)>> = const { std::cell::Cell::new(None) };
}
#[cfg(loom)]
static REACHED: std::sync::Mutex<Vec<(&'static str, Ordering)>> = std::sync::Mutex::new(Vec::new());

#[cfg(loom)]
pub(crate) fn ordering(site: &'static str, o: Ordering) -> Ordering {
    {
        let mut r = REACHED.lock().unwrap_or_else(|e| e.into_inner());
        if !r.iter().any(|(s, _)| *s == site) {
            r.push((site, o));
        }
    }
    match WEAKEN.with(|w| w.get()) {
        Some((s, w)) if s == site => w,
        _ => o,
    }
}

/// Under loom: weaken one site (`None`: none) for the models run next.
#[cfg(loom)]
pub(crate) fn weaken(w: Option<(&'static str, Ordering)>) {
    WEAKEN.with(|c| c.set(w));
}

/// Under loom: every site reached so far, with its production ordering.
#[cfg(loom)]
pub(crate) fn reached() -> Vec<(&'static str, Ordering)> {
    REACHED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Under loom: a bounded FIFO with `ArrayQueue`'s API, built on loom's mutex.
#[cfg(loom)]
pub(crate) struct ArrayQueue<T> {
    q: Mutex<std::collections::VecDeque<T>>,
    cap: usize,
}

#[cfg(loom)]
impl<T> ArrayQueue<T> {
    pub(crate) fn new(cap: usize) -> Self {
        ArrayQueue {
            q: Mutex::new(std::collections::VecDeque::new()),
            cap,
        }
    }
    pub(crate) fn push(&self, t: T) -> Result<(), T> {
        let mut q = self.q.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.cap {
            return Err(t);
        }
        q.push_back(t);
        Ok(())
    }
    pub(crate) fn pop(&self) -> Option<T> {
        self.q.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }
    pub(crate) fn len(&self) -> usize {
        self.q.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Wait on a facade condvar, tolerating poison like [`lock`].
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(|e| e.into_inner())
}

/// Wait on a facade condvar for at most `d`. Under loom it returns at once
/// (a timed wait may always time out early, so callers must already cope
/// with that; loom has no clock to model the wait itself).
#[cfg(not(loom))]
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    d: std::time::Duration,
) -> MutexGuard<'a, T> {
    match cv.wait_timeout(g, d) {
        Ok((g, _)) => g,
        Err(e) => e.into_inner().0,
    }
}

#[cfg(loom)]
pub(crate) fn wait_timeout<'a, T>(
    _cv: &Condvar,
    g: MutexGuard<'a, T>,
    _d: std::time::Duration,
) -> MutexGuard<'a, T> {
    g
}

/// Lock a facade mutex; a poisoned lock (a panicking holder) is still usable
/// here because every critical section in `fanout` leaves its data consistent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
