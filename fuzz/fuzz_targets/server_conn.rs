//! The server's connection handling behind real sockets: one in-process
//! `timeline-server` (started once per fuzzing process, on loopback, data in
//! a temporary directory) gets fuzzer-chosen byte streams on up to four
//! connections at once, interleaved in fuzzer order: raw bytes, well-framed
//! requests of any opcode with arbitrary bodies (so every body decoder and
//! command runs), valid `HELLO`s, half-closes, reads and drops. After each
//! input a fresh connection must be served (`HELLO` + `PING` answered
//! within 10 s): no input may stop the server, hang a loop or panic it (a
//! panic on any server thread aborts the fuzzing process: a crash).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;
use timeline_protocol::frame::{Frame, Header};
use timeline_protocol::{Hello, Opcode, Request, RequestFrame, Response, PROTOCOL_VERSION};
use timeline_server::{start, Client, ServerConfig, ServerHandle};

#[derive(Arbitrary, Debug)]
enum Step {
    Raw { conn: u8, bytes: Vec<u8> },
    Frame { conn: u8, opcode: u16, id: u64, flags: bool, body: Vec<u8> },
    Hello { conn: u8, max_frame: u16 },
    HalfClose { conn: u8 },
    Read { conn: u8 },
    Drop { conn: u8 },
}

fn server() -> SocketAddr {
    static S: OnceLock<(ServerHandle, tempdir::Dir)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempdir::Dir::new();
        let mut c = ServerConfig::default();
        c.listen = "127.0.0.1:0".into();
        c.data_dir = dir.0.clone();
        c.engine.shards = 2;
        c.max_frame = 256 << 10;
        c.engine.max_payload = 16 << 10;
        (start(c).expect("server"), dir)
    })
    .0
    .local_addr()
}

/// A directory removed when the process ends normally (fuzzing processes
/// usually do not: it is under the system's temporary directory).
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let p = std::env::temp_dir().join(format!("fuzz-server-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
    }
}

fn hello(max_frame: u32) -> Vec<u8> {
    let mut b = Vec::new();
    RequestFrame { id: 1, request: Request::Hello(Hello { version: PROTOCOL_VERSION, max_frame, token: b"" }) }
        .encode_into(&mut b);
    b
}

fn drain(s: &mut TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
    let mut b = [0u8; 16 << 10];
    for _ in 0..8 {
        match s.read(&mut b) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

fuzz_target!(|steps: Vec<Step>| {
    let addr = server();
    let mut conns: Vec<Option<TcpStream>> = (0..4).map(|_| None).collect();
    for step in steps.into_iter().take(32) {
        let (k, bytes) = match step {
            Step::Raw { conn, bytes } => (conn, bytes),
            Step::Frame { conn, opcode, id, flags, body } => {
                let mut b = Vec::new();
                let header = Header { opcode: Opcode(opcode % 64), flags: u16::from(flags), request_id: id };
                Frame { header, body: &body }.encode_into(&mut b);
                (conn, b)
            }
            Step::Hello { conn, max_frame } => (conn, hello(u32::from(max_frame) << 4)),
            Step::HalfClose { conn } => {
                if let Some(s) = &conns[conn as usize % 4] {
                    let _ = s.shutdown(Shutdown::Write);
                }
                continue;
            }
            Step::Read { conn } => {
                if let Some(s) = conns[conn as usize % 4].as_mut() {
                    drain(s);
                }
                continue;
            }
            Step::Drop { conn } => {
                conns[conn as usize % 4] = None;
                continue;
            }
        };
        let slot = &mut conns[k as usize % 4];
        if slot.is_none() {
            *slot = TcpStream::connect(addr).ok();
        }
        if let Some(s) = slot.as_mut() {
            let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
            if s.write_all(&bytes).is_err() {
                *slot = None; // the server closed it: fine
            }
        }
    }
    for s in conns.iter_mut().flatten() {
        drain(s);
    }
    drop(conns);
    // The server still serves a well-behaved client.
    let mut c = Client::connect(addr, b"").expect("the server stopped accepting");
    let _ = c.stream().set_read_timeout(Some(Duration::from_secs(10)));
    match c.call(&Request::Ping(b"alive")) {
        Ok(Response::Ping(b)) => assert_eq!(b, b"alive"),
        r => panic!("the server stopped answering: {r:?}"),
    }
});
