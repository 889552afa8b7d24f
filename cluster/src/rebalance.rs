//! Leader rebalancing: each partition led by its **preferred replica**,
//! the map's first (docs/scaling.md, "Leader rebalancing").
//!
//! After a node restarts, the partitions it led have new leaders on the
//! other nodes, and it leads none: their load stays on the others.
//! openraft 0.9 has no leadership transfer (0.10's `transfer_leader`), and
//! its followers refuse votes while their leader's heartbeats arrive, so a
//! preferred replica cannot simply stand. So the leader steps aside:
//!
//! 1. it stops taking writes and reads for the partition (`NO_LEADER`: the
//!    client retries) and waits until what it proposed is applied and the
//!    preferred replica has every entry;
//! 2. it asks the group's other voters to hold their elections
//!    ([`HOLD`]; they still vote), so that the preferred replica is the
//!    only one to stand;
//! 3. it stops its heartbeats and asks the preferred replica to stand once
//!    the followers' leases of it have lapsed (openraft's leader lease:
//!    `election_timeout_max` after the last entry or heartbeat);
//! 4. it waits up to [`WIN_WAIT`] for another leader, then takes its
//!    heartbeats back up (and, if none came, its writes: nothing is lost,
//!    the partition only paused).
//!
//! Raft's safety does not rest on any of this: a step that fails leaves an
//! ordinary group that elects as usual. Each leader looks every
//! `leader_rebalance_every` (`NodeConfig`) for partitions it leads whose
//! preferred replica is alive, a voter and caught up, and hands them over
//! one at a time. A partition pauses for about `election_timeout_max` plus
//! a vote round while it is handed over.

use crate::node::Inner;
use crate::partition::PartitionId;
use crate::{NodeId, TypeConfig};
use openraft::{Raft, ServerState};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The timings of a handover, from openraft's `election_timeout_max`
/// (`etm`, 500 ms by default): the other voters hold their elections for
/// 4 etm plus [`ASK_TIMEOUT`], the leader waits up to 4 etm for its proposals to apply and the
/// preferred replica to have them, and up to 6 etm for another leader;
/// the preferred replica stands etm + [`MARGIN`] after it is asked (once
/// the followers' lease of the leader has lapsed).
struct Timings {
    hold: Duration,
    catch_up: Duration,
    win: Duration,
    stand_after: Duration,
}

impl Timings {
    fn of(etm: Duration) -> Timings {
        Timings {
            hold: etm * 4 + ASK_TIMEOUT,
            catch_up: etm * 4,
            win: etm * 6,
            stand_after: etm + MARGIN,
        }
    }
}

/// What the preferred replica waits beyond the followers' lease before it
/// stands.
const MARGIN: Duration = Duration::from_millis(50);
/// How long the leader waits for a voter's answer to a request.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// The peer request (`net::KIND_HANDOVER`): what a voter is asked to do.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) enum Ask {
    /// Hold elections for this long (ms).
    Hold(u64),
    /// Stand for election once this long (ms) has passed. Refused by a
    /// node whose disk has not room enough to lead (module `space`:
    /// `Space::roomy`).
    Stand(u64),
    /// Whether its disk has room enough to lead (`Space::roomy`; nothing
    /// done): asked before a handover to it.
    HasRoom,
    /// Whether it runs a group of the partition whose done mark covers
    /// this write id (nothing done): asked before a replica given up
    /// closes its outbox (module `outbox`).
    Delivered(u64),
}

/// Between two passes of shedding leadership off a full disk.
const SHED_EVERY: Duration = Duration::from_secs(2);

/// A node's handovers: the partitions it is handing over (refusing their
/// requests), the elections it holds for another node's handover, and the
/// counts `STATS` shows.
#[derive(Default)]
pub(crate) struct Handovers {
    handing: Mutex<HashSet<PartitionId>>,
    /// Elections held here, until when, and on which instance of the
    /// group (the latest: one reopened meanwhile gets them back).
    held: Mutex<HashMap<PartitionId, (Instant, Raft<TypeConfig>)>>,
    running: AtomicBool,
    last: Mutex<Option<Instant>>,
    last_shed: Mutex<Option<Instant>>,
    pub(crate) done: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// Partitions handed off a full disk ([`maybe_shed`]).
    pub(crate) shed: AtomicU64,
}

impl Handovers {
    /// Whether this node is handing `p` over (it takes no request for it).
    pub(crate) fn handing(&self, p: PartitionId) -> bool {
        self.handing.lock().contains(&p)
    }

