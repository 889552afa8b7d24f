//! Kill -9 during fan-out. A child process (`im-crash-child`) sends from
//! three threads with many sends in flight under group commit while another
//! thread changes a group's membership; it is killed with SIGKILL at a
//! random moment, and the next child retries the sends that were never
//! acknowledged. After every kill the test checks, first on the raw engine
//! (how much fan-out the crash interrupted) and then through `Im::open`
//! (which completes it):
//! * every acknowledged send is in its conversation's store at the seq it
//!   was acknowledged with;
//! * no message is stored twice (retries are idempotent across crashes);
//! * every stored entry of a write-fan-out conversation is in the sync
//!   timeline of every member at that seq exactly once, in seq order, and in
//!   no one else's; read-fan-out groups write no sync entries after creation.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use timeline_engine::Engine;
use timeline_im::Im;
use timeline_tests::im_check::check_fanout;
use timeline_tests::{im_crash_cfg, im_crash_convs, IM_CRASH_THRESHOLD};

const CYCLES: usize = 12;

type Key = (u64, u64, u64); // conv, sender, cmid

fn check(engine: &Engine, strict: bool, cycle: usize) -> (usize, HashMap<Key, u64>) {
    check_fanout(
        engine,
        &im_crash_convs(),
        IM_CRASH_THRESHOLD,
        strict,
        &format!("cycle {cycle}"),
    )
}

#[test]
fn kill9_during_fanout_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("im.log");
    let retry = tmp.path().join("retry.txt");
    let err_path = tmp.path().join("child.stderr");
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x1c);
    let started = Instant::now();
    let (mut interrupted, mut acks, mut retried) = (0usize, 0usize, 0usize);
    for cycle in 0..CYCLES {
        let stderr = std::fs::File::create(&err_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_im-crash-child"))
            .arg(&data)
            .arg(cycle.to_string())
            .arg(&log)
            .arg(&retry)
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(150..=600)));
        let early = child.try_wait().unwrap();
        child.kill().unwrap_or(());
        let status = child.wait().unwrap();
        let child_err = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(
            early.is_none() && status.signal() == Some(libc::SIGKILL),
            "cycle {cycle}: child exited by itself ({status:?}): {child_err}"
        );
        // The log, without a torn last line; cut off in the file too, or
        // the next child's first line would be appended to it.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if complete.len() < text.len() {
            std::fs::write(&log, complete).unwrap();
        }
        let mut sent: BTreeSet<Key> = BTreeSet::new();
        let mut acked: HashMap<Key, u64> = HashMap::new();
        for line in complete.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap();
            match f[0] {
                "S" => {
                    sent.insert((n(1), n(2), n(3)));
                }
                "A" => {
                    let k = (n(1), n(2), n(3));
                    if let Some(&s) = acked.get(&k) {
                        assert_eq!(s, n(4), "cycle {cycle}: {k:?} acknowledged with two seqs");
                    }
                    acked.insert(k, n(4));
                }
                _ => panic!("bad log line {line:?}"),
            }
        }
        acks = acked.len();
        // Before recovery: how much fan-out did the kill interrupt?
        let (c, _) = im_crash_cfg();
        let engine = Engine::open(&data, c).unwrap();
        let (missing, _) = check(&engine, false, cycle);
        interrupted += missing;
        engine.close().unwrap();
        // Recovery completes it.
        let (c, ic) = im_crash_cfg();
        let im = Im::open(&data, c, ic).unwrap_or_else(|e| panic!("cycle {cycle}: open: {e}"));
        let (_, stored) = check(im.engine(), true, cycle);
        for (k, seq) in &acked {
            assert_eq!(
                stored.get(k),
                Some(seq),
                "cycle {cycle}: acknowledged {k:?} lost or moved"
            );
        }
        im.close().unwrap();
        // The next child retries what was sent but never acknowledged.
        let pending: Vec<String> = sent
            .iter()
            .filter(|k| !acked.contains_key(k))
            .map(|(c, s, m)| format!("{c} {s} {m}\n"))
            .collect();
        retried += pending.len();
        std::fs::write(&retry, pending.concat()).unwrap();
    }
    assert!(acks > 0, "the children never acknowledged a send");
    assert!(
        interrupted > 0,
        "no kill interrupted a fan-out: recovery was not exercised"
    );
    eprintln!(
        "im_crash_kill9: {CYCLES} cycles, {acks} sends acknowledged, {interrupted} deliveries \
         completed by recovery, {retried} retries, {:?}",
        started.elapsed()
    );
}
