//! W6 `devices`: the serving path (`../shared/brief/workload.md`).
//!
//! - **World**: `--users U` (default C / 2) in W4's direct conversations and
//!   small groups (3–20 members; W4's medium and large groups are left out:
//!   with 5,000 users they would be read-fan-out groups, which Redis
//!   Streams has no counterpart of), messages spread over them with W4's
//!   class shares and Zipf weights; device d belongs to user d mod U.
//! - **Devices** (`--devices-total C`, default 10,000): one thread drives
//!   every device connection on one `timeline_client::fleet::Fleet` (a `mio`
//!   poll; the client is event-driven
//!   so that it does not limit the figures). Server: `HELLO`, `SUBSCRIBE`
//!   to its user; every push makes the device `SYNC` from its own
//!   checkpoint (one in flight; another push meanwhile makes it sync again
//!   after), and each entry synced is checked against the checkpoint (no
//!   gap, no duplicate). Redis: a stream per user, the device `PING`s, then
//!   keeps one `XREAD BLOCK 0 STREAMS u:<user> <last id>` outstanding.
//! - **Phases**: set-up (create conversations; untimed), connect (all
//!   devices, reported as `connects_per_sec`), idle (`IDLE_SECS` with
//!   nothing sent: the server's CPU and RSS per connection, from its /proc
//!   entry), load (`--connections` sender connections, default 4, at
//!   `--rate` messages/s in all, default 20,000, for `--messages`, default
//!   10 s worth), drain (every device catches up with a final sync).
//! - **Latencies** (hdrhistogram): push = send time stamped in the payload
//!   → push frame parsed by the device; sync after push = send time → the
//!   entry parsed from the `SYNC` reply that the push triggered (Redis:
//!   the `XREAD` reply is both); send ack = `SEND` queued → its ack read
//!   (Redis: the first `XADD` queued → the last member's reply read).
//! - **Verification**: each device must end with exactly the acknowledged
//!   messages of its user's conversations, in order (`errors`).
//! - **Cluster** (`--target cluster --addr` its nodes): the same protocol
//!   as `server`, routed by one `CLUSTER_MAP`: a device connects to the
//!   leader of its user's sync partition (where `SUBSCRIBE` pushes and
//!   `SYNC` is answered), a sender keeps a connection per node and sends
//!   each `SEND` to the leader of its conversation's partition. The nodes
//!   are not the bench's children: no /proc figures (server CPU, RSS,
//!   threads). Set-up makes the creates an election refused again on a
//!   fresh map. The run measures a stable cluster: after a leader change
//!   a refused `SEND` counts as an error, and a device's refused `SYNC`
//!   or `SUBSCRIBE` ends the run.

use super::imkit::{ns_since, stamp, stamp_of};
use crate::report::{new_histogram, Reporter, ResultLine};
use crate::sysinfo::{cpu_secs, rss_of, threads_of};
use crate::targets::cluster::Routes;
use crate::targets::redis::Redis;
use crate::targets::resp;
use crate::targets::server::Server;
use crate::{Flags, Result, Target as Which};
use hdrhistogram::Histogram;
use rand::distributions::{Distribution, WeightedIndex};
use rand::Rng;
use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use timeline_client::fleet::{Event, Fleet};
use timeline_server::protocol::{
    self, Hello, Request, RequestFrame, Response, ServerMsg, PROTOCOL_VERSION,
};
use timeline_server::protocol::{Body, ConvKind, ErrorCode, Keyspace, Push, UserId};
use timeline_server::{Client, ClientError};

/// `--devices-total` default.
pub const DEFAULT_DEVICES: u64 = 10_000;
/// `--rate` default for W6 (it is always paced).
pub const DEFAULT_RATE: u64 = 20_000;
/// Seconds of idleness measured with every device connected.
const IDLE_SECS: u64 = 5;
/// Connects in progress at once (the rest wait their turn).
const CONNECT_WINDOW: usize = 1024;
/// Entries per SYNC page.
const PAGE: u32 = 100;
/// How long the drain phase may take before missing entries are errors.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Rounds of creating what an election refused (cluster set-up).
const SETUP_ATTEMPTS: usize = 5;

