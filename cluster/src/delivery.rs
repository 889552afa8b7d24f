//! The conversation partition leader's deliverer: the outbox, in order, to
//! the members' partitions (module [`crate::im`] has the records and the
//! reasoning; docs/scaling.md, "IM across partitions").
//!
//! One task per partition this node leads, started by a `SEND` and by the
//! placement round (every second: a new leader re-drives what its
//! predecessor left undelivered). A round reads up to [`ROUND`] outbox
//! records after the done mark, sends each target partition its
//! deliveries (to its leader: this node, or a peer over the peer
//! connection), retrying each until it is applied, then answers the
//! `SEND`s waiting on those messages and proposes `Delivered` (the done
//! mark). The mark's Raft round overlaps the next rounds' deliveries: the
//! deliverer keeps its own cursor past the mark, one mark is in flight at
//! a time and covers every round delivered before it was proposed. A mark
//! lost with the leadership only makes the next leader deliver those
//! messages again, which their partitions skip (deliveries are
//! idempotent).

use crate::coalesce::Queues;
use crate::im::read::{self, Pending};
use crate::im::{Delivery, KIND_CREATED, KIND_MEMBER_ADDED, KIND_MEMBER_REMOVED};
use crate::members::Members;
use crate::node::{ClusterError, Inner};
use crate::partition::{partition_of, PartitionId};
use crate::{Command, NodeId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::Keyspace;
use tokio::sync::oneshot;

/// Outbox records per round.
const ROUND: usize = 256;
/// Deliveries per `Deliver` entry.
const CHUNK: usize = 4096;
/// How long a `SEND` waits for its deliveries before `FANOUT_FAILED`
/// (delivery goes on).
pub const FANOUT_WAIT: Duration = Duration::from_secs(2);

type Waiter = Box<dyn FnOnce(bool) + Send>;
/// A partition's waiting `SEND`s by (message write id, waiter id).
type Waiting = BTreeMap<(u64, u64), Waiter>;

#[derive(Default)]
struct Run {
    running: bool,
    dirty: bool,
}

/// A node's deliverers and the `SEND`s waiting on them.
pub(crate) struct Deliveries {
    runs: Mutex<HashMap<PartitionId, Run>>,
    /// Per partition: (message write id, waiter id) → who to tell; and
    /// the write id up to which its messages are known delivered (applied
    /// in every member's partition: true whoever leads now).
    waiters: Mutex<HashMap<PartitionId, (Waiting, u64)>>,
    next: AtomicU64,
    /// The leader last seen for a partition this node does not lead.
    hints: Mutex<HashMap<PartitionId, NodeId>>,
    /// Per member partition this node leads, the deliveries waiting for
    /// its next `Deliver` entry, from every deliverer of this node and
    /// every peer's: while one `Deliver` entry is in flight the next ones
    /// gather and go as one entry (one Raft round for many conversation
    /// partitions' rounds, as `APPEND`s share entries). Each deliverer's
    /// own batches stay in order: it waits for one before it sends the
    /// next.
    queues: Queues<(Vec<Delivery>, Applied)>,
}

impl Deliveries {
    pub(crate) fn new(partitions: u32) -> Deliveries {
        Deliveries {
            runs: Default::default(),
            waiters: Default::default(),
            next: Default::default(),
            hints: Default::default(),
            queues: Queues::new(partitions),
        }
    }
}

/// Who to tell that a queued batch was applied (or why not).
type Applied = oneshot::Sender<Result<(), ClusterError>>;

/// Start `p`'s deliverer, or have the running one look again.
pub(crate) fn kick(inner: &Arc<Inner>, p: PartitionId) {
    let mut runs = inner.deliveries.runs.lock();
    let r = runs.entry(p).or_default();
    if r.running {
        r.dirty = true;
        return;
    }
    r.running = true;
    let inner = inner.clone();
    tokio::spawn(async move { run(inner, p).await });
}

/// Call `done(true)` once the message with write id `wid` of partition
/// `p` is delivered, or `done(false)` after `timeout`.
pub(crate) fn wait(
    inner: &Arc<Inner>,
    p: PartitionId,
    wid: u64,
    timeout: Duration,
    done: impl FnOnce(bool) + Send + 'static,
) {
    let key = (wid, inner.deliveries.next.fetch_add(1, Ordering::Relaxed));
    let known = {
        let mut all = inner.deliveries.waiters.lock();
        let (m, delivered) = all.entry(p).or_default();
        m.insert(key, Box::new(done));
        *delivered
    };
    // Delivered already (before the waiter was in place)?
    if known >= wid || read::done(inner.engine(), p).is_ok_and(|(_, w)| w >= wid) {
        wake(inner, p, wid);
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        let w = inner
            .deliveries
            .waiters
            .lock()
            .get_mut(&p)
            .and_then(|(m, _)| m.remove(&key));
        if let Some(w) = w {
            w(false);
        }
    });
}

