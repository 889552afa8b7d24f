//! W5 `fanout-sweep`: write, read and hybrid fan-out across group sizes.
//! The model and every constant are described in `main.rs`'s doc comment.

use super::append::rate;
use super::fanout::{send_all, Plan};
use super::imkit::{
    self, catch_up, mode_name, random_members, sync_round, Device, Errors, SyncCount,
};
use super::{DataDir, Payloads};
use crate::report::Reporter;
use crate::targets::engine::EngineIm;
use crate::targets::{ImOp, ImReply, ImSession, ImTarget};
use crate::{FanoutMode, Flags, Result};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use timeline_im::{ConvId, UserId};

/// Group sizes swept by default (log steps from 2 to 20,000).
pub const DEFAULT_SIZES: [u64; 13] = [
    2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000,
];
/// Users of a point: at least this many, and at least the group size.
const MIN_USERS: u64 = 5_000;
/// Groups per user on average (K): a point has `round(K * users / size)`
/// groups (at least one), so each user is in about K groups at every size.
const GROUPS_PER_USER: f64 = 4.0;
/// Without `--messages`, a write-fan-out point sends `DELIVERIES_PER_POINT
/// / size` messages, clamped to `MESSAGES_PER_POINT`; a read-fan-out point
/// the upper bound (its cost per message does not grow with the size).
const DELIVERIES_PER_POINT: u64 = 2_000_000;
const MESSAGES_PER_POINT: (u64, u64) = (200, 100_000);
/// Users whose (single) device takes part in the read phase.
const OBSERVED_USERS: usize = 1_000;
/// Messages read back and checked after phase A (whole devices: at least
/// one; the other observed devices skip to the end).
const CATCH_UP_ENTRIES: u64 = 1_000_000;
/// Messages of the read phase (fewer if `--messages` is smaller).
const TICKS: u64 = 200;
/// Entries per `sync` page in the read phase.
const TICK_PAGE: usize = 100;

