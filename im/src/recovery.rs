//! Opening the IM layer: replay the catalogs, rebuild the dedup maps from
//! the journals, and complete every fan-out a crash interrupted.
//!
//! Invariants it relies on (`docs/design.md`, "Recovery of an interrupted
//! fan-out"):
//! * a batch's journal intent, conversation records and catalog records are
//!   one engine write in one shard, intent first: after a crash a prefix of
//!   it survives, so a surviving conversation record has its intent, and a
//!   surviving catalog record has its conversation record;
//! * the journal's `done n` mark is written only after every batch `<= n`
//!   delivered all its sync entries (durably, under group commit);
//! * a receiving worker appends each owner's deliveries in batch order, so
//!   the entries of one conversation a crash left out of a user's sync
//!   timeline are a suffix of that conversation's entries there.

use crate::directory::covers;
use crate::entry::{CatalogRecord, EventKind, IntentOp, JournalRecord, StoreEntry, SyncRecord};
use crate::worker::{apply_op, Recovered};
use crate::{ConvId, EntryMode, Result, Shared, UserId};
use hashbrown::{HashMap, HashSet};
use timeline_engine::Keyspace;
use timeline_engine::{Direction, TimelineId};

const PAGE: usize = 1024;
/// Sync entries of a batch are appended after its intent; allow this much
/// clock disagreement when looking back for them.
const CLOCK_SLACK_MS: u64 = 60_000;

pub(crate) fn recover(sh: &Shared) -> Result<Vec<Recovered>> {
    for p in 0..sh.shards {
        replay_catalog(sh, p)?;
    }
    let mut states = Vec::with_capacity(sh.shards);
    for p in 0..sh.shards {
        let (st, pending) = scan_journal(sh, p)?;
        complete(sh, p, &pending)?;
        states.push(st);
    }
    sh.engine.sync()?;
    for g in &sh.dir.convs {
        for (&id, c) in g.read().iter() {
            c.visible.publish(sh.engine.last_seq(TimelineId::store(id)));
        }
    }
    for g in &sh.dir.users {
        for (&id, u) in g.read().iter() {
            u.visible.publish(sh.engine.last_seq(TimelineId::sync(id)));
        }
    }
    Ok(states)
}

/// `decoded`, or the open refused with the record's place logged. A record
/// recovery cannot read is never skipped: a lost membership change or
/// recall would change who may read what.
fn placed<T>(
    tl: TimelineId,
    seq: u64,
    decoded: std::result::Result<T, crate::entry::DecodeError>,
) -> Result<T> {
    decoded.map_err(|e| {
        tracing::error!(keyspace = tl.keyspace.0, timeline = tl.id, seq, error = %e,
            "an IM record does not decode: the open is refused");
        e.into()
    })
}

fn replay_catalog(sh: &Shared, p: usize) -> Result<()> {
    let tl = TimelineId::store(sh.catalog[p]);
    let mut from = 1;
    loop {
        let recs = sh.engine.scan(tl, from, PAGE, Direction::Forward)?;
        let Some(last) = recs.last() else { break };
        from = last.seq + 1;
        for r in &recs {
            let rec = placed(tl, r.seq, CatalogRecord::decode(&r.payload))?;
            match rec {
                CatalogRecord::Member { conv, .. } | CatalogRecord::Recall { conv, .. } => {
                    apply_op(sh, p, conv, &rec)
                }
                CatalogRecord::ReadMark { user, conv, seq } => {
                    let mut g = sh.dir.users[p].write();
                    let m = g.entry(user).or_default().read.entry(conv).or_insert(0);
                    *m = (*m).max(seq);
                }
                CatalogRecord::Delete { user, conv, seq } => {
                    sh.dir.users[p]
                        .write()
                        .entry(user)
                        .or_default()
                        .deleted
                        .insert((conv, seq));
                }
            }
        }
    }
    Ok(())
}

struct PendingBatch {
    ts_ms: u64,
    ops: Vec<IntentOp>,
}

