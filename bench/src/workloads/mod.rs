//! The workloads and what they share: data directory, engine setup,
//! timeline choice, payload bytes.

pub mod abuse;
pub mod append;
pub mod devices;
pub mod fanout;
pub mod im;
pub mod imkit;
pub mod read;
pub mod reopen;
pub mod sweep;
pub mod torture;

use crate::report::{new_histogram, ResultLine};
use crate::targets::{ImTarget, Target};
use crate::{DurabilityArg, Flags, IoArg, KeyspaceArg, Result};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, Zipf};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use timeline_engine::io::Io;
use timeline_engine::{Config, Durability, Engine, Keyspace, KeyspaceConfig, TimelineId};

/// The data directory of a run: the given `--dir`, or a fresh temporary one
/// removed on drop unless `--keep`.
pub struct DataDir {
    pub path: PathBuf,
    remove: bool,
}

impl DataDir {
    pub fn new(flags: &Flags) -> Result<DataDir> {
        if let Some(d) = &flags.dir {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            return Ok(DataDir {
                path: d.clone(),
                remove: false,
            });
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("timeline-bench-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        if flags.keep {
            eprintln!("data directory: {} (kept)", path.display());
        }
        Ok(DataDir {
            path,
            remove: !flags.keep,
        })
    }
}

impl DataDir {
    /// A fresh subdirectory `name`, removed on drop unless `--keep` (an
    /// old one of that name is removed first).
    pub fn sub(&self, name: &str, keep: bool) -> Result<DataDir> {
        let path = self.path.join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(DataDir {
            path,
            remove: !keep,
        })
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.remove {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!("warning: could not remove {}: {e}", self.path.display());
            }
        }
    }
}

pub fn io_backend(flags: &Flags) -> Result<Arc<dyn Io>> {
    Ok(match flags.io {
        IoArg::Auto => timeline_engine::io::default_io(),
        IoArg::Std => Arc::new(timeline_engine::io::StdIo),
        IoArg::Uring => match timeline_engine::io::UringIo::try_new() {
            Some(u) => Arc::new(u),
            None => return Err("--io uring: io_uring is not available on this machine".into()),
        },
    })
}

pub fn engine_config(flags: &Flags) -> Result<Config> {
    let seg = flags
        .segment_mb
        .checked_shl(20)
        .filter(|_| flags.segment_mb <= 1024)
        .ok_or("--segment-mb too large")?;
    Ok(Config {
        background: true,
        shards: flags.shards,
        io: Some(io_backend(flags)?),
        keyspaces: vec![
            KeyspaceConfig {
                segment_bytes: seg,
                regroup: flags.regroup.unwrap_or(true),
                ..KeyspaceConfig::store()
            },
            KeyspaceConfig {
                segment_bytes: seg,
                regroup: flags.regroup.unwrap_or(false),
                ..KeyspaceConfig::sync()
            },
        ],
        ..Default::default()
    })
}

/// With `--seal`, roll and seal every active segment; returns the seconds it took.
pub fn seal_if_asked(flags: &Flags, engine: &Engine) -> Result<Option<f64>> {
    if !flags.seal {
        return Ok(None);
    }
    let t = Instant::now();
    let m = engine.seal_active()?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!("sealed {} segment(s) in {secs:.3} s", m.sealed);
    Ok(Some(secs))
}

/// Open the engine, returning it and the wall time `Engine::open` took.
pub fn open_engine(flags: &Flags, dir: &Path) -> Result<(Engine, f64)> {
    let cfg = engine_config(flags)?;
    let t = Instant::now();
    let e =
        Engine::open(dir, cfg).map_err(|e| format!("opening engine in {}: {e}", dir.display()))?;
    Ok((e, t.elapsed().as_secs_f64()))
}

pub fn keyspace(flags: &Flags) -> Keyspace {
    match flags.keyspace {
        KeyspaceArg::Store => Keyspace::STORE,
        KeyspaceArg::Sync => Keyspace::SYNC,
    }
}

/// The name the JSON output gives a keyspace (its directory name).
pub fn ks_name(ks: Keyspace) -> &'static str {
    match ks {
        Keyspace::STORE => "store",
        Keyspace::SYNC => "sync",
        _ => "other",
    }
}

pub fn timeline(ks: Keyspace, id: u64) -> TimelineId {
    TimelineId { keyspace: ks, id }
}

pub fn durability(flags: &Flags) -> Durability {
    match flags.durability {
        DurabilityArg::None => Durability::Buffered,
        DurabilityArg::Group => Durability::GroupCommit,
        DurabilityArg::Sync => Durability::Sync,
    }
}

