//! A conversation partition's outbox and done mark on one replica, and
//! what of them the replica lets go (docs/scaling.md, "The outbox is
//! released").
//!
//! Both live in [`IM_OUTBOX`], a keyspace of their own: the outbox
//! (timeline [`OUTBOX_BASE`] + p) holds one record per message still to
//! deliver or delivered, in write-id order; the done mark (timeline
//! [`DONE_BASE`] + p) one record `upto u64 | wid u64` per move: the
//! outbox is delivered through the record with write id `wid`, which is
//! at seq `upto` of *this replica's* outbox.
//!
//! - **Write ids rule, seqs are local.** A replica restored from a
//!   snapshot takes the leader's undelivered outbox records and its mark
//!   by write id, at its own next seqs (the leader's delivered records are
//!   not shipped, and the engine cannot leave a hole in a timeline), so
//!   its outbox seqs may differ from the leader's. A `Delivered` entry
//!   names the leader's seq and the write id; each replica finds its own
//!   seq of that write id ([`seq_through`]).
//! - **Released.** The outbox through the done mark, and every done
//!   record but the last, are released ([`Engine::release`]): the engine
//!   drops the keyspace's oldest sealed segments once everything in them
//!   is released. An idle partition's last done record would pin its
//!   segment (and every later one of the shard) for ever, so it is
//!   written again at the end once a reclaim period passed without a
//!   new one ([`crate::state_machine::StateMachine::renew_done`]).
//!   Release points are in memory only: a replica declares them again
//!   when its state machine opens ([`release`]).
//! - **Closed.** A replica the node gave up is no longer applied here, so
//!   nothing moves or renews its mark. Once every record of its outbox is
//!   known delivered (a replica that runs the group says its mark covers
//!   the last one: `Ask::Delivered`), the outbox is
//!   closed ([`close`]): a close mark, (the outbox's last seq, the write
//!   id delivered through), goes to `raft-meta` (kept for good, one record
//!   per close), and all of the outbox and its marks are released. The
//!   done mark is the later of the two ([`done`]). A replica taken again
//!   starts from that mark, copied back into its done timeline when it
//!   opens ([`carry_close_mark`]): every record at or below it is
//!   delivered, so entries or a snapshot re-sent to it add only later
//!   ones, and its outbox stays in write-id order.

use crate::im::read::ReadError;
use crate::im::{DONE_BASE, OUTBOX_BASE};
use crate::log_store::{IM_OUTBOX, RAFT_META};
use timeline_engine::{Direction, Durability, Engine, TimelineId};

/// Raft-meta timeline id (plus the partition) of each partition's close
/// marks.
const CLOSED_BASE: u64 = 4 << 40;

pub fn outbox_timeline(partition: u32) -> TimelineId {
    TimelineId::new(IM_OUTBOX, OUTBOX_BASE + u64::from(partition))
}

pub fn done_timeline(partition: u32) -> TimelineId {
    TimelineId::new(IM_OUTBOX, DONE_BASE + u64::from(partition))
}

fn closed_timeline(partition: u32) -> TimelineId {
    TimelineId::new(RAFT_META, CLOSED_BASE + u64::from(partition))
}

/// The last record of `tl`, as stored, if any.
fn last_record(e: &Engine, tl: TimelineId) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
    let recs = e.scan(tl, u64::MAX, 1, Direction::Backward)?;
    Ok(recs.into_iter().next().map(|r| (r.seq, r.payload)))
}

/// The done mark: (this replica's outbox seq, write id) delivered
/// through, (0, 0) if none: the done timeline's last mark or the last
/// close mark, whichever has the later write id.
pub fn done(e: &Engine, partition: u32) -> Result<(u64, u64), ReadError> {
    let damaged = |what: &str, seq: u64| ReadError::Damaged(format!("{what} {seq}"));
    let mark = match last_record(e, done_timeline(partition))? {
        None => (0, 0),
        Some((seq, r)) => r
            .get(8..)
            .and_then(crate::im::unpair)
            .ok_or_else(|| damaged("done mark", seq))?,
    };
    let closed = closed_mark(e, partition).unwrap_or((0, 0));
    // The later write id; at the same, the later seq (a close of an
    // outbox restored past its mark).
    Ok(match (closed.1, closed.0) > (mark.1, mark.0) {
        true => closed,
        false => mark,
    })
}

