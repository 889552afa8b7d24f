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

use super::append::{rate, round3, Load};
use super::read::reads;
use super::{durability, keyspace, ks_name, rng_for, timed_threads, DataDir, Payloads, Picker};
use crate::report::{Reporter, ResultLine};
use crate::sysinfo::{count_files, peak_rss_bytes, DiskIo};
use crate::RocksdbTuning;
use crate::{DurabilityArg, Flags, Result};
use hdrhistogram::Histogram;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompactionStyle,
    DBCompressionType, FifoCompactOptions, Options, ReadOptions, SliceTransform, WriteBatch,
    WriteOptions, DB,
};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use timeline_engine::{Direction, Record};

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
        if existed {
            // Recover the counters: the last key of each timeline.
            let t = Instant::now();
            let h = db.cf_handle(cf).ok_or("rocksdb: column family missing")?;
            let mut it = db.raw_iterator_cf_opt(h, total_order());
            for (id, slot) in last.iter().enumerate() {
                let id = id as u64;
                it.seek_for_prev(key(id, u64::MAX));
                if let Some((tl, seq)) = it.key().and_then(parse_key) {
                    if tl == id {
                        slot.store(seq, Ordering::Relaxed);
                    }
                }
            }
            it.status()?;
            eprintln!(
                "rocksdb: recovered last seqs of {} timelines in {:.3} s",
                flags.timelines,
                t.elapsed().as_secs_f64()
            );
        }
        Ok(Rocks {
            db,
            opts,
            _cache: cache,
            cf,
            tuning,
            last,
        })
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

    fn timelines_with_data(&self) -> u64 {
        self.last
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) > 0)
            .count() as u64
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

/// The fields every rocksdb result line shares.
fn base_line(flags: &Flags, workload: &str) -> ResultLine {
    ResultLine {
        workload: workload.into(),
        target: "rocksdb".into(),
        durability: durability(flags).name().into(),
        threads: flags.threads,
        payload: flags.payload,
        keyspace: ks_name(keyspace(flags)).into(),
        shards: 1,
        io: "posix".into(),
        seed: flags.seed,
        timelines: Some(flags.timelines),
        zipf: flags.zipf,
        rocksdb_options: Some(describe(flags.rocksdb_tuning)),
        ..Default::default()
    }
}

/// A result line for a finished load (call after `flush_and_settle`).
fn load_line(flags: &Flags, r: &Rocks, load: &Load) -> ResultLine {
    let payload_bytes = load.messages * flags.payload as u64;
    let record_bytes = load.messages * (KEY_BYTES + flags.payload as u64);
    let ratio = |a: u64, b: u64| round3(if b == 0 { 0.0 } else { a as f64 / b as f64 });
    let mut line = base_line(flags, "append");
    line.payload_bytes = Some(payload_bytes);
    line.record_bytes = Some(record_bytes);
    line.ops = load.messages;
    line.secs = load.secs;
    line.ops_per_sec = rate(load.messages, load.secs);
    line.messages = Some(load.messages);
    line.messages_per_sec = Some(rate(load.messages, load.secs));
    line.calls = Some(load.calls);
    line.set_latency(&load.hist);
    if stats_enabled() {
        let wal = r.ticker("rocksdb.wal.bytes");
        let flush = r.ticker("rocksdb.flush.write.bytes");
        let compact = r.ticker("rocksdb.compact.write.bytes");
        let written = wal + flush + compact;
        line.bytes_written = Some(written);
        line.bytes_written_total = Some(written);
        line.wal_bytes = Some(wal);
        line.flush_bytes = Some(flush);
        line.compaction_bytes = Some(compact);
        line.write_amplification = Some(ratio(written, record_bytes));
        line.bytes_per_payload_byte = Some(ratio(written, payload_bytes));
        line.fsyncs = Some(r.ticker("rocksdb.wal.synced"));
    }
    line.timelines_with_data = Some(r.timelines_with_data());
    line.batch = Some(flags.batch);
    line.in_flight = Some(flags.in_flight);
    line.peak_rss_bytes = Some(peak_rss_bytes());
    line
}

/// `timeline-bench append --target rocksdb`.
pub fn append(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let dir = DataDir::new(flags)?;
    let r = Rocks::open(flags, &dir.path)?;
    eprintln!(
        "append: {} messages of {} B to {} timelines, batch {}, {} thread(s), durability {}, target rocksdb",
        flags.messages,
        flags.payload,
        flags.timelines,
        flags.batch,
        flags.threads,
        durability(flags).name(),
    );
    let io0 = DiskIo::now();
    let cpu0 = crate::sysinfo::cpu_secs(None);
    let load = load(flags, &r)?;
    eprintln!(
        "append: timed section {:.3} s; flushing memtables",
        load.secs
    );
    let settle = r.flush_and_settle()?;
    let mut line = load_line(flags, &r, &load);
    // RocksDB runs in this process (its flushes and compactions too): the
    // process's CPU over the load and the flush-and-settle that finishes it.
    line.process_cpu_secs = Some(round3(crate::sysinfo::cpu_secs(None) - cpu0));
    line.set_disk_io(io0, DiskIo::now());
    line.sync_secs = Some(settle);
    let (a, f) = crate::sysinfo::rss_split();
    line.rss_anon_bytes = Some(a);
    line.rss_file_bytes = Some(f);
    let t = Instant::now();
    drop(r);
    line.close_secs = Some(t.elapsed().as_secs_f64());
    eprintln!(
        "append: flush and settle {settle:.3} s, close {:.3} s",
        t.elapsed().as_secs_f64()
    );
    line.files = Some(count_files(&dir.path));
    line.peak_rss_bytes = Some(peak_rss_bytes());
    rep.push(line)?;
    Ok(0)
}

