//! Conversation membership on a cluster (`ADD_MEMBER`, `REMOVE_MEMBER`;
//! docs/scaling.md, "Membership changes").
//!
//! - A conversation's members are its `Created` event's (seq 1), changed
//!   by [`Command::ImMember`](crate::Command::ImMember) entries of its
//!   partition. Applying one lists the change in the conversation's
//!   [`IM_MEMBERS`] timeline (`op u8 | user u64 | at u64`: `at` is the
//!   conv seq of its event), then stores a `MemberAdded` / `MemberRemoved`
//!   event at `at`, delivered through the outbox as a message is.
//! - So "the members at seq s" is the `Created` list with every change
//!   listed at a seq below `s` applied: the deliverer reads it for each
//!   outbox record (an add or a removal after a message never changes who
//!   gets that message), and `HISTORY`, group pages, marks and
//!   `CONVERSATIONS` read a user's **stays**: `[join, leave]` seq ranges,
//!   inclusive (a member receives its own join and removal events), as on
//!   a single node.
//! - **Hybrid.** An add that takes a write-fan-out group past the hybrid
//!   threshold (carried in the entry, so every replica decides alike) is
//!   listed as the **switch**: from the next seq on the group is read
//!   fan-out for good ([`Members::read_since`]). The switching event
//!   itself is delivered to every member, and listing the group among
//!   each member's read-fan-out groups is part of applying it.
//!
//! [`IM_MEMBERS`]: crate::log_store::IM_MEMBERS

use crate::im::read::{self, ReadError};
use crate::im::{ImRefusal, CONV_READ_GROUP};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use timeline_engine::{Engine, TimelineId};

/// One listed change: the entry's write id, whom, at which conv seq,
/// and whether this add switched the group to read fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub write_id: u64,
    pub user: u64,
    pub at: u64,
    pub add: bool,
    pub switch: bool,
}

const CHANGE_LEN: usize = 17;

impl Change {
    /// The record after the write id: `op u8 | user u64 | at u64`, op 0
    /// remove, 1 add, 2 add and switch to read fan-out.
    pub fn record(&self) -> [u8; CHANGE_LEN] {
        let mut b = [0u8; CHANGE_LEN];
        b[0] = match (self.add, self.switch) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        };
        b[1..9].copy_from_slice(&self.user.to_le_bytes());
        b[9..].copy_from_slice(&self.at.to_le_bytes());
        b
    }

    pub fn decode(write_id: u64, b: &[u8]) -> Option<Change> {
        if b.len() != CHANGE_LEN || b[0] > 2 {
            return None;
        }
        Some(Change {
            write_id,
            add: b[0] >= 1,
            switch: b[0] == 2,
            user: u64::from_le_bytes(b[1..9].try_into().ok()?),
            at: u64::from_le_bytes(b[9..].try_into().ok()?),
        })
    }
}

/// Conversations' members as read from one engine. A conversation's
/// `Created` record never changes and its `im-members` list is only
/// appended to, so what was read stays true: each [`Members`] knows the
/// last seq of the list it holds, a lookup that finds the list longer
/// reads only the records past it and extends a copy, and one that finds
/// it the same length takes it as is. A group's members are read for
/// every page, probe and delivery round of it: rebuilding a 5,000-member
/// set each time was most of a node's CPU under W4, and reading the whole
/// list again after each change made growing a group member by member
/// quadratic. Bounded by member ids held, cleared whole when full.
pub struct MembersCache {
    most: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    by_conv: HashMap<u64, Arc<Members>>,
    ids: usize,
}

impl MembersCache {
    /// A cache of at most `most` member ids (`Created` members and listed
    /// changes).
    pub fn new(most: usize) -> MembersCache {
        MembersCache {
            most,
            held: Mutex::new(Held::default()),
        }
    }

