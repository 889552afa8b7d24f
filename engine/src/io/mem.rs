//! The in-memory file system. One file by design: the file model, the two
//! namespaces (live and as of the last directory sync) and the power-cut
//! image belong together; a third of it is its tests.
//!
//! In-memory file system for tests that models what a power cut leaves.
//!
//! Every file has the bytes reads see now (`data`) and the bytes as of its
//! last `sync_data` (`durable`). The namespace exists twice: what exists now,
//! and, per directory, what existed at that directory's last `sync_dir`
//! (creations, renames and removals become durable only then; a file that was
//! synced but whose directory never was is lost on a crash). Directories made
//! by `create_dir_all` are durable at once.
//!
//! [`MemIo::crash`] returns a new, independent `MemIo` holding the power-cut
//! image. [`MemFaults`] injects a full disk, failing syncs, a torn write,
//! torn (partially persisted) unsynced tails on crash, and the failure of
//! the Nth I/O call of chosen kinds ([`FailAt`]), for sweeps over every
//! call a workload makes.

use super::{Io, IoFile, Mapping, OpenMode};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Faults to inject into a [`MemIo`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemFaults {
    /// Total bytes written (across all files, by this `MemIo`) after which
    /// writes fail with `ErrorKind::StorageFull`: a write that would take the
    /// total beyond this limit fails and writes nothing.
    pub fail_writes_after_bytes: Option<u64>,
    /// `sync_data` and `sync_dir` fail with EIO (and persist nothing).
    pub fail_syncs: bool,
    /// The next `write_at` writes only this many bytes of its buffer, then
    /// returns an error. One-shot: cleared once it fires.
    pub tear_next_write: Option<usize>,
    /// On [`MemIo::crash`], each file keeps a random-length prefix of the
    /// unsynced bytes beyond its durable length.
    pub torn_tail_on_crash: bool,
    /// Seed of the xorshift generator used for torn tails.
    pub seed: u64,
    /// Fail one counted I/O call (or every one from it on).
    pub fail_at: Option<FailAt>,
}

/// The I/O calls [`MemIo`] counts, and [`FailAt`] can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IoOp {
    /// `open` with `CreateNew`.
    Create,
    Write,
    SetLen,
    /// `sync_data` (fdatasync).
    Sync,
    SyncDir,
    Rename,
    Remove,
    /// `map` (mmap).
    Map,
}

impl IoOp {
    pub const ALL: [IoOp; 8] = [
        IoOp::Create,
        IoOp::Write,
        IoOp::SetLen,
        IoOp::Sync,
        IoOp::SyncDir,
        IoOp::Rename,
        IoOp::Remove,
        IoOp::Map,
    ];
}

/// Fail the `nth` (from 1) I/O call among `ops` made since the faults were
/// set. The failing call does nothing (a write writes no byte) and returns
/// EIO, or `StorageFull` with `full`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailAt {
    pub nth: u64,
    /// The kinds that count; empty: all of them.
    pub ops: Vec<IoOp>,
    /// Every counted call from the `nth` on fails (a device that died),
    /// not only the `nth` (a transient error).
    pub sticky: bool,
    pub full: bool,
}

impl FailAt {
    /// A transient EIO at the `nth` call of any kind.
    pub fn nth(nth: u64) -> FailAt {
        FailAt {
            nth,
            ops: Vec::new(),
            sticky: false,
            full: false,
        }
    }

    fn counts(&self, op: IoOp) -> bool {
        self.ops.is_empty() || self.ops.contains(&op)
    }
}

/// In-memory file system for tests. Clones share the same state.
#[derive(Clone, Debug)]
pub struct MemIo {
    inner: Arc<Inner>,
}

struct FileState {
    /// What reads see now.
    data: Vec<u8>,
    /// The content as of the last `sync_data`.
    durable: Vec<u8>,
}

/// A file's identity is its `Arc` allocation.
type FileRef = Arc<Mutex<FileState>>;

struct Namespace {
    /// Path -> file, as it is now.
    live: BTreeMap<PathBuf, FileRef>,
    /// Path -> file, as of the last `sync_dir` of each path's parent.
    durable: BTreeMap<PathBuf, FileRef>,
    /// Directories (durable at once).
    dirs: BTreeSet<PathBuf>,
}

