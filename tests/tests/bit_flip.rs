//! Damaged files: single bit flips in sealed records, sealed indexes and
//! footers, and the active log; unknown format versions; truncated sealed
//! files; garbage named like segments. Damage must surface as a typed
//! error (or, in the active log's tail, as a cut at the damaged record),
//! never as a panic or as wrong bytes.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use timeline_engine::format::record::{decode, decode_header};
use timeline_engine::format::segment::{Footer, HEADER_LEN};
use timeline_engine::io::{Io, MemIo, OpenMode};
use timeline_engine::{Config, Direction, Durability, Engine, Error, Keyspace, Result};
use timeline_tests::{ks_byte, payload, timeline};

const TIMELINES: u64 = 24;

fn root() -> PathBuf {
    PathBuf::from("/db")
}

fn shard_dir(ks: Keyspace) -> PathBuf {
    root()
        .join(if ks == Keyspace::STORE {
            "store"
        } else {
            "sync"
        })
        .join("000")
}

fn cfg(mem: &MemIo) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 1;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    c.max_payload = 1024;
    c.io = Some(Arc::new(mem.clone()));
    c
}

fn open(mem: &MemIo) -> Result<Engine> {
    Engine::open(root(), cfg(mem))
}

/// An image with several sealed segments in both keyspaces (store: grouped,
/// sync: log layout with an appended index) and a non-empty active log.
/// Returns the image and the last seq of every timeline.
fn build(records_per_timeline: u64) -> (MemIo, Vec<(u8, u64, u64)>) {
    let mem = MemIo::new();
    let e = open(&mem).unwrap();
    let mut last = Vec::new();
    for s in 1..=records_per_timeline {
        let mut items = Vec::new();
        let mut ps = Vec::new();
        for ks in [0u8, 1] {
            for tl in 0..TIMELINES {
                ps.push((ks, tl, payload(ks, tl, s)));
            }
        }
        for (ks, tl, p) in &ps {
            items.push((timeline(*ks, *tl), p.as_slice()));
        }
        let seqs = e.append_batch(&items, Durability::Buffered).unwrap();
        assert!(seqs.iter().all(|&x| x == s));
    }
    for ks in [0u8, 1] {
        for tl in 0..TIMELINES {
            last.push((ks, tl, records_per_timeline));
        }
    }
    let st = e.stats();
    assert!(
        st.keyspace(Keyspace::STORE).sealed_segments >= 2
            && st.keyspace(Keyspace::SYNC).sealed_segments >= 2,
        "{st:?}"
    );
    e.close().unwrap();
    (mem.crash(), last)
}

fn read_file(mem: &MemIo, p: &Path) -> Vec<u8> {
    mem.open(p, OpenMode::Existing)
        .unwrap()
        .map()
        .unwrap()
        .to_vec()
}

fn write_file(mem: &MemIo, p: &Path, at: u64, bytes: &[u8]) {
    let f = mem.open(p, OpenMode::Existing).unwrap();
    f.write_and_sync(bytes, at).unwrap();
}

/// Sealed segments of a keyspace that have no `.log` sibling (a stale log
/// beside a sealed file would legitimately take over when the sealed file
/// is damaged).
fn sealed_files(mem: &MemIo, ks: Keyspace) -> Vec<PathBuf> {
    let d = shard_dir(ks);
    let names = mem.file_names(&d);
    names
        .iter()
        .filter(|n| n.ends_with(".seg"))
        .filter(|n| !names.contains(&n.replace(".seg", ".log")))
        .map(|n| d.join(n))
        .collect()
}

fn active_log(mem: &MemIo, ks: Keyspace) -> PathBuf {
    let d = shard_dir(ks);
    let mut logs: Vec<String> = mem
        .file_names(&d)
        .into_iter()
        .filter(|n| n.ends_with(".log"))
        .collect();
    logs.sort();
    d.join(logs.last().unwrap())
}

/// (offset, timeline, seq, encoded length) of every record of a segment file.
fn records(bytes: &[u8], end: usize) -> Vec<(usize, u64, u64, usize)> {
    let mut v = Vec::new();
    let mut off = HEADER_LEN;
    while off < end {
        let (h, _) = decode(&bytes[off..]).unwrap();
        v.push((off, h.timeline, h.seq, h.encoded_len()));
        off += h.encoded_len();
    }
    v
}

