//! openraft's state machine on the engine: applying a partition's log
//! appends to the partition's timelines, so every replica's timelines get
//! the same records with the same SeqIds, whichever node leads.
//!
//! **Records.** Each record an applied `Append` (or item of a `Batch`)
//! writes to its timeline is its write id (u64 LE: the entry's Raft index
//! × 65,536 + the item's position in the entry) followed by the payload:
//!
//! ```text
//! | write id: u64 LE | payload ...             |
//! 0                  8                       end
//! ```
//!
//! A replica appends only committed entries, in log order, so replicas'
//! timelines are prefixes of each other and a SeqId is never reused or
//! skipped across leader changes. The index makes applying idempotent.
//! After a crash, openraft re-applies the entries after the last applied id
//! the state machine reported, and an entry whose index is not above its
//! timeline's last record's index is already there: it is skipped, not
//! written twice.
//!
//! **What is persisted, and when.**
//! - Data appends are buffered: the log already holds the entry durably.
//! - The applied state (last applied id and membership, `raft-state`
//!   timeline `2p + 1`: module [`crate::raft_state`]) is written only when
//!   a snapshot is built or installed, after `Engine::sync`. So it is never on disk ahead of the data it covers, and
//!   the log is purged only up to a snapshot whose data is on disk.
//! - A restart re-applies the entries since the last snapshot; idempotence
//!   makes that safe.
//! - The partition's timelines are listed in `raft-meta` timeline `4p + 3`,
//!   one record per timeline the first time it is written (the engine
//!   cannot list timelines).
//!
//! **Snapshots** ([`crate::snapshot`]). Building one only makes the data
//! durable and persists the applied state (openraft takes nothing but the
//! meta from a built snapshot): no copy of the data. Sending one cuts the
//! partition's timelines at their last seqs under the state lock (a
//! consistent cut, at or past the snapshot's log id) and streams each
//! timeline's retained range from the engine into an unlinked temporary
//! file, off the apply path; openraft ships it in chunks. Installing one
//! appends, to each timeline, the records past the replica's last seq,
//! each at the same SeqId (`Engine::append_at` where retention had dropped
//! the start; a "floor" where every record had expired). Entries after the
//! snapshot's log id whose records the cut already holds are skipped when
//! applied (write ids), which is what makes a cut past the log id safe.

// openraft's traits return its `StorageError` (224 bytes).
#![allow(clippy::result_large_err)]

use crate::im::{self, Delivery, ImRefusal, StoreEvent};
use crate::log_store::RAFT_META;
use crate::outbox;
use crate::raft_state;
use crate::snapshot::{self, SnapshotFile};
use crate::{Applied, Command, ImApplied, NodeId, TypeConfig};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use timeline_engine::{Direction, Durability, Engine, Keyspace, TimelineId};

type Error = StorageError<NodeId>;
type Membership = StoredMembership<NodeId, BasicNode>;

/// Records read per scan when building a snapshot or listing timelines.
const PAGE: usize = 4096;

/// A conversation write's result: `None` for entries that answer nothing
/// (or were applied before a restart).
type ImResult = Option<Result<ImApplied, ImRefusal>>;

/// A `SEND` retried with the same (sender, client_msg_id) is found among
/// this many of the conversation's newest records.
pub const DEDUP_WINDOW: usize = 256;

/// How far back a user's sync timeline is read for a conversation's last
/// delivered seq, and how many (user, conversation) marks are cached.
const HWM_SCAN: usize = 4096;
const HWM_PAGE: usize = 256;
const HWM_CACHE: usize = 1 << 20;
/// Most member ids (`Created` members and listed changes) the members
/// cache holds (about 8 MB of ids; cleared whole when full).
const MEMBERS_CACHE: usize = 1 << 20;
/// Most store records the retry-check windows hold per partition (about
/// 1.5 MB: 128 conversations' full windows; cleared whole when full).
const RECENT_CACHE: usize = 1 << 15;

fn sm_err(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::write_state_machine(&e).into()
}

fn read_err(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::read_state_machine(&e).into()
}

fn damaged(what: String) -> Error {
    read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
}

#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
struct AppliedState {
    applied: Option<LogId<NodeId>>,
    membership: Membership,
}

struct State {
    applied: AppliedState,
    /// The partition's timelines (keyspace, id).
    timelines: BTreeSet<(u8, u64)>,
    /// Each touched timeline's last record's Raft index.
    last_index: HashMap<(u8, u64), u64>,
    /// The last conv seq each (user, conversation) holds in the user's
    /// sync timeline (a cache of what the timeline says).
    hwm: HashMap<(u64, u64), u64>,
    /// Each (user, conversation)'s read marker and the write id that set
    /// it (a cache of `IM_READS`).
    reads: HashMap<(u64, u64), (u64, u64)>,
    /// Each conversation's members as read with its `im-members` list at
    /// a last seq (valid while the list has not grown: a list only grows,
    /// and every replica's holds the same records at the same seqs), and
    /// the ids they hold in all.
    members: crate::members::MembersCache,
    /// Conversations' newest store records as the retry check reads them
    /// (valid while the timeline's last seq is theirs).
    recent: crate::retries::RecentSends,
    /// The done mark's last seq when [`StateMachine::renew_done`] last
    /// looked (or renewed it).
    done_seen: u64,
    /// The last snapshot built or installed (its data is the engine's).
    current: Option<SnapshotMeta<NodeId, BasicNode>>,
    /// Timelines restored from a snapshot with every record expired: the
    /// last seq each had reached (its next record gets the one after).
    floors: HashMap<(u8, u64), u64>,
}

/// Raft-meta timeline ids (plus the partition) of each partition's floors
/// (records `keyspace u8 | id u64 | last seq u64`).
const FLOOR_BASE: u64 = 3 << 40;

/// `raft-meta` `5·2^40 + p`: one record once partition `p`'s conversations
/// are all registered in `im-created` ([`StateMachine::register_earlier_conversations`]).
const REGISTERED_BASE: u64 = 5 << 40;

fn meta_of(partition: u64, a: &AppliedState) -> SnapshotMeta<NodeId, BasicNode> {
    SnapshotMeta {
        last_log_id: a.applied,
        last_membership: a.membership.clone(),
        snapshot_id: format!("p{partition}-{}", a.applied.map_or(0, |l| l.index)),
    }
}

/// One partition's state machine on a shared engine. Clones share it (the
/// snapshot builder is one).
#[derive(Clone)]
pub struct StateMachine {
    engine: Arc<Engine>,
    partition: u64,
    state: Arc<Mutex<State>>,
    /// Told of each sync entry applied (push).
    hook: im::HookSlot,
    /// Where snapshot files are made (unlinked at once).
    snapshot_dir: PathBuf,
    counters: Arc<snapshot::Counters>,
    /// Held while the applied state is persisted (a build and an install
    /// write it one at a time; taken before `state`).
    persisting: Arc<Mutex<()>>,
    /// The file of the snapshot last sent (its id and path), kept for
    /// its next sends; held while one is made.
    kept: Arc<Mutex<Option<(String, PathBuf)>>>,
}

impl StateMachine {
    /// A handle that is dead once every handle on this state machine is
    /// dropped (its group's worker done applying: module `revive`).
    pub(crate) fn alive(&self) -> std::sync::Weak<dyn std::any::Any + Send + Sync> {
        let w: std::sync::Weak<Mutex<State>> = Arc::downgrade(&self.state);
        w
    }

    /// Open partition `partition`'s state machine: its applied state as of
    /// its last snapshot, and its list of timelines.
    pub fn open(engine: Arc<Engine>, partition: u64) -> Result<StateMachine, Error> {
        let applied = match raft_state::last(&engine, raft_state::Kind::Applied, partition)
            .map_err(read_err)?
        {
            Some(r) => serde_json::from_slice(&r.payload).map_err(|e| {
                damaged(format!(
                    "partition {partition}: applied state {}: {e}",
                    r.seq
                ))
            })?,
            None => AppliedState::default(),
        };
        let mut timelines = BTreeSet::new();
        let list = TimelineId::new(RAFT_META, 4 * partition + 3);
        let mut from = 1;
        loop {
            let page = engine
                .scan(list, from, PAGE, Direction::Forward)
                .map_err(read_err)?;
            for r in &page {
                timelines.insert(decode_timeline(&r.payload).ok_or_else(|| {
                    damaged(format!(
                        "partition {partition}: timeline list record {} is damaged",
                        r.seq
                    ))
                })?);
            }
            match page.last() {
                Some(r) if page.len() == PAGE => from = r.seq + 1,
                _ => break,
            }
        }
        let floors = load_floors(&engine, partition)?;
        // The persisted applied state is the last snapshot's meta: it is
        // written only when one is built or installed.
        let current = applied.applied.map(|_| meta_of(partition, &applied));
        let sm = StateMachine {
            engine,
            partition,
            hook: Default::default(),
            snapshot_dir: std::env::temp_dir(),
            counters: Default::default(),
            persisting: Default::default(),
            kept: Default::default(),
            state: Arc::new(Mutex::new(State {
                applied,
                timelines,
                last_index: HashMap::new(),
                hwm: HashMap::new(),
                reads: HashMap::new(),
                members: crate::members::MembersCache::new(MEMBERS_CACHE),
                recent: crate::retries::RecentSends::new(RECENT_CACHE),
                done_seen: 0,
                current,
                floors,
            })),
        };
        // A damaged outbox record or mark fails the deliverer with a
        // message (as before the outbox had a keyspace), not the opening
        // of the group: the partition's other writes go on.
        if let Err(e) = sm.migrate_outbox() {
            tracing::error!(partition, error = %e, "the outbox in raft-meta was not moved over");
        }
        if let Err(e) = sm.register_earlier_conversations() {
            tracing::error!(partition, error = %e, "conversations of an earlier build not registered");
        }
        if let Err(e) = outbox::carry_close_mark(&sm.engine, partition as u32) {
            tracing::error!(partition, error = %e, "the outbox's close mark not carried over");
        }
        if let Err(e) = outbox::release(&sm.engine, partition as u32) {
            tracing::error!(partition, error = %e, "the outbox's delivered records not released");
        }
        Ok(sm)
    }

    /// Register the conversations a build before `im-created` made (before
    /// 2026-12-06 evening): a store timeline of the partition whose first
    /// record is a `Created` event and that is not registered, with the
    /// event's write id. Since 2026-12-07 only a registered timeline is a
    /// conversation (a raw `APPEND` is never one), so without this an
    /// older data directory's conversations would answer
    /// `NO_SUCH_CONVERSATION`. Once per partition: a mark in `raft-meta`
    /// says it is done (written at a fresh partition's first open too),
    /// durable after the registrations it covers.
    fn register_earlier_conversations(&self) -> Result<(), Error> {
        let mark = TimelineId::new(RAFT_META, REGISTERED_BASE + self.partition);
        if self.engine.last_seq(mark) > 0 {
            return Ok(());
        }
        let mut st = self.state.lock();
        let stores: Vec<u64> = st
            .timelines
            .iter()
            .filter(|t| t.0 == Keyspace::STORE.0)
            .map(|t| t.1)
            .collect();
        let mut registered = 0u64;
        for id in stores {
            if im::read::is_conversation(&self.engine, id) {
                continue;
            }
            let Ok(Some((w, ev))) = im::read::event(&self.engine, id, 1) else {
                continue;
            };
            if let Some((kind, _)) = ev.created() {
                let reg = (crate::log_store::IM_CREATED.0, id);
                self.append_any(&mut st, reg, w, &[kind])?;
                registered += 1;
            }
        }
        drop(st);
        if registered > 0 {
            self.engine.sync().map_err(sm_err)?;
            tracing::info!(
                partition = self.partition,
                registered,
                "registered conversations an earlier build created"
            );
        }
        self.engine
            .append_with(mark, &[1], Durability::Sync)
            .map_err(sm_err)?;
        Ok(())
    }

    /// Make snapshot files in `dir` (default: the system's temporary
    /// directory; a node uses its data directory's `raft-snapshots`).
    pub fn with_snapshot_dir(mut self, dir: PathBuf) -> StateMachine {
        // Files this partition's snapshots left before a restart.
        let prefix = format!("p{}-", self.partition);
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.snapshot_dir = dir;
        self
    }

    /// Count snapshots sent and installed in `c` (shared by a node's groups).
    pub fn with_counters(mut self, c: Arc<snapshot::Counters>) -> StateMachine {
        self.counters = c;
        self
    }

    /// Tell `hook` of every sync entry this state machine applies.
    pub fn with_hook(mut self, hook: im::HookSlot) -> StateMachine {
        self.hook = hook;
        self
    }