/// Walk the journal newest-first: the intents after the last `done` mark
/// (to complete), and, within the dedup window, every send's idempotency key.
fn scan_journal(sh: &Shared, p: usize) -> Result<(Recovered, Vec<PendingBatch>)> {
    let tl = TimelineId::store(sh.journal[p]);
    let now = sh.now_ms();
    let window = sh
        .cfg
        .dedup_window
        .or(sh.engine.config().keyspace(Keyspace::SYNC).ttl)
        .map_or(u64::MAX, |d| d.as_millis() as u64);
    let floor = now.saturating_sub(window);
    let mut done: Option<u64> = None;
    let mut max_batch = 0u64;
    let mut pending = Vec::new();
    let mut claimed: HashSet<(ConvId, u64)> = HashSet::new();
    let mut keys = Vec::new();
    let mut dedup = HashMap::new();
    let mut cursor = sh.engine.last_seq(tl);
    'outer: while cursor > 0 {
        let recs = sh.engine.scan(tl, cursor, PAGE, Direction::Backward)?;
        let Some(oldest) = recs.last() else { break };
        cursor = oldest.seq - 1;
        for r in &recs {
            match placed(tl, r.seq, JournalRecord::decode(&r.payload))? {
                JournalRecord::Done { batch } => {
                    if done.is_none() {
                        done = Some(batch);
                    }
                    max_batch = max_batch.max(batch);
                }
                JournalRecord::Intent { batch, ops } => {
                    max_batch = max_batch.max(batch);
                    let settled = done.is_some_and(|d| batch <= d);
                    if settled && r.timestamp_ms < floor {
                        break 'outer;
                    }
                    for o in &ops {
                        // The newest intent claiming a seq is the one whose
                        // records exist: an older claim lost a torn write.
                        if !claimed.insert((o.conv, o.seq)) {
                            continue;
                        }
                        if o.kind == EventKind::Message
                            && r.timestamp_ms >= floor
                            && o.seq <= sh.engine.last_seq(TimelineId::store(o.conv))
                        {
                            let key = (o.conv, o.sender, o.cmid);
                            if dedup.try_insert_compat(key, (o.seq, batch)) {
                                keys.push((r.timestamp_ms, key));
                            }
                        }
                    }
                    if !settled {
                        pending.push(PendingBatch {
                            ts_ms: r.timestamp_ms,
                            ops,
                        });
                    }
                }
            }
        }
    }
    pending.reverse(); // oldest first
    keys.reverse();
    // A damaged journal could claim any batch number; the completion window
    // packs `done` into the word's top 40 bits (a batch a microsecond is
    // 12 days' worth of 2^40, no writer gets near it), and a larger one
    // would wrap and leave the worker without room for good.
    let next = max_batch
        .checked_add(1)
        .filter(|&n| n < crate::fanout::watermark::MAX_BATCH)
        .ok_or_else(|| {
            crate::ImError::InvalidArgument(format!(
                "journal of shard {p} claims batch {max_batch}: damaged"
            ))
        })?;
    let mut st = Recovered::new(next);
    st.dedup = dedup;
    st.dedup_order = keys.into();
    Ok((st, pending))
}

trait TryInsert<K, V> {
    fn try_insert_compat(&mut self, k: K, v: V) -> bool;
}

impl<K: std::hash::Hash + Eq, V> TryInsert<K, V> for HashMap<K, V> {
    fn try_insert_compat(&mut self, k: K, v: V) -> bool {
        match self.entry(k) {
            hashbrown::hash_map::Entry::Occupied(_) => false,
            hashbrown::hash_map::Entry::Vacant(e) => {
                e.insert(v);
                true
            }
        }
    }
}

/// Re-drive the pending batches of shard `p`, oldest first.
fn complete(sh: &Shared, p: usize, pending: &[PendingBatch]) -> Result<()> {
    let Some(oldest) = pending.first() else {
        return Ok(());
    };
    let since = oldest.ts_ms.saturating_sub(CLOCK_SLACK_MS);
    let mut present: HashMap<UserId, HashSet<(ConvId, u64)>> = HashMap::new();
    let mut repaired = 0usize;
    let mut redelivered = 0usize;
    for b in pending {
        for o in &b.ops {
            let tl = TimelineId::store(o.conv);
            if o.seq > sh.engine.last_seq(tl) {
                continue; // the write was lost with the crash; never acknowledged
            }
            let Some(rec) = sh.engine.get(tl, o.seq)? else {
                continue;
            };
            let se = placed(tl, o.seq, StoreEntry::decode(&rec.payload))?;
            if se.kind != o.kind || se.sender != o.sender || se.cmid != o.cmid || se.arg != o.arg {
                continue; // a stale claim: the seq was reused by a later batch
            }
            repaired += repair_catalog(sh, p, o, &se)?;
            let recipients = {
                let g = sh.dir.convs[p].read();
                match g.get(&o.conv) {
                    Some(c) if c.is_write_fanout(o.seq) => c.members_at(o.seq),
                    _ => continue,
                }
            };
            let mut record = Vec::new();
            match sh.cfg.entries {
                EntryMode::Copy => SyncRecord::Copy {
                    conv: o.conv,
                    seq: o.seq,
                    ts_ms: rec.timestamp_ms,
                    entry: StoreEntry {
                        body: crate::entry::sync_body(&se),
                        ..se
                    },
                },
                EntryMode::Reference => SyncRecord::Ref {
                    conv: o.conv,
                    seq: o.seq,
                },
            }
            .encode_into(&mut record);
            let mut items = Vec::new();
            for u in recipients {
                let set = match present.entry(u) {
                    hashbrown::hash_map::Entry::Occupied(e) => e.into_mut(),
                    hashbrown::hash_map::Entry::Vacant(e) => {
                        e.insert(recent_entries(sh, u, since)?)
                    }
                };
                if set.insert((o.conv, o.seq)) {
                    items.push((TimelineId::sync(u), &record[..]));
                }
            }
            if !items.is_empty() {
                redelivered += items.len();
                sh.engine.append_batch(&items, sh.cfg.durability)?;
            }
        }
    }
    if repaired + redelivered > 0 {
        tracing::info!(
            shard = p,
            batches = pending.len(),
            repaired,
            redelivered,
            "completed interrupted fan-out"
        );
    }
    Ok(())
}

