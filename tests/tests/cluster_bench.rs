//! `timeline-bench` against a cluster (docs/benchmarks.md, "Cluster"):
//! the documented commands run on a small test cluster, their JSON line
//! checked. Needs the workspace's `timeline-bench` binary (built by
//! `cargo test --workspace`, the README's test command).

use std::path::PathBuf;
use std::process::Command;
use timeline_tests::cluster::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_cluster-node");

/// `target/<profile>/timeline-bench`, beside this test's `deps/` directory.
fn bench_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join("timeline-bench");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo test --workspace builds every binary)",
        bin.display()
    );
    bin
}

/// Run the bench with `args` and return its one JSON result line.
fn bench_json(args: &[&str], cl: &Cluster) -> serde_json::Value {
    let out = Command::new(bench_bin())
        .args(args)
        .arg("--json")
        .output()
        .expect("timeline-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "timeline-bench {args:?} failed:\n{}\n{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr),
        cl.logs()
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in {stdout}"));
    serde_json::from_str(line).expect("a JSON result line")
}

/// W6 through the cluster at a small size: every device connected to its
/// user's partition leader, every acknowledged message pushed and synced
/// by each member's devices, nothing missing or extra (`errors` 0).
#[test]
fn devices_through_a_cluster_get_every_message() {
    let cl = Cluster::start(BIN, 16);
    let addr = cl.seeds().join(",");
    let v = bench_json(
        &[
            "devices",
            "--target",
            "cluster",
            "--addr",
            &addr,
            "--devices-total",
            "400",
            "--rate",
            "200",
            "--messages",
            "600",
        ],
        &cl,
    );
    assert_eq!(v["workload"], "devices");
    assert_eq!(v["target"], "cluster");
    assert_eq!(v["durability"], "quorum");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["messages"], 600, "{v}");
    assert!(v["deliveries"].as_u64().unwrap_or(0) >= 1200, "{v}");
    assert!(v["push_p99_us"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
}

/// W4 through the cluster at a small size: conversations created on their
/// partitions' leaders and delivered before the run, sends and syncs
/// routed by partition; every online device and the checked offline ones
/// end with exactly their conversations' messages (`errors` 0).
#[test]
fn im_through_a_cluster_delivers_every_message() {
    let cl = Cluster::start(BIN, 16);
    let addr = cl.seeds().join(",");
    let v = bench_json(
        &[
            "im",
            "--target",
            "cluster",
            "--addr",
            &addr,
            "--users",
            "600",
            "--messages",
            "1500",
            "--no-results",
        ],
        &cl,
    );
    assert_eq!(v["workload"], "im");
    assert_eq!(v["target"], "cluster");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["messages"], 1500, "{v}");
    assert!(v["deliveries"].as_u64().unwrap_or(0) > 1500, "{v}");
    assert!(v["sync_ops"].as_u64().unwrap_or(0) > 0, "{v}");
}

/// W3 through the cluster at a small size, write fan-out: every sampled
/// receiver ends with exactly its groups' messages (`errors` 0); a
/// `--fanout-mode` the nodes' threshold would not give is refused.
#[test]
fn fanout_through_a_cluster_delivers_every_message() {
    let cl = Cluster::start(BIN, 16);
    let addr = cl.seeds().join(",");
    let args = |mode: &'static str| {
        vec![
            "fanout",
            "--target",
            "cluster",
            "--addr",
            addr.as_str(),
            "--groups",
            "300",
            "--fanout",
            "20",
            "--timelines",
            "2000",
            "--fanout-mode",
            mode,
        ]
    };
    let v = bench_json(&args("write"), &cl);
    assert_eq!(v["target"], "cluster");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["messages"], 300, "{v}");
    assert_eq!(v["deliveries"], 6000, "{v}");
    let out = Command::new(bench_bin())
        .args(args("read"))
        .output()
        .expect("timeline-bench runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--hybrid-threshold"), "{err}");
}
