//! Property test of the IM layer against a simple model: random membership
//! changes, sends (and retries), device syncs from their own checkpoints,
//! restarts, and clock moves past the sync TTL. Every device that syncs
//! must receive every entry addressed to its user (its membership ranges)
//! exactly once, in conversation seq order, and none outside them; a device
//! told that TTL dropped its checkpoint roams with `history` and goes on.
//! `PROPTEST_CASES` sets the number of cases (default 24).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::Keyspace;
use timeline_engine::{Config, Durability, KeyspaceConfig, ManualClock};
use timeline_im::*;

const USERS: u64 = 5;
const CONVS: u64 = 4;
const THRESHOLD: usize = 3;
const TTL_MS: u64 = 8_000;

#[derive(Debug, Clone)]
enum Op {
    Create {
        conv: u64,
        members: Vec<u64>,
    },
    Add {
        conv: u64,
        user: u64,
    },
    Remove {
        conv: u64,
        user: u64,
    },
    Send {
        conv: u64,
        sender: u64,
    },
    Retry {
        pick: usize,
    },
    Sync {
        user: u64,
        device: usize,
        limit: usize,
    },
    Restart,
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..CONVS, proptest::collection::vec(1..=USERS, 2..5))
            .prop_map(|(conv, members)| Op::Create { conv, members }),
        2 => (0..CONVS, 1..=USERS).prop_map(|(conv, user)| Op::Add { conv, user }),
        1 => (0..CONVS, 1..=USERS).prop_map(|(conv, user)| Op::Remove { conv, user }),
        8 => (0..CONVS, 1..=USERS).prop_map(|(conv, sender)| Op::Send { conv, sender }),
        2 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        5 => (1..=USERS, 0..2usize, 1..5usize)
            .prop_map(|(user, device, limit)| Op::Sync { user, device, limit }),
        1 => Just(Op::Restart),
        1 => prop_oneof![Just(1_000u64), Just(TTL_MS * 2)].prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What the model knows of one conversation entry.
#[derive(Debug, Clone, PartialEq)]
enum MEntry {
    Created,
    Added(u64),
    Removed(u64),
    Msg(Vec<u8>),
}

#[derive(Default)]
struct MConv {
    group: bool,
    entries: Vec<MEntry>, // seq = index + 1
    members: BTreeMap<u64, Vec<(u64, u64)>>,
    read_since: u64,
}

impl MConv {
    fn current(&self) -> usize {
        self.members
            .values()
            .filter(|iv| iv.last().is_some_and(|l| l.1 == u64::MAX))
            .count()
    }
    fn is_member(&self, u: u64) -> bool {
        self.members
            .get(&u)
            .is_some_and(|iv| iv.last().is_some_and(|l| l.1 == u64::MAX))
    }
    fn addressed(&self, u: u64, seq: u64) -> bool {
        self.members
            .get(&u)
            .is_some_and(|iv| iv.iter().any(|&(a, b)| a <= seq && seq <= b))
    }
    fn next_addressed(&self, u: u64, after: u64) -> Option<u64> {
        (after + 1..=self.entries.len() as u64).find(|&s| self.addressed(u, s))
    }
}

#[derive(Default, Clone)]
struct Device {
    cp: u64,
    last: HashMap<u64, u64>,
    roamed: bool,
}

struct World {
    dir: tempfile::TempDir,
    clock: ManualClock,
    im: Option<Im>,
    convs: HashMap<u64, MConv>,
    sent: Vec<(u64, u64, u64, u64)>, // conv, sender, cmid, seq (retryable)
    next_cmid: u64,
    devices: HashMap<(u64, usize), Device>,
}

fn open(dir: &std::path::Path, clock: &ManualClock) -> Im {
    let mut c = Config::default();
    c.shards = 2;
    c.background = false;
    c.clock = Arc::new(clock.clone());
    c.max_payload = 4096;
    c.keyspace_mut(Keyspace::STORE).segment_bytes = 64 << 10;
    *c.keyspace_mut(Keyspace::SYNC) =
        KeyspaceConfig::sync().with_ttl(Some(Duration::from_millis(TTL_MS)));
    c.keyspace_mut(Keyspace::SYNC).segment_bytes = 64 << 10;
    let ic = ImConfig {
        hybrid_threshold: THRESHOLD,
        durability: Durability::Buffered,
        queue_capacity: 8,
        max_batch: 4,
        ..Default::default()
    };
    Im::open(dir, c, ic).unwrap()
}

