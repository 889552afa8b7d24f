//! Plain pread/pwrite backend.

use super::{Io, IoFile, Mapping, OpenMode};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Plain `pread`/`pwrite`/`fdatasync` on std files.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdIo;

/// A std file.
#[derive(Debug)]
pub struct StdFile {
    pub(crate) file: File,
}

impl IoFile for StdFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn map(&self) -> io::Result<Mapping> {
        map_file(&self.file)
    }
}

pub(crate) fn map_file(file: &File) -> io::Result<Mapping> {
    if file.metadata()?.len() == 0 {
        return Ok(Mapping::empty());
    }
    // SAFETY: the engine maps only files it has sealed: they are never
    // written, truncated or extended again while a mapping exists (a sealed
    // segment is only ever unlinked, which leaves existing mappings valid on
    // Linux). A file changed behind our back by another process could still
    // change the bytes under us; every record read through a mapping is
    // CRC-checked and bounds-checked before use, so that yields a
    // `Corruption` error, not undefined behaviour in safe code that indexes it.
    #[allow(unsafe_code)]
    let m = unsafe { memmap2::Mmap::map(file)? };
    // Reads of a sealed segment are point lookups and short runs: without
    // this, each cold fault reads ~128 KiB around it, and each warm one maps
    // up to 64 KiB of neighbours (measured: 1,000 newest-20 pages made
    // 190 MB of the mapping resident; see docs/benchmarks.md).
    m.advise(memmap2::Advice::Random)?;
    Ok(Mapping::from_mmap(m))
}

pub(crate) fn open_std(path: &Path, mode: OpenMode) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    match mode {
        OpenMode::CreateNew => o.create_new(true),
        OpenMode::Existing => o.create(false),
    };
    o.open(path)
}

pub(crate) fn list_dir_std(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Ok(n) = e.file_name().into_string() {
            out.push(n);
        }
    }
    Ok(out)
}

pub(crate) fn sync_dir_std(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Io for StdIo {
    fn name(&self) -> &'static str {
        "std"
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        list_dir_std(dir)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn IoFile>> {
        Ok(Arc::new(StdFile {
            file: open_std(path, mode)?,
        }))
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
}
