//! io_uring backend: writes and fdatasyncs are submitted to an io_uring; a
//! write and its fdatasync go out linked in one submission
//! ([`IoFile::write_and_sync`]) and [`Io::sync_many`] issues one fdatasync per
//! file in one batch (group commit). Reads, metadata and directory operations
//! use plain std calls (they are rare on this path).
//!
//! Rings are not shared between concurrent callers: a call takes a ring from a
//! small pool (creating one when the pool is empty), waits for every completion
//! it submitted, and puts the ring back.

use super::std_io::{list_dir_std, open_std, sync_dir_std, StdFile};
use super::{Io, IoFile, Mapping, OpenMode, WriteSyncError};
use io_uring::{opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Submission queue size of every ring.
const RING_ENTRIES: u32 = 64;
/// Rings kept in the pool when idle; more are dropped when returned.
const MAX_POOLED_RINGS: usize = 16;
/// Largest single write op (Linux caps one write at `MAX_RW_COUNT`, just under 2 GiB).
const MAX_WRITE_CHUNK: usize = 1 << 30;

/// io_uring backend. Cheap to clone: clones share the ring pool.
#[derive(Debug, Clone)]
pub struct UringIo {
    shared: Arc<Shared>,
}

/// A file opened through [`UringIo`]: a std `File` plus the shared ring pool.
pub struct UringFile {
    plain: StdFile,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringFile")
            .field("fd", &self.plain.file.as_raw_fd())
            .finish()
    }
}

/// State shared by a [`UringIo`] and all its files.
struct Shared {
    /// Idle rings. A ring is used by one call at a time.
    rings: Mutex<Vec<IoUring>>,
    /// Files opened by this backend, keyed by the address of the `UringFile`
    /// inside its `Arc`. `IoFile` offers no downcast, so [`Io::sync_many`]
    /// uses this to find the raw fd behind an `Arc<dyn IoFile>`.
    files: Mutex<HashMap<usize, Weak<UringFile>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("idle_rings", &self.rings.lock().len())
            .field("open_files", &self.files.lock().len())
            .finish()
    }
}

/// One operation of a batch. Buffers are borrowed for the whole
/// [`Shared::run`] call, which returns only once the kernel is done with them.
enum Op<'a> {
    Nop,
    Write {
        fd: RawFd,
        buf: &'a [u8],
        offset: u64,
        link: bool,
    },
    Fdatasync {
        fd: RawFd,
    },
}

impl Op<'_> {
    fn entry(&self) -> squeue::Entry {
        match self {
            Op::Nop => opcode::Nop::new().build(),
            Op::Write {
                fd,
                buf,
                offset,
                link,
            } => {
                // `buf.len() <= MAX_WRITE_CHUNK` (checked by the callers), so it fits in u32.
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let e = opcode::Write::new(types::Fd(*fd), buf.as_ptr(), len)
                    .offset(*offset)
                    .build();
                if *link {
                    e.flags(squeue::Flags::IO_LINK)
                } else {
                    e
                }
            }
            Op::Fdatasync { fd } => opcode::Fsync::new(types::Fd(*fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }
}

/// A ring taken from the pool; goes back to the pool on drop unless poisoned.
struct RingGuard<'a> {
    ring: Option<IoUring>,
    shared: &'a Shared,
}

impl Drop for RingGuard<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.ring.take() {
            let mut pool = self.shared.rings.lock();
            if pool.len() < MAX_POOLED_RINGS {
                pool.push(r);
            }
        }
    }
}

fn is_retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

/// A CQE result as `io::Result`: negative values are `-errno`.
fn cqe_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

impl Shared {
    fn new() -> Self {
        Shared {
            rings: Mutex::new(Vec::new()),
            files: Mutex::new(HashMap::new()),
        }
    }

