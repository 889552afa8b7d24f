//! IM across partitions: the records a conversation's partition and a
//! user's partition keep, and what travels between them (docs/scaling.md,
//! "IM across partitions").
//!
//! - A conversation's store timeline (store keyspace, id = conv) lives in
//!   the conversation's partition: seq 1 is its `Created` event (kind and
//!   members), every later seq a message. A `SEND` is one Raft entry of
//!   that partition; applying it writes the message and an **outbox**
//!   record `(conv, conv_seq)`, in the same entry.
//! - The conversation partition's leader **delivers** the outbox in order:
//!   each member's sync entry goes to the member's partition (sync
//!   keyspace, id = user) as one `Deliver` entry per target partition; once
//!   every target has applied it, a `Delivered` entry moves the partition's
//!   **done** mark. A new leader starts again from the done mark.
//! - Deliveries of one conversation to one user arrive in conv_seq order
//!   (the outbox is delivered in order, a batch is retried whole before
//!   anything after it goes), so the user's partition applies a delivery
//!   only if its conv_seq is above the last one it holds for that
//!   (user, conversation): a re-driven delivery is never written twice.
//!
//! Every record here is sans-I/O bytes, little-endian, decoded with every
//! length checked.

use serde::{Deserialize, Serialize};

/// Timeline ids (plus the partition) of each partition's outbox and done
/// mark, in keyspace `im-outbox` (module [`crate::outbox`]; before it,
/// in `raft-meta`, where [`crate::state_machine`] still finds them once).
pub const OUTBOX_BASE: u64 = 1 << 40;
pub const DONE_BASE: u64 = 2 << 40;

/// Store event kinds (the first byte of a conversation's record).
pub const KIND_MESSAGE: u8 = 1;
pub const KIND_CREATED: u8 = 2;
/// A recall: its sender is the recalling user, its body the recalled
/// message's seq (u64). Stored and delivered like a message.
pub const KIND_RECALL: u8 = 3;

/// A membership change (`ADD_MEMBER`, `REMOVE_MEMBER`; module
/// [`crate::members`]): sender 0, the body the user (u64). Delivered to
/// the members at its seq (the user it names included) with the
/// conversation kind after the user (`user u64 | conv kind u8`), so that
/// the added user's partition lists the conversation.
pub const KIND_MEMBER_ADDED: u8 = 6;
pub const KIND_MEMBER_REMOVED: u8 = 7;

/// Sync-only kinds (a user's own marks, written by the user's partition;
/// the record's `conv_seq` is the mark's seq, its sender the user, its
/// body empty): the user read `conv` through `conv_seq`, or deleted
/// message `conv_seq` for itself.
pub const KIND_READ_MARKER: u8 = 4;
pub const KIND_DELETED_MARKER: u8 = 5;

/// Conversation kinds (a `Created` event's first body byte): a direct
/// conversation and a group, both written fan-out, and a group read
/// fan-out (module [`crate::groups`]): its messages stay in its partition.
pub const CONV_DIRECT: u8 = 1;
pub const CONV_GROUP: u8 = 2;
pub const CONV_READ_GROUP: u8 = 3;

/// A conversation store record (after the write id):
/// `kind u8 | sender u64 | ts u64 | client_msg_id u64 | body`; a
/// `Created` body is `conv kind u8 | members u64 × n`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreEvent {
    pub kind: u8,
    pub sender: u64,
    pub ts: u64,
    pub client_msg_id: u64,
    pub body: Vec<u8>,
}

const EVENT_HEAD: usize = 25;

