//! `--target server`: W1 `append`, W2 `read` (and, in `server_im`, W4 `im`)
//! over TCP against `timeline-server`, through the blocking pipelining
//! client `timeline_server::Client`.
//!
//! **The server.** `--addr HOST:PORT` points at a running server (auth off,
//! or the bench has no token to give). Without it the bench starts one: the
//! `timeline-server` binary next to its own executable (so build both:
//! `cargo build --release -p timeline-bench -p timeline-server`), with
//! `--listen 127.0.0.1:0 --data-dir DIR --durability D --shards N` (plus
//! `--hybrid-threshold` and `--entries` when given, for W4), where DIR is
//! `--dir` or a temporary directory (removed at the end unless `--keep`).
//! It reads the address from the server's first stdout line (`listening
//! ADDR`) and at the end stops it with SIGTERM (graceful: acknowledged data
//! durable, exit 0, checked) and waits for it. Engine flags the server does
//! not take (`--segment-mb`, `--io`, `--regroup`, `--seal`) are ignored:
//! the server runs its engine defaults.
//!
//! **Load shape.** `--connections` C (default 4) connections, each driven
//! by one client thread, each keeping up to `--pipeline` P (default 16)
//! requests in flight (`net::drive`): queue P, flush, then read replies in
//! order and, whenever at most P - `--refill` R are in flight, queue back
//! up to P and flush (R = 1, the default: a sliding window, one write per
//! request; R = P: batches of P). The messages (W1) and reads (W2) are split
//! over the connections like `--threads` splits them for the engine target,
//! with the same seeds per share, so a run with C connections appends to
//! the same timelines and reads the same pages as the engine target with C
//! threads. `threads` on the result lines is C.
//!
//! **W1** (`append`): `APPEND` of one `--payload`-byte payload per request
//! (`--batch 1`), or `APPEND_BATCH` of `--batch` B items, each with the
//! durability `--durability` asks for (none / group / sync, explicit in
//! every request; the spawned server's default is the same). `ops` =
//! messages, `calls` = requests, latency per request (from queueing to its
//! reply). Verification: every reply must carry one seq per item; the bench
//! counts acknowledged appends per timeline and keeps the highest seq, then
//! reads `LAST_SEQ` of every timeline `0..--timelines` before and after the
//! load: after - before must equal the count, and the highest seq must be
//! `after`. `errors` counts error replies and mismatches (exit status 2).
//! `bytes_written` and `fsyncs` are the server's `STATS` deltas for the
//! keyspace (no sync is forced after the load: with `none`, bytes still in
//! the engine's append buffers are not counted). `disk_write_bytes`,
//! `peak_rss_bytes` and `server_cpu_secs` are the server process's (from
//! /proc; only when the bench started it), `client_cpu_secs` and
//! `client_peak_rss_bytes` the bench's.
//!
//! **W2** (`read`): a W1 load first (a `phase: "load"` line) unless the
//! server already holds data in timelines `0..--timelines` of the keyspace
//! (then no payload-size check); the timelines with data and their last
//! seqs come from `LAST_SEQ`. Then `--reads` `SCAN`s of `--read-len`
//! records at a random timeline and start, half forward and half backward
//! (newest-first; from `u64::MAX` when the start is the last seq), exactly
//! as the engine target picks them, each page checked like the engine
//! target's (`read::check_page`: expected length, consecutive seqs, payload
//! size).

use super::append::{rate, Load};
pub use super::imkit::Errors;
use super::net::{drive, Counts, Meter, Pipelined, Proc, Shape};
use super::read::check_page;
use super::wire;
use super::{
    durability, keyspace, ks_name, rng_for, timed_threads, timeline, DataDir, Payloads, Picker,
};
use crate::report::{Reporter, ResultLine};
use crate::{Flags, Result};
use rand::rngs::SmallRng;
use rand::Rng;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use timeline_engine::{Direction, Durability, Keyspace};
use timeline_server::protocol::{Request, Response};
use timeline_server::{Client, ClientError};

/// Requests per pipelined burst of the untimed LAST_SEQ sweeps.
const SWEEP_BURST: u64 = 1024;

/// The server the run talks to; it stops a server it started on drop (or
/// gracefully with [`Target::stop`]). Field order: the process goes before
/// its data directory.
pub struct Target {
    pub addr: String,
    proc: Option<Proc>,
    dir: Option<DataDir>,
}

