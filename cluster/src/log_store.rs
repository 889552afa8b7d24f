//! openraft's log storage on the engine: every partition's Raft log in one
//! engine, one timeline per partition.
//!
//! The engine's timelines are append-only, and a Raft log is not: a new
//! leader may truncate a follower's unconfirmed suffix, and applied entries
//! are purged. So the log timeline of partition `p` (keyspace
//! [`RAFT_LOG`], id `p`) holds three kinds of record, and the log is what
//! replaying them in order gives:
//!
//! | record | bytes | replay |
//! |---|---|---|
//! | entry | `B` + the entry (bincode; `E` + JSON, the first format, is still read) | drop every entry at or after its index, then add it |
//! | truncate | `T` + index (u64 LE) | drop every entry at or after the index |
//! | purge | `P` + the log id (JSON) | drop every entry up to it; the last purged id becomes the newer of it and the one before (a renewed record may come after a newer one) |
//! | retire | `R` | forget the whole log (the node gave the replica up); everything up to here is released |
//!
//! An entry's index is always the next one after a truncation (openraft
//! appends contiguously), so "drop at or after, then add" is what the
//! leader's overwrite means. A truncation is written with
//! `Durability::Sync` before `truncate` returns: replaying a truncated
//! suffix back after a crash would let this node vote with a log it does
//! not have. Purges are group-committed before what they purge is
//! released (below).
//!
//! The vote is the last record of timeline `2p` of [`RAFT_STATE`] (module
//! [`crate::raft_state`]: the copies before it are released; an earlier
//! build's, in timeline `4p` of [`RAFT_META`], is read if there is none);
//! `4p + 1` of `RAFT_META` held the committed log id in the first build,
//! and is still read (the committed id is now kept in memory only, see
//! `save_committed`). The vote is written with `Durability::Sync`, so it
//! is on disk when `save_vote` returns, as Raft requires.
//!
//! Appends are group-committed: [`append`](RaftLogStorage::append) hands the
//! entries to `Engine::append_async` (readable at once) and the ticket to
//! the node's [`Flusher`], which tells openraft the entries are flushed
//! when the fdatasync covering them returned: a thread per engine shard
//! (a lane), not per partition; the partitions whose logs share a shard
//! share each of its fdatasyncs.
//!
//! **Reclaiming purged records.** A purge tells the engine the log
//! timeline's records through the purged entry's are no longer needed
//! (`Engine::release`): the engine's maintenance drops the oldest sealed
//! segments of the raft-log keyspace once every record in them is
//! released, as it drops expired segments. Replay starts at the first
//! record kept (everything before it was purged, and the purge record
//! itself comes after what it releases, so it is always kept) and tells
//! the engine again what is released (the engine keeps it in memory
//! only). A purge record is written with group commit before anything is
//! released: a purge lost in a crash with the entries it purged already
//! dropped would leave a log that starts after a hole.

// openraft's traits return its `StorageError` (224 bytes); the helpers
// return the same type so that `?` carries it unchanged.
#![allow(clippy::result_large_err)]

use crate::{raft_state, NodeId, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogId, RaftLogReader, StorageError, StorageIOError, Vote};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::{
    AppendTicket, Direction, Durability, Engine, Keyspace, KeyspaceConfig, SeqId, TimelineId,
};

