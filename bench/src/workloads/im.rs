//! W4 `im`: the IM workload (users with devices, 1:1 and group
//! conversations of heavy-tailed sizes, hybrid fan-out, Zipf-skewed
//! activity, devices syncing at a message-level read:write ratio of ~10:1).
//! The model and every constant are described in `main.rs`'s doc comment.

use super::append::rate;
use super::imkit::{
    self, catch_up, ns_since, random_members, stamp, stamp_of, sync_round, Device, Errors,
    SyncCount,
};
use super::{timed_sessions, Payloads, Picker};
use crate::report::{new_histogram, Reporter};
use crate::targets::{
    drive, drive_paced, ConvSpec, ImOp, ImReply, ImSession, ImTarget, Pipelined, Pushed, Subscriber,
};
use crate::{Flags, Result};
use hdrhistogram::Histogram;
use rand::seq::SliceRandom;
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use timeline_im::{ConvId, ConvKind, UserId};

/// Direct conversations per user (each has two members: every user is in
/// two on average).
const DIRECTS_PER_USER: f64 = 1.0;
/// Group counts per user, and their sizes: small uniform in 3..=20, medium
/// log-uniform in 21..=500, large log-spaced over 501..=20,000 (at least
/// one large group; sizes are capped at `--users`).
const SMALL_PER_USER: f64 = 1.0 / 10.0;
const MEDIUM_PER_USER: f64 = 1.0 / 400.0;
const LARGE_PER_USER: f64 = 1.0 / 20_000.0;
const SMALL: (usize, usize) = (3, 20);
const MEDIUM: (usize, usize) = (21, 500);
const LARGE: (usize, usize) = (501, 20_000);
/// Share of the messages each class receives (direct, small, medium, large).
pub const SHARES: [f64; 4] = [0.65, 0.30, 0.049, 0.001];
/// Zipf exponent of activity within a class (`--zipf` overrides).
pub(crate) const DEFAULT_ZIPF: f64 = 1.0;
/// Target message-level read:write ratio: online devices are added until
/// their expected reads per message sent reach it.
pub(crate) const READ_RATIO: f64 = 10.0;
/// Latency probes: one member of each of the hottest conversations of
/// every class.
pub(crate) const PROBES_PER_CLASS: usize = 8;
/// Entries per `sync` page a device asks for.
pub(crate) const DEVICE_PAGE: usize = 100;
/// A device thread that found no device to sync sleeps this long.
pub(crate) const IDLE_SLEEP: Duration = Duration::from_micros(100);
/// The probe thread's pause after a pass that found nothing.
pub(crate) const PROBE_SLEEP: Duration = Duration::from_micros(20);
/// Offline users whose first device catches up and is checked at the end.
const VERIFY_OFFLINE_USERS: usize = 1_000;

/// `--devices`: "2" or "1-3".
fn parse_devices(s: &str) -> Result<(u8, u8)> {
    let bad = || format!("--devices {s}: expected N or MIN-MAX with 1 <= MIN <= MAX <= 255");
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    };
    let a: u8 = a.parse().map_err(|_| bad())?;
    let b: u8 = b.parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad().into());
    }
    Ok((a, b))
}

/// The conversations of a run.
pub(crate) struct World {
    pub users: u64,
    /// Devices per user.
    pub devices: Vec<u8>,
    /// Members of each conversation (index = conversation id).
    pub members: Vec<Vec<UserId>>,
    /// Conversation ids of each class, hottest first.
    pub classes: [Vec<ConvId>; 4],
    pub read_fanout: Vec<bool>,
    /// Each conversation's probability of receiving a given message.
    pub weight: Vec<f64>,
}

