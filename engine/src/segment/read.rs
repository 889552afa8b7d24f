//! Collecting a range of one timeline's records from one segment.
//!
//! A range read walks segments newest to oldest: each segment contributes the
//! part of `[lo, hi]` it holds, in seq order, and says whether the range goes
//! on in an older segment ([`Step::Continue`]) or is complete ([`Step::Done`]).

use super::{SealedSeg, SegRef};
use crate::error::{Error, Result};
use crate::format::record::{decode, decode_header, is_local, RecordHeader, CROSS};
use crate::format::segment::SegmentKind;
use crate::format::{NONE, SPARSE_EVERY};
use crate::Record;
use std::path::Path;

/// What comes after a segment's part of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The range starts in this segment (or earlier than the timeline did).
    Done,
    /// Records before `first_seq` are in segment `prev_gen` (`NONE`: there
    /// are none: the timeline starts at `first_seq`), the newest of them at
    /// `prev_head` when that segment is a log segment (else `NONE`).
    Continue {
        first_seq: u64,
        prev_gen: u32,
        prev_head: u32,
    },
}

/// Push the records of `timeline` with seq in `[lo, hi]` held by `seg` to
/// `out`, in ascending seq order. `head` is the offset of the timeline's
/// newest record in `seg` when the caller knows it (log segments); for sealed
/// segments the index says.
pub(crate) fn collect(
    seg: &SegRef,
    timeline: u64,
    head: Option<u32>,
    lo: u64,
    hi: u64,
    out: &mut Vec<Record>,
) -> Result<Step> {
    match seg {
        SegRef::Log(l) => {
            let head = head.filter(|&h| h != NONE).ok_or_else(|| {
                Error::corruption(
                    l.path.clone(),
                    0,
                    "log segment reached without a head offset",
                )
            })?;
            // Bytes in an active segment were written by this process (or
            // verified by recovery): skip per-record CRC work on the hot path.
            collect_chain(
                l.buf.published(),
                &l.path,
                timeline,
                head,
                lo,
                hi,
                false,
                out,
            )
        }
        SegRef::Sealed(s) => collect_sealed(s, timeline, lo, hi, out),
    }
}

fn collect_sealed(
    s: &SealedSeg,
    timeline: u64,
    lo: u64,
    hi: u64,
    out: &mut Vec<Record>,
) -> Result<Step> {
    let Some(e) = s.lookup(timeline)? else {
        return Err(Error::corruption(
            s.path.clone(),
            s.footer.index_off,
            format!(
                "timeline {timeline} should have records in this segment but the index has none"
            ),
        ));
    };
    if hi < e.first_seq {
        return Ok(Step::Continue {
            first_seq: e.first_seq,
            prev_gen: e.prev_gen,
            prev_head: NONE,
        });
    }
    match s.kind {
        SegmentKind::Log => collect_chain(
            s.bytes(),
            &s.path,
            timeline,
            e.loc,
            lo,
            hi.min(e.last_seq),
            true,
            out,
        ),
        SegmentKind::Grouped => {
            let bytes = s.bytes();
            let from = lo.max(e.first_seq);
            let to = hi.min(e.last_seq);
            let k = (from - e.first_seq) / SPARSE_EVERY;
            let mut off = s.sparse(e.sparse_start as usize + k as usize)? as usize;
            let run_end = e.loc as usize + e.run_len as usize;
            let mut expect = e.first_seq + k * SPARSE_EVERY;
            while expect <= to {
                if off >= run_end {
                    return Err(Error::corruption(
                        s.path.clone(),
                        off as u64,
                        "run ends before its last seq",
                    ));
                }
                let (h, payload) = verified(bytes, &s.path, off)?;
                if h.timeline != timeline || h.seq != expect {
                    return Err(bad_link(&s.path, off, timeline, expect, &h));
                }
                if h.seq >= from {
                    out.push(Record {
                        seq: h.seq,
                        timestamp_ms: h.ts_ms,
                        payload: payload.to_vec(),
                    });
                }
                off += h.encoded_len();
                expect += 1;
            }
            if lo < e.first_seq {
                Ok(Step::Continue {
                    first_seq: e.first_seq,
                    prev_gen: e.prev_gen,
                    prev_head: NONE,
                })
            } else {
                Ok(Step::Done)
            }
        }
    }
}

