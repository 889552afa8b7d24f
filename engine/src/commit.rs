//! Group commit for one shard: leader/follower over fdatasync.
//!
//! Appenders write their bytes (pwrite) under the shard's writer lock and
//! learn the shard LSN (a byte count over all of the shard's segments) at the
//! end of their bytes. To make them durable they call [`Commit::wait`]: the
//! first one in becomes the leader, snapshots (file, written LSN), runs one
//! fdatasync outside every lock, publishes the LSN as synced and wakes the
//! followers; everyone whose LSN that covers returns. So concurrent appenders,
//! and appends kept in flight through tickets, share one sync.
//!
//! A segment roll does not sync the old file on the append path (a 64 MiB
//! fdatasync there was the append path's p999): the old file is *retired*
//! with its end LSN, and the next sync covers it too, all files in one
//! `Io::sync_many` (one io_uring submission).

use crate::io::{Io, IoFile};
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
struct Files {
    /// The file that holds the newest bytes, and the LSN just past them.
    current: Arc<dyn IoFile>,
    lsn: u64,
    /// Older files of the shard with bytes not yet covered by a sync, and
    /// the LSN just past their last byte.
    retired: Vec<(Arc<dyn IoFile>, u64)>,
}

#[derive(Debug)]
pub struct Commit {
    io: Arc<dyn Io>,
    files: Mutex<Files>,
    synced: AtomicU64,
    state: Mutex<SyncState>,
    cv: Condvar,
    syncs: AtomicU64,
}

impl Commit {
    pub fn new(io: Arc<dyn Io>, file: Arc<dyn IoFile>, lsn: u64) -> Self {
        Commit {
            io,
            files: Mutex::new(Files {
                current: file,
                lsn,
                retired: Vec::new(),
            }),
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
    /// calls this after each pwrite and after a roll, holding the shard
    /// writer lock). A new file retires the old one until a sync covers it.
    pub fn written(&self, file: &Arc<dyn IoFile>, lsn: u64) {
        let mut f = self.files.lock();
        if !Arc::ptr_eq(&f.current, file) {
            let old = std::mem::replace(&mut f.current, file.clone());
            if !self.is_synced(f.lsn) {
                let end = f.lsn;
                f.retired.push((old, end));
            }
        }
        f.lsn = lsn;
    }

    /// Every file with bytes a sync must cover, and the LSN it then covers.
    pub fn pending(&self) -> (Vec<Arc<dyn IoFile>>, u64) {
        let f = self.files.lock();
        let mut v: Vec<Arc<dyn IoFile>> = f.retired.iter().map(|(x, _)| x.clone()).collect();
        v.push(f.current.clone());
        let target = f.retired.iter().map(|(_, end)| *end).fold(f.lsn, u64::max);
        (v, target)
    }

    /// Log files recovery kept (full or not yet sealed) whose bytes may
    /// still be only in the page cache (a kill -9 does not flush them): the
    /// first sync must cover them too, or an append acknowledged on top of
    /// them could outlive them in a power cut.
    pub fn retire_recovered(&self, files: Vec<Arc<dyn IoFile>>) {
        let mut f = self.files.lock();
        // End just past the current LSN: not yet synced, and covered by the
        // next sync whatever it covers.
        let end = f.lsn + 1;
        f.retired.extend(files.into_iter().map(|x| (x, end)));
    }

    /// fdatasync retired files (before an own-sync append may claim its LSN).
    pub fn sync_retired(&self) -> std::io::Result<()> {
        let (files, _) = self.pending();
        if files.len() > 1 {
            let retired = &files[..files.len() - 1];
            self.io.sync_many(retired)?;
            self.count_sync();
        }
        Ok(())
    }

    /// Everything up to `lsn` is durable (a roll synced the old file, or an
    /// append did its own sync).
    pub fn mark_synced(&self, lsn: u64) {
        self.synced.fetch_max(lsn, Ordering::AcqRel);
        self.files.lock().retired.retain(|(_, end)| *end > lsn);
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
            let (files, target) = self.pending();
            let r = match files.as_slice() {
                [one] => one.sync_data(),
                many => self.io.sync_many(many),
            };
            self.syncs.fetch_add(1, Ordering::Relaxed);
            if r.is_ok() {
                self.files.lock().retired.retain(|(_, end)| *end > target);
            }
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
