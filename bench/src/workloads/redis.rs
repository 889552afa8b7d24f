//! `--target redis`: W1 `append` and W2 `read` on Redis Streams, the
//! baseline the server target is compared with in the same run.
//!
//! **The server.** The bench starts `redis-server` from `PATH` (`apt-get
//! install -y redis-server`; version printed) on a free loopback port (it
//! binds 127.0.0.1:0, reads the port, closes it: Redis has no `--port 0`),
//! in a temporary directory (or `--dir`), with `--save ""` (no RDB
//! snapshots) and, per `--durability`:
//! - `none`: `--appendonly no`: nothing is written to disk (the headline
//!   comparison, against the server target's `none`: page cache only);
//! - `group`: `--appendonly yes --appendfsync everysec`: the AOF is written
//!   on every event-loop turn and fsynced once a second, so an acknowledged
//!   write can be lost (up to ~1 s) on a power cut. Weaker than the
//!   engine's group commit, which answers only after the shared fdatasync;
//! - `sync`: `--appendonly yes --appendfsync always`: fsync before replying
//!   (Redis shares that fsync among the commands of one event-loop turn).
//!
//! The line's `durability` is the flag's name; `appendfsync` says which
//! policy ran. At the end it is stopped with SIGTERM and waited for.
//! `--addr` is not used (the bench only measures a Redis it started).
//!
//! **Data model.** One stream per timeline, key `tl:{id}`, one field `p`
//! holding the payload: `XADD tl:{id} * p <payload>`; Redis assigns the
//! entry id (`ms-seq`), as the engine assigns seqs. Connections, pipeline
//! and refill exactly as for the server target (`net::drive`, the same
//! timelines and payloads per connection, `redis` crate sync connections
//! with TCP_NODELAY, commands packed by the crate and written once per
//! flush, replies read with `recv_response`). Redis has no multi-key
//! append, so `--batch` B makes each request B XADDs sent back to back (a
//! B-times deeper pipeline: Redis's nearest equivalent of `APPEND_BATCH`).
//!
//! **W1** (`append`): every reply must be an entry id; the bench counts
//! acknowledged XADDs per timeline and afterwards checks `XLEN` of every
//! timeline against the count (`errors`, exit status 2).
//! `disk_write_bytes`, `peak_rss_bytes` and `server_cpu_secs` are
//! redis-server's (from /proc).
//!
//! **W2** (`read`): after a W1 load (`phase: "load"`), which also keeps
//! every entry id the XADDs returned, in stream order per timeline, `--reads`
//! range reads at the same random timelines and positions as the other
//! targets (position k = the k-th entry): forward = `XRANGE tl:{id} <id of
//! entry k> + COUNT L`, newest-first = `XREVRANGE tl:{id} <id of entry k> -
//! COUNT L` (`+` when k is the last entry). Every page is checked: the
//! expected number of entries, exactly the expected ids in order, field `p`
//! with a `--payload`-byte value.

use super::append::{rate, round3, Load};
use super::imkit::Errors;
use super::net::{drive, free_port, Counts, Meter, Pipelined, Proc, Shape};
use super::resp;
use super::{durability, rng_for, timed_threads, DataDir, Payloads, Picker};
use crate::report::{Reporter, ResultLine};
use crate::{DurabilityArg, Flags, Result};
use rand::rngs::SmallRng;
use rand::Rng;
use redis::{Connection, IntoConnectionInfo, Value};
use std::fmt::Write as _;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long redis-server gets to start accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Commands per pipelined burst of the untimed XLEN sweep.
const SWEEP_BURST: u64 = 1024;

/// A redis-server the bench started. Field order: the process goes
/// before its directory.
pub(crate) struct Redis {
    port: u16,
    appendfsync: &'static str,
    proc: Proc,
    _dir: DataDir,
}

impl Redis {
    fn start(flags: &Flags) -> Result<Redis> {
        Self::start_with(flags, &[])
    }