    fn take_ring(&self) -> io::Result<RingGuard<'_>> {
        let pooled = self.rings.lock().pop();
        let ring = match pooled {
            Some(r) => r,
            None => IoUring::new(RING_ENTRIES)?,
        };
        Ok(RingGuard {
            ring: Some(ring),
            shared: self,
        })
    }

    /// Submit `ops` (at most `RING_ENTRIES`) on one ring and wait for all of
    /// their completions; returns the CQE result of each op, in order.
    fn run(&self, ops: &[Op<'_>]) -> io::Result<Vec<i32>> {
        let n = ops.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if n > RING_ENTRIES as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "io_uring batch larger than the ring",
            ));
        }
        let entries: Vec<squeue::Entry> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| op.entry().user_data(i as u64))
            .collect();

        let mut guard = self.take_ring()?;
        let Some(ring) = guard.ring.as_mut() else {
            return Err(io::Error::other("io_uring ring missing"));
        };
        {
            let mut sq = ring.submission();
            // SAFETY: every entry points only at memory borrowed by `ops`
            // (write buffers) and at fds of files the caller keeps open for
            // this call. Those borrows outlive this function, and the function
            // does not return before the kernel has posted a completion for
            // every entry it consumed (see the wait loop below, including the
            // error path), so the buffers and fds stay valid for the whole
            // operation. `push_multiple` pushes all entries or none.
            #[allow(unsafe_code)]
            let pushed = unsafe { sq.push_multiple(&entries) };
            if pushed.is_err() {
                return Err(io::Error::other("io_uring submission queue full"));
            }
        }

        let mut results = vec![0i32; n];
        let mut done = 0usize;
        while done < n {
            let submitted = ring.submit_and_wait(n - done);
            for cqe in ring.completion() {
                if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                    *slot = cqe.result();
                    done += 1;
                }
            }
            match submitted {
                Ok(_) => {}
                Err(e) if is_retryable(&e) => {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        std::thread::yield_now();
                    }
                }
                Err(e) => {
                    // The ring is in an unknown state: never reuse it. Entries
                    // still in the submission queue were not consumed by the
                    // kernel and die with the ring; the consumed ones may be in
                    // flight and may still read our buffers, so wait for their
                    // completions (polling the shared completion ring) before
                    // returning.
                    let unsubmitted = ring.submission().len();
                    let in_flight = n.saturating_sub(done).saturating_sub(unsubmitted);
                    let mut got = 0usize;
                    while got < in_flight {
                        let mut any = false;
                        for _ in ring.completion() {
                            got += 1;
                            any = true;
                        }
                        if !any {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    guard.ring = None;
                    return Err(e);
                }
            }
        }
        Ok(results)
    }

    /// The `UringFile` behind `f`, if this backend opened it.
    fn lookup(&self, f: &Arc<dyn IoFile>) -> Option<Arc<UringFile>> {
        let key = Arc::as_ptr(f) as *const () as usize;
        let found = self.files.lock().get(&key)?.upgrade()?;
        // `f` keeps its allocation alive, so a live `UringFile` at the same
        // address is the same object.
        (Arc::as_ptr(&found) as *const () as usize == key).then_some(found)
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        let key = self as *const UringFile as usize;
        let mut files = self.shared.files.lock();
        if files.get(&key).is_some_and(|w| w.as_ptr() as usize == key) {
            files.remove(&key);
        }
    }
}

impl UringIo {
    /// An io_uring backend, or `None` when io_uring is unavailable here
    /// (old kernel, seccomp, `io_uring_disabled` sysctl, memlock limits...):
    /// probes by building a ring and running a NOP through it.
    pub fn try_new() -> Option<UringIo> {
        let shared = Arc::new(Shared::new());
        let res = shared.run(&[Op::Nop]).ok()?;
        if res.first().is_some_and(|r| *r >= 0) {
            Some(UringIo { shared })
        } else {
            None
        }
    }
}