fn check_timeline(e: &Engine, ks: u8, tl: u64, last: u64) {
    let t = timeline(ks, tl);
    assert_eq!(e.last_seq(t), last, "ks {ks} tl {tl}");
    let recs = e.scan(t, 1, 100_000, Direction::Forward).unwrap();
    assert_eq!(recs.len() as u64, last, "ks {ks} tl {tl}");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert!(
            r.payload == payload(ks, tl, r.seq),
            "ks {ks} tl {tl} seq {}",
            r.seq
        );
    }
}

/// Store keyspace: sealed segments are regrouped (`SegmentKind::Grouped`).
#[test]
fn flipped_record_in_grouped_sealed_segment_is_corruption() {
    flip_sealed_records(Keyspace::STORE);
}

/// Sync keyspace: sealed segments keep the log layout with an index appended
/// (`SegmentKind::Log`, `regroup = false`).
#[test]
fn flipped_record_in_log_layout_sealed_segment_is_corruption() {
    flip_sealed_records(Keyspace::SYNC);
}

/// Flip every bit of a few records' headers (and some payload bits) in a
/// sealed segment: reading the record (get, or a forward scan over it) is a
/// corruption error, and every other timeline reads exactly as written.
fn flip_sealed_records(only: Keyspace) {
    let (base, lasts) = build(60);
    let mut failures = Vec::new();
    let mut bad_bytes = std::collections::BTreeSet::new();
    let mut trials = 0;
    for ks in [only] {
        let k = ks_byte(ks);
        let segs = sealed_files(&base, ks);
        assert!(!segs.is_empty(), "{ks:?}");
        let path = segs[0].clone();
        let bytes = read_file(&base, &path);
        let footer = Footer::decode_from_file(&bytes).unwrap();
        let recs = records(&bytes, footer.index_off as usize);
        let picks = [
            recs[0],
            recs[recs.len() / 2],
            recs[recs.len() - 1],
            recs[recs.len() / 3 + 1],
        ];
        for (pi, &(off, tl, seq, len)) in picks.iter().enumerate() {
            let mut bits: Vec<usize> = (0..40 * 8).collect();
            bits.extend((40 * 8..len * 8).step_by(29));
            for (bi, &bit) in bits.iter().enumerate() {
                trials += 1;
                let img = base.crash();
                img.flip_bit(&path, (off + bit / 8) as u64, (bit % 8) as u8);
                let e = match open(&img) {
                    Ok(e) => e,
                    Err(err) => panic!("{ks:?} record {pi} bit {bit}: open failed: {err}"),
                };
                let what = format!(
                    "{ks:?} {} record (tl {tl} seq {seq}) header field at byte {}, bit {}",
                    path.file_name().unwrap().to_string_lossy(),
                    bit / 8,
                    bit % 8
                );
                match e.get(timeline(k, tl), seq) {
                    Err(err) if err.is_corruption() => {}
                    Err(err) => {
                        bad_bytes.insert(bit / 8);
                        failures.push(format!("{what}: get gave non-corruption error {err}"))
                    }
                    Ok(Some(r)) => {
                        bad_bytes.insert(bit / 8);
                        failures.push(format!(
                            "{what}: get returned Ok(seq {}, payload ok: {})",
                            r.seq,
                            r.payload == payload(k, tl, seq)
                        ));
                    }
                    Ok(None) => {
                        bad_bytes.insert(bit / 8);
                        failures.push(format!("{what}: get returned Ok(None)"))
                    }
                }
                // Scanning over it must not yield the record either.
                match e.scan(timeline(k, tl), 1, 100_000, Direction::Forward) {
                    Err(err) => assert!(err.is_corruption(), "{what}: scan: {err}"),
                    Ok(v) => {
                        bad_bytes.insert(bit / 8);
                        failures.push(format!(
                            "{what}: forward scan returned {} records and no error",
                            v.len()
                        ))
                    }
                }
                if bi.is_multiple_of(16) {
                    // Every other timeline is intact.
                    for &(ks2, tl2, last) in &lasts {
                        if (ks2, tl2) != (k, tl) {
                            check_timeline(&e, ks2, tl2, last);
                        }
                    }
                }
            }
        }
    }
    assert!(trials > 500);
    if !failures.is_empty() {
        let n = failures.len();
        failures.truncate(12);
        panic!(
            "{only:?}: {n} of {trials} checks after bit flips in sealed records did not report corruption \
             (record bytes affected: {bad_bytes:?}), e.g.:\n{}",
            failures.join("\n")
        );
    }
}

