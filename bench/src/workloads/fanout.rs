//! W3 `fanout`, on any [`ImTarget`]: `--groups` messages to groups of
//! `--fanout` members among `--timelines` users (up to `MAX_GROUPS` groups;
//! more messages go round-robin to the same groups), fanned out by mode
//! (`--fanout-mode write|read|hybrid`). Message `i` goes to group `i %
//! groups` from a member chosen by `rng_at(i)`: the same on every target.
//! Verification, untimed: 1,000 sampled receivers catch up from where setup
//! left them and must see every acknowledged message of each of their
//! groups, in order, once, with a `--payload`-byte payload.

use super::append::rate;
use super::imkit::{self, catch_up, mode_name, random_members, Device, Errors};
use super::{offsets, open_im_sessions, rng_at, take, timed_sessions, Payloads};
use crate::report::Reporter;
use crate::targets::{drive, drive_paced, ConvSpec, ImOp, ImReply, ImSession, ImTarget, Pipelined};
use crate::{FanoutMode, Flags, Result};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use timeline_im::{ConvId, ConvKind, UserId};

/// Most groups created: `--groups` messages beyond this go round-robin to
/// the same groups (each group receives `--groups / MAX_GROUPS` messages).
pub const MAX_GROUPS: u64 = 10_000;
/// Receivers whose sync timelines are read back and checked after the run.
const VERIFY_USERS: usize = 1_000;

/// The groups of a run and its checked receivers.
pub struct Plan {
    pub messages: u64,
    pub fanout: usize,
    pub mode: FanoutMode,
    pub threshold: usize,
    pub groups: Vec<Vec<UserId>>,
}

impl Plan {
    pub fn new(flags: &Flags) -> Result<Plan> {
        let messages = flags.groups.unwrap_or(10_000);
        let m = flags.fanout.unwrap_or(200);
        if m == 0 || m as u64 > flags.timelines {
            return Err(format!(
                "--fanout {m} must be in 1..=--timelines ({})",
                flags.timelines
            )
            .into());
        }
        if messages == 0 {
            return Err("--groups must be at least 1".into());
        }
        let mode = flags.fanout_mode.unwrap_or(FanoutMode::Write);
        let mut rng = imkit::rng(flags.seed, 0);
        let groups = (0..messages.min(MAX_GROUPS))
            .map(|_| random_members(&mut rng, flags.timelines, m))
            .collect();
        Ok(Plan {
            messages,
            fanout: m,
            mode,
            threshold: imkit::threshold_for(mode, flags),
            groups,
        })
    }

    /// On a cluster the nodes' `--hybrid-threshold` decides the mode (the
    /// bench cannot set it): `--hybrid-threshold` here must name the
    /// nodes' (default 500, as theirs), and a `--fanout-mode` the groups
    /// would not get under it is refused rather than mislabelled.
    pub fn on_cluster(&mut self, flags: &Flags) -> Result<()> {
        let h = imkit::hybrid_threshold(flags);
        let read = self.fanout > h;
        let named = match self.mode {
            FanoutMode::Write => !read,
            FanoutMode::Read => read,
            FanoutMode::Hybrid => true,
        };
        if !named {
            return Err(format!(
                "on a cluster, groups of {} members are {} fan-out under the nodes' --hybrid-threshold {h} (give the nodes' value with --hybrid-threshold); --fanout-mode {} cannot be run",
                self.fanout,
                if read { "read" } else { "write" },
                mode_name(self.mode)
            )
            .into());
        }
        self.threshold = h;
        Ok(())
    }

    pub fn specs(&self) -> Vec<ConvSpec> {
        self.groups
            .iter()
            .enumerate()
            .map(|(i, ms)| ConvSpec {
                id: i as ConvId,
                kind: ConvKind::Group,
                members: ms.clone(),
            })
            .collect()
    }

    /// Up to `VERIFY_USERS` receivers and their groups.
    fn sample(&self, seed: u64) -> Vec<(UserId, Vec<ConvId>)> {
        let mut rng = imkit::rng(seed, 1);
        let mut member_of: HashMap<UserId, Vec<ConvId>> = HashMap::new();
        let mut order = Vec::new();
        for _ in 0..VERIFY_USERS * 20 {
            if order.len() >= VERIFY_USERS {
                break;
            }
            let g = &self.groups[rng.gen_range(0..self.groups.len())];
            let u = g[rng.gen_range(0..g.len())];
            if member_of.insert(u, Vec::new()).is_none() {
                order.push(u);
            }
        }
        for (i, g) in self.groups.iter().enumerate() {
            for u in g {
                if let Some(v) = member_of.get_mut(u) {
                    v.push(i as ConvId);
                }
            }
        }
        order
            .into_iter()
            .map(|u| (u, member_of.remove(&u).unwrap_or_default()))
            .collect()
    }
}

/// One session's sends: messages `next..end`.
struct Sender<'a, S> {
    s: S,
    p: &'a Plan,
    seed: u64,
    payloads: &'a Payloads,
    next: u64,
    acked: &'a [AtomicU64],
    errors: &'a Errors,
}

