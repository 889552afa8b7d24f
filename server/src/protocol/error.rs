//! The codec's error type, and the mapping from every error a request can
//! meet (codec, engine, IM layer, credentials) to the wire's error reply.

use super::codes::{ErrorCode, Opcode};
use super::msg::ErrorReply;
use super::token::TokenError;
use timeline_im::ImError;

/// A frame or body that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The header announces a frame above the limit. Fatal: reply (with the
    /// header's request id and opcode), then close the connection.
    #[error(
        "frame of {len} bytes (request {request_id}, {opcode}) exceeds the limit of {max} bytes"
    )]
    FrameTooLarge {
        request_id: u64,
        opcode: Opcode,
        len: u64,
        max: u64,
    },
    /// The body, flags or request id do not decode. Answer and read on.
    #[error("malformed {opcode} frame: {why}")]
    Malformed { opcode: Opcode, why: &'static str },
    /// Not a command of this protocol version. Answer and read on.
    #[error("unknown command {0}")]
    UnknownCommand(Opcode),
}

impl ProtocolError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            ProtocolError::Malformed { .. } => ErrorCode::MALFORMED_FRAME,
            ProtocolError::UnknownCommand(_) => ErrorCode::UNKNOWN_COMMAND,
        }
    }

    /// The connection cannot go on after this error (the stream position is
    /// lost or the peer is hostile): reply, then close.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ProtocolError::FrameTooLarge { .. })
    }
}

impl From<&ProtocolError> for ErrorReply {
    fn from(e: &ProtocolError) -> Self {
        let arg = match e {
            ProtocolError::FrameTooLarge { max, .. } => *max,
            _ => 0,
        };
        ErrorReply::new(e.code(), arg, e.to_string())
    }
}

impl From<&timeline_engine::Error> for ErrorReply {
    fn from(e: &timeline_engine::Error) -> Self {
        use timeline_engine::Error as E;
        let (code, arg) = match e {
            E::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                (ErrorCode::STORAGE_FULL, 0)
            }
            E::Io { .. } => (ErrorCode::IO_ERROR, 0),
            E::Corruption { .. } | E::UnsupportedVersion { .. } => (ErrorCode::CORRUPTION, 0),
            E::PayloadTooLarge { max, .. } => (ErrorCode::PAYLOAD_TOO_LARGE, *max as u64),
            E::Truncated { first_retained, .. } => (ErrorCode::TRUNCATED, *first_retained),
            E::InvalidArgument(_) => (ErrorCode::INVALID_ARGUMENT, 0),
            E::Poisoned { .. } => (ErrorCode::POISONED, 0),
            E::Closed => (ErrorCode::CLOSED, 0),
        };
        ErrorReply::new(code, arg, e.to_string())
    }
}

impl From<&ImError> for ErrorReply {
    fn from(e: &ImError) -> Self {
        let (code, arg) = match e {
            ImError::Engine(inner) => return ErrorReply::from(inner),
            ImError::Corrupt(_) => (ErrorCode::CORRUPTION, 0),
            ImError::NoSuchConversation(conv) => (ErrorCode::NO_SUCH_CONVERSATION, *conv),
            ImError::ConversationExists(conv) => (ErrorCode::CONVERSATION_EXISTS, *conv),
            ImError::NotMember { user, .. } => (ErrorCode::NOT_MEMBER, *user),
            ImError::AlreadyMember { user, .. } => (ErrorCode::ALREADY_MEMBER, *user),
            ImError::InvalidArgument(_) => (ErrorCode::INVALID_ARGUMENT, 0),
            ImError::FanoutFailed { seq, .. } => (ErrorCode::FANOUT_FAILED, *seq),
            ImError::Closed => (ErrorCode::CLOSED, 0),
        };
        ErrorReply::new(code, arg, e.to_string())
    }
}

impl From<&TokenError> for ErrorReply {
    fn from(e: &TokenError) -> Self {
        ErrorReply::new(ErrorCode::UNAUTHORIZED, 0, e.to_string())
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
            assert_eq!(code_arg(ErrorReply::from(&e)), (code, arg), "{e}");
            // Wrapped in the IM layer's error: the same code.
            assert_eq!(code_arg(ErrorReply::from(&ImError::Engine(e))), (code, arg));
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
            assert_eq!(code_arg(ErrorReply::from(&e)), (code, arg), "{e}");
        }
    }

    #[test]
    fn protocol_errors_map_to_stable_codes() {
        let too_large = ProtocolError::FrameTooLarge {
            request_id: 1,
            opcode: Opcode::APPEND,
            len: 100,
            max: 64,
        };
        assert_eq!(
            code_arg(ErrorReply::from(&too_large)),
            (ErrorCode::FRAME_TOO_LARGE, 64)
        );
        let unknown = ProtocolError::UnknownCommand(Opcode(0x7777));
        assert_eq!(
            code_arg(ErrorReply::from(&unknown)),
            (ErrorCode::UNKNOWN_COMMAND, 0)
        );
        assert!(!unknown.is_fatal());
        let bad = ProtocolError::Malformed {
            opcode: Opcode::GET,
            why: "truncated body",
        };
        assert_eq!(
            code_arg(ErrorReply::from(&bad)),
            (ErrorCode::MALFORMED_FRAME, 0)
        );
        assert_eq!(
            code_arg(ErrorReply::from(&TokenError::BadSignature)),
            (ErrorCode::UNAUTHORIZED, 0)
        );
    }
}
