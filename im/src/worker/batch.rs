//! A batch, stage by stage: [`Worker::write_batch`] writes it (journal
//! intent, conversation records and catalog records in one engine write),
//! applies it to the directory, dispatches one delivery per receiving
//! shard, and waits out a group's switch to read fan-out. The catalog
//! records are built once, as values: encoded for the write, applied as
//! they are.

use super::deliver::{Delivery, Item};
use super::plan::{Event, Op};
use super::{Ack, MemberChange, Worker};
use crate::directory::{self, Recipient};
use crate::entry::{self, CatalogRecord, ConvKind, JournalRecord, SyncRecord};
use crate::fanout::watermark::Latch;
use crate::subscribe::Push;
use crate::{bump, ConvId, Entry, EntryMode, ImError, Shared, UserId};
use parking_lot::Mutex;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use timeline_engine::TimelineId;

#[derive(Default)]
struct BatchState {
    /// Every delivery is durable; the acks went out as `Ok`.
    completed: bool,
    /// A delivery failed and is being retried: the acks went out as
    /// pending (`FanoutFailed`), and so does every later retry's, until
    /// `completed`.
    deferred: Option<String>,
    acks: Vec<Ack>,
}

/// A read-fan-out entry to push to a group's online members at completion.
struct GroupPush {
    members: Vec<UserId>,
    entry: Entry,
}

/// One fan-out batch: what one worker wrote with one engine write.
pub(crate) struct Batch {
    owner: usize,
    no: u64,
    pub(super) latch: Latch,
    state: Mutex<BatchState>,
    group_push: Vec<GroupPush>,
}

impl Batch {
    pub(super) fn is_finished_or_deferred(&self) -> bool {
        let s = self.state.lock();
        s.completed || s.deferred.is_some()
    }

    /// Answer `ack` when the batch completes; at once if it has, or (as
    /// pending) if it is deferred.
    pub(super) fn ack_when_done(&self, ack: Ack) {
        let mut s = self.state.lock();
        if s.completed {
            drop(s);
            ack.send(None);
        } else if let Some(why) = s.deferred.clone() {
            // Stored, delivery still pending: say so now, not when the
            // disk has room again.
            drop(s);
            ack.send(Some(&why));
        } else {
            s.acks.push(ack);
        }
    }

    /// Mark the batch deferred (once), tell its waiting senders, and wake
    /// its owner (it may be waiting for this batch, for room, or to shut
    /// down).
    pub(super) fn defer(&self, sh: &Shared, why: &str) {
        let acks = {
            let mut s = self.state.lock();
            if s.completed || s.deferred.is_some() {
                return;
            }
            s.deferred = Some(why.to_string());
            std::mem::take(&mut s.acks)
        };
        sh.workers[self.owner].signal.notify();
        for a in acks {
            a.send(Some(why));
        }
    }

    /// Every delivery is durable: push read-fan-out entries, finish in the
    /// owner's window, acknowledge.
    pub(super) fn finish(&self, sh: &Shared) {
        let acks = {
            let mut s = self.state.lock();
            s.completed = true;
            std::mem::take(&mut s.acks)
        };
        for gp in &self.group_push {
            for &u in &gp.members {
                sh.subs.push(sh.user_shard(u), u, || Push::Group {
                    user: u,
                    entry: gp.entry.clone(),
                });
            }
        }
        let w = &sh.workers[self.owner];
        w.window.complete(self.no);
        w.signal.notify();
        for a in acks {
            a.send(None);
        }
    }
}

/// The bytes and catalog records of a planned batch.
struct Written {
    ops: Vec<Op>,
    /// Catalog records per op (built once; encoded for the write).
    catalog: Vec<Vec<CatalogRecord>>,
    /// The batch turns a group to read fan-out.
    switches: bool,
}

impl Worker {
    pub(super) fn write_batch(&mut self, ops: Vec<Op>, extra: Vec<Ack>) {
        let no = self.next_batch;
        self.next_batch += 1;
        let w = match self.write(no, ops) {
            Ok(w) => w,
            Err((ops, e)) => return self.fail_batch(no, ops, extra, &e),
        };
        bump(
            &self.sh.stats.meta_writes,
            1 + w.catalog.iter().map(Vec::len).sum::<usize>() as u64,
        );
        bump(&self.sh.stats.stored, w.ops.len() as u64);
        let removed = self.apply(&w);
        let switches = w.switches;
        self.dispatch(no, w, extra, &removed);
        if switches {
            self.wait_out_switch(no);
        }
    }

