//! One record: a payload appended to one timeline.
//!
//! ```text
//! record := crc32:u32 len:u32 timeline:u64 seq:u64 ts_ms:u64 prev:u32 anchor:u32 payload:[u8; len]
//! ```
//! `crc32` (crc32fast, IEEE) covers every byte after itself, header and payload.
//! `prev` is the offset, in the same segment, of this timeline's previous
//! record. When this is the timeline's first record in the segment, `prev` is
//! `CROSS | offset` of the previous record in the older segment whose
//! generation `anchor` holds, or `NONE` (and `anchor = NONE`) when the
//! timeline starts here. Otherwise `anchor` is the
//! offset of the nearest earlier record of the timeline in this segment whose
//! seq is a multiple of [`SPARSE_EVERY`](super::SPARSE_EVERY) (or `NONE`): a
//! sparse SeqId index threaded through the log, so a seek walks back 16
//! records per hop and costs no memory. Sealed grouped segments write the
//! same record format with `prev = anchor = NONE` except as described there.

use super::{get_u32, get_u64, FormatError};

/// Flag in `prev`: the previous record is in another (older) segment.
/// Segments are at most 1 GiB, so offsets never reach this bit.
pub const CROSS: u32 = 0x8000_0000;

/// True when `prev` points into the same segment.
#[inline]
pub fn is_local(prev: u32) -> bool {
    prev & CROSS == 0
}

/// The sparse-anchor rule: the `anchor` the *next* record of a timeline
/// carries, given this record's `seq`, its offset `off` and its own `prev`
/// and `anchor` links. A record whose seq is a multiple of
/// [`SPARSE_EVERY`](super::SPARSE_EVERY) is the anchor; a timeline's first
/// record in a segment (non-local `prev`) starts with none; otherwise the
/// anchor is inherited. The writer and recovery both use this one rule.
#[inline]
pub fn next_anchor(seq: u64, off: u32, prev: u32, anchor: u32) -> u32 {
    if seq.is_multiple_of(super::SPARSE_EVERY) {
        off
    } else if !is_local(prev) {
        super::NONE
    } else {
        anchor
    }
}

/// Bytes before the payload.
pub const RECORD_HEADER_LEN: usize = 40;

/// The fixed part of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub len: u32,
    pub timeline: u64,
    pub seq: u64,
    pub ts_ms: u64,
    pub prev: u32,
    pub anchor: u32,
}

impl RecordHeader {
    /// Total encoded length of the record.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.len as usize
    }
}

/// Encoded length of a record with a payload of `payload_len` bytes.
pub fn encoded_len(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + payload_len
}

// Encoders fill buffers they sized themselves; only decoders face untrusted bytes.
#[allow(clippy::indexing_slicing)]
/// Encode a record into `out` (which must be exactly `encoded_len(payload.len())`
/// bytes long; the caller owns the buffer).
pub fn encode_into(h: &RecordHeader, payload: &[u8], out: &mut [u8]) {
    debug_assert_eq!(h.len as usize, payload.len());
    debug_assert_eq!(out.len(), encoded_len(payload.len()));
    let (hdr, body) = out.split_at_mut(RECORD_HEADER_LEN);
    hdr[4..8].copy_from_slice(&h.len.to_le_bytes());
    hdr[8..16].copy_from_slice(&h.timeline.to_le_bytes());
    hdr[16..24].copy_from_slice(&h.seq.to_le_bytes());
    hdr[24..32].copy_from_slice(&h.ts_ms.to_le_bytes());
    hdr[32..36].copy_from_slice(&h.prev.to_le_bytes());
    hdr[36..40].copy_from_slice(&h.anchor.to_le_bytes());
    body.copy_from_slice(payload);
    let mut c = crc32fast::Hasher::new();
    c.update(&hdr[4..]);
    c.update(body);
    hdr[0..4].copy_from_slice(&c.finalize().to_le_bytes());
}

/// Append an encoded record to a `Vec`.
pub fn encode_to_vec(h: &RecordHeader, payload: &[u8], out: &mut Vec<u8>) {
    // One pass over the bytes, no zeroing first.
    let start = out.len();
    out.reserve(encoded_len(payload.len()));
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&h.len.to_le_bytes());
    out.extend_from_slice(&h.timeline.to_le_bytes());
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.ts_ms.to_le_bytes());
    out.extend_from_slice(&h.prev.to_le_bytes());
    out.extend_from_slice(&h.anchor.to_le_bytes());
    out.extend_from_slice(payload);
    #[allow(clippy::indexing_slicing)] // `start + 4 <= out.len()`: just extended
    {
        let crc = crc32fast::hash(&out[start + 4..]);
        out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Decode the header at the start of `b` without checking the CRC (used to
/// follow links through memory the engine wrote itself). Checks that the
/// whole record fits in `b`.
pub fn decode_header(b: &[u8]) -> Result<RecordHeader, FormatError> {
    let h = RecordHeader {
        len: get_u32(b, 4)?,
        timeline: get_u64(b, 8)?,
        seq: get_u64(b, 16)?,
        ts_ms: get_u64(b, 24)?,
        prev: get_u32(b, 32)?,
        anchor: get_u32(b, 36)?,
    };
    let need = h.encoded_len();
    if b.len() < need {
        return Err(FormatError::Truncated {
            need,
            have: b.len(),
        });
    }
    Ok(h)
}

/// Decode and verify the record at the start of `b`: header, payload slice.
pub fn decode(b: &[u8]) -> Result<(RecordHeader, &[u8]), FormatError> {
    let h = decode_header(b)?;
    let end = h.encoded_len();
    let stored = get_u32(b, 0)?;
    let body = b.get(4..end).ok_or(FormatError::Truncated {
        need: end,
        have: b.len(),
    })?;
    let actual = crc32fast::hash(body);
    if actual != stored {
        return Err(FormatError::BadChecksum {
            expected: stored,
            actual,
        });
    }
    let payload = b
        .get(RECORD_HEADER_LEN..end)
        .ok_or(FormatError::Truncated {
            need: end,
            have: b.len(),
        })?;
    Ok((h, payload))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(timeline: u64, seq: u64, ts: u64, prev: u32, anchor: u32, payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = RecordHeader { len: payload.len() as u32, timeline, seq, ts_ms: ts, prev, anchor };
            let mut v = Vec::new();
            encode_to_vec(&h, &payload, &mut v);
            prop_assert_eq!(v.len(), h.encoded_len());
            let (d, p) = decode(&v).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn any_single_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 0..64), bit in 0usize..(8 * 104)) {
            let h = RecordHeader { len: payload.len() as u32, timeline: 9, seq: 3, ts_ms: 5, prev: 1, anchor: 2 };
            let mut v = Vec::new();
            encode_to_vec(&h, &payload, &mut v);
            let bit = bit % (v.len() * 8);
            v[bit / 8] ^= 1 << (bit % 8);
            // Either the length no longer fits (Truncated) or the CRC fails; never Ok.
            prop_assert!(decode(&v).is_err());
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&b);
        }
    }
}
