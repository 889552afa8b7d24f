//! The targets a workload runs against, behind two traits: [`Target`] for
//! the timeline workloads (W1 `append`, W2 `read`) and [`ImTarget`] for the
//! IM workloads (W3 `fanout`, W4 `im`). A target only adapts operations:
//! it opens sessions (a thread's engine handle, a TCP connection), turns
//! an [`Op`] into its own calls and its answer into a [`Reply`], and
//! reports its own costs. Which operations run, in which order, and how
//! they are checked is the workload's, written once in `workloads/`.
//!
//! Sessions are pipelined: operations are queued, sent by `flush`, and
//! their replies taken back in order with `complete`. A synchronous target
//! (the engine without `--in-flight`, RocksDB) does the work in `queue` and
//! hands the result back from `complete`; [`drive`] keeps the window the
//! target's [`Shape`] asks for.

pub mod cluster;
pub mod cluster_im;
pub mod engine;
pub mod net;
pub mod redis;
pub mod resp;
#[cfg(feature = "rocksdb")]
pub mod rocksdb;
pub mod server;
pub mod wire;

use crate::report::ResultLine;
use crate::Result;
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::time::Instant;
use timeline_engine::{Direction, Record, SeqId};
use timeline_im::{ConvId, ConvKind, SyncReply, UserId};

/// The load shape: how many sessions run at once (one thread each) and how
/// many operations each keeps in flight.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Sessions (threads for in-process targets, connections for network ones).
    pub sessions: usize,
    /// Operations kept in flight per session.
    pub window: usize,
    /// Queue more once at most `window - refill` are in flight.
    pub refill: usize,
}

/// One timeline operation. Timelines are W1's ids in the run's keyspace;
/// positions are seqs (1-based; `u64::MAX` = the newest, newest-first).
pub enum Op<'a> {
    Append(&'a [(u64, &'a [u8])]),
    Scan {
        id: u64,
        from: u64,
        len: usize,
        dir: Direction,
    },
}

/// The answer to an [`Op`].
pub enum Reply {
    /// One seq per item, in order; 0 where the target names positions only
    /// when read (Redis: its entry ids are mapped to positions then).
    Appended(Vec<SeqId>),
    /// The records read; `seq` is the record's position in its timeline.
    Page(Vec<Record>),
    /// The target refused or failed the operation: counted, the run goes on.
    Refused(String),
}

/// A pipelined session of a [`Target`].
pub trait Session: Send {
    fn queue(&mut self, op: Op<'_>) -> Result<()>;
    fn flush(&mut self) -> Result<()>;
    /// The reply to the oldest operation in flight. `Err` (I/O, a closed
    /// connection, an engine failure) ends the run.
    fn complete(&mut self) -> Result<Reply>;
}

/// A store of timelines (W1, W2).
pub trait Target: Sync {
    type Session<'a>: Session
    where
        Self: 'a;
    /// What a phase's costs are measured from.
    type Mark;

    fn shape(&self) -> Shape;
    fn session(&self) -> Result<Self::Session<'_>>;
    /// Untimed: the length (last seq) of timelines `0..n` of the run's keyspace.
    fn lengths(&self, n: u64) -> Result<Vec<SeqId>>;
    /// A result line with the fields every line of this target carries.
    fn line(&self, workload: &str) -> ResultLine;
    fn mark(&self) -> Result<Self::Mark>;
    /// After a write phase, what finishes it on this target (the engine's
    /// sync and `--seal`, RocksDB's flush and compactions): those costs
    /// belong to the phase. Fills `sync_secs` / `seal_secs`.
    fn settle(&self, line: &mut ResultLine) -> Result<()>;
    /// The target's own figures since `mark`: CPU, disk writes, memory,
    /// and for a write phase (one whose line has `payload_bytes` and
    /// `messages` set) bytes written, write amplification and fsyncs.
    fn measure(&self, mark: &Self::Mark, line: &mut ResultLine) -> Result<()>;
    /// Close or stop; fills `close_secs` and `files` of the last line.
    fn close(self, last: Option<&mut ResultLine>) -> Result<()>;
}

/// A conversation to create.
pub struct ConvSpec {
    pub id: ConvId,
    pub kind: ConvKind,
    pub members: Vec<UserId>,
}

/// One IM operation.
pub enum ImOp<'a> {
    Send {
        conv: ConvId,
        sender: UserId,
        msg_id: u64,
        payload: &'a [u8],
    },
    Sync {
        user: UserId,
        checkpoint: SeqId,
        limit: usize,
        groups: &'a [(ConvId, SeqId)],
    },
}

