//! `--target server`: `timeline-server` over TCP, through the blocking
//! pipelining client `timeline_server::Client`.
//!
//! **The server.** `--addr HOST:PORT` points at a running server (auth off,
//! or the bench has no token to give). Without it the bench starts one: the
//! `timeline-server` binary next to its own executable (so build both:
//! `cargo build --release -p timeline-bench -p timeline-server`), with
//! `--listen 127.0.0.1:0 --data-dir DIR --durability D --shards N` (plus,
//! for the IM workloads, `--hybrid-threshold`, `--entries` and a
//! `--max-payload` that fits the largest group's member list), where DIR is
//! `--dir` or a temporary directory (removed at the end unless `--keep`).
//! It reads the address from the server's first stdout line (`listening
//! ADDR`) and at the end stops it with SIGTERM (graceful: acknowledged data
//! durable, exit 0, checked) and waits for it. Engine flags the server does
//! not take (`--segment-mb`, `--io`, `--regroup`, `--seal`) are not
//! accepted with this target: the server runs its engine defaults.
//!
//! **Sessions** are connections (`--connections`, default 4), each driven
//! by one client thread keeping up to `--pipeline` requests in flight
//! (default 16; `--refill`, see `targets::drive`). W1: `APPEND` of one item
//! (`--batch 1`) or `APPEND_BATCH`, with the run's durability in every
//! request; W2: `SCAN`. Lengths are `LAST_SEQ`s.
//!
//! **Costs** are the server process's (from /proc, when the bench started
//! it: `server_cpu_secs`, `disk_write_bytes`, `peak_rss_bytes`) and its
//! `STATS` deltas (`bytes_written`, `fsyncs`); `client_cpu_secs` and
//! `client_peak_rss_bytes` are the bench's.

use super::net::{Meter, Proc};
use super::{
    base_line, drive, net_shape, wire, ConvSpec, ImOp, ImReply, ImSession, ImTarget, Op, Pipelined,
    Pushed, Reply, Session, Shape, Subscriber, Target,
};
use crate::report::ResultLine;
use crate::workloads::append::round3;
use crate::workloads::{durability, keyspace, ks_name, timeline, DataDir};
use crate::{Flags, Result};
use std::collections::VecDeque;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use timeline_engine::{Durability, Keyspace, SeqId};
use timeline_im::{ConvId, ConvKind, UserId};
use timeline_server::protocol::{ErrorCode, Request, Response};
use timeline_server::{Client, ClientError};

/// Requests per pipelined burst of the untimed LAST_SEQ sweeps.
const SWEEP_BURST: u64 = 1024;

/// The server the run talks to; it stops a server it started on drop (or
/// gracefully with [`Target::stop`]). Field order: the process goes before
/// its data directory.
pub struct Server {
    pub addr: String,
    proc: Option<Proc>,
    dir: Option<DataDir>,
}

impl Server {
    /// `--addr`, or start `timeline-server` (see the module doc). `extra`:
    /// more server flags.
    pub fn start(flags: &Flags, extra: &[String]) -> Result<Server> {
        if let Some(a) = &flags.addr {
            eprintln!("server: using the running server at {a}");
            return Ok(Server {
                addr: a.clone(),
                proc: None,
                dir: None,
            });
        }
        let dir = DataDir::new(flags)?;
        let (proc, addr) = spawn_server(flags, &dir.path, extra)?;
        Ok(Server {
            addr,
            proc: Some(proc),
            dir: Some(dir),
        })
    }

    pub fn connect(&self) -> Result<Client> {
        Client::connect(self.addr.as_str(), b"")
            .map_err(|e| format!("connecting to {}: {e}", self.addr).into())
    }

