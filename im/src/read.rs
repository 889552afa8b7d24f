//! The read side: sync, history, conversation lists. Readers never take a
//! worker's path: they read the engine directly, bounded by the watermarks
//! the workers publish once data is durable.

use crate::directory::{count_within, covers, is_current};
use crate::entry::{ConvKind, EventKind, StoreEntry, SyncRecord};
use crate::{
    bump, Body, ConvId, ConvSummary, Entry, GroupPage, HistoryFrom, HistoryPage, ImError, Result,
    Shared, SyncEntry, SyncReply, UserId,
};
use std::sync::atomic::Ordering;
use timeline_engine::{Direction, SeqId, TimelineId};
use timeline_engine::{Error, Record};

/// Most entries one call returns.
pub const MAX_PAGE: usize = 10_000;

pub(crate) fn body_of(e: &StoreEntry<'_>) -> Body {
    match e.kind {
        EventKind::Message => Body::Message(e.body.to_vec()),
        EventKind::Created => Body::Created {
            kind: ConvKind::from_u8(e.arg as u8).unwrap_or(ConvKind::Group),
        },
        EventKind::MemberAdded => Body::MemberAdded(e.arg),
        EventKind::MemberRemoved => Body::MemberRemoved(e.arg),
        EventKind::Recall => Body::Recall { target: e.arg },
    }
}

/// Mark recalled messages and the user's deletions.
fn finish(sh: &Shared, user: UserId, deleted_any: bool, mut e: Entry) -> Entry {
    if matches!(e.body, Body::Message(_)) {
        if sh.recalls.load(Ordering::Acquire) > 0 {
            let p = sh.conv_shard(e.conv);
            if sh.dir.convs[p]
                .read()
                .get(&e.conv)
                .is_some_and(|c| c.recalled.contains(&e.conv_seq))
            {
                e.body = Body::Recalled;
            }
        }
        if deleted_any {
            let q = sh.user_shard(user);
            if sh.dir.users[q]
                .read()
                .get(&user)
                .is_some_and(|u| u.deleted.contains(&(e.conv, e.conv_seq)))
            {
                e.body = Body::Deleted;
            }
        }
    }
    e
}

fn store_entry(conv: ConvId, rec: &Record) -> Result<Entry> {
    let se = StoreEntry::decode(&rec.payload)?;
    Ok(Entry {
        conv,
        conv_seq: rec.seq,
        sender: se.sender,
        timestamp_ms: rec.timestamp_ms,
        body: body_of(&se),
    })
}

fn sync_entry(sh: &Shared, user: UserId, rec: &Record) -> Result<Entry> {
    Ok(match SyncRecord::decode(&rec.payload)? {
        SyncRecord::Copy {
            conv,
            seq,
            ts_ms,
            entry,
        } => Entry {
            conv,
            conv_seq: seq,
            sender: entry.sender,
            timestamp_ms: ts_ms,
            body: body_of(&entry),
        },
        SyncRecord::Ref { conv, seq } => {
            bump(&sh.stats.store_reads, 1);
            let r = sh
                .engine
                .get(TimelineId::store(conv), seq)?
                .ok_or_else(|| {
                    ImError::Engine(Error::InvalidArgument(format!(
                        "sync entry {} of user {user} points at missing store entry {conv}/{seq}",
                        rec.seq
                    )))
                })?;
            store_entry(conv, &r)?
        }
        SyncRecord::ReadMarker { conv, seq } => Entry {
            conv,
            conv_seq: seq,
            sender: user,
            timestamp_ms: rec.timestamp_ms,
            body: Body::ReadMarker,
        },
        SyncRecord::Deleted { conv, seq } => Entry {
            conv,
            conv_seq: seq,
            sender: user,
            timestamp_ms: rec.timestamp_ms,
            body: Body::DeletedMarker,
        },
    })
}

