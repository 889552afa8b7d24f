//! `--target engine` (the default): the embedded engine, in this process.
//!
//! Sessions are the bench's own threads (`--threads`), each calling the
//! engine directly. With `--durability group` and `--in-flight` > `--batch`
//! a session keeps `--in-flight / --batch` asynchronous appends in flight
//! (`append_async`, tickets waited for in order); otherwise every call is
//! synchronous (`append_batch` with the run's durability, `scan`).
//!
//! Costs: the engine runs on the bench's threads, so CPU is the whole
//! process's over the phase (`cpu_basis` "whole process"). A write phase
//! ends with what finishes it: `sync`, then one maintenance pass that seals
//! (in the store: regroups) the segments that filled during the load, as
//! RocksDB's phases end with its flushes and compactions (`sync_secs`), and
//! with `--seal` the sealing of every active segment too (`seal_secs`).
//! Bytes and fsyncs are the engine's own counters for the phase; disk
//! writes are /proc/self/io's.

use super::{
    base_line, ConvSpec, ImOp, ImReply, ImSession, ImTarget, Op, Pushed, Reply, Session, Shape,
    Subscriber, Target,
};
use crate::report::ResultLine;
use crate::sysinfo::{count_files, cpu_secs, peak_rss_bytes, rss_split, DiskIo};
use crate::workloads::append::round3;
use crate::workloads::imkit;
use crate::workloads::{durability, keyspace, open_engine, seal_if_asked, timeline, DataDir};
use crate::{DurabilityArg, Flags, Result};
use std::collections::VecDeque;
use std::time::Instant;
use timeline_engine::{AppendTicket, Durability, Engine, Keyspace, SeqId, Stats, TimelineId};
use timeline_im::{Body, Im, Push, UserId};

pub struct EngineTarget {
    engine: Engine,
    flags: Flags,
    ks: Keyspace,
    d: Durability,
    /// Appends kept in flight per session (1: synchronous calls).
    window: usize,
    /// Last, so the directory goes after the engine.
    dir: DataDir,
}

impl EngineTarget {
    pub fn open(flags: &Flags) -> Result<EngineTarget> {
        let dir = DataDir::new(flags)?;
        let (engine, open_secs) = open_engine(flags, &dir.path)?;
        eprintln!(
            "engine: opened {} in {open_secs:.3} s, io {}, durability {}",
            dir.path.display(),
            engine.io_name(),
            durability(flags).name()
        );
        let pipelined = flags.durability == DurabilityArg::Group && flags.in_flight > 1;
        Ok(EngineTarget {
            engine,
            ks: keyspace(flags),
            d: durability(flags),
            window: if pipelined {
                (flags.in_flight / flags.batch).max(1)
            } else {
                1
            },
            flags: flags.clone(),
            dir,
        })
    }
}

pub struct Mark {
    stats: Stats,
    io: DiskIo,
    cpu: f64,
}

/// An engine call in flight.
enum Pending {
    Ticket(AppendTicket),
    Done(Reply),
}

pub struct EngineSession<'a> {
    t: &'a EngineTarget,
    q: VecDeque<Pending>,
}

impl Session for EngineSession<'_> {
    fn queue(&mut self, op: Op<'_>) -> Result<()> {
        let (e, ks) = (&self.t.engine, self.t.ks);
        let p = match op {
            Op::Append(items) => {
                let items: Vec<(TimelineId, &[u8])> =
                    items.iter().map(|&(id, p)| (timeline(ks, id), p)).collect();
                if self.t.window > 1 {
                    Pending::Ticket(e.append_async(&items)?)
                } else {
                    Pending::Done(Reply::Appended(e.append_batch(&items, self.t.d)?))
                }
            }
            Op::Scan { id, from, len, dir } => {
                Pending::Done(match e.scan(timeline(ks, id), from, len, dir) {
                    Ok(page) => Reply::Page(page),
                    Err(err) => Reply::Refused(err.to_string()),
                })
            }
        };
        self.q.push_back(p);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn complete(&mut self) -> Result<Reply> {
        let p = self
            .q
            .pop_front()
            .ok_or("complete() with nothing in flight")?;
        Ok(match p {
            Pending::Ticket(t) => Reply::Appended(t.wait()?),
            Pending::Done(r) => r,
        })
    }
}

impl Target for EngineTarget {
    type Session<'a> = EngineSession<'a>;
    type Mark = Mark;

    fn shape(&self) -> Shape {
        Shape {
            sessions: self.flags.threads,
            window: self.window,
            refill: 1,
        }
    }