struct Ctl {
    faults: MemFaults,
    bytes_written: u64,
    /// Calls made since the faults were set, per kind (`IoOp as usize`).
    calls: [u64; 8],
    /// Calls counted by `faults.fail_at`.
    counted: u64,
}

impl Ctl {
    /// Count a call of kind `op`; the injected error if it is to fail.
    fn call(&mut self, op: IoOp) -> io::Result<()> {
        self.calls[op as usize] += 1;
        let Some(f) = &self.faults.fail_at else {
            return Ok(());
        };
        if !f.counts(op) {
            return Ok(());
        }
        self.counted += 1;
        let fails = self.counted == f.nth || (f.sticky && self.counted > f.nth);
        match (fails, f.full) {
            (false, _) => Ok(()),
            (true, true) => Err(io::Error::from(io::ErrorKind::StorageFull)),
            (true, false) => Err(io::Error::other(format!(
                "mem: injected EIO at {op:?} (call {})",
                self.counted
            ))),
        }
    }
}

struct Inner {
    ns: Mutex<Namespace>,
    ctl: Mutex<Ctl>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (files, dirs) = {
            let ns = self.ns.lock();
            (ns.live.len(), ns.dirs.len())
        };
        let ctl = self.ctl.lock();
        f.debug_struct("MemIo")
            .field("files", &files)
            .field("dirs", &dirs)
            .field("bytes_written", &ctl.bytes_written)
            .field("faults", &ctl.faults)
            .finish()
    }
}

/// An open in-memory file. Keeps working after its path is removed or the
/// `MemIo` crashed (like an unlinked inode), without affecting anything else.
pub struct MemFile {
    file: FileRef,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.file.lock();
        f.debug_struct("MemFile")
            .field("len", &st.data.len())
            .field("durable_len", &st.durable.len())
            .finish()
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn not_found(what: &str, p: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("mem: {what} {} not found", p.display()),
    )
}

/// xorshift64 step.
fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

impl Namespace {
    /// Whether `dir` exists: made by `create_dir_all`, or a root / the empty
    /// relative prefix.
    fn dir_exists(&self, dir: &Path) -> bool {
        dir.as_os_str().is_empty() || dir.parent().is_none() || self.dirs.contains(dir)
    }

    fn parent_exists(&self, p: &Path) -> bool {
        match p.parent() {
            Some(d) => self.dir_exists(d),
            None => false,
        }
    }
}

impl Default for MemIo {
    fn default() -> Self {
        Self::new()
    }
}

impl MemIo {
    /// An empty file system with no faults.
    pub fn new() -> Self {
        Self::with_faults(MemFaults::default())
    }

    /// An empty file system with the given faults.
    pub fn with_faults(faults: MemFaults) -> Self {
        Self::from_parts(
            Namespace {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                dirs: BTreeSet::new(),
            },
            faults,
        )
    }

    fn from_parts(ns: Namespace, faults: MemFaults) -> Self {
        MemIo {
            inner: Arc::new(Inner {
                ns: Mutex::new(ns),
                ctl: Mutex::new(Ctl {
                    faults,
                    bytes_written: 0,
                    calls: [0; 8],
                    counted: 0,
                }),
            }),
        }
    }

    /// Replace the injected faults (and restart the call counts).
    pub fn set_faults(&self, f: MemFaults) {
        let mut ctl = self.inner.ctl.lock();
        ctl.faults = f;
        ctl.calls = [0; 8];
        ctl.counted = 0;
    }

    /// Calls of the given kinds (all kinds if empty) since the faults were
    /// set: a fault-free run's count sizes a sweep over every call.
    pub fn calls(&self, ops: &[IoOp]) -> u64 {
        let ctl = self.inner.ctl.lock();
        IoOp::ALL
            .iter()
            .filter(|o| ops.is_empty() || ops.contains(o))
            .map(|&o| ctl.calls[o as usize])
            .sum()
    }

    fn call(&self, op: IoOp) -> io::Result<()> {
        self.inner.ctl.lock().call(op)
    }