impl StoreEvent {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(EVENT_HEAD + self.body.len());
        b.push(self.kind);
        b.extend_from_slice(&self.sender.to_le_bytes());
        b.extend_from_slice(&self.ts.to_le_bytes());
        b.extend_from_slice(&self.client_msg_id.to_le_bytes());
        b.extend_from_slice(&self.body);
        b
    }

    pub fn decode(b: &[u8]) -> Option<StoreEvent> {
        if b.len() < EVENT_HEAD {
            return None;
        }
        Some(StoreEvent {
            kind: b[0],
            sender: u64_at(b, 1)?,
            ts: u64_at(b, 9)?,
            client_msg_id: u64_at(b, 17)?,
            body: b[EVENT_HEAD..].to_vec(),
        })
    }

    /// A `Created` event's conversation kind and members.
    pub fn created(&self) -> Option<(u8, Vec<u64>)> {
        if self.kind != KIND_CREATED
            || self.body.is_empty()
            || !(self.body.len() - 1).is_multiple_of(8)
        {
            return None;
        }
        let members = self.body[1..]
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
            .collect();
        Some((self.body[0], members))
    }

    pub fn created_body(kind: u8, members: &[u64]) -> Vec<u8> {
        let mut b = Vec::with_capacity(1 + 8 * members.len());
        b.push(kind);
        for m in members {
            b.extend_from_slice(&m.to_le_bytes());
        }
        b
    }
}

/// One member's sync entry on its way to the member's partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub user: u64,
    pub conv: u64,
    pub conv_seq: u64,
    pub sender: u64,
    pub ts: u64,
    pub kind: u8,
    /// A message's payload; a `Created` event's conversation kind (1 byte).
    pub body: Vec<u8>,
}

const SYNC_HEAD: usize = 33;

impl Delivery {
    /// The user's sync record (after the write id):
    /// `conv u64 | conv_seq u64 | sender u64 | ts u64 | kind u8 | body`.
    pub fn sync_record(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SYNC_HEAD + self.body.len());
        b.extend_from_slice(&self.conv.to_le_bytes());
        b.extend_from_slice(&self.conv_seq.to_le_bytes());
        b.extend_from_slice(&self.sender.to_le_bytes());
        b.extend_from_slice(&self.ts.to_le_bytes());
        b.push(self.kind);
        b.extend_from_slice(&self.body);
        b
    }

    /// A user's own mark (not a delivery from the conversation).
    pub fn is_mark(&self) -> bool {
        matches!(self.kind, KIND_READ_MARKER | KIND_DELETED_MARKER)
    }

    /// The conversation kind, if this delivery makes its user a member
    /// (`Created`, or its own `MemberAdded`): its partition lists the
    /// conversation among the user's.
    pub fn joins(&self) -> Option<u8> {
        match self.kind {
            KIND_CREATED => Some(self.body.first().copied().unwrap_or(CONV_GROUP)),
            KIND_MEMBER_ADDED if self.names_user() => self.body.get(8).copied(),
            _ => None,
        }
    }

    /// Does this delivery list a read-fan-out group among its user's
    /// groups: the user joins it (`Created`, its own `MemberAdded`), or
    /// another's `MemberAdded` switched it to read fan-out (only the
    /// switching event of a read-fan-out group reaches the other members)?
    pub fn lists_group(&self) -> bool {
        match self.kind {
            KIND_MEMBER_ADDED => self.body.get(8) == Some(&CONV_READ_GROUP),
            _ => self.joins() == Some(CONV_READ_GROUP),
        }
    }

    /// The seq a `Recall` delivery recalls (listed among the user's
    /// recalled messages with its sync entry).
    pub fn recalls(&self) -> Option<u64> {
        match self.kind {
            KIND_RECALL => u64_at(&self.body, 0),
            _ => None,
        }
    }

    /// The conversation kind, if this delivery is its user's own removal.
    pub fn leaves(&self) -> Option<u8> {
        match self.kind {
            KIND_MEMBER_REMOVED if self.names_user() => self.body.get(8).copied(),
            _ => None,
        }
    }

    fn names_user(&self) -> bool {
        u64_at(&self.body, 0) == Some(self.user)
    }

    /// A sync record back (the user is the timeline's id).
    pub fn from_sync_record(user: u64, b: &[u8]) -> Option<Delivery> {
        if b.len() < SYNC_HEAD {
            return None;
        }
        Some(Delivery {
            user,
            conv: u64_at(b, 0)?,
            conv_seq: u64_at(b, 8)?,
            sender: u64_at(b, 16)?,
            ts: u64_at(b, 24)?,
            kind: b[32],
            body: b[SYNC_HEAD..].to_vec(),
        })
    }
}

