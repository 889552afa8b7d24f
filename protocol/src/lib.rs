//! `timeline_protocol`: the binary protocol of the timeline server, as a
//! sans-I/O codec with its own wire types (no dependency on the engine or
//! the IM layer): decode from `&[u8]`, encode
//! into a buffer the caller owns, report `encoded_len()`. No sockets, no
//! async; the server, the client and the fuzz targets share it.
//!
//! All integers are little-endian, everywhere. Byte grids, the handshake,
//! pipelining and push semantics, the code tables and limits:
//! `docs/protocol.md`.
//!
//! ```text
//! frame  = len:u32 opcode:u16 flags:u16 request_id:u64 body:[u8; len]
//! ```
//!
//! Reading a connection (server side):
//!
//! ```
//! use timeline_protocol::{self as protocol, ErrorReply, Request, RequestFrame, Response};
//!
//! let mut wire = Vec::new();
//! Request::Ping(b"hi").encode_frame(1, &mut wire);       // what a client sent
//! let mut out = Vec::new();
//! let mut at = 0;
//! while let Some((frame, used)) = protocol::decode(&wire[at..], protocol::DEFAULT_MAX_FRAME)? {
//!     at += used;
//!     match RequestFrame::decode(&frame) {
//!         Ok(RequestFrame { id, request: Request::Ping(d) }) => {
//!             Response::Ping(d.to_vec()).encode_frame(id, &mut out)
//!         }
//!         Ok(_) => {}
//!         // Not fatal: answer with the frame's own id and opcode, read on.
//!         Err(e) => ErrorReply::from(&e).encode_frame(frame.header.request_id, frame.header.opcode, &mut out),
//!     }
//! }
//! # assert_eq!(at, wire.len());
//! # Ok::<(), protocol::ProtocolError>(())
//! ```

// Nothing reachable from the network may panic: every slice is taken
// through checked accessors (`get`, `split_at_checked`).
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

pub mod codes;
mod error;
pub mod frame;
pub mod msg;
pub mod routing;
pub mod token;
pub mod types;
mod wire;

#[cfg(test)]
mod tests;

pub use codes::{ErrorCode, Opcode, RETIRED_ERRORS, RETIRED_OPCODES};
pub use error::ProtocolError;
pub use frame::{
    decode, flags, peek_header, peek_len, Frame, FrameKind, Header, DEFAULT_MAX_FRAME, HEADER_LEN,
};
pub use msg::{
    decode_push_body, encode_push_body, encode_push_frame, push_body_len, push_frame_len,
    ErrorReply, Hello, HelloReply, Identity, Request, RequestFrame, Response, ServerMsg,
    HELLO_MAGIC, PROTOCOL_VERSION,
};
pub use routing::partition_of;
pub use types::{
    Body, ConvId, ConvKind, ConvSummary, Direction, Durability, Entry, GroupPage, HistoryFrom,
    HistoryPage, Keyspace, Push, Record, SendAck, SeqId, SyncEntry, SyncReply, TimelineId, UserId,
};