impl World {
    fn im(&self) -> &Im {
        self.im.as_ref().unwrap()
    }

    fn accept(
        &self,
        user: u64,
        dev: &mut Device,
        e: &Entry,
        roaming: bool,
    ) -> Result<(), TestCaseError> {
        if matches!(e.body, Body::ReadMarker | Body::DeletedMarker) {
            return Ok(());
        }
        let c = &self.convs[&e.conv];
        let last = dev.last.get(&e.conv).copied().unwrap_or(0);
        if e.conv_seq <= last {
            prop_assert!(
                dev.roamed && !roaming,
                "user {user} got {}/{} twice (last {last})",
                e.conv,
                e.conv_seq
            );
            return Ok(());
        }
        let want = c.next_addressed(user, last);
        prop_assert_eq!(
            Some(e.conv_seq),
            want,
            "user {} conv {}: after {} got {:?}",
            user,
            e.conv,
            last,
            e
        );
        let m = &c.entries[e.conv_seq as usize - 1];
        let ok = match (m, &e.body) {
            (MEntry::Created, Body::Created { .. }) => true,
            (MEntry::Added(u), Body::MemberAdded(v)) => u == v,
            (MEntry::Removed(u), Body::MemberRemoved(v)) => u == v,
            (MEntry::Msg(p), Body::Message(q)) => p == q,
            _ => false,
        };
        prop_assert!(
            ok,
            "content of {}/{}: model {:?}, got {:?}",
            e.conv,
            e.conv_seq,
            m,
            e.body
        );
        dev.last.insert(e.conv, e.conv_seq);
        Ok(())
    }

    fn roam(&self, user: u64, dev: &mut Device) -> Result<(), TestCaseError> {
        let mut convs: Vec<u64> = self
            .convs
            .iter()
            .filter(|(_, c)| c.members.contains_key(&user))
            .map(|(&k, _)| k)
            .collect();
        convs.sort();
        for conv in convs {
            for _ in 0..1000 {
                let last = dev.last.get(&conv).copied().unwrap_or(0);
                let page = self
                    .im()
                    .history(conv, user, HistoryFrom::After(last), 3)
                    .unwrap();
                for e in &page.entries {
                    self.accept(user, dev, e, true)?;
                }
                if !page.has_more {
                    break;
                }
            }
        }
        Ok(())
    }

