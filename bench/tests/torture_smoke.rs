//! The short CI version of `timeline-bench torture` (the recorded run and
//! its command: docs/reliability.md): a few SIGKILL cycles of the real
//! server under load, every acknowledgement verified after each restart.
//! Needs `timeline-server` next to `timeline-bench` (`cargo test
//! --workspace` builds both).
#![allow(clippy::unwrap_used)]

mod common;

#[test]
fn a_few_sigkill_cycles_lose_nothing_acknowledged() {
    let (v, json, _) = common::run_bench(&[
        "torture",
        "--cycles",
        "4",
        "--kill-ms",
        "50,300",
        "--durability",
        "group",
        "--json",
    ]);
    assert_eq!(v["violations"], 0, "{json}");
    assert_eq!(v["cycles"], 4);
    assert!(v["sends_acked"].as_u64().unwrap() > 0, "{json}");
    assert!(v["records_checked"].as_u64().unwrap() > 0, "{json}");
}
