//! Index checkpoint: every timeline of a shard as of the sealed segments up
//! to `gen`, so recovery reads this one file plus what was sealed or logged
//! after it, and so a timeline whose records all expired keeps its last seq.
//!
//! ```text
//! checkpoint := magic:[u8;8]="TMLNCKPT" version:u16 reserved:u16 gen:u32 count:u64
//!               entry * count crc32:u32
//! entry      := timeline:u64 last_seq:u64 gen:u32 loc:u32
//! ```
//! `crc32` covers everything before it. Entries are sorted by timeline.

use super::{check_crc, check_version, get_u32, get_u64, FormatError, FORMAT_VERSION};

pub const MAGIC: [u8; 8] = *b"TMLNCKPT";
pub const HEADER_LEN: usize = 24;
pub const ENTRY_LEN: usize = 24;

/// One timeline in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CkptEntry {
    pub timeline: u64,
    pub last_seq: u64,
    pub gen: u32,
    pub loc: u32,
}

/// File name of the checkpoint covering sealed segments up to `gen`.
pub fn file_name(gen: u32) -> String {
    format!("index-{gen:010}.ckpt")
}

/// The `gen` of a checkpoint file name.
pub fn parse_file_name(name: &str) -> Option<u32> {
    let g = name.strip_prefix("index-")?.strip_suffix(".ckpt")?;
    if g.len() != 10 || !g.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    g.parse().ok()
}

pub fn encode(gen: u32, entries: &[CkptEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + 4);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&gen.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        b.extend_from_slice(&e.timeline.to_le_bytes());
        b.extend_from_slice(&e.last_seq.to_le_bytes());
        b.extend_from_slice(&e.gen.to_le_bytes());
        b.extend_from_slice(&e.loc.to_le_bytes());
    }
    let c = crc32fast::hash(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b
}

/// Decode and verify a whole checkpoint file: (gen, entries).
pub fn decode(b: &[u8]) -> Result<(u32, Vec<CkptEntry>), FormatError> {
    if b.len() < HEADER_LEN + 4 {
        return Err(FormatError::Truncated {
            need: HEADER_LEN + 4,
            have: b.len(),
        });
    }
    if b.get(..8) != Some(&MAGIC[..]) {
        return Err(FormatError::BadMagic);
    }
    check_crc(b, b.len() - 4)?;
    check_version(b, 8)?;
    let gen = get_u32(b, 12)?;
    let count = get_u64(b, 16)?;
    let need = (count as u128) * ENTRY_LEN as u128 + HEADER_LEN as u128 + 4;
    if need != b.len() as u128 {
        return Err(FormatError::BadField("checkpoint entry count"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let at = HEADER_LEN + i * ENTRY_LEN;
        out.push(CkptEntry {
            timeline: get_u64(b, at)?,
            last_seq: get_u64(b, at + 8)?,
            gen: get_u32(b, at + 16)?,
            loc: get_u32(b, at + 20)?,
        });
    }
    Ok((gen, out))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(gen: u32, v in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()), 0..50)) {
            let e: Vec<CkptEntry> = v.into_iter().map(|(timeline, last_seq, gen, loc)| CkptEntry { timeline, last_seq, gen, loc }).collect();
            let b = encode(gen, &e);
            prop_assert_eq!(decode(&b).unwrap(), (gen, e));
        }

        #[test]
        fn damage_is_detected(v in proptest::collection::vec(any::<u64>(), 1..10), bit in 0usize..10_000) {
            let e: Vec<CkptEntry> = v.into_iter().map(|t| CkptEntry { timeline: t, last_seq: t, gen: 1, loc: 2 }).collect();
            let mut b = encode(7, &e);
            let bit = bit % (b.len() * 8);
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&b).is_err());
            prop_assert!(decode(&b[..b.len() / 2]).is_err());
        }
    }

    #[test]
    fn names() {
        assert_eq!(parse_file_name(&file_name(12)), Some(12));
        assert_eq!(parse_file_name("index-12.ckpt"), None);
    }
}
