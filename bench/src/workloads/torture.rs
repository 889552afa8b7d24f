//! `torture`: crash torture of the server (issue 10, item 4). Each of
//! `--cycles` N cycles (default 20) starts `timeline-server` on the same
//! data directory, runs a mixed load, kills the server with SIGKILL at a
//! random moment (`--kill-ms` range, default 100–600 ms into the load),
//! restarts it and checks the directory over TCP against what the bench was
//! told. The bench is the parent and keeps every acknowledgement in memory.
//!
//! **Load** (all pipelined, `--pipeline` P in flight, default 16):
//! - two appender connections, each the only writer of 32 raw store
//!   timelines (ids from 2^40), `APPEND`s whose durability cycles through
//!   none, group and sync, and every eighth request an `APPEND_BATCH` of
//!   four; every payload is a function of (timeline, seq);
//! - two sender connections, `SEND`s into 20 direct conversations, four
//!   groups of five (write fan-out) and one group of twelve (read fan-out,
//!   the server runs `--hybrid-threshold 8`); a body names its
//!   `(conv, sender, client_msg_id)`.
//!
//! **Checks after each restart** (a violation is counted and printed):
//! - raw timelines: `LAST_SEQ` at least the highest acknowledged seq, and
//!   every record since the last check present, consecutive, exact bytes;
//! - conversations: every acknowledged send in the history at its seq, no
//!   `(conv, sender, client_msg_id)` stored twice; every unacknowledged send
//!   retried with its id: a stored one answers `duplicate` with its seq, the
//!   rest are stored once;
//! - sync: every member's `SYNC` from its checkpoint (with its read-fan-out
//!   group checkpoints) returns every stored message of its conversations
//!   exactly once, nothing else.
//!
//! Prints cycles, operations checked, restart times and violations (exit
//! status 2 if any); `--json` adds one JSON object.

use super::{rng_for, DataDir};
use crate::report::Reporter;
use crate::targets::net::Proc;
use crate::targets::server::spawn_server;
use crate::{Flags, Result};
use rand::Rng;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timeline_server::protocol::{
    Body, ConvKind, Durability, HistoryFrom, Request, Response, TimelineId,
};
use timeline_server::{Client, ClientError};

const RAW_BASE: u64 = 1 << 40;
const RAW_PER_APPENDER: u64 = 32;
const APPENDERS: u64 = 2;
const SENDERS: u64 = 2;
const THRESHOLD: usize = 8;
const PAGE: u32 = 1000;

/// `(conv, sender, client_msg_id)`.
type Key = (u64, u64, u64);

/// The conversations: `(conv, kind, members)`.
fn conversations() -> Vec<(u64, ConvKind, Vec<u64>)> {
    let mut v: Vec<(u64, ConvKind, Vec<u64>)> = (1..=20)
        .map(|i| (i, ConvKind::Direct, vec![2 * i - 1, 2 * i]))
        .collect();
    for g in 0..4u64 {
        v.push((
            21 + g,
            ConvKind::Group,
            (0..5).map(|k| 1 + g * 7 + k).collect(),
        ));
    }
    v.push((25, ConvKind::Group, (0..12).map(|k| 3 + k * 3).collect()));
    v
}

fn read_fanout(members: &[u64]) -> bool {
    members.len() > THRESHOLD
}

fn raw_payload(tl: u64, seq: u64, size: usize) -> Vec<u8> {
    let mut v = format!("t{tl}s{seq}|").into_bytes();
    let mut x = tl.wrapping_mul(31) ^ seq;
    while v.len() < size.max(16) {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        v.push(b'a' + (x >> 59) as u8);
    }
    v
}

fn send_body(k: Key, size: usize) -> Vec<u8> {
    let mut v = format!("{}:{}:{}:", k.0, k.1, k.2).into_bytes();
    v.resize(size.max(v.len()), b'.');
    v
}

