//! `timeline-bench compare` at a tiny size: two targets (the engine in
//! process and the server over TCP), a two-point sweep, and the files it
//! promises. Needs `timeline-server` next to `timeline-bench`.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn compare_writes_ratios_to_the_first_target_for_each_point() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_timeline-bench"))
        .args([
            "compare",
            "--targets",
            "engine,server",
            "--sweep",
            "batch=1,4",
        ])
        .arg("--results")
        .arg(root.path())
        .args(["append", "--messages", "20000", "--timelines", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "compare failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("batch / line / figure"), "{stdout}");
    let dir = std::fs::read_dir(root.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let csv = std::fs::read_to_string(dir.join("compare.csv")).unwrap();
    let head: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    // ops_per_sec for both targets at both points; the reference's ratio is 1.
    let ops: Vec<&Vec<&str>> = rows
        .iter()
        .filter(|r| r[col("figure")] == "ops_per_sec")
        .collect();
    assert_eq!(ops.len(), 4, "{csv}");
    for r in &ops {
        let ratio: f64 = r[col("ratio")].parse().unwrap();
        if r[col("target")] == "engine" {
            assert_eq!(ratio, 1.0);
        }
        let v: f64 = r[col("value")].parse().unwrap();
        assert!(v > 0.0);
    }
    let jsonl = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    assert_eq!(jsonl.lines().count(), 4, "{jsonl}");
    for l in jsonl.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["messages"], 20_000);
        assert_eq!(v["sweep_flag"], "batch");
        assert_eq!(v["batch"].to_string(), v["sweep_value"].as_str().unwrap());
    }
    let svg = std::fs::read_to_string(dir.join("sweep.svg")).unwrap();
    assert!(svg.contains("<polyline"));
    assert!(dir.join("machine.json").is_file());
}

#[test]
fn compare_refuses_a_target_in_the_workload_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_timeline-bench"))
        .args([
            "compare",
            "--targets",
            "engine",
            "append",
            "--target",
            "redis",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--targets"));
}
