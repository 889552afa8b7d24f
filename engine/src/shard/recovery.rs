//! Recovery builds a shard from its directory: index checkpoints, sealed
//! segments, then the log segments replayed record by record (a torn or
//! corrupt tail is truncated).

use super::*;

impl Shard {
    /// Open (or create) the shard in `dir`, recovering whatever is there.
    pub fn open(
        id: usize,
        dir: PathBuf,
        cfg: KeyspaceConfig,
        io: Arc<dyn Io>,
        clock: Arc<dyn Clock>,
    ) -> Result<Shard> {
        io.create_dir_all(&dir).map_err(ioe(&dir))?;
        let mut r = Recovery {
            id,
            dir,
            cfg,
            io,
            clock,
            table: TimelineTable::new(),
            logs: BTreeSet::new(),
            segs: BTreeSet::new(),
            ckpts: BTreeSet::new(),
            sealed: Vec::new(),
            ckpt_gen: None,
            entries_since: 0,
        };
        r.scan_dir()?;
        r.open_sealed()?;
        r.load_index()?;
        r.build()
    }
}

/// A shard being recovered: each step reads one kind of file, and
/// [`build`](Recovery::build) turns what they found into the `Shard`.
struct Recovery {
    id: usize,
    dir: PathBuf,
    cfg: KeyspaceConfig,
    io: Arc<dyn Io>,
    clock: Arc<dyn Clock>,
    table: TimelineTable,
    logs: BTreeSet<u32>,
    segs: BTreeSet<u32>,
    ckpts: BTreeSet<u32>,
    sealed: Vec<Arc<SealedSeg>>,
    ckpt_gen: Option<u32>,
    entries_since: u64,
}

impl Recovery {
    /// Sort the directory's files by kind; remove leftovers of interrupted
    /// writes (`*.tmp`).
    fn scan_dir(&mut self) -> Result<()> {
        let (io, dir) = (&self.io, &self.dir);
        for name in io.list_dir(dir).map_err(ioe(dir))? {
            match format::parse_file_name(&name) {
                Some(FileName::Temp) => {
                    let p = dir.join(&name);
                    io.remove_file(&p).map_err(ioe(&p))?;
                }
                Some(FileName::Log(g)) => {
                    self.logs.insert(g);
                }
                Some(FileName::Sealed(g)) => {
                    self.segs.insert(g);
                }
                Some(FileName::Checkpoint(g)) => {
                    self.ckpts.insert(g);
                }
                None => tracing::warn!(file = %name, "ignoring unknown file in shard directory"),
            }
        }
        Ok(())
    }