fn key_of(e: &timeline_server::protocol::Entry) -> Option<Key> {
    let Body::Message(b) = &e.body else {
        return None;
    };
    let s = std::str::from_utf8(b).ok()?;
    let mut it = s.split(':').map(|x| x.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// What the bench knows, across cycles.
#[derive(Default)]
struct Ledger {
    /// Raw timeline → records checked through.
    raw_checked: HashMap<u64, u64>,
    /// Raw timeline → the highest seq acknowledged this cycle.
    raw_acked: HashMap<u64, u64>,
    /// Sends of this cycle: acknowledged seq, or `None`.
    sends: HashMap<Key, Option<u64>>,
    /// Every stored message seen in a history.
    stored: HashMap<Key, u64>,
    history_checked: HashMap<u64, u64>,
    /// Member → (conv, seq) stored and not yet returned by its `SYNC`.
    expect: HashMap<u64, BTreeSet<(u64, u64)>>,
    sync_cp: HashMap<u64, u64>,
    group_cp: HashMap<(u64, u64), u64>,
    next_cmid: u64,
    violations: Vec<String>,
    appends_acked: u64,
    appends_checked: u64,
    sends_acked: u64,
    retries: u64,
    deliveries: u64,
}

impl Ledger {
    fn violation(&mut self, s: String) {
        eprintln!("torture: VIOLATION: {s}");
        self.violations.push(s);
    }
}

fn call(c: &mut Client, r: &Request<'_>) -> Result<Response> {
    c.call(r).map_err(|e| e.to_string().into())
}

/// One appender connection's load: it owns `tls`; returns the highest
/// acknowledged seq per timeline (the seqs it was told).
fn appender(
    addr: &str,
    tls: Vec<(u64, u64)>,
    pipeline: usize,
    size: usize,
    stop: &AtomicBool,
) -> (HashMap<u64, u64>, u64, Vec<String>) {
    let mut acked = HashMap::new();
    let (mut n, mut bad) = (0u64, Vec::new());
    let Ok(mut c) = Client::connect(addr, b"") else {
        return (acked, n, bad);
    };
    let mut next: HashMap<u64, u64> = tls.iter().copied().collect();
    // Expected seqs of the requests in flight, in order.
    let mut inflight: std::collections::VecDeque<Vec<(u64, u64)>> = Default::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        while inflight.len() < pipeline {
            let d = [
                Durability::Buffered,
                Durability::GroupCommit,
                Durability::Sync,
            ][(i % 3) as usize];
            let k = if i % 8 == 7 { 4 } else { 1 };
            let mut items = Vec::new();
            for j in 0..k {
                let tl = tls[((i + j) % tls.len() as u64) as usize].0;
                let s = next[&tl];
                next.insert(tl, s + 1);
                items.push((tl, s));
            }
            let payloads: Vec<Vec<u8>> = items
                .iter()
                .map(|&(t, s)| raw_payload(t, s, size))
                .collect();
            let r = if k == 1 {
                Request::Append {
                    timeline: TimelineId::store(items[0].0),
                    durability: Some(d),
                    payload: &payloads[0],
                }
            } else {
                Request::AppendBatch {
                    durability: Some(d),
                    items: items
                        .iter()
                        .zip(&payloads)
                        .map(|(&(t, _), p)| (TimelineId::store(t), &p[..]))
                        .collect(),
                }
            };
            c.queue(&r);
            inflight.push_back(items);
            i += 1;
        }
        if c.flush().is_err() {
            break;
        }
        let Some(want) = inflight.pop_front() else {
            break;
        };
        let got = match c.recv() {
            Ok(Response::Append(s)) => vec![s],
            Ok(Response::AppendBatch(v)) => v,
            Ok(r) => {
                bad.push(format!("append answered {r:?}"));
                break;
            }
            Err(ClientError::Server { code, message, .. }) => {
                bad.push(format!("append failed without a crash: {code} {message}"));
                break;
            }
            Err(_) => break, // the server was killed
        };
        for (&(tl, s), g) in want.iter().zip(&got) {
            if *g != s {
                bad.push(format!(
                    "timeline {tl}: append acknowledged seq {g}, expected {s}"
                ));
            }
            let m = acked.entry(tl).or_insert(0);
            *m = (*m).max(*g);
            n += 1;
        }
    }
    (acked, n, bad)
}

/// One sender connection's load over `pairs` (conv, sender): returns the
/// sends tried, with the seq of each acknowledged one.
fn sender(
    addr: &str,
    pairs: Vec<(u64, u64)>,
    cmid0: u64,
    pipeline: usize,
    size: usize,
    stop: &AtomicBool,
) -> (Vec<(Key, Option<u64>)>, Vec<String>) {
    let (mut out, mut bad) = (Vec::new(), Vec::new());
    let Ok(mut c) = Client::connect(addr, b"") else {
        return (out, bad);
    };
    let mut inflight = std::collections::VecDeque::new();
    let mut i = 0u64;
    'run: while !stop.load(Ordering::Relaxed) {
        while inflight.len() < pipeline {
            let (conv, s) = pairs[(i % pairs.len() as u64) as usize];
            let k = (conv, s, cmid0 + i);
            c.queue(&Request::Send {
                conv,
                sender: s,
                client_msg_id: k.2,
                payload: &send_body(k, size),
            });
            inflight.push_back(out.len());
            out.push((k, None));
            i += 1;
        }
        if c.flush().is_err() {
            break;
        }
        let Some(at) = inflight.pop_front() else {
            break;
        };
        match c.recv() {
            Ok(Response::Send(a)) => out[at].1 = Some(a.seq),
            Ok(r) => {
                bad.push(format!("send answered {r:?}"));
                break 'run;
            }
            Err(ClientError::Server { code, message, .. }) => {
                bad.push(format!("send failed without a crash: {code} {message}"));
                break 'run;
            }
            Err(_) => break,
        }
    }
    (out, bad)
}

