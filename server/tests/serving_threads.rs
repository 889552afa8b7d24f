//! Thousands of subscribed connections on a fixed thread count
//! (docs/design.md §20). In a test binary of its own: the server runs in
//! the test process, and `STATS` counts the process's threads, so another
//! test's server running alongside would change the count.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use timeline_server::protocol::{ConvKind, Push, Request, Response, ServerMsg};
use timeline_server::{start, Client};

#[test]
fn two_thousand_subscribed_connections_on_the_same_threads_get_every_push() {
    raise_nofile(6000);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.max_connections = 3000;
    let srv = start(cfg).unwrap();
    let addr = srv.local_addr();
    let mut admin = Client::connect(addr, &[]).unwrap();
    let n = 2000u64;
    for k in 0..n / 2 {
        let r = admin.call(&Request::CreateConversation {
            conv: k + 1,
            kind: ConvKind::Direct,
            members: vec![2 * k + 1, 2 * k + 2],
        });
        assert_eq!(r.unwrap(), Response::CreateConversation(1));
    }
    let mut devices: Vec<Raw> = (1..=10).map(|u| subscribed(addr, u)).collect();
    for d in &mut devices {
        assert!(matches!(d.reply(), ServerMsg::Reply { id: 1, .. }));
        assert!(matches!(d.reply(), ServerMsg::Reply { id: 2, .. }));
    }
    let at_ten = threads(&mut admin);
    devices.extend((11..=n).map(|u| subscribed(addr, u)));
    for d in &mut devices[10..] {
        assert!(matches!(d.reply(), ServerMsg::Reply { id: 1, .. }));
        assert!(matches!(d.reply(), ServerMsg::Reply { id: 2, .. }));
    }
    assert_eq!(threads(&mut admin), at_ten, "threads grew with connections");
    // One message per conversation, pipelined from one sender connection.
    for k in 0..n / 2 {
        admin.queue(&Request::Send {
            conv: k + 1,
            sender: 2 * k + 1,
            client_msg_id: k + 1,
            payload: b"hello",
        });
    }
    admin.flush().unwrap();
    for _ in 0..n / 2 {
        assert!(matches!(admin.recv().unwrap(), Response::Send(_)));
    }
    for (i, d) in devices.iter_mut().enumerate() {
        let user = i as u64 + 1;
        match d.reply() {
            ServerMsg::Push {
                subscription: 2,
                push: Push::Entry { user: u, entry },
            } => {
                assert_eq!(u, user);
                assert_eq!(entry.entry.conv, user.div_ceil(2));
            }
            other => panic!("device {user}: {other:?}"),
        }
    }
    assert_eq!(threads(&mut admin), at_ten);
    drop(devices);
    srv.shutdown().unwrap();
}
