//! W4 `im`: the IM workload (users with devices, 1:1 and group
//! conversations of heavy-tailed sizes, hybrid fan-out, Zipf-skewed
//! activity, devices syncing at a message-level read:write ratio of ~10:1).
//! The model and every constant are described in `main.rs`'s doc comment.

use super::imkit::{
    self, im_line, ns_since, random_members, set_write_fields, stamp, stamp_of, ConvSpec, Delta,
    Device, Errors, Inflight, Pacer, SyncCount,
};
use super::{timed_threads, DataDir, Payloads, Picker};
use crate::report::{new_histogram, Reporter};
use crate::sysinfo::{count_files, peak_rss_bytes, DiskIo};
use crate::{Flags, Result};
use hdrhistogram::Histogram;
use rand::seq::SliceRandom;
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use timeline_im::{ConvId, ConvKind, Push, UserId};

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
/// it starts (shared with W4 over TCP, `server_im`).
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

/// `timeline-bench im`: returns the number of verification errors.
pub fn run(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    if flags.payload < 8 {
        return Err("im: --payload must be at least 8 (the send time travels in it)".into());
    }
    let p = plan(flags)?;
    let read_groups = |u: UserId| p.read_groups(u);
    let Plan {
        w,
        zipf,
        h,
        user_convs,
        total_devices,
        probe_users,
        online_ids,
        offline_sample,
        ratio,
    } = &p;
    let (zipf, h, total_devices, ratio) = (*zipf, *h, *total_devices, *ratio);
    let users = w.users;
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
    let dir = DataDir::new(flags)?;
    let pb = crate::progress::spinner(format!("setup: {} conversations", specs.len()));
    let (im, setup_secs) = imkit::setup(flags, &dir.path, &specs, h)?;
    pb.finish_and_clear();
    drop(specs);
    let device = |u: UserId| Device::caught_up(&im, u, &user_convs[u as usize], &read_groups(u));
    let n_dev_threads = flags.threads;
    let mut online: Vec<Vec<(usize, Device)>> = vec![Vec::new(); n_dev_threads];
    let mut online_of_conv: Vec<Vec<u32>> = vec![Vec::new(); w.members.len()];
    for (i, &u) in online_ids.iter().enumerate() {
        online[i % n_dev_threads].push((i, device(u)));
        for &c in &user_convs[u as usize] {
            online_of_conv[c as usize].push(i as u32);
        }
    }
    // The notification a real client gets ("you have news"): set by the
    // sender when a send is acknowledged, for every online device of the
    // conversation's members; a device syncs when it finds its flag set.
    let notify: Vec<AtomicBool> = online_ids.iter().map(|_| AtomicBool::new(false)).collect();
    let mut probes: Vec<Device> = probe_users.iter().map(|&u| device(u)).collect();
    let mut offline: Vec<Device> = offline_sample.iter().map(|&u| device(u)).collect();
    let subs: Vec<_> = probe_users
        .iter()
        .take(flags.push)
        .map(|&u| im.subscribe(u))
        .collect();
    eprintln!(
        "im: {} online devices (expected read ratio {ratio:.1}), {} latency probes, {} push subscribers; \
         sending {} messages of {} B from {} thread(s), {} in flight each{}",
        online_ids.len() + probes.len(),
        probes.len(),
        subs.len(),
        flags.messages,
        flags.payload,
        flags.threads,
        flags.in_flight,
        if flags.rate > 0 {
            format!(", {} messages/s", flags.rate)
        } else {
            String::new()
        }
    );

    let acked: Vec<AtomicU64> = (0..w.members.len()).map(|_| AtomicU64::new(0)).collect();
    let errors = Errors::default();
    let payloads = Payloads::new(flags.payload, flags.seed);
    let pickers: Vec<Picker> = w
        .classes
        .iter()
        .map(|c| Picker::new(c.len() as u64, Some(zipf)))
        .collect::<Result<_>>()?;
    let offsets: Vec<u64> = super::offsets(flags.messages, flags.threads);
    let per_thread_rate = flags.rate as f64 / flags.threads as f64;
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let (tick_tx, tick_rx) = std::sync::mpsc::channel::<()>();
    let base = Instant::now();
    im.engine().sync()?;
    let before = imkit::snap(&im);
    let io0 = DiskIo::now();

    type DevOut = Result<(Vec<Device>, SyncCount)>;
    type ProbeOut = Result<(Vec<Device>, SyncCount, Histogram<u64>)>;
    type PushOut = Result<(Histogram<u64>, u64)>;
    let (timed, dev_out, probe_out, push_out, samples) = std::thread::scope(|s| {
        let sampler = {
            let (im, sent) = (&im, &sent);
            s.spawn(move || sample(im, sent, flags.messages, tick_rx))
        };
        let dev_handles: Vec<_> = online
            .drain(..)
            .map(|mut devs| {
                let (im, errors, stop) = (&im, &errors, &stop);
                let notify = &notify;
                s.spawn(move || -> DevOut {
                    let mut n = SyncCount::default();
                    while !stop.load(Ordering::Relaxed) {
                        let mut synced = 0;
                        for (i, d) in devs.iter_mut() {
                            if notify[*i].swap(false, Ordering::AcqRel) {
                                n += d.sync(im, DEVICE_PAGE, errors, |_| {})?;
                                synced += 1;
                            }
                        }
                        if synced == 0 {
                            std::thread::sleep(IDLE_SLEEP);
                        }
                    }
                    Ok((devs.into_iter().map(|(_, d)| d).collect(), n))
                })
            })
            .collect();
        let probe_handle = {
            let mut devs = std::mem::take(&mut probes);
            let (im, errors, stop) = (&im, &errors, &stop);
            s.spawn(move || -> ProbeOut {
                let mut hist = new_histogram()?;
                let mut n = SyncCount::default();
                while !stop.load(Ordering::Relaxed) {
                    let mut pass = SyncCount::default();
                    for d in devs.iter_mut() {
                        pass += d.sync(im, DEVICE_PAGE, errors, |p| {
                            if let Some(ts) = stamp_of(p) {
                                hist.saturating_record(ns_since(base).saturating_sub(ts));
                            }
                        })?;
                    }
                    n += pass;
                    if pass.entries == 0 {
                        std::thread::sleep(PROBE_SLEEP);
                    }
                }
                Ok((devs, n, hist))
            })
        };
        let push_handles: Vec<_> = subs
            .into_iter()
            .map(|sub| {
                let stop = &stop;
                s.spawn(move || -> PushOut {
                    let mut hist = new_histogram()?;
                    let mut resyncs = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let Some(p) = sub.recv_timeout(Duration::from_millis(20)) else {
                            continue;
                        };
                        let now = ns_since(base);
                        let body = match &p {
                            Push::Entry { entry, .. } => Some(&entry.entry.body),
                            Push::Group { entry, .. } => Some(&entry.body),
                            Push::Resync => {
                                resyncs += 1;
                                None
                            }
                        };
                        if let Some(timeline_im::Body::Message(m)) = body {
                            if let Some(ts) = stamp_of(m) {
                                hist.saturating_record(now.saturating_sub(ts));
                            }
                        }
                    }
                    Ok((hist, resyncs))
                })
            })
            .collect();
        let timed = timed_threads(flags, flags.messages, |thread, share, hist| {
            let mut rng = imkit::rng(flags.seed, 200 + thread);
            let mut win = Inflight::new(flags.in_flight);
            let pacer = Pacer::new(per_thread_rate);
            let mut buf = vec![0u8; flags.payload];
            let mut done = |c: usize, r: std::result::Result<_, _>| match r {
                Ok(_) => {
                    acked[c].fetch_add(1, Ordering::Relaxed);
                    sent.fetch_add(1, Ordering::Relaxed);
                    for &i in &online_of_conv[c] {
                        notify[i as usize].store(true, Ordering::Release);
                    }
                }
                Err(e) => errors.report("send", || format!("conversation {c}: {e}")),
            };
            let first = offsets[thread as usize];
            for k in 0..share {
                let x: f64 = rng.gen();
                let mut class = SHARES.len() - 1;
                let mut acc = 0.0;
                for (i, sh) in SHARES.iter().enumerate() {
                    acc += sh;
                    if x < acc {
                        class = i;
                        break;
                    }
                }
                let conv = w.classes[class][pickers[class].pick(&mut rng) as usize];
                let ms = &w.members[conv as usize];
                let sender = ms[rng.gen_range(0..ms.len())];
                if pacer.limited() {
                    let wait = pacer.wait_for(k);
                    if !wait.is_zero() {
                        win.collect_ready(hist, &mut done);
                        std::thread::sleep(wait);
                    }
                }
                win.make_room(hist, &mut done);
                buf.copy_from_slice(payloads.pick(&mut rng));
                let t0 = Instant::now();
                stamp(&mut buf, ns_since(base));
                let p = im.send_async(conv, sender, first + k + 1, &buf)?;
                win.push(t0, conv as usize, p);
            }
            win.drain(hist, &mut done);
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
    im.engine().sync()?;
    let after = imkit::snap(&im);
    let io1 = DiskIo::now();
    let d = Delta::between(&before, &after);

    imkit::check_messages(&d, flags.messages, &errors);
    let mut read = SyncCount::default();
    let mut devices: Vec<Device> = Vec::new();
    for r in dev_out {
        let (devs, n) = r?;
        read += n;
        devices.extend(devs);
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
    let messages = flags.messages;
    eprintln!(
        "im: timed {:.3} s: {} messages, {} deliveries, {} syncs returned {} messages",
        timed.secs,
        messages,
        d.deliveries(),
        read.calls,
        read.entries
    );

    // Verification: every device catches up and must end exactly at the
    // acknowledged messages, with no gap or duplicate on the way.
    let t = Instant::now();
    devices.extend(probe_devs);
    let checked_online = devices.len();
    devices.append(&mut offline);
    let mut caught = SyncCount::default();
    let pb = crate::progress::bar(devices.len() as u64, "verifying", "devices");
    for dev in &mut devices {
        caught += dev.sync(&im, imkit::CATCH_UP_PAGE, &errors, |_| {})?;
        dev.check_complete(&acked, &errors);
        pb.inc(1);
    }
    pb.finish_and_clear();
    let acked_total: u64 = acked.iter().map(|a| a.load(Ordering::Relaxed)).sum();
    if acked_total != messages {
        errors.report("verify", || {
            format!("{acked_total} sends acknowledged, {messages} sent")
        });
    }
    eprintln!(
        "im: verified {checked_online} online and {} offline devices ({} more messages) in {:.3} s",
        devices.len() - checked_online,
        caught.entries,
        t.elapsed().as_secs_f64()
    );

    let mut line = im_line(flags, "im", &im);
    set_write_fields(&mut line, &d, messages, timed.secs, flags.payload);
    line.set_latency(&timed.hist);
    line.set_visible_latency(&visible);
    if flags.push > 0 {
        line.set_push_latency(&push_hist);
        line.push_resyncs = Some(resyncs);
    }
    line.set_disk_io(io0, io1);
    line.fanout_mode = Some("hybrid".into());
    line.hybrid_threshold = Some(h as u64);
    line.users = Some(users);
    line.devices = Some(total_devices);
    line.online_devices = Some(checked_online as u64);
    line.groups = Some(w.members.len() as u64);
    line.zipf = Some(zipf);
    line.rate = (flags.rate > 0).then_some(flags.rate);
    line.setup_secs = Some(imkit::round4(setup_secs));
    line.sync_ops = Some(read.calls);
    line.sync_ops_per_sec = Some(super::append::rate(read.calls, timed.secs));
    line.entries_read = Some(read.entries);
    line.read_write_ratio = imkit::ratio(read.entries, messages);
    line.reads_per_delivery = imkit::ratio(d.reads(), read.entries);
    line.storage_reads_per_delivery = imkit::ratio(d.sync_reads + d.store_reads, read.entries);
    line.sync_reads = Some(d.sync_reads);
    line.store_reads = Some(d.store_reads);
    line.group_polls = Some(d.group_polls);
    line.errors = Some(errors.count());
    line.index_bytes = Some(im.engine().stats().total().index_bytes);
    line.peak_rss_bytes = Some(peak_rss_bytes());
    let (a, f) = crate::sysinfo::rss_split();
    line.rss_anon_bytes = Some(a);
    line.rss_file_bytes = Some(f);
    im.close()?;
    line.files = Some(count_files(&dir.path));
    rep.push(line)?;
    rep.extras.series.extend(samples.rates());
    rep.extras
        .latencies
        .push(("send to acknowledgement", timed.hist.clone()));
    rep.extras
        .latencies
        .push(("send to visible in a device's sync", visible));
    if flags.push > 0 {
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
                name: "sync deliveries (write fan-out entries and read fan-out reads)",
                unit: "deliveries/s",
                points: rate(|p| p.2),
            },
        ]
    }
}

/// The timed phase's progress bar and its once-a-second samples of the
/// acknowledged messages and the deliveries; ends when `tick` is dropped
/// (a timed wait on the channel, so it stops at once).
fn sample(
    im: &timeline_im::Im,
    sent: &AtomicU64,
    total: u64,
    tick: std::sync::mpsc::Receiver<()>,
) -> Samples {
    let pb = crate::progress::bar(total, "sending", "messages");
    let t0 = Instant::now();
    let d0 = imkit::snap(im);
    let mut out = Samples(vec![(0.0, 0, 0)]);
    let mut next = Duration::from_secs(1);
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        tick.recv_timeout(Duration::from_millis(200))
    {
        pb.set_position(sent.load(Ordering::Relaxed));
        if t0.elapsed() >= next {
            let d = Delta::between(&d0, &imkit::snap(im));
            out.0.push((
                t0.elapsed().as_secs_f64(),
                sent.load(Ordering::Relaxed),
                d.deliveries(),
            ));
            next += Duration::from_secs(1);
        }
    }
    pb.finish_and_clear();
    out
}
