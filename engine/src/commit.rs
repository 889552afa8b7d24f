//! Group commit for one shard: leader/follower over fdatasync.
//!
//! Appenders write their bytes (pwrite) under the shard's writer lock and
//! learn the shard LSN (a byte count over all of the shard's segments) at the
//! end of their bytes. To make them durable they call [`Commit::wait`]: the
//! first one in becomes the leader, snapshots (file, written LSN), runs one
//! fdatasync outside every lock, publishes the LSN as synced and wakes the
//! followers; everyone whose LSN that covers returns. So concurrent appenders,
//! and appends kept in flight through tickets, share one sync.

use crate::io::IoFile;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
struct SyncState {
    syncing: bool,
    /// A failed fdatasync poisons the shard: after one, the kernel may have
    /// dropped dirty pages, so no later sync can vouch for earlier writes.
    failed: Option<String>,
}

#[derive(Debug)]
pub struct Commit {
    /// The file that holds the newest bytes, and the LSN just past them.
    current: Mutex<(Arc<dyn IoFile>, u64)>,
    synced: AtomicU64,
    state: Mutex<SyncState>,
    cv: Condvar,
    syncs: AtomicU64,
}

impl Commit {
    pub fn new(file: Arc<dyn IoFile>, lsn: u64) -> Self {
        Commit {
            current: Mutex::new((file, lsn)),
            synced: AtomicU64::new(lsn),
            state: Mutex::new(SyncState {
                syncing: false,
                failed: None,
            }),
            cv: Condvar::new(),
            syncs: AtomicU64::new(0),
        }
    }

    /// Record that bytes up to `lsn` have been written to `file` (the writer
    /// calls this after each pwrite, holding the shard writer lock).
    pub fn written(&self, file: &Arc<dyn IoFile>, lsn: u64) {
        let mut c = self.current.lock();
        if !Arc::ptr_eq(&c.0, file) {
            c.0 = file.clone();
        }
        c.1 = lsn;
    }

    /// The file holding the newest bytes and the LSN just past them.
    pub fn current(&self) -> (Arc<dyn IoFile>, u64) {
        let c = self.current.lock();
        (c.0.clone(), c.1)
    }

    /// Everything up to `lsn` is durable (a roll synced the old file, or an
    /// append did its own sync).
    pub fn mark_synced(&self, lsn: u64) {
        self.synced.fetch_max(lsn, Ordering::AcqRel);
        let _g = self.state.lock();
        self.cv.notify_all();
    }

    /// Count an fdatasync issued outside `wait` (own-sync appends, rolls).
    pub fn count_sync(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn mark_failed(&self, why: String) {
        let mut st = self.state.lock();
        st.failed.get_or_insert(why);
        self.cv.notify_all();
    }

    pub fn failure(&self) -> Option<String> {
        self.state.lock().failed.clone()
    }

    pub fn is_synced(&self, lsn: u64) -> bool {
        self.synced.load(Ordering::Acquire) >= lsn
    }

    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Block until everything up to `lsn` is durable, leading a sync if
    /// nobody is. `Err` carries the reason the shard is poisoned.
    pub fn wait(&self, lsn: u64) -> Result<(), String> {
        loop {
            if self.is_synced(lsn) {
                return Ok(());
            }
            let mut st = self.state.lock();
            if self.is_synced(lsn) {
                return Ok(());
            }
            if let Some(f) = &st.failed {
                return Err(f.clone());
            }
            if st.syncing {
                self.cv.wait(&mut st);
                continue;
            }
            st.syncing = true;
            drop(st);
            let (file, target) = {
                let c = self.current.lock();
                (c.0.clone(), c.1)
            };
            let r = file.sync_data();
            self.syncs.fetch_add(1, Ordering::Relaxed);
            let mut st = self.state.lock();
            st.syncing = false;
            match r {
                Ok(()) => {
                    self.synced.fetch_max(target, Ordering::AcqRel);
                }
                Err(e) => {
                    st.failed.get_or_insert(format!("fdatasync failed: {e}"));
                }
            }
            self.cv.notify_all();
        }
    }
}
