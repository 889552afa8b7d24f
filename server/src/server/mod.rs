//! The TCP server: a thin shell around [`Im`] and its [`Engine`], on a
//! fixed set of event loops (docs/design.md §20).
//!
//! - `event_loop`: one thread per `--io-threads`, each an epoll instance
//!   (`mio`) holding its connections; loop 0 also accepts and hands new
//!   connections out round-robin. Nothing here is per connection but its
//!   state in a slab; nothing waits on a sleep or a read timeout.
//! - `conn`: one connection's buffers, its replies in request order, its
//!   deadlines and its backpressure.
//! - `dispatch`: what a request does (handshake, access control, the
//!   engine and IM calls).
//! - `push`: a subscription's sink, which the IM worker that made an entry
//!   durable calls: one hand-off to the connection's loop.
//! - `pool`: the few threads that wait where waiting is unavoidable (a
//!   group-commit ticket, an own-fdatasync append, a multi-step create).
//!
//! Requests whose answer comes later (a `SEND` waiting for its fan-out, an
//! `APPEND` waiting for a shared fdatasync) leave a slot in the
//! connection's reply queue and complete through the IM layer's and the
//! engine's completion handles; replies leave in request order.
//!
//! Shutdown ([`ServerHandle::shutdown`], SIGINT/SIGTERM in the binary):
//! stop accepting and reading, answer every request already read, send
//! `CLOSED` to every connection, close the IM layer (everything
//! acknowledged is durable), return.

mod cluster;
mod cluster_im;
mod conn;
mod convert;
mod dispatch;
mod errors;
mod event_loop;
mod pool;
mod push;

use crate::protocol;
use event_loop::{EventLoop, LoopHandle};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use timeline_engine::{Config, Durability};
use timeline_im::{Im, ImConfig};

/// Server settings (the binary's flags).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub engine: Config,
    pub im: ImConfig,
    /// Durability of `APPEND`s that ask for the server's default.
    pub default_durability: Durability,
    /// With `Some(secret)`, `HELLO` must carry a token signed with it.
    pub auth_secret: Option<Vec<u8>>,
    /// Largest frame (header + body) a client may send.
    pub max_frame: usize,
    pub max_connections: usize,
    /// A connection that sends nothing for this long (and has no
    /// subscription) is closed.
    pub idle_timeout: Duration,
    /// A client that does not take a reply within this long is disconnected.
    pub write_timeout: Duration,
    /// A connection that has not completed `HELLO` within this long is
    /// closed (it holds a connection slot meanwhile).
    pub handshake_timeout: Duration,
    /// Connections that may wait for their `HELLO` at once; above it the one
    /// that has waited longest is closed (`TIMEOUT`) to make room, so
    /// sockets that never say `HELLO` cannot lock real clients out.
    pub max_handshaking: usize,
    /// Replies a connection may have waiting (in flight or unwritten)
    /// before the server stops reading its requests.
    pub max_queued_replies: usize,
    /// Event-loop threads (0: one per core).
    pub io_threads: usize,
    /// Threads that wait on group-commit tickets and own-fdatasync appends,
    /// and as many again for `CREATE_CONVERSATION` on a single node (0: one
    /// per core).
    pub blocking_threads: usize,
    /// Where `SYNC`, `HISTORY` and `SCAN` run.
    pub reads: Reads,
    /// Threads of the read pool with `Reads::Pool` (0: one per core).
    pub read_threads: usize,
    /// Run as a cluster node (`--cluster`): raw timelines replicated by
    /// partition. `None`: today's single node, no etcd, no replication.
    pub cluster: Option<timeline_cluster::NodeConfig>,
}

/// Where the reads that can be long (`SYNC`, `HISTORY`, `SCAN`) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reads {
    /// On the connection's event loop: no hand-off; a loop with a few busy
    /// readers serves them all on one core.
    Inline,
    /// On a pool of `read_threads`: every core serves them, one hand-off
    /// each way. A connection's later writes wait for its reads in flight
    /// (so a read never sees a write sent after it); its later reads do not.
    Pool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7420".into(),
            data_dir: "./data".into(),
            engine: Config {
                max_payload: 64 << 10,
                ..Config::default()
            },
            im: ImConfig::default(),
            default_durability: Durability::GroupCommit,
            auth_secret: None,
            max_frame: protocol::DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_handshaking: 1024,
            max_queued_replies: 4096,
            io_threads: 0,
            blocking_threads: 0,
            reads: Reads::Pool,
            read_threads: 0,
            cluster: None,
        }
    }
}

