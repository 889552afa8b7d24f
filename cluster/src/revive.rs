//! Groups that stopped on a storage error, taken out and reopened once the
//! disk has room (docs/scaling.md, "A full disk").
//!
//! openraft 0.9 stops a group for good when its log or state machine
//! fails a write (a full disk: `ENOSPC`); the stopped group still looks
//! like its last state, so requests for it would wait on it forever. The
//! supervisor, on a timer:
//!
//! 1. reads the data disk's free space ([`crate::space`]);
//! 2. takes each stopped group out of the groups served: shut down (what
//!    waited on it ends `UNCERTAIN`), its log handle closed, its
//!    subscribed devices told to `resync`; requests for the partition get
//!    `NO_LEADER`; the other replicas elect a leader meanwhile if their
//!    disks have room;
//! 3. once the disk is above the reserve again and the old instance is
//!    gone (its core shut down, and every handle on its log and state
//!    machine dropped: its state-machine worker may still be applying what
//!    was queued when the core quit), makes everything written
//!    so far durable (`Engine::sync`: a shard whose fdatasync failed is
//!    poisoned and refuses it, and then only a restart, which recovers from
//!    the files, brings the node's groups back) and reopens each stopped
//!    group from its storage, as a restart would: its log replayed, the
//!    entries after its applied state applied again (skipped by write id
//!    where they were), the rest from the leader. A reopened replica
//!    grants no vote for `election_timeout_max` (as after a restart:
//!    `net::VoteGate`), since it lost when it last heard from its leader.
//!
//! Only a group whose core failed is taken out: one that quit on a
//! storage error, or whose core task ended without saying why (a panic:
//! openraft 0.9 then leaves `running_state` as it was, and only the
//! metrics channel closing tells). One shut down on purpose (the node
//! stopping, a replica given up) reads as `Fatal::Stopped` and is left
//! alone. A group that fails again soon after it was reopened waits
//! longer each time ([`backoff`]), so one that cannot run does not cost
//! a sync and a reopen every quarter of a second.
//!
//! Step 3's sync is what makes reopening safe: an entry the stopped log
//! had written but whose flush never completed is in the engine's files,
//! and the reopened group would report it as in its log (a leader counts
//! it toward a quorum) only once it is on disk.

use crate::log_store::LogStore;
use crate::node::Inner;
use crate::partition::PartitionId;
use crate::state_machine::StateMachine;
use openraft::error::Fatal;
use openraft::Raft;
use parking_lot::Mutex;
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often the supervisor looks (a timer, not a poll of a hot path:
/// it bounds how long a stopped group keeps its requests waiting).
pub(crate) const EVERY: Duration = Duration::from_millis(250);

/// Whether one opened instance of a group is still around: its core (shut
/// down), and the handles on its log and state machine.
pub(crate) struct Instance {
    down: Arc<AtomicBool>,
    handles: Vec<Weak<dyn Any + Send + Sync>>,
}

impl Instance {
    /// The instance that opens with `ls` and `sm`.
    pub(crate) fn of(ls: &LogStore, sm: &StateMachine) -> Instance {
        Instance {
            down: Arc::new(AtomicBool::new(false)),
            handles: vec![ls.alive(), sm.alive()],
        }
    }

    fn gone(&self) -> bool {
        self.down.load(Ordering::Acquire) && self.handles.iter().all(|h| h.strong_count() == 0)
    }
}

/// The open instances of this node's groups (as opened), and the
/// partitions whose group stopped, with their last instance.
#[derive(Default)]
pub(crate) struct Stopped {
    open: Mutex<HashMap<PartitionId, Instance>>,
    /// Each stopped group's last instance, and when it may reopen.
    groups: Mutex<BTreeMap<PartitionId, (Instance, Instant)>>,
    /// Per partition, its stops in a row (each within [`SOON`] of the
    /// reopening before it) and when it was last reopened.
    streak: Mutex<HashMap<PartitionId, (u32, Option<Instant>)>>,
    /// Groups stopped on a storage error, and reopened, since start.
    stops: AtomicU64,
    revived: AtomicU64,
    /// The engine refused to sync (a poisoned shard): warned once.
    unsyncable: AtomicBool,
}

impl Stopped {
    pub(crate) fn contains(&self, p: PartitionId) -> bool {
        self.groups.lock().contains_key(&p)
    }

    /// `p`'s group opened as `instance` (`Inner::open_group`).
    pub(crate) fn opened(&self, p: PartitionId, instance: Instance) {
        self.open.lock().insert(p, instance);
    }

    /// `p`'s group was shut down on purpose (its replica given up).
    pub(crate) fn closed(&self, p: PartitionId) {
        self.open.lock().remove(&p);
    }

    /// `STATS`: groups stopped now, stops and reopenings since start.
    pub(crate) fn counters(&self) -> (u64, u64, u64) {
        (
            self.groups.lock().len() as u64,
            self.stops.load(Ordering::Relaxed),
            self.revived.load(Ordering::Relaxed),
        )
    }
}

/// The supervisor (module docs): runs until the node goes.
pub(crate) async fn supervise(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.space.refresh();
        take_out_stopped(&inner);
        if inner.space.low() {
            crate::rebalance::maybe_shed(&inner);
        } else {
            reopen(&inner).await;
        }
    }
}