pub(crate) fn build_world(flags: &Flags) -> Result<World> {
    let users = flags.users.unwrap_or(100_000);
    if users < 3 {
        return Err("--users must be at least 3".into());
    }
    let (dmin, dmax) = parse_devices(flags.devices.as_deref().unwrap_or("1-3"))?;
    let h = imkit::hybrid_threshold(flags);
    let s = flags.zipf.unwrap_or(DEFAULT_ZIPF);
    let mut rng = imkit::rng(flags.seed, 100);
    let devices: Vec<u8> = (0..users).map(|_| rng.gen_range(dmin..=dmax)).collect();
    let count = |per_user: f64| ((users as f64 * per_user).round() as usize).max(1);
    let cap = |n: usize| n.min(users as usize);
    let mut members: Vec<Vec<UserId>> = Vec::new();
    let mut classes: [Vec<ConvId>; 4] = Default::default();
    for _ in 0..count(DIRECTS_PER_USER) {
        let a = rng.gen_range(0..users);
        let mut b = rng.gen_range(0..users - 1);
        if b >= a {
            b += 1;
        }
        classes[0].push(members.len() as ConvId);
        members.push(vec![a, b]);
    }
    for _ in 0..count(SMALL_PER_USER) {
        let n = cap(rng.gen_range(SMALL.0..=SMALL.1));
        classes[1].push(members.len() as ConvId);
        members.push(random_members(&mut rng, users, n));
    }
    let (lo, hi) = ((MEDIUM.0 as f64).ln(), (MEDIUM.1 as f64).ln());
    for _ in 0..count(MEDIUM_PER_USER) {
        let n = cap((lo + rng.gen::<f64>() * (hi - lo)).exp().round() as usize);
        classes[2].push(members.len() as ConvId);
        members.push(random_members(&mut rng, users, n));
    }
    let n_large = count(LARGE_PER_USER);
    let mut sizes: Vec<usize> = (0..n_large)
        .map(|k| {
            if n_large == 1 {
                return LARGE.1;
            }
            let f = k as f64 / (n_large - 1) as f64;
            ((LARGE.0 as f64) * (LARGE.1 as f64 / LARGE.0 as f64).powf(f)).round() as usize
        })
        .collect();
    sizes.shuffle(&mut rng);
    for n in sizes {
        classes[3].push(members.len() as ConvId);
        members.push(random_members(&mut rng, users, cap(n)));
    }
    let read_fanout: Vec<bool> = members
        .iter()
        .enumerate()
        .map(|(c, m)| c >= classes[0].len() && m.len() > h)
        .collect();
    let mut weight = vec![0.0; members.len()];
    for (k, class) in classes.iter().enumerate() {
        let w: Vec<f64> = (0..class.len())
            .map(|r| 1.0 / ((r + 1) as f64).powf(s))
            .collect();
        let sum: f64 = w.iter().sum();
        for (&c, x) in class.iter().zip(&w) {
            weight[c as usize] = SHARES[k] * x / sum;
        }
    }
    Ok(World {
        users,
        devices,
        members,
        classes,
        read_fanout,
        weight,
    })
}

fn join<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    r.unwrap_or_else(|_| Err("thread panicked".into()))
}

/// The conversations, devices, latency probes, online devices and the
/// offline users checked at the end: everything a W4 run decides before
/// it starts.
pub(crate) struct Plan {
    pub w: World,
    pub zipf: f64,
    pub h: usize,
    /// Conversations of each user.
    pub user_convs: Vec<Vec<ConvId>>,
    pub total_devices: u64,
    pub probe_users: Vec<UserId>,
    /// Users of the online devices (a user may appear more than once).
    pub online_ids: Vec<UserId>,
    pub offline_sample: Vec<UserId>,
    /// Expected message-level read:write ratio of the online devices.
    pub ratio: f64,
}

impl Plan {
    /// The read-fan-out groups of user `u`.
    pub fn read_groups(&self, u: UserId) -> Vec<ConvId> {
        self.user_convs[u as usize]
            .iter()
            .copied()
            .filter(|&c| self.w.read_fanout[c as usize])
            .collect()
    }
}

