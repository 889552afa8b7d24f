//! `timeline_im`: the IM message layer on top of the timeline engine
//! (`timeline_engine`'s public API only): conversations and membership,
//! send = store then sync, write / read / hybrid fan-out through per-shard
//! workers connected by lock-free bounded mailboxes, checkpoint-based
//! multi-device sync with no device state on the server, roaming history,
//! read markers, recall and delete, and push subscriptions.
//!
//! ```no_run
//! use timeline_im::{ConvKind, Im, ImConfig};
//! use timeline_engine::Config;
//! let im = Im::open("/tmp/im", Config::default(), ImConfig::default())?;
//! im.create_conversation(1, ConvKind::Direct, &[10, 20])?;
//! let ack = im.send(1, 10, 777, b"hi")?;                // stored, then fanned out
//! let page = im.sync(20, 0, 100, &[])?;                  // any device, any checkpoint
//! assert_eq!(page.entries.last().unwrap().entry.conv_seq, ack.seq);
//! # Ok::<(), timeline_im::ImError>(())
//! ```
//!
//! Modules: `worker` (the write path: one worker per shard), `read` (sync,
//! history, lists), `recovery` (open: catalog replay, dedup rebuild,
//! interrupted fan-outs), `directory` (in-memory membership), `entry` (the
//! IM records' bytes), `subscribe` (push), `fanout/` (mailboxes, watermarks,
//! latch, completion window) on the `sync` facade that loom swaps in.
//! Layout and the reasoning behind it: `docs/design.md`, "IM layer".

mod admit;
mod directory;
pub mod entry;
mod error;
mod fanout;
mod pending;
mod read;
mod recovery;
mod subscribe;
mod sync;
mod types;
mod worker;

pub use admit::{NoWait, RoomWaker};
pub use entry::{ConvKind, EventKind};
pub use error::{ImError, Result};
pub use pending::Pending;
pub(crate) use pending::{pending, Reply};
pub use subscribe::{Push, PushSink, Subscription};

use crate::fanout::mailbox::{Mailbox, PushError, RoomWaiter, Signal};
use crate::fanout::watermark::CompletionWindow;
use admit::WhenFull;
use directory::Directory;
use parking_lot::Mutex;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use timeline_engine::{Config, Keyspace};
use timeline_engine::{Engine, SeqId, TimelineId};
use worker::{Delivery, Mark, MemberChange, Request, Worker};

pub type UserId = u64;
pub type ConvId = u64;

/// Conversation and user ids are below 2^63; the top half of the store
/// keyspace's ids belongs to the IM layer's own timelines.
pub const MAX_ID: u64 = (1 << 63) - 1;
const CATALOG_BASE: u64 = 1 << 63;
const JOURNAL_BASE: u64 = (1 << 63) | (1 << 62);

pub use types::*;

pub(crate) struct WorkerLink {
    pub requests: Mailbox<Request>,
    pub deliveries: Mailbox<Delivery>,
    pub signal: crate::sync::Arc<Signal>,
    pub window: CompletionWindow,
}

pub(crate) struct Shared {
    pub engine: std::sync::Arc<Engine>,
    pub cfg: ImConfig,
    pub dir: Directory,
    pub shards: usize,
    pub workers: Vec<WorkerLink>,
    pub journal: Vec<u64>,
    pub catalog: Vec<u64>,
    pub subs: subscribe::Subscribers,
    pub stats: Counters,
    pub recalls: AtomicUsize,
    /// Workers that still own unfinished batches (shutdown).
    pub busy_workers: AtomicUsize,
    /// Workers whose last sync write failed and who are retrying it.
    pub stalled: AtomicUsize,
    /// The error of the latest such failure (what queued requests are
    /// answered with while a stall lasts).
    pub last_stall: Mutex<Option<ImError>>,
    pub closing: AtomicBool,
}

