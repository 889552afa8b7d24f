//! The in-memory index: per timeline, only its last SeqId and where its newest
//! record is. Everything else (where older records are) is found by following
//! links on disk: record chains in log segments, sorted index blocks and sparse
//! offset tables in sealed segments. See `docs/design.md` ("Memory").
//!
//! Layout, per shard: a dense, chunked array of [`Meta`] (32 bytes, never moved
//! once allocated) and a `hashbrown::HashTable<u32>` of indices into it (4
//! bytes a slot plus 1 control byte). That is 38–44 bytes per timeline,
//! against 80–110 for a `HashMap<u64, Meta>` once its doubling slack counts.

pub mod table;

pub use table::{Meta, Pos, TimelineTable};