    /// [`start`](Self::start) with more `redis-server` arguments.
    pub(crate) fn start_with(flags: &Flags, extra: &[String]) -> Result<Redis> {
        if flags.addr.is_some() {
            return Err(
                "--addr is for --target server; --target redis always starts its own \
                 redis-server on a free loopback port"
                    .into(),
            );
        }
        let version = Command::new("redis-server")
            .arg("--version")
            .output()
            .map_err(|e| {
                format!("--target redis needs redis-server ({e}): apt-get install -y redis-server")
            })?;
        let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
        let (aof, appendfsync) = match flags.durability {
            DurabilityArg::None => ("no", "no"),
            DurabilityArg::Group => ("yes", "everysec"),
            DurabilityArg::Sync => ("yes", "always"),
        };
        let dir = DataDir::new(flags)?;
        let log = dir.path.join("redis.log");
        let mut last_err = String::new();
        // A port found free can be taken before redis binds it: retry.
        for _ in 0..3 {
            let port = free_port()?;
            let mut cmd = Command::new("redis-server");
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&dir.path)
                .arg("--logfile")
                .arg(&log)
                .args(["--save", "", "--appendonly", aof])
                .args(["--daemonize", "no", "--loglevel", "warning"])
                .args(extra);
            if aof == "yes" {
                cmd.args(["--appendfsync", appendfsync]);
            }
            let mut proc = Proc::spawn(cmd, "redis-server", false).map_err(|e| {
                format!("starting redis-server: {e}: apt-get install -y redis-server")
            })?;
            let t = Instant::now();
            loop {
                if !proc.running() {
                    last_err = std::fs::read_to_string(&log).unwrap_or_default();
                    break;
                }
                if let Ok(mut c) = connect(port) {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        eprintln!(
                            "redis: started {version} (pid {}) on 127.0.0.1:{port}, appendonly {aof}{}, data in {}",
                            proc.pid(),
                            if aof == "yes" {
                                format!(", appendfsync {appendfsync}")
                            } else {
                                String::new()
                            },
                            dir.path.display()
                        );
                        return Ok(Redis {
                            port,
                            appendfsync,
                            proc,
                            _dir: dir,
                        });
                    }
                }
                if t.elapsed() > START_TIMEOUT {
                    return Err(format!(
                        "redis-server did not answer PING within {START_TIMEOUT:?}"
                    )
                    .into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(format!("redis-server did not start; its log:\n{last_err}").into())
    }

    fn connect(&self) -> Result<Connection> {
        connect(self.port)
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub(crate) fn stop(mut self) -> Result<()> {
        if !self.proc.running() {
            return Err("redis-server died during the run".into());
        }
        let st = self.proc.stop()?;
        eprintln!("redis: stopped (SIGTERM), {st}");
        Ok(())
    }
}

/// Which reader the timed loops use (`TIMELINE_BENCH_REDIS_CLIENT`): the
/// lean one (`resp`, default) or the `redis` crate's (`crate`).
fn use_crate_client() -> bool {
    std::env::var("TIMELINE_BENCH_REDIS_CLIENT").is_ok_and(|v| v == "crate")
}

/// A timed-loop connection: the crate's, or the lean reader.
enum RConn {
    Crate(Connection),
    Lean(resp::Conn),
}

impl RConn {
    fn open(port: u16) -> Result<RConn> {
        Ok(if use_crate_client() {
            RConn::Crate(connect(port)?)
        } else {
            RConn::Lean(resp::Conn::connect(port)?)
        })
    }

    fn send(&mut self, b: &[u8]) -> Result<()> {
        match self {
            RConn::Crate(c) => c.send_packed_command(b)?,
            RConn::Lean(c) => c.send(b)?,
        }
        Ok(())
    }

    /// The next reply, or `None` after counting an error reply; `Err` for
    /// a failed connection.
    fn recv(&mut self, errors: &Errors, what: &str) -> Result<Option<Value>> {
        let r: resp::Reply = match self {
            RConn::Lean(c) => c.recv()?,
            RConn::Crate(c) => match c.recv_response() {
                Ok(Value::ServerError(e)) => Err(format!("{e:?}")),
                Ok(v) => Ok(v),
                Err(e) if e.is_io_error() || e.is_connection_dropped() => return Err(e.into()),
                Err(e) => Err(e.to_string()),
            },
        };
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                errors.report(what, || e);
                Ok(None)
            }
        }
    }
}

fn client_name() -> &'static str {
    if use_crate_client() {
        "redis-crate"
    } else {
        "resp-lean"
    }
}

