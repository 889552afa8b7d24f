//! Model checks of the fan-out hand-off and the marks readers trust. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p timeline-engine --release loom`.
//! A lost wake-up shows up as a loom deadlock; a missing Release/Acquire as a
//! failed assertion in some interleaving.

use super::mailbox::{Mailbox, RoomWaiter, Signal};
use super::ring::Ring;
use super::watermark::{CompletionWindow, Latch, Watermark};
use crate::sync::{Arc, AtomicU64, Ordering};
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// Drain `mb` until `n` items arrived, sleeping on `sig` in between.
fn consume(mb: &Mailbox<u32>, sig: &Signal, n: usize) -> Vec<u32> {
    let mut got = Vec::new();
    loop {
        while let Some(x) = mb.pop() {
            got.push(x);
        }
        mb.made_room();
        if got.len() >= n {
            return got;
        }
        sig.wait();
    }
}

#[test]
fn loom_mailbox_wakes_consumer_and_blocked_producers() {
    // Capacity 1 and two producers: one of them must block on a full queue
    // (backpressure) and be woken when the consumer makes room.
    model(|| {
        let sig = Arc::new(Signal::default());
        let mb = Arc::new(Mailbox::new(1, sig.clone()));
        let hs: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|v| {
                let mb = mb.clone();
                thread::spawn(move || mb.push(v).is_ok())
            })
            .collect();
        let mut got = consume(&mb, &sig, 2);
        for h in hs {
            assert!(h.join().unwrap());
        }
        got.sort();
        assert_eq!(got, vec![1, 2]);
    });
}

#[test]
fn loom_mailbox_room_wakes_a_registered_signal() {
    // A producer that must not block (a worker with its own mailboxes)
    // registers its signal for room, retries, and sleeps on the signal: the
    // consumer's pop must wake it, whatever the interleaving.
    model(|| {
        let sig = Arc::new(Signal::default());
        let mb = Arc::new(Mailbox::new(1, sig.clone()));
        assert!(mb.try_push(1).is_ok()); // full
        let p = {
            let mb = mb.clone();
            thread::spawn(move || {
                let mine = Arc::new(Signal::default());
                let mut v = 2;
                loop {
                    match mb.try_push(v) {
                        Ok(()) => return true,
                        Err(super::mailbox::PushError::Full(x)) => v = x,
                        Err(super::mailbox::PushError::Closed(_)) => return false,
                    }
                    mb.notify_on_room(RoomWaiter::Signal(mine.clone()));
                    match mb.try_push(v) {
                        Ok(()) => return true,
                        Err(super::mailbox::PushError::Full(x)) => v = x,
                        Err(super::mailbox::PushError::Closed(_)) => return false,
                    }
                    mine.wait();
                }
            })
        };
        let got = consume(&mb, &sig, 2);
        assert!(p.join().unwrap());
        assert_eq!(got, vec![1, 2]);
    });
}