/// Whether `g`'s core quit on an error of its own (not shut down on
/// purpose): why.
fn failed(g: &Raft<crate::TypeConfig>) -> Option<String> {
    let rx = g.metrics();
    let gone = rx.has_changed().is_err();
    let state = rx.borrow().running_state.clone();
    match state {
        Err(e @ (Fatal::StorageError(_) | Fatal::Panicked)) => Some(e.to_string()),
        Err(_) => None,
        Ok(()) if gone => Some("its core task ended without a result (a panic)".into()),
        Ok(()) => None,
    }
}

/// A stop this soon after the group was reopened counts as failing again
/// (it could not run), not as a new episode of a full disk.
const SOON: Duration = Duration::from_secs(5);

/// How long a group stopped for the `n`th time in a row (each within
/// [`SOON`] of its reopening) waits before it is reopened again: nothing
/// at first, then doubling from half a second up to a minute.
fn backoff(n: u32) -> Duration {
    match n {
        0 | 1 => Duration::ZERO,
        n => (Duration::from_millis(500) * 2u32.saturating_pow(n.min(9) - 2)).min(MAX_BACKOFF),
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Step 2 of the module docs, for every group whose core has failed.
fn take_out_stopped(inner: &Arc<Inner>) {
    let stopped: Vec<(PartitionId, Raft<crate::TypeConfig>, String)> = inner
        .groups
        .read()
        .iter()
        .filter_map(|(p, g)| Some((*p, g.clone(), failed(g)?)))
        .collect();
    for (p, g, why) in stopped {
        {
            // Under the groups' lock: `open_group` sees either the group
            // or the stop, never neither.
            let mut groups = inner.groups.write();
            if groups.get(&p).is_none_or(|x| failed(x).is_none()) {
                continue;
            }
            let instance = inner
                .stopped
                .open
                .lock()
                .remove(&p)
                .unwrap_or_else(|| Instance {
                    down: Arc::new(AtomicBool::new(false)),
                    handles: Vec::new(),
                });
            let down = instance.down.clone();
            let now = Instant::now();
            let n = {
                let mut streak = inner.stopped.streak.lock();
                let s = streak.entry(p).or_insert((0, None));
                let again = s.1.is_some_and(|r| now.duration_since(r) < SOON);
                s.0 = if again { s.0 + 1 } else { 1 };
                s.0
            };
            inner
                .stopped
                .groups
                .lock()
                .insert(p, (instance, now + backoff(n)));
            groups.remove(&p);
            // Its core has quit; the rest (its timer) winds down apart, so
            // that no stopped group holds up the others.
            let g = g.clone();
            tokio::spawn(async move {
                let _ = g.shutdown().await;
                down.store(true, Ordering::Release);
            });
        }
        inner.stopped.stops.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            partition = p,
            error = %why,
            "the group stopped on a storage error: taken out until the disk has room"
        );
        if let Some(s) = inner.storage.lock().remove(&p) {
            s.log.close();
        }
        if let Some(h) = inner.hook() {
            h.partition_left(p, inner.map.read().len());
        }
    }
}

/// Step 3 of the module docs.
async fn reopen(inner: &Arc<Inner>) {
    let waiting: Vec<PartitionId> = inner
        .stopped
        .groups
        .lock()
        .iter()
        .filter(|(_, (i, at))| i.gone() && *at <= Instant::now())
        .map(|(p, _)| *p)
        .collect();
    if waiting.is_empty() {
        return;
    }
    let engine = inner.engine().clone();
    match tokio::task::spawn_blocking(move || engine.sync()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            if !inner.stopped.unsyncable.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    error = %e,
                    "the engine cannot sync: stopped groups stay down until the node restarts"
                );
            }
            return;
        }
        Err(_) => return,
    }
    for p in waiting {
        // As after a restart: no vote until the leases this replica's
        // last acknowledgements gave its leader are over.
        let leases = inner.leases();
        leases.no_votes_before(p, Instant::now() + inner.election_timeout_max());
        inner.placement.leaderless.lock().remove(&p);
        match inner.open_group(p, true).await {
            Ok(_) => {
                inner.stopped.groups.lock().remove(&p);
                inner.stopped.revived.fetch_add(1, Ordering::Relaxed);
                let mut streak = inner.stopped.streak.lock();
                streak.entry(p).or_insert((0, None)).1 = Some(Instant::now());
                tracing::info!(
                    partition = p,
                    "the disk has room again: the group is reopened"
                );
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cannot reopen the group yet");
            }
        }
    }
    // Placement acts on the reopened groups as on any (a change made
    // while they were down).
    inner.placement.changed.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_that_keeps_failing_waits_longer_each_time_up_to_a_minute() {
        assert_eq!(backoff(1), Duration::ZERO, "a first stop reopens at once");
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(1));
        assert_eq!(backoff(8), Duration::from_secs(32));
        assert_eq!(backoff(9), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
