//! The completion handle of a request handed to a worker: a one-shot slot
//! that the worker fills once. The caller either blocks on it
//! ([`Pending::wait`]), checks it ([`Pending::try_wait`]), or leaves a
//! callback ([`Pending::on_ready`]) that the worker runs when it answers, so
//! an event loop keeps thousands of requests in flight without a thread
//! parked on any of them.
//!
//! A [`Reply`] dropped unanswered (a worker that stopped) answers
//! `ImError::Closed`, so no waiter and no callback is ever left hanging.

use crate::error::{ImError, Result};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

type Callback<T> = Box<dyn FnOnce(Result<T>) + Send>;

enum State<T> {
    /// Nobody has answered and nobody left a callback.
    Empty,
    /// The caller left a callback: the answer goes straight to it.
    Callback(Callback<T>),
    /// Answered, not taken yet.
    Ready(Result<T>),
    /// Taken (by `try_wait`) or handed to the callback.
    Taken,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    cv: Condvar,
}

/// The worker's end: answer once with [`send`](Reply::send).
pub(crate) struct Reply<T>(Option<Arc<Slot<T>>>);

/// A request handed to a worker; [`wait`](Pending::wait) for its answer, or
/// [`on_ready`](Pending::on_ready) to be called with it.
#[must_use = "the request is not acknowledged until waited on"]
pub struct Pending<T>(Arc<Slot<T>>);

pub(crate) fn pending<T>() -> (Reply<T>, Pending<T>) {
    let slot = Arc::new(Slot {
        state: Mutex::new(State::Empty),
        cv: Condvar::new(),
    });
    (Reply(Some(slot.clone())), Pending(slot))
}

impl<T> Reply<T> {
    /// Answer the request (runs the caller's callback, if it left one, on
    /// this thread: callbacks must be short and must not block).
    pub(crate) fn send(mut self, r: Result<T>) {
        if let Some(slot) = self.0.take() {
            slot.answer(r);
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.answer(Err(ImError::Closed));
        }
    }
}

impl<T> Slot<T> {
    fn answer(&self, r: Result<T>) {
        let mut st = self.state.lock();
        match std::mem::replace(&mut *st, State::Taken) {
            State::Callback(f) => {
                drop(st);
                f(r);
            }
            State::Empty => {
                *st = State::Ready(r);
                self.cv.notify_all();
            }
            // Answered twice cannot happen (`send` takes the reply); a
            // taken slot has nobody left to tell.
            old @ (State::Ready(_) | State::Taken) => *st = old,
        }
    }
}

impl<T> Pending<T> {
    /// Block until the answer is there.
    pub fn wait(self) -> Result<T> {
        let mut st = self.0.state.lock();
        loop {
            match std::mem::replace(&mut *st, State::Taken) {
                State::Ready(r) => return r,
                State::Empty => {
                    *st = State::Empty;
                    self.0.cv.wait(&mut st);
                }
                // `wait` takes the handle, so neither a callback nor an
                // earlier `try_wait` answer can be there; say so plainly.
                State::Callback(_) | State::Taken => return Err(ImError::Closed),
            }
        }
    }

    /// The answer if it is there (it is handed out once).
    pub fn try_wait(&self) -> Option<Result<T>> {
        let mut st = self.0.state.lock();
        match std::mem::replace(&mut *st, State::Taken) {
            State::Ready(r) => Some(r),
            other => {
                *st = other;
                None
            }
        }
    }

    /// True once the answer is there (`wait` will not block).
    pub fn is_ready(&self) -> bool {
        matches!(*self.0.state.lock(), State::Ready(_))
    }

    /// Call `f` with the answer: at once on this thread if it is there,
    /// else on the worker's thread when it answers (keep `f` short and
    /// non-blocking: queue the answer somewhere and wake its owner).
    pub fn on_ready(self, f: impl FnOnce(Result<T>) + Send + 'static) {
        let mut st = self.0.state.lock();
        match std::mem::replace(&mut *st, State::Taken) {
            State::Ready(r) => {
                drop(st);
                f(r);
            }
            State::Empty => *st = State::Callback(Box::new(f)),
            State::Callback(_) | State::Taken => {
                drop(st);
                f(Err(ImError::Closed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn wait_gets_the_answer_sent_from_another_thread() {
        let (tx, rx) = pending::<u64>();
        let t = std::thread::spawn(move || tx.send(Ok(7)));
        assert_eq!(rx.wait().ok(), Some(7));
        t.join().expect("sender");
    }

    #[test]
    fn callback_runs_once_whether_left_before_or_after_the_answer() {
        let (c, r) = mpsc::channel();
        let (tx, rx) = pending::<u64>();
        let c1 = c.clone();
        rx.on_ready(move |r| c1.send(r.ok()).expect("chan"));
        tx.send(Ok(1));
        let (tx, rx) = pending::<u64>();
        tx.send(Ok(2));
        assert!(rx.is_ready());
        rx.on_ready(move |r| c.send(r.ok()).expect("chan"));
        let got: Vec<_> = r.iter().collect();
        assert_eq!(got, vec![Some(1), Some(2)]);
    }

    #[test]
    fn a_dropped_reply_answers_closed() {
        let (tx, rx) = pending::<u64>();
        drop(tx);
        assert!(matches!(rx.wait(), Err(ImError::Closed)));
        let (c, r) = mpsc::channel();
        let (tx, rx) = pending::<u64>();
        rx.on_ready(move |r| c.send(matches!(r, Err(ImError::Closed))).expect("chan"));
        drop(tx);
        assert_eq!(r.recv().ok(), Some(true));
    }

    #[test]
    fn try_wait_hands_the_answer_out_once() {
        let (tx, rx) = pending::<u64>();
        assert!(rx.try_wait().is_none());
        tx.send(Ok(3));
        assert_eq!(rx.try_wait().and_then(|r| r.ok()), Some(3));
        assert!(rx.try_wait().is_none());
    }
}
