//! Damage a real engine image, then open and read it.
//!
//! A pristine image is built once per process (see `pristine()`): both
//! keyspaces, one shard each, 64 KiB segments, several sealed segments
//! (`Grouped` in store, `Log` kind in sync), an index checkpoint in sync (the
//! TTL drop writes one), dropped sync segments, and non-empty active logs.
//! Each input copies that image (`MemIo::crash`, a deep copy: after `close`
//! everything is durable), applies the fuzzer's damage list, and then:
//!
//! - `Engine::open` returns Ok or Err, never panics;
//! - if Ok, `last_seq` never exceeds what was written, and every `get` and
//!   `scan` (both directions) returns Ok or Err; every record returned with Ok
//!   has exactly the payload written for that (timeline, seq), and an Ok scan
//!   or get returns every seq it covers (no silent gaps);
//! - appends afterwards succeed or fail, never panic; an Ok append gets
//!   `last_seq + 1` and reads back; after a clean close the engine reopens
//!   and still holds what it acknowledged.
#![no_main]

use timeline_engine::Keyspace;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use timeline_engine::io::{Io, MemIo, OpenMode};
use timeline_engine::*;

const ROOT: &str = "/fz";
const T0: u64 = 1_700_000_000_000;
const TTL_MS: u64 = 60_000;

fn config(mem: &MemIo, clock: &ManualClock) -> Config {
    let mut c = Config::default();
    c.io = Some(Arc::new(mem.clone()));
    c.clock = Arc::new(clock.clone());
    c.background = false;
    c.shards = 1;
    c.max_payload = 4096;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    *c.keyspace_mut(Keyspace::SYNC) = KeyspaceConfig::sync().with_ttl(Some(Duration::from_millis(TTL_MS)));
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c
}

fn timelines() -> Vec<TimelineId> {
    let mut v = Vec::new();
    for id in [1u64, 2, 3, u64::MAX] {
        v.push(TimelineId::store(id));
        v.push(TimelineId::sync(id));
    }
    v
}

/// The payload of (timeline, seq): the model world's generator (it mixes
/// in the keyspace, so a record showing up in the wrong keyspace is
/// caught), with a length of its own.
fn payload(tl: TimelineId, seq: u64, salt: u64) -> Vec<u8> {
    let len = ((tl.id % 7) * 211 + seq * 37 + salt) % 1400 + (seq % 3);
    timeline_tests::model::payload(tl, seq, len as usize, salt)
}

struct Pristine {
    image: MemIo,
    files: Vec<PathBuf>,
    model: BTreeMap<TimelineId, Vec<Vec<u8>>>,
    now: u64,
}

fn append_all(
    e: &Engine,
    model: &mut BTreeMap<TimelineId, Vec<Vec<u8>>>,
    tls: &[TimelineId],
    rounds: usize,
) {
    for r in 0..rounds {
        if r % 5 == 4 {
            // A batch over every timeline (both keyspaces, so two shards).
            let ps: Vec<(TimelineId, Vec<u8>)> = tls
                .iter()
                .map(|&t| (t, payload(t, model[&t].len() as u64 + 1, 0)))
                .collect();
            let items: Vec<(TimelineId, &[u8])> =
                ps.iter().map(|(t, p)| (*t, p.as_slice())).collect();
            let seqs = e.append_batch(&items, Durability::GroupCommit).expect("batch");
            for ((t, p), s) in ps.into_iter().zip(seqs) {
                let m = model.get_mut(&t).expect("timeline");
                assert_eq!(s, m.len() as u64 + 1);
                m.push(p);
            }
        } else {
            for &t in tls {
                let m = model.get_mut(&t).expect("timeline");
                let p = payload(t, m.len() as u64 + 1, 0);
                let d = if r % 2 == 0 {
                    Durability::GroupCommit
                } else {
                    Durability::Buffered
                };
                let s = e.append_with(t, &p, d).expect("append");
                assert_eq!(s, m.len() as u64 + 1);
                m.push(p);
            }
        }
    }
}

fn shard_dirs() -> [PathBuf; 2] {
    [
        Path::new(ROOT).join("store/000"),
        Path::new(ROOT).join("sync/000"),
    ]
}

