//! A `SEND`'s retry check without reading records.
//!
//! Applying a `SEND` first looks for the same (sender, client_msg_id)
//! among the conversation's last [`DEDUP_WINDOW`] store records (a retry
//! answers the first one's seq). Read from the engine, that is a backward
//! scan and a decode of up to 256 records per `SEND`: 9.6 % of a node's
//! CPU under W4. [`RecentSends`] keeps, per conversation, what that scan
//! would return (each record's seq, write id, and sender and
//! client_msg_id if it is a message), taken at the store timeline's last
//! seq, and moves it along as the state machine appends a store event.
//!
//! A replica's answer must not depend on what it has cached (a replica
//! just restarted has nothing): a window is used only while the timeline's
//! last seq is still the one it was taken at or moved to, so any write it
//! did not see (a snapshot installed, a store event appended elsewhere)
//! makes the next check scan again, and the window then holds exactly the
//! records the scan returns. Store timelines on a cluster have no TTL, so
//! no record leaves a window's range but by falling out of the window.

use crate::im;
use crate::state_machine::DEDUP_WINDOW;
use std::collections::{HashMap, VecDeque};

/// One store record as the retry check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rec {
    seq: u64,
    write_id: u64,
    /// (sender, client_msg_id) if it is a message.
    message: Option<(u64, u64)>,
}

impl Rec {
    /// Record `seq` of conversation `conv` as stored (write id and
    /// event); one that does not decode is kept as no message.
    pub(crate) fn stored(conv: u64, seq: u64, stored: &[u8]) -> Rec {
        match im::read::decode_event(stored, conv, seq) {
            Ok((w, ev)) => Rec::event(seq, w, &ev),
            Err(_) => Rec {
                seq,
                write_id: 0,
                message: None,
            },
        }
    }

    /// Event `ev` at `seq` with write id `write_id`.
    pub(crate) fn event(seq: u64, write_id: u64, ev: &im::StoreEvent) -> Rec {
        Rec {
            seq,
            write_id,
            message: (ev.kind == im::KIND_MESSAGE).then_some((ev.sender, ev.client_msg_id)),
        }
    }
}

/// A conversation's newest records (oldest first), as of its last seq.
struct Window {
    last: u64,
    recs: VecDeque<Rec>,
}

/// A partition's windows, bounded by the records held (cleared whole when
/// full, as the state machine's other caches).
pub(crate) struct RecentSends {
    by_conv: HashMap<u64, Window>,
    held: usize,
    most: usize,
}

impl RecentSends {
    pub(crate) fn new(most: usize) -> RecentSends {
        RecentSends {
            by_conv: HashMap::new(),
            held: 0,
            most,
        }
    }

    /// The newest message of `who` (sender, client_msg_id) in `conv`'s
    /// window, as (seq, write id): `None` if no window was taken at
    /// `last` (the timeline's last seq now: scan, then [`Self::fill`]),
    /// `Some(None)` if the window has none.
    pub(crate) fn find(&self, conv: u64, last: u64, who: (u64, u64)) -> Option<Option<(u64, u64)>> {
        let w = self.by_conv.get(&conv).filter(|w| w.last == last)?;
        Some(
            w.recs
                .iter()
                .rev()
                .find(|r| r.message == Some(who))
                .map(|r| (r.seq, r.write_id)),
        )
    }

    /// Keep `newest_first` (what the backward scan of at most
    /// [`DEDUP_WINDOW`] records returned) as `conv`'s window at `last`.
    pub(crate) fn fill(&mut self, conv: u64, last: u64, newest_first: impl Iterator<Item = Rec>) {
        let mut recs: VecDeque<Rec> = newest_first.take(DEDUP_WINDOW).collect();
        recs.make_contiguous().reverse();
        self.put(conv, Window { last, recs });
    }