fn connect(port: u16) -> Result<Connection> {
    let info = format!("redis://127.0.0.1:{port}/")
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    Ok(redis::Client::open(info)?.get_connection()?)
}

fn base_line(flags: &Flags, workload: &str, r: &Redis, shape: &Shape) -> ResultLine {
    let mut l = ResultLine {
        workload: workload.into(),
        target: "redis".into(),
        durability: durability(flags).name().into(),
        payload: flags.payload,
        keyspace: "streams".into(),
        shards: 1,
        io: "redis".into(),
        seed: flags.seed,
        timelines: Some(flags.timelines),
        zipf: flags.zipf,
        appendfsync: Some(r.appendfsync.into()),
        client: Some(client_name().into()),
        ..Default::default()
    };
    shape.set(&mut l);
    l
}

/// A stream entry id `ms-seq`.
type EntryId = (u64, u64);

fn parse_id(b: &[u8]) -> Option<EntryId> {
    let s = std::str::from_utf8(b).ok()?;
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// W1 on one connection.
struct XaddConn<'a> {
    c: RConn,
    buf: Vec<u8>,
    key: String,
    rng: SmallRng,
    payloads: &'a Payloads,
    picker: &'a Picker,
    batch: usize,
    left: u64,
    /// (timeline, entry id) of every acknowledged XADD, when W2 follows.
    ids: Option<Vec<(u32, EntryId)>>,
    counts: &'a Counts,
    errors: &'a Errors,
}

