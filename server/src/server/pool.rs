//! A pool: a fixed set of threads. The blocking pool takes the few waits that have
//! no completion callback, so that no event loop ever blocks on them:
//! a group-commit ticket (whose waiter may lead the shared fdatasync) and
//! an `APPEND` with its own fdatasync. `CREATE_CONVERSATION` (several IM
//! steps, one per member past the first record's: minutes for a million)
//! has a pool of its own, so it never holds those up. A job answers
//! through its connection's loop like any other completion.
//!
//! Tickets queue here in arrival order; a thread waiting on the first one
//! leads an fdatasync that covers everything written before it, so the
//! tickets behind it are usually durable by the time they are looked at:
//! one thread keeps up with a whole loop's group commits. The read pool
//! (`--reads pool`) runs `SYNC`, `HISTORY` and `SCAN` off the loops.

use crossbeam_channel::{unbounded, Receiver, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct Pool {
    /// `None` tells one thread to stop (sent once per thread by `close`,
    /// behind every job queued before it).
    tx: Sender<Option<Job>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    pub(crate) fn start(n: usize, name: &str) -> std::io::Result<Pool> {
        let (tx, rx) = unbounded::<Option<Job>>();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rx: Receiver<Option<Job>> = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        while let Ok(Some(job)) = rx.recv() {
                            // A job that panics (a bug) loses its own
                            // work, not the thread: its answer, dropped
                            // unposted, says INTERNAL (`dispatch::Answer`).
                            let run = std::panic::AssertUnwindSafe(job);
                            if std::panic::catch_unwind(run).is_err() {
                                tracing::error!("a pool job panicked");
                            }
                        }
                    })?,
            );
        }
        Ok(Pool {
            tx,
            threads: Mutex::new(threads),
        })
    }

    /// Run `job` on a pool thread (on the caller's once the pool is gone).
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        spawn_on(&self.tx, job);
    }

    /// A handle that queues jobs here from anywhere (a cluster node's
    /// callbacks, which hold no `Shared`).
    pub(crate) fn spawner(&self) -> Spawner {
        Spawner(self.tx.clone())
    }

    /// Finish the queued jobs and stop the threads. A job a [`Spawner`]
    /// queues afterwards runs on its caller's thread once the threads
    /// are gone, and is dropped if it lands behind their stop marks
    /// (only while the server stops, after its loops: nobody waits).
    pub(crate) fn close(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for _ in &threads {
            let _ = self.tx.send(None);
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Queues jobs on a [`Pool`]: [`Pool::spawn`] from a handle.
#[derive(Clone)]
pub(crate) struct Spawner(Sender<Option<Job>>);

impl Spawner {
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        spawn_on(&self.0, job);
    }
}

fn spawn_on(tx: &Sender<Option<Job>>, job: impl FnOnce() + Send + 'static) {
    if let Err(e) = tx.send(Some(Box::new(job))) {
        if let Some(job) = e.into_inner() {
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A job that panics takes neither its thread nor the jobs behind it.
    #[test]
    fn a_panicking_job_leaves_the_pool_running() {
        let pool = Pool::start(1, "test").unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        pool.spawn(|| panic!("a bug in one job"));
        for i in 0..3 {
            let tx = tx.clone();
            // Run on the pool's thread (a pool whose threads died runs
            // jobs on the caller's).
            pool.spawn(move || {
                let name = std::thread::current().name().map(str::to_owned);
                tx.send((i, name)).unwrap()
            });
        }
        let got: Vec<(i32, Option<String>)> = (0..3)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap())
            .collect();
        let on_pool = Some("test-0".to_string());
        assert_eq!(
            got,
            vec![(0, on_pool.clone()), (1, on_pool.clone()), (2, on_pool)]
        );
        pool.close();
    }
}