    /// Stage 1, write: one engine write: intent, conversation records, catalog records.
    fn write(&self, no: u64, ops: Vec<Op>) -> Result<Written, (Vec<Op>, ImError)> {
        let sh = &self.sh;
        let mut catalog = Vec::with_capacity(ops.len());
        let mut switches = false;
        for o in &ops {
            if matches!(o.event, Event::Message { .. }) {
                catalog.push(Vec::new()); // the hot path: no directory lookup
                continue;
            }
            let rs = self.read_since_after(o);
            switches |= rs != 0 && !self.is_read_fanout(o.conv);
            catalog.push(catalog_records(o, rs));
        }
        let mut intent = Vec::new();
        JournalRecord::Intent {
            batch: no,
            ops: ops.iter().map(Op::intent).collect(),
        }
        .encode_into(&mut intent);
        let stored: Vec<Vec<u8>> = ops
            .iter()
            .map(|o| {
                let e = o.store_entry();
                let mut b = Vec::with_capacity(e.encoded_len());
                e.encode_into(&mut b);
                b
            })
            .collect();
        let cat: Vec<Vec<u8>> = catalog
            .iter()
            .flatten()
            .map(|r| {
                let mut b = Vec::with_capacity(48);
                r.encode_into(&mut b);
                b
            })
            .collect();
        let mut items: Vec<(TimelineId, &[u8])> = Vec::with_capacity(1 + ops.len() + cat.len());
        if !ops.is_empty() {
            items.push((TimelineId::store(sh.journal[self.p]), &intent));
        }
        for (o, b) in ops.iter().zip(&stored) {
            items.push((TimelineId::store(o.conv), b));
        }
        let catalog_tl = TimelineId::store(sh.catalog[self.p]);
        items.extend(cat.iter().map(|b| (catalog_tl, &b[..])));
        // The worker is the only writer of these timelines, and the intent
        // announced each record's seq: the engine writes the batch only if
        // every record lands there. A record appended to a conversation's
        // timeline from outside (a raw `APPEND` racing its create) makes
        // the whole batch refused, nothing of it stored: its catalog
        // records must not make recovery apply what was refused.
        let mut expect = vec![0; items.len()];
        for (k, o) in ops.iter().enumerate() {
            expect[1 + k] = o.seq;
        }
        let res = if items.is_empty() {
            Ok(Vec::new())
        } else {
            sh.engine
                .append_batch_expecting(&items, &expect, sh.cfg.durability)
        };
        drop(items);
        let res = match res {
            Ok(_) => Ok(()),
            Err(timeline_engine::Error::NotLast { timeline, .. }) => Err(ImError::InvalidArgument(
                format!("conversation {timeline} was appended to outside the IM layer"),
            )),
            Err(e) => Err(ImError::from(e)),
        };
        match res {
            Ok(()) => Ok(Written {
                ops,
                catalog,
                switches,
            }),
            Err(e) => Err((ops, e)),
        }
    }

    /// The write failed: nothing of the batch is stored.
    fn fail_batch(&mut self, no: u64, ops: Vec<Op>, extra: Vec<Ack>, e: &ImError) {
        for o in ops {
            if let Event::Message { sender, cmid } = o.event {
                self.dedup.remove(&(o.conv, sender, cmid));
            }
            if let Some(a) = o.ack {
                a.fail(e);
            }
        }
        // Retries of this batch's sends were not written either (they used
        // to be acknowledged with the seq that was never stored).
        for a in extra {
            a.fail(e);
        }
        self.sh.workers[self.p].window.complete(no);
    }

    /// Stage 2, apply (the write is durable): the catalog records to the directory. Returns the
    /// members this batch removed.
    fn apply(&self, w: &Written) -> Vec<(ConvId, UserId)> {
        let mut removed = Vec::new();
        for (o, recs) in w.ops.iter().zip(&w.catalog) {
            for rec in recs {
                apply_op(&self.sh, self.p, o.conv, rec);
            }
            if let Event::Member {
                user,
                change: MemberChange::Remove,
            } = o.event
            {
                removed.push((o.conv, user));
            }
        }
        removed
    }