pub(crate) fn plan(flags: &Flags) -> Result<Plan> {
    let zipf = flags.zipf.unwrap_or(DEFAULT_ZIPF);
    let w = build_world(flags)?;
    let h = imkit::hybrid_threshold(flags);
    let users = w.users;
    let mut user_convs: Vec<Vec<ConvId>> = vec![Vec::new(); users as usize];
    for (c, ms) in w.members.iter().enumerate() {
        for &u in ms {
            user_convs[u as usize].push(c as ConvId);
        }
    }
    let memberships: usize = w.members.iter().map(|m| m.len()).sum();
    let total_devices: u64 = w.devices.iter().map(|&d| d as u64).sum();
    let deliveries_per_msg: f64 = w
        .members
        .iter()
        .zip(&w.weight)
        .map(|(m, p)| m.len() as f64 * p)
        .sum();
    eprintln!(
        "im: {users} users, {total_devices} devices, {} conversations ({} direct, {} small, {} medium, {} large groups: {:?} members), \
         {memberships} memberships, {} read fan-out (threshold {h}); expected {deliveries_per_msg:.1} deliveries per message",
        w.members.len(),
        w.classes[0].len(),
        w.classes[1].len(),
        w.classes[2].len(),
        w.classes[3].len(),
        w.classes[3].iter().map(|&c| w.members[c as usize].len()).collect::<Vec<_>>(),
        w.read_fanout.iter().filter(|&&r| r).count(),
    );

    // Latency probes, then online devices up to the read ratio.
    let mut rng = imkit::rng(flags.seed, 101);
    let mut expected_reads = vec![0.0f64; users as usize];
    for (c, ms) in w.members.iter().enumerate() {
        for &u in ms {
            expected_reads[u as usize] += w.weight[c];
        }
    }
    let mut probe_users: Vec<UserId> = Vec::new();
    for class in &w.classes {
        for &c in class.iter().take(PROBES_PER_CLASS) {
            let ms = &w.members[c as usize];
            let u = ms[rng.gen_range(0..ms.len())];
            if !probe_users.contains(&u) {
                probe_users.push(u);
            }
        }
    }
    let mut ratio: f64 = probe_users
        .iter()
        .map(|&u| expected_reads[u as usize])
        .sum();
    let mut all: Vec<(UserId, u8)> = (0..users)
        .flat_map(|u| (0..w.devices[u as usize]).map(move |d| (u, d)))
        .filter(|&(u, d)| !(d == 0 && probe_users.contains(&u)))
        .collect();
    all.shuffle(&mut rng);
    let mut online_ids: Vec<UserId> = Vec::new();
    for &(u, _) in &all {
        if ratio >= READ_RATIO {
            break;
        }
        ratio += expected_reads[u as usize];
        online_ids.push(u);
    }
    let mut has_online = vec![false; users as usize];
    for &u in online_ids.iter().chain(&probe_users) {
        has_online[u as usize] = true;
    }
    let offline_sample: Vec<UserId> = (0..VERIFY_OFFLINE_USERS * 20)
        .map(|_| rng.gen_range(0..users))
        .filter(|&u| !has_online[u as usize])
        .fold(Vec::new(), |mut v, u| {
            if v.len() < VERIFY_OFFLINE_USERS && !v.contains(&u) {
                v.push(u);
            }
            v
        });
    drop(all);

    Ok(Plan {
        w,
        zipf,
        h,
        user_convs,
        total_devices,
        probe_users,
        online_ids,
        offline_sample,
        ratio,
    })
}

/// What the senders share.
struct Senders<'a> {
    p: &'a Plan,
    pickers: Vec<Picker>,
    payloads: Payloads,
    acked: Vec<AtomicU64>,
    sent: AtomicU64,
    deliveries: AtomicU64,
    online_of_conv: Vec<Vec<u32>>,
    notify: &'a [AtomicBool],
    errors: &'a Errors,
    base: Instant,
}

impl Senders<'_> {
    fn acked(&self, conv: ConvId) {
        let members = self.p.w.members[conv as usize].len() as u64;
        self.acked[conv as usize].fetch_add(1, Ordering::Relaxed);
        self.deliveries.fetch_add(members, Ordering::Relaxed);
        self.sent.fetch_add(1, Ordering::Relaxed);
        for &i in &self.online_of_conv[conv as usize] {
            self.notify[i as usize].store(true, Ordering::Release);
        }
    }
}