/// The core count (at least 1): the default for every per-core pool.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Im(#[from] timeline_im::ImError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("cluster: {0}")]
    Cluster(#[from] timeline_cluster::ClusterError),
}

/// Counters the `STATS` command reports with the engine's.
#[derive(Default)]
pub(crate) struct Counters {
    pub connections: AtomicU64,
    pub open: AtomicUsize,
    pub refused: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub pushes: AtomicU64,
    pub resyncs: AtomicU64,
    pub timeouts: AtomicU64,
    /// Times a connection stopped on a full IM worker (backpressure).
    pub im_full: AtomicU64,
    /// Connections closed without `HELLO` to make room for newer ones.
    pub evicted: AtomicU64,
    /// A cluster node's `im_messages`, `im_sync_writes`, `im_sync_calls`
    /// (its IM runs in the cluster, not in the single-node IM layer).
    pub cluster_im: ClusterImCounters,
}

/// What a cluster node counts of its IM traffic (`STATS`, docs/protocol.md §8).
#[derive(Default)]
pub(crate) struct ClusterImCounters {
    /// `SEND`s it answered as their conversation partition's leader that
    /// stored a new message (not a retry's duplicate).
    pub messages: AtomicU64,
    /// Sync entries its replicas applied (every replica counts its own).
    pub sync_writes: AtomicU64,
    /// `SYNC` requests it served.
    pub sync_calls: AtomicU64,
}

/// What every loop and pool thread shares.
pub(crate) struct Shared {
    pub im: Im,
    pub cfg: ServerConfig,
    pub counters: Arc<Counters>,
    pub pool: pool::Pool,
    /// Runs `CREATE_CONVERSATION`s: a group with more members than one
    /// record holds adds the rest one durable step at a time, so a create
    /// of a million members takes minutes; on its own pool it cannot hold
    /// up the group-commit acknowledgements the blocking pool gives. None
    /// on a cluster node, whose creates go through its groups.
    pub creates: Option<pool::Pool>,
    /// Runs reads with `Reads::Pool` (empty otherwise).
    pub read_pool: Option<pool::Pool>,
    pub io_threads: usize,
    /// The cluster node (`--cluster`).
    pub cluster: Option<timeline_cluster::Node>,
    /// A cluster node's subscribers by read-fan-out group.
    pub group_watch: cluster_im::GroupWatch,
}

/// Set once; wakes whoever waits for it.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl StopSignal {
    fn set(&self) {
        *lock(&self.stopped) = true;
        self.cv.notify_all();
    }
    fn wait(&self) {
        let mut g = lock(&self.stopped);
        while !*g {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops a running server from any thread (signal handling, tests).
#[derive(Clone)]
pub struct Stopper {
    signal: Arc<StopSignal>,
    loops: Arc<Vec<Arc<LoopHandle>>>,
    requested: Arc<AtomicBool>,
}

impl Stopper {
    /// Begin the shutdown (idempotent); [`ServerHandle::wait`] returns once
    /// it is done.
    pub fn stop(&self) {
        if !self.requested.swap(true, Ordering::AcqRel) {
            for l in self.loops.iter() {
                l.stop();
            }
            self.signal.set();
        }
    }
}

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Option<Arc<Shared>>,
    stopper: Stopper,
    loops: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that shuts the server down from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// The IM layer the server serves (in-process use, tests).
    pub fn im(&self) -> Option<&Im> {
        self.shared.as_ref().map(|s| &s.im)
    }

    /// Stop accepting, answer what was read, send `CLOSED`, close the IM
    /// layer (acknowledged data is durable), and return.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stopper.stop();
        self.join()
    }

    /// Wait until a [`Stopper`] stops the server, then finish the shutdown.
    pub fn wait(mut self) -> Result<(), ServerError> {
        self.stopper.signal.wait();
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        for h in self.loops.drain(..) {
            if h.join().is_err() {
                tracing::error!("an event loop panicked");
            }
        }
        let Some(shared) = self.shared.take() else {
            return Ok(());
        };
        // The loops are gone; the pool threads finish what they hold and
        // drop their references.
        shared.pool.close();
        if let Some(p) = &shared.creates {
            p.close();
        }
        if let Some(p) = &shared.read_pool {
            p.close();
        }
        match Arc::try_unwrap(shared) {
            Ok(mut s) => {
                // The groups stop before the engine under them closes.
                if let Some(n) = s.cluster.take() {
                    n.shutdown();
                }
                s.im.close()?
            }
            Err(s) => s.im.engine().sync().map_err(timeline_im::ImError::from)?,
        }
        tracing::info!("server stopped; acknowledged data is durable");
        Ok(())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.shared.is_some() {
            self.stopper.stop();
            if let Err(e) = self.join() {
                tracing::error!(error = %e, "shutdown failed");
            }
        }
    }
}

