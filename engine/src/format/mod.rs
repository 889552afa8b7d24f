//! Bytes on disk, and nothing else: no I/O happens here. Every layout is
//! little-endian and is drawn as a byte grid in `docs/design.md`.
//!
//! Decoders take `&[u8]`, check every length before slicing, and return
//! [`FormatError`] for anything that does not verify; callers attach the file
//! path and turn it into `Error::Corruption`.
#![deny(clippy::indexing_slicing)]

use bytes::Buf;

pub mod checkpoint;
pub mod meta;
pub mod record;
pub mod segment;

pub use record::{RecordHeader, RECORD_HEADER_LEN};
pub use segment::{Footer, IndexEntry, SegmentHeader, SegmentKind};

/// Current on-disk format version of every file this crate writes.
pub const FORMAT_VERSION: u16 = 1;

/// "No offset" / "no segment" marker in u32 link fields.
pub const NONE: u32 = u32::MAX;

/// One sparse-index entry per this many records of a timeline: in sealed
/// grouped segments (offset table) and in log segments (the `anchor` link).
pub const SPARSE_EVERY: u64 = 16;

/// A decode failure, before a path is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    Truncated {
        need: usize,
        have: usize,
    },
    BadMagic,
    BadChecksum {
        expected: u32,
        actual: u32,
    },
    UnsupportedVersion(u16),
    /// A field holds a value no writer produces.
    BadField(&'static str),
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatError::Truncated { need, have } => {
                write!(f, "truncated: need {need} bytes, have {have}")
            }
            FormatError::BadMagic => write!(f, "bad magic"),
            FormatError::BadChecksum { expected, actual } => {
                write!(
                    f,
                    "checksum mismatch: stored {expected:#010x}, computed {actual:#010x}"
                )
            }
            FormatError::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            FormatError::BadField(w) => write!(f, "invalid field: {w}"),
        }
    }
}

/// Name of a segment file: `{gen:010}.log` while it is written in arrival
/// order, `{gen:010}.seg` once sealed.
pub fn log_file_name(gen: u32) -> String {
    format!("{gen:010}.log")
}
pub fn seg_file_name(gen: u32) -> String {
    format!("{gen:010}.seg")
}
/// Temporary name while a sealed segment is being built.
pub fn tmp_file_name(gen: u32) -> String {
    format!("{gen:010}.seg.tmp")
}

/// What a file name in a keyspace directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileName {
    Log(u32),
    Sealed(u32),
    /// Index checkpoint covering sealed segments up to this generation.
    Checkpoint(u32),
    Temp,
}

/// Parse a keyspace directory entry; `None` for names the engine did not write.
pub fn parse_file_name(name: &str) -> Option<FileName> {
    if name.ends_with(".tmp") {
        return Some(FileName::Temp);
    }
    if let Some(g) = checkpoint::parse_file_name(name) {
        return Some(FileName::Checkpoint(g));
    }
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 10 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let gen: u32 = stem.parse().ok()?;
    match ext {
        "log" => Some(FileName::Log(gen)),
        "seg" => Some(FileName::Sealed(gen)),
        _ => None,
    }
}

// Little-endian field access with checked bounds, on `bytes::Buf` (the
// workspace's one byte-order helper): a short input is `Truncated`, never a
// panic.
fn get_at<T>(
    b: &[u8],
    at: usize,
    width: usize,
    read: impl FnOnce(&mut &[u8]) -> Result<T, bytes::TryGetError>,
) -> Result<T, FormatError> {
    let truncated = FormatError::Truncated {
        need: at.saturating_add(width),
        have: b.len(),
    };
    let mut rest = b.get(at..).ok_or_else(|| truncated.clone())?;
    read(&mut rest).map_err(|_| truncated)
}
/// The crc32 of `b[..at]` must equal the `u32` stored at `at`.
pub(crate) fn check_crc(b: &[u8], at: usize) -> Result<(), FormatError> {
    let expected = get_u32(b, at)?;
    let actual = crc32fast::hash(b.get(..at).unwrap_or_default());
    if expected != actual {
        return Err(FormatError::BadChecksum { expected, actual });
    }
    Ok(())
}

/// The `u16` at `at` must be this build's [`FORMAT_VERSION`].
pub(crate) fn check_version(b: &[u8], at: usize) -> Result<(), FormatError> {
    match get_u16(b, at)? {
        FORMAT_VERSION => Ok(()),
        v => Err(FormatError::UnsupportedVersion(v)),
    }
}

pub(crate) fn get_u16(b: &[u8], at: usize) -> Result<u16, FormatError> {
    get_at(b, at, 2, |r| r.try_get_u16_le())
}
pub(crate) fn get_u32(b: &[u8], at: usize) -> Result<u32, FormatError> {
    get_at(b, at, 4, |r| r.try_get_u32_le())
}
pub(crate) fn get_u64(b: &[u8], at: usize) -> Result<u64, FormatError> {
    get_at(b, at, 8, |r| r.try_get_u64_le())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_file_name(&log_file_name(7)), Some(FileName::Log(7)));
        assert_eq!(
            parse_file_name(&seg_file_name(u32::MAX - 1)),
            Some(FileName::Sealed(u32::MAX - 1))
        );
        assert_eq!(parse_file_name(&tmp_file_name(3)), Some(FileName::Temp));
        assert_eq!(parse_file_name("notes.txt"), None);
        assert_eq!(parse_file_name("12.log"), None);
    }
}
