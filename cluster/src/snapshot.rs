//! A partition's snapshot as a file (docs/scaling.md, "Snapshots"): each
//! timeline's retained seq range, streamed from the engine into an
//! unlinked temporary file and out of it in openraft's chunks, so neither
//! side ever holds a partition in memory.
//!
//! ```text
//! file    = magic "TLSNAP01" | section* | end
//! section = 0x01 | keyspace u8 | id u64 | first u64 | last u64 | record × (last + 1 − first)
//! record  = len u32 | crc32 u32 (of the bytes) | bytes (the stored record: write id u64 | payload)
//! end     = 0xFF | sections u64
//! ```
//!
//! A section's records are seqs `first..=last` of its timeline; `first` is
//! the first seq retention kept, so `first = last + 1` (no records) says a
//! timeline whose every record expired, and still carries its last seq.
//! Integers are little-endian. Reading checks the magic, every length and
//! checksum, and that the end mark counts the sections read. A received
//! file is read through once ([`verify`]) before anything of it is
//! applied: openraft 0.9 takes a failed install as fatal for the group, so
//! a damaged file must fail before it writes anything. Each send is its
//! own cut under its own snapshot id, so two sends' chunks never mix in
//! one received file.

use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};
use timeline_engine::{Direction, Engine, Keyspace, TimelineId};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

const MAGIC: &[u8; 8] = b"TLSNAP01";
const SECTION: u8 = 1;
const END: u8 = 0xFF;
/// Records read from the engine per scan.
const PAGE: usize = 1024;
/// The largest record a snapshot may carry (the engine's own limit is
/// lower; this only bounds what a damaged length makes the reader allocate).
const MAX_RECORD: usize = 64 << 20;

fn damaged(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// A node's snapshot traffic (its `STATS`).
#[derive(Debug, Default)]
pub struct Counters {
    /// Snapshot files made to be sent, and their bytes.
    pub sent: std::sync::atomic::AtomicU64,
    pub bytes_sent: std::sync::atomic::AtomicU64,
    /// Snapshots installed.
    pub installed: std::sync::atomic::AtomicU64,
}

/// One timeline to snapshot: its id, its last seq when the snapshot was
/// taken (records after it are left out: the cut is consistent), and the
/// last seq it is known to have reached if it holds no record (a timeline
/// restored with every record expired); `from`, the first seq worth
/// sending (1: all that is kept; an outbox sends what is not delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub timeline: (u8, u64),
    pub last: u64,
    pub from: u64,
}