fn pristine() -> &'static Pristine {
    static P: OnceLock<Pristine> = OnceLock::new();
    P.get_or_init(|| {
        let mem = MemIo::new();
        let clock = ManualClock::new(T0);
        let tls = timelines();
        let mut model: BTreeMap<TimelineId, Vec<Vec<u8>>> =
            tls.iter().map(|&t| (t, Vec::new())).collect();
        let e = Engine::open(ROOT, config(&mem, &clock)).expect("create");
        // Phase 1: about 3 segments per keyspace.
        append_all(&e, &mut model, &tls, 40);
        // Past the sync TTL: new sync appends roll the old window; the TTL
        // drop then writes a checkpoint and removes phase-1 sync segments.
        clock.advance_ms(TTL_MS + 10_000);
        append_all(&e, &mut model, &tls, 40);
        e.maintain().expect("maintain");
        // A little more so every active log holds records.
        clock.advance_ms(1_000);
        append_all(&e, &mut model, &tls, 3);
        e.close().expect("close");
        let now = clock.now_ms();

        let mut files = vec![Path::new(ROOT).join("engine.meta")];
        for d in shard_dirs() {
            for n in mem.file_names(&d) {
                files.push(d.join(n));
            }
        }
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        let has = |dir: &str, ext: &str| {
            names
                .iter()
                .any(|n| n.starts_with(&format!("{ROOT}/{dir}/")) && n.ends_with(ext))
        };
        assert!(has("store", ".seg") && has("store", ".log"), "{names:?}");
        assert!(has("sync", ".seg") && has("sync", ".log"), "{names:?}");
        assert!(has("sync", ".ckpt"), "{names:?}");

        let p = Pristine {
            image: mem.crash(),
            files,
            model,
            now,
        };
        // The undamaged image reads back in full (guards the harness itself).
        let mem = p.image.crash();
        let clock = ManualClock::new(p.now);
        let e = Engine::open(ROOT, config(&mem, &clock)).expect("reopen pristine");
        let mut truncated = 0;
        for (&tl, recs) in &p.model {
            assert_eq!(e.last_seq(tl), recs.len() as u64);
            let first = e.first_retained_seq(tl).expect("first retained");
            if first > 1 {
                truncated += 1;
            }
            let all = e
                .scan(tl, first, 100_000, Direction::Forward)
                .expect("pristine scan");
            assert_eq!(all.len() as u64, recs.len() as u64 + 1 - first);
            for r in all {
                assert_eq!(r.payload, recs[r.seq as usize - 1]);
            }
        }
        assert!(truncated > 0, "the TTL drop should have removed sync records");
        if std::env::var_os("FUZZ_VERBOSE").is_some() {
            eprintln!("pristine image: {names:#?}");
            for f in &p.files {
                eprintln!("{} {:?}", f.display(), p.image.file_len(f));
            }
        }
        p
    })
}

