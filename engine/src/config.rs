//! Engine configuration.

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
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

/// A keyspace's id: the byte segment headers carry. A keyspace is a set of
/// timelines with its own directory, segments, retention and layout; the
/// engine opens whatever keyspaces [`Config::keyspaces`] lists and never
/// branches on which one it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Keyspace(pub u8);

impl Keyspace {
    /// The default configuration's keyspace that keeps everything
    /// (conversation history: the IM *store*), in `DIR/store/`.
    pub const STORE: Keyspace = Keyspace(0);
    /// The default configuration's TTL keyspace (per-receiver *sync*
    /// timelines), in `DIR/sync/`.
    pub const SYNC: Keyspace = Keyspace(1);
}

impl std::fmt::Display for Keyspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "keyspace {}", self.0)
    }
}

/// Per-keyspace settings.
#[derive(Debug, Clone)]
pub struct KeyspaceConfig {
    pub id: Keyspace,
    /// Its directory under the engine's (`[a-z0-9_-]+`, unique).
    pub name: String,
    /// Records older than this are dropped with their segment; `None` keeps all.
    pub ttl: Option<Duration>,
    /// A segment is sealed once it reaches this many bytes (max 1 GiB).
    pub segment_bytes: u64,
    /// ... or once it has been open this long, so that no segment spans more
    /// than one window of the TTL (default: TTL / 8, or 1 hour with no TTL).
    pub segment_window: Duration,
    /// Rewrite sealed segments so each timeline's records are contiguous
    /// (doubles bytes written; makes cold range reads one contiguous read).
    /// `false` keeps sealed segments in log (arrival) order.
    pub regroup: bool,
}

impl KeyspaceConfig {
    /// A keyspace that keeps everything, regrouped on seal.
    pub fn keep_all(id: Keyspace, name: &str) -> Self {
        KeyspaceConfig {
            id,
            name: name.to_string(),
            ttl: None,
            segment_bytes: 64 << 20,
            segment_window: Duration::from_secs(3600),
            regroup: true,
        }
    }
    /// A keyspace whose records expire after `ttl`, in log order.
    pub fn expiring(id: Keyspace, name: &str, ttl: Duration) -> Self {
        KeyspaceConfig {
            id,
            name: name.to_string(),
            ttl: Some(ttl),
            segment_bytes: 64 << 20,
            segment_window: ttl / 8,
            regroup: false,
        }
    }
    /// The default configuration's `store` keyspace.
    pub fn store() -> Self {
        Self::keep_all(Keyspace::STORE, "store")
    }
    /// The default configuration's `sync` keyspace (7-day TTL).
    pub fn sync() -> Self {
        Self::expiring(Keyspace::SYNC, "sync", Duration::from_secs(7 * 24 * 3600))
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
    /// The keyspaces to open (default: [`KeyspaceConfig::store`] and
    /// [`KeyspaceConfig::sync`]). Every keyspace directory found on disk
    /// must be listed: opening refuses rather than ignore data.
    pub keyspaces: Vec<KeyspaceConfig>,
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
            keyspaces: vec![KeyspaceConfig::store(), KeyspaceConfig::sync()],
            max_payload: 1 << 20,
            io: None,
            clock: Arc::new(SystemClock),
            background: true,
            maintenance_interval: Duration::from_millis(200),
        }
    }
}

impl Config {
    /// A configuration the engine can open: at least one keyspace, unique ids
    /// and directory names, segment sizes in range.
    pub fn validate(&self) -> Result<()> {
        if self.keyspaces.is_empty() {
            return Err(Error::InvalidArgument("no keyspace configured".into()));
        }
        for (i, k) in self.keyspaces.iter().enumerate() {
            let valid_name = !k.name.is_empty()
                && k.name.len() <= 64
                && k.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !valid_name {
                return Err(Error::InvalidArgument(format!(
                    "keyspace name {:?} must be 1-64 of [a-z0-9_-]",
                    k.name
                )));
            }
            if let Some(o) = self.keyspaces[..i]
                .iter()
                .find(|o| o.id == k.id || o.name == k.name)
            {
                return Err(Error::InvalidArgument(format!(
                    "keyspaces {:?} ({}) and {:?} ({}) share an id or a name",
                    o.name, o.id.0, k.name, k.id.0
                )));
            }
            if k.segment_bytes < 64 << 10 || k.segment_bytes > 1 << 30 {
                return Err(Error::InvalidArgument(format!(
                    "{}: segment_bytes must be in 64 KiB..=1 GiB",
                    k.name
                )));
            }
            if self.max_payload as u64 + 4096 > k.segment_bytes {
                return Err(Error::InvalidArgument(format!(
                    "max_payload must be smaller than the {} segment size",
                    k.name
                )));
            }
        }
        if self.shards == 0 || self.shards > 4096 {
            return Err(Error::InvalidArgument("shards must be in 1..=4096".into()));
        }
        Ok(())
    }

    /// The settings of keyspace `ks`.
    ///
    /// # Panics
    /// If the configuration has no such keyspace (a programming error:
    /// [`Engine::open`](crate::Engine::open) refuses such a timeline with
    /// `InvalidArgument`, this accessor is for code that built the config).
    pub fn keyspace(&self, ks: Keyspace) -> &KeyspaceConfig {
        self.find(ks)
            .unwrap_or_else(|| panic!("no {ks} in this configuration"))
    }
    /// Mutable settings of keyspace `ks` (panics like [`keyspace`](Self::keyspace)).
    pub fn keyspace_mut(&mut self, ks: Keyspace) -> &mut KeyspaceConfig {
        self.keyspaces
            .iter_mut()
            .find(|k| k.id == ks)
            .unwrap_or_else(|| panic!("no {ks} in this configuration"))
    }
    /// The settings of keyspace `ks`, if configured.
    pub fn find(&self, ks: Keyspace) -> Option<&KeyspaceConfig> {
        self.keyspaces.iter().find(|k| k.id == ks)
    }
}
