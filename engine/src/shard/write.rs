//! The write path: append into the active buffer, flush to the file and
//! publish, roll to a new segment, wait for group commit.

use super::*;
use crate::io::WriteSyncError;

/// Where the first item of an append goes (or, `Seqs`, every item).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum At<'a> {
    /// After its timeline's last record (every append but the two below).
    Next,
    /// At this SeqId, its timeline being empty (`Engine::append_at`).
    Start(u64),
    /// After its timeline's last record, only if that is this SeqId
    /// (`Engine::append_after`); `Error::NotLast` otherwise.
    After(u64),
    /// Each item at the SeqId of the same index (0: wherever it lands);
    /// `Error::NotLast` before anything is staged if one would not
    /// (`Engine::append_batch_expecting`).
    Seqs(&'a [u64]),
}

/// Each item's SeqId in a batch (the last of its timeline, as
/// `resolve_batch_state` gave it in `idxs`, plus the items before it of
/// the same timeline) against `expect` (0: any).
fn check_expected(
    items: &[(u64, &[u8])],
    idxs: &[(u32, (u64, Pos, u32))],
    expect: &[u64],
) -> Result<()> {
    let mut last: HashMap<u32, u64> = HashMap::new();
    for (k, &(id, _)) in items.iter().enumerate() {
        let (idx, state) = idxs[k];
        let prev = last.get(&idx).copied().unwrap_or(state.0);
        let seq = prev.saturating_add(1);
        match expect.get(k).copied().unwrap_or(0) {
            0 => {}
            e if e == seq => {}
            e => {
                return Err(Error::NotLast {
                    timeline: id,
                    expected: e - 1,
                    last: prev,
                })
            }
        }
        last.insert(idx, seq);
    }
    Ok(())
}

impl Shard {
    /// Append `items` (timeline id, payload) in order; pushes each SeqId to
    /// `seqs`. Returns the shard LSN just past the last byte written, whether
    /// a segment was frozen (and needs sealing), and whether the maintenance
    /// thread should populate the active buffer further ahead.
    ///
    /// `first`: where the first item goes ([`At`]); every later one goes
    /// after its timeline's last record.
    pub fn append(
        &self,
        items: &[(u64, &[u8])],
        seqs: &mut Vec<u64>,
        durability: Durability,
        first: At<'_>,
    ) -> Result<(u64, bool, bool)> {
        let mut w = self.writer.lock();
        self.check_poison()?;
        let mut idxs = std::mem::take(&mut w.idxs);
        self.table
            .resolve_batch_state(items.iter().map(|(id, _)| *id), &mut idxs);
        // Before anything changes (a roll included): a refused batch leaves
        // the shard as it was.
        if let At::Seqs(expect) = first {
            if let Err(e) = check_expected(items, &idxs, expect) {
                w.idxs = idxs;
                return Err(e);
            }
        }
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
        let mut payload_bytes = 0u64;
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
            let seq = match first {
                // Checked before anything of the batch is staged.
                At::Start(f) if k == 0 => {
                    if last != 0 || f == 0 || f == u64::MAX {
                        return Err(Error::InvalidArgument(format!(
                            "timeline {id} cannot start at seq {f} (its last seq is {last})"
                        )));
                    }
                    f
                }
                At::After(expected) if k == 0 && last != expected => {
                    return Err(Error::NotLast {
                        timeline: id,
                        expected,
                        last,
                    });
                }
                _ => last.checked_add(1).ok_or_else(|| {
                    Error::InvalidArgument(format!("timeline {id} has no SeqIds left"))
                })?,
            };
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
            w.tail
                .stage_with(cursor, rl, |dst| record::encode_into(&h, payload, dst));
            cursor += rl;
            let na = record::next_anchor(seq, off, prev, anchor);
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
        let wants_prefault =
            b.prefaulted() < (b.len() + prefault_lead(b.len()) / 2).min(b.capacity());
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
        b.prefault_to(b.len() + prefault_lead(b.len()));
        let cap = self.cfg.segment_bytes as usize;
        if b.len() > b.capacity() / 2 && self.spare.lock().is_none() {
            if let Ok(n) = Tail::with_capacity(cap) {
                n.buf().prefault_to(cap);
                let mut slot = self.spare.lock();
                if slot.is_none() {
                    *slot = Some(n.into_buf());
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
        let bytes = w.tail.staged(start, end);
        if durability == Durability::Sync {
            // An fdatasync of earlier files: any failure, a full disk's
            // included, may have dropped their dirty pages: poisoned.
            if let Err(e) = self.commit.sync_retired() {
                self.commit
                    .mark_failed(format!("fdatasync of a retired segment failed: {e}"));
                return Err(Error::io(&seg.path, e));
            }
        }
        let r = match durability {
            Durability::Sync => seg.file.write_and_sync(bytes, start as u64).map_err(|e| {
                if let WriteSyncError::Sync(e) = &e {
                    // Any failure, a full disk's included, may have
                    // dropped dirty pages: poisoned.
                    self.commit.mark_failed(format!("fdatasync failed: {e}"));
                }
                std::io::Error::from(e)
            }),
            _ => seg.file.write_at(bytes, start as u64),
        };
        if let Err(e) = r {
            // Nothing was published. A short write may have left whole
            // records of this batch in the file, checksums and all: were
            // they left there, recovery would bring them back (a refused
            // write come back), or, behind a later shorter write, find a
            // broken chain and refuse to open. So they are zeroed: over
            // what the short write wrote that needs no new space.
            invalidate(&*seg.file, start as u64, end - start);
            return Err(Error::io(&seg.path, e));
        }
        w.tail.publish(end);
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
        let (new, tail) = Self::new_log_seg(
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
        w.tail = tail;
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
    fn take_spare(&self) -> Option<Tail> {
        let mut slot = self.spare.lock();
        match Tail::reclaim(slot.take()?) {
            Ok(t) => Some(t),
            Err(b) => {
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
            keyspace: self.cfg.name.clone(),
            shard: self.id,
            reason,
        })
    }

    pub fn wait_durable(&self, lsn: u64) -> Result<()> {
        self.commit.wait(lsn).map_err(|reason| Error::Poisoned {
            keyspace: self.cfg.name.clone(),
            shard: self.id,
            reason,
        })
    }
}

/// Zero `[at, at + len)` of `file`, front to back in pages, stopping at
/// the first write that fails (on a full disk: past what a short write
/// left, where nothing valid can be). Recovery cuts a log at the first
/// record whose checksum fails, and a zeroed header's does.
fn invalidate(file: &dyn crate::io::IoFile, at: u64, len: usize) {
    let zeros = [0u8; 4096];
    let mut done = 0usize;
    while done < len {
        let k = (len - done).min(zeros.len());
        if file.write_at(&zeros[..k], at + done as u64).is_err() {
            return;
        }
        done += k;
    }
}
