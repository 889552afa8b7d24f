//! Each partition's records of which only the last counts: openraft's vote
//! (timeline `2p` of keyspace [`RAFT_STATE`]) and the state machine's
//! applied state (`2p + 1`), both JSON.
//!
//! They were in `raft-meta` at first (`4p`, `4p + 2`), where every copy
//! stayed for good: about 22 MB a day per node under W6, since a busy
//! group writes its applied state once a reclaim period. `raft-meta`
//! cannot release them: the partitions' timeline lists, which must stay,
//! share its segments. Here:
//! - a write is durable (`Durability::Sync`) and then releases every copy
//!   before it (`Engine::release`), so the engine drops a segment once
//!   nothing in it is the last record of its timeline;
//! - an idle partition's one record would pin its segment, and with it
//!   every later one of the shard (the engine drops only a prefix): once a
//!   period, [`Renewal::pass`] writes each record that has not changed for
//!   half the keyspace's segment window (5 minutes by default: a copy then
//!   never sits in a segment more than a window older than the newest)
//!   again at its timeline's end, syncs, and releases the old copy. It appends with `Engine::append_after`, only if the timeline's
//!   last seq is still the one it read, so a vote saved meanwhile is never
//!   followed by an older copy;
//! - the engine keeps release points in memory only: each pass declares
//!   them again (after a restart, until the first pass, only copies
//!   before a record written since are released);
//! - a pass first syncs the engine: a copy an earlier pass wrote and could
//!   not sync (it failed half-way) is on disk before the record before it
//!   is released.
//!
//! A data directory from an earlier build: a partition with no record here
//! reads its last one in `raft-meta`, and its next write comes here. Those
//! old copies stay in `raft-meta`.

use crate::log_store::{RAFT_META, RAFT_STATE};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use timeline_engine::{Direction, Durability, Engine, Record, SeqId, TimelineId};

/// Which of a partition's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// openraft's vote (written by the log store).
    Vote,
    /// The last applied id and membership (written by the state machine).
    Applied,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Vote, Kind::Applied];

    /// Partition `p`'s timeline of this record.
    pub fn timeline(self, p: u64) -> TimelineId {
        TimelineId::new(RAFT_STATE, 2 * p + self as u64)
    }

    /// Where an earlier build wrote it.
    fn in_raft_meta(self, p: u64) -> TimelineId {
        let off = match self {
            Kind::Vote => 0,
            Kind::Applied => 2,
        };
        TimelineId::new(RAFT_META, 4 * p + off)
    }
}

