//! The network between nodes: openraft's three RPCs over one TCP
//! connection per pair of nodes, shared by every partition.
//!
//! A node hosts tens of partitions and each is a Raft group talking to the
//! same few peers, so a connection per group would be a socket per
//! partition (the issue forbids it). Here every request names its
//! partition and carries an id; replies come back by id in any order, so
//! one slow `InstallSnapshot` never holds up another group's heartbeat.
//!
//! Frame (all integers little-endian; docs/scaling.md has the grid):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | `len`: bytes after this field (at most [`MAX_PEER_FRAME`]) |
//! | 1 | `kind`: 1 append-entries, 2 vote, 3 install-snapshot, 4 deliveries, 5 group read, 6 group push, 7–9 IM reads, 10 committed voters, 11 handover, 12 group interest; 0x7E hello, 0x7D proof; a reply is the request's kind + 0x80; 0xFF "no such group here" |
//! | 4 | partition |
//! | 8 | request id (chosen by the caller, echoed in the reply) |
//! | len − 13 | body: the openraft request, or `Result<reply, RaftError>`, in bincode |
//!
//! Anything undecodable closes the connection (the peer reconnects on its
//! next RPC); a node never panics on what a peer sends.
//!
//! **The hello.** A connection starts with one frame each way, kind
//! [`KIND_HELLO`], partition 0, id 0, body the sender's build fingerprint
//! ([`build`], u64), a nonce and (the accepting side's) proof, then the
//! connecting side's proof ([`KIND_PROOF`]; module [`crate::hello`]): the
//! one who connects waits for the answer's hello before its proof and its
//! first request. The nodes of a cluster must run the same build (their
//! bincode has no version field) and, with `--auth`, prove the same
//! secret, so a node that finds another build (or a first frame that is
//! not a hello: a build from before the hello) or a wrong proof closes
//! the connection, counts it ([`Refusals`]) and logs it once a minute per
//! peer, instead of misreading the other's messages or serving a stranger.
//! The one who connected also waits a second before trying that peer
//! again.