/// `timeline-bench fanout-sweep`: returns the number of verification errors.
pub fn run(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    let sizes = flags
        .sizes
        .clone()
        .unwrap_or_else(|| DEFAULT_SIZES.to_vec());
    if sizes.is_empty() || sizes.contains(&0) {
        return Err("--sizes: group sizes must be at least 1".into());
    }
    if flags.messages_arg == Some(0) {
        return Err("--messages must be at least 1".into());
    }
    let modes = match flags.fanout_mode {
        Some(m) => vec![m],
        None => vec![FanoutMode::Write, FanoutMode::Read, FanoutMode::Hybrid],
    };
    let dir = DataDir::new(flags)?;
    let t = Instant::now();
    let mut errors = 0;
    for &size in &sizes {
        for &mode in &modes {
            errors += point(flags, rep, &dir, size, mode)?;
        }
    }
    eprintln!(
        "fanout-sweep: {} points in {:.1} s",
        sizes.len() * modes.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(errors)
}

/// One (size, mode) point in a fresh directory; returns its errors.
fn point(
    flags: &Flags,
    rep: &mut Reporter,
    dir: &DataDir,
    size: u64,
    mode: FanoutMode,
) -> Result<u64> {
    let users = MIN_USERS.max(size);
    let n_groups = ((GROUPS_PER_USER * users as f64 / size as f64).round() as u64).max(1);
    let threshold = imkit::threshold_for(mode, flags);
    let read_fanout = size as usize > threshold;
    // A read-fan-out message costs the same at every size: send the most.
    let messages = flags.messages_arg.unwrap_or(if read_fanout {
        MESSAGES_PER_POINT.1
    } else {
        (DELIVERIES_PER_POINT / size).clamp(MESSAGES_PER_POINT.0, MESSAGES_PER_POINT.1)
    });
    let mut rng = imkit::rng(flags.seed, 300 + size);
    let groups: Vec<Vec<UserId>> = (0..n_groups)
        .map(|_| random_members(&mut rng, users, size as usize))
        .collect();
    // The observed users and, per group, the indexes of their devices.
    let mut convs_of: HashMap<UserId, Vec<ConvId>> = HashMap::new();
    for u in rand::seq::index::sample(&mut rng, users as usize, OBSERVED_USERS.min(users as usize))
    {
        convs_of.insert(u as UserId, Vec::new());
    }
    for (g, ms) in groups.iter().enumerate() {
        for u in ms {
            if let Some(v) = convs_of.get_mut(u) {
                v.push(g as ConvId);
            }
        }
    }
    let mut observed: Vec<(UserId, Vec<ConvId>)> = convs_of
        .into_iter()
        .filter(|(_, c)| !c.is_empty())
        .collect();
    observed.sort_unstable();
    let mut observers_of: Vec<Vec<usize>> = vec![Vec::new(); n_groups as usize];
    for (i, (_, convs)) in observed.iter().enumerate() {
        for &g in convs {
            observers_of[g as usize].push(i);
        }
    }

    eprintln!(
        "fanout-sweep: size {size}, mode {} ({} fan-out), {n_groups} groups, {users} users, {messages} messages",
        mode_name(mode),
        if read_fanout { "read" } else { "write" }
    );
    let p = Plan {
        messages,
        fanout: size as usize,
        mode,
        threshold,
        groups,
    };
    let dir = dir.sub(&format!("{}-{size}", mode_name(mode)), flags.keep)?;
    let mut t = EngineIm::in_dir(flags, threshold, dir)?;
    let t0 = Instant::now();
    t.create(&p.specs())?;
    let setup_secs = t0.elapsed().as_secs_f64();
    let users_seen: Vec<UserId> = observed.iter().map(|o| o.0).collect();
    let mut devices: Vec<Device> = observed
        .iter()
        .zip(t.sync_ends(&users_seen)?)
        .map(|((u, convs), cp)| Device::at(*u, cp, convs, if read_fanout { convs } else { &[] }))
        .collect();

    // Phase A (timed): the sends, pipelined, round-robin over the groups.
    let acked: Vec<AtomicU64> = (0..n_groups).map(|_| AtomicU64::new(0)).collect();
    let errors = Errors::default();
    let a0 = t.mark()?;
    let timed = send_all(flags, &t, &p, &acked, &errors)?;
    let mut line = t.line("fanout-sweep");
    line.ops = messages;
    line.secs = timed.secs;
    line.ops_per_sec = rate(messages, timed.secs);
    line.messages = Some(messages);
    line.messages_per_sec = Some(rate(messages, timed.secs));
    line.deliveries = Some(messages * size);
    line.deliveries_per_sec = Some(rate(messages * size, timed.secs));
    line.payload_bytes = Some(messages * flags.payload as u64);
    line.set_latency(&timed.hist);
    t.measure(&a0, &mut line)?;

    // Untimed: the observed devices catch up on phase A: by reading it all
    // and checking it, until CATCH_UP_ENTRIES messages were read, then (the
    // rest) by moving their checkpoints to the end.
    let mut s = t.session()?;
    let mut read_back = 0;
    for k in 0..devices.len() {
        if read_back < CATCH_UP_ENTRIES {
            read_back += catch_up(&mut s, &mut devices[k..=k], &errors, |_| {})?.entries;
            devices[k].check_complete(&acked, &errors);
        } else {
            let cp = t.sync_ends(&[devices[k].user])?[0];
            devices[k].skip_to(cp, &acked);
        }
    }

    // Phase B: one message at a time to a random group; after each, every
    // observed member's device syncs once and must get exactly it.
    let ticks = TICKS.min(messages);
    let b0 = t.mark()?;
    let mut read = SyncCount::default();
    let mut sync_secs = 0.0;
    let payloads = Payloads::new(flags.payload, flags.seed);
    for k in 0..ticks {
        let g = rng.gen_range(0..n_groups) as usize;
        let sender = p.groups[g][rng.gen_range(0..p.groups[g].len())];
        let payload = payloads.pick(&mut rng);
        s.queue(ImOp::Send {
            conv: g as ConvId,
            sender,
            msg_id: messages + k + 1,
            payload,
        })?;
        s.flush()?;
        match s.complete()? {
            ImReply::Sent => {
                acked[g].fetch_add(1, Ordering::Relaxed);
            }
            ImReply::Refused(e) => errors.report("send", || format!("group {g}: {e}")),
            ImReply::Synced(_) => return Err("a send answered like a sync".into()),
        }
        let t1 = Instant::now();
        for &i in &observers_of[g] {
            let mut n = SyncCount::default();
            sync_round(
                &mut s,
                &mut devices,
                &[i],
                TICK_PAGE,
                &errors,
                &mut n,
                |_| {},
            )?;
            if n.entries != 1 {
                let user = devices[i].user;
                errors.report("verify", || {
                    format!(
                        "user {user}: a sync after one message returned {} messages",
                        n.entries
                    )
                });
            }
            read += n;
        }
        sync_secs += t1.elapsed().as_secs_f64();
    }
    drop(s);
    let mut lb = t.line("fanout-sweep");
    lb.messages = Some(ticks);
    lb.entries_read = Some(read.entries);
    t.measure(&b0, &mut lb)?;
    for dev in &devices {
        dev.check_complete(&acked, &errors);
    }
    line.fanout_mode = Some(mode_name(mode).into());
    if mode == FanoutMode::Hybrid {
        line.hybrid_threshold = Some(threshold as u64);
    }
    line.group_size = Some(size);
    line.groups = Some(n_groups);
    line.users = Some(users);
    line.timelines = None;
    line.zipf = None;
    line.online_devices = Some(devices.len() as u64);
    line.setup_secs = Some(imkit::round4(setup_secs));
    line.sync_ops = Some(read.calls);
    line.sync_ops_per_sec = Some(rate(read.calls, sync_secs));
    line.entries_read = Some(read.entries);
    line.reads_per_delivery = lb.reads_per_delivery;
    line.storage_reads_per_delivery = lb.storage_reads_per_delivery;
    line.sync_reads = lb.sync_reads;
    line.store_reads = lb.store_reads;
    line.group_polls = lb.group_polls;
    // Reads per message (each member reads each message once) over
    // storage writes per message.
    if let (Some(r), Some(w)) = (line.reads_per_delivery, line.storage_writes_per_message) {
        if w > 0.0 {
            line.read_write_ratio = Some(imkit::round4(r * size as f64 / w));
        }
    }
    line.errors = Some(errors.count());
    t.close(Some(&mut line))?;
    rep.push(line)?;
    Ok(errors.count())
}
