//! Segment files: a header, records, and once sealed an index and a footer.
//!
//! ```text
//! log segment (active, written in arrival order):
//!   header:64  record*
//! sealed segment:
//!   header:64  record*  entry:40 * entries  sparse:u32 * sparse_count  footer:64
//!
//! header := magic:[u8;8]="TMLNSEG\0" version:u16 kind:u8 keyspace:u8 shard:u32
//!           gen:u32 reserved:u32 created_ms:u64 reserved:[u8;28] crc32:u32
//! entry  := timeline:u64 first_seq:u64 last_seq:u64 loc:u32 prev_gen:u32
//!           sparse_start:u32 run_len:u32
//! footer := magic:[u8;8]="TMLNFTR\0" index_off:u64 entries:u32 sparse_count:u32
//!           records:u64 min_ts:u64 max_ts:u64 index_crc:u32 reserved:[u8;8] crc32:u32
//! ```
//! Entries are sorted by timeline. In a `Grouped` segment every timeline's
//! records are one contiguous run starting at `loc` and `run_len` bytes long,
//! in seq order; `sparse[sparse_start + k]` is the offset of the record with
//! seq `first_seq + 16k`. In a `Log` segment records stay in arrival order,
//! `loc` is the offset of the timeline's newest record and the chain links in
//! the records (see `record`) lead back from it; `sparse_start`/`run_len` are 0.
//! `prev_gen` is the segment holding the timeline's records before `first_seq`
//! (`NONE` if it starts here).

use super::{get_u16, get_u32, get_u64, FormatError, FORMAT_VERSION};

pub const HEADER_LEN: usize = 64;
pub const FOOTER_LEN: usize = 64;
pub const ENTRY_LEN: usize = 40;
pub const HEADER_MAGIC: [u8; 8] = *b"TMLNSEG\0";
pub const FOOTER_MAGIC: [u8; 8] = *b"TMLNFTR\0";

/// How the records of a segment are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// Arrival order with per-timeline back links.
    Log = 1,
    /// Per-timeline contiguous runs with a sparse offset table.
    Grouped = 2,
}

/// The fixed first 64 bytes of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub kind: SegmentKind,
    pub keyspace: u8,
    pub shard: u32,
    pub gen: u32,
    pub created_ms: u64,
}

impl SegmentHeader {
    #[allow(clippy::indexing_slicing)] // fixed-size array, constant ranges
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10] = self.kind as u8;
        b[11] = self.keyspace;
        b[12..16].copy_from_slice(&self.shard.to_le_bytes());
        b[16..20].copy_from_slice(&self.gen.to_le_bytes());
        b[24..32].copy_from_slice(&self.created_ms.to_le_bytes());
        let c = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let h = b.get(..HEADER_LEN).ok_or(FormatError::Truncated {
            need: HEADER_LEN,
            have: b.len(),
        })?;
        if h.get(0..8) != Some(&HEADER_MAGIC[..]) {
            return Err(FormatError::BadMagic);
        }
        let stored = get_u32(h, 60)?;
        let actual = crc32fast::hash(h.get(..60).unwrap_or_default());
        if stored != actual {
            return Err(FormatError::BadChecksum {
                expected: stored,
                actual,
            });
        }
        let version = get_u16(h, 8)?;
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let kind = match h.get(10) {
            Some(1) => SegmentKind::Log,
            Some(2) => SegmentKind::Grouped,
            _ => return Err(FormatError::BadField("segment kind")),
        };
        Ok(SegmentHeader {
            kind,
            keyspace: h.get(11).copied().unwrap_or_default(),
            shard: get_u32(h, 12)?,
            gen: get_u32(h, 16)?,
            created_ms: get_u64(h, 24)?,
        })
    }
}

/// One timeline's entry in a sealed segment's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    pub timeline: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub loc: u32,
    pub prev_gen: u32,
    pub sparse_start: u32,
    pub run_len: u32,
}

impl IndexEntry {
    pub fn encode_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.timeline.to_le_bytes());
        out.extend_from_slice(&self.first_seq.to_le_bytes());
        out.extend_from_slice(&self.last_seq.to_le_bytes());
        out.extend_from_slice(&self.loc.to_le_bytes());
        out.extend_from_slice(&self.prev_gen.to_le_bytes());
        out.extend_from_slice(&self.sparse_start.to_le_bytes());
        out.extend_from_slice(&self.run_len.to_le_bytes());
    }
    /// Decode entry `i` of an index region.
    pub fn decode_at(index: &[u8], i: usize) -> Result<Self, FormatError> {
        let at = i
            .checked_mul(ENTRY_LEN)
            .ok_or(FormatError::BadField("index position"))?;
        Ok(IndexEntry {
            timeline: get_u64(index, at)?,
            first_seq: get_u64(index, at + 8)?,
            last_seq: get_u64(index, at + 16)?,
            loc: get_u32(index, at + 24)?,
            prev_gen: get_u32(index, at + 28)?,
            sparse_start: get_u32(index, at + 32)?,
            run_len: get_u32(index, at + 36)?,
        })
    }
    /// Only the timeline id of entry `i` (binary search touches nothing else).
    pub fn timeline_at(index: &[u8], i: usize) -> Result<u64, FormatError> {
        get_u64(
            index,
            i.checked_mul(ENTRY_LEN)
                .ok_or(FormatError::BadField("index position"))?,
        )
    }
}

