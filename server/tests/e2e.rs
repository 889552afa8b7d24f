//! End-to-end tests over real TCP on random loopback ports: every command,
//! pipelining, push to two devices, bad frames spoken as raw bytes, a client
//! killed mid-request, 200 concurrent clients, auth denials, limits, and a
//! graceful SIGTERM shutdown of the real binary.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use timeline_server::protocol::token::{self, Claims, Role};
use timeline_server::protocol::{self, ErrorCode, Hello, Opcode, Request, Response, ServerMsg};
use timeline_server::protocol::{
    Body, ConvKind, Direction, Durability, HistoryFrom, Push, TimelineId,
};
use timeline_server::{start, Client};

mod common;
use common::*;

#[test]
fn every_command() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    assert_eq!(c.hello().identity, protocol::Identity::Anonymous);
    assert_eq!(
        c.call(&Request::Ping(b"x")).unwrap(),
        Response::Ping(b"x".to_vec())
    );
    let t = TimelineId::store(42);
    for (i, d) in [
        None,
        Some(Durability::Buffered),
        Some(Durability::GroupCommit),
        Some(Durability::Sync),
    ]
    .into_iter()
    .enumerate()
    {
        let r = c
            .call(&Request::Append {
                timeline: t,
                durability: d,
                payload: b"p",
            })
            .unwrap();
        assert_eq!(r, Response::Append(i as u64 + 1));
    }
    let items = vec![(t, &b"a"[..]), (TimelineId::store(5), &b"b"[..])];
    assert_eq!(
        c.call(&Request::AppendBatch {
            durability: None,
            items
        })
        .unwrap(),
        Response::AppendBatch(vec![5, 1])
    );
    match c
        .call(&Request::Get {
            timeline: t,
            seq: 5,
        })
        .unwrap()
    {
        Response::Get(Some(r)) => assert_eq!((r.seq, r.payload), (5, b"a".to_vec())),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        c.call(&Request::Get {
            timeline: t,
            seq: 99
        })
        .unwrap(),
        Response::Get(None)
    );
    match c
        .call(&Request::Scan {
            timeline: t,
            from: u64::MAX,
            limit: 2,
            direction: Direction::Backward,
        })
        .unwrap()
    {
        Response::Scan(v) => assert_eq!(v.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![5, 4]),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        c.call(&Request::LastSeq { timeline: t }).unwrap(),
        Response::LastSeq(5)
    );
    // IM commands.
    let ok = |r: Response| r;
    ok(c.call(&Request::CreateConversation {
        conv: 1,
        kind: ConvKind::Group,
        members: vec![7, 8],
    })
    .unwrap());
    assert_eq!(
        c.call(&Request::AddMember { conv: 1, user: 9 }).unwrap(),
        Response::AddMember(2)
    );
    assert_eq!(
        c.call(&Request::Members { conv: 1 }).unwrap(),
        Response::Members(vec![7, 8, 9])
    );
    assert_eq!(
        c.call(&Request::RemoveMember { conv: 1, user: 9 }).unwrap(),
        Response::RemoveMember(3)
    );
    let send = Request::Send {
        conv: 1,
        sender: 7,
        client_msg_id: 11,
        payload: b"hello",
    };
    let a = match c.call(&send).unwrap() {
        Response::Send(a) => a,
        r => panic!("{r:?}"),
    };
    assert_eq!((a.seq, a.duplicate), (4, false));
    match c.call(&send).unwrap() {
        Response::Send(b) => assert_eq!((b.seq, b.duplicate), (4, true)),
        r => panic!("{r:?}"),
    }
    match c
        .call(&Request::Sync {
            user: 8,
            checkpoint: 0,
            limit: 100,
            groups: vec![],
        })
        .unwrap()
    {
        Response::Sync(s) => {
            let last = s.entries.last().unwrap();
            assert_eq!(
                (last.entry.conv_seq, &last.entry.body),
                (4, &Body::Message(b"hello".to_vec()))
            );
            assert!(!s.has_more);
        }
        r => panic!("{r:?}"),
    }
    match c
        .call(&Request::History {
            conv: 1,
            user: 8,
            from: HistoryFrom::Before(u64::MAX),
            limit: 2,
        })
        .unwrap()
    {
        Response::History(h) => assert_eq!(
            h.entries.iter().map(|e| e.conv_seq).collect::<Vec<_>>(),
            vec![4, 3]
        ),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        c.call(&Request::MarkRead {
            user: 8,
            conv: 1,
            seq: 4
        })
        .unwrap(),
        Response::MarkRead(4)
    );
    match c.call(&Request::Conversations { user: 8 }).unwrap() {
        Response::Conversations(v) => assert_eq!((v[0].last_seq, v[0].unread), (4, 0)),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        c.call(&Request::Recall {
            conv: 1,
            user: 7,
            target: 4
        })
        .unwrap(),
        Response::Recall(5)
    );
    // DELETE_FOR_USER answers the seq of the user's DeletedMarker sync
    // entry, as protocol.md says (it used to echo the conversation seq).
    let Response::DeleteForUser(marker) = c
        .call(&Request::DeleteForUser {
            user: 8,
            conv: 1,
            seq: 2,
        })
        .unwrap()
    else {
        panic!("not a DeleteForUser reply")
    };
    match c
        .call(&Request::Sync {
            user: 8,
            checkpoint: 0,
            limit: 100,
            groups: Vec::new(),
        })
        .unwrap()
    {
        Response::Sync(r) => {
            let last = r.entries.last().expect("sync entries");
            assert_eq!(last.seq, marker, "the reply is the marker's sync seq");
            assert_eq!((last.entry.conv, last.entry.conv_seq), (1, 2));
            assert_eq!(last.entry.body, Body::DeletedMarker);
        }
        r => panic!("{r:?}"),
    }
    match c.call(&Request::Stats).unwrap() {
        Response::Stats(kv) => assert!(kv.iter().any(|(k, v)| k == "im_messages" && *v == 1)),
        r => panic!("{r:?}"),
    }
    // Errors carry their codes; the connection goes on.
    assert_eq!(
        code(c.call(&Request::Members { conv: 99 })),
        ErrorCode::NO_SUCH_CONVERSATION
    );
    assert_eq!(
        code(c.call(&Request::Send {
            conv: 1,
            sender: 9,
            client_msg_id: 1,
            payload: b"x"
        })),
        ErrorCode::NOT_MEMBER
    );
    assert_eq!(
        code(c.call(&Request::Append {
            timeline: t,
            durability: None,
            payload: &vec![0u8; 100 << 10]
        })),
        ErrorCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        code(c.call(&Request::Hello(Hello {
            version: 1,
            max_frame: 0,
            token: &[]
        }))),
        ErrorCode::INVALID_ARGUMENT
    );
    let sub = c.queue(&Request::Subscribe { user: 8 });
    assert_eq!(c.recv().unwrap(), Response::Subscribe);
    assert_eq!(
        c.call(&Request::Unsubscribe { subscription: sub }).unwrap(),
        Response::Unsubscribe
    );
    // Ids of the reserved top half (>= 2^63) are refused everywhere, not
    // only by CREATE_CONVERSATION (they used to be accepted by these).
    let reserved = 1u64 << 63;
    for r in [
        Request::Sync {
            user: reserved,
            checkpoint: 0,
            limit: 10,
            groups: Vec::new(),
        },
        Request::Conversations { user: reserved },
        Request::Subscribe { user: reserved },
    ] {
        assert_eq!(code(c.call(&r)), ErrorCode::INVALID_ARGUMENT, "{r:?}");
    }
    srv.shutdown().unwrap();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    let t = TimelineId::store(1);
    let mut ids = Vec::new();
    for i in 0..2000u64 {
        let p = i.to_le_bytes();
        ids.push(c.queue(&Request::Append {
            timeline: t,
            durability: Some(Durability::GroupCommit),
            payload: &p,
        }));
        if i % 10 == 9 {
            // A GET pipelined behind the APPEND sees it.
            ids.push(c.queue(&Request::Get {
                timeline: t,
                seq: i + 1,
            }));
        }
    }
    c.flush().unwrap();
    let mut seq = 0;
    for _ in ids {
        match c.recv().unwrap() {
            Response::Append(s) => {
                seq += 1;
                assert_eq!(s, seq);
            }
            Response::Get(Some(r)) => assert_eq!(r.seq, seq),
            r => panic!("{r:?}"),
        }
    }
    srv.shutdown().unwrap();
}