impl Pipelined for XaddConn<'_> {
    type Ctx = Vec<u64>;

    fn queue(&mut self) -> Result<Vec<u64>> {
        let b = (self.batch as u64).min(self.left).max(1);
        self.left = self.left.saturating_sub(b);
        let mut tls = Vec::with_capacity(b as usize);
        for _ in 0..b {
            let id = self.picker.pick(&mut self.rng);
            self.key.clear();
            let _ = write!(self.key, "tl:{id}");
            redis::cmd("XADD")
                .arg(self.key.as_str())
                .arg("*")
                .arg("p")
                .arg(self.payloads.pick(&mut self.rng))
                .write_packed_command(&mut self.buf);
            tls.push(id);
        }
        Ok(tls)
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.c.send(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn complete(&mut self, tls: Vec<u64>) -> Result<()> {
        for id in tls {
            let Some(v) = self.c.recv(self.errors, "XADD")? else {
                continue;
            };
            match &v {
                Value::BulkString(b) => match parse_id(b) {
                    Some(e) => {
                        self.counts.note(id, 0);
                        if let Some(ids) = &mut self.ids {
                            ids.push((id as u32, e));
                        }
                    }
                    None => self.errors.report("XADD", || format!("reply {v:?}")),
                },
                _ => self.errors.report("XADD", || format!("reply {v:?}")),
            }
        }
        Ok(())
    }
}

/// The timed W1 load; with `keep_ids`, every timeline's entry ids in
/// stream order (index = timeline id).
fn load(
    flags: &Flags,
    r: &Redis,
    shape: &Shape,
    counts: &Counts,
    errors: &Errors,
    keep_ids: bool,
) -> Result<(Load, Vec<Vec<EntryId>>)> {
    let payloads = Payloads::new(flags.payload, flags.seed);
    let picker = Picker::new(flags.timelines, flags.zipf)?;
    if flags.timelines > u64::from(u32::MAX) {
        return Err("--timelines too large".into());
    }
    let conns: Vec<Mutex<Option<RConn>>> = (0..shape.connections)
        .map(|_| Ok(Mutex::new(Some(RConn::open(r.port)?))))
        .collect::<Result<_>>()?;
    let calls = AtomicU64::new(0);
    let kept: Mutex<Vec<Vec<(u32, EntryId)>>> = Mutex::new(Vec::new());
    let timed = timed_threads(&shape.as_threads(flags), flags.messages, |conn, n, hist| {
        let c = conns[conn as usize]
            .lock()
            .map_err(|_| "poisoned")?
            .take()
            .ok_or("connection taken twice")?;
        let requests = n.div_ceil(flags.batch as u64);
        let mut x = XaddConn {
            c,
            buf: Vec::with_capacity(64 << 10),
            key: String::with_capacity(32),
            rng: rng_for(flags.seed, conn),
            payloads: &payloads,
            picker: &picker,
            batch: flags.batch,
            left: n,
            ids: keep_ids.then(|| Vec::with_capacity(n as usize)),
            counts,
            errors,
        };
        drive(&mut x, requests, shape, hist)?;
        calls.fetch_add(requests, Ordering::Relaxed);
        if let Some(ids) = x.ids.take() {
            kept.lock().map_err(|_| "poisoned")?.push(ids);
        }
        Ok((0, 0))
    })?;
    let mut ids: Vec<Vec<EntryId>> = Vec::new();
    if keep_ids {
        ids = vec![Vec::new(); flags.timelines as usize];
        for part in kept.into_inner().map_err(|_| "poisoned")? {
            for (tl, e) in part {
                ids[tl as usize].push(e);
            }
        }
        for v in &mut ids {
            v.sort_unstable();
        }
    }
    Ok((
        Load {
            messages: flags.messages,
            calls: calls.load(Ordering::Relaxed),
            secs: timed.secs,
            hist: timed.hist,
        },
        ids,
    ))
}

/// `XLEN` of every timeline must equal the acknowledged XADDs.
fn verify_counts(r: &Redis, timelines: u64, counts: &Counts, errors: &Errors) -> Result<u64> {
    let mut c = r.connect()?;
    let mut with_data = 0;
    let mut id = 0;
    while id < timelines {
        let end = (id + SWEEP_BURST).min(timelines);
        let mut p = redis::pipe();
        for i in id..end {
            p.cmd("XLEN").arg(format!("tl:{i}"));
        }
        let lens: Vec<u64> = p.query(&mut c)?;
        for (i, len) in (id..end).zip(lens) {
            let n = counts.n[i as usize].load(Ordering::Relaxed);
            with_data += u64::from(len > 0);
            if len != n {
                errors.report("verify", || {
                    format!("tl:{i}: XLEN {len}, {n} XADDs acknowledged")
                });
            }
        }
        id = end;
    }
    Ok(with_data)
}

/// Run W1 and return its line (verified) and, with `keep_ids`, the ids.
fn append_phase(
    flags: &Flags,
    r: &Redis,
    shape: &Shape,
    errors: &Errors,
    keep_ids: bool,
) -> Result<(ResultLine, Vec<Vec<EntryId>>)> {
    let counts = Counts::new(flags.timelines);
    eprintln!(
        "append: {} messages of {} B to {} Redis streams, {} XADD(s) per request, {} connection(s) x pipeline {}, appendfsync {}",
        flags.messages,
        flags.payload,
        flags.timelines,
        flags.batch,
        shape.connections,
        shape.pipeline,
        r.appendfsync
    );
    let meter = Meter::start(Some(r.pid()));
    let (ld, ids) = load(flags, r, shape, &counts, errors, keep_ids)?;
    let mut line = base_line(flags, "append", r, shape);
    let payload_bytes = ld.messages * flags.payload as u64;
    line.payload_bytes = Some(payload_bytes);
    meter.finish(&mut line);
    eprintln!("append: timed section {:.3} s; verifying", ld.secs);
    let with_data = verify_counts(r, flags.timelines, &counts, errors)?;
    if counts.total() != ld.messages {
        errors.report("verify", || {
            format!(
                "{} XADDs acknowledged, {} sent",
                counts.total(),
                ld.messages
            )
        });
    }
    line.ops = ld.messages;
    line.secs = ld.secs;
    line.ops_per_sec = rate(ld.messages, ld.secs);
    line.messages = Some(ld.messages);
    line.messages_per_sec = Some(rate(ld.messages, ld.secs));
    line.calls = Some(ld.calls);
    line.set_latency(&ld.hist);
    line.timelines_with_data = Some(with_data);
    line.batch = Some(flags.batch);
    line.errors = Some(errors.count());
    line.bytes_per_payload_byte = line
        .disk_write_bytes
        .map(|w| round3(w as f64 / payload_bytes.max(1) as f64));
    Ok((line, ids))
}

/// `timeline-bench append --target redis`: returns the number of errors.
pub fn append(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let shape = Shape::new(flags);
    let r = Redis::start(flags)?;
    let errors = Errors::default();
    let (line, _) = append_phase(flags, &r, &shape, &errors, false)?;
    r.stop()?;
    rep.push(line)?;
    Ok(errors.count())
}

/// W2 on one connection.
struct RangeConn<'a> {
    c: RConn,
    buf: Vec<u8>,
    key: String,
    start: String,
    rng: SmallRng,
    picker: Picker,
    tls: &'a [(u64, u64)],
    ids: &'a [Vec<EntryId>],
    forward: bool,
    len: usize,
    payload: usize,
    records: u64,
    errors: &'a Errors,
}