/// `p`'s messages up to write id `wid` are delivered: tell everyone
/// waiting on them.
fn wake(inner: &Inner, p: PartitionId, wid: u64) {
    let ready: Vec<Waiter> = {
        let mut all = inner.deliveries.waiters.lock();
        let (m, delivered) = all.entry(p).or_default();
        *delivered = (*delivered).max(wid);
        let rest = m.split_off(&(wid + 1, 0));
        std::mem::replace(m, rest).into_values().collect()
    };
    for w in ready {
        w(true);
    }
}

type Mark = tokio::task::JoinHandle<Result<(), ClusterError>>;

/// Wait for a proposed done mark.
async fn settle(mark: Option<Mark>) -> Result<(), ClusterError> {
    match mark {
        None => Ok(()),
        Some(h) => h.await.map_err(|e| ClusterError::Raft(e.to_string()))?,
    }
}

/// A deliverer's done marks: at most one proposal in flight; the rounds
/// delivered meanwhile are covered by the next one, so a busy partition
/// writes one mark per Raft round, not one per delivery round.
#[derive(Default)]
struct Marks {
    /// The last record of the newest round delivered and not yet covered
    /// by a proposed mark.
    owed: Option<Pending>,
    flight: Option<Mark>,
}

impl Marks {
    /// The round ending at `last` is delivered: propose its mark, unless
    /// one is in flight (then the next proposal covers it).
    async fn delivered(
        &mut self,
        inner: &Arc<Inner>,
        p: PartitionId,
        last: Pending,
    ) -> Result<(), ClusterError> {
        self.owed = Some(last);
        if self.flight.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        settle(self.flight.take()).await?;
        self.propose(inner, p);
        Ok(())
    }

    fn propose(&mut self, inner: &Arc<Inner>, p: PartitionId) {
        let Some(last) = self.owed.take() else { return };
        let i = inner.clone();
        self.flight = Some(tokio::spawn(async move {
            i.submit(
                p,
                Command::Delivered {
                    upto: last.seq,
                    wid: last.write_id,
                },
            )
            .await
            .map(|_| ())
        }));
    }

    /// Everything delivered is marked and committed (the run ends).
    async fn finish(&mut self, inner: &Arc<Inner>, p: PartitionId) -> Result<(), ClusterError> {
        settle(self.flight.take()).await?;
        self.propose(inner, p);
        settle(self.flight.take()).await
    }

    /// Forget what is owed (the run starts again from the done mark).
    async fn reset(&mut self) {
        self.owed = None;
        let _ = settle(self.flight.take()).await;
    }
}

async fn run(inner: Arc<Inner>, p: PartitionId) {
    let mut pause = Duration::from_millis(20);
    // The outbox seq delivered through in this run (the done mark may
    // lag behind it), and the marks.
    let mut sent: Option<u64> = None;
    let mut marks = Marks::default();
    loop {
        let r = match round(&inner, p, sent).await {
            Ok(Some(last)) => {
                wake(&inner, p, last.write_id);
                sent = Some(last.seq);
                marks.delivered(&inner, p, last).await.map(|_| true)
            }
            // Nothing left: the last mark committed before the run ends.
            Ok(None) => marks.finish(&inner, p).await.map(|_| false),
            Err(e) => Err(e),
        };
        let more = match r {
            Ok(more) => {
                pause = Duration::from_millis(20);
                more
            }
            Err(e) if inner.leads(p) => {
                match e {
                    ClusterError::Storage { .. } => {
                        tracing::warn!(partition = p, error = %e, "delivery round failed; retrying")
                    }
                    _ => {
                        tracing::debug!(partition = p, error = %e, "delivery round failed; retrying")
                    }
                }
                // Start again from the done mark.
                sent = None;
                marks.reset().await;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
                true
            }
            Err(_) => false, // no longer the leader: the new one re-drives
        };
        if more && inner.leads(p) {
            continue;
        }
        let mut runs = inner.deliveries.runs.lock();
        let r = runs.entry(p).or_default();
        if r.dirty && inner.leads(p) {
            r.dirty = false;
            continue;
        }
        r.running = false;
        r.dirty = false;
        return;
    }
}

