//! W1 `append`, on any [`Target`]: `--messages` messages of `--payload`
//! bytes to `--timelines` timelines (uniform, or `--zipf`), `--batch` per
//! request, over the target's sessions. Message `g` is the same on every
//! target ([`Messages`]). Verification, untimed: every timeline's length
//! grew by the appends acknowledged to it (and ends at the highest seq
//! acknowledged), then every new record is read back and must be a message
//! sent to that timeline, byte for byte, each exactly once.

use super::imkit::Errors;
use super::{offsets, open_sessions, take, timed_sessions, Messages};
use crate::report::{Reporter, ResultLine};
use crate::targets::{drive, Op, Pipelined, Reply, Session, Target};
use crate::{Flags, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// Records per read-back request.
const READ_BACK_PAGE: usize = 1000;

/// `timeline-bench append`: returns the number of verification errors.
pub fn run<T: Target>(flags: &Flags, t: T, rep: &mut Reporter) -> Result<u64> {
    let errors = Errors::default();
    let mut line = load(flags, &t, &errors)?;
    t.close(Some(&mut line))?;
    rep.push(line)?;
    Ok(errors.count())
}

/// Per-timeline counts of acknowledged appends and the highest seq.
pub struct Counts {
    n: Vec<AtomicU64>,
    max: Vec<AtomicU64>,
}

impl Counts {
    pub fn new(timelines: u64) -> Counts {
        Counts {
            n: (0..timelines).map(|_| AtomicU64::new(0)).collect(),
            max: (0..timelines).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn note(&self, id: u64, seq: u64) {
        if let (Some(n), Some(m)) = (self.n.get(id as usize), self.max.get(id as usize)) {
            n.fetch_add(1, Ordering::Relaxed);
            m.fetch_max(seq, Ordering::Relaxed);
        }
    }

    fn total(&self) -> u64 {
        self.n.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }
}

/// One session's share of the load: messages `next..end`.
struct Appender<'a, S> {
    s: S,
    m: &'a Messages,
    next: u64,
    end: u64,
    batch: u64,
    /// `batch` payloads, reused.
    buf: Vec<u8>,
    len: usize,
    counts: &'a Counts,
    errors: &'a Errors,
}

impl<S: Session> Pipelined for Appender<'_, S> {
    /// The timelines of the request's items.
    type Ctx = Vec<u64>;
    type Reply = Reply;

    fn queue(&mut self) -> Result<Vec<u64>> {
        let b = self.batch.min(self.end - self.next);
        let ids: Vec<u64> = (self.next..self.next + b)
            .map(|g| self.m.timeline(g))
            .collect();
        for (k, g) in (self.next..self.next + b).enumerate() {
            self.m
                .payload(g, &mut self.buf[k * self.len..(k + 1) * self.len]);
        }
        self.next += b;
        let items: Vec<(u64, &[u8])> = ids
            .iter()
            .zip(self.buf.chunks(self.len.max(1)))
            .map(|(&id, p)| (id, &p[..self.len]))
            .collect();
        self.s.queue(Op::Append(&items))?;
        Ok(ids)
    }

    fn flush(&mut self) -> Result<()> {
        self.s.flush()
    }

    fn complete(&mut self) -> Result<Reply> {
        self.s.complete()
    }

    fn check(&mut self, ids: Vec<u64>, reply: Reply) -> Result<()> {
        match reply {
            Reply::Appended(seqs) if seqs.len() == ids.len() => {
                for (id, seq) in ids.into_iter().zip(seqs) {
                    self.counts.note(id, seq);
                }
            }
            Reply::Refused(e) => self.errors.report("append", || e),
            _ => self
                .errors
                .report("append", || "a reply that is not one seq per item".into()),
        }
        Ok(())
    }
}

/// The timed W1 load and its verification: the `append` line.
pub fn load<T: Target>(flags: &Flags, t: &T, errors: &Errors) -> Result<ResultLine> {
    let m = Messages::new(flags)?;
    let shape = t.shape();
    eprintln!(
        "append: {} messages of {} B to {} timelines, {} per request, {} session(s) x {} in flight",
        flags.messages, flags.payload, flags.timelines, flags.batch, shape.sessions, shape.window
    );
    let before = t.lengths(flags.timelines)?;
    let counts = Counts::new(flags.timelines);
    let sessions = open_sessions(t)?;
    let firsts = offsets(flags.messages, shape.sessions);
    let calls = AtomicU64::new(0);
    let mark = t.mark()?;
    let timed = timed_sessions(shape.sessions, flags.messages, |i, n, hist| {
        let first = firsts[i as usize];
        let batch = flags.batch as u64;
        let mut a = Appender {
            s: take(&sessions, i)?,
            m: &m,
            next: first,
            end: first + n,
            batch,
            buf: vec![0u8; flags.batch * flags.payload],
            len: flags.payload,
            counts: &counts,
            errors,
        };
        let requests = n.div_ceil(batch);
        drive(&mut a, requests, &shape, hist)?;
        calls.fetch_add(requests, Ordering::Relaxed);
        Ok((0, 0))
    })?;
    drop(sessions);
    let mut line = t.line("append");
    t.settle(&mut line)?;
    let messages = flags.messages;
    line.ops = messages;
    line.secs = timed.secs;
    line.ops_per_sec = rate(messages, timed.secs);
    line.messages = Some(messages);
    line.messages_per_sec = Some(rate(messages, timed.secs));
    line.calls = Some(calls.load(Ordering::Relaxed));
    line.payload_bytes = Some(messages * flags.payload as u64);
    line.batch = Some(flags.batch);
    line.set_latency(&timed.hist);
    t.measure(&mark, &mut line)?;
    eprintln!("append: timed section {:.3} s; verifying", timed.secs);
    let after = verify(flags, t, &m, &before, &counts, errors)?;
    line.timelines_with_data = Some(after.iter().filter(|&&s| s > 0).count() as u64);
    line.errors = Some(errors.count());
    Ok(line)
}

/// Lengths against the acknowledged appends, then the read-back. Returns
/// the lengths after the load.
fn verify<T: Target>(
    flags: &Flags,
    t: &T,
    m: &Messages,
    before: &[u64],
    counts: &Counts,
    errors: &Errors,
) -> Result<Vec<u64>> {
    if counts.total() != flags.messages {
        errors.report("verify", || {
            format!(
                "{} appends acknowledged, {} sent",
                counts.total(),
                flags.messages
            )
        });
    }
    let after = t.lengths(flags.timelines)?;
    let mut new: Vec<(u64, u64, u64)> = Vec::new();
    for (id, (&b, &a)) in before.iter().zip(&after).enumerate() {
        let n = counts.n[id].load(Ordering::Relaxed);
        let max = counts.max[id].load(Ordering::Relaxed);
        if a != b + n || (max > 0 && max != a) {
            errors.report("verify", || {
                format!("timeline {id}: length {b} before, {a} after, {n} appends acknowledged (highest seq {max})")
            });
        }
        if a > b {
            new.push((id as u64, b + 1, a));
        }
    }
    let seen = read_back(flags, t, m, &new, errors)?;
    if m.numbered() && seen != flags.messages {
        errors.report("verify", || {
            format!(
                "{seen} distinct messages read back, {} sent",
                flags.messages
            )
        });
    }
    Ok(after)
}

/// One read-back request: timeline, first seq, last seq wanted.
struct ReadBack<'a, S> {
    s: S,
    m: &'a Messages,
    pages: std::iter::Copied<std::slice::Iter<'a, (u64, u64, u64)>>,
    messages: u64,
    seen: &'a [AtomicU64],
    errors: &'a Errors,
}