    /// Open the sealed segments. A sealed copy replaces its log only once
    /// verified; a damaged or incomplete one is dropped while its log is
    /// still there to reseal from.
    fn open_sealed(&mut self) -> Result<()> {
        let (io, dir) = (&self.io, &self.dir);
        for &g in &self.segs {
            let path = dir.join(format::seg_file_name(g));
            let file = io.open(&path, OpenMode::Existing).map_err(ioe(&path))?;
            let map = file.map().map_err(ioe(&path))?;
            match SealedSeg::open(self.cfg.id.0, self.id as u32, g, path.clone(), map) {
                Ok(s) if self.logs.contains(&g) && s.verify_index().is_err() => {
                    tracing::warn!(file = %path.display(), "discarding sealed segment with a damaged index; resealing from its log");
                    drop(s);
                    io.remove_file(&path).map_err(ioe(&path))?;
                }
                Ok(s) => {
                    if self.logs.remove(&g) {
                        let lp = dir.join(format::log_file_name(g));
                        io.remove_file(&lp).map_err(ioe(&lp))?;
                    }
                    self.sealed.push(Arc::new(s));
                }
                Err(e) if self.logs.contains(&g) => {
                    // Sealing was interrupted; the log still holds the truth.
                    tracing::warn!(error = %e, "discarding incomplete sealed segment");
                    io.remove_file(&path).map_err(ioe(&path))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The timeline table of the sealed data: the newest checkpoint, then
    /// the index entries of every sealed segment newer than it.
    fn load_index(&mut self) -> Result<()> {
        // Older checkpoints are leftovers of an interrupted cleanup.
        self.ckpt_gen = self.ckpts.last().copied();
        for &g in self.ckpts.iter().rev().skip(1) {
            let p = self.dir.join(checkpoint::file_name(g));
            self.io.remove_file(&p).map_err(ioe(&p))?;
        }
        let table = &self.table;
        let publish = |timeline: u64, last_seq: u64, pos: Pos| {
            let idx = table.find_or_insert(timeline);
            table.with(idx, |m| m.publish(last_seq, pos));
        };
        if let Some(g) = self.ckpt_gen {
            let entries = read_checkpoint(&*self.io, &self.dir, g)?;
            table.reserve(entries.len());
            for e in entries {
                publish(
                    e.timeline,
                    e.last_seq,
                    Pos {
                        gen: e.gen,
                        off: e.loc,
                    },
                );
            }
        }
        let ckpt_gen = self.ckpt_gen;
        for s in self
            .sealed
            .iter()
            .filter(|s| ckpt_gen.is_none_or(|c| s.gen > c))
        {
            self.entries_since += s.footer.entries as u64;
            for e in s.entries()? {
                let e = e?;
                publish(
                    e.timeline,
                    e.last_seq,
                    Pos {
                        gen: s.gen,
                        off: e.loc,
                    },
                );
            }
        }
        Ok(())
    }

    /// Replay the log segments (the newest becomes the active one if it has
    /// room), make what readers will see durable, and build the shard.
    fn build(self) -> Result<Shard> {
        let Recovery {
            logs, segs, ckpts, ..
        } = &self;
        let (io, dir, cfg, table) = (&self.io, &self.dir, &self.cfg, &self.table);
        let id = self.id;
        let ks = cfg.id;
        let max_gen = logs.iter().chain(segs).chain(ckpts).copied().max();
        let mut next_gen = max_gen.map(|g| g + 1).unwrap_or(0);
        let mut frozen = Vec::new();
        let mut active: Option<(Arc<LogSeg>, Tail)> = None;
        let cap = cfg.segment_bytes as usize;
        for &g in logs {
            let Some(seg) = recover_log(&**io, dir, (ks, id), g, table, cap)? else {
                continue;
            };
            // Only the newest log may stay the active one.
            if Some(&g) == logs.last() {
                active = Some(seg);
            } else {
                frozen.push(seg.0);
            }
        }
        let now = self.clock.now_ms();
        let (active, tail) = match active {
            Some((a, t)) if a.buf.capacity() - a.buf.len() > 4096 => (a, t),
            other => {
                frozen.extend(other.map(|(a, _)| a));
                let a = Shard::new_log_seg(&**io, dir, ks, id, next_gen, now, cap, None)?;
                next_gen += 1;
                a
            }
        };
        active.file.sync_data().map_err(ioe(&active.path))?;
        let lsn = active.buf.len() as u64;
        let commit = Commit::new(io.clone(), active.file.clone(), lsn);
        commit.retire_recovered(frozen.iter().map(|f| f.file.clone()).collect());
        Ok(Shard {
            ks,
            id,
            dir: self.dir,
            cfg: self.cfg,
            io: self.io,
            clock: self.clock,
            table: self.table,
            segs: RwLock::new(Arc::new(SegSet {
                active: active.clone(),
                frozen,
                sealed: self.sealed,
            })),
            writer: Mutex::new(Writer {
                active,
                tail,
                next_gen,
                lsn,
                pending: HashMap::new(),
                updates: Vec::new(),
                idxs: Vec::new(),
            }),
            commit,
            maint: Mutex::new(()),
            spare: Mutex::new(None),
            ckpt: Mutex::new((self.ckpt_gen, self.entries_since)),
            released: Mutex::new(HashMap::new()),
            no_room_until_ms: AtomicU64::new(0),
            stats: ShardStats::default(),
        })
    }
}

pub(super) fn read_checkpoint(io: &dyn Io, dir: &Path, gen: u32) -> Result<Vec<CkptEntry>> {
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

/// Rebuild one log segment from its file: every record that verifies, in
/// order, up to the first that does not (a torn tail), which is cut off.
fn recover_log(
    io: &dyn Io,
    dir: &Path,
    (ks, shard): (Keyspace, usize),
    gen: u32,
    table: &TimelineTable,
    cap: usize,
) -> Result<Option<(Arc<LogSeg>, Tail)>> {
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
    let mut tail = Tail::with_capacity(cap.max(len)).map_err(ioe(&path))?;
    tail.stage_with(0, len, |dst| file.read_at(dst, 0))
        .map_err(ioe(&path))?;
    let bytes = tail.staged(0, len);
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
        || header.keyspace != ks.0
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
        let na = record::next_anchor(h.seq, off as u32, h.prev, h.anchor);
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
    tail.publish(off);
    let buf = tail.buf().clone();
    let seg = Arc::new(LogSeg {
        gen,
        created_ms: header.created_ms,
        path,
        file,
        buf,
        max_ts: AtomicU64::new(max_ts),
        min_ts: AtomicU64::new(min_ts),
        records: AtomicU64::new(records),
    });
    Ok(Some((seg, tail)))
}
