//! Sealing: frozen log segments become sealed (regrouped or log-ordered)
//! segments with their index, and index checkpoints bound recovery.

use super::recovery::read_checkpoint;
use super::*;

/// How long a shard seals in log order after a regrouped copy found no
/// room (see `seal_one`).
const NO_ROOM_BACKOFF_MS: u64 = 60_000;

impl Shard {
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
    ///
    /// A keyspace that regroups copies the segment into a new file. When
    /// the disk has no room for that copy (`ENOSPC`), the segment is sealed
    /// in log order instead: its index appended to the log file itself, a
    /// few dozen bytes per timeline. Otherwise a nearly full disk would
    /// hold up sealing, and with it every append behind it, until a whole
    /// segment's worth were free. Reads of it walk its records' chains, as
    /// in a keyspace that does not regroup. For [`NO_ROOM_BACKOFF_MS`]
    /// after that, the shard's seals go in log order at once: each copy
    /// tried on a nearly full disk takes all the room there is until it
    /// fails, and other writes meet a full disk meanwhile.
    fn seal_one(&self, f: &Arc<LogSeg>) -> Result<u64> {
        let bytes = f.buf.published();
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            keyspace: self.ks.0,
            shard: self.id as u32,
            gen: f.gen,
            created_ms: f.created_ms,
        };
        let build = |regroup| {
            build_sealed(bytes, header, regroup)
                .map_err(|e| Error::corruption(&f.path, 0, e.to_string()))
        };
        let seg_path = self.seg_path(f.gen);
        let now = self.clock.now_ms();
        let room = now >= self.no_room_until_ms.load(Ordering::Relaxed);
        let (out, mut footer) = build(self.cfg.regroup && room)?;
        let grouped = match out {
            SealOutput::Grouped(v) => {
                match self.write_new_file(&format::tmp_file_name(f.gen), &seg_path, &v) {
                    Ok(()) => true,
                    Err(e) if e.is_storage_full() => {
                        tracing::warn!(segment = %f.path.display(), error = %e,
                            "no room to regroup a segment: sealed in log order");
                        self.no_room_until_ms
                            .store(now.saturating_add(NO_ROOM_BACKOFF_MS), Ordering::Relaxed);
                        let (SealOutput::Grouped(v) | SealOutput::Appendix(v), log_order) =
                            build(false)?;
                        footer = log_order;
                        self.append_index(f, bytes.len(), &seg_path, &v)?;
                        self.stats
                            .seals_in_log_order
                            .fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    Err(e) => return Err(e),
                }
            }
            SealOutput::Appendix(v) => {
                self.append_index(f, bytes.len(), &seg_path, &v)?;
                if self.cfg.regroup {
                    self.stats
                        .seals_in_log_order
                        .fetch_add(1, Ordering::Relaxed);
                }
                false
            }
        };
        let file = self
            .io
            .open(&seg_path, OpenMode::Existing)
            .map_err(ioe(&seg_path))?;
        let map = file.map().map_err(ioe(&seg_path))?;
        let sealed = Arc::new(SealedSeg::open(
            self.ks.0,
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
        if grouped {
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

    /// Seal log segment `f` (`len` bytes published) in log order: append
    /// its index and footer (`appendix`) to the file itself, fdatasync,
    /// rename it to `seg_path`.
    fn append_index(&self, f: &LogSeg, len: usize, seg_path: &Path, appendix: &[u8]) -> Result<()> {
        // A previous attempt got as far as the rename: only the rest is left.
        if !self.exists(&f.path)? {
            return Ok(());
        }
        // After a failed fdatasync the file's pages on disk are unknown (the
        // kernel may have dropped them, and a new fdatasync on the same
        // file would report success): left a log, recovery cuts it at its
        // first bad record; renamed a segment, it would be trusted whole.
        self.check_poison()?;
        // A failed write may have left garbage past the published end; the
        // footer must be the file's last bytes.
        f.file.set_len(len as u64).map_err(ioe(&f.path))?;
        f.file
            .write_at(appendix, len as u64)
            .map_err(ioe(&f.path))?;
        if let Err(e) = f.file.sync_data() {
            // The log's dirty pages may be gone (fsyncgate): nothing later
            // may be acknowledged on top of them.
            self.commit
                .mark_failed(format!("fdatasync failed while sealing: {e}"));
            return Err(Error::io(&f.path, e));
        }
        self.io.rename(&f.path, seg_path).map_err(ioe(&f.path))?;
        self.io.sync_dir(&self.dir).map_err(ioe(&self.dir))?;
        self.stats
            .bytes_written
            .fetch_add(appendix.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Create `path` with `bytes` so that a crash leaves either no file or
    /// the whole file: write under the temporary name `tmp` (removed by
    /// recovery, and at once if the write fails: on a full disk, what it
    /// wrote would take the space appends need), fdatasync, rename, fsync
    /// the directory.
    fn write_new_file(&self, tmp: &str, path: &Path, bytes: &[u8]) -> Result<()> {
        const CHUNK: usize = 8 << 20;
        let tmp = self.dir.join(tmp);
        let _ = self.io.remove_file(&tmp);
        let file = self.io.open(&tmp, OpenMode::CreateNew).map_err(ioe(&tmp))?;
        let written = bytes
            .chunks(CHUNK)
            .enumerate()
            .try_for_each(|(i, chunk)| file.write_at(chunk, (i * CHUNK) as u64))
            .and_then(|()| file.sync_data());
        let written = written.and_then(|()| {
            drop(file);
            self.io.rename(&tmp, path)
        });
        if let Err(e) = written {
            let _ = self.io.remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        self.io.sync_dir(&self.dir).map_err(ioe(&self.dir))?;
        self.stats
            .bytes_written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Write an index checkpoint covering every sealed segment: the previous
    /// checkpoint merged with the index entries of segments sealed since.
    /// Caller holds the maintenance lock.
    pub(super) fn write_checkpoint(&self) -> Result<()> {
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
}