/// Write the snapshot of `manifest`'s timelines from `engine` to `out`.
pub fn write(engine: &Engine, manifest: &[Entry], mut out: impl Write) -> io::Result<()> {
    out.write_all(MAGIC)?;
    let mut sections = 0u64;
    for m in manifest {
        let (ks, id) = m.timeline;
        let tl = TimelineId::new(Keyspace(ks), id);
        let first = if engine.last_seq(tl) == 0 {
            m.last + 1 // no record here: a floor only
        } else {
            engine
                .first_retained_seq(tl)
                .map_err(io::Error::other)?
                .max(m.from)
                .min(m.last + 1)
        };
        if m.last == 0 {
            continue;
        }
        // The first page decides where the section starts: retention may
        // have dropped more since `first_retained_seq` answered.
        let mut next = first;
        let mut page = Vec::new();
        if next <= m.last {
            let n = ((m.last - next + 1) as usize).min(PAGE);
            page = match engine.scan(tl, next, n, Direction::Forward) {
                Err(timeline_engine::Error::Truncated { first_retained, .. }) => {
                    next = first_retained.min(m.last + 1);
                    if next > m.last {
                        Vec::new()
                    } else {
                        let n = ((m.last - next + 1) as usize).min(PAGE);
                        engine
                            .scan(tl, next, n, Direction::Forward)
                            .map_err(io::Error::other)?
                    }
                }
                r => r.map_err(io::Error::other)?,
            };
        }
        // Asked to start at `from` (an outbox past its mark, a mark's
        // last record): what the cut named went meanwhile (a newer mark
        // released it), so this is no longer the cut: make a fresh one.
        if m.from > 1 && m.from <= m.last && next != m.from {
            return Err(io::Error::other(format!(
                "timeline {ks}/{id}: seq {} dropped while snapshotting",
                m.from
            )));
        }
        out.write_all(&[SECTION, ks])?;
        for v in [id, next, m.last] {
            out.write_all(&v.to_le_bytes())?;
        }
        let mut first_page = Some(page);
        while next <= m.last {
            let recs = match first_page.take() {
                Some(p) => p,
                None => {
                    let n = ((m.last - next + 1) as usize).min(PAGE);
                    engine
                        .scan(tl, next, n, Direction::Forward)
                        .map_err(io::Error::other)?
                }
            };
            if recs.is_empty() {
                return Err(io::Error::other(format!(
                    "timeline {ks}/{id}: seq {next} missing while snapshotting"
                )));
            }
            for r in &recs {
                if r.seq != next {
                    return Err(io::Error::other(format!(
                        "timeline {ks}/{id}: seq {} where {next} was expected",
                        r.seq
                    )));
                }
                out.write_all(&(r.payload.len() as u32).to_le_bytes())?;
                out.write_all(&crc32fast::hash(&r.payload).to_le_bytes())?;
                out.write_all(&r.payload)?;
                next += 1;
            }
        }
        sections += 1;
    }
    out.write_all(&[END])?;
    out.write_all(&sections.to_le_bytes())?;
    out.flush()
}

/// Read a whole snapshot file without applying it: every length and
/// checksum, and the end mark (so that a damaged one is refused before
/// anything of it is written).
pub fn verify(r: impl Read) -> io::Result<()> {
    let mut r = Reader::open(r)?;
    let mut buf = Vec::new();
    while let Some(s) = r.section()? {
        for _ in 0..s.records() {
            r.record(&mut buf)?;
        }
    }
    Ok(())
}

/// One timeline's section, as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub timeline: (u8, u64),
    pub first: u64,
    pub last: u64,
}

impl Section {
    /// Records that follow its header.
    pub fn records(&self) -> u64 {
        self.last.saturating_add(1).saturating_sub(self.first)
    }
}

/// Reads a snapshot file section by section, record by record.
pub struct Reader<R: Read> {
    r: R,
    sections: u64,
    /// Records of the current section not read yet.
    left: u64,
}