/// Any bit of a sealed segment's header, index or footer: `Engine::open`
/// returns a corruption error.
#[test]
fn flipped_sealed_index_or_footer_fails_open() {
    let (base, _) = build(60);
    for ks in [Keyspace::STORE, Keyspace::SYNC] {
        let path = sealed_files(&base, ks)[0].clone();
        let bytes = read_file(&base, &path);
        let footer = Footer::decode_from_file(&bytes).unwrap();
        let n = bytes.len();
        let mut bits: Vec<usize> = (0..HEADER_LEN * 8).step_by(3).collect();
        bits.extend((footer.index_off as usize * 8..(n - 64) * 8).step_by(13));
        bits.extend((n - 64) * 8..n * 8);
        for bit in bits {
            let img = base.crash();
            img.flip_bit(&path, (bit / 8) as u64, (bit % 8) as u8);
            match open(&img) {
                Err(Error::Corruption { path: p, .. }) => assert_eq!(p, path),
                Err(other) => panic!(
                    "{ks:?} byte {} bit {}: expected Corruption, got {other}",
                    bit / 8,
                    bit % 8
                ),
                Ok(_) => panic!(
                    "{ks:?} byte {} bit {} of {n}: open succeeded on a damaged sealed file",
                    bit / 8,
                    bit % 8
                ),
            }
        }
    }
}

/// A flipped bit in the active log: recovery cuts the log at that record;
/// everything before it is intact, nothing after it is served.
#[test]
fn flipped_active_log_record_cuts_the_tail_there() {
    let (base, _) = build(60);
    for ks in [Keyspace::STORE, Keyspace::SYNC] {
        let k = ks_byte(ks);
        let path = active_log(&base, ks);
        let bytes = read_file(&base, &path);
        let recs = records(&bytes, bytes.len());
        assert!(recs.len() > 20, "{}", recs.len());
        for (ri, bit) in [
            (0usize, 5usize),
            (3, 40 * 8 + 1),
            (recs.len() / 2, 17 * 8 + 2),
            (recs.len() - 1, 3),
        ] {
            let (off, ..) = recs[ri];
            let img = base.crash();
            img.flip_bit(&path, (off + bit / 8) as u64, (bit % 8) as u8);
            let e = open(&img).unwrap();
            assert_eq!(
                img.file_len(&path),
                Some(off as u64),
                "the log is truncated at the damaged record"
            );
            // Expected: every record before `ri` survives (in this log and all
            // older segments); the rest of this log is cut.
            for tl in 0..TIMELINES {
                let before: Vec<u64> = recs[..ri]
                    .iter()
                    .filter(|r| r.1 == tl)
                    .map(|r| r.2)
                    .collect();
                let first_here = recs.iter().find(|r| r.1 == tl).map(|r| r.2).unwrap();
                let expect = before.last().copied().unwrap_or(first_here - 1);
                check_timeline(&e, k, tl, expect);
            }
            // Appends continue after the cut.
            let t = timeline(k, 0);
            let l = e.last_seq(t);
            assert_eq!(
                e.append_with(t, &payload(k, 0, l + 1), Durability::Sync)
                    .unwrap(),
                l + 1
            );
        }
    }
}

fn with_version(mut header: Vec<u8>, v: u16) -> Vec<u8> {
    header[8..10].copy_from_slice(&v.to_le_bytes());
    let c = crc32fast_hash(&header[..60]);
    header[60..64].copy_from_slice(&c.to_le_bytes());
    header
}