    /// The server's pid when the bench started it.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.pid())
    }

    pub fn spawned(&self) -> bool {
        self.proc.is_some()
    }

    pub fn dir(&self) -> Option<&DataDir> {
        self.dir.as_ref()
    }

    /// [`stop`](Self::stop), putting the number of files it left on `last`.
    pub fn close(self, last: Option<&mut ResultLine>) -> Result<()> {
        let files = self.dir().map(|d| crate::sysinfo::count_files(&d.path));
        self.stop()?;
        if let Some(l) = last {
            l.files = files;
        }
        Ok(())
    }

    /// Stop a server the bench started: SIGTERM, wait; it must exit 0.
    pub fn stop(mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            if !p.running() {
                return Err("timeline-server died during the run".into());
            }
            let t = Instant::now();
            let st = p.stop()?;
            eprintln!(
                "server: stopped (SIGTERM) in {:.3} s, {st}",
                t.elapsed().as_secs_f64()
            );
            if !st.success() {
                return Err(format!("timeline-server exited with {st} after SIGTERM").into());
            }
        }
        Ok(())
    }
}

/// Start `timeline-server` on `data` (see the module doc) and read its
/// address from its first line.
pub fn spawn_server(flags: &Flags, data: &Path, extra: &[String]) -> Result<(Proc, String)> {
    let exe = std::env::current_exe()?.with_file_name("timeline-server");
    if !exe.is_file() {
        return Err(format!(
            "--target server without --addr starts {}, which does not exist: \
             cargo build --release -p timeline-server (or pass --addr HOST:PORT)",
            exe.display()
        )
        .into());
    }
    let mut cmd = Command::new(&exe);
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data)
        .arg("--durability")
        .arg(durability(flags).name())
        .arg("--shards")
        .arg(flags.shards.to_string())
        .args(extra);
    if std::env::var_os("RUST_LOG").is_none() && flags.quiet_server {
        cmd.env("RUST_LOG", "warn");
    }
    let mut proc = Proc::spawn(cmd, "timeline-server", true)
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let line = proc.first_line()?;
    let addr = line
        .strip_prefix("listening ")
        .ok_or_else(|| format!("timeline-server printed {line:?}, not `listening ADDR`"))?
        .to_string();
    eprintln!(
        "server: started {} (pid {}) on {addr}, data in {}",
        exe.display(),
        proc.pid(),
        data.display()
    );
    Ok((proc, addr))
}

/// The server's write counters of a phase on its line (`payload_bytes` set).
pub(crate) fn set_written(line: &mut ResultLine, written: u64, total: u64, fsyncs: u64) {
    line.bytes_written = Some(written);
    line.bytes_written_total = Some(total);
    line.bytes_per_payload_byte = line
        .payload_bytes
        .map(|p| round3(written as f64 / p.max(1) as f64));
    line.fsyncs = Some(fsyncs);
}

/// A server-side counter from `STATS` (0 if absent).
pub fn stat(stats: &[(String, u64)], key: &str) -> u64 {
    stats.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

pub fn stats(c: &mut Client) -> Result<Vec<(String, u64)>> {
    match c.call(&Request::Stats)? {
        Response::Stats(s) => Ok(s),
        other => Err(format!("STATS answered {other:?}").into()),
    }
}

/// `LAST_SEQ` of timelines `0..n`, pipelined on one connection.
pub fn last_seqs(c: &mut Client, ks: Keyspace, n: u64) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(n as usize);
    let mut id = 0;
    while id < n {
        let end = (id + SWEEP_BURST).min(n);
        for i in id..end {
            c.queue(&Request::LastSeq {
                timeline: wire::timeline(timeline(ks, i)),
            });
        }
        c.flush()?;
        for i in id..end {
            match c.recv()? {
                Response::LastSeq(s) => out.push(s),
                other => return Err(format!("LAST_SEQ {i} answered {other:?}").into()),
            }
        }
        id = end;
    }
    Ok(out)
}

/// The server as a [`Target`] of W1 and W2.
pub struct ServerTarget {
    pub server: Server,
    flags: Flags,
    shape: Shape,
    ks: Keyspace,
    d: Durability,
}

