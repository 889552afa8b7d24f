//! The TCP server: a thin shell around [`Im`] and its [`Engine`].
//!
//! One reader thread and one writer thread per connection (the engine and
//! the IM layer are blocking APIs; nothing here is per timeline). The
//! reader decodes frames and executes requests in order; work whose answer
//! comes later (a `SEND` waiting for its fan-out, an `APPEND` waiting for a
//! shared fdatasync) goes to the writer as a pending item, so a pipelining
//! client keeps many of them in flight and group commit shares syncs across
//! them. The writer answers in request order. The queue between the two is
//! bounded: when a client does not read its replies, the reader stops
//! reading its requests (TCP backpressure), so a slow client costs a bounded
//! amount of memory and never stalls other connections. Subscriptions get a
//! forwarding thread that offers pushes to the queue without blocking (a
//! full queue drops the push and sends one `resync` later).
//!
//! Shutdown ([`ServerHandle::shutdown`], SIGINT/SIGTERM in the binary):
//! stop accepting, stop reading new requests, answer every request already
//! read, close the IM layer (everything acknowledged is durable), return.

use crate::protocol::token::{self, Role};
use crate::protocol::{
    self, encode_push_frame, ErrorCode, ErrorReply, Identity, Opcode, ProtocolError, Request,
    RequestFrame, Response,
};
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use timeline_engine::Keyspace;
use timeline_engine::{AppendTicket, Config, Durability, Engine};
use timeline_im::{Im, ImConfig, Pending, Push, SendAck};

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
    /// Replies (and pushes) a connection may have waiting to be written.
    pub max_queued_replies: usize,
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
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(30),
            max_queued_replies: 4096,
        }
    }
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
}