/// One sender session: message `next` goes to a conversation of a class
/// drawn by share, Zipf within the class, from a random member.
struct Sender<'a, S> {
    s: S,
    sh: &'a Senders<'a>,
    seed: u64,
    next: u64,
    buf: Vec<u8>,
}

impl<S: ImSession> Pipelined for Sender<'_, S> {
    type Ctx = ConvId;
    type Reply = ImReply;

    fn queue(&mut self) -> Result<ConvId> {
        let w = &self.sh.p.w;
        let i = self.next;
        self.next += 1;
        let mut rng = super::rng_at(self.seed, 0xF4, i);
        let x: f64 = rng.gen();
        let mut class = SHARES.len() - 1;
        let mut acc = 0.0;
        for (k, sh) in SHARES.iter().enumerate() {
            acc += sh;
            if x < acc {
                class = k;
                break;
            }
        }
        let conv = w.classes[class][self.sh.pickers[class].pick(&mut rng) as usize];
        let ms = &w.members[conv as usize];
        let sender = ms[rng.gen_range(0..ms.len())];
        self.buf.copy_from_slice(self.sh.payloads.pick(&mut rng));
        stamp(&mut self.buf, ns_since(self.sh.base));
        self.s.queue(ImOp::Send {
            conv,
            sender,
            msg_id: i + 1,
            payload: &self.buf,
        })?;
        Ok(conv)
    }

    fn flush(&mut self) -> Result<()> {
        self.s.flush()
    }

    fn complete(&mut self) -> Result<ImReply> {
        self.s.complete()
    }

    fn check(&mut self, conv: ConvId, reply: ImReply) -> Result<()> {
        match reply {
            ImReply::Sent => self.sh.acked(conv),
            ImReply::Refused(e) => self
                .sh
                .errors
                .report("send", || format!("conversation {conv}: {e}")),
            ImReply::Synced(_) => return Err("a send answered like a sync".into()),
        }
        Ok(())
    }
}

type DevOut = Result<(Vec<Device>, SyncCount)>;
type ProbeOut = Result<(Vec<Device>, SyncCount, Histogram<u64>)>;
type PushOut = Result<(Histogram<u64>, u64)>;

/// An online device thread: syncs its devices whose flag a send set, a
/// page at a time, in pipelined rounds, until the run stops.
fn online_loop<S: ImSession>(
    mut s: S,
    devs: Vec<(usize, Device)>,
    notify: &[AtomicBool],
    stop: &AtomicBool,
    errors: &Errors,
) -> DevOut {
    let (ids, mut devs): (Vec<usize>, Vec<Device>) = devs.into_iter().unzip();
    let mut n = SyncCount::default();
    let mut flagged = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        flagged.clear();
        flagged.extend((0..ids.len()).filter(|&k| notify[ids[k]].swap(false, Ordering::AcqRel)));
        if flagged.is_empty() {
            std::thread::sleep(IDLE_SLEEP); // a simulated device's idle wait
            continue;
        }
        for chunk in flagged.chunks(256) {
            for k in sync_round(
                &mut s,
                &mut devs,
                chunk,
                DEVICE_PAGE,
                errors,
                &mut n,
                |_| {},
            )? {
                notify[ids[k]].store(true, Ordering::Release);
            }
        }
    }
    Ok((devs, n))
}

/// The latency probes: synced in a tight loop, recording send-to-visible.
fn probe_loop<S: ImSession>(
    mut s: S,
    mut devs: Vec<Device>,
    base: Instant,
    stop: &AtomicBool,
    errors: &Errors,
) -> ProbeOut {
    let mut hist = new_histogram()?;
    let mut n = SyncCount::default();
    let all: Vec<usize> = (0..devs.len()).collect();
    while !stop.load(Ordering::Relaxed) {
        let before = n.entries;
        sync_round(&mut s, &mut devs, &all, DEVICE_PAGE, errors, &mut n, |m| {
            if let Some(ts) = stamp_of(m) {
                hist.saturating_record(ns_since(base).saturating_sub(ts));
            }
        })?;
        if n.entries == before {
            std::thread::sleep(PROBE_SLEEP);
        }
    }
    Ok((devs, n, hist))
}

