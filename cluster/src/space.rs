//! The data disk's free space, as a node's writes see it (docs/scaling.md,
//! "A full disk").
//!
//! A Raft group cannot take a failed write in its stride: openraft 0.9
//! stops a group for good when its log or its state machine fails to
//! write. So a node refuses new client writes (`STORAGE_FULL`) once the
//! free space of its data directory falls below a reserve
//! (`--min-free-space`), and keeps the reserve for what must still be
//! written: entries already proposed or being replicated to it, the
//! deliveries of messages already stored, done marks, votes. A group that
//! stops all the same (the disk filled past the reserve, by this node or by
//! anything else on it) is reopened by [`crate::revive`] once there is
//! room again.
//!
//! The free space is read (`statvfs`) by the supervisor's timer
//! ([`crate::revive::supervise`]), not on the write path: a write costs
//! one atomic load.

use crate::partition::PartitionId;
use crate::ClusterError;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Free space not known (no directory, or `statvfs` failed): nothing is
/// refused for want of it.
const UNKNOWN: u64 = u64::MAX;

pub(crate) struct Space {
    /// The data directory whose file system is watched (`None`: none).
    dir: Option<PathBuf>,
    /// Writes are refused while fewer bytes than this are free (0: never).
    reserve: u64,
    free: AtomicU64,
    refused: AtomicU64,
}

impl Space {
    pub(crate) fn new(dir: Option<PathBuf>, reserve: u64) -> Space {
        let s = Space {
            dir,
            reserve,
            free: AtomicU64::new(UNKNOWN),
            refused: AtomicU64::new(0),
        };
        s.refresh();
        s
    }

    /// Read the free space again; what is free now (`None`: not known).
    pub(crate) fn refresh(&self) -> Option<u64> {
        let free = self.dir.as_deref().and_then(|d| match free_bytes(d) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::debug!(dir = %d.display(), error = %e, "statvfs failed");
                None
            }
        });
        self.free.store(free.unwrap_or(UNKNOWN), Ordering::Relaxed);
        free
    }

    /// Whether fewer than the reserve's bytes are free, as last read.
    pub(crate) fn low(&self) -> bool {
        self.free.load(Ordering::Relaxed) < self.reserve
    }

    /// Whether the disk has room enough to take leadership: a quarter of
    /// the reserve above it, so that a node near the line neither sheds
    /// its partitions nor takes them back (no handover back and forth as
    /// its free space moves about the reserve).
    pub(crate) fn roomy(&self) -> bool {
        self.free.load(Ordering::Relaxed) >= self.reserve.saturating_add(self.reserve / 4)
    }

    /// `Ok` if a new write to partition `p` may go ahead; `StorageFull`
    /// (counted) if the disk is below the reserve.
    pub(crate) fn admit(&self, p: PartitionId) -> Result<(), ClusterError> {
        if self.low() {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(self.full(p));
        }
        Ok(())
    }

    /// The refusal for partition `p`.
    pub(crate) fn full(&self, p: PartitionId) -> ClusterError {
        let free = self.free.load(Ordering::Relaxed);
        ClusterError::StorageFull {
            partition: p,
            free: if free == UNKNOWN { 0 } else { free },
            reserve: self.reserve,
        }
    }

    /// `STATS`: bytes free as last read (`None`: not known), the reserve,
    /// and the writes refused since start.
    pub(crate) fn counters(&self) -> (Option<u64>, u64, u64) {
        let free = self.free.load(Ordering::Relaxed);
        (
            (free != UNKNOWN).then_some(free),
            self.reserve,
            self.refused.load(Ordering::Relaxed),
        )
    }

    #[cfg(test)]
    pub(crate) fn set_free(&self, bytes: u64) {
        self.free.store(bytes, Ordering::Relaxed);
    }
}

/// Bytes an unprivileged writer may still use on `dir`'s file system.
fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_below_the_reserve_and_counted() {
        let s = Space::new(None, 1000);
        assert_eq!(s.counters(), (None, 1000, 0), "no directory: not known");
        assert!(s.admit(3).is_ok(), "unknown free space refuses nothing");
        s.set_free(1000);
        assert!(s.admit(3).is_ok(), "exactly the reserve is enough");
        assert!(!s.roomy(), "but not room enough to take leadership");
        s.set_free(1250);
        assert!(s.roomy());
        s.set_free(999);
        match s.admit(3) {
            Err(ClusterError::StorageFull {
                partition: 3,
                free: 999,
                reserve: 1000,
            }) => {}
            other => panic!("expected StorageFull, got {other:?}"),
        }
        assert_eq!(s.counters(), (Some(999), 1000, 1));
        let none = Space::new(None, 0);
        none.set_free(0);
        assert!(none.admit(0).is_ok(), "a reserve of 0 refuses nothing");
    }

    #[test]
    fn a_real_directory_has_its_free_space_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = Space::new(Some(dir.path().to_path_buf()), 1);
        let free = s.refresh().unwrap();
        assert!(free > 0);
        assert!(!s.low());
        let gone = Space::new(Some(dir.path().join("missing")), 1);
        assert_eq!(gone.refresh(), None, "a missing directory is not known");
        assert!(gone.admit(0).is_ok());
    }
}
