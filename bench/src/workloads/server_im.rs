//! W4 `im` over TCP (`--target server`): the same world as the in-process
//! W4 (`im::plan`: users, devices, conversations, Zipf activity, latency
//! probes, online devices up to a ~10:1 message-level read ratio, offline
//! users checked at the end), driven through the server's IM commands.
//! A simplified version of the in-process run; what it does:
//!
//! - **Server**: as for W1 (`server::Target`), plus `--hybrid-threshold`
//!   and `--entries` passed on when given; its `--durability` is the
//!   durability of every IM write (so of an acknowledged `SEND`).
//! - **Setup** (untimed, `setup_secs`): every conversation is created with
//!   `CREATE_CONVERSATION`, pipelined over `--connections` connections,
//!   except the groups that will use read fan-out, which are created one at
//!   a time at the end (the IM layer must not create two at once; see
//!   `imkit`). Unlike the in-process run there is no reopen with another
//!   configuration: conversations are created with the run's own entries
//!   and durability. Each device's starting checkpoint is its user's sync
//!   timeline `LAST_SEQ` after setup (and seq 1 in read-fan-out groups).
//! - **Senders**: `--connections` connections, each pipelining `SEND`s
//!   (`--pipeline`, `--refill` as for W1) to a conversation chosen like the
//!   in-process W4 from a random member, client message ids unique per
//!   run, payload = send time (first 8 bytes) + random bytes. With `--rate`
//!   (messages/s over all connections) each connection paces its sends,
//!   flushing each at once and reading every outstanding ack before it
//!   sleeps. `p50_us`.. are per `SEND`, from queueing to its ack being read
//!   (the server acks once stored, fanned out and durable per
//!   `--durability`).
//! - **Devices**: when a send is acked, the sender flags the online devices
//!   of the conversation's members (the notification); `--threads` device
//!   connections each take their flagged devices and pipeline one `SYNC`
//!   (page of 100) per device, read the replies, apply them
//!   (`imkit::Device::apply`: no gap, no duplicate per conversation) and
//!   flag again those with more pending.
//! - **Visible latency**: one connection syncs the latency probes in a
//!   tight loop (a pipelined `SYNC` per probe per pass, 20 us pause after a
//!   pass that found nothing) and records now - send time for every message.
//! - **Push latency**: one connection `SUBSCRIBE`s the first `--push` probe
//!   users (default 16; 0 = none) and records now - send time for every
//!   pushed message (`Push::Resync`s counted). This is the issue's "append
//!   -> push received by a subscribed device" (with `--rate 50000`).
//! - **Verification**: afterwards every online device, the probes and up to
//!   1,000 offline users' first devices catch up with `SYNC` and must end
//!   every conversation at exactly 1 + the acknowledged sends; the server's
//!   `im_messages` counter must have grown by `--messages`; every send must
//!   be acked. `errors` (exit status 2).
//! - **Units**: `deliveries` is computed by the bench: members of the
//!   conversation (sender included) summed over acknowledged messages (what
//!   the in-process run reads from the IM layer's counters);
//!   `storage_writes_per_message` = (`im_messages` + `im_sync_writes`) /
//!   messages from `STATS`; `sync_ops` and `entries_read` count the device
//!   and probe syncs of the timed section; `bytes_written` = both keyspaces'
//!   bytes written (`STATS`). No read-side storage counters (`STATS` does
//!   not report them).

use super::append::rate;
use super::im::{plan, Plan, DEVICE_PAGE, IDLE_SLEEP, PROBE_SLEEP, SHARES};
use super::imkit::{self, ns_since, stamp, stamp_of, Device, Errors, Pacer, SyncCount};
use super::net::{drive, Meter, Pipelined, Shape};
use super::server::{stat, stats, Target};
use super::wire;
use super::{offsets, split, timed_threads, Payloads, Picker};
use crate::report::{new_histogram, Reporter};
use crate::{Entries, Flags, Result};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::Rng;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use timeline_engine::TimelineId;
use timeline_im::{ConvId, ConvKind, UserId};
use timeline_server::protocol::{Body, Push};
use timeline_server::protocol::{Request, Response};
use timeline_server::{Client, ClientError};

/// timeline-server's default `--max-payload`.
const SERVER_MAX_PAYLOAD: usize = 64 << 10;

/// Entries per SYNC of the final catch-up.
const CATCH_UP_PAGE: u32 = imkit::CATCH_UP_PAGE as u32;

fn join<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    r.unwrap_or_else(|_| Err("thread panicked".into()))
}