#[test]
fn push_reaches_both_devices_of_a_user() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let mut admin = Client::connect(addr, &[]).unwrap();
    admin
        .call(&Request::CreateConversation {
            conv: 3,
            kind: ConvKind::Direct,
            members: vec![1, 2],
        })
        .unwrap();
    let mut devices: Vec<Client> = (0..2)
        .map(|_| Client::connect(addr, &[]).unwrap())
        .collect();
    let subs: Vec<u64> = devices
        .iter_mut()
        .map(|d| {
            let id = d.queue(&Request::Subscribe { user: 2 });
            assert_eq!(d.recv().unwrap(), Response::Subscribe);
            id
        })
        .collect();
    admin
        .call(&Request::Send {
            conv: 3,
            sender: 1,
            client_msg_id: 1,
            payload: b"ping!",
        })
        .unwrap();
    for (d, sub) in devices.iter_mut().zip(subs) {
        let (id, p) = d
            .next_push(Duration::from_secs(5))
            .unwrap()
            .expect("no push");
        assert_eq!(id, sub);
        match p {
            Push::Entry { user, entry } => {
                assert_eq!(user, 2);
                assert_eq!(entry.entry.body, Body::Message(b"ping!".to_vec()));
            }
            p => panic!("{p:?}"),
        }
    }
    srv.shutdown().unwrap();
}

