//! Power cuts, systematically (issue 10, item 3), on the in-memory backend
//! (`MemIo::crash_with` chooses what each file holds after the cut):
//! * the last write torn at every byte offset, with the other files'
//!   unsynced bytes lost or kept (writeback reaches files in any order);
//! * the unsynced pages of every file written back in any order (a random
//!   subset per file and seed, holes read as zeros), across segment rolls.
//!
//! After every cut: whatever was acknowledged as durable (`Sync`,
//! `GroupCommit`, or before a successful `sync`) is there with its exact
//! bytes; every timeline is an unbroken run of seqs of exactly the records
//! appended there (for `Buffered`, a consistent prefix); appends continue.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use timeline_engine::io::MemIo;
use timeline_engine::{Config, Direction, Durability, Engine, Keyspace, TimelineId};
use timeline_tests::{payload, timeline};

fn root() -> PathBuf {
    PathBuf::from("/db")
}

fn cfg(mem: &MemIo, shards: usize, seg: u64) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = shards;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = seg;
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = seg;
    c.max_payload = 1024;
    c.io = Some(Arc::new(mem.clone()));
    c
}

/// (keyspace byte, timeline) → last seq appended / last seq durable.
type Model = BTreeMap<(u8, u64), u64>;

struct World {
    appended: Model,
    durable: Model,
}

impl World {
    fn new() -> World {
        World {
            appended: Model::new(),
            durable: Model::new(),
        }
    }

    /// One batch over `timelines` (both keyspaces), acknowledged with `d`.
    fn batch(&mut self, e: &Engine, round: u64, timelines: u64, d: Durability) {
        let mut items = Vec::new();
        for i in 0..4u64 {
            let ks = ((round + i) % 2) as u8;
            let tl = (round * 5 + i * 7) % timelines;
            let next = self.appended.get(&(ks, tl)).copied().unwrap_or(0)
                + 1
                + items
                    .iter()
                    .filter(|x: &&(u8, u64, u64)| x.0 == ks && x.1 == tl)
                    .count() as u64;
            items.push((ks, tl, next));
        }
        let payloads: Vec<Vec<u8>> = items.iter().map(|&(k, t, s)| payload(k, t, s)).collect();
        let batch: Vec<(TimelineId, &[u8])> = items
            .iter()
            .zip(&payloads)
            .map(|(&(k, t, _), p)| (timeline(k, t), &p[..]))
            .collect();
        let seqs = e.append_batch(&batch, d).unwrap();
        for (&(k, t, s), got) in items.iter().zip(seqs) {
            assert_eq!(got, s);
            self.appended.insert((k, t), s);
            if d != Durability::Buffered {
                let x = self.durable.entry((k, t)).or_default();
                *x = (*x).max(s);
            }
        }
    }

    fn synced(&mut self, e: &Engine) {
        e.sync().unwrap();
        self.durable = self.appended.clone();
    }

    /// Reopen `image` and check it; returns how many records it kept.
    fn check(&self, image: &MemIo, shards: usize, seg: u64, what: &str) -> u64 {
        let e = Engine::open(root(), cfg(image, shards, seg))
            .unwrap_or_else(|x| panic!("{what}: open after the cut: {x}"));
        let mut kept = 0;
        for (&(k, t), &max) in &self.appended {
            let tl = timeline(k, t);
            let last = e.last_seq(tl);
            let min = self.durable.get(&(k, t)).copied().unwrap_or(0);
            assert!(
                last >= min,
                "{what}: k{k} t{t}: durable through {min}, recovered {last}"
            );
            assert!(
                last <= max,
                "{what}: k{k} t{t}: recovered {last} > appended {max}"
            );
            let recs = e.scan(tl, 1, 100_000, Direction::Forward).unwrap();
            assert_eq!(
                recs.len() as u64,
                last,
                "{what}: k{k} t{t}: not a run 1..={last}"
            );
            for (i, r) in recs.iter().enumerate() {
                assert_eq!(r.seq, i as u64 + 1, "{what}: k{k} t{t}");
                assert!(
                    r.payload == payload(k, t, r.seq),
                    "{what}: k{k} t{t} seq {}: wrong bytes",
                    r.seq
                );
            }
            let s = e
                .append_with(tl, &payload(k, t, last + 1), Durability::Buffered)
                .unwrap();
            assert_eq!(s, last + 1, "{what}: k{k} t{t}: appends do not continue");
            kept += last;
        }
        kept
    }
}

/// The last write (a buffered batch: one write per keyspace log) torn at
/// every byte offset.
#[test]
fn the_last_write_torn_at_every_byte_offset() {
    let mem = MemIo::new();
    let e = Engine::open(root(), cfg(&mem, 1, 1 << 20)).unwrap();
    let mut w = World::new();
    for r in 0..30 {
        let d = [Durability::Sync, Durability::GroupCommit][r as usize % 2];
        w.batch(&e, r, 6, d);
    }
    w.batch(&e, 30, 6, Durability::Buffered);
    let torn: Vec<(PathBuf, u64)> = mem.unsynced().into_iter().filter(|f| f.1 > 0).collect();
    assert!(!torn.is_empty(), "the last write left nothing unsynced");
    let mut cuts = 0;
    for (file, len) in &torn {
        for others_kept in [false, true] {
            for k in 0..=*len as usize {
                let image = mem.crash_with(|p: &Path, durable, now| {
                    let mut c = durable.to_vec();
                    let extra = &now[durable.len().min(now.len())..];
                    if p == file {
                        c.extend_from_slice(&extra[..k]);
                    } else if others_kept {
                        c.extend_from_slice(extra);
                    }
                    c
                });
                let what = format!(
                    "{} torn at {k} of {len} (others kept: {others_kept})",
                    file.display()
                );
                w.check(&image, 1, 1 << 20, &what);
                cuts += 1;
            }
        }
    }
    eprintln!("{cuts} cuts checked");
}

/// Unsynced pages reach the device in any order: per file and seed, a
/// random subset of the 4 KiB pages written since its last fdatasync
/// survives (a page lost in the middle reads as zeros), across segment
/// rolls and seals.
#[test]
fn unsynced_pages_written_back_in_any_order() {
    const PAGE: usize = 4096;
    for seed in 1..=60u64 {
        let mem = MemIo::new();
        let e = Engine::open(root(), cfg(&mem, 2, 64 << 10)).unwrap();
        let mut w = World::new();
        let rounds = 80 + seed * 13 % 160;
        for r in 0..rounds {
            let d = match r % 7 {
                0 => Durability::GroupCommit,
                3 => Durability::Sync,
                _ => Durability::Buffered,
            };
            w.batch(&e, r, 16, d);
            if r % 50 == seed % 50 {
                w.synced(&e);
            }
            if r % 40 == 39 {
                e.maintain().unwrap();
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let image = mem.crash_with(|_, durable, now| {
            let mut c = durable.to_vec();
            let mut end = durable.len();
            let mut off = durable.len();
            while off < now.len() {
                let to = ((off / PAGE + 1) * PAGE).min(now.len());
                if rng.gen_bool(0.5) {
                    c.resize(off, 0); // the pages skipped read as zeros
                    c.extend_from_slice(&now[off..to]);
                    end = to;
                }
                off = to;
            }
            c.truncate(end);
            c
        });
        drop(e);
        w.check(&image, 2, 64 << 10, &format!("seed {seed}"));
    }
}