    /// The records of one of the partition's timelines, with their indexes.
    pub fn records(&self, keyspace: u8, id: u64) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let tl = TimelineId::new(Keyspace(keyspace), id);
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let page = self
                .engine
                .scan(tl, from, PAGE, Direction::Forward)
                .map_err(read_err)?;
            for r in &page {
                let (index, payload) = split(&r.payload).ok_or_else(|| {
                    damaged(format!(
                        "timeline {keyspace}/{id} seq {}: no Raft index",
                        r.seq
                    ))
                })?;
                out.push((index, payload.to_vec()));
            }
            match page.last() {
                Some(r) if page.len() == PAGE => from = r.seq + 1,
                _ => return Ok(out),
            }
        }
    }

    /// The Raft index of timeline `t`'s last record (0: none).
    fn last_index(&self, st: &mut State, t: (u8, u64)) -> Result<u64, Error> {
        if let Some(&i) = st.last_index.get(&t) {
            return Ok(i);
        }
        let tl = TimelineId::new(Keyspace(t.0), t.1);
        let i = match self
            .engine
            .scan(tl, u64::MAX, 1, Direction::Backward)
            .map_err(read_err)?
            .first()
        {
            Some(r) => {
                split(&r.payload)
                    .ok_or_else(|| damaged(format!("timeline {}/{}: no Raft index", t.0, t.1)))?
                    .0
            }
            None => 0,
        };
        st.last_index.insert(t, i);
        Ok(i)
    }

    /// Append `payload` at Raft index `index` to timeline `t` unless it is
    /// there already; the SeqId it got (0 if it was there).
    fn append(
        &self,
        st: &mut State,
        t: (u8, u64),
        index: u64,
        payload: &[u8],
    ) -> Result<u64, Error> {
        if crate::log_store::is_own(t.0) {
            return Err(sm_err(std::io::Error::other(format!(
                "keyspace {} is the cluster's own",
                t.0
            ))));
        }
        if self.a_conversation(t) {
            return Ok(0);
        }
        self.append_any(st, t, index, payload)
    }

    /// Is `t` a conversation's store timeline (created by an entry applied
    /// before)? A raw append to it is refused when it is applied, not
    /// only when it is proposed: one proposed while the conversation's
    /// create was still under way would otherwise land among its events
    /// (seq 0 in the answer; the node answers `FORBIDDEN`). The same on
    /// every replica: they apply the same entries in the same order.
    fn a_conversation(&self, t: (u8, u64)) -> bool {
        t.0 == Keyspace::STORE.0 && im::read::is_conversation(&self.engine, t.1)
    }

    /// [`Self::append`] to any timeline, the cluster's own (the outbox,
    /// the done mark) included.
    fn append_any(
        &self,
        st: &mut State,
        t: (u8, u64),
        index: u64,
        payload: &[u8],
    ) -> Result<u64, Error> {
        // Listed before the skip: after a crash that kept a record but not
        // its (buffered, other-shard) list record, re-applying lists it.
        self.list(st, t)?;
        if index <= self.last_index(st, t)? {
            return Ok(0);
        }
        let mut rec = Vec::with_capacity(8 + payload.len());
        rec.extend_from_slice(&index.to_le_bytes());
        rec.extend_from_slice(payload);
        let seq = self.write_next(st, t, &rec)?;
        st.last_index.insert(t, index);
        Ok(seq)
    }

    /// Append stored record `rec` to `t` at its next seq: after its floor
    /// if it has one and no record yet.
    fn write_next(&self, st: &mut State, t: (u8, u64), rec: &[u8]) -> Result<u64, Error> {
        let tl = TimelineId::new(Keyspace(t.0), t.1);
        // Floors are rare (a replica restored with expired timelines).
        let floor = match st.floors.is_empty() {
            true => None,
            false => st
                .floors
                .remove(&t)
                .filter(|_| self.engine.last_seq(tl) == 0),
        };
        match floor {
            Some(f) => self.engine.append_at(tl, f + 1, rec, Durability::Buffered),
            None => self.engine.append_with(tl, rec, Durability::Buffered),
        }
        .map_err(sm_err)
    }

    /// Apply a batch's items in one engine call: each item not already
    /// there (by its write id) becomes a record; the SeqIds in item order
    /// (0 for an item that was there).
    fn append_items(
        &self,
        st: &mut State,
        index: u64,
        items: &[crate::BatchItem],
    ) -> Result<Vec<u64>, Error> {
        if !st.floors.is_empty()
            && items
                .iter()
                .any(|it| st.floors.contains_key(&(it.keyspace, it.id)))
        {
            // A timeline starting after its floor: item by item (rare: a
            // replica restored from a snapshot with expired timelines).
            return items
                .iter()
                .enumerate()
                .take(crate::MAX_BATCH)
                .map(|(i, it)| {
                    if crate::log_store::is_own(it.keyspace) {
                        return Err(sm_err(std::io::Error::other(format!(
                            "keyspace {} is the cluster's own",
                            it.keyspace
                        ))));
                    }
                    let t = (it.keyspace, it.id);
                    if self.a_conversation(t) {
                        return Ok(0);
                    }
                    self.append_any(st, t, write_id(index, i as u64), &it.payload)
                })
                .collect();
        }
        let mut recs: Vec<(TimelineId, Vec<u8>)> = Vec::with_capacity(items.len() + 1);
        // Which items are written, at which position of `recs`.
        let mut at: Vec<Option<usize>> = Vec::with_capacity(items.len());
        let mut listed = Vec::new();
        for (i, it) in items.iter().enumerate().take(crate::MAX_BATCH) {
            let t = (it.keyspace, it.id);
            if crate::log_store::is_own(t.0) {
                return Err(sm_err(std::io::Error::other(format!(
                    "keyspace {} is the cluster's own",
                    t.0
                ))));
            }
            if self.a_conversation(t) {
                at.push(None);
                continue;
            }
            let w = write_id(index, i as u64);
            // Listed before the skip (see `append_any`).
            if st.timelines.insert(t) {
                let list = TimelineId::new(RAFT_META, 4 * self.partition + 3);
                recs.push((list, encode_timeline(t).to_vec()));
                listed.push(t);
            }
            if w <= self.last_index(st, t)? {
                at.push(None);
                continue;
            }
            let mut rec = Vec::with_capacity(8 + it.payload.len());
            rec.extend_from_slice(&w.to_le_bytes());
            rec.extend_from_slice(&it.payload);
            at.push(Some(recs.len()));
            recs.push((TimelineId::new(Keyspace(t.0), t.1), rec));
            st.last_index.insert(t, w);
        }
        let refs: Vec<(TimelineId, &[u8])> = recs.iter().map(|(t, r)| (*t, r.as_slice())).collect();
        let seqs = match self.engine.append_batch(&refs, Durability::Buffered) {
            Ok(s) => s,
            Err(e) => {
                // Nothing of the batch is known to be written: forget what
                // was assumed (the caches reload from the engine).
                for it in items {
                    st.last_index.remove(&(it.keyspace, it.id));
                }
                for t in listed {
                    st.timelines.remove(&t);
                }
                return Err(sm_err(e));
            }
        };
        Ok(at
            .into_iter()
            .map(|a| a.and_then(|k| seqs.get(k).copied()).unwrap_or(0))
            .collect())
    }

    /// Apply a conversation entry (docs/scaling.md, "IM across
    /// partitions"). Refusals are results, the same on every replica;
    /// only the engine failing is an error.
    fn apply_im(&self, st: &mut State, index: u64, c: &Command) -> Result<ImResult, Error> {
        let w = write_id(index, 0);
        match c {
            Command::ImCreate { .. }
            | Command::ImSend { .. }
            | Command::ImRecall { .. }
            | Command::ImMember { .. } => self.apply_conv_write(st, w, c),
            Command::Deliver(items) => {
                for (i, d) in items.iter().enumerate().take(crate::MAX_BATCH) {
                    let t = (Keyspace::SYNC.0, d.user);
                    let wi = write_id(index, i as u64);
                    let applied = self.last_index(st, t)? >= wi;
                    if applied || self.hwm(st, d.user, d.conv)? >= d.conv_seq {
                        // There already: applied before a restart (then its
                        // list records may not be, if it was written rather
                        // than skipped as a re-drive), or a re-driven
                        // delivery.
                        if applied && self.lists(d) && self.holds(st, t, wi)? {
                            self.join_group(st, wi, d)?;
                        }
                        continue;
                    }
                    let seq = self.append_any(st, t, wi, &d.sync_record())?;
                    st.hwm.insert((d.user, d.conv), d.conv_seq);
                    self.join_group(st, wi, d)?;
                    if let Some(h) = self.hook.get() {
                        h.delivered(seq, d);
                    }
                }
                Ok(None)
            }
            Command::Delivered { upto, wid } => {
                self.mark_delivered(st, w, *upto, *wid)?;
                Ok(None)
            }
            Command::ImMark {
                user,
                conv,
                seq,
                mark,
                last,
                ts,
            } => {
                if self.last_index(st, (Keyspace::SYNC.0, *user))? >= w {
                    return Ok(None); // applied before a restart
                }
                let d = Delivery {
                    user: *user,
                    conv: *conv,
                    conv_seq: *seq,
                    sender: *user,
                    ts: *ts,
                    kind: im::KIND_DELETED_MARKER,
                    body: Vec::new(),
                };
                match mark {
                    crate::Mark::Delete if *seq == 0 || seq > last => {
                        Ok(Some(Err(ImRefusal::Invalid(format!(
                            "user {user} cannot see seq {seq} of conversation {conv}"
                        )))))
                    }
                    crate::Mark::Delete => {
                        // Listed first (kept past the sync TTL, read by
                        // HISTORY), then the user's sync entry.
                        let mut rec = [0u8; 16];
                        rec[..8].copy_from_slice(&conv.to_le_bytes());
                        rec[8..].copy_from_slice(&seq.to_le_bytes());
                        self.append_any(st, (crate::log_store::IM_DELETES.0, *user), w, &rec)?;
                        let s = self.write_mark(st, w, &d)?;
                        Ok(Some(Ok(ImApplied {
                            conv_seq: s,
                            ..Default::default()
                        })))
                    }
                    crate::Mark::Read => {
                        let (by, old) = self.read_marker(st, *user, *conv)?;
                        // `by` this entry: a restart came between its two
                        // writes; the marker moved, its sync entry is due.
                        let new = if by == w {
                            old
                        } else {
                            (*seq).min(*last).max(old)
                        };
                        if new != old || by == w {
                            let mut rec = [0u8; 16];
                            rec[..8].copy_from_slice(&conv.to_le_bytes());
                            rec[8..].copy_from_slice(&new.to_le_bytes());
                            self.append_any(st, (crate::log_store::IM_READS.0, *user), w, &rec)?;
                            st.reads.insert((*user, *conv), (w, new));
                            let d = Delivery {
                                conv_seq: new,
                                kind: im::KIND_READ_MARKER,
                                ..d
                            };
                            self.write_mark(st, w, &d)?;
                        }
                        Ok(Some(Ok(ImApplied {
                            conv_seq: new,
                            ..Default::default()
                        })))
                    }
                }
            }
            // Applied by `apply` (a batch's items, each at its write id).
            Command::Append { .. } | Command::Batch(_) | Command::ImBatch(_) => Ok(None),
        }
    }

    /// Apply conversation write `c` (its partition's) at write id `w`:
    /// an entry of its own (`w` = (index, 0)) or item `i` of an
    /// [`Command::ImBatch`] (`w` = (index, `i`)).
    fn apply_conv_write(&self, st: &mut State, w: u64, c: &Command) -> Result<ImResult, Error> {
        match c {
            Command::ImCreate {
                conv,
                kind,
                members,
                ts,
            } => {
                let t = (Keyspace::STORE.0, *conv);
                let last = self.last_index(st, t)?;
                if last >= w {
                    // Applied before a restart: its registration and its
                    // outbox record too? (Other keyspaces: a power cut can
                    // keep the Created event and lose its registration,
                    // which raw appends are refused by.)
                    let reg = (crate::log_store::IM_CREATED.0, *conv);
                    if self.holds(st, t, w)? {
                        self.append_any(st, reg, w, &[*kind])?;
                    }
                    self.complete_outbox(st, w, *conv)?;
                    return Ok(None);
                }
                if last > 0
                    || self
                        .engine
                        .last_seq(TimelineId::new(Keyspace::STORE, *conv))
                        > 0
                {
                    return Ok(Some(Err(ImRefusal::Exists(*conv))));
                }
                if let Some(r) = self.too_large(8 * members.len() + 1) {
                    return Ok(Some(Err(r)));
                }
                let ev = StoreEvent {
                    kind: im::KIND_CREATED,
                    sender: 0,
                    ts: *ts,
                    client_msg_id: 0,
                    body: StoreEvent::created_body(*kind, members),
                };
                // Registered first: from then on raw writes keep out.
                let reg = (crate::log_store::IM_CREATED.0, *conv);
                self.append_any(st, reg, w, &[*kind])?;
                self.store_with_outbox(st, w, *conv, &ev)
                    .map(|a| Some(Ok(a)))
            }
            Command::ImSend {
                conv,
                sender,
                client_msg_id,
                payload,
                ts,
            } => {
                let t = (Keyspace::STORE.0, *conv);
                if self.last_index(st, t)? >= w {
                    self.complete_outbox(st, w, *conv)?;
                    return Ok(None);
                }
                if let Some(r) = self.too_large(payload.len()) {
                    return Ok(Some(Err(r)));
                }
                let m = match self.members(st, *conv)? {
                    Err(r) => return Ok(Some(Err(r))),
                    Ok(m) => m.before(w),
                };
                // The next seq is read fan-out once the group is.
                let group = m.read_since() != 0;
                // A retry first: its sender may have left since.
                if let Some(a) = self.recent_send(st, *conv, (*sender, *client_msg_id))? {
                    // A read-fan-out message has nothing to wait for; one
                    // from before a switch still has its deliveries.
                    let group = m.read_fanout_at(a.conv_seq);
                    let outbox = if group { 0 } else { a.outbox };
                    return Ok(Some(Ok(ImApplied { outbox, group, ..a })));
                }
                if !m.is_current(*sender) {
                    return Ok(Some(Err(ImRefusal::NotMember {
                        conv: *conv,
                        user: *sender,
                    })));
                }
                let ev = StoreEvent {
                    kind: im::KIND_MESSAGE,
                    sender: *sender,
                    ts: *ts,
                    client_msg_id: *client_msg_id,
                    body: payload.clone(),
                };
                if group {
                    let t = (Keyspace::STORE.0, *conv);
                    let conv_seq = self.append_any(st, t, w, &ev.encode())?;
                    self.note_stored(st, *conv, conv_seq, w, &ev);
                    return Ok(Some(Ok(ImApplied {
                        conv_seq,
                        outbox: 0,
                        duplicate: false,
                        group,
                        announce: false,
                    })));
                }
                self.store_with_outbox(st, w, *conv, &ev)
                    .map(|a| Some(Ok(a)))
            }
            Command::ImRecall {
                conv,
                user,
                target,
                ts,
            } => self.apply_recall(st, w, *conv, *user, *target, *ts),
            Command::ImMember {
                conv,
                user,
                add,
                threshold,
                ts,
            } => self.apply_member(st, w, (*conv, *user), *add, *threshold, *ts),
            // `apply_im` and `ImBatch` bring conversation writes only.
            _ => Ok(Some(Err(ImRefusal::Invalid(
                "not a conversation write".into(),
            )))),
        }
    }

    /// A membership change (module [`crate::members`]): `user` joins or
    /// leaves group `conv`; the change is listed (an add past `threshold`
    /// members of a write-fan-out group as the switch to read fan-out),
    /// then its event stored with an outbox record (a read-fan-out group's
    /// too: its deliverer sends it to the user it names only).
    fn apply_member(
        &self,
        st: &mut State,
        w: u64,
        (conv, user): (u64, u64),
        add: bool,
        threshold: u64,
        ts: u64,
    ) -> Result<ImResult, Error> {
        let t = (Keyspace::STORE.0, conv);
        if self.last_index(st, t)? >= w {
            self.complete_outbox(st, w, conv)?;
            return Ok(None); // applied before a restart
        }
        // Listed by this entry already (a restart between its writes), or
        // a later one: as if not, so it is decided as it was the first time.
        let m = match self.members(st, conv)? {
            Err(r) => return Ok(Some(Err(r))),
            Ok(m) => m.before(w),
        };
        if m.kind == im::CONV_DIRECT {
            return Ok(Some(Err(ImRefusal::Invalid(
                "members of a direct conversation cannot change".into(),
            ))));
        }
        match (add, m.is_current(user)) {
            (true, true) => return Ok(Some(Err(ImRefusal::AlreadyMember { conv, user }))),
            (false, false) => return Ok(Some(Err(ImRefusal::NotMember { conv, user }))),
            _ => {}
        }
        let at = self.engine.last_seq(TimelineId::new(Keyspace::STORE, conv)) + 1;
        let grows_past = m.count() as u64 + 1 > threshold;
        let change = crate::members::Change {
            write_id: w,
            user,
            at,
            add,
            switch: add && m.read_since() == 0 && grows_past,
        };
        let listed = (crate::log_store::IM_MEMBERS.0, conv);
        self.append_any(st, listed, w, &change.record())?;
        let ev = StoreEvent {
            kind: match add {
                true => im::KIND_MEMBER_ADDED,
                false => im::KIND_MEMBER_REMOVED,
            },
            sender: 0,
            ts,
            client_msg_id: 0,
            body: user.to_le_bytes().to_vec(),
        };
        // Read fan-out at its seq: told to the nodes for push once stored.
        let announce = m.read_fanout_at(at);
        self.store_with_outbox(st, w, conv, &ev)
            .map(|a| Some(Ok(ImApplied { announce, ..a })))
    }

    /// A recall (module [`crate::marks`]): `user`'s message `target`,
    /// not recalled by another entry, is listed as recalled, then the
    /// recall event is stored (and delivered, for a write-fan-out
    /// conversation, as a message is).
    fn apply_recall(
        &self,
        st: &mut State,
        w: u64,
        conv: u64,
        user: u64,
        target: u64,
        ts: u64,
    ) -> Result<ImResult, Error> {
        if self.last_index(st, (Keyspace::STORE.0, conv))? >= w {
            self.complete_outbox(st, w, conv)?;
            return Ok(None);
        }
        let group = match self.members(st, conv)? {
            Err(r) => return Ok(Some(Err(r))),
            Ok(m) => match m.before(w) {
                m if !m.is_current(user) => {
                    return Ok(Some(Err(ImRefusal::NotMember { conv, user })))
                }
                m => m.read_since() != 0,
            },
        };
        let mine = match im::read::event(&self.engine, conv, target) {
            Ok(Some((_, ev))) => ev.kind == im::KIND_MESSAGE && ev.sender == user,
            Ok(None) | Err(im::read::ReadError::Damaged(_)) => false,
            Err(e) => return Err(read_err(e)),
        };
        if !mine {
            return Ok(Some(Err(ImRefusal::Invalid(format!(
                "seq {target} of conversation {conv} is not a message of user {user}"
            )))));
        }
        // Listed by this entry already (a restart between the two writes)
        // is not "recalled before".
        let recalled = im::read::recalls(&self.engine, conv).map_err(read_err)?;
        if recalled.iter().any(|&(wi, t)| t == target && wi != w) {
            return Ok(Some(Err(ImRefusal::Invalid(format!(
                "message {target} of conversation {conv} is already recalled"
            )))));
        }
        let rt = (crate::log_store::IM_RECALLS.0, conv);
        self.append_any(st, rt, w, &target.to_le_bytes())?;
        let ev = StoreEvent {
            kind: im::KIND_RECALL,
            sender: user,
            ts,
            client_msg_id: 0,
            body: target.to_le_bytes().to_vec(),
        };
        if group {
            let conv_seq = self.append_any(st, (Keyspace::STORE.0, conv), w, &ev.encode())?;
            self.note_stored(st, conv, conv_seq, w, &ev);
            return Ok(Some(Ok(ImApplied {
                conv_seq,
                outbox: 0,
                duplicate: false,
                group,
                announce: false,
            })));
        }
        self.store_with_outbox(st, w, conv, &ev)
            .map(|a| Some(Ok(a)))
    }

    /// Write mark `d` into its user's sync timeline at write id `w` (and
    /// tell the hook, for push); its sync seq.
    fn write_mark(&self, st: &mut State, w: u64, d: &Delivery) -> Result<u64, Error> {
        let seq = self.append_any(st, (Keyspace::SYNC.0, d.user), w, &d.sync_record())?;
        if let Some(h) = self.hook.get() {
            h.delivered(seq, d);
        }
        Ok(seq)
    }

    /// Conversation `conv`'s members (module [`crate::members`]), or why
    /// it has none: kept from an earlier read while its `im-members` list
    /// has not grown (one index lookup), else read again.
    fn members(
        &self,
        st: &mut State,
        conv: u64,
    ) -> Result<Result<Arc<crate::members::Members>, ImRefusal>, Error> {
        st.members.get(&self.engine, conv).map_err(read_err)
    }

    /// `user`'s read marker in `conv` and the write id that set it ((0, 0):
    /// none): the cache, or the user's `IM_READS` timeline read back to its
    /// newest record for `conv`.
    fn read_marker(&self, st: &mut State, user: u64, conv: u64) -> Result<(u64, u64), Error> {
        if let Some(&m) = st.reads.get(&(user, conv)) {
            return Ok(m);
        }
        if st.reads.len() > HWM_CACHE {
            st.reads.clear();
        }
        let m = im::read::read_marker(&self.engine, user, conv).map_err(read_err)?;
        st.reads.insert((user, conv), m);
        Ok(m)
    }

    /// Does timeline `t` hold a record of write id `wi`? Its records'
    /// write ids rise with their seqs: the last one's, else a binary
    /// search by `get` (a re-apply after a restart only; a record older
    /// than what retention kept counts as absent).
    fn holds(&self, st: &mut State, t: (u8, u64), wi: u64) -> Result<bool, Error> {
        Ok(self.seq_of(st, t, wi)?.is_some())
    }

    /// The seq of timeline `t`'s record of write id `wi`, if it has one
    /// (see [`Self::holds`]).
    fn seq_of(&self, st: &mut State, t: (u8, u64), wi: u64) -> Result<Option<u64>, Error> {
        let last = self.last_index(st, t)?;
        if last <= wi {
            let tl = TimelineId::new(Keyspace(t.0), t.1);
            return Ok((last == wi && last > 0).then(|| self.engine.last_seq(tl)));
        }
        let tl = TimelineId::new(Keyspace(t.0), t.1);
        let (mut lo, mut hi) = (
            self.engine.first_retained_seq(tl).map_err(read_err)?,
            self.engine.last_seq(tl),
        );
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            let at = match self.engine.get(tl, mid) {
                Ok(Some(r)) => split(&r.payload).map(|(w, _)| w).ok_or_else(|| {
                    damaged(format!("timeline {}/{} seq {mid}: no Raft index", t.0, t.1))
                })?,
                // Dropped by retention meanwhile: search what is kept.
                Ok(None) | Err(timeline_engine::Error::Truncated { .. }) => {
                    lo = mid + 1;
                    continue;
                }
                Err(e) => return Err(read_err(e)),
            };
            match at.cmp(&wi) {
                std::cmp::Ordering::Equal => return Ok(Some(mid)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater if mid == 0 => break,
                std::cmp::Ordering::Greater => hi = mid - 1,
            }
        }
        Ok(None)
    }

    /// A data directory of a build before `im-outbox` keeps the outbox
    /// and done mark in `raft-meta`: carry the mark, then what is not
    /// delivered, over to `im-outbox` (write ids kept; the new outbox
    /// starts at seq 1, so the mark's seq is 0), then sync. Decided by
    /// write id, so a move cut short (a power cut before the sync) is
    /// finished at the next open and nothing is carried twice. The old
    /// timelines stay as they are (`raft-meta` keeps everything; nothing
    /// writes or sends them any more).
    fn migrate_outbox(&self) -> Result<(), Error> {
        let p = self.partition;
        let (old_ob, old_done) = (
            TimelineId::new(RAFT_META, im::OUTBOX_BASE + p),
            TimelineId::new(RAFT_META, im::DONE_BASE + p),
        );
        let e = &self.engine;
        if e.last_seq(old_ob) == 0 {
            return Ok(());
        }
        let last_of = |tl: TimelineId| -> Result<Option<(u64, Vec<u8>)>, Error> {
            let recs = e
                .scan(tl, u64::MAX, 1, Direction::Backward)
                .map_err(read_err)?;
            Ok(recs.into_iter().next().map(|r| (r.seq, r.payload)))
        };
        let (w, upto, wid) = match last_of(old_done)? {
            None => (0, 0, 0),
            Some((seq, r)) => split(&r)
                .and_then(|(w, b)| Some((w, outbox::decode_done(b)?)))
                .map(|(w, (upto, wid))| (w, upto, wid))
                .ok_or_else(|| damaged(format!("partition {p}: old done mark {seq}")))?,
        };
        let old_last = last_of(old_ob)?
            .and_then(|(_, r)| split(&r).map(|x| x.0))
            .unwrap_or(0);
        let (_, new_mark) = outbox::done(e, p as u32).map_err(read_err)?;
        let new_ob = outbox::outbox_timeline(p as u32);
        let obt = (new_ob.keyspace.0, new_ob.id);
        let mut st = self.state.lock();
        let new_last = self.last_index(&mut st, obt)?;
        if new_mark >= wid && new_mark.max(new_last) >= old_last {
            return Ok(()); // moved over before
        }
        if w > 0 {
            let t = outbox::done_timeline(p as u32);
            self.append_any(
                &mut st,
                (t.keyspace.0, t.id),
                w,
                &outbox::done_record(0, wid),
            )?;
        }
        let mut from = upto.saturating_add(1);
        let mut carried = 0u64;
        loop {
            let page = e
                .scan(old_ob, from, PAGE, Direction::Forward)
                .map_err(read_err)?;
            for r in &page {
                let (rw, b) = split(&r.payload)
                    .filter(|(_, b)| im::decode_outbox(b).is_some())
                    .ok_or_else(|| {
                        damaged(format!("partition {p}: old outbox record {}", r.seq))
                    })?;
                if self.append_any(&mut st, obt, rw, b)? > 0 {
                    carried += 1;
                }
            }
            match page.last() {
                Some(r) if page.len() == PAGE => from = r.seq + 1,
                _ => break,
            }
        }
        e.sync().map_err(sm_err)?;
        tracing::info!(
            partition = p,
            carried,
            delivered_through = wid,
            "outbox moved from raft-meta to im-outbox"
        );
        Ok(())
    }

    /// Move the done mark (at write id `w`) to the outbox record with
    /// write id `wid`, which the leader has at seq `upto` (this replica's
    /// may differ: module [`crate::outbox`]), unless it is there already;
    /// then release what it covers.
    fn mark_delivered(&self, st: &mut State, w: u64, upto: u64, wid: u64) -> Result<(), Error> {
        let p = self.partition as u32;
        let (_, done) = im::read::done(&self.engine, p).map_err(read_err)?;
        if wid <= done {
            return Ok(());
        }
        let ob = outbox::outbox_timeline(p);
        let local = match outbox::seq_through(&self.engine, p, wid, upto) {
            Ok(s) => s,
            // A damaged outbox record must not stop the group (the
            // deliverer names it), nor move the mark over records this
            // replica cannot place: the mark stays (delivering again is
            // the safe failure).
            Err(im::read::ReadError::Damaged(m)) => {
                tracing::error!(partition = p, error = %m, "outbox damaged: the done mark not moved");
                return Ok(());
            }
            Err(e) => return Err(read_err(e)),
        };
        let t = outbox::done_timeline(p);
        let seq = self.append_any(
            st,
            (t.keyspace.0, t.id),
            w,
            &outbox::done_record(local, wid),
        )?;
        if seq > 0 {
            self.engine.release(ob, local);
            self.engine.release(t, seq - 1);
        }
        Ok(())
    }

    /// Write the done mark again at the end of its timeline if no mark
    /// was written since the last call (a reclaim period ago): an idle
    /// partition's mark would otherwise pin the oldest segment of
    /// `im-outbox` it sits in, and every later one of its shard (module
    /// [`crate::outbox`]). Whether it was written.
    pub fn renew_done(&self) -> Result<bool, Error> {
        let p = self.partition as u32;
        let t = outbox::done_timeline(p);
        let ticket = {
            // Busy (an entry or a snapshot install): next period. The
            // reclaim pass must not wait behind an install.
            let Some(mut st) = self.state.try_lock() else {
                return Ok(false);
            };
            let last = self.engine.last_seq(t);
            if last == 0 || std::mem::replace(&mut st.done_seen, last) != last {
                return Ok(false);
            }
            let Some(rec) = outbox::last_done(&self.engine, p).map_err(read_err)? else {
                return Ok(false);
            };
            // The same bytes, write id included: the mark and the cache of
            // the timeline's last write id stay what they were.
            let ticket = self.engine.append_async(&[(t, &rec)]).map_err(sm_err)?;
            st.done_seen = ticket.seqs().first().copied().unwrap_or(last);
            ticket
        };
        // Durable before the mark it copies may be dropped: a copy is in
        // no Raft entry, so a power cut would not bring it back. (Blocking:
        // a group commit; the state lock is not held.)
        let seqs = ticket.wait().map_err(sm_err)?;
        if let Some(&seq) = seqs.first() {
            self.engine.release(t, seq - 1);
        }
        Ok(true)
    }

    /// Entry `w`'s store record of `conv` is there (applied before a
    /// restart): its outbox record too, if it has one. A kill between the
    /// two writes leaves the first without the second, and the message
    /// would never be delivered; entries are re-applied in order and the
    /// outbox is one timeline, so it lacks at most this entry's record
    /// and later ones: appended again with the same write id.
    fn complete_outbox(&self, st: &mut State, w: u64, conv: u64) -> Result<(), Error> {
        let p = self.partition as u32;
        let ob = im::read::outbox_timeline(p);
        let obt = (ob.keyspace.0, ob.id);
        if self.last_index(st, obt)? >= w {
            return Ok(());
        }
        // Delivered already (its record may be released and dropped).
        if im::read::done(&self.engine, p).map_err(read_err)?.1 >= w {
            return Ok(());
        }
        // None: a retry or a refusal, which stored nothing.
        let Some(seq) = self.seq_of(st, (Keyspace::STORE.0, conv), w)? else {
            return Ok(());
        };
        let kind = match im::read::event(&self.engine, conv, seq) {
            Ok(Some((_, ev))) => ev.kind,
            Ok(None) | Err(im::read::ReadError::Damaged(_)) => return Ok(()),
            Err(e) => return Err(read_err(e)),
        };
        // A read-fan-out group's messages and recalls have none.
        let stored_only = matches!(kind, im::KIND_MESSAGE | im::KIND_RECALL)
            && match self.members(st, conv)? {
                Ok(m) => m.before(w).read_fanout_at(seq),
                Err(_) => false,
            };
        if !stored_only {
            tracing::warn!(
                partition = self.partition,
                conv,
                seq,
                "an entry cut short by a restart: its outbox record written now"
            );
            self.append_any(st, obt, w, &im::outbox_record(conv, seq))?;
        }
        Ok(())
    }

    /// Does applying delivery `d` list something besides its sync entry
    /// (its user joins or leaves the conversation, or a message of it is
    /// recalled)?
    fn lists(&self, d: &Delivery) -> bool {
        d.joins().is_some()
            || d.lists_group()
            || d.leaves() == Some(im::CONV_READ_GROUP)
            || d.recalls().is_some()
    }

    /// A delivery at write id `wi` that makes its user a member (`Created`,
    /// its own `MemberAdded`) also lists the conversation among the user's
    /// (`IM_CONVS`), and one that makes it read a read-fan-out group (a
    /// join, or the switch to read fan-out) the group among the user's
    /// groups (`IM_GROUPS`); its own removal from a read-fan-out group
    /// lists the group as left (`conv | 0`), once; a `Recall` lists the
    /// recalled message among the user's (`IM_RECALLED`).
    fn join_group(&self, st: &mut State, wi: u64, d: &Delivery) -> Result<(), Error> {
        if let Some(target) = d.recalls() {
            let mut rec = [0u8; 16];
            rec[..8].copy_from_slice(&d.conv.to_le_bytes());
            rec[8..].copy_from_slice(&target.to_le_bytes());
            self.append_any(st, (crate::log_store::IM_RECALLED.0, d.user), wi, &rec)?;
        }
        let groups = (crate::log_store::IM_GROUPS.0, d.user);
        if let Some(kind) = d.joins() {
            let mut rec = [0u8; 9];
            rec[..8].copy_from_slice(&d.conv.to_le_bytes());
            rec[8] = kind;
            self.append_any(st, (crate::log_store::IM_CONVS.0, d.user), wi, &rec)?;
        }
        if d.lists_group() {
            self.append_any(st, groups, wi, &d.conv.to_le_bytes())?;
        } else if d.leaves() == Some(im::CONV_READ_GROUP) {
            let mut rec = [0u8; 9];
            rec[..8].copy_from_slice(&d.conv.to_le_bytes());
            self.append_any(st, groups, wi, &rec)?;
        }
        Ok(())
    }

    /// A refusal if a body of `body` bytes would not fit a record (a
    /// record the engine refused would fail the apply, and so the group).
    fn too_large(&self, body: usize) -> Option<ImRefusal> {
        let max = self.engine.config().max_payload;
        let size = body + im::RECORD_OVERHEAD;
        (size > max).then_some(ImRefusal::TooLarge { size, max })
    }

    /// Store `ev` in `conv` at write id `w`, and its outbox record.
    fn store_with_outbox(
        &self,
        st: &mut State,
        w: u64,
        conv: u64,
        ev: &StoreEvent,
    ) -> Result<ImApplied, Error> {
        let seq = self.append_any(st, (Keyspace::STORE.0, conv), w, &ev.encode())?;
        self.note_stored(st, conv, seq, w, ev);
        let ob = im::read::outbox_timeline(self.partition as u32);
        self.append_any(st, (ob.keyspace.0, ob.id), w, &im::outbox_record(conv, seq))?;
        Ok(ImApplied {
            conv_seq: seq,
            outbox: w,
            duplicate: false,
            group: false,
            announce: false,
        })
    }

    /// A message of `who` (sender, client_msg_id) among the conversation's
    /// last [`DEDUP_WINDOW`] records: its seq and write id. Read from the
    /// window the state keeps while it is current, else by a backward scan
    /// that becomes the window (module [`crate::retries`]).
    fn recent_send(
        &self,
        st: &mut State,
        conv: u64,
        who: (u64, u64),
    ) -> Result<Option<ImApplied>, Error> {
        let tl = TimelineId::new(Keyspace::STORE, conv);
        let last = self.engine.last_seq(tl);
        let found = match st.recent.find(conv, last, who) {
            Some(found) => found,
            None => {
                let recs = self
                    .engine
                    .scan(tl, u64::MAX, DEDUP_WINDOW, Direction::Backward)
                    .map_err(read_err)?;
                let window = recs
                    .iter()
                    .map(|r| crate::retries::Rec::stored(conv, r.seq, &r.payload));
                st.recent.fill(conv, last, window);
                st.recent.find(conv, last, who).flatten()
            }
        };
        Ok(found.map(|(seq, w)| ImApplied {
            conv_seq: seq,
            outbox: w,
            duplicate: true,
            group: false,
            announce: false,
        }))
    }

    /// Event `ev` was stored at `seq` of `conv` with write id `w` (`seq` 0:
    /// it was there already): the retry check's window moves along.
    fn note_stored(&self, st: &mut State, conv: u64, seq: u64, w: u64, ev: &StoreEvent) {
        if seq != 0 {
            st.recent
                .appended(conv, crate::retries::Rec::event(seq, w, ev));
        }
    }

    /// The last conv seq of `conv` that `user`'s sync timeline holds: the
    /// cache, or the timeline's newest entries of that conversation (read
    /// back at most [`HWM_SCAN`] entries; a conversation quiet for longer
    /// has no delivery in flight).
    fn hwm(&self, st: &mut State, user: u64, conv: u64) -> Result<u64, Error> {
        if let Some(&h) = st.hwm.get(&(user, conv)) {
            return Ok(h);
        }
        if st.hwm.len() > HWM_CACHE {
            st.hwm.clear();
        }
        let tl = TimelineId::new(Keyspace::SYNC, user);
        let mut from = u64::MAX;
        let mut read = 0;
        let mut found = 0;
        'pages: while read < HWM_SCAN {
            let page = self
                .engine
                .scan(tl, from, HWM_PAGE, Direction::Backward)
                .map_err(read_err)?;
            for r in &page {
                if let Some(d) =
                    payload_of(&r.payload).and_then(|b| Delivery::from_sync_record(user, b))
                {
                    // A user's own marks are not deliveries.
                    if d.conv == conv && !d.is_mark() {
                        found = d.conv_seq;
                        break 'pages;
                    }
                }
            }
            read += page.len();
            match page.last() {
                Some(r) if page.len() == HWM_PAGE && r.seq > 1 => from = r.seq - 1,
                _ => break,
            }
        }
        st.hwm.insert((user, conv), found);
        Ok(found)
    }

    /// Make the data durable, then persist the applied state.
    fn persist(&self, st: &State) -> Result<(), Error> {
        self.engine.sync().map_err(sm_err)?;
        self.write_applied(&st.applied)
    }

    /// Forget the membership the applied state holds (keeping what was
    /// applied): for a replica this node gave up and now takes again. With
    /// the old membership it would count itself a voter of a group that
    /// removed it, campaign in it, and, if its last vote was a committed
    /// one for itself, come back *leading* it (openraft restores a leader
    /// at start) and take writes no quorum will ever commit. With none it
    /// starts as a learner; the leader's entries or snapshot bring the
    /// current membership.
    pub fn forget_membership(&self) -> Result<(), Error> {
        let _one = self.persisting.lock();
        let applied = {
            let mut st = self.state.lock();
            st.applied.membership = Membership::default();
            st.current = st
                .applied
                .applied
                .map(|_| meta_of(self.partition, &st.applied));
            st.applied.clone()
        };
        self.write_applied(&applied)
    }

    fn write_applied(&self, a: &AppliedState) -> Result<(), Error> {
        let bytes = serde_json::to_vec(a).map_err(sm_err)?;
        raft_state::write(
            &self.engine,
            raft_state::Kind::Applied,
            self.partition,
            &bytes,
        )
        .map_err(sm_err)?;
        Ok(())
    }

    /// A snapshot's build (blocking): the applied state as of now, its
    /// data made durable first, persisted; the state lock is held only to
    /// copy it, not over the fsyncs, so applying goes on meanwhile.
    fn persist_applied(&self) -> Result<SnapshotMeta<NodeId, BasicNode>, Error> {
        let _one = self.persisting.lock();
        // Every record of the entries applied so far is appended: the sync
        // after the copy covers them.
        let applied = self.state.lock().applied.clone();
        self.engine.sync().map_err(sm_err)?;
        self.write_applied(&applied)?;
        let meta = meta_of(self.partition, &applied);
        self.state.lock().current = Some(meta.clone());
        self.forget_kept(&meta.snapshot_id);
        Ok(meta)
    }
}

