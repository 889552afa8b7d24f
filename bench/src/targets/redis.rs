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
//! entry id (`ms-seq`), as the engine assigns seqs. Sessions are
//! connections, with pipeline and refill exactly as for the server target
//! (TCP_NODELAY, commands packed by the `redis` crate and written once per
//! flush, replies read by the lean reader `resp`, or the crate's with
//! `TIMELINE_BENCH_REDIS_CLIENT=crate`). Redis has no multi-key append, so
//! `--batch` B makes each request B XADDs sent back to back (a B-times
//! deeper pipeline: Redis's nearest equivalent of `APPEND_BATCH`).
//!
//! **Positions.** Every entry id an XADD returned is kept, in stream order
//! per timeline (the bench does this, not Redis), so a read at position k
//! (the k-th entry) is `XRANGE tl:{id} <id of entry k> + COUNT L` forward
//! and `XREVRANGE tl:{id} <id of entry k> - COUNT L` newest-first (`+` for
//! the newest); the ids of a page are mapped back to positions, so a page
//! with an id the bench was not given fails the workload's seq check.
//! Lengths are `XLEN`s. `disk_write_bytes`, `peak_rss_bytes` and
//! `server_cpu_secs` are redis-server's (from /proc).

use super::net::{free_port, Meter, Proc};
use super::{base_line, net_shape, resp, Op, Reply, Session, Shape, Target};
use crate::report::ResultLine;
use crate::workloads::append::round3;
use crate::workloads::DataDir;
use crate::{DurabilityArg, Flags, Result};
use redis::{Connection, IntoConnectionInfo, Value};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::process::Command;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use timeline_engine::{Direction, Record, SeqId};

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

/// Which reader the sessions use (`TIMELINE_BENCH_REDIS_CLIENT`): the
/// lean one (`resp`, default) or the `redis` crate's (`crate`).
fn use_crate_client() -> bool {
    std::env::var("TIMELINE_BENCH_REDIS_CLIENT").is_ok_and(|v| v == "crate")
}

/// A session's connection: the crate's, or the lean reader.
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

    /// The next reply (`Err` inside for an error reply); `Err` outside for
    /// a failed connection.
    fn recv(&mut self) -> Result<resp::Reply> {
        let r: resp::Reply = match self {
            RConn::Lean(c) => c.recv()?,
            RConn::Crate(c) => match c.recv_response() {
                Ok(Value::ServerError(e)) => Err(format!("{e:?}")),
                Ok(v) => Ok(v),
                Err(e) if e.is_io_error() || e.is_connection_dropped() => return Err(e.into()),
                Err(e) => Err(e.to_string()),
            },
        };
        Ok(r)
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

/// A stream entry id `ms-seq`.
type EntryId = (u64, u64);

fn parse_id(b: &[u8]) -> Option<EntryId> {
    let s = std::str::from_utf8(b).ok()?;
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// Redis as a [`Target`] of W1 and W2.
pub struct RedisTarget {
    r: Redis,
    flags: Flags,
    shape: Shape,
    /// Entry ids of each timeline in stream order, from the XADD replies
    /// (brought up to date by `lengths`).
    ids: RwLock<Vec<Vec<EntryId>>>,
    /// Ids the sessions were given since, merged by `lengths`.
    new_ids: Mutex<Vec<(u32, EntryId)>>,
}

impl RedisTarget {
    pub fn start(flags: &Flags) -> Result<RedisTarget> {
        if flags.timelines > u64::from(u32::MAX) {
            return Err("--timelines too large".into());
        }
        Ok(RedisTarget {
            r: Redis::start_with(flags, &[])?,
            flags: flags.clone(),
            shape: net_shape(flags),
            ids: RwLock::new(vec![Vec::new(); flags.timelines as usize]),
            new_ids: Mutex::new(Vec::new()),
        })
    }
}

/// What a request in flight was.
enum Sent {
    /// XADDs to these timelines.
    Xadd(Vec<u64>),
    /// A range read of this timeline.
    Range(u64),
}

pub struct RedisSession<'a> {
    t: &'a RedisTarget,
    c: RConn,
    buf: Vec<u8>,
    key: String,
    start: String,
    q: VecDeque<Sent>,
    /// (timeline, entry id) of every XADD acknowledged on this session.
    ids: Vec<(u32, EntryId)>,
}

impl Drop for RedisSession<'_> {
    fn drop(&mut self) {
        if let Ok(mut v) = self.t.new_ids.lock() {
            v.append(&mut self.ids);
        }
    }
}

