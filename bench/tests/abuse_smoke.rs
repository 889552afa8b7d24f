//! The short CI version of `timeline-bench abuse` (the recorded runs and
//! their commands: docs/reliability.md): 1 s phases, 500 silent sockets,
//! abusers at nice 19. It checks the soak runs end to end and reports what
//! it promises (no good client failed: exit status 2 otherwise; the abuse
//! really was sent; the figures are present), not the throughput targets,
//! which need the full run. Needs `timeline-server` next to
//! `timeline-bench`.
#![allow(clippy::unwrap_used)]

mod common;

#[test]
fn good_clients_get_no_error_under_a_short_abuse() {
    let (v, json, stderr) = common::run_bench(&[
        "abuse",
        "--secs",
        "1",
        "--silent",
        "500",
        "--abuser-nice",
        "19",
        "--json",
    ]);
    assert!(!stderr.contains("could not renice"), "{stderr}");
    assert_eq!(v["abuser_nice"], 19, "{json}");
    for phase in v["syncs_per_sec"].as_array().unwrap() {
        assert!(phase.as_f64().unwrap() > 0.0, "{json}");
    }
    assert!(
        v["abuse_connects_per_sec"].as_f64().unwrap() > 0.0,
        "{json}"
    );
    assert!(
        v["abuse_garbage_mib_per_sec"].as_f64().unwrap() > 0.0,
        "{json}"
    );
    assert!(v["rss_after"].as_u64().unwrap() > 0, "{json}");
}
