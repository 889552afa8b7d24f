//! mio 1.x server: one Poll per thread (2 loops), edge-triggered, Slab of connections,
//! one SO_REUSEPORT listener per loop, mio::Waker + Mutex<Vec> queue for producer pushes.
use common::*;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use std::io::{ErrorKind, Read, Write};
use std::sync::{Arc, Mutex};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const RBUF: usize = 8192;

struct Shard {
    q: Mutex<Vec<u64>>,
    waker: Waker,
}

struct Conn {
    sock: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
}

/// write as much of out as possible; Err => close
fn flush(c: &mut Conn) -> std::io::Result<()> {
    while c.out_pos < c.out.len() {
        match c.sock.write(&c.out[c.out_pos..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => c.out_pos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    c.out.clear();
    c.out_pos = 0;
    Ok(())
}

/// One read pass (edge-triggered: until WouldBlock), replies coalesced into one output buffer.
fn on_readable(c: &mut Conn) -> std::io::Result<bool> {
    loop {
        if c.inbuf.capacity() - c.inbuf.len() < 4096 {
            c.inbuf.reserve(RBUF);
        }
        let len = c.inbuf.len();
        let spare = c.inbuf.capacity() - len;
        // read into spare capacity (same strategy as the completion-based servers)
        let dst = unsafe { std::slice::from_raw_parts_mut(c.inbuf.as_mut_ptr().add(len), spare) };
        match c.sock.read(dst) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                unsafe { c.inbuf.set_len(len + n) };
                let used = process(&c.inbuf, &mut c.out);
                c.inbuf.drain(..used);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn run_loop(mut poll: Poll, shard: Arc<Shard>, addr: std::net::SocketAddr) {
    let mut listener = TcpListener::from_std(reuseport_listener(addr));
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE).unwrap();
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<Conn> = Slab::with_capacity(8192);
    let mut rr = 0usize;
    let mut pending: Vec<u64> = Vec::new();
    let mut dropped = 0u64;
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            panic!("{e}");
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => loop {
                    match listener.accept() {
                        Ok((mut sock, _)) => {
                            let _ = sock.set_nodelay(true);
                            let e = conns.vacant_entry();
                            poll.registry()
                                .register(&mut sock, Token(e.key()), Interest::READABLE | Interest::WRITABLE)
                                .unwrap();
                            e.insert(Conn { sock, inbuf: Vec::with_capacity(RBUF), out: Vec::new(), out_pos: 0 });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            eprintln!("accept: {e}");
                            break;
                        }
                    }
                },
                WAKER => {
                    std::mem::swap(&mut pending, &mut *shard.q.lock().unwrap());
                    for ts in pending.drain(..) {
                        if conns.is_empty() {
                            dropped += 1;
                            continue;
                        }
                        // round-robin pick of the next live connection
                        let cap = conns.capacity();
                        let mut key = None;
                        for _ in 0..cap {
                            rr = (rr + 1) % cap;
                            if conns.contains(rr) {
                                key = Some(rr);
                                break;
                            }
                        }
                        let Some(k) = key else { continue };
                        let c = &mut conns[k];
                        let was_empty = c.out.len() == c.out_pos;
                        push_frame(&mut c.out, ts);
                        if was_empty && flush(c).is_err() {
                            let mut c = conns.remove(k);
                            let _ = poll.registry().deregister(&mut c.sock);
                        }
                    }
                    if dropped > 0 && dropped % 10000 == 1 {
                        eprintln!("mio: pushes dropped (no conns): {dropped}");
                    }
                }
                Token(k) => {
                    let Some(c) = conns.get_mut(k) else { continue };
                    let mut alive = true;
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        alive = matches!(on_readable(c), Ok(true));
                    }
                    if alive && (c.out.len() > c.out_pos) {
                        alive = flush(c).is_ok();
                    }
                    if !alive {
                        let mut c = conns.remove(k);
                        let _ = poll.registry().deregister(&mut c.sock);
                    }
                }
            }
        }
    }
}

fn main() {
    let addr: std::net::SocketAddr = arg("--addr", "127.0.0.1:7001").parse().unwrap();
    let nloops: usize = arg("--loops", "2").parse().unwrap();
    let mut shards = Vec::new();
    let mut polls = Vec::new();
    for _ in 0..nloops {
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), WAKER).unwrap();
        shards.push(Arc::new(Shard { q: Mutex::new(Vec::new()), waker }));
        polls.push(poll);
    }
    let s2 = shards.clone();
    spawn_producer(nloops, move |i, ts| {
        let sh = &s2[i];
        let was_empty = {
            let mut q = sh.q.lock().unwrap();
            q.push(ts);
            q.len() == 1
        };
        if was_empty {
            sh.waker.wake().unwrap();
        }
    });
    let mut hs = Vec::new();
    for (i, poll) in polls.into_iter().enumerate() {
        let sh = shards[i].clone();
        hs.push(std::thread::Builder::new().name(format!("loop{i}")).spawn(move || run_loop(poll, sh, addr)).unwrap());
    }
    eprintln!("srv-mio listening on {addr} with {nloops} loops (SO_REUSEPORT)");
    for h in hs {
        h.join().unwrap();
    }
}
