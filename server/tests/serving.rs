//! The serving path over real TCP (docs/design.md §20, docs/protocol.md
//! §4–5, §11): thousands of subscribed connections on a fixed thread
//! count, one resync for a stalled subscriber, `CLOSED` at shutdown,
//! deadlines (handshake, token expiry), pushes within the client's frame
//! limit, raw writes kept out of IM timelines, and a slow reader that does
//! not hold anybody else up.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use timeline_server::protocol::token::{self, Claims, Role};
use timeline_server::protocol::{
    self, ErrorCode, Opcode, Request, RequestFrame, Response, ServerMsg,
};
use timeline_server::protocol::{Body, Direction, Durability, Push, TimelineId};
use timeline_server::{start, Client};

#[test]
fn a_stalled_subscriber_gets_exactly_one_resync_then_pushes_again() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let mut admin = Client::connect(addr, &[]).unwrap();
    direct(&mut admin, 1, 1, 2);
    let mut dev = subscribed(addr, 2);
    assert!(matches!(dev.reply(), ServerMsg::Reply { id: 1, .. }));
    assert!(matches!(dev.reply(), ServerMsg::Reply { id: 2, .. }));
    // ~24 MiB of pushes while the device reads nothing: far beyond its
    // 4 MiB output bound plus the socket buffers.
    let payload = vec![7u8; 32 << 10];
    let sends = 768u64;
    for i in 0..sends {
        admin.queue(&Request::Send {
            conv: 1,
            sender: 1,
            client_msg_id: i + 1,
            payload: &payload,
        });
        if admin.in_flight() >= 64 {
            assert!(matches!(admin.recv().unwrap(), Response::Send(_)));
        }
    }
    while admin.in_flight() > 0 {
        assert!(matches!(admin.recv().unwrap(), Response::Send(_)));
    }
    // More while the device still reads nothing: dropped, never sent
    // before the resync.
    let late = 20u64;
    for i in 0..late {
        admin
            .call(&Request::Send {
                conv: 1,
                sender: 1,
                client_msg_id: sends + 1 + i,
                payload: b"late",
            })
            .unwrap();
    }
    let (mut entries, mut resyncs, mut after_resync, mut lates) = (0u64, 0u64, 0u64, 0u64);
    while let Some(m) = dev.next(Duration::from_millis(1500)) {
        match m {
            ServerMsg::Push {
                push: Push::Resync, ..
            } => resyncs += 1,
            ServerMsg::Push {
                push: Push::Entry { entry, .. },
                ..
            } => {
                entries += 1;
                if resyncs > 0 {
                    after_resync += 1;
                }
                if entry.entry.body == Body::Message(b"late".to_vec()) {
                    lates += 1;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(resyncs, 1, "entries {entries} of {sends}");
    assert!(
        entries < sends,
        "nothing was dropped: the test did not stall"
    );
    assert_eq!(lates, 0, "a push sent after the drop and before the resync");
    assert_eq!(
        after_resync, 0,
        "pushes after the resync (before reading again)"
    );
    // Reading again: pushes resume.
    admin
        .call(&Request::Send {
            conv: 1,
            sender: 1,
            client_msg_id: sends + late + 1,
            payload: b"again",
        })
        .unwrap();
    match dev.reply() {
        ServerMsg::Push {
            push: Push::Entry { entry, .. },
            ..
        } => assert_eq!(entry.entry.conv_seq, sends + late + 2),
        other => panic!("{other:?}"),
    }
    srv.shutdown().unwrap();
}

#[test]
fn shutdown_sends_closed_to_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let mut conns: Vec<Raw> = (0..64)
        .map(|u| {
            let mut r = if u % 2 == 0 {
                subscribed(addr, u)
            } else {
                let mut r = Raw::connect(addr);
                r.hello(0, &[]);
                r
            };
            assert!(matches!(r.reply(), ServerMsg::Reply { id: 1, .. }));
            if u % 2 == 0 {
                assert!(matches!(r.reply(), ServerMsg::Reply { id: 2, .. }));
            }
            r
        })
        .collect();
    let t = std::thread::spawn(move || srv.shutdown());
    for c in &mut conns {
        match c.reply() {
            ServerMsg::Error { id: 0, error, .. } => assert_eq!(error.code, ErrorCode::CLOSED),
            other => panic!("{other:?}"),
        }
        assert!(
            c.next(Duration::from_secs(5)).is_none(),
            "open after CLOSED"
        );
    }
    t.join().unwrap().unwrap();
}

#[test]
fn requests_read_before_shutdown_are_answered_before_closed() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut c = Raw::connect(srv.local_addr());
    c.hello(0, &[]);
    assert!(matches!(c.reply(), ServerMsg::Reply { id: 1, .. }));
    // Own-fdatasync appends are barriers: each holds back the GET behind it
    // until its fdatasync is done, so the shutdown below finds requests
    // read but not executed, and answers still to come.
    let n = 60u64;
    let mut b = Vec::new();
    for i in 0..n {
        RequestFrame {
            id: 2 * i + 2,
            request: Request::Append {
                timeline: TimelineId::store(9),
                durability: Some(Durability::Sync),
                payload: b"x",
            },
        }
        .encode_into(&mut b);
        RequestFrame {
            id: 2 * i + 3,
            request: Request::Get {
                timeline: TimelineId::store(9),
                seq: i + 1,
            },
        }
        .encode_into(&mut b);
    }
    assert!(b.len() < 32 << 10, "one read takes it all");
    c.s.write_all(&b).unwrap();
    // The first answer proves the server has read the requests.
    let first = c.reply();
    assert!(matches!(first, ServerMsg::Reply { id: 2, .. }), "{first:?}");
    let t = std::thread::spawn(move || srv.shutdown());
    let mut next = 3;
    loop {
        match c.reply() {
            ServerMsg::Reply { id, response } => {
                assert_eq!(id, next);
                if id % 2 == 1 {
                    // The GET behind append k sees it.
                    assert!(matches!(response, Response::Get(Some(_))), "{response:?}");
                }
                next += 1;
            }
            ServerMsg::Error { id: 0, error, .. } => {
                assert_eq!(error.code, ErrorCode::CLOSED);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        next,
        2 * n + 2,
        "every request read was answered before CLOSED"
    );
    t.join().unwrap().unwrap();
}

#[test]
fn pipelined_mixed_requests_answer_in_order_and_see_earlier_effects() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    direct(&mut c, 1, 1, 2);
    let t = TimelineId::store(77);
    let fwd = Direction::Forward;
    // Reads on the pool, barriers, deferred sends, SUBSCRIBE and pushes,
    // all in one pipeline.
    let reqs = vec![
        Request::Append {
            timeline: t,
            durability: Some(Durability::Sync),
            payload: b"a",
        },
        Request::Scan {
            timeline: t,
            from: 1,
            limit: 10,
            direction: fwd,
        },
        Request::Send {
            conv: 1,
            sender: 1,
            client_msg_id: 1,
            payload: b"m1",
        },
        Request::Subscribe { user: 2 },
        Request::Sync {
            user: 2,
            checkpoint: 0,
            limit: 10,
            groups: vec![],
        },
        Request::Append {
            timeline: t,
            durability: None,
            payload: b"b",
        },
        Request::Scan {
            timeline: t,
            from: 1,
            limit: 10,
            direction: fwd,
        },
        Request::MarkRead {
            user: 2,
            conv: 1,
            seq: 2,
        },
        Request::Send {
            conv: 1,
            sender: 1,
            client_msg_id: 2,
            payload: b"m2",
        },
        Request::Conversations { user: 2 },
        Request::LastSeq { timeline: t },
    ];
    let ids: Vec<u64> = reqs.iter().map(|r| c.queue(r)).collect();
    c.flush().unwrap();
    let got: Vec<Response> = reqs.iter().map(|_| c.recv().unwrap()).collect();
    assert!(matches!(got[0], Response::Append(1)));
    assert!(matches!(&got[1], Response::Scan(v) if v.len() == 1));
    assert!(matches!(got[2], Response::Send(a) if a.seq == 2));
    assert!(matches!(got[3], Response::Subscribe));
    assert!(matches!(got[5], Response::Append(2)));
    // The SCAN after the second APPEND sees both; the first saw one.
    assert!(matches!(&got[6], Response::Scan(v) if v.len() == 2));
    assert!(matches!(got[7], Response::MarkRead(2)));
    assert!(matches!(got[8], Response::Send(a) if a.seq == 3));
    // CONVERSATIONS after MARK_READ sees the marker.
    assert!(
        matches!(&got[9], Response::Conversations(v) if v[0].read_seq == 2),
        "{:?}",
        got[9]
    );
    assert!(matches!(got[10], Response::LastSeq(2)));
    // The subscription's pushes, in sync-seq order.
    let mut seqs = Vec::new();
    while let Some((sub, p)) = c.next_push(Duration::from_millis(500)).unwrap() {
        assert_eq!(sub, ids[3], "tagged with the SUBSCRIBE's id");
        if let Push::Entry { entry, .. } = p {
            seqs.push(entry.seq);
        }
    }
    assert!(!seqs.is_empty());
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    srv.shutdown().unwrap();
}

#[test]
fn a_connection_without_hello_is_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.handshake_timeout = Duration::from_millis(300);
    cfg.max_connections = 4;
    let srv = start(cfg).unwrap();
    let addr = srv.local_addr();
    // Fill every slot with silent sockets; they are closed in time and a
    // real client gets in.
    let mut silent: Vec<Raw> = (0..4).map(|_| Raw::connect(addr)).collect();
    // While they hold every slot, a fifth is refused.
    let mut fifth = Raw::connect(addr);
    match fifth.reply() {
        ServerMsg::Error { id: 0, error, .. } => {
            assert_eq!(error.code, ErrorCode::TOO_MANY_CONNECTIONS)
        }
        other => panic!("{other:?}"),
    }
    for s in &mut silent {
        match s.reply() {
            ServerMsg::Error { id: 0, error, .. } => assert_eq!(error.code, ErrorCode::TIMEOUT),
            other => panic!("{other:?}"),
        }
        assert!(s.next(Duration::from_secs(5)).is_none());
    }
    let t0 = Instant::now();
    let c = loop {
        match Client::connect(addr, &[]) {
            Ok(c) => break c,
            Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::yield_now();
            }
            Err(e) => panic!("still refused: {e}"),
        }
    };
    drop(c);
    srv.shutdown().unwrap();
}