#[test]
fn bad_frames_get_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    // A command before HELLO: HANDSHAKE_REQUIRED, then close.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&frame(1, Request::Ping(b"x"))).unwrap();
    match read_frame(&mut s) {
        Some(ServerMsg::Error { id: 1, error, .. }) => {
            assert_eq!(error.code, ErrorCode::HANDSHAKE_REQUIRED)
        }
        m => panic!("{m:?}"),
    }
    assert!(closed(&mut s));
    // An unknown opcode before HELLO is HANDSHAKE_REQUIRED too (it used to
    // be UNKNOWN_COMMAND), then close.
    let mut s = TcpStream::connect(addr).unwrap();
    let mut unknown = vec![];
    unknown.extend_from_slice(&3u32.to_le_bytes());
    unknown.extend_from_slice(&0x7777u16.to_le_bytes());
    unknown.extend_from_slice(&0u16.to_le_bytes());
    unknown.extend_from_slice(&9u64.to_le_bytes());
    unknown.extend_from_slice(b"abc");
    s.write_all(&unknown).unwrap();
    match read_frame(&mut s) {
        Some(ServerMsg::Error { id: 9, error, .. }) => {
            assert_eq!(error.code, ErrorCode::HANDSHAKE_REQUIRED)
        }
        m => panic!("{m:?}"),
    }
    assert!(closed(&mut s));
    // Not our protocol at all (bad magic): an error, then close.
    let mut s = TcpStream::connect(addr).unwrap();
    let mut h = hello_bytes(1, &[]);
    h[16] = b'X';
    s.write_all(&h).unwrap();
    match read_frame(&mut s) {
        Some(ServerMsg::Error { error, .. }) => assert_eq!(error.code, ErrorCode::MALFORMED_FRAME),
        m => panic!("{m:?}"),
    }
    assert!(closed(&mut s));
    // After HELLO: unknown opcode and malformed body are answered, and the
    // connection goes on.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello_bytes(1, &[])).unwrap();
    assert!(matches!(
        read_frame(&mut s),
        Some(ServerMsg::Reply { id: 1, .. })
    ));
    let mut unknown = vec![];
    unknown.extend_from_slice(&3u32.to_le_bytes());
    unknown.extend_from_slice(&0x7777u16.to_le_bytes());
    unknown.extend_from_slice(&0u16.to_le_bytes());
    unknown.extend_from_slice(&2u64.to_le_bytes());
    unknown.extend_from_slice(b"abc");
    s.write_all(&unknown).unwrap();
    match read_frame(&mut s) {
        Some(ServerMsg::Error { id: 2, error, .. }) => {
            assert_eq!(error.code, ErrorCode::UNKNOWN_COMMAND)
        }
        m => panic!("{m:?}"),
    }
    let mut bad = frame(
        3,
        Request::Append {
            timeline: TimelineId::store(1),
            durability: None,
            payload: b"abcdef",
        },
    );
    let len = u32::from_le_bytes(bad[0..4].try_into().unwrap()) - 3;
    bad.truncate(bad.len() - 3);
    bad[0..4].copy_from_slice(&len.to_le_bytes());
    s.write_all(&bad).unwrap();
    match read_frame(&mut s) {
        Some(ServerMsg::Error { id: 3, error, .. }) => {
            assert_eq!(error.code, ErrorCode::MALFORMED_FRAME)
        }
        m => panic!("{m:?}"),
    }
    s.write_all(&frame(4, Request::Ping(b"still here")))
        .unwrap();
    assert!(matches!(
        read_frame(&mut s),
        Some(ServerMsg::Reply { id: 4, .. })
    ));
    // Oversized: FRAME_TOO_LARGE, then close (the stream position is lost).
    let mut big = vec![];
    big.extend_from_slice(&(2u32 << 20).to_le_bytes());
    big.extend_from_slice(&Opcode::APPEND.0.to_le_bytes());
    big.extend_from_slice(&0u16.to_le_bytes());
    big.extend_from_slice(&5u64.to_le_bytes());
    s.write_all(&big).unwrap();
    match read_frame(&mut s) {
        Some(ServerMsg::Error { id: 5, error, .. }) => {
            assert_eq!(error.code, ErrorCode::FRAME_TOO_LARGE)
        }
        m => panic!("{m:?}"),
    }
    assert!(closed(&mut s));
    // A truncated frame and a hang-up: nothing breaks.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello_bytes(1, &[])).unwrap();
    let p = frame(2, Request::Ping(b"half"));
    s.write_all(&p[..p.len() / 2]).unwrap();
    drop(s);
    let mut c = Client::connect(addr, &[]).unwrap();
    assert_eq!(
        c.call(&Request::Ping(b"ok")).unwrap(),
        Response::Ping(b"ok".to_vec())
    );
    srv.shutdown().unwrap();
}

