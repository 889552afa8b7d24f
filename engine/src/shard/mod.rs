//! One shard of one keyspace: a writer, an active log segment, frozen and
//! sealed segments, and the timeline table. Timelines map to shards by hash,
//! so a shard's state is shared by many timelines and none is per timeline.
//!
//! Cut along its seams (raft-engine keeps its pipe, recovery builder and
//! purge manager apart the same way): `write` (append, flush, roll, group
//! commit waits), `read` (ranges, retention queries), `seal` (frozen log
//! segments into sealed ones, index checkpoints), `expiry` (TTL drops) and
//! `recovery` (which builds a `Shard` from what is on disk). This file holds
//! the state they share.

mod expiry;
mod read;
mod recovery;
mod seal;
mod write;
pub(crate) use write::At;

use crate::clock::Clock;
use crate::commit::Commit;
use crate::config::{Durability, Keyspace, KeyspaceConfig};
use crate::engine::KeyspaceStats;
use crate::error::{Error, Result};
use crate::format::checkpoint::{self, CkptEntry};
use crate::format::record::{self, decode, decode_header, is_local, RecordHeader, CROSS};
use crate::format::segment::{SegmentHeader, SegmentKind, HEADER_LEN};
use crate::format::{self, FileName, NONE};
use crate::index::{Pos, TimelineTable};
use crate::io::{Io, IoFile, OpenMode};
use crate::segment::{
    build_sealed, collect, AppendBuf, LogSeg, SealOutput, SealedSeg, SegRef, SegSet, Step, Tail,
};
use crate::Record;
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Counters kept per shard (summed per keyspace in `Stats`).
#[derive(Debug, Default)]
struct ShardStats {
    /// Every byte this shard wrote to a file: records, headers, sealed copies, indexes.
    pub bytes_written: AtomicU64,
    pub payload_bytes: AtomicU64,
    /// Payload plus record headers as first appended.
    pub record_bytes: AtomicU64,
    pub records: AtomicU64,
    pub sealed_segments: AtomicU64,
    /// Of those, sealed in log order in a keyspace that regroups (no room
    /// for the copy).
    pub seals_in_log_order: AtomicU64,
    pub dropped_segments: AtomicU64,
}

struct Writer {
    active: Arc<LogSeg>,
    /// The active segment's buffer's one writer.
    tail: Tail,
    next_gen: u32,
    /// Shard LSN: bytes written to this shard's log files since open.
    lsn: u64,
    /// Per timeline slot touched by the batch in progress: (seq, pos, the
    /// anchor a following record would carry).
    pending: HashMap<u32, (u64, Pos, u32)>,
    /// (slot, seq, offset, next anchor) to publish once the bytes are written.
    updates: Vec<(u32, u64, u32, u32)>,
    idxs: Vec<(u32, (u64, Pos, u32))>,
}

pub(crate) struct Shard {
    ks: Keyspace,
    id: usize,
    dir: PathBuf,
    cfg: KeyspaceConfig,
    io: Arc<dyn Io>,
    clock: Arc<dyn Clock>,
    table: TimelineTable,
    segs: RwLock<Arc<SegSet>>,
    writer: Mutex<Writer>,
    commit: Commit,
    maint: Mutex<()>,
    /// A retired active buffer to reuse at the next roll: its pages are
    /// already faulted in (fresh 64 MiB buffers cost page faults, and with
    /// huge pages, multi-millisecond stalls, on the append path).
    /// A buffer for the next roll (fresh and prefaulted, or a sealed
    /// segment's, reusable once its readers let go).
    spare: Mutex<Option<Arc<AppendBuf>>>,
    /// Generation the newest index checkpoint covers, and footer entries sealed since.
    ckpt: Mutex<(Option<u32>, u64)>,
    /// Per timeline, the seq through which its owner no longer needs its
    /// records (`Engine::release`; in memory, declared again after a
    /// restart).
    released: Mutex<HashMap<u64, u64>>,
    /// Until then (clock ms), seals go in log order without trying the
    /// regrouped copy: one found no room (`seal.rs`).
    no_room_until_ms: AtomicU64,
    stats: ShardStats,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shard({}/{})", self.cfg.name, self.id)
    }
}

