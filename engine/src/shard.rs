//! One shard of one keyspace: a writer, an active log segment, frozen and
//! sealed segments, and the timeline table. Timelines map to shards by hash,
//! so a shard's state is shared by many timelines and none is per timeline.

use crate::clock::Clock;
use crate::commit::Commit;
use crate::config::{Durability, Keyspace, KeyspaceConfig};
use crate::error::{Error, Result};
use crate::format::checkpoint::{self, CkptEntry};
use crate::format::record::{self, decode, decode_header, is_local, RecordHeader, CROSS};
use crate::format::segment::{SegmentHeader, SegmentKind, HEADER_LEN};
use crate::format::{self, FileName, NONE, SPARSE_EVERY};
use crate::index::{Pos, TimelineTable};
use crate::io::{Io, OpenMode};
use crate::segment::{
    build_sealed, collect, AppendBuf, LogSeg, SealOutput, SealedSeg, SegRef, SegSet, Step,
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
pub struct ShardStats {
    /// Every byte this shard wrote to a file: records, headers, sealed copies, indexes.
    pub bytes_written: AtomicU64,
    pub payload_bytes: AtomicU64,
    /// Payload plus record headers as first appended.
    pub record_bytes: AtomicU64,
    pub records: AtomicU64,
    pub sealed_segments: AtomicU64,
    pub dropped_segments: AtomicU64,
}

struct Writer {
    active: Arc<LogSeg>,
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
    pub ks: Keyspace,
    pub id: usize,
    pub dir: PathBuf,
    cfg: KeyspaceConfig,
    io: Arc<dyn Io>,
    clock: Arc<dyn Clock>,
    pub table: TimelineTable,
    segs: RwLock<Arc<SegSet>>,
    writer: Mutex<Writer>,
    pub commit: Commit,
    maint: Mutex<()>,
    /// A retired active buffer to reuse at the next roll: its pages are
    /// already faulted in (fresh 64 MiB buffers cost page faults, and with
    /// huge pages, multi-millisecond stalls, on the append path).
    spare: Mutex<Option<Arc<AppendBuf>>>,
    /// Generation the newest index checkpoint covers, and footer entries sealed since.
    ckpt: Mutex<(Option<u32>, u64)>,
    pub stats: ShardStats,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shard({}/{})", self.ks.name(), self.id)
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
                keyspace: self.ks.name(),
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
        spare: Option<Arc<AppendBuf>>,
    ) -> Result<Arc<LogSeg>> {
        let path = dir.join(format::log_file_name(gen));
        let file = io.open(&path, OpenMode::CreateNew).map_err(ioe(&path))?;
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            keyspace: ks as u8,
            shard: shard as u32,
            gen,
            created_ms: now,
        };
        let hb = header.encode();
        file.write_at(&hb, 0).map_err(ioe(&path))?;
        // The new name must survive a power cut before any record in it is
        // acknowledged (KAFKA-3968).
        io.sync_dir(dir).map_err(ioe(dir))?;
        let buf = match spare {
            Some(b) => b,
            None => Arc::new(AppendBuf::with_capacity(cap).map_err(ioe(&path))?),
        };
        buf.write_tail(0, &hb);
        buf.publish(HEADER_LEN);
        Ok(Arc::new(LogSeg {
            gen,
            created_ms: now,
            path,
            file,
            buf,
            max_ts: AtomicU64::new(0),
            min_ts: AtomicU64::new(u64::MAX),
            records: AtomicU64::new(0),
        }))
    }

    // ----------------------------------------------------------------- write

    /// Append `items` (timeline id, payload) in order; pushes each SeqId to
    /// `seqs`. Returns the shard LSN just past the last byte written, whether
    /// a segment was frozen (and needs sealing), and whether the maintenance
    /// thread should populate the active buffer further ahead.
    pub fn append(
        &self,
        items: &[(u64, &[u8])],
        seqs: &mut Vec<u64>,
        durability: Durability,
    ) -> Result<(u64, bool, bool)> {
        let mut w = self.writer.lock();
        self.check_poison()?;
        let now = self.clock.now_ms();
        let mut froze = false;
        if self.time_roll_due(&w.active, now) {
            self.roll(&mut w, now)?;
            froze = true;
        }
        // A batch that fits in a fresh segment but not in what is left of
        // this one rolls first, so that it is written (or fails) whole: an
        // error after part of it became visible would make the caller retry
        // and store that part twice. Only a batch larger than a segment is
        // split across a roll.
        let need: usize = items
            .iter()
            .map(|(_, p)| record::encoded_len(p.len()))
            .sum();
        let cap = w.active.buf.capacity();
        if w.active.buf.len() + need > cap && HEADER_LEN + need <= cap {
            self.roll(&mut w, now)?;
            froze = true;
        }
        let mut start = w.active.buf.len();
        let mut cursor = start;
        w.pending.clear();
        w.updates.clear();
        let mut idxs = std::mem::take(&mut w.idxs);
        let mut payload_bytes = 0u64;
        self.table
            .resolve_batch_state(items.iter().map(|(id, _)| *id), &mut idxs);
        for (k, &(id, payload)) in items.iter().enumerate() {
            let rl = record::encoded_len(payload.len());
            if cursor + rl > w.active.buf.capacity() {
                self.flush(&mut w, start, cursor, durability)?;
                self.roll(&mut w, now)?;
                froze = true;
                start = w.active.buf.len();
                cursor = start;
                if start + rl > w.active.buf.capacity() {
                    return Err(Error::PayloadTooLarge {
                        len: payload.len(),
                        max: w.active.buf.capacity() - start - record::RECORD_HEADER_LEN,
                    });
                }
            }
            let (idx, state) = idxs[k];
            let gen = w.active.gen;
            // A timeline appended to earlier in this batch: its state is
            // still pending (the table is updated after the flush).
            let (last, prev_pos, next_anchor) = match w.pending.get(&idx) {
                Some(&p) => p,
                None => state,
            };
            // Only a forged checkpoint or index could put a timeline at the
            // end of the seq space; refuse rather than wrap.
            let seq = last.checked_add(1).ok_or_else(|| {
                Error::InvalidArgument(format!("timeline {id} has no SeqIds left"))
            })?;
            let (prev, anchor) = if prev_pos.gen == gen {
                (prev_pos.off, next_anchor)
            } else if prev_pos == Pos::NONE {
                (NONE, NONE)
            } else {
                (CROSS | prev_pos.off, prev_pos.gen)
            };
            let off = cursor as u32;
            let h = RecordHeader {
                len: payload.len() as u32,
                timeline: id,
                seq,
                ts_ms: now,
                prev,
                anchor,
            };
            // Encode straight into the active buffer's unpublished tail: no
            // scratch copy; readers cannot see it until `flush` publishes.
            w.active
                .buf
                .stage_with(cursor, rl, |dst| record::encode_into(&h, payload, dst));
            cursor += rl;
            let na = if seq.is_multiple_of(SPARSE_EVERY) {
                off
            } else if !is_local(prev) {
                NONE
            } else {
                anchor
            };
            w.pending.insert(idx, (seq, Pos { gen, off }, na));
            w.updates.push((idx, seq, off, na));
            seqs.push(seq);
            payload_bytes += payload.len() as u64;
        }
        w.idxs = idxs;
        self.flush(&mut w, start, cursor, durability)?;
        // Counted once the whole batch is written (a failed write counts nothing).
        self.stats
            .payload_bytes
            .fetch_add(payload_bytes, Ordering::Relaxed);
        self.stats.record_bytes.fetch_add(
            payload_bytes + (items.len() * record::RECORD_HEADER_LEN) as u64,
            Ordering::Relaxed,
        );
        let b = &w.active.buf;
        let wants_prefault = b.prefaulted() < (b.len() + PREFAULT_LEAD / 2).min(b.capacity());
        Ok((w.lsn, froze, wants_prefault))
    }

    /// Populate the active buffer's pages ahead of the writer, and prepare a
    /// populated spare buffer for the next roll once the active one is half
    /// full (the maintenance thread calls this; see `AppendBuf::prefault_to`).
    pub fn prefault_ahead(&self) {
        let segs = self.segs();
        let b = &segs.active.buf;
        if b.len() <= HEADER_LEN {
            // Not written yet: an idle shard costs no memory.
            return;
        }
        b.prefault_to(b.len() + PREFAULT_LEAD);
        let cap = self.cfg.segment_bytes as usize;
        if b.len() > b.capacity() / 2 && self.spare.lock().is_none() {
            if let Ok(mut n) = AppendBuf::with_capacity(cap) {
                n.prefault_to(cap);
                n.reset();
                let mut slot = self.spare.lock();
                if slot.is_none() {
                    *slot = Some(Arc::new(n));
                }
            }
        }
    }

    /// Write the staged bytes `[start, end)` of the active buffer to its
    /// file, then publish them to readers.
    fn flush(
        &self,
        w: &mut Writer,
        start: usize,
        end: usize,
        durability: Durability,
    ) -> Result<()> {
        if end == start {
            return Ok(());
        }
        let seg = w.active.clone();
        let bytes = seg.buf.staged(start, end);
        let r = match durability {
            Durability::Sync => self
                .commit
                .sync_retired()
                .and_then(|()| seg.file.write_and_sync(bytes, start as u64)),
            _ => seg.file.write_at(bytes, start as u64),
        };
        if let Err(e) = r {
            if durability == Durability::Sync && e.kind() != std::io::ErrorKind::StorageFull {
                // We cannot tell whether the write or the sync failed: treat as a failed sync.
                self.commit
                    .mark_failed(format!("write+fdatasync failed: {e}"));
            }
            // Nothing was published: the bytes past `start` are garbage that
            // the next write overwrites or recovery truncates.
            return Err(Error::io(&seg.path, e));
        }
        seg.buf.publish(end);
        let now = self.clock.now_ms();
        seg.note_ts(now);
        seg.records
            .fetch_add(w.updates.len() as u64, Ordering::Relaxed);
        self.stats
            .records
            .fetch_add(w.updates.len() as u64, Ordering::Relaxed);
        {
            let t = self.table.read();
            for &(idx, seq, off, na) in &w.updates {
                t.meta(idx)
                    .publish_with_anchor(seq, Pos { gen: seg.gen, off }, na);
            }
        }
        w.lsn += (end - start) as u64;
        self.stats
            .bytes_written
            .fetch_add((end - start) as u64, Ordering::Relaxed);
        self.commit.written(&seg.file, w.lsn);
        if durability == Durability::Sync {
            self.commit.count_sync();
            self.commit.mark_synced(w.lsn);
        }
        w.updates.clear();
        Ok(())
    }

    fn time_roll_due(&self, active: &LogSeg, now: u64) -> bool {
        active.records.load(Ordering::Relaxed) > 0
            && now
                >= active
                    .created_ms
                    .saturating_add(self.cfg.segment_window.as_millis() as u64)
    }

    /// Freeze the active segment and start a new one.
    fn roll(&self, w: &mut Writer, now: u64) -> Result<()> {
        let old = w.active.clone();
        // No fdatasync here: `commit.written` below retires the old file and
        // the next sync (group commit, `Engine::sync`, or sealing) covers it.
        // Consume the generation first: a roll that fails half way (disk
        // full after creating the file) must not make every later roll
        // collide with the file it left behind.
        let gen = w.next_gen;
        w.next_gen += 1;
        let new = Self::new_log_seg(
            &*self.io,
            &self.dir,
            self.ks,
            self.id,
            gen,
            now,
            self.cfg.segment_bytes as usize,
            self.take_spare(),
        )?;
        w.lsn += HEADER_LEN as u64;
        self.stats
            .bytes_written
            .fetch_add(HEADER_LEN as u64, Ordering::Relaxed);
        self.commit.written(&new.file, w.lsn);
        w.active = new.clone();
        let empty = old.records.load(Ordering::Relaxed) == 0;
        {
            // Read-modify-write under the write lock: sealing and expiry
            // swap the set concurrently, and a copy taken before their swap
            // would undo it (a sealed segment back among the frozen ones,
            // out of order: found by tests/tests/concurrent_readers.rs).
            let mut g = self.segs.write();
            let mut s = (**g).clone();
            s.active = new;
            if !empty {
                s.frozen.push(old.clone());
            }
            *g = Arc::new(s);
        }
        if empty {
            let _ = self.io.remove_file(&old.path);
        }
        Ok(())
    }

    /// The spare buffer, if no reader holds it any more.
    fn take_spare(&self) -> Option<Arc<AppendBuf>> {
        let mut slot = self.spare.lock();
        let mut b = slot.take()?;
        match Arc::get_mut(&mut b) {
            Some(buf) => {
                buf.reset();
                Some(b)
            }
            None => {
                // A reader still has it: keep it for next time.
                *slot = Some(b);
                None
            }
        }
    }

    /// Roll the active segment if its time window has passed (so it can be
    /// sealed and, later, expire).
    /// With `force`, roll any active segment that holds records.
    pub fn roll_if_due(&self, force: bool) -> Result<bool> {
        let mut w = self.writer.lock();
        let now = self.clock.now_ms();
        let has_records = w.active.records.load(Ordering::Relaxed) > 0;
        if (force && has_records) || self.time_roll_due(&w.active, now) {
            self.check_poison()?;
            self.roll(&mut w, now)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Make everything written so far durable.
    pub fn sync_all(&self) -> Result<()> {
        let lsn = self.writer.lock().lsn;
        self.commit.wait(lsn).map_err(|reason| Error::Poisoned {
            keyspace: self.ks.name(),
            shard: self.id,
            reason,
        })
    }

    pub fn wait_durable(&self, lsn: u64) -> Result<()> {
        self.commit.wait(lsn).map_err(|reason| Error::Poisoned {
            keyspace: self.ks.name(),
            shard: self.id,
            reason,
        })
    }

    // ------------------------------------------------------- seal and expire

    /// Seal every frozen segment, oldest first.
    pub fn seal_pending(&self) -> Result<usize> {
        let _g = self.maint.lock();
        let mut n = 0;
        while let Some(f) = self.segs().frozen.first().cloned() {
            let entries = self.seal_one(&f)?;
            n += 1;
            let due = {
                let mut c = self.ckpt.lock();
                c.1 += entries;
                c.1 >= (self.table.len() as u64).max(CHECKPOINT_MIN_ENTRIES)
            };
            if due {
                self.write_checkpoint()?;
            }
        }
        Ok(n)
    }

    fn exists(&self, path: &Path) -> Result<bool> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        Ok(self
            .io
            .list_dir(&self.dir)
            .map_err(ioe(&self.dir))?
            .iter()
            .any(|n| n == name))
    }

    /// Seal one frozen segment; returns its number of index entries.
    fn seal_one(&self, f: &Arc<LogSeg>) -> Result<u64> {
        let bytes = f.buf.published();
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            keyspace: self.ks as u8,
            shard: self.id as u32,
            gen: f.gen,
            created_ms: f.created_ms,
        };
        let (out, footer) = build_sealed(bytes, header, self.cfg.regroup)
            .map_err(|e| Error::corruption(&f.path, 0, e.to_string()))?;
        let seg_path = self.seg_path(f.gen);
        match &out {
            SealOutput::Grouped(v) => {
                self.write_new_file(&format::tmp_file_name(f.gen), &seg_path, v)?;
            }
            // A previous attempt got as far as the rename: only the rest is left.
            SealOutput::Appendix(_) if !self.exists(&f.path)? => {}
            SealOutput::Appendix(v) => {
                // A failed write may have left garbage past the published end;
                // the footer must be the file's last bytes.
                f.file.set_len(bytes.len() as u64).map_err(ioe(&f.path))?;
                f.file
                    .write_at(v, bytes.len() as u64)
                    .map_err(ioe(&f.path))?;
                if let Err(e) = f.file.sync_data() {
                    // The log's dirty pages may be gone (fsyncgate): nothing
                    // later may be acknowledged on top of them.
                    self.commit
                        .mark_failed(format!("fdatasync failed while sealing: {e}"));
                    return Err(Error::io(&f.path, e));
                }
                self.io.rename(&f.path, &seg_path).map_err(ioe(&f.path))?;
                self.io.sync_dir(&self.dir).map_err(ioe(&self.dir))?;
                self.stats
                    .bytes_written
                    .fetch_add(v.len() as u64, Ordering::Relaxed);
            }
        }
        let file = self
            .io
            .open(&seg_path, OpenMode::Existing)
            .map_err(ioe(&seg_path))?;
        let map = file.map().map_err(ioe(&seg_path))?;
        let sealed = Arc::new(SealedSeg::open(
            self.ks as u8,
            self.id as u32,
            f.gen,
            seg_path,
            map,
        )?);
        {
            let mut g = self.segs.write();
            let mut s = (**g).clone();
            s.frozen.retain(|x| x.gen != f.gen);
            let at = s.sealed.partition_point(|x| x.gen < f.gen);
            s.sealed.insert(at, sealed);
            *g = Arc::new(s);
        }
        // Keep the sealed segment's buffer for the next roll, once readers
        // still holding the old segment set let go of it.
        if f.buf.capacity() == self.cfg.segment_bytes as usize {
            *self.spare.lock() = Some(f.buf.clone());
        }
        if let SealOutput::Grouped(_) = out {
            // A stale .log beside a valid .seg is removed by recovery, so no
            // directory sync is needed here.
            match self.io.remove_file(&f.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(&f.path, e))
                }
                _ => {}
            }
        }
        self.stats.sealed_segments.fetch_add(1, Ordering::Relaxed);
        Ok(footer.entries as u64)
    }

    /// Create `path` with `bytes` so that a crash leaves either no file or
    /// the whole file: write under the temporary name `tmp` (removed by
    /// recovery), fdatasync, rename, fsync the directory.
    fn write_new_file(&self, tmp: &str, path: &Path, bytes: &[u8]) -> Result<()> {
        const CHUNK: usize = 8 << 20;
        let tmp = self.dir.join(tmp);
        let _ = self.io.remove_file(&tmp);
        let file = self.io.open(&tmp, OpenMode::CreateNew).map_err(ioe(&tmp))?;
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            file.write_at(chunk, (i * CHUNK) as u64)
                .map_err(ioe(&tmp))?;
        }
        file.sync_data().map_err(ioe(&tmp))?;
        self.io.rename(&tmp, path).map_err(ioe(&tmp))?;
        self.io.sync_dir(&self.dir).map_err(ioe(&self.dir))?;
        self.stats
            .bytes_written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Write an index checkpoint covering every sealed segment: the previous
    /// checkpoint merged with the index entries of segments sealed since.
    /// Caller holds the maintenance lock.
    fn write_checkpoint(&self) -> Result<()> {
        let segs = self.segs();
        let Some(upto) = segs.sealed.last().map(|s| s.gen) else {
            return Ok(());
        };
        let prev = self.ckpt.lock().0;
        if prev == Some(upto) {
            return Ok(());
        }
        let mut entries = match prev {
            Some(g) => read_checkpoint(&*self.io, &self.dir, g)?,
            None => Vec::new(),
        };
        for s in segs
            .sealed
            .iter()
            .filter(|s| prev.is_none_or(|p| s.gen > p))
        {
            for e in s.entries()? {
                let e = e?;
                entries.push(CkptEntry {
                    timeline: e.timeline,
                    last_seq: e.last_seq,
                    gen: s.gen,
                    loc: e.loc,
                });
            }
        }
        // Stable sort keeps generation order within a timeline: keep the newest.
        entries.sort_by_key(|e| e.timeline);
        let mut merged: Vec<CkptEntry> = Vec::with_capacity(entries.len());
        for e in entries {
            match merged.last_mut() {
                Some(l) if l.timeline == e.timeline => *l = e,
                _ => merged.push(e),
            }
        }
        let bytes = checkpoint::encode(upto, &merged);
        let path = self.dir.join(checkpoint::file_name(upto));
        self.write_new_file(
            &format!("{}.tmp", checkpoint::file_name(upto)),
            &path,
            &bytes,
        )?;
        if let Some(g) = prev {
            let old = self.dir.join(checkpoint::file_name(g));
            self.io.remove_file(&old).map_err(ioe(&old))?;
        }
        *self.ckpt.lock() = (Some(upto), 0);
        Ok(())
    }

    /// Drop sealed segments whose newest record is older than the TTL. Only
    /// a prefix (oldest first) is dropped, so every timeline's retained
    /// records stay one unbroken range.
    pub fn drop_expired(&self) -> Result<usize> {
        let Some(ttl) = self.ttl_ms() else {
            return Ok(0);
        };
        let _g = self.maint.lock();
        let now = self.clock.now_ms();
        if self
            .segs()
            .sealed
            .first()
            .is_none_or(|s| s.footer.max_ts.saturating_add(ttl) > now)
        {
            return Ok(0);
        }
        // The checkpoint must remember every timeline of the segments about
        // to go (its last seq above all): recovery can no longer read them.
        self.write_checkpoint()?;
        let dropped: Vec<Arc<SealedSeg>> = {
            let mut g = self.segs.write();
            let n = g
                .sealed
                .iter()
                .take_while(|s| s.footer.max_ts.saturating_add(ttl) <= now)
                .count();
            if n == 0 {
                return Ok(0);
            }
            let mut s = (**g).clone();
            let dropped = s.sealed.drain(..n).collect();
            *g = Arc::new(s);
            dropped
        };
        for s in &dropped {
            self.io.remove_file(&s.path).map_err(ioe(&s.path))?;
        }
        self.io.sync_dir(&self.dir).map_err(ioe(&self.dir))?;
        self.stats
            .dropped_segments
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        Ok(dropped.len())
    }

    // ------------------------------------------------------------------ read

    /// (timelines, sum of their last SeqIds): what the shard holds by
    /// number, whatever process appended it.
    pub fn census(&self) -> (u64, u64) {
        let (mut n, mut sum) = (0u64, 0u64);
        self.table.for_each(|_, last, _| {
            n += 1;
            sum += last;
        });
        (n, sum)
    }

    pub fn last_seq(&self, id: u64) -> u64 {
        self.table.snapshot(id).map(|(l, _)| l).unwrap_or(0)
    }

    /// Records with seq in `[lo, hi]` (clamped to the last seq), ascending.
    /// `Err(Truncated)` if retention dropped any of them.
    pub fn range(&self, id: u64, lo: u64, hi: u64, out: &mut Vec<Record>) -> Result<()> {
        let Some((last, pos)) = self.table.snapshot(id) else {
            return Ok(());
        };
        let hi = hi.min(last);
        if lo > hi || lo == 0 {
            return Ok(());
        }
        let segs = self.segs();
        let mut gen = pos.gen;
        let mut head = Some(pos.off);
        let mut chunks: Vec<Vec<Record>> = Vec::new();
        let mut buf = Vec::with_capacity((hi - lo + 1).min(1024) as usize);
        let mut need_hi = hi;
        let mut first_known = last + 1;
        loop {
            let Some(seg) = segs.find(gen) else {
                // Retention dropped this segment and everything before it.
                return Err(Error::Truncated {
                    timeline: id,
                    requested: lo,
                    first_retained: first_known,
                });
            };
            let step = collect(
                &seg,
                id,
                if matches!(seg, SegRef::Log(_)) {
                    head
                } else {
                    None
                },
                lo,
                need_hi,
                &mut buf,
            )?;
            if !buf.is_empty() {
                chunks.push(std::mem::take(&mut buf));
            }
            match step {
                Step::Done => break,
                Step::Continue {
                    first_seq,
                    prev_gen,
                    prev_head,
                } => {
                    if prev_gen == NONE || first_seq <= lo {
                        break;
                    }
                    need_hi = need_hi.min(first_seq - 1);
                    first_known = first_seq;
                    gen = prev_gen;
                    head = Some(prev_head);
                }
            }
        }
        for c in chunks.into_iter().rev() {
            out.extend(c);
        }
        Ok(())
    }

    /// The first seq still retained (1 if nothing was dropped; last + 1 if
    /// everything was).
    pub fn first_retained(&self, id: u64) -> Result<u64> {
        let Some((last, pos)) = self.table.snapshot(id) else {
            return Ok(1);
        };
        if last == 0 {
            return Ok(1);
        }
        let segs = self.segs();
        let mut gen = pos.gen;
        let mut head = Some(pos.off);
        let mut first = last + 1;
        loop {
            let Some(seg) = segs.find(gen) else {
                return Ok(first);
            };
            let (f, prev, prev_head) = match &seg {
                SegRef::Sealed(s) => match s.lookup(id)? {
                    Some(e) => (e.first_seq, e.prev_gen, NONE),
                    None => {
                        return Err(Error::corruption(
                            &s.path,
                            s.footer.index_off,
                            format!("timeline {id} missing from index"),
                        ))
                    }
                },
                SegRef::Log(l) => chain_start(l, id, head.unwrap_or(NONE))?,
            };
            first = f;
            if prev == NONE {
                return Ok(first);
            }
            gen = prev;
            head = Some(prev_head);
        }
    }

    // -------------------------------------------------------------- recovery

    /// Open (or create) the shard in `dir`, recovering whatever is there.
    pub fn open(
        ks: Keyspace,
        id: usize,
        dir: PathBuf,
        cfg: KeyspaceConfig,
        io: Arc<dyn Io>,
        clock: Arc<dyn Clock>,
    ) -> Result<Shard> {
        io.create_dir_all(&dir).map_err(ioe(&dir))?;
        let mut logs = BTreeSet::new();
        let mut segs = BTreeSet::new();
        let mut ckpts = BTreeSet::new();
        for name in io.list_dir(&dir).map_err(ioe(&dir))? {
            match format::parse_file_name(&name) {
                Some(FileName::Temp) => {
                    let p = dir.join(&name);
                    io.remove_file(&p).map_err(ioe(&p))?;
                }
                Some(FileName::Log(g)) => {
                    logs.insert(g);
                }
                Some(FileName::Sealed(g)) => {
                    segs.insert(g);
                }
                Some(FileName::Checkpoint(g)) => {
                    ckpts.insert(g);
                }
                None => tracing::warn!(file = %name, "ignoring unknown file in shard directory"),
            }
        }
        let table = TimelineTable::new();
        let mut sealed = Vec::new();
        for &g in &segs {
            let path = dir.join(format::seg_file_name(g));
            let file = io.open(&path, OpenMode::Existing).map_err(ioe(&path))?;
            let map = file.map().map_err(ioe(&path))?;
            match SealedSeg::open(ks as u8, id as u32, g, path.clone(), map) {
                // With the log still there, only a fully verified sealed
                // copy may replace it.
                Ok(s) if logs.contains(&g) && s.verify_index().is_err() => {
                    tracing::warn!(file = %path.display(), "discarding sealed segment with a damaged index; resealing from its log");
                    drop(s);
                    io.remove_file(&path).map_err(ioe(&path))?;
                }
                Ok(s) => {
                    if logs.remove(&g) {
                        let lp = dir.join(format::log_file_name(g));
                        io.remove_file(&lp).map_err(ioe(&lp))?;
                    }
                    sealed.push(Arc::new(s));
                }
                Err(e) if logs.contains(&g) => {
                    // Sealing was interrupted; the log still holds the truth.
                    tracing::warn!(error = %e, "discarding incomplete sealed segment");
                    io.remove_file(&path).map_err(ioe(&path))?;
                }
                Err(e) => return Err(e),
            }
        }
        // The newest checkpoint is the starting point; older ones are leftovers
        // of an interrupted cleanup.
        let ckpt_gen = ckpts.last().copied();
        for &g in ckpts.iter().rev().skip(1) {
            let p = dir.join(checkpoint::file_name(g));
            io.remove_file(&p).map_err(ioe(&p))?;
        }
        if let Some(g) = ckpt_gen {
            let entries = read_checkpoint(&*io, &dir, g)?;
            table.reserve(entries.len());
            for e in entries {
                let idx = table.find_or_insert(e.timeline);
                table.with(idx, |m| {
                    m.publish(
                        e.last_seq,
                        Pos {
                            gen: e.gen,
                            off: e.loc,
                        },
                    )
                });
            }
        }
        let mut entries_since = 0u64;
        for s in sealed.iter().filter(|s| ckpt_gen.is_none_or(|c| s.gen > c)) {
            entries_since += s.footer.entries as u64;
            for e in s.entries()? {
                let e = e?;
                let idx = table.find_or_insert(e.timeline);
                table.with(idx, |m| {
                    m.publish(
                        e.last_seq,
                        Pos {
                            gen: s.gen,
                            off: e.loc,
                        },
                    )
                });
            }
        }
        let max_gen = logs
            .iter()
            .chain(segs.iter())
            .chain(ckpts.iter())
            .copied()
            .max();
        let mut next_gen = max_gen.map(|g| g + 1).unwrap_or(0);
        let mut frozen = Vec::new();
        let mut active = None;
        let log_gens: Vec<u32> = logs.iter().copied().collect();
        for (i, &g) in log_gens.iter().enumerate() {
            let is_last = i + 1 == log_gens.len();
            if let Some(seg) =
                recover_log(&*io, &dir, (ks, id), g, &table, cfg.segment_bytes as usize)?
            {
                if is_last {
                    active = Some(seg);
                } else {
                    frozen.push(seg);
                }
            }
        }
        let now = clock.now_ms();
        let active = match active {
            Some(a) if a.buf.capacity() - a.buf.len() > 4096 => a,
            other => {
                if let Some(a) = other {
                    frozen.push(a);
                }
                let a = Self::new_log_seg(
                    &*io,
                    &dir,
                    ks,
                    id,
                    next_gen,
                    now,
                    cfg.segment_bytes as usize,
                    None,
                )?;
                next_gen += 1;
                a
            }
        };
        // Whatever recovery found is what readers will now see: make it durable.
        active.file.sync_data().map_err(ioe(&active.path))?;
        let lsn = active.buf.len() as u64;
        let commit = Commit::new(io.clone(), active.file.clone(), lsn);
        commit.retire_recovered(frozen.iter().map(|f| f.file.clone()).collect());
        Ok(Shard {
            ks,
            id,
            dir,
            cfg,
            io,
            clock,
            table,
            segs: RwLock::new(Arc::new(SegSet {
                active: active.clone(),
                frozen,
                sealed,
            })),
            writer: Mutex::new(Writer {
                active,
                next_gen,
                lsn,
                pending: HashMap::new(),
                updates: Vec::new(),
                idxs: Vec::new(),
            }),
            commit,
            maint: Mutex::new(()),
            spare: Mutex::new(None),
            ckpt: Mutex::new((ckpt_gen, entries_since)),
            stats: ShardStats::default(),
        })
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
/// buffer's pages.
const PREFAULT_LEAD: usize = 32 << 20;

/// Sealing writes a checkpoint once this many index entries (or as many as
/// the shard has timelines, if more) were sealed since the last one, so
/// recovery replays at most about that many entries plus the active logs.
const CHECKPOINT_MIN_ENTRIES: u64 = 100_000;

fn read_checkpoint(io: &dyn Io, dir: &Path, gen: u32) -> Result<Vec<CkptEntry>> {
    let path = dir.join(checkpoint::file_name(gen));
    let f = io.open(&path, OpenMode::Existing).map_err(ioe(&path))?;
    let len = f.len().map_err(ioe(&path))? as usize;
    let mut b = vec![0u8; len];
    f.read_at(&mut b, 0).map_err(ioe(&path))?;
    let (g, entries) = checkpoint::decode(&b).map_err(|e| Error::format(&path, 0, e))?;
    if g != gen {
        return Err(Error::corruption(
            &path,
            12,
            "checkpoint generation does not match its name",
        ));
    }
    Ok(entries)
}

/// First seq of the timeline in a log segment, its previous segment and the
/// head offset there.
fn chain_start(l: &LogSeg, id: u64, head: u32) -> Result<(u64, u32, u32)> {
    let bytes = l.buf.published();
    let mut cur = head;
    loop {
        let h = decode_header(bytes.get(cur as usize..).unwrap_or_default())
            .map_err(|e| Error::corruption(&l.path, cur as u64, e.to_string()))?;
        if h.timeline != id {
            return Err(Error::corruption(
                &l.path,
                cur as u64,
                "chain leads to another timeline",
            ));
        }
        if !is_local(h.prev) {
            return Ok(match crate::segment::continue_from(&h) {
                Step::Continue {
                    first_seq,
                    prev_gen,
                    prev_head,
                } => (first_seq, prev_gen, prev_head),
                Step::Done => (h.seq, NONE, NONE),
            });
        }
        // Jump by anchors when they lead further back.
        cur = if h.anchor != NONE && h.anchor < h.prev {
            h.anchor
        } else {
            h.prev
        };
    }
}

/// Rebuild one log segment from its file: every record that verifies, in
/// order, up to the first that does not (a torn tail), which is cut off.
fn recover_log(
    io: &dyn Io,
    dir: &Path,
    (ks, shard): (Keyspace, usize),
    gen: u32,
    table: &TimelineTable,
    cap: usize,
) -> Result<Option<Arc<LogSeg>>> {
    let path = dir.join(format::log_file_name(gen));
    let file = io.open(&path, OpenMode::Existing).map_err(ioe(&path))?;
    let len = file.len().map_err(ioe(&path))? as usize;
    if len < HEADER_LEN {
        // Torn at creation: no record can have been acknowledged in it.
        tracing::warn!(file = %path.display(), len, "removing log segment torn before its header");
        drop(file);
        io.remove_file(&path).map_err(ioe(&path))?;
        return Ok(None);
    }
    // Read straight into the buffer the segment will keep (no second copy);
    // it is published only up to the last record that verifies.
    let buf = Arc::new(AppendBuf::with_capacity(cap.max(len)).map_err(ioe(&path))?);
    buf.stage_with(0, len, |dst| file.read_at(dst, 0))
        .map_err(ioe(&path))?;
    let bytes = buf.staged(0, len);
    if bytes
        .get(..HEADER_LEN)
        .is_some_and(|h| h.iter().all(|&b| b == 0))
    {
        // The header page never reached the disk (a power cut after the
        // directory fsync; the file's first fdatasync would have written it),
        // so nothing in this file was ever acknowledged as durable.
        tracing::warn!(file = %path.display(), len, "removing log segment whose header never reached the disk");
        drop(file);
        io.remove_file(&path).map_err(ioe(&path))?;
        return Ok(None);
    }
    let header = SegmentHeader::decode(bytes).map_err(|e| Error::format(&path, 0, e))?;
    if header.gen != gen
        || header.kind != SegmentKind::Log
        || header.keyspace != ks as u8
        || header.shard != shard as u32
    {
        return Err(Error::corruption(
            &path,
            0,
            format!(
                "header (keyspace {}, shard {}, segment {}) does not match where the file is",
                header.keyspace, header.shard, header.gen
            ),
        ));
    }
    let mut off = HEADER_LEN;
    let (mut min_ts, mut max_ts, mut records) = (u64::MAX, 0u64, 0u64);
    while off < len {
        let Ok((h, _)) = decode(bytes.get(off..).unwrap_or_default()) else {
            break;
        };
        let idx = table.find_or_insert(h.timeline);
        let (last, pos) = table.with(idx, |m| m.snapshot());
        if h.prev != NONE && !is_local(h.prev) && pos.gen != gen && h.seq > last.saturating_add(1) {
            // The timeline's previous records were in an older log segment
            // whose unsynced tail a power cut took, while the kernel had
            // already written back these later pages. A roll does not sync
            // the old segment, but every completed sync covers all older
            // segments first (commit.rs), so nothing from here on was ever
            // acknowledged as durable: this is a torn tail too.
            tracing::warn!(
                file = %path.display(),
                offset = off,
                timeline = h.timeline,
                "records of an older segment were lost in a power cut; cutting this log here"
            );
            break;
        }
        let linked = if h.prev == NONE {
            // The timeline's first record ever.
            last == 0 && pos == Pos::NONE
        } else if !is_local(h.prev) {
            // First record here of a timeline continued from an older
            // segment (which may since have expired: the checkpoint keeps
            // its last seq).
            pos.gen != gen && Some(h.seq) == last.checked_add(1)
        } else {
            pos.gen == gen && pos.off == h.prev && Some(h.seq) == last.checked_add(1)
        };
        if !linked {
            return Err(Error::corruption(
                &path,
                off as u64,
                format!(
                    "record of timeline {} seq {} does not follow seq {last}",
                    h.timeline, h.seq
                ),
            ));
        }
        let na = if h.seq.is_multiple_of(SPARSE_EVERY) {
            off as u32
        } else if !is_local(h.prev) {
            NONE
        } else {
            h.anchor
        };
        table.with(idx, |m| {
            m.publish_with_anchor(
                h.seq,
                Pos {
                    gen,
                    off: off as u32,
                },
                na,
            )
        });
        min_ts = min_ts.min(h.ts_ms);
        max_ts = max_ts.max(h.ts_ms);
        records += 1;
        off += h.encoded_len();
    }
    if off < len {
        tracing::warn!(file = %path.display(), valid = off, len, "truncating torn or corrupt tail");
        file.set_len(off as u64).map_err(ioe(&path))?;
        file.sync_data().map_err(ioe(&path))?;
    }
    buf.publish(off);
    Ok(Some(Arc::new(LogSeg {
        gen,
        created_ms: header.created_ms,
        path,
        file,
        buf,
        max_ts: AtomicU64::new(max_ts),
        min_ts: AtomicU64::new(min_ts),
        records: AtomicU64::new(records),
    })))
}
