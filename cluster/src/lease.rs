//! Leader leases: a linearizable read without a heartbeat round of its own.
//!
//! openraft 0.9 confirms leadership for a read (`ensure_linearizable`) by
//! sending a heartbeat to every follower and waiting for a quorum: a round
//! per read (per batch of concurrent reads at best). On this machine a
//! round costs about what a small write does, and a device's `SYNC` after
//! each push is such a read. But the leader's own heartbeats (every
//! `heartbeat`, 100 ms by default) and append-entries already prove the
//! same thing, if the time each was sent is kept: this module keeps, per
//! partition, the send instant of the newest request each follower
//! accepted, and a read is served at once while those instants hold a
//! quorum within the lease.
//!
//! Why no other leader can exist while the lease holds, given openraft's
//! rules and three of ours:
//! 1. A follower that accepts an append-entries of vote `V` at instant `t`
//!    (never before the leader sent it) refuses every vote request until
//!    `t + election_timeout_max` (openraft's `handle_vote_req`, the
//!    "leader lease").
//! 2. That clock lives in memory. openraft 0.9.25 starts a restored vote's
//!    clock when the group opens, so a follower killed and restarted
//!    refuses too; not to rest on that detail, a node also answers no vote
//!    request until `election_timeout_max` after it started (`net::serve`'s
//!    vote gate).
//! 3. A node stands for election only (at least) `election_timeout_min`
//!    after it last heard from a leader or started. A preferred replica
//!    asked to stand by a leader handing it a partition
//!    ([`crate::rebalance`]) uses `trigger().elect()`, which skips
//!    openraft's own timer, so it keeps the rule itself: it stands only
//!    `election_timeout_max` + 50 ms after it last took an append-entries
//!    of the partition ([`Leases::last_heard`], recorded by `net::serve`),
//!    and not at all if they keep coming (a leader that took its heartbeats
//!    back up).
//! 4. The leader's own vote is not protected by (1): once it has led for
//!    `election_timeout_max` it grants a higher term whose log is as long
//!    as its own, and its published state may say it leads until its core
//!    gets round to stepping down. So every vote request that reaches a
//!    node voids the partition's lease before openraft sees it
//!    ([`Leases::void`]): only requests sent after it count again.
//!
//! A quorum of every voter configuration (this node counted, per 4)
//! accepted requests sent within the last `lease` < `election_timeout_min`:
//! any other candidate needs the vote of one of them, who refuses it (1, 2)
//! or cannot have stood yet (3). The local state holds every acknowledged
//! write once an entry of this leader's term is applied: writes of earlier
//! terms were committed before it, and this term's writes are acknowledged
//! only after this node applied them. Otherwise (a lease lapsed under load,
//! a new leader, a membership change) the read takes openraft's round.
//! The lease assumes the nodes' clocks run at the same rate within the
//! margin between `lease` and `election_timeout_min` (a third of it by
//! default), the assumption every lease-read implementation makes (TiKV's,
//! etcd's `ReadOnlyLeaseBased`). `Instant` is the monotonic clock: a host
//! suspended, or a VM paused so that its monotonic clock stops, breaks it
//! (a process stopped with SIGSTOP does not: its clock runs on, and the
//! process test checks that case).

use crate::NodeId;
use openraft::{BasicNode, RaftMetrics, ServerState, Vote};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The followers' newest accepted requests of one leader vote.
#[derive(Debug)]
struct Acks {
    vote: Vote<NodeId>,
    /// Per follower, when the newest request it accepted was sent.
    sent: HashMap<NodeId, Instant>,
    /// Requests sent before this do not count (a vote request arrived).
    not_before: Option<Instant>,
}

/// The leases of one node's groups, and how reads were confirmed.
#[derive(Debug)]
pub(crate) struct Leases {
    /// How long an accepted request keeps counting, from its send instant.
    lease: Duration,
    acks: Mutex<HashMap<u32, Acks>>,
    /// As a follower: when this node last took an append-entries (or
    /// heartbeat) of each partition from its leader (`crate::rebalance`
    /// stands only well after it).
    heard: Mutex<HashMap<u32, Instant>>,
    /// Partitions whose group reopened (module `revive`): no vote is
    /// granted before the instant, as after a restart (`net::VoteGate`).
    votes_from: Mutex<HashMap<u32, Instant>>,
    /// Reads confirmed by the lease, and by a heartbeat round.
    pub(crate) by_lease: AtomicU64,
    pub(crate) by_round: AtomicU64,
}

