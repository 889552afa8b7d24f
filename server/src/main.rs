//! `timeline-server`: the timeline engine and its IM layer over TCP.
//!
//! `cargo run --release -p timeline-server` serves `./data` on
//! `127.0.0.1:7420` with auth off (everything allowed: the benchmark
//! default). SIGINT/SIGTERM: stop accepting, answer what was read, make
//! acknowledged data durable, exit 0. Logs go to stderr (`RUST_LOG`).

use clap::{Parser, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use timeline_engine::{Config, Durability, KeyspaceConfig};
use timeline_im::{EntryMode, ImConfig};
use timeline_server::server::Reads;
use timeline_server::ServerConfig;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DurabilityArg {
    None,
    Group,
    Sync,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EntriesArg {
    Copy,
    Reference,
}

#[derive(Parser, Debug)]
#[command(
    name = "timeline-server",
    version,
    about = "The timeline engine over TCP"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7420")]
    listen: String,
    /// Data directory (created if missing).
    #[arg(long, default_value = "./data")]
    data_dir: PathBuf,
    /// Engine shards per keyspace, and so IM workers (0: one per core).
    /// Fixed when the directory is created: an existing one keeps its own.
    #[arg(long, default_value_t = 0)]
    shards: usize,
    /// Durability of APPENDs that ask for the default, and of every IM write.
    #[arg(long, value_enum, default_value = "group")]
    durability: DurabilityArg,
    /// TTL of the sync keyspace in seconds (0: keep forever).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    sync_ttl: u64,
    /// TTL of the store keyspace in seconds (0: keep forever). A single
    /// node only: a cluster keeps the store forever.
    #[arg(long, default_value_t = 0)]
    store_ttl: u64,
    /// Groups with more members than this use read fan-out.
    #[arg(long, default_value_t = 500)]
    hybrid_threshold: usize,
    /// Sync entries carry the message (copy) or point to it (reference).
    #[arg(long, value_enum, default_value = "copy")]
    entries: EntriesArg,
    /// Largest frame a client may send, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_frame: usize,
    /// Largest payload of one record, in bytes (64 KiB: IM messages are
    /// small, and a SYNC/HISTORY page holds at most max-frame / max-payload
    /// entries so that any reply fits a frame).
    #[arg(long, default_value_t = 64 << 10)]
    max_payload: usize,
    /// Connections served at once (the process's descriptor limit is raised
    /// to fit, as far as the hard limit allows).
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Connections that may wait for their HELLO at once; above it the one
    /// that waited longest is closed to make room.
    #[arg(long, default_value_t = 1024)]
    max_handshaking: usize,
    /// Event-loop threads serving the connections (0: one per core).
    #[arg(long, default_value_t = 0)]
    io_threads: usize,
    /// Threads that wait on group-commit and own-fdatasync appends, and
    /// as many again for CREATE_CONVERSATION on a single node (0: one per
    /// core).
    #[arg(long, default_value_t = 0)]
    blocking_threads: usize,
    /// Where SYNC, HISTORY and SCAN run: on a read pool (every core serves
    /// them) or on the connection's event loop.
    #[arg(long, value_enum, default_value = "pool")]
    reads: ReadsArg,
    /// Threads of the read pool (0: one per core).
    #[arg(long, default_value_t = 0)]
    read_threads: usize,
    /// Close a connection that sends no HELLO within this many seconds.
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// Close connections idle this many seconds.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// Disconnect a client that takes no reply for this many seconds.
    #[arg(long, default_value_t = 30)]
    write_timeout: u64,
    /// Replies and pushes a connection may have waiting to be written.
    #[arg(long, default_value_t = 4096)]
    max_queued_replies: usize,
    /// Require a signed token in HELLO (the secret, at least 16 bytes,
    /// comes from $TIMELINE_SECRET or --secret-file).
    #[arg(long)]
    auth: bool,
    /// File holding the HMAC secret (with --auth; one trailing newline is
    /// not part of it).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Run as a node of a cluster (docs/scaling.md): raw timelines are
    /// replicated by partition with openraft, membership and the partition
    /// map live in etcd. Without it: a single node, no etcd, no replication.
    #[arg(long, requires_all = ["etcd", "node_id"])]
    cluster: bool,
    /// etcd endpoints, `HOST:PORT[,HOST:PORT...]` (with --cluster).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// This node's id in the cluster, unique and stable (with --cluster). A
    /// node whose disk was lost rejoins under a new id.
    #[arg(long)]
    node_id: Option<u64>,
    /// Where this node listens for its peers' Raft RPCs (port 0: any).
    #[arg(long, default_value = "127.0.0.1:0")]
    raft_listen: String,
    /// The cluster's name: its keys in etcd are under /timeline/NAME/.
    #[arg(long, default_value = "timeline")]
    cluster_name: String,
    /// Partitions (P) of a new cluster; an existing map keeps its own.
    #[arg(long, default_value_t = 64)]
    partitions: u32,
    /// Replicas per partition (R) of a new cluster.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Seconds a node of the map may be gone (its membership lease lapsed)
    /// before its replicas move to the live nodes (with --cluster; the
    /// lowest-id live node makes the change). 0: never, an operator runs
    /// `timeline-placement remove-node`.
    #[arg(long, default_value_t = 300)]
    replace_after: u64,
    /// Seconds between a leader's looks for partitions to hand back to
    /// their preferred replica (the map's first), when that one is alive
    /// and caught up (with --cluster). 0: never.
    #[arg(long, default_value_t = 30)]
    leader_rebalance_every: u64,
    /// MiB of free space a cluster node keeps on its data directory's disk:
    /// below it, new writes get STORAGE_FULL, and the rest is left for
    /// entries already under way (with --cluster; docs/scaling.md, "A full
    /// disk"). 0: never refuse.
    #[arg(long, default_value_t = 64)]
    min_free_space: u64,
}

/// Raise the soft descriptor limit toward the hard one so that
/// `max_connections` fit, plus 1,024 for the engine's files; where they
/// cannot, the connection limit comes down to fit (with a warning): a
/// connection over it is then refused with `TOO_MANY_CONNECTIONS`, where
/// it would have waited in the backlog, and the engine keeps descriptors
/// for its segments. Returns the connection limit to use.
fn fit_fd_limit(max_connections: usize) -> usize {
    const RESERVE: u64 = 1024;
    let want = (max_connections as u64).saturating_add(RESERVE);
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got >= want => max_connections,
        Ok(got) => {
            let fits = got.saturating_sub(RESERVE).max(got / 2) as usize;
            tracing::warn!(
                limit = got,
                max_connections,
                lowered_to = fits,
                "the descriptor limit is below --max-connections plus 1024: the connection limit is lowered to fit"
            );
            fits.min(max_connections)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the descriptor limit");
            max_connections
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ReadsArg {
    Pool,
    Inline,
}

/// A connection timeout of `secs` (at least 1 s, at most a year: a
/// deadline must stay a representable instant).
fn timeout(secs: u64) -> Duration {
    Duration::from_secs(secs.clamp(1, 365 * 86_400))
}

fn ttl(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        // A log on a full disk (or a closed stderr) loses lines, and must
        // not take the server with it: tracing-subscriber reports a failed
        // write with `eprintln!`, which panics when stderr fails too.
        .log_internal_errors(false)
        .init();
    let a = Args::parse();
    if let Err(e) = run(a) {
        // Not `eprintln!`: it panics if stderr is a file on a full disk.
        let _ = writeln!(std::io::stderr(), "timeline-server: error: {e}");
        std::process::exit(1);
    }
}

/// Lock `dir`'s `LOCK` file (created with the directory if missing) for
/// this process: a second server on the same data directory (one started
/// while a stopping one still writes, or by mistake) would recover files
/// the first is still writing. Refused at once if another holds it.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, String> {
    let path = dir.join("LOCK");
    let file = std::fs::create_dir_all(dir)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(format!(
                "the data directory {} is in use by another process (it holds {})",
                dir.display(),
                path.display()
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("{}: lock: {e}", path.display()))
        }
    }
    Ok(file)
}

/// A secret file's bytes less one trailing newline (`\n` or `\r\n`), as
/// `echo "$S" > file` leaves it: the same secret as `TIMELINE_SECRET=$S`.
fn without_newline(mut s: Vec<u8>) -> Vec<u8> {
    if s.last() == Some(&b'\n') {
        s.pop();
        if s.last() == Some(&b'\r') {
            s.pop();
        }
    }
    s
}

fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let d = match a.durability {
        DurabilityArg::None => Durability::Buffered,
        DurabilityArg::Group => Durability::GroupCommit,
        DurabilityArg::Sync => Durability::Sync,
    };
    let secret = if a.auth {
        let s = match (&a.secret_file, std::env::var("TIMELINE_SECRET")) {
            (Some(f), _) => without_newline(std::fs::read(f)?),
            (None, Ok(s)) => s.into_bytes(),
            (None, Err(_)) => {
                return Err("--auth needs a secret: $TIMELINE_SECRET or --secret-file".into())
            }
        };
        if s.len() < 16 {
            return Err("the auth secret must be at least 16 bytes".into());
        }
        Some(s)
    } else {
        None
    };
    let mut engine = Config::default();
    engine.shards = if a.shards == 0 {
        timeline_server::server::cores()
    } else {
        a.shards
    };
    engine.max_payload = a.max_payload;
    let mut store = KeyspaceConfig::store().with_ttl(ttl(a.store_ttl));
    if a.store_ttl == 0 {
        store.segment_window = KeyspaceConfig::store().segment_window;
    }
    engine.keyspaces = vec![store, KeyspaceConfig::sync().with_ttl(ttl(a.sync_ttl))];
    let cluster = match (a.cluster, a.node_id) {
        (true, Some(id)) => {
            if a.partitions == 0 || a.replicas == 0 {
                return Err("--partitions and --replicas must be at least 1".into());
            }
            if a.partitions > timeline_protocol::routing::MAX_PARTITIONS {
                return Err(format!(
                    "--partitions is at most {} (the partition map is one etcd value; docs/scaling.md, \"Partitions\")",
                    timeline_protocol::routing::MAX_PARTITIONS
                )
                .into());
            }
            // Applying a conversation entry reads the conversation's
            // records (its members, a recalled message); replicas whose
            // retention dropped different segments would decide apart.
            if a.store_ttl != 0 {
                return Err("--store-ttl is for a single node: a cluster keeps the store forever (docs/scaling.md, \"Retention on a cluster\")".into());
            }
            engine
                .keyspaces
                .extend(timeline_cluster::log_store::keyspaces());
            Some(timeline_cluster::NodeConfig {
                id,
                cluster: a.cluster_name.clone(),
                etcd: a.etcd.clone(),
                raft_listen: a.raft_listen.clone(),
                partitions: a.partitions,
                replicas: a.replicas,
                replace_after: (a.replace_after > 0).then(|| Duration::from_secs(a.replace_after)),
                leader_rebalance_every: (a.leader_rebalance_every > 0)
                    .then(|| Duration::from_secs(a.leader_rebalance_every)),
                min_free_space: a.min_free_space.saturating_mul(1 << 20),
                ..Default::default()
            })
        }
        _ => None,
    };
    let im = ImConfig {
        hybrid_threshold: a.hybrid_threshold,
        entries: match a.entries {
            EntriesArg::Copy => EntryMode::Copy,
            EntriesArg::Reference => EntryMode::Reference,
        },
        durability: d,
        ..ImConfig::default()
    };
    let cfg = ServerConfig {
        listen: a.listen,
        data_dir: a.data_dir,
        engine,
        im,
        default_durability: d,
        auth_secret: secret,
        max_frame: a.max_frame,
        max_connections: a.max_connections,
        max_handshaking: a.max_handshaking.max(1),
        idle_timeout: timeout(a.idle_timeout),
        write_timeout: timeout(a.write_timeout),
        handshake_timeout: timeout(a.handshake_timeout),
        max_queued_replies: a.max_queued_replies,
        io_threads: a.io_threads,
        blocking_threads: a.blocking_threads,
        reads: match a.reads {
            ReadsArg::Pool => Reads::Pool,
            ReadsArg::Inline => Reads::Inline,
        },
        read_threads: a.read_threads,
        cluster,
    };
    let mut cfg = cfg;
    cfg.max_connections = fit_fd_limit(cfg.max_connections);
    // Held until the process exits (the kernel drops it then, kill -9
    // included).
    let _lock = lock_data_dir(&cfg.data_dir)?;
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        auth = cfg.auth_secret.is_some(),
        durability = d.name(),
        "starting"
    );
    // The handlers go in before anything is served: a SIGTERM right after
    // the address is printed must shut down gracefully, not kill.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let server = timeline_server::start(cfg)?;
    // Print the bound address on stdout (scripts starting on port 0 read it).
    // Not `println!`: it panics if stdout is a file on a full disk.
    let _ = writeln!(std::io::stdout(), "listening {}", server.local_addr());
    // SIGINT/SIGTERM: a thread blocked on the signal pipe stops the server.
    let stopper = server.stopper();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                tracing::info!("signal received: shutting down");
                stopper.stop();
            }
        })?;
    server.wait()?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{lock_data_dir, without_newline};

    #[test]
    fn a_data_directory_takes_one_server_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        let second = lock_data_dir(dir.path());
        assert!(
            second
                .as_ref()
                .is_err_and(|e| e.contains("in use by another process")),
            "{second:?}"
        );
        drop(held);
        lock_data_dir(dir.path()).unwrap();
    }

    #[test]
    fn a_secret_file_loses_one_trailing_newline_only() {
        let s = b"0123456789abcdef";
        for (file, secret) in [
            (&b"0123456789abcdef\n"[..], &s[..]),
            (b"0123456789abcdef\r\n", s),
            (b"0123456789abcdef\n\n", b"0123456789abcdef\n"),
            (s, s),
            (b"x\r", b"x\r"),
        ] {
            assert_eq!(without_newline(file.to_vec()), secret, "{file:?}");
        }
    }
}