fn verified<'a>(bytes: &'a [u8], path: &Path, off: usize) -> Result<(RecordHeader, &'a [u8])> {
    let b = bytes
        .get(off..)
        .ok_or_else(|| Error::corruption(path, off as u64, "record offset past end of segment"))?;
    decode(b).map_err(|e| Error::corruption(path, off as u64, e.to_string()))
}

/// The header at `off`; with `verify`, only after the whole record passed its
/// CRC, because a walk steers by the header's seq and links.
fn header_at(bytes: &[u8], path: &Path, off: u32, verify: bool) -> Result<RecordHeader> {
    if verify {
        return verified(bytes, path, off as usize).map(|(h, _)| h);
    }
    let b = bytes
        .get(off as usize..)
        .ok_or_else(|| Error::corruption(path, off as u64, "record offset past end of segment"))?;
    decode_header(b).map_err(|e| Error::corruption(path, off as u64, e.to_string()))
}

fn bad_link(path: &Path, off: usize, timeline: u64, seq: u64, h: &RecordHeader) -> Error {
    Error::corruption(
        path,
        off as u64,
        format!(
            "expected timeline {timeline} seq {seq}, found timeline {} seq {}",
            h.timeline, h.seq
        ),
    )
}

/// The step after a timeline's first record in a log segment.
pub(crate) fn continue_from(h: &RecordHeader) -> Step {
    if h.prev == NONE {
        Step::Continue {
            first_seq: h.seq,
            prev_gen: NONE,
            prev_head: NONE,
        }
    } else {
        Step::Continue {
            first_seq: h.seq,
            prev_gen: h.anchor,
            prev_head: h.prev & !CROSS,
        }
    }
}

/// Walk a log segment's back-links from `head`: first seek to `hi` (jumping
/// 16 records at a time through `anchor` links), then collect down to `lo`.
#[allow(clippy::too_many_arguments)]
fn collect_chain(
    bytes: &[u8],
    path: &Path,
    timeline: u64,
    head: u32,
    lo: u64,
    hi: u64,
    verify: bool,
    out: &mut Vec<Record>,
) -> Result<Step> {
    let mut cur = head;
    let mut h = header_at(bytes, path, cur, verify)?;
    if h.timeline != timeline {
        return Err(bad_link(path, cur as usize, timeline, hi, &h));
    }
    // Seek: the newest record with seq <= hi.
    while h.seq > hi {
        if !is_local(h.prev) {
            return Ok(continue_from(&h));
        }
        let next = if h.anchor != NONE && is_local(h.prev) {
            let a = header_at(bytes, path, h.anchor, verify)?;
            if a.seq >= hi && a.seq < h.seq {
                Some((h.anchor, a))
            } else {
                None
            }
        } else {
            None
        };
        let (n, nh) = match next {
            Some(x) => x,
            None => (h.prev, header_at(bytes, path, h.prev, verify)?),
        };
        if nh.timeline != timeline || nh.seq >= h.seq {
            return Err(bad_link(path, n as usize, timeline, h.seq - 1, &nh));
        }
        cur = n;
        h = nh;
    }
    let start = out.len();
    let mut expect = h.seq;
    loop {
        if h.seq != expect || h.timeline != timeline {
            return Err(bad_link(path, cur as usize, timeline, expect, &h));
        }
        if h.seq < lo {
            break;
        }
        // Verified already by `header_at` when `verify` is set.
        let s = cur as usize + crate::format::RECORD_HEADER_LEN;
        let payload = bytes.get(s..s + h.len as usize).unwrap_or_default();
        out.push(Record {
            seq: h.seq,
            timestamp_ms: h.ts_ms,
            payload: payload.to_vec(),
        });
        if !is_local(h.prev) {
            out[start..].reverse();
            return Ok(if h.seq > lo {
                continue_from(&h)
            } else {
                Step::Done
            });
        }
        cur = h.prev;
        h = header_at(bytes, path, cur, verify)?;
        expect -= 1;
    }
    out[start..].reverse();
    Ok(Step::Done)
}