    /// Stage 3, dispatch: publish the conversations' watermarks and hand one delivery per
    /// receiving shard over (our own shard's inline).
    fn dispatch(&mut self, no: u64, w: Written, extra: Vec<Ack>, removed: &[(ConvId, UserId)]) {
        let sh = self.sh.clone();
        let now = sh.now_ms();
        let subs = sh.subs.any();
        let mut per_shard: Vec<Vec<Item>> = (0..sh.shards).map(|_| Vec::new()).collect();
        let mut group_push = Vec::new();
        let (mut read_deliveries, mut messages) = (0u64, 0u64);
        {
            let convs = sh.dir.convs[self.p].read();
            for o in &w.ops {
                let Some(c) = convs.get(&o.conv) else {
                    continue;
                };
                c.visible.publish(o.seq);
                if matches!(o.event, Event::Message { .. }) {
                    messages += 1;
                }
                let se = o.store_entry();
                let entry = subs.then(|| {
                    Arc::new(Entry {
                        conv: o.conv,
                        conv_seq: o.seq,
                        sender: se.sender,
                        timestamp_ms: now,
                        body: o.push_body(),
                    })
                });
                if !c.is_write_fanout(o.seq) {
                    read_deliveries += c.current as u64;
                    if let Some(e) = &entry {
                        let mut members: Vec<UserId> = c
                            .recipients
                            .iter()
                            .flat_map(|v| v.iter().map(|r| r.0))
                            .collect();
                        // A user removed here is no member any more, but
                        // its removal is inside its stay: pushed to it
                        // too (as a write-fan-out group's, `with_removed`).
                        if matches!(o.event, Event::Member { .. }) {
                            members.extend(
                                removed
                                    .iter()
                                    .filter(|(rc, _)| *rc == o.conv)
                                    .map(|&(_, u)| u),
                            );
                        }
                        group_push.push(GroupPush {
                            members,
                            entry: (**e).clone(),
                        });
                    }
                    continue;
                }
                let mut rb = Vec::new();
                match sh.cfg.entries {
                    EntryMode::Copy => SyncRecord::Copy {
                        conv: o.conv,
                        seq: o.seq,
                        ts_ms: now,
                        entry: entry::StoreEntry {
                            body: entry::sync_body(&se),
                            ..se
                        },
                    },
                    EntryMode::Reference => SyncRecord::Ref {
                        conv: o.conv,
                        seq: o.seq,
                    },
                }
                .encode_into(&mut rb);
                let rb = Arc::new(rb);
                for (q, users) in c.recipients.iter().enumerate() {
                    let rcpt = with_removed(&sh, q, o, users, removed);
                    if rcpt.is_empty() {
                        continue;
                    }
                    per_shard[q].push(Item {
                        record: rb.clone(),
                        recipients: rcpt,
                        entry: entry.clone(),
                    });
                }
            }
        }
        bump(&sh.stats.messages, messages);
        bump(&sh.stats.read_fanout_deliveries, read_deliveries);
        let targets = per_shard.iter().filter(|v| !v.is_empty()).count();
        let mut acks: Vec<Ack> = w.ops.into_iter().filter_map(|o| o.ack).collect();
        acks.extend(extra);
        let batch = Arc::new(Batch {
            owner: self.p,
            no,
            latch: Latch::new(targets + 1),
            state: Mutex::new(BatchState {
                acks,
                ..Default::default()
            }),
            group_push,
        });
        self.inflight.insert(no, batch.clone());
        for (q, items) in per_shard.into_iter().enumerate() {
            if !items.is_empty() {
                self.hand_over(q, Delivery::new(batch.clone(), items));
            }
        }
        if batch.latch.arrive() {
            batch.finish(&sh);
        }
    }

    /// Stage 4, wait out a switch: the conversation turns to read fan-out with batch `no`: its later
    /// entries are read from the store, so they must not become visible
    /// before this batch's (write fan-out) entries are in every member's
    /// sync timeline, or a device could see them out of order. Rare (once
    /// per group), so the owner waits, but keeps delivering what other
    /// workers send it: two workers waiting like this at once each need the
    /// other's deliveries (a deadlock the W3 benchmark found when the wait
    /// only flushed the outbox). If the batch is deferred (a stall), the
    /// wait lasts until the disk has room; requests meanwhile get the
    /// stall's error, and a shutdown leaves the batch to recovery.
    fn wait_out_switch(&mut self, no: u64) {
        while self.sh.workers[self.p].window.done() < no {
            if self.pump() | self.reject_while_stalled() {
                continue;
            }
            // At shutdown, once nothing more can finish (this batch or an
            // earlier one waits on a stalled worker), recovery takes over.
            if self.sh.closing.load(Ordering::Acquire) && self.unfinished_are_deferred() {
                break;
            }
            self.idle_wait();
        }
    }