/// `(conv, seq)` of the sync entries `user` received since `since_ms`.
fn recent_entries(sh: &Shared, user: UserId, since_ms: u64) -> Result<HashSet<(ConvId, u64)>> {
    let tl = TimelineId::sync(user);
    let mut set = HashSet::new();
    let mut cursor = u64::MAX;
    loop {
        let recs = match sh.engine.scan(tl, cursor, PAGE, Direction::Backward) {
            Ok(r) => r,
            Err(timeline_engine::Error::Truncated { .. }) => break,
            Err(e) => return Err(e.into()),
        };
        let Some(oldest) = recs.last() else { break };
        cursor = oldest.seq.saturating_sub(1);
        for r in &recs {
            if r.timestamp_ms < since_ms {
                return Ok(set);
            }
            match placed(tl, r.seq, SyncRecord::decode(&r.payload))? {
                SyncRecord::Copy { conv, seq, .. } | SyncRecord::Ref { conv, seq } => {
                    set.insert((conv, seq));
                }
                _ => {}
            }
        }
        if cursor == 0 {
            break;
        }
    }
    Ok(set)
}

/// Re-create the catalog record of a membership or recall op whose write
/// lost it (the conversation record survived). Returns 1 if it did.
fn repair_catalog(sh: &Shared, p: usize, o: &IntentOp, se: &StoreEntry<'_>) -> Result<usize> {
    let t = sh.cfg.hybrid_threshold;
    let rec = {
        let g = sh.dir.convs[p].read();
        let c = g.get(&o.conv);
        match o.kind {
            EventKind::Created => {
                // A torn write can keep the `Created` record and only some of
                // its members' catalog records: add the missing ones (review:
                // this used to run only when no member record survived).
                let kind = crate::entry::ConvKind::from_u8(o.arg as u8)
                    .unwrap_or(crate::entry::ConvKind::Group);
                let members: Vec<UserId> = crate::entry::created_members(se.body);
                let rs = if kind == crate::entry::ConvKind::Group && members.len() > t {
                    o.seq + 1
                } else {
                    0
                };
                let has = |m: &UserId| {
                    c.and_then(|c| c.members.get(m))
                        .is_some_and(|iv| iv.iter().any(|&(a, _)| a == o.seq))
                };
                members
                    .into_iter()
                    .filter(|m| !has(m))
                    .map(|m| CatalogRecord::Member {
                        conv: o.conv,
                        user: m,
                        at: o.seq,
                        add: true,
                        kind,
                        read_since: rs,
                    })
                    .collect()
            }
            EventKind::MemberAdded | EventKind::MemberRemoved => {
                let Some(c) = c else { return Ok(0) };
                let add = o.kind == EventKind::MemberAdded;
                let iv = c.members.get(&o.arg);
                let applied = iv.is_some_and(|iv| {
                    iv.iter()
                        .any(|&(a, b)| if add { a == o.seq } else { b == o.seq })
                });
                if applied || (!add && !iv.is_some_and(|iv| covers(iv, o.seq))) {
                    return Ok(0);
                }
                let rs = if c.read_since != 0 {
                    c.read_since
                } else if add && c.current + 1 > t {
                    o.seq + 1
                } else {
                    0
                };
                vec![CatalogRecord::Member {
                    conv: o.conv,
                    user: o.arg,
                    at: o.seq,
                    add,
                    kind: c.kind,
                    read_since: rs,
                }]
            }
            EventKind::Recall => {
                let Some(c) = c else { return Ok(0) };
                if c.recalled.contains(&o.arg) {
                    return Ok(0);
                }
                vec![CatalogRecord::Recall {
                    conv: o.conv,
                    target: o.arg,
                    at: o.seq,
                }]
            }
            _ => return Ok(0),
        }
    };
    if rec.is_empty() {
        return Ok(0);
    }
    let bufs: Vec<Vec<u8>> = rec
        .iter()
        .map(|r| {
            let mut b = Vec::new();
            r.encode_into(&mut b);
            b
        })
        .collect();
    let ctl = TimelineId::store(sh.catalog[p]);
    let items: Vec<(TimelineId, &[u8])> = bufs.iter().map(|b| (ctl, &b[..])).collect();
    sh.engine.append_batch(&items, sh.cfg.durability)?;
    for r in &rec {
        apply_op(sh, p, o.conv, r);
    }
    Ok(1)
}