/// The write id of item `i` of the entry at Raft index `index`: what
/// each record starts with, increasing along every timeline, so applying
/// is idempotent per item of a batch too.
pub fn write_id(index: u64, i: u64) -> u64 {
    (index << 16) | (i & 0xFFFF)
}

/// A stored record's payload (what the client appended), without the Raft
/// index in front of it; `None` for a record too short to hold one.
pub fn payload_of(stored: &[u8]) -> Option<&[u8]> {
    split(stored).map(|(_, p)| p)
}

fn split(rec: &[u8]) -> Option<(u64, &[u8])> {
    let (i, p) = rec.split_at_checked(8)?;
    Some((u64::from_le_bytes(i.try_into().ok()?), p))
}

fn encode_timeline((ks, id): (u8, u64)) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[0] = ks;
    b[1..].copy_from_slice(&id.to_le_bytes());
    b
}

fn decode_timeline(b: &[u8]) -> Option<(u8, u64)> {
    let (&ks, id) = b.split_first()?;
    Some((ks, u64::from_le_bytes(id.try_into().ok()?)))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Durable data and the applied state persisted: that is the snapshot
    /// (its data is read out of the engine when it is sent). openraft 0.9
    /// keeps only the meta of what this returns (`core/sm/worker.rs`), so
    /// the data returned is an empty file, not a copy of the partition.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let this = self.clone();
        let meta = tokio::task::spawn_blocking(move || this.persist_applied())
            .await
            .map_err(|e| sm_err(std::io::Error::other(e.to_string())))??;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotFile::ready(self.temp_file()?)),
        })
    }
}