    fn sync(&mut self, user: u64, device: usize, limit: usize) -> Result<(), TestCaseError> {
        let mut dev = self
            .devices
            .get(&(user, device))
            .cloned()
            .unwrap_or_default();
        for _ in 0..10_000 {
            let groups: Vec<(u64, u64)> = dev.last.iter().map(|(&c, &s)| (c, s)).collect();
            let r = self.im().sync(user, dev.cp, limit, &groups).unwrap();
            if let Some(first) = r.truncated {
                prop_assert!(first > dev.cp + 1);
                self.roam(user, &mut dev)?;
                dev.cp = first - 1;
                dev.roamed = true;
                continue;
            }
            for e in &r.entries {
                prop_assert_eq!(e.seq, dev.cp + 1, "sync seqs are consecutive");
                dev.cp = e.seq;
                self.accept(user, &mut dev, &e.entry, false)?;
            }
            prop_assert_eq!(r.checkpoint, dev.cp);
            let mut more = r.has_more;
            for g in &r.groups {
                for e in &g.entries {
                    self.accept(user, &mut dev, e, false)?;
                }
                more |= g.has_more;
            }
            if !more {
                self.devices.insert((user, device), dev);
                return Ok(());
            }
        }
        prop_assert!(false, "sync did not converge");
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Create { conv, members } => {
                let mut ms = members.clone();
                ms.sort();
                ms.dedup();
                let kind = if ms.len() == 2 && conv % 2 == 0 {
                    ConvKind::Direct
                } else {
                    ConvKind::Group
                };
                let r = self.im().create_conversation(*conv, kind, &ms);
                if self.convs.contains_key(conv) {
                    prop_assert!(matches!(r, Err(ImError::ConversationExists(_))), "{r:?}");
                    return Ok(());
                }
                prop_assert_eq!(r.unwrap(), 1);
                let mut c = MConv {
                    group: kind == ConvKind::Group,
                    ..Default::default()
                };
                c.entries.push(MEntry::Created);
                for m in ms {
                    c.members.insert(m, vec![(1, u64::MAX)]);
                }
                if c.group && c.current() > THRESHOLD {
                    c.read_since = 2;
                }
                self.convs.insert(*conv, c);
            }
            Op::Add { conv, user } | Op::Remove { conv, user } => {
                let add = matches!(op, Op::Add { .. });
                let r = if add {
                    self.im().add_member(*conv, *user)
                } else {
                    self.im().remove_member(*conv, *user)
                };
                let Some(c) = self.convs.get_mut(conv) else {
                    prop_assert!(matches!(r, Err(ImError::NoSuchConversation(_))), "{r:?}");
                    return Ok(());
                };
                if !c.group || c.is_member(*user) == add {
                    prop_assert!(r.is_err(), "{op:?} should fail: {r:?}");
                    return Ok(());
                }
                let seq = r.unwrap();
                prop_assert_eq!(seq, c.entries.len() as u64 + 1);
                if add {
                    c.entries.push(MEntry::Added(*user));
                    c.members.entry(*user).or_default().push((seq, u64::MAX));
                    if c.read_since == 0 && c.current() > THRESHOLD {
                        c.read_since = seq + 1;
                    }
                } else {
                    c.entries.push(MEntry::Removed(*user));
                    c.members.get_mut(user).unwrap().last_mut().unwrap().1 = seq;
                }
            }
            Op::Send { conv, sender } => {
                let cmid = self.next_cmid;
                self.next_cmid += 1;
                let payload = format!("{conv}:{sender}:{cmid}").into_bytes();
                let r = self.im().send(*conv, *sender, cmid, &payload);
                match self.convs.get_mut(conv) {
                    None => prop_assert!(matches!(r, Err(ImError::NoSuchConversation(_))), "{r:?}"),
                    Some(c) if !c.is_member(*sender) => {
                        prop_assert!(matches!(r, Err(ImError::NotMember { .. })), "{r:?}")
                    }
                    Some(c) => {
                        let a = r.unwrap();
                        c.entries.push(MEntry::Msg(payload));
                        prop_assert_eq!((a.seq, a.duplicate), (c.entries.len() as u64, false));
                        self.sent.push((*conv, *sender, cmid, a.seq));
                    }
                }
            }
            Op::Retry { pick } => {
                if self.sent.is_empty() {
                    return Ok(());
                }
                let (conv, sender, cmid, seq) = self.sent[pick % self.sent.len()];
                let payload = format!("{conv}:{sender}:{cmid}").into_bytes();
                match self.im().send(conv, sender, cmid, &payload) {
                    Ok(a) => prop_assert_eq!((a.seq, a.duplicate), (seq, true)),
                    // A sender that left can no longer send, not even a retry.
                    Err(ImError::NotMember { .. }) => {
                        prop_assert!(!self.convs[&conv].is_member(sender))
                    }
                    Err(e) => prop_assert!(false, "retry failed: {e}"),
                }
            }
            Op::Sync {
                user,
                device,
                limit,
            } => self.sync(*user, *device, *limit)?,
            Op::Restart => {
                self.im.take().unwrap().close().unwrap();
                self.im = Some(open(self.dir.path(), &self.clock));
            }
            Op::Advance { ms } => {
                self.clock.advance_ms(*ms);
                for _ in 0..2 {
                    self.im().engine().maintain().unwrap();
                }
                if *ms > TTL_MS {
                    // Retries are promised only inside the dedup window.
                    self.sent.clear();
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn devices_receive_exactly_what_is_addressed_to_them(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000_000);
        let im = open(dir.path(), &clock);
        let mut w = World { dir, clock, im: Some(im), convs: HashMap::new(), sent: Vec::new(),
                            next_cmid: 1, devices: HashMap::new() };
        for op in &ops {
            w.apply(op)?;
        }
        // Finally every device of every user catches up completely.
        for user in 1..=USERS {
            for device in 0..2 {
                w.sync(user, device, 7)?;
                let dev = &w.devices[&(user, device)];
                for (&conv, c) in &w.convs {
                    let want = c.next_addressed(user, 0).map(|_| {
                        (1..=c.entries.len() as u64).filter(|&s| c.addressed(user, s)).max().unwrap()
                    });
                    prop_assert_eq!(dev.last.get(&conv).copied(), want, "user {} device {} conv {}", user, device, conv);
                }
            }
        }
        w.im.take().unwrap().close().unwrap();
    }
}
