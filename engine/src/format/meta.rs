//! `engine.meta`: the directory's format version and shard count.
//!
//! ```text
//! engine.meta (20 bytes)
//!  0   8  magic "TMLNMETA"
//!  8   2  format version
//!  10  4  shards per keyspace (1..=4096)
//!  14  2  reserved (0)
//!  16  4  crc32 of bytes 0..16
//! ```

use super::{check_crc, check_version, get_u32, FormatError, FORMAT_VERSION};

/// The file's name in the engine directory.
pub const META_FILE: &str = "engine.meta";
const META_MAGIC: [u8; 8] = *b"TMLNMETA";
const META_LEN: usize = 20;

/// Encode the meta file of a directory with `shards` shards per keyspace.
pub fn encode(shards: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(META_LEN);
    b.extend_from_slice(&META_MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&shards.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    let c = crc32fast::hash(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b
}

/// The shard count a meta file records.
pub fn decode(b: &[u8]) -> Result<u32, FormatError> {
    if b.len() != META_LEN {
        return Err(FormatError::Truncated {
            need: META_LEN,
            have: b.len(),
        });
    }
    if b.get(..8) != Some(&META_MAGIC[..]) {
        return Err(FormatError::BadMagic);
    }
    check_crc(b, 16)?;
    check_version(b, 8)?;
    let shards = get_u32(b, 10)?;
    if shards == 0 || shards > 4096 {
        return Err(FormatError::BadField(
            "engine.meta shard count out of range",
        ));
    }
    Ok(shards)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rejects_damage() {
        let b = encode(7);
        assert_eq!(decode(&b), Ok(7));
        let mut bad = b.clone();
        bad[12] ^= 1;
        assert!(matches!(decode(&bad), Err(FormatError::BadChecksum { .. })));
        assert!(matches!(
            decode(&b[..19]),
            Err(FormatError::Truncated { .. })
        ));
        assert_eq!(
            decode(&encode(0)),
            Err(FormatError::BadField(
                "engine.meta shard count out of range"
            ))
        );
    }
}