/// The keyspace of the Raft logs: timeline `p` is partition `p`'s log.
pub const RAFT_LOG: Keyspace = Keyspace(2);
/// The keyspace of partition `p`'s timeline list (`4p + 3`), the floors
/// and close marks of its timelines (modules `state_machine`, `outbox`),
/// all kept for good; `4p`, `4p + 1` and `4p + 2` held the vote, the
/// committed id and the applied state in earlier builds, and are still
/// read where [`RAFT_STATE`] has nothing.
pub const RAFT_META: Keyspace = Keyspace(3);
/// The keyspace of the read-fan-out groups each user belongs to: timeline
/// `user`, one record per group (written by the user's partition; module
/// [`crate::groups`]).
pub const IM_GROUPS: Keyspace = Keyspace(4);
/// The keyspace of each conversation's recalls: timeline `conv`, one
/// record per recalled message (its seq; written by the conversation's
/// partition: module [`crate::marks`]).
pub const IM_RECALLS: Keyspace = Keyspace(5);
/// The keyspace of each user's read markers: timeline `user`, one record
/// `conv u64 | seq u64` per move of a marker (written by the user's
/// partition: module [`crate::marks`]).
pub const IM_READS: Keyspace = Keyspace(6);
/// The keyspace of the conversations each user is in: timeline `user`,
/// one record `conv u64 | kind u8` per conversation, in the order joined
/// (written by the user's partition with the `Created` delivery: module
/// [`crate::conversations`]).
pub const IM_CONVS: Keyspace = Keyspace(7);
/// The keyspace of the conversations that exist: timeline `conv`, one
/// record (its kind) written with its `Created` event by its partition,
/// so that a node tells a conversation's store timeline from a raw one
/// with an index lookup ([`crate::im::read::is_conversation`]).
pub const IM_CREATED: Keyspace = Keyspace(8);
/// The keyspace of each conversation's membership changes: timeline
/// `conv`, one record `op u8 | user u64 | at u64` per `ADD_MEMBER` or
/// `REMOVE_MEMBER` (written by the conversation's partition with the
/// event at conv seq `at`: module [`crate::members`]).
pub const IM_MEMBERS: Keyspace = Keyspace(9);
/// The keyspace of each user's deletes-for-me: timeline `user`, one
/// record `conv u64 | seq u64` per `DELETE_FOR_USER` (written by the
/// user's partition with its `DeletedMarker`; `HISTORY` reads it: module
/// [`crate::marks`]). Kept when the sync TTL drops the marker.
pub const IM_DELETES: Keyspace = Keyspace(10);
/// The keyspace of the messages recalled in each user's sync timeline:
/// timeline `user`, one record `conv u64 | seq u64` per `Recall` delivered
/// to the user (written by the user's partition with the `Recall`'s sync
/// entry), so that `SYNC` shows them `Recalled` as a single node does (the
/// conversation's own list is in the conversation's partition).
pub const IM_RECALLED: Keyspace = Keyspace(11);
/// The keyspace of each conversation partition's outbox (timeline
/// [`crate::im::OUTBOX_BASE`] + p: one record per message to deliver) and
/// done mark ([`crate::im::DONE_BASE`] + p), apart from everything kept
/// for good: delivered records and old marks are released, and the
/// engine drops segments that hold nothing else (module
/// [`crate::outbox`]).
pub const IM_OUTBOX: Keyspace = Keyspace(12);
/// The keyspace of partition `p`'s vote (timeline `2p`) and applied state
/// (`2p + 1`): only the last record of each counts, and the copies before
/// it are released (module [`crate::raft_state`]).
pub const RAFT_STATE: Keyspace = Keyspace(13);

/// Whether `keyspace` is one of the cluster's own (no client writes it).
pub fn is_own(keyspace: u8) -> bool {
    [
        RAFT_LOG.0,
        RAFT_META.0,
        IM_GROUPS.0,
        IM_RECALLS.0,
        IM_READS.0,
        IM_CONVS.0,
        IM_CREATED.0,
        IM_MEMBERS.0,
        IM_DELETES.0,
        IM_RECALLED.0,
        IM_OUTBOX.0,
        RAFT_STATE.0,
    ]
    .contains(&keyspace)
}

/// Records replayed per engine scan on open.
const REPLAY_PAGE: usize = 4096;

/// The keyspaces a node's engine needs besides its data keyspaces: kept
/// forever, in log order (no regroup: the log is read in order). The Raft
/// logs, the outboxes and the votes and applied states lose what their
/// owners release.
pub fn keyspaces() -> [KeyspaceConfig; 12] {
    let keep = |id, name| KeyspaceConfig {
        regroup: false,
        segment_window: Duration::from_secs(3600),
        ..KeyspaceConfig::keep_all(id, name)
    };
    [
        keep(RAFT_LOG, "raft-log"),
        keep(RAFT_META, "raft-meta"),
        keep(IM_GROUPS, "im-groups"),
        keep(IM_RECALLS, "im-recalls"),
        keep(IM_READS, "im-reads"),
        keep(IM_CONVS, "im-convs"),
        keep(IM_CREATED, "im-created"),
        keep(IM_MEMBERS, "im-members"),
        keep(IM_DELETES, "im-deletes"),
        keep(IM_RECALLED, "im-recalled"),
        // Released within seconds of being written: sealed every ten
        // minutes, so that delivered records go soon after.
        KeyspaceConfig {
            segment_window: Duration::from_secs(600),
            ..keep(IM_OUTBOX, "im-outbox")
        },
        // Renewed once a reclaim period: sealed every ten minutes too.
        KeyspaceConfig {
            segment_window: Duration::from_secs(600),
            ..keep(RAFT_STATE, "raft-state")
        },
    ]
}

