//! The short CI version of `timeline-bench abuse` (the recorded runs and
//! their commands: docs/reliability.md): 1 s phases, 500 silent sockets,
//! abusers at nice 19. It checks the soak runs end to end and reports what
//! it promises (no good client failed, the abuse really was sent, the
//! figures are present), not the throughput targets, which need the full
//! run. Needs `timeline-server` next to `timeline-bench`.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn good_clients_get_no_error_under_a_short_abuse() {
    let server = std::path::Path::new(env!("CARGO_BIN_EXE_timeline-bench"))
        .with_file_name("timeline-server");
    assert!(
        server.is_file(),
        "{} is missing: build it (cargo build --release -p timeline-server)",
        server.display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_timeline-bench"))
        .args([
            "abuse",
            "--secs",
            "1",
            "--silent",
            "500",
            "--abuser-nice",
            "19",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Exit status 2 means a good client got an error.
    assert!(
        out.status.success(),
        "abuse failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("could not renice"), "{stderr}");
    let json = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
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
