//! `--target rocksdb`: RocksDB used as a timeline store, the general-purpose
//! KV baseline that W1 `append` and W2 `read` compare the engine with in the
//! same run.
//!
//! Built only with the optional `rocksdb` feature of timeline-bench (off by
//! default, so the workspace build and CI never compile it). Both routes need
//! libclang for the crate's bindgen step:
//!
//! ```text
//! # Fast (about 1 minute): link Debian's RocksDB 7.8.3. The crate (rocksdb
//! # 0.20.1, librocksdb-sys 0.10.0+7.9.2) binds RocksDB 7.9's C API; every call
//! # used here exists in 7.8.3 too.
//! apt-get install -y librocksdb-dev libclang-dev
//! ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu \
//!     cargo build --release -p timeline-bench --features rocksdb
//! # Slow (10-20 minutes on 2 cores): compile the bundled RocksDB 7.9.2.
//! apt-get install -y libclang-dev
//! cargo build --release -p timeline-bench --features rocksdb
//! ```
//!
//! (The system-library build links `librocksdb.so.7.8` dynamically, so the
//! binary needs librocksdb-dev's runtime library wherever it runs. Keep the
//! same `ROCKSDB_LIB_DIR` for `cargo clippy --features rocksdb`, or cargo
//! rebuilds the C++ library.)
//!
//! The data model is what an IM server on top of a KV store would do:
//! key = timeline id (u64, big-endian) ‖ seq (u64, big-endian), value =
//! payload, in the column family of `--keyspace`, so a timeline's messages
//! are adjacent and in seq order. RocksDB has no sequence numbers per key range, so the bench
//! assigns them like the server would: an in-memory last-seq counter per
//! timeline (`AtomicU64`), read back with one `seek_for_prev` per timeline
//! when an existing directory is opened. That work is part of the timed
//! append, as the engine's own seq assignment is.
//!
//! Options (`--rocksdb-tuning`, default `tuned`; every setting is printed in
//! the result's `rocksdb_options`, see `db_options` and `cf_options`): two
//! column families, `store` (kept) and `sync` (FIFO compaction with a 7-day
//! `ttl`: RocksDB's own expiry by age); `tuned` follows RocksDB's tuning
//! guide (parallelism, pipelined writes, prefix extractor on the timeline id
//! with bloom filters, cached index and filter blocks, level compaction with
//! dynamic level bytes), `tuned-universal` the same with universal
//! compaction, `near-default` the first baseline: RocksDB's defaults plus
//! `create_if_missing`, no compression (the
//! engine does not compress either), a 64 MiB write buffer, a 512 MiB LRU
//! block cache (so warm reads are served from memory, comparable with the
//! engine's in-memory active data) and statistics (RocksDB's own byte
//! counters, for `bytes_written`; `TIMELINE_BENCH_ROCKSDB_STATS=off` turns
//! them off to measure their cost). WAL on. Durability:
//! - `none`: `WriteOptions::set_sync(false)`: the WAL is written to the OS
//!   on every write, never fsynced by the write.
//! - `sync`: `set_sync(true)`: each write call waits for the WAL fsync.
//! - `group`: also `set_sync(true)`. The Rust binding has no group-commit
//!   API; RocksDB groups concurrent synced writes internally (one leader
//!   writes and syncs the WAL for the whole write group), so with
//!   `--threads N` writers this *is* RocksDB's group commit. `--in-flight`
//!   is ignored (there are no async writes).
//!
//! `--batch 1` is one `put_opt` per message; `--batch N` one `WriteBatch` of
//! N puts per call.
//!
//! Figures on the result lines, and how they compare with the engine's:
//! - `bytes_written` = RocksDB's own counters `rocksdb.wal.bytes` +
//!   `rocksdb.flush.write.bytes` + `rocksdb.compact.write.bytes` (also
//!   reported separately as `wal_bytes`, `flush_bytes`, `compaction_bytes`)
//!   after the final memtable flush and once background compactions have
//!   settled. No manual compaction is run (a running system does not).
//! - `record_bytes` = keys + values as appended (16 + payload per message);
//!   `write_amplification` = bytes_written / record_bytes, the analogue of the
//!   engine's bytes_written / (payload + record headers).
//! - `disk_write_bytes` = /proc/self/io `write_bytes` over the timed section
//!   plus the final flush, measured the same way for the engine target: the
//!   figure to compare between targets.
//! - `fsyncs` = `rocksdb.wal.synced`; `shards` = 1, `io` = "posix"
//!   (RocksDB's default Env).