impl IoFile for UringFile {
    /// Plain pwrite: measured on this project's machine (ext4), a buffered
    /// write submitted to io_uring is punted to an io-wq worker thread, and
    /// W1 with 64-message batches ran at 0.13M msg/s through the ring against
    /// 1.16M msg/s with pwrite (docs/benchmarks.md, "io_uring"). The ring is
    /// used where it saves work: a write linked with its fdatasync, and many
    /// fdatasyncs in one submission. A lone fdatasync is a plain syscall for
    /// the same reason (through the ring it too runs on an io-wq worker).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.plain.write_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.plain.read_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.plain.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.plain.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.plain.sync_data()
    }

    fn write_and_sync(&self, buf: &[u8], offset: u64) -> Result<(), WriteSyncError> {
        if buf.is_empty() {
            return self.sync_data().map_err(WriteSyncError::Sync);
        }
        let fd = self.plain.file.as_raw_fd();
        let first = &buf[..buf.len().min(MAX_WRITE_CHUNK)];
        // The fdatasync is linked to the write: it starts only after the
        // write completed in full (a failed or short write cancels it), so
        // each completion says which step failed.
        let res = self
            .shared
            .run(&[
                Op::Write {
                    fd,
                    buf: first,
                    offset,
                    link: true,
                },
                Op::Fdatasync { fd },
            ])
            .map_err(WriteSyncError::Write)?;
        let w = res.first().copied().unwrap_or(-libc::EIO);
        let s = res.get(1).copied().unwrap_or(-libc::ECANCELED);
        let written = if w == -libc::EINTR || w == -libc::EAGAIN {
            0
        } else {
            cqe_result(w).map_err(WriteSyncError::Write)?
        };
        if written == buf.len() && s != -libc::ECANCELED {
            return cqe_result(s).map(|_| ()).map_err(WriteSyncError::Sync);
        }
        // Short write (or a buffer larger than one op): finish with plain
        // writes, then a separate fdatasync.
        self.plain
            .write_at(&buf[written..], offset + written as u64)
            .map_err(WriteSyncError::Write)?;
        self.sync_data().map_err(WriteSyncError::Sync)
    }

    fn map(&self) -> io::Result<Mapping> {
        self.plain.map()
    }
}