impl StateMachine {
    fn temp_file(&self) -> Result<std::fs::File, Error> {
        temp_file_in(&self.snapshot_dir)
            .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }

    /// Install the snapshot file `f` (blocking: on the blocking pool).
    fn install_from(
        &self,
        f: std::fs::File,
        meta: &SnapshotMeta<NodeId, BasicNode>,
    ) -> Result<(), Error> {
        let bad = |e: std::io::Error| -> Error {
            StorageIOError::read_snapshot(Some(meta.signature()), &e).into()
        };
        let mut f = f;
        f.seek(SeekFrom::Start(0)).map_err(bad)?;
        snapshot::verify(std::io::BufReader::new(&mut f)).map_err(bad)?;
        f.seek(SeekFrom::Start(0)).map_err(bad)?;
        let mut r = snapshot::Reader::open(std::io::BufReader::new(f)).map_err(bad)?;
        let _one = self.persisting.lock();
        let mut st = self.state.lock();
        // The caches describe what the replica held before.
        st.hwm.clear();
        st.reads.clear();
        st.members.clear();
        st.recent.clear();
        let mut buf = Vec::new();
        while let Some(sec) = r.section().map_err(bad)? {
            self.restore_section(&mut st, &sec, &mut r, &mut buf)
                .map_err(|e| match e {
                    Restore::Read(e) => bad(e),
                    Restore::Apply(e) => *e,
                })?;
        }
        outbox::release(&self.engine, self.partition as u32).map_err(read_err)?;
        st.applied = AppliedState {
            applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.persist(&st)?;
        st.current = Some(meta.clone());
        drop(st);
        self.forget_kept(&meta.snapshot_id);
        self.counters.installed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One timeline of a snapshot: the records past this replica's last
    /// seq, each at its seq.
    fn restore_section(
        &self,
        st: &mut State,
        sec: &snapshot::Section,
        r: &mut snapshot::Reader<impl std::io::Read>,
        buf: &mut Vec<u8>,
    ) -> Result<(), Restore> {
        let t = sec.timeline;
        if t.0 == crate::log_store::IM_OUTBOX.0 {
            return self.restore_outbox(st, sec, r, buf);
        }
        let tl = TimelineId::new(Keyspace(t.0), t.1);
        let stored = self.engine.last_seq(tl);
        let have = stored.max(st.floors.get(&t).copied().unwrap_or(0));
        let gap = || {
            Restore::Apply(Box::new(damaged(format!(
                "partition {}: timeline {}/{} ends at seq {have} here, and the snapshot's starts at {}: \
                 this replica lagged past what retention kept; rebuild it empty",
                self.partition, t.0, t.1, sec.first
            ))))
        };
        let apply = |e: Error| Restore::Apply(Box::new(e));
        // Records here that stop short of where the leader's start: the
        // seqs between are gone everywhere. (No record here: any start is
        // fine.)
        if stored > 0 && stored < sec.last && stored + 1 < sec.first {
            return Err(gap());
        }
        if sec.records() == 0 && have < sec.last {
            self.set_floor(st, t, sec.last).map_err(apply)?;
        }
        for seq in sec.first..=sec.last {
            r.record(buf).map_err(Restore::Read)?;
            if seq <= have {
                continue;
            }
            let (w, _) = split(buf).ok_or_else(|| {
                Restore::Read(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("timeline {}/{} seq {seq}: no write id", t.0, t.1),
                ))
            })?;
            self.list(st, t).map_err(apply)?;
            let got = match self.engine.last_seq(tl) {
                0 if seq > 1 => self.engine.append_at(tl, seq, buf, Durability::Buffered),
                _ => self.engine.append_with(tl, buf, Durability::Buffered),
            }
            .map_err(|e| apply(sm_err(e)))?;
            if got != seq {
                return Err(apply(damaged(format!(
                    "timeline {}/{}: restored seq {seq} became {got}",
                    t.0, t.1
                ))));
            }
            st.floors.remove(&t);
            st.last_index.insert(t, w);
        }
        Ok(())
    }

    /// An outbox or done-mark section: its records by write id, each one
    /// newer than this replica's last appended at this replica's next
    /// seq; a done mark's outbox seq made this replica's (module
    /// [`crate::outbox`]).
    fn restore_outbox(
        &self,
        st: &mut State,
        sec: &snapshot::Section,
        r: &mut snapshot::Reader<impl std::io::Read>,
        buf: &mut Vec<u8>,
    ) -> Result<(), Restore> {
        let t = sec.timeline;
        let apply = |e: Error| Restore::Apply(Box::new(e));
        let bad = |seq: u64| {
            Restore::Read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("timeline {}/{} seq {seq}: not an outbox record", t.0, t.1),
            ))
        };
        // Records at or below this replica's mark (a close) are delivered.
        let (_, done) =
            outbox::done(&self.engine, self.partition as u32).map_err(|e| apply(read_err(e)))?;
        for seq in sec.first..=sec.last {
            r.record(buf).map_err(Restore::Read)?;
            let (w, payload) = split(buf).ok_or_else(|| bad(seq))?;
            if !outbox::is_done(t) {
                im::decode_outbox(payload).ok_or_else(|| bad(seq))?;
                if w > done {
                    self.append_any(st, t, w, payload).map_err(apply)?;
                }
                continue;
            }
            let (_, wid) = outbox::decode_done(payload).ok_or_else(|| bad(seq))?;
            let local = outbox::seq_through(&self.engine, self.partition as u32, wid, 0)
                .map_err(|e| apply(read_err(e)))?;
            self.append_any(st, t, w, &outbox::done_record(local, wid))
                .map_err(apply)?;
        }
        Ok(())
    }

    /// Add `t` to the partition's list of timelines (once).
    fn list(&self, st: &mut State, t: (u8, u64)) -> Result<(), Error> {
        if st.timelines.insert(t) {
            let list = TimelineId::new(RAFT_META, 4 * self.partition + 3);
            self.engine
                .append_with(list, &encode_timeline(t), Durability::Buffered)
                .map_err(sm_err)?;
        }
        Ok(())
    }

    /// `t` has no record here and had reached seq `last`.
    fn set_floor(&self, st: &mut State, t: (u8, u64), last: u64) -> Result<(), Error> {
        self.list(st, t)?;
        let mut rec = [0u8; 17];
        rec[..9].copy_from_slice(&encode_timeline(t));
        rec[9..].copy_from_slice(&last.to_le_bytes());
        self.engine
            .append_with(
                TimelineId::new(RAFT_META, FLOOR_BASE + self.partition),
                &rec,
                Durability::Buffered,
            )
            .map_err(sm_err)?;
        st.floors.insert(t, last);
        Ok(())
    }

    /// The consistent cut a snapshot sends: every timeline's last seq now.
    /// Of the outbox, only what is not delivered; of the done mark, its
    /// last record (module [`crate::outbox`]). Not the outbox and mark a
    /// data directory of an older build kept in `raft-meta` (carried over
    /// to `im-outbox` when the partition opened).
    fn manifest(&self) -> Vec<snapshot::Entry> {
        let st = self.state.lock();
        let p = self.partition as u32;
        // Unreadable: everything kept (the receiver takes it by write id).
        let done = im::read::done(&self.engine, p).map_or(0, |d| d.0);
        // Of a timeline released by retention or a mark, from the first
        // record kept (records before it are delivered or old marks).
        let kept = |t: (u8, u64)| {
            let tl = TimelineId::new(Keyspace(t.0), t.1);
            self.engine.first_retained_seq(tl).unwrap_or(1)
        };
        st.timelines
            .iter()
            .filter(|t| t.0 != RAFT_META.0)
            .map(|&t| {
                let last = self
                    .engine
                    .last_seq(TimelineId::new(Keyspace(t.0), t.1))
                    .max(st.floors.get(&t).copied().unwrap_or(0));
                let from = match t.0 == crate::log_store::IM_OUTBOX.0 {
                    false => 1,
                    true if outbox::is_done(t) => last.max(kept(t)),
                    true => done.saturating_add(1).max(kept(t)),
                };
                snapshot::Entry {
                    timeline: t,
                    last,
                    from,
                }
            })
            .collect()
    }
}

/// An unlinked file in `dir` (made if missing): gone when closed, or at a
/// crash.
fn temp_file_in(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    tempfile::tempfile_in(dir)
}