/// The answer to an [`ImOp`].
pub enum ImReply {
    Sent,
    Synced(SyncReply),
    Refused(String),
}

/// A pipelined session of an [`ImTarget`].
pub trait ImSession: Send {
    fn queue(&mut self, op: ImOp<'_>) -> Result<()>;
    fn flush(&mut self) -> Result<()>;
    fn complete(&mut self) -> Result<ImReply>;
}

/// A pushed message, as a subscriber sees it.
pub enum Pushed {
    Message(Vec<u8>),
    Resync,
    Other,
}

/// Push subscriptions of some users on one handle.
pub trait Subscriber: Send {
    /// The next push, or `None` after `timeout`.
    fn next(&mut self, timeout: std::time::Duration) -> Result<Option<Pushed>>;
}

/// An IM store (W3, W4): conversations, sends fanned out to the members'
/// sync timelines (or read from the conversation, in read-fan-out groups),
/// and syncs from a device's own checkpoints.
pub trait ImTarget: Sync {
    type Session<'a>: ImSession
    where
        Self: 'a;
    type Mark;

    fn shape(&self) -> Shape;
    /// Untimed: create the conversations (in a way the target does fast;
    /// groups above the hybrid threshold use read fan-out); the workload
    /// starts from what this leaves.
    fn create(&mut self, convs: &[ConvSpec]) -> Result<()>;
    fn session(&self) -> Result<Self::Session<'_>>;
    /// Untimed: the sync timeline ends of `users`: where their devices start.
    fn sync_ends(&self, users: &[UserId]) -> Result<Vec<SeqId>>;
    /// Push subscriptions of `users`, on one or more handles (each read by
    /// its own thread).
    fn subscribe(&self, users: &[UserId]) -> Result<Vec<Box<dyn Subscriber + '_>>>;
    fn line(&self, workload: &str) -> ResultLine;
    fn mark(&self) -> Result<Self::Mark>;
    /// The target's own figures since `mark`: the write counters (stored,
    /// sync writes, read-side counts where it has them), CPU, bytes, fsyncs,
    /// disk writes (after `messages` and `payload_bytes` are set).
    fn measure(&self, mark: &Self::Mark, line: &mut ResultLine) -> Result<()>;
    fn close(self, last: Option<&mut ResultLine>) -> Result<()>;
}

/// One session's side of a pipelined run: the workload queues its next
/// operation and checks each reply.
pub trait Pipelined {
    /// What checking a reply needs to know about its request.
    type Ctx;
    fn queue(&mut self) -> Result<Self::Ctx>;
    /// What a request's reply is.
    type Reply;
    fn flush(&mut self) -> Result<()>;
    /// Take the reply to the oldest request in flight (its latency ends here).
    fn complete(&mut self) -> Result<Self::Reply>;
    /// Check a reply (after its latency is recorded).
    fn check(&mut self, ctx: Self::Ctx, reply: Self::Reply) -> Result<()>;
}

/// Run `n` requests through `p`, keeping up to `shape.window` in flight:
/// queue until the window is full, flush, then take replies one by one;
/// once at most `window - refill` are in flight, queue up to the window
/// again and flush (refill 1: a sliding window, one more request per reply;
/// refill = window: batches, each waited for whole). Latency is per
/// request, from queueing to its reply being taken.
pub fn drive<P: Pipelined>(
    p: &mut P,
    n: u64,
    shape: &Shape,
    hist: &mut Histogram<u64>,
) -> Result<()> {
    let mut q: VecDeque<(Instant, P::Ctx)> = VecDeque::with_capacity(shape.window);
    let mut left = n;
    loop {
        if left > 0 && q.len() + shape.refill <= shape.window {
            while left > 0 && q.len() < shape.window {
                let t0 = Instant::now();
                let ctx = p.queue()?;
                q.push_back((t0, ctx));
                left -= 1;
            }
            p.flush()?;
        }
        let Some((t0, ctx)) = q.pop_front() else {
            return Ok(());
        };
        let r = p.complete()?;
        hist.saturating_record(t0.elapsed().as_nanos() as u64);
        p.check(ctx, r)?;
    }
}

/// [`drive`] paced at `per_sec` requests/s: request `k` is due at `start +
/// k / per_sec` and flushed at once; a session behind schedule sends at
/// once (bursts), one ahead takes every reply outstanding, then sleeps
/// (the load generator's pacing, not a serving path).
pub fn drive_paced<P: Pipelined>(
    p: &mut P,
    n: u64,
    shape: &Shape,
    per_sec: f64,
    hist: &mut Histogram<u64>,
) -> Result<()> {
    let start = Instant::now();
    let due = |k: u64| {
        std::time::Duration::from_secs_f64(k as f64 / per_sec).saturating_sub(start.elapsed())
    };
    let mut q: VecDeque<(Instant, P::Ctx)> = VecDeque::with_capacity(shape.window);
    let mut take = |q: &mut VecDeque<(Instant, P::Ctx)>, p: &mut P| -> Result<()> {
        if let Some((t0, ctx)) = q.pop_front() {
            let r = p.complete()?;
            hist.saturating_record(t0.elapsed().as_nanos() as u64);
            p.check(ctx, r)?;
        }
        Ok(())
    };
    for k in 0..n {
        if !due(k).is_zero() {
            while !q.is_empty() {
                take(&mut q, p)?;
            }
            std::thread::sleep(due(k));
        }
        if q.len() >= shape.window {
            take(&mut q, p)?;
        }
        let t0 = Instant::now();
        let ctx = p.queue()?;
        p.flush()?;
        q.push_back((t0, ctx));
    }
    while !q.is_empty() {
        take(&mut q, p)?;
    }
    Ok(())
}

/// Replies of a synchronous session, done in `queue`, handed back in order
/// (RocksDB's sessions; without the `rocksdb` feature, only tests use it).
#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
pub struct Done<R>(VecDeque<R>);

impl<R> Default for Done<R> {
    fn default() -> Self {
        Done(VecDeque::new())
    }
}

#[cfg_attr(not(feature = "rocksdb"), allow(dead_code))]
impl<R> Done<R> {
    pub fn push(&mut self, r: R) {
        self.0.push_back(r);
    }
    pub fn pop(&mut self) -> Result<R> {
        Ok(self
            .0
            .pop_front()
            .ok_or("complete() with nothing in flight")?)
    }
}

/// The fields every line shares, whatever the target: the workload's flags.
pub fn base_line(flags: &crate::Flags, workload: &str, target: &str) -> ResultLine {
    ResultLine {
        workload: workload.into(),
        target: target.into(),
        durability: crate::workloads::durability(flags).name().into(),
        threads: flags.threads,
        payload: flags.payload,
        keyspace: crate::workloads::ks_name(crate::workloads::keyspace(flags)).into(),
        seed: flags.seed,
        timelines: Some(flags.timelines),
        zipf: flags.zipf,
        ..Default::default()
    }
}

/// The shape of a network target (`--connections`, `--pipeline`, `--refill`),
/// on the line too.
pub fn net_shape(flags: &crate::Flags) -> Shape {
    let window = flags.pipeline.unwrap_or(net::DEFAULT_PIPELINE).max(1);
    Shape {
        sessions: flags.connections.unwrap_or(net::DEFAULT_CONNECTIONS).max(1),
        window,
        refill: flags.refill.unwrap_or(1).clamp(1, window),
    }
}

impl Shape {
    /// Put a network shape on a line.
    pub fn set(&self, l: &mut ResultLine) {
        l.threads = self.sessions;
        l.connections = Some(self.sessions);
        l.pipeline = Some(self.window);
        l.refill = Some(self.refill);
    }
}
