//! W2 `read`, on any [`Target`]: a W1 load first (its line has `phase:
//! "load"`) unless the target already holds data in timelines
//! `0..--timelines`, then `--reads` range reads of `--read-len` records at
//! a random timeline with data and a random start in it, half forward and
//! half newest-first (from the newest when the start is the last seq).
//! Read `r` is the same on every target. Every page is checked: its length,
//! consecutive seqs, and (after a load in this run, on every 16th page)
//! each record is a message sent to that timeline, byte for byte.

use super::append::{load, rate};
use super::imkit::Errors;
use super::{offsets, open_sessions, rng_at, take, timed_sessions, Messages, Picker};
use crate::report::Reporter;
use crate::targets::{drive, Op, Pipelined, Reply, Session, Target};
use crate::{Flags, Result};
use rand::Rng;
use timeline_engine::{Direction, Record};

/// Every page's length and seqs are checked; the bytes of every
/// `EXACT_EVERY`th page too (each is a memcmp against the sent bytes: on
/// every page it took 16 % of the engine's read time, work that is the
/// bench's, not the store's; W1's read-back checks every byte).
const EXACT_EVERY: u64 = 16;

/// `timeline-bench read`: returns the number of verification errors.
pub fn run<T: Target>(flags: &Flags, t: T, rep: &mut Reporter) -> Result<u64> {
    let errors = Errors::default();
    let existing = t.lengths(flags.timelines)?;
    let loaded = existing.iter().all(|&s| s == 0);
    if loaded {
        let mut line = load(flags, &t, &errors)?;
        line.phase = Some("load".into());
        rep.push(line)?;
    } else {
        eprintln!(
            "read: the target holds data in timelines 0..{}; skipping the load",
            flags.timelines
        );
    }
    let tls: Vec<(u64, u64)> = t
        .lengths(flags.timelines)?
        .into_iter()
        .enumerate()
        .filter(|&(_, s)| s > 0)
        .map(|(id, s)| (id as u64, s))
        .collect();
    if tls.is_empty() {
        return Err(format!(
            "no timeline among ids 0..{} has data; is --timelines right?",
            flags.timelines
        )
        .into());
    }
    if !loaded && flags.warm {
        warm(&t, &tls)?;
    }
    let m = Messages::new(flags)?;
    let check = Check {
        m: loaded.then_some(&m),
        messages: flags.messages,
        len: flags.read_len,
    };
    let fwd = flags.reads - flags.reads / 2;
    let mut last = None;
    for (dir, name, n, stream) in [
        (Direction::Forward, "forward", fwd, 1000),
        (Direction::Backward, "backward", flags.reads / 2, 2000),
    ] {
        let before = errors.count();
        let shape = t.shape();
        let sessions = open_sessions(&t)?;
        let firsts = offsets(n, shape.sessions);
        let picker = Picker::new(tls.len() as u64, flags.zipf)?;
        let mark = t.mark()?;
        let timed = timed_sessions(shape.sessions, n, |i, share, hist| {
            let mut r = Reader {
                s: take(&sessions, i)?,
                seed: flags.seed,
                stream,
                next: firsts[i as usize],
                picker: &picker,
                tls: &tls,
                dir,
                check: &check,
                records: 0,
                errors: &errors,
            };
            drive(&mut r, share, &shape, hist)?;
            Ok((r.records, 0))
        })?;
        drop(sessions);
        let mut line = t.line("read");
        line.direction = Some(name.into());
        line.ops = n;
        line.secs = timed.secs;
        line.ops_per_sec = rate(n, timed.secs);
        line.messages = Some(timed.counts.0);
        line.messages_per_sec = Some(rate(timed.counts.0, timed.secs));
        line.set_latency(&timed.hist);
        line.errors = Some(errors.count() - before);
        line.read_len = Some(flags.read_len);
        line.timelines_with_data = Some(tls.len() as u64);
        t.measure(&mark, &mut line)?;
        if let Some(l) = last.replace(line) {
            rep.push(l)?;
        }
    }
    t.close(last.as_mut())?;
    if let Some(l) = last {
        rep.push(l)?;
    }
    Ok(errors.count())
}