    /// `rec` was appended to `conv`'s store timeline: the window moves
    /// along if it was at the seq before, else it is dropped.
    pub(crate) fn appended(&mut self, conv: u64, rec: Rec) {
        let Some(w) = self.by_conv.get_mut(&conv) else {
            return;
        };
        if w.last.checked_add(1) != Some(rec.seq) {
            let gone = self.by_conv.remove(&conv).map_or(0, |w| w.recs.len());
            self.held -= gone.min(self.held);
            return;
        }
        w.last = rec.seq;
        w.recs.push_back(rec);
        if w.recs.len() > DEDUP_WINDOW {
            w.recs.pop_front();
        } else {
            self.held += 1;
            if self.held > self.most {
                self.clear();
            }
        }
    }

    /// Forget every window (the engine's data was replaced).
    pub(crate) fn clear(&mut self) {
        self.by_conv.clear();
        self.held = 0;
    }

    fn put(&mut self, conv: u64, w: Window) {
        if self.held + w.recs.len() > self.most {
            self.clear();
        }
        self.held += w.recs.len();
        if let Some(old) = self.by_conv.insert(conv, w) {
            self.held -= old.recs.len().min(self.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, sender: u64, cmid: u64) -> Rec {
        Rec {
            seq,
            write_id: seq << 16,
            message: Some((sender, cmid)),
        }
    }

    fn other(seq: u64) -> Rec {
        Rec {
            seq,
            write_id: seq << 16,
            message: None,
        }
    }

    /// The window answers what a scan of the last `DEDUP_WINDOW` records
    /// would: the newest match, nothing past the window, and nothing at
    /// all once the timeline moved without it.
    #[test]
    fn a_window_answers_as_the_scan_would_and_only_while_current() {
        let mut r = RecentSends::new(1 << 20);
        assert_eq!(r.find(7, 0, (1, 1)), None, "no window yet");
        r.fill(7, 0, std::iter::empty());
        assert_eq!(r.find(7, 0, (1, 1)), Some(None));
        // 300 records: messages of sender 1 with cmid = seq, every tenth
        // something else.
        for seq in 1..=300 {
            let rec = match seq % 10 {
                0 => other(seq),
                _ => msg(seq, 1, seq),
            };
            r.appended(7, rec);
        }
        // The window is seqs 45..=300.
        assert_eq!(r.find(7, 300, (1, 299)), Some(Some((299, 299 << 16))));
        assert_eq!(
            r.find(7, 300, (1, 45)),
            Some(Some((45, 45 << 16))),
            "the oldest in it"
        );
        assert_eq!(r.find(7, 300, (1, 44)), Some(None), "seq 44 fell out of it");
        assert_eq!(r.find(7, 300, (1, 50)), Some(None), "seq 50 is no message");
        assert_eq!(r.find(7, 300, (2, 299)), Some(None), "another sender");
        // The same retry twice in the window: the newest answers.
        r.appended(7, msg(301, 1, 299));
        assert_eq!(r.find(7, 301, (1, 299)), Some(Some((301, 301 << 16))));
        // A record the window did not see: it answers nothing until filled.
        assert_eq!(r.find(7, 302, (1, 299)), None);
        r.appended(7, msg(303, 2, 1));
        assert_eq!(r.find(7, 303, (2, 1)), None, "a gap drops the window");
        assert_eq!(r.held, 0);
    }

    #[test]
    fn filled_from_a_scan_it_holds_the_scans_records_oldest_first() {
        let mut r = RecentSends::new(1 << 20);
        r.fill(3, 10, (1..=10).rev().map(|s| msg(s, 5, s)));
        assert_eq!(r.find(3, 10, (5, 1)), Some(Some((1, 1 << 16))));
        r.appended(3, msg(11, 5, 11));
        assert_eq!(r.find(3, 11, (5, 11)), Some(Some((11, 11 << 16))));
        assert_eq!(r.held, 11);
    }

    #[test]
    fn full_it_clears_and_starts_again() {
        let mut r = RecentSends::new(300);
        r.fill(1, 200, (1..=200).rev().map(other));
        r.fill(2, 200, (1..=200).rev().map(other));
        assert_eq!(r.find(1, 200, (0, 0)), None, "cleared to make room");
        assert_eq!(r.find(2, 200, (0, 0)), Some(None));
        assert_eq!(r.held, 200);
    }
}
