//! Result lines: one JSON object per line with `--json`, else an aligned table.

use crate::sysinfo::{DiskIo, Machine};
use hdrhistogram::Histogram;
use serde::Serialize;

/// One result line. Fields that do not apply to a workload are left out of
/// the JSON. Field names follow `workload.md`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResultLine {
    pub workload: String,
    pub target: String,
    pub durability: String,
    /// "load" for the append run a `read` does first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// "forward" / "backward" for `read`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    pub ops: u64,
    pub secs: f64,
    pub ops_per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_per_sec: Option<f64>,
    /// Engine calls (one per batch for `append`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p999_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_us: Option<f64>,
    /// Bytes the engine wrote to files for the keyspace the workload used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
    /// Bytes written over both keyspaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_written_total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_bytes: Option<u64>,
    /// Payload plus record headers, as appended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_bytes: Option<u64>,
    /// bytes_written / record_bytes (the engine's definition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_amplification: Option<f64>,
    /// bytes_written / payload_bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_payload_byte: Option<f64>,
    /// `write_bytes` from /proc/self/io over the timed section plus the
    /// final sync (engine) or memtable flush (rocksdb): the same kernel
    /// figure for every in-process target, unlike `bytes_written`, which is
    /// each target's own count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_write_bytes: Option<u64>,
    /// `cancelled_write_bytes` from /proc/self/io over the same span: dirty
    /// pages of files deleted or truncated before writeback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_cancelled_write_bytes: Option<u64>,
    /// disk_write_bytes / payload_bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes_per_payload_byte: Option<f64>,
    /// rocksdb: WAL bytes (`rocksdb.wal.bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_bytes: Option<u64>,
    /// rocksdb: SST bytes written by memtable flushes (`rocksdb.flush.write.bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_bytes: Option<u64>,
    /// rocksdb: SST bytes written by compactions (`rocksdb.compact.write.bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compaction_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed_segments: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsyncs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// Anonymous resident bytes when the line was taken (before close).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_anon_bytes: Option<u64>,
    /// File-backed resident bytes (mapped segments) when the line was taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_file_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_bytes: Option<u64>,
    /// Regular files under the data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_secs: Option<f64>,
    /// `Engine::sync` after the timed section.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seal_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regroup: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timelines: Option<u64>,
    /// Timelines holding data (engine statistics for the keyspace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timelines_with_data: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_len: Option<usize>,
    // ---- network targets (`--target server`, `--target redis`) ----
    /// Client connections (each driven by one client thread).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// Requests kept in flight per connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<usize>,
    /// A connection queues more requests once at most `pipeline - refill`
    /// are in flight (1: a sliding window; `pipeline`: whole batches).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill: Option<usize>,
    /// CPU seconds (user + system) the target's process (timeline-server,
    /// redis-server) used over the timed section; only for a process the
    /// bench started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_secs: Option<f64>,
    /// `--target rocksdb`: the tuning and every setting it applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rocksdb_options: Option<String>,
    /// CPU seconds the bench process (the clients) used over the timed section.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cpu_secs: Option<f64>,
    /// Peak RSS of the bench process (for network targets `peak_rss_bytes`
    /// is the server process's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_peak_rss_bytes: Option<u64>,
    /// redis: the reply reader of the timed loops (`resp-lean` or
    /// `redis-crate`, see `targets/resp.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// redis: the `appendfsync` policy (`no` = appendonly off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appendfsync: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zipf: Option<f64>,
    // ---- IM workloads (W3 `fanout`, W4 `im`, W5 `fanout-sweep`) ----
    /// write / read / hybrid (W3, W5); W4 is always hybrid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout_mode: Option<String>,
    /// copy / reference: what a sync timeline entry holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<String>,
    /// Members per group (W3: `--fanout`; W5: the point's size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_size: Option<u64>,
    /// Conversations created (W3, W5: groups; W4: direct + groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<u64>,
    /// W4: devices over all users.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<u64>,
    /// W4: devices that sync during the timed section (probes included);
    /// W5: the observed devices of the read phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub online_devices: Option<u64>,
    /// Groups with more members than this use read fan-out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hybrid_threshold: Option<u64>,
    /// `--rate`: the target send rate (messages/s), when limited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    /// Untimed: creating the conversations and reopening (see `imkit::setup`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_secs: Option<f64>,
    /// One per receiving member (the sender included) per message: sync
    /// entries written by write fan-out plus members reached through a
    /// read-fan-out group's store timeline (ImStats `sync_writes +
    /// read_fanout_deliveries` over the timed section).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_sec: Option<f64>,
    /// `Im::sync` calls (W4: timed section, every device; W5: the read phase).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_ops: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_ops_per_sec: Option<f64>,
    /// Messages returned to devices by `sync` (one per device per message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries_read: Option<u64>,
    /// W4: entries_read / messages (message-level read:write, target ~10);
    /// W5: storage reads per message / storage writes per message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_write_ratio: Option<f64>,
    /// (store entries + sync entries written) / messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_writes_per_message: Option<f64>,
    /// Journal and catalog writes / messages (bookkeeping, not in the above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta_writes_per_message: Option<f64>,
    /// (store entries + sync entries written) / deliveries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes_per_delivery: Option<f64>,
    /// (sync reads + store reads + group polls) / entries read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reads_per_delivery: Option<f64>,
    /// (sync reads + store reads) / entries read: engine reads only, group
    /// polls (answered by the in-memory watermark) left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_reads_per_delivery: Option<f64>,
    /// ImStats counters over the measured section.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_reads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_reads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_polls: Option<u64>,
    /// Append (send call) -> visible to a syncing latency-probe device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visible_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visible_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visible_p999_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visible_max_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visible_samples: Option<u64>,
    /// Append (send call) -> push received by a subscribed probe user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_p999_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_samples: Option<u64>,
    /// `Push::Resync`s received (pushes dropped for a slow subscriber).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_resyncs: Option<u64>,
    /// W6: connected devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices_total: Option<u64>,
    /// W6: connections set up (connect, HELLO, SUBSCRIBE answered) per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects_per_sec: Option<f64>,
    /// W6: send -> the entry read by the SYNC its push triggered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_after_push_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_after_push_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_after_push_p999_us: Option<f64>,
    /// W6: SEND queued -> its ack read (also `p99_us`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_ack_p99_us: Option<f64>,
    /// W6: the server process's threads with every device connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_threads: Option<u64>,
    /// W6: the same before any device connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_threads_empty: Option<u64>,
    /// W6: server RSS growth from connecting the devices, per device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_per_conn_bytes: Option<u64>,
    /// W6: server CPU with every device connected and nothing sent, % of one core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_idle_cpu_pct: Option<f64>,
    /// The storage side's CPU microseconds per message: the server
    /// process's (network targets; W6: its load phase) or, in-process, the
    /// engine's and IM layer's own threads (`storage_cpu_secs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_message: Option<f64>,
    /// The whole bench process's CPU microseconds per message, for
    /// in-process targets (`process_cpu_secs`): the figure in-process
    /// targets compare on when their `cpu_basis` differ (the engine's IM
    /// layer has threads of its own; RocksDB writes on the caller's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_cpu_us_per_message: Option<f64>,
    /// What the `cpu_us_*` figures measure: `server process`, `storage
    /// threads` (in process: the engine's and IM layer's own threads) or
    /// `whole process` (in process, where the store runs on the bench's
    /// threads: W1, RocksDB). `compare` gives no ratio across bases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_basis: Option<String>,
    /// The same CPU per delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_delivery: Option<f64>,
    /// The server process's CPU per `sync` call answered (network targets
    /// only: in-process, `sync` runs on the bench's device threads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_sync: Option<f64>,
    /// In-process: CPU seconds of the engine's and IM layer's own threads
    /// (`im-worker-*`, `timeline-maint`) over the timed section. The
    /// `sync` calls devices make run on the bench's device threads and are
    /// not in it; `process_cpu_secs` bounds the whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_cpu_secs: Option<f64>,
    /// In-process: CPU seconds of the whole bench process (storage and
    /// workload together) over the timed section; for W1 `append` (engine
    /// and rocksdb) over the load and the work that finishes it (engine:
    /// sync, and with `--seal` sealing and regrouping; RocksDB: flush and
    /// compactions), and the cost figures use it (the store runs on the
    /// bench's threads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_cpu_secs: Option<f64>,
    /// Bytes the storage side wrote per delivery (disk writes when
    /// measured, else the engine's bytes written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_delivery: Option<f64>,
    /// fdatasyncs per message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsyncs_per_message: Option<f64>,
    pub threads: usize,
    pub payload: usize,
    pub keyspace: String,
    pub shards: usize,
    pub io: String,
    pub seed: u64,
    pub cores: usize,
    pub mem_bytes: u64,
}

