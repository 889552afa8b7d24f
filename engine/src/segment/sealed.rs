//! A sealed segment: immutable, memory-mapped, with a sorted index block.

use crate::error::{Error, Result};
use crate::format::segment::{Footer, IndexEntry, SegmentHeader, SegmentKind, ENTRY_LEN};
use crate::format::{get_u32, FormatError};
use crate::io::Mapping;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Every this many index entries, one timeline id is kept in memory, so a
/// lookup is a search in a small in-memory array and then in one short
/// stretch of the mapped index (one or two pages).
const FENCE_EVERY: usize = 64;

#[derive(Debug)]
pub struct SealedSeg {
    pub gen: u32,
    pub path: PathBuf,
    pub kind: SegmentKind,
    pub footer: Footer,
    map: Mapping,
    fences: OnceLock<Result<Vec<u64>, String>>,
}

impl SealedSeg {
    /// Validate header and footer of a mapped sealed file (the index is
    /// verified on first use: see `fences`).
    /// `keyspace`, `shard` and `gen` are where the file was found: a
    /// segment copied into the wrong directory verifies byte for byte, so
    /// its header must also say it belongs here.
    pub fn open(
        keyspace: u8,
        shard: u32,
        gen: u32,
        path: PathBuf,
        map: Mapping,
    ) -> Result<SealedSeg> {
        let ferr = |off: u64, e: FormatError| Error::format(path.clone(), off, e);
        let header = SegmentHeader::decode(&map).map_err(|e| ferr(0, e))?;
        if (header.keyspace, header.shard, header.gen) != (keyspace, shard, gen) {
            return Err(Error::corruption(
                path.clone(),
                11,
                format!(
                    "header names keyspace {} shard {} segment {}, but the file is keyspace {keyspace} shard {shard} segment {gen}",
                    header.keyspace, header.shard, header.gen
                ),
            ));
        }
        let footer = Footer::decode_from_file(&map)
            .map_err(|e| ferr(map.len().saturating_sub(64) as u64, e))?;
        Ok(SealedSeg {
            gen,
            path,
            kind: header.kind,
            footer,
            map,
            fences: OnceLock::new(),
        })
    }

    /// Verify the index (CRC, sort order) and build the fences, once, on
    /// first use. Opening a segment reads only its header and footer, so
    /// recovery does not read every sealed index from disk (after a power
    /// cut the page cache is cold: that was seconds for 10M messages); a
    /// damaged index is a `Corruption` error for the reads that need it.
    fn fences(&self) -> Result<&[u64]> {
        let r = self.fences.get_or_init(|| {
            let f = &self.footer;
            let idx = self.index();
            let actual = crc32fast::hash(idx);
            if actual != f.index_crc {
                return Err(format!(
                    "index checksum mismatch: stored {:#010x}, computed {actual:#010x}",
                    f.index_crc
                ));
            }
            let entries = f.entries as usize;
            let mut fences = Vec::with_capacity(entries / FENCE_EVERY + 1);
            let mut prev = None;
            for i in (0..entries).step_by(FENCE_EVERY) {
                let t = IndexEntry::timeline_at(idx, i).map_err(|e| e.to_string())?;
                if prev.is_some_and(|p| p >= t) {
                    return Err("index not sorted".to_string());
                }
                prev = Some(t);
                fences.push(t);
            }
            Ok(fences)
        });
        match r {
            Ok(f) => Ok(f),
            Err(what) => Err(Error::corruption(
                self.path.clone(),
                self.footer.index_off,
                what.clone(),
            )),
        }
    }

    /// Check the whole index now (recovery does before trusting a sealed
    /// segment over its log).
    pub fn verify_index(&self) -> Result<()> {
        self.fences().map(|_| ())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn index(&self) -> &[u8] {
        let f = &self.footer;
        self.map
            .get(f.index_off as usize..(f.index_off + f.index_len()) as usize)
            .unwrap_or_default()
    }

    /// The index entry of `timeline`, if it has records here.
    pub fn lookup(&self, timeline: u64) -> Result<Option<IndexEntry>> {
        let idx = self.index();
        let n = self.footer.entries as usize;
        // Fence block: the last fence <= timeline.
        let block = match self.fences()?.partition_point(|&f| f <= timeline) {
            0 => return Ok(None),
            b => b - 1,
        };
        let mut lo = block * FENCE_EVERY;
        let mut hi = (lo + FENCE_EVERY).min(n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let t = IndexEntry::timeline_at(idx, mid).map_err(|e| self.cerr(e))?;
            match t.cmp(&timeline) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    return IndexEntry::decode_at(idx, mid)
                        .map(Some)
                        .map_err(|e| self.cerr(e));
                }
            }
        }
        Ok(None)
    }

    /// Offset of the `k`th sparse entry (record `first_seq + 16k` of a run).
    pub fn sparse(&self, at: usize) -> Result<u32> {
        self.fences()?;
        let idx = self.index();
        get_u32(idx, self.footer.entries as usize * ENTRY_LEN + at * 4).map_err(|e| self.cerr(e))
    }

    /// Every index entry, in timeline order (recovery).
    pub fn entries(&self) -> Result<impl Iterator<Item = Result<IndexEntry>> + '_> {
        self.fences()?;
        let idx = self.index();
        Ok((0..self.footer.entries as usize)
            .map(move |i| IndexEntry::decode_at(idx, i).map_err(|e| self.cerr(e))))
    }

    fn cerr(&self, e: FormatError) -> Error {
        Error::corruption(self.path.clone(), self.footer.index_off, e.to_string())
    }

    /// In-memory bytes this segment costs (fences), for `index_bytes`.
    pub fn memory_bytes(&self) -> usize {
        let fences = match self.fences.get() {
            Some(Ok(f)) => f.capacity() * 8,
            _ => 0,
        };
        fences + std::mem::size_of::<Self>()
    }
}