/// The last close mark, if any. One that does not read is taken as none
/// (and logged): the done mark may then be an older one, and a replica
/// taken again delivers again what the members' partitions skip, which
/// is better than a group that cannot apply a mark.
fn closed_mark(e: &Engine, partition: u32) -> Option<(u64, u64)> {
    match last_record(e, closed_timeline(partition)) {
        Ok(None) => None,
        Ok(Some((seq, r))) => {
            let m = crate::im::unpair(&r);
            if m.is_none() {
                tracing::warn!(partition, seq, "close mark damaged: taken as none");
            }
            m
        }
        Err(x) => {
            tracing::warn!(partition, error = %x, "close mark unreadable: taken as none");
            None
        }
    }
}

/// The write id the outbox is delivered through once its last record is
/// (0: no record): that record's, or, if it is gone (released, so
/// delivered, and dropped), the done mark's, which covers it. An error if
/// the record does not read or is gone without a mark covering it: a
/// close must never take it for nothing to deliver.
pub fn last_wid(e: &Engine, partition: u32) -> Result<u64, ReadError> {
    let tl = outbox_timeline(partition);
    let last = e.last_seq(tl);
    if last == 0 {
        return Ok(0);
    }
    match last_record(e, tl)? {
        Some((seq, r)) if seq == last => {
            u64_le(&r).ok_or_else(|| ReadError::Damaged(format!("outbox record {seq}")))
        }
        _ => match done(e, partition)? {
            (upto, wid) if upto >= last => Ok(wid),
            _ => Err(ReadError::Damaged(format!("outbox record {last} is gone"))),
        },
    }
}

/// A replica opening: make the done timeline's last record the done mark
/// (a close mark later than it is copied in), so that `renew_done` and a
/// snapshot find it there after the close released the timeline. The
/// copy's write id is the later of the timeline's last record's (0 if
/// gone) and the mark's own (every `Delivered` entry covering it came
/// after the message), so entries applied again skip as before.
pub fn carry_close_mark(e: &Engine, partition: u32) -> Result<(), ReadError> {
    let mark = done(e, partition)?;
    let tl = done_timeline(partition);
    let (w, have) = match last_record(e, tl)? {
        Some((seq, r)) if seq == e.last_seq(tl) => (
            u64_le(&r).unwrap_or(0),
            r.get(8..).and_then(crate::im::unpair),
        ),
        _ => (0, None),
    };
    // After a close the timeline's last record is released (and goes
    // with its segment) even when it is the mark: copied then too.
    if mark.1 == 0 || (have == Some(mark) && closed_mark(e, partition) != Some(mark)) {
        return Ok(());
    }
    // A write id above none of the marks' entries it stands for: a
    // snapshot's receiver takes it as new.
    let mut rec = w.max(mark.1).to_le_bytes().to_vec();
    rec.extend_from_slice(&done_record(mark.0, mark.1));
    e.append_with(tl, &rec, Durability::Buffered)?;
    Ok(())
}

/// Whether `t` (keyspace, id) is a done-mark timeline (else, in
/// [`IM_OUTBOX`], an outbox).
pub fn is_done(t: (u8, u64)) -> bool {
    t.0 == IM_OUTBOX.0 && t.1 >= DONE_BASE
}

/// The u64 at the start of `b` (of a stored record: its write id).
fn u64_le(b: &[u8]) -> Option<u64> {
    b.get(..8)?.try_into().ok().map(u64::from_le_bytes)
}