/// Told of every sync entry a replica on this node applied (the server
/// pushes it to the user's subscribed devices). Called on the applying
/// thread: it must not block.
pub trait DeliveryHook: Send + Sync {
    fn delivered(&self, seq: u64, d: &Delivery);

    /// A message to read-fan-out group `conv` was stored at `conv_seq`
    /// (told on every node, by the conversation partition's leader: a
    /// hint, lost with the leader or a peer link).
    fn group_message(&self, _conv: u64, _conv_seq: u64, _ev: &StoreEvent) {}

    /// This node gave up its replica of `partition` (of `partitions`): it
    /// applies none of its entries from now on, so it pushes none of them.
    fn partition_left(&self, _partition: u32, _partitions: u32) {}

    /// The read-fan-out groups with a member subscribed on this node (its
    /// interest, registered with their partitions: module
    /// `crate::interest`).
    fn watched_groups(&self) -> Vec<u64> {
        Vec::new()
    }
}

/// Where a node's state machines find the hook, once the server set it.
pub type HookSlot = std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn DeliveryHook>>>;

/// An outbox record (after the write id): `conv u64 | conv_seq u64`.
pub fn outbox_record(conv: u64, conv_seq: u64) -> [u8; 16] {
    pair(conv, conv_seq)
}

pub fn decode_outbox(b: &[u8]) -> Option<(u64, u64)> {
    unpair(b)
}

/// Two u64s, little-endian (an outbox record, a done mark).
pub(crate) fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&a.to_le_bytes());
    r[8..].copy_from_slice(&b.to_le_bytes());
    r
}

/// [`pair`]'s two u64s, if `b` is exactly that.
pub(crate) fn unpair(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() != 16 {
        return None;
    }
    Some((u64_at(b, 0)?, u64_at(b, 8)?))
}

/// Why a conversation write was refused (deterministic: every replica
/// refuses it the same way, and nothing is written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ImRefusal {
    #[error("conversation {0} already exists")]
    Exists(u64),
    #[error("no conversation {0}")]
    NoConversation(u64),
    #[error("user {user} is not a member of conversation {conv}")]
    NotMember { conv: u64, user: u64 },
    #[error("user {user} is already a member of conversation {conv}")]
    AlreadyMember { conv: u64, user: u64 },
    #[error("conversation {0}'s first record is not its Created event")]
    Damaged(u64),
    /// Its store or sync record would exceed the engine's record limit.
    #[error("a record of {size} bytes; this node's records hold at most {max}")]
    TooLarge { size: usize, max: usize },
    /// A recall or mark naming a seq it cannot (not the user's message,
    /// recalled already, past the conversation's end).
    #[error("{0}")]
    Invalid(String),
}

/// What a message adds to its payload in the largest record it becomes:
/// its Raft entry (the `ImSend`, or a `Deliver` of it alone) is larger
/// than its store record (write id + 25) and its sync records (+ 41).
pub const RECORD_OVERHEAD: usize = crate::ENTRY_OVERHEAD + crate::ITEM_OVERHEAD;

/// Reads of a partition's IM records from a node's engine (the leader's
/// deliverer, the server's reads, the state machine's checks).
pub mod read {
    use super::*;
    use crate::members::{Change, Members};
    use crate::state_machine::payload_of;
    use timeline_engine::{Direction, Engine, Keyspace, TimelineId};