#[test]
fn loom_mailbox_two_mailboxes_one_signal() {
    // A worker sleeps on one signal for its request and delivery mailboxes.
    model(|| {
        let sig = Arc::new(Signal::default());
        let a = Arc::new(Mailbox::new(2, sig.clone()));
        let b = Arc::new(Mailbox::new(2, sig.clone()));
        let (a2, b2) = (a.clone(), b.clone());
        let h = thread::spawn(move || {
            a2.try_push(1u32).unwrap();
            b2.try_push(2u32).unwrap();
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            while let Some(x) = a.pop() {
                got.push(x);
            }
            while let Some(x) = b.pop() {
                got.push(x);
            }
            if got.len() < 2 {
                sig.wait();
            }
        }
        h.join().unwrap();
        got.sort();
        assert_eq!(got, vec![1, 2]);
    });
}

#[test]
fn loom_mailbox_close_keeps_queued_items_and_frees_blocked_producer() {
    model(|| {
        let sig = Arc::new(Signal::default());
        let mb = Arc::new(Mailbox::new(1, sig.clone()));
        mb.push(1u32).unwrap();
        let p = {
            let mb = mb.clone();
            // Blocks (full) until close: must return Err, not hang.
            thread::spawn(move || mb.push(2))
        };
        let c = {
            let mb = mb.clone();
            thread::spawn(move || mb.close())
        };
        c.join().unwrap();
        let pushed = p.join().unwrap();
        let mut got = Vec::new();
        while let Some(x) = mb.pop() {
            got.push(x);
        }
        // Either the producer got in before the close (and its item is
        // queued) or it was refused; the first item is never lost.
        match pushed {
            Ok(()) => assert_eq!(got, vec![1, 2]),
            Err(v) => {
                assert_eq!(v, 2);
                assert_eq!(got, vec![1]);
            }
        }
    });
}

#[test]
fn loom_watermark_reader_sees_every_record_below_it() {
    // Records are written Relaxed; only the watermark's Release/Acquire makes
    // them visible to a reader that trusts the mark.
    model(|| {
        let data = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let wm = Arc::new(Watermark::new(0));
        let w = {
            let (data, wm) = (data.clone(), wm.clone());
            thread::spawn(move || {
                for (i, d) in data.iter().enumerate() {
                    d.store(100 + i as u64, Ordering::Relaxed);
                    wm.publish(i as u64 + 1);
                }
            })
        };
        let seen = wm.get();
        for i in 0..seen as usize {
            assert_eq!(data[i].load(Ordering::Relaxed), 100 + i as u64);
        }
        w.join().unwrap();
        assert_eq!(wm.get(), 2);
    });
}

#[test]
fn loom_latch_last_arriver_sees_all_work() {
    model(|| {
        let data = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let latch = Arc::new(Latch::new(2));
        let hs: Vec<_> = (0..2)
            .map(|i| {
                let (data, latch) = (data.clone(), latch.clone());
                thread::spawn(move || {
                    data[i].store(1, Ordering::Relaxed);
                    if latch.arrive() {
                        // The acknowledger: both deliveries must be visible.
                        assert_eq!(data[0].load(Ordering::Relaxed), 1);
                        assert_eq!(data[1].load(Ordering::Relaxed), 1);
                        1
                    } else {
                        0
                    }
                })
            })
            .collect();
        let lasts: u32 = hs.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(lasts, 1);
    });
}

#[test]
fn loom_window_never_loses_an_advance() {
    // Batches 1 and 2 finish on different threads in either order: the mark
    // must end at 2, whichever thread did the advancing.
    model(|| {
        let w = Arc::new(CompletionWindow::new(0));
        let hs: Vec<_> = [1u64, 2]
            .into_iter()
            .map(|n| {
                let w = w.clone();
                thread::spawn(move || {
                    w.complete(n);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(w.done(), 2);
        assert!(w.has_room(2 + super::watermark::WINDOW));
    });
}

#[test]
fn loom_window_done_covers_the_work_of_the_batches() {
    // Each completer does its batch's work (a relaxed write) before
    // `complete`; a reader that sees `done() >= 2` must see both writes
    // (the journal's `done` mark is written on that promise).
    model(|| {
        let w = Arc::new(CompletionWindow::new(0));
        let work = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let hs: Vec<_> = [1u64, 2]
            .into_iter()
            .map(|n| {
                let (w, work) = (w.clone(), work.clone());
                thread::spawn(move || {
                    work[n as usize - 1].store(n, Ordering::Relaxed);
                    w.complete(n);
                })
            })
            .collect();
        while w.done() < 2 {
            thread::yield_now();
        }
        assert_eq!(work[0].load(Ordering::Relaxed), 1);
        assert_eq!(work[1].load(Ordering::Relaxed), 2);
        for h in hs {
            h.join().unwrap();
        }
    });
}

#[test]
fn loom_workers_feeding_each_other_never_deadlock() {
    // The worker protocol: deliveries to another worker use `try_push`; a
    // full mailbox keeps the item in a local outbox while the worker keeps
    // draining its own mailbox. Two workers with capacity-1 mailboxes each
    // send two items to the other: with blocking pushes both could block on
    // each other's full mailbox; with the outbox both always finish.
    use super::mailbox::PushError;
    model(|| {
        let sigs = [Arc::new(Signal::default()), Arc::new(Signal::default())];
        let boxes = Arc::new([
            Mailbox::new(1, sigs[0].clone()),
            Mailbox::new(1, sigs[1].clone()),
        ]);
        let hs: Vec<_> = (0..2usize)
            .map(|me| {
                let (boxes, sig) = (boxes.clone(), sigs[me].clone());
                thread::spawn(move || {
                    let other = 1 - me;
                    let mut outbox: Vec<u32> = vec![2, 1];
                    let mut got = 0;
                    while got < 2 || !outbox.is_empty() {
                        let mut progress = false;
                        if let Some(x) = outbox.pop() {
                            match boxes[other].try_push(x) {
                                Ok(()) => progress = true,
                                Err(PushError::Full(x)) | Err(PushError::Closed(x)) => {
                                    outbox.push(x)
                                }
                            }
                        }
                        while boxes[me].pop().is_some() {
                            got += 1;
                            progress = true;
                        }
                        boxes[me].made_room();
                        if !progress {
                            if outbox.is_empty() {
                                sig.wait();
                            } else {
                                thread::yield_now();
                            }
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    });
}

/// Pop `n` boxed items from `r`, yielding while it is empty.
fn pop_n(r: &Ring<Box<u32>>, n: usize) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        match r.pop() {
            Some(b) => got.push(*b),
            None => thread::yield_now(),
        }
    }
    got
}

#[test]
fn loom_ring_reuses_a_slot_only_after_its_item_moved_out() {
    // Capacity 1: the producer's second item goes into the slot the
    // consumer's pop is freeing. Items are boxed, so a read that does not
    // happen-after its write (or a write racing a read) is a loom failure
    // on the slot's cell, not only a wrong value.
    model(|| {
        let r = Arc::new(Ring::new(1));
        let p = {
            let r = r.clone();
            thread::spawn(move || {
                for v in [1u32, 2] {
                    let mut b = Box::new(v);
                    while let Err(x) = r.push(b) {
                        b = x;
                        thread::yield_now();
                    }
                }
            })
        };
        let got = pop_n(&r, 2);
        p.join().unwrap();
        assert_eq!(got, vec![1, 2]);
        assert!(r.pop().is_none());
    });
}

/// Two producer threads, pushing 10 and 20 into `r`; each returns whether
/// its push took.
fn push_10_and_20(r: &Arc<Ring<Box<u32>>>) -> Vec<thread::JoinHandle<bool>> {
    [10u32, 20]
        .into_iter()
        .map(|v| {
            let r = r.clone();
            thread::spawn(move || r.push(Box::new(v)).is_ok())
        })
        .collect()
}

#[test]
fn loom_ring_producers_never_share_a_slot() {
    // Two producers race for the positions of a two-slot ring: each item
    // arrives exactly once, each producer's in order, the consumer's count
    // agreeing with `len`.
    model(|| {
        let r = Arc::new(Ring::new(2));
        let pushed = push_10_and_20(&r)
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|ok| *ok)
            .count();
        assert_eq!(pushed, 2);
        assert_eq!(r.len(), 2);
        let mut got = vec![*r.pop().unwrap(), *r.pop().unwrap()];
        got.sort();
        assert_eq!(got, vec![10, 20]);
        assert!(r.pop().is_none());
    });
}

#[test]
fn loom_ring_consumer_races_two_producers() {
    // The consumer pops while both producers push into a two-slot ring.
    model(|| {
        let r = Arc::new(Ring::new(2));
        let hs = push_10_and_20(&r);
        let mut got = pop_n(&r, 2);
        for h in hs {
            assert!(h.join().unwrap(), "a two-slot ring took both");
        }
        got.sort();
        assert_eq!(got, vec![10, 20]);
    });
}

/// Every model above.
const MODELS: [(&str, fn()); 12] = [
    (
        "ring_reuse",
        loom_ring_reuses_a_slot_only_after_its_item_moved_out,
    ),
    ("ring_producers", loom_ring_producers_never_share_a_slot),
    ("ring_consumer", loom_ring_consumer_races_two_producers),
    ("wakes", loom_mailbox_wakes_consumer_and_blocked_producers),
    ("room", loom_mailbox_room_wakes_a_registered_signal),
    ("two_mailboxes", loom_mailbox_two_mailboxes_one_signal),
    (
        "close",
        loom_mailbox_close_keeps_queued_items_and_frees_blocked_producer,
    ),
    (
        "watermark",
        loom_watermark_reader_sees_every_record_below_it,
    ),
    ("latch", loom_latch_last_arriver_sees_all_work),
    ("window", loom_window_never_loses_an_advance),
    (
        "window_work",
        loom_window_done_covers_the_work_of_the_batches,
    ),
    (
        "no_deadlock",
        loom_workers_feeding_each_other_never_deadlock,
    ),
];

/// The orderings weaker than `o` that the mutation test tries.
fn weaker(o: Ordering) -> Vec<Ordering> {
    match o {
        Ordering::AcqRel => vec![Ordering::Acquire, Ordering::Release, Ordering::Relaxed],
        Ordering::SeqCst => vec![Ordering::AcqRel],
        Ordering::Acquire | Ordering::Release => vec![Ordering::Relaxed],
        _ => vec![],
    }
}

/// The weakenings the models catch (`site`, weakened to). The others pass
/// every model: docs/reliability.md, "Loom", lists them and says why.
const MUST_FAIL: &[(&str, Ordering)] = &[
    // The ring's stamps carry every item from producer to consumer and
    // every freed slot back.
    ("ring.push.stamp", Ordering::Relaxed),
    ("ring.push.publish", Ordering::Relaxed),
    ("ring.pop.stamp", Ordering::Relaxed),
    ("ring.pop.free", Ordering::Relaxed),
    // The signal's token: notify releases the push, the taker acquires it.
    ("signal.notify", Ordering::Acquire),
    ("signal.notify", Ordering::Relaxed),
    ("signal.wait.take", Ordering::Release),
    ("signal.wait.take", Ordering::Relaxed),
    ("signal.wake.take", Ordering::Release),
    ("signal.wake.take", Ordering::Relaxed),
    ("signal.wait.slipped", Ordering::Release),
    ("signal.wait.slipped", Ordering::Relaxed),
    // Room for blocked producers: the announce and made_room pair.
    ("mailbox.push.announce", Ordering::Release),
    ("mailbox.push.announce", Ordering::Relaxed),
    ("mailbox.made_room", Ordering::Acquire),
    ("mailbox.made_room", Ordering::Relaxed),
    ("mailbox.notify_on_room", Ordering::Release),
    ("mailbox.notify_on_room", Ordering::Relaxed),
    // Readers trusting the watermark, the acknowledger trusting the latch.
    ("watermark.get", Ordering::Relaxed),
    ("watermark.publish", Ordering::Relaxed),
    ("latch.arrive", Ordering::Acquire),
    ("latch.arrive", Ordering::Release),
    ("latch.arrive", Ordering::Relaxed),
];

/// The models (indices into `MODELS`) that fail with `site` weakened to
/// `w`. They run in child processes (this test binary, entered at
/// `loom_child_entry`): a weakened model can deadlock, and loom's cleanup
/// after a deadlock may abort the process. A child that dies mid-model
/// counts that model as failed; the next child goes on after it.
fn failing_models(site: &str, w: Ordering) -> Vec<usize> {
    let mut failed = Vec::new();
    let mut from = 0;
    while from < MODELS.len() {
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "fanout::loom_tests::loom_child_entry",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(crate::sync::WEAKEN_ENV, format!("{site}={w:?}"))
            .env(FROM_ENV, from.to_string())
            .stdout(std::process::Stdio::null())
            .output()
            .expect("run the loom child");
        let (mut started, mut ended) = (None, None);
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            let mut f = line.split_whitespace();
            match (
                f.next(),
                f.next().and_then(|i| i.parse::<usize>().ok()),
                f.next(),
            ) {
                (Some("LOOM-MODEL-START"), Some(i), _) => started = Some(i),
                (Some("LOOM-MODEL-END"), Some(i), Some(r)) => {
                    ended = Some(i);
                    if r == "fail" {
                        failed.push(i);
                    }
                }
                _ => {}
            }
        }
        match started {
            Some(i) if ended != Some(i) => {
                failed.push(i); // died in model `i`
                from = i + 1;
            }
            Some(_) if out.status.success() => break,
            _ => panic!(
                "loom child for {site}={w:?} from model {from} did not run: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    failed
}

/// Which model the child starts at.
const FROM_ENV: &str = "TIMELINE_LOOM_FROM";

/// Entry point of `failing_models`' children, not a test of its own: runs
/// the models from `TIMELINE_LOOM_FROM` on with the weakening the
/// environment names, reporting each on stderr.
#[test]
#[ignore = "entered only by loom_each_ordering_is_needed's child processes"]
fn loom_child_entry() {
    let from: usize = std::env::var(FROM_ENV)
        .expect("run by loom_each_ordering_is_needed")
        .parse()
        .expect("a model index");
    std::panic::set_hook(Box::new(|_| {}));
    for (i, (_, m)) in MODELS.iter().enumerate().skip(from) {
        eprintln!("LOOM-MODEL-START {i}");
        let r = if std::panic::catch_unwind(m).is_ok() {
            "pass"
        } else {
            "fail"
        };
        eprintln!("LOOM-MODEL-END {i} {r}");
    }
}

/// Weaken each ordering of the fan-out path in turn (each site named with
/// `ord!`) and run every model: prints which models fail, and checks the
/// result against `MUST_FAIL` (a weakening the models stop catching, or
/// start catching, fails this test).
#[test]
fn loom_each_ordering_is_needed() {
    for (_, m) in MODELS {
        m(); // every site reached once, unweakened
    }
    let tries: Vec<(&str, Ordering, Ordering)> = crate::sync::reached()
        .into_iter()
        .flat_map(|(site, o)| weaker(o).into_iter().map(move |w| (site, o, w)))
        .collect();
    // Two children at a time (the CI machine has two cores).
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![Vec::new(); tries.len()]);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(site, _, w)) = tries.get(i) else {
                    return;
                };
                let failed = failing_models(site, w);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = failed;
            });
        }
    });
    let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut caught = Vec::new();
    let mut table = String::new();
    for (&(site, o, w), failed) in tries.iter().zip(&results) {
        let names: Vec<&str> = failed.iter().map(|&i| MODELS[i].0).collect();
        table.push_str(&format!(
            "| `{site}` | {o:?} → {w:?} | {} |\n",
            if names.is_empty() {
                "—".to_string()
            } else {
                names.join(", ")
            }
        ));
        if !names.is_empty() {
            caught.push((site, w));
        }
    }
    eprintln!("| site | weakened | models that fail |\n|---|---|---|\n{table}");
    // Sites are reached in an order that depends on the test threads: compare as sets.
    let key = |v: &[(&str, Ordering)]| {
        let mut k: Vec<String> = v.iter().map(|(s, o)| format!("{s}:{o:?}")).collect();
        k.sort();
        k
    };
    assert_eq!(
        key(&caught),
        key(MUST_FAIL),
        "the weakenings the models catch changed"
    );
}
