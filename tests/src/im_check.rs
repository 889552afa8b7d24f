//! The store-then-sync checker shared by the IM crash and fault tests: it
//! reads the raw engine (no IM layer in between) and checks that every
//! stored write-fan-out entry is in each member's sync timeline exactly
//! once, in order, and nowhere else.
#![allow(clippy::unwrap_used)] // a test helper: a failure is a test failure

use std::collections::{BTreeSet, HashMap};
use timeline_engine::{Direction, Engine, TimelineId};
use timeline_im::entry::{EventKind, StoreEntry, SyncRecord};
use timeline_im::ConvKind;

/// `(conv, sender, client_msg_id)`.
pub type Key = (u64, u64, u64);

/// Every record of `tl` from seq 1.
pub fn all(engine: &Engine, tl: TimelineId) -> Vec<timeline_engine::Record> {
    let mut out = Vec::new();
    loop {
        let page = engine
            .scan(tl, out.len() as u64 + 1, 4096, Direction::Forward)
            .unwrap();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// Check the directory through `engine` for the conversations `convs`
/// (`(conv, kind, first members)`; more than `threshold` members: read
/// fan-out). Returns the number of missing deliveries (`strict`: must be
/// 0) and the stored messages; panics, naming `what`, on a duplicate, a
/// delivery to a non-member or one without its store entry.
pub fn check_fanout(
    engine: &Engine,
    convs: &[(u64, ConvKind, Vec<u64>)],
    threshold: usize,
    strict: bool,
    what: &str,
) -> (usize, HashMap<Key, u64>) {
    let mut stored: HashMap<Key, u64> = HashMap::new();
    // (conv, seq) -> members at seq, for write-fan-out entries.
    let mut expect: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
    let mut users = BTreeSet::new();
    for &(conv, _, _) in convs {
        let mut members: Vec<u64> = Vec::new();
        let mut read_since = 0;
        for r in all(engine, TimelineId::store(conv)) {
            let e = StoreEntry::decode(&r.payload).unwrap();
            let mut receivers = members.clone();
            match e.kind {
                EventKind::Created => {
                    members = e
                        .body
                        .chunks(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    receivers = members.clone();
                    if members.len() > threshold {
                        read_since = r.seq + 1;
                    }
                }
                EventKind::MemberAdded => {
                    members.push(e.arg);
                    receivers = members.clone();
                }
                EventKind::MemberRemoved => members.retain(|&m| m != e.arg),
                EventKind::Message => {
                    let k = (conv, e.sender, e.cmid);
                    assert!(
                        stored.insert(k, r.seq).is_none(),
                        "{what}: {k:?} stored twice"
                    );
                }
                EventKind::Recall => {}
            }
            users.extend(receivers.iter().copied());
            if read_since == 0 || r.seq < read_since {
                expect.insert((conv, r.seq), receivers);
            }
        }
    }
    let mut have: HashMap<(u64, u64), Vec<u64>> = HashMap::new();
    for &u in &users {
        let mut last: HashMap<u64, u64> = HashMap::new();
        for r in all(engine, TimelineId::sync(u)) {
            let (conv, seq) = match SyncRecord::decode(&r.payload).unwrap() {
                SyncRecord::Copy { conv, seq, .. } | SyncRecord::Ref { conv, seq } => (conv, seq),
                _ => continue,
            };
            let l = last.entry(conv).or_default();
            assert!(
                seq > *l,
                "{what}: user {u} conv {conv}: seq {seq} after {l} (duplicate or out of order)"
            );
            *l = seq;
            have.entry((conv, seq)).or_default().push(u);
        }
    }
    for (k, who) in &have {
        let want = expect.get(k).unwrap_or_else(|| {
            panic!("{what}: sync entry {k:?} for {who:?} has no write-fan-out store entry")
        });
        for u in who {
            assert!(
                want.contains(u),
                "{what}: {k:?} delivered to non-member {u}"
            );
        }
    }
    let mut missing = 0;
    for (k, want) in &expect {
        let got = have.get(k).map_or(0, |v| v.len());
        assert!(got <= want.len());
        missing += want.len() - got;
    }
    assert!(
        !strict || missing == 0,
        "{what}: {missing} deliveries missing after recovery"
    );
    (missing, stored)
}
