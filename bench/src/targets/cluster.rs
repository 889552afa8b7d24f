//! `--target cluster`: a running cluster of `timeline-server --cluster`
//! nodes (`--addr HOST:PORT,HOST:PORT,...`, its seed nodes; start one with
//! `server/scripts/local-cluster.sh`).
//!
//! **Routing.** The target waits (up to 30 s) until every seed node's
//! `CLUSTER_MAP` names the same leader for every partition, unchanged for
//! a second (a cluster just started is still electing), and each session
//! holds one connection per node. An operation goes to its timeline's
//! partition's leader; the session keeps up to `--pipeline` requests in
//! flight across its connections and completes them in the order they were
//! queued (each connection answers in order). W1 sends single `APPEND`s
//! (`--batch 1`), or with `--batch N` one `APPEND_BATCH` per node holding
//! the batch's items of the partitions it leads (a node takes no others):
//! an append is acknowledged once a quorum of its partition's three
//! replicas logged it.
//! W2 sends `SCAN`s (the leader confirms its leadership first). A `MOVED`
//! or `NO_LEADER` answer is a refusal and fails the run: the benchmark
//! measures a stable cluster.
//!
//! **Costs.** The nodes are not the bench's children: only their `STATS`
//! deltas, summed over the nodes (bytes written, fsyncs), and the bench's
//! own CPU are reported; `server_cpu_secs` stays empty. Compare against a
//! single node in the same session (docs/benchmarks.md, "Cluster").

use super::server::{stat, stats};
use super::{base_line, net_shape, wire, Op, Reply, Session, Shape, Target};
use crate::report::ResultLine;
use crate::workloads::append::round3;
use crate::workloads::{keyspace, ks_name, timeline};
use crate::{Flags, Result};
use std::collections::VecDeque;
use timeline_engine::{Keyspace, SeqId};
use timeline_server::protocol::{partition_of, Request, Response};
use timeline_server::{Client, ClientError};

/// Where a running cluster's partitions are led, from one `CLUSTER_MAP`
/// (W1, W2 and W6 route every request by it).
/// How long [`Routes::fetch`] waits for every partition to have a leader.
const LEADERS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone)]
pub struct Routes {
    /// The seed nodes, then any leader the map named that was not one.
    pub nodes: Vec<String>,
    /// Partition → index into `nodes` of its leader.
    leader: Vec<usize>,
    partitions: u32,
}

impl Routes {
    /// Ask the first of `--addr`'s nodes for the map.
    pub fn fetch(flags: &Flags) -> Result<Routes> {
        let addr = flags
            .addr
            .as_deref()
            .ok_or("--target cluster needs --addr HOST:PORT[,HOST:PORT...] (its nodes)")?;
        let mut nodes: Vec<String> = addr.split(',').map(|s| s.trim().to_string()).collect();
        nodes.retain(|s| !s.is_empty());
        let first = nodes.first().ok_or("--addr names no node")?.clone();
        // A cluster just started may still be electing: wait (bounded)
        // until every seed's map names the same leader for every partition,
        // the same as a second earlier.
        let deadline = std::time::Instant::now() + LEADERS_WAIT;
        let mut before: Option<(std::time::Instant, Vec<(String, u64)>)> = None;
        let (partitions, leaders) = loop {
            let mut views = Vec::with_capacity(nodes.len());
            for n in &nodes {
                let Response::ClusterMap {
                    partitions,
                    mut leaders,
                    ..
                } = connect(n)?.call(&Request::ClusterMap)?
                else {
                    return Err("CLUSTER_MAP answered something else".into());
                };
                leaders.sort_by_key(|l| l.1);
                views.push((partitions, leaders));
            }
            let (partitions, leaders) = views.swap_remove(0);
            let led: std::collections::HashSet<u64> = leaders.iter().map(|l| l.1).collect();
            let agreed = views.iter().all(|v| v.1 == leaders);
            if agreed && led.len() >= partitions as usize {
                match &before {
                    Some((at, prev)) if *prev == leaders => {
                        if at.elapsed() >= std::time::Duration::from_secs(1) {
                            break (partitions, leaders);
                        }
                    }
                    _ => before = Some((std::time::Instant::now(), leaders.clone())),
                }
            } else {
                before = None;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "{first}: {} of {partitions} partitions have a leader, and the seeds {} on them, after {LEADERS_WAIT:?}",
                    led.len(),
                    if agreed { "agree" } else { "do not agree" }
                )
                .into());
            }
            // Start-up of the bench, not a serving path: poll the map.
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let mut leader = vec![0; partitions as usize];
        for (a, p) in leaders {
            let i = match nodes.iter().position(|n| *n == a) {
                Some(i) => i,
                None => {
                    nodes.push(a);
                    nodes.len() - 1
                }
            };
            if let Some(slot) = leader.get_mut(p as usize) {
                *slot = i;
            }
        }
        Ok(Routes {
            nodes,
            leader,
            partitions,
        })
    }

    /// The index into `nodes` of the leader of timeline (keyspace `ks`,
    /// `id`)'s partition.
    pub fn node_of(&self, ks: u8, id: u64) -> usize {
        let p = partition_of(ks, id, self.partitions);
        self.leader.get(p as usize).copied().unwrap_or(0)
    }

    /// Every node's `STATS`, summed by key.
    pub fn all_stats(&self) -> Result<Vec<(String, u64)>> {
        let mut sum: Vec<(String, u64)> = Vec::new();
        for n in &self.nodes {
            for (k, v) in stats(&mut connect(n)?)? {
                match sum.iter_mut().find(|(x, _)| *x == k) {
                    Some((_, s)) => *s += v,
                    None => sum.push((k, v)),
                }
            }
        }
        Ok(sum)
    }

    /// A connection to each node, in `nodes`' order.
    pub fn connect_all(&self) -> Result<Vec<Client>> {
        self.nodes.iter().map(|a| connect(a)).collect()
    }
}

