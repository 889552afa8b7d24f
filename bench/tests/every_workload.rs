//! Every workload at a tiny size on every target it takes (Redis only when
//! `redis-server` is installed): the run verifies itself (read-back, exact
//! bytes, every device caught up; exit status 2 otherwise), and this checks
//! that the JSON lines carry the fields the docs promise and agree with
//! themselves. Needs `timeline-server` next to `timeline-bench`.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use std::process::Command;

fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_timeline-bench"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "timeline-bench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let lines: Vec<Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty(), "{args:?}: no JSON line\n{stderr}");
    lines
}

/// The checks every result line must pass.
fn consistent(l: &Value, workload: &str, target: &str) {
    assert_eq!(l["workload"], workload, "{l}");
    assert_eq!(l["target"], target, "{l}");
    let ops = l["ops"].as_u64().unwrap();
    let secs = l["secs"].as_f64().unwrap();
    assert!(ops > 0 && secs > 0.0, "{l}");
    let rate = l["ops_per_sec"].as_f64().unwrap();
    assert!(
        (rate * secs - ops as f64).abs() <= 0.02 * ops as f64 + 1.0,
        "ops_per_sec: {l}"
    );
    if let Some(e) = l.get("errors") {
        assert_eq!(e, 0, "{l}");
    }
    for f in ["cores", "mem_bytes", "seed", "payload"] {
        assert!(l.get(f).is_some(), "{f} missing: {l}");
    }
    if let (Some(d), Some(m)) = (l["deliveries"].as_u64(), l["messages"].as_u64()) {
        assert!(d >= m, "every message reaches its sender's members: {l}");
    }
    // Where CPU was measured, the costs say on what basis.
    if l.get("cpu_us_per_message").is_some() {
        assert!(l["cpu_basis"].as_str().is_some(), "{l}");
    }
}

fn redis_installed() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok()
}

#[test]
fn w1_and_w2_on_every_target() {
    let mut targets = vec!["engine", "server"];
    if redis_installed() {
        targets.push("redis");
    } else {
        eprintln!("redis-server not installed: its target is skipped");
    }
    for t in targets {
        let ls = bench(&[
            "append",
            "--target",
            t,
            "--messages",
            "5000",
            "--timelines",
            "100",
        ]);
        for l in &ls {
            consistent(l, "append", t);
            assert_eq!(l["messages"], 5000, "{l}");
            assert!(l["cpu_us_per_message"].as_f64().is_some(), "costs: {l}");
        }
        let ls = bench(&[
            "read",
            "--target",
            t,
            "--messages",
            "5000",
            "--timelines",
            "100",
            "--reads",
            "1000",
        ]);
        let reads: u64 = ls
            .iter()
            .filter(|l| l.get("direction").is_some())
            .map(|l| l["ops"].as_u64().unwrap())
            .sum();
        assert_eq!(reads, 1000, "forward + newest-first = --reads ({t})");
        for l in &ls {
            consistent(
                l,
                if l.get("direction").is_some() {
                    "read"
                } else {
                    "append"
                },
                t,
            );
        }
    }
}

#[test]
fn w3_to_w5_in_process_and_w4_over_tcp() {
    for t in ["engine", "server"] {
        for l in bench(&[
            "fanout",
            "--target",
            t,
            "--groups",
            "20",
            "--fanout",
            "8",
            "--timelines",
            "1000",
        ]) {
            consistent(&l, "fanout", t);
            // Each message reaches every member of its group.
            assert_eq!(l["deliveries"], l["messages"].as_u64().unwrap() * 8, "{l}");
            assert_eq!(l["sync_writes"], l["deliveries"], "write fan-out: {l}");
        }
    }
    for t in ["engine", "server"] {
        for l in bench(&[
            "im",
            "--target",
            t,
            "--users",
            "2000",
            "--messages",
            "5000",
            "--no-results",
        ]) {
            consistent(&l, "im", t);
            assert_eq!(l["messages"], 5000);
            assert!(l["cpu_us_per_delivery"].as_f64().is_some(), "costs: {l}");
        }
    }
    let ls = bench(&[
        "fanout-sweep",
        "--sizes",
        "2,20",
        "--messages",
        "1000",
        "--no-results",
    ]);
    assert_eq!(ls.len(), 6, "two sizes x three modes");
    for l in &ls {
        consistent(l, "fanout-sweep", "engine");
    }
}

#[test]
fn w6_devices_and_reopen() {
    let mut targets = vec!["server"];
    if redis_installed() {
        targets.push("redis");
    }
    for t in targets {
        let args = [
            "devices",
            "--target",
            t,
            "--devices-total",
            "200",
            "--users",
            "100",
            "--messages",
            "2000",
        ];
        for l in bench(&args) {
            consistent(&l, "devices", t);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("tl").to_string_lossy().into_owned();
    bench(&[
        "append",
        "--messages",
        "5000",
        "--timelines",
        "100",
        "--dir",
        &d,
        "--keep",
    ]);
    for l in bench(&["reopen", "--dir", &d, "--timelines", "100"]) {
        assert_eq!(l["workload"], "reopen", "{l}");
        assert!(l["secs"].as_f64().unwrap() > 0.0, "{l}");
    }
}
