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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zipf: Option<f64>,
    pub threads: usize,
    pub payload: usize,
    pub keyspace: String,
    pub shards: usize,
    pub io: String,
    pub seed: u64,
    pub cores: usize,
    pub mem_bytes: u64,
}

impl ResultLine {
    /// Fill p50/p99/p999/max from a nanosecond histogram.
    pub fn set_latency(&mut self, h: &Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        let us = |ns: u64| (ns as f64 / 1000.0 * 1000.0).round() / 1000.0;
        self.p50_us = Some(us(h.value_at_quantile(0.5)));
        self.p99_us = Some(us(h.value_at_quantile(0.99)));
        self.p999_us = Some(us(h.value_at_quantile(0.999)));
        self.max_us = Some(us(h.max()));
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
}

impl Reporter {
    pub fn new(json: bool, machine: Machine) -> Self {
        Reporter {
            json,
            machine,
            lines: Vec::new(),
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
        if self.json {
            println!("{}", serde_json::to_string(&line)?);
        }
        self.lines.push(line);
        Ok(())
    }

    /// Print the table (human mode only).
    pub fn finish(&self) {
        if self.json || self.lines.is_empty() {
            return;
        }
        println!("{}", self.machine.describe());
        if let Some(l) = self.lines.first() {
            println!(
                "target {}, io {}, keyspace {}, shards {}, threads {}, payload {} B, seed {}",
                l.target, l.io, l.keyspace, l.shards, l.threads, l.payload, l.seed
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
        let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        let fmt_row = |cells: &[String]| {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i < 2 {
                        format!("{c:<width$}", width = w[i])
                    } else {
                        format!("{c:>width$}", width = w[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!(
            "{}",
            fmt_row(&head.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        );
        for r in &rows {
            println!("{}", fmt_row(r));
        }
        for l in &self.lines {
            let mut notes = Vec::new();
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
            if let Some(e) = l.errors {
                notes.push(format!("errors {e}"));
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
                println!("  {}: {}", l.label(), notes.join(", "));
            }
        }
    }
}