#[derive(Arbitrary, Debug)]
enum Damage {
    FlipBit { file: u8, offset: u32, bit: u8 },
    /// Keep `len % (file length + 1)` bytes.
    Truncate { file: u8, len: u32 },
    /// Cut `cut % (file length + 1)` bytes off the end (torn tails).
    CutTail { file: u8, cut: u16 },
    /// Write `bytes` at `offset % (file length + 1)` (may extend the file).
    Overwrite { file: u8, offset: u32, bytes: Vec<u8> },
    /// Fill `len` bytes at `offset` with zeros (a lost page).
    Zero { file: u8, offset: u32, len: u16 },
    Delete { file: u8 },
    /// Copy `len` bytes from one place in the image to another (a misdirected
    /// write: valid records where they do not belong), within or across shard
    /// directories (`FUZZ_SAME_DIR_ONLY=1` keeps copies within one).
    CopyRange { from: u8, from_off: u32, to: u8, to_off: u32, len: u16 },
    /// Replace a file's content with another file's (a restore of the wrong
    /// file). Same rule for shard directories as `CopyRange`.
    CopyFile { from: u8, to: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    damage: Vec<Damage>,
    /// Extra scan start points and limits.
    scans: Vec<(u8, u8)>,
}

fn read_file(mem: &MemIo, p: &Path) -> Option<Vec<u8>> {
    let f = mem.open(p, OpenMode::Existing).ok()?;
    Some(f.map().ok()?.to_vec())
}

fn write_file(mem: &MemIo, p: &Path, off: u64, bytes: &[u8]) {
    if let Ok(f) = mem.open(p, OpenMode::Existing) {
        let _ = f.write_at(bytes, off);
        let _ = f.sync_data();
    }
}

fn apply(mem: &MemIo, files: &[PathBuf], d: &Damage, cross_copy: bool) {
    let pick = |i: u8| &files[i as usize % files.len()];
    let len_of = |p: &Path| mem.file_len(p).unwrap_or(0);
    match *d {
        Damage::FlipBit { file, offset, bit } => {
            let p = pick(file);
            let n = len_of(p);
            if n > 0 {
                mem.flip_bit(p, offset as u64 % n, bit);
            }
        }
        Damage::Truncate { file, len } => {
            let p = pick(file);
            mem.truncate_file(p, len as u64 % (len_of(p) + 1));
        }
        Damage::CutTail { file, cut } => {
            let p = pick(file);
            let n = len_of(p);
            mem.truncate_file(p, n - cut as u64 % (n + 1));
        }
        Damage::Overwrite {
            file,
            offset,
            ref bytes,
        } => {
            let p = pick(file);
            let off = offset as u64 % (len_of(p) + 1);
            write_file(mem, p, off, &bytes[..bytes.len().min(4096)]);
        }
        Damage::Zero { file, offset, len } => {
            let p = pick(file);
            let n = len_of(p);
            let off = offset as u64 % (n + 1);
            let len = (len as u64).min(n - off) as usize;
            write_file(mem, p, off, &vec![0u8; len]);
        }
        Damage::Delete { file } => {
            let p = pick(file);
            if mem.remove_file(p).is_ok() {
                if let Some(dir) = p.parent() {
                    let _ = mem.sync_dir(dir);
                }
            }
        }
        Damage::CopyRange {
            from,
            from_off,
            to,
            to_off,
            len,
        } => {
            let (src, dst) = (pick(from), pick(to));
            if !cross_copy && src.parent() != dst.parent() {
                return;
            }
            let Some(b) = read_file(mem, src) else { return };
            let s = from_off as usize % (b.len() + 1);
            let e = (s + len as usize).min(b.len());
            let off = to_off as u64 % (len_of(dst) + 1);
            write_file(mem, dst, off, &b[s..e]);
        }
        Damage::CopyFile { from, to } => {
            let (src, dst) = (pick(from), pick(to));
            if src == dst || (!cross_copy && src.parent() != dst.parent()) {
                return;
            }
            let Some(b) = read_file(mem, src) else { return };
            if mem.file_len(dst).is_some() {
                mem.truncate_file(dst, 0);
                write_file(mem, dst, 0, &b);
            }
        }
    }
}

/// Every Ok answer about `tl` must agree with `recs` (seq k has payload
/// `recs[k - 1]`); returns the engine's last seq.
fn check_reads(e: &Engine, tl: TimelineId, recs: &[Vec<u8>], scans: &[(u8, u8)]) -> u64 {
    let last = e.last_seq(tl);
    assert!(
        last <= recs.len() as u64,
        "{tl:?}: last_seq {last} but only {} records were written",
        recs.len()
    );
    let ok = |r: &Record, what: &str| {
        assert!(
            r.seq >= 1 && r.seq <= last,
            "{tl:?} {what}: returned seq {} outside 1..={last}",
            r.seq
        );
        assert!(
            r.payload == recs[r.seq as usize - 1],
            "{tl:?} {what}: seq {} has a payload that was never written for it \
             ({} bytes, expected {} bytes)",
            r.seq,
            r.payload.len(),
            recs[r.seq as usize - 1].len()
        );
    };
    let first = e.first_retained_seq(tl).ok();
    // Point reads: the edges, the first retained seq, every 16th seq (sparse
    // index boundaries) and the fuzzer's picks. Full scans below cover every
    // record's bytes.
    let mut gets: Vec<u64> = vec![0, 1, 2, last.saturating_sub(1), last, last + 1];
    gets.extend(first);
    gets.extend((15..=last).step_by(16));
    gets.extend(scans.iter().take(8).map(|&(a, _)| a as u64 % (last + 2)));
    for seq in gets {
        match e.get(tl, seq) {
            Ok(Some(r)) => {
                assert_eq!(r.seq, seq, "{tl:?} get({seq}) returned seq {}", r.seq);
                ok(&r, "get");
            }
            Ok(None) => assert!(
                seq == 0 || seq > last,
                "{tl:?} get({seq}) = None although last_seq is {last}"
            ),
            Err(_) => {}
        }
    }
    let mut starts: Vec<(u64, usize)> = vec![(1, 100_000), (u64::MAX, 100_000)];
    if let Some(f) = first {
        starts.push((f, 100_000));
    }
    for &(a, b) in scans.iter().take(8) {
        starts.push((a as u64 % (last + 2), b as usize % 40));
    }
    starts.sort_unstable();
    starts.dedup();
    for (from, limit) in starts {
        if let Ok(v) = e.scan(tl, from, limit, Direction::Forward) {
            let lo = from.max(1);
            let want = if lo > last {
                0
            } else {
                (last - lo + 1).min(limit as u64)
            };
            assert_eq!(
                v.len() as u64,
                want,
                "{tl:?} forward scan from {from} limit {limit}: Ok with {} records, last_seq {last}",
                v.len()
            );
            for (i, r) in v.iter().enumerate() {
                assert_eq!(r.seq, lo + i as u64, "{tl:?} forward scan from {from}: seqs");
                ok(r, "forward scan");
            }
        }
        if let Ok(v) = e.scan(tl, from, limit, Direction::Backward) {
            let hi = from.min(last);
            if let Some(r) = v.first() {
                assert_eq!(r.seq, hi, "{tl:?} backward scan from {from} starts at {}", r.seq);
            }
            if hi > 0 && limit > 0 {
                if let Some(f) = first {
                    let want = (hi + 1).saturating_sub(f.max(1)).min(limit as u64);
                    assert_eq!(
                        v.len() as u64,
                        want,
                        "{tl:?} backward scan from {from} limit {limit}: first retained {f}"
                    );
                }
            }
            for (i, r) in v.iter().enumerate() {
                assert_eq!(r.seq, hi - i as u64, "{tl:?} backward scan from {from}: seqs");
                ok(r, "backward scan");
            }
        }
    }
    last
}

fuzz_target!(|input: Input| {
    let p = pristine();
    let mem = p.image.crash();
    let cross_copy = std::env::var_os("FUZZ_SAME_DIR_ONLY").is_none();
    let verbose = std::env::var_os("FUZZ_VERBOSE").is_some();
    for d in input.damage.iter().take(16) {
        if verbose {
            eprintln!("damage: {d:?}");
        }
        apply(&mem, &p.files, d, cross_copy);
    }
    let clock = ManualClock::new(p.now);
    let e = match Engine::open(ROOT, config(&mem, &clock)) {
        Ok(e) => e,
        Err(err) => {
            if verbose {
                eprintln!("open: {err}");
            }
            return;
        }
    };
    if verbose {
        eprintln!("open: Ok");
    }
    // What the engine may hold now: a prefix of what was written.
    let mut model: BTreeMap<TimelineId, Vec<Vec<u8>>> = BTreeMap::new();
    for (&tl, recs) in &p.model {
        let last = check_reads(&e, tl, recs, &input.scans);
        model.insert(tl, recs[..last as usize].to_vec());
    }
    // Appends after a successful open: Ok or Err, and an Ok one reads back.
    let mut acked = false;
    for (&tl, recs) in model.iter_mut() {
        let p = payload(tl, recs.len() as u64 + 1, 0x5EED);
        let before = e.last_seq(tl);
        if let Ok(seq) = e.append(tl, &p) {
            assert_eq!(seq, before + 1, "{tl:?}: append after open got seq {seq}, last was {before}");
            assert_eq!(before, recs.len() as u64);
            match e.get(tl, seq) {
                Ok(Some(r)) => assert!(r.payload == p, "{tl:?}: appended seq {seq} reads back wrong"),
                Ok(None) => panic!("{tl:?}: appended seq {seq} reads back as None"),
                Err(_) => {}
            }
            recs.push(p);
            acked = true;
        }
    }
    let items: Vec<(TimelineId, Vec<u8>)> = model
        .iter()
        .map(|(&tl, recs)| (tl, payload(tl, recs.len() as u64 + 1, 0xBA7C)))
        .collect();
    let refs: Vec<(TimelineId, &[u8])> = items.iter().map(|(t, p)| (*t, p.as_slice())).collect();
    if let Ok(seqs) = e.append_batch(&refs, Durability::GroupCommit) {
        for ((tl, p), seq) in items.into_iter().zip(seqs) {
            let recs = model.get_mut(&tl).expect("timeline");
            assert_eq!(seq, recs.len() as u64 + 1, "{tl:?}: batch seq");
            recs.push(p);
        }
        acked = true;
    }
    if e.close().is_err() || !acked {
        return;
    }
    // A clean close after acknowledged appends: the engine must open again
    // and hold every acknowledged record.
    let e = match Engine::open(ROOT, config(&mem, &clock)) {
        Ok(e) => e,
        Err(err) => panic!("reopen after a successful open + acknowledged appends failed: {err}"),
    };
    for (&tl, recs) in &model {
        let last = check_reads(&e, tl, recs, &[]);
        assert_eq!(last, recs.len() as u64, "{tl:?}: acknowledged appends lost on reopen");
    }
});