#[test]
fn a_connection_ends_when_its_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let secret = b"0123456789abcdef0123456789abcdef".to_vec();
    cfg.auth_secret = Some(secret.clone());
    let srv = start(cfg).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let tok = token::sign(
        &secret,
        &Claims {
            user: 5,
            expires_unix: now + 2,
            role: Role::User,
        },
    );
    let mut c = Raw::connect(srv.local_addr());
    c.hello(0, &tok);
    assert!(matches!(c.reply(), ServerMsg::Reply { id: 1, .. }));
    c.send(2, Request::Subscribe { user: 5 });
    assert!(matches!(c.reply(), ServerMsg::Reply { id: 2, .. }));
    match c.next(Duration::from_secs(6)) {
        Some(ServerMsg::Error { id: 0, error, .. }) => {
            assert_eq!(error.code, ErrorCode::UNAUTHORIZED)
        }
        other => panic!("{other:?}"),
    }
    assert!(c.next(Duration::from_secs(5)).is_none());
    srv.shutdown().unwrap();
}

#[test]
fn a_push_too_large_for_the_clients_frame_limit_becomes_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let mut admin = Client::connect(addr, &[]).unwrap();
    direct(&mut admin, 1, 1, 2);
    let mut dev = Raw::connect(addr);
    dev.hello(1024, &[]);
    dev.send(2, Request::Subscribe { user: 2 });
    assert!(matches!(dev.reply(), ServerMsg::Reply { id: 1, .. }));
    assert!(matches!(dev.reply(), ServerMsg::Reply { id: 2, .. }));
    for (i, p) in [vec![1u8; 4000], b"small".to_vec()].iter().enumerate() {
        admin
            .call(&Request::Send {
                conv: 1,
                sender: 1,
                client_msg_id: i as u64 + 1,
                payload: p,
            })
            .unwrap();
    }
    let first = dev.reply();
    assert!(
        matches!(
            first,
            ServerMsg::Push {
                push: Push::Resync,
                ..
            }
        ),
        "{first:?}"
    );
    // The small message's push may follow, or may have been dropped while
    // the resync was owed (protocol.md §5: "no other push of that
    // subscription before it", and dropped pushes are not resent). Either
    // way SYNC has both messages.
    match dev.next(Duration::from_millis(500)) {
        None => {}
        Some(ServerMsg::Push {
            push: Push::Entry { entry, .. },
            ..
        }) => assert_eq!(entry.entry.conv_seq, 3),
        Some(other) => panic!("{other:?}"),
    }
    match admin
        .call(&Request::Sync {
            user: 2,
            checkpoint: 0,
            limit: 10,
            groups: vec![],
        })
        .unwrap()
    {
        Response::Sync(s) => {
            let seqs: Vec<u64> = s.entries.iter().map(|e| e.entry.conv_seq).collect();
            assert!(seqs.ends_with(&[2, 3]), "{seqs:?}");
        }
        other => panic!("{other:?}"),
    }
    srv.shutdown().unwrap();
}