impl<S: Session> Pipelined for ReadBack<'_, S> {
    type Ctx = (u64, u64, u64);
    type Reply = Reply;

    fn queue(&mut self) -> Result<Self::Ctx> {
        let (id, from, to) = self.pages.next().ok_or("no page left")?;
        self.s.queue(Op::Scan {
            id,
            from,
            len: (to - from + 1) as usize,
            dir: timeline_engine::Direction::Forward,
        })?;
        Ok((id, from, to))
    }

    fn flush(&mut self) -> Result<()> {
        self.s.flush()
    }

    fn complete(&mut self) -> Result<Reply> {
        self.s.complete()
    }

    fn check(&mut self, (id, from, to): Self::Ctx, reply: Reply) -> Result<()> {
        let page = match reply {
            Reply::Page(p) => p,
            Reply::Refused(e) => {
                self.errors
                    .report("verify", || format!("timeline {id}: {e}"));
                return Ok(());
            }
            Reply::Appended(_) => return Err("a scan answered like an append".into()),
        };
        if page.len() as u64 != to - from + 1 {
            self.errors.report("verify", || {
                format!(
                    "timeline {id}: {} records from seq {from}, expected {}",
                    page.len(),
                    to - from + 1
                )
            });
        }
        for (k, r) in page.iter().enumerate() {
            if r.seq != from + k as u64 {
                self.errors.report("verify", || {
                    format!(
                        "timeline {id}: record {k} has seq {}, expected {}",
                        r.seq,
                        from + k as u64
                    )
                });
            }
            match self.m.check(id, &r.payload, self.messages) {
                Ok(Some(g)) => {
                    let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
                    if self.seen[w].fetch_or(bit, Ordering::Relaxed) & bit != 0 {
                        self.errors
                            .report("verify", || format!("message {g} read back twice"));
                    }
                }
                Ok(None) => {}
                Err(e) => self
                    .errors
                    .report("verify", || format!("timeline {id} seq {}: {e}", r.seq)),
            }
        }
        Ok(())
    }
}