    /// The power-cut image, as a new independent `MemIo`: the durable
    /// namespace (as of each directory's last `sync_dir`), each file with its
    /// durable content (plus, with `torn_tail_on_crash`, a random-length
    /// prefix of its unsynced bytes beyond the durable length).
    ///
    /// The new `MemIo` starts with `bytes_written == 0` and with only the
    /// crash-modelling faults carried over (`torn_tail_on_crash`, and `seed`
    /// advanced so successive crashes differ); write and sync faults, which
    /// model the device before the cut, are cleared.
    pub fn crash(&self) -> MemIo {
        let faults = self.inner.ctl.lock().faults.clone();
        let mut rng = if faults.seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            faults.seed
        };
        let torn = faults.torn_tail_on_crash;
        let image = self.crash_with(|_, durable, now| {
            let mut content = durable.to_vec();
            if torn && now.len() > durable.len() {
                let extra = now.len() - durable.len();
                let keep = (xorshift(&mut rng) % (extra as u64 + 1)) as usize;
                content.extend_from_slice(&now[durable.len()..][..keep]);
            }
            content
        });
        image.set_faults(MemFaults {
            torn_tail_on_crash: torn,
            seed: xorshift(&mut rng),
            ..MemFaults::default()
        });
        image
    }

    /// The power-cut image with each file's content chosen by the caller:
    /// `keep(path, durable, now)` gets the file's content as of its last
    /// `sync_data` and as reads see it now, and returns what the file holds
    /// after the cut (what writeback had put on the device: any prefix of
    /// the unsynced bytes, or any subset of their pages, in any order
    /// across files). The namespace is the durable one, as in
    /// [`crash`](Self::crash); a file named twice there is asked once. The
    /// image starts without faults.
    pub fn crash_with(&self, mut keep: impl FnMut(&Path, &[u8], &[u8]) -> Vec<u8>) -> MemIo {
        let ns = self.inner.ns.lock();
        // Keep identities: two durable paths naming one file (a rename whose
        // old directory was not synced) still name one file.
        let mut copies: HashMap<*const Mutex<FileState>, FileRef> = HashMap::new();
        let mut durable = BTreeMap::new();
        for (path, f) in &ns.durable {
            let copy = copies
                .entry(Arc::as_ptr(f))
                .or_insert_with(|| {
                    let st = f.lock();
                    let content = keep(path, &st.durable, &st.data);
                    Arc::new(Mutex::new(FileState {
                        data: content.clone(),
                        durable: content,
                    }))
                })
                .clone();
            durable.insert(path.clone(), copy);
        }
        let image = Namespace {
            live: durable.clone(),
            durable,
            dirs: ns.dirs.clone(),
        };
        drop(ns);
        MemIo::from_parts(image, MemFaults::default())
    }

    /// Paths of the files that exist now, with their unsynced byte counts
    /// (beyond the durable length): where a power cut can tear.
    pub fn unsynced(&self) -> Vec<(PathBuf, u64)> {
        let ns = self.inner.ns.lock();
        ns.live
            .iter()
            .map(|(p, f)| {
                let st = f.lock();
                (
                    p.clone(),
                    st.data.len().saturating_sub(st.durable.len()) as u64,
                )
            })
            .collect()
    }

    fn live_file(&self, path: &Path) -> Option<FileRef> {
        self.inner.ns.lock().live.get(path).cloned()
    }

    /// Current length of the file at `path`, if it exists.
    pub fn file_len(&self, path: &Path) -> Option<u64> {
        self.live_file(path).map(|f| f.lock().data.len() as u64)
    }

    /// Flip bit `bit % 8` of the byte at `offset`, in both the current and the
    /// durable content (where that byte exists). No-op on a missing file.
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) {
        let Some(f) = self.live_file(path) else {
            return;
        };
        let mask = 1u8 << (bit % 8);
        let mut st = f.lock();
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if let Some(b) = st.data.get_mut(off) {
            *b ^= mask;
        }
        if let Some(b) = st.durable.get_mut(off) {
            *b ^= mask;
        }
    }

    /// Shorten the file at `path` to at most `len` bytes, in both the current
    /// and the durable content (never extends). No-op on a missing file.
    pub fn truncate_file(&self, path: &Path, len: u64) {
        let Some(f) = self.live_file(path) else {
            return;
        };
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let mut st = f.lock();
        st.data.truncate(len);
        st.durable.truncate(len);
    }

    /// Total bytes written by `write_at` so far (including torn prefixes).
    pub fn bytes_written(&self) -> u64 {
        self.inner.ctl.lock().bytes_written
    }

    /// Names of the files (not directories) directly inside `dir` now, sorted;
    /// empty if `dir` does not exist.
    pub fn file_names(&self, dir: &Path) -> Vec<String> {
        let ns = self.inner.ns.lock();
        ns.live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect()
    }
}