#[test]
fn raw_writes_cannot_touch_im_timelines() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut c = Client::connect(srv.local_addr(), &[]).unwrap();
    direct(&mut c, 7, 5, 6);
    c.call(&Request::Send {
        conv: 7,
        sender: 5,
        client_msg_id: 1,
        payload: b"hi",
    })
    .unwrap();
    for t in [
        TimelineId::sync(6),
        TimelineId::sync(999),
        TimelineId::store(7),
        TimelineId::store(1 << 63),
    ] {
        let r = c.call(&Request::Append {
            timeline: t,
            durability: None,
            payload: b"garbage",
        });
        assert_eq!(code(r), ErrorCode::FORBIDDEN, "{t:?}");
        let r = c.call(&Request::AppendBatch {
            durability: None,
            items: vec![(TimelineId::store(8), b"ok"), (t, b"garbage")],
        });
        assert_eq!(code(r), ErrorCode::FORBIDDEN, "{t:?}");
    }
    // Pipelined single APPENDs go through the same check.
    let ids: Vec<u64> = [
        TimelineId::store(8),
        TimelineId::sync(6),
        TimelineId::store(8),
    ]
    .iter()
    .map(|&t| {
        c.queue(&Request::Append {
            timeline: t,
            durability: None,
            payload: b"p",
        })
    })
    .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(c.recv().unwrap(), Response::Append(1));
    assert_eq!(code(c.recv()), ErrorCode::FORBIDDEN);
    assert_eq!(c.recv().unwrap(), Response::Append(2));
    // User 6 still syncs what the IM layer wrote, nothing else.
    match c
        .call(&Request::Sync {
            user: 6,
            checkpoint: 0,
            limit: 10,
            groups: vec![],
        })
        .unwrap()
    {
        Response::Sync(s) => assert_eq!(s.entries.len(), 2), // Created, the message
        other => panic!("{other:?}"),
    }
    srv.shutdown().unwrap();
}