fn u64_of(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn u32_of(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

impl<R: Read> Reader<R> {
    pub fn open(mut r: R) -> io::Result<Reader<R>> {
        let mut m = [0u8; 8];
        r.read_exact(&mut m)?;
        if &m != MAGIC {
            return Err(damaged("not a snapshot file (bad magic)"));
        }
        Ok(Reader {
            r,
            sections: 0,
            left: 0,
        })
    }

    /// The next section's header (its records must be read first); `None`
    /// at a well-formed end.
    pub fn section(&mut self) -> io::Result<Option<Section>> {
        if self.left > 0 {
            return Err(io::Error::other("records of the last section not read"));
        }
        let mut tag = [0u8; 1];
        self.r.read_exact(&mut tag)?;
        match tag[0] {
            END => {
                let n = u64_of(&mut self.r)?;
                if n != self.sections {
                    return Err(damaged(format!(
                        "end mark counts {n} sections, {} were read",
                        self.sections
                    )));
                }
                Ok(None)
            }
            SECTION => {
                let mut ks = [0u8; 1];
                self.r.read_exact(&mut ks)?;
                let id = u64_of(&mut self.r)?;
                let first = u64_of(&mut self.r)?;
                let last = u64_of(&mut self.r)?;
                if first == 0 || first > last.saturating_add(1) || last == 0 {
                    return Err(damaged(format!(
                        "section {}/{id}: seqs {first}..={last}",
                        ks[0]
                    )));
                }
                let s = Section {
                    timeline: (ks[0], id),
                    first,
                    last,
                };
                self.left = s.records();
                self.sections += 1;
                Ok(Some(s))
            }
            t => Err(damaged(format!("unknown tag {t}"))),
        }
    }

    /// The current section's next record into `buf`.
    pub fn record(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if self.left == 0 {
            return Err(io::Error::other("no record left in this section"));
        }
        let len = u32_of(&mut self.r)? as usize;
        let crc = u32_of(&mut self.r)?;
        if len > MAX_RECORD {
            return Err(damaged(format!("a record of {len} bytes")));
        }
        buf.clear();
        buf.resize(len, 0);
        self.r.read_exact(buf)?;
        if crc32fast::hash(buf) != crc {
            return Err(damaged("record checksum mismatch"));
        }
        self.left -= 1;
        Ok(())
    }
}

/// openraft's snapshot data: an unlinked temporary file, possibly still to
/// be written by a blocking task (a snapshot read out of the engine while
/// the group goes on applying). The task starts at the first read, write or
/// seek, which waits for the file: openraft also asks for the current
/// snapshot when a group starts, for its meta only, and that must not cost
/// a pass over the partition.
pub struct SnapshotFile {
    state: FileState,
    /// A seek asked for while the file was still being built.
    seek: Option<io::SeekFrom>,
}

/// What makes a snapshot file.
type Build = Box<dyn FnOnce() -> io::Result<std::fs::File> + Send>;

enum FileState {
    Lazy(Option<Build>),
    Building(tokio::task::JoinHandle<io::Result<std::fs::File>>),
    Ready(tokio::fs::File),
    Failed(String),
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match &self.state {
            FileState::Lazy(_) => "not built",
            FileState::Building(_) => "building",
            FileState::Ready(_) => "ready",
            FileState::Failed(_) => "failed",
        };
        write!(f, "SnapshotFile({s})")
    }
}

impl SnapshotFile {
    /// A file ready to use.
    pub fn ready(f: std::fs::File) -> SnapshotFile {
        SnapshotFile {
            state: FileState::Ready(tokio::fs::File::from_std(f)),
            seek: None,
        }
    }

    /// A file `build` makes, on the blocking pool, when it is first used
    /// (never, if it is dropped unused); it is read from its start.
    pub fn lazy(
        build: impl FnOnce() -> io::Result<std::fs::File> + Send + 'static,
    ) -> SnapshotFile {
        SnapshotFile {
            state: FileState::Lazy(Some(Box::new(build))),
            seek: None,
        }
    }

    /// The finished file, as a std file (for a blocking reader).
    pub async fn into_std(mut self) -> io::Result<std::fs::File> {
        std::future::poll_fn(|cx| self.poll_file(cx).map_ok(|_| ())).await?;
        match self.state {
            FileState::Ready(f) => Ok(f.into_std().await),
            _ => Err(io::Error::other("snapshot file not ready")),
        }
    }

    fn poll_file(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut tokio::fs::File>> {
        if let FileState::Lazy(build) = &mut self.state {
            let Some(build) = build.take() else {
                return Poll::Ready(Err(io::Error::other("snapshot build lost")));
            };
            self.state = FileState::Building(tokio::task::spawn_blocking(build));
        }
        if let FileState::Building(h) = &mut self.state {
            let built = match Pin::new(h).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(f))) => FileState::Ready(tokio::fs::File::from_std(f)),
                Poll::Ready(Ok(Err(e))) => FileState::Failed(e.to_string()),
                Poll::Ready(Err(e)) => FileState::Failed(e.to_string()),
            };
            self.state = built;
        }
        match &mut self.state {
            FileState::Ready(f) => Poll::Ready(Ok(f)),
            FileState::Failed(m) => Poll::Ready(Err(io::Error::other(format!(
                "building the snapshot failed: {m}"
            )))),
            FileState::Lazy(_) | FileState::Building(_) => Poll::Pending,
        }
    }
}