/// A per-thread RNG derived from the seed.
pub fn rng_for(seed: u64, stream: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The generator of operation `i` of a workload's `domain`: the same
/// choices whichever session makes them.
pub fn rng_at(seed: u64, domain: u64, i: u64) -> SmallRng {
    SmallRng::seed_from_u64(
        seed ^ domain.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xA24B_AED4_963E_E407),
    )
}

/// Picks an index in `0..n`: uniformly, or Zipf-skewed (index 0 hottest).
#[derive(Debug, Clone)]
pub enum Picker {
    Uniform(u64),
    Zipf(Zipf<f64>, u64),
}

impl Picker {
    pub fn new(n: u64, zipf: Option<f64>) -> Result<Picker> {
        Ok(match zipf {
            None => Picker::Uniform(n),
            Some(s) => Picker::Zipf(Zipf::new(n, s).map_err(|e| format!("--zipf {s}: {e}"))?, n),
        })
    }

    #[inline]
    pub fn pick(&self, rng: &mut SmallRng) -> u64 {
        match self {
            Picker::Uniform(n) => rng.gen_range(0..*n),
            Picker::Zipf(z, n) => (z.sample(rng) as u64).clamp(1, *n) - 1,
        }
    }
}

/// Random payload bytes generated once; each message is a slice of
/// `payload` bytes at a random offset.
pub struct Payloads {
    buf: Vec<u8>,
    len: usize,
}

impl Payloads {
    pub fn new(len: usize, seed: u64) -> Payloads {
        let mut buf = vec![0u8; (4 << 20) + len];
        rng_for(seed, u64::MAX).fill_bytes(&mut buf);
        Payloads { buf, len }
    }

    #[inline]
    pub fn pick(&self, rng: &mut SmallRng) -> &[u8] {
        let off = rng.gen_range(0..=self.buf.len() - self.len);
        &self.buf[off..off + self.len]
    }
}

/// W1's messages as a function of their number `g` (0-based, over the
/// whole run): message `g` goes to timeline [`timeline`](Self::timeline)
/// with payload [`payload`](Self::payload), whichever session sends it, so
/// every target and every thread count gets the same operations from the
/// same seed. A payload of 8 bytes or more starts with `g` (little-endian),
/// so a record read back names the message it must be, byte for byte.
pub struct Messages {
    seed: u64,
    picker: Picker,
    bytes: Vec<u8>,
    len: usize,
}

impl Messages {
    pub fn new(flags: &Flags) -> Result<Messages> {
        let len = flags.payload;
        let mut bytes = vec![0u8; (1 << 20) + len];
        rng_for(flags.seed, u64::MAX).fill_bytes(&mut bytes);
        Ok(Messages {
            seed: flags.seed,
            picker: Picker::new(flags.timelines, flags.zipf)?,
            bytes,
            len,
        })
    }

    pub fn timeline(&self, g: u64) -> u64 {
        self.picker.pick(&mut rng_at(self.seed, 0x5717, g))
    }

    /// Message `g`'s payload, written into `out` (`--payload` bytes long).
    /// Where message `g`'s bytes start in the shared random bytes.
    fn offset(&self, g: u64) -> usize {
        (g.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) as usize % (self.bytes.len() - self.len + 1)
    }

    pub fn payload(&self, g: u64, out: &mut [u8]) {
        let off = self.offset(g);
        out.copy_from_slice(&self.bytes[off..off + self.len]);
        if let Some(h) = out.get_mut(..8) {
            h.copy_from_slice(&g.to_le_bytes());
        }
    }

    /// Whether payloads carry their message number (`--payload` >= 8).
    pub fn numbered(&self) -> bool {
        self.len >= 8
    }

    /// Check a record read from timeline `id`: `Ok(Some(g))`, the message it
    /// is; `Ok(None)` if payloads carry no number (the length was checked);
    /// `Err` says what is wrong.
    pub fn check(
        &self,
        id: u64,
        payload: &[u8],
        messages: u64,
    ) -> std::result::Result<Option<u64>, String> {
        if payload.len() != self.len {
            return Err(format!(
                "a {} B payload, expected {}",
                payload.len(),
                self.len
            ));
        }
        if !self.numbered() {
            return Ok(None);
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&payload[..8]);
        let g = u64::from_le_bytes(n);
        if g >= messages {
            return Err(format!(
                "payload names message {g}, but {messages} were sent"
            ));
        }
        let want = self.timeline(g);
        if want != id {
            return Err(format!("message {g} belongs to timeline {want}"));
        }
        let off = self.offset(g);
        if payload[8..] != self.bytes[off + 8..off + self.len] {
            return Err(format!(
                "message {g}: the payload's bytes differ from those sent"
            ));
        }
        Ok(Some(g))
    }
}

