//! `timeline_client`: clients of the timeline server, on the protocol crate
//! alone (no engine, no IM layer). A blocking client. One request at a time with [`Client::call`], or
//! pipelined: [`Client::queue`] many requests, [`Client::flush`], then
//! [`Client::recv`] their replies in order. Pushes of subscriptions that
//! arrive while waiting for a reply are kept for [`Client::next_push`].

pub use timeline_protocol as protocol;

pub mod cluster;
pub mod fleet;
pub mod stdout;

use protocol::{
    ErrorCode, ErrorReply, Hello, HelloReply, ProtocolError, Push, Request, RequestFrame, Response,
    ServerMsg,
};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server answered with an error.
    #[error("server error {code}: {message} (arg {arg})")]
    Server {
        code: ErrorCode,
        arg: u64,
        message: String,
    },
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    #[error("the server closed the connection")]
    Closed,
    /// No reply (or no room to send) within the reply timeout
    /// ([`Client::set_reply_timeout`]); the connection is closed (a late
    /// reply could not be matched), and the request's outcome is unknown.
    #[error("no reply within {0:?}; the connection is closed")]
    TimedOut(Duration),
}

impl From<ErrorReply> for ClientError {
    fn from(e: ErrorReply) -> Self {
        ClientError::Server {
            code: e.code,
            arg: e.arg,
            message: e.message,
        }
    }
}

impl ClientError {
    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

pub struct Client {
    stream: TcpStream,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    rstart: usize,
    next_id: u64,
    /// Ids of requests sent whose replies have not been read, in order.
    inflight: VecDeque<u64>,
    pushes: VecDeque<(u64, Push)>,
    hello: HelloReply,
    /// How long [`Client::recv`] waits for a reply (`None`: forever).
    reply_timeout: Option<Duration>,
}

impl Client {
    /// Connect and shake hands (`token`: the 49-byte credential, or empty).
    pub fn connect(addr: impl ToSocketAddrs, token: &[u8]) -> Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        let mut c = Client {
            stream,
            wbuf: Vec::with_capacity(64 << 10),
            rbuf: Vec::with_capacity(64 << 10),
            rstart: 0,
            next_id: 1,
            reply_timeout: None,
            inflight: VecDeque::new(),
            pushes: VecDeque::new(),
            hello: HelloReply {
                version: 0,
                max_frame: 0,
                identity: protocol::Identity::Anonymous,
            },
        };
        let r = c.call(&Request::Hello(Hello {
            version: protocol::PROTOCOL_VERSION,
            max_frame: 0,
            token,
        }))?;
        match r {
            Response::Hello(h) => c.hello = h,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
        Ok(c)
    }

    /// What the server said in the handshake.
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// Wait at most `t` for each reply, and for each write of requests to
    /// the socket (`None`, the default: forever). After a timeout the
    /// connection is shut down and every later call fails: make a new
    /// client.
    pub fn set_reply_timeout(&mut self, t: Option<Duration>) {
        let t = t.filter(|d| !d.is_zero());
        self.reply_timeout = t;
        // Only a zero duration is refused, and it was taken out.
        let _ = self.stream.set_write_timeout(t);
    }

    /// Queue a request (not sent until [`flush`](Self::flush)); returns its id.
    pub fn queue(&mut self, request: &Request<'_>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        RequestFrame {
            id,
            request: request.clone(),
        }
        .encode_into(&mut self.wbuf);
        self.inflight.push_back(id);
        id
    }

    /// Send everything queued.
    pub fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            match self.stream.write_all(&self.wbuf) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    // Part of a frame may be out: the stream is unusable.
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    return Err(ClientError::TimedOut(
                        self.reply_timeout.unwrap_or_default(),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Requests sent (or queued) whose replies were not read yet.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The reply to the oldest request in flight.
    pub fn recv(&mut self) -> Result<Response> {
        let want = self
            .inflight
            .pop_front()
            .ok_or_else(|| ClientError::Unexpected("no request in flight".into()))?;
        self.flush()?;
        let deadline = self.reply_timeout.map(|t| (t, Instant::now() + t));
        loop {
            let left = deadline.map(|(_, d)| d.saturating_duration_since(Instant::now()));
            let msg = match self.read_msg(left)? {
                None if deadline.is_some() => {
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    let waited = deadline.map_or(Duration::ZERO, |(t, _)| t);
                    return Err(ClientError::TimedOut(waited));
                }
                m => m,
            };
            match msg {
                Some(ServerMsg::Reply { id, response }) if id == want => return Ok(response),
                Some(ServerMsg::Error { id, error, .. }) if id == want || id == 0 => {
                    return Err(error.into())
                }
                Some(ServerMsg::Push { subscription, push }) => {
                    self.pushes.push_back((subscription, push))
                }
                Some(other) => {
                    return Err(ClientError::Unexpected(format!(
                        "waiting for reply {want}, got {other:?}"
                    )))
                }
                None => return Err(ClientError::Closed),
            }
        }
    }

    /// Send one request and wait for its reply.
    pub fn call(&mut self, request: &Request<'_>) -> Result<Response> {
        // Replies come in order: drain older ones first.
        while !self.inflight.is_empty() {
            let _ = self.recv();
        }
        self.queue(request);
        self.recv()
    }

    /// The next push of any subscription, waiting up to `timeout`.
    pub fn next_push(&mut self, timeout: Duration) -> Result<Option<(u64, Push)>> {
        if let Some(p) = self.pushes.pop_front() {
            return Ok(Some(p));
        }
        match self.read_msg(Some(timeout))? {
            Some(ServerMsg::Push { subscription, push }) => Ok(Some((subscription, push))),
            Some(ServerMsg::Error { id: 0, error, .. }) => Err(error.into()),
            Some(other) => Err(ClientError::Unexpected(format!(
                "a reply while no request is in flight: {other:?}"
            ))),
            None => Ok(None),
        }
    }

    /// Read one server frame; `Ok(None)`: the timeout passed;
    /// `Err(Closed)`: the server closed the connection.
    fn read_msg(&mut self, timeout: Option<Duration>) -> Result<Option<ServerMsg>> {
        let max = protocol::DEFAULT_MAX_FRAME;
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some((f, used)) = protocol::decode(&self.rbuf[self.rstart..], max)? {
                let m = ServerMsg::decode(&f)?;
                self.rstart += used;
                if self.rstart == self.rbuf.len() {
                    self.rbuf.clear();
                    self.rstart = 0;
                }
                return Ok(Some(m));
            }
            if self.rstart > 0 {
                self.rbuf.drain(..self.rstart);
                self.rstart = 0;
            }
            let left = match deadline {
                Some(d) => {
                    let l = d.saturating_duration_since(Instant::now());
                    if l.is_zero() {
                        return Ok(None);
                    }
                    Some(l)
                }
                None => None,
            };
            self.stream.set_read_timeout(left)?;
            let mut chunk = [0u8; 64 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if deadline.is_some() {
                        return Ok(None);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The raw stream (tests that speak bytes directly).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}