/// This replica's last outbox seq whose record's write id is at most
/// `wid` (0: none). `hint`, the seq the leader named, is tried first:
/// replicas that were never restored from a snapshot (nor closed and
/// taken again, nor moved over from `raft-meta`) have the leader's seqs. Records dropped already count as at most `wid` (only delivered
/// records are released).
pub fn seq_through(e: &Engine, partition: u32, wid: u64, hint: u64) -> Result<u64, ReadError> {
    let tl = outbox_timeline(partition);
    let at = |seq: u64| -> Result<Option<u64>, ReadError> {
        match e.get(tl, seq) {
            Ok(Some(r)) => u64_le(&r.payload)
                .map(Some)
                .ok_or_else(|| ReadError::Damaged(format!("outbox record {seq}"))),
            Ok(None) | Err(timeline_engine::Error::Truncated { .. }) => Ok(None),
            Err(x) => Err(x.into()),
        }
    };
    let last = e.last_seq(tl);
    if hint > 0 && hint <= last && at(hint)? == Some(wid) {
        return Ok(hint);
    }
    // Binary search over what is kept: the answer is in lo - 1 ..= hi.
    let (mut lo, mut hi) = (e.first_retained_seq(tl)?.max(1), last);
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match at(mid)? {
            Some(w) if w > wid => hi = mid - 1,
            _ => lo = mid + 1,
        }
    }
    Ok(lo - 1)
}

/// The done mark's record: (this replica's outbox seq, write id).
pub fn done_record(upto: u64, wid: u64) -> [u8; 16] {
    crate::im::pair(upto, wid)
}

/// A done mark's record: (outbox seq, write id).
pub fn decode_done(b: &[u8]) -> Option<(u64, u64)> {
    crate::im::unpair(b)
}

/// Declare what partition `partition`'s outbox and marks no longer need:
/// the outbox through the done mark, the marks before the last.
pub fn release(e: &Engine, partition: u32) -> Result<(), ReadError> {
    let (upto, _) = done(e, partition)?;
    e.release(outbox_timeline(partition), upto);
    let done = done_timeline(partition);
    e.release(done, e.last_seq(done).saturating_sub(1));
    Ok(())
}

/// Close partition `partition`'s outbox on this node, whose records are
/// all delivered through write id `wid` (at least the last one's) and
/// whose last seq is still `last`: a close mark (the outbox's last seq,
/// the later of `wid` and the done mark's), unless the last close mark
/// is that already, made durable (group commit: blocking), then all of
/// the outbox and its marks released. For a replica this node gave up
/// (module docs).
pub fn close(e: &Engine, partition: u32, wid: u64, last: u64) -> Result<Closed, ReadError> {
    let (ob, dn) = (outbox_timeline(partition), done_timeline(partition));
    if e.last_seq(ob) != last {
        return Ok(Closed::Grew);
    }
    let mark = done(e, partition)?;
    let close = (last, wid.max(mark.1));
    let wrote = close != (0, 0) && closed_mark(e, partition) != Some(close);
    if wrote {
        let rec = done_record(close.0, close.1);
        e.append_with(closed_timeline(partition), &rec, Durability::GroupCommit)?;
    }
    e.release(ob, last);
    e.release(dn, e.last_seq(dn));
    Ok(match wrote {
        true => Closed::Now,
        false => Closed::Before,
    })
}

/// What [`close`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// A close mark was written.
    Now,
    /// Closed before, or never held here: its releases declared again.
    Before,
    /// The outbox grew since it was asked about (its group opened here
    /// again): nothing done.
    Grew,
}

/// Whether partition `partition`'s outbox here needs no close: it never
/// had a record or a mark, or its last close mark is its done mark and
/// covers its last record (closed before; nothing was added since).
pub fn closed(e: &Engine, partition: u32) -> Result<bool, ReadError> {
    let (ob, dn) = (outbox_timeline(partition), done_timeline(partition));
    let mark = done(e, partition)?;
    let never = e.last_seq(ob) == 0 && e.last_seq(dn) == 0 && mark == (0, 0);
    Ok(never || (mark.0 == e.last_seq(ob) && closed_mark(e, partition) == Some(mark)))
}

/// The last record of done timeline `partition`, stored (write id
/// first), if it has one.
pub fn last_done(e: &Engine, partition: u32) -> Result<Option<Vec<u8>>, ReadError> {
    Ok(last_record(e, done_timeline(partition))?.map(|(_, r)| r))
}