pub(crate) fn sync(
    sh: &Shared,
    user: UserId,
    checkpoint: SeqId,
    limit: usize,
    groups: &[(ConvId, SeqId)],
) -> Result<SyncReply> {
    bump(&sh.stats.sync_calls, 1);
    let limit = limit.min(MAX_PAGE);
    let q = sh.user_shard(user);
    let mut reply = SyncReply {
        checkpoint,
        ..Default::default()
    };
    let (visible, convs, deleted_any) = match sh.dir.users[q].read().get(&user) {
        Some(u) => (
            u.visible.get(),
            u.read_groups.clone(),
            !u.deleted.is_empty(),
        ),
        None => return Ok(reply),
    };
    if checkpoint < visible {
        let tl = TimelineId::sync(user);
        // No up-front `first_retained_seq` (it walks the timeline's chain
        // back through its segments): a forward scan from below what the TTL
        // kept fails with `Truncated` and says where the data starts.
        if limit > 0 {
            let n = (visible - checkpoint).min(limit as u64) as usize;
            bump(&sh.stats.sync_reads, 1);
            match sh.engine.scan(tl, checkpoint + 1, n, Direction::Forward) {
                Err(Error::Truncated { first_retained, .. }) => {
                    reply.truncated = Some(first_retained);
                    reply.has_more = true;
                    return Ok(reply);
                }
                r => {
                    for rec in r? {
                        let e = sync_entry(sh, user, &rec)?;
                        reply.checkpoint = rec.seq;
                        reply.entries.push(SyncEntry {
                            seq: rec.seq,
                            entry: finish(sh, user, deleted_any, e),
                        });
                    }
                }
            }
        }
        reply.has_more = reply.checkpoint < visible;
    }
    if reply.has_more || reply.truncated.is_some() {
        // Groups are served once the sync timeline is drained: a group that
        // switched to read fan-out may still have earlier (write fan-out)
        // entries in this user's sync timeline, and a device must get each
        // conversation's entries in seq order.
        return Ok(reply);
    }
    // One page in all: what the sync timeline left of `limit` is shared by
    // the groups, in order; a group left out for want of room makes the
    // reply say `has_more` (the next sync serves it).
    let mut budget = limit.saturating_sub(reply.entries.len());
    for conv in convs {
        let p = sh.conv_shard(conv);
        let (iv, lo, hi) = {
            let g = sh.dir.convs[p].read();
            let Some(c) = g.get(&conv) else { continue };
            if c.read_since == 0 {
                continue;
            }
            bump(&sh.stats.group_polls, 1);
            let Some(iv) = c.members.get(&user) else {
                continue;
            };
            // The user's read-fan-out range: from its first stay that
            // reaches the switch, to its last seq (or the watermark).
            let Some(lo) = iv
                .iter()
                .filter(|&&(_, b)| b >= c.read_since)
                .map(|&(a, _)| a.max(c.read_since))
                .min()
            else {
                continue;
            };
            let hi = c.visible.get().min(iv.last().map_or(0, |l| l.1));
            (iv.clone(), lo, hi)
        };
        let cp = groups
            .iter()
            .find(|g| g.0 == conv)
            .map_or(lo - 1, |g| g.1)
            .max(lo - 1);
        if cp >= hi {
            continue;
        }
        if budget == 0 {
            reply.has_more = true;
            continue;
        }
        let n = (hi - cp).min(budget as u64) as usize;
        budget -= n;
        bump(&sh.stats.store_reads, 1);
        let recs = sh
            .engine
            .scan(TimelineId::store(conv), cp + 1, n, Direction::Forward)?;
        let mut page = GroupPage {
            conv,
            entries: Vec::with_capacity(recs.len()),
            checkpoint: cp,
            has_more: false,
        };
        for rec in &recs {
            page.checkpoint = rec.seq;
            if covers(&iv, rec.seq) {
                let e = store_entry(conv, rec)?;
                page.entries.push(finish(sh, user, deleted_any, e));
            }
        }
        page.has_more = page.checkpoint < hi;
        reply.groups.push(page);
    }
    Ok(reply)
}

pub(crate) fn history(
    sh: &Shared,
    conv: ConvId,
    user: UserId,
    from: HistoryFrom,
    limit: usize,
) -> Result<HistoryPage> {
    let limit = limit.min(MAX_PAGE);
    let p = sh.conv_shard(conv);
    let (iv, hi_bound) = {
        let g = sh.dir.convs[p].read();
        let c = g.get(&conv).ok_or(ImError::NoSuchConversation(conv))?;
        let iv = c
            .members
            .get(&user)
            .cloned()
            .ok_or(ImError::NotMember { conv, user })?;
        let hi = c.visible.get().min(iv.last().map_or(0, |l| l.1));
        (iv, hi)
    };
    let deleted_any = sh.dir.users[sh.user_shard(user)]
        .read()
        .get(&user)
        .is_some_and(|u| !u.deleted.is_empty());
    let lo_bound = iv.first().map_or(1, |f| f.0);
    let mut page = HistoryPage {
        entries: Vec::new(),
        has_more: false,
    };
    if limit == 0 {
        // Like SYNC: an empty page that says whether there is more.
        page.has_more = match from {
            HistoryFrom::Before(s) => s.saturating_sub(1).min(hi_bound) >= lo_bound,
            HistoryFrom::After(s) => s.saturating_add(1).max(lo_bound) <= hi_bound,
        };
        return Ok(page);
    }
    let tl = TimelineId::store(conv);
    // A start between two stays moves to the nearest stay in the paging
    // direction, so a page holds an entry whenever one is left (a page
    // of a gap alone would say `has_more` with nothing to move on from).
    let (recs, dir_fwd) = match from {
        HistoryFrom::Before(s) => {
            let hi = s.saturating_sub(1).min(hi_bound);
            let hi = iv
                .iter()
                .rev()
                .find(|st| st.0 <= hi)
                .map_or(0, |st| st.1.min(hi));
            if hi < lo_bound {
                return Ok(page);
            }
            let n = ((hi - lo_bound + 1).min(limit as u64)) as usize;
            (sh.engine.scan(tl, hi, n, Direction::Backward)?, false)
        }
        HistoryFrom::After(s) => {
            let lo = s.saturating_add(1).max(lo_bound);
            let lo = iv
                .iter()
                .find(|st| st.1 >= lo)
                .map_or(u64::MAX, |st| st.0.max(lo));
            if lo > hi_bound {
                return Ok(page);
            }
            let n = ((hi_bound - lo + 1).min(limit as u64)) as usize;
            (sh.engine.scan(tl, lo, n, Direction::Forward)?, true)
        }
    };
    bump(&sh.stats.store_reads, 1);
    let mut edge = None;
    for rec in &recs {
        edge = Some(rec.seq);
        if covers(&iv, rec.seq) {
            let e = store_entry(conv, rec)?;
            page.entries.push(finish(sh, user, deleted_any, e));
        }
    }
    page.has_more = match edge {
        Some(e) if dir_fwd => e < hi_bound,
        Some(e) => e > lo_bound,
        None => false,
    };
    Ok(page)
}