/// A push subscriber: records send-to-push of every pushed message.
fn push_loop(mut sub: Box<dyn Subscriber + '_>, base: Instant, stop: &AtomicBool) -> PushOut {
    let mut hist = new_histogram()?;
    let mut resyncs = 0;
    while !stop.load(Ordering::Relaxed) {
        match sub.next(Duration::from_millis(20))? {
            Some(Pushed::Message(m)) => {
                if let Some(ts) = stamp_of(&m) {
                    hist.saturating_record(ns_since(base).saturating_sub(ts));
                }
            }
            Some(Pushed::Resync) => resyncs += 1,
            Some(Pushed::Other) | None => {}
        }
    }
    Ok((hist, resyncs))
}

/// `timeline-bench im`: returns the number of verification errors.
pub fn run<T: ImTarget>(flags: &Flags, mut t: T, p: &Plan, rep: &mut Reporter) -> Result<u64> {
    if flags.payload < 8 {
        return Err("im: --payload must be at least 8 (the send time travels in it)".into());
    }
    let w = &p.w;
    let specs: Vec<ConvSpec> = w
        .members
        .iter()
        .enumerate()
        .map(|(c, ms)| ConvSpec {
            id: c as ConvId,
            kind: if c < w.classes[0].len() {
                ConvKind::Direct
            } else {
                ConvKind::Group
            },
            members: ms.clone(),
        })
        .collect();
    let pb = crate::progress::spinner(format!("setup: {} conversations", specs.len()));
    let t0 = Instant::now();
    t.create(&specs)?;
    let setup_secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    drop(specs);
    let devices = |users: &[UserId]| -> Result<Vec<Device>> {
        Ok(users
            .iter()
            .zip(t.sync_ends(users)?)
            .map(|(&u, cp)| Device::at(u, cp, &p.user_convs[u as usize], &p.read_groups(u)))
            .collect())
    };
    let shape = t.shape();
    let n_dev = flags.threads.max(1);
    let mut online: Vec<Vec<(usize, Device)>> = vec![Vec::new(); n_dev];
    let mut online_of_conv: Vec<Vec<u32>> = vec![Vec::new(); w.members.len()];
    for (i, d) in devices(&p.online_ids)?.into_iter().enumerate() {
        for &c in &p.user_convs[d.user as usize] {
            online_of_conv[c as usize].push(i as u32);
        }
        online[i % n_dev].push((i, d));
    }
    // The notification a real client gets ("you have news"): set by the
    // sender when a send is acknowledged, for every online device of the
    // conversation's members; a device syncs when it finds its flag set.
    let notify: Vec<AtomicBool> = p
        .online_ids
        .iter()
        .map(|_| AtomicBool::new(false))
        .collect();
    let probes = devices(&p.probe_users)?;
    let mut offline = devices(&p.offline_sample)?;
    let push_users: Vec<UserId> = p.probe_users.iter().take(flags.push).copied().collect();
    eprintln!(
        "im: {} online devices (expected read ratio {:.1}) on {n_dev} device session(s), {} latency probes, \
         {} push subscribers; sending {} messages of {} B over {} session(s) x {} in flight{}",
        p.online_ids.len() + probes.len(),
        p.ratio,
        probes.len(),
        push_users.len(),
        flags.messages,
        flags.payload,
        shape.sessions,
        shape.window,
        if flags.rate > 0 { format!(", {} messages/s", flags.rate) } else { String::new() }
    );
    let errors = Errors::default();
    let base = Instant::now();
    let senders = Senders {
        p,
        pickers: w
            .classes
            .iter()
            .map(|c| Picker::new(c.len() as u64, Some(p.zipf)))
            .collect::<Result<_>>()?,
        payloads: Payloads::new(flags.payload, flags.seed),
        acked: (0..w.members.len()).map(|_| AtomicU64::new(0)).collect(),
        sent: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        online_of_conv,
        notify: &notify,
        errors: &errors,
        base,
    };
    // Sessions and subscriptions, all before the clock starts.
    let send_sessions = super::open_im_sessions(&t)?;
    let dev_sessions: Vec<T::Session<'_>> =
        (0..n_dev).map(|_| t.session()).collect::<Result<_>>()?;
    let probe_session = t.session()?;
    let subs = t.subscribe(&push_users)?;
    let firsts = super::offsets(flags.messages, shape.sessions);
    let per_session = flags.rate as f64 / shape.sessions as f64;
    let stop = AtomicBool::new(false);
    let (tick_tx, tick_rx) = std::sync::mpsc::channel::<()>();
    let mark = t.mark()?;

    let (timed, dev_out, probe_out, push_out, samples) = std::thread::scope(|s| {
        let sampler = {
            let sh = &senders;
            s.spawn(move || sample(&sh.sent, &sh.deliveries, flags.messages, tick_rx))
        };
        let (errors, stop, notify) = (&errors, &stop, &notify);
        let dev_handles: Vec<_> = online
            .drain(..)
            .zip(dev_sessions)
            .map(|(devs, ds)| s.spawn(move || online_loop(ds, devs, notify, stop, errors)))
            .collect();
        let probe_handle = s.spawn(move || probe_loop(probe_session, probes, base, stop, errors));
        let push_handles: Vec<_> = subs
            .into_iter()
            .map(|sub| s.spawn(move || push_loop(sub, base, stop)))
            .collect();
        let timed = timed_sessions(shape.sessions, flags.messages, |i, n, hist| {
            let mut sc = Sender {
                s: super::take(&send_sessions, i)?,
                sh: &senders,
                seed: flags.seed,
                next: firsts[i as usize],
                buf: vec![0u8; flags.payload],
            };
            if flags.rate > 0 {
                drive_paced(&mut sc, n, &shape, per_session, hist)?;
            } else {
                drive(&mut sc, n, &shape, hist)?;
            }
            Ok((0, 0))
        });
        stop.store(true, Ordering::Relaxed);
        drop(tick_tx);
        let samples = sampler.join().unwrap_or_default();
        let dev_out: Vec<DevOut> = dev_handles.into_iter().map(|h| join(h.join())).collect();
        let probe_out: ProbeOut = join(probe_handle.join());
        let push_out: Vec<PushOut> = push_handles.into_iter().map(|h| join(h.join())).collect();
        (timed, dev_out, probe_out, push_out, samples)
    });
    let timed = timed?;
    drop(send_sessions);
    let messages = flags.messages;
    let deliveries = senders.deliveries.load(Ordering::Relaxed);
    let mut read = SyncCount::default();
    let mut devs: Vec<Device> = Vec::new();
    for r in dev_out {
        let (ds, n) = r?;
        read += n;
        devs.extend(ds);
    }
    let (probe_devs, pn, visible) = probe_out?;
    read += pn;
    let mut push_hist = new_histogram()?;
    let mut resyncs = 0;
    for r in push_out {
        let (h, n) = r?;
        push_hist.add(&h)?;
        resyncs += n;
    }
    let mut line = t.line("im");
    line.ops = messages;
    line.secs = timed.secs;
    line.ops_per_sec = rate(messages, timed.secs);
    line.messages = Some(messages);
    line.messages_per_sec = Some(rate(messages, timed.secs));
    line.deliveries = Some(deliveries);
    line.deliveries_per_sec = Some(rate(deliveries, timed.secs));
    line.payload_bytes = Some(messages * flags.payload as u64);
    line.sync_ops = Some(read.calls);
    line.sync_ops_per_sec = Some(rate(read.calls, timed.secs));
    line.entries_read = Some(read.entries);
    line.read_write_ratio = imkit::ratio(read.entries, messages);
    t.measure(&mark, &mut line)?;
    eprintln!(
        "im: timed {:.3} s: {messages} messages, {deliveries} deliveries, {} syncs returned {} messages",
        timed.secs, read.calls, read.entries
    );

    // Verification: every device catches up and must end exactly at the
    // acknowledged messages, with no gap or duplicate on the way.
    let t1 = Instant::now();
    devs.extend(probe_devs);
    let checked_online = devs.len();
    devs.append(&mut offline);
    let pb = crate::progress::spinner(format!("verifying {} devices", devs.len()));
    let caught = catch_up(&mut t.session()?, &mut devs, &errors, |_| {})?;
    pb.finish_and_clear();
    for dev in &devs {
        dev.check_complete(&senders.acked, &errors);
    }
    let acked_total: u64 = senders
        .acked
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum();
    if acked_total != messages {
        errors.report("verify", || {
            format!("{acked_total} sends acknowledged, {messages} sent")
        });
    }
    eprintln!(
        "im: verified {checked_online} online and {} offline devices ({} more messages) in {:.3} s",
        devs.len() - checked_online,
        caught.entries,
        t1.elapsed().as_secs_f64()
    );
    line.set_latency(&timed.hist);
    line.set_visible_latency(&visible);
    if !push_users.is_empty() {
        line.set_push_latency(&push_hist);
        line.push_resyncs = Some(resyncs);
    }
    line.timelines = None;
    line.fanout_mode = Some("hybrid".into());
    line.hybrid_threshold = Some(p.h as u64);
    line.users = Some(w.users);
    line.devices = Some(p.total_devices);
    line.online_devices = Some(checked_online as u64);
    line.groups = Some(w.members.len() as u64);
    line.zipf = Some(p.zipf);
    line.rate = (flags.rate > 0).then_some(flags.rate);
    line.setup_secs = Some(imkit::round4(setup_secs));
    line.errors = Some(errors.count());
    t.close(Some(&mut line))?;
    rep.push(line)?;
    rep.extras.series.extend(samples.rates());
    rep.extras
        .latencies
        .push(("send to acknowledgement", timed.hist.clone()));
    rep.extras
        .latencies
        .push(("send to visible in a device's sync", visible));
    if !push_users.is_empty() {
        rep.extras.latencies.push(("send to push", push_hist));
    }
    Ok(errors.count())
}