#[test]
fn a_slow_reader_does_not_delay_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    // The slow one pipelines large PINGs and reads nothing.
    let mut slow = Raw::connect(addr);
    slow.hello(0, &[]);
    let big = vec![0u8; 256 << 10];
    slow.s
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut written = 0usize;
    for i in 0..256u64 {
        let mut b = Vec::new();
        RequestFrame {
            id: i + 2,
            request: Request::Ping(&big),
        }
        .encode_into(&mut b);
        if slow.s.write_all(&b).is_err() {
            break; // the server stopped reading it: that is the point
        }
        written += 1;
    }
    assert!(
        written < 256,
        "the server read 64 MiB without it being read"
    );
    // Another connection is served as usual, pushes included.
    let mut c = Client::connect(addr, &[]).unwrap();
    direct(&mut c, 1, 1, 2);
    let mut dev = subscribed(addr, 2);
    assert!(matches!(dev.reply(), ServerMsg::Reply { id: 1, .. }));
    assert!(matches!(dev.reply(), ServerMsg::Reply { id: 2, .. }));
    let t0 = Instant::now();
    for i in 0..50u64 {
        assert_eq!(
            c.call(&Request::Ping(b"p")).unwrap(),
            Response::Ping(b"p".to_vec())
        );
        c.call(&Request::Send {
            conv: 1,
            sender: 1,
            client_msg_id: i + 1,
            payload: b"m",
        })
        .unwrap();
        assert!(matches!(dev.reply(), ServerMsg::Push { .. }));
    }
    // A liveness bound, not a performance figure: stuck would be forever.
    assert!(t0.elapsed() < Duration::from_secs(20));
    drop(slow);
    srv.shutdown().unwrap();
}