/// The fields every result line shares.
pub fn base_line(flags: &Flags, workload: &str, engine: &Engine) -> ResultLine {
    ResultLine {
        workload: workload.into(),
        target: "engine".into(),
        durability: durability(flags).name().into(),
        threads: flags.threads,
        payload: flags.payload,
        keyspace: ks_name(keyspace(flags)).into(),
        shards: engine.config().shards,
        regroup: Some(engine.config().keyspace(keyspace(flags)).regroup),
        io: engine.io_name().into(),
        seed: flags.seed,
        timelines: Some(flags.timelines),
        zipf: flags.zipf,
        ..Default::default()
    }
}

/// Split `total` into `parts` near-equal shares.
pub fn split(total: u64, parts: usize) -> Vec<u64> {
    let p = parts as u64;
    (0..p)
        .map(|i| total / p + u64::from(i < total % p))
        .collect()
}

/// Offsets of each connection's share of `total` (the first message
/// number of each), for ids that must be unique across connections.
pub fn offsets(total: u64, parts: usize) -> Vec<u64> {
    split(total, parts)
        .iter()
        .scan(0, |acc, &n| {
            let o = *acc;
            *acc += n;
            Some(o)
        })
        .collect()
}

/// What `timed_threads` measured.
pub struct Timed {
    pub hist: Histogram<u64>,
    /// Sums of the two counts the threads return.
    pub counts: (u64, u64),
    /// Wall time from the first thread's start to the last one's end.
    pub secs: f64,
}

/// Run `f(thread, share, &mut histogram)` on `threads` threads, each with
/// its share of `total`, all released together by a barrier; `f` returns
/// two counts (records, errors: whatever the workload counts).
pub fn timed_sessions<F>(threads: usize, total: u64, f: F) -> Result<Timed>
where
    F: Fn(u64, u64, &mut Histogram<u64>) -> Result<(u64, u64)> + Sync,
{
    let barrier = std::sync::Barrier::new(threads);
    type Out = (Histogram<u64>, (u64, u64), Instant, Instant);
    let results: Vec<Result<Out>> = std::thread::scope(|s| {
        let handles: Vec<_> = split(total, threads)
            .into_iter()
            .enumerate()
            .map(|(t, share)| {
                let (f, barrier) = (&f, &barrier);
                s.spawn(move || -> Result<Out> {
                    let mut hist = new_histogram()?;
                    barrier.wait();
                    let start = Instant::now();
                    let counts = f(t as u64, share, &mut hist)?;
                    Ok((hist, counts, start, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("worker thread panicked".into()))
            })
            .collect()
    });
    let mut out = Timed {
        hist: new_histogram()?,
        counts: (0, 0),
        secs: 0.0,
    };
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for r in results {
        let (h, (a, b), start, end) = r?;
        out.hist.add(&h)?;
        out.counts.0 += a;
        out.counts.1 += b;
        first = Some(first.map_or(start, |f| f.min(start)));
        last = Some(last.map_or(end, |l| l.max(end)));
    }
    if let (Some(a), Some(b)) = (first, last) {
        out.secs = b.duration_since(a).as_secs_f64();
    }
    Ok(out)
}

/// Sessions opened before the clock starts, one per thread.
pub(crate) fn open_sessions<T: Target>(t: &T) -> Result<Vec<Mutex<Option<T::Session<'_>>>>> {
    (0..t.shape().sessions)
        .map(|_| Ok(Mutex::new(Some(t.session()?))))
        .collect()
}

/// [`open_sessions`] of an IM target.
pub(crate) fn open_im_sessions<T: ImTarget>(t: &T) -> Result<Vec<Mutex<Option<T::Session<'_>>>>> {
    (0..t.shape().sessions)
        .map(|_| Ok(Mutex::new(Some(t.session()?))))
        .collect()
}

/// Thread `i`'s session.
pub(crate) fn take<S>(v: &[Mutex<Option<S>>], i: u64) -> Result<S> {
    Ok(v[i as usize]
        .lock()
        .map_err(|_| "poisoned")?
        .take()
        .ok_or("session taken twice")?)
}
