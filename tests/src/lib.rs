//! Helpers shared by the integration tests, the crash-test child binaries
//! and the fuzz targets; [`model`] is the engine's one model world.

pub mod cluster;
pub mod history;
pub mod im_check;
pub mod model;
pub mod raft;

use std::path::Path;
use timeline_engine::{Config, Keyspace, TimelineId};

/// Number of timelines per keyspace the crash test writes to.
pub const CRASH_TIMELINES: u64 = 200;

/// The keyspace byte used in ack logs and payloads (its id).
pub fn ks_byte(ks: Keyspace) -> u8 {
    ks.0
}

/// The timeline for a keyspace byte (0 = store, anything else = sync).
pub fn timeline(ks: u8, id: u64) -> TimelineId {
    if ks == 0 {
        TimelineId::store(id)
    } else {
        TimelineId::sync(id)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payload of record `seq` of timeline `tl` in keyspace `ks`: a readable
/// prefix naming all three, then 0..300 bytes of pseudo-random filler whose
/// length and content are derived from them. Deterministic, so a reader can
/// check the exact bytes of any record.
pub fn payload(ks: u8, tl: u64, seq: u64) -> Vec<u8> {
    let mut h = splitmix(splitmix(splitmix(ks as u64) ^ tl) ^ seq);
    let len = (h % 300) as usize;
    let mut v = format!("k{ks}t{tl}s{seq}|").into_bytes();
    v.reserve(len);
    while v.len() < len + 16 {
        h = splitmix(h);
        v.extend_from_slice(&h.to_le_bytes());
    }
    let prefix = format!("k{ks}t{tl}s{seq}|").len();
    v.truncate(prefix + len);
    v
}

/// The configuration of the crash test (child and parent open the same
/// directory with it; the parent sets `background = false`).
pub fn crash_cfg(background: bool) -> Config {
    let mut c = Config::default();
    c.background = background;
    c.shards = 2;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 256 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 256 << 10;
    c.max_payload = 4096;
    c.maintenance_interval = std::time::Duration::from_millis(20);
    c
}

/// One acknowledged append as the crash child logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ack {
    pub ks: u8,
    pub tl: u64,
    pub seq: u64,
}

/// Format acks as lines `ks tl seq\n`.
pub fn format_acks(acks: &[Ack], out: &mut Vec<u8>) {
    use std::io::Write;
    for a in acks {
        let _ = writeln!(out, "{} {} {}", a.ks, a.tl, a.seq);
    }
}

/// Parse an ack log, ignoring a torn (unterminated) last line. Panics on a
/// malformed complete line: the child writes whole lines only.
pub fn parse_acks(path: &Path) -> Vec<Ack> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(i) => &bytes[..=i],
        None => &[][..],
    };
    let text = std::str::from_utf8(complete).expect("ack log is not UTF-8");
    text.lines()
        .map(|l| {
            let mut it = l
                .split(' ')
                .map(|x| x.parse::<u64>().expect("bad ack line"));
            let (ks, tl, seq) = (it.next(), it.next(), it.next());
            match (ks, tl, seq, it.next()) {
                (Some(ks), Some(tl), Some(seq), None) => Ack {
                    ks: ks as u8,
                    tl,
                    seq,
                },
                _ => panic!("malformed ack line {l:?}"),
            }
        })
        .collect()
}

/// Number of entries in a directory, recursively counting files only.
pub fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                n += count_files(&p);
            } else {
                n += 1;
            }
        }
    }
    n
}

/// The IM crash test's layout: direct conversations, write-fan-out groups,
/// read-fan-out groups (more members than [`IM_CRASH_THRESHOLD`]) and one
/// group whose membership the child keeps changing. `(conv, kind, members)`.
pub fn im_crash_convs() -> Vec<(u64, timeline_im::ConvKind, Vec<u64>)> {
    use timeline_im::ConvKind;
    let mut v = Vec::new();
    for i in 0..4u64 {
        v.push((1 + i, ConvKind::Direct, vec![100 + i, 101 + i]));
    }
    for i in 0..4u64 {
        v.push((
            10 + i,
            ConvKind::Group,
            (0..4).map(|k| 100 + i * 2 + k).collect(),
        ));
    }
    for i in 0..2u64 {
        v.push((
            20 + i,
            ConvKind::Group,
            (0..10).map(|k| 100 + i + k).collect(),
        ));
    }
    v.push((IM_CRASH_CHURN, ConvKind::Group, vec![100, 101, 102]));
    v
}