struct World {
    members: Vec<Vec<UserId>>,
    pick: WeightedIndex<f64>,
}

fn world(flags: &Flags, users: u64) -> Result<World> {
    let mut f = flags.clone();
    f.users = Some(users);
    let w = super::im::build_world(&f)?;
    let keep: Vec<usize> = w.classes[0]
        .iter()
        .chain(&w.classes[1])
        .map(|&c| c as usize)
        .collect();
    let members: Vec<Vec<UserId>> = keep.iter().map(|&c| w.members[c].clone()).collect();
    let weights: Vec<f64> = keep.iter().map(|&c| w.weight[c]).collect();
    Ok(World {
        members,
        pick: WeightedIndex::new(&weights)?,
    })
}

/// What the device thread and the senders share.
struct Shared {
    base: Instant,
    /// Acknowledged messages per user (what its devices must end with).
    expected: Vec<AtomicU64>,
    /// Set once the senders are done: devices catch up and stop.
    drain: AtomicBool,
    errors: AtomicU64,
}

/// Histograms in nanoseconds.
struct Lat {
    push: Histogram<u64>,
    sync: Histogram<u64>,
}

pub fn run(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let c = flags.devices_total.unwrap_or(DEFAULT_DEVICES);
    let users = flags.users.unwrap_or((c / 2).max(3));
    let rate = if flags.rate == 0 {
        DEFAULT_RATE
    } else {
        flags.rate
    };
    let messages = flags.messages_arg.unwrap_or(rate * 10);
    let senders = flags.connections.unwrap_or(4).max(1);
    if c == 0 || users > c {
        return Err("--devices-total must be at least 1 and at least --users".into());
    }
    raise_nofile(c + 256)?;
    let w = world(flags, users)?;
    let extra = vec![
        "--max-connections".to_string(),
        (c + senders as u64 + 64).to_string(),
    ];
    let backend = match flags.target {
        Which::Server => Backend::Server(Server::start(flags, &extra)?),
        Which::Redis => Backend::Redis(Redis::start_with(
            flags,
            &["--maxclients".into(), (c + senders as u64 + 64).to_string()],
        )?),
        Which::Cluster => Backend::Cluster(Routes::fetch(flags)?),
        _ => return Err("devices: --target server, cluster or redis".into()),
    };
    let mut dests = backend.dests()?;
    let pid = backend.pid();
    let t = Instant::now();
    backend.setup(flags, &w, &mut dests)?;
    let dests = Arc::new(dests);
    let setup_secs = t.elapsed().as_secs_f64();
    let sh = Arc::new(Shared {
        base: Instant::now(),
        expected: (0..users).map(|_| AtomicU64::new(0)).collect(),
        drain: AtomicBool::new(false),
        errors: AtomicU64::new(0),
    });
    let (rss0, threads0) = (rss_of(pid), threads_of(pid));
    // The device thread connects everyone, then reports and serves.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let dev = {
        let (sh, kind, dests) = (sh.clone(), backend.kind(), dests.clone());
        std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || devices(kind, &dests, c, users, sh, ready_tx))?
    };
    let connect_secs: f64 = ready_rx.recv().map_err(|_| "the device thread failed")??;
    let (rss1, threads1) = (rss_of(pid), threads_of(pid));
    let cpu0 = cpu_secs(pid);
    std::thread::sleep(Duration::from_secs(IDLE_SECS));
    let idle_cpu = cpu_secs(pid) - cpu0;
    match pid {
        Some(_) => eprintln!(
            "devices: {c} connected in {connect_secs:.2} s; server idle {:.2}% of a core, {threads1} threads",
            idle_cpu / IDLE_SECS as f64 * 100.0,
        ),
        None => eprintln!("devices: {c} connected in {connect_secs:.2} s (remote server: no /proc figures)"),
    }
    let w = Arc::new(w);
    let ack = Arc::new(Mutex::new(new_histogram()?));
    let cpu1 = cpu_secs(pid);
    let t_load = Instant::now();
    let handles: Vec<_> = (0..senders)
        .map(|k| {
            let (w, sh, ack, b) = (w.clone(), sh.clone(), ack.clone(), backend.kind());
            let dests = dests.clone();
            let share =
                messages / senders as u64 + u64::from((k as u64) < messages % senders as u64);
            let per = rate as f64 / senders as f64;
            let seed = flags.seed ^ ((k as u64 + 1) * 0x9E37_79B9);
            let payload = flags.payload.max(8);
            std::thread::spawn(move || {
                sender(b, &dests, &w, &sh, &ack, share, per, seed, payload, k)
            })
        })
        .collect();
    let mut acked = 0u64;
    let mut deliveries = 0u64;
    for h in handles {
        let (a, d) = h.join().map_err(|_| "a sender panicked")??;
        acked += a;
        deliveries += d;
    }
    let load_secs = t_load.elapsed().as_secs_f64();
    let load_cpu = cpu_secs(pid) - cpu1;
    sh.drain.store(true, Ordering::Release);
    let lat = dev.join().map_err(|_| "the device thread panicked")??;
    let errors = sh.errors.load(Ordering::Relaxed) + (messages - acked);
    let mut l = ResultLine {
        workload: "devices".into(),
        target: backend.name().into(),
        durability: match backend {
            // Acknowledged = in a quorum's logs and delivered.
            Backend::Cluster(_) => "quorum".into(),
            _ => super::durability(flags).name().into(),
        },
        ops: acked,
        secs: load_secs,
        ops_per_sec: acked as f64 / load_secs,
        ..Default::default()
    };
    l.messages = Some(acked);
    l.messages_per_sec = Some(acked as f64 / load_secs);
    l.deliveries = Some(deliveries);
    l.deliveries_per_sec = Some(deliveries as f64 / load_secs);
    l.users = Some(users);
    l.rate = Some(rate);
    l.connections = Some(senders);
    l.devices_total = Some(c);
    l.setup_secs = Some(setup_secs);
    l.set_latency(&lock(&ack));
    l.set_push_latency(&lat.push);
    l.send_ack_p99_us = Some(us(lock(&ack).value_at_quantile(0.99)));
    l.sync_after_push_p50_us = Some(us(lat.sync.value_at_quantile(0.5)));
    l.sync_after_push_p99_us = Some(us(lat.sync.value_at_quantile(0.99)));
    l.sync_after_push_p999_us = Some(us(lat.sync.value_at_quantile(0.999)));
    l.connects_per_sec = Some(c as f64 / connect_secs);
    if pid.is_some() {
        l.server_threads = Some(threads1);
        l.server_threads_empty = Some(threads0);
        l.server_rss_per_conn_bytes = Some(rss1.saturating_sub(rss0) / c);
        l.server_idle_cpu_pct = Some(idle_cpu / IDLE_SECS as f64 * 100.0);
        l.server_cpu_secs = Some(load_cpu);
        l.cpu_us_per_message = Some(load_cpu * 1e6 / acked.max(1) as f64);
        l.cpu_us_per_delivery = Some(load_cpu * 1e6 / deliveries.max(1) as f64);
    }
    l.errors = Some(errors);
    rep.push(l)?;
    backend.stop()?;
    Ok(errors)
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 1000.0 * 10.0).round() / 10.0
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn raise_nofile(n: u64) -> Result<()> {
    let got = rlimit::increase_nofile_limit(n)?;
    if got < n {
        return Err(format!(
            "the descriptor limit allows {got}, the run needs {n}: lower --devices-total"
        )
        .into());
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Server,
    Redis,
}

enum Backend {
    Server(Server),
    Redis(Redis),
    /// A running cluster, and where its partitions were led at the start.
    Cluster(Routes),
}

/// Where the run's connections go: one address for a single server or
/// Redis; a cluster's nodes, each request to its partition's leader.
struct Dests {
    addrs: Vec<SocketAddr>,
    routes: Option<Routes>,
    /// Added to every conversation and user id on the wire: a cluster
    /// keeps earlier runs' conversations and sync timelines, so each run
    /// takes fresh ids (0 for the servers the bench starts empty).
    off: u64,
}

impl Dests {
    /// Conversation `conv` of the world, on the wire.
    fn conv_id(&self, conv: u64) -> u64 {
        conv + self.off
    }
    /// User `user` of the world, on the wire.
    fn user_id(&self, user: UserId) -> UserId {
        user + self.off
    }
    /// The node (index into `addrs`) for a conversation's `SEND`.
    fn store(&self, conv: u64) -> usize {
        self.routes
            .as_ref()
            .map_or(0, |r| r.node_of(Keyspace::STORE.0, self.conv_id(conv)))
    }
    /// The node a device of `user` subscribes and syncs on.
    fn sync(&self, user: UserId) -> usize {
        self.routes
            .as_ref()
            .map_or(0, |r| r.node_of(Keyspace::SYNC.0, self.user_id(user)))
    }
    /// A timeline-server connection to each node.
    fn connect(&self) -> Result<Vec<Client>> {
        self.addrs
            .iter()
            .map(|a| Client::connect(*a, b"").map_err(|e| format!("connecting to {a}: {e}").into()))
            .collect()
    }
}

fn resolve(a: &str) -> Result<SocketAddr> {
    a.to_socket_addrs()?
        .next()
        .ok_or_else(|| format!("{a}: no address").into())
}

impl Backend {
    fn kind(&self) -> Kind {
        match self {
            Backend::Server(_) | Backend::Cluster(_) => Kind::Server,
            Backend::Redis(_) => Kind::Redis,
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Backend::Server(_) => "server",
            Backend::Redis(_) => "redis",
            Backend::Cluster(_) => "cluster",
        }
    }
    fn dests(&self) -> Result<Dests> {
        let one = |a: String| -> Result<Dests> {
            Ok(Dests {
                addrs: vec![resolve(&a)?],
                routes: None,
                off: 0,
            })
        };
        match self {
            Backend::Server(t) => one(t.addr.clone()),
            Backend::Redis(r) => one(format!("127.0.0.1:{}", r.port())),
            Backend::Cluster(r) => {
                // Seconds since the epoch, shifted past any world's ids.
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs();
                let off = secs << 30;
                eprintln!("devices: conversation and user ids from {off} (fresh on the cluster)");
                Ok(Dests {
                    addrs: r.nodes.iter().map(|a| resolve(a)).collect::<Result<_>>()?,
                    routes: Some(Routes::clone(r)),
                    off,
                })
            }
        }
    }
    fn pid(&self) -> Option<u32> {
        match self {
            Backend::Server(t) => t.pid(),
            Backend::Redis(r) => Some(r.pid()),
            Backend::Cluster(_) => None,
        }
    }
    /// Create the conversations (server, cluster; Redis streams need none).
    /// On a cluster, creates an election refused (`NO_LEADER`, `MOVED`,
    /// `UNCERTAIN`) are made again on a fresh map, where the leaders are
    /// now (a loaded machine can lose a leader during this untimed
    /// set-up); a retry answered `CONVERSATION_EXISTS` was applied the
    /// first time (each run's ids are fresh). `FANOUT_FAILED` is stored,
    /// its delivery goes on.
    fn setup(&self, flags: &Flags, w: &World, dests: &mut Dests) -> Result<()> {
        if let Backend::Redis(_) = self {
            return Ok(());
        }
        let mut todo: Vec<u64> = (0..w.members.len() as u64).collect();
        for attempt in 1..=SETUP_ATTEMPTS {
            let again = create(w, dests, &todo, attempt > 1)?;
            if again.is_empty() {
                return Ok(());
            }
            if dests.routes.is_none() || attempt == SETUP_ATTEMPTS {
                return Err(format!("{} conversation(s) could not be created", again.len()).into());
            }
            eprintln!(
                "devices: {} create(s) refused by an election; again on a fresh map",
                again.len()
            );
            dests.routes = Some(Routes::fetch(flags)?);
            todo = again;
        }
        Ok(())
    }
    fn stop(self) -> Result<()> {
        match self {
            Backend::Server(t) => t.stop(),
            Backend::Redis(r) => r.stop(),
            Backend::Cluster(_) => Ok(()),
        }
    }
}

// ---- senders ----

/// Create conversations `todo` of the world, pipelined in chunks; those
/// refused by an election (to be made again). `retry`: an earlier try may
/// have created them.
fn create(w: &World, dests: &Dests, todo: &[u64], retry: bool) -> Result<Vec<u64>> {
    let mut conns = dests.connect()?;
    let mut again = Vec::new();
    for chunk in todo.chunks(1024) {
        let mut order = Vec::with_capacity(chunk.len());
        for &conv in chunk {
            let m = &w.members[conv as usize];
            let n = dests.store(conv);
            conns[n].queue(&Request::CreateConversation {
                conv: dests.conv_id(conv),
                kind: if m.len() == 2 {
                    ConvKind::Direct
                } else {
                    ConvKind::Group
                },
                members: m.iter().map(|&u| dests.user_id(u)).collect(),
            });
            order.push((conv, n));
        }
        for c in &mut conns {
            c.flush()?;
        }
        for (conv, n) in order {
            match conns[n].recv() {
                Ok(_) => {}
                Err(ClientError::Server { code, .. })
                    if code == ErrorCode::FANOUT_FAILED
                        || (retry && code == ErrorCode::CONVERSATION_EXISTS) => {}
                Err(ClientError::Server { code, .. })
                    if dests.routes.is_some()
                        && matches!(
                            code,
                            ErrorCode::NO_LEADER | ErrorCode::MOVED | ErrorCode::UNCERTAIN
                        ) =>
                {
                    again.push(conv)
                }
                Err(e) => return Err(format!("creating conversation {conv}: {e}").into()),
            }
        }
    }
    Ok(again)
}

#[allow(clippy::too_many_arguments)]
fn sender(
    kind: Kind,
    dests: &Dests,
    w: &World,
    sh: &Shared,
    ack: &Mutex<Histogram<u64>>,
    share: u64,
    per_sec: f64,
    seed: u64,
    payload_len: usize,
    k: usize,
) -> Result<(u64, u64)> {
    let mut rng = super::imkit::rng(seed, 600 + k as u64);
    let mut link = match kind {
        Kind::Server => Link::Server(dests.connect()?, VecDeque::new()),
        Kind::Redis => Link::Redis(resp::Conn::connect(dests.addrs[0].port())?, Vec::new()),
    };
    let mut hist = new_histogram()?;
    let (mut sent, mut acked, mut deliveries) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut payload = vec![0u8; payload_len];
    let mut burst: Vec<(usize, u64)> = Vec::new();
    while sent < share {
        let due = ((start.elapsed().as_secs_f64() * per_sec) as u64 + 1).min(share);
        burst.clear();
        while sent < due {
            let conv = w.pick.sample(&mut rng);
            let m = &w.members[conv];
            let from = m[rng.gen_range(0..m.len())];
            rng.fill(&mut payload[8..]);
            let t0 = ns_since(sh.base);
            stamp(&mut payload, t0);
            let cmid = ((k as u64) << 40) | (sent + 1);
            link.queue(dests, conv, from, cmid, &payload, m);
            burst.push((conv, t0));
            sent += 1;
        }
        link.flush()?;
        for &(conv, t0) in &burst {
            let ok = link.complete(w.members[conv].len())?;
            let now = ns_since(sh.base);
            hist.record(now.saturating_sub(t0).max(1))?;
            if ok {
                acked += 1;
                deliveries += w.members[conv].len() as u64;
                for &u in &w.members[conv] {
                    sh.expected[u as usize].fetch_add(1, Ordering::AcqRel);
                }
            } else {
                sh.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Sleep until the next message is due (this is the load
        // generator's pacing, not a server path).
        let next = (sent as f64 + 1.0) / per_sec;
        let left = next - start.elapsed().as_secs_f64();
        if left > 0.0 && sent < share {
            std::thread::sleep(Duration::from_secs_f64(left));
        }
    }
    lock(ack).add(&hist)?;
    Ok((acked, deliveries))
}

enum Link {
    /// A connection per node (one for a single server) and the node of
    /// each `SEND` in flight, oldest first.
    Server(Vec<Client>, VecDeque<usize>),
    /// The connection and the commands queued for it.
    Redis(resp::Conn, Vec<u8>),
}

impl Link {
    fn queue(
        &mut self,
        dests: &Dests,
        conv: usize,
        from: UserId,
        cmid: u64,
        payload: &[u8],
        members: &[UserId],
    ) {
        match self {
            Link::Server(conns, inflight) => {
                let n = dests.store(conv as u64);
                inflight.push_back(n);
                conns[n].queue(&Request::Send {
                    conv: dests.conv_id(conv as u64),
                    sender: dests.user_id(from),
                    client_msg_id: cmid,
                    payload,
                });
            }
            Link::Redis(_, b) => {
                for &u in members {
                    let key = format!("u:{u}");
                    resp_cmd(b, &[b"XADD", key.as_bytes(), b"*", b"p", payload]);
                }
            }
        }
    }
    fn flush(&mut self) -> Result<()> {
        match self {
            Link::Server(conns, _) => {
                for c in conns {
                    c.flush()?;
                }
            }
            Link::Redis(c, b) => {
                c.send(b)?;
                b.clear();
            }
        }
        Ok(())
    }
    /// The ack of the oldest message queued: true if it was stored.
    fn complete(&mut self, members: usize) -> Result<bool> {
        match self {
            Link::Server(conns, inflight) => {
                let n = inflight
                    .pop_front()
                    .ok_or("complete() with nothing in flight")?;
                Ok(matches!(conns[n].recv(), Ok(Response::Send(_))))
            }
            Link::Redis(c, _) => {
                let mut ok = true;
                for _ in 0..members {
                    ok &= c.recv()?.is_ok();
                }
                Ok(ok)
            }
        }
    }
}

/// A RESP command array.
fn resp_cmd(b: &mut Vec<u8>, args: &[&[u8]]) {
    b.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        b.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        b.extend_from_slice(a);
        b.extend_from_slice(b"\r\n");
    }
}

// ---- devices ----

enum Phase {
    Connecting,
    /// Waiting for the handshake (server: HELLO + SUBSCRIBE replies;
    /// Redis: PONG).
    Handshake(u8),
    Live,
}

struct Dev {
    /// The user's index in the world (`Shared::expected`).
    user: UserId,
    /// The user's id on the wire.
    id: UserId,
    phase: Phase,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Server: the sync checkpoint; Redis: unused.
    checkpoint: u64,
    /// Redis: the last stream entry id read.
    last_id: String,
    syncing: bool,
    again: bool,
    got: u64,
    next_id: u64,
}

fn devices(
    kind: Kind,
    dests: &Dests,
    c: u64,
    users: u64,
    sh: Arc<Shared>,
    ready: std::sync::mpsc::Sender<Result<f64>>,
) -> Result<Lat> {
    let r = run_devices(kind, dests, c, users, &sh, &ready);
    if let Err(e) = &r {
        let _ = ready.send(Err(e.to_string().into()));
    }
    r
}

fn run_devices(
    kind: Kind,
    dests: &Dests,
    c: u64,
    users: u64,
    sh: &Shared,
    ready: &std::sync::mpsc::Sender<Result<f64>>,
) -> Result<Lat> {
    let mut fleet = Fleet::new()?;
    let mut devs: Vec<Dev> = Vec::with_capacity(c as usize);
    let mut lat = Lat {
        push: new_histogram()?,
        sync: new_histogram()?,
    };
    let t0 = Instant::now();
    let mut live = 0u64;
    let mut connected_at: Option<Instant> = None;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        // Open connections within the window.
        while fleet.len() < c as usize && fleet.len() - (live as usize) < CONNECT_WINDOW {
            let user = fleet.len() as u64 % users;
            fleet.connect(dests.addrs[dests.sync(user)])?;
            devs.push(Dev {
                user,
                id: dests.user_id(user),
                phase: Phase::Connecting,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                checkpoint: 0,
                last_id: "0".into(),
                syncing: false,
                again: false,
                got: 0,
                next_id: 3,
            });
        }
        let timeout = if drain_deadline.is_some() {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(200)
        };
        let mut touched = Vec::new();
        for ev in fleet.poll(Some(timeout))? {
            match ev {
                Event::Connected(i) => {
                    open(kind, &mut devs[i]);
                    touched.push(i);
                }
                Event::Input(i) => {
                    touched.push(i);
                    let d = &mut devs[i];
                    // The device parses the fleet's input buffer in place.
                    std::mem::swap(&mut d.rbuf, fleet.input(i));
                    let became_live = match kind {
                        Kind::Server => server_input(d, sh, &mut lat)?,
                        Kind::Redis => redis_input(d, sh, &mut lat)?,
                    };
                    std::mem::swap(&mut d.rbuf, fleet.input(i));
                    if became_live {
                        live += 1;
                    }
                }
                Event::Closed(i, e) => {
                    return Err(format!("device {i}: connection closed ({e:?})").into())
                }
            }
        }
        for i in touched {
            if !devs[i].wbuf.is_empty() {
                fleet.output(i).append(&mut devs[i].wbuf);
            }
        }
        fleet.flush_all()?;
        if live == c && connected_at.is_none() {
            let now = Instant::now();
            connected_at = Some(now);
            let _ = ready.send(Ok((now - t0).as_secs_f64()));
        }
        if sh.drain.load(Ordering::Acquire) {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_LIMIT);
            let mut behind = 0;
            for (i, d) in devs.iter_mut().enumerate() {
                let want = sh.expected[d.user as usize].load(Ordering::Acquire);
                if d.got < want {
                    behind += 1;
                    if let (Kind::Server, false) = (kind, d.syncing) {
                        sync(d);
                        fleet.output(i).append(&mut d.wbuf);
                    }
                } else if d.got > want {
                    return Err(format!(
                        "device of user {}: {} entries, {want} sent",
                        d.user, d.got
                    )
                    .into());
                }
            }
            if behind == 0 {
                return Ok(lat);
            }
            if Instant::now() > deadline {
                sh.errors.fetch_add(behind, Ordering::Relaxed);
                eprintln!("devices: {behind} devices still behind after {DRAIN_LIMIT:?}");
                return Ok(lat);
            }
        }
    }
}

/// The connection is up: say hello (server) or PING (Redis).
fn open(kind: Kind, d: &mut Dev) {
    match kind {
        Kind::Server => {
            RequestFrame {
                id: 1,
                request: Request::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    max_frame: 0,
                    token: b"",
                }),
            }
            .encode_into(&mut d.wbuf);
            RequestFrame {
                id: 2,
                request: Request::Subscribe { user: d.id },
            }
            .encode_into(&mut d.wbuf);
            d.phase = Phase::Handshake(2);
        }
        Kind::Redis => {
            resp_cmd(&mut d.wbuf, &[b"PING"]);
            d.phase = Phase::Handshake(1);
        }
    }
}

