//! The values the wire carries, as the protocol's own types: this crate
//! depends on neither the engine nor the IM layer, so a client links only
//! the codec. They mirror `timeline_engine` and `timeline_im` field for
//! field (the server converts, `server/src/server/convert.rs`), and their
//! byte layouts are docs/protocol.md §7.

/// A position in a timeline (1-based, consecutive per timeline).
pub type SeqId = u64;
pub type UserId = u64;
pub type ConvId = u64;

/// Which keyspace a raw timeline is in (docs/protocol.md §7: 0 store, 1 sync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Keyspace(pub u8);

impl Keyspace {
    pub const STORE: Keyspace = Keyspace(0);
    pub const SYNC: Keyspace = Keyspace(1);
}

/// A timeline: keyspace and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimelineId {
    pub keyspace: Keyspace,
    pub id: u64,
}

impl TimelineId {
    pub const fn new(keyspace: Keyspace, id: u64) -> Self {
        TimelineId { keyspace, id }
    }
    pub const fn store(id: u64) -> Self {
        Self::new(Keyspace::STORE, id)
    }
    pub const fn sync(id: u64) -> Self {
        Self::new(Keyspace::SYNC, id)
    }
}

/// How durable an `APPEND` is when answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In the page cache: survives the process, not a power cut.
    Buffered,
    /// After a shared fdatasync (group commit).
    GroupCommit,
    /// After its own fdatasync.
    Sync,
}

/// `SCAN` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// A raw timeline record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: SeqId,
    pub timestamp_ms: u64,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    Direct,
    Group,
}

/// What a conversation entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Message(Vec<u8>),
    /// A message its sender recalled (the payload is withheld).
    Recalled,
    /// A message this user deleted for itself.
    Deleted,
    Created {
        kind: ConvKind,
    },
    MemberAdded(UserId),
    MemberRemoved(UserId),
    /// The sender recalled message `target`.
    Recall {
        target: SeqId,
    },
    /// A read marker moved (the user's other devices learn it by syncing).
    ReadMarker,
    /// A delete-for-me (ditto).
    DeletedMarker,
}

/// An entry of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub conv: ConvId,
    pub conv_seq: SeqId,
    pub sender: UserId,
    pub timestamp_ms: u64,
    pub body: Body,
}

/// An entry of a user's sync timeline: its sync seq and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEntry {
    pub seq: SeqId,
    pub entry: Entry,
}

/// New entries of one read-fan-out group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPage {
    pub conv: ConvId,
    pub entries: Vec<Entry>,
    pub checkpoint: SeqId,
    pub has_more: bool,
}

/// A `SYNC` answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncReply {
    pub entries: Vec<SyncEntry>,
    pub checkpoint: SeqId,
    pub has_more: bool,
    /// With `Some(first_retained)`: the checkpoint fell behind the TTL.
    pub truncated: Option<SeqId>,
    pub groups: Vec<GroupPage>,
}

/// Where a `HISTORY` page starts (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryFrom {
    Before(SeqId),
    After(SeqId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub entries: Vec<Entry>,
    pub has_more: bool,
}

/// A row of `CONVERSATIONS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSummary {
    pub conv: ConvId,
    pub kind: ConvKind,
    pub last_seq: SeqId,
    pub read_seq: SeqId,
    pub unread: u64,
    pub member: bool,
    pub read_fanout: bool,
}

/// A `SEND` acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendAck {
    pub conv: ConvId,
    pub seq: SeqId,
    /// A retry of an already stored message (same `client_msg_id`).
    pub duplicate: bool,
}

/// A PUSH frame's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// A new, durable entry of the user's sync timeline.
    Entry { user: UserId, entry: SyncEntry },
    /// A new, durable entry of one of the user's read-fan-out groups.
    Group { user: UserId, entry: Entry },
    /// Pushes were dropped: sync from the device's checkpoint.
    Resync,
}