    fn session(&self) -> Result<EngineSession<'_>> {
        Ok(EngineSession {
            t: self,
            q: VecDeque::with_capacity(self.window),
        })
    }

    fn lengths(&self, n: u64) -> Result<Vec<SeqId>> {
        Ok((0..n)
            .map(|id| self.engine.last_seq(timeline(self.ks, id)))
            .collect())
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "engine");
        l.shards = self.engine.config().shards;
        l.regroup = Some(self.engine.config().keyspace(self.ks).regroup);
        l.io = self.engine.io_name().into();
        l.in_flight = Some(self.flags.in_flight);
        l
    }

    fn mark(&self) -> Result<Mark> {
        Ok(Mark {
            stats: self.engine.stats(),
            io: DiskIo::now(),
            cpu: cpu_secs(None),
        })
    }

    fn settle(&self, line: &mut ResultLine) -> Result<()> {
        let t = Instant::now();
        self.engine.sync()?;
        // Seal (and, in the store, regroup) the segments that filled during
        // the load, as RocksDB's settle waits for its flushes and
        // compactions: that work belongs to the load, not to what follows.
        self.engine.maintain()?;
        line.sync_secs = Some(t.elapsed().as_secs_f64());
        line.seal_secs = seal_if_asked(&self.flags, &self.engine)?;
        Ok(())
    }

    fn measure(&self, m: &Mark, line: &mut ResultLine) -> Result<()> {
        let st = self.engine.stats();
        let (a, b) = (m.stats.keyspace(self.ks), st.keyspace(self.ks));
        let written = b.bytes_written - a.bytes_written;
        let records = b.record_bytes - a.record_bytes;
        line.process_cpu_secs = Some(round3(cpu_secs(None) - m.cpu));
        line.set_disk_io(m.io, DiskIo::now());
        if line.payload_bytes.is_some() {
            let ratio = |x: u64, y: u64| round3(x as f64 / y.max(1) as f64);
            line.bytes_written = Some(written);
            line.bytes_written_total =
                Some(st.total().bytes_written - m.stats.total().bytes_written);
            line.record_bytes = Some(records);
            line.write_amplification = Some(ratio(written, records));
            line.bytes_per_payload_byte = line.payload_bytes.map(|p| ratio(written, p));
            line.sealed_segments = Some(b.sealed_segments - a.sealed_segments);
            line.fsyncs = Some(b.fsyncs - a.fsyncs);
        }
        line.index_bytes = Some(st.total().index_bytes);
        let (anon, file) = rss_split();
        line.rss_anon_bytes = Some(anon);
        line.rss_file_bytes = Some(file);
        line.peak_rss_bytes = Some(peak_rss_bytes());
        Ok(())
    }

    fn close(self, last: Option<&mut ResultLine>) -> Result<()> {
        let t = Instant::now();
        self.engine.close()?;
        let secs = t.elapsed().as_secs_f64();
        if let Some(l) = last {
            l.close_secs = Some(secs);
            l.files = Some(count_files(&self.dir.path));
        }
        Ok(())
    }
}

/// The in-process IM layer (`timeline-im` on the engine) as an
/// [`ImTarget`] of W3 and W4.
///
/// Conversations are created by `imkit::setup` (an `Im` opened for setup,
/// closed and reopened with the run's configuration). Sessions are the
/// bench's threads (`--threads`), each keeping `--in-flight` sends in
/// flight (`send_async`; acks taken in order); a `sync` runs on the
/// caller's thread. Costs: the IM layer's workers and the engine's
/// maintenance thread (`cpu_basis` "storage threads"), and the whole
/// process's CPU beside it; the layer's and the engine's counters.
pub struct EngineIm {
    im: Option<Im>,
    flags: Flags,
    threshold: usize,
    dir: DataDir,
}

impl EngineIm {
    pub fn new(flags: &Flags, threshold: usize) -> Result<EngineIm> {
        Self::in_dir(flags, threshold, DataDir::new(flags)?)
    }

    pub fn in_dir(flags: &Flags, threshold: usize, dir: DataDir) -> Result<EngineIm> {
        Ok(EngineIm {
            im: None,
            flags: flags.clone(),
            threshold,
            dir,
        })
    }

    fn im(&self) -> Result<&Im> {
        Ok(self
            .im
            .as_ref()
            .ok_or("the conversations are not created yet")?)
    }
}

enum ImPending {
    Send(timeline_im::Pending<timeline_im::SendAck>),
    Done(ImReply),
}

pub struct EngineImSession<'a> {
    im: &'a Im,
    q: VecDeque<ImPending>,
}

