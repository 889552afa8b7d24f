//! What the IM workloads (W3 `fanout`, W4 `im`, W5 `fanout-sweep`) share:
//! the IM layer's configuration from the flags, conversation setup,
//! pipelined sends, devices that keep their own checkpoints and check what
//! `sync` returns, and counter snapshots.
//!
//! **Setup** ([`setup`]) is untimed: the conversations are created by an
//! `Im` opened with reference entries and buffered durability, which is
//! closed and reopened with the entries and durability of the run, so the
//! timed section starts from a freshly opened layer, like a restarted
//! server. (The detour was first a workaround for two IM-layer problems this
//! benchmark found and that are fixed: a `Created` event copied its whole
//! member list into every member's sync timeline, 8n^2 bytes per n-member
//! group; and two workers creating read-fan-out groups at once could
//! deadlock; those groups are still created one at a time, which costs
//! little.) A
//! group's fan-out mode is fixed at creation (the catalog records it), so
//! reopening keeps it. Devices start at the sync checkpoint
//! reached after setup (and at seq 1, the `Created` event, in read-fan-out
//! groups), as a device that saw the group being created would; they never
//! read the `Created` events.

use super::{durability, engine_config, rng_for};
use crate::report::ResultLine;
use crate::targets::{ImOp, ImReply, ImSession};
use crate::{Entries, FanoutMode, Flags, Result};
use rand::Rng;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use timeline_engine::{Durability, SeqId, Stats};
use timeline_im::{Body, ConvId, ConvKind, EntryMode, Im, ImConfig, ImStats, SyncReply, UserId};

/// Threads calling the (blocking) `create_conversation` during setup.
const SETUP_THREADS: usize = 8;
/// Most entries one verification sync asks for (the layer's maximum page).
pub const CATCH_UP_PAGE: usize = 10_000;
/// Verification errors printed to stderr before going quiet.
const MAX_PRINTED_ERRORS: u64 = 10;

pub fn entry_mode(flags: &Flags) -> EntryMode {
    match flags.entries.unwrap_or(Entries::Copy) {
        Entries::Copy => EntryMode::Copy,
        Entries::Reference => EntryMode::Reference,
    }
}

/// `--entries` as the flag spells it.
pub fn entries_arg(e: Entries) -> &'static str {
    match e {
        Entries::Copy => "copy",
        Entries::Reference => "reference",
    }
}

pub fn entries_name(e: EntryMode) -> &'static str {
    match e {
        EntryMode::Copy => "copy",
        EntryMode::Reference => "reference",
    }
}

pub fn mode_name(m: FanoutMode) -> &'static str {
    match m {
        FanoutMode::Write => "write",
        FanoutMode::Read => "read",
        FanoutMode::Hybrid => "hybrid",
    }
}

/// `--hybrid-threshold`, default 500.
pub fn hybrid_threshold(flags: &Flags) -> usize {
    flags.hybrid_threshold.unwrap_or(500)
}

/// The `ImConfig::hybrid_threshold` of a fan-out mode: groups with more
/// members than it use read fan-out, so `write` = never, `read` = every
/// group (of at least one member), `hybrid` = `--hybrid-threshold`.
pub fn threshold_for(mode: FanoutMode, flags: &Flags) -> usize {
    match mode {
        FanoutMode::Write => usize::MAX,
        FanoutMode::Read => 0,
        FanoutMode::Hybrid => hybrid_threshold(flags),
    }
}

/// The IM configuration of a measured run: `--durability` maps to the
/// durability of every store and sync write the layer makes.
pub fn im_config(flags: &Flags, threshold: usize) -> ImConfig {
    ImConfig {
        hybrid_threshold: threshold,
        entries: entry_mode(flags),
        durability: durability(flags),
        ..ImConfig::default()
    }
}

pub use crate::targets::ConvSpec;