/// One round over the outbox after the done mark and after `sent`: the
/// last record delivered, or `None` if there was nothing to deliver.
async fn round(
    inner: &Arc<Inner>,
    p: PartitionId,
    sent: Option<u64>,
) -> Result<Option<Pending>, ClusterError> {
    if !inner.leads(p) {
        return Err(ClusterError::NoLeader { partition: p });
    }
    let e = inner.engine();
    let damaged = |m: String| ClusterError::Storage {
        partition: p,
        message: m,
    };
    let (done, _) = read::done(e, p).map_err(|x| damaged(x.to_string()))?;
    let after = done.max(sent.unwrap_or(0));
    let pending = read::outbox_after(e, p, after, ROUND).map_err(|x| damaged(x.to_string()))?;
    let Some(last) = pending.last().copied() else {
        return Ok(None);
    };
    let targets = deliveries(inner, &pending).map_err(|x| damaged(x.to_string()))?;
    let started = std::time::Instant::now();
    let (n, fanout) = (pending.len(), targets.len());
    let mut set = tokio::task::JoinSet::new();
    for (t, items) in targets {
        let inner = inner.clone();
        set.spawn(async move {
            let t0 = std::time::Instant::now();
            let r = deliver_to(&inner, p, t, items).await;
            tracing::trace!(
                partition = p,
                target = t,
                us = t0.elapsed().as_micros() as u64,
                "delivered to a partition"
            );
            r
        });
    }
    while let Some(r) = set.join_next().await {
        r.map_err(|e| ClusterError::Raft(e.to_string()))??;
    }
    tracing::debug!(
        partition = p,
        messages = n,
        targets = fanout,
        us = started.elapsed().as_micros() as u64,
        "delivery round"
    );
    Ok(Some(last))
}

/// The members' sync entries of `pending`, by the members' partitions, in
/// outbox order: each event goes to the members at its seq (module
/// [`crate::members`]); a read-fan-out group's membership event only to
/// the user it names (the others read it in the group's pages). A
/// membership event tells the kind after it (read fan-out after a
/// switch).
fn deliveries(
    inner: &Inner,
    pending: &[Pending],
) -> Result<BTreeMap<PartitionId, Vec<Delivery>>, read::ReadError> {
    let e = inner.engine();
    let parts = inner.map.read().len();
    let mut members: HashMap<u64, Arc<Members>> = HashMap::new();
    let mut out: BTreeMap<PartitionId, Vec<Delivery>> = BTreeMap::new();
    for x in pending {
        let Some((_, ev)) = read::event(e, x.conv, x.conv_seq)? else {
            return Err(read::ReadError::Damaged(format!(
                "outbox names conversation {} seq {}, which is not there",
                x.conv, x.conv_seq
            )));
        };
        if let std::collections::hash_map::Entry::Vacant(v) = members.entry(x.conv) {
            // An outbox record stands for an applied entry of an existing
            // conversation: no members here is a read to retry (the round
            // fails and starts again), never a delivery to drop.
            let m = inner.conv_members.get(e, x.conv)?.map_err(|r| {
                read::ReadError::Damaged(format!(
                    "outbox names conversation {} seq {}, whose members do not read: {r}",
                    x.conv, x.conv_seq
                ))
            })?;
            v.insert(m);
        }
        let m = &members[&x.conv];
        let (kind, body) = match ev.kind {
            KIND_CREATED => (
                KIND_CREATED,
                ev.body.first().map(|k| vec![*k]).unwrap_or_default(),
            ),
            // The user it names, then the conversation's kind.
            KIND_MEMBER_ADDED | KIND_MEMBER_REMOVED => {
                let mut b = ev.body.clone();
                b.push(m.kind_after(x.conv_seq));
                (ev.kind, b)
            }
            // A message, or a recall (its body the recalled seq).
            k => (k, ev.body),
        };
        for user in m.deliver_to(x.conv_seq) {
            out.entry(partition_of(Keyspace::SYNC.0, user, parts))
                .or_default()
                .push(Delivery {
                    user,
                    conv: x.conv,
                    conv_seq: x.conv_seq,
                    sender: ev.sender,
                    ts: ev.ts,
                    kind,
                    body: body.clone(),
                });
        }
    }
    Ok(out)
}