use crate::hello::{Hello, PeerSecret, Side};
use crate::lease::Leases;
use crate::{NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// The largest peer frame: a snapshot chunk (openraft's default chunk is
/// 3 MiB) or a batch of entries, with room.
pub const MAX_PEER_FRAME: usize = 64 << 20;
const HEAD: usize = 13;
const KIND_APPEND: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
/// Sync entries for a partition this node leads (IM across partitions):
/// bincode `Vec<Delivery>`; reply `Result<(), Option<leader>>`.
pub const KIND_DELIVER: u8 = 4;
/// Pages of read-fan-out groups this node leads ([`crate::groups`]):
/// bincode `Batch` (the reads, in order, and a shared budget); reply
/// `Result<Vec<Result<RawPage, Refusal>>, String>`, one per read.
pub const KIND_GROUP_READ: u8 = 5;
/// A read-fan-out group's new message, told to every node (a push hint):
/// bincode `GroupEvent`; the reply is empty.
pub const KIND_GROUP_PUSH: u8 = 6;
/// Was a user a member of a conversation this node leads, the last seq
/// its stays reach, do they cover a seq ([`crate::marks`]): bincode
/// `Probe`; reply
/// `Result<Result<ConvInfo, ImRefusal>, Refusal>`.
pub const KIND_CONV_INFO: u8 = 7;
/// Last seqs, unread counts and membership of conversations this node leads
/// ([`crate::conversations`]): bincode `Vec<SummaryRead>`; reply
/// `Result<Vec<Result<Summary, Refusal>>, String>`, one per read.
pub const KIND_CONV_SUMMARY: u8 = 8;
/// A user's deletes-for-me in a conversation, from the leader of the
/// user's partition ([`crate::marks`]): bincode `DeletesRead`; reply
/// `Result<Vec<u64>, Refusal>`.
pub const KIND_DELETES: u8 = 9;
/// The voters of a partition's committed membership as this node's group
/// knows it ([`crate::reconcile`]: may a node that stood down release its
/// log?): empty body; reply bincode `Option<Vec<NodeId>>` (`None`: no group
/// here).
pub const KIND_MEMBERSHIP: u8 = 10;
/// A leadership handover (`crate::rebalance`): hold elections, or stand.
pub const KIND_HANDOVER: u8 = 11;
/// The read-fan-out groups a node has subscribers in ([`crate::interest`]):
/// bincode `Register`; the reply is empty.
pub const KIND_INTEREST: u8 = 12;
/// The first frame each way on a connection: the sender's [`build`]
/// (u64 LE).
const KIND_HELLO: u8 = 0x7E;
/// The connecting node's proof, right after the hellos (module `hello`).
const KIND_PROOF: u8 = 0x7D;
/// The largest hello or proof frame (after its length): what a peer may
/// make a node allocate before it proved anything.
const MAX_HELLO_FRAME: usize = 256;
/// How long the side that accepted waits for the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the side that connected waits for the answer's (the peer's
/// runtime may be busy: more than the connect timeout).
const HELLO_WAIT: Duration = Duration::from_secs(2);
/// How long a peer of another build is not tried again.
const OTHER_BUILD_BACKOFF: Duration = Duration::from_secs(1);

/// This build's fingerprint (`build.rs`: the sources that decide what
/// nodes send each other, and `Cargo.lock`).
pub fn build() -> u64 {
    env!("TIMELINE_PEER_BUILD").parse().unwrap_or(0)
}

/// This node's hello frame, over `nonce`, with `proof` (module `hello`).
fn hello_frame(nonce: [u8; 16], proof: Vec<u8>) -> Vec<u8> {
    let h = Hello {
        build: build(),
        nonce,
        proof,
    };
    frame(KIND_HELLO, 0, 0, &h.encode())
}

/// A peer's first frame as a hello of this build, or why the connection
/// does not go on.
fn their_hello(f: &Frame) -> Result<Hello, String> {
    match (f.kind, Hello::decode(&f.body)) {
        (KIND_HELLO, Some(h)) if h.build == build() => Ok(h),
        (KIND_HELLO, Some(h)) => Err(format!(
            "it runs build {}, this node {}; the nodes of a cluster must run the same build",
            h.build,
            build()
        )),
        _ => Err(format!(
            "its first frame (kind {}, {} bytes) is not a hello of this build: a build from before?",
            f.kind,
            f.body.len()
        )),
    }
}

/// Connections refused for another build, both ways (`STATS`
/// `cluster_peers_refused`), and when each peer was last logged.
#[derive(Default)]
pub struct Refusals {
    count: AtomicU64,
    logged: Mutex<HashMap<String, Instant>>,
}

impl Refusals {
    /// One refusal of `peer` (a node, or an address without its port: one
    /// entry per host, however many connections it makes).
    fn note(&self, peer: &str, why: &str) {
        const EVERY: Duration = Duration::from_secs(60);
        self.count.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut logged = self.logged.lock();
        logged.retain(|_, t| now.duration_since(*t) < EVERY);
        if !logged.contains_key(peer) {
            logged.insert(peer.to_string(), now);
            tracing::error!(peer, "peer connection refused: {why}");
        }
    }

    /// Connections refused since start.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}
const DELIVER_TIMEOUT: Duration = Duration::from_secs(5);
const REPLY: u8 = 0x80;
const KIND_NO_GROUP: u8 = 0xFF;
/// A peer connection's read buffer: one `recv` takes every frame that
/// arrived together (the writer coalesces them), where reading each
/// frame's length and body straight from the socket took two.
const READ_BUF: usize = 64 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The shortest deadline an RPC gets (see `Peer::rpc`).
const MIN_RPC_TIMEOUT: Duration = Duration::from_millis(1000);

/// The Raft groups this node hosts, by partition.
pub type Groups = RwLock<HashMap<u32, Raft<TypeConfig>>>;

/// Where each node's peer port is (from etcd's membership records).
pub type PeerAddrs = RwLock<BTreeMap<NodeId, String>>;

/// What answers a peer's requests other than openraft's (kinds
/// [`KIND_DELIVER`] to [`KIND_MEMBERSHIP`]): (kind, partition, body) → the
/// reply's body.
pub type ImFn = Arc<
    dyn Fn(u8, u32, Vec<u8>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>>
        + Send
        + Sync,
>;

fn frame(kind: u8, partition: u32, id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + HEAD + body.len());
    f.extend_from_slice(&((HEAD + body.len()) as u32).to_le_bytes());
    f.push(kind);
    f.extend_from_slice(&partition.to_le_bytes());
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(body);
    f
}

/// One decoded frame.
struct Frame {
    kind: u8,
    partition: u32,
    id: u64,
    body: Vec<u8>,
}

/// Read one frame; `None` at a clean end of stream.
async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Option<Frame>> {
    read_frame_within(r, MAX_PEER_FRAME).await
}

/// [`read_frame`], of at most `max` bytes after the length (a hello or a
/// proof, read before the peer proved anything: [`MAX_HELLO_FRAME`]).
async fn read_frame_within(
    r: &mut (impl AsyncReadExt + Unpin),
    max: usize,
) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(HEAD..=max).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes (limits {HEAD}..={max})"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    let body = buf.split_off(HEAD);
    let mut p = [0u8; 4];
    p.copy_from_slice(&buf[1..5]);
    let mut i = [0u8; 8];
    i.copy_from_slice(&buf[5..13]);
    Ok(Some(Frame {
        kind: buf[0],
        partition: u32::from_le_bytes(p),
        id: u64::from_le_bytes(i),
        body,
    }))
}

/// Write frames from `rx` until it closes or the socket fails, coalescing
/// what is queued into one write.
async fn write_frames(mut w: impl AsyncWriteExt + Unpin, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(mut buf) = rx.recv().await {
        while buf.len() < 1 << 20 {
            match rx.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------- serving

/// Accept peers on `listener` and answer their RPCs from `groups`.
///
/// Vote requests are answered from `votes.from` on, not before: a node
/// restarted has lost the instant it last heard from its leader, which
/// openraft's leader lease (and [`crate::lease`]) count on (openraft
/// 0.9.25 restarts that clock when a group opens; the gate does not rest
/// on it); `votes.from` is `election_timeout_max` after start-up, when
/// that lease is over anyway. A vote request also voids the partition's
/// lease before openraft sees it ([`Leases::void`]).
pub async fn serve(
    listener: TcpListener,
    groups: Arc<Groups>,
    im: ImFn,
    votes: VoteGate,
    refusals: Arc<Refusals>,
    secret: PeerSecret,
) {
    loop {
        match listener.accept().await {
            Ok((s, from)) => {
                let _ = s.set_nodelay(true);
                let conn = Conn {
                    groups: groups.clone(),
                    im: im.clone(),
                    votes: votes.clone(),
                };
                let (refusals, secret) = (refusals.clone(), secret.clone());
                tokio::spawn(async move {
                    if let Some(s) = greet(s, &from.ip().to_string(), &refusals, &secret).await {
                        serve_conn(s, conn).await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How this node takes vote requests: not before `from` (see [`serve`]),
/// and each voids its partition's lease.
#[derive(Clone)]
pub struct VoteGate {
    pub from: Instant,
    pub(crate) leases: Arc<Leases>,
}

/// What a connection a peer made is served with.
struct Conn {
    groups: Arc<Groups>,
    im: ImFn,
    votes: VoteGate,
}

/// The accepting side of the hello: read the peer's, answer with this
/// node's, then read the peer's proof; hand the connection on if the
/// builds are the same and the proof holds (`None`: closed).
async fn greet(
    mut s: TcpStream,
    from: &str,
    refusals: &Refusals,
    secret: &PeerSecret,
) -> Option<TcpStream> {
    let f = first_frame(&mut s, from, "hello").await?;
    let ours = crate::hello::nonce();
    let theirs = their_hello(&f);
    let proof = match &theirs {
        Ok(h) => secret.prove(Side::Accepting, &h.nonce, &ours),
        Err(_) => Vec::new(),
    };
    // Answered either way, so that the peer can say why it was refused.
    if s.write_all(&hello_frame(ours, proof)).await.is_err() {
        return None;
    }
    let refused = |why: String| {
        refusals.note(from, &why);
        None
    };
    let h = match theirs {
        Ok(h) => h,
        Err(why) => return refused(why),
    };
    let f = first_frame(&mut s, from, "proof").await?;
    if f.kind != KIND_PROOF {
        return refused(format!(
            "its second frame (kind {}) is not its proof",
            f.kind
        ));
    }
    match secret.check(Side::Connecting, &f.body, &h.nonce, &ours) {
        None => Some(s),
        Some(why) => refused(why),
    }
}

/// The next frame of a connection being greeted, within [`HELLO_TIMEOUT`]
/// (`None`: it closed, failed or said nothing; logged at debug).
async fn first_frame(s: &mut TcpStream, from: &str, what: &str) -> Option<Frame> {
    match tokio::time::timeout(HELLO_TIMEOUT, read_frame_within(s, MAX_HELLO_FRAME)).await {
        Ok(Ok(Some(f))) => Some(f),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            tracing::debug!(peer = from, error = %e, "peer connection dropped before its {what}");
            None
        }
        Err(_) => {
            tracing::debug!(peer = from, "no {what} within {HELLO_TIMEOUT:?}");
            None
        }
    }
}

async fn serve_conn(s: TcpStream, conn: Conn) {
    let Conn { groups, im, votes } = conn;
    let (r, w) = s.into_split();
    let mut r = BufReader::with_capacity(READ_BUF, r);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(write_frames(w, rx));
    loop {
        let f = match read_frame(&mut r).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "peer connection dropped");
                return;
            }
        };
        let tx = tx.clone();
        if (KIND_DELIVER..=KIND_INTEREST).contains(&f.kind) {
            let answer = im(f.kind, f.partition, f.body);
            tokio::spawn(async move {
                let body = answer.await;
                let _ = tx.send(frame(f.kind | REPLY, f.partition, f.id, &body));
            });
            continue;
        }
        let raft = groups.read().get(&f.partition).cloned();
        let votes = votes.clone();
        tokio::spawn(async move {
            let (kind, body) = match raft {
                None => (KIND_NO_GROUP, Vec::new()),
                Some(raft) => match answer(&raft, f.kind, f.partition, &f.body, &votes).await {
                    Some(body) => (f.kind | REPLY, body),
                    None => return, // undecodable: no answer, the caller times out
                },
            };
            let _ = tx.send(frame(kind, f.partition, f.id, &body));
        });
    }
}

/// Run one RPC on its group; the encoded `Result`, or `None` if the body
/// does not decode.
async fn answer(
    raft: &Raft<TypeConfig>,
    kind: u8,
    partition: u32,
    body: &[u8],
    votes: &VoteGate,
) -> Option<Vec<u8>> {
    fn enc<T: Serialize>(v: &T) -> Option<Vec<u8>> {
        bincode::serialize(v).ok()
    }
    match kind {
        KIND_APPEND => {
            let req: AppendEntriesRequest<TypeConfig> = bincode::deserialize(body).ok()?;
            votes.leases.heard(partition, Instant::now());
            enc(&raft.append_entries(req).await)
        }
        KIND_VOTE => {
            let req: VoteRequest<NodeId> = bincode::deserialize(body).ok()?;
            tokio::time::sleep_until(votes.from.into()).await;
            if let Some(t) = votes.leases.votes_from(partition) {
                tokio::time::sleep_until(t.into()).await;
            }
            votes.leases.void(partition, Instant::now());
            enc(&raft.vote(req).await)
        }
        KIND_SNAPSHOT => {
            let req: InstallSnapshotRequest<TypeConfig> = bincode::deserialize(body).ok()?;
            enc(&raft.install_snapshot(req).await)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------- calling

/// One live connection to a peer, shared by every partition's RPCs.
struct Link {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    dead: AtomicBool,
}

/// A peer's connection, made by whoever finds it missing first (others
/// wait for that attempt instead of connecting too), and when and why the
/// last attempt found another build there.
type LinkSlot = tokio::sync::Mutex<(Option<Arc<Link>>, Option<(Instant, String)>)>;

/// The connections of this node to its peers: one per peer, made on first
/// use and again after it failed.
pub struct Transport {
    addrs: Arc<PeerAddrs>,
    links: Mutex<HashMap<NodeId, Arc<LinkSlot>>>,
    next_id: AtomicU64,
    /// Peers of another build, found here or by [`serve`].
    pub refusals: Arc<Refusals>,
    /// What this node proves to the peers it connects to.
    secret: PeerSecret,
}

/// Why an RPC got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error("no address for node {0}")]
    NoAddress(NodeId),
    #[error("connect to node {0}: {1}")]
    Connect(NodeId, String),
    #[error("node {0} closed the connection")]
    Closed(NodeId),
    #[error("node {0} did not answer within {1:?}")]
    Timeout(NodeId, Duration),
    #[error("node {0} does not host partition {1}")]
    NoGroup(NodeId, u32),
    #[error("node {0} sent an undecodable reply")]
    Garbled(NodeId),
    #[error("node {0} refused: {1}")]
    Refused(NodeId, String),
}

impl Transport {
    pub fn new(addrs: Arc<PeerAddrs>, secret: PeerSecret) -> Arc<Transport> {
        Arc::new(Transport {
            addrs,
            links: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            refusals: Default::default(),
            secret,
        })
    }

    async fn link(&self, target: NodeId) -> Result<Arc<Link>, CallError> {
        let slot = self.links.lock().entry(target).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(l) = slot.0.as_ref() {
            if !l.dead.load(Ordering::Acquire) {
                return Ok(l.clone());
            }
        }
        if let Some((at, why)) = &slot.1 {
            if at.elapsed() < OTHER_BUILD_BACKOFF {
                return Err(CallError::Refused(target, why.clone()));
            }
        }
        let addr = self
            .addrs
            .read()
            .get(&target)
            .cloned()
            .ok_or(CallError::NoAddress(target))?;
        let s = match self.connect(target, &addr).await {
            Err(CallError::Refused(_, why)) => {
                self.refusals
                    .note(&format!("node {target} at {addr}"), &why);
                slot.1 = Some((Instant::now(), why.clone()));
                return Err(CallError::Refused(target, why));
            }
            other => other?,
        };
        slot.1 = None;
        let (r, w) = s.into_split();
        let mut r = BufReader::with_capacity(READ_BUF, r);
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            tx,
            pending: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        tokio::spawn(write_frames(w, rx));
        let reader = link.clone();
        tokio::spawn(async move {
            while let Ok(Some(f)) = read_frame(&mut r).await {
                if let Some(waiter) = reader.pending.lock().remove(&f.id) {
                    let _ = waiter.send(f);
                }
            }
            reader.dead.store(true, Ordering::Release);
            // Dropping the waiters fails their calls at once.
            reader.pending.lock().clear();
        });
        slot.0 = Some(link.clone());
        Ok(link)
    }

    /// Connect to `target` at `addr` and exchange hellos.
    async fn connect(&self, target: NodeId, addr: &str) -> Result<TcpStream, CallError> {
        let gone = |e: std::io::Error| CallError::Connect(target, e.to_string());
        let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| CallError::Connect(target, "timed out".into()))?
            .map_err(gone)?;
        let _ = s.set_nodelay(true);
        let ours = crate::hello::nonce();
        s.write_all(&hello_frame(ours, Vec::new()))
            .await
            .map_err(gone)?;
        // An older build never answers a hello: a peer down, for this node.
        let answer = tokio::time::timeout(HELLO_WAIT, read_frame_within(&mut s, MAX_HELLO_FRAME))
            .await
            .map_err(|_| {
                CallError::Connect(
                    target,
                    format!("no hello within {HELLO_WAIT:?} (a build from before the hello?)"),
                )
            })?;
        let f = answer
            .map_err(gone)?
            .ok_or_else(|| CallError::Connect(target, "closed before its hello".into()))?;
        let h = their_hello(&f).map_err(|why| CallError::Refused(target, why))?;
        if let Some(why) = self
            .secret
            .check(Side::Accepting, &h.proof, &h.nonce, &ours)
        {
            return Err(CallError::Refused(target, why));
        }
        let proof = self.secret.prove(Side::Connecting, &h.nonce, &ours);
        s.write_all(&frame(KIND_PROOF, 0, 0, &proof))
            .await
            .map_err(gone)?;
        Ok(s)
    }

    /// Send a request of `kind` to node `target` and wait up to `ttl`
    /// for its answer.
    pub(crate) async fn call(
        &self,
        target: NodeId,
        kind: u8,
        partition: u32,
        body: Vec<u8>,
        ttl: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let link = self.link(target).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        link.pending.lock().insert(id, tx);
        if link.dead.load(Ordering::Acquire)
            || link.tx.send(frame(kind, partition, id, &body)).is_err()
        {
            link.pending.lock().remove(&id);
            return Err(CallError::Closed(target));
        }
        let f = match tokio::time::timeout(ttl, rx).await {
            Ok(Ok(f)) => f,
            Ok(Err(_)) => return Err(CallError::Closed(target)),
            Err(_) => {
                link.pending.lock().remove(&id);
                return Err(CallError::Timeout(target, ttl));
            }
        };
        match f.kind {
            k if k == kind | REPLY => Ok(f.body),
            KIND_NO_GROUP => Err(CallError::NoGroup(target, partition)),
            _ => Err(CallError::Garbled(target)),
        }
    }
}

impl Transport {
    /// Send partition `partition`'s deliveries to node `target`; its answer.
    pub async fn deliver(
        &self,
        target: NodeId,
        partition: u32,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        self.im_call(target, KIND_DELIVER, partition, body).await
    }

    /// Send an IM request of `kind` (partition `partition`'s) to node
    /// `target`; its answer.
    pub async fn im_call(
        &self,
        target: NodeId,
        kind: u8,
        partition: u32,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        self.call(target, kind, partition, body, DELIVER_TIMEOUT)
            .await
            .map_err(|e| e.to_string())
    }
}

impl CallError {
    /// The request never left this node (no address, no connection): the
    /// peer cannot have acted on it.
    pub(crate) fn never_sent(&self) -> bool {
        matches!(
            self,
            CallError::NoAddress(_) | CallError::Connect(..) | CallError::Refused(..)
        )
    }
}

/// openraft's network for one partition: calls go through the node's
/// shared [`Transport`].
pub struct Network {
    pub transport: Arc<Transport>,
    pub partition: u32,
    pub(crate) leases: Arc<Leases>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Peer {
        Peer {
            transport: self.transport.clone(),
            partition: self.partition,
            target,
            leases: self.leases.clone(),
        }
    }
}

/// One partition's view of one peer.
pub struct Peer {
    transport: Arc<Transport>,
    partition: u32,
    target: NodeId,
    leases: Arc<Leases>,
}

impl Peer {
    async fn rpc<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        kind: u8,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let body = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        // openraft's deadline is the heartbeat interval (80 ms): on a busy
        // machine a peer's answer can take longer, and a miss fails a read's
        // leadership check. A dead peer is found out by its connection
        // (refused or reset), not by this timeout.
        let ttl = option.hard_ttl().max(MIN_RPC_TIMEOUT);
        let reply = self
            .transport
            .call(self.target, kind, self.partition, body, ttl)
            .await
            .map_err(|e| match e {
                // A peer that is down or not (yet) hosting the group: back off.
                CallError::NoAddress(_)
                | CallError::Connect(..)
                | CallError::NoGroup(..)
                | CallError::Refused(..) => RPCError::Unreachable(Unreachable::new(&e)),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        let r: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let (vote, sent) = (rpc.vote, Instant::now());
        let r = self.rpc(KIND_APPEND, &rpc, &option).await;
        // Any answer but a higher vote means the follower took this vote
        // (and restarted its election clock) on receiving the request.
        if let Ok(resp) = &r {
            if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
                self.leases
                    .accepted(self.partition, self.target, &vote, sent);
            }
        }
        r
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(KIND_VOTE, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(KIND_SNAPSHOT, &rpc, &option).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every decoder a node runs on a body a peer sent (the Raft RPCs and
    /// the IM and placement requests); each must answer `Err` to bytes
    /// that are not its type, never panic or abort.
    fn decode_every_kind(body: &[u8]) {
        fn try_as<T: DeserializeOwned>(b: &[u8]) {
            let _ = bincode::deserialize::<T>(b);
        }
        try_as::<AppendEntriesRequest<TypeConfig>>(body);
        try_as::<VoteRequest<NodeId>>(body);
        try_as::<InstallSnapshotRequest<TypeConfig>>(body);
        try_as::<Vec<crate::im::Delivery>>(body);
        try_as::<crate::groups::Batch>(body);
        try_as::<crate::groups::GroupEvent>(body);
        try_as::<crate::marks::Probe>(body);
        try_as::<crate::marks::DeletesRead>(body);
        try_as::<Vec<crate::conversations::SummaryRead>>(body);
        try_as::<crate::rebalance::Ask>(body);
        try_as::<crate::reconcile::CommittedVoters>(body);
        try_as::<crate::interest::Register>(body);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn peer_bodies_that_are_not_their_type_are_refused(
            body in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            decode_every_kind(&body);
        }
    }

    /// A node that accepts a connection answers a hello of another build,
    /// or a first frame that is no hello, with its own hello and closes;
    /// a hello of its build, then the proof, and the connection goes on.
    /// A node that connects to another build gets `Refused` (an RPC
    /// never sent), and does not connect there again for a second. Each
    /// refusal is counted.
    #[test]
    fn peers_of_another_build_are_refused_both_ways() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (addr, refusals) = test_server(PeerSecret::default()).await;
            let mine = hello_frame([1; 16], Vec::new());
            let other = {
                let h = Hello {
                    build: build() ^ 1,
                    nonce: [1; 16],
                    proof: Vec::new(),
                };
                frame(KIND_HELLO, 0, 0, &h.encode())
            };
            let got = exchange(addr, std::slice::from_ref(&other)).await;
            let hello = got[0].as_ref().unwrap();
            assert_eq!(hello.kind, KIND_HELLO);
            assert_eq!(their_hello(hello).map(|h| h.proof), Ok(Vec::new()));
            assert!(got[1].is_none(), "closed after another build's hello");
            let got = exchange(addr, &[frame(KIND_APPEND, 9, 1, b"old")]).await;
            assert_eq!(got[0].as_ref().unwrap().kind, KIND_HELLO);
            assert!(
                got[1].is_none(),
                "closed after a first frame that is no hello"
            );
            assert_eq!(refusals.count(), 2);
            let proof = frame(KIND_PROOF, 0, 0, &[]);
            let next = frame(KIND_APPEND, 9, 1, b"x");
            let got = exchange(addr, &[mine, proof, next]).await;
            let reply = got[1].as_ref().expect("the same build is served");
            assert_eq!((reply.kind, reply.id), (KIND_NO_GROUP, 1));
            assert_eq!(refusals.count(), 2);

            // The connecting side, against a node of another build.
            let fake = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let fake_addr = fake.local_addr().unwrap().to_string();
            let accepted = Arc::new(AtomicU64::new(0));
            let n = accepted.clone();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = fake.accept().await {
                    n.fetch_add(1, Ordering::Relaxed);
                    let _ = read_frame(&mut s).await;
                    let _ = s.write_all(&other).await;
                }
            });
            let t = transport_to(4, fake_addr, PeerSecret::default());
            let call = || t.call(4, KIND_VOTE, 0, Vec::new(), Duration::from_secs(1));
            let e = call().await.unwrap_err();
            assert!(
                matches!(e, CallError::Refused(4, _)) && e.never_sent(),
                "{e}"
            );
            assert!(matches!(call().await, Err(CallError::Refused(4, _))));
            assert_eq!(
                accepted.load(Ordering::Relaxed),
                1,
                "no new connection within a second"
            );
            assert_eq!(t.refusals.count(), 1);
        });
    }

    /// With a secret (the server's `--auth`), a node serves only a peer
    /// that proves the same secret over this connection's nonces, and
    /// connects only to one that does: another secret, none, or a proof
    /// played back from another connection is refused and counted, both
    /// ways; the same secret is served.
    #[test]
    fn peers_without_the_cluster_secret_are_refused_both_ways() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let secret = PeerSecret::new(Some(b"cluster secret"));
            let (addr, refusals) = test_server(secret.clone()).await;
            let next = frame(KIND_APPEND, 9, 1, b"x");
            // A raw peer: its hello, then the proof `prove` makes from the
            // accepting node's nonce.
            // The proof a peer makes from (the accepting nonce, its own).
            type Prove = Box<dyn Fn(&[u8; 16], &[u8; 16]) -> Vec<u8>>;
            let attempt = |prove: Prove| {
                let next = next.clone();
                async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let ours = [7u8; 16];
                    s.write_all(&hello_frame(ours, Vec::new())).await.unwrap();
                    let f = read_frame(&mut s).await.unwrap().unwrap();
                    let h = their_hello(&f).unwrap();
                    let proof = prove(&h.nonce, &ours);
                    s.write_all(&frame(KIND_PROOF, 0, 0, &proof)).await.unwrap();
                    s.write_all(&next).await.unwrap();
                    read_frame(&mut s).await.unwrap_or(None)
                }
            };
            let s2 = secret.clone();
            let served = attempt(Box::new(move |a, c| s2.prove(Side::Connecting, a, c))).await;
            assert_eq!(served.map(|f| f.kind), Some(KIND_NO_GROUP));
            let other = PeerSecret::new(Some(b"another"));
            let wrong = attempt(Box::new(move |a, c| other.prove(Side::Connecting, a, c))).await;
            assert!(wrong.is_none(), "another secret: closed");
            let none = attempt(Box::new(|_, _| Vec::new())).await;
            assert!(none.is_none(), "no proof: closed");
            let s3 = secret.clone();
            let stale = attempt(Box::new(move |_, c| {
                s3.prove(Side::Connecting, &[0; 16], c)
            }))
            .await;
            assert!(stale.is_none(), "a proof over another nonce: closed");
            assert_eq!(refusals.count(), 3);

            // The connecting side: to a node with the same secret, with
            // none, with another.
            let t = transport_to(1, addr.to_string(), secret.clone());
            let vote = || t.call(1, KIND_VOTE, 0, Vec::new(), Duration::from_secs(1));
            assert!(
                matches!(vote().await, Err(CallError::NoGroup(1, 0))),
                "the same secret is served"
            );
            let t = transport_to(1, addr.to_string(), PeerSecret::default());
            let e = t
                .call(1, KIND_VOTE, 0, Vec::new(), Duration::from_secs(1))
                .await;
            assert!(matches!(e, Err(CallError::Refused(1, _))), "{e:?}");
            let (addr2, _) = test_server(PeerSecret::new(Some(b"another"))).await;
            let t = transport_to(2, addr2.to_string(), secret);
            let e = t
                .call(2, KIND_VOTE, 0, Vec::new(), Duration::from_secs(1))
                .await;
            assert!(matches!(e, Err(CallError::Refused(2, _))), "{e:?}");
        });
    }

    /// A peer server with no groups, serving with `secret`.
    async fn test_server(secret: PeerSecret) -> (std::net::SocketAddr, Arc<Refusals>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refusals = Arc::new(Refusals::default());
        let im: ImFn = Arc::new(|_, _, _| Box::pin(async { Vec::new() }));
        let votes = VoteGate {
            from: Instant::now(),
            leases: Arc::new(Leases::for_timeouts(Duration::from_millis(300))),
        };
        let groups: Arc<Groups> = Default::default();
        tokio::spawn(serve(listener, groups, im, votes, refusals.clone(), secret));
        (addr, refusals)
    }

    /// Send `frames` on a new connection to `addr`: the first frame back,
    /// and the next (`None` once closed).
    async fn exchange(addr: std::net::SocketAddr, frames: &[Vec<u8>]) -> Vec<Option<Frame>> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&frames[0]).await.unwrap();
        let mut got = vec![read_frame(&mut s).await.unwrap()];
        for f in &frames[1..] {
            s.write_all(f).await.unwrap();
        }
        got.push(read_frame(&mut s).await.unwrap_or(None));
        got
    }

    fn transport_to(node: NodeId, addr: String, secret: PeerSecret) -> Arc<Transport> {
        let addrs: Arc<PeerAddrs> = Default::default();
        addrs.write().insert(node, addr);
        Transport::new(addrs, secret)
    }

    /// Bodies built to hurt: a length prefix of 2^62 elements (bincode
    /// reads from the slice, so it fails on the missing bytes instead of
    /// allocating), and an append-entries whose entries are batches of
    /// conversation writes: a batch holds `ConvWrite`s only, so the
    /// variant tag of a batch inside one is refused, not recursed into.
    #[test]
    fn crafted_lengths_and_nesting_are_refused() {
        let mut huge = Vec::new();
        huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
        huge.extend_from_slice(&[7; 64]);
        decode_every_kind(&huge);
        assert!(bincode::deserialize::<Vec<crate::im::Delivery>>(&huge).is_err());
        assert!(bincode::deserialize::<crate::interest::Register>(&huge).is_err());
        // `Command::ImBatch` (its variant index) holding one item whose tag
        // is `ImBatch`'s again, 10,000 times over.
        let tag = |c: &crate::Command| bincode::serialize(c).unwrap()[..4].to_vec();
        let batch_tag = tag(&crate::Command::ImBatch(Vec::new()));
        let mut nested = Vec::new();
        for _ in 0..10_000 {
            nested.extend_from_slice(&batch_tag);
            nested.extend_from_slice(&1u64.to_le_bytes());
        }
        assert!(bincode::deserialize::<crate::Command>(&nested).is_err());
    }
}
