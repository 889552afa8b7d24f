//! A history checker for one timeline: from what clients recorded (each
//! append's payload, when it was invoked, when it returned, and what it
//! returned; each read's last seq) and the timeline's final records, decide
//! whether the history is linearizable as an append-only log.
//!
//! For a log whose appends get distinct consecutive positions, the history
//! is linearizable iff (checked here, each in O(n log n)):
//! 1. the final records are seqs `1..=n` with no gap;
//! 2. every record is an append that was attempted and not refused, at
//!    most once (no duplicate, nothing invented);
//! 3. every acknowledged append is at the seq it was told, with its exact
//!    bytes (no acknowledged write lost);
//! 4. real time is respected: if append `a` returned before `b` was invoked,
//!    `a`'s seq is below `b`'s (also for an uncertain append that is
//!    present, against the acknowledged appends that returned before it
//!    was invoked);
//! 5. reads: a read sees every append acknowledged before it began, never
//!    an append invoked after it returned, never past the final end, and a
//!    read that began after another returned sees at least as much.

use std::collections::HashMap;
use std::time::Instant;

/// What an append returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged at this seq.
    Acked(u64),
    /// Refused (`MOVED`/`NO_LEADER` until the client gave up): not applied.
    Refused,
    /// The outcome is unknown (the connection broke, `UNCERTAIN`).
    Unknown,
}

#[derive(Debug, Clone)]
pub struct AppendOp {
    pub payload: Vec<u8>,
    pub invoke: Instant,
    pub complete: Instant,
    pub outcome: Outcome,
}

#[derive(Debug, Clone)]
pub struct ReadOp {
    pub invoke: Instant,
    pub complete: Instant,
    /// The timeline's last seq as the read saw it.
    pub last_seq: u64,
}

/// What a checked history held.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub records: usize,
    pub acked: usize,
    pub unknown_present: usize,
    pub unknown_absent: usize,
    pub reads: usize,
}

/// Check one timeline's history against its final `records` (seq, payload).
pub fn check(
    records: &[(u64, Vec<u8>)],
    appends: &[AppendOp],
    reads: &[ReadOp],
) -> Result<Summary, String> {
    let mut s = Summary {
        records: records.len(),
        reads: reads.len(),
        ..Summary::default()
    };
    for (i, (seq, _)) in records.iter().enumerate() {
        if *seq != i as u64 + 1 {
            return Err(format!("record {i} has seq {seq}: the seqs are not 1..=n"));
        }
    }
    // 2: each record is an attempted, not refused, append, once.
    let by_payload: HashMap<&[u8], &AppendOp> =
        appends.iter().map(|a| (a.payload.as_slice(), a)).collect();
    if by_payload.len() != appends.len() {
        return Err("the history's payloads are not unique (a test bug)".into());
    }
    let mut position: HashMap<&[u8], u64> = HashMap::new();
    for (seq, p) in records {
        let Some(op) = by_payload.get(p.as_slice()) else {
            return Err(format!(
                "seq {seq} holds {:?}, which no client appended",
                show(p)
            ));
        };
        if op.outcome == Outcome::Refused {
            return Err(format!(
                "seq {seq} holds {:?}, whose append was refused",
                show(p)
            ));
        }
        if position.insert(p.as_slice(), *seq).is_some() {
            return Err(format!("{:?} is in the timeline twice", show(p)));
        }
    }
    // 3: acknowledged appends are where they were told.
    let mut placed: Vec<(u64, &AppendOp)> = Vec::new();
    for a in appends {
        match a.outcome {
            Outcome::Acked(seq) => {
                s.acked += 1;
                match records.get((seq as usize).wrapping_sub(1)) {
                    Some((_, p)) if *p == a.payload => placed.push((seq, a)),
                    Some((_, p)) => {
                        return Err(format!(
                            "acknowledged {:?} at seq {seq}, but seq {seq} holds {:?}",
                            show(&a.payload),
                            show(p)
                        ))
                    }
                    None => {
                        return Err(format!(
                            "acknowledged {:?} at seq {seq}, but the timeline ends at {}: lost",
                            show(&a.payload),
                            records.len()
                        ))
                    }
                }
            }
            Outcome::Unknown => {
                if position.contains_key(a.payload.as_slice()) {
                    s.unknown_present += 1;
                } else {
                    s.unknown_absent += 1;
                }
            }
            Outcome::Refused => {}
        }
    }
    real_time_order(&placed, appends, &position)?;
    check_reads(records, &placed, &by_payload, reads)?;
    Ok(s)
}