type Error = StorageError<NodeId>;

fn write_err(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::write_logs(&e).into()
}

fn read_err(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::read_logs(&e).into()
}

/// A record that cannot be what this module wrote.
#[derive(Debug, thiserror::Error)]
#[error("partition {partition}: record {seq} of its {what} timeline is damaged: {why}")]
struct Damaged {
    partition: u64,
    seq: SeqId,
    what: &'static str,
    why: String,
}

/// Tells openraft that appends are flushed, once the engine's group commit
/// covering them returned: a thread per lane, each waiting its tickets in
/// order. A partition's appends always take the lane of its log's engine
/// shard, so they are acknowledged in order, and the shards' fdatasyncs
/// run side by side instead of one after another (an IM message touches
/// several partitions at once: with one lane their syncs queued up).
/// An append waiting for its fdatasync, and whom to tell.
type Flush = (AppendTicket, LogFlushed<TypeConfig>);

struct Lane {
    tx: Option<mpsc::Sender<Flush>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct Flusher {
    lanes: Mutex<Vec<Lane>>,
    count: usize,
}

impl Flusher {
    /// One lane (every partition's appends in one queue).
    pub fn start() -> std::io::Result<Arc<Flusher>> {
        Flusher::with_lanes(1)
    }

    /// `lanes` threads (at least one): a node gives its engine's shard
    /// count, so that each shard's syncs have a lane of their own.
    pub fn with_lanes(lanes: usize) -> std::io::Result<Arc<Flusher>> {
        let count = lanes.max(1);
        let mut v = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, rx) = mpsc::channel::<Flush>();
            let thread = std::thread::Builder::new()
                .name(format!("raft-flusher-{i}"))
                .spawn(move || {
                    for (ticket, callback) in rx {
                        let t0 = std::time::Instant::now();
                        let r = ticket.wait().map(|_| ()).map_err(std::io::Error::other);
                        tracing::trace!(
                            lane = i,
                            us = t0.elapsed().as_micros() as u64,
                            "log flushed"
                        );
                        callback.log_io_completed(r);
                    }
                })?;
            v.push(Lane {
                tx: Some(tx),
                thread: Some(thread),
            });
        }
        Ok(Arc::new(Flusher {
            lanes: Mutex::new(v),
            count,
        }))
    }

    fn submit(
        &self,
        lane: usize,
        t: AppendTicket,
        cb: LogFlushed<TypeConfig>,
    ) -> Result<(), Error> {
        let stopped = || write_err(std::io::Error::other("the flusher stopped"));
        let lanes = self.lanes.lock();
        let tx = lanes
            .get(lane % self.count)
            .and_then(|l| l.tx.as_ref())
            .ok_or_else(stopped)?;
        tx.send((t, cb)).map_err(|_| stopped())
    }

    /// Stop after the appends already submitted are flushed.
    pub fn stop(&self) {
        let threads: Vec<_> = {
            let mut lanes = self.lanes.lock();
            lanes
                .iter_mut()
                .filter_map(|l| {
                    l.tx.take();
                    l.thread.take()
                })
                .collect()
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A partition's log as replay leaves it.
#[derive(Debug, Default)]
struct State {
    /// Raft index → (the entry's seq in the log timeline, its log id).
    entries: BTreeMap<u64, (SeqId, LogId<NodeId>)>,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// The log timeline's records through this seq are purged (released
    /// to the engine).
    released: SeqId,
    /// The log ends with a retire record: this node gave the replica up.
    retired: bool,
    /// The seq of the last purge record (0: none).
    purge_seq: SeqId,
}

impl State {
    /// Purge through `id`: what `P` does, live and in replay. Never
    /// backward: a purge record written again ([`LogStore::renew_purge`])
    /// may land after a newer one.
    fn purge(&mut self, id: LogId<NodeId>) {
        if let Some((_, (seq, _))) = self.entries.range(..=id.index).next_back() {
            self.released = self.released.max(*seq);
        }
        self.entries = self.entries.split_off(&(id.index + 1));
        self.last_purged = self.last_purged.max(Some(id));
    }
}

/// One partition's Raft log on a shared engine. Cloning gives another
/// handle on the same log (openraft's log reader).
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    flusher: Arc<Flusher>,
    partition: u64,
    state: Arc<Mutex<State>>,
    /// Held by [`LogStore::renew_purge`] while it writes, and by
    /// [`LogStore::close`]: `true` once the group gave the log up (nothing
    /// more is renewed through any handle). Apart from `state`, so that a
    /// renewal's group commit never holds up the group's own log calls.
    closed: Arc<Mutex<bool>>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogStore(partition {})", self.partition)
    }
}