/// Groups above this many members use read fan-out in the IM crash test.
pub const IM_CRASH_THRESHOLD: usize = 6;
/// The group whose membership changes while messages are sent.
pub const IM_CRASH_CHURN: u64 = 30;
/// Users the churn group adds and removes.
pub const IM_CRASH_CHURNERS: [u64; 3] = [103, 104, 105];

/// Engine and IM configuration of the IM crash test (child and parent).
pub fn im_crash_cfg() -> (Config, timeline_im::ImConfig) {
    let mut c = crash_cfg(true);
    c.shards = 3;
    let ic = timeline_im::ImConfig {
        hybrid_threshold: IM_CRASH_THRESHOLD,
        durability: timeline_engine::Durability::GroupCommit,
        max_batch: 64,
        ..Default::default()
    };
    (c, ic)
}

/// The IM crash test's layout on the in-memory backend (`root` `/im`),
/// for the IM fault sweep and the `im_faults` fuzz target: 3 shards, 64 KiB
/// segments, group commit, the crash test's hybrid threshold.
pub fn im_mem_cfg(mem: &timeline_engine::io::MemIo) -> (Config, timeline_im::ImConfig) {
    let mut c = Config::default();
    c.background = false;
    c.shards = 3;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c.max_payload = 1024;
    c.io = Some(std::sync::Arc::new(mem.clone()));
    let ic = timeline_im::ImConfig {
        hybrid_threshold: IM_CRASH_THRESHOLD,
        durability: timeline_engine::Durability::GroupCommit,
        ..Default::default()
    };
    (c, ic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_deterministic_and_bounded() {
        for s in 1..500 {
            let p = payload(1, 7, s);
            assert_eq!(p, payload(1, 7, s));
            let prefix = format!("k1t7s{s}|");
            assert!(p.starts_with(prefix.as_bytes()));
            assert!(p.len() < prefix.len() + 300);
        }
        assert_ne!(payload(0, 7, 3), payload(1, 7, 3));
    }
}

/// A `STATS` key as docs/protocol.md lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentedStat {
    /// "a cluster node only" (absent on a single node).
    pub cluster_only: bool,
    /// The docs say when it may be absent ("absent if ...").
    pub may_be_absent: bool,
}

/// The `STATS` keys docs/protocol.md lists: the first column of the table
/// after "STATS keys", each row's backquoted names.
pub fn documented_stats() -> std::collections::BTreeMap<String, DocumentedStat> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let table = text
        .lines()
        .skip_while(|l| !l.starts_with("STATS keys"))
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2); // the header and its rule
    let mut out = std::collections::BTreeMap::new();
    for row in table {
        let cells: Vec<&str> = row.split(" | ").collect();
        let what = cells.get(1).copied().unwrap_or_default();
        let stat = DocumentedStat {
            cluster_only: what.contains("a cluster node only"),
            may_be_absent: what.contains("absent if"),
        };
        for key in cells[0].split('`').skip(1).step_by(2) {
            out.insert(key.to_string(), stat.clone());
        }
    }
    assert!(out.len() > 20, "no STATS table found in {path:?}");
    out
}

/// Check a node's `STATS` keys against docs/protocol.md: every key it
/// reports is documented, and every documented key it should report (all
/// but the cluster-only ones on a single node, and those that may be
/// absent) is there.
pub fn check_stats_documented<'a>(keys: impl IntoIterator<Item = &'a String>, cluster: bool) {
    let docs = documented_stats();
    let got: std::collections::BTreeSet<&String> = keys.into_iter().collect();
    let undocumented: Vec<&&String> = got.iter().filter(|k| !docs.contains_key(**k)).collect();
    assert!(
        undocumented.is_empty(),
        "STATS keys not in docs/protocol.md: {undocumented:?}"
    );
    let missing: Vec<&String> = docs
        .iter()
        .filter(|(k, d)| (cluster || !d.cluster_only) && !d.may_be_absent && !got.contains(k))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty(),
        "STATS keys docs/protocol.md lists but a {} does not report: {missing:?}",
        if cluster {
            "cluster node"
        } else {
            "single node"
        }
    );
    if !cluster {
        let wrong: Vec<&&String> = got.iter().filter(|k| docs[**k].cluster_only).collect();
        assert!(
            wrong.is_empty(),
            "a single node reports keys documented as cluster-only: {wrong:?}"
        );
    }
}
