//! A cluster node for the multi-process tests: `timeline_server` with
//! `--cluster`'s configuration and test-sized settings.
//!
//! Usage: `cluster-node <data dir> <client addr> <raft addr> <etcd> <node id> <partitions> [<auth secret>]`
//! (with a secret, `--auth` is on with it; `CLUSTER_REPLACE_AFTER_MS` in
//! the environment sets `replace_after`, `CLUSTER_REBALANCE_MS`
//! `leader_rebalance_every`, 0 for never, `CLUSTER_MIN_FREE`
//! `min_free_space` in bytes). Exit codes: 2 bad usage, 3
//! the server did not start.

use std::time::Duration;
use timeline_engine::KeyspaceConfig;
use timeline_server::ServerConfig;

fn main() {
    tracing_subscriber_init();
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 7 && a.len() != 8 {
        eprintln!("usage: cluster-node <data dir> <client addr> <raft addr> <etcd> <node id> <partitions> [<auth secret>]");
        std::process::exit(2);
    }
    let (Ok(id), Ok(partitions)) = (a[5].parse::<u64>(), a[6].parse::<u32>()) else {
        eprintln!("cluster-node: node id and partitions are numbers");
        std::process::exit(2);
    };
    let mut cfg = ServerConfig {
        listen: a[2].clone(),
        data_dir: a[1].clone().into(),
        io_threads: 1,
        blocking_threads: 1,
        read_threads: 1,
        auth_secret: a.get(7).map(|s| s.as_bytes().to_vec()),
        ..ServerConfig::default()
    };
    cfg.engine.shards = 1;
    cfg.engine.keyspaces = vec![KeyspaceConfig::store(), KeyspaceConfig::sync()];
    // Small Raft log and outbox segments, and raft-state segments sealed
    // every 5 s, so that the tests see purged, delivered and renewed ones
    // dropped.
    cfg.engine
        .keyspaces
        .extend(timeline_cluster::log_store::keyspaces().map(|mut k| {
            use timeline_cluster::log_store::{IM_OUTBOX, RAFT_STATE};
            k.segment_bytes = match k.id == IM_OUTBOX {
                true => 128 << 10,
                false => 256 << 10,
            };
            if k.id == RAFT_STATE {
                k.segment_window = Duration::from_secs(5);
            }
            k
        }));
    cfg.cluster = Some(timeline_cluster::NodeConfig {
        id,
        etcd: vec![a[4].clone()],
        raft_listen: a[3].clone(),
        partitions,
        replicas: 3,
        formation_timeout: Duration::from_secs(30),
        snapshot_every: 2_000,
        keep_in_log: 500,
        log_reclaim_every: Duration::from_secs(2),
        interest_renew: Duration::from_millis(500),
        // Set per node by the harness; unset, the defaults.
        replace_after: ms_env(
            "CLUSTER_REPLACE_AFTER_MS",
            timeline_cluster::NodeConfig::default().replace_after,
        ),
        leader_rebalance_every: ms_env(
            "CLUSTER_REBALANCE_MS",
            timeline_cluster::NodeConfig::default().leader_rebalance_every,
        ),
        min_free_space: std::env::var("CLUSTER_MIN_FREE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(timeline_cluster::node::DEFAULT_MIN_FREE_SPACE),
        ..Default::default()
    });
    match timeline_server::start(cfg) {
        Ok(s) => {
            eprintln!("listening {}", s.local_addr());
            let _ = s.wait();
        }
        Err(e) => {
            eprintln!("cluster-node {id}: {e}");
            std::process::exit(3);
        }
    }
}

/// A duration in ms from the environment (0: `None`), else `default`.
fn ms_env(name: &str, default: Option<Duration>) -> Option<Duration> {
    match std::env::var(name) {
        Ok(ms) => match ms.parse::<u64>() {
            Ok(0) => None,
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(_) => {
                eprintln!("cluster-node: {name} is a number");
                std::process::exit(2);
            }
        },
        Err(_) => default,
    }
}

fn tracing_subscriber_init() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,openraft=error".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .try_init();
}