/// Run the load until the kill; fold what the clients were told into `l`.
fn load_and_kill(flags: &Flags, proc: Proc, addr: &str, cycle: u64, l: &mut Ledger) -> Result<()> {
    let mut rng = rng_for(flags.seed, 1000 + cycle);
    let (lo, hi) = kill_range(flags);
    let kill_after = Duration::from_millis(rng.gen_range(lo..=hi));
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = flags.pipeline.unwrap_or(16);
    let size = flags.payload;
    let convs = conversations();
    let mut handles_a = Vec::new();
    for a in 0..APPENDERS {
        let tls: Vec<(u64, u64)> = (0..RAW_PER_APPENDER)
            .map(|k| RAW_BASE + a * RAW_PER_APPENDER + k)
            .map(|t| (t, l.raw_checked.get(&t).copied().unwrap_or(0) + 1))
            .collect();
        let (addr, stop) = (addr.to_string(), stop.clone());
        handles_a.push(std::thread::spawn(move || {
            appender(&addr, tls, pipeline, size, &stop)
        }));
    }
    let mut handles_s = Vec::new();
    for s in 0..SENDERS {
        let pairs: Vec<(u64, u64)> = convs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 % SENDERS == s)
            .flat_map(|(_, (c, _, m))| m.iter().map(|&u| (*c, u)).collect::<Vec<_>>())
            .collect();
        let cmid0 = l.next_cmid + s * (1 << 32);
        let (addr, stop) = (addr.to_string(), stop.clone());
        handles_s.push(std::thread::spawn(move || {
            sender(&addr, pairs, cmid0, pipeline, size, &stop)
        }));
    }
    l.next_cmid += SENDERS << 32;
    std::thread::sleep(kill_after);
    let st = proc.kill()?;
    stop.store(true, Ordering::Relaxed);
    if st.code().is_some() {
        l.violation(format!(
            "cycle {cycle}: the server had exited by itself ({st})"
        ));
    }
    for h in handles_a {
        let (acked, n, bad) = h.join().map_err(|_| "an appender thread panicked")?;
        l.appends_acked += n;
        for b in bad {
            l.violation(format!("cycle {cycle}: {b}"));
        }
        for (t, s) in acked {
            let m = l.raw_acked.entry(t).or_insert(0);
            *m = (*m).max(s);
        }
    }
    for h in handles_s {
        let (out, bad) = h.join().map_err(|_| "a sender thread panicked")?;
        for b in bad {
            l.violation(format!("cycle {cycle}: {b}"));
        }
        for (k, s) in out {
            l.sends_acked += u64::from(s.is_some());
            l.sends.insert(k, s);
        }
    }
    Ok(())
}

/// Raw timelines: everything acknowledged is there, and every record since
/// the last check is consecutive with its exact bytes.
fn check_raw(c: &mut Client, l: &mut Ledger, size: usize, cycle: u64) -> Result<()> {
    for t in RAW_BASE..RAW_BASE + APPENDERS * RAW_PER_APPENDER {
        let tl = TimelineId::store(t);
        let Response::LastSeq(last) = call(c, &Request::LastSeq { timeline: tl })? else {
            return Err("LAST_SEQ: unexpected reply".into());
        };
        let acked = l.raw_acked.remove(&t).unwrap_or(0);
        if last < acked {
            l.violation(format!(
                "cycle {cycle}: timeline {t}: seq {acked} acknowledged, last_seq {last}"
            ));
        }
        let mut from = l.raw_checked.get(&t).copied().unwrap_or(0) + 1;
        while from <= last {
            let r = Request::Scan {
                timeline: tl,
                from,
                limit: PAGE,
                direction: timeline_server::protocol::Direction::Forward,
            };
            let Response::Scan(recs) = call(c, &r)? else {
                return Err("SCAN: unexpected reply".into());
            };
            if recs.is_empty() {
                l.violation(format!(
                    "cycle {cycle}: timeline {t}: nothing at {from}, last_seq {last}"
                ));
                break;
            }
            for rec in recs {
                if rec.seq != from || rec.payload != raw_payload(t, rec.seq, size) {
                    l.violation(format!("cycle {cycle}: timeline {t}: seq {} (expected {from}) wrong or out of place", rec.seq));
                }
                from = rec.seq + 1;
                l.appends_checked += 1;
            }
        }
        l.raw_checked.insert(t, last);
    }
    Ok(())
}

