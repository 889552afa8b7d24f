//! Single-threaded mio load driver. Phases, in this order, against one server process:
//!  A idle: N connections (window of W concurrent connects), each sends one frame and waits
//!    for the echo; then measures server VmRSS/Threads and idle CPU over --idle-secs.
//!  C push: with the N connections still open, sends OP_CTRL_PUSH (rate, count) and records
//!    producer->client latency of every push (first second discarded as warm-up).
//!  (the N connections are closed with SO_LINGER 0)
//!  B throughput: for each "CxD" in --tp, C connections x D requests in flight (100-byte
//!    bodies), each batch of replies read is answered with the same number of new requests
//!    in one write; counts replies over --tp-secs after 1 s warm-up.
use common::*;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

struct C {
    sock: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    connected: bool,
    done: bool,
    next_rid: u64,   // next rid to send
    expect_rid: u64, // next rid expected back
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for l in s.lines() {
        if let Some(r) = l.strip_prefix(key) {
            return r.trim_start_matches(':').split_whitespace().next().unwrap().parse().unwrap();
        }
    }
    0
}
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after ')' start at field 3 (state); utime = field 14, stime = field 15
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
fn tick_ms() -> f64 {
    1000.0 / unsafe { libc_sysconf_clk_tck() } as f64
}
extern "C" {
    fn sysconf(name: i32) -> i64;
}
unsafe fn libc_sysconf_clk_tck() -> i64 {
    sysconf(2) // _SC_CLK_TCK
}