/// CRC-32 (IEEE), as the format uses (crc32fast is not a dependency of this crate).
fn crc32fast_hash(b: &[u8]) -> u32 {
    let mut c = !0u32;
    for &x in b {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn unknown_format_version_is_unsupported_version() {
    let (base, _) = build(60);
    // The CRC helper agrees with the engine's own header encoding.
    let seg = sealed_files(&base, Keyspace::STORE)[0].clone();
    let bytes = read_file(&base, &seg);
    assert_eq!(with_version(bytes[..64].to_vec(), 1), bytes[..64].to_vec());

    let mut targets = vec![
        sealed_files(&base, Keyspace::STORE)[0].clone(),
        sealed_files(&base, Keyspace::SYNC)[0].clone(),
        active_log(&base, Keyspace::STORE),
        active_log(&base, Keyspace::SYNC),
    ];
    targets.push(root().join("engine.meta"));
    for (i, path) in targets.iter().enumerate() {
        let img = base.crash();
        let bytes = read_file(&img, path);
        if i == 4 {
            // engine.meta: magic:8 version:u16 shards:u32 reserved:u16 crc32:u32
            let mut m = bytes.clone();
            m[8..10].copy_from_slice(&7u16.to_le_bytes());
            let c = crc32fast_hash(&m[..16]);
            m[16..20].copy_from_slice(&c.to_le_bytes());
            write_file(&img, path, 0, &m);
        } else {
            write_file(&img, path, 0, &with_version(bytes[..64].to_vec(), 7));
        }
        match open(&img) {
            Err(Error::UnsupportedVersion {
                path: p,
                found,
                supported,
            }) => {
                assert_eq!(&p, path);
                assert_eq!(found, 7);
                assert_eq!(supported, timeline_engine::format::FORMAT_VERSION);
            }
            Err(other) => panic!(
                "{}: expected UnsupportedVersion, got {other}",
                path.display()
            ),
            Ok(_) => panic!("{}: opened a file of an unknown version", path.display()),
        }
    }
}

#[test]
fn truncated_sealed_file_is_corruption() {
    let (base, _) = build(60);
    for ks in [Keyspace::STORE, Keyspace::SYNC] {
        let path = sealed_files(&base, ks)[0].clone();
        let n = base.file_len(&path).unwrap();
        let footer = Footer::decode_from_file(&read_file(&base, &path)).unwrap();
        for len in [
            n - 1,
            n - 8,
            n - 63,
            n - 64,
            n - 65,
            footer.index_off,
            footer.index_off - 1,
            n / 2,
            200,
            128,
            65,
            64,
            63,
            10,
            0,
        ] {
            let img = base.crash();
            img.truncate_file(&path, len);
            match open(&img) {
                Err(e) if e.is_corruption() => {}
                Err(e) => panic!("{ks:?} truncated to {len}: expected corruption, got {e}"),
                Ok(_) => panic!("{ks:?} truncated to {len} of {n}: open succeeded"),
            }
        }
    }
}

fn add_file(mem: &MemIo, path: &Path, bytes: &[u8]) {
    let f = mem.open(path, OpenMode::CreateNew).unwrap();
    f.write_and_sync(bytes, 0).unwrap();
    mem.sync_dir(path.parent().unwrap()).unwrap();
}

type Fixture = (MemIo, Vec<(u8, u64, u64)>);

fn small_base() -> &'static Fixture {
    static BASE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    BASE.get_or_init(|| build(40))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random bytes in a file named like a sealed segment: open fails with a
    /// corruption error. Named like a log segment: open fails, or (shorter
    /// than a header) drops the file; either way every timeline is intact.
    #[test]
    fn garbage_files_named_like_segments(bytes in proptest::collection::vec(any::<u8>(), 0..3000),
                                          sealed in any::<bool>(), sync_ks in any::<bool>(), gen in 0u32..200) {
        let (base, lasts) = small_base();
        let img = base.crash();
        let ks = if sync_ks { Keyspace::SYNC } else { Keyspace::STORE };
        let name = format!("{:010}.{}", 1000 + gen, if sealed { "seg" } else { "log" });
        add_file(&img, &shard_dir(ks).join(&name), &bytes);
        match open(&img) {
            Err(e) => prop_assert!(e.is_corruption(), "{name}: {e}"),
            Ok(e) => {
                prop_assert!(!sealed, "{name}: garbage sealed segment accepted");
                prop_assert!(bytes.len() < HEADER_LEN, "{name}: {} garbage bytes accepted", bytes.len());
                for &(k, tl, last) in lasts {
                    check_timeline(&e, k, tl, last);
                }
            }
        }
    }

    /// A valid header followed by garbage, as a newer log segment: recovery
    /// cuts the garbage (a torn tail) and serves exactly the old records.
    #[test]
    fn garbage_after_a_valid_log_header(bytes in proptest::collection::vec(any::<u8>(), 0..3000), sync_ks in any::<bool>()) {
        let (base, lasts) = small_base();
        let img = base.crash();
        let ks = if sync_ks { Keyspace::SYNC } else { Keyspace::STORE };
        let active = active_log(&img, ks);
        let header = read_file(&img, &active)[..HEADER_LEN].to_vec();
        let gen: u32 = active.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        // The header names its generation: rewrite it for the new file.
        let mut h = header.clone();
        h[16..20].copy_from_slice(&(gen + 1).to_le_bytes());
        let c = crc32fast_hash(&h[..60]);
        h[60..64].copy_from_slice(&c.to_le_bytes());
        let mut file = h;
        file.extend_from_slice(&bytes);
        add_file(&img, &shard_dir(ks).join(format!("{:010}.log", gen + 1)), &file);
        let e = open(&img).unwrap();
        for &(k, tl, last) in lasts {
            check_timeline(&e, k, tl, last);
        }
    }

    /// A sealed file whose footer and index checksums are valid but whose
    /// index entries are random: open and reads return errors or data, never panic.
    #[test]
    fn checksummed_garbage_index_never_panics(entries in proptest::collection::vec(
        (0u64..TIMELINES + 2, any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>(), 0u32..4, any::<u32>()), 1..6),
        small in any::<bool>(), body in proptest::collection::vec(any::<u8>(), 0..600), sync_ks in any::<bool>()) {
        let (base, _) = small_base();
        let img = base.crash();
        let ks = if sync_ks { Keyspace::SYNC } else { Keyspace::STORE };
        let path = sealed_files(&img, ks)[0].clone();
        let orig = read_file(&img, &path);
        let mut entries = entries;
        entries.sort_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        let mut file = orig[..HEADER_LEN].to_vec();
        file.extend_from_slice(&body);
        let index_off = file.len() as u64;
        let mut index = Vec::new();
        for &(tl, first, last, loc, prev_gen, sparse_start, run_len) in &entries {
            let (first, last) = if small { (first % 40, last % 40) } else { (first, last) };
            let loc = if small { loc % (index_off as u32 + 1) } else { loc };
            for x in [tl, first, last] { index.extend_from_slice(&x.to_le_bytes()); }
            for x in [loc, prev_gen, sparse_start, run_len] { index.extend_from_slice(&x.to_le_bytes()); }
        }
        let sparse_count = 4u32;
        for i in 0..sparse_count { index.extend_from_slice(&(HEADER_LEN as u32 + i * 50).to_le_bytes()); }
        let f = Footer { index_off, entries: entries.len() as u32, sparse_count, records: 3, min_ts: 0, max_ts: 0,
                         index_crc: crc32fast_hash(&index) };
        file.extend_from_slice(&index);
        file.extend_from_slice(&f.encode());
        img.truncate_file(&path, 0);
        write_file(&img, &path, 0, &file);
        if let Ok(e) = open(&img) {
            let k = ks_byte(ks);
            for tl in 0..TIMELINES + 2 {
                let t = timeline(k, tl);
                let last = e.last_seq(t);
                let _ = e.get(t, 1);
                let _ = e.get(t, last);
                let _ = e.scan(t, 1, 50, Direction::Forward);
                let _ = e.scan(t, u64::MAX, 50, Direction::Backward);
                let _ = e.first_retained_seq(t);
                let _ = e.append_with(t, b"x", Durability::Buffered);
            }
        }
    }
}

#[test]
fn headers_decode_in_the_fixtures() {
    // Sanity for the helpers above: records() walks every record of a log.
    let (base, _) = small_base();
    let path = active_log(base, Keyspace::STORE);
    let bytes = read_file(base, &path);
    let recs = records(&bytes, bytes.len());
    assert!(!recs.is_empty());
    assert!(decode_header(&bytes[recs[0].0..]).is_ok());
}