impl Shared {
    pub(crate) fn conv_shard(&self, conv: ConvId) -> usize {
        self.engine.shard_index(TimelineId::store(conv))
    }
    pub(crate) fn user_shard(&self, user: UserId) -> usize {
        self.engine.shard_index(TimelineId::sync(user))
    }
    pub(crate) fn now_ms(&self) -> u64 {
        self.engine.config().clock.now_ms()
    }
}

/// The IM layer. Cheap to share (`Arc<Im>`); every method may be called
/// from many threads at once.
pub struct Im {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Im {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Im({:?})", self.shared.engine)
    }
}

/// The id, in `base`'s range, of the first timeline that lands on `shard`.
fn id_on_shard(engine: &Engine, base: u64, shard: usize) -> u64 {
    (0..)
        .map(|k| base + k)
        .find(|&id| engine.shard_index(TimelineId::store(id)) == shard)
        .unwrap_or(base)
}

/// The IM layer's own timelines in `engine` (one catalog and one journal per
/// shard, in the store keyspace): for tools and fuzzers that damage them.
pub fn reserved_timelines(engine: &Engine) -> Vec<TimelineId> {
    (0..engine.shard_count())
        .flat_map(|p| {
            [
                TimelineId::store(id_on_shard(engine, CATALOG_BASE, p)),
                TimelineId::store(id_on_shard(engine, JOURNAL_BASE, p)),
            ]
        })
        .collect()
}

fn check_id(what: &str, id: u64) -> Result<()> {
    if id > MAX_ID {
        return Err(ImError::InvalidArgument(format!(
            "{what} id {id} is above {MAX_ID} (the top half is reserved)"
        )));
    }
    Ok(())
}