/// The last 64 bytes of a sealed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footer {
    pub index_off: u64,
    pub entries: u32,
    pub sparse_count: u32,
    pub records: u64,
    pub min_ts: u64,
    pub max_ts: u64,
    pub index_crc: u32,
}

impl Footer {
    /// Bytes of the index region (entries and sparse table) the footer describes.
    pub fn index_len(&self) -> u64 {
        self.entries as u64 * ENTRY_LEN as u64 + self.sparse_count as u64 * 4
    }

    #[allow(clippy::indexing_slicing)] // fixed-size array, constant ranges
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..8].copy_from_slice(&FOOTER_MAGIC);
        b[8..16].copy_from_slice(&self.index_off.to_le_bytes());
        b[16..20].copy_from_slice(&self.entries.to_le_bytes());
        b[20..24].copy_from_slice(&self.sparse_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.records.to_le_bytes());
        b[32..40].copy_from_slice(&self.min_ts.to_le_bytes());
        b[40..48].copy_from_slice(&self.max_ts.to_le_bytes());
        b[48..52].copy_from_slice(&self.index_crc.to_le_bytes());
        let c = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Decode the footer at the end of `file` and check that the regions it
    /// names fit in the file (the index CRC is checked by the caller, which
    /// holds the index bytes).
    pub fn decode_from_file(file: &[u8]) -> Result<Self, FormatError> {
        let n = file.len();
        if n < HEADER_LEN + FOOTER_LEN {
            return Err(FormatError::Truncated {
                need: HEADER_LEN + FOOTER_LEN,
                have: n,
            });
        }
        let b = file.get(n - FOOTER_LEN..).unwrap_or_default();
        if b.get(0..8) != Some(&FOOTER_MAGIC[..]) {
            return Err(FormatError::BadMagic);
        }
        let stored = get_u32(b, 60)?;
        let actual = crc32fast::hash(b.get(..60).unwrap_or_default());
        if stored != actual {
            return Err(FormatError::BadChecksum {
                expected: stored,
                actual,
            });
        }
        let f = Footer {
            index_off: get_u64(b, 8)?,
            entries: get_u32(b, 16)?,
            sparse_count: get_u32(b, 20)?,
            records: get_u64(b, 24)?,
            min_ts: get_u64(b, 32)?,
            max_ts: get_u64(b, 40)?,
            index_crc: get_u32(b, 48)?,
        };
        let end = f
            .index_off
            .checked_add(f.index_len())
            .ok_or(FormatError::BadField("index length"))?;
        if f.index_off < HEADER_LEN as u64 || end != (n - FOOTER_LEN) as u64 {
            return Err(FormatError::BadField("index bounds"));
        }
        Ok(f)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let h = SegmentHeader {
            kind: SegmentKind::Grouped,
            keyspace: 1,
            shard: 3,
            gen: 42,
            created_ms: 99,
        };
        let mut b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        b[5] ^= 1;
        assert_eq!(SegmentHeader::decode(&b), Err(FormatError::BadMagic));
        let mut b = h.encode();
        b[8] = 9; // version 9, CRC recomputed so only the version is wrong
        let c = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&b),
            Err(FormatError::UnsupportedVersion(9))
        );
        assert!(SegmentHeader::decode(&b[..10]).is_err());
    }

    #[test]
    fn footer_round_trip_and_bounds() {
        let f = Footer {
            index_off: 64,
            entries: 2,
            sparse_count: 3,
            records: 5,
            min_ts: 1,
            max_ts: 2,
            index_crc: 7,
        };
        let mut file = vec![0u8; 64];
        file.extend(vec![0u8; f.index_len() as usize]);
        file.extend_from_slice(&f.encode());
        assert_eq!(Footer::decode_from_file(&file), Ok(f));
        // A footer naming an index that does not fit is rejected.
        let bad = Footer { entries: 1000, ..f };
        let mut file2 = vec![0u8; 64 + f.index_len() as usize];
        file2.extend_from_slice(&bad.encode());
        assert!(Footer::decode_from_file(&file2).is_err());
    }

    #[test]
    fn entry_round_trip() {
        let e = IndexEntry {
            timeline: 1,
            first_seq: 2,
            last_seq: 3,
            loc: 4,
            prev_gen: 5,
            sparse_start: 6,
            run_len: 7,
        };
        let mut v = Vec::new();
        e.encode_to(&mut v);
        e.encode_to(&mut v);
        assert_eq!(v.len(), 2 * ENTRY_LEN);
        assert_eq!(IndexEntry::decode_at(&v, 1), Ok(e));
        assert!(IndexEntry::decode_at(&v, 2).is_err());
    }
}