/// 4: no acknowledged `a` returned before an append `b` at a lower seq was
/// invoked.
fn real_time_order(
    acked: &[(u64, &AppendOp)],
    appends: &[AppendOp],
    position: &HashMap<&[u8], u64>,
) -> Result<(), String> {
    // Everything placed, by seq: acknowledged ones with their return time,
    // present uncertain ones with none (they only constrain as `b`).
    let mut all: Vec<(u64, &AppendOp, bool)> = acked.iter().map(|(s, a)| (*s, *a, true)).collect();
    for a in appends.iter().filter(|a| a.outcome == Outcome::Unknown) {
        if let Some(&seq) = position.get(a.payload.as_slice()) {
            all.push((seq, a, false));
        }
    }
    all.sort_by_key(|(s, _, _)| *s);
    // From the highest seq down: the earliest return among higher seqs.
    let mut earliest: Option<(Instant, u64)> = None;
    for (seq, op, acked) in all.iter().rev() {
        if let Some((t, higher)) = earliest {
            if t < op.invoke {
                return Err(format!(
                    "the append at seq {higher} returned before the one at seq {seq} was invoked"
                ));
            }
        }
        if *acked && earliest.is_none_or(|(t, _)| op.complete < t) {
            earliest = Some((op.complete, *seq));
        }
    }
    Ok(())
}