pub struct ClusterTarget {
    routes: Routes,
    flags: Flags,
    shape: Shape,
    ks: Keyspace,
}

pub(crate) fn connect(addr: &str) -> Result<Client> {
    Client::connect(addr, b"").map_err(|e| format!("connecting to {addr}: {e}").into())
}

impl ClusterTarget {
    pub fn start(flags: &Flags) -> Result<ClusterTarget> {
        Ok(ClusterTarget {
            routes: Routes::fetch(flags)?,
            flags: flags.clone(),
            shape: net_shape(flags),
            ks: keyspace(flags),
        })
    }

    fn node_of(&self, id: u64) -> usize {
        self.routes.node_of(self.ks.0, id)
    }
}

pub struct ClusterSession<'a> {
    t: &'a ClusterTarget,
    conns: Vec<Client>,
    /// The operations in flight, oldest first.
    q: VecDeque<InFlight>,
}

/// An operation in flight and where its answers come from.
enum InFlight {
    /// One `APPEND` or `SCAN` on connection `node`.
    One { node: usize, scan: bool },
    /// One `APPEND_BATCH` per node: (node, the op's item positions it has).
    Batch {
        parts: Vec<(usize, Vec<usize>)>,
        items: usize,
    },
}

impl Session for ClusterSession<'_> {
    fn queue(&mut self, op: Op<'_>) -> Result<()> {
        let ks = self.t.ks;
        match op {
            Op::Append([(id, payload)]) => {
                let n = self.t.node_of(*id);
                self.conns[n].queue(&Request::Append {
                    timeline: wire::timeline(timeline(ks, *id)),
                    durability: None,
                    payload,
                });
                self.q.push_back(InFlight::One {
                    node: n,
                    scan: false,
                });
            }
            Op::Append(items) => {
                // A node takes a batch only of partitions it leads: one
                // APPEND_BATCH per node, the seqs put back in item order.
                let mut parts: Vec<(usize, Vec<usize>)> = Vec::new();
                for (i, (id, _)) in items.iter().enumerate() {
                    let n = self.t.node_of(*id);
                    match parts.iter_mut().find(|(m, _)| *m == n) {
                        Some((_, v)) => v.push(i),
                        None => parts.push((n, vec![i])),
                    }
                }
                for (n, idx) in &parts {
                    self.conns[*n].queue(&Request::AppendBatch {
                        durability: None,
                        items: idx
                            .iter()
                            .map(|&i| (wire::timeline(timeline(ks, items[i].0)), items[i].1))
                            .collect(),
                    });
                }
                self.q.push_back(InFlight::Batch {
                    parts,
                    items: items.len(),
                });
            }
            Op::Scan { id, from, len, dir } => {
                let n = self.t.node_of(id);
                self.conns[n].queue(&Request::Scan {
                    timeline: wire::timeline(timeline(ks, id)),
                    from,
                    limit: u32::try_from(len).unwrap_or(u32::MAX),
                    direction: wire::direction(dir),
                });
                self.q.push_back(InFlight::One {
                    node: n,
                    scan: true,
                });
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        for c in &mut self.conns {
            c.flush()?;
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<Reply> {
        let (n, scan) = match self
            .q
            .pop_front()
            .ok_or("complete() with nothing in flight")?
        {
            InFlight::One { node, scan } => (node, scan),
            InFlight::Batch { parts, items } => return self.complete_batch(parts, items),
        };
        Ok(match (scan, self.conns[n].recv()) {
            (_, Err(e @ ClientError::Server { .. })) => Reply::Refused(e.to_string()),
            (_, Err(e)) => return Err(e.into()),
            (false, Ok(Response::Append(seq))) => Reply::Appended(vec![seq]),
            (true, Ok(Response::Scan(page))) => Reply::Page(wire::records(page)),
            (_, Ok(r)) => Reply::Refused(format!("unexpected reply {r:?}")),
        })
    }
}

impl ClusterSession<'_> {
    /// Every part's reply is read (each connection answers in order), so
    /// a refused part leaves nothing behind for the next operation.
    fn complete_batch(&mut self, parts: Vec<(usize, Vec<usize>)>, items: usize) -> Result<Reply> {
        let mut seqs = vec![0; items];
        let mut refused = None;
        for (n, idx) in parts {
            match self.conns[n].recv() {
                Ok(Response::AppendBatch(got)) if got.len() == idx.len() => {
                    for (k, i) in idx.into_iter().enumerate() {
                        seqs[i] = got[k];
                    }
                }
                Err(e @ ClientError::Server { .. }) => refused = Some(e.to_string()),
                Err(e) => return Err(e.into()),
                Ok(r) => refused = Some(format!("unexpected reply {r:?}")),
            }
        }
        Ok(match refused {
            Some(why) => Reply::Refused(why),
            None => Reply::Appended(seqs),
        })
    }
}

impl Target for ClusterTarget {
    type Session<'a> = ClusterSession<'a>;
    type Mark = Vec<(String, u64)>;

    fn shape(&self) -> Shape {
        self.shape
    }

    fn session(&self) -> Result<ClusterSession<'_>> {
        let conns = self.routes.connect_all()?;
        Ok(ClusterSession {
            t: self,
            conns,
            q: VecDeque::new(),
        })
    }

    fn lengths(&self, n: u64) -> Result<Vec<SeqId>> {
        let mut conns = self.routes.connect_all()?;
        let mut out = Vec::with_capacity(n as usize);
        for id in 0..n {
            let r = conns[self.node_of(id)].call(&Request::LastSeq {
                timeline: wire::timeline(timeline(self.ks, id)),
            })?;
            match r {
                Response::LastSeq(s) => out.push(s),
                other => return Err(format!("LAST_SEQ {id} answered {other:?}").into()),
            }
        }
        Ok(out)
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "cluster");
        // Acknowledged = in a quorum's logs, each fdatasync'd: no
        // `--durability` applies.
        l.durability = "quorum".into();
        l.io = "cluster".into();
        self.shape.set(&mut l);
        l
    }

    fn mark(&self) -> Result<Self::Mark> {
        self.routes.all_stats()
    }

    fn settle(&self, _line: &mut ResultLine) -> Result<()> {
        Ok(()) // acknowledged = in a quorum's logs
    }

    fn measure(&self, m: &Self::Mark, line: &mut ResultLine) -> Result<()> {
        let s1 = self.routes.all_stats()?;
        let d = |k: &str| stat(&s1, k).saturating_sub(stat(m, k));
        if let Some(payload) = line.payload_bytes {
            // bytes_written: the applied records of the keyspace, on every
            // replica; bytes_written_total: everything the nodes' engines
            // wrote (Raft logs and meta too). Per payload byte: the total.
            line.bytes_written = Some(d(&format!("{}_bytes_written", ks_name(self.ks))));
            let total = d("bytes_written");
            line.bytes_written_total = Some(total);
            line.bytes_per_payload_byte = Some(round3(total as f64 / payload.max(1) as f64));
            line.fsyncs = Some(d("fsyncs"));
        }
        Ok(())
    }

    fn close(self, _last: Option<&mut ResultLine>) -> Result<()> {
        Ok(())
    }
}