fn flush(c: &mut C) -> bool {
    while c.out_pos < c.out.len() {
        match c.sock.write(&c.out[c.out_pos..]) {
            Ok(0) => return false,
            Ok(n) => c.out_pos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    c.out.clear();
    c.out_pos = 0;
    true
}

/// read until WouldBlock; call f(op, rid, body, recv_ns) for each frame. false => closed/error
fn read_frames(c: &mut C, f: &mut dyn FnMut(u16, u64, &[u8], u64)) -> bool {
    loop {
        if c.inbuf.capacity() - c.inbuf.len() < 8192 {
            c.inbuf.reserve(16384);
        }
        let len = c.inbuf.len();
        let spare = c.inbuf.capacity() - len;
        let dst = unsafe { std::slice::from_raw_parts_mut(c.inbuf.as_mut_ptr().add(len), spare) };
        match c.sock.read(dst) {
            Ok(0) => return false,
            Ok(n) => {
                unsafe { c.inbuf.set_len(len + n) };
                let now = now_ns();
                let mut pos = 0;
                while c.inbuf.len() - pos >= HDR {
                    let (blen, op, _fl, rid) = parse_header(&c.inbuf[pos..]);
                    if c.inbuf.len() - pos - HDR < blen {
                        break;
                    }
                    f(op, rid, &c.inbuf[pos + HDR..pos + HDR + blen], now);
                    pos += HDR + blen;
                }
                c.inbuf.drain(..pos);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn new_conn(sock: TcpStream, connected: bool) -> C {
    let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
    let _ = sock.set_nodelay(true);
    C { sock, inbuf: Vec::new(), out: Vec::new(), out_pos: 0, connected, done: false, next_rid: 0, expect_rid: 0 }
}

fn main() {
    let addr: std::net::SocketAddr = arg("--addr", "127.0.0.1:7001").parse().unwrap();
    let pid: u32 = arg("--pid", "0").parse().unwrap();
    let label = arg("--label", "?");
    let n: usize = arg("--conns", "10000").parse().unwrap();
    let window: usize = arg("--window", "256").parse().unwrap();
    let idle_secs: u64 = arg("--idle-secs", "10").parse().unwrap();
    let push_rate: u64 = arg("--push-rate", "20000").parse().unwrap();
    let push_secs: u64 = arg("--push-secs", "10").parse().unwrap();
    let tp = arg("--tp", "50x16,4x256");
    let tp_secs: u64 = arg("--tp-secs", "10").parse().unwrap();
    let tms = tick_ms();
    let mut json: Vec<String> = vec![format!("\"label\":\"{label}\"")];

    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(4096);

    // ---------------- A: idle connections ----------------
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = proc_status(pid, "VmRSS");
    let thr0 = proc_status(pid, "Threads");
    let mut conns: Slab<C> = Slab::with_capacity(n);
    let mut started = 0usize;
    let mut done = 0usize;
    let mut errors = 0usize;
    let mut hello = Vec::new();
    encode(&mut hello, 1, 0, 0, &[7u8; 16]);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(60);
    while done < n && Instant::now() < deadline {
        while started - done < window && started < n {
            let mut sock = TcpStream::connect(addr).unwrap();
            let e = conns.vacant_entry();
            poll.registry().register(&mut sock, Token(e.key()), Interest::READABLE | Interest::WRITABLE).unwrap();
            e.insert(new_conn(sock, false));
            started += 1;
        }
        poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        for ev in events.iter() {
            let k = ev.token().0;
            let Some(c) = conns.get_mut(k) else { continue };
            let mut ok = true;
            if !c.connected && (ev.is_writable() || ev.is_error()) {
                match c.sock.take_error() {
                    Ok(None) if c.sock.peer_addr().is_ok() => {
                        c.connected = true;
                        c.out.extend_from_slice(&hello);
                        ok = flush(c);
                    }
                    Ok(None) => continue, // not yet
                    _ => ok = false,
                }
            }
            if ok && c.connected && ev.is_readable() {
                let mut got = false;
                ok = read_frames(c, &mut |_, _, _, _| got = true);
                if got && !c.done {
                    c.done = true;
                    done += 1;
                }
            }
            if ok && c.out.len() > c.out_pos {
                ok = flush(c);
            }
            if !ok {
                let mut c = conns.remove(k);
                let _ = poll.registry().deregister(&mut c.sock);
                errors += 1;
                if !c.done {
                    started -= 1; // retry
                } else {
                    done -= 1;
                    started -= 1;
                }
            }
        }
    }
    let conn_el = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let rss1 = proc_status(pid, "VmRSS");
    let thr1 = proc_status(pid, "Threads");
    let c0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(idle_secs));
    let c1 = cpu_ticks(pid);
    let idle_cpu_ms = (c1 - c0) as f64 * tms;
    eprintln!(
        "[{label}] A: {done}/{n} conns in {conn_el:.3}s ({:.0} conn/s, {errors} errs), RSS {rss0}->{rss1} kB ({:.2} kB/conn), threads {thr0}/{thr1}, idle cpu {idle_cpu_ms:.0} ms/{idle_secs}s",
        done as f64 / conn_el,
        (rss1 as f64 - rss0 as f64) / done.max(1) as f64
    );
    json.push(format!("\"conns\":{done},\"conn_errors\":{errors},\"conn_per_s\":{:.0},\"rss0_kb\":{rss0},\"rss1_kb\":{rss1},\"rss_kb_per_conn\":{:.3},\"threads_idle\":{thr0},\"threads_10k\":{thr1},\"idle_cpu_ms\":{idle_cpu_ms:.0}",
        done as f64 / conn_el, (rss1 as f64 - rss0 as f64) / done.max(1) as f64));

    // ---------------- C: push latency ----------------
    if push_secs > 0 && done > 0 {
        let count = (push_rate * push_secs) as u32;
        let interval_ns = (1_000_000_000 / push_rate) as u32;
        let mut body = Vec::new();
        body.extend_from_slice(&interval_ns.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
        let first = conns.iter().next().unwrap().0;
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        let mut received = 0u64;
        let start_ns = now_ns();
        let warm_ns = start_ns + 1_000_000_000;
        {
            let c = &mut conns[first];
            encode(&mut c.out, OP_CTRL_PUSH, 0, 999, &body);
            flush(c);
        }
        let p0 = cpu_ticks(pid);
        let tend = Instant::now() + Duration::from_secs(push_secs) + Duration::from_millis(1500);
        let mut p1 = None;
        let tcpu = Instant::now() + Duration::from_secs(push_secs);
        while Instant::now() < tend {
            poll.poll(&mut events, Some(Duration::from_millis(20))).unwrap();
            for ev in events.iter() {
                let k = ev.token().0;
                let Some(c) = conns.get_mut(k) else { continue };
                if ev.is_readable() {
                    read_frames(c, &mut |op, _, b, now| {
                        if op == OP_PUSH {
                            received += 1;
                            let ts = u64::from_le_bytes(b[0..8].try_into().unwrap());
                            if ts >= warm_ns {
                                hist.record(now.saturating_sub(ts).max(1)).unwrap();
                            }
                        }
                    });
                }
            }
            if p1.is_none() && Instant::now() >= tcpu {
                p1 = Some(cpu_ticks(pid));
            }
        }
        let push_cpu = (p1.unwrap_or(p0) - p0) as f64 * tms / (push_secs as f64 * 10.0); // % of one core
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        eprintln!(
            "[{label}] C: {received}/{count} pushes, lat us p50 {:.1} p99 {:.1} p999 {:.1} max {:.1}, server cpu {push_cpu:.1}%",
            us(0.5), us(0.99), us(0.999), hist.max() as f64 / 1000.0
        );
        json.push(format!("\"push_sent\":{count},\"push_recv\":{received},\"push_p50_us\":{:.1},\"push_p99_us\":{:.1},\"push_p999_us\":{:.1},\"push_max_us\":{:.1},\"push_server_cpu_pct\":{push_cpu:.1}",
            us(0.5), us(0.99), us(0.999), hist.max() as f64 / 1000.0));
    }
    for mut c in conns.drain() {
        let _ = poll.registry().deregister(&mut c.sock);
    }
    std::thread::sleep(Duration::from_secs(1));

    // ---------------- B: pipelined throughput ----------------
    let mut req = Vec::new();
    encode(&mut req, 2, 0, 0, &[0x5Au8; 100]);
    for spec in tp.split(',').filter(|s| !s.is_empty()) {
        let (nc, depth) = spec.split_once('x').unwrap();
        let (nc, depth): (usize, u64) = (nc.parse().unwrap(), depth.parse().unwrap());
        let mut cs: Slab<C> = Slab::new();
        for _ in 0..nc {
            let s = std::net::TcpStream::connect(addr).unwrap();
            s.set_nonblocking(true).unwrap();
            let mut sock = TcpStream::from_std(s);
            let e = cs.vacant_entry();
            poll.registry().register(&mut sock, Token(e.key()), Interest::READABLE | Interest::WRITABLE).unwrap();
            let mut c = new_conn(sock, true);
            for _ in 0..depth {
                req[8..16].copy_from_slice(&c.next_rid.to_le_bytes());
                c.out.extend_from_slice(&req);
                c.next_rid += 1;
            }
            flush(&mut c);
            e.insert(c);
        }
        let t0 = Instant::now();
        let w0 = t0 + Duration::from_secs(1);
        let w1 = w0 + Duration::from_secs(tp_secs);
        let (mut in_window, mut started_w, mut misorder) = (0u64, false, 0u64);
        let (mut k0, mut k1) = (0, 0);
        loop {
            let now = Instant::now();
            if !started_w && now >= w0 {
                started_w = true;
                in_window = 0;
                k0 = cpu_ticks(pid);
            }
            if now >= w1 {
                k1 = cpu_ticks(pid);
                break;
            }
            poll.poll(&mut events, Some(Duration::from_millis(10))).unwrap();
            for ev in events.iter() {
                let k = ev.token().0;
                let Some(c) = cs.get_mut(k) else { continue };
                let mut got = 0u64;
                if ev.is_readable() {
                    let mut exp = c.expect_rid;
                    read_frames(c, &mut |_, rid, _, _| {
                        if rid != exp {
                            misorder += 1;
                        }
                        exp = rid + 1;
                        got += 1;
                    });
                    c.expect_rid = exp;
                    for _ in 0..got {
                        req[8..16].copy_from_slice(&c.next_rid.to_le_bytes());
                        c.out.extend_from_slice(&req);
                        c.next_rid += 1;
                    }
                }
                in_window += got;
                if c.out.len() > c.out_pos {
                    flush(c);
                }
            }
        }
        let rps = in_window as f64 / tp_secs as f64;
        let cpu_ms = (k1 - k0) as f64 * tms;
        let cpu_pct = cpu_ms / (tp_secs as f64 * 10.0);
        let us_per_req = cpu_ms * 1000.0 / in_window.max(1) as f64;
        eprintln!("[{label}] B {spec}: {rps:.0} req/s, server cpu {cpu_pct:.0}% ({us_per_req:.2} us cpu/req), misordered {misorder}");
        json.push(format!("\"tp_{spec}_rps\":{rps:.0},\"tp_{spec}_server_cpu_pct\":{cpu_pct:.0},\"tp_{spec}_us_cpu_per_req\":{us_per_req:.3},\"tp_{spec}_misordered\":{misorder}"));
        for mut c in cs.drain() {
            let _ = poll.registry().deregister(&mut c.sock);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("{{{}}}", json.join(","));
}