pub(crate) fn conversations(sh: &Shared, user: UserId) -> Result<Vec<ConvSummary>> {
    let q = sh.user_shard(user);
    let (convs, read) = match sh.dir.users[q].read().get(&user) {
        Some(u) => (u.convs.clone(), u.read.clone()),
        None => return Ok(Vec::new()),
    };
    let mut out = Vec::with_capacity(convs.len());
    for conv in convs {
        let p = sh.conv_shard(conv);
        let (kind, iv, last_seq, read_fanout) = {
            let g = sh.dir.convs[p].read();
            let Some(c) = g.get(&conv) else { continue };
            let Some(iv) = c.members.get(&user) else {
                continue;
            };
            let last = c.visible.get().min(iv.last().map_or(0, |l| l.1));
            (c.kind, iv.clone(), last, c.read_since != 0)
        };
        let read_seq = read.get(&conv).copied().unwrap_or(0);
        let skip = not_unread(sh, conv, user, &iv, read_seq, last_seq)?;
        out.push(ConvSummary {
            conv,
            kind,
            last_seq,
            read_seq,
            unread: count_within(&iv, read_seq, last_seq).saturating_sub(skip),
            member: is_current(&iv),
            read_fanout,
        });
    }
    Ok(out)
}

/// A message or recall of `user`'s (events carry no sender).
fn sent_by(e: &StoreEntry<'_>, user: UserId) -> bool {
    matches!(e.kind, EventKind::Message | EventKind::Recall) && e.sender == user
}

/// How many entries in `(after, upto]` within the member's stays are not
/// unread although counted as seqs: those `user` sent itself, and those a
/// store TTL dropped (nobody can read them any more). Read from the
/// conversation's store timeline, so it holds across restarts without a
/// counter to keep; the cost grows with the unread count, not with the
/// history.
fn not_unread(
    sh: &Shared,
    conv: ConvId,
    user: UserId,
    iv: &crate::directory::Intervals,
    after: u64,
    upto: u64,
) -> Result<u64> {
    const PAGE: usize = 1024;
    let tl = TimelineId::store(conv);
    let mut skip = 0;
    for &(a, b) in iv {
        let (mut lo, hi) = (a.max(after.saturating_add(1)), b.min(upto));
        while lo <= hi {
            let n = ((hi - lo + 1).min(PAGE as u64)) as usize;
            let recs = match sh.engine.scan(tl, lo, n, Direction::Forward) {
                Err(Error::Truncated { first_retained, .. }) if first_retained > lo => {
                    skip += first_retained.min(hi + 1) - lo;
                    lo = first_retained;
                    continue;
                }
                r => r?,
            };
            let Some(last) = recs.last() else { break };
            for r in &recs {
                if r.seq <= hi && sent_by(&StoreEntry::decode(&r.payload)?, user) {
                    skip += 1;
                }
            }
            lo = last.seq + 1;
        }
    }
    Ok(skip)
}

pub(crate) fn members(sh: &Shared, conv: ConvId) -> Result<Vec<UserId>> {
    let p = sh.conv_shard(conv);
    let g = sh.dir.convs[p].read();
    let c = g.get(&conv).ok_or(ImError::NoSuchConversation(conv))?;
    let mut v: Vec<UserId> = c
        .recipients
        .iter()
        .flat_map(|v| v.iter().map(|r| r.0))
        .collect();
    v.sort_unstable();
    Ok(v)
}