/// Partition `p`'s last record of `kind` (from `raft-meta` if it has none
/// here yet), or `None` if it never wrote one.
pub fn last(engine: &Engine, kind: Kind, p: u64) -> timeline_engine::Result<Option<Record>> {
    for tl in [kind.timeline(p), kind.in_raft_meta(p)] {
        let page = engine.scan(tl, u64::MAX, 1, Direction::Backward)?;
        if let Some(r) = page.into_iter().next() {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// Write partition `p`'s record of `kind`, durably, and release the copies
/// before it. Its seq.
pub fn write(engine: &Engine, kind: Kind, p: u64, bytes: &[u8]) -> timeline_engine::Result<SeqId> {
    let tl = kind.timeline(p);
    let seq = engine.append_with(tl, bytes, Durability::Sync)?;
    engine.release(tl, seq - 1);
    Ok(seq)
}

/// The node's renewals of idle records: each timeline's last seq as seen,
/// and since when.
#[derive(Debug, Default)]
pub struct Renewal {
    seen: HashMap<TimelineId, (SeqId, Instant)>,
    /// How long a record stays unchanged before it is copied (0: from the
    /// pass after it is first seen).
    age: Duration,
}

impl Renewal {
    /// Renewals of records unchanged for half of `engine`'s `raft-state`
    /// segment window.
    pub fn for_engine(engine: &Engine) -> Renewal {
        let window = engine
            .config()
            .find(RAFT_STATE)
            .map_or(Duration::ZERO, |k| k.segment_window);
        Renewal {
            seen: HashMap::new(),
            age: window / 2,
        }
    }

    /// One pass over partitions `0..partitions` (blocking: an engine sync,
    /// and another when anything was copied): every record unchanged for
    /// the renewal age is written again at its timeline's end and its old
    /// copy released. How many were.
    pub fn pass(&mut self, engine: &Engine, partitions: u32) -> timeline_engine::Result<usize> {
        // Every last record durable (a copy left by a pass that failed
        // included) before anything before it is released.
        engine.sync()?;
        let mut copies = Vec::new();
        let mut failed = None;
        'partitions: for p in 0..u64::from(partitions) {
            for kind in Kind::ALL {
                match self.copy(engine, kind.timeline(p)) {
                    Ok(Some(c)) => copies.push(c),
                    Ok(None) => {}
                    Err(e) => {
                        failed = Some(e);
                        break 'partitions;
                    }
                }
            }
        }
        if !copies.is_empty() {
            // The copies durable before their originals can be dropped.
            engine.sync()?;
            let now = Instant::now();
            for &(tl, seq) in &copies {
                engine.release(tl, seq - 1);
                self.seen.insert(tl, (seq, now));
            }
        }
        failed.map_or(Ok(copies.len()), Err)
    }

    /// Release what is before `tl`'s last record, and copy that record
    /// (not yet durable) if it has been unchanged for the renewal age: the
    /// copy's seq.
    fn copy(
        &mut self,
        engine: &Engine,
        tl: TimelineId,
    ) -> timeline_engine::Result<Option<(TimelineId, SeqId)>> {
        let last = engine.last_seq(tl);
        if last == 0 {
            return Ok(None);
        }
        // Again after a restart (the engine forgot), and harmless
        // otherwise: a release point only moves forward.
        engine.release(tl, last - 1);
        let now = Instant::now();
        match self.seen.get(&tl) {
            // Unchanged, for long enough: copied below.
            Some(&(seq, since)) if seq == last && now.duration_since(since) >= self.age => {}
            // Unchanged, not for long enough yet.
            Some(&(seq, _)) if seq == last => return Ok(None),
            // Written since (or first seen).
            _ => {
                self.seen.insert(tl, (last, now));
                return Ok(None);
            }
        }
        let Some(r) = engine.get(tl, last)? else {
            return Ok(None);
        };
        // `None`: the owner wrote a newer one since `last_seq`.
        let copied = engine.append_after(tl, last, &r.payload, Durability::Buffered)?;
        Ok(copied.map(|seq| (tl, seq)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testkit::small_segments;

    fn files(e: &Engine) -> u64 {
        e.stats().keyspace(RAFT_STATE).files
    }

    fn last_bytes(e: &Engine, kind: Kind, p: u64) -> Vec<u8> {
        last(e, kind, p).unwrap().unwrap().payload
    }

    /// Busy partitions write their records over and over, past many
    /// segments, while partition 0's vote was written once at the start
    /// and pins every segment. Renewal passes copy it to the end: the old
    /// segments go, and every partition reads its last record, after a
    /// restart too (where the first pass declares the releases again).
    #[test]
    fn renewals_let_old_copies_go_and_keep_every_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let e = small_segments(dir.path());
        write(&e, Kind::Vote, 0, b"idle vote").unwrap();
        let busy = |e: &Engine, round: u32| {
            for i in 0..400u32 {
                for p in 1..4u64 {
                    let bytes = format!("{round}/{i}/{p}:{}", "x".repeat(400));
                    write(e, Kind::Applied, p, bytes.as_bytes()).unwrap();
                }
            }
        };
        busy(&e, 0);
        e.maintain().unwrap();
        let pinned = files(&e);
        assert!(pinned >= 4, "{pinned} segments");
        let mut r = Renewal::default();
        assert_eq!(r.pass(&e, 8).unwrap(), 0, "first seen: nothing copied");
        assert_eq!(r.pass(&e, 8).unwrap(), 4, "unchanged for a period");
        e.maintain().unwrap();
        assert!(files(&e) < pinned, "{} of {pinned}", files(&e));
        assert!(files(&e) <= 2, "{} segments", files(&e));
        busy(&e, 1);
        let want: Vec<Vec<u8>> = (1..4).map(|p| last_bytes(&e, Kind::Applied, p)).collect();
        assert!(last(&e, Kind::Applied, 0).unwrap().is_none());
        assert!(last(&e, Kind::Vote, 1).unwrap().is_none());
        drop(e);
        let e = small_segments(dir.path());
        let mut r = Renewal::default();
        // The first pass after a restart only sees; the second copies.
        assert_eq!(r.pass(&e, 8).unwrap(), 0);
        e.maintain().unwrap();
        assert!(files(&e) >= 8, "the idle vote pins them: {}", files(&e));
        assert_eq!(r.pass(&e, 8).unwrap(), 4);
        e.maintain().unwrap();
        assert!(files(&e) <= 2, "{} segments", files(&e));
        assert_eq!(last_bytes(&e, Kind::Vote, 0), b"idle vote");
        for (p, w) in (1..4).zip(&want) {
            assert_eq!(&last_bytes(&e, Kind::Applied, p), w);
        }
        // A record written since the pass before is not copied: it is
        // the newest already.
        write(&e, Kind::Vote, 0, b"new vote").unwrap();
        assert_eq!(r.pass(&e, 8).unwrap(), 3);
        assert_eq!(last_bytes(&e, Kind::Vote, 0), b"new vote");
        assert_eq!(r.pass(&e, 8).unwrap(), 4);
        assert_eq!(last_bytes(&e, Kind::Vote, 0), b"new vote");
    }

    /// A record is copied only once it has been unchanged for the age
    /// asked (half the segment window on a node): an idle cluster does
    /// not rewrite its votes every period.
    #[test]
    fn records_younger_than_the_age_are_not_copied() {
        let dir = tempfile::tempdir().unwrap();
        let e = small_segments(dir.path());
        write(&e, Kind::Vote, 0, b"vote").unwrap();
        let mut young = Renewal {
            age: Duration::from_secs(3600),
            ..Renewal::default()
        };
        for _ in 0..3 {
            assert_eq!(young.pass(&e, 1).unwrap(), 0);
        }
        assert_eq!(e.last_seq(Kind::Vote.timeline(0)), 1);
        let window = e.config().keyspace(RAFT_STATE).segment_window;
        assert_eq!(Renewal::for_engine(&e).age, window / 2);
        let mut old = Renewal::default();
        old.pass(&e, 1).unwrap();
        assert_eq!(old.pass(&e, 1).unwrap(), 1);
    }

    /// A data directory of an earlier build: the records are read from
    /// `raft-meta` until one is written here; the old ones stay.
    #[test]
    fn records_of_an_earlier_build_are_read_from_raft_meta() {
        let dir = tempfile::tempdir().unwrap();
        let e = small_segments(dir.path());
        e.append(TimelineId::new(RAFT_META, 4 * 5), b"old vote")
            .unwrap();
        e.append(TimelineId::new(RAFT_META, 4 * 5 + 2), b"old applied")
            .unwrap();
        assert_eq!(last_bytes(&e, Kind::Vote, 5), b"old vote");
        assert_eq!(last_bytes(&e, Kind::Applied, 5), b"old applied");
        assert!(last(&e, Kind::Vote, 4).unwrap().is_none());
        write(&e, Kind::Vote, 5, b"new vote").unwrap();
        assert_eq!(last_bytes(&e, Kind::Vote, 5), b"new vote");
        assert_eq!(last_bytes(&e, Kind::Applied, 5), b"old applied");
        assert_eq!(Renewal::default().pass(&e, 8).unwrap(), 0);
    }
}