use super::{
    base_line, ConvSpec, Done, ImOp, ImReply, ImSession, ImTarget, Op, Reply, Session, Shape,
    Subscriber, Target,
};
use crate::report::ResultLine;
use crate::sysinfo::{count_files, cpu_secs, peak_rss_bytes, rss_split, DiskIo};
use crate::workloads::append::round3;
use crate::workloads::{keyspace, DataDir};
use crate::RocksdbTuning;
use crate::{DurabilityArg, Flags, Result};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompactionStyle,
    DBCompressionType, FifoCompactOptions, Options, ReadOptions, SliceTransform, WriteBatch,
    WriteOptions, DB,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use timeline_engine::SeqId;
use timeline_engine::{Direction, Record};
use timeline_im::{ConvKind, UserId};

/// Key bytes per message: timeline id and seq, both u64 big-endian.
const KEY_BYTES: u64 = 16;
/// The sync column family's TTL: the engine's default for its sync
/// keyspace (7 days).
const SYNC_TTL_SECS: u64 = 7 * 24 * 3600;
/// The two keyspaces, as column families.
const CFS: [&str; 2] = ["store", "sync"];
/// How long to wait for background compactions after the final flush.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The store: the DB, the options it was opened with (their statistics
/// object is shared with the DB), and the per-timeline seq counters.
struct Rocks {
    db: DB,
    opts: Options,
    _cache: Cache,
    /// The column family W1/W2 use (`--keyspace`).
    cf: &'static str,
    tuning: RocksdbTuning,
    /// Last seq per timeline id `0..--timelines`: what the IM server on top
    /// of a KV store keeps to hand out consecutive seqs (the engine does this
    /// itself). A concurrent writer may commit seq n+1 before n lands; a
    /// server would order them with a per-timeline lock, which W1's uniform
    /// choice over 100,000 timelines would almost never contend.
    last: Vec<AtomicU64>,
}

/// RocksDB's statistics (on by default) cost a little on every write: set
/// `TIMELINE_BENCH_ROCKSDB_STATS=off` to measure without them (the lines then
/// have no `bytes_written`, `wal_bytes`, ... `fsyncs`; `disk_write_bytes`
/// stays).
fn stats_enabled() -> bool {
    std::env::var("TIMELINE_BENCH_ROCKSDB_STATS").map_or(true, |v| v != "off")
}