impl ServerTarget {
    pub fn start(flags: &Flags) -> Result<ServerTarget> {
        Ok(ServerTarget {
            server: Server::start(flags, &[])?,
            flags: flags.clone(),
            shape: net_shape(flags),
            ks: keyspace(flags),
            d: durability(flags),
        })
    }
}

/// `STATS` and the process meters at the start of a phase.
pub struct Mark {
    stats: Vec<(String, u64)>,
    meter: Meter,
}

pub struct ServerSession<'a> {
    t: &'a ServerTarget,
    c: Client,
    /// Items of each request in flight (0: a scan).
    q: VecDeque<usize>,
}

impl Session for ServerSession<'_> {
    fn queue(&mut self, op: Op<'_>) -> Result<()> {
        let ks = self.t.ks;
        let d = Some(wire::durability(self.t.d));
        match op {
            Op::Append([(id, payload)]) => {
                self.c.queue(&Request::Append {
                    timeline: wire::timeline(timeline(ks, *id)),
                    durability: d,
                    payload,
                });
                self.q.push_back(1);
            }
            Op::Append(items) => {
                self.c.queue(&Request::AppendBatch {
                    durability: d,
                    items: items
                        .iter()
                        .map(|&(id, p)| (wire::timeline(timeline(ks, id)), p))
                        .collect(),
                });
                self.q.push_back(items.len());
            }
            Op::Scan { id, from, len, dir } => {
                self.c.queue(&Request::Scan {
                    timeline: wire::timeline(timeline(ks, id)),
                    from,
                    limit: u32::try_from(len).unwrap_or(u32::MAX),
                    direction: wire::direction(dir),
                });
                self.q.push_back(0);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.c.flush()?)
    }

    fn complete(&mut self) -> Result<Reply> {
        let n = self
            .q
            .pop_front()
            .ok_or("complete() with nothing in flight")?;
        Ok(match (n, self.c.recv()) {
            (_, Err(e @ ClientError::Server { .. })) => Reply::Refused(e.to_string()),
            (_, Err(e)) => return Err(e.into()),
            (1, Ok(Response::Append(seq))) => Reply::Appended(vec![seq]),
            (_, Ok(Response::AppendBatch(seqs))) => Reply::Appended(seqs),
            (0, Ok(Response::Scan(page))) => Reply::Page(wire::records(page)),
            (_, Ok(r)) => Reply::Refused(format!("unexpected reply {r:?}")),
        })
    }
}

impl Target for ServerTarget {
    type Session<'a> = ServerSession<'a>;
    type Mark = Mark;

    fn shape(&self) -> Shape {
        self.shape
    }

    fn session(&self) -> Result<ServerSession<'_>> {
        Ok(ServerSession {
            t: self,
            c: self.server.connect()?,
            q: VecDeque::new(),
        })
    }

    fn lengths(&self, n: u64) -> Result<Vec<SeqId>> {
        last_seqs(&mut self.server.connect()?, self.ks, n)
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "server");
        // What the bench asked a server it started for; 0: unknown.
        l.shards = if self.server.spawned() {
            self.flags.shards
        } else {
            0
        };
        l.io = "server".into();
        self.shape.set(&mut l);
        l
    }

    fn mark(&self) -> Result<Mark> {
        Ok(Mark {
            stats: stats(&mut self.server.connect()?)?,
            meter: Meter::start(self.server.pid()),
        })
    }

    fn settle(&self, _line: &mut ResultLine) -> Result<()> {
        Ok(()) // acknowledged = durable as asked; nothing to finish
    }

    fn measure(&self, m: &Mark, line: &mut ResultLine) -> Result<()> {
        m.meter.finish(line);
        let s1 = stats(&mut self.server.connect()?)?;
        let d = |k: &str| stat(&s1, k).saturating_sub(stat(&m.stats, k));
        let written = d(&format!("{}_bytes_written", ks_name(self.ks)));
        if line.payload_bytes.is_some() {
            set_written(
                line,
                written,
                d("store_bytes_written") + d("sync_bytes_written"),
                d("fsyncs"),
            );
        }
        Ok(())
    }

    fn close(self, last: Option<&mut ResultLine>) -> Result<()> {
        self.server.close(last)
    }
}