impl Leases {
    /// Leases of `lease` (0: every read takes a round).
    pub(crate) fn new(lease: Duration) -> Leases {
        Leases {
            lease,
            acks: Mutex::new(HashMap::new()),
            heard: Mutex::new(HashMap::new()),
            votes_from: Mutex::new(HashMap::new()),
            by_lease: AtomicU64::new(0),
            by_round: AtomicU64::new(0),
        }
    }

    /// The lease for openraft's timeouts: two thirds of the shortest
    /// election timeout (the rest is the margin for clock rates).
    pub(crate) fn for_timeouts(election_timeout_min: Duration) -> Leases {
        Leases::new(election_timeout_min * 2 / 3)
    }

    /// Follower `from` of partition `p` accepted a request of `vote` sent
    /// at `sent`.
    pub(crate) fn accepted(&self, p: u32, from: NodeId, vote: &Vote<NodeId>, sent: Instant) {
        let mut all = self.acks.lock();
        let acks = all.entry(p).or_insert_with(|| Acks {
            vote: *vote,
            sent: HashMap::new(),
            not_before: None,
        });
        if acks.vote != *vote {
            if *vote > acks.vote {
                acks.vote = *vote;
                acks.sent.clear();
            } else {
                return; // a reply to an older leader's request
            }
        }
        if acks.not_before.is_some_and(|t| sent < t) {
            return; // sent before a vote request: see `void`
        }
        let t = acks.sent.entry(from).or_insert(sent);
        *t = (*t).max(sent);
    }

    /// A vote request for partition `p` arrived at `now`: no read of `p`
    /// is served under the lease until followers accept requests sent
    /// after it. openraft's leader lease protects the followers' votes but
    /// not the leader's own: once it has led for `election_timeout_max`
    /// it grants a higher term whose log is as long as its own, and steps
    /// down only when its core gets to it, while its published state may
    /// still say it leads. Counting itself in the quorum is sound only
    /// while no vote request has reached it since the acks were sent.
    /// This node takes an append-entries of partition `p` at `now`.
    pub(crate) fn heard(&self, p: u32, now: Instant) {
        self.heard.lock().insert(p, now);
    }

    /// No vote for `p` is granted before `t` (its group reopened).
    pub(crate) fn no_votes_before(&self, p: u32, t: Instant) {
        let mut all = self.votes_from.lock();
        let at = all.entry(p).or_insert(t);
        *at = (*at).max(t);
    }

    /// Until when votes for `p` wait, if they do.
    pub(crate) fn votes_from(&self, p: u32) -> Option<Instant> {
        let mut all = self.votes_from.lock();
        match all.get(&p) {
            Some(&t) if t > Instant::now() => Some(t),
            Some(_) => {
                all.remove(&p);
                None
            }
            None => None,
        }
    }

    /// When this node last took an append-entries of `p`.
    pub(crate) fn last_heard(&self, p: u32) -> Option<Instant> {
        self.heard.lock().get(&p).copied()
    }

    pub(crate) fn void(&self, p: u32, now: Instant) {
        let mut all = self.acks.lock();
        // With no record yet, one of the lowest vote: the first accepted
        // request replaces the vote and keeps `not_before`.
        let acks = all.entry(p).or_insert_with(|| Acks {
            vote: Vote::default(),
            sent: HashMap::new(),
            not_before: None,
        });
        acks.sent.clear();
        acks.not_before = Some(now);
    }

