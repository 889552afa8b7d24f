//! Segments: the active log segment (in memory and on disk), sealed segments
//! (memory-mapped), how a segment is sealed, and how a range of one
//! timeline's records is collected from either.

mod buffer;
mod read;
mod seal;
mod sealed;

pub use buffer::{AppendBuf, Tail};
pub(crate) use read::{collect, continue_from, Step};
pub(crate) use seal::{build_sealed, SealOutput};
pub(crate) use sealed::SealedSeg;

use crate::io::IoFile;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A segment still in arrival order whose bytes are held in memory: the
/// active segment of a shard, or one that is full and waiting to be sealed.
#[derive(Debug)]
pub struct LogSeg {
    pub gen: u32,
    pub created_ms: u64,
    pub path: PathBuf,
    pub file: Arc<dyn IoFile>,
    pub buf: Arc<AppendBuf>,
    /// Newest record timestamp (for TTL of the segment once sealed).
    pub max_ts: AtomicU64,
    pub min_ts: AtomicU64,
    pub records: AtomicU64,
}

impl LogSeg {
    pub fn note_ts(&self, ts: u64) {
        self.max_ts.fetch_max(ts, Ordering::Relaxed);
        self.min_ts.fetch_min(ts, Ordering::Relaxed);
    }
}

/// A segment as readers see it.
#[derive(Debug, Clone)]
pub enum SegRef {
    Log(Arc<LogSeg>),
    Sealed(Arc<SealedSeg>),
}

/// The segments of one shard, swapped whole (copy on write) when one is
/// added, sealed or dropped.
#[derive(Debug, Clone)]
pub struct SegSet {
    pub active: Arc<LogSeg>,
    /// Full log segments not yet sealed, oldest first.
    pub frozen: Vec<Arc<LogSeg>>,
    /// Sealed segments, oldest first.
    pub sealed: Vec<Arc<SealedSeg>>,
}

impl SegSet {
    pub fn find(&self, gen: u32) -> Option<SegRef> {
        if self.active.gen == gen {
            return Some(SegRef::Log(self.active.clone()));
        }
        if let Some(f) = self.frozen.iter().find(|s| s.gen == gen) {
            return Some(SegRef::Log(f.clone()));
        }
        self.sealed
            .binary_search_by_key(&gen, |s| s.gen)
            .ok()
            .and_then(|i| self.sealed.get(i))
            .map(|s| SegRef::Sealed(s.clone()))
    }
}
