//! The codec's error type, and the mapping from the codec's and the
//! credentials' errors to the wire's error reply (the server maps the
//! engine's and the IM layer's errors: `server/src/server/errors.rs`).

use super::codes::{ErrorCode, Opcode};
use super::msg::ErrorReply;
use super::token::TokenError;

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

impl From<&TokenError> for ErrorReply {
    fn from(e: &TokenError) -> Self {
        ErrorReply::new(ErrorCode::UNAUTHORIZED, 0, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_arg(r: ErrorReply) -> (ErrorCode, u64) {
        assert!(!r.message.is_empty());
        (r.code, r.arg)
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