/// 5: reads against acknowledged appends, the records, and each other.
fn check_reads(
    records: &[(u64, Vec<u8>)],
    acked: &[(u64, &AppendOp)],
    by_payload: &HashMap<&[u8], &AppendOp>,
    reads: &[ReadOp],
) -> Result<(), String> {
    let mut by_return: Vec<(Instant, u64)> = acked.iter().map(|(s, a)| (a.complete, *s)).collect();
    by_return.sort();
    let mut best = 0;
    let prefix_max: Vec<u64> = by_return
        .iter()
        .map(|(_, s)| {
            best = best.max(*s);
            best
        })
        .collect();
    for r in reads {
        let before = by_return.partition_point(|(t, _)| *t < r.invoke);
        if let Some(&need) = before.checked_sub(1).and_then(|i| prefix_max.get(i)) {
            if r.last_seq < need {
                return Err(format!(
                    "a read saw last seq {} after seq {need} had been acknowledged: stale",
                    r.last_seq
                ));
            }
        }
        if r.last_seq as usize > records.len() {
            return Err(format!(
                "a read saw last seq {}, but the timeline ends at {}: a write it saw was lost",
                r.last_seq,
                records.len()
            ));
        }
        if let Some((_, p)) = r
            .last_seq
            .checked_sub(1)
            .and_then(|i| records.get(i as usize))
        {
            let op = by_payload
                .get(p.as_slice())
                .ok_or("record without an append")?;
            if op.invoke > r.complete {
                return Err(format!(
                    "a read saw seq {} before its append was invoked",
                    r.last_seq
                ));
            }
        }
    }
    let mut rs: Vec<&ReadOp> = reads.iter().collect();
    rs.sort_by_key(|r| r.complete);
    let mut best = 0;
    let seen: Vec<u64> = rs
        .iter()
        .map(|r| {
            best = best.max(r.last_seq);
            best
        })
        .collect();
    for r in reads {
        let before = rs.partition_point(|x| x.complete < r.invoke);
        if let Some(&m) = before.checked_sub(1).and_then(|i| seen.get(i)) {
            if r.last_seq < m {
                return Err(format!(
                    "a read saw last seq {} after an earlier read had seen {m}",
                    r.last_seq
                ));
            }
        }
    }
    Ok(())
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn op(t0: Instant, p: &str, from: u64, to: u64, outcome: Outcome) -> AppendOp {
        AppendOp {
            payload: p.as_bytes().to_vec(),
            invoke: at(t0, from),
            complete: at(t0, to),
            outcome,
        }
    }

    fn recs(ps: &[&str]) -> Vec<(u64, Vec<u8>)> {
        ps.iter()
            .enumerate()
            .map(|(i, p)| (i as u64 + 1, p.as_bytes().to_vec()))
            .collect()
    }

    fn good(t0: Instant) -> Vec<AppendOp> {
        vec![
            op(t0, "a", 0, 10, Outcome::Acked(1)),
            // b and c overlap: either order is fine.
            op(t0, "b", 20, 40, Outcome::Acked(3)),
            op(t0, "c", 25, 35, Outcome::Acked(2)),
            op(t0, "d", 50, 60, Outcome::Unknown),
            op(t0, "e", 70, 80, Outcome::Refused),
        ]
    }

    #[test]
    fn a_linearizable_history_passes() {
        let t0 = Instant::now();
        let reads = vec![ReadOp {
            invoke: at(t0, 41),
            complete: at(t0, 45),
            last_seq: 3,
        }];
        let s = check(&recs(&["a", "c", "b", "d"]), &good(t0), &reads).unwrap();
        assert_eq!((s.acked, s.unknown_present, s.unknown_absent), (3, 1, 0));
        // The uncertain one may also be absent.
        let s = check(&recs(&["a", "c", "b"]), &good(t0), &reads).unwrap();
        assert_eq!(s.unknown_absent, 1);
    }

    #[test]
    fn each_violation_is_caught() {
        let t0 = Instant::now();
        let h = good(t0);
        let lost = check(&recs(&["a", "c"]), &h, &[]).unwrap_err();
        assert!(lost.contains("lost"), "{lost}");
        let moved = check(&recs(&["c", "a", "b"]), &h, &[]).unwrap_err();
        assert!(moved.contains("seq 1 holds"), "{moved}");
        let twice = check(&recs(&["a", "c", "b", "d", "d"]), &h, &[]).unwrap_err();
        assert!(twice.contains("twice"), "{twice}");
        let refused = check(&recs(&["a", "c", "b", "e"]), &h, &[]).unwrap_err();
        assert!(refused.contains("refused"), "{refused}");
        let gap = check(&[(1, b"a".to_vec()), (3, b"c".to_vec())], &h, &[]).unwrap_err();
        assert!(gap.contains("not 1..=n"), "{gap}");
        // a returned at 10, before b was invoked, yet b is placed first.
        let h2 = vec![
            op(t0, "a", 0, 10, Outcome::Acked(2)),
            op(t0, "b", 20, 30, Outcome::Acked(1)),
        ];
        let order = check(&recs(&["b", "a"]), &h2, &[]).unwrap_err();
        assert!(order.contains("returned before"), "{order}");
        let read = |from, to, last| ReadOp {
            invoke: at(t0, from),
            complete: at(t0, to),
            last_seq: last,
        };
        let r = recs(&["a", "c", "b", "d"]);
        let stale = check(&r, &h, &[read(41, 45, 2)]).unwrap_err();
        assert!(stale.contains("stale"), "{stale}");
        let future = check(&r, &h, &[read(11, 12, 4)]).unwrap_err();
        assert!(future.contains("before its append was invoked"), "{future}");
        let back = check(&r, &h, &[read(55, 58, 4), read(59, 62, 3)]).unwrap_err();
        assert!(back.contains("earlier read"), "{back}");
        let beyond = check(&r, &h, &[read(61, 62, 5)]).unwrap_err();
        assert!(beyond.contains("lost"), "{beyond}");
    }
}
