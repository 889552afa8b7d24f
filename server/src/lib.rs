//! `timeline_server`: the binary TCP protocol of the timeline engine, the
//! server ([`server`]), a blocking client ([`client`]) and the binaries
//! `timeline-server` and `timeline-cli`.
//!
//! [`protocol`] is the sans-I/O codec shared by the server, the client and
//! the fuzz targets: frames decode from `&[u8]` and encode into a caller's
//! buffer; nothing here reads or writes a socket. The byte layouts and the
//! rules of a conversation with the server: `docs/protocol.md`.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError};
pub use server::{start, ServerConfig, ServerError, ServerHandle};