impl IoFile for MemFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut ctl = self.inner.ctl.lock();
        ctl.call(IoOp::Write)?;
        let len = buf.len() as u64;
        if let Some(limit) = ctl.faults.fail_writes_after_bytes {
            if ctl.bytes_written.saturating_add(len) > limit {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
        }
        let (n, torn) = match ctl.faults.tear_next_write.take() {
            Some(k) => (k.min(buf.len()), true),
            None => (buf.len(), false),
        };
        let start = usize::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mem: offset too large"))?;
        let end = start
            .checked_add(n)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mem: offset too large"))?;
        {
            let mut st = self.file.lock();
            if st.data.len() < end {
                st.data.resize(end, 0);
            }
            st.data[start..end].copy_from_slice(&buf[..n]);
        }
        ctl.bytes_written += n as u64;
        if torn {
            return Err(io::Error::other(format!(
                "mem: torn write (injected): {n} of {} bytes written",
                buf.len()
            )));
        }
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.file.lock();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| st.data.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "mem: read past end of file",
            )),
        }
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.lock().data.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.ctl.lock().call(IoOp::SetLen)?;
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mem: length too large"))?;
        self.file.lock().data.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        {
            let mut ctl = self.inner.ctl.lock();
            ctl.call(IoOp::Sync)?;
            if ctl.faults.fail_syncs {
                return Err(eio());
            }
        }
        let mut st = self.file.lock();
        let FileState { data, durable } = &mut *st;
        durable.clone_from(data);
        Ok(())
    }

    fn map(&self) -> io::Result<Mapping> {
        self.inner.ctl.lock().call(IoOp::Map)?;
        let st = self.file.lock();
        Ok(Mapping::from_bytes(Arc::from(st.data.as_slice())))
    }
}