#[test]
fn a_client_killed_mid_request_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let t = TimelineId::store(9);
    let mut c = Client::connect(addr, &[]).unwrap();
    for i in 0..300u64 {
        c.queue(&Request::Append {
            timeline: t,
            durability: Some(Durability::GroupCommit),
            payload: &i.to_le_bytes(),
        });
    }
    c.flush().unwrap();
    let mut acked = 0;
    for _ in 0..150 {
        assert!(matches!(c.recv().unwrap(), Response::Append(_)));
        acked += 1;
    }
    // More requests and half a frame, then the connection dies abruptly.
    let mut s = c.stream().try_clone().unwrap();
    let p = frame(
        10_000,
        Request::Append {
            timeline: t,
            durability: None,
            payload: b"torn",
        },
    );
    s.write_all(&p[..p.len() - 2]).unwrap();
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Client::connect(addr, &[]).unwrap();
    let last = match c.call(&Request::LastSeq { timeline: t }).unwrap() {
        Response::LastSeq(l) => l,
        r => panic!("{r:?}"),
    };
    assert!(last >= acked, "last {last} < acknowledged {acked}");
    for seq in 1..=acked {
        match c.call(&Request::Get { timeline: t, seq }).unwrap() {
            Response::Get(Some(r)) => assert_eq!(r.payload, (seq - 1).to_le_bytes()),
            r => panic!("{r:?}"),
        }
    }
    srv.shutdown().unwrap();
}