/// The timed W1 loop over `--threads` threads: the same timeline and
/// payload choices (same seeds, same order) as the engine target's.
fn load(flags: &Flags, r: &Rocks) -> Result<Load> {
    let payloads = Payloads::new(flags.payload, flags.seed);
    let picker = Picker::new(flags.timelines, flags.zipf)?;
    let t = timed_threads(flags, flags.messages, |thread, n, hist| {
        Ok((
            append_thread(flags, r, &payloads, &picker, thread, n, hist)?,
            0,
        ))
    })?;
    Ok(Load {
        messages: flags.messages,
        calls: t.counts.0,
        secs: t.secs,
        hist: t.hist,
    })
}

/// One thread's share: `n` messages; returns the number of write calls.
fn append_thread(
    flags: &Flags,
    r: &Rocks,
    payloads: &Payloads,
    picker: &Picker,
    thread: u64,
    n: u64,
    hist: &mut Histogram<u64>,
) -> Result<u64> {
    let mut rng = rng_for(flags.seed, thread);
    let cf = r.handle()?;
    let mut wo = WriteOptions::default();
    // none: WAL written, not fsynced; sync and group: fsynced WAL (group =
    // RocksDB's internal grouping of concurrent synced writers).
    wo.set_sync(flags.durability != DurabilityArg::None);
    let mut items: Vec<(u64, &[u8])> = Vec::with_capacity(flags.batch);
    let (mut left, mut calls) = (n, 0u64);
    while left > 0 {
        let b = (flags.batch as u64).min(left);
        items.clear();
        for _ in 0..b {
            items.push((picker.pick(&mut rng), payloads.pick(&mut rng)));
        }
        let t0 = Instant::now();
        if flags.batch == 1 {
            let (tl, p) = items[0];
            r.db.put_cf_opt(cf, key(tl, r.next_seq(tl)), p, &wo)?;
        } else {
            let mut wb = WriteBatch::default();
            for &(tl, p) in &items {
                wb.put_cf(cf, key(tl, r.next_seq(tl)), p);
            }
            r.db.write_opt(wb, &wo)?;
        }
        hist.saturating_record(t0.elapsed().as_nanos() as u64);
        left -= b;
        calls += 1;
    }
    Ok(calls)
}

/// `timeline-bench read --target rocksdb`: returns the number of
/// verification errors.
pub fn read(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let dir = DataDir::new(flags)?;
    let r = Rocks::open(flags, &dir.path)?;
    let existing = r.timelines_with_data();
    let in_process = existing == 0;
    if in_process {
        eprintln!(
            "read: loading {} messages of {} B into {} timelines (batch {}, {} thread(s), durability {}), target rocksdb",
            flags.messages,
            flags.payload,
            flags.timelines,
            flags.batch,
            flags.threads,
            durability(flags).name()
        );
        let io0 = DiskIo::now();
        let load = load(flags, &r)?;
        let settle = r.flush_and_settle()?;
        let mut line = load_line(flags, &r, &load);
        line.set_disk_io(io0, DiskIo::now());
        line.sync_secs = Some(settle);
        line.phase = Some("load".into());
        line.files = Some(count_files(&dir.path));
        rep.push(line)?;
    } else {
        eprintln!(
            "read: {} holds {existing} timelines; skipping the load",
            dir.path.display()
        );
    }
    let tls: Vec<(u64, u64)> = r
        .last
        .iter()
        .enumerate()
        .filter_map(|(id, s)| {
            let last = s.load(Ordering::Relaxed);
            (last > 0).then_some((id as u64, last))
        })
        .collect();
    if tls.is_empty() {
        return Err(format!(
            "no timeline among ids 0..{} has data; is --timelines right?",
            flags.timelines
        )
        .into());
    }
    if !in_process && flags.warm {
        let t = Instant::now();
        let mut n = 0u64;
        let mut it = r.db.raw_iterator_cf_opt(r.handle()?, total_order());
        it.seek_to_first();
        while it.valid() {
            n += 1;
            it.next();
        }
        it.status()?;
        eprintln!(
            "read: warmed by reading {n} records in {:.3} s",
            t.elapsed().as_secs_f64()
        );
    }

    let expect_payload = in_process.then_some(flags.payload);
    let fwd = flags.reads - flags.reads / 2;
    let mut errors = 0;
    for (dirn, name, n) in [
        (Direction::Forward, "forward", fwd),
        (Direction::Backward, "backward", flags.reads / 2),
    ] {
        let res = reads(flags, &tls, dirn, n, expect_payload, |id, from, len, d| {
            scan(&r, id, from, len, d)
        })?;
        errors += res.errors;
        let mut line = base_line(flags, "read");
        line.direction = Some(name.into());
        line.ops = n;
        line.secs = res.secs;
        line.ops_per_sec = rate(n, res.secs);
        line.messages = Some(res.records);
        line.messages_per_sec = Some(rate(res.records, res.secs));
        line.set_latency(&res.hist);
        line.errors = Some(res.errors);
        line.read_len = Some(flags.read_len);
        line.timelines_with_data = Some(tls.len() as u64);
        line.peak_rss_bytes = Some(peak_rss_bytes());
        line.files = Some(count_files(&dir.path));
        rep.push(line)?;
    }
    Ok(errors)
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