/// timeline-server's default `--max-payload`.
const SERVER_MAX_PAYLOAD: usize = 64 << 10;

/// The server's IM commands as an [`ImTarget`] of W3 and W4: `SEND` and
/// `SYNC` on `--connections` connections of `--pipeline` requests in
/// flight, `SUBSCRIBE` on one connection for push.
///
/// The server is started with `--hybrid-threshold` (groups above it use
/// read fan-out), `--entries` when given, and a `--max-payload` that holds
/// the largest group's member list (the IM layer writes it as one record,
/// 8 bytes per member; the default 64 KiB holds about 8,000). Setup is
/// `CREATE_CONVERSATION`s, pipelined, except the read-fan-out groups, which
/// are created one at a time at the end (the layer must not create two at
/// once; see `imkit`). Costs: the server process's CPU and disk writes, and
/// its `STATS` deltas (`im_messages`, `im_sync_writes`, bytes, fsyncs).
pub struct ServerIm {
    pub server: Server,
    flags: Flags,
    shape: Shape,
    threshold: usize,
}

impl ServerIm {
    pub fn start(flags: &Flags, threshold: usize, largest_group: usize) -> Result<ServerIm> {
        let mut extra = vec![
            "--hybrid-threshold".to_string(),
            threshold.min(u32::MAX as usize).to_string(),
        ];
        let need = (largest_group * 8 + 4096).next_multiple_of(64 << 10);
        if need > SERVER_MAX_PAYLOAD && flags.addr.is_none() {
            eprintln!(
                "server: the largest group has {largest_group} members: --max-payload {need}"
            );
            extra.extend(["--max-payload".to_string(), need.to_string()]);
        }
        if let Some(e) = flags.entries {
            extra.extend([
                "--entries".to_string(),
                crate::workloads::imkit::entries_arg(e).into(),
            ]);
        }
        Ok(ServerIm {
            server: Server::start(flags, &extra)?,
            flags: flags.clone(),
            shape: net_shape(flags),
            threshold,
        })
    }
}

/// Create `parts` (setup), each on its own connection (`connect(i)` for
/// part `i`) and thread, pipelined; the creates refused, with the code.
pub(crate) fn create_pipelined(
    parts: &[&[&ConvSpec]],
    shape: &Shape,
    connect: impl Fn(usize) -> Result<Client> + Sync,
) -> Result<Vec<(ConvId, ErrorCode)>> {
    let connect = &connect;
    std::thread::scope(|s| -> Result<Vec<(ConvId, ErrorCode)>> {
        let hs: Vec<_> = parts
            .iter()
            .enumerate()
            .filter(|(_, part)| !part.is_empty())
            .map(|(i, part)| {
                s.spawn(move || -> Result<Vec<(ConvId, ErrorCode)>> {
                    let mut cc = CreateConn {
                        c: connect(i)?,
                        next: part.iter(),
                        refused: Vec::new(),
                    };
                    let mut h = crate::report::new_histogram()?;
                    drive(&mut cc, part.len() as u64, shape, &mut h)?;
                    Ok(cc.refused)
                })
            })
            .collect();
        let mut refused = Vec::new();
        for h in hs {
            refused.extend(
                h.join()
                    .unwrap_or_else(|_| Err("setup thread panicked".into()))?,
            );
        }
        Ok(refused)
    })
}

/// Conversation creation on one connection (setup).
struct CreateConn<'a> {
    c: Client,
    next: std::slice::Iter<'a, &'a ConvSpec>,
    refused: Vec<(ConvId, ErrorCode)>,
}