/// Counts sampled once a second during the timed phase.
#[derive(Default)]
struct Samples(Vec<(f64, u64, u64)>);

impl Samples {
    /// Messages and deliveries per second, between consecutive samples.
    fn rates(&self) -> Vec<crate::results::Series> {
        let rate = |f: fn(&(f64, u64, u64)) -> u64| {
            self.0
                .windows(2)
                .map(|w| {
                    (
                        w[1].0,
                        (f(&w[1]) - f(&w[0])) as f64 / (w[1].0 - w[0].0).max(1e-9),
                    )
                })
                .collect()
        };
        vec![
            crate::results::Series {
                name: "messages acknowledged",
                unit: "messages/s",
                points: rate(|p| p.1),
            },
            crate::results::Series {
                name: "deliveries (members of the acknowledged messages' conversations)",
                unit: "deliveries/s",
                points: rate(|p| p.2),
            },
        ]
    }
}

/// The timed phase's progress bar and its once-a-second samples of the
/// acknowledged messages and their deliveries; ends when `tick` is dropped
/// (a timed wait on the channel, so it stops at once).
fn sample(
    sent: &AtomicU64,
    deliveries: &AtomicU64,
    total: u64,
    tick: std::sync::mpsc::Receiver<()>,
) -> Samples {
    let pb = crate::progress::bar(total, "sending", "messages");
    let t0 = Instant::now();
    let mut out = Samples(vec![(0.0, 0, 0)]);
    let mut next = Duration::from_secs(1);
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        tick.recv_timeout(Duration::from_millis(200))
    {
        pb.set_position(sent.load(Ordering::Relaxed));
        if t0.elapsed() >= next {
            out.0.push((
                t0.elapsed().as_secs_f64(),
                sent.load(Ordering::Relaxed),
                deliveries.load(Ordering::Relaxed),
            ));
            next += Duration::from_secs(1);
        }
    }
    pb.finish_and_clear();
    out
}