/// Create `convs` and reopen (see the module doc); returns the IM layer
/// configured for the run and the seconds setup took.
pub fn setup(flags: &Flags, dir: &Path, convs: &[ConvSpec], threshold: usize) -> Result<(Im, f64)> {
    let t = Instant::now();
    let setup_cfg = ImConfig {
        hybrid_threshold: threshold,
        entries: EntryMode::Reference,
        durability: Durability::Buffered,
        ..ImConfig::default()
    };
    let im = Im::open(dir, engine_config(flags)?, setup_cfg)?;
    // Groups created above the threshold switch to read fan-out at seq 2,
    // and the worker creating one waits until the `Created` event reached
    // every member (design.md, "Hybrid fan-out"). Two workers waiting like
    // that at once deadlock (each waits for a delivery the other would
    // have to write), so those groups are created one at a time, after
    // the others (which are created by SETUP_THREADS threads at once).
    let switches = |c: &ConvSpec| c.kind == ConvKind::Group && c.members.len() > threshold;
    let (read_groups, others): (Vec<&ConvSpec>, Vec<&ConvSpec>) =
        convs.iter().partition(|c| switches(c));
    let create = |c: &ConvSpec| -> Result<()> {
        im.create_conversation(c.id, c.kind, &c.members)
            .map_err(|e| format!("creating conversation {}: {e}", c.id))?;
        Ok(())
    };
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..SETUP_THREADS)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(c) = others.get(i) else {
                            return Ok(());
                        };
                        create(c)?;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .unwrap_or_else(|_| Err("setup thread panicked".into()))?;
        }
        Ok(())
    })?;
    for c in read_groups {
        create(c)?;
    }
    let created = t.elapsed().as_secs_f64();
    im.close()?;
    let t2 = Instant::now();
    let im = Im::open(dir, engine_config(flags)?, im_config(flags, threshold))?;
    eprintln!(
        "setup: {} conversations created in {created:.3} s, reopened in {:.3} s",
        convs.len(),
        t2.elapsed().as_secs_f64()
    );
    Ok((im, t.elapsed().as_secs_f64()))
}

/// `n` distinct random users of `0..users`.
pub fn random_members(rng: &mut impl Rng, users: u64, n: usize) -> Vec<UserId> {
    rand::seq::index::sample(rng, users as usize, n)
        .into_iter()
        .map(|u| u as UserId)
        .collect()
}

/// Nanoseconds since `base`, the run's shared clock origin.
#[inline]
pub fn ns_since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// Write the send time into a payload's first 8 bytes.
#[inline]
pub fn stamp(payload: &mut [u8], ns: u64) {
    if let Some(h) = payload.get_mut(..8) {
        h.copy_from_slice(&ns.to_le_bytes());
    }
}

/// The send time a payload carries.
#[inline]
pub fn stamp_of(payload: &[u8]) -> Option<u64> {
    let mut a = [0u8; 8];
    a.copy_from_slice(payload.get(..8)?);
    Some(u64::from_le_bytes(a))
}

/// Counts verification errors, printing the first few.
#[derive(Default)]
pub struct Errors {
    n: AtomicU64,
}