    /// Whether a pass is due (`every` since the `last` of its kind) and
    /// none is running: if so the caller runs one (the running flag is
    /// set; its [`Running`] guard clears it).
    fn due(&self, last: &Mutex<Option<Instant>>, every: Duration) -> bool {
        {
            let mut last = last.lock();
            if last.is_some_and(|t| t.elapsed() < every) {
                return false;
            }
            *last = Some(Instant::now());
        }
        !self.running.swap(true, Ordering::AcqRel)
    }
}

/// From the placement round (every second): once per `every`, hand over,
/// one after another, the partitions this node leads whose preferred
/// replica should lead them.
pub(crate) fn maybe_start(inner: &Arc<Inner>, every: Duration) {
    if !inner.handovers.due(&inner.handovers.last, every) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let _running = Running(&inner.handovers.running);
        let p_count = inner.map.read().len();
        for p in 0..p_count {
            let Some(to) = preferred_if_ready(&inner, p) else {
                continue;
            };
            // Not to a node whose disk is full (its `Stand` would refuse,
            // but only after the other voters held their elections).
            if !matches!(ask(&inner, to, p, Ask::HasRoom).await, Answer::Done) {
                continue;
            }
            // One change per partition at a time: not while its membership
            // changes.
            if !inner.placement.busy.lock().insert(p) {
                continue;
            }
            let t0 = Instant::now();
            let r = hand_over(&inner, p, to).await;
            inner.placement.busy.lock().remove(&p);
            let ms = t0.elapsed().as_millis() as u64;
            match r {
                Ok(()) => {
                    inner.handovers.done.fetch_add(1, Ordering::Relaxed);
                    let what = "leadership handed to the preferred replica";
                    tracing::info!(partition = p, to, ms, what);
                }
                Err(why) => {
                    inner.handovers.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(partition = p, to, ms, why, "leadership handover not done");
                }
            }
        }
    });
}

/// From the supervisor (module `revive`), while this node's disk is below
/// its reserve: it refuses its partitions' writes (`STORAGE_FULL`), though
/// their other replicas may have room. So, every [`SHED_EVERY`], it hands
/// each partition it leads to another voter that is alive, caught up and
/// says its disk has room ([`Ask::HasRoom`]), the map's order first. When
/// every disk is full (one machine), no voter says so and nothing moves.
/// Rebalancing brings the partitions back to their preferred replica once
/// its disk has room again (before, its `Stand` refuses).
pub(crate) fn maybe_shed(inner: &Arc<Inner>) {
    if !inner.handovers.due(&inner.handovers.last_shed, SHED_EVERY) {
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let _running = Running(&inner.handovers.running);
        let p_count = inner.map.read().len();
        for p in 0..p_count {
            if !inner.space.low() {
                return;
            }
            let candidates = voters_ready(&inner, p);
            if candidates.is_empty() || !inner.placement.busy.lock().insert(p) {
                continue;
            }
            for to in candidates {
                // A failed handover may still have ended with another
                // leader (an election the group held meanwhile).
                if !inner.leads(p) {
                    break;
                }
                if !matches!(ask(&inner, to, p, Ask::HasRoom).await, Answer::Done) {
                    continue;
                }
                match hand_over(&inner, p, to).await {
                    Ok(()) => {
                        inner.handovers.shed.fetch_add(1, Ordering::Relaxed);
                        let what = "leadership handed off this node's full disk";
                        tracing::info!(partition = p, to, what);
                        break;
                    }
                    Err(why) => {
                        tracing::warn!(
                            partition = p,
                            to,
                            why,
                            "leadership not handed off the full disk"
                        );
                    }
                }
            }
            inner.placement.busy.lock().remove(&p);
        }
    });
}

/// The voters `p`'s leadership could go to if this node leads it: the
/// other live voters of the settled membership that have every entry of
/// this leader's log, in the map's order.
fn voters_ready(inner: &Inner, p: PartitionId) -> Vec<NodeId> {
    let target: Vec<NodeId> = match inner.map.read().partitions.get(p as usize) {
        Some(r) => r.clone(),
        None => return Vec::new(),
    };
    let Some(g) = inner.group(p) else {
        return Vec::new();
    };
    if !crate::reconcile::settled(&g, &target.iter().copied().collect()) {
        return Vec::new();
    }
    let m = g.metrics().borrow().clone();
    if m.state != ServerState::Leader {
        return Vec::new();
    }
    let live = inner.replace.live.read();
    target
        .into_iter()
        .filter(|&n| n != inner.id && live.contains(&n))
        .filter(|n| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(n).copied().flatten());
            matched.map(|l| l.index) >= m.last_log_index
        })
        .collect()
}