impl LogStore {
    /// A handle that is dead once every handle on this log is dropped
    /// (its group gone: module `revive`).
    pub(crate) fn alive(&self) -> std::sync::Weak<dyn std::any::Any + Send + Sync> {
        let w: std::sync::Weak<Mutex<State>> = Arc::downgrade(&self.state);
        w
    }

    /// Open partition `partition`'s log, replaying its records.
    pub fn open(
        engine: Arc<Engine>,
        flusher: Arc<Flusher>,
        partition: u64,
    ) -> Result<LogStore, Error> {
        let mut st = State::default();
        let log = TimelineId::new(RAFT_LOG, partition);
        // From the first record kept: the engine may have dropped purged
        // ones.
        let mut from = engine.first_retained_seq(log).map_err(read_err)?;
        loop {
            let page = engine
                .scan(log, from, REPLAY_PAGE, Direction::Forward)
                .map_err(read_err)?;
            for r in &page {
                replay(&mut st, partition, r.seq, &r.payload)?;
            }
            match page.last() {
                Some(r) if page.len() == REPLAY_PAGE => from = r.seq + 1,
                _ => break,
            }
        }
        st.vote =
            match raft_state::last(&engine, raft_state::Kind::Vote, partition).map_err(read_err)? {
                Some(r) => Some(serde_json::from_slice(&r.payload).map_err(|e| {
                    read_err(Damaged {
                        partition,
                        seq: r.seq,
                        what: "vote",
                        why: e.to_string(),
                    })
                })?),
                None => None,
            };
        st.committed = last_json(
            &engine,
            TimelineId::new(RAFT_META, 4 * partition + 1),
            partition,
            "committed",
        )?;
        if st.retired {
            // A committed id an earlier build left on disk may be past
            // what was applied; with the log gone it cannot be re-applied.
            st.committed = None;
        }
        engine.release(log, st.released);
        Ok(LogStore {
            engine,
            flusher,
            partition,
            state: Arc::new(Mutex::new(st)),
            closed: Arc::new(Mutex::new(false)),
        })
    }

    fn log(&self) -> TimelineId {
        TimelineId::new(RAFT_LOG, self.partition)
    }

    /// Whether this node had given the replica up (its log ends with the
    /// retire record, nothing after it): a group opened on it again must
    /// start as a new replica would.
    pub fn was_retired(&self) -> bool {
        self.state.lock().retired
    }

