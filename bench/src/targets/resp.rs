//! A lean RESP2 reply reader for `--target redis`'s timed loops.
//!
//! Why not the `redis` crate's `recv_response` everywhere: on the 2-core
//! machine, client and server share the CPU, and the crate's
//! combinator-based parser spends about 20 us of client CPU per 20-entry
//! `XRANGE` reply, more than redis-server spends answering it, so a run
//! measured the client library rather than Redis. This reader does what
//! `timeline_server::Client` does for the server target: buffer the socket,
//! cut one reply off the front, copy its strings once into owned values
//! (`redis::Value`, so the checks are the same whichever reader ran).
//! Commands are still packed by the crate (`redis::cmd`), and
//! `TIMELINE_BENCH_REDIS_CLIENT=crate` runs the timed loops on the crate's
//! connection instead, to measure the difference.

use redis::Value;
use std::io::{Read, Write};
use std::net::TcpStream;

/// A reply: a value, or the server's error line.
pub type Reply = std::result::Result<Value, String>;

/// Deepest nesting accepted (XRANGE replies are 3 deep).
const MAX_DEPTH: usize = 8;

pub struct Conn {
    s: TcpStream,
    rbuf: Vec<u8>,
    start: usize,
}

impl Conn {
    pub fn connect(port: u16) -> std::io::Result<Conn> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            rbuf: Vec::with_capacity(64 << 10),
            start: 0,
        })
    }

    pub fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    /// The next reply (blocking).
    pub fn recv(&mut self) -> std::io::Result<Reply> {
        loop {
            match parse(&self.rbuf[self.start..], 0) {
                Ok(Some((r, used))) => {
                    self.start += used;
                    if self.start == self.rbuf.len() {
                        self.rbuf.clear();
                        self.start = 0;
                    }
                    return Ok(r);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("RESP: {e}"),
                    ))
                }
            }
            if self.start > 0 {
                self.rbuf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 64 << 10];
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One line (without CRLF) at the front of `b`, and the bytes it took.
fn line(b: &[u8]) -> Option<(&[u8], usize)> {
    let i = b.windows(2).position(|w| w == b"\r\n")?;
    Some((&b[..i], i + 2))
}

fn int(b: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad integer {:?}", String::from_utf8_lossy(b)))
}

/// Parse one reply off the front of `b`: `Ok(None)` if incomplete.
pub(crate) fn parse(b: &[u8], depth: usize) -> Result<Option<(Reply, usize)>, String> {
    if depth > MAX_DEPTH {
        return Err("nesting too deep".into());
    }
    let Some(&tag) = b.first() else {
        return Ok(None);
    };
    let Some((l, n)) = line(&b[1..]) else {
        return Ok(None);
    };
    let used = 1 + n;
    Ok(Some(match tag {
        b'+' => (
            Ok(Value::SimpleString(String::from_utf8_lossy(l).into_owned())),
            used,
        ),
        b'-' => (Err(String::from_utf8_lossy(l).into_owned()), used),
        b':' => (Ok(Value::Int(int(l)?)), used),
        b'$' => {
            let len = int(l)?;
            if len < 0 {
                return Ok(Some((Ok(Value::Nil), used)));
            }
            let len = len as usize;
            let Some(body) = b.get(used..used + len) else {
                return Ok(None);
            };
            if b.len() < used + len + 2 {
                return Ok(None);
            }
            if &b[used + len..used + len + 2] != b"\r\n" {
                return Err("bulk string without CRLF".into());
            }
            (Ok(Value::BulkString(body.to_vec())), used + len + 2)
        }
        b'*' => {
            let count = int(l)?;
            if count < 0 {
                return Ok(Some((Ok(Value::Nil), used)));
            }
            let mut at = used;
            let mut items = Vec::with_capacity((count as usize).min(1024));
            let mut first_err = None;
            for _ in 0..count {
                let Some((r, n)) = parse(&b[at..], depth + 1)? else {
                    return Ok(None);
                };
                at += n;
                match r {
                    Ok(v) => items.push(v),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            match first_err {
                Some(e) => (Err(e), at),
                None => (Ok(Value::Array(items)), at),
            }
        }
        t => return Err(format!("unknown reply type {:?}", t as char)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xrange_shapes_and_partial_input() {
        let msg = b"*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\np\r\n$2\r\nhi\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\np\r\n$0\r\n\r\n";
        for cut in 0..msg.len() {
            assert!(matches!(parse(&msg[..cut], 0), Ok(None)), "cut {cut}");
        }
        let (r, used) = parse(msg, 0).ok().flatten().expect("a whole reply");
        assert_eq!(used, msg.len());
        let v = r.expect("not an error");
        let Value::Array(e) = v else {
            panic!("not an array")
        };
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            Value::Array(vec![
                Value::BulkString(b"1-0".to_vec()),
                Value::Array(vec![
                    Value::BulkString(b"p".to_vec()),
                    Value::BulkString(b"hi".to_vec())
                ])
            ])
        );
        let r = parse(b"-ERR no\r\n:5\r\n", 0)
            .ok()
            .flatten()
            .expect("error reply");
        assert_eq!(r, (Err("ERR no".to_string()), 9));
        let r = parse(b":5\r\n", 0).ok().flatten().expect("integer");
        assert_eq!(r, (Ok(Value::Int(5)), 4));
        assert!(parse(b"?x\r\n", 0).is_err());
    }
}