/// Read every timeline once, untimed (`--warm`, for data from an earlier run).
fn warm<T: Target>(t: &T, tls: &[(u64, u64)]) -> Result<()> {
    let start = std::time::Instant::now();
    let mut s = t.session()?;
    let mut n = 0u64;
    for &(id, last) in tls {
        s.queue(Op::Scan {
            id,
            from: 1,
            len: last as usize,
            dir: Direction::Forward,
        })?;
        s.flush()?;
        if let Reply::Page(p) = s.complete()? {
            n += p.len() as u64;
        }
    }
    eprintln!(
        "read: warmed by reading {n} records in {:.3} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What a page must be.
struct Check<'a> {
    /// The messages of this run's load, for exact bytes (None: data from an
    /// earlier run, seqs only).
    m: Option<&'a Messages>,
    messages: u64,
    len: usize,
}

impl Check<'_> {
    /// `None` if the page is what a read from `from` of a timeline of `last`
    /// records must return.
    fn page(
        &self,
        id: u64,
        page: &[Record],
        dir: Direction,
        from: u64,
        last: u64,
        exact: bool,
    ) -> Option<String> {
        let want = match dir {
            Direction::Forward => (last - from + 1).min(self.len as u64),
            Direction::Backward => from.min(self.len as u64),
        };
        if page.len() as u64 != want {
            return Some(format!("{} records, expected {want}", page.len()));
        }
        for (i, r) in page.iter().enumerate() {
            let seq = match dir {
                Direction::Forward => from + i as u64,
                Direction::Backward => from - i as u64,
            };
            if r.seq != seq {
                return Some(format!("record {i} has seq {}, expected {seq}", r.seq));
            }
            if let Some(m) = self.m.filter(|_| exact) {
                if let Err(e) = m.check(id, &r.payload, self.messages) {
                    return Some(format!("seq {seq}: {e}"));
                }
            }
        }
        None
    }
}

/// One session's reads.
struct Reader<'a, S> {
    s: S,
    seed: u64,
    stream: u64,
    /// The number of this session's next read (over the run).
    next: u64,
    picker: &'a Picker,
    tls: &'a [(u64, u64)],
    dir: Direction,
    check: &'a Check<'a>,
    records: u64,
    errors: &'a Errors,
}

impl<S: Session> Pipelined for Reader<'_, S> {
    /// (timeline, its length, start).
    type Ctx = (u64, u64, u64, bool);
    type Reply = Reply;

    fn queue(&mut self) -> Result<Self::Ctx> {
        let mut rng = rng_at(self.seed, self.stream, self.next);
        self.next += 1;
        let (id, last) = self.tls[self.picker.pick(&mut rng) as usize];
        let from = rng.gen_range(1..=last);
        let arg = if self.dir == Direction::Backward && from == last {
            u64::MAX
        } else {
            from
        };
        self.s.queue(Op::Scan {
            id,
            from: arg,
            len: self.check.len,
            dir: self.dir,
        })?;
        Ok((id, last, from, (self.next - 1).is_multiple_of(EXACT_EVERY)))
    }

    fn flush(&mut self) -> Result<()> {
        self.s.flush()
    }

    fn complete(&mut self) -> Result<Reply> {
        self.s.complete()
    }

    fn check(&mut self, (id, last, from, exact): Self::Ctx, reply: Reply) -> Result<()> {
        let problem = match reply {
            Reply::Page(page) => {
                self.records += page.len() as u64;
                self.check.page(id, &page, self.dir, from, last, exact)
            }
            Reply::Refused(e) => Some(format!("refused: {e}")),
            Reply::Appended(_) => Some("a scan answered like an append".into()),
        };
        if let Some(p) = problem {
            let dir = self.dir;
            self.errors.report("read", || {
                format!("timeline {id} ({last} records), from {from} {dir:?}: {p}")
            });
        }
        Ok(())
    }
}