#[test]
fn two_hundred_concurrent_clients() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let hs: Vec<_> = (0..200u64)
        .map(|k| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, &[]).unwrap();
                let t = TimelineId::store(1000 + k);
                for i in 0..20u64 {
                    let r = c
                        .call(&Request::Append {
                            timeline: t,
                            durability: None,
                            payload: &i.to_le_bytes(),
                        })
                        .unwrap();
                    assert_eq!(r, Response::Append(i + 1));
                }
                c.call(&Request::LastSeq { timeline: t }).unwrap()
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), Response::LastSeq(20));
    }
    srv.shutdown().unwrap();
}

#[test]
fn auth_denials() {
    let dir = tempfile::tempdir().unwrap();
    let secret = b"0123456789abcdef-secret".to_vec();
    let mut cfg = config(dir.path());
    cfg.auth_secret = Some(secret.clone());
    let srv = start(cfg).unwrap();
    let addr = srv.local_addr();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let tok = |user, role, exp| {
        token::sign(
            &secret,
            &Claims {
                user,
                expires_unix: exp,
                role,
            },
        )
    };
    let mut admin = Client::connect(addr, &tok(1, Role::Admin, now + 60)).unwrap();
    admin
        .call(&Request::CreateConversation {
            conv: 5,
            kind: ConvKind::Direct,
            members: vec![7, 8],
        })
        .unwrap();
    admin
        .call(&Request::CreateConversation {
            conv: 6,
            kind: ConvKind::Direct,
            members: vec![8, 9],
        })
        .unwrap();
    admin
        .call(&Request::Append {
            timeline: TimelineId::store(77),
            durability: None,
            payload: b"x",
        })
        .unwrap();
    let mut u7 = Client::connect(addr, &tok(7, Role::User, now + 60)).unwrap();
    assert_eq!(u7.hello().identity, protocol::Identity::User(7));
    // Its own sync and conversations: fine.
    assert!(matches!(
        u7.call(&Request::Sync {
            user: 7,
            checkpoint: 0,
            limit: 10,
            groups: vec![]
        })
        .unwrap(),
        Response::Sync(_)
    ));
    assert!(matches!(
        u7.call(&Request::Send {
            conv: 5,
            sender: 7,
            client_msg_id: 1,
            payload: b"hi"
        })
        .unwrap(),
        Response::Send(_)
    ));
    // Someone else's sync, sending as someone else, raw timelines, admin commands.
    assert_eq!(
        code(u7.call(&Request::Sync {
            user: 8,
            checkpoint: 0,
            limit: 10,
            groups: vec![]
        })),
        ErrorCode::FORBIDDEN
    );
    assert_eq!(
        code(u7.call(&Request::Subscribe { user: 8 })),
        ErrorCode::FORBIDDEN
    );
    assert_eq!(
        code(u7.call(&Request::Send {
            conv: 5,
            sender: 8,
            client_msg_id: 1,
            payload: b"x"
        })),
        ErrorCode::FORBIDDEN
    );
    assert_eq!(
        code(u7.call(&Request::Get {
            timeline: TimelineId::store(77),
            seq: 1
        })),
        ErrorCode::FORBIDDEN
    );
    assert_eq!(
        code(u7.call(&Request::AddMember { conv: 5, user: 9 })),
        ErrorCode::FORBIDDEN
    );
    assert_eq!(code(u7.call(&Request::Stats)), ErrorCode::FORBIDDEN);
    // A conversation it is not in: history is refused by the IM layer.
    assert_eq!(
        code(u7.call(&Request::History {
            conv: 6,
            user: 7,
            from: HistoryFrom::After(0),
            limit: 10
        })),
        ErrorCode::NOT_MEMBER
    );
    assert_eq!(
        code(u7.call(&Request::Members { conv: 6 })),
        ErrorCode::FORBIDDEN
    );
    // No token, a forged one, an expired one: UNAUTHORIZED at HELLO.
    assert_eq!(
        Client::connect(addr, &[]).err().and_then(|e| e.code()),
        Some(ErrorCode::UNAUTHORIZED)
    );
    let mut forged = tok(1, Role::Admin, now + 60);
    forged[0] ^= 1;
    assert_eq!(
        Client::connect(addr, &forged).err().and_then(|e| e.code()),
        Some(ErrorCode::UNAUTHORIZED)
    );
    assert_eq!(
        Client::connect(addr, &tok(7, Role::User, now - 1))
            .err()
            .and_then(|e| e.code()),
        Some(ErrorCode::UNAUTHORIZED)
    );
    srv.shutdown().unwrap();
}