fn take_conn(conns: &[Mutex<Option<Client>>], i: u64) -> Result<Client> {
    Ok(conns[i as usize]
        .lock()
        .map_err(|_| "poisoned")?
        .take()
        .ok_or("connection taken twice")?)
}

fn connect_n(t: &Target, n: usize) -> Result<Vec<Mutex<Option<Client>>>> {
    (0..n).map(|_| Ok(Mutex::new(Some(t.connect()?)))).collect()
}

/// Conversation creation on one connection (setup).
struct CreateConn<'a> {
    c: Client,
    members: &'a [Vec<UserId>],
    next: std::slice::Iter<'a, (ConvId, ConvKind)>,
    errors: &'a Errors,
}

impl Pipelined for CreateConn<'_> {
    type Ctx = ConvId;

    fn queue(&mut self) -> Result<ConvId> {
        let &(conv, kind) = self.next.next().ok_or("no conversation left")?;
        self.c.queue(&Request::CreateConversation {
            conv,
            kind: wire::conv_kind(kind),
            members: self.members[conv as usize].clone(),
        });
        Ok(conv)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.c.flush()?)
    }

    fn complete(&mut self, conv: ConvId) -> Result<()> {
        match self.c.recv() {
            Ok(Response::CreateConversation(_)) => {}
            Ok(r) => self
                .errors
                .report("create", || format!("conversation {conv}: reply {r:?}")),
            Err(e @ ClientError::Server { .. }) => self
                .errors
                .report("create", || format!("conversation {conv}: {e}")),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// Create the conversations; returns the seconds it took.
fn setup(flags: &Flags, t: &Target, p: &Plan, shape: &Shape, errors: &Errors) -> Result<f64> {
    let w = &p.w;
    let t0 = Instant::now();
    let kind = |c: usize| {
        if c < w.classes[0].len() {
            ConvKind::Direct
        } else {
            ConvKind::Group
        }
    };
    type Specs = Vec<(ConvId, ConvKind)>;
    let (read_groups, others): (Specs, Specs) = (0..w.members.len())
        .map(|c| (c as ConvId, kind(c)))
        .partition(|&(c, _)| w.read_fanout[c as usize]);
    let conns = connect_n(t, shape.connections)?;
    let shares = split(others.len() as u64, shape.connections);
    let starts = offsets(others.len() as u64, shape.connections);
    timed_threads(
        &shape.as_threads(flags),
        others.len() as u64,
        |i, n, hist| {
            let s = starts[i as usize] as usize;
            let part = &others[s..s + shares[i as usize] as usize];
            let mut cc = CreateConn {
                c: take_conn(&conns, i)?,
                members: &w.members,
                next: part.iter(),
                errors,
            };
            drive(&mut cc, n, shape, hist)?;
            Ok((0, 0))
        },
    )?;
    let mut c = t.connect()?;
    for (conv, kind) in read_groups {
        c.call(&Request::CreateConversation {
            conv,
            kind: wire::conv_kind(kind),
            members: w.members[conv as usize].clone(),
        })
        .map_err(|e| format!("creating read-fan-out group {conv}: {e}"))?;
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "setup: {} conversations created over TCP in {secs:.3} s",
        w.members.len()
    );
    Ok(secs)
}

/// Devices of `users`, each at its user's sync timeline end (one pipelined
/// LAST_SEQ sweep) and at seq 1 of every conversation.
fn devices(c: &mut Client, p: &Plan, users: &[UserId]) -> Result<Vec<Device>> {
    let mut out = Vec::with_capacity(users.len());
    for chunk in users.chunks(1024) {
        for &u in chunk {
            c.queue(&Request::LastSeq {
                timeline: wire::timeline(TimelineId::sync(u)),
            });
        }
        c.flush()?;
        for &u in chunk {
            let cp = match c.recv()? {
                Response::LastSeq(s) => s,
                other => return Err(format!("LAST_SEQ answered {other:?}").into()),
            };
            let mut last: Vec<(ConvId, u64)> =
                p.user_convs[u as usize].iter().map(|&c| (c, 1)).collect();
            last.sort_unstable();
            last.dedup();
            out.push(Device {
                user: u,
                cp,
                groups: p.read_groups(u).into_iter().map(|c| (c, 1)).collect(),
                last,
            });
        }
    }
    Ok(out)
}

fn sync_request(d: &Device, limit: u32) -> Request<'static> {
    Request::Sync {
        user: d.user,
        checkpoint: d.cp,
        limit,
        groups: d.groups.clone(),
    }
}

/// One pipelined round: a SYNC for each device of `idx`, replies applied
/// in order; returns the indexes of those with more pending.
fn sync_round(
    c: &mut Client,
    devs: &mut [Device],
    idx: &[usize],
    limit: u32,
    errors: &Errors,
    n: &mut SyncCount,
    mut on_msg: impl FnMut(&[u8]),
) -> Result<Vec<usize>> {
    for &i in idx {
        c.queue(&sync_request(&devs[i], limit));
    }
    c.flush()?;
    let mut more = Vec::new();
    for &i in idx {
        match c.recv() {
            Ok(Response::Sync(r)) => {
                if devs[i].apply(&wire::sync_reply(r), errors, n, &mut on_msg) {
                    more.push(i);
                }
            }
            Ok(other) => errors.report("sync", || format!("reply {other:?}")),
            Err(e @ ClientError::Server { .. }) => {
                let u = devs[i].user;
                errors.report("sync", || format!("user {u}: {e}"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(more)
}

/// Sync every device until nothing is pending (the final catch-up).
fn catch_up(c: &mut Client, devs: &mut [Device], errors: &Errors) -> Result<SyncCount> {
    let mut n = SyncCount::default();
    let mut idx: Vec<usize> = (0..devs.len()).collect();
    while !idx.is_empty() {
        let mut next = Vec::new();
        for chunk in idx.chunks(256) {
            next.extend(sync_round(
                c,
                devs,
                chunk,
                CATCH_UP_PAGE,
                errors,
                &mut n,
                |_| {},
            )?);
        }
        idx = next;
    }
    Ok(n)
}

/// What the senders share.
struct Senders<'a> {
    p: &'a Plan,
    pickers: Vec<Picker>,
    payloads: Payloads,
    acked: Vec<AtomicU64>,
    deliveries: AtomicU64,
    online_of_conv: Vec<Vec<u32>>,
    notify: &'a [AtomicBool],
    errors: &'a Errors,
    base: Instant,
}

impl Senders<'_> {
    fn acked(&self, conv: ConvId) {
        self.acked[conv as usize].fetch_add(1, Ordering::Relaxed);
        self.deliveries.fetch_add(
            self.p.w.members[conv as usize].len() as u64,
            Ordering::Relaxed,
        );
        for &i in &self.online_of_conv[conv as usize] {
            self.notify[i as usize].store(true, Ordering::Release);
        }
    }
}

/// One sender connection.
struct SendConn<'a> {
    c: Client,
    s: &'a Senders<'a>,
    rng: SmallRng,
    buf: Vec<u8>,
    /// Client message id of the next send.
    next_id: u64,
}

impl Pipelined for SendConn<'_> {
    type Ctx = ConvId;

    fn queue(&mut self) -> Result<ConvId> {
        let w = &self.s.p.w;
        let x: f64 = self.rng.gen();
        let mut class = SHARES.len() - 1;
        let mut acc = 0.0;
        for (i, sh) in SHARES.iter().enumerate() {
            acc += sh;
            if x < acc {
                class = i;
                break;
            }
        }
        let conv = w.classes[class][self.s.pickers[class].pick(&mut self.rng) as usize];
        let ms = &w.members[conv as usize];
        let sender = ms[self.rng.gen_range(0..ms.len())];
        self.buf
            .copy_from_slice(self.s.payloads.pick(&mut self.rng));
        stamp(&mut self.buf, ns_since(self.s.base));
        self.c.queue(&Request::Send {
            conv,
            sender,
            client_msg_id: self.next_id,
            payload: &self.buf,
        });
        self.next_id += 1;
        Ok(conv)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(self.c.flush()?)
    }

    fn complete(&mut self, conv: ConvId) -> Result<()> {
        match self.c.recv() {
            Ok(Response::Send(a)) if a.conv == conv && !a.duplicate => self.s.acked(conv),
            Ok(r) => self
                .s
                .errors
                .report("send", || format!("conversation {conv}: reply {r:?}")),
            Err(e @ ClientError::Server { .. }) => self
                .s
                .errors
                .report("send", || format!("conversation {conv}: {e}")),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

/// `n` paced sends (`--rate`): each flushed at once; before sleeping, every
/// outstanding ack is read.
fn paced(
    sc: &mut SendConn<'_>,
    n: u64,
    shape: &Shape,
    per_sec: f64,
    hist: &mut Histogram<u64>,
) -> Result<()> {
    let pacer = Pacer::new(per_sec);
    let mut q: VecDeque<(Instant, ConvId)> = VecDeque::with_capacity(shape.pipeline);
    for k in 0..n {
        if !pacer.wait_for(k).is_zero() {
            while let Some((t0, conv)) = q.pop_front() {
                sc.complete(conv)?;
                hist.saturating_record(t0.elapsed().as_nanos() as u64);
            }
            let wait = pacer.wait_for(k);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        if q.len() >= shape.pipeline {
            if let Some((t0, conv)) = q.pop_front() {
                sc.complete(conv)?;
                hist.saturating_record(t0.elapsed().as_nanos() as u64);
            }
        }
        let t0 = Instant::now();
        let conv = sc.queue()?;
        sc.flush()?;
        q.push_back((t0, conv));
    }
    while let Some((t0, conv)) = q.pop_front() {
        sc.complete(conv)?;
        hist.saturating_record(t0.elapsed().as_nanos() as u64);
    }
    Ok(())
}

/// `timeline-bench im --target server`: returns the number of errors.
pub fn run(flags: &Flags, rep: &mut Reporter) -> Result<u64> {
    if flags.payload < 8 {
        return Err("im: --payload must be at least 8 (the send time travels in it)".into());
    }
    let shape = Shape::new(flags);
    let p = plan(flags)?;
    let w = &p.w;
    let mut extra = vec!["--hybrid-threshold".to_string(), p.h.to_string()];
    // The IM layer writes a group's member list as one record (8 bytes per
    // member), which must fit the engine's max payload; the server's
    // default (64 KiB) holds about 8,000 members, fewer than W4's largest
    // group (20,000). Raise it just enough (a server started by the bench).
    let largest = w.members.iter().map(|m| m.len()).max().unwrap_or(0);
    let need = (largest * 8 + 4096).next_multiple_of(64 << 10);
    if need > SERVER_MAX_PAYLOAD && flags.addr.is_none() {
        eprintln!(
            "im: the largest group has {largest} members: starting the server with --max-payload {need} \
             (its default, {SERVER_MAX_PAYLOAD}, refuses CREATE_CONVERSATION of groups above ~8,000 members)"
        );
        extra.push("--max-payload".into());
        extra.push(need.to_string());
    }
    if let Some(e) = flags.entries {
        extra.push("--entries".into());
        extra.push(
            match e {
                Entries::Copy => "copy",
                Entries::Reference => "reference",
            }
            .into(),
        );
    }
    let t = Target::start(flags, &extra)?;
    let errors = Errors::default();
    let setup_secs = setup(flags, &t, &p, &shape, &errors)?;
    if errors.count() > 0 {
        return Err(format!("{} conversation(s) could not be created", errors.count()).into());
    }

    let mut admin = t.connect()?;
    let n_dev = flags.threads.max(1);
    let mut online: Vec<Vec<(usize, Device)>> = vec![Vec::new(); n_dev];
    let mut online_of_conv: Vec<Vec<u32>> = vec![Vec::new(); w.members.len()];
    for (i, d) in devices(&mut admin, &p, &p.online_ids)?
        .into_iter()
        .enumerate()
    {
        for &c in &p.user_convs[d.user as usize] {
            online_of_conv[c as usize].push(i as u32);
        }
        online[i % n_dev].push((i, d));
    }
    let notify: Vec<AtomicBool> = p
        .online_ids
        .iter()
        .map(|_| AtomicBool::new(false))
        .collect();
    let probes = devices(&mut admin, &p, &p.probe_users)?;
    let mut offline = devices(&mut admin, &p, &p.offline_sample)?;
    let push_users: Vec<UserId> = p.probe_users.iter().take(flags.push).copied().collect();
    eprintln!(
        "im: {} online devices (expected read ratio {:.1}) on {n_dev} sync connection(s), {} latency probes, {} push subscribers; \
         sending {} messages of {} B over {} connection(s) x pipeline {}{}",
        p.online_ids.len() + probes.len(),
        p.ratio,
        probes.len(),
        push_users.len(),
        flags.messages,
        flags.payload,
        shape.connections,
        shape.pipeline,
        if flags.rate > 0 {
            format!(", {} messages/s", flags.rate)
        } else {
            String::new()
        }
    );
    let base = Instant::now();
    let senders = Senders {
        p: &p,
        pickers: w
            .classes
            .iter()
            .map(|c| Picker::new(c.len() as u64, Some(p.zipf)))
            .collect::<Result<_>>()?,
        payloads: Payloads::new(flags.payload, flags.seed),
        acked: (0..w.members.len()).map(|_| AtomicU64::new(0)).collect(),
        deliveries: AtomicU64::new(0),
        online_of_conv,
        notify: &notify,
        errors: &errors,
        base,
    };
    // Connections, all before the clock starts.
    let send_conns = connect_n(&t, shape.connections)?;
    let dev_conns: Vec<Client> = (0..n_dev).map(|_| t.connect()).collect::<Result<_>>()?;
    let mut probe_conn = t.connect()?;
    let mut push_conn = t.connect()?;
    for &u in &push_users {
        match push_conn.call(&Request::Subscribe { user: u })? {
            Response::Subscribe => {}
            other => return Err(format!("SUBSCRIBE answered {other:?}").into()),
        }
    }
    let first_ids = offsets(flags.messages, shape.connections);
    let per_conn_rate = flags.rate as f64 / shape.connections as f64;
    let stop = AtomicBool::new(false);
    let s0 = stats(&mut admin)?;
    let meter = Meter::start(t.pid());

    type DevOut = Result<(Vec<Device>, SyncCount)>;
    type ProbeOut = Result<(Vec<Device>, SyncCount, Histogram<u64>)>;
    type PushOut = Result<(Histogram<u64>, u64)>;
    let (timed, dev_out, probe_out, push_out) = std::thread::scope(|s| {
        let dev_handles: Vec<_> = online
            .drain(..)
            .zip(dev_conns)
            .map(|(devs, mut c)| {
                let (errors, stop, notify) = (&errors, &stop, &notify);
                s.spawn(move || -> DevOut {
                    let (ids, mut devs): (Vec<usize>, Vec<Device>) = devs.into_iter().unzip();
                    let mut n = SyncCount::default();
                    let mut flagged = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        flagged.clear();
                        for (k, &i) in ids.iter().enumerate() {
                            if notify[i].swap(false, Ordering::AcqRel) {
                                flagged.push(k);
                            }
                        }
                        if flagged.is_empty() {
                            std::thread::sleep(IDLE_SLEEP);
                            continue;
                        }
                        for chunk in flagged.chunks(256) {
                            let more = sync_round(
                                &mut c,
                                &mut devs,
                                chunk,
                                DEVICE_PAGE as u32,
                                errors,
                                &mut n,
                                |_| {},
                            )?;
                            for k in more {
                                notify[ids[k]].store(true, Ordering::Release);
                            }
                        }
                    }
                    Ok((devs, n))
                })
            })
            .collect();
        let probe_handle = {
            let mut devs = probes;
            let (errors, stop) = (&errors, &stop);
            let c = &mut probe_conn;
            s.spawn(move || -> ProbeOut {
                let mut hist = new_histogram()?;
                let mut n = SyncCount::default();
                let all: Vec<usize> = (0..devs.len()).collect();
                while !stop.load(Ordering::Relaxed) {
                    let before = n.entries;
                    sync_round(
                        c,
                        &mut devs,
                        &all,
                        DEVICE_PAGE as u32,
                        errors,
                        &mut n,
                        |m| {
                            if let Some(ts) = stamp_of(m) {
                                hist.saturating_record(ns_since(base).saturating_sub(ts));
                            }
                        },
                    )?;
                    if n.entries == before {
                        std::thread::sleep(PROBE_SLEEP);
                    }
                }
                Ok((devs, n, hist))
            })
        };
        let push_handle = {
            let stop = &stop;
            let c = &mut push_conn;
            let any = !push_users.is_empty();
            s.spawn(move || -> PushOut {
                let mut hist = new_histogram()?;
                let mut resyncs = 0;
                while any && !stop.load(Ordering::Relaxed) {
                    let Some((_, push)) = c.next_push(Duration::from_millis(20))? else {
                        continue;
                    };
                    let now = ns_since(base);
                    let body = match &push {
                        Push::Entry { entry, .. } => Some(&entry.entry.body),
                        Push::Group { entry, .. } => Some(&entry.body),
                        Push::Resync => {
                            resyncs += 1;
                            None
                        }
                    };
                    if let Some(Body::Message(m)) = body {
                        if let Some(ts) = stamp_of(m) {
                            hist.saturating_record(now.saturating_sub(ts));
                        }
                    }
                }
                Ok((hist, resyncs))
            })
        };
        let timed = timed_threads(&shape.as_threads(flags), flags.messages, |i, n, hist| {
            let mut sc = SendConn {
                c: take_conn(&send_conns, i)?,
                s: &senders,
                rng: imkit::rng(flags.seed, 200 + i),
                buf: vec![0u8; flags.payload],
                next_id: first_ids[i as usize] + 1,
            };
            if flags.rate > 0 {
                paced(&mut sc, n, &shape, per_conn_rate, hist)?;
            } else {
                drive(&mut sc, n, &shape, hist)?;
            }
            Ok((0, 0))
        });
        stop.store(true, Ordering::Relaxed);
        let dev_out: Vec<DevOut> = dev_handles.into_iter().map(|h| join(h.join())).collect();
        let probe_out: ProbeOut = join(probe_handle.join());
        let push_out: PushOut = join(push_handle.join());
        (timed, dev_out, probe_out, push_out)
    });
    let timed = timed?;
    let s1 = stats(&mut admin)?;
    let mut line = super::server::base_line(flags, "im", &t, &shape);
    meter.finish(&mut line);
    let messages = flags.messages;
    let d = |k: &str| stat(&s1, k).saturating_sub(stat(&s0, k));
    if d("im_messages") != messages {
        errors.report("verify", || {
            format!(
                "the server counted {} messages, {messages} were sent",
                d("im_messages")
            )
        });
    }
    let mut read = SyncCount::default();
    let mut devs: Vec<Device> = Vec::new();
    for r in dev_out {
        let (ds, n) = r?;
        read += n;
        devs.extend(ds);
    }
    let (probe_devs, pn, visible) = probe_out?;
    read += pn;
    let (push_hist, resyncs) = push_out?;
    let deliveries = senders.deliveries.load(Ordering::Relaxed);
    eprintln!(
        "im: timed {:.3} s: {messages} messages, {deliveries} deliveries, {} syncs returned {} messages",
        timed.secs, read.calls, read.entries
    );

    // Verification: everyone catches up and must end at the acked sends.
    let t0 = Instant::now();
    devs.extend(probe_devs);
    let checked_online = devs.len();
    devs.append(&mut offline);
    let caught = catch_up(&mut admin, &mut devs, &errors)?;
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
        t0.elapsed().as_secs_f64()
    );

    line.keyspace = "store+sync".into();
    line.timelines = None;
    line.zipf = Some(p.zipf);
    line.entries = flags.entries.map(|e| {
        match e {
            Entries::Copy => "copy",
            Entries::Reference => "reference",
        }
        .into()
    });
    line.ops = messages;
    line.secs = timed.secs;
    line.ops_per_sec = rate(messages, timed.secs);
    line.messages = Some(messages);
    line.messages_per_sec = Some(rate(messages, timed.secs));
    line.deliveries = Some(deliveries);
    line.deliveries_per_sec = Some(rate(deliveries, timed.secs));
    let writes = d("im_messages") + d("im_sync_writes");
    line.stored = Some(d("im_messages"));
    line.sync_writes = Some(d("im_sync_writes"));
    line.storage_writes_per_message = imkit::ratio(writes, messages);
    line.writes_per_delivery = imkit::ratio(writes, deliveries);
    line.bytes_written = Some(d("store_bytes_written") + d("sync_bytes_written"));
    line.bytes_written_total = line.bytes_written;
    line.payload_bytes = Some(messages * flags.payload as u64);
    line.bytes_per_payload_byte = line
        .bytes_written
        .map(|b| super::append::round3(b as f64 / (messages * flags.payload as u64).max(1) as f64));
    line.fsyncs = Some(d("fsyncs"));
    line.set_latency(&timed.hist);
    line.set_visible_latency(&visible);
    if !push_users.is_empty() {
        line.set_push_latency(&push_hist);
        line.push_resyncs = Some(resyncs);
    }
    line.fanout_mode = Some("hybrid".into());
    line.hybrid_threshold = Some(p.h as u64);
    line.users = Some(w.users);
    line.devices = Some(p.total_devices);
    line.online_devices = Some(checked_online as u64);
    line.groups = Some(w.members.len() as u64);
    line.rate = (flags.rate > 0).then_some(flags.rate);
    line.setup_secs = Some(imkit::round4(setup_secs));
    line.sync_ops = Some(read.calls);
    line.sync_ops_per_sec = Some(rate(read.calls, timed.secs));
    line.entries_read = Some(read.entries);
    line.read_write_ratio = imkit::ratio(read.entries, messages);
    line.errors = Some(errors.count());
    drop(admin);
    drop(probe_conn);
    drop(push_conn);
    t.stop()?;
    rep.push(line)?;
    Ok(errors.count())
}