/// Counters the `STATS` command reports with the engine's.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    open: AtomicUsize,
    refused: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    im: Im,
    cfg: ServerConfig,
    stop: Arc<AtomicBool>,
    counters: Counters,
}

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Option<Arc<Shared>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl ServerHandle {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The flag that, once set, shuts the server down (signal handlers set it).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The IM layer the server serves (in-process use, tests).
    pub fn im(&self) -> Option<&Im> {
        self.shared.as_ref().map(|s| &s.im)
    }

    /// Stop accepting, answer what was read, close the IM layer (acknowledged
    /// data is durable), and return.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.stop.store(true, Ordering::Release);
        self.join()
    }

    /// Wait until the stop flag is set, then shut down.
    pub fn wait(mut self) -> Result<(), ServerError> {
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        loop {
            let hs: Vec<_> = std::mem::take(&mut *lock(&self.conns));
            if hs.is_empty() {
                break;
            }
            for h in hs {
                let _ = h.join();
            }
        }
        let Some(shared) = self.shared.take() else {
            return Ok(());
        };
        // Every connection thread is done: this is the last reference.
        match Arc::try_unwrap(shared) {
            Ok(s) => s.im.close()?,
            Err(s) => s.im.engine().sync().map_err(timeline_im::ImError::from)?,
        }
        tracing::info!("server stopped; acknowledged data is durable");
        Ok(())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.shared.is_some() {
            self.stop.store(true, Ordering::Release);
            if let Err(e) = self.join() {
                tracing::error!(error = %e, "shutdown failed");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Open the IM layer in `cfg.data_dir`, bind `cfg.listen`, start accepting.
pub fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    let listener = TcpListener::bind(&cfg.listen).map_err(|e| ServerError::Bind {
        addr: cfg.listen.clone(),
        source: e,
    })?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let im = Im::open(&cfg.data_dir, cfg.engine.clone(), cfg.im.clone())?;
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        im,
        cfg,
        stop: stop.clone(),
        counters: Counters::default(),
    });
    let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
    let accept = {
        let (shared, conns) = (shared.clone(), conns.clone());
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(listener, shared, conns))?
    };
    tracing::info!(%addr, "listening");
    Ok(ServerHandle {
        addr,
        shared: Some(shared),
        stop,
        accept: Some(accept),
        conns,
    })
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>, conns: Arc<Mutex<Vec<JoinHandle<()>>>>) {
    while !sh.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let open = sh.counters.open.load(Ordering::Acquire);
                if open >= sh.cfg.max_connections {
                    sh.counters.refused.fetch_add(1, Ordering::Relaxed);
                    refuse(stream, sh.cfg.max_connections);
                    continue;
                }
                sh.counters.open.fetch_add(1, Ordering::AcqRel);
                sh.counters.connections.fetch_add(1, Ordering::Relaxed);
                let sh2 = sh.clone();
                let h = std::thread::Builder::new()
                    .name(format!("conn-{peer}"))
                    .spawn(move || {
                        if let Err(e) = connection(stream, &sh2) {
                            tracing::debug!(%peer, error = %e, "connection ended");
                        }
                        sh2.counters.open.fetch_sub(1, Ordering::AcqRel);
                    });
                match h {
                    Ok(h) => {
                        let mut g = lock(&conns);
                        g.retain(|h| !h.is_finished());
                        g.push(h);
                    }
                    Err(e) => {
                        sh.counters.open.fetch_sub(1, Ordering::AcqRel);
                        tracing::error!(error = %e, "cannot start a connection thread");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Too many connections: say so (request id 0: about the connection) and close.
fn refuse(mut stream: TcpStream, max: usize) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let mut b = Vec::new();
    ErrorReply::new(
        ErrorCode::TOO_MANY_CONNECTIONS,
        0, // the table marks arg unused; the limit is in the message
        format!("the server takes at most {max} connections"),
    )
    .encode_frame(0, Opcode(0), &mut b);
    let _ = stream.write_all(&b);
}

/// Subscriptions one connection may hold (each has a forwarding thread).
const MAX_SUBSCRIPTIONS: usize = 16;

/// What the reader hands the writer, in request order.
enum Out {
    /// A finished frame (reply, error or push).
    Frame(Vec<u8>),
    /// A `SEND` whose acknowledgement comes from the IM layer.
    Send { id: u64, pending: Pending<SendAck> },
    /// Appends handed to the OS whose shared fdatasync is still to come.
    Append {
        id: u64,
        batch: bool,
        ticket: AppendTicket,
    },
    /// A run of pipelined single APPENDs written as one batch: one reply
    /// each, in order, once the ticket's fdatasync is done.
    AppendMany { ids: Vec<u64>, ticket: AppendTicket },
    /// Close after writing what came before (a fatal error was queued).
    Close,
}

/// The reader's side of the queue to the writer. Finished frames of one
/// pass over the input are concatenated and handed over as one item (one
/// channel operation and one writer wake-up per pass, not per reply);
/// anything deferred goes after what came before it, so order is kept.
struct Outbox<'a> {
    tx: &'a Sender<Out>,
    bytes: Vec<u8>,
    /// Bytes handed to the writer and not yet written (shared with it and
    /// the push forwarders): the per-connection output bound in bytes.
    queued: &'a Arc<AtomicUsize>,
}

impl Outbox<'_> {
    /// Queue `o` behind everything before it; `Err` once the writer is gone.
    fn send(&mut self, o: Out) -> Result<(), ()> {
        match o {
            Out::Frame(b) => {
                if self.bytes.is_empty() {
                    self.bytes = b;
                } else {
                    self.bytes.extend_from_slice(&b);
                }
                if self.bytes.len() >= 256 << 10 {
                    self.flush()?;
                }
                Ok(())
            }
            other => {
                self.flush()?;
                self.tx.send(other).map_err(|_| ())
            }
        }
    }

    fn flush(&mut self) -> Result<(), ()> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        let b = std::mem::take(&mut self.bytes);
        self.queued.fetch_add(b.len(), Ordering::AcqRel);
        self.tx.send(Out::Frame(b)).map_err(|_| ())
    }
}

/// Output a connection may have queued before the server stops reading its
/// requests (on top of the one reply being built).
const MAX_QUEUED_BYTES: usize = 4 << 20;