/// Read every new record back through the target's sessions; returns the
/// number of distinct messages seen.
fn read_back<T: Target>(
    flags: &Flags,
    t: &T,
    m: &Messages,
    new: &[(u64, u64, u64)],
    errors: &Errors,
) -> Result<u64> {
    let mut pages = Vec::new();
    for &(id, from, to) in new {
        let mut f = from;
        while f <= to {
            let e = (f + READ_BACK_PAGE as u64 - 1).min(to);
            pages.push((id, f, e));
            f = e + 1;
        }
    }
    let seen: Vec<AtomicU64> = (0..flags.messages.div_ceil(64))
        .map(|_| AtomicU64::new(0))
        .collect();
    let shape = t.shape();
    let sessions = open_sessions(t)?;
    let firsts = offsets(pages.len() as u64, shape.sessions);
    timed_sessions(shape.sessions, pages.len() as u64, |i, n, hist| {
        let f = firsts[i as usize] as usize;
        let mut r = ReadBack {
            s: take(&sessions, i)?,
            m,
            pages: pages[f..f + n as usize].iter().copied(),
            messages: flags.messages,
            seen: &seen,
            errors,
        };
        drive(&mut r, n, &shape, hist)?;
        Ok((0, 0))
    })?;
    Ok(seen
        .iter()
        .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
        .sum())
}

