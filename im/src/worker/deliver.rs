//! The receiving side: a worker's inbox of deliveries, written to its
//! users' sync timelines in arrival order, retried on a backoff timer
//! while writes fail (a stall), never dropped.

use super::batch::Batch;
use super::{write_engine, MAX_WRITE_BYTES};
use crate::directory::Recipient;
use crate::subscribe::Push;
use crate::{bump, Entry, ImError, Shared, SyncEntry};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timeline_engine::{Keyspace, SeqId, TimelineId};

/// One sync record for some of a shard's users.
pub(super) struct Item {
    pub record: Arc<Vec<u8>>,
    pub recipients: Arc<Vec<Recipient>>,
    /// For push (built only while someone is subscribed).
    pub entry: Option<Arc<Entry>>,
}

/// The part of a batch one receiving shard must write.
pub(crate) struct Delivery {
    batch: Arc<Batch>,
    items: Vec<Item>,
    /// `(item, recipient)` of the first entry not yet durable.
    next: (usize, usize),
}

impl Delivery {
    pub(super) fn new(batch: Arc<Batch>, items: Vec<Item>) -> Self {
        Delivery {
            batch,
            items,
            next: (0, 0),
        }
    }
    fn is_written(&self) -> bool {
        self.next.0 >= self.items.len()
    }
}

/// The inbox's last sync write failed.
struct Stall {
    retry_at: Instant,
    backoff: Duration,
    reason: String,
}

const FIRST_RETRY: Duration = Duration::from_millis(2);
const MAX_RETRY: Duration = Duration::from_millis(500);

/// Deliveries to this shard not yet durable, in arrival order.
#[derive(Default)]
pub(super) struct Inbox {
    undelivered: VecDeque<Delivery>,
    stall: Option<Stall>,
}

/// A pending entry: whose watermark to raise, what to push.
type Owner<'a> = (&'a Recipient, Option<&'a Arc<Entry>>);

impl Inbox {
    pub(super) fn push(&mut self, d: Delivery) {
        self.undelivered.push_back(d);
    }

    /// When a stalled inbox tries again (`None`: not stalled).
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.stall.as_ref().map(|s| s.retry_at)
    }

    /// Nothing more to write before shutdown (empty, or stalled: what is
    /// left, recovery re-drives).
    pub(super) fn settled(&self) -> bool {
        self.undelivered.is_empty() || self.stall.is_some()
    }

    pub(super) fn warn_left_to_recovery(&self, shard: usize) {
        if !self.undelivered.is_empty() {
            // Their batches have no done mark: the next open re-drives them.
            tracing::warn!(
                shard,
                deliveries = self.undelivered.len(),
                "closing with sync deliveries pending; recovery completes them"
            );
        }
    }

    /// Write the FIFO now unless a stall's retry time is ahead (then only
    /// defer what just arrived behind it). True if anything was written.
    pub(super) fn write_due(&mut self, sh: &Shared, q: usize) -> bool {
        if self.undelivered.is_empty() {
            return false;
        }
        match &self.stall {
            Some(s) if Instant::now() < s.retry_at => {
                for d in &self.undelivered {
                    d.batch.defer(sh, &s.reason);
                }
                false
            }
            _ => self.write(sh, q),
        }
    }

    /// Write front to back, one engine write per `MAX_WRITE_BYTES`:
    /// publish, push, and arrive on each batch whose delivery is complete.
    /// Stops at the first failed write and stalls (the entries not written
    /// stay queued, in order).
    fn write(&mut self, sh: &Shared, q: usize) -> bool {
        let mut wrote = false;
        while !self.undelivered.is_empty() {
            // `ends[k]`: where delivery k stands once this write is durable.
            let mut ends: Vec<(usize, usize)> = Vec::new();
            let res = {
                let mut items: Vec<(TimelineId, &[u8])> = Vec::new();
                let mut owners: Vec<Owner<'_>> = Vec::new();
                let mut bytes = 0usize;
                let cap = write_cap(sh);
                'build: for d in &self.undelivered {
                    let (mut i, mut r) = d.next;
                    while let Some(it) = d.items.get(i) {
                        while let Some(rc) = it.recipients.get(r) {
                            if !items.is_empty() && bytes + it.record.len() + 64 > cap {
                                ends.push((i, r));
                                break 'build;
                            }
                            items.push((TimelineId::sync(rc.0), &it.record[..]));
                            owners.push((rc, it.entry.as_ref()));
                            bytes += it.record.len() + 64;
                            r += 1;
                        }
                        i += 1;
                        r = 0;
                    }
                    ends.push((i, 0));
                }
                if items.is_empty() {
                    Ok(()) // only finished deliveries left: pop them below
                } else {
                    write_engine(sh, &items).map(|seqs| publish(sh, q, &owners, &seqs))
                }
            };
            if let Err(e) = res {
                self.stall(sh, e);
                return wrote;
            }
            wrote = true;
            if self.stall.take().is_some() {
                sh.stalled.fetch_sub(1, Ordering::AcqRel);
                tracing::info!(shard = q, "sync deliveries resumed");
            }
            for (d, end) in self.undelivered.iter_mut().zip(ends) {
                d.next = end;
            }
            while self.undelivered.front().is_some_and(Delivery::is_written) {
                if let Some(d) = self.undelivered.pop_front() {
                    if d.batch.latch.arrive() {
                        d.batch.finish(sh);
                    }
                }
            }
        }
        wrote
    }

    /// A sync write failed: keep everything queued, retry after a backoff,
    /// and tell the senders of every queued batch that delivery is pending.
    fn stall(&mut self, sh: &Shared, e: timeline_engine::Error) {
        let backoff = self
            .stall
            .as_ref()
            .map_or(FIRST_RETRY, |s| (s.backoff * 2).min(MAX_RETRY));
        let first = self.stall.is_none();
        let reason = e.to_string();
        *sh.last_stall.lock() = Some(ImError::Engine(e));
        if first {
            sh.stalled.fetch_add(1, Ordering::AcqRel);
            tracing::error!(error = %reason, "sync delivery failed; retrying until it is durable");
        }
        for d in &self.undelivered {
            d.batch.defer(sh, &reason);
        }
        if first {
            // Owners waiting for room must now answer their queues.
            for w in &sh.workers {
                w.signal.notify();
            }
        }
        self.stall = Some(Stall {
            retry_at: Instant::now() + backoff,
            backoff,
            reason,
        });
    }
}

/// Bytes one sync write may hold: within half a sync segment, so that the
/// engine writes it whole or not at all (it rolls first when a batch fits a
/// fresh segment; a batch larger than a segment is split across the roll,
/// and a failure after the split would leave a visible prefix that a retry
/// writes twice).
fn write_cap(sh: &Shared) -> usize {
    let seg = sh.engine.config().keyspace(Keyspace::SYNC).segment_bytes as usize;
    MAX_WRITE_BYTES.min(seg / 2)
}

/// Sync entries just made durable: raise each user's watermark, push.
fn publish(sh: &Shared, q: usize, owners: &[Owner<'_>], seqs: &[SeqId]) {
    bump(&sh.stats.sync_writes, seqs.len() as u64);
    for (&(r, _), &seq) in owners.iter().zip(seqs) {
        r.1.publish(seq);
    }
    if sh.subs.any() {
        for (&((u, _), e), &seq) in owners.iter().zip(seqs) {
            let u = *u;
            if let Some(e) = e {
                sh.subs.push(q, u, || Push::Entry {
                    user: u,
                    entry: SyncEntry {
                        seq,
                        entry: (**e).clone(),
                    },
                });
            }
        }
    }
}