impl StateMachine {
    /// Snapshot `id`'s file, opened for one send: made on the first send
    /// (a cut of the partition then) and kept, named, until the next
    /// snapshot replaces it. openraft retries a send under the same id and
    /// a receiver keys its file by id: every send of one id must carry the
    /// same bytes, or chunks of two cuts could meet in one received file.
    fn snapshot_file(&self, id: &str) -> std::io::Result<std::fs::File> {
        let mut kept = self.kept.lock();
        if let Some((k, path)) = kept.as_ref() {
            if k == id {
                return std::fs::File::open(path);
            }
        }
        std::fs::create_dir_all(&self.snapshot_dir)?;
        let path = self.snapshot_dir.join(format!("{id}.snap"));
        let tmp = self.snapshot_dir.join(format!("{id}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        // A build that failed (retention dropping what it was reading) is
        // made again from a fresh cut: a failed one is fatal for the group
        // (openraft 0.9).
        let mut attempt = 0;
        loop {
            f.set_len(0)?;
            f.seek(SeekFrom::Start(0))?;
            let manifest = self.manifest();
            match snapshot::write(&self.engine, &manifest, std::io::BufWriter::new(&mut f)) {
                Ok(()) => break,
                Err(e) if attempt < 2 => {
                    tracing::warn!(partition = self.partition, error = %e, "snapshot build failed; again");
                    attempt += 1;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        let bytes = f.stream_position()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        if let Some((_, old)) = kept.replace((id.to_string(), path.clone())) {
            let _ = std::fs::remove_file(old);
        }
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        std::fs::File::open(&path)
    }

    /// A newer snapshot replaces the kept file of an older one.
    fn forget_kept(&self, current: &str) {
        let mut kept = self.kept.lock();
        if kept.as_ref().is_some_and(|(k, _)| k != current) {
            if let Some((_, old)) = kept.take() {
                let _ = std::fs::remove_file(old);
            }
        }
    }
}

/// Why restoring a section failed: the snapshot file, or this replica.
enum Restore {
    Read(std::io::Error),
    Apply(Box<Error>),
}

/// A partition's floors, from its raft-meta timeline (the latest per
/// timeline; those since written past are dropped when next written).
fn load_floors(engine: &Engine, partition: u64) -> Result<HashMap<(u8, u64), u64>, Error> {
    let tl = TimelineId::new(RAFT_META, FLOOR_BASE + partition);
    let mut out = HashMap::new();
    let mut from = 1;
    loop {
        let page = engine
            .scan(tl, from, PAGE, Direction::Forward)
            .map_err(read_err)?;
        for r in &page {
            let b = &r.payload;
            let (t, last) = (b.len() == 17)
                .then(|| {
                    Some((
                        decode_timeline(&b[..9])?,
                        u64::from_le_bytes(b[9..].try_into().ok()?),
                    ))
                })
                .flatten()
                .ok_or_else(|| damaged(format!("partition {partition}: floor record {}", r.seq)))?;
            let stored = engine.last_seq(TimelineId::new(Keyspace(t.0), t.1));
            if stored == 0 {
                out.insert(t, last);
            }
        }
        match page.last() {
            Some(r) if page.len() == PAGE => from = r.seq + 1,
            _ => return Ok(out),
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), Error> {
        let st = self.state.lock();
        Ok((st.applied.applied, st.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
    {
        let mut st = self.state.lock();
        let mut out = Vec::new();
        for e in entries {
            let seq = match e.payload {
                EntryPayload::Blank => 0,
                EntryPayload::Membership(m) => {
                    st.applied.membership = StoredMembership::new(Some(e.log_id), m);
                    0
                }
                EntryPayload::Normal(Command::Append {
                    keyspace,
                    id,
                    payload,
                }) => self.append(
                    &mut st,
                    (keyspace, id),
                    write_id(e.log_id.index, 0),
                    &payload,
                )?,
                EntryPayload::Normal(Command::Batch(items)) => {
                    let seqs = self.append_items(&mut st, e.log_id.index, &items)?;
                    st.applied.applied = Some(e.log_id);
                    out.push(Applied {
                        seq: seqs.first().copied().unwrap_or(0),
                        seqs,
                        ..Default::default()
                    });
                    continue;
                }
                EntryPayload::Normal(Command::ImBatch(writes)) => {
                    let ims = writes
                        .into_iter()
                        .enumerate()
                        .take(crate::MAX_BATCH)
                        .map(|(i, cw)| {
                            let w = write_id(e.log_id.index, i as u64);
                            self.apply_conv_write(&mut st, w, &Command::from(cw))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    st.applied.applied = Some(e.log_id);
                    out.push(Applied {
                        ims,
                        ..Default::default()
                    });
                    continue;
                }
                EntryPayload::Normal(ref c) => {
                    let im = self.apply_im(&mut st, e.log_id.index, c)?;
                    st.applied.applied = Some(e.log_id);
                    out.push(Applied {
                        seq: im
                            .as_ref()
                            .map_or(0, |r| r.as_ref().map_or(0, |a| a.conv_seq)),
                        im,
                        ..Default::default()
                    });
                    continue;
                }
            };
            st.applied.applied = Some(e.log_id);
            out.push(Applied {
                seq,
                ..Default::default()
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, Error> {
        Ok(Box::new(SnapshotFile::ready(self.temp_file()?)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<SnapshotFile>,
    ) -> Result<(), Error> {
        let f = snapshot
            .into_std()
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let (this, m) = (self.clone(), meta.clone());
        tokio::task::spawn_blocking(move || this.install_from(f, &m))
            .await
            .map_err(|e| sm_err(std::io::Error::other(e.to_string())))?
    }

    /// The last snapshot's meta with the partition's data as of when the
    /// data is first read (at or past the meta), written to a file on the
    /// blocking pool while the group goes on; later sends of the same
    /// snapshot read the same file.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let Some(meta) = self.state.lock().current.clone() else {
            return Ok(None);
        };
        let (this, id) = (self.clone(), meta.snapshot_id.clone());
        let data = SnapshotFile::lazy(move || this.snapshot_file(&id));
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(data),
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use openraft::testing::log_id;

    use crate::testkit::{block, engine};

    fn append(index: u64, id: u64, p: &str) -> Entry<TypeConfig> {
        append_in(index, 0, id, p.as_bytes())
    }

    fn append_in(index: u64, keyspace: u8, id: u64, p: &[u8]) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Normal(Command::Append {
                keyspace,
                id,
                payload: p.to_vec(),
            }),
        }
    }

    fn seqs(r: Vec<Applied>) -> Vec<u64> {
        r.into_iter().map(|a| a.seq).collect()
    }

    fn entry(index: u64, c: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Normal(c),
        }
    }

    fn im_of(mut r: Vec<Applied>) -> Option<Result<ImApplied, ImRefusal>> {
        r.pop().and_then(|a| a.im)
    }

    /// Conversation 7's creation at Raft index `index`.
    fn create(index: u64, kind: u8, members: Vec<u64>) -> Entry<TypeConfig> {
        entry(
            index,
            Command::ImCreate {
                conv: 7,
                kind,
                members,
                ts: 1,
            },
        )
    }

    fn send(index: u64, sender: u64, cmid: u64, p: &str) -> Entry<TypeConfig> {
        entry(
            index,
            Command::ImSend {
                conv: 7,
                sender,
                client_msg_id: cmid,
                payload: p.as_bytes().to_vec(),
                ts: 1,
            },
        )
    }

    /// A read-fan-out group: its messages are stored with no outbox record
    /// (nothing to deliver, nothing to wait for, a retry too); its
    /// `Created` delivery lists the group among the member's once, through
    /// re-drives and a re-apply after a restart.
    #[test]
    fn a_read_fanout_group_stores_only_and_lists_itself_once_per_member() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let create = create(1, im::CONV_READ_GROUP, vec![1, 2, 3]);
        let c = im_of(block(sm.apply([create])).unwrap()).unwrap().unwrap();
        assert!(!c.group, "the Created event is delivered to every member");
        let a = im_of(block(sm.apply([send(2, 1, 42, "hi")])).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (a.conv_seq, a.outbox, a.group, a.duplicate),
            (2, 0, true, false)
        );
        let d = im_of(block(sm.apply([send(3, 1, 42, "hi")])).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (d.conv_seq, d.outbox, d.group, d.duplicate),
            (2, 0, true, true)
        );
        assert_eq!(
            im_of(block(sm.apply([send(4, 9, 1, "x")])).unwrap()),
            Some(Err(ImRefusal::NotMember { conv: 7, user: 9 }))
        );
        // Only the Created event went to the outbox.
        let pending = im::read::outbox_after(&e, 3, 0, 10).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!((pending[0].conv, pending[0].conv_seq), (7, 1));

        let joined = |conv, seq| Delivery {
            user: 2,
            conv,
            conv_seq: seq,
            sender: 0,
            ts: 1,
            kind: im::KIND_CREATED,
            body: vec![im::CONV_READ_GROUP],
        };
        let plain = Delivery {
            body: vec![im::CONV_GROUP],
            ..joined(8, 1)
        };
        block(sm.apply([entry(
            5,
            Command::Deliver(vec![joined(7, 1), plain.clone()]),
        )]))
        .unwrap();
        // Re-driven (a new leader), then re-applied after a restart.
        block(sm.apply([entry(6, Command::Deliver(vec![joined(7, 1)]))])).unwrap();
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([entry(5, Command::Deliver(vec![joined(7, 1), plain]))])).unwrap();
        block(sm.apply([entry(7, Command::Deliver(vec![joined(9, 1)]))])).unwrap();
        assert_eq!(
            im::read::groups_of(&e, 2).unwrap(),
            vec![(7, true), (9, true)]
        );
        let listed = TimelineId::new(crate::log_store::IM_GROUPS, 2);
        assert_eq!(e.last_seq(listed), 2, "each group listed once");
        assert_eq!(sm.records(Keyspace::SYNC.0, 2).unwrap().len(), 3);
        assert!(im::read::groups_of(&e, 1).unwrap().is_empty());
        // The list is a timeline of the partition: snapshots carry it.
        let st = sm.state.lock();
        assert!(st.timelines.contains(&(crate::log_store::IM_GROUPS.0, 2)));
    }

    /// Conversations on one partition: created once, sends stored with an
    /// outbox record, a retry found by its client_msg_id, refusals written
    /// nowhere; deliveries applied once however often they are re-driven.
    #[test]
    fn conversation_entries_and_deliveries_are_applied_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let first = create(1, 2, vec![1, 2]);
        let a = im_of(block(sm.apply([first])).unwrap()).unwrap().unwrap();
        assert_eq!((a.conv_seq, a.outbox), (1, write_id(1, 0)));
        let again = create(2, 2, vec![3]);
        assert_eq!(
            im_of(block(sm.apply([again])).unwrap()),
            Some(Err(ImRefusal::Exists(7)))
        );
        let a = im_of(block(sm.apply([send(3, 1, 42, "hi")])).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!((a.conv_seq, a.duplicate), (2, false));
        let d = im_of(block(sm.apply([send(4, 1, 42, "hi")])).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!((d.conv_seq, d.outbox, d.duplicate), (2, a.outbox, true));
        assert_eq!(
            im_of(block(sm.apply([send(5, 9, 1, "x")])).unwrap()),
            Some(Err(ImRefusal::NotMember { conv: 7, user: 9 }))
        );
        assert_eq!(e.last_seq(TimelineId::new(Keyspace::STORE, 7)), 2);
        let pending = im::read::outbox_after(&e, 3, 0, 10).unwrap();
        assert_eq!(
            pending
                .iter()
                .map(|p| (p.conv, p.conv_seq))
                .collect::<Vec<_>>(),
            vec![(7, 1), (7, 2)]
        );
        // Deliveries of seq 1 and 2 to user 2, then a re-drive of both
        // (a new leader from the done mark) and one of seq 3.
        let d = |seq| Delivery {
            user: 2,
            conv: 7,
            conv_seq: seq,
            sender: 1,
            ts: 1,
            kind: im::KIND_MESSAGE,
            body: vec![seq as u8],
        };
        block(sm.apply([entry(6, Command::Deliver(vec![d(1), d(2)]))])).unwrap();
        block(sm.apply([entry(7, Command::Deliver(vec![d(1), d(2), d(3)]))])).unwrap();
        // After a restart (the cache gone) too.
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([entry(8, Command::Deliver(vec![d(2), d(3)]))])).unwrap();
        let sync: Vec<u64> = sm
            .records(Keyspace::SYNC.0, 2)
            .unwrap()
            .iter()
            .map(|(_, b)| Delivery::from_sync_record(2, b).unwrap().conv_seq)
            .collect();
        assert_eq!(sync, vec![1, 2, 3]);
        block(sm.apply([entry(
            9,
            Command::Delivered {
                upto: 2,
                wid: a.outbox,
            },
        )]))
        .unwrap();
        assert_eq!(im::read::done(&e, 3).unwrap(), (2, a.outbox));
    }

    /// The conversation writes of one `ImBatch` entry answer and store what
    /// the same writes answer and store as entries of their own: a create,
    /// a send, its retry, a send by a non-member, a join and the joined
    /// user's send (seeing the join before it in the same entry); applied
    /// again after a restart, the entry writes nothing twice.
    #[test]
    fn a_batch_of_conversation_writes_applies_each_as_its_own_entry_would() {
        use crate::ConvWrite as W;
        let send = |sender, client_msg_id, p: &str| W::Send {
            conv: 7,
            sender,
            client_msg_id,
            payload: p.as_bytes().to_vec(),
            ts: 1,
        };
        let batch = vec![
            W::Create {
                conv: 7,
                kind: im::CONV_GROUP,
                members: vec![1, 2],
                ts: 1,
            },
            send(1, 42, "hi"),
            send(1, 42, "hi"),
            send(9, 1, "x"),
            W::Member {
                conv: 7,
                user: 3,
                add: true,
                threshold: 100,
                ts: 1,
            },
            send(3, 1, "from 3"),
        ];
        let writes: Vec<Command> = batch.iter().cloned().map(Command::from).collect();
        // Each as its own entry, on one replica.
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (e1, e2) = (engine(d1.path()), engine(d2.path()));
        let mut one = StateMachine::open(e1.clone(), 3).unwrap();
        let mut alone = Vec::new();
        for (i, c) in writes.iter().enumerate() {
            alone.push(im_of(
                block(one.apply([entry(i as u64 + 1, c.clone())])).unwrap(),
            ));
        }
        // As one entry, on another.
        let mut two = StateMachine::open(e2.clone(), 3).unwrap();
        let mut r = block(two.apply([entry(1, Command::ImBatch(batch.clone()))])).unwrap();
        let together = r.pop().unwrap().ims;
        assert_eq!(together.len(), writes.len());
        // The same answers but for the write ids (the outbox's keys).
        let seen = |a: &Option<Result<ImApplied, ImRefusal>>| match a {
            Some(Ok(a)) => Ok((a.conv_seq, a.duplicate, a.group)),
            Some(Err(r)) => Err(format!("{r:?}")),
            None => Err("nothing".into()),
        };
        let alone: Vec<_> = alone.iter().map(seen).collect();
        let together: Vec<_> = together.iter().map(seen).collect();
        assert_eq!(alone, together);
        assert_eq!(alone[2], Ok((2, true, false)), "the retry");
        assert!(alone[3].is_err(), "not a member");
        assert_eq!(alone[5], Ok((4, false, false)), "the joined user's send");
        // The same store records and outbox records.
        let events = |sm: &StateMachine| -> Vec<(u8, u64, Vec<u8>)> {
            sm.records(Keyspace::STORE.0, 7)
                .unwrap()
                .into_iter()
                .map(|(_, b)| {
                    let ev = StoreEvent::decode(&b).unwrap();
                    (ev.kind, ev.sender, ev.body)
                })
                .collect()
        };
        assert_eq!(events(&one), events(&two));
        assert_eq!(events(&two).len(), 4);
        let outbox = |e: &Arc<Engine>| -> Vec<(u64, u64)> {
            im::read::outbox_after(e, 3, 0, 10)
                .unwrap()
                .iter()
                .map(|p| (p.conv, p.conv_seq))
                .collect()
        };
        assert_eq!(outbox(&e1), outbox(&e2));
        assert_eq!(outbox(&e2), vec![(7, 1), (7, 2), (7, 3), (7, 4)]);
        // The outbox keys are the items' write ids, in order.
        let wids: Vec<u64> = im::read::outbox_after(&e2, 3, 0, 10)
            .unwrap()
            .iter()
            .map(|p| p.write_id)
            .collect();
        let want: Vec<u64> = [0, 1, 4, 5].iter().map(|&i| write_id(1, i)).collect();
        assert_eq!(wids, want);
        // Applied again after a restart: nothing written twice.
        let mut two = StateMachine::open(e2.clone(), 3).unwrap();
        block(two.apply([entry(1, Command::ImBatch(batch))])).unwrap();
        assert_eq!(events(&two).len(), 4);
        assert_eq!(outbox(&e2).len(), 4);
    }

    /// A `Created` delivery skipped as a re-drive, re-applied after a
    /// restart once the user's sync timeline has moved past it, lists
    /// nothing (its first delivery did): the lists stay the same on every
    /// replica, whatever each one re-applied.
    #[test]
    fn a_skipped_redrive_re_applied_lists_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let created = Delivery {
            user: 2,
            conv: 7,
            conv_seq: 1,
            sender: 0,
            ts: 1,
            kind: im::KIND_CREATED,
            body: vec![im::CONV_READ_GROUP],
        };
        let message = Delivery {
            conv: 8,
            conv_seq: 2,
            kind: im::KIND_MESSAGE,
            body: b"m".to_vec(),
            ..created.clone()
        };
        block(sm.apply([entry(5, Command::Deliver(vec![created.clone()]))])).unwrap();
        block(sm.apply([entry(6, Command::Deliver(vec![created.clone()]))])).unwrap();
        block(sm.apply([entry(7, Command::Deliver(vec![message]))])).unwrap();
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([entry(6, Command::Deliver(vec![created]))])).unwrap();
        for ks in [crate::log_store::IM_CONVS, crate::log_store::IM_GROUPS] {
            assert_eq!(e.last_seq(TimelineId::new(ks, 2)), 1, "{ks}");
        }
        assert_eq!(sm.records(Keyspace::SYNC.0, 2).unwrap().len(), 2);
    }

    /// A `Recall` delivered to a user lists the recalled message among the
    /// user's (`IM_RECALLED`, read by `SYNC`) once: not again when a
    /// re-drive delivers it twice, nor when the entry is re-applied after
    /// a restart; other deliveries list nothing there.
    #[test]
    fn a_delivered_recall_lists_its_message_for_the_user_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let message = Delivery {
            user: 2,
            conv: 7,
            conv_seq: 4,
            sender: 5,
            ts: 1,
            kind: im::KIND_MESSAGE,
            body: b"m".to_vec(),
        };
        let recall = Delivery {
            conv_seq: 6,
            kind: im::KIND_RECALL,
            body: 4u64.to_le_bytes().to_vec(),
            ..message.clone()
        };
        assert_eq!(recall.recalls(), Some(4));
        assert_eq!(message.recalls(), None);
        block(sm.apply([entry(5, Command::Deliver(vec![message]))])).unwrap();
        assert!(im::read::recalled(&e, 2).unwrap().is_empty());
        block(sm.apply([entry(6, Command::Deliver(vec![recall.clone()]))])).unwrap();
        block(sm.apply([entry(7, Command::Deliver(vec![recall.clone()]))])).unwrap();
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([entry(6, Command::Deliver(vec![recall]))])).unwrap();
        assert_eq!(im::read::recalled(&e, 2).unwrap(), vec![(7, 4)]);
        assert_eq!(sm.records(Keyspace::SYNC.0, 2).unwrap().len(), 2);
    }

    /// `holds` finds every write id a timeline has and none it lacks:
    /// write ids with gaps (entries that skipped the timeline), several per
    /// entry, over more records than one page.
    #[test]
    fn holds_finds_exactly_the_write_ids_a_timeline_has() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let sm = StateMachine::open(e.clone(), 3).unwrap();
        let mut st = sm.state.lock();
        let t = (Keyspace::SYNC.0, 9);
        let mut present = Vec::new();
        for index in 1..=700u64 {
            if index % 3 == 0 {
                continue; // an entry that wrote nothing here
            }
            for i in 0..(index % 2 + 1) {
                let w = write_id(index, i);
                sm.append_any(&mut st, t, w, b"x").unwrap();
                present.push(w);
            }
        }
        for index in 0..=701u64 {
            for i in 0..3 {
                let w = write_id(index, i);
                assert_eq!(
                    sm.holds(&mut st, t, w).unwrap(),
                    present.contains(&w),
                    "{index}/{i}"
                );
            }
        }
        assert!(!sm
            .holds(&mut st, (Keyspace::SYNC.0, 10), write_id(1, 0))
            .unwrap());
    }

    fn recall(index: u64, user: u64, target: u64) -> Entry<TypeConfig> {
        entry(
            index,
            Command::ImRecall {
                conv: 7,
                user,
                target,
                ts: 1,
            },
        )
    }

    /// A recall: only the sender's own message, once; refusals write
    /// nothing; the recall event is stored and goes to the outbox like a
    /// message, the recalled seq is listed; a re-apply after a restart
    /// writes nothing twice.
    #[test]
    fn a_recall_is_checked_listed_stored_and_delivered_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let create = create(1, im::CONV_DIRECT, vec![1, 2]);
        block(sm.apply([create, send(2, 1, 1, "a"), send(3, 2, 1, "b")])).unwrap();
        let invalid = |r: Option<Result<ImApplied, ImRefusal>>| {
            assert!(matches!(r, Some(Err(ImRefusal::Invalid(_)))), "{r:?}");
        };
        invalid(im_of(block(sm.apply([recall(4, 1, 3)])).unwrap())); // not its own
        invalid(im_of(block(sm.apply([recall(5, 1, 1)])).unwrap())); // Created
        invalid(im_of(block(sm.apply([recall(6, 1, 9)])).unwrap())); // no such seq
        assert_eq!(
            im_of(block(sm.apply([recall(7, 9, 2)])).unwrap()),
            Some(Err(ImRefusal::NotMember { conv: 7, user: 9 }))
        );
        let r = im_of(block(sm.apply([recall(8, 1, 2)])).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!((r.conv_seq, r.outbox, r.group), (4, write_id(8, 0), false));
        invalid(im_of(block(sm.apply([recall(9, 1, 2)])).unwrap())); // again
                                                                     // Re-applied after a restart: nothing new, and not refused.
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        assert_eq!(im_of(block(sm.apply([recall(8, 1, 2)])).unwrap()), None);
        assert_eq!(im::read::recalls(&e, 7).unwrap(), vec![(write_id(8, 0), 2)]);
        assert_eq!(e.last_seq(TimelineId::new(Keyspace::STORE, 7)), 4);
        let (_, ev) = im::read::event(&e, 7, 4).unwrap().unwrap();
        assert_eq!(
            (ev.kind, ev.sender, ev.body),
            (im::KIND_RECALL, 1, 2u64.to_le_bytes().to_vec())
        );
        let outbox: Vec<u64> = im::read::outbox_after(&e, 3, 0, 10)
            .unwrap()
            .iter()
            .map(|p| p.conv_seq)
            .collect();
        assert_eq!(outbox, vec![1, 2, 3, 4]);
        let st = sm.state.lock();
        assert!(st.timelines.contains(&(crate::log_store::IM_RECALLS.0, 7)));
    }

    fn member(index: u64, user: u64, add: bool) -> Entry<TypeConfig> {
        entry(
            index,
            Command::ImMember {
                conv: 7,
                user,
                add,
                threshold: 500,
                ts: 1,
            },
        )
    }

    /// The read paths' members cache answers what a fresh read answers:
    /// kept (the same `Arc`) while the list is unchanged, read again once a
    /// change is listed, and a conversation not there yet is not kept.
    #[test]
    fn the_members_cache_reads_again_once_the_list_grows() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let cache = crate::members::MembersCache::new(1 << 10);
        assert_eq!(
            cache.get(&e, 7).unwrap().unwrap_err(),
            ImRefusal::NoConversation(7)
        );
        block(sm.apply([create(1, im::CONV_GROUP, vec![1, 2])])).unwrap();
        let a = cache.get(&e, 7).unwrap().unwrap();
        assert_eq!(a.current(), vec![1, 2]);
        let b = cache.get(&e, 7).unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &b), "kept while the list is unchanged");
        applied(&mut sm, member(2, 3, true)).unwrap().unwrap();
        let c = cache.get(&e, 7).unwrap().unwrap();
        assert_eq!(c.current(), vec![1, 2, 3]);
        applied(&mut sm, member(3, 1, false)).unwrap().unwrap();
        let d = cache.get(&e, 7).unwrap().unwrap();
        assert_eq!(d.current(), vec![2, 3]);
        assert_eq!(*d, im::read::members(&e, 7).unwrap().unwrap());
        assert_eq!(d.stays(1), vec![(1, 3)]);
    }

    /// A group grown member by member (3,000 adds, every tenth followed
    /// by a removal): each change reads only what was listed since the
    /// members were last read, and the kept members are what a fresh read
    /// of the whole list makes of them. Prints the time it took (before
    /// 2026-12-07 evening each change read the whole list again).
    #[test]
    fn a_group_grown_member_by_member_reads_each_change_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([create(1, im::CONV_GROUP, vec![1, 2])])).unwrap();
        let cache = crate::members::MembersCache::new(1 << 20);
        let started = std::time::Instant::now();
        let mut index = 2;
        for user in 3..3_003u64 {
            let mut batch = vec![member(index, user, true)];
            index += 1;
            if user % 10 == 0 {
                batch.push(member(index, user - 5, false));
                index += 1;
            }
            block(sm.apply(batch)).unwrap();
            if user % 500 == 0 {
                let kept = cache.get(&e, 7).unwrap().unwrap();
                let fresh = im::read::members(&e, 7).unwrap().unwrap();
                assert_eq!(*kept, fresh, "after user {user}");
            }
        }
        let took = started.elapsed();
        let m = cache.get(&e, 7).unwrap().unwrap();
        assert_eq!(m.listed(), 3_300);
        assert_eq!(m.count(), 2 + 3_000 - 300);
        assert!(m.read_since() > 500, "switched past the threshold (500)");
        eprintln!("3,300 membership changes applied in {took:?}");
    }

    fn applied(
        sm: &mut StateMachine,
        e: Entry<TypeConfig>,
    ) -> Option<Result<ImApplied, ImRefusal>> {
        im_of(block(sm.apply([e])).unwrap())
    }

    /// The retry check answers the same from its kept window as from a
    /// scan: a replica that keeps it and one reopened before every write
    /// (nothing kept) store the same records and answer the same, over
    /// more sends than the window holds, a membership event in between,
    /// retries inside and just outside the window.
    #[test]
    fn the_retry_check_answers_the_same_kept_or_read_again() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (e1, e2) = (engine(d1.path()), engine(d2.path()));
        let mut warm = StateMachine::open(e1.clone(), 3).unwrap();
        let mut entries = vec![create(1, im::CONV_GROUP, vec![1, 2])];
        for i in 0..300u64 {
            entries.push(send(2 + i, 1 + i % 2, i, "m"));
        }
        entries.push(member(302, 3, true));
        // Retries: the newest, one well inside, the oldest still inside
        // (the window is the last 256 records: seqs 47..=302), one just
        // outside, and the member just added.
        for (k, cmid) in [299u64, 150, 45, 44, 0].into_iter().enumerate() {
            entries.push(send(303 + k as u64, 1 + cmid % 2, cmid, "m"));
        }
        entries.push(send(308, 3, 1, "new member"));
        let mut a = Vec::new();
        let mut b = Vec::new();
        for e in entries {
            a.push(applied(&mut warm, e.clone()));
            let mut cold = StateMachine::open(e2.clone(), 3).unwrap();
            b.push(applied(&mut cold, e));
        }
        assert_eq!(a, b, "kept or read again, the same answers");
        let dup = |i: usize| a[i].clone().unwrap().unwrap();
        let retries = 302;
        assert!(dup(retries).duplicate && dup(retries).conv_seq == 301);
        assert!(dup(retries + 1).duplicate && dup(retries + 1).conv_seq == 152);
        assert!(dup(retries + 2).duplicate && dup(retries + 2).conv_seq == 47);
        assert!(!dup(retries + 3).duplicate, "seq 46 is outside the window");
        let records = |sm: &StateMachine| sm.records(Keyspace::STORE.0, 7).unwrap();
        let cold = StateMachine::open(e2.clone(), 3).unwrap();
        assert_eq!(records(&warm), records(&cold));
    }