impl RedisSession<'_> {
    fn xadd(&mut self, items: &[(u64, &[u8])]) {
        for &(id, payload) in items {
            self.key.clear();
            let _ = write!(self.key, "tl:{id}");
            redis::cmd("XADD")
                .arg(self.key.as_str())
                .arg("*")
                .arg("p")
                .arg(payload)
                .write_packed_command(&mut self.buf);
        }
        self.q
            .push_back(Sent::Xadd(items.iter().map(|i| i.0).collect()));
    }

    fn range(&mut self, id: u64, from: u64, len: usize, dir: Direction) -> Result<()> {
        let ids = self.t.ids.read().map_err(|_| "poisoned")?;
        let tl = ids.get(id as usize).map_or(&[][..], |v| v.as_slice());
        self.start.clear();
        match (dir, from) {
            (Direction::Backward, u64::MAX) => self.start.push('+'),
            (Direction::Forward, 1) => self.start.push('-'),
            _ => {
                let (ms, seq) = *tl
                    .get((from as usize).wrapping_sub(1))
                    .ok_or_else(|| format!("tl:{id} has no entry at position {from}"))?;
                let _ = write!(self.start, "{ms}-{seq}");
            }
        }
        drop(ids);
        self.key.clear();
        let _ = write!(self.key, "tl:{id}");
        let (cmd, end) = match dir {
            Direction::Forward => ("XRANGE", "+"),
            Direction::Backward => ("XREVRANGE", "-"),
        };
        redis::cmd(cmd)
            .arg(self.key.as_str())
            .arg(self.start.as_str())
            .arg(end)
            .arg("COUNT")
            .arg(len)
            .write_packed_command(&mut self.buf);
        self.q.push_back(Sent::Range(id));
        Ok(())
    }

    /// A range reply as records: position (0 for an id the bench was not
    /// given) and the `p` field.
    fn page(&self, id: u64, v: Value) -> Result<Reply> {
        let ids = self.t.ids.read().map_err(|_| "poisoned")?;
        let tl = ids.get(id as usize).map_or(&[][..], |v| v.as_slice());
        let Value::Array(entries) = v else {
            return Ok(Reply::Refused(format!("reply {v:?}")));
        };
        let mut page = Vec::with_capacity(entries.len());
        for e in entries {
            let Value::Array(mut x) = e else {
                return Ok(Reply::Refused("an entry that is not [id, fields]".into()));
            };
            let (Some(Value::Array(mut f)), Some(Value::BulkString(eid))) = (x.pop(), x.pop())
            else {
                return Ok(Reply::Refused("an entry that is not [id, fields]".into()));
            };
            let seq = parse_id(&eid)
                .and_then(|e| tl.binary_search(&e).ok())
                .map_or(0, |i| i as u64 + 1);
            let payload = match (f.pop(), f.pop()) {
                (Some(Value::BulkString(p)), Some(Value::BulkString(k))) if k == b"p" => p,
                _ => return Ok(Reply::Refused("fields other than `p`".into())),
            };
            page.push(Record {
                seq,
                timestamp_ms: 0,
                payload,
            });
        }
        Ok(Reply::Page(page))
    }
}

impl Session for RedisSession<'_> {
    fn queue(&mut self, op: Op<'_>) -> Result<()> {
        match op {
            Op::Append(items) => self.xadd(items),
            Op::Scan { id, from, len, dir } => self.range(id, from, len, dir)?,
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.c.send(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<Reply> {
        match self
            .q
            .pop_front()
            .ok_or("complete() with nothing in flight")?
        {
            Sent::Range(id) => match self.c.recv()? {
                Ok(v) => self.page(id, v),
                Err(e) => Ok(Reply::Refused(e)),
            },
            Sent::Xadd(tls) => {
                let mut refused = None;
                for id in &tls {
                    match self.c.recv()? {
                        Ok(Value::BulkString(b)) if parse_id(&b).is_some() => {
                            if let Some(e) = parse_id(&b) {
                                self.ids.push((*id as u32, e));
                            }
                        }
                        Ok(v) => refused = Some(format!("XADD: reply {v:?}")),
                        Err(e) => refused = Some(format!("XADD: {e}")),
                    }
                }
                Ok(match refused {
                    Some(e) => Reply::Refused(e),
                    None => Reply::Appended(vec![0; tls.len()]),
                })
            }
        }
    }
}

impl Target for RedisTarget {
    type Session<'a> = RedisSession<'a>;
    type Mark = Meter;

    fn shape(&self) -> Shape {
        self.shape
    }

    fn session(&self) -> Result<RedisSession<'_>> {
        Ok(RedisSession {
            t: self,
            c: RConn::open(self.r.port)?,
            buf: Vec::with_capacity(64 << 10),
            key: String::with_capacity(32),
            start: String::with_capacity(48),
            q: VecDeque::new(),
            ids: Vec::new(),
        })
    }

    fn lengths(&self, n: u64) -> Result<Vec<SeqId>> {
        let mut new = std::mem::take(&mut *self.new_ids.lock().map_err(|_| "poisoned")?);
        if !new.is_empty() {
            let mut ids = self.ids.write().map_err(|_| "poisoned")?;
            for (tl, e) in new.drain(..) {
                ids[tl as usize].push(e);
            }
            for v in ids.iter_mut() {
                v.sort_unstable();
            }
        }
        let mut c = self.r.connect()?;
        let mut out = Vec::with_capacity(n as usize);
        for chunk in (0..n).collect::<Vec<_>>().chunks(SWEEP_BURST as usize) {
            let mut p = redis::pipe();
            for i in chunk {
                p.cmd("XLEN").arg(format!("tl:{i}"));
            }
            out.extend(p.query::<Vec<u64>>(&mut c)?);
        }
        Ok(out)
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "redis");
        l.keyspace = "streams".into();
        l.shards = 1;
        l.io = "redis".into();
        l.appendfsync = Some(self.r.appendfsync.into());
        l.client = Some(client_name().into());
        self.shape.set(&mut l);
        l
    }

    fn mark(&self) -> Result<Meter> {
        Ok(Meter::start(Some(self.r.pid())))
    }

    fn settle(&self, _line: &mut ResultLine) -> Result<()> {
        Ok(())
    }

    fn measure(&self, m: &Meter, line: &mut ResultLine) -> Result<()> {
        m.finish(line);
        if let (Some(w), Some(p)) = (line.disk_write_bytes, line.payload_bytes) {
            line.bytes_per_payload_byte = Some(round3(w as f64 / p.max(1) as f64));
        }
        Ok(())
    }

    fn close(self, _last: Option<&mut ResultLine>) -> Result<()> {
        self.r.stop()
    }
}
