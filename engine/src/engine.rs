//! The public engine: keyspaces of sharded timelines, the append and read
//! API, background maintenance, statistics. (Over 600 lines on purpose: it
//! is the whole public API in one place, a third of it doc comments.)

use crate::config::{Config, Durability, Keyspace, KeyspaceConfig};
use crate::error::{Error, Result};
use crate::format;
use crate::index::table::hash_id;
use crate::io::{default_io, Io, OpenMode};
use crate::shard::{At, Shard};
pub use crate::stats::{KeyspaceStats, Stats};
use crate::Record;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A timeline: a keyspace and an id in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimelineId {
    pub keyspace: Keyspace,
    pub id: u64,
}

impl TimelineId {
    pub fn new(keyspace: Keyspace, id: u64) -> Self {
        TimelineId { keyspace, id }
    }
    /// Timeline `id` of [`Keyspace::STORE`] (the default configuration's).
    pub fn store(id: u64) -> Self {
        Self::new(Keyspace::STORE, id)
    }
    /// Timeline `id` of [`Keyspace::SYNC`] (the default configuration's).
    pub fn sync(id: u64) -> Self {
        Self::new(Keyspace::SYNC, id)
    }
}

/// A per-timeline sequence number: 1, 2, 3, ... with no gaps.
pub type SeqId = u64;

/// Scan direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Ascending from `from`.
    Forward,
    /// Descending from `from` (newest-first history paging; `u64::MAX` = from the newest).
    Backward,
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub rolled: usize,
    pub sealed: usize,
    pub dropped: usize,
}

/// Appends handed to the OS whose durability is still pending: keep many in
/// flight from one thread, then [`wait`](AppendTicket::wait) (group commit).
#[derive(Debug)]
#[must_use = "an append is not durable until its ticket is waited on"]
pub struct AppendTicket {
    seqs: Vec<SeqId>,
    waits: Vec<(Arc<Shard>, u64)>,
}

impl AppendTicket {
    /// The SeqIds assigned, in the order of the items appended.
    pub fn seqs(&self) -> &[SeqId] {
        &self.seqs
    }
    /// True once an fdatasync covering every append of the ticket completed.
    pub fn is_durable(&self) -> bool {
        self.waits.iter().all(|(s, lsn)| s.is_durable(*lsn))
    }
    /// Block until durable (leading a shared fdatasync if none is running).
    pub fn wait(self) -> Result<Vec<SeqId>> {
        for (s, lsn) in &self.waits {
            s.wait_durable(*lsn)?;
        }
        Ok(self.seqs)
    }
}

struct KeyspaceState {
    id: Keyspace,
    name: String,
    shards: Vec<Arc<Shard>>,
}

struct Inner {
    dir: PathBuf,
    cfg: Config,
    io: Arc<dyn Io>,
    keyspaces: Vec<KeyspaceState>,
    /// Keyspace id -> index into `keyspaces`.
    slot: [Option<u8>; 256],
    closed: AtomicBool,
    wake: crossbeam_channel::Sender<()>,
    maint_thread: Mutex<Option<JoinHandle<()>>>,
}

/// The Timeline store. Cheap to clone; usable from many threads at once.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Engine({})", self.inner.dir.display())
    }
}

/// Frozen (full, not yet sealed) segments a shard may hold before appenders
/// seal inline.
const MAX_FROZEN_PER_SHARD: usize = 2;

fn decode_meta(path: &Path, b: &[u8]) -> Result<u32> {
    format::meta::decode(b).map_err(|e| Error::format(path, 0, e))
}

/// Refuse to open a directory holding segments of a keyspace the
/// configuration does not list (they would silently disappear).
fn check_no_unlisted_keyspace(io: &dyn Io, dir: &Path, cfg: &Config) -> Result<()> {
    let names = io.list_dir(dir).map_err(|e| Error::io(dir, e))?;
    for n in names {
        if cfg.keyspaces.iter().any(|k| k.name == n) {
            continue;
        }
        let shard0 = dir.join(&n).join("000");
        let holds_segments = io
            .list_dir(&shard0)
            .is_ok_and(|f| f.iter().any(|f| format::parse_file_name(f).is_some()));
        if holds_segments {
            return Err(Error::InvalidArgument(format!(
                "{} holds keyspace data, but no configured keyspace is named {n:?}",
                dir.join(&n).display()
            )));
        }
    }
    Ok(())
}