impl Io for MemIo {
    fn name(&self) -> &'static str {
        "mem"
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut ns = self.inner.ns.lock();
        if ns.live.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("mem: {} is a file", path.display()),
            ));
        }
        for a in path.ancestors() {
            if !a.as_os_str().is_empty() && a.parent().is_some() {
                ns.dirs.insert(a.to_path_buf());
            }
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let ns = self.inner.ns.lock();
        if !ns.dir_exists(dir) {
            return Err(not_found("directory", dir));
        }
        let names = ns
            .live
            .keys()
            .chain(ns.dirs.iter())
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        Ok(names)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn IoFile>> {
        if mode == OpenMode::CreateNew {
            self.call(IoOp::Create)?;
        }
        let mut ns = self.inner.ns.lock();
        let file = match mode {
            OpenMode::CreateNew => {
                if ns.live.contains_key(path) || ns.dirs.contains(path) {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("mem: {} exists", path.display()),
                    ));
                }
                if !ns.parent_exists(path) {
                    return Err(not_found("parent directory of", path));
                }
                let f: FileRef = Arc::new(Mutex::new(FileState {
                    data: Vec::new(),
                    durable: Vec::new(),
                }));
                ns.live.insert(path.to_path_buf(), Arc::clone(&f));
                f
            }
            OpenMode::Existing => match ns.live.get(path) {
                Some(f) => Arc::clone(f),
                None => return Err(not_found("file", path)),
            },
        };
        Ok(Arc::new(MemFile {
            file,
            inner: Arc::clone(&self.inner),
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.call(IoOp::Remove)?;
        match self.inner.ns.lock().live.remove(path) {
            Some(_) => Ok(()),
            None => Err(not_found("file", path)),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.call(IoOp::Rename)?;
        let mut ns = self.inner.ns.lock();
        if !ns.live.contains_key(from) {
            return Err(not_found("file", from));
        }
        if !ns.parent_exists(to) {
            return Err(not_found("parent directory of", to));
        }
        if ns.dirs.contains(to) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("mem: {} is a directory", to.display()),
            ));
        }
        if let Some(f) = ns.live.remove(from) {
            ns.live.insert(to.to_path_buf(), f);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        {
            let mut ctl = self.inner.ctl.lock();
            ctl.call(IoOp::SyncDir)?;
            if ctl.faults.fail_syncs {
                return Err(eio());
            }
        }
        let mut ns = self.inner.ns.lock();
        if !ns.dir_exists(dir) {
            return Err(not_found("directory", dir));
        }
        let Namespace { live, durable, .. } = &mut *ns;
        durable.retain(|p, _| p.parent() != Some(dir));
        for (p, f) in live.iter() {
            if p.parent() == Some(dir) {
                durable.insert(p.clone(), Arc::clone(f));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from("/db")
    }

    fn setup() -> (MemIo, PathBuf) {
        let io = MemIo::new();
        io.create_dir_all(&root()).unwrap();
        (io, root())
    }

    fn read_all(io: &MemIo, p: &Path) -> Vec<u8> {
        let f = io.open(p, OpenMode::Existing).unwrap();
        f.map().unwrap().to_vec()
    }

    #[test]
    fn crash_keeps_synced_drops_unsynced() {
        let (io, dir) = setup();
        let p = dir.join("a.seg");
        let f = io.open(&p, OpenMode::CreateNew).unwrap();
        io.sync_dir(&dir).unwrap();
        f.write_at(b"synced", 0).unwrap();
        f.sync_data().unwrap();
        f.write_at(b"+lost", 6).unwrap();
        f.write_at(b"S", 0).unwrap(); // unsynced overwrite inside the durable range
        assert_eq!(read_all(&io, &p), b"Synced+lost");
        assert_eq!(io.bytes_written(), 12);

        let after = io.crash();
        assert_eq!(read_all(&after, &p), b"synced");
        assert_eq!(after.file_len(&p), Some(6));
        assert_eq!(after.bytes_written(), 0);

        // Old handles do not affect the crashed image.
        f.write_at(b"XXXXXX", 0).unwrap();
        f.sync_data().unwrap();
        assert_eq!(read_all(&after, &p), b"synced");
        // And the image is fully usable.
        let g = after.open(&p, OpenMode::Existing).unwrap();
        g.write_and_sync(b"!", 6).unwrap();
        assert_eq!(read_all(&after.crash(), &p), b"synced!");
    }

    #[test]
    fn unsynced_dir_entries_lost_on_crash() {
        let (io, dir) = setup();
        let a = dir.join("a");
        let b = dir.join("b");
        let f = io.open(&a, OpenMode::CreateNew).unwrap();
        f.write_and_sync(b"data", 0).unwrap();
        // File synced, directory never synced: gone after a crash.
        let c = io.crash();
        assert!(c.file_names(&dir).is_empty());
        assert_eq!(
            c.open(&a, OpenMode::Existing).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // The directory itself survives (create_dir_all is durable at once).
        assert!(c.list_dir(&dir).unwrap().is_empty());

        io.sync_dir(&dir).unwrap();
        // Unsynced rename and removal are undone by a crash.
        io.rename(&a, &b).unwrap();
        assert_eq!(io.file_names(&dir), vec!["b".to_string()]);
        let c = io.crash();
        assert_eq!(c.file_names(&dir), vec!["a".to_string()]);
        assert_eq!(read_all(&c, &a), b"data");

        io.sync_dir(&dir).unwrap();
        io.remove_file(&b).unwrap();
        assert_eq!(io.crash().file_names(&dir), vec!["b".to_string()]);
        io.sync_dir(&dir).unwrap();
        assert!(io.crash().file_names(&dir).is_empty());
    }

    #[test]
    fn torn_write_and_torn_tail() {
        let (io, dir) = setup();
        let p = dir.join("t");
        let f = io.open(&p, OpenMode::CreateNew).unwrap();
        io.sync_dir(&dir).unwrap();
        io.set_faults(MemFaults {
            tear_next_write: Some(3),
            ..MemFaults::default()
        });
        assert!(f.write_at(b"abcdef", 0).is_err());
        assert_eq!(read_all(&io, &p), b"abc");
        // One-shot.
        f.write_at(b"def", 3).unwrap();
        assert_eq!(read_all(&io, &p), b"abcdef");
        f.sync_data().unwrap();

        // Torn tail on crash: a prefix of the unsynced appended bytes.
        io.set_faults(MemFaults {
            torn_tail_on_crash: true,
            seed: 42,
            ..MemFaults::default()
        });
        f.write_at(b"0123456789", 6).unwrap();
        let mut lens = BTreeSet::new();
        for seed in 1..40u64 {
            io.set_faults(MemFaults {
                torn_tail_on_crash: true,
                seed,
                ..MemFaults::default()
            });
            let got = read_all(&io.crash(), &p);
            assert!(got.len() >= 6 && got.len() <= 16);
            assert_eq!(&got[..], &b"abcdef0123456789"[..got.len()]);
            lens.insert(got.len());
        }
        assert!(lens.len() > 1, "torn tails should vary with the seed");
        // Deterministic for a given seed.
        io.set_faults(MemFaults {
            torn_tail_on_crash: true,
            seed: 7,
            ..MemFaults::default()
        });
        assert_eq!(read_all(&io.crash(), &p), read_all(&io.crash(), &p));
    }

    #[test]
    fn full_disk_and_failing_syncs() {
        let (io, dir) = setup();
        io.set_faults(MemFaults {
            fail_writes_after_bytes: Some(10),
            ..MemFaults::default()
        });
        let f = io.open(&dir.join("f"), OpenMode::CreateNew).unwrap();
        f.write_at(b"12345678", 0).unwrap();
        let e = f.write_at(b"abc", 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert_eq!(f.len().unwrap(), 8);
        f.write_at(b"ab", 8).unwrap();
        assert_eq!(
            f.write_at(b"x", 0).unwrap_err().kind(),
            io::ErrorKind::StorageFull
        );
        assert_eq!(io.bytes_written(), 10);

        io.set_faults(MemFaults {
            fail_syncs: true,
            ..MemFaults::default()
        });
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(f.write_and_sync(b"z", 0).is_err());
        assert!(io.sync_dir(&dir).is_err());
        assert!(io.sync_many(&[f]).is_err());
        assert!(io.crash().file_names(&dir).is_empty());
    }

    #[test]
    fn bit_flip_and_truncate() {
        let (io, dir) = setup();
        let p = dir.join("b");
        let f = io.open(&p, OpenMode::CreateNew).unwrap();
        io.sync_dir(&dir).unwrap();
        f.write_and_sync(&[0u8; 8], 0).unwrap();
        io.flip_bit(&p, 3, 2);
        let mut b = [0u8; 1];
        f.read_at(&mut b, 3).unwrap();
        assert_eq!(b[0], 0b100);
        assert_eq!(read_all(&io.crash(), &p)[3], 0b100);
        io.truncate_file(&p, 5);
        assert_eq!(io.file_len(&p), Some(5));
        assert_eq!(io.crash().file_len(&p), Some(5));
        assert_eq!(io.file_len(&dir.join("missing")), None);
    }

    #[test]
    fn namespace_errors_and_misc() {
        let (io, dir) = setup();
        let p = dir.join("x");
        assert_eq!(io.name(), "mem");
        assert_eq!(
            io.open(&p, OpenMode::Existing).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        let f = io.open(&p, OpenMode::CreateNew).unwrap();
        assert_eq!(
            io.open(&p, OpenMode::CreateNew).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(
            io.remove_file(&dir.join("nope")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            io.rename(&dir.join("nope"), &p).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            io.list_dir(Path::new("/other")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            io.open(Path::new("/other/f"), OpenMode::CreateNew)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        // Writing past the end zero-fills the gap; reads past the end fail.
        f.write_at(b"z", 4).unwrap();
        assert_eq!(&*f.map().unwrap(), b"\0\0\0\0z");
        let mut buf = [0u8; 2];
        assert_eq!(
            f.read_at(&mut buf, 4).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        f.set_len(2).unwrap();
        assert_eq!(f.len().unwrap(), 2);
        io.create_dir_all(&dir.join("sub")).unwrap();
        let mut names = io.list_dir(&dir).unwrap();
        names.sort();
        assert_eq!(names, vec!["sub".to_string(), "x".to_string()]);
        assert_eq!(io.file_names(&dir), vec!["x".to_string()]);
        // Removed but still open: the handle keeps working.
        io.remove_file(&p).unwrap();
        f.write_at(b"ok", 0).unwrap();
        assert_eq!(&*f.map().unwrap(), b"ok");
    }
}