/// `p`'s preferred replica if this node leads `p` and should hand it over
/// now: the preferred replica is another node, alive, a voter of the
/// settled membership, and has every entry of this leader's log.
fn preferred_if_ready(inner: &Inner, p: PartitionId) -> Option<NodeId> {
    let (first, target) = {
        let map = inner.map.read();
        let r = map.partitions.get(p as usize)?;
        (*r.first()?, r.iter().copied().collect())
    };
    if first == inner.id || !inner.replace.live.read().contains(&first) {
        return None;
    }
    let g = inner.group(p)?;
    if !crate::reconcile::settled(&g, &target) {
        return None;
    }
    let m = g.metrics().borrow().clone();
    let caught_up = |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| {
        let matched = m.replication.as_ref()?.get(&first).copied().flatten();
        Some(matched.map(|l| l.index) >= m.last_log_index)
    };
    (m.state == ServerState::Leader && caught_up(&m) == Some(true)).then_some(first)
}

/// Hand `p`'s leadership from this node to `to` (module docs); `Err` says
/// which step failed (the partition is led here again, or by whoever the
/// group elected).
async fn hand_over(inner: &Arc<Inner>, p: PartitionId, to: NodeId) -> Result<(), String> {
    let g = inner.group(p).ok_or("the group closed")?;
    inner.handovers.handing.lock().insert(p);
    let _aside = Aside { inner, p, g: &g };
    step_aside(inner, p, &g, to).await
}

/// While a leader steps aside for `p`; however that ends (an answer, an
/// error, a panic), its heartbeats come back on and it takes requests for
/// `p` again.
struct Aside<'a> {
    inner: &'a Inner,
    p: PartitionId,
    g: &'a Raft<TypeConfig>,
}

impl Drop for Aside<'_> {
    fn drop(&mut self) {
        self.g.runtime_config().heartbeat(true);
        self.inner.handovers.handing.lock().remove(&self.p);
    }
}

/// The flag that one pass of handovers runs, cleared however it ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

async fn step_aside(
    inner: &Arc<Inner>,
    p: PartitionId,
    g: &Raft<TypeConfig>,
    to: NodeId,
) -> Result<(), String> {
    let me = inner.id;
    let t = Timings::of(inner.election_timeout_max());
    // 1. Everything proposed is applied here and is in `to`'s log.
    g.wait(Some(t.catch_up))
        .metrics(
            |m| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&to).copied().flatten());
                m.state == ServerState::Leader
                    && m.last_applied.map(|l| l.index) == m.last_log_index
                    && matched.map(|l| l.index) >= m.last_log_index
            },
            "applied here and replicated to the preferred replica",
        )
        .await
        .map_err(|e| format!("catching up: {e}"))?;
    // 2. The other live voters hold their elections, all at once; best
    // effort: a follower stands only `leader_lease + election_timeout`
    // after it last heard from this leader, later than `to` will, so the
    // hold only makes sure.
    let others: Vec<NodeId> = {
        let live = inner.replace.live.read();
        g.metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .filter(|&v| v != me && v != to && live.contains(&v))
            .collect()
    };
    let hold = Ask::Hold(t.hold.as_millis() as u64);
    let holds: Vec<_> = others
        .into_iter()
        .map(|v| {
            let inner = inner.clone();
            tokio::spawn(async move { ask(&inner, v, p, hold).await })
        })
        .collect();
    for h in holds {
        let _ = h.await;
    }
    // 3. Silence, and `to` stands once the followers' lease of this
    // leader has lapsed.
    g.runtime_config().heartbeat(false);
    match ask(inner, to, p, Ask::Stand(t.stand_after.as_millis() as u64)).await {
        Answer::Refused => return Err(format!("node {to} did not take the request to stand")),
        // Done, or unknown: `to` may stand, so this leader stays silent
        // (and serves nothing) until the wait below is over whatever it
        // heard: if it spoke again, `to` could stand while its followers
        // still count this leader's lease.
        Answer::Done | Answer::Unknown => {}
    }
    // 4. Another leader, and which.
    let m = g
        .wait(Some(t.win))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != Some(me),
            "another leader",
        )
        .await
        .map_err(|e| format!("waiting for the preferred replica to win: {e}"))?;
    match m.current_leader {
        Some(l) if l == to => Ok(()),
        l => Err(format!("node {l:?} won, not node {to}")),
    }
}