/// Nanoseconds to microseconds, rounded to the nanosecond.
fn us(ns: u64) -> f64 {
    (ns as f64 / 1000.0 * 1000.0).round() / 1000.0
}

impl ResultLine {
    /// Fill the per-operation costs from the counts and CPU the line holds
    /// (a cost already set, as W6's load-phase figure, is kept).
    pub fn set_costs(&mut self) {
        let per = |num: Option<f64>, den: Option<u64>, scale: f64| match (num, den) {
            (Some(n), Some(d)) if d > 0 => Some(round_sig(n * scale / d as f64)),
            _ => None,
        };
        // The server's; in process, the storage side's own threads; where
        // the engine runs on the bench's threads (W1), the whole process's.
        let (cpu, basis) = match (
            self.server_cpu_secs,
            self.storage_cpu_secs,
            self.process_cpu_secs,
        ) {
            (Some(c), _, _) => (Some(c), "server process"),
            (None, Some(c), _) => (Some(c), "storage threads"),
            (None, None, Some(c)) => (Some(c), "whole process"),
            _ => (None, ""),
        };
        if cpu.is_some() && self.cpu_basis.is_none() {
            self.cpu_basis = Some(basis.into());
        }
        let messages = self.messages.or((self.ops > 0).then_some(self.ops));
        self.cpu_us_per_message = self.cpu_us_per_message.or(per(cpu, messages, 1e6));
        if self.server_cpu_secs.is_none() {
            self.process_cpu_us_per_message =
                self.process_cpu_us_per_message
                    .or(per(self.process_cpu_secs, messages, 1e6));
        }
        self.cpu_us_per_delivery = self.cpu_us_per_delivery.or(per(cpu, self.deliveries, 1e6));
        // In-process, `sync` runs on the caller's threads, outside
        // `storage_cpu_secs`: a per-sync figure only from a server's CPU.
        self.cpu_us_per_sync =
            self.cpu_us_per_sync
                .or(per(self.server_cpu_secs, self.sync_ops, 1e6));
        let written = self.disk_write_bytes.or(self.bytes_written);
        self.bytes_per_delivery =
            self.bytes_per_delivery
                .or(per(written.map(|b| b as f64), self.deliveries, 1.0));
        self.fsyncs_per_message =
            self.fsyncs_per_message
                .or(per(self.fsyncs.map(|f| f as f64), messages, 1.0));
    }

