//! Keyspaces are configuration: the engine opens any number of named
//! keyspaces, each with its own retention and layout, refuses a directory
//! holding a keyspace the configuration does not list, and refuses
//! configurations it cannot honour.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use timeline_engine::io::MemIo;
use timeline_engine::{
    Config, Direction, Engine, Error, Keyspace, KeyspaceConfig, ManualClock, TimelineId,
};

const LOG: Keyspace = Keyspace(7);

fn root() -> PathBuf {
    PathBuf::from("/ks")
}

fn cfg(mem: &MemIo, clock: &Arc<ManualClock>) -> Config {
    let mut c = Config::default();
    c.background = false;
    c.shards = 2;
    c.io = Some(Arc::new(mem.clone()));
    c.clock = clock.clone();
    for k in &mut c.keyspaces {
        k.segment_bytes = 64 << 10;
    }
    let mut log = KeyspaceConfig::expiring(LOG, "raftlog", Duration::from_secs(60));
    log.segment_bytes = 64 << 10;
    c.keyspaces.push(log);
    c.max_payload = 1024;
    c
}

#[test]
fn a_third_keyspace_has_its_own_directory_retention_and_stats() {
    let mem = MemIo::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let e = Engine::open(root(), cfg(&mem, &clock)).unwrap();
    let names: Vec<_> = e.keyspaces().map(|(k, n)| (k.0, n.to_string())).collect();
    assert_eq!(
        names,
        [
            (0, "store".into()),
            (1, "sync".into()),
            (7, "raftlog".into())
        ]
    );
    // Same id in three keyspaces: three independent timelines.
    for (ks, n) in [(Keyspace::STORE, 3), (Keyspace::SYNC, 2), (LOG, 5)] {
        for i in 0..n {
            let p = format!("{}-{i}", ks.0);
            assert_eq!(
                e.append(TimelineId::new(ks, 9), p.as_bytes()).unwrap(),
                i + 1
            );
        }
    }
    assert_eq!(e.last_seq(TimelineId::new(LOG, 9)), 5);
    assert_eq!(e.last_seq(TimelineId::store(9)), 3);
    let st = e.stats();
    assert_eq!(st.keyspace(LOG).records, 5);
    assert_eq!(st.keyspace(LOG).name, "raftlog");
    assert_eq!(st.total().records, 10);
    assert!(
        mem.file_names(&root().join("raftlog").join("000")).len()
            + mem.file_names(&root().join("raftlog").join("001")).len()
            >= 2
    );
    // Its TTL drops its segments only; the store keeps everything.
    e.seal_active().unwrap();
    clock.advance_ms(3_600_000);
    e.maintain().unwrap();
    assert!(matches!(
        e.scan(TimelineId::new(LOG, 9), 1, 10, Direction::Forward),
        Err(Error::Truncated { .. })
    ));
    assert_eq!(
        e.scan(TimelineId::store(9), 1, 10, Direction::Forward)
            .unwrap()
            .len(),
        3
    );
    e.close().unwrap();
    // Reopened with the same configuration: everything is back.
    let e = Engine::open(root(), cfg(&mem, &clock)).unwrap();
    assert_eq!(e.last_seq(TimelineId::new(LOG, 9)), 5);
    let got = e
        .scan(TimelineId::store(9), 1, 10, Direction::Forward)
        .unwrap();
    assert_eq!(got[2].payload, b"0-2");
}

#[test]
fn a_keyspace_not_configured_is_refused_not_ignored() {
    let mem = MemIo::new();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let e = Engine::open(root(), cfg(&mem, &clock)).unwrap();
    e.append(TimelineId::new(LOG, 1), b"x").unwrap();
    // A timeline of a keyspace that is not configured: a clear error.
    assert!(matches!(
        e.append(TimelineId::new(Keyspace(9), 1), b"x"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        e.scan(TimelineId::new(Keyspace(9), 1), 1, 10, Direction::Forward),
        Err(Error::InvalidArgument(_))
    ));
    assert_eq!(e.last_seq(TimelineId::new(Keyspace(9), 1)), 0);
    e.close().unwrap();
    // Reopen without `raftlog`: its data is on disk, so opening refuses.
    let mut c = cfg(&mem, &clock);
    c.keyspaces.retain(|k| k.id != LOG);
    match Engine::open(root(), c) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("raftlog"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn configurations_the_engine_cannot_honour_are_refused() {
    let mem = MemIo::new();
    let clock = Arc::new(ManualClock::new(1));
    type Breaks = Box<dyn Fn(&mut Config)>;
    let cases: Vec<(&str, Breaks)> = vec![
        ("no keyspace", Box::new(|c| c.keyspaces.clear())),
        ("same id", Box::new(|c| c.keyspaces[2].id = Keyspace::SYNC)),
        (
            "same name",
            Box::new(|c| c.keyspaces[2].name = "store".into()),
        ),
        (
            "bad name",
            Box::new(|c| c.keyspaces[2].name = "../x".into()),
        ),
        ("empty name", Box::new(|c| c.keyspaces[2].name.clear())),
        (
            "tiny segments",
            Box::new(|c| c.keyspaces[2].segment_bytes = 4096),
        ),
    ];
    for (what, f) in cases {
        let mut c = cfg(&mem, &clock);
        f(&mut c);
        assert!(
            matches!(Engine::open(root(), c), Err(Error::InvalidArgument(_))),
            "{what}: accepted"
        );
    }
}