#[test]
fn a_client_that_shuts_its_sending_side_gets_every_answer() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let mut c = Raw::connect(srv.local_addr());
    c.hello(0, &[]);
    for i in 0..200u64 {
        c.send(
            i + 2,
            Request::Append {
                timeline: TimelineId::store(3),
                durability: None,
                payload: b"half-close",
            },
        );
    }
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(c.reply(), ServerMsg::Reply { id: 1, .. }));
    for i in 0..200u64 {
        match c.reply() {
            ServerMsg::Reply {
                id,
                response: Response::Append(seq),
            } => {
                assert_eq!(id, i + 2);
                assert_eq!(seq, i + 1);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        c.next(Duration::from_secs(5)).is_none(),
        "not closed after EOF"
    );
    srv.shutdown().unwrap();
}

fn stat(c: &mut Client, key: &str) -> u64 {
    let Response::Stats(kv) = c.call(&Request::Stats).unwrap() else {
        panic!("stats")
    };
    kv.iter().find(|(k, _)| k == key).unwrap().1
}

/// A full IM worker stops the connections that feed it (they read nothing
/// more until it has room) instead of blocking their event loop: with one
/// loop and a worker queue of one request, eight pipelining senders all get
/// every answer, in order, and a connection that only PINGs on the same
/// loop is answered meanwhile.
#[test]
fn a_full_im_worker_holds_its_senders_back_without_blocking_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.io_threads = 1;
    cfg.engine.shards = 1;
    cfg.im.queue_capacity = 1;
    let srv = start(cfg).unwrap();
    let addr = srv.local_addr();
    let mut admin = Client::connect(addr, &[]).unwrap();
    direct(&mut admin, 1, 1, 2);
    const SENDERS: u64 = 8;
    const EACH: u64 = 200;
    let mut senders: Vec<Client> = (0..SENDERS)
        .map(|_| Client::connect(addr, &[]).unwrap())
        .collect();
    for (k, c) in senders.iter_mut().enumerate() {
        for i in 0..EACH {
            c.queue(&Request::Send {
                conv: 1,
                sender: 1 + (k as u64 % 2),
                client_msg_id: (k as u64) << 32 | i,
                payload: b"pressure",
            });
        }
        c.flush().unwrap();
    }
    // The loop keeps serving while the senders wait on the worker.
    for _ in 0..20 {
        assert_eq!(
            admin.call(&Request::Ping(b"p")).unwrap(),
            Response::Ping(b"p".to_vec())
        );
    }
    let mut seqs = Vec::new();
    for c in &mut senders {
        let mut last = 0;
        for _ in 0..EACH {
            let Response::Send(ack) = c.recv().unwrap() else {
                panic!("a SEND reply")
            };
            assert!(!ack.duplicate);
            assert!(ack.seq > last, "answers of one connection in order");
            last = ack.seq;
            seqs.push(ack.seq);
        }
    }
    seqs.sort_unstable();
    // Created is seq 1: every message got its own seq after it.
    assert_eq!(seqs, (2..2 + SENDERS * EACH).collect::<Vec<_>>());
    assert!(
        stat(&mut admin, "im_backpressure") > 0,
        "the worker queue never filled: the test did not test backpressure"
    );
    // Created + every message, once each, page by page.
    let (mut got, mut checkpoint) = (0u64, 0);
    loop {
        let Response::Sync(page) = admin
            .call(&Request::Sync {
                user: 2,
                checkpoint,
                limit: 1000,
                groups: vec![],
            })
            .unwrap()
        else {
            panic!("sync")
        };
        got += page.entries.len() as u64;
        checkpoint = page.checkpoint;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(got, 1 + SENDERS * EACH);
    srv.shutdown().unwrap();
}

/// Sockets that connect and never say `HELLO` cannot lock real clients out:
/// beyond `max_handshaking` waiting at once, the one that waited longest is
/// closed (`TIMEOUT`), so a client that says `HELLO` at once gets in even
/// while far more silent sockets than the connection limit keep arriving.
#[test]
fn silent_sockets_beyond_the_handshake_budget_do_not_lock_out_a_client() {
    raise_nofile(12_000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_connections = 1_000;
    cfg.max_handshaking = 64;
    let srv = start(cfg).unwrap();
    let addr = srv.local_addr();
    let mut silent = Vec::new();
    for round in 0..4 {
        for _ in 0..1_000 {
            silent.push(TcpStream::connect(addr).unwrap());
        }
        // A real client, after 1,000 * (round + 1) silent sockets.
        let mut c = Client::connect(addr, &[])
            .unwrap_or_else(|e| panic!("round {round}: a real client was locked out: {e}"));
        assert_eq!(
            c.call(&Request::Ping(b"in")).unwrap(),
            Response::Ping(b"in".to_vec())
        );
        let evicted = stat(&mut c, "handshakes_evicted");
        assert!(evicted > 0, "round {round}: nothing was evicted");
        // Evicted ones are closed once their TIMEOUT is written, and new ones
        // may still be on their way to their loop: give it a moment (test
        // code; bounded).
        let mut open = stat(&mut c, "connections_open");
        for _ in 0..50 {
            if open <= 64 + 8 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            open = stat(&mut c, "connections_open");
        }
        assert!(open <= 64 + 8, "round {round}: {open} connections open");
    }
    // The oldest silent socket was told why it was closed.
    let mut first = silent.swap_remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = Vec::new();
    first.read_to_end(&mut b).unwrap();
    let (f, _) = protocol::decode(&b, 1 << 20).unwrap().unwrap();
    match ServerMsg::decode(&f).unwrap() {
        ServerMsg::Error { id: 0, error, .. } => assert_eq!(error.code, ErrorCode::TIMEOUT),
        m => panic!("{m:?}"),
    }
    drop(silent);
    srv.shutdown().unwrap();
}

/// A frame begun and never finished does not hold the server's memory for
/// good: `--write-timeout` after its last byte the connection gets `TIMEOUT`.
#[test]
fn a_half_sent_frame_ends_its_connection_after_the_write_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.write_timeout = Duration::from_secs(1);
    let srv = start(cfg).unwrap();
    let mut r = Raw::connect(srv.local_addr());
    r.hello(0, &[]);
    assert!(matches!(r.reply(), ServerMsg::Reply { id: 1, .. }));
    let mut b = Vec::new();
    RequestFrame {
        id: 2,
        request: Request::Ping(&[7u8; 100_000]),
    }
    .encode_into(&mut b);
    r.s.write_all(&b[..b.len() / 2]).unwrap();
    let t0 = Instant::now();
    match r.next(Duration::from_secs(20)) {
        Some(ServerMsg::Error { id: 0, error, .. }) => assert_eq!(error.code, ErrorCode::TIMEOUT),
        m => panic!("{m:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert!(r.next(Duration::from_secs(5)).is_none(), "closed after");
    srv.shutdown().unwrap();
}

fn error_of(m: Option<ServerMsg>) -> (u64, ErrorCode, u64) {
    match m {
        Some(ServerMsg::Error { id, error, .. }) => (id, error.code, error.arg),
        m => panic!("expected an error, got {m:?}"),
    }
}

/// protocol.md §3: before a successful HELLO the server reads headers
/// only. A 1 MiB frame of another opcode is refused at its header (not
/// after its body, which never comes); a HELLO frame over 256 bytes is
/// FRAME_TOO_LARGE with arg 256; both close the connection. A HELLO
/// max_frame below 1,024 is INVALID_ARGUMENT and closes; 0 is capped at
/// the server's own limit. After the handshake, request id 0 is
/// MALFORMED_FRAME and a second HELLO, whatever its body, is
/// INVALID_ARGUMENT; the connection stays for both.
#[test]
fn a_handshake_is_read_by_its_header_and_its_limits_hold() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let header = |len: u32, op: u16, id: u64| {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(&op.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&id.to_le_bytes());
        b
    };
    // A PING header announcing a frame of the server's limit (1 MiB
    // here), then nothing: the server need not wait for (or hold) it.
    let mut r = Raw::connect(addr);
    r.s.write_all(&header((1 << 20) - 16, Opcode::PING.0, 5))
        .unwrap();
    let at = std::time::Instant::now();
    let (id, code, _) = error_of(r.next(Duration::from_secs(5)));
    assert_eq!((id, code), (5, ErrorCode::HANDSHAKE_REQUIRED));
    assert!(
        at.elapsed() < Duration::from_secs(2),
        "answered at the header"
    );
    assert!(closed(&mut r.s));
    // A HELLO frame of 1,000 bytes.
    let mut r = Raw::connect(addr);
    r.s.write_all(&header(984, Opcode::HELLO.0, 1)).unwrap();
    assert_eq!(
        error_of(r.next(Duration::from_secs(5))),
        (1, ErrorCode::FRAME_TOO_LARGE, 256)
    );
    assert!(closed(&mut r.s));
    // max_frame too small to take even an error.
    let mut r = Raw::connect(addr);
    r.hello(100, &[]);
    let (_, code, _) = error_of(r.next(Duration::from_secs(5)));
    assert_eq!(code, ErrorCode::INVALID_ARGUMENT);
    assert!(closed(&mut r.s));

    // max_frame 0 is the server's 1 MiB here: a 1.2 MiB SCAN is refused
    // with that limit, not sent.
    let mut c = Client::connect(addr, b"").unwrap();
    let big = vec![7u8; 60 << 10];
    for _ in 0..20 {
        c.call(&Request::Append {
            timeline: protocol::TimelineId::store(77),
            durability: None,
            payload: &big,
        })
        .unwrap();
    }
    let mut r = Raw::connect(addr);
    r.hello(0, &[]);
    assert!(matches!(r.reply(), ServerMsg::Reply { id: 1, .. }));
    r.send(
        2,
        Request::Scan {
            timeline: protocol::TimelineId::store(77),
            from: 1,
            limit: 20,
            direction: protocol::Direction::Forward,
        },
    );
    assert_eq!(
        error_of(r.next(Duration::from_secs(5))),
        (2, ErrorCode::RESPONSE_TOO_LARGE, 1 << 20)
    );
    // Request id 0, a known and an unknown opcode: MALFORMED_FRAME.
    r.s.write_all(&header(0, Opcode::PING.0, 0)).unwrap();
    assert_eq!(
        error_of(r.next(Duration::from_secs(5))).1,
        ErrorCode::MALFORMED_FRAME
    );
    r.s.write_all(&header(0, 0x7777, 0)).unwrap();
    assert_eq!(
        error_of(r.next(Duration::from_secs(5))).1,
        ErrorCode::MALFORMED_FRAME
    );
    // A second HELLO of garbage.
    let mut bad = header(5, Opcode::HELLO.0, 3);
    bad.extend_from_slice(b"junk!");
    r.s.write_all(&bad).unwrap();
    assert_eq!(
        error_of(r.next(Duration::from_secs(5))),
        (3, ErrorCode::INVALID_ARGUMENT, 0)
    );
    r.send(4, Request::Ping(b"still here"));
    assert!(matches!(r.reply(), ServerMsg::Reply { id: 4, .. }));
}

/// protocol.md §11: a SCAN reply is refused only if it would exceed the
/// client's max_frame: 16 + 4 + 8 × (20 + 100) = 980 bytes fit 1,024.
#[test]
fn a_scan_that_fits_the_clients_frame_exactly_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let mut c = Client::connect(addr, b"").unwrap();
    for _ in 0..9 {
        c.call(&Request::Append {
            timeline: protocol::TimelineId::store(5),
            durability: None,
            payload: &[1u8; 100],
        })
        .unwrap();
    }
    let mut r = Raw::connect(addr);
    r.hello(1024, &[]);
    assert!(matches!(r.reply(), ServerMsg::Reply { id: 1, .. }));
    let scan = |limit| Request::Scan {
        timeline: protocol::TimelineId::store(5),
        from: 1,
        limit,
        direction: protocol::Direction::Forward,
    };
    r.send(2, scan(8));
    match r.reply() {
        ServerMsg::Reply {
            id: 2,
            response: Response::Scan(recs),
        } => assert_eq!(recs.len(), 8),
        m => panic!("{m:?}"),
    }
    // Nine: 1,100 bytes.
    r.send(3, scan(9));
    assert_eq!(
        error_of(r.next(Duration::from_secs(5))),
        (3, ErrorCode::RESPONSE_TOO_LARGE, 1024)
    );
}

/// protocol.md §5: closing a connection drops its subscriptions, and so
/// does `UNSUBSCRIBE`: the server keeps nothing of a user whose devices
/// all left, even one never pushed to (before, each such user stayed in
/// the registry for good).
#[test]
fn unsubscribed_and_disconnected_users_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(dir.path());
    let addr = srv.local_addr();
    let im = srv.im().unwrap();
    let mut r = Raw::connect(addr);
    r.hello(0, &[]);
    assert!(matches!(r.reply(), ServerMsg::Reply { id: 1, .. }));
    for user in 1..=200u64 {
        r.send(2 * user, Request::Subscribe { user });
        r.send(
            2 * user + 1,
            Request::Unsubscribe {
                subscription: 2 * user,
            },
        );
    }
    for _ in 0..400 {
        assert!(matches!(r.reply(), ServerMsg::Reply { .. }));
    }
    assert_eq!(im.subscribed_users(), Vec::<u64>::new());
    // Subscribed on a connection that then goes away.
    let mut gone = Raw::connect(addr);
    gone.hello(0, &[]);
    for user in 500..510u64 {
        gone.send(user, Request::Subscribe { user });
    }
    for _ in 0..11 {
        gone.reply();
    }
    assert_eq!(im.subscribed_users().len(), 10);
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !im.subscribed_users().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", im.subscribed_users());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// protocol.md §5: every new durable entry of a user's read-fan-out groups
/// within its stays is pushed, its own removal included (a stay is
/// `[join, leave]`, inclusive). Before, a user removed from a read-fan-out
/// group got no push of it.
#[test]
fn a_member_removed_from_a_read_fanout_group_is_pushed_its_removal() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.im.hybrid_threshold = 2;
    let srv = start(cfg).unwrap();
    let addr = srv.local_addr();
    let mut c = Client::connect(addr, b"").unwrap();
    let r = c.call(&Request::CreateConversation {
        conv: 40,
        kind: protocol::ConvKind::Group,
        members: vec![1, 2, 3],
    });
    assert_eq!(r.unwrap(), Response::CreateConversation(1));
    let mut dev = subscribed(addr, 3);
    assert!(matches!(dev.reply(), ServerMsg::Reply { id: 1, .. }));
    assert!(matches!(dev.reply(), ServerMsg::Reply { id: 2, .. }));
    let r = c.call(&Request::Send {
        conv: 40,
        sender: 1,
        client_msg_id: 1,
        payload: b"before",
    });
    assert!(r.is_ok(), "{r:?}");
    let r = c.call(&Request::RemoveMember { conv: 40, user: 3 });
    assert_eq!(r.unwrap(), Response::RemoveMember(3));
    let mut bodies = Vec::new();
    while bodies.len() < 2 {
        match dev.next(Duration::from_secs(5)) {
            Some(ServerMsg::Push {
                push: Push::Group { user: 3, entry },
                ..
            }) => bodies.push(entry.body),
            m => panic!("after {bodies:?}: {m:?}"),
        }
    }
    assert_eq!(
        bodies,
        vec![Body::Message(b"before".to_vec()), Body::MemberRemoved(3)]
    );
}