impl RangeConn<'_> {
    /// `None` if `v` is the page a read of `len` from position `from`
    /// (1-based) of `ids` must return.
    fn check(&self, v: &Value, ids: &[EntryId], from: u64) -> Option<String> {
        let last = ids.len() as u64;
        let want = if self.forward {
            (last - from + 1).min(self.len as u64)
        } else {
            from.min(self.len as u64)
        };
        let Value::Array(entries) = v else {
            return Some(format!("reply {v:?}"));
        };
        if entries.len() as u64 != want {
            return Some(format!("{} entries, expected {want}", entries.len()));
        }
        for (i, e) in entries.iter().enumerate() {
            let pos = if self.forward {
                from - 1 + i as u64
            } else {
                from - 1 - i as u64
            };
            let expect = ids[pos as usize];
            let (id, fields) = match e {
                Value::Array(x) if x.len() == 2 => (&x[0], &x[1]),
                _ => return Some(format!("entry {i}: {e:?}")),
            };
            let got = match id {
                Value::BulkString(b) => parse_id(b),
                _ => None,
            };
            if got != Some(expect) {
                return Some(format!("entry {i} has id {got:?}, expected {expect:?}"));
            }
            match fields {
                Value::Array(f)
                    if f.len() == 2
                        && matches!(&f[0], Value::BulkString(k) if k == b"p")
                        && matches!(&f[1], Value::BulkString(p) if p.len() == self.payload) => {}
                _ => return Some(format!("entry {i}: fields {fields:?}")),
            }
        }
        None
    }
}

