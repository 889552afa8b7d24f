//! Many connections on one thread: a `mio` poll (epoll) over thousands of
//! non-blocking sockets, for clients that hold many idle, subscribed
//! connections (the bench's devices, W6). A [`Fleet`] moves bytes; what
//! they mean is the caller's: timeline frames through
//! [`protocol::decode`](crate::protocol::decode) (see [`Fleet::queue`]),
//! or another protocol for a baseline.
//!
//! ```no_run
//! use timeline_client::fleet::{Event, Fleet};
//! use timeline_client::protocol::{self, Request, ServerMsg};
//! let mut f = Fleet::new()?;
//! let i = f.connect("127.0.0.1:7420".parse().unwrap())?;
//! loop {
//!     for ev in f.poll(None)? {
//!         match ev {
//!             Event::Connected(i) => f.queue(i, 1, &Request::Ping(b"hi")),
//!             Event::Input(i) => {
//!                 let input = f.input(i);
//!                 if let Some((frame, used)) = protocol::decode(input, 1 << 24)? {
//!                     let _ = ServerMsg::decode(&frame)?;
//!                     input.drain(..used);
//!                 }
//!             }
//!             Event::Closed(_, _) => {}
//!         }
//!     }
//!     f.flush_all()?;
//! #   break;
//! }
//! # let _ = i;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::protocol::{Request, RequestFrame};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

/// What happened to a connection during [`Fleet::poll`].
#[derive(Debug)]
pub enum Event {
    /// The connection is established: requests can be queued.
    Connected(usize),
    /// New bytes are at the end of [`Fleet::input`].
    Input(usize),
    /// The peer closed (`None`) or the socket failed.
    Closed(usize, Option<std::io::Error>),
}

struct Link {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    connected: bool,
    closed: bool,
}

pub struct Fleet {
    poll: Poll,
    events: Events,
    links: Vec<Link>,
    scratch: Vec<u8>,
    dirty: Vec<usize>,
}

impl Fleet {
    pub fn new() -> std::io::Result<Fleet> {
        Ok(Fleet {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            links: Vec::new(),
            scratch: vec![0; 64 << 10],
            dirty: Vec::new(),
        })
    }

    /// Start connecting (non-blocking); returns the connection's index.
    /// [`Event::Connected`] follows once it is up.
    pub fn connect(&mut self, addr: SocketAddr) -> std::io::Result<usize> {
        let i = self.links.len();
        let mut stream = TcpStream::connect(addr)?;
        self.poll.registry().register(
            &mut stream,
            Token(i),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.links.push(Link {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            connected: false,
            closed: false,
        });
        Ok(i)
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// Bytes received on connection `i` and not yet consumed: the caller
    /// parses from the front and drains what it used.
    pub fn input(&mut self, i: usize) -> &mut Vec<u8> {
        &mut self.links[i].input
    }

    /// Bytes to send on connection `i` (sent by the next flush).
    pub fn output(&mut self, i: usize) -> &mut Vec<u8> {
        self.dirty.push(i);
        &mut self.links[i].output
    }

    /// Encode a timeline request frame for connection `i`.
    pub fn queue(&mut self, i: usize, id: u64, request: &Request<'_>) {
        RequestFrame {
            id,
            request: request.clone(),
        }
        .encode_into(self.output(i));
    }

    /// Wait up to `timeout` for readiness; read what arrived.
    pub fn poll(&mut self, timeout: Option<Duration>) -> std::io::Result<Vec<Event>> {
        self.poll.poll(&mut self.events, timeout)?;
        let mut out = Vec::new();
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token().0,
                    e.is_readable() || e.is_read_closed(),
                    e.is_writable() || e.is_error(),
                )
            })
            .collect();
        for (i, readable, writable) in ready {
            let Some(l) = self.links.get_mut(i) else {
                continue;
            };
            if l.closed {
                continue;
            }
            if writable && !l.connected {
                if let Some(e) = l.stream.take_error()? {
                    l.closed = true;
                    out.push(Event::Closed(i, Some(e)));
                    continue;
                }
                if l.stream.peer_addr().is_err() {
                    continue; // not connected yet (a spurious edge)
                }
                l.connected = true;
                let _ = l.stream.set_nodelay(true);
                out.push(Event::Connected(i));
            }
            if writable {
                self.dirty.push(i);
            }
            if readable {
                match Self::read_all(l, &mut self.scratch) {
                    Ok(true) => out.push(Event::Input(i)),
                    Ok(false) => {}
                    Err(e) => {
                        l.closed = true;
                        out.push(Event::Closed(i, e));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Read until `WouldBlock`; true if anything came. `Err(None)`: EOF.
    fn read_all(l: &mut Link, scratch: &mut [u8]) -> Result<bool, Option<std::io::Error>> {
        let mut any = false;
        loop {
            match l.stream.read(scratch) {
                Ok(0) => return Err(None),
                Ok(n) => {
                    l.input.extend_from_slice(&scratch[..n]);
                    any = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Some(e)),
            }
        }
    }

    /// Write what every connection has queued, as far as the sockets take
    /// it (the rest goes when they are writable again).
    pub fn flush_all(&mut self) -> std::io::Result<()> {
        let mut list = std::mem::take(&mut self.dirty);
        list.sort_unstable();
        list.dedup();
        for i in list {
            let l = &mut self.links[i];
            if !l.connected || l.closed {
                continue;
            }
            while !l.output.is_empty() {
                match l.stream.write(&l.output) {
                    Ok(n) => {
                        l.output.drain(..n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}