impl Errors {
    pub fn report(&self, what: &str, msg: impl FnOnce() -> String) {
        if self.n.fetch_add(1, Ordering::Relaxed) < MAX_PRINTED_ERRORS {
            eprintln!("{what} error: {}", msg());
        }
    }
    pub fn count(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

/// What a device did in one or more syncs.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncCount {
    pub calls: u64,
    /// Messages returned.
    pub entries: u64,
}

impl std::ops::AddAssign for SyncCount {
    fn add_assign(&mut self, o: SyncCount) {
        self.calls += o.calls;
        self.entries += o.entries;
    }
}

/// A device: the only state is its own checkpoints, as a client keeps them
/// (the server keeps none). It checks that every conversation's messages
/// arrive in seq order with no gap and no duplicate.
#[derive(Debug, Clone)]
pub struct Device {
    pub user: UserId,
    /// Sync timeline checkpoint.
    pub cp: SeqId,
    /// Checkpoints in the user's read-fan-out groups.
    pub groups: Vec<(ConvId, SeqId)>,
    /// Last seq seen per conversation, sorted by conversation.
    pub last: Vec<(ConvId, SeqId)>,
}

impl Device {
    /// Take one sync reply (counted as one call in `n`): check and count
    /// its messages, move the checkpoints. Returns whether more is pending
    /// (false after a truncated checkpoint, which is an error here).
    pub fn apply(
        &mut self,
        r: &SyncReply,
        errors: &Errors,
        n: &mut SyncCount,
        mut on_msg: impl FnMut(&[u8]),
    ) -> bool {
        n.calls += 1;
        if let Some(first) = r.truncated {
            errors.report("sync", || {
                format!(
                    "user {}: checkpoint {} truncated (first retained {first})",
                    self.user, self.cp
                )
            });
            return false;
        }
        let mut more = r.has_more;
        for e in &r.entries {
            self.take(
                e.entry.conv,
                e.entry.conv_seq,
                &e.entry.body,
                errors,
                n,
                &mut on_msg,
            );
        }
        if r.checkpoint > self.cp {
            self.cp = r.checkpoint;
        }
        for g in &r.groups {
            for e in &g.entries {
                self.take(g.conv, e.conv_seq, &e.body, errors, n, &mut on_msg);
            }
            match self.groups.iter_mut().find(|x| x.0 == g.conv) {
                Some(x) => x.1 = x.1.max(g.checkpoint),
                None => self.groups.push((g.conv, g.checkpoint)),
            }
            more |= g.has_more;
        }
        more
    }

    fn take(
        &mut self,
        conv: ConvId,
        seq: SeqId,
        body: &Body,
        errors: &Errors,
        n: &mut SyncCount,
        on_msg: &mut impl FnMut(&[u8]),
    ) {
        let user = self.user;
        let Body::Message(p) = body else {
            let kind = match body {
                Body::Created { .. } => "Created",
                Body::MemberAdded(_) => "MemberAdded",
                Body::MemberRemoved(_) => "MemberRemoved",
                Body::Recall { .. } => "Recall",
                Body::Recalled => "Recalled",
                Body::Deleted => "Deleted",
                Body::ReadMarker => "ReadMarker",
                Body::DeletedMarker => "DeletedMarker",
                Body::Message(_) => "Message",
            };
            errors.report("sync", || {
                format!("user {user}: unexpected {kind} entry {conv}/{seq}")
            });
            return;
        };
        match self.last.binary_search_by_key(&conv, |x| x.0) {
            Ok(i) => {
                let last = self.last[i].1;
                if seq != last + 1 {
                    errors.report("sync", || {
                        format!(
                            "user {user}: conversation {conv} seq {seq} after {last} ({})",
                            if seq <= last { "duplicate" } else { "gap" }
                        )
                    });
                }
                self.last[i].1 = last.max(seq);
            }
            Err(_) => errors.report("sync", || {
                format!("user {user}: message {conv}/{seq} of a conversation it is not in")
            }),
        }
        n.entries += 1;
        on_msg(p);
    }

    /// Skip to now without reading: sync checkpoint `cp` (the sync
    /// timeline's end), and `1 + acked` in every conversation (what a full
    /// catch-up reaches).
    pub fn skip_to(&mut self, cp: SeqId, acked: &[AtomicU64]) {
        let end = |c: ConvId| {
            1 + acked
                .get(c as usize)
                .map_or(0, |a| a.load(Ordering::Relaxed))
        };
        self.cp = cp;
        for g in &mut self.groups {
            g.1 = end(g.0);
        }
        for l in &mut self.last {
            l.1 = end(l.0);
        }
    }

