//! The I/O layer: everything the engine does to files goes through [`Io`] and
//! [`IoFile`], so the same engine code runs on
//! - [`StdIo`]: plain `pread`/`pwrite`/`fdatasync` (std's `FileExt`),
//! - [`UringIo`]: io_uring submissions (write + fdatasync linked in one submit,
//!   batched fdatasync across files for group commit), used when the kernel
//!   offers it, with a clean fallback to [`StdIo`] ([`default_io`]),
//! - [`MemIo`]: an in-memory file system for tests that can fail writes (a full
//!   disk), tear the last write and, on [`MemIo::crash`], keep only what was
//!   fdatasynced (and only directory entries that were directory-fsynced): the
//!   image a power cut leaves.
//!
//! Sealed segments are read through [`IoFile::map`], which is a memmap2 mapping
//! for real files.

use std::io;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod mem;
mod std_io;
#[cfg(target_os = "linux")]
mod uring;

pub use mem::{FailAt, IoOp, MemFaults, MemIo};
pub use std_io::StdIo;
#[cfg(target_os = "linux")]
pub use uring::UringIo;

/// How [`Io::open`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file; fail if it exists.
    CreateNew,
    /// Open an existing file for reading and writing.
    Existing,
}

/// A read-only view of a whole file, taken once the file is immutable
/// (sealed segments, checkpoints).
pub struct Mapping {
    inner: MappingInner,
}

enum MappingInner {
    Mmap(memmap2::Mmap),
    Bytes(Arc<[u8]>),
    Empty,
}

impl Mapping {
    pub(crate) fn from_mmap(m: memmap2::Mmap) -> Self {
        Mapping {
            inner: MappingInner::Mmap(m),
        }
    }
    /// A mapping over bytes held in memory (the in-memory backend).
    pub fn from_bytes(b: Arc<[u8]>) -> Self {
        Mapping {
            inner: MappingInner::Bytes(b),
        }
    }
    /// An empty mapping (memmap2 cannot map a zero-length file).
    pub fn empty() -> Self {
        Mapping {
            inner: MappingInner::Empty,
        }
    }
}

impl Deref for Mapping {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.inner {
            MappingInner::Mmap(m) => m,
            MappingInner::Bytes(b) => b,
            MappingInner::Empty => &[],
        }
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({} bytes)", self.len())
    }
}

/// Which step of [`IoFile::write_and_sync`] failed. They differ for what
/// is on disk: a failed write leaves the file's earlier pages as they
/// were, a failed fdatasync may have dropped dirty pages, and a later
/// fdatasync of the same file would not say so ("fsyncgate").
#[derive(Debug, thiserror::Error)]
pub enum WriteSyncError {
    #[error("write failed: {0}")]
    Write(#[source] io::Error),
    #[error("fdatasync failed: {0}")]
    Sync(#[source] io::Error),
}

impl From<WriteSyncError> for io::Error {
    fn from(e: WriteSyncError) -> io::Error {
        match e {
            WriteSyncError::Write(e) | WriteSyncError::Sync(e) => e,
        }
    }
}

#[allow(clippy::len_without_is_empty)]
/// One open file. Implementations are shared between threads; `write_at`
/// calls on disjoint ranges may run concurrently.
pub trait IoFile: Send + Sync + std::fmt::Debug {
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fill all of `buf` from `offset`; `UnexpectedEof` past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// fdatasync: once it returns, every completed `write_at` survives a power cut.
    fn sync_data(&self) -> io::Result<()>;
    /// `write_at` then `sync_data`; backends that can submit both at once
    /// do. The error says which of the two failed.
    fn write_and_sync(&self, buf: &[u8], offset: u64) -> Result<(), WriteSyncError> {
        self.write_at(buf, offset).map_err(WriteSyncError::Write)?;
        self.sync_data().map_err(WriteSyncError::Sync)
    }
    /// A read-only view of the whole file as it is now.
    fn map(&self) -> io::Result<Mapping>;
}

/// The file-system operations the engine needs.
pub trait Io: Send + Sync + std::fmt::Debug + 'static {
    /// Short name for logs and benchmark output ("std", "io_uring", "mem").
    fn name(&self) -> &'static str;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// File names (not paths) directly inside `dir`, in no particular order.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn IoFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// fsync a directory so that creations, renames and unlinks in it survive a power cut.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// fdatasync several files; backends that can issue them concurrently do.
    fn sync_many(&self, files: &[Arc<dyn IoFile>]) -> io::Result<()> {
        for f in files {
            f.sync_data()?;
        }
        Ok(())
    }
}

/// The backend to use on this machine: io_uring when the kernel allows it,
/// else plain pread/pwrite.
pub fn default_io() -> Arc<dyn Io> {
    #[cfg(target_os = "linux")]
    {
        if let Some(u) = UringIo::try_new() {
            return Arc::new(u);
        }
    }
    Arc::new(StdIo)
}

/// Join helper used by callers that build file paths.
pub fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