    /// Fill p50/p99/p999/max from a nanosecond histogram.
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.p50_us = Some(us(h.value_at_quantile(0.5)));
        self.p99_us = Some(us(h.value_at_quantile(0.99)));
        self.p999_us = Some(us(h.value_at_quantile(0.999)));
        self.max_us = Some(us(h.max()));
    }

    /// Fill the `visible_*` fields from a nanosecond histogram.
    pub fn set_visible_latency(&mut self, h: &Histogram<u64>) {
        self.visible_samples = Some(h.len());
        if h.is_empty() {
            return;
        }
        self.visible_p50_us = Some(us(h.value_at_quantile(0.5)));
        self.visible_p99_us = Some(us(h.value_at_quantile(0.99)));
        self.visible_p999_us = Some(us(h.value_at_quantile(0.999)));
        self.visible_max_us = Some(us(h.max()));
    }

    /// Fill the `push_*` fields from a nanosecond histogram.
    pub fn set_push_latency(&mut self, h: &Histogram<u64>) {
        self.push_samples = Some(h.len());
        if h.is_empty() {
            return;
        }
        self.push_p50_us = Some(us(h.value_at_quantile(0.5)));
        self.push_p99_us = Some(us(h.value_at_quantile(0.99)));
        self.push_p999_us = Some(us(h.value_at_quantile(0.999)));
    }

    /// Fill the `disk_*` fields from /proc/self/io counters taken before and
    /// after (call after `payload_bytes` is set).
    pub fn set_disk_io(&mut self, before: DiskIo, after: DiskIo) {
        let w = after.write_bytes.saturating_sub(before.write_bytes);
        self.disk_write_bytes = Some(w);
        self.disk_cancelled_write_bytes = Some(
            after
                .cancelled_write_bytes
                .saturating_sub(before.cancelled_write_bytes),
        );
        if let Some(p) = self.payload_bytes.filter(|&p| p > 0) {
            self.disk_bytes_per_payload_byte =
                Some((w as f64 / p as f64 * 1000.0).round() / 1000.0);
        }
    }

    fn label(&self) -> String {
        let mut s = self.workload.clone();
        if let Some(p) = &self.phase {
            s = format!("{s} ({p})");
        }
        if let Some(d) = &self.direction {
            s = format!("{s} {d}");
        }
        if let Some(m) = &self.fanout_mode {
            s = format!("{s} {m}");
        }
        if let Some(g) = self.group_size {
            s = format!("{s} {g}");
        }
        s
    }
}