#[inline]
fn key(tl: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&tl.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Split a key into (timeline, seq).
#[inline]
fn parse_key(k: &[u8]) -> Option<(u64, u64)> {
    let tl = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(k.get(8..16)?.try_into().ok()?);
    Some((tl, seq))
}

impl Rocks {
    fn open(flags: &Flags, dir: &Path) -> Result<Rocks> {
        let existed = dir.join("CURRENT").exists();
        let tuning = flags.rocksdb_tuning;
        let cache = Cache::new_lru_cache(512 << 20)?;
        let mut opts = db_options(tuning);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        if stats_enabled() {
            opts.enable_statistics();
        }
        let cfs = [
            ColumnFamilyDescriptor::new("store", cf_options(tuning, &cache, false)),
            ColumnFamilyDescriptor::new("sync", cf_options(tuning, &cache, true)),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs)
            .map_err(|e| format!("opening rocksdb in {}: {e}", dir.display()))?;
        // The sync keyspace expires by age: FIFO compaction with a `ttl`
        // drops whole SST files older than it (RocksDB's own mechanism; the
        // binding sets `ttl` only through SetOptions).
        let sync = db
            .cf_handle("sync")
            .ok_or("rocksdb: no sync column family")?;
        db.set_options_cf(sync, &[("ttl", &SYNC_TTL_SECS.to_string())])?;
        let cf = match keyspace(flags) {
            timeline_engine::Keyspace::SYNC => "sync",
            _ => "store",
        };
        let last: Vec<AtomicU64> = (0..flags.timelines).map(|_| AtomicU64::new(0)).collect();
        let r = Rocks {
            db,
            opts,
            _cache: cache,
            cf,
            tuning,
            last,
        };
        if existed {
            // Recover the counters: the last key of each timeline.
            let t = Instant::now();
            for (slot, seq) in r.last.iter().zip(r.last_keys(flags.timelines)?) {
                slot.store(seq, Ordering::Relaxed);
            }
            eprintln!(
                "rocksdb: recovered last seqs of {} timelines in {:.3} s",
                flags.timelines,
                t.elapsed().as_secs_f64()
            );
        }
        Ok(r)
    }

    /// The last seq of timelines `0..n`, from the keys in the DB (one
    /// `seek_for_prev` each).
    fn last_keys(&self, n: u64) -> Result<Vec<u64>> {
        let mut it = self.db.raw_iterator_cf_opt(self.handle()?, total_order());
        let mut out = Vec::with_capacity(n as usize);
        for id in 0..n {
            it.seek_for_prev(key(id, u64::MAX));
            out.push(match it.key().and_then(parse_key) {
                Some((tl, seq)) if tl == id => seq,
                _ => 0,
            });
        }
        it.status()?;
        Ok(out)
    }

    /// The column family W1/W2 use (opened with the DB: always there).
    fn handle(&self) -> Result<&ColumnFamily> {
        Ok(self
            .db
            .cf_handle(self.cf)
            .ok_or("rocksdb: column family missing")?)
    }

    #[inline]
    fn next_seq(&self, tl: u64) -> u64 {
        self.last[tl as usize].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// One statistics ticker (`name COUNT : n`), 0 if absent.
    fn ticker(&self, name: &str) -> u64 {
        let s = self.opts.get_statistics().unwrap_or_default();
        s.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim_start()
                    .strip_prefix("COUNT :")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// An integer property summed over the column families (some, as
    /// `compaction-pending`, are per column family).
    fn int_property(&self, name: &str) -> u64 {
        CFS.iter()
            .filter_map(|cf| self.db.cf_handle(cf))
            .map(|h| {
                self.db
                    .property_int_value_cf(h, name)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Flush the memtables (waiting for the flush), then wait until no
    /// flush or compaction runs or is pending: the state whose byte counts
    /// the result reports. Returns the seconds it took.
    fn flush_and_settle(&self) -> Result<f64> {
        let t = Instant::now();
        for name in CFS {
            if let Some(h) = self.db.cf_handle(name) {
                self.db.flush_cf(h)?;
            }
        }
        loop {
            let busy = self.int_property("rocksdb.num-running-flushes")
                + self.int_property("rocksdb.num-running-compactions")
                + self.int_property("rocksdb.compaction-pending")
                + self.int_property("rocksdb.mem-table-flush-pending");
            if busy == 0 {
                break;
            }
            if t.elapsed() > SETTLE_TIMEOUT {
                eprintln!(
                    "rocksdb: compactions still running after {SETTLE_TIMEOUT:?}; reporting anyway"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t.elapsed().as_secs_f64())
    }
}

/// RocksDB as a [`Target`] of W1 and W2. Field order: the DB closes
/// before its directory goes.
pub struct RocksTarget {
    r: Rocks,
    flags: Flags,
    dir: DataDir,
}

impl RocksTarget {
    pub fn open(flags: &Flags) -> Result<RocksTarget> {
        let dir = DataDir::new(flags)?;
        Ok(RocksTarget {
            r: Rocks::open(flags, &dir.path)?,
            flags: flags.clone(),
            dir,
        })
    }
}

pub struct Mark {
    io: DiskIo,
    cpu: f64,
    /// wal, flush, compaction bytes and WAL syncs so far.
    tickers: [u64; 4],
}

impl Rocks {
    fn tickers(&self) -> [u64; 4] {
        if !stats_enabled() {
            return [0; 4];
        }
        [
            self.ticker("rocksdb.wal.bytes"),
            self.ticker("rocksdb.flush.write.bytes"),
            self.ticker("rocksdb.compact.write.bytes"),
            self.ticker("rocksdb.wal.synced"),
        ]
    }
}

/// A thread's session: synchronous calls (RocksDB has no async writes).
pub struct RocksSession<'a> {
    r: &'a Rocks,
    wo: WriteOptions,
    done: Done<Reply>,
}

impl Session for RocksSession<'_> {
    fn queue(&mut self, op: Op<'_>) -> Result<()> {
        let r = self.r;
        // Looked up per call: a handle is not `Sync`, so a session cannot keep one.
        let cf = r.handle()?;
        let reply = match op {
            Op::Append([(tl, p)]) => {
                let seq = r.next_seq(*tl);
                r.db.put_cf_opt(cf, key(*tl, seq), p, &self.wo)?;
                Reply::Appended(vec![seq])
            }
            Op::Append(items) => {
                let mut wb = WriteBatch::default();
                let mut seqs = Vec::with_capacity(items.len());
                for &(tl, p) in items {
                    let seq = r.next_seq(tl);
                    wb.put_cf(cf, key(tl, seq), p);
                    seqs.push(seq);
                }
                r.db.write_opt(wb, &self.wo)?;
                Reply::Appended(seqs)
            }
            Op::Scan { id, from, len, dir } => match scan(r, id, from, len, dir) {
                Ok(p) => Reply::Page(p),
                Err(e) => Reply::Refused(e.to_string()),
            },
        };
        self.done.push(reply);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn complete(&mut self) -> Result<Reply> {
        self.done.pop()
    }
}

impl Target for RocksTarget {
    type Session<'a> = RocksSession<'a>;
    type Mark = Mark;

    fn shape(&self) -> Shape {
        Shape {
            sessions: self.flags.threads,
            window: 1,
            refill: 1,
        }
    }

    fn session(&self) -> Result<RocksSession<'_>> {
        let mut wo = WriteOptions::default();
        // none: WAL written, not fsynced; sync and group: fsynced WAL (group
        // = RocksDB's internal grouping of concurrent synced writers).
        wo.set_sync(self.flags.durability != DurabilityArg::None);
        Ok(RocksSession {
            r: &self.r,
            wo,
            done: Done::default(),
        })
    }

    fn lengths(&self, n: u64) -> Result<Vec<u64>> {
        self.r.last_keys(n)
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "rocksdb");
        l.shards = 1;
        l.io = "posix".into();
        l.in_flight = Some(self.flags.in_flight);
        l.rocksdb_options = Some(describe(self.flags.rocksdb_tuning));
        l
    }

    fn mark(&self) -> Result<Mark> {
        Ok(Mark {
            io: DiskIo::now(),
            cpu: cpu_secs(None),
            tickers: self.r.tickers(),
        })
    }

    fn settle(&self, line: &mut ResultLine) -> Result<()> {
        line.sync_secs = Some(self.r.flush_and_settle()?);
        Ok(())
    }

    fn measure(&self, m: &Mark, line: &mut ResultLine) -> Result<()> {
        // RocksDB runs in this process (its flushes and compactions too).
        line.process_cpu_secs = Some(round3(cpu_secs(None) - m.cpu));
        line.set_disk_io(m.io, DiskIo::now());
        let t = self.r.tickers();
        let [wal, flush, compact, synced] = [0, 1, 2, 3].map(|i| t[i] - m.tickers[i]);
        let written = wal + flush + compact;
        if stats_enabled() && line.payload_bytes.is_some() {
            let ratio = |a: u64, b: u64| round3(a as f64 / b.max(1) as f64);
            let records = line.messages.unwrap_or(0) * (KEY_BYTES + self.flags.payload as u64);
            line.bytes_written = Some(written);
            line.bytes_written_total = Some(written);
            line.wal_bytes = Some(wal);
            line.flush_bytes = Some(flush);
            line.compaction_bytes = Some(compact);
            line.record_bytes = Some(records);
            line.write_amplification = Some(ratio(written, records));
            line.bytes_per_payload_byte = line.payload_bytes.map(|p| ratio(written, p));
            line.fsyncs = Some(synced);
        }
        let (a, f) = rss_split();
        line.rss_anon_bytes = Some(a);
        line.rss_file_bytes = Some(f);
        line.peak_rss_bytes = Some(peak_rss_bytes());
        Ok(())
    }

    fn close(self, last: Option<&mut ResultLine>) -> Result<()> {
        let t = Instant::now();
        let RocksTarget { r, dir, .. } = self;
        drop(r);
        if let Some(l) = last {
            l.close_secs = Some(t.elapsed().as_secs_f64());
            l.files = Some(count_files(&dir.path));
        }
        Ok(())
    }
}

/// One range read, as a server would do it: a fresh iterator, positioned
/// at (tl, from), stepped while the key is still in the timeline.
fn scan(r: &Rocks, tl: u64, from: u64, len: usize, dirn: Direction) -> Result<Vec<Record>> {
    let mut page = Vec::with_capacity(len.min(1024));
    let mut ro = ReadOptions::default();
    // With the prefix extractor (tuned), a seek in prefix mode uses the
    // prefix bloom filters and stays inside the timeline.
    ro.set_prefix_same_as_start(r.tuning != RocksdbTuning::NearDefault);
    let mut it = r.db.raw_iterator_cf_opt(r.handle()?, ro);
    match dirn {
        Direction::Forward => it.seek(key(tl, from)),
        Direction::Backward => it.seek_for_prev(key(tl, from)),
    }
    while page.len() < len {
        let (Some(k), Some(v)) = (it.key(), it.value()) else {
            break;
        };
        match parse_key(k) {
            Some((t, seq)) if t == tl => page.push(Record {
                seq,
                timestamp_ms: 0,
                payload: v.to_vec(),
            }),
            _ => break,
        }
        match dirn {
            Direction::Forward => it.next(),
            Direction::Backward => it.prev(),
        }
    }
    it.status()?;
    Ok(page)
}

/// Iterator options for whole-keyspace passes (recovery, warming): total
/// order, ignoring the prefix extractor.
fn total_order() -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_total_order_seek(true);
    ro
}

/// DB-wide options. `near-default`: RocksDB's defaults (the baseline as
/// first written). `tuned` / `tuned-universal`: RocksDB's tuning guide for a
/// write-heavy, prefix-read store ("Setup Options and Basic Tuning"):
/// background jobs for the cores, pipelined writes (WAL and memtable writes
/// of successive write groups overlap), 1 MiB `bytes_per_sync`.
fn db_options(tuning: RocksdbTuning) -> Options {
    let mut o = Options::default();
    if tuning != RocksdbTuning::NearDefault {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as i32;
        o.increase_parallelism(cores);
        o.set_max_background_jobs(cores.max(2) * 2);
        o.set_enable_pipelined_write(true);
        o.set_bytes_per_sync(1 << 20);
    }
    o
}

/// One column family's options. Both: no compression (the engine does not
/// compress), a 64 MiB write buffer and the shared 512 MiB LRU block cache.
/// Tuned: 8-byte prefix extractor (the timeline id) with a memtable prefix
/// bloom, 10-bit bloom filters, index and filter blocks in the cache with
/// L0's pinned, 16 KiB blocks, four write buffers; the store with level
/// compaction and dynamic level bytes (`tuned`) or universal compaction
/// (`tuned-universal`, less write amplification). The sync keyspace: FIFO
/// compaction (with the `ttl` set after open) in every tuning, since it
/// expires by age.
fn cf_options(tuning: RocksdbTuning, cache: &Cache, sync: bool) -> Options {
    let mut o = Options::default();
    o.set_compression_type(DBCompressionType::None);
    o.set_write_buffer_size(64 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    if tuning != RocksdbTuning::NearDefault {
        o.set_max_write_buffer_number(4);
        o.set_prefix_extractor(SliceTransform::create_fixed_prefix(8));
        o.set_memtable_prefix_bloom_ratio(0.1);
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        table.set_block_size(16 << 10);
        table.set_format_version(5);
        if !sync {
            match tuning {
                RocksdbTuning::TunedUniversal => {
                    o.set_compaction_style(DBCompactionStyle::Universal)
                }
                _ => o.set_level_compaction_dynamic_level_bytes(true),
            }
        }
    }
    if sync {
        o.set_compaction_style(DBCompactionStyle::Fifo);
        let mut fifo = FifoCompactOptions::default();
        fifo.set_max_table_files_size(u64::MAX / 2); // expire by age only
        o.set_fifo_compaction_options(&fifo);
    }
    o.set_block_based_table_factory(&table);
    o
}

/// The settings of a tuning, for the result line (`rocksdb_options`).
pub fn describe(tuning: RocksdbTuning) -> String {
    let common = "no compression, write_buffer 64 MiB, block cache 512 MiB LRU, WAL on, \
                  column families store (kept) and sync (FIFO compaction, ttl 7 d)";
    match tuning {
        RocksdbTuning::NearDefault => format!("near-default: RocksDB defaults; {common}"),
        t => format!(
            "{}: store {} compaction; increase_parallelism(cores), max_background_jobs 2x cores, \
             pipelined writes, bytes_per_sync 1 MiB, max_write_buffer_number 4, fixed 8-byte \
             prefix extractor (timeline id), memtable prefix bloom 0.1, bloom 10 bits/key, \
             index+filter blocks cached (L0 pinned), 16 KiB blocks, format_version 5; {common}",
            if t == RocksdbTuning::TunedUniversal {
                "tuned-universal"
            } else {
                "tuned"
            },
            if t == RocksdbTuning::TunedUniversal {
                "universal"
            } else {
                "level (dynamic level bytes)"
            },
        ),
    }
}

/// Sync entry header in the `sync` column family: conversation, its seq,
/// sender (u64 big-endian each), then the payload (a copy, as the engine's
/// default `--entries copy`).
const SYNC_HEADER: usize = 24;

/// RocksDB as an IM store ([`ImTarget`] of W3): what an IM server on a KV
/// store does for write fan-out. A send is one `WriteBatch` (durability as
/// for W1): the message under (conversation, seq) in `store`, and one
/// entry per member under (user, seq) in `sync`, carrying the
/// conversation, its seq, the sender and a copy of the payload. A sync is
/// one prefix iterator over the user's keys after the checkpoint. Members
/// and the per-timeline seq counters live in memory (the server's job; a
/// real one would also serialize writers per timeline so that seqs commit
/// in order, which W3, reading only after the load, does not need). Only
/// write fan-out: a group above `--hybrid-threshold` is refused (run
/// `--fanout-mode write`). No push. Costs as for W1: the whole process's
/// CPU (`cpu_basis` "whole process"), RocksDB's byte counters after the
/// final flush and compactions.
pub struct RocksIm {
    r: Rocks,
    flags: Flags,
    threshold: usize,
    members: Vec<Vec<u64>>,
    conv_seq: Vec<AtomicU64>,
    user_seq: Vec<AtomicU64>,
    dir: DataDir,
}

impl RocksIm {
    pub fn open(flags: &Flags, threshold: usize) -> Result<RocksIm> {
        let dir = DataDir::new(flags)?;
        let mut f = flags.clone();
        f.timelines = 0; // no W1 counters
        Ok(RocksIm {
            r: Rocks::open(&f, &dir.path)?,
            flags: flags.clone(),
            threshold,
            members: Vec::new(),
            conv_seq: Vec::new(),
            user_seq: Vec::new(),
            dir,
        })
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily> {
        Ok(self
            .r
            .db
            .cf_handle(name)
            .ok_or("rocksdb: column family missing")?)
    }

    fn send(&self, conv: u64, sender: u64, payload: &[u8], wo: &WriteOptions) -> Result<()> {
        let ms = self
            .members
            .get(conv as usize)
            .ok_or_else(|| format!("no conversation {conv}"))?;
        let seq = self.conv_seq[conv as usize].fetch_add(1, Ordering::Relaxed) + 1;
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cf("store")?, key(conv, seq), payload);
        let mut v = Vec::with_capacity(SYNC_HEADER + payload.len());
        v.extend_from_slice(&conv.to_be_bytes());
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&sender.to_be_bytes());
        v.extend_from_slice(payload);
        let sync = self.cf("sync")?;
        for &u in ms {
            let s = self.user_seq[u as usize].fetch_add(1, Ordering::Relaxed) + 1;
            wb.put_cf(sync, key(u, s), &v);
        }
        self.r.db.write_opt(wb, wo)?;
        Ok(())
    }

    fn sync(&self, user: u64, cp: u64, limit: usize) -> Result<timeline_im::SyncReply> {
        use timeline_im::{Body, Entry, SyncEntry, SyncReply};
        let mut ro = ReadOptions::default();
        ro.set_prefix_same_as_start(self.r.tuning != RocksdbTuning::NearDefault);
        let mut it = self.r.db.raw_iterator_cf_opt(self.cf("sync")?, ro);
        it.seek(key(user, cp + 1));
        let mut entries = Vec::with_capacity(limit.min(1024));
        let mut has_more = false;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some((u, seq)) = parse_key(k) else { break };
            if u != user {
                break;
            }
            if entries.len() == limit {
                has_more = true;
                break;
            }
            let field = |i: usize| {
                v.get(i * 8..i * 8 + 8)
                    .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
            };
            let (Some(conv), Some(conv_seq), Some(sender)) = (field(0), field(1), field(2)) else {
                return Err(format!(
                    "sync entry {user}/{seq}: {} bytes, shorter than its header",
                    v.len()
                )
                .into());
            };
            entries.push(SyncEntry {
                seq,
                entry: Entry {
                    conv,
                    conv_seq,
                    sender,
                    timestamp_ms: 0,
                    body: Body::Message(v[SYNC_HEADER..].to_vec()),
                },
            });
            it.next();
        }
        it.status()?;
        let checkpoint = entries.last().map_or(cp, |e| e.seq);
        Ok(SyncReply {
            entries,
            checkpoint,
            has_more,
            truncated: None,
            groups: Vec::new(),
        })
    }
}

pub struct RocksImSession<'a> {
    t: &'a RocksIm,
    wo: WriteOptions,
    done: Done<ImReply>,
}

impl ImSession for RocksImSession<'_> {
    fn queue(&mut self, op: ImOp<'_>) -> Result<()> {
        let reply = match op {
            ImOp::Send {
                conv,
                sender,
                payload,
                ..
            } => match self.t.send(conv, sender, payload, &self.wo) {
                Ok(()) => ImReply::Sent,
                Err(e) => ImReply::Refused(e.to_string()),
            },
            ImOp::Sync {
                user,
                checkpoint,
                limit,
                ..
            } => match self.t.sync(user, checkpoint, limit) {
                Ok(r) => ImReply::Synced(r),
                Err(e) => ImReply::Refused(e.to_string()),
            },
        };
        self.done.push(reply);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn complete(&mut self) -> Result<ImReply> {
        self.done.pop()
    }
}

impl ImTarget for RocksIm {
    type Session<'a> = RocksImSession<'a>;
    type Mark = Mark;

    fn shape(&self) -> Shape {
        Shape {
            sessions: self.flags.threads,
            window: 1,
            refill: 1,
        }
    }

    fn create(&mut self, convs: &[ConvSpec]) -> Result<()> {
        let mut users = 0;
        for c in convs {
            if c.kind == ConvKind::Group && c.members.len() > self.threshold {
                return Err(format!(
                    "--target rocksdb fans out on write only: group {} has {} members, above the \
                     hybrid threshold {} (use --fanout-mode write)",
                    c.id,
                    c.members.len(),
                    self.threshold
                )
                .into());
            }
            if c.id as usize >= self.members.len() {
                self.members.resize(c.id as usize + 1, Vec::new());
            }
            self.members[c.id as usize] = c.members.clone();
            users = users.max(c.members.iter().max().map_or(0, |&u| u + 1));
        }
        self.conv_seq = (0..self.members.len()).map(|_| AtomicU64::new(1)).collect(); // seq 1: created
        self.user_seq = (0..users).map(|_| AtomicU64::new(0)).collect();
        Ok(())
    }

    fn session(&self) -> Result<RocksImSession<'_>> {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.flags.durability != DurabilityArg::None);
        Ok(RocksImSession {
            t: self,
            wo,
            done: Done::default(),
        })
    }

    fn sync_ends(&self, users: &[UserId]) -> Result<Vec<SeqId>> {
        Ok(users
            .iter()
            .map(|&u| {
                self.user_seq
                    .get(u as usize)
                    .map_or(0, |s| s.load(Ordering::Relaxed))
            })
            .collect())
    }

    fn subscribe(&self, _users: &[UserId]) -> Result<Vec<Box<dyn Subscriber + '_>>> {
        Ok(Vec::new())
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "rocksdb");
        l.shards = 1;
        l.io = "posix".into();
        l.keyspace = "store+sync".into();
        l.entries = Some("copy".into());
        l.in_flight = Some(1);
        l.rocksdb_options = Some(describe(self.flags.rocksdb_tuning));
        l
    }

    fn mark(&self) -> Result<Mark> {
        Ok(Mark {
            io: DiskIo::now(),
            cpu: cpu_secs(None),
            tickers: self.r.tickers(),
        })
    }

    fn measure(&self, m: &Mark, line: &mut ResultLine) -> Result<()> {
        line.sync_secs = Some(self.r.flush_and_settle()?);
        line.process_cpu_secs = Some(round3(cpu_secs(None) - m.cpu));
        line.set_disk_io(m.io, DiskIo::now());
        let (messages, deliveries) = (line.messages.unwrap_or(0), line.deliveries.unwrap_or(0));
        let payload = self.flags.payload as u64;
        let records = messages * (KEY_BYTES + payload)
            + deliveries * (KEY_BYTES + SYNC_HEADER as u64 + payload);
        let t = self.r.tickers();
        let [wal, flush, compact, synced] = [0, 1, 2, 3].map(|i| t[i] - m.tickers[i]);
        line.stored = Some(messages);
        line.sync_writes = Some(deliveries);
        line.storage_writes_per_message =
            crate::workloads::imkit::ratio(messages + deliveries, messages);
        line.writes_per_delivery =
            crate::workloads::imkit::ratio(messages + deliveries, deliveries);
        line.record_bytes = Some(records);
        if stats_enabled() {
            let written = wal + flush + compact;
            line.bytes_written = Some(written);
            line.bytes_written_total = Some(written);
            line.wal_bytes = Some(wal);
            line.flush_bytes = Some(flush);
            line.compaction_bytes = Some(compact);
            line.write_amplification = crate::workloads::imkit::ratio(written, records);
            line.bytes_per_payload_byte = line
                .payload_bytes
                .and_then(|p| crate::workloads::imkit::ratio(written, p));
            line.fsyncs = Some(synced);
        }
        line.peak_rss_bytes = Some(peak_rss_bytes());
        Ok(())
    }

    fn close(self, last: Option<&mut ResultLine>) -> Result<()> {
        let RocksIm { r, dir, .. } = self;
        drop(r);
        if let Some(l) = last {
            l.files = Some(count_files(&dir.path));
        }
        Ok(())
    }
}