/// Open the IM layer in `cfg.data_dir`, bind `cfg.listen`, start the loops.
pub fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    let listener = bind(&cfg.listen).map_err(|e| ServerError::Bind {
        addr: cfg.listen.clone(),
        source: e,
    })?;
    let addr = listener.local_addr()?;
    let im = Im::open(&cfg.data_dir, cfg.engine.clone(), cfg.im.clone())?;
    let cluster = match &cfg.cluster {
        None => None,
        Some(c) => {
            let mut c = c.clone();
            if c.snapshot_dir.is_none() {
                c.snapshot_dir = Some(cfg.data_dir.join("raft-snapshots"));
            }
            if c.data_dir.is_none() {
                c.data_dir = Some(cfg.data_dir.clone());
            }
            // With --auth, the nodes prove the same secret to each other
            // at every peer connection (docs/scaling.md, "The hello").
            c.peer_secret = timeline_cluster::hello::PeerSecret::new(cfg.auth_secret.as_deref());
            Some(timeline_cluster::Node::start(
                im.engine_handle(),
                c,
                addr.to_string(),
            )?)
        }
    };
    let per_core = |n: usize| if n == 0 { cores() } else { n };
    let io_threads = per_core(cfg.io_threads);
    let pool = pool::Pool::start(per_core(cfg.blocking_threads), "blocking")?;
    let creates = match cfg.cluster {
        None => Some(pool::Pool::start(
            per_core(cfg.blocking_threads),
            "creates",
        )?),
        Some(_) => None,
    };
    let read_pool = match cfg.reads {
        Reads::Pool => Some(pool::Pool::start(per_core(cfg.read_threads), "reads")?),
        Reads::Inline => None,
    };
    let shared = Arc::new(Shared {
        im,
        cfg,
        counters: Arc::new(Counters::default()),
        pool,
        creates,
        read_pool,
        io_threads,
        cluster,
        group_watch: Default::default(),
    });
    if let Some(n) = &shared.cluster {
        n.set_delivery_hook(Arc::new(cluster_im::PushHook(Arc::downgrade(&shared))));
    }
    let mut built = Vec::with_capacity(io_threads);
    for i in 0..io_threads {
        built.push(EventLoop::new(i, shared.clone())?);
    }
    let handles: Arc<Vec<Arc<LoopHandle>>> = Arc::new(built.iter().map(|l| l.handle()).collect());
    let mut listener = Some(mio::net::TcpListener::from_std(listener));
    let mut loops = Vec::with_capacity(io_threads);
    for mut l in built {
        if let Some(lis) = listener.take() {
            l.listen(lis, handles.clone())?;
        }
        loops.push(
            std::thread::Builder::new()
                .name(format!("io-{}", l.index()))
                .spawn(move || l.run())?,
        );
    }
    tracing::info!(%addr, io_threads, "listening");
    Ok(ServerHandle {
        addr,
        shared: Some(shared),
        stopper: Stopper {
            signal: Arc::new(StopSignal::default()),
            loops: handles,
            requested: Arc::new(AtomicBool::new(false)),
        },
        loops,
    })
}