    /// `conv`'s members as `e` holds them now, or why it has none
    /// ([`read::members`]; refusals are not kept).
    pub fn get(&self, e: &Engine, conv: u64) -> Result<Result<Arc<Members>, ImRefusal>, ReadError> {
        let listed = e.last_seq(TimelineId::new(crate::log_store::IM_MEMBERS, conv));
        let held = self.held.lock().by_conv.get(&conv).cloned();
        let m = match held {
            // The same length, or longer: read since `listed` was taken,
            // by another reader (a result newer than asked is as good).
            Some(m) if m.listed >= listed => return Ok(Ok(m)),
            // Only the changes listed since.
            Some(m) if m.listed < listed => Arc::new(read::members_since(e, conv, &m)?),
            _ => match read::members(e, conv)? {
                Err(r) => return Ok(Err(r)),
                Ok(m) => Arc::new(m),
            },
        };
        let mut h = self.held.lock();
        if h.ids + m.size() > self.most {
            h.by_conv.clear();
            h.ids = 0;
        }
        h.ids += m.size();
        if let Some(old) = h.by_conv.insert(conv, m.clone()) {
            h.ids -= old.size().min(h.ids);
        }
        Ok(Ok(m))
    }

    /// Forget everything (the engine's data was replaced).
    pub fn clear(&self) {
        let mut h = self.held.lock();
        h.by_conv.clear();
        h.ids = 0;
    }
}

/// A user's stays in a conversation: `[join, leave]` seq ranges,
/// inclusive; `leave` is `u64::MAX` while it is a member.
pub type Stays = Vec<(u64, u64)>;

/// A conversation's kind (as created), its `Created` members and its
/// listed changes, with what an entry's apply asks of them at hand (the
/// members now, the read-fan-out start): built once per read, so a
/// state machine that keeps it answers each `SEND` without reading the
/// list again (`state_machine`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    pub kind: u8,
    created: Vec<u64>,
    changes: Vec<Change>,
    now: HashSet<u64>,
    since: u64,
    /// The largest write id among the changes (0: none).
    newest: u64,
    /// The last seq of the `im-members` list the changes are read through
    /// (0: none read).
    listed: u64,
}

impl Members {
    pub fn new(kind: u8, created: Vec<u64>, changes: Vec<Change>) -> Members {
        let mut now: HashSet<u64> = created.iter().copied().collect();
        for c in &changes {
            match c.add {
                true => now.insert(c.user),
                false => now.remove(&c.user),
            };
        }
        let since = match kind {
            CONV_READ_GROUP => 2,
            _ => changes.iter().find(|c| c.switch).map_or(0, |c| c.at + 1),
        };
        let newest = changes.iter().map(|c| c.write_id).max().unwrap_or(0);
        Members {
            kind,
            created,
            changes,
            now,
            since,
            newest,
            listed: 0,
        }
    }

    /// These members, read through seq `listed` of the `im-members` list.
    pub fn through(mut self, listed: u64) -> Members {
        self.listed = listed;
        self
    }

    /// These members with `more` changes, listed after the ones held, read
    /// through seq `listed` of the list: what [`Members::new`] would make
    /// of all the changes, without going over the earlier ones again.
    pub fn extended(&self, more: &[Change], listed: u64) -> Members {
        let mut m = self.clone();
        for c in more {
            match c.add {
                true => m.now.insert(c.user),
                false => m.now.remove(&c.user),
            };
            // The first switch decides (a group created read fan-out is
            // read fan-out from 2 already).
            if m.since == 0 && c.switch {
                m.since = c.at + 1;
            }
            m.newest = m.newest.max(c.write_id);
        }
        m.changes.extend_from_slice(more);
        m.listed = listed;
        m
    }

    /// The members as entry `w` is applied: the changes of earlier
    /// entries only. Not its own (its apply was cut short by a restart
    /// after that first write), nor a later entry's (a power cut kept a
    /// later change's list record but lost this entry's writes, which are
    /// then applied again). Shared as it is when every change is earlier
    /// (the usual case).
    pub fn before(self: &Arc<Members>, w: u64) -> Arc<Members> {
        if self.newest < w {
            return self.clone();
        }
        let changes = self.changes.iter().filter(|c| c.write_id < w).copied();
        Arc::new(Members::new(
            self.kind,
            self.created.clone(),
            changes.collect(),
        ))
    }

    /// How many members now.
    pub fn count(&self) -> usize {
        self.now.len()
    }

    /// The last seq of the `im-members` list read into this (0: none).
    pub fn listed(&self) -> u64 {
        self.listed
    }

