//! compio server: 2 threads, each its own compio Runtime (thread-per-core), one
//! SO_REUSEPORT listener per runtime. Driver: io_uring (default) or polling fallback
//! (`--driver poll`), both compiled in (compio "fusion" driver, chosen at runtime).
//! Per connection: reader task + writer task (owned halves, completion-based I/O with owned
//! buffers); the reader appends all replies of one read into the shared out buffer and
//! wakes the writer, which writes everything queued in one write_all.
//! Producer -> loop: futures_channel::mpsc::unbounded per shard (its waker wakes the compio
//! runtime from the producer thread).
use common::*;
use compio::buf::{BufResult, IntoInner, IoBufMut};
use compio::driver::{DriverType, ProactorBuilder};
use compio::io::{AsyncRead, AsyncWriteExt};
use compio::net::{TcpListener, TcpStream};
use futures_core::Stream;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};

const RBUF: usize = 8192;

#[derive(Default)]
struct LocalNotify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}
impl LocalNotify {
    fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.flag.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

#[derive(Default)]
struct ConnShared {
    out: RefCell<Vec<u8>>,
    notify: LocalNotify,
    closed: Cell<bool>,
}
type Registry = Rc<RefCell<Slab<Rc<ConnShared>>>>;

async fn writer(mut w: TcpStream, sh: Rc<ConnShared>) {
    let mut spare: Vec<u8> = Vec::new();
    loop {
        sh.notify.wait().await;
        if sh.closed.get() {
            break;
        }
        std::mem::swap(&mut spare, &mut *sh.out.borrow_mut());
        if spare.is_empty() {
            continue;
        }
        let BufResult(r, mut b) = w.write_all(spare).await;
        b.clear();
        spare = b;
        if r.is_err() {
            sh.closed.set(true);
            break;
        }
        if !sh.out.borrow().is_empty() {
            sh.notify.flag.set(true);
        }
    }
}

async fn conn(s: TcpStream, reg: Registry) {
    let _ = s.set_nodelay(true);
    let sh = Rc::new(ConnShared::default());
    let key = reg.borrow_mut().insert(sh.clone());
    let (mut r, w) = s.into_split();
    compio::runtime::spawn(writer(w, sh.clone())).detach();
    let mut inbuf: Vec<u8> = Vec::with_capacity(RBUF);
    loop {
        if inbuf.capacity() - inbuf.len() < 4096 {
            inbuf.reserve(RBUF);
        }
        // compio reads into the buffer from offset 0; `.uninit()` makes it append after len
        // (keeping a partial frame left over from the previous read).
        let BufResult(res, b) = r.read(inbuf.uninit()).await;
        inbuf = b.into_inner();
        match res {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if sh.closed.get() {
            break;
        }
        let used = process(&inbuf, &mut sh.out.borrow_mut());
        inbuf.drain(..used);
        if !sh.out.borrow().is_empty() {
            sh.notify.notify();
        }
    }
    sh.closed.set(true);
    sh.notify.notify();
    reg.borrow_mut().remove(key);
}

async fn dispatcher(mut rx: futures_channel::mpsc::UnboundedReceiver<u64>, reg: Registry) {
    let mut rr = 0usize;
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut rx).poll_next(cx)).await;
        let Some(ts) = next else { break };
        let target = {
            let r = reg.borrow();
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
            push_frame(&mut c.out.borrow_mut(), ts);
            c.notify.notify();
        }
    }
}

fn main() {
    let addr: std::net::SocketAddr = arg("--addr", "127.0.0.1:7003").parse().unwrap();
    let n: usize = arg("--loops", "2").parse().unwrap();
    let driver = arg("--driver", "uring");
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..n {
        let (tx, rx) = futures_channel::mpsc::unbounded::<u64>();
        txs.push(tx);
        rxs.push(rx);
    }
    spawn_producer(n, move |i, ts| {
        let _ = txs[i].unbounded_send(ts);
    });
    let mut hs = Vec::new();
    for (i, rx) in rxs.into_iter().enumerate() {
        let driver = driver.clone();
        hs.push(
            std::thread::Builder::new()
                .name(format!("loop{i}"))
                .spawn(move || {
                    let mut pb = ProactorBuilder::new();
                    pb.capacity(4096);
                    pb.driver_type(if driver == "poll" { DriverType::Poll } else { DriverType::IoUring });
                    let rt = compio::runtime::RuntimeBuilder::new().with_proactor(pb).build().expect("compio runtime");
                    eprintln!("srv-compio loop{i}: driver {:?} on {addr}", rt.driver_type());
                    rt.block_on(async move {
                        let reg: Registry = Rc::new(RefCell::new(Slab::with_capacity(8192)));
                        let std_l = reuseport_listener(addr);
                        // io_uring accept must see a blocking fd (from_std re-enables O_NONBLOCK for the poll driver)
                        std_l.set_nonblocking(false).unwrap();
                        let l = TcpListener::from_std(std_l).unwrap();
                        compio::runtime::spawn(dispatcher(rx, reg.clone())).detach();
                        loop {
                            match l.accept().await {
                                Ok((s, _)) => compio::runtime::spawn(conn(s, reg.clone())).detach(),
                                Err(e) => eprintln!("accept: {e}"),
                            }
                        }
                    });
                })
                .unwrap(),
        );
    }
    for h in hs {
        h.join().unwrap();
    }
}