impl Pipelined for RangeConn<'_> {
    /// (timeline, start position).
    type Ctx = (u64, u64);

    fn queue(&mut self) -> Result<Self::Ctx> {
        // The same choices, in the same order, as `read::reads`.
        let (id, last) = self.tls[self.picker.pick(&mut self.rng) as usize];
        let from = self.rng.gen_range(1..=last);
        let (ms, seq) = self.ids[id as usize][from as usize - 1];
        self.key.clear();
        let _ = write!(self.key, "tl:{id}");
        self.start.clear();
        if !self.forward && from == last {
            self.start.push('+');
        } else {
            let _ = write!(self.start, "{ms}-{seq}");
        }
        let (cmd, end) = if self.forward {
            ("XRANGE", "+")
        } else {
            ("XREVRANGE", "-")
        };
        redis::cmd(cmd)
            .arg(self.key.as_str())
            .arg(self.start.as_str())
            .arg(end)
            .arg("COUNT")
            .arg(self.len)
            .write_packed_command(&mut self.buf);
        Ok((id, from))
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.c.send(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn complete(&mut self, (id, from): Self::Ctx) -> Result<()> {
        let what = if self.forward { "XRANGE" } else { "XREVRANGE" };
        let Some(v) = self.c.recv(self.errors, what)? else {
            return Ok(());
        };
        if let Value::Array(a) = &v {
            self.records += a.len() as u64;
        }
        let ids = &self.ids[id as usize];
        if let Some(p) = self.check(&v, ids, from) {
            self.errors.report("read", || {
                format!(
                    "tl:{id} ({} entries), {what} from entry {from}: {p}",
                    ids.len()
                )
            });
        }
        Ok(())
    }
}

/// `timeline-bench read --target redis`: returns the number of errors.
pub fn read(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let shape = Shape::new(flags);
    let r = Redis::start(flags)?;
    let errors = Errors::default();
    let (mut line, ids) = append_phase(flags, &r, &shape, &errors, true)?;
    line.phase = Some("load".into());
    rep.push(line)?;
    let tls: Vec<(u64, u64)> = ids
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .map(|(id, v)| (id as u64, v.len() as u64))
        .collect();
    if tls.is_empty() {
        return Err("no stream has data".into());
    }
    let fwd = flags.reads - flags.reads / 2;
    for (forward, name, n, stream) in [
        (true, "forward", fwd, 1000),
        (false, "backward", flags.reads / 2, 2000),
    ] {
        let conns: Vec<Mutex<Option<RConn>>> = (0..shape.connections)
            .map(|_| Ok(Mutex::new(Some(RConn::open(r.port)?))))
            .collect::<Result<_>>()?;
        let before = errors.count();
        let meter = Meter::start(Some(r.pid()));
        let timed = timed_threads(&shape.as_threads(flags), n, |conn, share, hist| {
            let c = conns[conn as usize]
                .lock()
                .map_err(|_| "poisoned")?
                .take()
                .ok_or("connection taken twice")?;
            let mut rc = RangeConn {
                c,
                buf: Vec::with_capacity(64 << 10),
                key: String::with_capacity(32),
                start: String::with_capacity(48),
                rng: rng_for(flags.seed, stream + conn),
                picker: Picker::new(tls.len() as u64, flags.zipf)?,
                tls: &tls,
                ids: &ids,
                forward,
                len: flags.read_len,
                payload: flags.payload,
                records: 0,
                errors: &errors,
            };
            drive(&mut rc, share, &shape, hist)?;
            Ok((rc.records, 0))
        })?;
        let mut line = base_line(flags, "read", &r, &shape);
        meter.finish(&mut line);
        line.direction = Some(name.into());
        line.ops = n;
        line.secs = timed.secs;
        line.ops_per_sec = rate(n, timed.secs);
        line.messages = Some(timed.counts.0);
        line.messages_per_sec = Some(rate(timed.counts.0, timed.secs));
        line.set_latency(&timed.hist);
        line.errors = Some(errors.count() - before);
        line.read_len = Some(flags.read_len);
        line.timelines_with_data = Some(tls.len() as u64);
        rep.push(line)?;
    }
    r.stop()?;
    Ok(errors.count())
}