    /// The `Created` members and the changes listed: what holding this
    /// costs, in ids.
    pub fn size(&self) -> usize {
        self.created.len() + self.changes.len()
    }

    /// The first seq read fan-out (0: write fan-out throughout): 2 for a
    /// group created read fan-out (its `Created` event is delivered), the
    /// seq after the switching add for one that grew past the threshold.
    pub fn read_since(&self) -> u64 {
        self.since
    }

    /// Is the entry at `seq` read fan-out (stored only)?
    pub fn read_fanout_at(&self, seq: u64) -> bool {
        let r = self.read_since();
        r != 0 && seq >= r
    }

    /// The conversation kind after the entry at `seq` (what a delivery of
    /// it tells the member's partition).
    pub fn kind_after(&self, seq: u64) -> u8 {
        match self.read_fanout_at(seq + 1) {
            true => CONV_READ_GROUP,
            false => self.kind,
        }
    }

    /// Who gets the entry at `seq` in its sync timeline: the recipients
    /// of a write-fan-out entry; of a read-fan-out one, only the user a
    /// membership change names (the others read it in the group's pages).
    pub fn deliver_to(&self, seq: u64) -> Vec<u64> {
        match (self.read_fanout_at(seq), self.change_at(seq)) {
            (false, _) => self.recipients(seq),
            (true, Some(c)) => vec![c.user],
            (true, None) => Vec::new(),
        }
    }

