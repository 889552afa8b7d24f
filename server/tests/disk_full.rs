//! A real full disk (issue 10, item 2): the server runs on a 24 MiB tmpfs
//! (this test mounts one; it needs root, which CI has, and says so if it
//! cannot), and in each of 20 rounds a ballast file fills the file system,
//! `SEND`s and `APPEND`s go on against it, the ballast is removed, and the
//! failed sends are retried with their ids. Every failure must carry
//! `STORAGE_FULL` or a retriable code (`FANOUT_FAILED`: stored, delivery
//! pending; `IO_ERROR`), every retry must end in an acknowledgement (the
//! same seq for a stored one), and in the end, and again after a restart,
//! every stored message is in each member's `SYNC` exactly once.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use timeline_server::protocol::{
    Body, ConvKind, Durability, ErrorCode, HistoryFrom, Request, Response, TimelineId,
};
use timeline_server::{start, Client, ClientError, ServerHandle};

const ROUNDS: u64 = 20;
const PER_ROUND: u64 = 40;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fill the file system with a ballast file; returns its path.
fn fill(root: &Path, round: u64) -> PathBuf {
    let p = root.join(format!("ballast-{round}"));
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0xAAu8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    // Whatever is left below a chunk.
    while f.write_all(&chunk[..512]).is_ok() {}
    p
}

fn convs() -> Vec<(u64, ConvKind, Vec<u64>)> {
    let mut v: Vec<_> = (1..=4)
        .map(|i| (i, ConvKind::Direct, vec![2 * i - 1, 2 * i]))
        .collect();
    v.push((5, ConvKind::Group, vec![1, 3, 5, 7, 9]));
    v
}

type Key = (u64, u64, u64);

fn body(k: Key) -> Vec<u8> {
    let mut v = format!("{}:{}:{}:", k.0, k.1, k.2).into_bytes();
    v.resize(300, b'.');
    v
}

fn server_on(data: &Path) -> ServerHandle {
    let mut cfg = config(data);
    cfg.default_durability = timeline_engine::Durability::GroupCommit;
    cfg.im.durability = timeline_engine::Durability::GroupCommit;
    start(cfg).unwrap()
}

/// Retry a send until it is acknowledged (bounded: the disk has room now).
fn retry(c: &mut Client, k: Key) -> u64 {
    for _ in 0..100 {
        let b = body(k);
        match c.call(&Request::Send {
            conv: k.0,
            sender: k.1,
            client_msg_id: k.2,
            payload: &b,
        }) {
            Ok(Response::Send(a)) => return a.seq,
            Err(ClientError::Server { code, .. })
                if [
                    ErrorCode::FANOUT_FAILED,
                    ErrorCode::STORAGE_FULL,
                    ErrorCode::IO_ERROR,
                ]
                .contains(&code) =>
            {
                std::thread::sleep(Duration::from_millis(100)); // the server's own retry runs meanwhile
            }
            r => panic!("retry of {k:?}: {r:?}"),
        }
    }
    panic!("{k:?} never acknowledged after the disk was freed");
}

/// Every stored message (from the histories) is in each member's sync
/// exactly once; returns how many deliveries were checked.
fn check(c: &mut Client, what: &str) -> usize {
    let mut want: BTreeMap<u64, BTreeSet<(u64, u64)>> = BTreeMap::new();
    for (conv, _, members) in convs() {
        let mut after = 0;
        loop {
            let r = Request::History {
                conv,
                user: members[0],
                from: HistoryFrom::After(after),
                limit: 500,
            };
            let Response::History(p) = c.call(&r).unwrap() else {
                panic!("history")
            };
            for e in &p.entries {
                after = e.conv_seq;
                if matches!(e.body, Body::Message(_)) {
                    for &m in &members {
                        want.entry(m).or_default().insert((conv, e.conv_seq));
                    }
                }
            }
            if !p.has_more {
                break;
            }
        }
    }
    let mut n = 0;
    for (user, want) in want {
        let (mut got, mut cp) = (BTreeSet::new(), 0);
        loop {
            let r = Request::Sync {
                user,
                checkpoint: cp,
                limit: 500,
                groups: vec![],
            };
            let Response::Sync(p) = c.call(&r).unwrap() else {
                panic!("sync")
            };
            for e in &p.entries {
                if matches!(e.entry.body, Body::Message(_)) {
                    let k = (e.entry.conv, e.entry.conv_seq);
                    assert!(got.insert(k), "{what}: user {user} got {k:?} twice");
                }
            }
            cp = p.checkpoint;
            if !p.has_more {
                break;
            }
        }
        assert_eq!(got, want, "{what}: user {user}: sync and history differ");
        n += got.len();
    }
    n
}

