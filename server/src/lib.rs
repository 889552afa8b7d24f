//! `timeline_server`: the timeline engine and its IM layer over TCP
//! ([`server`], the binary `timeline-server`). The wire codec is the crate
//! `timeline-protocol` (sans-I/O, its own wire types; re-exported as
//! [`protocol`]); the clients and `timeline-cli` are the crate
//! `timeline-client`. The byte layouts and the rules of a conversation with
//! the server: `docs/protocol.md`.

pub mod server;

pub use server::{start, ServerConfig, ServerError, ServerHandle};
/// The clients (crate `timeline-client`), re-exported likewise.
pub use timeline_client::{Client, ClientError};
/// The wire codec (crate `timeline-protocol`), re-exported for users of
/// this crate.
pub use timeline_protocol as protocol;