impl Engine {
    /// Open the engine in `dir`, creating it if empty, recovering it otherwise.
    pub fn open(dir: impl AsRef<Path>, cfg: Config) -> Result<Engine> {
        let dir = dir.as_ref().to_path_buf();
        cfg.validate()?;
        let io = cfg.io.clone().unwrap_or_else(default_io);
        io.create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        check_no_unlisted_keyspace(io.as_ref(), &dir, &cfg)?;
        let meta_path = dir.join(format::meta::META_FILE);
        let shards = match io.open(&meta_path, OpenMode::Existing) {
            Ok(f) => {
                let len = f.len().map_err(|e| Error::io(&meta_path, e))? as usize;
                let mut b = vec![0u8; len.min(64)];
                f.read_at(&mut b, 0).map_err(|e| Error::io(&meta_path, e))?;
                decode_meta(&meta_path, &b)? as usize
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let tmp = dir.join("engine.meta.tmp");
                let _ = io.remove_file(&tmp);
                let f = io
                    .open(&tmp, OpenMode::CreateNew)
                    .map_err(|e| Error::io(&tmp, e))?;
                f.write_at(&format::meta::encode(cfg.shards as u32), 0)
                    .map_err(|e| Error::io(&tmp, e))?;
                f.sync_data().map_err(|e| Error::io(&tmp, e))?;
                io.rename(&tmp, &meta_path)
                    .map_err(|e| Error::io(&tmp, e))?;
                io.sync_dir(&dir).map_err(|e| Error::io(&dir, e))?;
                cfg.shards
            }
            Err(e) => return Err(Error::io(&meta_path, e)),
        };
        // Shards recover independently: spread them over the cores
        // (recovery is CPU-bound once the files are in the page cache).
        let jobs: Vec<(&KeyspaceConfig, usize)> = cfg
            .keyspaces
            .iter()
            .flat_map(|k| (0..shards).map(move |s| (k, s)))
            .collect();
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(jobs.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let opened: Mutex<Vec<Option<Result<Shard>>>> =
            Mutex::new((0..jobs.len()).map(|_| None).collect());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(ks, s)) = jobs.get(k) else { return };
                    let r = Shard::open(
                        s,
                        dir.join(&ks.name).join(format!("{s:03}")),
                        ks.clone(),
                        io.clone(),
                        cfg.clock.clone(),
                    );
                    opened.lock()[k] = Some(r);
                });
            }
        });
        let mut opened = opened.into_inner().into_iter();
        let mut keyspaces = Vec::with_capacity(cfg.keyspaces.len());
        let mut slot = [None; 256];
        for (i, k) in cfg.keyspaces.iter().enumerate() {
            let mut v = Vec::with_capacity(shards);
            for _ in 0..shards {
                let r = opened.next().flatten().ok_or(Error::Closed)?;
                v.push(Arc::new(r?));
            }
            slot[k.id.0 as usize] = Some(i as u8);
            keyspaces.push(KeyspaceState {
                id: k.id,
                name: k.name.clone(),
                shards: v,
            });
        }
        // The directory's shard count wins over the requested one.
        let mut cfg = cfg;
        cfg.shards = shards;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let engine = Engine {
            inner: Arc::new(Inner {
                dir,
                cfg,
                io,
                keyspaces,
                slot,
                closed: AtomicBool::new(false),
                wake: tx,
                maint_thread: Mutex::new(None),
            }),
        };
        if engine.inner.cfg.background {
            let weak = Arc::downgrade(&engine.inner);
            let interval = engine.inner.cfg.maintenance_interval;
            let h = std::thread::Builder::new()
                .name("timeline-maint".into())
                .spawn(move || loop {
                    let woke = rx.recv_timeout(interval);
                    if matches!(woke, Err(crossbeam_channel::RecvTimeoutError::Disconnected)) {
                        return;
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.closed.load(Ordering::Acquire) {
                        return;
                    }
                    if let Err(e) = (Engine { inner }).maintain() {
                        tracing::warn!(error = %e, "maintenance pass failed");
                    }
                })
                .map_err(|e| Error::io("<thread>", e))?;
            *engine.inner.maint_thread.lock() = Some(h);
            // First pass now: seal what recovery left, prefault the buffers.
            let _ = engine.inner.wake.try_send(());
        } else {
            // Recovery may have left full segments to seal.
            for ks in &engine.inner.keyspaces {
                for s in &ks.shards {
                    s.seal_pending()?;
                }
            }
        }
        Ok(engine)
    }

    /// The file backend in use ("io_uring", "std", "mem").
    pub fn io_name(&self) -> &'static str {
        self.inner.io.name()
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    fn keyspace(&self, ks: Keyspace) -> Result<&KeyspaceState> {
        self.inner.slot[ks.0 as usize]
            .and_then(|i| self.inner.keyspaces.get(i as usize))
            .ok_or_else(|| Error::InvalidArgument(format!("{ks} is not configured")))
    }

    fn shard(&self, tl: TimelineId) -> Result<&Arc<Shard>> {
        let ks = self.keyspace(tl.keyspace)?;
        ks.shards
            .get(self.shard_index(tl))
            .ok_or_else(|| Error::InvalidArgument(format!("{} has no shards", ks.name)))
    }

    /// Which shard of its keyspace holds `tl` (`0..shard_count()`). Every
    /// keyspace has the same shard count and hash, so timeline `x` lands on
    /// the same index in each: a caller can give each index one writer.
    pub fn shard_index(&self, tl: TimelineId) -> usize {
        (hash_id(tl.id) >> 32) as usize % self.shard_count()
    }

    /// Shards per keyspace.
    pub fn shard_count(&self) -> usize {
        self.inner.cfg.shards
    }

    /// The keyspaces this engine opened, in config order.
    pub fn keyspaces(&self) -> impl Iterator<Item = (Keyspace, &str)> {
        self.inner.keyspaces.iter().map(|k| (k.id, k.name.as_str()))
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn check_payload(&self, p: &[u8]) -> Result<()> {
        if p.len() > self.inner.cfg.max_payload {
            return Err(Error::PayloadTooLarge {
                len: p.len(),
                max: self.inner.cfg.max_payload,
            });
        }
        Ok(())
    }

    /// Append one payload with the default durability (group commit).
    pub fn append(&self, tl: TimelineId, payload: &[u8]) -> Result<SeqId> {
        self.append_with(tl, payload, Durability::GroupCommit)
    }

    /// Append one payload with the given durability.
    pub fn append_with(&self, tl: TimelineId, payload: &[u8], d: Durability) -> Result<SeqId> {
        let v = self.append_batch(&[(tl, payload)], d)?;
        v.first()
            .copied()
            .ok_or_else(|| Error::InvalidArgument("empty append".into()))
    }

    /// Append to many timelines in one call; SeqIds come back in item order.
    /// Items of one shard are written with one write; the batch is not atomic
    /// across shards (on error, some shards may hold their part).
    pub fn append_batch(&self, items: &[(TimelineId, &[u8])], d: Durability) -> Result<Vec<SeqId>> {
        let t = self.append_inner(items, d, At::Next)?;
        match d {
            Durability::GroupCommit => t.wait(),
            _ => Ok(t.seqs),
        }
    }

    /// [`append_batch`](Self::append_batch) only if every item lands at the
    /// SeqId `expect` names for it (0: wherever it lands): else
    /// `Error::NotLast` for the first item that would not, and nothing of
    /// the batch is written. The items must share one shard (one write; the
    /// check and the write happen under its writer lock): `InvalidArgument`
    /// otherwise. What an owner of timelines that others may append to by
    /// mistake needs (the IM layer's batches), so that a foreign record
    /// never leaves part of its batch stored.
    pub fn append_batch_expecting(
        &self,
        items: &[(TimelineId, &[u8])],
        expect: &[SeqId],
        d: Durability,
    ) -> Result<Vec<SeqId>> {
        if expect.len() != items.len() {
            return Err(Error::InvalidArgument(format!(
                "{} expected seqs for {} items",
                expect.len(),
                items.len()
            )));
        }
        if !self.one_shard(items) {
            return Err(Error::InvalidArgument(
                "a batch with expected seqs must stay within one shard".into(),
            ));
        }
        let t = self.append_inner(items, d, At::Seqs(expect))?;
        match d {
            Durability::GroupCommit => t.wait(),
            _ => Ok(t.seqs),
        }
    }

    /// Whether every item of `items` is in one shard of one keyspace.
    fn one_shard(&self, items: &[(TimelineId, &[u8])]) -> bool {
        items.windows(2).all(|w| {
            w[0].0.keyspace == w[1].0.keyspace
                && self.shard_index(w[0].0) == self.shard_index(w[1].0)
        })
    }

    /// Append `payload` to an empty timeline as its SeqId `seq` (≥ 1). The
    /// timeline then reads as one whose records before `seq` are gone:
    /// `first_retained_seq` is `seq`, a scan from below it starts at it,
    /// and later appends continue from it. What a replica restored from
    /// another's data needs where retention had dropped the start
    /// (`timeline-cluster`'s snapshots). `InvalidArgument` if the timeline
    /// ever had a record.
    pub fn append_at(
        &self,
        tl: TimelineId,
        seq: SeqId,
        payload: &[u8],
        d: Durability,
    ) -> Result<SeqId> {
        let t = self.append_inner(&[(tl, payload)], d, At::Start(seq))?;
        let seqs = match d {
            Durability::GroupCommit => t.wait()?,
            _ => t.seqs,
        };
        seqs.first()
            .copied()
            .ok_or_else(|| Error::InvalidArgument("empty append".into()))
    }

    /// Append `payload` to `tl` only if the timeline's last SeqId is still
    /// `last` (0: empty): a compare-and-append. `Ok(None)`, nothing
    /// written, if another append came first. What an owner rewriting a
    /// timeline's last record at its end needs (so that the record's old
    /// copy can be released) when the timeline's writer may append a newer
    /// one meanwhile: the copy must never land after the newer record.
    pub fn append_after(
        &self,
        tl: TimelineId,
        last: SeqId,
        payload: &[u8],
        d: Durability,
    ) -> Result<Option<SeqId>> {
        let t = match self.append_inner(&[(tl, payload)], d, At::After(last)) {
            Ok(t) => t,
            Err(Error::NotLast { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let seqs = match d {
            Durability::GroupCommit => t.wait()?,
            _ => t.seqs,
        };
        Ok(seqs.first().copied())
    }

    /// Append and return at once (the bytes are with the OS); the ticket
    /// makes them durable with a shared fdatasync. Keep many tickets in
    /// flight from one thread to get group-commit throughput without a
    /// thread per append.
    pub fn append_async(&self, items: &[(TimelineId, &[u8])]) -> Result<AppendTicket> {
        self.append_inner(items, Durability::Buffered, At::Next)
    }

    /// `first`: where `items[0]` goes (one item: [`Engine::append_at`],
    /// [`Engine::append_after`]).
    fn append_inner(
        &self,
        items: &[(TimelineId, &[u8])],
        d: Durability,
        first: At<'_>,
    ) -> Result<AppendTicket> {
        debug_assert!(
            matches!(first, At::Next | At::Seqs(_)) || items.len() == 1,
            "one item only"
        );
        self.check_open()?;
        for (_, p) in items {
            self.check_payload(p)?;
        }
        let mut seqs = vec![0u64; items.len()];
        let mut waits = Vec::new();
        // Group by shard, keeping item order within a shard.
        let single_shard = self.one_shard(items);
        let mut froze_any = false;
        let mut wake_any = false;
        if single_shard {
            if let Some((tl, _)) = items.first() {
                let shard = self.shard(*tl)?;
                let list: Vec<(u64, &[u8])> = items.iter().map(|(t, p)| (t.id, *p)).collect();
                let mut out = Vec::with_capacity(items.len());
                let (lsn, froze, wake) = shard.append(&list, &mut out, d, first)?;
                froze_any |= froze;
                wake_any |= wake;
                seqs.copy_from_slice(&out);
                waits.push((shard.clone(), lsn));
            }
        } else {
            let mut groups: Vec<(Arc<Shard>, Vec<usize>)> = Vec::new();
            for (i, (tl, _)) in items.iter().enumerate() {
                let s = self.shard(*tl)?;
                match groups.iter_mut().find(|(g, _)| Arc::ptr_eq(g, s)) {
                    Some((_, v)) => v.push(i),
                    None => groups.push((s.clone(), vec![i])),
                }
            }
            for (shard, idxs) in groups {
                let list: Vec<(u64, &[u8])> =
                    idxs.iter().map(|&i| (items[i].0.id, items[i].1)).collect();
                let mut out = Vec::with_capacity(list.len());
                // `first` comes with one item: the single-shard path.
                let (lsn, froze, wake) = shard.append(&list, &mut out, d, At::Next)?;
                froze_any |= froze;
                wake_any |= wake;
                for (k, &i) in idxs.iter().enumerate() {
                    seqs[i] = out[k];
                }
                waits.push((shard, lsn));
            }
        }
        if froze_any {
            // Backpressure: frozen segments hold `segment_bytes` of memory
            // each until sealed; if the background sealer falls this far
            // behind, the appender that froze one seals inline.
            let behind = waits
                .iter()
                .any(|(s, _)| s.segs().frozen.len() > MAX_FROZEN_PER_SHARD);
            if self.inner.cfg.background && !behind {
                let _ = self.inner.wake.try_send(());
            } else {
                // The append itself succeeded: a sealing failure must not turn
                // it into an error (the caller would retry and store it twice).
                // The frozen segment stays readable in memory and sealing is
                // retried by the next roll or `maintain`.
                for (s, _) in &waits {
                    if let Err(e) = s.seal_pending() {
                        tracing::warn!(error = %e, "sealing failed; will retry");
                    }
                }
            }
        }
        if wake_any && !froze_any && self.inner.cfg.background {
            let _ = self.inner.wake.try_send(());
        }
        Ok(AppendTicket { seqs, waits })
    }

    /// One record, or `None` if the timeline has no such seq yet.
    /// `Err(Truncated)` if retention dropped it.
    pub fn get(&self, tl: TimelineId, seq: SeqId) -> Result<Option<Record>> {
        if seq == 0 {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(1);
        self.shard(tl)?.range(tl.id, seq, seq, &mut out)?;
        Ok(out.pop())
    }

    /// Up to `limit` records from `from` (inclusive) in `dir` order.
    /// Forward from below the first retained seq is `Err(Truncated)`: a
    /// reader is never silently moved ahead. Backward stops at the first
    /// retained record.
    pub fn scan(
        &self,
        tl: TimelineId,
        from: SeqId,
        limit: usize,
        dir: Direction,
    ) -> Result<Vec<Record>> {
        let mut out = Vec::with_capacity(limit.min(1024));
        if limit == 0 {
            return Ok(out);
        }
        let shard = self.shard(tl)?;
        match dir {
            Direction::Forward => {
                let lo = from.max(1);
                let hi = lo.saturating_add(limit as u64 - 1);
                shard.range(tl.id, lo, hi, &mut out)?;
            }
            Direction::Backward => {
                let hi = from.min(shard.last_seq(tl.id));
                if hi == 0 {
                    return Ok(out);
                }
                let lo = hi.saturating_sub(limit as u64 - 1).max(1);
                // No up-front retention check (that walks every segment of the
                // timeline, costly for long store histories): try the page, and
                // if retention cut into it, the error says where data starts.
                let mut lo = lo;
                loop {
                    match shard.range(tl.id, lo, hi, &mut out) {
                        // Retention may move on again between tries; it only
                        // moves forward, so this ends.
                        Err(Error::Truncated { first_retained, .. }) if first_retained > lo => {
                            out.clear();
                            if first_retained > hi {
                                break;
                            }
                            lo = first_retained;
                        }
                        r => {
                            r?;
                            break;
                        }
                    }
                }
                out.reverse();
            }
        }
        Ok(out)
    }

    /// The newest SeqId of a timeline (0 if empty, or if its keyspace is
    /// not configured: such a timeline holds nothing).
    pub fn last_seq(&self, tl: TimelineId) -> SeqId {
        self.shard(tl).map_or(0, |s| s.last_seq(tl.id))
    }

    /// The oldest SeqId retention kept (1 if nothing was dropped; last + 1 if
    /// everything was). A device whose checkpoint is below this must roam.
    pub fn first_retained_seq(&self, tl: TimelineId) -> Result<SeqId> {
        self.shard(tl)?.first_retained(tl.id)
    }

    /// Roll segments whose time window passed, seal full ones, drop expired
    /// ones. The background thread calls this; tests call it directly.
    pub fn maintain(&self) -> Result<Maintenance> {
        let mut m = Maintenance::default();
        if self.inner.cfg.background {
            // Cheap and latency-critical for appenders: before sealing.
            for ks in &self.inner.keyspaces {
                for s in &ks.shards {
                    s.prefault_ahead();
                }
            }
        }
        // Every step runs whatever an earlier one hit: a seal failing on a
        // full disk must not hold up the drops that would free it, nor
        // another shard's work. The first error is returned, later ones
        // logged.
        let mut failed: Option<Error> = None;
        let mut ok = |r: Result<usize>| {
            r.unwrap_or_else(|e| {
                match &failed {
                    None => failed = Some(e),
                    Some(_) => tracing::warn!(error = %e, "maintenance step failed"),
                }
                0
            })
        };
        for ks in &self.inner.keyspaces {
            for s in &ks.shards {
                m.rolled += ok(s.roll_if_due(false).map(usize::from));
                m.sealed += ok(s.seal_pending());
                m.dropped += ok(s.drop_expired());
                m.dropped += ok(s.drop_released());
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(m),
        }
    }

    /// The records of `tl` through seq `upto` are no longer needed (a
    /// Raft log's purged entries): maintenance drops the oldest sealed
    /// segments of the keyspace whose every record is released, as it
    /// drops expired ones. Reads below the first record kept then fail
    /// with `Truncated`. Kept in memory only: an owner declares it again
    /// after a restart (until then nothing more is dropped).
    pub fn release(&self, tl: TimelineId, upto: SeqId) {
        if let Ok(s) = self.shard(tl) {
            s.release(tl.id, upto);
        }
    }

    /// Seal everything now: roll every active segment that holds records and
    /// seal it (benchmarks use this to measure the full write amplification
    /// of data that has gone through its whole life; a running system lets
    /// segments fill or time out).
    pub fn seal_active(&self) -> Result<Maintenance> {
        let mut m = Maintenance::default();
        for ks in &self.inner.keyspaces {
            for s in &ks.shards {
                if s.roll_if_due(true)? {
                    m.rolled += 1;
                }
                m.sealed += s.seal_pending()?;
            }
        }
        Ok(m)
    }

    /// Timelines the keyspace knows and the sum of their last SeqIds (=
    /// messages ever appended to it, including expired ones), from the
    /// in-memory index: O(timelines).
    pub fn census(&self, ks: Keyspace) -> (u64, u64) {
        let mut t = (0, 0);
        let shards = self.keyspace(ks).map_or(&[][..], |k| &k.shards[..]);
        for s in shards {
            let (n, sum) = s.census();
            t.0 += n;
            t.1 += sum;
        }
        t
    }

    /// Make every append so far durable: one fdatasync per shard with
    /// unsynced bytes, all submitted at once (`Io::sync_many`: one io_uring
    /// submission on the io_uring backend). A poisoned shard is skipped and
    /// its error returned once the others are synced.
    pub fn sync(&self) -> Result<()> {
        let mut files = Vec::new();
        let mut marks = Vec::new();
        // A poisoned shard cannot vouch for its data; the others are still
        // synced (a shutdown's last sync must not leave them to it), and
        // the first poisoned shard's error is returned after.
        let mut poisoned = None;
        for ks in &self.inner.keyspaces {
            for s in &ks.shards {
                if let Err(e) = s.check_poison() {
                    poisoned.get_or_insert(e);
                    continue;
                }
                if let Some((f, lsn)) = s.unsynced() {
                    files.extend(f);
                    marks.push((s, lsn));
                }
            }
        }
        if let Err(e) = self.inner.io.sync_many(&files) {
            // Which file failed is unknown: none of them can vouch for its data.
            for (s, _) in &marks {
                s.note_sync_failed(format!("fdatasync failed: {e}"));
            }
            return Err(Error::io(&self.inner.dir, e));
        }
        for (s, lsn) in marks {
            s.note_synced(lsn);
        }
        match poisoned {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn stats(&self) -> Stats {
        let mut st = Stats::default();
        for ks in &self.inner.keyspaces {
            let mut k = KeyspaceStats {
                name: ks.name.clone(),
                ..Default::default()
            };
            for s in &ks.shards {
                s.add_stats(&mut k);
            }
            st.keyspaces.push((ks.id, k));
        }
        st
    }

    /// Stop background work and make everything appended durable.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _ = self.inner.wake.try_send(());
        if let Some(h) = self.inner.maint_thread.lock().take() {
            let _ = h.join();
        }
        self.sync()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Last handle gone without close(): still make appended data durable.
        if !self.closed.swap(true, Ordering::AcqRel) {
            for ks in &self.keyspaces {
                for s in &ks.shards {
                    if let Err(e) = s.sync_all() {
                        tracing::warn!(error = %e, "sync on drop failed");
                    }
                }
            }
        }
    }
}