/// A latency histogram in nanoseconds, 3 significant figures, up to 1 hour.
pub fn new_histogram() -> crate::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 3_600_000_000_000, 3)?)
}

/// Prints result lines as they come (JSON) or as one table at the end.
pub struct Reporter {
    json: bool,
    machine: Machine,
    lines: Vec<ResultLine>,
    /// Time series and latency histograms for the results directory.
    pub extras: crate::results::Extras,
}

impl Reporter {
    pub fn new(json: bool, machine: Machine) -> Self {
        Reporter {
            json,
            machine,
            lines: Vec::new(),
            extras: Default::default(),
        }
    }

    pub fn push(&mut self, mut line: ResultLine) -> Result<(), serde_json::Error> {
        if line.rss_anon_bytes.is_none() {
            let (a, f) = crate::sysinfo::rss_split();
            line.rss_anon_bytes = Some(a);
            line.rss_file_bytes = Some(f);
        }
        line.cores = self.machine.cores;
        line.mem_bytes = self.machine.mem_bytes;
        line.set_costs();
        if self.json {
            timeline_client::outln!("{}", serde_json::to_string(&line)?);
        }
        self.lines.push(line);
        Ok(())
    }

    /// The result lines so far.
    pub fn lines(&self) -> &[ResultLine] {
        &self.lines
    }

    /// No result line yet.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Write the results directory under `root` (see [`crate::results`]).
    pub fn write_results(
        &self,
        root: &std::path::Path,
        command: &str,
        facts: &crate::results::Facts,
    ) -> crate::Result<std::path::PathBuf> {
        crate::results::write(root, command, &self.lines, facts, &self.extras)
    }

