//! Shared by the bench's CI smokes: run `timeline-bench` (which starts
//! `timeline-server` from its own directory) and read its JSON line.
#![allow(clippy::unwrap_used, dead_code)]

use std::process::Command;

/// Run `timeline-bench args`; panics with its output unless it exits 0.
/// Returns the JSON line (parsed and as text) and stderr.
pub fn run_bench(args: &[&str]) -> (serde_json::Value, String, String) {
    let bench = env!("CARGO_BIN_EXE_timeline-bench");
    let server = std::path::Path::new(bench).with_file_name("timeline-server");
    assert!(
        server.is_file(),
        "{} is missing: build it (cargo build --release -p timeline-server)",
        server.display()
    );
    let out = Command::new(bench).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "timeline-bench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let json = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line")
        .to_string();
    (serde_json::from_str(&json).unwrap(), json, stderr)
}