    /// Append entries to the log timeline (readable at once; durable when the
    /// ticket says so) and to the replayed state.
    fn write_entries(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<AppendTicket, Error> {
        let mut ids = Vec::new();
        let mut recs = Vec::new();
        for e in entries {
            let rec = encode_entry(&e).map_err(write_err)?;
            ids.push(*e.get_log_id());
            recs.push(rec);
        }
        let log = self.log();
        let items: Vec<(TimelineId, &[u8])> = recs.iter().map(|r| (log, r.as_slice())).collect();
        let ticket = self.engine.append_async(&items).map_err(write_err)?;
        let mut st = self.state.lock();
        for (id, &seq) in ids.iter().zip(ticket.seqs()) {
            st.entries.split_off(&id.index);
            st.entries.insert(id.index, (seq, *id));
        }
        Ok(ticket)
    }

    /// Append a marker record (`T` / `P`) with durability `d`; its seq.
    fn marker(&self, tag: u8, body: &[u8], d: Durability) -> Result<SeqId, Error> {
        let mut rec = Vec::with_capacity(1 + body.len());
        rec.push(tag);
        rec.extend_from_slice(body);
        self.engine
            .append_with(self.log(), &rec, d)
            .map_err(write_err)
    }

    /// A log whose every entry is purged (its partition idle) is just its
    /// last purge record, and that record pins the log segment it sits in,
    /// and with it every later one of the shard (the engine drops only a
    /// prefix of segments): an idle partition would keep the whole shard's
    /// log on disk. So the node's log reclaim calls this for each idle
    /// group once a period: the purge record is written again at the
    /// log's end, durably, and the old one released. `false` if the log
    /// holds entries (its next purge moves it on), no purge yet, or the
    /// log was given up.
    pub fn renew_purge(&self) -> std::io::Result<bool> {
        // Held while writing, so that a retire record (written after
        // [`LogStore::close`]) never comes before a renewed purge record.
        let closed = self.closed.lock();
        if *closed {
            return Ok(false);
        }
        let (id, old) = {
            let st = self.state.lock();
            match st.last_purged {
                Some(id) if st.entries.is_empty() => (id, st.purge_seq),
                _ => return Ok(false),
            }
        };
        // An entry the group appends meanwhile lands after `old`, so it is
        // not released; a purge it makes meanwhile is newer than `id`, and
        // a purge never moves back (`State::purge`).
        let mut rec = vec![b'P'];
        serde_json::to_writer(&mut rec, &id)?;
        let seq = self
            .engine
            .append_with(self.log(), &rec, Durability::GroupCommit)
            .map_err(std::io::Error::other)?;
        let released = {
            let mut st = self.state.lock();
            st.released = st.released.max(old);
            st.purge_seq = st.purge_seq.max(seq);
            st.released
        };
        self.engine.release(self.log(), released);
        Ok(true)
    }

    /// The group is shut down and its log about to be retired or kept:
    /// [`LogStore::renew_purge`] writes nothing more through this handle.
    pub fn close(&self) {
        *self.closed.lock() = true;
    }
}

/// Partition `partition`'s replica was given up and its group shut down
/// (this node is no longer a voter): forget its log (a retire record) and
/// release all of it, so that its records stop pinning the log's oldest
/// segments. If the replica comes back, its group starts from an empty log
/// and the leader fills it (its applied data skip by write id).
pub fn retire(engine: &Engine, partition: u64) -> std::io::Result<()> {
    let tl = TimelineId::new(RAFT_LOG, partition);
    if engine.last_seq(tl) == 0 {
        return Ok(());
    }
    let seq = engine
        .append_with(tl, b"R", Durability::GroupCommit)
        .map_err(std::io::Error::other)?;
    engine.release(tl, seq);
    Ok(())
}

/// At start-up, for a partition this node runs no group of: if its log
/// ends with a retire record, release all of it again (release points are
/// kept in memory only). Whether a log that is not retired is left: one
/// this node keeps until the group no longer counts it
/// ([`crate::reconcile`]).
pub fn release_if_retired(engine: &Engine, partition: u64) -> std::io::Result<bool> {
    let tl = TimelineId::new(RAFT_LOG, partition);
    let last = engine
        .scan(tl, u64::MAX, 1, Direction::Backward)
        .map_err(std::io::Error::other)?;
    match last.first() {
        Some(r) if r.payload.as_slice() == b"R" => {
            engine.release(tl, r.seq);
            Ok(false)
        }
        Some(_) => Ok(true),
        None => Ok(false),
    }
}

/// An entry record: `B` + the entry in bincode.
fn encode_entry(e: &Entry<TypeConfig>) -> Result<Vec<u8>, bincode::Error> {
    let mut rec = Vec::with_capacity(64);
    rec.push(b'B');
    bincode::serialize_into(&mut rec, e)?;
    Ok(rec)
}

/// An entry record back: `B` + bincode, or `E` + JSON (the first format).
fn decode_entry(rec: &[u8]) -> Result<Entry<TypeConfig>, String> {
    match rec.split_first() {
        Some((b'B', body)) => bincode::deserialize(body).map_err(|e| e.to_string()),
        Some((b'E', body)) => serde_json::from_slice(body).map_err(|e| e.to_string()),
        _ => Err("not an entry record".into()),
    }
}

/// Apply one log-timeline record to the replayed state.
fn replay(st: &mut State, partition: u64, seq: SeqId, rec: &[u8]) -> Result<(), Error> {
    let damaged = |why: String| {
        read_err(Damaged {
            partition,
            seq,
            what: "log",
            why,
        })
    };
    let (tag, body) = rec.split_first().ok_or_else(|| damaged("empty".into()))?;
    st.retired = false;
    match tag {
        b'E' | b'B' => {
            let e = decode_entry(rec).map_err(damaged)?;
            let id = *e.get_log_id();
            st.entries.split_off(&id.index);
            st.entries.insert(id.index, (seq, id));
        }
        b'T' => {
            let at = u64::from_le_bytes(
                body.try_into()
                    .map_err(|_| damaged("a truncate of the wrong size".into()))?,
            );
            st.entries.split_off(&at);
        }
        b'P' => {
            let id: LogId<NodeId> =
                serde_json::from_slice(body).map_err(|e| damaged(e.to_string()))?;
            st.purge(id);
            st.purge_seq = seq;
        }
        b'R' if body.is_empty() => {
            // The replica was retired: its log is forgotten, all of it
            // released (it replays the same whether or not the records up
            // to here are still there).
            st.entries.clear();
            st.last_purged = None;
            st.released = seq;
            st.retired = true;
        }
        t => return Err(damaged(format!("unknown record kind {t}"))),
    }
    Ok(())
}

/// The last record of a meta timeline, decoded.
fn last_json<T: serde::de::DeserializeOwned>(
    engine: &Engine,
    tl: TimelineId,
    partition: u64,
    what: &'static str,
) -> Result<Option<T>, Error> {
    let page = engine
        .scan(tl, u64::MAX, 1, Direction::Backward)
        .map_err(read_err)?;
    let Some(r) = page.first() else {
        return Ok(None);
    };
    serde_json::from_slice(&r.payload).map(Some).map_err(|e| {
        read_err(Damaged {
            partition,
            seq: r.seq,
            what,
            why: e.to_string(),
        })
    })
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let seqs: Vec<(u64, SeqId)> = {
            let st = self.state.lock();
            let r = (
                clone_bound(range.start_bound()),
                clone_bound(range.end_bound()),
            );
            st.entries.range(r).map(|(&i, &(s, _))| (i, s)).collect()
        };
        let mut out = Vec::with_capacity(seqs.len());
        for (index, seq) in seqs {
            let r = self
                .engine
                .get(self.log(), seq)
                .map_err(read_err)?
                .ok_or_else(|| {
                    read_err(Damaged {
                        partition: self.partition,
                        seq,
                        what: "log",
                        why: format!("entry {index} is gone"),
                    })
                })?;
            let e = decode_entry(&r.payload).map_err(|why| {
                read_err(Damaged {
                    partition: self.partition,
                    seq,
                    what: "log",
                    why,
                })
            })?;
            out.push(e);
        }
        Ok(out)
    }
}