    /// A read failure: the engine's, or a record that does not decode.
    #[derive(Debug, thiserror::Error)]
    pub enum ReadError {
        #[error("{0}")]
        Engine(#[from] timeline_engine::Error),
        #[error("damaged IM record: {0}")]
        Damaged(String),
    }

    /// The write id and the rest of a stored record.
    fn split(b: &[u8]) -> Option<(u64, &[u8])> {
        Some((u64_at(b, 0)?, payload_of(b)?))
    }

    pub use crate::outbox::{done, done_timeline, outbox_timeline};

    /// One outbox record: its seq, its write id (the message's), and the
    /// message it stands for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Pending {
        pub seq: u64,
        pub write_id: u64,
        pub conv: u64,
        pub conv_seq: u64,
    }

    /// Up to `limit` outbox records after seq `after` (from the first one
    /// kept, if records after it were released and dropped: a replica
    /// given up and taken again without its done mark).
    pub fn outbox_after(
        e: &Engine,
        partition: u32,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Pending>, ReadError> {
        let tl = outbox_timeline(partition);
        let from = after.saturating_add(1).max(e.first_retained_seq(tl)?);
        let recs = e.scan(tl, from, limit, Direction::Forward)?;
        recs.iter()
            .map(|r| {
                let (w, b) = split(&r.payload)
                    .ok_or_else(|| ReadError::Damaged(format!("outbox record {}", r.seq)))?;
                let (conv, conv_seq) = decode_outbox(b)
                    .ok_or_else(|| ReadError::Damaged(format!("outbox record {}", r.seq)))?;
                Ok(Pending {
                    seq: r.seq,
                    write_id: w,
                    conv,
                    conv_seq,
                })
            })
            .collect()
    }

    /// The newest outbox seq (0: none).
    pub fn outbox_last(e: &Engine, partition: u32) -> u64 {
        e.last_seq(outbox_timeline(partition))
    }

    /// Conversation `conv`'s event at `seq`, with its write id.
    pub fn event(e: &Engine, conv: u64, seq: u64) -> Result<Option<(u64, StoreEvent)>, ReadError> {
        let Some(r) = e.get(TimelineId::new(Keyspace::STORE, conv), seq)? else {
            return Ok(None);
        };
        decode_event(&r.payload, conv, seq).map(Some)
    }

    pub fn decode_event(b: &[u8], conv: u64, seq: u64) -> Result<(u64, StoreEvent), ReadError> {
        split(b)
            .and_then(|(w, b)| StoreEvent::decode(b).map(|ev| (w, ev)))
            .ok_or_else(|| ReadError::Damaged(format!("conversation {conv} seq {seq}")))
    }

    /// The read-fan-out groups `user` was ever in, in the order first
    /// joined, each with whether it is in it now (from this node's replica
    /// of the user's partition: a record `conv` per join, `conv | 0` per
    /// removal).
    pub fn groups_of(e: &Engine, user: u64) -> Result<Vec<(u64, bool)>, ReadError> {
        let tl = TimelineId::new(crate::log_store::IM_GROUPS, user);
        let mut out: Vec<(u64, bool)> = Vec::new();
        for (seq, _, b) in all(e, tl)? {
            let (conv, now) = match (b.len(), u64_at(&b, 0)) {
                (8, Some(c)) => (c, true),
                (9, Some(c)) if b[8] == 0 => (c, false),
                _ => {
                    return Err(ReadError::Damaged(format!(
                        "user {user}'s group record {seq}"
                    )))
                }
            };
            // A re-driven join may list a group twice.
            match out.iter_mut().find(|g| g.0 == conv) {
                Some(g) => g.1 = now,
                None => out.push((conv, now)),
            }
        }
        Ok(out)
    }

    const GROUPS_PAGE: usize = 1024;

    /// Every record of `tl` (write id and the rest), oldest first.
    fn all(e: &Engine, tl: TimelineId) -> Result<Vec<(u64, u64, Vec<u8>)>, ReadError> {
        all_from(e, tl, 1)
    }

    /// Every record of `tl` from seq `from` on: (seq, write id, the rest).
    fn all_from(
        e: &Engine,
        tl: TimelineId,
        mut from: u64,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>, ReadError> {
        let mut out = Vec::new();
        loop {
            let page = e.scan(tl, from, GROUPS_PAGE, Direction::Forward)?;
            for r in &page {
                let (w, b) = split(&r.payload).ok_or_else(|| {
                    ReadError::Damaged(format!(
                        "timeline {}/{} record {}: no write id",
                        tl.keyspace.0, tl.id, r.seq
                    ))
                })?;
                out.push((r.seq, w, b.to_vec()));
            }
            match page.last() {
                Some(r) if page.len() == GROUPS_PAGE => from = r.seq + 1,
                _ => return Ok(out),
            }
        }
    }

    /// Conversation `conv`'s recalled messages: (write id of the recall,
    /// recalled seq), in recall order (module [`crate::marks`]).
    pub fn recalls(e: &Engine, conv: u64) -> Result<Vec<(u64, u64)>, ReadError> {
        let tl = TimelineId::new(crate::log_store::IM_RECALLS, conv);
        all(e, tl)?
            .into_iter()
            .map(|(seq, w, b)| match (b.len(), u64_at(&b, 0)) {
                (8, Some(t)) => Ok((w, t)),
                _ => Err(ReadError::Damaged(format!(
                    "conversation {conv}'s recall record {seq}"
                ))),
            })
            .collect()
    }

    /// Is store timeline `conv` a conversation's (created on this
    /// replica)? An index lookup.
    pub fn is_conversation(e: &Engine, conv: u64) -> bool {
        e.last_seq(TimelineId::new(crate::log_store::IM_CREATED, conv)) > 0
    }

    /// The conversations `user` is in and their kinds, in the order joined
    /// (from this node's replica of the user's partition).
    pub fn convs_of(e: &Engine, user: u64) -> Result<Vec<(u64, u8)>, ReadError> {
        let tl = TimelineId::new(crate::log_store::IM_CONVS, user);
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (seq, _, b) in all(e, tl)? {
            let conv = (b.len() == 9)
                .then(|| u64_at(&b, 0))
                .flatten()
                .ok_or_else(|| {
                    ReadError::Damaged(format!("user {user}'s conversation record {seq}"))
                })?;
            // A re-driven join may list a conversation twice.
            if seen.insert(conv) {
                out.push((conv, b[8]));
            }
        }
        Ok(out)
    }

    /// The seqs of `conv` that `user` deleted for itself (from this
    /// node's replica of the user's partition), in the order deleted.
    pub fn deletes(e: &Engine, user: u64, conv: u64) -> Result<Vec<u64>, ReadError> {
        Ok(deleted(e, user)?
            .into_iter()
            .filter(|d| d.0 == conv)
            .map(|d| d.1)
            .collect())
    }

    /// Every (conversation, seq) `user` deleted for itself, in the order
    /// deleted (from this node's replica of the user's partition; an
    /// index lookup when there is none).
    pub fn deleted(e: &Engine, user: u64) -> Result<Vec<(u64, u64)>, ReadError> {
        conv_seqs(
            e,
            TimelineId::new(crate::log_store::IM_DELETES, user),
            "delete",
        )
    }

    /// Every (conversation, seq) recalled by a `Recall` entry in `user`'s
    /// sync timeline, in delivery order (from this node's replica of the
    /// user's partition; an index lookup when there is none).
    pub fn recalled(e: &Engine, user: u64) -> Result<Vec<(u64, u64)>, ReadError> {
        conv_seqs(
            e,
            TimelineId::new(crate::log_store::IM_RECALLED, user),
            "recall",
        )
    }

    /// The `conv u64 | seq u64` records of a user's timeline `tl`.
    fn conv_seqs(e: &Engine, tl: TimelineId, what: &str) -> Result<Vec<(u64, u64)>, ReadError> {
        if e.last_seq(tl) == 0 {
            return Ok(Vec::new());
        }
        all(e, tl)?
            .into_iter()
            .map(|(seq, _, b)| {
                (b.len() == 16)
                    .then(|| Some((u64_at(&b, 0)?, u64_at(&b, 8)?)))
                    .flatten()
                    .ok_or_else(|| {
                        ReadError::Damaged(format!("user {}'s {what} record {seq}", tl.id))
                    })
            })
            .collect()
    }

    /// Every read marker of `user`'s, by conversation.
    pub fn read_markers(
        e: &Engine,
        user: u64,
    ) -> Result<std::collections::HashMap<u64, u64>, ReadError> {
        let tl = TimelineId::new(crate::log_store::IM_READS, user);
        let mut out = std::collections::HashMap::new();
        for (seq, _, b) in all(e, tl)? {
            let (conv, at) = (b.len() == 16)
                .then(|| Some((u64_at(&b, 0)?, u64_at(&b, 8)?)))
                .flatten()
                .ok_or_else(|| {
                    ReadError::Damaged(format!("user {user}'s read marker record {seq}"))
                })?;
            // Markers only rise: the newest is the largest.
            out.insert(conv, at);
        }
        Ok(out)
    }

    /// The last seq of conversation `conv` that `stays` reach, and how
    /// many entries after `read` up to it, inside the stays, `user` has
    /// not sent itself (those a store TTL dropped are not counted): read
    /// from the store, so it costs in proportion to the unread entries.
    pub fn unread(
        e: &Engine,
        conv: u64,
        user: u64,
        read: u64,
        stays: &crate::members::Stays,
    ) -> Result<(u64, u64), ReadError> {
        const PAGE: usize = 1024;
        let tl = TimelineId::new(Keyspace::STORE, conv);
        let last = crate::members::upper(stays, e.last_seq(tl));
        let mut unread = 0;
        for &(join, leave) in stays {
            let hi = leave.min(last);
            let mut from = read
                .saturating_add(1)
                .max(join)
                .max(e.first_retained_seq(tl)?);
            while from <= hi {
                let n = ((hi - from + 1).min(PAGE as u64)) as usize;
                let recs = match e.scan(tl, from, n, Direction::Forward) {
                    Err(timeline_engine::Error::Truncated { first_retained, .. })
                        if first_retained > from =>
                    {
                        from = first_retained;
                        continue;
                    }
                    r => r?,
                };
                let Some(end) = recs.last().map(|r| r.seq) else {
                    break;
                };
                for r in recs.iter().filter(|r| r.seq <= hi) {
                    let (_, ev) = decode_event(&r.payload, conv, r.seq)?;
                    let own = matches!(ev.kind, KIND_MESSAGE | KIND_RECALL) && ev.sender == user;
                    unread += u64::from(!own);
                }
                from = end + 1;
            }
        }
        Ok((last, unread))
    }

    /// `user`'s read marker in `conv` and the write id that moved it there
    /// ((0, 0): never marked): its newest record in the user's `IM_READS`
    /// timeline (read back from the newest; a marker rarely moves).
    pub fn read_marker(e: &Engine, user: u64, conv: u64) -> Result<(u64, u64), ReadError> {
        let tl = TimelineId::new(crate::log_store::IM_READS, user);
        let mut from = u64::MAX;
        loop {
            let page = e.scan(tl, from, GROUPS_PAGE, Direction::Backward)?;
            for r in &page {
                let mark = split(&r.payload)
                    .filter(|(_, b)| b.len() == 16)
                    .and_then(|(w, b)| Some((w, u64_at(b, 0)?, u64_at(b, 8)?)))
                    .ok_or_else(|| {
                        ReadError::Damaged(format!("user {user}'s read marker record {}", r.seq))
                    })?;
                if mark.1 == conv {
                    return Ok((mark.0, mark.2));
                }
            }
            match page.last() {
                Some(r) if page.len() == GROUPS_PAGE && r.seq > 1 => from = r.seq - 1,
                _ => return Ok((0, 0)),
            }
        }
    }

    /// Conversation `conv`'s kind and members (module
    /// [`crate::members`]), or why it has none.
    pub fn members(e: &Engine, conv: u64) -> Result<Result<Members, ImRefusal>, ReadError> {
        // Only a registered conversation (its create applied here) is one:
        // a raw APPEND to another store id is a timeline, whatever its
        // first record's bytes look like.
        if !is_conversation(e, conv) {
            return Ok(Err(ImRefusal::NoConversation(conv)));
        }
        // A record that does not decode (a damaged file) is a refusal,
        // never an error: applying must not fail on stored data.
        let (kind, created) = match event(e, conv, 1) {
            Ok(None) => return Ok(Err(ImRefusal::NoConversation(conv))),
            Ok(Some((_, ev))) => match ev.created() {
                Some(c) => c,
                None => return Ok(Err(ImRefusal::Damaged(conv))),
            },
            Err(ReadError::Damaged(_)) => return Ok(Err(ImRefusal::Damaged(conv))),
            Err(e) => return Err(e),
        };
        let (changes, listed) = changes_from(e, conv, 1)?;
        Ok(Ok(Members::new(kind, created, changes).through(listed)))
    }

    /// `base` (conversation `conv`'s members as read before) with the
    /// changes listed since it was read.
    pub fn members_since(e: &Engine, conv: u64, base: &Members) -> Result<Members, ReadError> {
        let (more, listed) = changes_from(e, conv, base.listed() + 1)?;
        Ok(base.extended(&more, listed.max(base.listed())))
    }

    /// The membership changes of `conv` listed from seq `from` on, and the
    /// last seq read (0: none).
    fn changes_from(e: &Engine, conv: u64, from: u64) -> Result<(Vec<Change>, u64), ReadError> {
        let tl = TimelineId::new(crate::log_store::IM_MEMBERS, conv);
        if e.last_seq(tl) < from {
            return Ok((Vec::new(), 0));
        }
        let mut changes = Vec::new();
        let mut listed = 0;
        for (seq, w, b) in all_from(e, tl, from)? {
            let c = Change::decode(w, &b).ok_or_else(|| {
                ReadError::Damaged(format!("conversation {conv}'s membership record {seq}"))
            })?;
            changes.push(c);
            listed = seq;
        }
        Ok((changes, listed))
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)?.try_into().ok().map(u64::from_le_bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_short_ones_are_refused() {
        let e = StoreEvent {
            kind: KIND_CREATED,
            sender: 0,
            ts: 5,
            client_msg_id: 0,
            body: StoreEvent::created_body(2, &[7, 8, 9]),
        };
        let d = StoreEvent::decode(&e.encode()).unwrap();
        assert_eq!(d, e);
        assert_eq!(d.created(), Some((2, vec![7, 8, 9])));
        assert_eq!(StoreEvent::decode(&e.encode()[..24]), None);
        let mut odd = e.clone();
        odd.body.push(1);
        assert_eq!(odd.created(), None);
        let v = Delivery {
            user: 3,
            conv: 4,
            conv_seq: 5,
            sender: 6,
            ts: 7,
            kind: KIND_MESSAGE,
            body: b"hi".to_vec(),
        };
        assert_eq!(
            Delivery::from_sync_record(3, &v.sync_record()),
            Some(v.clone())
        );
        assert_eq!(Delivery::from_sync_record(3, &v.sync_record()[..32]), None);
        assert_eq!(decode_outbox(&outbox_record(9, 10)), Some((9, 10)));
        assert_eq!(decode_outbox(&[0; 15]), None);
    }
}