impl<S: ImSession> Pipelined for Sender<'_, S> {
    type Ctx = usize;
    type Reply = ImReply;

    fn queue(&mut self) -> Result<usize> {
        let i = self.next;
        self.next += 1;
        let g = (i % self.p.groups.len() as u64) as usize;
        let ms = &self.p.groups[g];
        let mut rng = rng_at(self.seed, 0xF3, i);
        let sender = ms[rng.gen_range(0..ms.len())];
        let payload = self.payloads.pick(&mut rng);
        self.s.queue(ImOp::Send {
            conv: g as ConvId,
            sender,
            msg_id: i + 1,
            payload,
        })?;
        Ok(g)
    }

    fn flush(&mut self) -> Result<()> {
        self.s.flush()
    }

    fn complete(&mut self) -> Result<ImReply> {
        self.s.complete()
    }

    fn check(&mut self, g: usize, reply: ImReply) -> Result<()> {
        match reply {
            ImReply::Sent => {
                self.acked[g].fetch_add(1, Ordering::Relaxed);
            }
            ImReply::Refused(e) => self.errors.report("send", || format!("group {g}: {e}")),
            ImReply::Synced(_) => return Err("a send answered like a sync".into()),
        }
        Ok(())
    }
}

/// The timed sends of `p` over `t`'s sessions (paced with `--rate`).
pub(crate) fn send_all<T: ImTarget>(
    flags: &Flags,
    t: &T,
    p: &Plan,
    acked: &[AtomicU64],
    errors: &Errors,
) -> Result<super::Timed> {
    let shape = t.shape();
    let payloads = Payloads::new(flags.payload, flags.seed);
    let firsts = offsets(p.messages, shape.sessions);
    let per_session = flags.rate as f64 / shape.sessions as f64;
    let sessions = open_im_sessions(t)?;
    timed_sessions(shape.sessions, p.messages, |i, n, hist| {
        let mut s = Sender {
            s: take(&sessions, i)?,
            p,
            seed: flags.seed,
            payloads: &payloads,
            next: firsts[i as usize],
            acked,
            errors,
        };
        if flags.rate > 0 {
            drive_paced(&mut s, n, &shape, per_session, hist)?;
        } else {
            drive(&mut s, n, &shape, hist)?;
        }
        Ok((0, 0))
    })
}

/// `timeline-bench fanout`: returns the number of verification errors.
pub fn run<T: ImTarget>(flags: &Flags, mut t: T, p: &Plan, rep: &mut Reporter) -> Result<u64> {
    let (messages, m) = (p.messages, p.fanout);
    let shape = t.shape();
    eprintln!(
        "fanout: {messages} messages of {} B to {} groups of {m} members among {} users, mode {}, \
         {} session(s) x {} in flight, durability {}",
        flags.payload,
        p.groups.len(),
        flags.timelines,
        mode_name(p.mode),
        shape.sessions,
        shape.window,
        super::durability(flags).name()
    );
    let t0 = std::time::Instant::now();
    t.create(&p.specs())?;
    let setup_secs = t0.elapsed().as_secs_f64();
    let sample = p.sample(flags.seed);
    let users: Vec<UserId> = sample.iter().map(|s| s.0).collect();
    let read_fanout = m > p.threshold;
    let mut devices: Vec<Device> = sample
        .iter()
        .zip(t.sync_ends(&users)?)
        .map(|((u, convs), cp)| Device::at(*u, cp, convs, if read_fanout { convs } else { &[] }))
        .collect();

    let acked: Vec<AtomicU64> = (0..p.groups.len()).map(|_| AtomicU64::new(0)).collect();
    let errors = Errors::default();
    let mark = t.mark()?;
    let timed = send_all(flags, &t, p, &acked, &errors)?;
    let mut line = t.line("fanout");
    let delivered: u64 = acked
        .iter()
        .enumerate()
        .map(|(g, a)| a.load(Ordering::Relaxed) * p.groups[g].len() as u64)
        .sum();
    line.ops = messages;
    line.secs = timed.secs;
    line.ops_per_sec = rate(messages, timed.secs);
    line.messages = Some(messages);
    line.messages_per_sec = Some(rate(messages, timed.secs));
    line.deliveries = Some(delivered);
    line.deliveries_per_sec = Some(rate(delivered, timed.secs));
    line.payload_bytes = Some(messages * flags.payload as u64);
    line.set_latency(&timed.hist);
    t.measure(&mark, &mut line)?;

    // Verification: every send acknowledged; the sampled receivers catch up.
    let acked_total: u64 = acked.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    if acked_total != messages {
        errors.report("verify", || {
            format!("{acked_total} sends acknowledged, {messages} sent")
        });
    }
    let t1 = std::time::Instant::now();
    let mut s = t.session()?;
    let read = catch_up(&mut s, &mut devices, &errors, |pl| {
        if pl.len() != flags.payload {
            errors.report("verify", || {
                format!("a {} B payload, sent {}", pl.len(), flags.payload)
            });
        }
    })?;
    drop(s);
    for dev in &devices {
        dev.check_complete(&acked, &errors);
    }
    eprintln!(
        "fanout: timed {:.3} s; verified {} receivers ({} messages) in {:.3} s",
        timed.secs,
        devices.len(),
        read.entries,
        t1.elapsed().as_secs_f64()
    );
    line.fanout_mode = Some(mode_name(p.mode).into());
    line.group_size = Some(m as u64);
    line.groups = Some(p.groups.len() as u64);
    line.users = Some(flags.timelines);
    line.timelines = Some(flags.timelines);
    line.zipf = None;
    if p.mode == FanoutMode::Hybrid {
        line.hybrid_threshold = Some(p.threshold as u64);
    }
    line.rate = (flags.rate > 0).then_some(flags.rate);
    line.setup_secs = Some(imkit::round4(setup_secs));
    line.errors = Some(errors.count());
    t.close(Some(&mut line))?;
    rep.push(line)?;
    Ok(errors.count())
}