fn sync(d: &mut Dev) {
    d.syncing = true;
    d.again = false;
    RequestFrame {
        id: d.next_id,
        request: Request::Sync {
            user: d.id,
            checkpoint: d.checkpoint,
            limit: PAGE,
            groups: vec![],
        },
    }
    .encode_into(&mut d.wbuf);
    d.next_id += 1;
}

/// Frames from the server; true when the device just became live.
fn server_input(d: &mut Dev, sh: &Shared, lat: &mut Lat) -> Result<bool> {
    let mut became_live = false;
    let mut pos = 0;
    while let Some((f, used)) = protocol::decode(&d.rbuf[pos..], protocol::DEFAULT_MAX_FRAME)? {
        pos += used;
        match ServerMsg::decode(&f)? {
            ServerMsg::Reply { response, .. } if !matches!(d.phase, Phase::Live) => {
                if let (Phase::Handshake(n), Response::Hello(_) | Response::Subscribe) =
                    (&mut d.phase, &response)
                {
                    *n -= 1;
                    if *n == 0 {
                        d.phase = Phase::Live;
                        became_live = true;
                    }
                }
            }
            ServerMsg::Reply {
                response: Response::Sync(r),
                ..
            } => {
                let now = ns_since(sh.base);
                for e in &r.entries {
                    if e.seq != d.checkpoint + 1 {
                        sh.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    d.checkpoint = e.seq;
                    if let Body::Message(p) = &e.entry.body {
                        d.got += 1;
                        if let Some(t) = stamp_of(p) {
                            lat.sync.record(now.saturating_sub(t).max(1))?;
                        }
                    }
                }
                d.checkpoint = d.checkpoint.max(r.checkpoint);
                d.syncing = false;
                if r.has_more || d.again {
                    sync(d);
                }
            }
            ServerMsg::Push { push, .. } => {
                if let Push::Entry { entry, .. } = &push {
                    if let Body::Message(p) = &entry.entry.body {
                        if let Some(t) = stamp_of(p) {
                            let now = ns_since(sh.base);
                            lat.push.record(now.saturating_sub(t).max(1))?;
                        }
                    }
                }
                if d.syncing {
                    d.again = true;
                } else {
                    sync(d);
                }
            }
            ServerMsg::Error { error, .. } => {
                return Err(format!("device of user {}: server error {error:?}", d.user).into())
            }
            other => return Err(format!("device of user {}: unexpected {other:?}", d.user).into()),
        }
    }
    d.rbuf.drain(..pos);
    Ok(became_live)
}

/// Replies from Redis; true when the device just became live.
fn redis_input(d: &mut Dev, sh: &Shared, lat: &mut Lat) -> Result<bool> {
    use redis::Value;
    let mut became_live = false;
    let mut pos = 0;
    while let Some((r, used)) = resp::parse(&d.rbuf[pos..], 0)? {
        pos += used;
        let v = r.map_err(|e| format!("redis: {e}"))?;
        if let Phase::Handshake(_) = d.phase {
            d.phase = Phase::Live;
            became_live = true;
        } else {
            // [[key, [[id, [field, value]], ...]]]
            let now = ns_since(sh.base);
            let entries = match v {
                Value::Array(mut streams) if !streams.is_empty() => match streams.swap_remove(0) {
                    Value::Array(mut kv) if kv.len() == 2 => match kv.swap_remove(1) {
                        Value::Array(es) => es,
                        _ => Vec::new(),
                    },
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            for e in entries {
                let Value::Array(mut e) = e else { continue };
                if e.len() != 2 {
                    continue;
                }
                if let (Value::Array(fields), Value::BulkString(id)) =
                    (e.swap_remove(1), e.swap_remove(0))
                {
                    d.last_id = String::from_utf8_lossy(&id).into_owned();
                    if let Some(Value::BulkString(p)) = fields.get(1) {
                        d.got += 1;
                        if let Some(t) = stamp_of(p) {
                            let l = now.saturating_sub(t).max(1);
                            lat.push.record(l)?;
                            lat.sync.record(l)?;
                        }
                    }
                }
            }
        }
        let key = format!("u:{}", d.user);
        resp_cmd(
            &mut d.wbuf,
            &[
                b"XREAD",
                b"BLOCK",
                b"0",
                b"STREAMS",
                key.as_bytes(),
                d.last_id.as_bytes(),
            ],
        );
    }
    d.rbuf.drain(..pos);
    Ok(became_live)
}
