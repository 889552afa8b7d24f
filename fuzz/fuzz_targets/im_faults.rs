//! The IM layer against its promises under fuzzer-chosen sends, membership
//! churn, read markers, injected I/O faults (the Nth call of any kind fails,
//! once or from then on, as EIO or a full disk) and crashes (the process
//! dying, or a power cut: only what was fdatasynced survives), on the
//! in-memory backend. After every crash `Im::open` runs without faults and
//! the directory is checked on the raw engine (`timeline_tests::im_check`):
//! every acknowledged send is stored at its seq, every stored write-fan-out
//! entry is in every member's sync timeline exactly once, nothing is stored
//! twice; every error a fault caused is truthful (an I/O error or
//! `FanoutFailed`, never `InvalidArgument` or `Corrupt`).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::HashMap;
use std::path::PathBuf;
use timeline_engine::io::{FailAt, MemFaults, MemIo};
use timeline_engine::{Config, Error};
use timeline_im::{Im, ImConfig, ImError};
use timeline_tests::im_check::{check_fanout, Key};
use timeline_tests::{im_crash_convs, im_mem_cfg, IM_CRASH_CHURN, IM_CRASH_CHURNERS, IM_CRASH_THRESHOLD};

#[derive(Arbitrary, Debug)]
enum FuzzOp {
    Send { conv: u8, sender: u8, many: u8 },
    Churn { who: u8, add: bool },
    MarkRead { conv: u8, member: u8 },
    Fault { nth: u8, sticky: bool, full: bool },
    Heal,
    Crash { power_cut: bool },
}

fn cfg(mem: &MemIo) -> (Config, ImConfig) {
    im_mem_cfg(mem)
}

fn root() -> PathBuf {
    PathBuf::from("/im")
}

fn truthful(e: &ImError) -> bool {
    matches!(
        e,
        ImError::Engine(Error::Io { .. } | Error::Poisoned { .. } | Error::Closed)
            | ImError::FanoutFailed { .. }
            | ImError::Closed
            | ImError::NotMember { .. }
            | ImError::AlreadyMember { .. }
    )
}

struct World {
    mem: MemIo,
    im: Option<Im>,
    acked: HashMap<Key, u64>,
    next_cmid: u64,
    faulty: bool,
}

impl World {
    fn open(mem: MemIo) -> World {
        let (c, ic) = cfg(&mem);
        let im = Im::open(root(), c, ic).expect("open without faults");
        World { mem, im: Some(im), acked: HashMap::new(), next_cmid: 1, faulty: false }
    }

    fn result<T>(&self, r: Result<T, ImError>) -> Option<T> {
        match r {
            Ok(t) => Some(t),
            Err(e) => {
                assert!(truthful(&e), "an error that is not the truth: {e:?} (faults: {})", self.faulty);
                if !self.faulty {
                    assert!(matches!(e, ImError::NotMember { .. } | ImError::AlreadyMember { .. }), "{e:?} without a fault");
                }
                None
            }
        }
    }

    fn step(&mut self, op: FuzzOp) {
        let convs = im_crash_convs();
        match op {
            FuzzOp::Send { conv, sender, many } => {
                let Some(im) = &self.im else { return };
                let (c, _, members) = &convs[conv as usize % convs.len()];
                let s = members[sender as usize % members.len()];
                let mut pending = Vec::new();
                for _ in 0..1 + many % 8 {
                    let k = (*c, s, self.next_cmid);
                    self.next_cmid += 1;
                    let body = format!("{k:?}").into_bytes();
                    if let Some(p) = self.result(im.send_async(k.0, k.1, k.2, &body)) {
                        pending.push((k, p));
                    }
                }
                for (k, p) in pending {
                    if let Some(a) = self.result(p.wait()) {
                        self.acked.insert(k, a.seq);
                    }
                }
            }
            FuzzOp::Churn { who, add } => {
                let Some(im) = &self.im else { return };
                let u = IM_CRASH_CHURNERS[who as usize % IM_CRASH_CHURNERS.len()];
                let r = if add { im.add_member(IM_CRASH_CHURN, u) } else { im.remove_member(IM_CRASH_CHURN, u) };
                self.result(r);
            }
            FuzzOp::MarkRead { conv, member } => {
                let Some(im) = &self.im else { return };
                let (c, _, members) = &convs[conv as usize % convs.len()];
                let r = im.mark_read(members[member as usize % members.len()], *c, u64::MAX);
                self.result(r);
            }
            FuzzOp::Fault { nth, sticky, full } => {
                self.faulty = true;
                self.mem.set_faults(MemFaults {
                    fail_at: Some(FailAt { nth: 1 + nth as u64, ops: Vec::new(), sticky, full }),
                    ..MemFaults::default()
                });
            }
            FuzzOp::Heal => self.mem.set_faults(MemFaults::default()),
            FuzzOp::Crash { power_cut } => self.crash(power_cut),
        }
    }

    /// The process dies; reopen without faults and check everything.
    fn crash(&mut self, power_cut: bool) {
        drop(self.im.take());
        self.mem.set_faults(MemFaults::default());
        if power_cut {
            self.mem = self.mem.crash();
        }
        let (c, ic) = cfg(&self.mem);
        let im = Im::open(root(), c, ic).expect("reopen without faults");
        let (_, stored) = check_fanout(im.engine(), &im_crash_convs(), IM_CRASH_THRESHOLD, true, "fuzz");
        for (k, seq) in &self.acked {
            assert_eq!(stored.get(k), Some(seq), "acknowledged {k:?} lost or moved");
        }
        self.im = Some(im);
        self.faulty = false;
    }
}

/// The conversations, created once per process on a clean image.
fn base() -> &'static MemIo {
    static BASE: std::sync::OnceLock<MemIo> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let mem = MemIo::new();
        let (c, ic) = cfg(&mem);
        let im = Im::open(root(), c, ic).expect("open");
        for (conv, kind, members) in im_crash_convs() {
            im.create_conversation(conv, kind, &members).expect("create");
        }
        im.close().expect("close");
        mem.crash()
    })
}

fuzz_target!(|ops: Vec<FuzzOp>| {
    let mut w = World::open(base().crash());
    for op in ops.into_iter().take(64) {
        w.step(op);
    }
    w.crash(false);
});
