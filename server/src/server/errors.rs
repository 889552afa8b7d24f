//! Every error a request can meet in the engine or the IM layer, as the
//! wire's error reply (docs/protocol.md §9). The codec's own errors and the
//! credentials' map in `timeline_protocol`; these live here because the
//! protocol crate knows neither the engine nor the IM layer.

use crate::protocol::{ErrorCode, ErrorReply};
use timeline_im::ImError;

/// An error as the client will read it.
pub(crate) trait ToReply {
    fn reply(&self) -> ErrorReply;
}

impl ToReply for ErrorReply {
    fn reply(&self) -> ErrorReply {
        self.clone()
    }
}

impl ToReply for timeline_engine::Error {
    fn reply(&self) -> ErrorReply {
        let e = self;
        use timeline_engine::Error as E;
        let (code, arg) = match e {
            E::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                (ErrorCode::STORAGE_FULL, 0)
            }
            E::Io { .. } => (ErrorCode::IO_ERROR, 0),
            E::Corruption { .. } | E::UnsupportedVersion { .. } => (ErrorCode::CORRUPTION, 0),
            E::PayloadTooLarge { max, .. } => (ErrorCode::PAYLOAD_TOO_LARGE, *max as u64),
            E::Truncated { first_retained, .. } => (ErrorCode::TRUNCATED, *first_retained),
            // `NotLast` is answered inside the engine (`append_after`); no
            // request reaches it.
            E::InvalidArgument(_) | E::NotLast { .. } => (ErrorCode::INVALID_ARGUMENT, 0),
            E::Poisoned { .. } => (ErrorCode::POISONED, 0),
            E::Closed => (ErrorCode::CLOSED, 0),
        };
        ErrorReply::new(code, arg, e.to_string())
    }
}

impl ToReply for ImError {
    fn reply(&self) -> ErrorReply {
        let e = self;
        let (code, arg) = match e {
            ImError::Engine(inner) => return inner.reply(),
            ImError::Corrupt(_) => (ErrorCode::CORRUPTION, 0),
            ImError::NoSuchConversation(conv) => (ErrorCode::NO_SUCH_CONVERSATION, *conv),
            ImError::ConversationExists(conv) => (ErrorCode::CONVERSATION_EXISTS, *conv),
            ImError::NotMember { user, .. } => (ErrorCode::NOT_MEMBER, *user),
            ImError::AlreadyMember { user, .. } => (ErrorCode::ALREADY_MEMBER, *user),
            ImError::InvalidArgument(_) => (ErrorCode::INVALID_ARGUMENT, 0),
            ImError::FanoutFailed { seq, .. } => (ErrorCode::FANOUT_FAILED, *seq),
            ImError::Closed => (ErrorCode::CLOSED, 0),
            // The server retries a full worker itself (dispatch::admit).
            ImError::Busy => (ErrorCode::INTERNAL, 0),
        };
        ErrorReply::new(code, arg, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use timeline_engine::Error as E;

    fn code_arg(r: ErrorReply) -> (ErrorCode, u64) {
        assert!(!r.message.is_empty());
        (r.code, r.arg)
    }

    #[test]
    fn engine_errors_map_to_stable_codes() {
        let io = |kind| E::Io {
            path: PathBuf::from("/d"),
            source: std::io::Error::from(kind),
        };
        let cases = [
            (
                io(std::io::ErrorKind::StorageFull),
                ErrorCode::STORAGE_FULL,
                0,
            ),
            (io(std::io::ErrorKind::Other), ErrorCode::IO_ERROR, 0),
            (
                E::Corruption {
                    path: "/d".into(),
                    offset: 1,
                    what: "x".into(),
                },
                ErrorCode::CORRUPTION,
                0,
            ),
            (
                E::UnsupportedVersion {
                    path: "/d".into(),
                    found: 9,
                    supported: 1,
                },
                ErrorCode::CORRUPTION,
                0,
            ),
            (
                E::PayloadTooLarge { len: 9, max: 8 },
                ErrorCode::PAYLOAD_TOO_LARGE,
                8,
            ),
            (
                E::Truncated {
                    timeline: 1,
                    requested: 2,
                    first_retained: 77,
                },
                ErrorCode::TRUNCATED,
                77,
            ),
            (
                E::InvalidArgument("seq 0".into()),
                ErrorCode::INVALID_ARGUMENT,
                0,
            ),
            (
                E::Poisoned {
                    keyspace: "store".to_string(),
                    shard: 1,
                    reason: "x".into(),
                },
                ErrorCode::POISONED,
                0,
            ),
            (E::Closed, ErrorCode::CLOSED, 0),
        ];
        for (e, code, arg) in cases {
            assert_eq!(code_arg(e.reply()), (code, arg), "{e}");
            // Wrapped in the IM layer's error: the same code.
            assert_eq!(code_arg(ImError::Engine(e).reply()), (code, arg));
        }
    }

    #[test]
    fn im_errors_map_to_stable_codes() {
        let cases = [
            (
                ImError::NoSuchConversation(5),
                ErrorCode::NO_SUCH_CONVERSATION,
                5,
            ),
            (
                ImError::ConversationExists(5),
                ErrorCode::CONVERSATION_EXISTS,
                5,
            ),
            (
                ImError::NotMember { conv: 5, user: 9 },
                ErrorCode::NOT_MEMBER,
                9,
            ),
            (
                ImError::AlreadyMember { conv: 5, user: 9 },
                ErrorCode::ALREADY_MEMBER,
                9,
            ),
            (
                ImError::InvalidArgument("x".into()),
                ErrorCode::INVALID_ARGUMENT,
                0,
            ),
            (
                ImError::FanoutFailed {
                    conv: 5,
                    seq: 12,
                    reason: "disk".into(),
                },
                ErrorCode::FANOUT_FAILED,
                12,
            ),
            (ImError::Closed, ErrorCode::CLOSED, 0),
        ];
        for (e, code, arg) in cases {
            assert_eq!(code_arg(e.reply()), (code, arg), "{e}");
        }
    }
}
