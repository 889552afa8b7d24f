//! Helpers shared by the server's integration tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use timeline_engine::Keyspace;
use timeline_server::protocol::{
    self, ErrorCode, Hello, Request, RequestFrame, Response, ServerMsg,
};
use timeline_server::{start, ClientError, ServerConfig, ServerHandle};

pub fn config(dir: &std::path::Path) -> ServerConfig {
    let mut c = ServerConfig::default();
    c.listen = "127.0.0.1:0".into();
    c.data_dir = dir.to_path_buf();
    c.engine.shards = 2;
    c.engine.keyspace_mut(Keyspace::STORE).segment_bytes = 1 << 20;
    c.engine.keyspace_mut(Keyspace::SYNC).segment_bytes = 1 << 20;
    c.max_frame = 1 << 20;
    c.engine.max_payload = 64 << 10;
    c
}

pub fn server(dir: &std::path::Path) -> ServerHandle {
    start(config(dir)).unwrap()
}

pub fn code(r: Result<Response, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server { code, arg, message }) => {
            assert_arg_as_documented(code, arg, &message);
            code
        }
        Err(e) => panic!("not a server error: {e}"),
        Ok(r) => panic!("expected an error, got {r:?}"),
    }
}

/// protocol.md §9: codes whose `arg` column is "—" carry 0.
pub fn assert_arg_as_documented(code: ErrorCode, arg: u64, message: &str) {
    let unused = [
        ErrorCode::UNKNOWN_COMMAND,
        ErrorCode::MALFORMED_FRAME,
        ErrorCode::HANDSHAKE_REQUIRED,
        ErrorCode::UNAUTHORIZED,
        ErrorCode::FORBIDDEN,
        ErrorCode::TOO_MANY_CONNECTIONS,
        ErrorCode::TIMEOUT,
        ErrorCode::CLOSED,
        ErrorCode::INTERNAL,
        ErrorCode::INVALID_ARGUMENT,
        ErrorCode::IO_ERROR,
        ErrorCode::STORAGE_FULL,
        ErrorCode::CORRUPTION,
        ErrorCode::POISONED,
    ];
    if unused.contains(&code) {
        assert_eq!(arg, 0, "{code:?} carries arg {arg} ({message})");
    }
}

/// Raw: write bytes, read one server frame.
pub fn read_frame(s: &mut TcpStream) -> Option<ServerMsg> {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((f, _)) = protocol::decode(&buf, 1 << 24).unwrap() {
            return Some(ServerMsg::decode(&f).unwrap());
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

pub fn hello_bytes(id: u64, token: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    RequestFrame {
        id,
        request: Request::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            max_frame: 0,
            token,
        }),
    }
    .encode_into(&mut b);
    b
}

pub fn frame(id: u64, r: Request<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    RequestFrame { id, request: r }.encode_into(&mut b);
    b
}

/// True once the server closed the connection.
pub fn closed(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

/// Create direct conversation `conv` between `a` and `b`.
pub fn direct(c: &mut timeline_server::Client, conv: u64, a: u64, b: u64) {
    let r = c.call(&Request::CreateConversation {
        conv,
        kind: protocol::ConvKind::Direct,
        members: vec![a, b],
    });
    assert_eq!(r.unwrap(), Response::CreateConversation(1));
}

/// A connection spoken in raw frames, with its own read buffer.
pub struct Raw {
    pub s: TcpStream,
    pub buf: Vec<u8>,
}

impl Raw {
    pub fn connect(addr: std::net::SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s, buf: Vec::new() }
    }

    pub fn send(&mut self, id: u64, r: Request<'_>) {
        let mut b = Vec::new();
        RequestFrame { id, request: r }.encode_into(&mut b);
        self.s.write_all(&b).unwrap();
    }

    pub fn hello(&mut self, max_frame: u32, token: &[u8]) {
        self.send(
            1,
            Request::Hello(Hello {
                version: protocol::PROTOCOL_VERSION,
                max_frame,
                token,
            }),
        );
    }

    /// The next frame, or `None` on close or after `wait` of silence.
    pub fn next(&mut self, wait: Duration) -> Option<ServerMsg> {
        self.s.set_read_timeout(Some(wait)).unwrap();
        let mut chunk = [0u8; 64 << 10];
        loop {
            if let Some((f, used)) = protocol::decode(&self.buf, 1 << 24).unwrap() {
                let m = ServerMsg::decode(&f).unwrap();
                self.buf.drain(..used);
                return Some(m);
            }
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub fn reply(&mut self) -> ServerMsg {
        self.next(Duration::from_secs(10)).expect("a frame")
    }
}

pub fn threads(c: &mut timeline_server::Client) -> u64 {
    let Response::Stats(kv) = c.call(&Request::Stats).unwrap() else {
        panic!("stats")
    };
    kv.iter().find(|(k, _)| k == "threads").unwrap().1
}

/// Room for `n` descriptors in this process (client and server ends).
pub fn raise_nofile(n: u64) {
    let got = rlimit::increase_nofile_limit(n).unwrap();
    assert!(got >= n, "descriptor limit {got} < {n}");
}

pub fn subscribed(addr: std::net::SocketAddr, user: u64) -> Raw {
    let mut r = Raw::connect(addr);
    r.hello(0, &[]);
    r.send(2, Request::Subscribe { user });
    r
}