    /// Print the table (human mode only).
    pub fn finish(&self) {
        if self.json || self.lines.is_empty() {
            return;
        }
        timeline_client::outln!("{}", self.machine.describe());
        if let Some(l) = self.lines.first() {
            timeline_client::outln!(
                "target {}, io {}, keyspace {}, shards {}, threads {}, payload {} B, seed {}",
                l.target,
                l.io,
                l.keyspace,
                l.shards,
                l.threads,
                l.payload,
                l.seed
            );
        }
        let head = [
            "workload",
            "durability",
            "ops",
            "secs",
            "ops/s",
            "msgs/s",
            "p50 us",
            "p99 us",
            "p999 us",
            "WA",
            "RSS MiB",
            "index MiB",
            "files",
        ];
        let opt_f = |v: Option<f64>, prec: usize| {
            v.map(|x| format!("{x:.prec$}"))
                .unwrap_or_else(|| "-".into())
        };
        let opt_u = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        let mib = |v: Option<u64>| opt_f(v.map(|b| b as f64 / (1u64 << 20) as f64), 1);
        let rows: Vec<Vec<String>> = self
            .lines
            .iter()
            .map(|l| {
                vec![
                    l.label(),
                    l.durability.clone(),
                    l.ops.to_string(),
                    format!("{:.3}", l.open_secs.unwrap_or(l.secs)),
                    format!("{:.0}", l.ops_per_sec),
                    opt_f(l.messages_per_sec, 0),
                    opt_f(l.p50_us, 1),
                    opt_f(l.p99_us, 1),
                    opt_f(l.p999_us, 1),
                    opt_f(l.write_amplification, 2),
                    mib(l.peak_rss_bytes),
                    mib(l.index_bytes),
                    opt_u(l.files),
                ]
            })
            .collect();
        print_table(&head, &rows, 2);
        if self.lines.iter().any(|l| l.deliveries.is_some()) {
            timeline_client::outln!();
            let head = [
                "workload",
                "deliveries/s",
                "sync ops/s",
                "writes/msg",
                "writes/deliv",
                "reads/deliv",
                "R:W",
                "vis p50",
                "vis p99",
                "vis p999",
                "push p50",
                "push p99",
            ];
            let rows: Vec<Vec<String>> = self
                .lines
                .iter()
                .filter(|l| l.deliveries.is_some())
                .map(|l| {
                    vec![
                        l.label(),
                        opt_f(l.deliveries_per_sec, 0),
                        opt_f(l.sync_ops_per_sec, 0),
                        opt_f(l.storage_writes_per_message, 2),
                        opt_f(l.writes_per_delivery, 3),
                        opt_f(l.reads_per_delivery, 3),
                        opt_f(l.read_write_ratio, 2),
                        opt_f(l.visible_p50_us, 1),
                        opt_f(l.visible_p99_us, 1),
                        opt_f(l.visible_p999_us, 1),
                        opt_f(l.push_p50_us, 1),
                        opt_f(l.push_p99_us, 1),
                    ]
                })
                .collect();
            print_table(&head, &rows, 1);
        }
        for l in &self.lines {
            let mut notes = Vec::new();
            if let Some(c) = l.cpu_us_per_message {
                let side = if l.server_cpu_secs.is_some() {
                    "server process"
                } else if l.storage_cpu_secs.is_some() {
                    "engine + IM threads"
                } else {
                    "whole process: the store runs on the bench's threads"
                };
                let mut costs = format!("costs: {c} us CPU/message ({side})");
                if let Some(d) = l.cpu_us_per_delivery {
                    costs.push_str(&format!(", {d} us/delivery"));
                }
                if let Some(y) = l.cpu_us_per_sync {
                    costs.push_str(&format!(", {y} us/sync"));
                }
                if let (Some(p), Some(_)) = (l.process_cpu_secs, l.storage_cpu_secs) {
                    costs.push_str(&format!(" (whole process {p} s CPU)"));
                }
                if let Some(b) = l.bytes_per_delivery {
                    costs.push_str(&format!(", {b} bytes written/delivery"));
                }
                if let Some(f) = l.fsyncs_per_message {
                    costs.push_str(&format!(", {f} fdatasyncs/message"));
                }
                notes.push(costs);
            }
            if let (Some(b), Some(p)) = (l.bytes_written, l.payload_bytes) {
                notes.push(format!(
                    "bytes_written {} ({} keyspace; {} over all keyspaces), payload {}, {:.2} bytes/payload byte",
                    b,
                    l.keyspace,
                    l.bytes_written_total.unwrap_or(b),
                    p,
                    l.bytes_per_payload_byte.unwrap_or(0.0)
                ));
            }
            if let (Some(d), Some(c)) = (l.disk_write_bytes, l.disk_cancelled_write_bytes) {
                notes.push(format!(
                    "disk write_bytes {d} (cancelled {c}), {:.2} bytes/payload byte",
                    l.disk_bytes_per_payload_byte.unwrap_or(0.0)
                ));
            }
            if let (Some(w), Some(f), Some(c)) = (l.wal_bytes, l.flush_bytes, l.compaction_bytes) {
                notes.push(format!("wal {w}, flush {f}, compaction {c}"));
            }
            if let Some(f) = l.fsyncs {
                notes.push(format!("fsyncs {f}"));
            }
            if let (Some(c), Some(p)) = (l.connections, l.pipeline) {
                notes.push(format!(
                    "{c} connection(s) x pipeline {p} (refill {})",
                    l.refill.unwrap_or(1)
                ));
            }
            if let Some(a) = &l.appendfsync {
                notes.push(format!("appendfsync {a}"));
            }
            if let Some(c) = &l.client {
                notes.push(format!("client {c}"));
            }
            match (l.server_cpu_secs, l.client_cpu_secs) {
                (Some(s), Some(c)) => notes.push(format!("cpu: server {s:.2} s, client {c:.2} s")),
                (None, Some(c)) => notes.push(format!("cpu: client {c:.2} s")),
                _ => {}
            }
            if let Some(e) = l.errors {
                notes.push(format!("errors {e}"));
            }
            if let Some(d) = l.deliveries {
                notes.push(format!("deliveries {d}"));
            }
            if let (Some(n), Some(e)) = (l.sync_ops, l.entries_read) {
                notes.push(format!("{n} syncs returned {e} messages"));
            }
            if let (Some(v), Some(p)) = (l.visible_samples, l.push_samples) {
                notes.push(format!(
                    "latency samples: visible {v}, push {p} ({} resyncs)",
                    l.push_resyncs.unwrap_or(0)
                ));
            }
            if let Some(s) = l.setup_secs {
                notes.push(format!("setup {s:.3} s (untimed)"));
            }
            if let Some(t) = l.timelines_with_data {
                notes.push(format!("timelines with data {t}"));
            }
            if let Some(m) = l.messages {
                if l.workload == "reopen" {
                    notes.push(format!("messages {m}"));
                }
            }
            if let Some(c) = l.sync_secs {
                notes.push(format!("sync {c:.3} s"));
            }
            if let Some(c) = l.close_secs {
                notes.push(format!("close {c:.3} s"));
            }
            if !notes.is_empty() {
                timeline_client::outln!("  {}: {}", l.label(), notes.join(", "));
            }
        }
    }
}

/// An aligned table: the first `left` columns left-aligned, the rest right.
fn print_table(head: &[&str], rows: &[Vec<String>], left: usize) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let fmt_row = |cells: &[String]| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < left {
                    format!("{c:<width$}", width = w[i])
                } else {
                    format!("{c:>width$}", width = w[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    timeline_client::outln!(
        "{}",
        fmt_row(&head.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    );
    for r in rows {
        timeline_client::outln!("{}", fmt_row(r));
    }
}

/// `x` to 4 significant digits (costs span µs to ns-per-byte ranges).
fn round_sig(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(3 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}