    /// After a full catch-up: every conversation must end at `1 + acked`.
    pub fn check_complete(&self, acked: &[AtomicU64], errors: &Errors) {
        for &(conv, last) in &self.last {
            let want = 1 + acked
                .get(conv as usize)
                .map_or(0, |a| a.load(Ordering::Relaxed));
            if last != want {
                errors.report("verify", || {
                    format!(
                        "user {}: conversation {conv} ends at seq {last}, expected {want}",
                        self.user
                    )
                });
            }
        }
    }
}

impl Device {
    /// A device of `user` at sync checkpoint `cp` that has seen seq 1 (the
    /// `Created` event) of each of `convs`; `read_groups` are those of them
    /// that use read fan-out.
    pub fn at(user: UserId, cp: SeqId, convs: &[ConvId], read_groups: &[ConvId]) -> Device {
        let mut last: Vec<(ConvId, SeqId)> = convs.iter().map(|&c| (c, 1)).collect();
        last.sort_unstable();
        last.dedup();
        Device {
            user,
            cp,
            groups: read_groups.iter().map(|&c| (c, 1)).collect(),
            last,
        }
    }
}

/// One pipelined round on `s`: a sync of `limit` entries for each device
/// of `idx`, replies applied in order; returns the indexes of those with
/// more pending.
pub fn sync_round<S: ImSession>(
    s: &mut S,
    devs: &mut [Device],
    idx: &[usize],
    limit: usize,
    errors: &Errors,
    n: &mut SyncCount,
    mut on_msg: impl FnMut(&[u8]),
) -> Result<Vec<usize>> {
    for &i in idx {
        let d = &devs[i];
        s.queue(ImOp::Sync {
            user: d.user,
            checkpoint: d.cp,
            limit,
            groups: &d.groups,
        })?;
    }
    s.flush()?;
    let mut more = Vec::new();
    for &i in idx {
        match s.complete()? {
            ImReply::Synced(r) => {
                if devs[i].apply(&r, errors, n, &mut on_msg) {
                    more.push(i);
                }
            }
            ImReply::Refused(e) => {
                let u = devs[i].user;
                errors.report("sync", || format!("user {u}: {e}"))
            }
            ImReply::Sent => return Err("a sync answered like a send".into()),
        }
    }
    Ok(more)
}

/// Sync every device until nothing is pending (a full catch-up), in
/// pipelined rounds of up to 256 devices.
pub fn catch_up<S: ImSession>(
    s: &mut S,
    devs: &mut [Device],
    errors: &Errors,
    mut on_msg: impl FnMut(&[u8]),
) -> Result<SyncCount> {
    let mut n = SyncCount::default();
    let mut idx: Vec<usize> = (0..devs.len()).collect();
    while !idx.is_empty() {
        let mut next = Vec::new();
        for chunk in idx.chunks(256) {
            next.extend(sync_round(
                s,
                devs,
                chunk,
                CATCH_UP_PAGE,
                errors,
                &mut n,
                &mut on_msg,
            )?);
        }
        idx = next;
    }
    Ok(n)
}

/// The storage side's own threads in an in-process run: the IM layer's
/// workers and the engine's maintenance thread (engine writes run on the
/// workers; `sync` reads on the caller's threads).
pub const STORAGE_THREADS: &[&str] = &["im-worker-", "timeline-maint"];

/// Counter snapshot: the IM layer's and the engine's, and CPU so far.
pub struct Snap {
    pub im: ImStats,
    pub eng: Stats,
    /// CPU seconds of `STORAGE_THREADS` and of the whole process.
    pub storage_cpu: f64,
    pub process_cpu: f64,
}

pub fn snap(im: &Im) -> Snap {
    Snap {
        im: im.stats(),
        eng: im.engine().stats(),
        storage_cpu: crate::sysinfo::threads_cpu_secs(STORAGE_THREADS),
        process_cpu: crate::sysinfo::cpu_secs(None),
    }
}

/// Counters between two snapshots.
#[derive(Debug, Default, Clone, Copy)]
pub struct Delta {
    pub stored: u64,
    pub messages: u64,
    pub sync_writes: u64,
    pub read_fanout_deliveries: u64,
    pub sync_reads: u64,
    pub store_reads: u64,
    pub group_polls: u64,
    pub meta_writes: u64,
    pub bytes_written: u64,
    pub record_bytes: u64,
    pub fsyncs: u64,
    pub storage_cpu_secs: f64,
    pub process_cpu_secs: f64,
}

impl Delta {
    pub fn between(a: &Snap, b: &Snap) -> Delta {
        let (x, y) = (&a.im, &b.im);
        let (ea, eb) = (a.eng.total(), b.eng.total());
        Delta {
            stored: y.stored - x.stored,
            messages: y.messages - x.messages,
            sync_writes: y.sync_writes - x.sync_writes,
            read_fanout_deliveries: y.read_fanout_deliveries - x.read_fanout_deliveries,
            sync_reads: y.sync_reads - x.sync_reads,
            store_reads: y.store_reads - x.store_reads,
            group_polls: y.group_polls - x.group_polls,
            meta_writes: y.meta_writes - x.meta_writes,
            bytes_written: eb.bytes_written.saturating_sub(ea.bytes_written),
            record_bytes: eb.record_bytes.saturating_sub(ea.record_bytes),
            fsyncs: eb.fsyncs.saturating_sub(ea.fsyncs),
            storage_cpu_secs: (b.storage_cpu - a.storage_cpu).max(0.0),
            process_cpu_secs: (b.process_cpu - a.process_cpu).max(0.0),
        }
    }

