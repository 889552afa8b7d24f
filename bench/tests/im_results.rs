//! The headline command at a tiny size: `timeline-bench im` verifies every
//! device against the acknowledged sends (exit status 2 otherwise) and
//! writes its results directory; this checks the directory's files and that
//! the JSON line agrees with itself and with the CSV.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn im_writes_a_consistent_results_directory() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_timeline-bench"))
        .args(["im", "--users", "2000", "--messages", "20000", "--json"])
        .arg("--results")
        .arg(root.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "im failed ({}):\n{stderr}",
        out.status
    );
    let dirs: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let dir = &dirs[0];
    assert!(dir.file_name().unwrap().to_str().unwrap().ends_with("-im"));

    let jsonl = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    let v: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    assert_eq!(v["workload"], "im");
    assert_eq!(v["messages"], 20_000);
    assert_eq!(v["errors"], 0);
    let deliveries = v["deliveries"].as_u64().unwrap();
    assert!(deliveries >= 20_000, "every message has a receiver: {v}");
    // Write fan-out entries are part of the deliveries (the rest are
    // members reached through a read fan-out group's store timeline).
    assert!(v["sync_writes"].as_u64().unwrap() <= deliveries, "{v}");
    let secs = v["secs"].as_f64().unwrap();
    let per_sec = v["deliveries_per_sec"].as_f64().unwrap();
    assert!(
        (per_sec * secs - deliveries as f64).abs() <= 0.01 * deliveries as f64,
        "{v}"
    );

    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let mut rows = csv.lines();
    let head: Vec<&str> = rows.next().unwrap().split(',').collect();
    let row: Vec<&str> = rows.next().unwrap().split(',').collect();
    let col = |name: &str| row[head.iter().position(|h| *h == name).unwrap()];
    assert_eq!(col("messages"), "20000");
    assert_eq!(col("deliveries"), deliveries.to_string());

    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("machine.json")).unwrap()).unwrap();
    assert!(m["cores"].as_u64().unwrap() >= 1);
    assert_eq!(m["fdatasync"]["samples"], 20);
    assert!(!m["file_system"].as_str().unwrap().is_empty());

    let lat = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
    assert!(lat.contains("<svg") && lat.contains("<polyline"));
    assert!(std::fs::read_to_string(dir.join("command.txt"))
        .unwrap()
        .contains(" im "));
}