impl Im {
    /// Open the engine in `dir` and the IM layer on it: replay the catalogs,
    /// complete any fan-out a crash interrupted, start one worker per shard.
    pub fn open(dir: impl AsRef<Path>, engine_cfg: Config, cfg: ImConfig) -> Result<Im> {
        if cfg.queue_capacity == 0 || cfg.max_batch == 0 || cfg.subscriber_capacity == 0 {
            return Err(ImError::InvalidArgument(
                "queue_capacity, max_batch and subscriber_capacity must be positive".into(),
            ));
        }
        for (ks, what) in [(Keyspace::STORE, "store"), (Keyspace::SYNC, "sync")] {
            if engine_cfg.find(ks).is_none() {
                return Err(ImError::InvalidArgument(format!(
                    "the IM layer needs the {what} keyspace ({ks}) in the engine configuration"
                )));
            }
        }
        let engine = std::sync::Arc::new(Engine::open(dir, engine_cfg)?);
        let shards = engine.shard_count();
        let journal = (0..shards)
            .map(|p| id_on_shard(&engine, JOURNAL_BASE, p))
            .collect();
        let catalog = (0..shards)
            .map(|p| id_on_shard(&engine, CATALOG_BASE, p))
            .collect();
        let mut shared = Shared {
            engine,
            dir: Directory::new(shards),
            shards,
            workers: Vec::new(),
            journal,
            catalog,
            subs: subscribe::Subscribers::new(shards, cfg.subscriber_capacity),
            stats: Counters::default(),
            recalls: AtomicUsize::new(0),
            busy_workers: AtomicUsize::new(shards),
            stalled: AtomicUsize::new(0),
            last_stall: Mutex::new(None),
            closing: AtomicBool::new(false),
            cfg,
        };
        let states = recovery::recover(&shared)?;
        shared.workers = states
            .iter()
            .map(|st| {
                let signal = crate::sync::Arc::new(Signal::default());
                WorkerLink {
                    requests: Mailbox::new(shared.cfg.queue_capacity, signal.clone()),
                    deliveries: Mailbox::new(shared.cfg.queue_capacity, signal.clone()),
                    signal,
                    window: CompletionWindow::new(st.next_batch - 1),
                }
            })
            .collect();
        let shared = Arc::new(shared);
        let mut threads = Vec::with_capacity(shards);
        for (p, st) in states.into_iter().enumerate() {
            let sh = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("im-worker-{p}"))
                .spawn(move || Worker::new(sh, p, st).run())
                .map_err(|e| timeline_engine::Error::io("im-worker", e))?;
            threads.push(h);
        }
        Ok(Im {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// The engine underneath (raw timeline access, stats, maintenance).
    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// A shared handle on the engine, for a layer beside this one that
    /// writes its own keyspaces (the cluster's Raft logs).
    pub fn engine_handle(&self) -> std::sync::Arc<Engine> {
        self.shared.engine.clone()
    }

    pub fn config(&self) -> &ImConfig {
        &self.shared.cfg
    }

    /// The largest body a store record can carry: the engine's payload
    /// limit less the record header and room for its sync copy's header.
    fn max_body(&self) -> usize {
        self.shared.engine.config().max_payload - entry::STORE_HEADER - 64
    }

    fn to_conv_worker(&self, conv: ConvId, r: Request, when: WhenFull<'_>) -> Result<()> {
        let p = self.shared.conv_shard(conv);
        self.submit(p, r, when)
    }

    /// Queue `r` for worker `p`; a full mailbox waits, or refuses with
    /// [`ImError::Busy`] after registering the caller's waker (then retries
    /// once: room made before the registration is not missed).
    fn submit(&self, p: usize, r: Request, when: WhenFull<'_>) -> Result<()> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(ImError::Closed);
        }
        let mb = &self.shared.workers[p].requests;
        let waker = match when {
            WhenFull::Wait => return mb.push(r).map_err(|_| ImError::Closed),
            WhenFull::Notify(w) => w,
        };
        let r = match mb.try_push(r) {
            Ok(()) => return Ok(()),
            Err(PushError::Closed(_)) => return Err(ImError::Closed),
            Err(PushError::Full(r)) => r,
        };
        mb.notify_on_room(RoomWaiter::Call(waker.clone()));
        match mb.try_push(r) {
            Ok(()) => Ok(()),
            Err(PushError::Closed(_)) => Err(ImError::Closed),
            Err(PushError::Full(_)) => Err(ImError::Busy),
        }
    }

    /// The `*_async` calls in a form that never blocks the calling thread:
    /// where the worker is full they fail with [`ImError::Busy`] and
    /// `waker` runs once there is room (retry then). For event loops.
    pub fn no_wait<'a>(&'a self, waker: &'a RoomWaker) -> NoWait<'a> {
        NoWait::new(self, waker)
    }

    /// Create a conversation with its first members (a direct one has
    /// exactly two). Returns the seq of its `Created` event (1). Members
    /// beyond what one record holds (`max_payload / 8`) are added right after
    /// as `MemberAdded` events.
    pub fn create_conversation(
        &self,
        conv: ConvId,
        kind: ConvKind,
        members: &[UserId],
    ) -> Result<SeqId> {
        check_id("conversation", conv)?;
        for &m in members {
            check_id("user", m)?;
        }
        let mut ms = members.to_vec();
        ms.sort_unstable();
        ms.dedup();
        if kind == ConvKind::Direct && ms.len() != 2 {
            return Err(ImError::InvalidArgument(
                "a direct conversation has exactly two members".into(),
            ));
        }
        if ms.is_empty() {
            return Err(ImError::InvalidArgument(
                "a conversation needs members".into(),
            ));
        }
        // The `Created` record lists the first members; a list longer than
        // one record holds goes on as `MemberAdded` events (each durable on
        // its own: a crash part way leaves a group with the first members).
        let fit = self.max_body() / 8;
        let rest = if ms.len() > fit.max(2) {
            ms.split_off(fit.max(2))
        } else {
            Vec::new()
        };
        let (tx, rx) = pending();
        self.to_conv_worker(
            conv,
            Request::Create {
                conv,
                kind,
                members: ms,
                reply: tx,
            },
            WhenFull::Wait,
        )?;
        // A pending fan-out (FanoutFailed) means stored: the rest of the
        // members still go in, and the caller learns it at the end.
        let mut pending_fanout = None;
        let mut stored = |r: Result<SeqId>| match r {
            Err(e @ ImError::FanoutFailed { .. }) => {
                pending_fanout.get_or_insert(e);
                Ok(())
            }
            r => r.map(drop),
        };
        let first = rx.wait();
        let seq = match &first {
            Ok(s) | Err(ImError::FanoutFailed { seq: s, .. }) => *s,
            Err(_) => return first,
        };
        stored(first)?;
        for u in rest {
            stored(self.add_member(conv, u))?;
        }
        match pending_fanout {
            Some(e) => Err(e),
            None => Ok(seq),
        }
    }

    /// Add `user` to a group; returns the seq of the `MemberAdded` event (the
    /// first seq the user receives).
    pub fn add_member(&self, conv: ConvId, user: UserId) -> Result<SeqId> {
        self.add_member_async(conv, user)?.wait()
    }

    /// Remove `user` from a group; returns the seq of the `MemberRemoved`
    /// event (the last seq the user receives).
    pub fn remove_member(&self, conv: ConvId, user: UserId) -> Result<SeqId> {
        self.remove_member_async(conv, user)?.wait()
    }

    /// [`add_member`](Self::add_member) without waiting.
    pub fn add_member_async(&self, conv: ConvId, user: UserId) -> Result<Pending<SeqId>> {
        self.member_op(conv, user, MemberChange::Add, WhenFull::Wait)
    }

    /// [`remove_member`](Self::remove_member) without waiting.
    pub fn remove_member_async(&self, conv: ConvId, user: UserId) -> Result<Pending<SeqId>> {
        self.member_op(conv, user, MemberChange::Remove, WhenFull::Wait)
    }

    fn member_op(
        &self,
        conv: ConvId,
        user: UserId,
        change: MemberChange,
        when: WhenFull<'_>,
    ) -> Result<Pending<SeqId>> {
        check_id("user", user)?;
        let (tx, rx) = pending();
        self.to_conv_worker(
            conv,
            Request::Member {
                conv,
                user,
                change,
                reply: tx,
            },
            when,
        )?;
        Ok(rx)
    }

    /// Send a message: stored in the conversation's timeline (durable per
    /// `ImConfig::durability`), then one entry in every member's sync
    /// timeline (write fan-out) or none (read fan-out), then pushed. Returns
    /// once all of that is done. A retry with the same `client_msg_id` returns
    /// the original seq and writes nothing.
    pub fn send(
        &self,
        conv: ConvId,
        sender: UserId,
        client_msg_id: u64,
        payload: &[u8],
    ) -> Result<SendAck> {
        self.send_async(conv, sender, client_msg_id, payload)?
            .wait()
    }

    /// [`send`](Self::send) without waiting: keep many in flight from one
    /// thread. Blocks only while the conversation's worker is full
    /// (backpressure).
    pub fn send_async(
        &self,
        conv: ConvId,
        sender: UserId,
        client_msg_id: u64,
        payload: &[u8],
    ) -> Result<Pending<SendAck>> {
        self.send_with(conv, sender, client_msg_id, payload, WhenFull::Wait)
    }

    fn send_with(
        &self,
        conv: ConvId,
        sender: UserId,
        client_msg_id: u64,
        payload: &[u8],
        when: WhenFull<'_>,
    ) -> Result<Pending<SendAck>> {
        let max = self.max_body();
        if payload.len() > max {
            return Err(ImError::InvalidArgument(format!(
                "payload of {} bytes exceeds the limit of {max}",
                payload.len()
            )));
        }
        let (tx, rx) = pending();
        self.to_conv_worker(
            conv,
            Request::Send {
                conv,
                sender,
                cmid: client_msg_id,
                payload: payload.to_vec(),
                reply: tx,
            },
            when,
        )?;
        Ok(rx)
    }

    /// Recall `user`'s message `target` for everyone: an appended event,
    /// fanned out like a message; history and sync report the message as
    /// recalled from then on.
    pub fn recall(&self, conv: ConvId, user: UserId, target: SeqId) -> Result<SeqId> {
        self.recall_async(conv, user, target)?.wait()
    }

    /// [`recall`](Self::recall) without waiting.
    pub fn recall_async(
        &self,
        conv: ConvId,
        user: UserId,
        target: SeqId,
    ) -> Result<Pending<SeqId>> {
        self.recall_with(conv, user, target, WhenFull::Wait)
    }

    fn recall_with(
        &self,
        conv: ConvId,
        user: UserId,
        target: SeqId,
        when: WhenFull<'_>,
    ) -> Result<Pending<SeqId>> {
        let (tx, rx) = pending();
        self.to_conv_worker(
            conv,
            Request::Recall {
                conv,
                user,
                target,
                reply: tx,
            },
            when,
        )?;
        Ok(rx)
    }

    /// Mark `conv` read through `seq` for `user`: a sync entry, so the
    /// user's other devices learn it by syncing. Returns the marker (never
    /// lowered, never above the conversation's last seq).
    pub fn mark_read(&self, user: UserId, conv: ConvId, seq: SeqId) -> Result<SeqId> {
        self.mark_read_async(user, conv, seq)?.wait()
    }

    /// [`mark_read`](Self::mark_read) without waiting.
    pub fn mark_read_async(
        &self,
        user: UserId,
        conv: ConvId,
        seq: SeqId,
    ) -> Result<Pending<SeqId>> {
        self.user_mark(user, conv, seq, Mark::Read, WhenFull::Wait)
    }

    /// Delete message `seq` of `conv` for `user` only (its devices learn it
    /// by syncing; history shows it as deleted to this user). Returns the
    /// seq of the `DeletedMarker` entry in the user's sync timeline.
    pub fn delete_for_user(&self, user: UserId, conv: ConvId, seq: SeqId) -> Result<SeqId> {
        self.delete_for_user_async(user, conv, seq)?.wait()
    }

    /// [`delete_for_user`](Self::delete_for_user) without waiting.
    pub fn delete_for_user_async(
        &self,
        user: UserId,
        conv: ConvId,
        seq: SeqId,
    ) -> Result<Pending<SeqId>> {
        self.user_mark(user, conv, seq, Mark::Delete, WhenFull::Wait)
    }

    /// Read markers and deletes-for-me go to the user's worker (it owns the
    /// user's sync timeline).
    fn user_mark(
        &self,
        user: UserId,
        conv: ConvId,
        seq: SeqId,
        mark: Mark,
        when: WhenFull<'_>,
    ) -> Result<Pending<SeqId>> {
        check_id("user", user)?;
        let (tx, rx) = pending();
        self.submit(
            self.shared.user_shard(user),
            Request::UserMark {
                user,
                conv,
                seq,
                mark,
                reply: tx,
            },
            when,
        )?;
        Ok(rx)
    }

    /// Entries of `user`'s sync timeline after `checkpoint` (at most
    /// `limit`), and the new entries of its read-fan-out groups after the
    /// per-group checkpoints the device sent (a group the device does not
    /// list starts where the user's read-fan-out range in it starts).
    pub fn sync(
        &self,
        user: UserId,
        checkpoint: SeqId,
        limit: usize,
        group_checkpoints: &[(ConvId, SeqId)],
    ) -> Result<SyncReply> {
        check_id("user", user)?;
        read::sync(&self.shared, user, checkpoint, limit, group_checkpoints)
    }

    /// A page of `conv`'s history as `user` may see it (its membership
    /// ranges only).
    pub fn history(
        &self,
        conv: ConvId,
        user: UserId,
        from: HistoryFrom,
        limit: usize,
    ) -> Result<HistoryPage> {
        check_id("conversation", conv)?;
        check_id("user", user)?;
        read::history(&self.shared, conv, user, from, limit)
    }

    /// `user`'s conversations with their last seq and unread count.
    pub fn conversations(&self, user: UserId) -> Result<Vec<ConvSummary>> {
        check_id("user", user)?;
        read::conversations(&self.shared, user)
    }

    /// Members of `conv` now.
    pub fn members(&self, conv: ConvId) -> Result<Vec<UserId>> {
        read::members(&self.shared, conv)
    }

    /// Does the IM layer own timeline `t`, so that a raw write into it
    /// would corrupt what the layer reads back? It owns the whole sync
    /// keyspace (every user's sync timeline), the top half of the store
    /// keyspace (catalog, journal) and the store timeline of every existing
    /// conversation. (A conversation cannot be created on a store timeline
    /// that already holds raw records.)
    pub fn owns(&self, t: TimelineId) -> bool {
        match t.keyspace {
            Keyspace::SYNC => true,
            Keyspace::STORE => {
                t.id > MAX_ID
                    || self.shared.dir.convs[self.shared.conv_shard(t.id)]
                        .read()
                        .contains_key(&t.id)
            }
            _ => false,
        }
    }

    /// Push delivery for `user`'s online devices: every new sync entry and
    /// read-fan-out group entry, once durable. Never blocks senders: when
    /// the subscriber falls `subscriber_capacity` behind it gets
    /// [`Push::Resync`] and should sync from its checkpoint.
    pub fn subscribe(&self, user: UserId) -> Subscription {
        self.shared
            .subs
            .subscribe(user, self.shared.user_shard(user))
    }

    /// Offer `make()` to each of `user`'s subscribers, as the IM layer does
    /// for the entries it writes (for entries written by someone else: a
    /// cluster node's replicated sync timelines). `make` runs only for a
    /// subscribed user, once per subscriber. Never blocks. Whether the
    /// user has a subscriber here.
    pub fn push_to(&self, user: UserId, make: impl Fn() -> Push) -> bool {
        self.shared.subs.any()
            && self
                .shared
                .subs
                .push(self.shared.user_shard(user), user, make)
    }

    /// Whether `user` has a subscriber here now.
    pub fn has_subscriber(&self, user: UserId) -> bool {
        self.shared.subs.any() && self.shared.subs.has(self.shared.user_shard(user), user)
    }

    /// The users with a subscriber here (a cluster node telling the
    /// devices of a partition it gave up to sync elsewhere).
    pub fn subscribed_users(&self) -> Vec<UserId> {
        if !self.shared.subs.any() {
            return Vec::new();
        }
        self.shared.subs.users()
    }

    /// Push delivery into a sink of the caller's (an event loop's queue):
    /// every new durable sync entry and read-fan-out group entry of `user`
    /// is offered to `sink` on the worker's thread, until `sink.push`
    /// returns false. A sink without room drops pushes and owes its
    /// device one [`Push::Resync`] (the sink's to send).
    pub fn subscribe_sink(&self, user: UserId, sink: Arc<dyn PushSink>) {
        self.shared
            .subs
            .register(user, self.shared.user_shard(user), sink)
    }

    /// Forget `user`'s sinks that are closed (call after closing one): a
    /// user subscribed once and never pushed to holds nothing after.
    pub fn release_sinks(&self, user: UserId) {
        self.shared.subs.release(self.shared.user_shard(user), user)
    }

    pub fn stats(&self) -> ImStats {
        let c = &self.shared.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ImStats {
            stored: g(&c.stored),
            messages: g(&c.messages),
            sync_writes: g(&c.sync_writes),
            read_fanout_deliveries: g(&c.read_fanout_deliveries),
            sync_calls: g(&c.sync_calls),
            sync_reads: g(&c.sync_reads),
            store_reads: g(&c.store_reads),
            group_polls: g(&c.group_polls),
            meta_writes: g(&c.meta_writes),
        }
    }

    /// Finish every accepted request, stop the workers, close the engine.
    pub fn close(self) -> Result<()> {
        self.shutdown();
        self.shared.engine.sync()?;
        Ok(())
    }

    fn shutdown(&self) {
        if self.shared.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        for w in &self.shared.workers {
            w.requests.close();
        }
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Im {
    fn drop(&mut self) {
        self.shutdown();
    }
}