impl Pipelined for CreateConn<'_> {
    type Ctx = ConvId;
    type Reply = std::result::Result<Response, ClientError>;

    fn queue(&mut self) -> Result<ConvId> {
        let c = self.next.next().ok_or("no conversation left")?;
        self.c.queue(&Request::CreateConversation {
            conv: c.id,
            kind: wire::conv_kind(c.kind),
            members: c.members.clone(),
        });
        Ok(c.id)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.c.flush()?)
    }

    fn complete(&mut self) -> Result<Self::Reply> {
        Ok(self.c.recv())
    }

    fn check(&mut self, conv: ConvId, reply: Self::Reply) -> Result<()> {
        match reply {
            Ok(Response::CreateConversation(_)) => {}
            // Stored; its delivery to the members goes on (a large group
            // on a cluster): the caller waits for the sync timelines.
            Err(ClientError::Server {
                code: ErrorCode::FANOUT_FAILED,
                ..
            }) => {}
            Ok(r) => {
                self.refused.push((conv, ErrorCode::INTERNAL));
                eprintln!("create error: conversation {conv}: reply {r:?}");
            }
            Err(ClientError::Server { code, message, .. }) => {
                self.refused.push((conv, code));
                eprintln!("create error: conversation {conv}: {code:?}: {message}");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

pub struct ServerImSession {
    c: Client,
    /// Whether each request in flight is a send.
    q: VecDeque<bool>,
}

/// An [`ImOp`] as its request, and whether it is a send.
pub(crate) fn im_request<'a>(op: ImOp<'a>) -> (Request<'a>, bool) {
    match op {
        ImOp::Send {
            conv,
            sender,
            msg_id,
            payload,
        } => (
            Request::Send {
                conv,
                sender,
                client_msg_id: msg_id,
                payload,
            },
            true,
        ),
        ImOp::Sync {
            user,
            checkpoint,
            limit,
            groups,
        } => (
            Request::Sync {
                user,
                checkpoint,
                limit: u32::try_from(limit).unwrap_or(u32::MAX),
                groups: groups.to_vec(),
            },
            false,
        ),
    }
}

/// The [`ImReply`] to a send's or sync's answer (`Err`: the connection
/// failed).
pub(crate) fn im_reply(
    send: bool,
    r: std::result::Result<Response, ClientError>,
) -> Result<ImReply> {
    Ok(match (send, r) {
        (_, Err(e @ ClientError::Server { .. })) => ImReply::Refused(e.to_string()),
        (_, Err(e)) => return Err(e.into()),
        (true, Ok(Response::Send(a))) if !a.duplicate => ImReply::Sent,
        (false, Ok(Response::Sync(r))) => ImReply::Synced(wire::sync_reply(r)),
        (_, Ok(r)) => ImReply::Refused(format!("unexpected reply {r:?}")),
    })
}

impl ImSession for ServerImSession {
    fn queue(&mut self, op: ImOp<'_>) -> Result<()> {
        let (r, send) = im_request(op);
        self.c.queue(&r);
        self.q.push_back(send);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.c.flush()?)
    }

    fn complete(&mut self) -> Result<ImReply> {
        let send = self
            .q
            .pop_front()
            .ok_or("complete() with nothing in flight")?;
        im_reply(send, self.c.recv())
    }
}

pub(crate) struct PushConn(pub(crate) Client);

impl Subscriber for PushConn {
    fn next(&mut self, timeout: std::time::Duration) -> Result<Option<Pushed>> {
        use timeline_server::protocol::{Body, Push};
        let Some((_, p)) = self.0.next_push(timeout)? else {
            return Ok(None);
        };
        let body = match p {
            Push::Entry { entry, .. } => entry.entry.body,
            Push::Group { entry, .. } => entry.body,
            Push::Resync => return Ok(Some(Pushed::Resync)),
        };
        Ok(Some(match body {
            Body::Message(m) => Pushed::Message(m),
            _ => Pushed::Other,
        }))
    }
}

impl ImTarget for ServerIm {
    type Session<'a> = ServerImSession;
    type Mark = Mark;

    fn shape(&self) -> Shape {
        self.shape
    }

    fn create(&mut self, convs: &[ConvSpec]) -> Result<()> {
        let t0 = Instant::now();
        let (read_groups, others): (Vec<&ConvSpec>, Vec<&ConvSpec>) = convs
            .iter()
            .partition(|c| c.kind == ConvKind::Group && c.members.len() > self.threshold);
        let conns = self.shape.sessions;
        let parts: Vec<&[&ConvSpec]> = others.chunks(others.len().div_ceil(conns).max(1)).collect();
        let refused = create_pipelined(&parts, &self.shape, |_| self.server.connect())?;
        if !refused.is_empty() {
            return Err(format!("{} conversation(s) could not be created", refused.len()).into());
        }
        let mut c = self.server.connect()?;
        for g in read_groups {
            c.call(&Request::CreateConversation {
                conv: g.id,
                kind: wire::conv_kind(g.kind),
                members: g.members.clone(),
            })
            .map_err(|e| format!("creating read-fan-out group {}: {e}", g.id))?;
        }
        eprintln!(
            "setup: {} conversations created over TCP in {:.3} s",
            convs.len(),
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn session(&self) -> Result<ServerImSession> {
        Ok(ServerImSession {
            c: self.server.connect()?,
            q: VecDeque::new(),
        })
    }

    fn sync_ends(&self, users: &[UserId]) -> Result<Vec<SeqId>> {
        let mut c = self.server.connect()?;
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(SWEEP_BURST as usize) {
            for &u in chunk {
                c.queue(&Request::LastSeq {
                    timeline: wire::timeline(timeline_engine::TimelineId::sync(u)),
                });
            }
            c.flush()?;
            for _ in chunk {
                match c.recv()? {
                    Response::LastSeq(s) => out.push(s),
                    other => return Err(format!("LAST_SEQ answered {other:?}").into()),
                }
            }
        }
        Ok(out)
    }

    fn subscribe(&self, users: &[UserId]) -> Result<Vec<Box<dyn Subscriber + '_>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.server.connect()?;
        for &u in users {
            match c.call(&Request::Subscribe { user: u })? {
                Response::Subscribe => {}
                other => return Err(format!("SUBSCRIBE answered {other:?}").into()),
            }
        }
        Ok(vec![Box::new(PushConn(c))])
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "server");
        l.shards = if self.server.spawned() {
            self.flags.shards
        } else {
            0
        };
        l.io = "server".into();
        l.keyspace = "store+sync".into();
        l.entries = self
            .flags
            .entries
            .map(|e| crate::workloads::imkit::entries_arg(e).into());
        self.shape.set(&mut l);
        l
    }

    fn mark(&self) -> Result<Mark> {
        Ok(Mark {
            stats: stats(&mut self.server.connect()?)?,
            meter: Meter::start(self.server.pid()),
        })
    }

    fn measure(&self, m: &Mark, line: &mut ResultLine) -> Result<()> {
        m.meter.finish(line);
        let s1 = stats(&mut self.server.connect()?)?;
        let d = |k: &str| stat(&s1, k).saturating_sub(stat(&m.stats, k));
        let messages = line.messages.unwrap_or(0);
        if d("im_messages") != messages {
            return Err(format!(
                "the server counted {} messages, {messages} were sent",
                d("im_messages")
            )
            .into());
        }
        let writes = d("im_messages") + d("im_sync_writes");
        line.stored = Some(d("im_messages"));
        line.sync_writes = Some(d("im_sync_writes"));
        line.storage_writes_per_message = crate::workloads::imkit::ratio(writes, messages);
        line.writes_per_delivery = line
            .deliveries
            .and_then(|dl| crate::workloads::imkit::ratio(writes, dl));
        let written = d("store_bytes_written") + d("sync_bytes_written");
        set_written(line, written, written, d("fsyncs"));
        Ok(())
    }

    fn close(self, last: Option<&mut ResultLine>) -> Result<()> {
        self.server.close(last)
    }
}