impl Target {
    /// `--addr`, or start `timeline-server` (see the module doc). `extra`:
    /// more server flags.
    pub fn start(flags: &Flags, extra: &[String]) -> Result<Target> {
        if let Some(a) = &flags.addr {
            eprintln!("server: using the running server at {a}");
            return Ok(Target {
                addr: a.clone(),
                proc: None,
                dir: None,
            });
        }
        let dir = DataDir::new(flags)?;
        let (proc, addr) = spawn_server(flags, &dir.path, extra)?;
        Ok(Target {
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

/// The fields every server result line shares.
pub fn base_line(flags: &Flags, workload: &str, t: &Target, shape: &Shape) -> ResultLine {
    let mut l = ResultLine {
        workload: workload.into(),
        target: "server".into(),
        durability: durability(flags).name().into(),
        payload: flags.payload,
        keyspace: ks_name(keyspace(flags)).into(),
        // What the bench asked a server it started for; 0: unknown.
        shards: if t.spawned() { flags.shards } else { 0 },
        io: "server".into(),
        seed: flags.seed,
        timelines: Some(flags.timelines),
        zipf: flags.zipf,
        ..Default::default()
    };
    shape.set(&mut l);
    l
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

/// The timelines of one request: one, or a batch's.
enum Tls {
    One(u64),
    Many(Vec<u64>),
}

/// W1 on one connection.
struct AppendConn<'a> {
    c: Client,
    rng: SmallRng,
    payloads: &'a Payloads,
    picker: &'a Picker,
    ks: Keyspace,
    d: Durability,
    batch: usize,
    /// Messages of this connection's share not queued yet.
    left: u64,
    items: Vec<(timeline_server::protocol::TimelineId, &'a [u8])>,
    counts: &'a Counts,
    errors: &'a Errors,
}

impl Pipelined for AppendConn<'_> {
    type Ctx = Tls;

    fn queue(&mut self) -> Result<Tls> {
        let b = (self.batch as u64).min(self.left).max(1);
        self.left = self.left.saturating_sub(b);
        if self.batch == 1 {
            let id = self.picker.pick(&mut self.rng);
            let payload = self.payloads.pick(&mut self.rng);
            self.c.queue(&Request::Append {
                timeline: wire::timeline(timeline(self.ks, id)),
                durability: Some(wire::durability(self.d)),
                payload,
            });
            return Ok(Tls::One(id));
        }
        self.items.clear();
        let mut ids = Vec::with_capacity(b as usize);
        for _ in 0..b {
            let id = self.picker.pick(&mut self.rng);
            ids.push(id);
            self.items.push((
                wire::timeline(timeline(self.ks, id)),
                self.payloads.pick(&mut self.rng),
            ));
        }
        self.c.queue(&Request::AppendBatch {
            durability: Some(wire::durability(self.d)),
            items: std::mem::take(&mut self.items),
        });
        Ok(Tls::Many(ids))
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.c.flush()?)
    }

    fn complete(&mut self, ctx: Tls) -> Result<()> {
        let r = match self.c.recv() {
            Ok(r) => r,
            Err(e @ ClientError::Server { .. }) => {
                self.errors.report("append", || e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match (ctx, r) {
            (Tls::One(id), Response::Append(seq)) if seq > 0 => self.counts.note(id, seq),
            (Tls::Many(ids), Response::AppendBatch(seqs)) if seqs.len() == ids.len() => {
                for (id, seq) in ids.into_iter().zip(seqs) {
                    self.counts.note(id, seq);
                }
            }
            (_, r) => self
                .errors
                .report("append", || format!("unexpected reply {r:?}")),
        }
        Ok(())
    }
}

/// The timed W1 load over `--connections` connections.
fn load(
    flags: &Flags,
    t: &Target,
    shape: &Shape,
    counts: &Counts,
    errors: &Errors,
) -> Result<Load> {
    let payloads = Payloads::new(flags.payload, flags.seed);
    let picker = Picker::new(flags.timelines, flags.zipf)?;
    let ks = keyspace(flags);
    let d = durability(flags);
    // Connect before the clock starts.
    let conns: Vec<std::sync::Mutex<Option<Client>>> = (0..shape.connections)
        .map(|_| Ok(std::sync::Mutex::new(Some(t.connect()?))))
        .collect::<Result<_>>()?;
    let calls = AtomicU64::new(0);
    let timed = timed_threads(&shape.as_threads(flags), flags.messages, |conn, n, hist| {
        let c = conns[conn as usize]
            .lock()
            .map_err(|_| "poisoned")?
            .take()
            .ok_or("connection taken twice")?;
        let requests = n.div_ceil(flags.batch as u64);
        let mut a = AppendConn {
            c,
            rng: rng_for(flags.seed, conn),
            payloads: &payloads,
            picker: &picker,
            ks,
            d,
            batch: flags.batch,
            left: n,
            items: Vec::with_capacity(flags.batch),
            counts,
            errors,
        };
        drive(&mut a, requests, shape, hist)?;
        calls.fetch_add(requests, Ordering::Relaxed);
        Ok((0, 0))
    })?;
    Ok(Load {
        messages: flags.messages,
        calls: calls.load(Ordering::Relaxed),
        secs: timed.secs,
        hist: timed.hist,
    })
}

/// Compare the counts of acknowledged appends with LAST_SEQ before/after.
fn verify_counts(before: &[u64], after: &[u64], counts: &Counts, errors: &Errors) {
    for (id, (&b, &a)) in before.iter().zip(after).enumerate() {
        let n = counts.n[id].load(Ordering::Relaxed);
        let max = counts.max[id].load(Ordering::Relaxed);
        if a != b + n || (n > 0 && max != a) {
            errors.report("verify", || {
                format!(
                    "timeline {id}: last_seq {b} before, {a} after, {n} appends acknowledged (highest seq {max})"
                )
            });
        }
    }
}

/// Run W1 and return its result line (verified).
fn append_phase(flags: &Flags, t: &Target, shape: &Shape, errors: &Errors) -> Result<ResultLine> {
    let ks = keyspace(flags);
    let mut admin = t.connect()?;
    let before = last_seqs(&mut admin, ks, flags.timelines)?;
    let s0 = stats(&mut admin)?;
    let counts = Counts::new(flags.timelines);
    eprintln!(
        "append: {} messages of {} B to {} timelines over TCP, {} {} per request, {} connection(s) x pipeline {}, durability {}",
        flags.messages,
        flags.payload,
        flags.timelines,
        flags.batch,
        if flags.batch == 1 { "APPEND" } else { "APPEND_BATCH items" },
        shape.connections,
        shape.pipeline,
        durability(flags).name()
    );
    let meter = Meter::start(t.pid());
    let ld = load(flags, t, shape, &counts, errors)?;
    let s1 = stats(&mut admin)?;
    let mut line = base_line(flags, "append", t, shape);
    let payload_bytes = ld.messages * flags.payload as u64;
    line.payload_bytes = Some(payload_bytes);
    meter.finish(&mut line);
    eprintln!("append: timed section {:.3} s; verifying", ld.secs);
    let after = last_seqs(&mut admin, ks, flags.timelines)?;
    verify_counts(&before, &after, &counts, errors);
    if counts.total() != ld.messages {
        errors.report("verify", || {
            format!(
                "{} appends acknowledged, {} sent",
                counts.total(),
                ld.messages
            )
        });
    }
    let d = |k: &str| stat(&s1, k).saturating_sub(stat(&s0, k));
    let written = d(&format!("{}_bytes_written", ks_name(ks)));
    line.ops = ld.messages;
    line.secs = ld.secs;
    line.ops_per_sec = rate(ld.messages, ld.secs);
    line.messages = Some(ld.messages);
    line.messages_per_sec = Some(rate(ld.messages, ld.secs));
    line.calls = Some(ld.calls);
    line.set_latency(&ld.hist);
    line.bytes_written = Some(written);
    line.bytes_written_total = Some(d("store_bytes_written") + d("sync_bytes_written"));
    line.bytes_per_payload_byte = Some(super::append::round3(
        written as f64 / payload_bytes.max(1) as f64,
    ));
    line.fsyncs = Some(d("fsyncs"));
    line.timelines_with_data = Some(after.iter().filter(|&&s| s > 0).count() as u64);
    line.batch = Some(flags.batch);
    line.errors = Some(errors.count());
    if let Some(dir) = t.dir() {
        line.files = Some(crate::sysinfo::count_files(&dir.path));
    }
    Ok(line)
}

/// `timeline-bench append --target server`: returns the number of errors.
pub fn append(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let shape = Shape::new(flags);
    let t = Target::start(flags, &[])?;
    let errors = Errors::default();
    let line = append_phase(flags, &t, &shape, &errors)?;
    t.stop()?;
    rep.push(line)?;
    Ok(errors.count())
}

/// W2 on one connection.
struct ReadConn<'a> {
    c: Client,
    rng: SmallRng,
    picker: Picker,
    tls: &'a [(u64, u64)],
    ks: Keyspace,
    dirn: Direction,
    len: usize,
    expect_payload: Option<usize>,
    records: u64,
    errors: &'a Errors,
}

impl Pipelined for ReadConn<'_> {
    /// (timeline, its last seq, start, the `from` sent).
    type Ctx = (u64, u64, u64, u64);

    fn queue(&mut self) -> Result<Self::Ctx> {
        // The same choices, in the same order, as `read::reads`.
        let (id, last) = self.tls[self.picker.pick(&mut self.rng) as usize];
        let from = self.rng.gen_range(1..=last);
        let arg = if self.dirn == Direction::Backward && from == last {
            u64::MAX
        } else {
            from
        };
        self.c.queue(&Request::Scan {
            timeline: wire::timeline(timeline(self.ks, id)),
            from: arg,
            limit: self.len as u32,
            direction: wire::direction(self.dirn),
        });
        Ok((id, last, from, arg))
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.c.flush()?)
    }

    fn complete(&mut self, (id, last, from, arg): Self::Ctx) -> Result<()> {
        let problem = match self.c.recv() {
            Ok(Response::Scan(page)) => {
                let page = wire::records(page);
                self.records += page.len() as u64;
                check_page(&page, self.dirn, from, last, self.len, self.expect_payload)
            }
            Ok(other) => Some(format!("unexpected reply {other:?}")),
            Err(e @ ClientError::Server { .. }) => Some(format!("SCAN failed: {e}")),
            Err(e) => return Err(e.into()),
        };
        if let Some(p) = problem {
            let dirn = self.dirn;
            self.errors.report("read", || {
                format!("timeline {id} ({last} records), from {arg} {dirn:?}: {p}")
            });
        }
        Ok(())
    }
}

/// `timeline-bench read --target server`: returns the number of errors.
pub fn read(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    if flags.read_len > u32::MAX as usize {
        return Err("--read-len too large".into());
    }
    let shape = Shape::new(flags);
    let t = Target::start(flags, &[])?;
    let ks = keyspace(flags);
    let errors = Errors::default();
    let mut admin = t.connect()?;
    let existing = last_seqs(&mut admin, ks, flags.timelines)?
        .iter()
        .filter(|&&s| s > 0)
        .count();
    let loaded = existing == 0;
    if loaded {
        let mut line = append_phase(flags, &t, &shape, &errors)?;
        line.phase = Some("load".into());
        rep.push(line)?;
    } else {
        eprintln!(
            "read: the server holds data in {existing} {} timelines; skipping the load",
            ks_name(ks)
        );
    }
    let tls: Vec<(u64, u64)> = last_seqs(&mut admin, ks, flags.timelines)?
        .into_iter()
        .enumerate()
        .filter(|&(_, s)| s > 0)
        .map(|(id, s)| (id as u64, s))
        .collect();
    if tls.is_empty() {
        return Err(format!(
            "no {} timeline among ids 0..{} has data",
            ks_name(ks),
            flags.timelines
        )
        .into());
    }
    let expect_payload = loaded.then_some(flags.payload);
    let fwd = flags.reads - flags.reads / 2;
    for (dirn, name, n, stream) in [
        (Direction::Forward, "forward", fwd, 1000),
        (Direction::Backward, "backward", flags.reads / 2, 2000),
    ] {
        let conns: Vec<std::sync::Mutex<Option<Client>>> = (0..shape.connections)
            .map(|_| Ok(std::sync::Mutex::new(Some(t.connect()?))))
            .collect::<Result<_>>()?;
        let before = errors.count();
        let meter = Meter::start(t.pid());
        let timed = timed_threads(&shape.as_threads(flags), n, |conn, share, hist| {
            let c = conns[conn as usize]
                .lock()
                .map_err(|_| "poisoned")?
                .take()
                .ok_or("connection taken twice")?;
            let mut r = ReadConn {
                c,
                rng: rng_for(flags.seed, stream + conn),
                picker: Picker::new(tls.len() as u64, flags.zipf)?,
                tls: &tls,
                ks,
                dirn,
                len: flags.read_len,
                expect_payload,
                records: 0,
                errors: &errors,
            };
            drive(&mut r, share, &shape, hist)?;
            Ok((r.records, 0))
        })?;
        let mut line = base_line(flags, "read", &t, &shape);
        meter.finish(&mut line);
        let errs = errors.count() - before;
        line.direction = Some(name.into());
        line.ops = n;
        line.secs = timed.secs;
        line.ops_per_sec = rate(n, timed.secs);
        line.messages = Some(timed.counts.0);
        line.messages_per_sec = Some(rate(timed.counts.0, timed.secs));
        line.set_latency(&timed.hist);
        line.errors = Some(errs);
        line.read_len = Some(flags.read_len);
        line.timelines_with_data = Some(tls.len() as u64);
        rep.push(line)?;
    }
    drop(admin);
    t.stop()?;
    Ok(errors.count())
}
