//! `timeline_engine`: a durable Timeline store on an append-only, segmented log.
//!
//! A *timeline* is an append-only queue addressed by a keyspace and a `u64`
//! id; every record gets the next consecutive [`SeqId`] of its timeline and
//! the append timestamp. The `store` keyspace keeps everything; the `sync`
//! keyspace drops whole time-windowed segments after a TTL. See
//! `docs/design.md` for the on-disk layout and the reasoning behind it.
//!
//! ```no_run
//! use timeline_engine::{Config, Direction, Engine, TimelineId};
//! let engine = Engine::open("/tmp/tl", Config::default())?;
//! let tl = TimelineId::store(42);
//! let seq = engine.append(tl, b"hello")?; // durable (group commit) on return
//! let page = engine.scan(tl, u64::MAX, 20, Direction::Backward)?;
//! assert_eq!(page[0].seq, seq);
//! # Ok::<(), timeline_engine::Error>(())
//! ```

pub mod clock;
mod commit;
pub mod config;
mod engine;
pub mod error;
pub mod format;
pub mod index;
pub mod io;
pub(crate) mod segment;
mod shard;
mod stats;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Config, Durability, Keyspace, KeyspaceConfig};
pub use engine::{
    AppendTicket, Direction, Engine, KeyspaceStats, Maintenance, SeqId, Stats, TimelineId,
};
pub use error::{Error, Result};

/// One record as a reader gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: SeqId,
    pub timestamp_ms: u64,
    pub payload: Vec<u8>,
}