    /// The members now, in id order.
    pub fn current(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.now.iter().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn is_current(&self, user: u64) -> bool {
        self.now.contains(&user)
    }

    /// The members with every change listed below seq `seq` applied.
    fn upto(&self, seq: u64) -> BTreeSet<u64> {
        let mut m: BTreeSet<u64> = self.created.iter().copied().collect();
        for c in self.changes.iter().filter(|c| c.at < seq) {
            match c.add {
                true => m.insert(c.user),
                false => m.remove(&c.user),
            };
        }
        m
    }

    /// Who receives the event at conv seq `seq`: the members then, and
    /// the user a change at `seq` names (a removed member receives its
    /// own removal).
    pub fn recipients(&self, seq: u64) -> Vec<u64> {
        let mut m = self.upto(seq);
        if let Some(c) = self.changes.iter().find(|c| c.at == seq) {
            m.insert(c.user);
        }
        m.into_iter().collect()
    }

    /// The change stored at conv seq `seq`, if that seq is one.
    pub fn change_at(&self, seq: u64) -> Option<Change> {
        self.changes.iter().find(|c| c.at == seq).copied()
    }

    /// `user`'s stays (empty: never a member).
    pub fn stays(&self, user: u64) -> Stays {
        let mut out: Stays = Vec::new();
        if self.created.contains(&user) {
            out.push((1, u64::MAX));
        }
        for c in self.changes.iter().filter(|c| c.user == user) {
            match (c.add, out.last_mut()) {
                (true, _) => out.push((c.at, u64::MAX)),
                (false, Some(last)) => last.1 = c.at,
                (false, None) => {} // not listed as a member: nothing to end
            }
        }
        out
    }
}

/// Is `seq` inside one of `stays`?
pub fn covers(stays: &Stays, seq: u64) -> bool {
    stays.iter().any(|&(a, b)| a <= seq && seq <= b)
}

/// The last seq `stays` reach, of a conversation whose last seq is
/// `last` (0: never a member).
pub fn upper(stays: &Stays, last: u64) -> u64 {
    stays.last().map_or(0, |s| s.1.min(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(w: u64, user: u64, at: u64, add: bool) -> Change {
        Change {
            write_id: w,
            user,
            at,
            add,
            switch: false,
        }
    }

    #[test]
    fn members_at_a_seq_follow_the_changes_listed_below_it() {
        let m = Members::new(
            2,
            vec![1, 2],
            vec![
                change(10, 3, 4, true),
                change(11, 1, 6, false),
                change(12, 1, 8, true),
            ],
        );
        assert_eq!(m.recipients(1), vec![1, 2]);
        assert_eq!(m.recipients(3), vec![1, 2]);
        assert_eq!(
            m.recipients(4),
            vec![1, 2, 3],
            "the added user gets its join"
        );
        assert_eq!(
            m.recipients(6),
            vec![1, 2, 3],
            "the removed user its removal"
        );
        assert_eq!(m.recipients(7), vec![2, 3]);
        assert_eq!(m.recipients(9), vec![1, 2, 3]);
        assert_eq!(m.current(), vec![1, 2, 3]);
        assert!(m.is_current(1) && m.is_current(3) && !m.is_current(4));
        assert_eq!(m.stays(1), vec![(1, 6), (8, u64::MAX)]);
        assert_eq!(m.stays(3), vec![(4, u64::MAX)]);
        assert_eq!(m.stays(4), Vec::<(u64, u64)>::new());
        assert!(covers(&m.stays(1), 6) && !covers(&m.stays(1), 7));
        assert_eq!(upper(&m.stays(1), 20), 20);
        let shared = Arc::new(m.clone());
        assert!(
            Arc::ptr_eq(&shared.before(13), &shared),
            "no copy when all is earlier"
        );
        assert_eq!(m.count(), 3);
        let cut = shared.before(12);
        assert!(!cut.is_current(1));
        assert_eq!(upper(&cut.stays(1), 20), 6);
        assert_eq!(m.change_at(6), Some(change(11, 1, 6, false)));
        assert_eq!(m.change_at(5), None);
    }

    #[test]
    fn a_switching_add_makes_later_entries_read_fanout() {
        let switch = Change {
            switch: true,
            ..change(11, 4, 5, true)
        };
        let m = Members::new(2, vec![1, 2], vec![change(10, 3, 3, true), switch]);
        assert_eq!(m.read_since(), 6);
        assert!(!m.read_fanout_at(5) && m.read_fanout_at(6));
        assert_eq!((m.kind_after(4), m.kind_after(5)), (2, CONV_READ_GROUP));
        assert_eq!(m.deliver_to(4), vec![1, 2, 3]);
        assert_eq!(m.deliver_to(5), vec![1, 2, 3, 4], "the switch reaches all");
        assert_eq!(m.deliver_to(6), Vec::<u64>::new(), "a message after it");
        let later = Members::new(2, vec![1, 2], vec![switch, change(12, 1, 8, false)]);
        assert_eq!(later.deliver_to(8), vec![1], "a removal after it: its user");
        let created = Members::new(CONV_READ_GROUP, vec![1, 2], Vec::new());
        assert_eq!(created.read_since(), 2);
        assert_eq!(created.deliver_to(1), vec![1, 2]);
        assert_eq!(Members::new(2, vec![1], Vec::new()).read_since(), 0);
    }

    #[test]
    fn change_records_round_trip_and_bad_ones_are_refused() {
        let c = change(7, 9, 3, true);
        assert_eq!(Change::decode(7, &c.record()), Some(c));
        let s = Change { switch: true, ..c };
        assert_eq!(Change::decode(7, &s.record()), Some(s));
        assert_eq!(Change::decode(7, &c.record()[..16]), None);
        let mut bad = c.record();
        bad[0] = 3;
        assert_eq!(Change::decode(7, &bad), None);
    }

    proptest::proptest! {
        /// Extending what was read with the changes listed later makes
        /// what reading them all at once makes: the same members now, the
        /// same read-fan-out start (the first switch), stays and newest
        /// write id, whatever the split.
        #[test]
        fn extending_equals_reading_everything(
            kind in proptest::sample::select(vec![1u8, 2, CONV_READ_GROUP]),
            ops in proptest::collection::vec((1u64..12, 0u8..3), 0..60),
            split in 0usize..61,
        ) {
            let changes: Vec<Change> = ops
                .iter()
                .enumerate()
                .map(|(i, &(user, op))| Change {
                    write_id: 100 + i as u64,
                    user,
                    at: 2 + i as u64,
                    add: op >= 1,
                    switch: op == 2,
                })
                .collect();
            let k = split.min(changes.len());
            let n = changes.len() as u64;
            let whole = Members::new(kind, vec![1, 2], changes.clone()).through(n);
            let first = Members::new(kind, vec![1, 2], changes[..k].to_vec()).through(k as u64);
            let extended = first.extended(&changes[k..], n);
            proptest::prop_assert_eq!(&extended, &whole);
            proptest::prop_assert_eq!(extended.read_since(), whole.read_since());
        }
    }
}