fn ioe(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

impl Shard {
    fn seg_path(&self, gen: u32) -> PathBuf {
        self.dir.join(format::seg_file_name(gen))
    }

    fn ttl_ms(&self) -> Option<u64> {
        self.cfg.ttl.map(|t| t.as_millis() as u64)
    }

    pub fn segs(&self) -> Arc<SegSet> {
        self.segs.read().clone()
    }

    pub fn check_poison(&self) -> Result<()> {
        match self.commit.failure() {
            Some(reason) => Err(Error::Poisoned {
                keyspace: self.cfg.name.clone(),
                shard: self.id,
                reason,
            }),
            None => Ok(()),
        }
    }

    #[allow(clippy::too_many_arguments)] // a constructor of one value; a params struct would only rename them
    fn new_log_seg(
        io: &dyn Io,
        dir: &Path,
        ks: Keyspace,
        shard: usize,
        gen: u32,
        now: u64,
        cap: usize,
        spare: Option<Tail>,
    ) -> Result<(Arc<LogSeg>, Tail)> {
        let path = dir.join(format::log_file_name(gen));
        let file = io.open(&path, OpenMode::CreateNew).map_err(ioe(&path))?;
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            keyspace: ks.0,
            shard: shard as u32,
            gen,
            created_ms: now,
        };
        let hb = header.encode();
        file.write_at(&hb, 0).map_err(ioe(&path))?;
        // The new name must survive a power cut before any record in it is
        // acknowledged (KAFKA-3968).
        io.sync_dir(dir).map_err(ioe(dir))?;
        let mut tail = match spare {
            Some(t) => t,
            None => Tail::with_capacity(cap).map_err(ioe(&path))?,
        };
        tail.write(0, &hb);
        tail.publish(HEADER_LEN);
        let buf = tail.buf().clone();
        let seg = Arc::new(LogSeg {
            gen,
            created_ms: now,
            path,
            file,
            buf,
            max_ts: AtomicU64::new(0),
            min_ts: AtomicU64::new(u64::MAX),
            records: AtomicU64::new(0),
        });
        Ok((seg, tail))
    }

    // ------------------------------------------------ durability and stats

    /// Is everything up to shard LSN `lsn` fdatasynced?
    pub fn is_durable(&self, lsn: u64) -> bool {
        self.commit.is_synced(lsn)
    }

    /// The files with bytes not yet synced and the LSN a sync of them
    /// covers; `None` if everything is durable.
    pub fn unsynced(&self) -> Option<(Vec<Arc<dyn IoFile>>, u64)> {
        let (files, lsn) = self.commit.pending();
        (!self.commit.is_synced(lsn)).then_some((files, lsn))
    }

    /// A sync of the files [`unsynced`](Self::unsynced) returned succeeded.
    pub fn note_synced(&self, lsn: u64) {
        self.commit.count_sync();
        self.commit.mark_synced(lsn);
    }

    /// A sync covering this shard failed: nothing unsynced can be vouched
    /// for, so the shard refuses writes from now on.
    pub fn note_sync_failed(&self, reason: String) {
        self.commit.mark_failed(reason);
    }

    /// Add this shard's counters to its keyspace's.
    pub fn add_stats(&self, k: &mut KeyspaceStats) {
        let x = &self.stats;
        k.timelines += self.table.len() as u64;
        k.records += x.records.load(Ordering::Relaxed);
        k.payload_bytes += x.payload_bytes.load(Ordering::Relaxed);
        k.record_bytes += x.record_bytes.load(Ordering::Relaxed);
        k.bytes_written += x.bytes_written.load(Ordering::Relaxed);
        k.sealed_segments += x.sealed_segments.load(Ordering::Relaxed);
        k.seals_in_log_order += x.seals_in_log_order.load(Ordering::Relaxed);
        k.dropped_segments += x.dropped_segments.load(Ordering::Relaxed);
        k.files += self.file_count() as u64;
        k.index_bytes += self.memory_bytes() as u64;
        k.fsyncs += self.commit.sync_count();
    }

    /// Files in this shard's directory that the engine holds.
    pub fn file_count(&self) -> usize {
        let s = self.segs();
        1 + s.frozen.len() + s.sealed.len()
    }

    pub fn memory_bytes(&self) -> usize {
        let s = self.segs();
        self.table.memory_bytes() + s.sealed.iter().map(|x| x.memory_bytes()).sum::<usize>()
    }
}

/// How far ahead of the writer the maintenance thread populates the active
/// buffer's pages: as far as the segment has been written (so the lead
/// doubles with the writes), from 1 MiB up to 32 MiB. A fixed 32 MiB made
/// every shard written at all cost 32 MiB of memory, and a node's first
/// writes to its tens of shards (a cluster node: 12 keyspaces of 4 shards,
/// most written a little) zeroed a gigabyte of pages in one burst, which
/// starved its event loops and Raft timers for up to 344 ms.
fn prefault_lead(written: usize) -> usize {
    written.clamp(1 << 20, 32 << 20)
}

/// Sealing writes a checkpoint once this many index entries (or as many as
/// the shard has timelines, if more) were sealed since the last one, so
/// recovery replays at most about that many entries plus the active logs.
const CHECKPOINT_MIN_ENTRIES: u64 = 100_000;
