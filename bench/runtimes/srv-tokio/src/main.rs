//! tokio server. Default: 2 threads, each with its own current_thread runtime + LocalSet,
//! one SO_REUSEPORT listener per runtime, one task per connection (single task, select!
//! over read and a push Notify). `--mt`: one multi-thread runtime with 2 workers, same code
//! spawned with tokio::spawn (2 reuseport listeners / shards).
//! Producer -> loop: tokio::sync::mpsc::unbounded_channel per shard.
use common::*;
use slab::Slab;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

const RBUF: usize = 8192;

struct ConnShared {
    pending: Mutex<Vec<u8>>, // pushes waiting to be written
    notify: Notify,
}
type Registry = Arc<Mutex<Slab<Arc<ConnShared>>>>;

async fn conn_task(mut s: TcpStream, reg: Registry) {
    let _ = s.set_nodelay(true);
    let sh = Arc::new(ConnShared { pending: Mutex::new(Vec::new()), notify: Notify::new() });
    let key = reg.lock().unwrap().insert(sh.clone());
    let mut inbuf: Vec<u8> = Vec::with_capacity(RBUF);
    let mut out: Vec<u8> = Vec::new();
    loop {
        if inbuf.capacity() - inbuf.len() < 4096 {
            inbuf.reserve(RBUF);
        }
        tokio::select! {
            biased;
            r = s.read_buf(&mut inbuf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let used = process(&inbuf, &mut out);
                    inbuf.drain(..used);
                }
            },
            _ = sh.notify.notified() => {}
        }
        {
            let mut p = sh.pending.lock().unwrap();
            if !p.is_empty() {
                out.extend_from_slice(&p);
                p.clear();
            }
        }
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    }
    reg.lock().unwrap().remove(key);
}

async fn dispatcher(mut rx: mpsc::UnboundedReceiver<u64>, reg: Registry) {
    let mut rr = 0usize;
    while let Some(ts) = rx.recv().await {
        let target = {
            let r = reg.lock().unwrap();
            let cap = r.capacity();
            let mut t = None;
            for _ in 0..cap {
                rr = (rr + 1) % cap.max(1);
                if let Some(c) = r.get(rr) {
                    t = Some(c.clone());
                    break;
                }
            }
            t
        };
        if let Some(c) = target {
            push_frame(&mut c.pending.lock().unwrap(), ts);
            c.notify.notify_one();
        }
    }
}

async fn acceptor(l: TcpListener, reg: Registry, local: bool) {
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                if local {
                    tokio::task::spawn_local(conn_task(s, reg.clone()));
                } else {
                    tokio::spawn(conn_task(s, reg.clone()));
                }
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

fn main() {
    let addr: std::net::SocketAddr = arg("--addr", "127.0.0.1:7002").parse().unwrap();
    let n: usize = arg("--loops", "2").parse().unwrap();
    let mt = std::env::args().any(|a| a == "--mt");
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..n {
        let (tx, rx) = mpsc::unbounded_channel::<u64>();
        txs.push(tx);
        rxs.push(rx);
    }
    spawn_producer(n, move |i, ts| {
        let _ = txs[i].send(ts);
    });
    if mt {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build().unwrap();
        eprintln!("srv-tokio multi-thread({n} workers) on {addr}");
        rt.block_on(async move {
            let mut hs = Vec::new();
            for rx in rxs {
                let reg: Registry = Arc::new(Mutex::new(Slab::with_capacity(8192)));
                let l = TcpListener::from_std(reuseport_listener(addr)).unwrap();
                tokio::spawn(dispatcher(rx, reg.clone()));
                hs.push(tokio::spawn(acceptor(l, reg, false)));
            }
            for h in hs {
                let _ = h.await;
            }
        });
    } else {
        eprintln!("srv-tokio {n} x current_thread+LocalSet on {addr}");
        let mut hs = Vec::new();
        for (i, rx) in rxs.into_iter().enumerate() {
            hs.push(
                std::thread::Builder::new()
                    .name(format!("loop{i}"))
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                        let ls = tokio::task::LocalSet::new();
                        ls.block_on(&rt, async move {
                            let reg: Registry = Arc::new(Mutex::new(Slab::with_capacity(8192)));
                            let l = TcpListener::from_std(reuseport_listener(addr)).unwrap();
                            tokio::task::spawn_local(dispatcher(rx, reg.clone()));
                            acceptor(l, reg, true).await;
                        });
                    })
                    .unwrap(),
            );
        }
        for h in hs {
            h.join().unwrap();
        }
    }
}
