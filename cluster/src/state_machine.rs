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
//! - The applied state (last applied id and membership, `raft-meta` timeline
//!   `4p + 2`) is written only when a snapshot is built or installed, after
//!   `Engine::sync`. So it is never on disk ahead of the data it covers, and
//!   the log is purged only up to a snapshot whose data is on disk.
//! - A restart re-applies the entries since the last snapshot; idempotence
//!   makes that safe.
//! - The partition's timelines are listed in `raft-meta` timeline `4p + 3`,
//!   one record per timeline the first time it is written (the engine
//!   cannot list timelines).
//!
//! **Snapshots** carry every record of the partition's timelines with its
//! index (a binary list; not yet segment ranges). Installing one on a
//! replica appends, to each timeline, the records past that replica's last
//! index: the replica's timelines are a prefix of the snapshot's.

// openraft's traits return its `StorageError` (224 bytes).
#![allow(clippy::result_large_err)]

use crate::im::{self, Delivery, ImRefusal, StoreEvent};
use crate::log_store::RAFT_META;
use crate::{Applied, Command, ImApplied, NodeId, TypeConfig};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::io::Cursor;
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

fn sm_err(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::write_state_machine(&e).into()
}

fn read_err(e: impl std::error::Error + 'static) -> Error {
    StorageIOError::read_state_machine(&e).into()
}

fn damaged(what: String) -> Error {
    read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
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
    current: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
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
}