/// Listen on `addr` with a backlog that a burst of thousands of connecting
/// devices does not overflow (std's `bind` asks for 128; the kernel caps
/// this at `net.core.somaxconn`).
fn bind(addr: &str) -> std::io::Result<TcpListener> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(a),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        match s.bind(&a.into()).and_then(|()| s.listen(LISTEN_BACKLOG)) {
            Ok(()) => return Ok(s.into()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the address resolves to nothing")))
}

/// Pending connections the kernel may queue for `accept`.
const LISTEN_BACKLOG: i32 = 4096;

/// Threads of this process now (`/proc/self/status`; 0 where unknown).
pub(crate) fn process_threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The `STATS` reply: `(key, value)` pairs, keys as docs/protocol.md §8
/// lists them.
pub(crate) fn stats(sh: &Shared) -> Vec<(String, u64)> {
    use timeline_engine::Keyspace;
    let st = sh.im.engine().stats();
    let im = sh.im.stats();
    let c = &sh.counters;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (store, sync) = (st.keyspace(Keyspace::STORE), st.keyspace(Keyspace::SYNC));
    let kv = |k: &str, v: u64| (k.to_string(), v);
    let mut out = vec![
        kv("connections_total", g(&c.connections)),
        kv("connections_open", c.open.load(Ordering::Relaxed) as u64),
        kv("connections_refused", g(&c.refused)),
        kv("requests", g(&c.requests)),
        kv("request_errors", g(&c.errors)),
        kv("pushes", g(&c.pushes)),
        kv("resyncs", g(&c.resyncs)),
        kv("timeouts", g(&c.timeouts)),
        kv("im_backpressure", g(&c.im_full)),
        kv("handshakes_evicted", g(&c.evicted)),
        kv("threads", process_threads()),
        kv("io_threads", sh.io_threads as u64),
        kv("store_records", store.records),
        kv("store_bytes_written", store.bytes_written),
        kv("sync_records", sync.records),
        kv("sync_bytes_written", sync.bytes_written),
        kv("bytes_written", st.total().bytes_written),
        kv(
            "raft_log_bytes_written",
            st.keyspace(Keyspace(2)).bytes_written,
        ),
        kv(
            "raft_meta_bytes_written",
            st.keyspace(Keyspace(3)).bytes_written,
        ),
        kv("fsyncs", st.total().fsyncs),
    ];
    let ci = &c.cluster_im;
    out.extend(match sh.cluster {
        None => [
            kv("im_messages", im.messages),
            kv("im_sync_writes", im.sync_writes),
            kv("im_sync_calls", im.sync_calls),
        ],
        Some(_) => [
            kv("im_messages", g(&ci.messages)),
            kv("im_sync_writes", g(&ci.sync_writes)),
            kv("im_sync_calls", g(&ci.sync_calls)),
        ],
    });
    // The cluster's keyspaces whose owners release records: segment files
    // now, and those dropped since start (0 on a single node).
    for (name, ks) in [("raft_log", 2), ("im_outbox", 12), ("raft_state", 13)] {
        let k = st.keyspace(Keyspace(ks));
        out.push(kv(&format!("{name}_files"), k.files));
        out.push(kv(&format!("{name}_segments_dropped"), k.dropped_segments));
    }
    if let Some(n) = &sh.cluster {
        let pl = n.placement();
        out.extend([
            kv("cluster_map_version", n.shape().1),
            kv("cluster_groups", pl.groups),
            kv("cluster_leading", pl.leading),
            kv("cluster_terms", pl.terms),
            kv("cluster_membership_pending", pl.pending),
            kv("cluster_logs_kept", pl.kept),
            kv("cluster_logs_released", pl.released),
            kv("cluster_outboxes_closing", pl.outboxes_closing),
            kv("cluster_outboxes_closed", pl.outboxes_closed),
        ]);
        let (sent, bytes, installed) = n.snapshots();
        out.extend([
            kv("cluster_snapshots_sent", sent),
            kv("cluster_snapshot_bytes_sent", bytes),
            kv("cluster_snapshots_installed", installed),
        ]);
        let (entries, conv_entries, conv_writes) = n.proposed();
        out.extend([
            kv("cluster_entries_proposed", entries),
            kv("cluster_conv_entries_proposed", conv_entries),
            kv("cluster_conv_writes_proposed", conv_writes),
        ]);
        let (by_lease, by_round) = n.reads();
        out.extend([
            kv("cluster_reads_by_lease", by_lease),
            kv("cluster_reads_by_round", by_round),
        ]);
        let (handed, not_handed) = n.handovers();
        out.extend([
            kv("cluster_leaders_handed_over", handed),
            kv("cluster_leader_handovers_failed", not_handed),
            kv("cluster_leaders_shed_disk_full", n.leaders_shed()),
        ]);
        let (free, reserve, refused) = n.space();
        let (stopped, stops, reopened) = n.stopped_groups();
        if let Some(free) = free {
            out.push(kv("cluster_disk_free_bytes", free));
        }
        out.extend([
            kv("cluster_disk_reserve_bytes", reserve),
            kv("cluster_writes_refused_disk_full", refused),
            kv("cluster_groups_stopped", stopped),
            kv("cluster_group_stops", stops),
            kv("cluster_groups_reopened", reopened),
        ]);
        let (told, broadcast, watched) = n.group_interest();
        out.extend([
            kv("cluster_group_pushes_sent", told),
            kv("cluster_group_pushes_broadcast", broadcast),
            kv("cluster_groups_watched", watched),
        ]);
        let (build, refused) = n.peer_builds();
        out.extend([
            kv("cluster_peer_build", build),
            kv("cluster_peers_refused", refused),
        ]);
        let (live, replaced, rejoined) = n.liveness();
        out.extend([
            kv("cluster_members_live", live),
            kv("cluster_nodes_replaced", replaced),
            kv("cluster_rejoins", rejoined),
        ]);
    }
    out
}
