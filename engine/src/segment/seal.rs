//! Sealing: turning a full log segment into a sealed one. Pure: bytes in,
//! bytes out; the shard does the file work.

use crate::format::record::{decode_header, is_local};
use crate::format::segment::{
    Footer, IndexEntry, SegmentHeader, SegmentKind, FOOTER_LEN, HEADER_LEN,
};
use crate::format::{FormatError, NONE, SPARSE_EVERY};

/// What sealing produces.
pub(crate) enum SealOutput {
    /// A whole new file (header, regrouped runs, index, footer).
    Grouped(Vec<u8>),
    /// Bytes to append to the log file itself (index and footer); the records
    /// stay where they are.
    Appendix(Vec<u8>),
}

/// One record's place in the log, as sealing sees it.
#[derive(Clone, Copy)]
struct Loc {
    timeline: u64,
    seq: u64,
    off: u32,
    len: u32,
    prev: u32,
    anchor: u32,
}

/// Build the sealed form of the log segment `log` (its whole published
/// content, header included). `regroup` picks the layout.
pub(crate) fn build_sealed(
    log: &[u8],
    header: SegmentHeader,
    regroup: bool,
) -> Result<(SealOutput, Footer), FormatError> {
    let mut locs = Vec::new();
    let mut off = HEADER_LEN;
    let (mut min_ts, mut max_ts) = (u64::MAX, 0u64);
    while off < log.len() {
        let h = decode_header(log.get(off..).unwrap_or_default())?;
        min_ts = min_ts.min(h.ts_ms);
        max_ts = max_ts.max(h.ts_ms);
        locs.push(Loc {
            timeline: h.timeline,
            seq: h.seq,
            off: off as u32,
            len: h.encoded_len() as u32,
            prev: h.prev,
            anchor: h.anchor,
        });
        off += h.encoded_len();
    }
    if locs.is_empty() {
        min_ts = 0;
    }
    // (timeline, arrival index) pairs are unique, so an unstable sort of the
    // pairs keeps a timeline's records in arrival (= seq) order; sorting the
    // keys inline, not indices into `locs`, avoids a cache miss per compare
    // (this sort was 18% of a small-record sync-keyspace load).
    let mut keyed: Vec<(u64, u32)> = locs
        .iter()
        .enumerate()
        .map(|(i, l)| (l.timeline, i as u32))
        .collect();
    keyed.sort_unstable();
    let order: Vec<u32> = keyed.into_iter().map(|(_, i)| i).collect();

    let mut entries: Vec<IndexEntry> = Vec::new();
    let mut sparse: Vec<u32> = Vec::new();
    let mut out = Vec::new();
    if regroup {
        out.reserve(log.len() + log.len() / 8);
        out.extend_from_slice(
            &SegmentHeader {
                kind: SegmentKind::Grouped,
                ..header
            }
            .encode(),
        );
    }
    let mut i = 0;
    while i < order.len() {
        let first = locs[order[i] as usize];
        let mut j = i;
        while j < order.len() && locs[order[j] as usize].timeline == first.timeline {
            j += 1;
        }
        let last = locs[order[j - 1] as usize];
        if is_local(first.prev) || last.seq - first.seq + 1 != (j - i) as u64 {
            return Err(FormatError::BadField(
                "timeline records not consecutive within segment",
            ));
        }
        let mut e = IndexEntry {
            timeline: first.timeline,
            first_seq: first.seq,
            last_seq: last.seq,
            loc: last.off,
            prev_gen: if first.prev == NONE {
                NONE
            } else {
                first.anchor
            },
            sparse_start: 0,
            run_len: 0,
        };
        if regroup {
            e.loc = out.len() as u32;
            e.sparse_start = sparse.len() as u32;
            for (k, &r) in order[i..j].iter().enumerate() {
                let l = locs[r as usize];
                if (k as u64).is_multiple_of(SPARSE_EVERY) {
                    sparse.push(out.len() as u32);
                }
                out.extend_from_slice(&log[l.off as usize..(l.off + l.len) as usize]);
            }
            e.run_len = out.len() as u32 - e.loc;
        }
        entries.push(e);
        i = j;
    }
    let mut index = Vec::with_capacity(entries.len() * 40 + sparse.len() * 4);
    for e in &entries {
        e.encode_to(&mut index);
    }
    for s in &sparse {
        index.extend_from_slice(&s.to_le_bytes());
    }
    let index_off = if regroup { out.len() } else { log.len() } as u64;
    let footer = Footer {
        index_off,
        entries: entries.len() as u32,
        sparse_count: sparse.len() as u32,
        records: locs.len() as u64,
        min_ts,
        max_ts,
        index_crc: crc32fast::hash(&index),
    };
    out.extend_from_slice(&index);
    out.extend_from_slice(&footer.encode());
    debug_assert!(out.len() >= FOOTER_LEN);
    Ok((
        if regroup {
            SealOutput::Grouped(out)
        } else {
            SealOutput::Appendix(out)
        },
        footer,
    ))
}