    /// `ADD_MEMBER` / `REMOVE_MEMBER`: refused as on a single node, else
    /// listed and stored at the next seq with an outbox record; sends and
    /// recalls follow the members now; a restart between the list record
    /// and the event completes the change as it began; re-applied, it
    /// writes nothing twice.
    #[test]
    fn membership_changes_are_checked_listed_and_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([create(1, im::CONV_GROUP, vec![1, 2]), send(2, 1, 1, "a")])).unwrap();
        let r = applied(&mut sm, member(3, 3, true)).unwrap().unwrap();
        assert_eq!((r.conv_seq, r.outbox, r.group), (3, write_id(3, 0), false));
        assert_eq!(
            applied(&mut sm, member(4, 3, true)),
            Some(Err(ImRefusal::AlreadyMember { conv: 7, user: 3 }))
        );
        assert_eq!(
            applied(&mut sm, member(5, 9, false)),
            Some(Err(ImRefusal::NotMember { conv: 7, user: 9 }))
        );
        let r = applied(&mut sm, send(6, 3, 1, "b")).unwrap().unwrap();
        assert_eq!(r.conv_seq, 4, "the added member sends");
        let r = applied(&mut sm, member(7, 1, false)).unwrap().unwrap();
        assert_eq!(r.conv_seq, 5);
        assert_eq!(
            applied(&mut sm, send(8, 1, 2, "c")),
            Some(Err(ImRefusal::NotMember { conv: 7, user: 1 }))
        );
        assert_eq!(
            applied(&mut sm, recall(9, 1, 2)),
            Some(Err(ImRefusal::NotMember { conv: 7, user: 1 }))
        );
        let m = im::read::members(&e, 7).unwrap().unwrap();
        assert_eq!(m.current(), vec![2, 3]);
        assert_eq!(m.recipients(2), vec![1, 2], "a message before the join");
        assert_eq!(
            m.recipients(5),
            vec![1, 2, 3],
            "the removal reaches the removed"
        );
        assert_eq!(m.stays(1), vec![(1, 5)]);
        let (_, ev) = im::read::event(&e, 7, 5).unwrap().unwrap();
        assert_eq!(
            (ev.kind, ev.sender, ev.body),
            (im::KIND_MEMBER_REMOVED, 0, 1u64.to_le_bytes().to_vec())
        );
        // A restart after the list record of entry 10 (user 1 back at 6).
        let change = crate::members::Change {
            write_id: write_id(10, 0),
            user: 1,
            at: 6,
            add: true,
            switch: false,
        };
        let mut rec = write_id(10, 0).to_le_bytes().to_vec();
        rec.extend_from_slice(&change.record());
        e.append_with(
            TimelineId::new(crate::log_store::IM_MEMBERS, 7),
            &rec,
            Durability::Buffered,
        )
        .unwrap();
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let r = applied(&mut sm, member(10, 1, true)).unwrap().unwrap();
        assert_eq!(r.conv_seq, 6, "not refused as already a member by itself");
        assert_eq!(applied(&mut sm, member(10, 1, true)), None, "re-applied");
        let m = im::read::members(&e, 7).unwrap().unwrap();
        assert_eq!(m.stays(1), vec![(1, 5), (6, u64::MAX)]);
        assert_eq!(m.recipients(6), vec![1, 2, 3]);
        let outbox: Vec<u64> = im::read::outbox_after(&e, 3, 0, 10)
            .unwrap()
            .iter()
            .map(|p| p.conv_seq)
            .collect();
        assert_eq!(outbox, vec![1, 2, 3, 4, 5, 6]);
        // A direct conversation's members never change.
        let direct = Command::ImCreate {
            conv: 8,
            kind: im::CONV_DIRECT,
            members: vec![1, 2],
            ts: 1,
        };
        block(sm.apply([entry(11, direct)])).unwrap();
        let add = Command::ImMember {
            conv: 8,
            user: 3,
            add: true,
            threshold: 500,
            ts: 1,
        };
        let r = im_of(block(sm.apply([entry(12, add)])).unwrap());
        assert!(matches!(r, Some(Err(ImRefusal::Invalid(_)))), "{r:?}");
    }

    /// An add that takes a write-fan-out group past the entry's threshold
    /// switches it for good: the switching event has an outbox record
    /// (every member gets it), later messages none (stored only); the
    /// switch delivered to another member lists the group among its
    /// read-fan-out groups.
    #[test]
    fn an_add_past_the_threshold_switches_the_group_to_read_fanout() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let add = |index, user, add| {
            entry(
                index,
                Command::ImMember {
                    conv: 7,
                    user,
                    add,
                    threshold: 3,
                    ts: 1,
                },
            )
        };
        block(sm.apply([create(1, im::CONV_GROUP, vec![1, 2])])).unwrap();
        let r = applied(&mut sm, add(2, 3, true)).unwrap().unwrap();
        assert_eq!((r.conv_seq, r.group), (2, false));
        let r = applied(&mut sm, send(3, 1, 1, "a")).unwrap().unwrap();
        assert_eq!(
            (r.conv_seq, r.group),
            (3, false),
            "3 members: write fan-out"
        );
        let r = applied(&mut sm, add(4, 4, true)).unwrap().unwrap();
        assert_eq!((r.conv_seq, r.outbox, r.group), (4, write_id(4, 0), false));
        let m = im::read::members(&e, 7).unwrap().unwrap();
        assert_eq!(m.read_since(), 5);
        assert_eq!(m.deliver_to(4), vec![1, 2, 3, 4]);
        let r = applied(&mut sm, send(5, 4, 1, "b")).unwrap().unwrap();
        assert_eq!((r.conv_seq, r.outbox, r.group), (5, 0, true));
        let r = applied(&mut sm, add(6, 2, false)).unwrap().unwrap();
        assert_eq!(
            (r.conv_seq, r.group),
            (6, false),
            "a change still has an outbox record"
        );
        assert_eq!(
            im::read::members(&e, 7).unwrap().unwrap().deliver_to(6),
            vec![2]
        );
        // Below the threshold again: read fan-out for good.
        let r = applied(&mut sm, send(7, 1, 2, "c")).unwrap().unwrap();
        assert!(r.group);
        let mut body = 4u64.to_le_bytes().to_vec();
        body.push(im::CONV_READ_GROUP);
        let switch = Delivery {
            user: 1,
            conv: 7,
            conv_seq: 4,
            sender: 0,
            ts: 1,
            kind: im::KIND_MEMBER_ADDED,
            body,
        };
        block(sm.apply([entry(8, Command::Deliver(vec![switch]))])).unwrap();
        assert_eq!(im::read::groups_of(&e, 1).unwrap(), vec![(7, true)]);
        assert!(
            im::read::convs_of(&e, 1).unwrap().is_empty(),
            "not its join"
        );
        // A sender removed since: its retry is still its message, a new
        // message refused.
        applied(&mut sm, add(9, 1, false)).unwrap().unwrap();
        let r = applied(&mut sm, send(10, 1, 1, "a")).unwrap().unwrap();
        assert_eq!((r.conv_seq, r.duplicate), (3, true));
        // From before the switch: still waited on through its outbox record.
        assert_eq!((r.group, r.outbox), (false, write_id(3, 0)));
        assert_eq!(
            applied(&mut sm, send(11, 1, 9, "z")),
            Some(Err(ImRefusal::NotMember { conv: 7, user: 1 }))
        );
    }

    /// A user's own `MemberAdded` delivery lists the conversation among
    /// its conversations (and a read-fan-out group among its groups); its
    /// own removal from a read-fan-out group lists the group as left;
    /// another member's join in a write-fan-out group lists nothing for
    /// the receiver.
    #[test]
    fn a_joining_delivery_lists_and_a_leaving_one_unlists_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let d = |user: u64, seq: u64, kind: u8, who: u64| {
            let mut body = who.to_le_bytes().to_vec();
            body.push(im::CONV_READ_GROUP);
            Delivery {
                user,
                conv: 7,
                conv_seq: seq,
                sender: 0,
                ts: 1,
                kind,
                body,
            }
        };
        // Another's join in a write-fan-out group (in a read-fan-out one
        // only the switching join reaches the others).
        let mut other = d(2, 4, im::KIND_MEMBER_ADDED, 3);
        other.body[8] = im::CONV_GROUP;
        let joins = vec![d(3, 4, im::KIND_MEMBER_ADDED, 3), other];
        block(sm.apply([entry(1, Command::Deliver(joins))])).unwrap();
        assert_eq!(im::read::groups_of(&e, 3).unwrap(), vec![(7, true)]);
        assert_eq!(
            im::read::convs_of(&e, 3).unwrap(),
            vec![(7, im::CONV_READ_GROUP)]
        );
        assert!(im::read::groups_of(&e, 2).unwrap().is_empty());
        assert!(im::read::convs_of(&e, 2).unwrap().is_empty());
        let leave = vec![d(3, 9, im::KIND_MEMBER_REMOVED, 3)];
        block(sm.apply([entry(2, Command::Deliver(leave.clone()))])).unwrap();
        assert_eq!(im::read::groups_of(&e, 3).unwrap(), vec![(7, false)]);
        // Re-applied after a restart: listed once.
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([entry(2, Command::Deliver(leave))])).unwrap();
        let left = TimelineId::new(crate::log_store::IM_GROUPS, 3);
        assert_eq!(e.last_seq(left), 2);
        let back = vec![d(3, 12, im::KIND_MEMBER_ADDED, 3)];
        block(sm.apply([entry(3, Command::Deliver(back))])).unwrap();
        assert_eq!(im::read::groups_of(&e, 3).unwrap(), vec![(7, true)]);
        assert_eq!(
            im::read::convs_of(&e, 3).unwrap(),
            vec![(7, im::CONV_READ_GROUP)]
        );
    }

    /// A restart between an entry's writes: its list record landed, the
    /// rest did not. Re-applied, the recall is not "recalled already" (by
    /// itself), and the read marker keeps the value it had moved to (the
    /// entry's sync record says the same), whatever the entry asked.
    #[test]
    fn an_entry_cut_short_by_a_restart_completes_as_it_began() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let create = create(1, im::CONV_DIRECT, vec![1, 2]);
        block(sm.apply([create, send(2, 1, 1, "a")])).unwrap();
        let raw = |ks, id, w: u64, body: &[u8]| {
            let mut rec = w.to_le_bytes().to_vec();
            rec.extend_from_slice(body);
            e.append_with(TimelineId::new(ks, id), &rec, Durability::Buffered)
                .unwrap();
        };
        raw(
            crate::log_store::IM_RECALLS,
            7,
            write_id(3, 0),
            &2u64.to_le_bytes(),
        );
        let mut marker = 7u64.to_le_bytes().to_vec();
        marker.extend_from_slice(&2u64.to_le_bytes());
        raw(crate::log_store::IM_READS, 2, write_id(4, 0), &marker);
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let r = im_of(block(sm.apply([recall(3, 1, 2)])).unwrap());
        assert_eq!(r.map(|a| a.map(|a| a.conv_seq)), Some(Ok(3)));
        assert_eq!(im::read::recalls(&e, 7).unwrap(), vec![(write_id(3, 0), 2)]);
        let r = im_of(block(sm.apply([mark(4, 3, crate::Mark::Read, 3)])).unwrap());
        assert_eq!(r.map(|a| a.map(|a| a.conv_seq)), Some(Ok(2)));
        let sync: Vec<(u64, u8)> = sm
            .records(Keyspace::SYNC.0, 2)
            .unwrap()
            .iter()
            .map(|(_, b)| {
                let d = Delivery::from_sync_record(2, b).unwrap();
                (d.conv_seq, d.kind)
            })
            .collect();
        assert_eq!(sync, vec![(2, im::KIND_READ_MARKER)]);
    }

    /// A kill between a message's store record and its outbox record: on
    /// the re-apply the store record is there, and the outbox record is
    /// written then (before, the message was never delivered).
    #[test]
    fn a_send_killed_between_its_two_writes_gets_its_outbox_record() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([create(1, im::CONV_DIRECT, vec![1, 2])])).unwrap();
        // Entry 2's store record alone, as a kill after its first write
        // leaves it.
        let ev = StoreEvent {
            kind: im::KIND_MESSAGE,
            sender: 1,
            ts: 1,
            client_msg_id: 1,
            body: b"a".to_vec(),
        };
        let mut rec = write_id(2, 0).to_le_bytes().to_vec();
        rec.extend_from_slice(&ev.encode());
        e.append_with(
            TimelineId::new(Keyspace::STORE, 7),
            &rec,
            Durability::Buffered,
        )
        .unwrap();
        let outbox = |e: &Arc<Engine>| -> Vec<(u64, u64)> {
            im::read::outbox_after(e, 3, 0, 10)
                .unwrap()
                .iter()
                .map(|p| (p.conv_seq, p.write_id))
                .collect()
        };
        assert_eq!(outbox(&e), vec![(1, write_id(1, 0))]);
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        assert_eq!(applied(&mut sm, send(2, 1, 1, "a")), None, "applied before");
        assert_eq!(outbox(&e), vec![(1, write_id(1, 0)), (2, write_id(2, 0))]);
        // Applied once more: nothing twice.
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        block(sm.apply([create(1, im::CONV_DIRECT, vec![1, 2]), send(2, 1, 1, "a")])).unwrap();
        assert_eq!(outbox(&e).len(), 2);
    }

    fn mark(index: u64, seq: u64, mark: crate::Mark, last: u64) -> Entry<TypeConfig> {
        entry(
            index,
            Command::ImMark {
                user: 2,
                conv: 7,
                seq,
                mark,
                last,
                ts: 1,
            },
        )
    }

    /// Marks on the user's partition: a read marker clamped to the
    /// conversation's last seq, never lowered, written only when it moves
    /// (and kept over a restart); a delete only of a seq in 1..=last. A
    /// mark is no delivery: a message after it (its conv seq below the
    /// marker's) is still delivered, with the cache gone too.
    #[test]
    fn read_markers_move_forward_only_and_deletes_name_a_seq_there() {
        use crate::Mark::{Delete, Read};
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let got = |sm: &mut StateMachine, en| im_of(block(sm.apply([en])).unwrap());
        let seq_of = |r: Option<Result<ImApplied, ImRefusal>>| r.unwrap().unwrap().conv_seq;
        assert_eq!(seq_of(got(&mut sm, mark(1, 50, Read, 9))), 9);
        assert_eq!(seq_of(got(&mut sm, mark(2, 4, Read, 12))), 9);
        assert_eq!(seq_of(got(&mut sm, mark(3, 11, Read, 12))), 11);
        for bad in [0, 13] {
            let r = got(&mut sm, mark(4 + bad, bad, Delete, 12));
            assert!(matches!(r, Some(Err(ImRefusal::Invalid(_)))), "{r:?}");
        }
        let del = seq_of(got(&mut sm, mark(20, 5, Delete, 12)));
        // Listed for HISTORY (refused deletes are not).
        assert_eq!(im::read::deletes(&e, 2, 7).unwrap(), vec![5]);
        assert!(im::read::deletes(&e, 2, 8).unwrap().is_empty());
        let sync: Vec<(u64, u8, u64)> = sm
            .records(Keyspace::SYNC.0, 2)
            .unwrap()
            .iter()
            .map(|(_, b)| {
                let d = Delivery::from_sync_record(2, b).unwrap();
                (d.conv_seq, d.kind, d.sender)
            })
            .collect();
        assert_eq!(
            sync,
            vec![
                (9, im::KIND_READ_MARKER, 2),
                (11, im::KIND_READ_MARKER, 2),
                (5, im::KIND_DELETED_MARKER, 2)
            ]
        );
        assert_eq!(del, 3, "the delete's sync seq");
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        assert_eq!(seq_of(got(&mut sm, mark(21, 10, Read, 12))), 11);
        assert_eq!(
            im::read::read_marker(&e, 2, 7).unwrap(),
            (write_id(3, 0), 11)
        );
        assert_eq!(seq_of(got(&mut sm, mark(22, 12, Read, 12))), 12);
        // The deliveries of seqs 10 to 12 come after the marks, the newest
        // a read marker at 12 (and the cache gone again).
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let d = |seq| Delivery {
            user: 2,
            conv: 7,
            conv_seq: seq,
            sender: 1,
            ts: 1,
            kind: im::KIND_MESSAGE,
            body: vec![],
        };
        block(sm.apply([entry(23, Command::Deliver(vec![d(10), d(11), d(12)]))])).unwrap();
        let kinds: Vec<(u64, u8)> = sm
            .records(Keyspace::SYNC.0, 2)
            .unwrap()
            .iter()
            .map(|(_, b)| {
                let d = Delivery::from_sync_record(2, b).unwrap();
                (d.conv_seq, d.kind)
            })
            .skip(4)
            .collect();
        let m = im::KIND_MESSAGE;
        assert_eq!(kinds, vec![(10, m), (11, m), (12, m)]);
    }

    #[test]
    fn applying_again_after_a_restart_writes_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let mut sm = StateMachine::open(e.clone(), 5).unwrap();
        let es = vec![append(1, 10, "a"), append(2, 11, "b"), append(3, 10, "c")];
        assert_eq!(seqs(block(sm.apply(es.clone())).unwrap()), vec![1, 1, 2]);
        // A restart before any snapshot: the applied state is the empty one,
        // and openraft applies the same entries again, then new ones.
        let mut sm = StateMachine::open(e.clone(), 5).unwrap();
        assert_eq!(block(sm.applied_state()).unwrap().0, None);
        let mut again = es;
        again.push(append(4, 10, "d"));
        assert_eq!(seqs(block(sm.apply(again)).unwrap()), vec![0, 0, 0, 3]);
        let tl10 = sm.records(0, 10).unwrap();
        let w = |i| write_id(i, 0);
        assert_eq!(
            tl10,
            vec![
                (w(1), b"a".to_vec()),
                (w(3), b"c".to_vec()),
                (w(4), b"d".to_vec())
            ]
        );
        assert_eq!(e.last_seq(TimelineId::new(Keyspace(0), 10)), 3);
        // A batch: two items on one timeline get two SeqIds, and applying
        // the entry again writes neither a second time.
        let item = |id, p: &str| crate::BatchItem {
            keyspace: 0,
            id,
            payload: p.as_bytes().to_vec(),
        };
        let batch = Entry {
            log_id: log_id(1, 1, 5),
            payload: EntryPayload::Normal(Command::Batch(vec![
                item(10, "e"),
                item(11, "f"),
                item(10, "g"),
            ])),
        };
        let r = block(sm.apply(vec![batch.clone()])).unwrap();
        assert_eq!(r[0].seqs, vec![4, 2, 5]);
        let mut sm = StateMachine::open(e.clone(), 5).unwrap();
        let r = block(sm.apply(vec![batch])).unwrap();
        assert_eq!(r[0].seqs, vec![0, 0, 0]);
        assert_eq!(e.last_seq(TimelineId::new(Keyspace(0), 10)), 5);
        // A raw append applied after its timeline became a conversation's
        // store timeline writes nothing (seq 0), beside one that is not.
        let r = block(sm.apply([create(6, im::CONV_GROUP, vec![1, 2])])).unwrap();
        assert!(matches!(r[0].im, Some(Ok(_))), "{:?}", r[0].im);
        let conv_last = e.last_seq(TimelineId::new(Keyspace::STORE, 7));
        let raced = Entry {
            log_id: log_id(1, 1, 7),
            payload: EntryPayload::Normal(Command::Batch(vec![item(7, "raw"), item(10, "h")])),
        };
        assert_eq!(block(sm.apply([raced])).unwrap()[0].seqs, vec![0, 6]);
        assert_eq!(
            seqs(block(sm.apply([append(8, 7, "raw")])).unwrap()),
            vec![0]
        );
        assert_eq!(e.last_seq(TimelineId::new(Keyspace::STORE, 7)), conv_last);
        // The cluster's own keyspaces are not the state machine's to write.
        let bad = Entry {
            log_id: log_id(1, 1, 5),
            payload: EntryPayload::Normal(Command::Append {
                keyspace: 2,
                id: 5,
                payload: vec![],
            }),
        };
        assert!(block(sm.apply([bad])).is_err());
    }

    /// A data directory of a build before `im-created`: its conversations
    /// (a listed store timeline whose first record is a `Created` event)
    /// are registered when the partition opens, once; a raw timeline of
    /// other bytes is not; and a timeline shaped as one after that first
    /// open is not taken for a conversation at the next.
    #[test]
    fn conversations_of_an_earlier_build_are_registered_once_when_the_partition_opens() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let list = TimelineId::new(RAFT_META, 4 * 3 + 3);
        let created = |id: u64| {
            let ev = StoreEvent {
                kind: im::KIND_CREATED,
                sender: 0,
                ts: 0,
                client_msg_id: 0,
                body: StoreEvent::created_body(im::CONV_GROUP, &[1, 2]),
            };
            let mut rec = write_id(id, 0).to_le_bytes().to_vec();
            rec.extend_from_slice(&ev.encode());
            e.append(TimelineId::new(Keyspace::STORE, id), &rec)
                .unwrap();
            e.append(list, &encode_timeline((Keyspace::STORE.0, id)))
                .unwrap();
        };
        created(7);
        let mut raw = write_id(8, 0).to_le_bytes().to_vec();
        raw.extend_from_slice(b"raw bytes");
        e.append(TimelineId::new(Keyspace::STORE, 8), &raw).unwrap();
        e.append(list, &encode_timeline((Keyspace::STORE.0, 8)))
            .unwrap();
        assert!(!im::read::is_conversation(&e, 7));
        assert!(matches!(
            im::read::members(&e, 7).unwrap(),
            Err(ImRefusal::NoConversation(7))
        ));

        drop(StateMachine::open(e.clone(), 3).unwrap());
        assert!(im::read::is_conversation(&e, 7), "registered");
        let m = im::read::members(&e, 7).unwrap().unwrap();
        assert!(m.is_current(1) && m.is_current(2));
        assert!(
            !im::read::is_conversation(&e, 8),
            "raw bytes are no conversation"
        );

        // Shaped as a Created event by a raw APPEND of this build: the
        // partition was registered already, so it stays a raw timeline.
        created(9);
        drop(StateMachine::open(e.clone(), 3).unwrap());
        assert!(!im::read::is_conversation(&e, 9));
        assert!(im::read::is_conversation(&e, 7));
    }

    /// A power cut can keep a create's Created event (the store keyspace)
    /// and lose its registration (another keyspace): applying the create
    /// again after the restart registers it, so raw appends stay out of
    /// the conversation on this replica as on the others.
    #[test]
    fn a_create_applied_again_registers_its_conversation_if_a_power_cut_lost_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let w = write_id(1, 0);
        let mut rec = w.to_le_bytes().to_vec();
        rec.extend_from_slice(b"created");
        let store7 = TimelineId::new(Keyspace::STORE, 7);
        e.append(store7, &rec).unwrap();
        assert!(!im::read::is_conversation(&e, 7));
        let mut sm = StateMachine::open(e.clone(), 3).unwrap();
        let r = block(sm.apply([create(1, im::CONV_GROUP, vec![1, 2])])).unwrap();
        assert!(r[0].im.is_none(), "applied before: {:?}", r[0].im);
        assert!(im::read::is_conversation(&e, 7), "registered again");
        let raw = Entry {
            log_id: log_id(1, 1, 2),
            payload: EntryPayload::Normal(Command::Batch(vec![crate::BatchItem {
                keyspace: Keyspace::STORE.0,
                id: 7,
                payload: b"raw".to_vec(),
            }])),
        };
        assert_eq!(block(sm.apply([raw])).unwrap()[0].seqs, vec![0]);
        assert_eq!(e.last_seq(store7), 1);
    }

    #[test]
    fn a_snapshot_brings_a_lagging_replica_to_the_same_records_and_seqs() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ea, eb) = (engine(da.path()), engine(db.path()));
        let mut a = StateMachine::open(ea.clone(), 2).unwrap();
        let mut b = StateMachine::open(eb.clone(), 2).unwrap();
        let es: Vec<_> = (1..=20)
            .map(|i| append(i, i % 3, &format!("m{i}")))
            .collect();
        block(a.apply(es.clone())).unwrap();
        block(b.apply(es[..7].to_vec())).unwrap(); // b lags: a prefix
        let mut builder = block(a.get_snapshot_builder());
        let built = block(builder.build_snapshot()).unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(1, 1, 20)));
        // Entries after the snapshot's log id: the data sent is a cut at
        // or past it, and applying those entries again writes nothing twice.
        let more: Vec<_> = (21..=25)
            .map(|i| append(i, i % 3, &format!("m{i}")))
            .collect();
        block(a.apply(more.clone())).unwrap();
        let snap = block(a.get_current_snapshot()).unwrap().unwrap();
        assert_eq!(snap.meta.last_log_id, built.meta.last_log_id);
        assert_eq!(snap.meta.last_membership, built.meta.last_membership);
        assert_eq!(snap.meta, built.meta);
        block(b.install_snapshot(&snap.meta, snap.snapshot)).unwrap();
        block(b.apply(more)).unwrap();
        // A second send of the same snapshot (openraft retries under its
        // id) carries the same bytes, from the kept file, even after more
        // entries were applied.
        let read = |s: Snapshot<TypeConfig>| {
            let f = block(s.snapshot.into_std()).unwrap();
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut &f, &mut v).unwrap();
            v
        };
        let first = read(block(a.get_current_snapshot()).unwrap().unwrap());
        block(a.apply([append(26, 1, "m26")])).unwrap();
        let second = read(block(a.get_current_snapshot()).unwrap().unwrap());
        assert!(!first.is_empty() && first == second);
        let tl1 = TimelineId::new(Keyspace(0), 1);
        block(b.apply([append(26, 1, "m26")])).unwrap();
        assert_eq!(ea.last_seq(tl1), eb.last_seq(tl1));
        for id in 0..3 {
            assert_eq!(a.records(0, id).unwrap(), b.records(0, id).unwrap());
            let tl = TimelineId::new(Keyspace(0), id);
            assert_eq!(
                ea.last_seq(tl),
                eb.last_seq(tl),
                "timeline {id}: same SeqIds"
            );
        }
        // The applied state was persisted with the snapshot, and is the
        // current snapshot's meta after a restart.
        let mut b2 = StateMachine::open(eb, 2).unwrap();
        assert_eq!(b2.state.lock().applied.applied, Some(log_id(1, 1, 20)));
        let again = block(b2.get_current_snapshot()).unwrap().unwrap();
        assert_eq!(again.meta.last_log_id, Some(log_id(1, 1, 20)));
        // Asked for its meta only (as openraft does when a group starts):
        // no file was made. The one sent was made once.
        drop(again);
        assert_eq!(b2.counters.sent.load(Ordering::Relaxed), 0);
        assert_eq!(a.counters.sent.load(Ordering::Relaxed), 1);
        assert_eq!(b.counters.installed.load(Ordering::Relaxed), 1);
        // A damaged file is refused.
        let mut c = StateMachine::open(engine(tempfile::tempdir().unwrap().path()), 2).unwrap();
        let mut junk = block(c.begin_receiving_snapshot()).unwrap();
        block(async {
            use tokio::io::AsyncWriteExt;
            junk.write_all(b"TLSNAP01\x07").await.unwrap();
        });
        assert!(block(c.install_snapshot(&snap.meta, junk)).is_err());
    }

    /// A leader whose retention dropped the start of a timeline, or all of
    /// another's records: a replica restored from its snapshot holds the
    /// same seqs (the first restored at its seq; the other as a floor that
    /// its next record starts after, also after a restart).
    #[test]
    fn a_snapshot_of_expired_timelines_keeps_their_seqs_on_the_replica() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ea, eb) = (engine(da.path()), engine(db.path()));
        let mut a = StateMachine::open(ea.clone(), 2).unwrap();
        // What retention leaves: timeline 5 holds seqs 40..=42 only (as a
        // replica restored earlier would), timeline 6 none of its 9.
        let (t5, t6) = ((1u8, 5u64), (1u8, 6u64));
        {
            let mut st = a.state.lock();
            a.set_floor(&mut st, t5, 39).unwrap();
            a.set_floor(&mut st, t6, 9).unwrap();
        }
        let es: Vec<_> = (1..=3).map(|i| append_in(i, 1, 5, &[i as u8])).collect();
        assert_eq!(seqs(block(a.apply(es)).unwrap()), vec![40, 41, 42]);
        let mut builder = block(a.get_snapshot_builder());
        block(builder.build_snapshot()).unwrap();
        let snap = block(a.get_current_snapshot()).unwrap().unwrap();
        let mut b = StateMachine::open(eb.clone(), 2).unwrap();
        block(b.install_snapshot(&snap.meta, snap.snapshot)).unwrap();
        let tl5 = TimelineId::new(Keyspace(1), 5);
        assert_eq!(eb.first_retained_seq(tl5).unwrap(), 40);
        assert_eq!(a.records(1, 5).unwrap(), b.records(1, 5).unwrap());
        assert_eq!(eb.last_seq(tl5), 42);
        // Timeline 6 continues at 10 on both, the replica restarted first.
        let mut b = StateMachine::open(eb.clone(), 2).unwrap();
        let next = append_in(4, 1, 6, b"n");
        assert_eq!(seqs(block(a.apply([next.clone()])).unwrap()), vec![10]);
        assert_eq!(seqs(block(b.apply([next])).unwrap()), vec![10]);
        // A replica whose own records of timeline 5 stop at seq 2, before
        // the leader's start (40): it cannot get the same seqs; refused.
        let dc = tempfile::tempdir().unwrap();
        let mut c = StateMachine::open(engine(dc.path()), 2).unwrap();
        let own: Vec<_> = (1..=2).map(|i| append_in(i, 1, 5, &[0])).collect();
        block(c.apply(own)).unwrap();
        let snap = block(a.get_current_snapshot()).unwrap().unwrap();
        let err = block(c.install_snapshot(&snap.meta, snap.snapshot)).unwrap_err();
        assert!(err.to_string().contains("rebuild it empty"), "{err}");
    }

    fn delivered(index: u64, upto: u64, wid: u64) -> Entry<TypeConfig> {
        entry(index, Command::Delivered { upto, wid })
    }

    /// Two replicas of partition 3, each on its own small-segment engine.
    struct Replicas {
        _dirs: (tempfile::TempDir, tempfile::TempDir),
        ea: Arc<Engine>,
        eb: Arc<Engine>,
        a: StateMachine,
        b: StateMachine,
    }

    fn two_replicas() -> Replicas {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ea = crate::testkit::small_segments(dirs.0.path());
        let eb = crate::testkit::small_segments(dirs.1.path());
        Replicas {
            a: StateMachine::open(ea.clone(), 3).unwrap(),
            b: StateMachine::open(eb.clone(), 3).unwrap(),
            _dirs: dirs,
            ea,
            eb,
        }
    }

    /// Conversation 7 created as a group at index 1, then 2,999 messages
    /// at indexes 2..=3000 (its seqs and its outbox's are the same).
    fn group_of_3000() -> Vec<Entry<TypeConfig>> {
        let mut es = vec![create(1, im::CONV_GROUP, vec![1, 2])];
        es.extend((2..=3000).map(|i| send(i, 1, i, "m")));
        es
    }

    /// Partition 3's undelivered outbox: (conv seq, write id) of each.
    fn pending(e: &Engine) -> Vec<(u64, u64)> {
        let (done, _) = im::read::done(e, 3).unwrap();
        im::read::outbox_after(e, 3, done, 10_000)
            .unwrap()
            .iter()
            .map(|p| (p.conv_seq, p.write_id))
            .collect()
    }

    /// Delivered outbox records and old done marks free their segments of
    /// `im-outbox`; a replica that lagged past what the leader dropped is
    /// restored from its snapshot by write id (at its own seqs: under
    /// seq-for-seq restore it could not be, the leader's delivered records
    /// being gone), and follows the leader's later marks from there.
    #[test]
    fn delivered_outbox_records_go_and_a_lagging_replica_takes_the_rest_by_write_id() {
        let Replicas {
            _dirs,
            ea,
            eb,
            mut a,
            mut b,
        } = two_replicas();
        let es = group_of_3000();
        block(a.apply(es.clone())).unwrap();
        // b lags.
        block(b.apply(es[..100].to_vec())).unwrap();
        // Everything but the last ten messages delivered: the mark names
        // the leader's outbox seq (the Created event is seq 1).
        block(a.apply([delivered(3001, 2990, write_id(2990, 0))])).unwrap();
        let ob = im::read::outbox_timeline(3);
        assert_eq!(ea.last_seq(ob), 3000);
        ea.seal_active().unwrap();
        let m = ea.maintain().unwrap();
        assert!(m.dropped > 0, "delivered records free their segments");
        let first = ea.first_retained_seq(ob).unwrap();
        assert!(first > 101 && first <= 2991, "first kept {first}");
        let rest: Vec<_> = (2991..=3000).map(|i| (i, write_id(i, 0))).collect();
        assert_eq!(pending(&ea), rest);
        // b's outbox ends (at 100) before a's first kept record.
        let mut builder = block(a.get_snapshot_builder());
        let built = block(builder.build_snapshot()).unwrap();
        let snap = block(a.get_current_snapshot()).unwrap().unwrap();
        assert_eq!(snap.meta, built.meta);
        block(b.install_snapshot(&snap.meta, snap.snapshot)).unwrap();
        assert_eq!(pending(&eb), rest, "b delivers what a has not");
        assert_eq!(eb.last_seq(ob), 110, "at b's own seqs");
        assert_eq!(
            im::read::done(&eb, 3).unwrap(),
            (100, write_id(2990, 0)),
            "b's mark at b's seq"
        );
        let store = TimelineId::new(Keyspace::STORE, 7);
        assert_eq!(eb.last_seq(store), 3000, "the store has the same seqs");
        // The leader's next mark (its seq 2995) lands on b's seq 105.
        let next = delivered(3002, 2995, write_id(2995, 0));
        block(a.apply([next.clone()])).unwrap();
        block(b.apply([next])).unwrap();
        assert_eq!(im::read::done(&eb, 3).unwrap(), (105, write_id(2995, 0)));
        assert_eq!(pending(&eb), pending(&ea));
        assert_eq!(pending(&eb).len(), 5);
        // A stale mark (an old leader's) moves nothing back.
        block(b.apply([delivered(3003, 2990, write_id(2990, 0))])).unwrap();
        assert_eq!(im::read::done(&eb, 3).unwrap(), (105, write_id(2995, 0)));
        // Reopened: the same mark and pending records.
        let b2 = StateMachine::open(eb.clone(), 3).unwrap();
        assert_eq!(pending(&eb).len(), 5);
        drop(b2);
    }

    /// An idle partition's last done mark pins the segment it sits in,
    /// and with it every later one of the shard, however busy the other
    /// partitions are; written again at the end, it frees them.
    #[test]
    fn an_idle_partitions_done_mark_is_renewed_and_frees_the_segments() {
        let dir = tempfile::tempdir().unwrap();
        let e = crate::testkit::small_segments(dir.path());
        let mut idle = StateMachine::open(e.clone(), 3).unwrap();
        block(idle.apply([
            create(1, im::CONV_DIRECT, vec![1, 2]),
            delivered(2, 1, write_id(1, 0)),
        ]))
        .unwrap();
        // Partition 4 (its own conversation 7: another partition's
        // timelines) fills segments and delivers them all.
        let mut busy = StateMachine::open(e.clone(), 4).unwrap();
        let mut es = group_of_3000();
        es.push(delivered(3001, 3000, write_id(3000, 0)));
        block(busy.apply(es)).unwrap();
        e.seal_active().unwrap();
        assert_eq!(e.maintain().unwrap().dropped, 0, "the idle mark pins them");
        // Renewed only once a period has passed without a mark.
        assert!(!idle.renew_done().unwrap());
        assert!(idle.renew_done().unwrap());
        assert!(!busy.renew_done().unwrap());
        assert!(busy.renew_done().unwrap());
        assert_eq!(im::read::done(&e, 3).unwrap(), (1, write_id(1, 0)));
        e.seal_active().unwrap();
        assert!(e.maintain().unwrap().dropped > 0, "renewed: they go");
        // What is left reads, also after a reopen.
        drop(idle);
        let _idle = StateMachine::open(e.clone(), 3).unwrap();
        assert_eq!(im::read::done(&e, 3).unwrap(), (1, write_id(1, 0)));
        assert_eq!(im::read::done(&e, 4).unwrap(), (3000, write_id(3000, 0)));
        assert!(pending(&e).is_empty());
    }

    /// A replica given up with records past its mark: once they are known
    /// delivered, its outbox is closed (a close mark in raft-meta) and all
    /// of it goes. Taken again, it skips what the close mark covers,
    /// whether the entries are applied again or a snapshot sends them,
    /// and takes later ones as a replica always does.
    #[test]
    fn a_closed_outbox_goes_whole_and_a_replica_taken_again_adds_only_later_records() {
        let Replicas {
            _dirs,
            ea: _,
            eb,
            mut a,
            mut b,
        } = two_replicas();
        let mut es = group_of_3000();
        es.push(delivered(3001, 2990, write_id(2990, 0)));
        block(a.apply(es.clone())).unwrap();
        block(b.apply(es.clone())).unwrap();
        assert!(!pending(&eb).is_empty());
        // b gives its replica up; a replica says the last one is delivered.
        drop(b);
        let close = |e: &Engine, last| outbox::close(e, 3, write_id(3000, 0), last).unwrap();
        assert_eq!(
            close(&eb, 2999),
            outbox::Closed::Grew,
            "not the outbox asked about"
        );
        assert_eq!(close(&eb, 3000), outbox::Closed::Now);
        assert_eq!(
            close(&eb, 3000),
            outbox::Closed::Before,
            "no second close mark"
        );
        assert!(pending(&eb).is_empty());
        assert_eq!(outbox::done(&eb, 3).unwrap(), (3000, write_id(3000, 0)));
        eb.seal_active().unwrap();
        let m = eb.maintain().unwrap();
        assert!(m.dropped > 0);
        let ob = im::read::outbox_timeline(3);
        assert_eq!(eb.first_retained_seq(ob).unwrap(), 3001, "all of it went");
        // Taken again: the entries applied again add nothing to deliver.
        let mut b = StateMachine::open(eb.clone(), 3).unwrap();
        block(b.apply(es[2990..].to_vec())).unwrap();
        assert!(pending(&eb).is_empty(), "{:?}", pending(&eb));
        // Nor does a snapshot of a leader whose mark was behind the close.
        let mut builder = block(a.get_snapshot_builder());
        block(builder.build_snapshot()).unwrap();
        let snap = block(a.get_current_snapshot()).unwrap().unwrap();
        block(b.install_snapshot(&snap.meta, snap.snapshot)).unwrap();
        assert!(pending(&eb).is_empty(), "{:?}", pending(&eb));
        // A later message is delivered as always, and its mark lands.
        let later = [send(3002, 1, 3002, "n")];
        block(a.apply(later.clone())).unwrap();
        block(b.apply(later)).unwrap();
        assert_eq!(pending(&eb), vec![(3001, write_id(3002, 0))]);
        let mark = delivered(3003, 3001, write_id(3002, 0));
        block(b.apply([mark])).unwrap();
        assert_eq!(outbox::done(&eb, 3).unwrap(), (3001, write_id(3002, 0)));
        assert!(pending(&eb).is_empty());
    }

    /// The usual close: the replica's own mark covers its outbox. The
    /// close mark keeps the mark when its timeline goes with the outbox:
    /// taken again, the replica has its mark (copied back to the done
    /// timeline when it opens), adds nothing to deliver from entries
    /// applied again, and builds and sends snapshots that carry the mark.
    #[test]
    fn an_outbox_closed_on_its_own_mark_keeps_the_mark_through_a_reopen_and_a_snapshot() {
        let (db, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let eb = crate::testkit::small_segments(db.path());
        let mut b = StateMachine::open(eb.clone(), 3).unwrap();
        let mut es = group_of_3000();
        es.push(delivered(3001, 3000, write_id(3000, 0)));
        block(b.apply(es.clone())).unwrap();
        drop(b);
        assert!(pending(&eb).is_empty());
        // Delivered records go before the replica is given up: what the
        // close asks about is then the mark's write id.
        eb.seal_active().unwrap();
        assert!(eb.maintain().unwrap().dropped > 0);
        let mark = (3000, write_id(3000, 0));
        assert_eq!(outbox::last_wid(&eb, 3).unwrap(), mark.1);
        let close = outbox::close(&eb, 3, mark.1, 3000).unwrap();
        assert_eq!(close, outbox::Closed::Now);
        assert!(outbox::closed(&eb, 3).unwrap());
        assert_eq!(
            outbox::done(&eb, 3).unwrap(),
            mark,
            "kept by the close mark"
        );
        // Taken again in the same process, before the released mark's
        // segment goes: the mark is copied back all the same.
        let mut b = StateMachine::open(eb.clone(), 3).unwrap();
        eb.seal_active().unwrap();
        assert!(eb.maintain().unwrap().dropped > 0);
        let last = outbox::last_done(&eb, 3).unwrap().unwrap();
        assert_eq!(outbox::decode_done(&last[8..]), Some(mark), "copied back");
        block(b.apply(es[2990..].to_vec())).unwrap();
        assert!(pending(&eb).is_empty(), "{:?}", pending(&eb));
        // A snapshot of it is built, sent and carries the mark.
        let mut builder = block(b.get_snapshot_builder());
        block(builder.build_snapshot()).unwrap();
        let snap = block(b.get_current_snapshot()).unwrap().unwrap();
        let ec = crate::testkit::small_segments(dc.path());
        let mut c = StateMachine::open(ec.clone(), 3).unwrap();
        block(c.install_snapshot(&snap.meta, snap.snapshot)).unwrap();
        assert_eq!(outbox::done(&ec, 3).unwrap().1, mark.1);
        assert!(pending(&ec).is_empty());
        // Its mark is renewed as any idle partition's.
        assert!(!b.renew_done().unwrap());
        assert!(b.renew_done().unwrap());
        assert_eq!(outbox::done(&eb, 3).unwrap(), mark);
    }

    /// A data directory of a build before `im-outbox`: the outbox records
    /// not delivered and the mark move over once, write ids kept.
    #[test]
    fn an_outbox_kept_in_raft_meta_moves_to_its_keyspace_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let old = |base: u64| TimelineId::new(RAFT_META, base + 3);
        let stored = |w: u64, b: &[u8]| {
            let mut r = w.to_le_bytes().to_vec();
            r.extend_from_slice(b);
            r
        };
        for i in 1..=5u64 {
            let rec = stored(write_id(i, 0), &im::outbox_record(7, i));
            e.append_with(old(im::OUTBOX_BASE), &rec, Durability::Buffered)
                .unwrap();
        }
        // Delivered through the third (the old mark's seq is the outbox's).
        let mark = stored(write_id(9, 0), &outbox::done_record(3, write_id(3, 0)));
        e.append_with(old(im::DONE_BASE), &mark, Durability::Buffered)
            .unwrap();
        let want = vec![(4, write_id(4, 0)), (5, write_id(5, 0))];
        let _sm = StateMachine::open(e.clone(), 3).unwrap();
        assert_eq!(pending(&e), want);
        assert_eq!(im::read::done(&e, 3).unwrap(), (0, write_id(3, 0)));
        let _again = StateMachine::open(e.clone(), 3).unwrap();
        assert_eq!(pending(&e), want, "once");
        assert_eq!(e.last_seq(im::read::outbox_timeline(3)), 2);
    }
}