pub fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n as f64 / secs).round()
    } else {
        0.0
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::targets::{base_line, Done, Shape};
    use clap::Parser;
    use std::sync::Mutex;
    use timeline_engine::Record;

    /// Timelines in memory, with a fault to plant.
    #[derive(Default)]
    struct Mem {
        tls: Mutex<Vec<Vec<Vec<u8>>>>,
        fault: Option<Fault>,
        sessions: usize,
    }

    #[derive(Clone, Copy)]
    enum Fault {
        /// Acknowledge the 10th append without storing it.
        Lose,
        /// Store the 10th append twice.
        Duplicate,
        /// Flip a byte of the 10th payload.
        Corrupt,
    }

    struct MemSession<'a>(&'a Mem, Done<Reply>);

    static APPENDS: AtomicU64 = AtomicU64::new(0);

    impl Session for MemSession<'_> {
        fn queue(&mut self, op: Op<'_>) -> Result<()> {
            let mut tls = self.0.tls.lock().unwrap();
            let r = match op {
                Op::Append(items) => Reply::Appended(
                    items
                        .iter()
                        .map(|&(id, p)| {
                            let tl = &mut tls[id as usize];
                            let mut p = p.to_vec();
                            match (APPENDS.fetch_add(1, Ordering::Relaxed) == 9, self.0.fault) {
                                (true, Some(Fault::Lose)) => return tl.len() as u64 + 1,
                                (true, Some(Fault::Duplicate)) => tl.push(p.clone()),
                                (true, Some(Fault::Corrupt)) => p[20] ^= 1,
                                _ => {}
                            }
                            tl.push(p);
                            tl.len() as u64
                        })
                        .collect(),
                ),
                Op::Scan { id, from, len, .. } => Reply::Page(
                    tls[id as usize]
                        .iter()
                        .enumerate()
                        .skip(from as usize - 1)
                        .take(len)
                        .map(|(i, p)| Record {
                            seq: i as u64 + 1,
                            timestamp_ms: 0,
                            payload: p.clone(),
                        })
                        .collect(),
                ),
            };
            self.1.push(r);
            Ok(())
        }
        fn flush(&mut self) -> Result<()> {
            Ok(())
        }
        fn complete(&mut self) -> Result<Reply> {
            self.1.pop()
        }
    }

    impl Target for Mem {
        type Session<'a> = MemSession<'a>;
        type Mark = ();
        fn shape(&self) -> Shape {
            Shape {
                sessions: self.sessions,
                window: 4,
                refill: 1,
            }
        }
        fn session(&self) -> Result<MemSession<'_>> {
            Ok(MemSession(self, Done::default()))
        }
        fn lengths(&self, n: u64) -> Result<Vec<u64>> {
            let mut tls = self.tls.lock().unwrap();
            tls.resize(n as usize, Vec::new());
            Ok(tls.iter().map(|t| t.len() as u64).collect())
        }
        fn line(&self, w: &str) -> ResultLine {
            base_line(&flags(&[]), w, "mem")
        }
        fn mark(&self) -> Result<()> {
            Ok(())
        }
        fn settle(&self, _: &mut ResultLine) -> Result<()> {
            Ok(())
        }
        fn measure(&self, _: &(), _: &mut ResultLine) -> Result<()> {
            Ok(())
        }
        fn close(self, _: Option<&mut ResultLine>) -> Result<()> {
            Ok(())
        }
    }

    fn flags(args: &[&str]) -> Flags {
        let cli = crate::Cli::parse_from(["timeline-bench", "append"].iter().chain(args));
        let crate::Cmd::Append(mut f) = cli.cmd else {
            unreachable!()
        };
        f.resolve(&crate::Cmd::Append(f.clone()));
        f
    }

    fn errors_with(fault: Option<Fault>, sessions: usize) -> u64 {
        APPENDS.store(0, Ordering::Relaxed);
        let f = flags(&["--messages", "500", "--timelines", "7", "--batch", "3"]);
        let t = Mem {
            fault,
            sessions,
            ..Default::default()
        };
        let errors = Errors::default();
        load(&f, &t, &errors).unwrap();
        errors.count()
    }

    #[test]
    fn verification_passes_a_faithful_target_and_catches_each_fault() {
        assert_eq!(errors_with(None, 1), 0);
        assert_eq!(errors_with(None, 3), 0);
        for fault in [Fault::Lose, Fault::Duplicate, Fault::Corrupt] {
            assert!(errors_with(Some(fault), 2) > 0);
        }
    }

    #[test]
    fn a_message_is_the_same_whichever_session_sends_it() {
        let f = flags(&["--timelines", "1000", "--zipf", "1.1"]);
        let (a, b) = (Messages::new(&f).unwrap(), Messages::new(&f).unwrap());
        let (mut x, mut y) = (vec![0u8; f.payload], vec![0u8; f.payload]);
        for g in [0, 1, 77, 1 << 33] {
            assert_eq!(a.timeline(g), b.timeline(g));
            a.payload(g, &mut x);
            b.payload(g, &mut y);
            assert_eq!(x, y);
            assert_eq!(a.check(a.timeline(g), &x, u64::MAX), Ok(Some(g)));
        }
        // Zipf: timeline 0 is the hottest; all of them are reachable.
        let hits: Vec<u64> = (0..20_000).map(|g| a.timeline(g)).collect();
        let zeros = hits.iter().filter(|&&t| t == 0).count();
        assert!(
            zeros > 20_000 / 20 && hits.iter().all(|&t| t < 1000),
            "{zeros}"
        );
        // Another seed, other messages.
        let other = Messages::new(&flags(&["--timelines", "1000", "--seed", "7"])).unwrap();
        assert!((0..100).any(|g| other.timeline(g) != a.timeline(g)));
    }
}