/// Read each conversation's history since the last check: every message
/// stored once; its members now expect it from `SYNC`.
fn read_histories(c: &mut Client, l: &mut Ledger, cycle: u64) -> Result<()> {
    for (conv, _, members) in conversations() {
        loop {
            let after = l.history_checked.get(&conv).copied().unwrap_or(0);
            let r = Request::History {
                conv,
                user: members[0],
                from: HistoryFrom::After(after),
                limit: PAGE,
            };
            let Response::History(page) = call(c, &r)? else {
                return Err("HISTORY: unexpected reply".into());
            };
            for e in &page.entries {
                l.history_checked.insert(conv, e.conv_seq);
                let Some(k) = key_of(e) else { continue };
                if let Some(s) = l.stored.insert(k, e.conv_seq) {
                    l.violation(format!(
                        "cycle {cycle}: {k:?} stored twice (seqs {s} and {})",
                        e.conv_seq
                    ));
                }
                for &m in &members {
                    l.expect.entry(m).or_default().insert((conv, e.conv_seq));
                }
            }
            if !page.has_more || page.entries.is_empty() {
                break;
            }
        }
    }
    Ok(())
}

/// Acknowledged sends are stored at their seq; the others are retried with
/// their ids (a stored one must answer `duplicate` with its seq).
fn check_sends(c: &mut Client, l: &mut Ledger, size: usize, cycle: u64) -> Result<()> {
    let sends: Vec<(Key, Option<u64>)> = l.sends.drain().collect();
    let mut retried = Vec::new();
    for (k, acked) in sends {
        let stored = l.stored.get(&k).copied();
        if let Some(s) = acked {
            if stored != Some(s) {
                l.violation(format!(
                    "cycle {cycle}: {k:?} acknowledged at {s}, stored at {stored:?}"
                ));
            }
            continue;
        }
        let body = send_body(k, size);
        let r = Request::Send {
            conv: k.0,
            sender: k.1,
            client_msg_id: k.2,
            payload: &body,
        };
        let Response::Send(a) = call(c, &r)? else {
            return Err("SEND: unexpected reply".into());
        };
        l.retries += 1;
        match stored {
            Some(s) if !(a.duplicate && a.seq == s) => l.violation(format!(
                "cycle {cycle}: retry of stored {k:?} (seq {s}) answered {a:?}"
            )),
            None if a.duplicate => l.violation(format!(
                "cycle {cycle}: retry of unstored {k:?} answered duplicate"
            )),
            _ => {}
        }
        retried.push((k, a.seq));
    }
    read_histories(c, l, cycle)?;
    for (k, s) in retried {
        if l.stored.get(&k) != Some(&s) {
            l.violation(format!(
                "cycle {cycle}: retried {k:?} answered {s}, stored at {:?}",
                l.stored.get(&k)
            ));
        }
    }
    Ok(())
}

/// Every member's `SYNC` returns each stored message of its conversations
/// exactly once.
fn check_sync(c: &mut Client, l: &mut Ledger, cycle: u64) -> Result<()> {
    let convs = conversations();
    let users: BTreeSet<u64> = convs.iter().flat_map(|c| c.2.iter().copied()).collect();
    for u in users {
        let groups: Vec<u64> = convs
            .iter()
            .filter(|c| read_fanout(&c.2) && c.2.contains(&u))
            .map(|c| c.0)
            .collect();
        loop {
            let cp = l.sync_cp.get(&u).copied().unwrap_or(0);
            let gcp = groups
                .iter()
                .map(|&g| (g, l.group_cp.get(&(u, g)).copied().unwrap_or(0)))
                .collect();
            let Response::Sync(page) = call(
                c,
                &Request::Sync {
                    user: u,
                    checkpoint: cp,
                    limit: PAGE,
                    groups: gcp,
                },
            )?
            else {
                return Err("SYNC: unexpected reply".into());
            };
            let mut got: Vec<&timeline_server::protocol::Entry> =
                page.entries.iter().map(|e| &e.entry).collect();
            let mut more = page.has_more;
            for g in &page.groups {
                got.extend(g.entries.iter());
                l.group_cp.insert((u, g.conv), g.checkpoint);
                more |= g.has_more;
            }
            for e in got {
                if key_of(e).is_none() {
                    continue;
                }
                l.deliveries += 1;
                let exp = l.expect.entry(u).or_default();
                if !exp.remove(&(e.conv, e.conv_seq)) {
                    l.violation(format!(
                        "cycle {cycle}: user {u} got conv {} seq {} twice or unstored",
                        e.conv, e.conv_seq
                    ));
                }
            }
            l.sync_cp.insert(u, page.checkpoint);
            if !more {
                break;
            }
        }
        let missing = l.expect.get(&u).map_or(0, |s| s.len());
        if missing > 0 {
            l.violation(format!(
                "cycle {cycle}: user {u}: {missing} stored messages not in its sync"
            ));
            l.expect.remove(&u);
        }
    }
    Ok(())
}