/// Get `items` applied by partition `t`, retrying until they are or this
/// node stops leading `from`.
async fn deliver_to(
    inner: &Arc<Inner>,
    from: PartitionId,
    t: PartitionId,
    items: Vec<Delivery>,
) -> Result<(), ClusterError> {
    for chunk in chunks(
        items,
        crate::entry_budget(inner.engine().config().max_payload),
    ) {
        let mut pause = Duration::from_millis(10);
        loop {
            if !inner.leads(from) {
                return Err(ClusterError::NoLeader { partition: from });
            }
            match deliver_once(inner, t, chunk.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::debug!(partition = t, error = %e, "delivery refused; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
    Ok(())
}

/// `items` cut into entries of at most [`CHUNK`] deliveries and `budget`
/// bytes (at least one each: a message alone always fits), in order.
fn chunks(items: Vec<Delivery>, budget: usize) -> Vec<Vec<Delivery>> {
    let mut out: Vec<Vec<Delivery>> = Vec::new();
    let mut used = 0;
    for d in items {
        let cost = d.body.len() + crate::ITEM_OVERHEAD;
        match out.last_mut() {
            Some(c) if c.len() < CHUNK && used + cost <= budget => {
                used += cost;
                c.push(d);
            }
            _ => {
                used = cost;
                out.push(vec![d]);
            }
        }
    }
    out
}

/// One attempt: propose here if this node leads `t`, else ask its leader.
async fn deliver_once(
    inner: &Arc<Inner>,
    t: PartitionId,
    items: Vec<Delivery>,
) -> Result<(), ClusterError> {
    if inner.leads(t) {
        return propose(inner, t, items).await;
    }
    let hint = inner.deliveries.hints.lock().get(&t).copied();
    let Some(node) = hint.or_else(|| inner.leader_hint(t)) else {
        return Err(ClusterError::NoLeader { partition: t });
    };
    let body = bincode::serialize(&items).map_err(|e| ClusterError::Raft(e.to_string()))?;
    let reply = inner.transport().deliver(node, t, body).await;
    let answer: Result<(), Option<NodeId>> = reply
        .and_then(|b| bincode::deserialize(&b).map_err(|e| e.to_string()))
        .map_err(ClusterError::Raft)?;
    match answer {
        Ok(()) => Ok(()),
        Err(leader) => {
            let mut h = inner.deliveries.hints.lock();
            match leader.filter(|&l| l != node) {
                Some(l) => h.insert(t, l),
                None => h.remove(&t),
            };
            Err(ClusterError::NoLeader { partition: t })
        }
    }
}

/// A peer's deliveries for partition `t` (the peer RPC's handler): applied
/// if this node leads `t`; otherwise the leader it knows of.
pub(crate) async fn serve(inner: Arc<Inner>, t: PartitionId, body: Vec<u8>) -> Vec<u8> {
    let answer: Result<(), Option<NodeId>> = match bincode::deserialize::<Vec<Delivery>>(&body) {
        Err(_) => Err(None),
        Ok(items) if inner.leads(t) => match propose(&inner, t, items).await {
            Ok(()) => Ok(()),
            Err(_) => Err(None),
        },
        Ok(_) => Err(inner.leader_hint(t).filter(|&l| l != inner.id)),
    };
    bincode::serialize(&answer).unwrap_or_default()
}

/// Have `items` applied by partition `t` (led here) in its next `Deliver`
/// entry, shared with whatever else waits for one.
async fn propose(
    inner: &Arc<Inner>,
    t: PartitionId,
    items: Vec<Delivery>,
) -> Result<(), ClusterError> {
    let (tx, rx) = oneshot::channel();
    match inner.deliveries.queues.push(t, (items, tx)) {
        Ok(false) => {}
        Ok(true) => {
            let i = inner.clone();
            tokio::spawn(async move { drain(i, t).await });
        }
        Err(_) => return Err(ClusterError::Raft(format!("no partition {t}"))),
    }
    rx.await
        .map_err(|_| ClusterError::Raft("the delivery proposer stopped".into()))?
}

/// Propose `t`'s waiting deliveries, an entry at a time, until none wait.
async fn drain(inner: Arc<Inner>, t: PartitionId) {
    let _draining = inner.deliveries.queues.draining(t);
    let budget = crate::entry_budget(inner.engine().config().max_payload);
    loop {
        // As many batches as fit one entry (at least one: each was cut to
        // fit by `chunks`).
        let (mut bytes, mut count) = (0, 0);
        let Some(batch) = inner.deliveries.queues.take(t, usize::MAX, |(items, _)| {
            bytes += items
                .iter()
                .map(|d| d.body.len() + crate::ITEM_OVERHEAD)
                .sum::<usize>();
            count += items.len();
            bytes <= budget && count <= CHUNK
        }) else {
            return;
        };
        let (lists, txs): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let items: Vec<Delivery> = lists.into_iter().flatten().collect();
        let r = inner.submit(t, Command::Deliver(items)).await.map(|_| ());
        for tx in txs {
            let _ = tx.send(match &r {
                Ok(()) => Ok(()),
                Err(e) => Err(e.copy()),
            });
        }
    }
}
