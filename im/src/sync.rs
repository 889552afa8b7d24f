//! The synchronisation facade: every primitive the lock-free fan-out code
//! ([`crate::fanout`]) uses comes from here. Under `RUSTFLAGS="--cfg loom"`
//! these are [loom]'s model-checked versions, so the production code, not a
//! copy of it, is what the loom tests explore (tokio's `loom/` pattern).
//!
//! That includes the mailboxes' bounded queue ([`crate::fanout::ring`]): it
//! is built here on the facade's atomics and [`UnsafeCell`], so loom checks
//! the hand-off of every item down to the slot it sits in.

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

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// `std`'s `UnsafeCell` behind loom's API (`with_mut`, the one the ring uses), so the code
/// that uses it is the same in production and under the model (where loom
/// checks that no access races another).
#[cfg(not(loom))]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(t: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(t))
    }

    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

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

// The site weakened under loom, named by the environment (`site=Ordering`)
// of a child process the mutation test starts: a weakened model may deadlock
// or fail inside loom's own bookkeeping, which can abort a process, so it
// never runs in the test process itself. The sites reached: std primitives,
// outside the model.
#[cfg(loom)]
pub(crate) const WEAKEN_ENV: &str = "TIMELINE_LOOM_WEAKEN";
#[cfg(loom)]
static WEAKEN: std::sync::OnceLock<Option<(String, Ordering)>> = std::sync::OnceLock::new();
#[cfg(loom)]
static REACHED: std::sync::Mutex<Vec<(&'static str, Ordering)>> = std::sync::Mutex::new(Vec::new());

#[cfg(loom)]
fn weakened() -> &'static Option<(String, Ordering)> {
    WEAKEN.get_or_init(|| {
        let v = std::env::var(WEAKEN_ENV).ok()?;
        let (site, o) = v.split_once('=')?;
        let o = match o {
            "Relaxed" => Ordering::Relaxed,
            "Acquire" => Ordering::Acquire,
            "Release" => Ordering::Release,
            "AcqRel" => Ordering::AcqRel,
            "SeqCst" => Ordering::SeqCst,
            _ => panic!("{WEAKEN_ENV}: unknown ordering {o:?}"),
        };
        Some((site.to_string(), o))
    })
}

#[cfg(loom)]
pub(crate) fn ordering(site: &'static str, o: Ordering) -> Ordering {
    {
        let mut r = REACHED.lock().unwrap_or_else(|e| e.into_inner());
        if !r.iter().any(|(s, _)| *s == site) {
            r.push((site, o));
        }
    }
    match weakened() {
        Some((s, w)) if s == site => *w,
        _ => o,
    }
}

/// Under loom: every site reached so far, with its production ordering.
#[cfg(loom)]
pub(crate) fn reached() -> Vec<(&'static str, Ordering)> {
    REACHED.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