impl SnapshotFile {
    /// Run `op` on the file once it is there.
    fn with_file<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut tokio::fs::File>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match self.poll_file(cx) {
            Poll::Ready(Ok(f)) => op(Pin::new(f), cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().with_file(cx, |f, cx| f.poll_read(cx, buf))
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().with_file(cx, |f, cx| f.poll_write(cx, b))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().with_file(cx, |f, cx| f.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().with_file(cx, |f, cx| f.poll_shutdown(cx))
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, pos: io::SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        match &mut this.state {
            FileState::Ready(f) => Pin::new(f).start_seek(pos),
            // Issued once the file is there (`poll_complete`).
            FileState::Lazy(_) | FileState::Building(_) => {
                this.seek = Some(pos);
                Ok(())
            }
            FileState::Failed(m) => Err(io::Error::other(m.clone())),
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        match this.poll_file(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(_)) => {}
        }
        // A seek asked for while the file was being built: issued now.
        let pending = this.seek.take();
        this.with_file(cx, |mut f, cx| {
            if let Some(pos) = pending {
                f.as_mut().start_seek(pos)?;
            }
            f.poll_complete(cx)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testkit::engine;

    #[test]
    fn a_snapshot_file_round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let (a, b) = ((0u8, 1u64), (1u8, 2u64));
        for i in 0..2500u64 {
            e.append(TimelineId::new(Keyspace(a.0), a.1), &i.to_le_bytes())
                .unwrap();
        }
        e.append(TimelineId::new(Keyspace(b.0), b.1), b"x").unwrap();
        let manifest = [
            Entry {
                timeline: a,
                last: 2400, // a cut: later records left out
                from: 1,
            },
            Entry {
                timeline: b,
                last: 1,
                from: 1,
            },
            // A timeline with no record here but a known last seq.
            Entry {
                timeline: (1, 3),
                last: 77,
                from: 1,
            },
        ];
        let mut out = Vec::new();
        write(&e, &manifest, &mut out).unwrap();
        let mut r = Reader::open(&out[..]).unwrap();
        let s = r.section().unwrap().unwrap();
        assert_eq!((s.timeline, s.first, s.last), (a, 1, 2400));
        let mut buf = Vec::new();
        for i in 0..2400u64 {
            r.record(&mut buf).unwrap();
            assert_eq!(&buf[..], &i.to_le_bytes());
        }
        let s = r.section().unwrap().unwrap();
        assert_eq!((s.timeline, s.records()), (b, 1));
        r.record(&mut buf).unwrap();
        let s = r.section().unwrap().unwrap();
        assert_eq!(
            (s.timeline, s.first, s.last, s.records()),
            ((1, 3), 78, 77, 0)
        );
        assert_eq!(r.section().unwrap(), None);
        // A flipped byte, a cut file, a wrong end count: refused.
        let read_all = |b: &[u8]| -> io::Result<()> {
            let mut r = Reader::open(b)?;
            let mut buf = Vec::new();
            while let Some(s) = r.section()? {
                for _ in 0..s.records() {
                    r.record(&mut buf)?;
                }
            }
            Ok(())
        };
        read_all(&out).unwrap();
        verify(&out[..]).unwrap();
        let mut flipped = out.clone();
        flipped[5000] ^= 1;
        assert!(read_all(&flipped).is_err());
        assert!(verify(&flipped[..]).is_err());
        assert!(read_all(&out[..out.len() - 3]).is_err());
        let mut count = out.clone();
        let n = count.len();
        count[n - 8] = 9;
        assert!(read_all(&count).is_err());
        assert!(read_all(b"TLSNAP00").is_err());
    }
}