#[test]
fn sends_on_a_real_full_disk_always_reach_every_member() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(tmp.path(), "24m") else {
        eprintln!("disk_full: SKIPPED: cannot mount a tmpfs (needs root; CI runs as root)");
        return;
    };
    let data = fs.0.join("data");
    std::fs::create_dir(&data).unwrap();
    let mut srv = server_on(&data);
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    for (conv, kind, members) in convs() {
        c.call(&Request::CreateConversation {
            conv,
            kind,
            members,
        })
        .unwrap();
    }
    let (mut refused, mut pending, mut acked) = (0, 0, BTreeMap::<Key, u64>::new());
    for round in 0..ROUNDS {
        let ballast = fill(&fs.0, round);
        let mut failed = Vec::new();
        for i in 0..PER_ROUND {
            let (conv, _, members) = &convs()[(i % 5) as usize];
            let k = (
                *conv,
                members[(i as usize) % members.len()],
                round * 1000 + i,
            );
            let b = body(k);
            match c.call(&Request::Send {
                conv: k.0,
                sender: k.1,
                client_msg_id: k.2,
                payload: &b,
            }) {
                Ok(Response::Send(a)) => {
                    acked.insert(k, a.seq);
                }
                Err(ClientError::Server { code, arg, message }) => {
                    assert_arg_as_documented(code, arg, &message);
                    match code {
                        ErrorCode::STORAGE_FULL | ErrorCode::IO_ERROR => refused += 1,
                        ErrorCode::FANOUT_FAILED => pending += 1,
                        c => panic!("round {round}: a full disk answered {c}: {message}"),
                    }
                    failed.push((k, (code == ErrorCode::FANOUT_FAILED).then_some(arg)));
                }
                r => panic!("{r:?}"),
            }
        }
        // A raw append on the full disk: stored or STORAGE_FULL.
        let r = c.call(&Request::Append {
            timeline: TimelineId::store(1 << 40),
            durability: Some(Durability::GroupCommit),
            payload: b"raw",
        });
        if let Err(e) = &r {
            assert_eq!(
                e.code(),
                Some(ErrorCode::STORAGE_FULL),
                "round {round}: {e}"
            );
        }
        std::fs::remove_file(ballast).unwrap();
        for (k, stored_at) in failed {
            let s = retry(&mut c, k);
            if let Some(at) = stored_at {
                assert_eq!(
                    s, at,
                    "round {round}: {k:?} was stored at {at}, its retry answered {s}"
                );
            }
            acked.insert(k, s);
        }
    }
    assert!(
        refused + pending > 0,
        "the disk never filled: the test tested nothing"
    );
    let n = check(&mut c, "after the rounds");
    drop(c);
    srv.shutdown().unwrap();
    srv = server_on(&data);
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    assert_eq!(check(&mut c, "after a restart"), n);
    for (k, s) in &acked {
        let b = body(*k);
        let Response::Send(a) = c
            .call(&Request::Send {
                conv: k.0,
                sender: k.1,
                client_msg_id: k.2,
                payload: &b,
            })
            .unwrap()
        else {
            panic!("send")
        };
        assert!(
            a.duplicate && a.seq == *s,
            "{k:?}: {a:?}, acknowledged at {s}"
        );
    }
    eprintln!(
        "disk_full: {ROUNDS} fill-and-free rounds, {} sends acknowledged, {refused} refused (not stored), {pending} stored with delivery pending, {n} deliveries checked",
        acked.len()
    );
    drop(c);
    srv.shutdown().unwrap();
}
