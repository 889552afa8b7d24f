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
//!    `NO_LEADER` (new writes `STORAGE_FULL` while the disk is below the
//!    reserve); the other replicas elect a leader meanwhile if their disks
//!    have room;
//! 3. once the disk is above the reserve again (and the old instance has
//!    finished shutting down), makes everything written
//!    so far durable (`Engine::sync`: a shard whose fdatasync failed is
//!    poisoned and refuses it, and then only a restart, which recovers from
//!    the files, brings the node's groups back) and reopens each stopped
//!    group from its storage, as a restart would: its log replayed, the
//!    entries after its applied state applied again (skipped by write id
//!    where they were), the rest from the leader.
//!
//! Step 3's sync is what makes reopening safe: an entry the stopped log
//! had written but whose flush never completed is in the engine's files,
//! and the reopened group would report it as in its log (a leader counts
//! it toward a quorum) only once it is on disk.

use crate::node::Inner;
use crate::partition::PartitionId;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the supervisor looks (a timer, not a poll of a hot path:
/// it bounds how long a stopped group keeps its requests waiting).
pub(crate) const EVERY: Duration = Duration::from_millis(250);

/// A group taken out: whether its old instance has finished shutting
/// down (until then nothing reopens it: two instances would apply to the
/// same timelines).
struct Stop {
    down: Arc<AtomicBool>,
}

/// The partitions whose group on this node stopped.
#[derive(Default)]
pub(crate) struct Stopped {
    groups: Mutex<BTreeMap<PartitionId, Stop>>,
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
        take_out_stopped(&inner).await;
        if !inner.space.low() {
            reopen(&inner).await;
        }
    }
}

/// Step 2 of the module docs, for every group whose core has stopped.
async fn take_out_stopped(inner: &Arc<Inner>) {
    let stopped: Vec<(PartitionId, openraft::Raft<crate::TypeConfig>, String)> = inner
        .groups
        .read()
        .iter()
        .filter_map(|(p, g)| {
            let why = g.metrics().borrow().running_state.clone().err()?;
            Some((*p, g.clone(), why.to_string()))
        })
        .collect();
    for (p, g, why) in stopped {
        tracing::error!(
            partition = p,
            error = %why,
            "the group stopped on a storage error: taken out until the disk has room"
        );
        let down = Arc::new(AtomicBool::new(false));
        inner
            .stopped
            .groups
            .lock()
            .insert(p, Stop { down: down.clone() });
        inner.stopped.stops.fetch_add(1, Ordering::Relaxed);
        inner.groups.write().remove(&p);
        // Its core has quit; the rest (its timer, its state machine's
        // worker) winds down apart, so that no stopped group holds up the
        // others, and it is reopened only once that is done.
        tokio::spawn(async move {
            let _ = g.shutdown().await;
            down.store(true, Ordering::Release);
        });
        if let Some(log) = inner.logs.lock().remove(&p) {
            log.close();
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
        .filter(|(_, s)| s.down.load(Ordering::Acquire))
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
        match inner.open_group(p).await {
            Ok(_) => {
                inner.stopped.groups.lock().remove(&p);
                inner.stopped.revived.fetch_add(1, Ordering::Relaxed);
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
