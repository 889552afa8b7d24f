//! Every `STATS` key a single node reports is in docs/protocol.md's table,
//! and every key the table lists for a single node is reported (a cluster
//! node is checked by `cluster_failover`'s leader kill test).
#![allow(clippy::unwrap_used)]

use timeline_client::protocol::{Request, Response};

#[test]
fn a_single_nodes_stats_keys_are_the_documented_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = timeline_server::ServerConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    cfg.engine.shards = 1;
    let server = timeline_server::start(cfg).unwrap();
    let mut c = timeline_client::Client::connect(server.local_addr(), b"").unwrap();
    let Response::Stats(kv) = c.call(&Request::Stats).unwrap() else {
        panic!("STATS answered with something else");
    };
    let keys: Vec<String> = kv.into_iter().map(|(k, _)| k).collect();
    timeline_tests::check_stats_documented(&keys, false);
}