fn clone_bound(b: Bound<&u64>) -> Bound<u64> {
    match b {
        Bound::Included(&x) => Bound::Included(x),
        Bound::Excluded(&x) => Bound::Excluded(x),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        let st = self.state.lock();
        let last = st
            .entries
            .values()
            .next_back()
            .map(|&(_, id)| id)
            .or(st.last_purged);
        Ok(LogState {
            last_purged_log_id: st.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), Error> {
        let bytes = serde_json::to_vec(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        raft_state::write(&self.engine, raft_state::Kind::Vote, self.partition, &bytes)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.state.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, Error> {
        Ok(self.state.lock().vote)
    }

    /// Kept in memory only. openraft calls this on every commit, from the
    /// group's task: a durable write here would hold a runtime thread for
    /// an fdatasync per commit (it did: that capped a node at ~1.5k
    /// writes/s). Persisting it is optional in openraft; without it a
    /// restarted replica applies its log once the leader tells it what is
    /// committed. A committed id left on disk by an earlier build is still
    /// read: it is never ahead of what was committed.
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), Error> {
        self.state.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, Error> {
        Ok(self.state.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let ticket = self.write_entries(entries)?;
        let lane = self.engine.shard_index(self.log());
        self.flusher.submit(lane, ticket, callback)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        self.marker(b'T', &log_id.index.to_le_bytes(), Durability::Sync)?;
        self.state.lock().entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), Error> {
        let body = serde_json::to_vec(&log_id).map_err(write_err)?;
        // Durable before the purged records are released (module docs);
        // purges are rare (one per snapshot), so the wait costs little.
        let seq = self.marker(b'P', &body, Durability::GroupCommit)?;
        let released = {
            let mut st = self.state.lock();
            st.purge(log_id);
            st.purge_seq = st.purge_seq.max(seq);
            st.released
        };
        self.engine.release(self.log(), released);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use openraft::testing::{blank_ent, log_id};
    use openraft::CommittedLeaderId;

    use crate::testkit::{block, engine, small_segments};

    fn terms(ls: &mut LogStore) -> Vec<(u64, u64)> {
        block(ls.try_get_log_entries(..))
            .unwrap()
            .iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect()
    }

    #[test]
    fn truncations_purges_and_the_vote_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let flusher = Flusher::start().unwrap();
        let vote = Vote::new_committed(2, 9);
        let want = {
            let e = engine(dir.path());
            let mut ls = LogStore::open(e.clone(), flusher.clone(), 3).unwrap();
            // Another partition on the same engine must not be disturbed.
            let other = LogStore::open(e.clone(), flusher.clone(), 4).unwrap();
            other
                .write_entries((1..=3).map(|i| blank_ent::<TypeConfig>(5, 1, i)))
                .unwrap()
                .wait()
                .unwrap();
            ls.write_entries((1..=10).map(|i| blank_ent::<TypeConfig>(1, 1, i)))
                .unwrap()
                .wait()
                .unwrap();
            block(ls.truncate(log_id(1, 1, 6))).unwrap();
            ls.write_entries((6..=8).map(|i| blank_ent::<TypeConfig>(2, 9, i)))
                .unwrap()
                .wait()
                .unwrap();
            block(ls.purge(log_id(1, 1, 3))).unwrap();
            block(ls.save_vote(&vote)).unwrap();
            block(ls.save_committed(Some(log_id(2, 9, 7)))).unwrap();
            let want = terms(&mut ls);
            assert_eq!(want, vec![(4, 1), (5, 1), (6, 2), (7, 2), (8, 2)]);
            drop((ls, other));
            Arc::try_unwrap(e).ok().unwrap().close().unwrap();
            want
        };
        let e = engine(dir.path());
        let mut ls = LogStore::open(e.clone(), flusher.clone(), 3).unwrap();
        assert_eq!(terms(&mut ls), want);
        let st = block(ls.get_log_state()).unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1, 3)));
        assert_eq!(
            st.last_log_id,
            Some(LogId::new(CommittedLeaderId::new(2, 9), 8))
        );
        assert_eq!(block(ls.read_vote()).unwrap(), Some(vote));
        // The committed id is not persisted (see `save_committed`).
        assert_eq!(block(ls.read_committed()).unwrap(), None);
        let mut other = LogStore::open(e, flusher, 4).unwrap();
        assert_eq!(terms(&mut other), vec![(1, 5), (2, 5), (3, 5)]);
    }

    /// An idle partition's last purge record pins every later segment of
    /// its shard until it is renewed; the renewed log reopens the same.
    #[test]
    fn an_idle_partitions_purge_record_is_renewed_so_it_pins_no_segment() {
        let dir = tempfile::tempdir().unwrap();
        let open = || small_segments(dir.path());
        let dropped = |e: &Engine| e.stats().total().dropped_segments;
        let flusher = Flusher::start().unwrap();
        let e = open();
        let idle = LogStore::open(e.clone(), flusher.clone(), 1).unwrap();
        let mut busy = LogStore::open(e.clone(), flusher.clone(), 2).unwrap();
        let write = |l: &LogStore, from: u64, to: u64| {
            l.write_entries((from..=to).map(|i| blank_ent::<TypeConfig>(1, 1, i)))
                .unwrap()
                .wait()
                .unwrap();
        };
        // Partition 1 writes a little and purges all of it; only its purge
        // record is left, in the first segment.
        write(&idle, 1, 10);
        let mut idle2 = idle.clone();
        block(idle2.purge(log_id(1, 1, 10))).unwrap();
        assert!(idle.renew_purge().unwrap());
        let first = TimelineId::new(RAFT_LOG, 1);
        let pinned_at = e.first_retained_seq(first).unwrap();
        // Partition 2 goes on, purging as it goes.
        let mut next = 1;
        let mut busy_round = |n: u64| {
            write(&busy, next, next + n - 1);
            next += n;
            block(busy.purge(log_id(1, 1, next - 1))).unwrap();
            e.seal_active().unwrap();
            e.maintain().unwrap();
        };
        busy_round(2000);
        // Without a renewal since, partition 1's record pins the prefix.
        let before = dropped(&e);
        busy_round(2000);
        assert_eq!(
            dropped(&e),
            before,
            "the idle log's record pins every later segment"
        );
        // Renewed: the old record is released, the new one is at the end.
        assert!(idle.renew_purge().unwrap());
        busy_round(10);
        assert!(dropped(&e) > before, "nothing reclaimed after the renewal");
        assert!(e.first_retained_seq(first).unwrap() > pinned_at);
        // It reopens as it was: no entries, purged through 10.
        let mut reopened = LogStore::open(e.clone(), flusher.clone(), 1).unwrap();
        let st = block(reopened.get_log_state()).unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1, 10)));
        assert_eq!(st.last_log_id, Some(log_id(1, 1, 10)));
        // A log with entries, or closed, is left alone.
        write(&idle, 11, 12);
        assert!(!idle.renew_purge().unwrap());
        idle.close();
        block(idle2.purge(log_id(1, 1, 12))).unwrap();
        assert!(!idle.renew_purge().unwrap());
    }

    /// Purged entries free the log's oldest segments once every partition
    /// sharing them purged past them; a reopened log replays from what is
    /// kept, with the same entries and purge point, and releases again.
    #[test]
    fn purged_entries_free_segments_and_the_log_reopens_from_what_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let open = || small_segments(dir.path());
        let dropped = |e: &Engine| e.stats().total().dropped_segments;
        let flusher = Flusher::start().unwrap();
        let e = open();
        let mut ls = LogStore::open(e.clone(), flusher.clone(), 1).unwrap();
        let mut other = LogStore::open(e.clone(), flusher.clone(), 2).unwrap();
        // Both partitions' logs interleave in the same segments.
        for i in 1..=3000 {
            for l in [&ls, &other] {
                l.write_entries([blank_ent::<TypeConfig>(1, 1, i)])
                    .unwrap()
                    .wait()
                    .unwrap();
            }
        }
        block(ls.purge(log_id(1, 1, 2500))).unwrap();
        e.maintain().unwrap();
        assert_eq!(dropped(&e), 0, "partition 2's entries pin the segments");
        block(other.purge(log_id(1, 1, 2000))).unwrap();
        e.maintain().unwrap();
        let n = dropped(&e);
        assert!(n > 0, "nothing reclaimed");
        let log = TimelineId::new(RAFT_LOG, 1);
        assert!(e.first_retained_seq(log).unwrap() > 1);
        let want = terms(&mut ls);
        assert_eq!(want.len(), 500);
        assert_eq!(want[0], (2501, 1));
        drop((ls, other));
        Arc::try_unwrap(e).ok().unwrap().close().unwrap();
        let e = open();
        let mut ls = LogStore::open(e.clone(), flusher.clone(), 1).unwrap();
        let mut other = LogStore::open(e.clone(), flusher.clone(), 2).unwrap();
        assert_eq!(terms(&mut ls), want);
        assert_eq!(terms(&mut other).len(), 1000);
        let st = block(ls.get_log_state()).unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1, 2500)));
        assert_eq!(st.last_log_id, Some(log_id(1, 1, 3000)));
        // Released again by the reopen: more purges free more.
        block(other.purge(log_id(1, 1, 2900))).unwrap();
        block(ls.purge(log_id(1, 1, 2990))).unwrap();
        e.seal_active().unwrap();
        e.maintain().unwrap();
        assert!(dropped(&e) > 0, "nothing reclaimed after the reopen");
        assert_eq!(terms(&mut ls).len(), 10);
        // Partition 2's replica given up: its log is forgotten and released
        // (and released again after a restart, where it is not opened).
        drop(other);
        retire(&e, 2).unwrap();
        let mut other = LogStore::open(e.clone(), flusher.clone(), 2).unwrap();
        assert!(terms(&mut other).is_empty());
        let st = block(other.get_log_state()).unwrap();
        assert_eq!((st.last_purged_log_id, st.last_log_id), (None, None));
        drop((ls, other));
        Arc::try_unwrap(e).ok().unwrap().close().unwrap();
        let e = open();
        release_if_retired(&e, 2).unwrap();
        let mut ls = LogStore::open(e.clone(), flusher.clone(), 1).unwrap();
        // Partition 1 moves on past its old purge records.
        ls.write_entries((3001..=3100).map(|i| blank_ent::<TypeConfig>(1, 1, i)))
            .unwrap()
            .wait()
            .unwrap();
        block(ls.purge(log_id(1, 1, 3100))).unwrap();
        e.seal_active().unwrap();
        e.maintain().unwrap();
        assert!(dropped(&e) > 0, "the retired log still pins its segments");
        let log2 = TimelineId::new(RAFT_LOG, 2);
        // At most the retire record is left (its segment also holds
        // partition 1's latest purge).
        assert!(e.first_retained_seq(log2).unwrap() >= e.last_seq(log2));
        assert_eq!(
            terms(&mut LogStore::open(e.clone(), flusher, 2).unwrap()),
            vec![]
        );
    }

    #[test]
    fn a_damaged_record_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        e.append_with(TimelineId::new(RAFT_LOG, 1), b"Enot json", Durability::Sync)
            .unwrap();
        e.append_with(TimelineId::new(RAFT_LOG, 2), b"T123", Durability::Sync)
            .unwrap();
        let f = Flusher::start().unwrap();
        for p in [1, 2] {
            let err = LogStore::open(e.clone(), f.clone(), p)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("partition {p}")) && err.contains("damaged"),
                "{err}"
            );
        }
    }
}
