//! The process `tests/im_crash_kill9.rs` kills with SIGKILL in the middle of
//! fan-out.
//!
//! Usage: `im-crash-child <data dir> <cycle> <log> <retry file>`
//!
//! Opens the IM layer ([`timeline_tests::im_crash_cfg`]: group commit, small
//! segments, three shards), creates the conversations of
//! [`timeline_tests::im_crash_convs`] if they do not exist, first retries
//! every send listed in the retry file (sends of earlier cycles that were
//! never acknowledged: `conv sender cmid` per line), then sends forever
//! from three threads with up to 32 sends in flight each, while a fourth
//! thread adds and removes members of the churn group. The log gets
//! `S conv sender cmid` before a send and `A conv sender cmid seq dup` once
//! it is acknowledged (one `write_all` per line, no fsync: SIGKILL keeps
//! the page cache).
//!
//! Exit codes: 2 bad usage, 4 an operation failed, 5 open failed.
#![allow(clippy::unwrap_used)]

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};
use timeline_im::{Im, ImError, Pending, SendAck};
use timeline_tests::{im_crash_cfg, im_crash_convs, IM_CRASH_CHURN, IM_CRASH_CHURNERS};

fn log_line(log: &Mutex<File>, line: String) {
    let mut f = log.lock().unwrap();
    if f.write_all(line.as_bytes()).is_err() {
        std::process::exit(4);
    }
}

fn fail(what: &str, e: ImError) -> ! {
    eprintln!("im-crash-child: {what}: {e}");
    std::process::exit(4);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: im-crash-child <data dir> <cycle> <log> <retry file>");
        std::process::exit(2);
    }
    let cycle: u64 = args[2].parse().unwrap_or_else(|_| std::process::exit(2));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args[3])
        .unwrap_or_else(|_| std::process::exit(2));
    let log = Arc::new(Mutex::new(log));
    let (c, ic) = im_crash_cfg();
    let im = match Im::open(&args[1], c, ic) {
        Ok(im) => Arc::new(im),
        Err(e) => {
            eprintln!("im-crash-child: open failed: {e}");
            std::process::exit(5);
        }
    };
    for (conv, kind, members) in im_crash_convs() {
        match im.create_conversation(conv, kind, &members) {
            Ok(_) | Err(ImError::ConversationExists(_)) => {}
            Err(e) => fail("create", e),
        }
    }
    let retries = std::fs::read_to_string(&args[4]).unwrap_or_default();
    for line in retries.lines() {
        let v: Vec<u64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
        let [conv, sender, cmid] = v[..] else {
            continue;
        };
        match im.send(conv, sender, cmid, &payload(conv, sender, cmid)) {
            Ok(a) => log_line(
                &log,
                format!("A {conv} {sender} {cmid} {} {}\n", a.seq, a.duplicate as u8),
            ),
            // The sender left the churn group since: the retry is refused.
            Err(ImError::NotMember { .. }) => {}
            Err(e) => fail("retry", e),
        }
    }
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let (im, log) = (im.clone(), log.clone());
        hs.push(std::thread::spawn(move || sender(&im, &log, cycle, t)));
    }
    let im2 = im.clone();
    hs.push(std::thread::spawn(move || churn(&im2, cycle)));
    for h in hs {
        let _ = h.join();
    }
}

pub fn payload(conv: u64, sender: u64, cmid: u64) -> Vec<u8> {
    format!("c{conv}s{sender}m{cmid}").into_bytes()
}

fn sender(im: &Im, log: &Mutex<File>, cycle: u64, t: u64) {
    let convs = im_crash_convs();
    let mut rng = SmallRng::seed_from_u64(cycle * 31 + t);
    let mut inflight: VecDeque<(u64, u64, u64, Pending<SendAck>)> = VecDeque::new();
    for n in 0u64.. {
        let (conv, _, members) = &convs[rng.gen_range(0..convs.len())];
        // The churn group's creator never leaves; anyone else may have.
        let sender = if *conv == IM_CRASH_CHURN {
            100
        } else {
            members[rng.gen_range(0..members.len())]
        };
        let cmid = (cycle << 40) | (t << 32) | n;
        log_line(log, format!("S {conv} {sender} {cmid}\n"));
        let p = im
            .send_async(*conv, sender, cmid, &payload(*conv, sender, cmid))
            .unwrap_or_else(|e| fail("send", e));
        inflight.push_back((*conv, sender, cmid, p));
        if inflight.len() >= 32 {
            let (conv, sender, cmid, p) = inflight.pop_front().unwrap();
            let a = p.wait().unwrap_or_else(|e| fail("send wait", e));
            log_line(
                log,
                format!("A {conv} {sender} {cmid} {} {}\n", a.seq, a.duplicate as u8),
            );
        }
    }
}

fn churn(im: &Im, cycle: u64) {
    let mut rng = SmallRng::seed_from_u64(cycle ^ 0xc4);
    loop {
        let u = IM_CRASH_CHURNERS[rng.gen_range(0..IM_CRASH_CHURNERS.len())];
        let r = if im.members(IM_CRASH_CHURN).unwrap_or_default().contains(&u) {
            im.remove_member(IM_CRASH_CHURN, u)
        } else {
            im.add_member(IM_CRASH_CHURN, u)
        };
        if let Err(e) = r {
            fail("churn", e);
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(1..5)));
    }
}