#[test]
fn connection_limit_and_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_connections = 2;
    cfg.idle_timeout = Duration::from_millis(400);
    let srv = start(cfg).unwrap();
    let addr = srv.local_addr();
    let _a = Client::connect(addr, &[]).unwrap();
    let _b = Client::connect(addr, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut s = TcpStream::connect(addr).unwrap();
    match read_frame(&mut s) {
        Some(ServerMsg::Error { id: 0, error, .. }) => {
            assert_eq!(error.code, ErrorCode::TOO_MANY_CONNECTIONS);
            assert_arg_as_documented(error.code, error.arg, &error.message);
        }
        m => panic!("{m:?}"),
    }
    drop((_a, _b));
    std::thread::sleep(Duration::from_millis(300));
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(&hello_bytes(1, &[])).unwrap();
    assert!(matches!(
        read_frame(&mut idle),
        Some(ServerMsg::Reply { .. })
    ));
    match read_frame(&mut idle) {
        Some(ServerMsg::Error { id: 0, error, .. }) => assert_eq!(error.code, ErrorCode::TIMEOUT),
        m => panic!("{m:?}"),
    }
    assert!(closed(&mut idle));
    srv.shutdown().unwrap();
}

#[test]
fn sigterm_shuts_down_gracefully_and_acknowledged_appends_survive() {
    let dir = tempfile::tempdir().unwrap();
    let spawn = || spawn_server(dir.path(), &["--shards", "2"]);
    let (mut child, addr) = spawn();
    let mut c = Client::connect(addr.as_str(), &[]).unwrap();
    let t = TimelineId::store(5);
    for i in 0..500u64 {
        c.queue(&Request::Append {
            timeline: t,
            durability: Some(Durability::GroupCommit),
            payload: &i.to_le_bytes(),
        });
    }
    c.flush().unwrap();
    for _ in 0..500 {
        assert!(matches!(c.recv().unwrap(), Response::Append(_)));
    }
    unsafe_free_kill(child.id(), libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let (mut child, addr) = spawn();
    let mut c = Client::connect(addr.as_str(), &[]).unwrap();
    assert_eq!(
        c.call(&Request::LastSeq { timeline: t }).unwrap(),
        Response::LastSeq(500)
    );
    match c
        .call(&Request::Scan {
            timeline: t,
            from: 1,
            limit: 500,
            direction: Direction::Forward,
        })
        .unwrap()
    {
        Response::Scan(v) => {
            for (i, r) in v.iter().enumerate() {
                assert_eq!(r.payload, (i as u64).to_le_bytes());
            }
        }
        r => panic!("{r:?}"),
    }
    unsafe_free_kill(child.id(), libc::SIGTERM);
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Send a signal with the `kill` command (the workspace denies `unsafe`).
/// The server binary on `dir` with `args`, listening on a free port; the
/// child and the address it printed.
fn spawn_server(dir: &std::path::Path, args: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_timeline-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("listening ").unwrap().to_string();
    (child, addr)
}

fn unsafe_free_kill(pid: u32, sig: i32) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn random_bytes_never_take_the_server_down() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..64 {
        let mut s = TcpStream::connect(addr).unwrap();
        if round % 2 == 0 {
            s.write_all(&hello_bytes(1, &[])).unwrap();
        }
        // Valid-looking headers with random opcodes, flags and bodies, or
        // plain noise.
        let mut b = Vec::new();
        for _ in 0..rng.gen_range(1..8) {
            if rng.gen_bool(0.5) {
                let body: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
                b.extend_from_slice(&(body.len() as u32).to_le_bytes());
                b.extend_from_slice(&rng.gen_range(0u16..0x50).to_le_bytes());
                b.extend_from_slice(&rng.gen_range(0u16..8).to_le_bytes());
                b.extend_from_slice(&rng.gen::<u64>().to_le_bytes());
                b.extend_from_slice(&body);
            } else {
                b.extend((0..rng.gen_range(1..40)).map(|_| rng.gen::<u8>()));
            }
        }
        let _ = s.write_all(&b);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read_to_end(&mut sink);
    }
    let mut c = Client::connect(addr, &[]).unwrap();
    assert_eq!(
        c.call(&Request::Ping(b"alive")).unwrap(),
        Response::Ping(b"alive".to_vec())
    );
    srv.shutdown().unwrap();
}

/// Review regression: output was bounded in replies, not bytes, so a client
/// pipelining large PINGs without reading made the server hold up to
/// 4,096 × (frame size) bytes for it. Now the server stops reading such a
/// client after a few MiB.
#[test]
fn a_client_that_does_not_read_is_not_read_either() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.write_all(&hello_bytes(1, &[])).unwrap();
    assert!(matches!(
        read_frame(&mut s),
        Some(ServerMsg::Reply { id: 1, .. })
    ));
    let body = vec![7u8; 60 << 10];
    let ping = frame(2, Request::Ping(&body));
    s.set_nonblocking(true).unwrap();
    let (mut sent, mut stalled_since) = (0usize, None);
    while sent < (256 << 20) {
        match s.write(&ping[sent % ping.len()..]) {
            Ok(n) => {
                sent += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let t = *stalled_since.get_or_insert_with(std::time::Instant::now);
                if t.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        sent < (64 << 20),
        "the server took {} MiB from a client that reads nothing",
        sent >> 20
    );
    drop(s);
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    assert_eq!(
        c.call(&Request::Ping(b"ok")).unwrap(),
        Response::Ping(b"ok".to_vec())
    );
    srv.shutdown().unwrap();
}

#[test]
fn subscriptions_per_connection_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    for _ in 0..16 {
        assert_eq!(
            c.call(&Request::Subscribe { user: 1 }).unwrap(),
            Response::Subscribe
        );
    }
    assert_eq!(
        code(c.call(&Request::Subscribe { user: 1 })),
        ErrorCode::INVALID_ARGUMENT
    );
    srv.shutdown().unwrap();
}

#[test]
fn deferred_errors_count_and_pages_and_unread_mean_what_the_document_says() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = server(dir.path());
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    let errors = |c: &mut Client| match c.call(&Request::Stats).unwrap() {
        Response::Stats(kv) => kv.iter().find(|(k, _)| k == "request_errors").unwrap().1,
        r => panic!("{r:?}"),
    };
    // A SEND answered later with an error is counted like any other.
    let before = errors(&mut c);
    let r = c.call(&Request::Send {
        conv: 99,
        sender: 1,
        client_msg_id: 1,
        payload: b"x",
    });
    assert_eq!(code(r), ErrorCode::NO_SUCH_CONVERSATION);
    assert_eq!(errors(&mut c), before + 1);
    // A group of 1 and 2 with three messages; 3 joins, then one more.
    c.call(&Request::CreateConversation {
        conv: 5,
        kind: ConvKind::Group,
        members: vec![1, 2],
    })
    .unwrap();
    for i in 0..3u64 {
        c.call(&Request::Send {
            conv: 5,
            sender: 1,
            client_msg_id: 10 + i,
            payload: b"m",
        })
        .unwrap();
    }
    assert_eq!(
        c.call(&Request::AddMember { conv: 5, user: 3 }).unwrap(),
        Response::AddMember(5)
    );
    c.call(&Request::Send {
        conv: 5,
        sender: 2,
        client_msg_id: 20,
        payload: b"m",
    })
    .unwrap();
    // Unread for 3: its MemberAdded and the one message after it, not the
    // four seqs from before it joined.
    match c.call(&Request::Conversations { user: 3 }).unwrap() {
        Response::Conversations(v) => {
            assert_eq!((v[0].conv, v[0].last_seq, v[0].unread), (5, 6, 2))
        }
        r => panic!("{r:?}"),
    }
    // Unread for 1: everything but its own three messages (Created, the
    // MemberAdded of 3, and 2's message), after a restart too: the count
    // is read from the store, not kept in memory.
    for restart in [false, true] {
        if restart {
            drop(c);
            srv.shutdown().unwrap();
            srv = server(dir.path());
            c = Client::connect(srv.local_addr(), &[]).unwrap();
        }
        match c.call(&Request::Conversations { user: 1 }).unwrap() {
            Response::Conversations(v) => {
                assert_eq!((v[0].last_seq, v[0].unread), (6, 3), "restart {restart}")
            }
            r => panic!("{r:?}"),
        }
    }
    // limit 0: no entries, and has_more says whether there is something.
    for (from, more) in [
        (HistoryFrom::Before(u64::MAX), true),
        (HistoryFrom::After(6), false),
        (HistoryFrom::After(4), true),
        (HistoryFrom::Before(5), false), // 3 joined at 5
    ] {
        match c
            .call(&Request::History {
                conv: 5,
                user: 3,
                from,
                limit: 0,
            })
            .unwrap()
        {
            Response::History(p) => {
                assert!(p.entries.is_empty());
                assert_eq!(p.has_more, more, "{from:?}");
            }
            r => panic!("{r:?}"),
        }
    }
    match c
        .call(&Request::Sync {
            user: 3,
            checkpoint: 0,
            limit: 0,
            groups: vec![],
        })
        .unwrap()
    {
        Response::Sync(s) => assert!(s.entries.is_empty() && s.has_more),
        r => panic!("{r:?}"),
    }
    srv.shutdown().unwrap();
}