impl StateMachine {
    /// Open partition `partition`'s state machine: its applied state as of
    /// its last snapshot, and its list of timelines.
    pub fn open(engine: Arc<Engine>, partition: u64) -> Result<StateMachine, Error> {
        let applied_tl = TimelineId::new(RAFT_META, 4 * partition + 2);
        let applied = match engine
            .scan(applied_tl, u64::MAX, 1, Direction::Backward)
            .map_err(read_err)?
            .first()
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
        Ok(StateMachine {
            engine,
            partition,
            hook: Default::default(),
            state: Arc::new(Mutex::new(State {
                applied,
                timelines,
                last_index: HashMap::new(),
                hwm: HashMap::new(),
                current: None,
            })),
        })
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
        self.append_any(st, t, index, payload)
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
        if index <= self.last_index(st, t)? {
            return Ok(0);
        }
        if st.timelines.insert(t) {
            let list = TimelineId::new(RAFT_META, 4 * self.partition + 3);
            self.engine
                .append_with(list, &encode_timeline(t), Durability::Buffered)
                .map_err(sm_err)?;
        }
        let mut rec = Vec::with_capacity(8 + payload.len());
        rec.extend_from_slice(&index.to_le_bytes());
        rec.extend_from_slice(payload);
        let seq = self
            .engine
            .append_with(
                TimelineId::new(Keyspace(t.0), t.1),
                &rec,
                Durability::Buffered,
            )
            .map_err(sm_err)?;
        st.last_index.insert(t, index);
        Ok(seq)
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
            let w = write_id(index, i as u64);
            if w <= self.last_index(st, t)? {
                at.push(None);
                continue;
            }
            if st.timelines.insert(t) {
                let list = TimelineId::new(RAFT_META, 4 * self.partition + 3);
                recs.push((list, encode_timeline(t).to_vec()));
                listed.push(t);
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
            Command::ImCreate {
                conv,
                kind,
                members,
                ts,
            } => {
                let t = (Keyspace::STORE.0, *conv);
                let last = self.last_index(st, t)?;
                if last >= w {
                    return Ok(None); // applied before a restart
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
                    return Ok(None);
                }
                if let Some(r) = self.too_large(payload.len()) {
                    return Ok(Some(Err(r)));
                }
                let group = match im::read::members(&self.engine, *conv).map_err(read_err)? {
                    Err(r) => return Ok(Some(Err(r))),
                    Ok((_, m)) if !m.contains(sender) => {
                        return Ok(Some(Err(ImRefusal::NotMember {
                            conv: *conv,
                            user: *sender,
                        })))
                    }
                    Ok((kind, _)) => kind == im::CONV_READ_GROUP,
                };
                if let Some(a) = self.recent_send(*conv, *sender, *client_msg_id)? {
                    // A read-fan-out message has nothing to wait for.
                    let outbox = if group { 0 } else { a.outbox };
                    return Ok(Some(Ok(ImApplied { outbox, group, ..a })));
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
                    return Ok(Some(Ok(ImApplied {
                        conv_seq,
                        outbox: 0,
                        duplicate: false,
                        group,
                    })));
                }
                self.store_with_outbox(st, w, *conv, &ev)
                    .map(|a| Some(Ok(a)))
            }
            Command::Deliver(items) => {
                for (i, d) in items.iter().enumerate().take(crate::MAX_BATCH) {
                    let t = (Keyspace::SYNC.0, d.user);
                    let wi = write_id(index, i as u64);
                    let applied = self.last_index(st, t)? >= wi;
                    if applied || self.hwm(st, d.user, d.conv)? >= d.conv_seq {
                        // There already: applied before a restart (then its
                        // group record may not be), or a re-driven delivery.
                        if applied {
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
                let t = im::read::done_timeline(self.partition as u32);
                let (done, _) =
                    im::read::done(&self.engine, self.partition as u32).map_err(read_err)?;
                if *upto > done {
                    let mut b = [0u8; 16];
                    b[..8].copy_from_slice(&upto.to_le_bytes());
                    b[8..].copy_from_slice(&wid.to_le_bytes());
                    self.append_any(st, (t.keyspace.0, t.id), w, &b)?;
                }
                Ok(None)
            }
            Command::Append { .. } | Command::Batch(_) => Ok(None),
        }
    }

    /// A read-fan-out group's `Created` delivery at write id `wi` also
    /// lists the group among the user's (`IM_GROUPS`), once.
    fn join_group(&self, st: &mut State, wi: u64, d: &Delivery) -> Result<(), Error> {
        if d.kind != im::KIND_CREATED || d.body.first() != Some(&im::CONV_READ_GROUP) {
            return Ok(());
        }
        let t = (crate::log_store::IM_GROUPS.0, d.user);
        self.append_any(st, t, wi, &d.conv.to_le_bytes())?;
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
        let ob = im::read::outbox_timeline(self.partition as u32);
        self.append_any(st, (ob.keyspace.0, ob.id), w, &im::outbox_record(conv, seq))?;
        Ok(ImApplied {
            conv_seq: seq,
            outbox: w,
            duplicate: false,
            group: false,
        })
    }

    /// A message of `sender` with `client_msg_id` among the conversation's
    /// last [`DEDUP_WINDOW`] records: its seq and write id.
    fn recent_send(&self, conv: u64, sender: u64, cmid: u64) -> Result<Option<ImApplied>, Error> {
        let recs = self
            .engine
            .scan(
                TimelineId::new(Keyspace::STORE, conv),
                u64::MAX,
                DEDUP_WINDOW,
                Direction::Backward,
            )
            .map_err(read_err)?;
        for r in recs {
            let Ok((w, ev)) = im::read::decode_event(&r.payload, conv, r.seq) else {
                continue;
            };
            if ev.kind == im::KIND_MESSAGE && ev.sender == sender && ev.client_msg_id == cmid {
                return Ok(Some(ImApplied {
                    conv_seq: r.seq,
                    outbox: w,
                    duplicate: true,
                    group: false,
                }));
            }
        }
        Ok(None)
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
                    if d.conv == conv {
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
        let bytes = serde_json::to_vec(&st.applied).map_err(sm_err)?;
        let tl = TimelineId::new(RAFT_META, 4 * self.partition + 2);
        self.engine
            .append_with(tl, &bytes, Durability::Sync)
            .map_err(sm_err)?;
        Ok(())
    }

    fn snapshot_bytes(&self, st: &State) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        for &(ks, id) in &st.timelines {
            let recs = self.records(ks, id)?;
            out.push(ks);
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&(recs.len() as u64).to_le_bytes());
            for (index, payload) in recs {
                out.extend_from_slice(&index.to_le_bytes());
                out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                out.extend_from_slice(&payload);
            }
        }
        Ok(out)
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

/// A snapshot's timelines: (keyspace, id, [(index, payload)]).
type Timelines = Vec<((u8, u64), Vec<(u64, Vec<u8>)>)>;

fn decode_snapshot(mut b: &[u8]) -> Option<Timelines> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (h, t) = b.split_at_checked(n)?;
        *b = t;
        Some(h)
    }
    fn u64_of(b: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(b, 8)?.try_into().ok()?))
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let ks = take(&mut b, 1)?[0];
        let id = u64_of(&mut b)?;
        let n = u64_of(&mut b)?;
        let mut recs = Vec::new();
        for _ in 0..n {
            let index = u64_of(&mut b)?;
            let len = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
            recs.push((index, take(&mut b, len)?.to_vec()));
        }
        out.push(((ks, id), recs));
    }
    Some(out)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let mut st = self.state.lock();
        let data = self.snapshot_bytes(&st)?;
        self.persist(&st)?;
        let meta = SnapshotMeta {
            last_log_id: st.applied.applied,
            last_membership: st.applied.membership.clone(),
            snapshot_id: format!(
                "p{}-{}",
                self.partition,
                st.applied.applied.map_or(0, |l| l.index)
            ),
        };
        st.current = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
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
                        im: None,
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
                        seqs: Vec::new(),
                        im,
                    });
                    continue;
                }
            };
            st.applied.applied = Some(e.log_id);
            out.push(Applied {
                seq,
                seqs: Vec::new(),
                im: None,
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let data = snapshot.into_inner();
        let timelines = decode_snapshot(&data)
            .ok_or_else(|| damaged(format!("snapshot {} is damaged", meta.snapshot_id)))?;
        let mut st = self.state.lock();
        st.hwm.clear();
        for (t, recs) in timelines {
            for (index, payload) in recs {
                self.append_any(&mut st, t, index, &payload)?;
            }
        }
        st.applied = AppliedState {
            applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.persist(&st)?;
        st.current = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let st = self.state.lock();
        Ok(st.current.clone().map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
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
        Entry {
            log_id: log_id(1, 1, index),
            payload: EntryPayload::Normal(Command::Append {
                keyspace: 0,
                id,
                payload: p.as_bytes().to_vec(),
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
        let create = entry(
            1,
            Command::ImCreate {
                conv: 7,
                kind: im::CONV_READ_GROUP,
                members: vec![1, 2, 3],
                ts: 1,
            },
        );
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
        assert_eq!(im::read::groups_of(&e, 2).unwrap(), vec![7, 9]);
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
        let create = entry(
            1,
            Command::ImCreate {
                conv: 7,
                kind: 2,
                members: vec![1, 2],
                ts: 1,
            },
        );
        let a = im_of(block(sm.apply([create])).unwrap()).unwrap().unwrap();
        assert_eq!((a.conv_seq, a.outbox), (1, write_id(1, 0)));
        let again = entry(
            2,
            Command::ImCreate {
                conv: 7,
                kind: 2,
                members: vec![3],
                ts: 1,
            },
        );
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
        let snap = block(builder.build_snapshot()).unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 20)));
        block(b.install_snapshot(&snap.meta, snap.snapshot)).unwrap();
        for id in 0..3 {
            assert_eq!(a.records(0, id).unwrap(), b.records(0, id).unwrap());
            let tl = TimelineId::new(Keyspace(0), id);
            assert_eq!(
                ea.last_seq(tl),
                eb.last_seq(tl),
                "timeline {id}: same SeqIds"
            );
        }
        // The applied state was persisted with the snapshot.
        let b2 = StateMachine::open(eb, 2).unwrap();
        assert_eq!(b2.state.lock().applied.applied, Some(log_id(1, 1, 20)));
        assert!(
            decode_snapshot(&[1, 2, 3]).is_none(),
            "a damaged snapshot is refused"
        );
    }
}
