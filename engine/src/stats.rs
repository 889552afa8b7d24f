//! What the engine reports about itself: per-keyspace counters.

use crate::config::Keyspace;

/// Per-keyspace statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyspaceStats {
    /// The keyspace's directory name (empty in [`Stats::total`]).
    pub name: String,
    pub timelines: u64,
    pub records: u64,
    pub payload_bytes: u64,
    /// Payload plus record headers, as appended.
    pub record_bytes: u64,
    /// Every byte written to files (log, sealed copies, indexes, headers).
    pub bytes_written: u64,
    pub sealed_segments: u64,
    /// Of `sealed_segments`, those a keyspace that regroups sealed in log
    /// order because the disk had no room for the regrouped copy.
    pub seals_in_log_order: u64,
    pub dropped_segments: u64,
    /// Segment files the keyspace holds now.
    pub files: u64,
    /// In-memory index bytes (timeline tables and sealed-segment fences).
    pub index_bytes: u64,
    pub fsyncs: u64,
}

impl KeyspaceStats {
    /// bytes written / (payload + record header bytes).
    pub fn write_amplification(&self) -> f64 {
        if self.record_bytes == 0 {
            0.0
        } else {
            self.bytes_written as f64 / self.record_bytes as f64
        }
    }
}

/// Engine statistics: one entry per configured keyspace, in config order.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub keyspaces: Vec<(Keyspace, KeyspaceStats)>,
}

impl Stats {
    pub fn total(&self) -> KeyspaceStats {
        let mut t = KeyspaceStats::default();
        for (_, k) in &self.keyspaces {
            t.timelines += k.timelines;
            t.records += k.records;
            t.payload_bytes += k.payload_bytes;
            t.record_bytes += k.record_bytes;
            t.bytes_written += k.bytes_written;
            t.sealed_segments += k.sealed_segments;
            t.seals_in_log_order += k.seals_in_log_order;
            t.dropped_segments += k.dropped_segments;
            t.files += k.files;
            t.index_bytes += k.index_bytes;
            t.fsyncs += k.fsyncs;
        }
        t
    }
    /// The statistics of `ks` (all zero if it is not configured).
    pub fn keyspace(&self, ks: Keyspace) -> KeyspaceStats {
        self.keyspaces
            .iter()
            .find(|(k, _)| *k == ks)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }
}