/// A burst of connections that each sent `HELLO` right after connecting,
/// more than `--max-handshaking` of them, all waiting in the listen backlog
/// (the server stopped with SIGSTOP meanwhile): once it runs again it
/// accepts them in one go and serves every one, evicting none. (It used to
/// count them against the limit before reading them, and closed the
/// oldest with `TIMEOUT` although their `HELLO` was there: W6's 10,000
/// devices connecting at once lost some.)
#[test]
fn a_burst_of_connections_each_sending_hello_is_served_whole() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--io-threads", "2", "--max-handshaking", "128"];
    let (mut child, addr) = spawn_server(dir.path(), &args);
    unsafe_free_kill(child.id(), libc::SIGSTOP);
    let mut burst: Vec<TcpStream> = (0..600)
        .map(|i| {
            let mut s = TcpStream::connect(addr.as_str()).unwrap();
            s.write_all(&hello_bytes(i + 1, &[])).unwrap();
            s
        })
        .collect();
    unsafe_free_kill(child.id(), libc::SIGCONT);
    for (i, s) in burst.iter_mut().enumerate() {
        match read_frame(s) {
            Some(ServerMsg::Reply { .. }) => {}
            m => panic!("connection {i} of the burst: {m:?}"),
        }
    }
    let mut c = Client::connect(addr.as_str(), &[]).unwrap();
    let evicted = match c.call(&Request::Stats).unwrap() {
        Response::Stats(kv) => kv.into_iter().find(|(k, _)| k == "handshakes_evicted"),
        r => panic!("{r:?}"),
    };
    assert_eq!(evicted.map(|(_, v)| v), Some(0));
    drop((burst, c));
    unsafe_free_kill(child.id(), libc::SIGKILL);
    let _ = child.wait();
}