    /// Whether node `me`, by its group's `metrics`, may serve a read of
    /// partition `p` now without a round.
    pub(crate) fn holds(
        &self,
        p: u32,
        me: NodeId,
        metrics: &RaftMetrics<NodeId, BasicNode>,
        now: Instant,
    ) -> bool {
        let vote = &metrics.vote;
        let leads = metrics.state == ServerState::Leader
            && vote.is_committed()
            && vote.leader_id().voted_for() == Some(me);
        // An entry of this term applied: everything committed before it is.
        let current = metrics
            .last_applied
            .is_some_and(|l| l.leader_id == *vote.leader_id());
        if self.lease.is_zero() || !leads || !current {
            return false;
        }
        let all = self.acks.lock();
        let configs = metrics.membership_config.membership().get_joint_config();
        match all.get(&p) {
            Some(acks) if acks.vote == *vote => {
                quorum_fresh(configs, me, &acks.sent, now, self.lease)
            }
            // No follower acknowledged this vote yet (or the record is an
            // older vote's): only a group of one voter holds.
            _ => quorum_fresh(configs, me, &HashMap::new(), now, self.lease),
        }
    }

    /// Count a read confirmed one way or the other.
    pub(crate) fn count(&self, by_lease: bool) {
        let c = if by_lease {
            &self.by_lease
        } else {
            &self.by_round
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether, in every configuration, a majority is `me` or followers whose
/// newest accepted request was sent less than `lease` before `now`.
fn quorum_fresh(
    configs: &[BTreeSet<NodeId>],
    me: NodeId,
    sent: &HashMap<NodeId, Instant>,
    now: Instant,
    lease: Duration,
) -> bool {
    let fresh = |n: &NodeId| *n == me || sent.get(n).is_some_and(|t| now < *t + lease);
    !configs.is_empty()
        && configs
            .iter()
            .all(|c| c.iter().filter(|n| fresh(n)).count() * 2 > c.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(200);

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_majority_of_fresh_acks_holds_and_lapses_with_time() {
        let t0 = Instant::now();
        let sent: HashMap<NodeId, Instant> = [(2, t0)].into_iter().collect();
        let one = [set(&[1, 2, 3])];
        assert!(quorum_fresh(&one, 1, &sent, t0 + LEASE / 2, LEASE));
        assert!(!quorum_fresh(&one, 1, &sent, t0 + LEASE, LEASE));
        // Alone is not a majority of three, nor is another node's ack
        // without this one.
        assert!(!quorum_fresh(&one, 1, &HashMap::new(), t0, LEASE));
        let five = [set(&[1, 2, 3, 4, 5])];
        assert!(!quorum_fresh(&five, 1, &sent, t0, LEASE));
    }

    #[test]
    fn a_joint_configuration_needs_a_majority_of_each() {
        let t0 = Instant::now();
        let sent: HashMap<NodeId, Instant> = [(2, t0)].into_iter().collect();
        let joint = [set(&[1, 2, 3]), set(&[1, 4, 5])];
        assert!(!quorum_fresh(&joint, 1, &sent, t0, LEASE));
        let both: HashMap<NodeId, Instant> = [(2, t0), (4, t0)].into_iter().collect();
        assert!(quorum_fresh(&joint, 1, &both, t0, LEASE));
        assert!(!quorum_fresh(&[], 1, &both, t0, LEASE));
    }

    #[test]
    fn acks_of_an_older_vote_do_not_count_and_a_newer_vote_starts_afresh() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let v1 = Vote::new_committed(1, 1);
        let v2 = Vote::new_committed(2, 1);
        l.accepted(0, 2, &v2, t0);
        l.accepted(0, 3, &v1, t0); // late reply from term 1
        {
            let all = l.acks.lock();
            let a = &all[&0];
            assert_eq!(a.vote, v2);
            assert!(a.sent.contains_key(&2) && !a.sent.contains_key(&3));
        }
        let v3 = Vote::new_committed(3, 1);
        l.accepted(0, 3, &v3, t0);
        let all = l.acks.lock();
        assert_eq!(all[&0].vote, v3);
        assert!(!all[&0].sent.contains_key(&2));
    }

    #[test]
    fn a_vote_request_voids_the_lease_until_newer_requests_are_accepted() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let this_term = openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), 7);
        let m = leader(this_term);
        l.accepted(0, 2, &m.vote, t0);
        assert!(l.holds(0, 1, &m, t0));
        l.void(0, t0 + LEASE / 4);
        assert!(!l.holds(0, 1, &m, t0 + LEASE / 4));
        // A reply to a request sent before the vote request does not count.
        l.accepted(0, 3, &m.vote, t0 + LEASE / 8);
        assert!(!l.holds(0, 1, &m, t0 + LEASE / 4));
        l.accepted(0, 3, &m.vote, t0 + LEASE / 2);
        assert!(l.holds(0, 1, &m, t0 + LEASE / 2));
    }

