//! W3 `fanout`: group messages fanned out to their members.

use super::imkit::{
    self, im_line, mode_name, random_members, set_write_fields, ConvSpec, Delta, Device, Errors,
    Inflight, Pacer,
};
use super::{timed_threads, DataDir, Payloads};
use crate::report::Reporter;
use crate::sysinfo::{count_files, peak_rss_bytes, DiskIo};
use crate::{FanoutMode, Flags, Result};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use timeline_im::{ConvId, ConvKind, UserId};

/// Most groups created: `--groups` messages beyond this go round-robin to
/// the same groups (each group receives `--groups / MAX_GROUPS` messages).
pub const MAX_GROUPS: u64 = 10_000;
/// Receivers whose sync timelines are read back and checked after the run.
const VERIFY_USERS: usize = 1_000;

/// `timeline-bench fanout`: returns the number of verification errors.
pub fn run(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let messages = flags.groups.unwrap_or(10_000);
    let m = flags.fanout.unwrap_or(200);
    let receivers = flags.timelines;
    if m == 0 || m as u64 > receivers {
        return Err(format!("--fanout {m} must be in 1..=--timelines ({receivers})").into());
    }
    if messages == 0 {
        return Err("--groups must be at least 1".into());
    }
    let mode = flags.fanout_mode.unwrap_or(FanoutMode::Write);
    let threshold = imkit::threshold_for(mode, flags);
    let n_groups = messages.min(MAX_GROUPS);
    let mut rng = imkit::rng(flags.seed, 0);
    let groups: Vec<Vec<UserId>> = (0..n_groups)
        .map(|_| random_members(&mut rng, receivers, m))
        .collect();
    let specs: Vec<ConvSpec> = groups
        .iter()
        .enumerate()
        .map(|(i, ms)| ConvSpec {
            id: i as ConvId,
            kind: ConvKind::Group,
            members: ms.clone(),
        })
        .collect();
    let dir = DataDir::new(flags)?;
    eprintln!(
        "fanout: {messages} messages of {} B to {n_groups} groups of {m} members among {receivers} users, \
         mode {}, entries {}, {} sender thread(s), {} in flight each, durability {}",
        flags.payload,
        mode_name(mode),
        imkit::entries_name(imkit::entry_mode(flags)),
        flags.threads,
        flags.in_flight,
        super::durability(flags).name()
    );
    let (im, setup_secs) = imkit::setup(flags, &dir.path, &specs, threshold)?;
    drop(specs);

    // Receivers checked afterwards: their devices start where setup left them.
    let mut sample: Vec<UserId> = Vec::new();
    let mut member_of: HashMap<UserId, Vec<ConvId>> = HashMap::new();
    for _ in 0..VERIFY_USERS * 20 {
        if sample.len() >= VERIFY_USERS {
            break;
        }
        let g = &groups[rng.gen_range(0..groups.len())];
        let u = g[rng.gen_range(0..g.len())];
        if let std::collections::hash_map::Entry::Vacant(e) = member_of.entry(u) {
            e.insert(Vec::new());
            sample.push(u);
        }
    }
    for (i, g) in groups.iter().enumerate() {
        for u in g {
            if let Some(v) = member_of.get_mut(u) {
                v.push(i as ConvId);
            }
        }
    }
    let read_fanout = m > threshold;
    let mut devices: Vec<Device> = sample
        .iter()
        .map(|u| {
            let convs = &member_of[u];
            let reads: &[ConvId] = if read_fanout { convs } else { &[] };
            Device::caught_up(&im, *u, convs, reads)
        })
        .collect();

    let acked: Vec<AtomicU64> = (0..n_groups).map(|_| AtomicU64::new(0)).collect();
    let errors = Errors::default();
    let payloads = Payloads::new(flags.payload, flags.seed);
    let offsets: Vec<u64> = super::offsets(messages, flags.threads);
    let per_thread_rate = flags.rate as f64 / flags.threads as f64;
    im.engine().sync()?;
    let before = imkit::snap(&im);
    let io0 = DiskIo::now();
    let timed = timed_threads(flags, messages, |thread, share, hist| {
        let mut rng = imkit::rng(flags.seed, 1 + thread);
        let mut win = Inflight::new(flags.in_flight);
        let pacer = Pacer::new(per_thread_rate);
        let mut done = |g: usize, r: std::result::Result<_, _>| match r {
            Ok(_) => {
                acked[g].fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => errors.report("send", || format!("group {g}: {e}")),
        };
        let first = offsets[thread as usize];
        for k in 0..share {
            let i = first + k;
            let g = (i % n_groups) as usize;
            let members = &groups[g];
            let sender = members[rng.gen_range(0..members.len())];
            if pacer.limited() {
                let w = pacer.wait_for(k);
                if !w.is_zero() {
                    win.collect_ready(hist, &mut done);
                    std::thread::sleep(w);
                }
            }
            win.make_room(hist, &mut done);
            let t0 = Instant::now();
            let p = im.send_async(g as ConvId, sender, i + 1, payloads.pick(&mut rng))?;
            win.push(t0, g, p);
        }
        win.drain(hist, &mut done);
        Ok((0, 0))
    })?;
    im.engine().sync()?;
    let after = imkit::snap(&im);
    let d = Delta::between(&before, &after);
    let io1 = DiskIo::now();

    imkit::check_messages(&d, messages, &errors);
    // Verification: the counters, then the sampled receivers' syncs.
    let want = messages * m as u64;
    if d.deliveries() != want {
        errors.report("verify", || {
            format!(
                "{} deliveries counted (sync writes {} + read fan-out {}), expected {messages} x {m} = {want}",
                d.deliveries(),
                d.sync_writes,
                d.read_fanout_deliveries
            )
        });
    }
    let t = Instant::now();
    let mut read = imkit::SyncCount::default();
    for dev in &mut devices {
        read += dev.sync(&im, imkit::CATCH_UP_PAGE, &errors, |p| {
            if p.len() != flags.payload {
                errors.report("verify", || {
                    format!("a {} B payload, sent {}", p.len(), flags.payload)
                });
            }
        })?;
        dev.check_complete(&acked, &errors);
    }
    eprintln!(
        "fanout: timed {:.3} s; verified {} receivers ({} messages) in {:.3} s",
        timed.secs,
        devices.len(),
        read.entries,
        t.elapsed().as_secs_f64()
    );

    let mut line = im_line(flags, "fanout", &im);
    set_write_fields(&mut line, &d, messages, timed.secs, flags.payload);
    line.set_latency(&timed.hist);
    line.set_disk_io(io0, io1);
    line.fanout_mode = Some(mode_name(mode).into());
    line.group_size = Some(m as u64);
    line.groups = Some(n_groups);
    line.users = Some(receivers);
    line.timelines = Some(receivers);
    if mode == FanoutMode::Hybrid {
        line.hybrid_threshold = Some(threshold as u64);
    }
    line.rate = (flags.rate > 0).then_some(flags.rate);
    line.setup_secs = Some(imkit::round4(setup_secs));
    line.errors = Some(errors.count());
    line.index_bytes = Some(im.engine().stats().total().index_bytes);
    line.peak_rss_bytes = Some(peak_rss_bytes());
    let (a, f) = crate::sysinfo::rss_split();
    line.rss_anon_bytes = Some(a);
    line.rss_file_bytes = Some(f);
    im.close()?;
    line.files = Some(count_files(&dir.path));
    rep.push(line)?;
    Ok(errors.count())
}