struct Conn {
    id: Option<Identity>,
    /// The largest frame the client accepts.
    client_max: usize,
    subs: Vec<(u64, Arc<AtomicBool>, JoinHandle<()>)>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn connection(stream: TcpStream, sh: &Arc<Shared>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    // Short read timeouts let the reader notice a shutdown and idleness.
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    stream.set_write_timeout(Some(sh.cfg.write_timeout))?;
    let (tx, rx) = bounded::<Out>(sh.cfg.max_queued_replies.max(1));
    let dead = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (w, dead, queued) = (stream.try_clone()?, dead.clone(), queued.clone());
        std::thread::Builder::new()
            .name("conn-writer".into())
            .spawn(move || writer(w, rx, dead, queued))?
    };
    let mut conn = Conn {
        id: None,
        client_max: protocol::DEFAULT_MAX_FRAME,
        subs: Vec::new(),
    };
    let r = reader(&stream, sh, &tx, &dead, &queued, &mut conn);
    for (_, stop, h) in conn.subs.drain(..) {
        stop.store(true, Ordering::Release);
        let _ = h.join();
    }
    drop(tx);
    let _ = writer.join();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    r
}

fn reader(
    mut stream: &TcpStream,
    sh: &Arc<Shared>,
    tx: &Sender<Out>,
    dead: &AtomicBool,
    queued: &Arc<AtomicUsize>,
    conn: &mut Conn,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut start = 0usize;
    let mut last_input = Instant::now();
    let mut chunk = vec![0u8; 64 << 10];
    let mut out = Outbox {
        tx,
        bytes: Vec::new(),
        queued,
    };
    loop {
        // Decode and execute every whole frame in the buffer (also when
        // stopping: a shutdown answers every request already read).
        loop {
            if dead.load(Ordering::Acquire) {
                return Ok(());
            }
            // Pipelined single APPENDs become one engine batch.
            match append_run(sh, conn, &buf[start..], &mut out) {
                Ok(0) => {}
                Ok(used) => {
                    start += used;
                    continue;
                }
                Err(()) => return Ok(()),
            }
            let frame = match protocol::decode(&buf[start..], sh.cfg.max_frame) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // Too large: the stream position is lost. Answer, close.
                    let mut b = Vec::new();
                    let (id, op) = match &e {
                        ProtocolError::FrameTooLarge {
                            request_id, opcode, ..
                        } => (*request_id, *opcode),
                        _ => (0, Opcode(0)),
                    };
                    ErrorReply::from(&e).encode_frame(id, op, &mut b);
                    let _ = out.send(Out::Frame(b));
                    let _ = out.send(Out::Close);
                    return Ok(());
                }
            };
            let (f, used) = frame;
            start += used;
            sh.counters.requests.fetch_add(1, Ordering::Relaxed);
            if !handle(sh, conn, &f, &mut out) {
                let _ = out.send(Out::Close);
                return Ok(());
            }
        }
        if out.flush().is_err() {
            return Ok(());
        }
        if start > 0 {
            buf.drain(..start);
            start = 0;
        }
        if sh.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        // Backpressure in bytes: a client that does not read its replies is
        // not read either (its requests wait in the socket).
        while queued.load(Ordering::Acquire) > MAX_QUEUED_BYTES {
            if dead.load(Ordering::Acquire) || sh.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()), // the client closed
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                last_input = Instant::now();
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if conn.subs.is_empty() && last_input.elapsed() >= sh.cfg.idle_timeout {
                    let mut b = Vec::new();
                    ErrorReply::new(ErrorCode::TIMEOUT, 0, "idle connection closed").encode_frame(
                        0,
                        Opcode(0),
                        &mut b,
                    );
                    let _ = out.send(Out::Frame(b));
                    let _ = out.send(Out::Close);
                    return Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn writer(stream: TcpStream, rx: Receiver<Out>, dead: Arc<AtomicBool>, queued: Arc<AtomicUsize>) {
    let mut w = BufWriter::with_capacity(256 << 10, stream);
    let mut b = Vec::with_capacity(64 << 10);
    let fail = |e: std::io::Error| {
        tracing::debug!(error = %e, "client write failed");
        dead.store(true, Ordering::Release);
    };
    loop {
        let item = match rx.try_recv() {
            Ok(i) => i,
            Err(_) => {
                // Nothing queued: push what we have to the client, then wait.
                if let Err(e) = w.flush() {
                    return fail(e);
                }
                match rx.recv() {
                    Ok(i) => i,
                    Err(_) => return,
                }
            }
        };
        b.clear();
        // About to wait for an acknowledgement: first let the client have
        // the replies before it (they are not delayed behind a fan-out or
        // an fdatasync).
        let ready = match &item {
            Out::Send { pending, .. } => pending.is_ready(),
            Out::Append { ticket, .. } | Out::AppendMany { ticket, .. } => ticket.is_durable(),
            _ => true,
        };
        if !ready {
            if let Err(e) = w.flush() {
                return fail(e);
            }
        }
        match item {
            Out::Frame(f) => {
                if let Err(e) = w.write_all(&f) {
                    return fail(e);
                }
                queued.fetch_sub(f.len(), Ordering::AcqRel);
                continue;
            }
            Out::Close => {
                let _ = w.flush();
                return;
            }
            Out::Send { id, pending } => match pending.wait() {
                Ok(a) => Response::Send(a).encode_frame(id, &mut b),
                Err(e) => ErrorReply::from(&e).encode_frame(id, Opcode::SEND, &mut b),
            },
            Out::AppendMany { ids, ticket } => match ticket.wait() {
                Ok(seqs) => {
                    for (id, s) in ids.iter().zip(seqs) {
                        Response::Append(s).encode_frame(*id, &mut b);
                    }
                }
                Err(e) => {
                    let r = ErrorReply::from(&e);
                    for id in ids {
                        r.clone().encode_frame(id, Opcode::APPEND, &mut b);
                    }
                }
            },
            Out::Append { id, batch, ticket } => {
                let op = if batch {
                    Opcode::APPEND_BATCH
                } else {
                    Opcode::APPEND
                };
                match ticket.wait() {
                    Ok(seqs) if batch => Response::AppendBatch(seqs).encode_frame(id, &mut b),
                    Ok(seqs) => Response::Append(seqs.first().copied().unwrap_or(0))
                        .encode_frame(id, &mut b),
                    Err(e) => ErrorReply::from(&e).encode_frame(id, op, &mut b),
                }
            }
        }
        if let Err(e) = w.write_all(&b) {
            return fail(e);
        }
    }
}

/// If the input starts with two or more pipelined single APPENDs of the
/// same (non-`sync`) durability, write them with one `append_batch` (one
/// engine write, one shared fdatasync: the server's answer to a pipelining
/// client) and queue their replies; returns the bytes consumed (0: nothing
/// coalesced, handle the next frame on its own). Anything unusual (an
/// oversized payload, a frame that does not decode, auth) ends the run and
/// goes through the normal path, so errors stay per request.
fn append_run(sh: &Shared, conn: &Conn, input: &[u8], out: &mut Outbox<'_>) -> Result<usize, ()> {
    if !matches!(
        conn.id,
        Some(Identity::Anonymous) | Some(Identity::Admin(_))
    ) {
        return Ok(0);
    }
    let max_payload = sh.im.engine().config().max_payload;
    let mut pos = 0;
    let mut ids = Vec::new();
    let mut items = Vec::new();
    let mut dur = None;
    while ids.len() < 4096 {
        let Ok(Some((f, used))) = protocol::decode(&input[pos..], sh.cfg.max_frame) else {
            break;
        };
        if f.header.opcode != Opcode::APPEND {
            break;
        }
        let Ok(RequestFrame {
            id,
            request:
                Request::Append {
                    timeline,
                    durability: d,
                    payload,
                },
        }) = RequestFrame::decode(&f)
        else {
            break;
        };
        let d = durability(sh, d);
        if d == Durability::Sync || payload.len() > max_payload || dur.is_some_and(|x| x != d) {
            break;
        }
        dur = Some(d);
        ids.push(id);
        items.push((timeline, payload));
        pos += used;
    }
    if ids.len() < 2 {
        return Ok(0);
    }
    sh.counters
        .requests
        .fetch_add(ids.len() as u64, Ordering::Relaxed);
    let engine = sh.im.engine();
    match dur {
        Some(Durability::GroupCommit) => match engine.append_async(&items) {
            Ok(ticket) => out.send(Out::AppendMany { ids, ticket })?,
            Err(e) => append_errors(&ids, &e, out)?,
        },
        _ => match engine.append_batch(&items, Durability::Buffered) {
            Ok(seqs) => {
                let mut b = Vec::with_capacity(ids.len() * 24);
                for (id, s) in ids.iter().zip(seqs) {
                    Response::Append(s).encode_frame(*id, &mut b);
                }
                out.send(Out::Frame(b))?;
            }
            Err(e) => append_errors(&ids, &e, out)?,
        },
    }
    Ok(pos)
}

/// Every APPEND of a failed run gets the error (nothing is retried: a batch
/// is not atomic across shards, so a retry could store some twice).
fn append_errors(ids: &[u64], e: &timeline_engine::Error, out: &mut Outbox<'_>) -> Result<(), ()> {
    let r = ErrorReply::from(e);
    let mut b = Vec::new();
    for &id in ids {
        r.clone().encode_frame(id, Opcode::APPEND, &mut b);
    }
    out.send(Out::Frame(b))
}

fn error_frame(id: u64, op: Opcode, e: ErrorReply) -> Out {
    let mut b = Vec::new();
    e.encode_frame(id, op, &mut b);
    Out::Frame(b)
}

/// Execute one frame; false = close the connection after what is queued.
fn handle(sh: &Arc<Shared>, conn: &mut Conn, f: &protocol::Frame<'_>, tx: &mut Outbox<'_>) -> bool {
    let (id, op) = (f.header.request_id, f.header.opcode);
    let req = match RequestFrame::decode(f) {
        Ok(r) => r,
        Err(e) => {
            sh.counters.errors.fetch_add(1, Ordering::Relaxed);
            let ok = conn.id.is_some();
            // Before a handshake anything undecodable ends the connection:
            // a bad HELLO says what was wrong with it, any other opcode
            // (known or not) that HELLO comes first (protocol.md §3).
            let reply = if ok || op == Opcode::HELLO {
                ErrorReply::from(&e)
            } else {
                ErrorReply::new(ErrorCode::HANDSHAKE_REQUIRED, 0, "send HELLO first")
            };
            let _ = tx.send(error_frame(id, op, reply));
            return ok;
        }
    };
    let identity = match (&req.request, conn.id) {
        (Request::Hello(h), None) => {
            return match hello(sh, h) {
                Ok((identity, reply)) => {
                    conn.id = Some(identity);
                    if h.max_frame != 0 {
                        // Never above the server's own limit: reply sizing
                        // (SCAN, SYNC pages) trusts this number.
                        conn.client_max = (h.max_frame as usize).min(sh.cfg.max_frame);
                    }
                    let mut b = Vec::new();
                    Response::Hello(reply).encode_frame(id, &mut b);
                    tx.send(Out::Frame(b)).is_ok()
                }
                Err(e) => {
                    let _ = tx.send(error_frame(id, op, e));
                    false
                }
            };
        }
        (Request::Hello(_), Some(_)) => {
            let e = ErrorReply::new(
                ErrorCode::INVALID_ARGUMENT,
                0,
                "a second HELLO on this connection",
            );
            return tx.send(error_frame(id, op, e)).is_ok();
        }
        (_, None) => {
            let e = ErrorReply::new(ErrorCode::HANDSHAKE_REQUIRED, 0, "send HELLO first");
            let _ = tx.send(error_frame(id, op, e));
            return false;
        }
        (_, Some(i)) => i,
    };
    if let Err(e) = authorize(sh, identity, &req.request) {
        sh.counters.errors.fetch_add(1, Ordering::Relaxed);
        return tx.send(error_frame(id, op, e)).is_ok();
    }
    let out = match execute(sh, conn, id, req.request, tx) {
        Ok(Some(out)) => out,
        Ok(None) => return true,
        Err(e) => {
            sh.counters.errors.fetch_add(1, Ordering::Relaxed);
            error_frame(id, op, e)
        }
    };
    tx.send(out).is_ok()
}

fn hello(
    sh: &Shared,
    h: &protocol::Hello<'_>,
) -> Result<(Identity, protocol::HelloReply), ErrorReply> {
    if h.version != protocol::PROTOCOL_VERSION {
        return Err(ErrorReply::new(
            ErrorCode::UNSUPPORTED_VERSION,
            u64::from(protocol::PROTOCOL_VERSION),
            format!(
                "this server speaks protocol version {}",
                protocol::PROTOCOL_VERSION
            ),
        ));
    }
    let identity = match &sh.cfg.auth_secret {
        None => Identity::Anonymous,
        Some(secret) => {
            let c = token::verify(secret, h.token, now_unix()).map_err(|e| ErrorReply::from(&e))?;
            match c.role {
                Role::User => Identity::User(c.user),
                Role::Admin => Identity::Admin(c.user),
            }
        }
    };
    Ok((
        identity,
        protocol::HelloReply {
            version: protocol::PROTOCOL_VERSION,
            max_frame: sh.cfg.max_frame.min(u32::MAX as usize) as u32,
            identity,
        },
    ))
}

/// docs/protocol.md §12: a user token acts as its own user only.
fn authorize(sh: &Shared, identity: Identity, r: &Request<'_>) -> Result<(), ErrorReply> {
    let me = match identity {
        Identity::Anonymous | Identity::Admin(_) => return Ok(()),
        Identity::User(u) => u,
    };
    let deny = |what: &str| {
        Err(ErrorReply::new(
            ErrorCode::FORBIDDEN,
            0,
            format!("user {me} may not {what}"),
        ))
    };
    let own = |u: u64, what: &str| if u == me { Ok(()) } else { deny(what) };
    match r {
        Request::Ping(_) | Request::Hello(_) | Request::Unsubscribe { .. } => Ok(()),
        Request::Sync { user, .. } => own(*user, "sync another user"),
        Request::Subscribe { user } => own(*user, "subscribe to another user"),
        Request::Conversations { user } => own(*user, "list another user's conversations"),
        Request::MarkRead { user, .. } => own(*user, "mark for another user"),
        Request::DeleteForUser { user, .. } => own(*user, "delete for another user"),
        Request::Send { sender, .. } => own(*sender, "send as another user"),
        Request::Recall { user, .. } => own(*user, "recall as another user"),
        Request::History { user, .. } => own(*user, "read history as another user"),
        Request::Members { conv } => match sh.im.members(*conv) {
            Ok(m) if m.contains(&me) => Ok(()),
            _ => deny("list the members of a conversation it is not in"),
        },
        _ => deny("use raw timelines, membership administration or STATS (admin only)"),
    }
}

fn durability(sh: &Shared, d: Option<Durability>) -> Durability {
    d.unwrap_or(sh.cfg.default_durability)
}

/// Run a request: `Ok(Some(out))` to queue, `Ok(None)` if already queued.
fn execute(
    sh: &Arc<Shared>,
    conn: &mut Conn,
    id: u64,
    r: Request<'_>,
    tx: &mut Outbox<'_>,
) -> Result<Option<Out>, ErrorReply> {
    let im = &sh.im;
    let engine: &Engine = im.engine();
    let ie = |e: timeline_im::ImError| ErrorReply::from(&e);
    let ee = |e: timeline_engine::Error| ErrorReply::from(&e);
    let resp = match r {
        Request::Hello(_) => return Err(ErrorReply::new(ErrorCode::INVALID_ARGUMENT, 0, "HELLO")),
        Request::Ping(b) => Response::Ping(b.to_vec()),
        Request::Stats => Response::Stats(stats(sh)),
        Request::Append {
            timeline,
            durability: d,
            payload,
        } => match durability(sh, d) {
            Durability::GroupCommit => {
                let ticket = engine.append_async(&[(timeline, payload)]).map_err(ee)?;
                return Ok(Some(Out::Append {
                    id,
                    batch: false,
                    ticket,
                }));
            }
            d => Response::Append(engine.append_with(timeline, payload, d).map_err(ee)?),
        },
        Request::AppendBatch {
            durability: d,
            items,
        } => match durability(sh, d) {
            Durability::GroupCommit => {
                let ticket = engine.append_async(&items).map_err(ee)?;
                return Ok(Some(Out::Append {
                    id,
                    batch: true,
                    ticket,
                }));
            }
            d => Response::AppendBatch(engine.append_batch(&items, d).map_err(ee)?),
        },
        Request::Get { timeline, seq } => Response::Get(engine.get(timeline, seq).map_err(ee)?),
        Request::Scan {
            timeline,
            from,
            limit,
            direction,
        } => Response::Scan(scan(
            engine,
            conn.client_max,
            timeline,
            from,
            limit,
            direction,
        )?),
        Request::LastSeq { timeline } => Response::LastSeq(engine.last_seq(timeline)),
        Request::Send {
            conv,
            sender,
            client_msg_id,
            payload,
        } => {
            let pending = im
                .send_async(conv, sender, client_msg_id, payload)
                .map_err(ie)?;
            return Ok(Some(Out::Send { id, pending }));
        }
        Request::Sync {
            user,
            checkpoint,
            limit,
            groups,
        } => Response::Sync(
            im.sync(user, checkpoint, page_limit(sh, conn, limit), &groups)
                .map_err(ie)?,
        ),
        Request::History {
            conv,
            user,
            from,
            limit,
        } => Response::History(
            im.history(conv, user, from, page_limit(sh, conn, limit))
                .map_err(ie)?,
        ),
        Request::Conversations { user } => {
            Response::Conversations(im.conversations(user).map_err(ie)?)
        }
        Request::MarkRead { user, conv, seq } => {
            Response::MarkRead(im.mark_read(user, conv, seq).map_err(ie)?)
        }
        Request::Recall { conv, user, target } => {
            Response::Recall(im.recall(conv, user, target).map_err(ie)?)
        }
        Request::DeleteForUser { user, conv, seq } => {
            Response::DeleteForUser(im.delete_for_user(user, conv, seq).map_err(ie)?)
        }
        Request::CreateConversation {
            conv,
            kind,
            members,
        } => {
            Response::CreateConversation(im.create_conversation(conv, kind, &members).map_err(ie)?)
        }
        Request::AddMember { conv, user } => {
            Response::AddMember(im.add_member(conv, user).map_err(ie)?)
        }
        Request::RemoveMember { conv, user } => {
            Response::RemoveMember(im.remove_member(conv, user).map_err(ie)?)
        }
        Request::Members { conv } => Response::Members(im.members(conv).map_err(ie)?),
        Request::Subscribe { user } => {
            if user > timeline_im::MAX_ID {
                return Err(ErrorReply::new(
                    ErrorCode::INVALID_ARGUMENT,
                    0,
                    format!(
                        "user id {user} is above {} (the top half is reserved)",
                        timeline_im::MAX_ID
                    ),
                ));
            }
            if conn.subs.len() >= MAX_SUBSCRIPTIONS {
                return Err(ErrorReply::new(
                    ErrorCode::INVALID_ARGUMENT,
                    0,
                    format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                ));
            }
            if conn.subs.iter().any(|s| s.0 == id) {
                return Err(ErrorReply::new(
                    ErrorCode::INVALID_ARGUMENT,
                    0,
                    format!("a live subscription already uses request id {id}"),
                ));
            }
            // The reply goes first; pushes follow it.
            let mut b = Vec::new();
            Response::Subscribe.encode_frame(id, &mut b);
            tx.send(Out::Frame(b))
                .and_then(|()| tx.flush())
                .map_err(|_| ErrorReply::new(ErrorCode::CLOSED, 0, "connection closing"))?;
            let sub = im.subscribe(user);
            let stop = Arc::new(AtomicBool::new(false));
            let h = {
                let queued = tx.queued.clone();
                let (tx, stop) = (tx.tx.clone(), stop.clone());
                let sh = sh.clone();
                std::thread::Builder::new()
                    .name("push".into())
                    .spawn(move || forward(sub, id, tx, stop, sh, queued))
                    .map_err(|e| ErrorReply::new(ErrorCode::INTERNAL, 0, e.to_string()))?
            };
            conn.subs.push((id, stop, h));
            return Ok(None);
        }
        Request::Unsubscribe { subscription } => {
            let Some(i) = conn.subs.iter().position(|s| s.0 == subscription) else {
                return Err(ErrorReply::new(
                    ErrorCode::INVALID_ARGUMENT,
                    0,
                    format!("no subscription {subscription} on this connection"),
                ));
            };
            let (_, stop, h) = conn.subs.swap_remove(i);
            stop.store(true, Ordering::Release);
            let _ = h.join(); // no push of it can follow the reply
            Response::Unsubscribe
        }
    };
    let mut b = Vec::with_capacity(resp.encoded_len());
    if resp.encoded_len() > conn.client_max {
        return Err(ErrorReply::new(
            ErrorCode::RESPONSE_TOO_LARGE,
            conn.client_max as u64,
            format!(
                "the reply is {} bytes; the client accepts {}",
                resp.encoded_len(),
                conn.client_max
            ),
        ));
    }
    resp.encode_frame(id, &mut b);
    Ok(Some(Out::Frame(b)))
}

/// Entries a SYNC or HISTORY page may hold so that its reply fits the
/// client's frame limit even if every entry has the largest payload (the IM
/// layer pages by count; a client asking for more gets `has_more`).
fn page_limit(sh: &Shared, conn: &Conn, asked: u32) -> usize {
    let per = sh.cfg.engine.max_payload + 128;
    (asked as usize).min((conn.client_max / per).max(1))
}

/// A SCAN read in pages, refused with RESPONSE_TOO_LARGE as soon as the
/// records exceed what the client accepts (never built whole first).
fn scan(
    engine: &Engine,
    client_max: usize,
    timeline: timeline_engine::TimelineId,
    from: u64,
    limit: u32,
    direction: timeline_engine::Direction,
) -> Result<Vec<timeline_engine::Record>, ErrorReply> {
    use timeline_engine::Direction;
    let mut out: Vec<timeline_engine::Record> = Vec::new();
    let mut bytes = 64usize;
    let mut next = from;
    let mut left = limit as usize;
    while left > 0 {
        let want = left.min(1024);
        let page = engine
            .scan(timeline, next, want, direction)
            .map_err(|e| ErrorReply::from(&e))?;
        let Some(last) = page.last() else { break };
        let n = page.len();
        next = match direction {
            Direction::Forward => last.seq.saturating_add(1),
            Direction::Backward => last.seq.saturating_sub(1),
        };
        for r in page {
            bytes += r.payload.len() + 24;
            if bytes > client_max {
                return Err(ErrorReply::new(
                    ErrorCode::RESPONSE_TOO_LARGE,
                    client_max as u64,
                    "the records asked for exceed the client's frame limit: ask for fewer",
                ));
            }
            out.push(r);
        }
        left -= n;
        if n < want || next == 0 {
            break;
        }
    }
    Ok(out)
}

/// Offer a subscription's pushes to the connection without ever blocking:
/// a full output queue drops the push and owes the client one `resync`.
fn forward(
    sub: timeline_im::Subscription,
    id: u64,
    tx: Sender<Out>,
    stop: Arc<AtomicBool>,
    sh: Arc<Shared>,
    queued: Arc<AtomicUsize>,
) {
    let mut owe_resync = false;
    while !stop.load(Ordering::Acquire) && !sh.stop.load(Ordering::Acquire) {
        let p = if owe_resync {
            Some(Push::Resync)
        } else {
            sub.recv_timeout(Duration::from_millis(50))
        };
        let Some(p) = p else { continue };
        let mut b = Vec::new();
        encode_push_frame(id, &p, &mut b);
        let len = b.len();
        // Counted before the send (the writer subtracts once written).
        let full = queued.fetch_add(len, Ordering::AcqRel) > MAX_QUEUED_BYTES;
        let r = if full {
            Err(TrySendError::Full(Out::Frame(b)))
        } else {
            tx.try_send(Out::Frame(b))
        };
        match r {
            Ok(()) => owe_resync = false,
            Err(TrySendError::Full(_)) => {
                queued.fetch_sub(len, Ordering::AcqRel);
                owe_resync = true;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

fn stats(sh: &Shared) -> Vec<(String, u64)> {
    let st = sh.im.engine().stats();
    let im = sh.im.stats();
    let c = &sh.counters;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (store, sync) = (st.keyspace(Keyspace::STORE), st.keyspace(Keyspace::SYNC));
    vec![
        ("connections_total".into(), g(&c.connections)),
        (
            "connections_open".into(),
            c.open.load(Ordering::Relaxed) as u64,
        ),
        ("connections_refused".into(), g(&c.refused)),
        ("requests".into(), g(&c.requests)),
        ("request_errors".into(), g(&c.errors)),
        ("store_records".into(), store.records),
        ("store_bytes_written".into(), store.bytes_written),
        ("sync_records".into(), sync.records),
        ("sync_bytes_written".into(), sync.bytes_written),
        ("fsyncs".into(), st.total().fsyncs),
        ("im_messages".into(), im.messages),
        ("im_sync_writes".into(), im.sync_writes),
        ("im_sync_calls".into(), im.sync_calls),
    ]
}