impl ImSession for EngineImSession<'_> {
    fn queue(&mut self, op: ImOp<'_>) -> Result<()> {
        self.q.push_back(match op {
            ImOp::Send {
                conv,
                sender,
                msg_id,
                payload,
            } => ImPending::Send(self.im.send_async(conv, sender, msg_id, payload)?),
            ImOp::Sync {
                user,
                checkpoint,
                limit,
                groups,
            } => ImPending::Done(match self.im.sync(user, checkpoint, limit, groups) {
                Ok(r) => ImReply::Synced(r),
                Err(e) => ImReply::Refused(e.to_string()),
            }),
        });
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn complete(&mut self) -> Result<ImReply> {
        Ok(
            match self
                .q
                .pop_front()
                .ok_or("complete() with nothing in flight")?
            {
                ImPending::Send(p) => match p.wait() {
                    Ok(a) if !a.duplicate => ImReply::Sent,
                    Ok(a) => ImReply::Refused(format!(
                        "send {}/{} acknowledged as a duplicate",
                        a.conv, a.seq
                    )),
                    Err(e) => ImReply::Refused(e.to_string()),
                },
                ImPending::Done(r) => r,
            },
        )
    }
}

struct ImSub(timeline_im::Subscription);

impl Subscriber for ImSub {
    fn next(&mut self, timeout: std::time::Duration) -> Result<Option<Pushed>> {
        Ok(self.0.recv_timeout(timeout).map(|p| match p {
            Push::Entry { entry, .. } => pushed(entry.entry.body),
            Push::Group { entry, .. } => pushed(entry.body),
            Push::Resync => Pushed::Resync,
        }))
    }
}

fn pushed(b: Body) -> Pushed {
    match b {
        Body::Message(m) => Pushed::Message(m),
        _ => Pushed::Other,
    }
}

impl ImTarget for EngineIm {
    type Session<'a> = EngineImSession<'a>;
    type Mark = imkit::Snap;

    fn shape(&self) -> Shape {
        Shape {
            sessions: self.flags.threads,
            window: self.flags.in_flight.max(1),
            refill: 1,
        }
    }

    fn create(&mut self, convs: &[ConvSpec]) -> Result<()> {
        let (im, _) = imkit::setup(&self.flags, &self.dir.path, convs, self.threshold)?;
        self.im = Some(im);
        Ok(())
    }

    fn session(&self) -> Result<EngineImSession<'_>> {
        Ok(EngineImSession {
            im: self.im()?,
            q: VecDeque::new(),
        })
    }

    fn sync_ends(&self, users: &[UserId]) -> Result<Vec<SeqId>> {
        let e = self.im()?.engine();
        Ok(users
            .iter()
            .map(|&u| e.last_seq(TimelineId::sync(u)))
            .collect())
    }

    fn subscribe(&self, users: &[UserId]) -> Result<Vec<Box<dyn Subscriber + '_>>> {
        let im = self.im()?;
        Ok(users
            .iter()
            .map(|&u| Box::new(ImSub(im.subscribe(u))) as Box<dyn Subscriber>)
            .collect())
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "engine");
        if let Some(im) = &self.im {
            l.shards = im.engine().config().shards;
            l.io = im.engine().io_name().into();
            l.entries = Some(imkit::entries_name(im.config().entries).into());
        }
        l.keyspace = "store+sync".into();
        l.in_flight = Some(self.flags.in_flight);
        l
    }

    fn mark(&self) -> Result<imkit::Snap> {
        let im = self.im()?;
        im.engine().sync()?;
        Ok(imkit::snap(im))
    }

    fn measure(&self, m: &imkit::Snap, line: &mut ResultLine) -> Result<()> {
        let im = self.im()?;
        im.engine().sync()?;
        let d = imkit::Delta::between(m, &imkit::snap(im));
        // The layer's own counts must agree with what the bench sent.
        if Some(d.messages) != line.messages {
            return Err(format!(
                "the IM layer counted {} messages, {:?} were sent",
                d.messages, line.messages
            )
            .into());
        }
        if line.deliveries.is_some_and(|n| n != d.deliveries()) {
            return Err(format!(
                "the IM layer counted {} deliveries (sync writes {} + read fan-out {}), the bench {:?}",
                d.deliveries(),
                d.sync_writes,
                d.read_fanout_deliveries,
                line.deliveries
            )
            .into());
        }
        imkit::set_counters(line, &d);
        line.index_bytes = Some(im.engine().stats().total().index_bytes);
        let (anon, file) = rss_split();
        line.rss_anon_bytes = Some(anon);
        line.rss_file_bytes = Some(file);
        line.peak_rss_bytes = Some(peak_rss_bytes());
        Ok(())
    }

    fn close(self, last: Option<&mut ResultLine>) -> Result<()> {
        if let Some(im) = self.im {
            im.close()?;
        }
        if let Some(l) = last {
            l.files = Some(count_files(&self.dir.path));
        }
        Ok(())
    }
}