fn kill_range(flags: &Flags) -> (u64, u64) {
    match flags.kill_ms.as_deref() {
        Some([a, b]) if a <= b => (*a, *b),
        Some([a]) => (*a, *a),
        _ => (100, 600),
    }
}

fn create(c: &mut Client) -> Result<()> {
    for (conv, kind, members) in conversations() {
        match c.call(&Request::CreateConversation {
            conv,
            kind,
            members,
        }) {
            Ok(_) => {}
            Err(e)
                if e.code() == Some(timeline_server::protocol::ErrorCode::CONVERSATION_EXISTS) => {}
            Err(e) => return Err(format!("creating conversation {conv}: {e}").into()),
        }
    }
    Ok(())
}

pub fn run(flags: &Flags, _rep: &mut Reporter) -> Result<u64> {
    if flags.addr.is_some() {
        return Err("torture kills the server it starts: it takes no --addr".into());
    }
    let cycles = flags.cycles.unwrap_or(20);
    let dir = DataDir::new(flags)?;
    let extra = vec!["--hybrid-threshold".to_string(), THRESHOLD.to_string()];
    let mut l = Ledger::default();
    let (mut restart_sum, mut restart_max) = (Duration::ZERO, Duration::ZERO);
    let t0 = Instant::now();
    let (mut proc, mut addr) = spawn_server(flags, &dir.path, &extra)?;
    create(&mut Client::connect(addr.as_str(), b"")?)?;
    for cycle in 0..cycles {
        load_and_kill(flags, proc, &addr, cycle, &mut l)?;
        let t = Instant::now();
        (proc, addr) = spawn_server(flags, &dir.path, &extra)?;
        let took = t.elapsed();
        restart_sum += took;
        restart_max = restart_max.max(took);
        let mut c = Client::connect(addr.as_str(), b"")?;
        check_raw(&mut c, &mut l, flags.payload, cycle)?;
        read_histories(&mut c, &mut l, cycle)?;
        check_sends(&mut c, &mut l, flags.payload, cycle)?;
        check_sync(&mut c, &mut l, cycle)?;
        if (cycle + 1) % 10 == 0 || cycle + 1 == cycles {
            eprintln!(
                "torture: {}/{cycles} cycles, {} appends and {} sends acknowledged, {} violations",
                cycle + 1,
                l.appends_acked,
                l.sends_acked,
                l.violations.len()
            );
        }
    }
    proc.stop()?;
    let n = cycles.max(1) as f64;
    timeline_client::outln!(
        "torture: {cycles} SIGKILL cycles in {:.1} s: {} appends acknowledged, {} records checked; {} sends acknowledged, {} messages stored and checked, {} retries, {} deliveries checked; restart avg {:.0} ms, max {:.0} ms; violations {}",
        t0.elapsed().as_secs_f64(),
        l.appends_acked, l.appends_checked, l.sends_acked, l.stored.len(), l.retries, l.deliveries,
        restart_sum.as_secs_f64() * 1e3 / n, restart_max.as_secs_f64() * 1e3, l.violations.len()
    );
    if flags.json {
        let j = serde_json::json!({
            "workload": "torture", "cycles": cycles, "appends_acked": l.appends_acked,
            "records_checked": l.appends_checked, "sends_acked": l.sends_acked,
            "messages_checked": l.stored.len(), "retries": l.retries, "deliveries_checked": l.deliveries,
            "restart_avg_ms": restart_sum.as_secs_f64() * 1e3 / n,
            "restart_max_ms": restart_max.as_secs_f64() * 1e3, "violations": l.violations.len(),
        });
        timeline_client::outln!("{j}");
    }
    Ok(l.violations.len() as u64)
}
