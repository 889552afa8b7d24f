//! In-memory conversation and user state: membership intervals, fan-out
//! mode, visibility watermarks, read markers. Rebuilt on open from the
//! catalog timelines. Sharded like the timelines (one `RwLock` per shard,
//! never one per conversation or user); each shard's entries are changed by
//! the worker that owns the shard, and read by any thread.

use crate::entry::ConvKind;
use crate::fanout::watermark::Watermark;
use crate::{ConvId, UserId};
use hashbrown::{HashMap, HashSet};
use parking_lot::RwLock;
use std::sync::Arc;

/// A current member and its sync timeline's watermark (shared with its
/// [`User`]: a delivery publishes through it without a map lookup).
pub(crate) type Recipient = (UserId, Arc<Watermark>);

/// A member's stays in a conversation: `[join, leave]` seq ranges, inclusive
/// (a member receives its own join and removal events); `leave` is
/// `u64::MAX` while it is a member.
pub(crate) type Intervals = Vec<(u64, u64)>;

pub(crate) fn covers(iv: &Intervals, seq: u64) -> bool {
    iv.iter().any(|&(a, b)| a <= seq && seq <= b)
}

/// Seqs in `(after, upto]` that fall in the member's stays: what it could
/// read there and has not (unread counts skip seqs from before it joined
/// and from between its stays).
pub(crate) fn count_within(iv: &Intervals, after: u64, upto: u64) -> u64 {
    iv.iter()
        .map(|&(a, b)| {
            let lo = a.max(after.saturating_add(1));
            let hi = b.min(upto);
            if hi >= lo {
                hi - lo + 1
            } else {
                0
            }
        })
        .sum()
}

pub(crate) fn is_current(iv: &Intervals) -> bool {
    iv.last().is_some_and(|&(_, b)| b == u64::MAX)
}

pub(crate) struct Conv {
    pub kind: ConvKind,
    /// Everyone who was ever a member.
    pub members: HashMap<UserId, Intervals>,
    pub current: usize,
    /// 0: write fan-out; else read fan-out from this seq on (a group that
    /// grew past the hybrid threshold; it never switches back).
    pub read_since: u64,
    /// Current members grouped by the shard of their sync timeline; a
    /// delivery holds the `Arc` (copy-on-write on membership changes).
    pub recipients: Vec<Arc<Vec<Recipient>>>,
    /// Store seqs at or below this are durable and fanned out to the store.
    pub visible: Watermark,
    pub recalled: HashSet<u64>,
}

impl Conv {
    pub(crate) fn new(kind: ConvKind, shards: usize) -> Self {
        Conv {
            kind,
            members: HashMap::new(),
            current: 0,
            read_since: 0,
            recipients: (0..shards).map(|_| Arc::new(Vec::new())).collect(),
            visible: Watermark::new(0),
            recalled: HashSet::new(),
        }
    }

    pub(crate) fn is_write_fanout(&self, seq: u64) -> bool {
        self.read_since == 0 || seq < self.read_since
    }

    /// Members at `seq` (recovery re-drives old batches with these).
    pub(crate) fn members_at(&self, seq: u64) -> Vec<UserId> {
        let mut v: Vec<UserId> = self
            .members
            .iter()
            .filter(|(_, iv)| covers(iv, seq))
            .map(|(&u, _)| u)
            .collect();
        v.sort_unstable();
        v
    }
}

#[derive(Default)]
pub(crate) struct User {
    /// Sync seqs at or below this are durable and may be returned.
    pub visible: Arc<Watermark>,
    /// Every conversation the user was ever in, in join order.
    pub convs: Vec<ConvId>,
    /// The read-fan-out groups among them (each sync polls these only).
    pub read_groups: Vec<ConvId>,
    pub read: HashMap<ConvId, u64>,
    pub deleted: HashSet<(ConvId, u64)>,
}

pub(crate) struct Directory {
    pub convs: Vec<RwLock<HashMap<ConvId, Conv>>>,
    pub users: Vec<RwLock<HashMap<UserId, User>>>,
}

impl Directory {
    pub(crate) fn new(shards: usize) -> Self {
        Directory {
            convs: (0..shards).map(|_| RwLock::new(HashMap::new())).collect(),
            users: (0..shards).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }
}

/// Apply one membership change (`add` or remove of `user` at `at`) to a
/// conversation and to the user's conversation list. Returns false if it
/// was already applied (recovery replays idempotently).
pub(crate) fn apply_member(
    conv: &mut Conv,
    conv_id: ConvId,
    user: UserId,
    user_shard: usize,
    at: u64,
    add: bool,
    users: &RwLock<HashMap<UserId, User>>,
) -> bool {
    let iv = conv.members.entry(user).or_default();
    if add {
        if is_current(iv) || iv.iter().any(|&(a, _)| a == at) {
            return false;
        }
        let first = iv.is_empty();
        iv.push((at, u64::MAX));
        conv.current += 1;
        let wm = {
            let mut g = users.write();
            let u = g.entry(user).or_default();
            if first {
                u.convs.push(conv_id);
            }
            u.visible.clone()
        };
        Arc::make_mut(&mut conv.recipients[user_shard]).push((user, wm));
    } else {
        match iv.last_mut() {
            Some(last) if last.1 == u64::MAX => last.1 = at,
            _ => return false,
        }
        conv.current -= 1;
        Arc::make_mut(&mut conv.recipients[user_shard]).retain(|r| r.0 != user);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::count_within;

    #[test]
    fn unread_counts_only_seqs_within_the_stays() {
        let iv = vec![(5, 9), (20, u64::MAX)];
        assert_eq!(count_within(&iv, 0, 30), 5 + 11);
        assert_eq!(count_within(&iv, 7, 30), 2 + 11);
        assert_eq!(count_within(&iv, 25, 30), 5);
        assert_eq!(count_within(&iv, 30, 30), 0);
        assert_eq!(count_within(&iv, 0, 4), 0);
    }
}
