//! The IM layer's error type.

use crate::{ConvId, UserId};

pub type Result<T, E = ImError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ImError {
    /// The storage engine failed (I/O, corruption, a poisoned shard, ...).
    #[error(transparent)]
    Engine(#[from] timeline_engine::Error),
    /// An IM record failed to decode: a damaged file or a foreign record.
    #[error("{0}")]
    Corrupt(#[from] crate::entry::DecodeError),
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
    /// but writing it to its members' sync timelines failed for now (a full
    /// disk, an I/O error). The delivery is not dropped: the layer retries
    /// it on its own until it is durable (and recovery re-drives it after a
    /// crash). Retry with the same `client_msg_id` to learn when it is done:
    /// the retry answers this error again while delivery is pending, then
    /// `Ok` with `duplicate: true` and the same seq. Never resend under a
    /// new id: that would store the message twice.
    #[error("conversation {conv} seq {seq} was stored; delivery to its members' sync timelines is pending and retried: {reason}")]
    FanoutFailed {
        conv: ConvId,
        seq: u64,
        reason: String,
    },
    /// The IM layer is shutting down.
    #[error("IM layer is closed")]
    Closed,
    /// A [`NoWait`](crate::NoWait) call found the worker's queue full:
    /// nothing was queued; retry once its [`RoomWaker`](crate::RoomWaker)
    /// runs.
    #[error("the IM worker's queue is full; retry when it has room")]
    Busy,
}

impl ImError {
    /// An equal error for a second waiter (see [`timeline_engine::Error::duplicate`]).
    pub fn duplicate(&self) -> ImError {
        match self {
            ImError::Engine(e) => ImError::Engine(e.duplicate()),
            ImError::Corrupt(e) => ImError::Corrupt(e.clone()),
            ImError::NoSuchConversation(c) => ImError::NoSuchConversation(*c),
            ImError::ConversationExists(c) => ImError::ConversationExists(*c),
            ImError::NotMember { conv, user } => ImError::NotMember {
                conv: *conv,
                user: *user,
            },
            ImError::AlreadyMember { conv, user } => ImError::AlreadyMember {
                conv: *conv,
                user: *user,
            },
            ImError::InvalidArgument(s) => ImError::InvalidArgument(s.clone()),
            ImError::FanoutFailed { conv, seq, reason } => ImError::FanoutFailed {
                conv: *conv,
                seq: *seq,
                reason: reason.clone(),
            },
            ImError::Closed => ImError::Closed,
            ImError::Busy => ImError::Busy,
        }
    }
}
