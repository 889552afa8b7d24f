//! The short CI version of `timeline-bench torture` (the recorded run and
//! its command: docs/reliability.md): a few SIGKILL cycles of the real
//! server under load, every acknowledgement verified after each restart.
//! Needs `timeline-server` next to `timeline-bench` (`cargo test
//! --workspace` builds both).
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn a_few_sigkill_cycles_lose_nothing_acknowledged() {
    let server = std::path::Path::new(env!("CARGO_BIN_EXE_timeline-bench"))
        .with_file_name("timeline-server");
    if !server.is_file() {
        panic!(
            "{} is missing: build it (cargo build --release -p timeline-server)",
            server.display()
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_timeline-bench"))
        .args([
            "torture",
            "--cycles",
            "4",
            "--kill-ms",
            "50,300",
            "--durability",
            "group",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "torture failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let json = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["violations"], 0, "{json}");
    assert_eq!(v["cycles"], 4);
    assert!(v["sends_acked"].as_u64().unwrap() > 0, "{json}");
    assert!(v["records_checked"].as_u64().unwrap() > 0, "{json}");
}
