//! The engine's error type: one enum for the engine layer, with fields that
//! say where a problem was found.

use std::path::PathBuf;

/// Result alias used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error (a full disk is `ErrorKind::StorageFull`).
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bytes on disk failed a check: bad magic, bad length, checksum mismatch.
    #[error("corruption in {path} at offset {offset}: {what}")]
    Corruption {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// A file carries a format version this build does not read.
    #[error("{path}: unsupported format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    /// A payload larger than `Config::max_payload`.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    /// The caller asked for SeqIds that retention (TTL) already dropped; the
    /// reader must fall back to roaming from `first_retained`.
    #[error(
        "timeline {timeline}: seq {requested} is below the first retained seq {first_retained}"
    )]
    Truncated {
        timeline: u64,
        requested: u64,
        first_retained: u64,
    },
    /// `Engine::append_after` found the timeline's last SeqId moved on
    /// (another append came first); the engine answers that as `Ok(None)`.
    #[error("timeline {timeline}: last seq is {last}, not {expected}")]
    NotLast {
        timeline: u64,
        expected: u64,
        last: u64,
    },
    /// An argument outside its domain (seq 0, an empty batch where one is needed, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier write failed; the shard refuses further appends until the
    /// engine is reopened, so nothing acknowledged is put at risk.
    #[error(
        "shard {shard} of keyspace {keyspace} is poisoned by an earlier I/O failure: {reason}"
    )]
    Poisoned {
        keyspace: String,
        shard: usize,
        reason: String,
    },
    /// The engine is shutting down.
    #[error("engine is closed")]
    Closed,
}

impl Error {
    /// Whether this is a full disk's I/O error (`ENOSPC`).
    pub fn is_storage_full(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull)
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn corruption(
        path: impl Into<PathBuf>,
        offset: u64,
        what: impl Into<String>,
    ) -> Self {
        Error::Corruption {
            path: path.into(),
            offset,
            what: what.into(),
        }
    }
    /// A decode failure found at `offset` of `path`: an unknown version is
    /// `UnsupportedVersion`, anything else `Corruption`.
    pub(crate) fn format(
        path: impl Into<PathBuf>,
        offset: u64,
        e: crate::format::FormatError,
    ) -> Self {
        match e {
            crate::format::FormatError::UnsupportedVersion(found) => Error::UnsupportedVersion {
                path: path.into(),
                found,
                supported: crate::format::FORMAT_VERSION,
            },
            e => Error::corruption(path, offset, e.to_string()),
        }
    }

    /// An equal error to hand to a second waiter (`std::io::Error` is not
    /// `Clone`; the copy keeps its kind and message, which is what a client's
    /// error code and text are made of).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::Io { path, source } => Error::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Corruption { path, offset, what } => Error::Corruption {
                path: path.clone(),
                offset: *offset,
                what: what.clone(),
            },
            Error::UnsupportedVersion {
                path,
                found,
                supported,
            } => Error::UnsupportedVersion {
                path: path.clone(),
                found: *found,
                supported: *supported,
            },
            Error::PayloadTooLarge { len, max } => Error::PayloadTooLarge {
                len: *len,
                max: *max,
            },
            Error::NotLast {
                timeline,
                expected,
                last,
            } => Error::NotLast {
                timeline: *timeline,
                expected: *expected,
                last: *last,
            },
            Error::Truncated {
                timeline,
                requested,
                first_retained,
            } => Error::Truncated {
                timeline: *timeline,
                requested: *requested,
                first_retained: *first_retained,
            },
            Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
            Error::Poisoned {
                keyspace,
                shard,
                reason,
            } => Error::Poisoned {
                keyspace: keyspace.clone(),
                shard: *shard,
                reason: reason.clone(),
            },
            Error::Closed => Error::Closed,
        }
    }

    /// True for errors that mean the data on disk is damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::Corruption { .. } | Error::UnsupportedVersion { .. }
        )
    }
}