    #[test]
    fn a_vote_request_before_any_ack_still_voids_older_requests() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let this_term = openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), 7);
        let m = leader(this_term);
        l.void(0, t0 + LEASE / 4);
        l.accepted(0, 2, &m.vote, t0);
        assert!(!l.holds(0, 1, &m, t0 + LEASE / 4));
        l.accepted(0, 2, &m.vote, t0 + LEASE / 2);
        assert!(l.holds(0, 1, &m, t0 + LEASE / 2));
    }

    #[test]
    fn a_group_of_one_voter_holds_without_acks() {
        let l = Leases::new(LEASE);
        let this_term = openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), 7);
        let mut m = leader(this_term);
        let one = openraft::Membership::new(vec![set(&[1])], None);
        m.membership_config = std::sync::Arc::new(openraft::StoredMembership::new(None, one));
        assert!(l.holds(0, 1, &m, Instant::now()));
        assert!(!l.holds(0, 1, &leader(this_term), Instant::now()));
    }

    #[test]
    fn an_older_send_instant_never_moves_a_follower_back() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let v = Vote::new_committed(1, 1);
        l.accepted(0, 2, &v, t0 + LEASE);
        l.accepted(0, 2, &v, t0);
        assert_eq!(l.acks.lock()[&0].sent[&2], t0 + LEASE);
    }

    /// Node 1 leading term 2 of {1, 2, 3}, with `applied` last applied.
    fn leader(applied: openraft::LogId<NodeId>) -> RaftMetrics<NodeId, BasicNode> {
        let mut m = RaftMetrics::<NodeId, BasicNode>::new_initial(1);
        m.state = ServerState::Leader;
        m.current_leader = Some(1);
        m.vote = Vote::new_committed(2, 1);
        m.last_applied = Some(applied);
        let members = openraft::Membership::new(vec![set(&[1, 2, 3])], None);
        m.membership_config = std::sync::Arc::new(openraft::StoredMembership::new(None, members));
        m
    }

    #[test]
    fn a_leader_holds_only_with_fresh_acks_of_its_vote_and_its_term_applied() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let this_term = openraft::LogId::new(openraft::CommittedLeaderId::new(2, 1), 7);
        let m = leader(this_term);
        assert!(!l.holds(0, 1, &m, t0), "no follower acked yet");
        l.accepted(0, 3, &Vote::new_committed(1, 3), t0);
        assert!(!l.holds(0, 1, &m, t0), "an ack of another leader's vote");
        l.accepted(0, 2, &m.vote, t0);
        assert!(l.holds(0, 1, &m, t0 + LEASE / 2));
        assert!(!l.holds(0, 1, &m, t0 + LEASE), "lapsed");
        assert!(!l.holds(1, 1, &m, t0), "another partition");
        assert!(!l.holds(0, 2, &m, t0), "another node's metrics");
        // Only an entry of the previous term applied: what the old leader
        // committed may not be applied here yet.
        let old_term = openraft::LogId::new(openraft::CommittedLeaderId::new(1, 3), 6);
        assert!(!l.holds(0, 1, &leader(old_term), t0));
        let mut follower = leader(this_term);
        follower.state = ServerState::Follower;
        assert!(!l.holds(0, 1, &follower, t0));
        assert!(
            !Leases::new(Duration::ZERO).holds(0, 1, &m, t0),
            "leases off"
        );
        assert!(!l.holds(0, 1, &RaftMetrics::<NodeId, BasicNode>::new_initial(1), t0));
    }
}