    /// One per receiving member per message (the sender included).
    pub fn deliveries(&self) -> u64 {
        self.sync_writes + self.read_fanout_deliveries
    }

    /// Store entries plus sync entries written.
    pub fn storage_writes(&self) -> u64 {
        self.stored + self.sync_writes
    }

    /// Read operations a sync issued (group polls included).
    pub fn reads(&self) -> u64 {
        self.sync_reads + self.store_reads + self.group_polls
    }
}

pub fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| round4(a as f64 / b as f64))
}

pub fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// The IM layer's and the engine's counters of a phase on its line (whose
/// `messages`, `deliveries`, `payload_bytes` and, where devices read,
/// `entries_read` are set).
pub fn set_counters(l: &mut ResultLine, d: &Delta) {
    let messages = l.messages.unwrap_or(0);
    let deliveries = l.deliveries.unwrap_or(0);
    l.storage_writes_per_message = ratio(d.storage_writes(), messages);
    l.meta_writes_per_message = ratio(d.meta_writes, messages);
    l.writes_per_delivery = ratio(d.storage_writes(), deliveries);
    l.stored = Some(d.stored);
    l.sync_writes = Some(d.sync_writes);
    l.bytes_written = Some(d.bytes_written);
    l.bytes_written_total = Some(d.bytes_written);
    l.record_bytes = Some(d.record_bytes);
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    l.write_amplification = ratio(d.bytes_written, d.record_bytes).map(r3);
    l.bytes_per_payload_byte = l
        .payload_bytes
        .and_then(|p| ratio(d.bytes_written, p))
        .map(r3);
    l.fsyncs = Some(d.fsyncs);
    l.storage_cpu_secs = Some(super::append::round3(d.storage_cpu_secs));
    l.process_cpu_secs = Some(super::append::round3(d.process_cpu_secs));
    if let Some(read) = l.entries_read {
        l.reads_per_delivery = ratio(d.reads(), read);
        l.storage_reads_per_delivery = ratio(d.sync_reads + d.store_reads, read);
        l.sync_reads = Some(d.sync_reads);
        l.store_reads = Some(d.store_reads);
        l.group_polls = Some(d.group_polls);
    }
}

/// A per-thread RNG for IM setup and senders (streams apart from W1/W2's).
pub fn rng(seed: u64, stream: u64) -> rand::rngs::SmallRng {
    rng_for(seed, 0x1_0000 + stream)
}
