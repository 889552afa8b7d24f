//! The IM layer's error type.

use super::{ConvId, UserId};

pub type Result<T, E = ImError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ImError {
    /// The storage engine failed (I/O, corruption, a poisoned shard, ...).
    #[error(transparent)]
    Engine(#[from] crate::Error),
    /// An IM record failed to decode: a damaged file or a foreign record.
    #[error("{0}")]
    Corrupt(#[from] super::entry::DecodeError),
    #[error("conversation {0} does not exist")]
    NoSuchConversation(ConvId),
    #[error("conversation {0} already exists")]
    ConversationExists(ConvId),
    #[error("user {user} is not a member of conversation {conv}")]
    NotMember { conv: ConvId, user: UserId },
    #[error("user {user} is already a member of conversation {conv}")]
    AlreadyMember { conv: ConvId, user: UserId },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The message was stored at `seq` (it is in the conversation's history)
    /// but delivering it to sync timelines failed; reopening completes the
    /// fan-out from the journal.
    #[error("conversation {conv} seq {seq} was stored but its fan-out failed: {reason}")]
    FanoutFailed {
        conv: ConvId,
        seq: u64,
        reason: String,
    },
    /// The IM layer is shutting down.
    #[error("IM layer is closed")]
    Closed,
}
