//! The values the IM layer's API takes and returns.

use crate::entry::ConvKind;
use crate::{ConvId, UserId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use timeline_engine::{Durability, SeqId};

/// What a sync timeline entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryMode {
    /// The whole message (one read per sync page; more bytes written).
    #[default]
    Copy,
    /// `(conversation, seq)`, read back from the store at sync time.
    Reference,
}

/// IM layer settings.
#[derive(Debug, Clone)]
pub struct ImConfig {
    /// Groups with more members than this use read fan-out (default 500).
    pub hybrid_threshold: usize,
    pub entries: EntryMode,
    /// Durability of every store and sync write the layer makes, and so of
    /// an acknowledged send (default: group commit).
    pub durability: Durability,
    /// Requests (and worker-to-worker deliveries) a worker's mailbox holds
    /// before senders wait.
    pub queue_capacity: usize,
    /// Requests one worker turns into one engine write.
    pub max_batch: usize,
    /// Pushes a subscriber may have queued before it is told to resync.
    pub subscriber_capacity: usize,
    /// How long a `(conversation, sender, client_msg_id)` is remembered for
    /// idempotent retries (default: the sync TTL). Costs about 64 bytes per
    /// message sent within the window, and open time to rebuild it.
    pub dedup_window: Option<Duration>,
}

impl Default for ImConfig {
    fn default() -> Self {
        ImConfig {
            hybrid_threshold: 500,
            entries: EntryMode::Copy,
            durability: Durability::GroupCommit,
            queue_capacity: 4096,
            max_batch: 512,
            subscriber_capacity: 1024,
            dedup_window: None,
        }
    }
}

/// A send's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendAck {
    pub conv: ConvId,
    pub seq: SeqId,
    /// A retry of an earlier send: nothing new was written.
    pub duplicate: bool,
}

/// What an entry of a conversation (or of a user's sync timeline) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Message(Vec<u8>),
    /// A message its sender recalled (the payload is withheld).
    Recalled,
    /// A message this user deleted for itself.
    Deleted,
    /// The conversation was created. Its first members are in the store
    /// record (and in [`Im::members`]); entries leave the list out, since
    /// copying it into every member's sync timeline would cost O(members²).
    Created {
        kind: ConvKind,
    },
    MemberAdded(UserId),
    MemberRemoved(UserId),
    /// The event that recalled message `target`.
    Recall {
        target: SeqId,
    },
    /// Sync only: the user read the conversation through `conv_seq`.
    ReadMarker,
    /// Sync only: the user deleted message `conv_seq` for itself.
    DeletedMarker,
}

/// One conversation entry.
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
    /// The device's new checkpoint for this group.
    pub checkpoint: SeqId,
    pub has_more: bool,
}

/// The answer to [`Im::sync`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncReply {
    pub entries: Vec<SyncEntry>,
    pub checkpoint: SeqId,
    pub has_more: bool,
    /// `Some(first_retained)`: the checkpoint fell below what the TTL kept.
    /// Nothing was returned; roam the conversations with [`Im::history`],
    /// then sync again from `first_retained - 1`.
    pub truncated: Option<SeqId>,
    /// Read-fan-out groups with new entries; only filled once the sync
    /// timeline is drained (`has_more` false), so that a group that switched
    /// from write to read fan-out reaches the device in seq order.
    pub groups: Vec<GroupPage>,
}

/// Where a history page starts (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryFrom {
    /// Newest-first, from just below this seq (`u64::MAX`: from the newest).
    Before(SeqId),
    /// Oldest-first, from just above this seq.
    After(SeqId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub entries: Vec<Entry>,
    pub has_more: bool,
}

/// One line of [`Im::conversations`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvSummary {
    pub conv: ConvId,
    pub kind: ConvKind,
    /// The newest seq this user can see (its removal event if it left).
    pub last_seq: SeqId,
    pub read_seq: SeqId,
    /// Entries after `read_seq` up to `last_seq` that the user could read
    /// (inside its stays as a member) and did not send itself.
    pub unread: u64,
    pub member: bool,
    pub read_fanout: bool,
}

/// Counters for benchmarks: storage operations the layer issued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImStats {
    /// Conversation entries stored (messages and events).
    pub stored: u64,
    pub messages: u64,
    /// Entries written to sync timelines (write fan-out deliveries, read
    /// markers, delete markers).
    pub sync_writes: u64,
    /// Messages made visible to a receiver through a group's store timeline.
    pub read_fanout_deliveries: u64,
    pub sync_calls: u64,
    /// Range reads of sync timelines.
    pub sync_reads: u64,
    /// Range or point reads of store timelines (reference entries, group
    /// pages, history).
    pub store_reads: u64,
    /// Read-fan-out groups checked for news by a sync (each would be a read
    /// of the group's timeline without the in-memory watermark).
    pub group_polls: u64,
    /// Writes to journal and catalog timelines (bookkeeping).
    pub meta_writes: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) stored: AtomicU64,
    pub(crate) messages: AtomicU64,
    pub(crate) sync_writes: AtomicU64,
    pub(crate) read_fanout_deliveries: AtomicU64,
    pub(crate) sync_calls: AtomicU64,
    pub(crate) sync_reads: AtomicU64,
    pub(crate) store_reads: AtomicU64,
    pub(crate) group_polls: AtomicU64,
    pub(crate) meta_writes: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