    /// The read-fan-out start a membership op leaves its conversation with.
    fn read_since_after(&self, op: &Op) -> u64 {
        let t = self.sh.cfg.hybrid_threshold;
        if let Event::Created { kind, members } = &op.event {
            let big_group = *kind == ConvKind::Group && members.len() > t;
            return if big_group { op.seq + 1 } else { 0 };
        }
        let convs = self.sh.dir.convs[self.p].read();
        let Some(c) = convs.get(&op.conv) else {
            return 0;
        };
        if c.read_since != 0 {
            return c.read_since;
        }
        match op.event {
            Event::Member {
                change: MemberChange::Add,
                ..
            } if c.kind == ConvKind::Group && c.current + 1 > t => op.seq + 1,
            _ => 0,
        }
    }

    fn is_read_fanout(&self, conv: ConvId) -> bool {
        self.sh.dir.convs[self.p]
            .read()
            .get(&conv)
            .is_some_and(|c| c.read_since != 0)
    }
}

/// Shard `q`'s recipients of `o`: the members, plus a member this batch
/// removed, who receives its own removal.
fn with_removed(
    sh: &Shared,
    q: usize,
    o: &Op,
    users: &Arc<Vec<Recipient>>,
    removed: &[(ConvId, UserId)],
) -> Arc<Vec<Recipient>> {
    let mut rcpt = users.clone();
    if matches!(o.event, Event::Member { .. }) {
        for &(rc, u) in removed {
            if rc == o.conv && sh.user_shard(u) == q {
                if let Some(us) = sh.dir.users[q].read().get(&u) {
                    Arc::make_mut(&mut rcpt).push((u, us.visible.clone()));
                }
            }
        }
    }
    rcpt
}

/// The catalog records an op implies, given its conversation's read-fan-out
/// start after it.
fn catalog_records(op: &Op, read_since: u64) -> Vec<CatalogRecord> {
    let member = |user, add, kind| CatalogRecord::Member {
        conv: op.conv,
        user,
        at: op.seq,
        add,
        kind,
        read_since,
    };
    match &op.event {
        Event::Message { .. } => Vec::new(),
        Event::Created { kind, members } => {
            members.iter().map(|&m| member(m, true, *kind)).collect()
        }
        Event::Member { user, change } => {
            vec![member(*user, *change == MemberChange::Add, ConvKind::Group)]
        }
        Event::Recall { target, .. } => vec![CatalogRecord::Recall {
            conv: op.conv,
            target: *target,
            at: op.seq,
        }],
    }
}

/// Apply a written catalog record to the directory (membership, mode,
/// recalls). Recovery replays the catalog through this too.
pub(crate) fn apply_op(sh: &Shared, p: usize, op_conv: ConvId, rec: &CatalogRecord) {
    let mut convs = sh.dir.convs[p].write();
    match *rec {
        CatalogRecord::Member {
            conv,
            user,
            at,
            add,
            kind,
            read_since,
        } => {
            debug_assert_eq!(conv, op_conv);
            let c = convs
                .entry(conv)
                .or_insert_with(|| directory::Conv::new(kind, sh.shards));
            let q = sh.user_shard(user);
            directory::apply_member(c, conv, user, q, at, add, &sh.dir.users[q]);
            let mark_read_group = |u: UserId| {
                let mut g = sh.dir.users[sh.user_shard(u)].write();
                let us = g.entry(u).or_default();
                if !us.read_groups.contains(&conv) {
                    us.read_groups.push(conv);
                }
            };
            if read_since != 0 && c.read_since == 0 {
                // The switch: every current member now reads this group.
                c.read_since = read_since;
                for r in c.recipients.iter().flat_map(|v| v.iter()) {
                    mark_read_group(r.0);
                }
            } else if c.read_since != 0 && add {
                mark_read_group(user);
            }
        }
        CatalogRecord::Recall { conv, target, .. } => {
            if let Some(c) = convs.get_mut(&conv) {
                if c.recalled.insert(target) {
                    sh.recalls.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        _ => {}
    }
}
