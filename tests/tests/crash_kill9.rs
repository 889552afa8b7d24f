//! A crash test that really crashes: a child process appends with group
//! commit while segments fill and get sealed in the background, and is
//! killed with SIGKILL at a random moment. The test then recovers the
//! directory and checks that every acknowledged append is there with its
//! exact bytes, and that every timeline is an unbroken run 1..=last_seq of
//! exactly the records the child generated. The next child continues on the
//! same directory.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use timeline_engine::{Direction, Engine};
use timeline_tests::{crash_cfg, parse_acks, payload, timeline, CRASH_TIMELINES};

const CYCLES: usize = 30;

#[test]
fn kill9_loses_no_acknowledged_append() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ack_path = tmp.path().join("acks.log");
    let err_path = tmp.path().join("child.stderr");
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut max_acked: HashMap<(u8, u64), u64> = HashMap::new();
    let mut acks_seen = 0usize;
    let started = Instant::now();
    let mut total_records = 0u64;
    for cycle in 0..CYCLES {
        let stderr = std::fs::File::create(&err_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-child"))
            .arg(&data)
            .arg((seed ^ cycle as u64).to_string())
            .arg(&ack_path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..=400)));
        let early = child.try_wait().unwrap();
        child.kill().unwrap_or(()); // SIGKILL on Unix
        let status = child.wait().unwrap();
        let child_err = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(
            early.is_none() && status.signal() == Some(libc::SIGKILL),
            "cycle {cycle}: child exited by itself ({status:?}): {child_err}"
        );

        // Every ack written before the kill (a torn last line is ignored).
        let acks = parse_acks(&ack_path);
        let new_acks = &acks[acks_seen.min(acks.len())..];
        for a in new_acks {
            let m = max_acked.entry((a.ks, a.tl)).or_default();
            *m = (*m).max(a.seq);
        }

        let engine = Engine::open(&data, crash_cfg(false))
            .unwrap_or_else(|e| panic!("cycle {cycle}: recovery failed: {e}"));
        for a in new_acks {
            let r = engine
                .get(timeline(a.ks, a.tl), a.seq)
                .unwrap_or_else(|e| panic!("cycle {cycle}: get {a:?}: {e}"))
                .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged {a:?} lost"));
            assert_eq!(r.seq, a.seq);
            assert_eq!(
                r.payload,
                payload(a.ks, a.tl, a.seq),
                "cycle {cycle}: {a:?}"
            );
        }
        acks_seen = acks.len();
        total_records = 0;
        for ks in [0u8, 1] {
            for tl in 0..CRASH_TIMELINES {
                let t = timeline(ks, tl);
                let last = engine.last_seq(t);
                let acked = max_acked.get(&(ks, tl)).copied().unwrap_or(0);
                assert!(
                    last >= acked,
                    "cycle {cycle}: ks {ks} tl {tl}: last_seq {last} < acked {acked}"
                );
                assert_eq!(engine.first_retained_seq(t).unwrap(), 1);
                let mut next = 1u64;
                while next <= last {
                    let page = engine
                        .scan(t, next, 1000, Direction::Forward)
                        .unwrap_or_else(|e| {
                            panic!("cycle {cycle}: scan ks {ks} tl {tl} from {next}: {e}")
                        });
                    assert!(
                        !page.is_empty(),
                        "cycle {cycle}: ks {ks} tl {tl}: gap at {next} (last {last})"
                    );
                    for r in page {
                        assert_eq!(
                            r.seq, next,
                            "cycle {cycle}: ks {ks} tl {tl}: seqs not consecutive"
                        );
                        assert!(
                            r.payload == payload(ks, tl, r.seq),
                            "cycle {cycle}: ks {ks} tl {tl} seq {}: wrong payload",
                            r.seq
                        );
                        next += 1;
                    }
                }
                assert_eq!(next, last + 1);
                assert!(engine.get(t, last + 1).unwrap().is_none());
                total_records += last;
            }
        }
        engine.close().unwrap();
    }
    assert!(acks_seen > 0, "the children never acknowledged an append");
    let sealed = ["store", "sync"]
        .iter()
        .flat_map(|ks| std::fs::read_dir(data.join(ks)).unwrap())
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "seg")
        })
        .count();
    assert!(sealed > 0, "no segment was sealed during the run");
    eprintln!(
        "crash_kill9: {CYCLES} cycles, {acks_seen} acks, {total_records} records recovered, {:?}",
        started.elapsed()
    );
}