impl Io for UringIo {
    fn name(&self) -> &'static str {
        "io_uring"
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        list_dir_std(dir)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn IoFile>> {
        let f = Arc::new(UringFile {
            plain: StdFile {
                file: open_std(path, mode)?,
            },
            shared: Arc::clone(&self.shared),
        });
        self.shared
            .files
            .lock()
            .insert(Arc::as_ptr(&f) as usize, Arc::downgrade(&f));
        Ok(f)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        sync_dir_std(dir)
    }
    /// One fdatasync per file, all submitted in one batch (chunked by the
    /// ring size); waits for all of them and returns the first error.
    /// Files not opened by this backend are synced through their own
    /// `sync_data`.
    fn sync_many(&self, files: &[Arc<dyn IoFile>]) -> io::Result<()> {
        let mut first_err: Option<io::Error> = None;
        let mut ours: Vec<Arc<UringFile>> = Vec::with_capacity(files.len());
        for f in files {
            match self.shared.lookup(f) {
                Some(u) => ours.push(u),
                None => {
                    if let Err(e) = f.sync_data() {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        // `ours` keeps every file (and so its fd) open until the batch is done.
        for chunk in ours.chunks(RING_ENTRIES as usize) {
            let ops: Vec<Op<'_>> = chunk
                .iter()
                .map(|u| Op::Fdatasync {
                    fd: u.plain.file.as_raw_fd(),
                })
                .collect();
            match self.shared.run(&ops) {
                Ok(results) => {
                    for (u, r) in chunk.iter().zip(results) {
                        let r = if r == -libc::EINTR || r == -libc::EAGAIN {
                            u.sync_data().map(|_| 0)
                        } else {
                            cqe_result(r)
                        };
                        if let Err(e) = r {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn uring() -> Option<UringIo> {
        let u = UringIo::try_new();
        if u.is_none() {
            eprintln!("note: io_uring unavailable on this machine; skipping io_uring test");
        }
        u
    }

    #[test]
    fn write_read_round_trip() {
        let Some(io) = uring() else { return };
        assert_eq!(io.name(), "io_uring");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.seg");
        let f = io.open(&p, OpenMode::CreateNew).unwrap();
        f.write_at(b"hello ", 0).unwrap();
        f.write_at(b"world", 6).unwrap();
        f.sync_data().unwrap();
        assert_eq!(f.len().unwrap(), 11);
        let mut buf = [0u8; 11];
        f.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"hello world");
        let mut past = [0u8; 4];
        assert_eq!(
            f.read_at(&mut past, 9).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(&*f.map().unwrap(), b"hello world");
        assert_eq!(
            io.open(&p, OpenMode::CreateNew).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"hello world");
    }

    #[test]
    fn write_and_sync_and_large_write() {
        let Some(io) = uring() else { return };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.seg");
        let f = io.open(&p, OpenMode::CreateNew).unwrap();
        let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        f.write_and_sync(&big, 0).unwrap();
        f.write_and_sync(b"tail", big.len() as u64).unwrap();
        f.write_and_sync(b"", 0).unwrap();
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(on_disk.len(), big.len() + 4);
        assert_eq!(&on_disk[..big.len()], &big[..]);
        assert_eq!(&on_disk[big.len()..], b"tail");
        drop(f);
        let f = io.open(&p, OpenMode::Existing).unwrap();
        assert_eq!(f.len().unwrap(), big.len() as u64 + 4);
    }

    #[test]
    fn sync_many_batches() {
        let Some(io) = uring() else { return };
        let dir = tempfile::tempdir().unwrap();
        // More files than one ring holds, to exercise chunking, plus a
        // foreign (std) file that must go through its own sync_data.
        let mut files: Vec<Arc<dyn IoFile>> = Vec::new();
        for i in 0..(RING_ENTRIES as usize + 5) {
            let f = io
                .open(&dir.path().join(format!("{i}.seg")), OpenMode::CreateNew)
                .unwrap();
            f.write_at(format!("file {i}").as_bytes(), 0).unwrap();
            files.push(f);
        }
        let std_file = super::super::StdIo
            .open(&dir.path().join("std.seg"), OpenMode::CreateNew)
            .unwrap();
        std_file.write_at(b"std", 0).unwrap();
        files.push(std_file);
        io.sync_many(&files).unwrap();
        io.sync_many(&[]).unwrap();
        io.sync_dir(dir.path()).unwrap();
        let mut names = io.list_dir(dir.path()).unwrap();
        names.sort();
        assert_eq!(names.len(), RING_ENTRIES as usize + 6);
        assert_eq!(std::fs::read(dir.path().join("3.seg")).unwrap(), b"file 3");
        // Registry entries go away with the files.
        drop(files);
        assert!(io.shared.files.lock().is_empty());
    }

    #[test]
    fn concurrent_callers_use_separate_rings() {
        let Some(io) = uring() else { return };
        let dir = tempfile::tempdir().unwrap();
        let f = io
            .open(&dir.path().join("c.seg"), OpenMode::CreateNew)
            .unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let f = Arc::clone(&f);
                s.spawn(move || {
                    for i in 0..50u64 {
                        let off = (t * 50 + i) * 8;
                        f.write_and_sync(&off.to_le_bytes(), off).unwrap();
                    }
                });
            }
        });
        let m = f.map().unwrap();
        assert_eq!(m.len(), 4 * 50 * 8);
        for (i, c) in m.chunks(8).enumerate() {
            assert_eq!(c, &(i as u64 * 8).to_le_bytes());
        }
    }
}