/// A voter's answer to an [`Ask`].
pub(crate) enum Answer {
    Done,
    /// It runs no group of the partition, or the request never reached it
    /// (no connection).
    Refused,
    /// No answer in time, or the link failed: it may have done it.
    Unknown,
}

/// Send `ask` about `p` to `node` (waiting at most [`ASK_TIMEOUT`]).
pub(crate) async fn ask(inner: &Inner, node: NodeId, p: PartitionId, ask: Ask) -> Answer {
    let Ok(body) = bincode::serialize(&ask) else {
        return Answer::Refused;
    };
    let call = inner
        .transport()
        .call(node, crate::net::KIND_HANDOVER, p, body, ASK_TIMEOUT);
    match call.await {
        Ok(reply) => match bincode::deserialize::<bool>(&reply) {
            Ok(true) => Answer::Done,
            Ok(false) => Answer::Refused,
            Err(_) => Answer::Unknown,
        },
        Err(e) => {
            tracing::debug!(partition = p, node, error = %e, ?ask, "handover request failed");
            match e.never_sent() {
                true => Answer::Refused,
                false => Answer::Unknown,
            }
        }
    }
}

/// Answer [`crate::net::KIND_HANDOVER`] for partition `p`: `true` if this
/// node runs a group of `p` and did what it was asked.
pub(crate) async fn serve(inner: Arc<Inner>, p: PartitionId, body: Vec<u8>) -> Vec<u8> {
    let done = match (bincode::deserialize::<Ask>(&body), inner.group(p)) {
        (Ok(Ask::Hold(ms)), Some(g)) => {
            let most = Timings::of(inner.election_timeout_max()).hold;
            hold(&inner, p, g, Duration::from_millis(ms).min(most));
            true
        }
        // A node whose disk is full would lead and refuse every write.
        (Ok(Ask::Stand(_)), Some(_)) if !inner.space.roomy() => false,
        (Ok(Ask::HasRoom), _) => inner.space.roomy(),
        (Ok(Ask::Delivered(wid)), Some(_)) => {
            crate::outbox::done(inner.engine(), p).is_ok_and(|(_, done)| done >= wid)
        }
        (Ok(Ask::Stand(ms)), Some(g)) => {
            // Never sooner than the followers' lease: a leader that asks
            // for less is not obeyed beyond what keeps reads safe.
            let t = Timings::of(inner.election_timeout_max());
            let after = Duration::from_millis(ms).clamp(t.stand_after, t.win);
            tokio::spawn(stand(inner.clone(), p, g, after, t.win));
            true
        }
        _ => false,
    };
    bincode::serialize(&done).unwrap_or_default()
}

/// Stand for `p` once `after` has passed since this node last took an
/// append-entries of it (the request's arrival counting as one), within
/// `within` of the request: never while the leader still speaks (one that
/// took its heartbeats back up, or whose request came late), which is
/// what keeps its lease reads safe (`crate::lease`, rule 3).
async fn stand(
    inner: Arc<Inner>,
    p: PartitionId,
    g: Raft<TypeConfig>,
    after: Duration,
    within: Duration,
) {
    let arrived = Instant::now();
    let end = arrived + within;
    let leases = inner.leases();
    let mut at = arrived + after;
    loop {
        tokio::time::sleep_until(at.into()).await;
        match leases.last_heard(p) {
            Some(h) if h > arrived && h + after > Instant::now() => {
                if h + after > end {
                    return;
                }
                at = h + after;
            }
            _ => break,
        }
    }
    // Not if its disk filled meanwhile: it would lead and refuse writes.
    if g.metrics().borrow().state != ServerState::Leader && inner.space.roomy() {
        let _ = g.trigger().elect().await;
    }
}

/// Hold `p`'s elections on this node for `d` (a later hold extends it).
fn hold(inner: &Arc<Inner>, p: PartitionId, g: Raft<TypeConfig>, d: Duration) {
    let until = Instant::now() + d;
    {
        // Under the lock: an earlier hold's timer takes its entry and
        // turns elections back on under it too, so it cannot undo this.
        let mut held = inner.handovers.held.lock();
        g.runtime_config().elect(false);
        let t = held.entry(p).or_insert((until, g.clone()));
        *t = (t.0.max(until), g);
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        tokio::time::sleep(d).await;
        let mut held = inner.handovers.held.lock();
        if held.get(&p).is_some_and(|t| t.0 <= Instant::now()) {
            if let Some((_, g)) = held.remove(&p) {
                g.runtime_config().elect(true);
            }
        }
    });
}
