//! Engine configuration.

use crate::clock::{Clock, SystemClock};
use crate::io::Io;
use std::sync::Arc;
use std::time::Duration;

/// How durable an append is when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Handed to the OS page cache (survives the process dying, not a power cut).
    Buffered,
    /// Returns once an fdatasync that covers it has completed; concurrent
    /// appenders share one sync (group commit).
    #[default]
    GroupCommit,
    /// The append issues its own fdatasync.
    Sync,
}

impl Durability {
    /// The name benchmark output uses: none / group / sync.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Buffered => "none",
            Durability::GroupCommit => "group",
            Durability::Sync => "sync",
        }
    }
}

/// The keyspaces: each has its own directory, segments and retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Keyspace {
    /// Conversation history, kept forever by default.
    Store = 0,
    /// Per-receiver sync timelines, kept for a TTL (default 7 days).
    Sync = 1,
}

impl Keyspace {
    pub const ALL: [Keyspace; 2] = [Keyspace::Store, Keyspace::Sync];
    pub fn name(self) -> &'static str {
        match self {
            Keyspace::Store => "store",
            Keyspace::Sync => "sync",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Per-keyspace settings.
#[derive(Debug, Clone)]
pub struct KeyspaceConfig {
    /// Records older than this are dropped with their segment; `None` keeps all.
    pub ttl: Option<Duration>,
    /// A segment is sealed once it reaches this many bytes (max 1 GiB).
    pub segment_bytes: u64,
    /// ... or once it has been open this long, so that no segment spans more
    /// than one window of the TTL (default: TTL / 8, or 1 hour with no TTL).
    pub segment_window: Duration,
    /// Rewrite sealed segments so each timeline's records are contiguous
    /// (doubles bytes written; makes cold range reads one contiguous read).
    pub regroup: bool,
}

impl KeyspaceConfig {
    pub fn store() -> Self {
        KeyspaceConfig {
            ttl: None,
            segment_bytes: 64 << 20,
            segment_window: Duration::from_secs(3600),
            regroup: true,
        }
    }
    pub fn sync() -> Self {
        let ttl = Duration::from_secs(7 * 24 * 3600);
        KeyspaceConfig {
            ttl: Some(ttl),
            segment_bytes: 64 << 20,
            segment_window: ttl / 8,
            regroup: false,
        }
    }
    /// Set a TTL and a window of TTL / 8.
    pub fn with_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.ttl = ttl;
        if let Some(t) = ttl {
            self.segment_window = (t / 8).max(Duration::from_millis(1));
        }
        self
    }
}

/// Engine configuration. `Config::default()` is the production default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Timelines are spread over this many shards per keyspace, each with its
    /// own writer, active segment and file. Fixed when a directory is created.
    pub shards: usize,
    pub store: KeyspaceConfig,
    pub sync: KeyspaceConfig,
    /// Largest accepted payload in bytes.
    pub max_payload: usize,
    /// File backend; `None` picks io_uring when available, else pread/pwrite.
    pub io: Option<Arc<dyn Io>>,
    pub clock: Arc<dyn Clock>,
    /// Run sealing, time rolls and TTL drops on a background thread (and
    /// group commits on a syncer thread). With `false`, segments are sealed
    /// inline when they fill, and time-based work happens in `Engine::maintain`.
    pub background: bool,
    /// How often the background thread checks time rolls and TTL.
    pub maintenance_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shards: 4,
            store: KeyspaceConfig::store(),
            sync: KeyspaceConfig::sync(),
            max_payload: 1 << 20,
            io: None,
            clock: Arc::new(SystemClock),
            background: true,
            maintenance_interval: Duration::from_millis(200),
        }
    }
}

impl Config {
    pub fn keyspace(&self, ks: Keyspace) -> &KeyspaceConfig {
        match ks {
            Keyspace::Store => &self.store,
            Keyspace::Sync => &self.sync,
        }
    }
}
