//! Shared toy protocol + producer thread + listener helper (identical for all servers).
use std::net::SocketAddr;
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::Duration;

pub const HDR: usize = 16;
/// Server -> client push frame (body 100 bytes, body[0..8] = producer CLOCK_MONOTONIC ns).
pub const OP_PUSH: u16 = 0xFFFF;
/// Client -> server control: body = interval_ns:u32, count:u32. Starts the producer. Echoed like any frame.
pub const OP_CTRL_PUSH: u16 = 0xFF01;
pub const PUSH_BODY: usize = 100;

#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[inline]
pub fn put_header(out: &mut Vec<u8>, len: u32, op: u16, flags: u16, rid: u64) {
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&op.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&rid.to_le_bytes());
}

pub fn encode(out: &mut Vec<u8>, op: u16, flags: u16, rid: u64, body: &[u8]) {
    put_header(out, body.len() as u32, op, flags, rid);
    out.extend_from_slice(body);
}

pub fn push_frame(out: &mut Vec<u8>, ts: u64) {
    put_header(out, PUSH_BODY as u32, OP_PUSH, 0, 0);
    out.extend_from_slice(&ts.to_le_bytes());
    out.resize(out.len() + PUSH_BODY - 8, 0xAB);
}

/// Parse one frame header at the start of `b`: (body_len, op, flags, rid).
#[inline]
pub fn parse_header(b: &[u8]) -> (usize, u16, u16, u64) {
    let len = u32::from_le_bytes(b[0..4].try_into().unwrap()) as usize;
    let op = u16::from_le_bytes(b[4..6].try_into().unwrap());
    let flags = u16::from_le_bytes(b[6..8].try_into().unwrap());
    let rid = u64::from_le_bytes(b[8..16].try_into().unwrap());
    (len, op, flags, rid)
}

/// Server side: answer every complete frame in `inp` (echo, same op + rid, in order),
/// appending replies to `out`. Returns bytes consumed.
pub fn process(inp: &[u8], out: &mut Vec<u8>) -> usize {
    let mut pos = 0;
    while inp.len() - pos >= HDR {
        let (len, op, flags, rid) = parse_header(&inp[pos..]);
        if inp.len() - pos - HDR < len {
            break;
        }
        let body = &inp[pos + HDR..pos + HDR + len];
        if op == OP_CTRL_PUSH && len >= 8 {
            let interval = u32::from_le_bytes(body[0..4].try_into().unwrap());
            let count = u32::from_le_bytes(body[4..8].try_into().unwrap());
            if let Some(tx) = PRODUCER.get() {
                let _ = tx.lock().unwrap().send((interval, count));
            }
        }
        encode(out, op, flags, rid, body);
        pos += HDR + len;
    }
    pos
}

static PRODUCER: OnceLock<Mutex<mpsc::Sender<(u32, u32)>>> = OnceLock::new();

/// Spawn the producer thread (simulated storage worker). It sleeps on a channel until a
/// control frame arrives, then emits `count` pushes paced every `interval_ns`, handing push
/// k to shard (event loop) k % nshards through `deliver(shard, ts)`; the loop picks the
/// connection (round robin over its connections) and writes the frame.
pub fn spawn_producer<F>(nshards: usize, deliver: F)
where
    F: Fn(usize, u64) + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<(u32, u32)>();
    PRODUCER.set(Mutex::new(tx)).ok();
    std::thread::Builder::new()
        .name("producer".into())
        .spawn(move || {
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0, 0, 0) };
            while let Ok((interval, count)) = rx.recv() {
                let start = now_ns();
                let interval = interval.max(1) as u64;
                let mut k: u64 = 0;
                let mut late_batches = 0u64;
                while k < count as u64 {
                    let due = start + k * interval;
                    let now = now_ns();
                    if now < due {
                        std::thread::sleep(Duration::from_nanos(due - now));
                        continue;
                    }
                    // emit everything that is due now (catch up after oversleeping)
                    let mut n = 0;
                    while k < count as u64 && start + k * interval <= now {
                        deliver((k as usize) % nshards, now_ns());
                        k += 1;
                        n += 1;
                    }
                    if n > 1 {
                        late_batches += 1;
                    }
                }
                let el = (now_ns() - start) as f64 / 1e9;
                eprintln!(
                    "producer: {} pushes in {:.3}s = {:.0}/s ({} catch-up batches)",
                    count,
                    el,
                    count as f64 / el,
                    late_batches
                );
            }
        })
        .unwrap();
}

/// Non-blocking SO_REUSEPORT listener (one per event loop; the kernel spreads connections).
pub fn reuseport_listener(addr: SocketAddr) -> std::net::TcpListener {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    s.set_nonblocking(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(4096).unwrap();
    s.into()
}

pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    for i in 0..args.len() {
        if args[i] == name && i + 1 < args.len() {
            return args[i + 1].clone();
        }
    }
    default.to_string()
}
