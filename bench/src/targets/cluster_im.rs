//! `--target cluster` for W4 `im`: the IM commands of a running cluster
//! (`--addr` its nodes), each sent to the leader of its partition.
//!
//! - **Routing** as for W1 (`cluster::Routes`: every partition led, the
//!   seeds agreeing): a `SEND` goes to its conversation's partition leader
//!   (store timeline), a `SYNC` to its user's (sync timeline); a session
//!   holds one connection per node and completes its requests in the order
//!   they were queued. `MOVED` or `NO_LEADER` is a refusal: the benchmark
//!   measures a stable cluster.
//! - **Setup** (untimed): `CREATE_CONVERSATION`s pipelined on one
//!   connection per node, those an election refused (`NO_LEADER`, `MOVED`,
//!   `UNCERTAIN`) made again on a fresh map (a create answered `FANOUT_FAILED` is stored and
//!   its delivery goes on), then the members' sync timeline ends read
//!   until they stop moving, so that every `Created` entry is delivered
//!   before devices start. The nodes decide read fan-out by their own
//!   `--hybrid-threshold`: the run's `--hybrid-threshold` must be the same
//!   (both default to 500); the largest group must fit a node's record
//!   (8,151 members at the default `--max-payload`).
//! - **Costs**: the nodes' `STATS` deltas, summed (bytes written by the
//!   engines, Raft logs included, and fsyncs) and the bench's own CPU; the
//!   nodes are not the bench's children, so `server_cpu_secs` stays empty
//!   and the IM layer's write counters (a single node's `im_*`) are not
//!   there to report.

use super::cluster::{connect, Routes};
use super::server::{create_pipelined, im_reply, im_request, set_written, stat, PushConn};
use super::{
    base_line, net_shape, wire, ConvSpec, ImOp, ImReply, ImSession, ImTarget, Shape, Subscriber,
};
use crate::report::ResultLine;
use crate::{Flags, Result};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use timeline_engine::{Keyspace, SeqId, TimelineId};
use timeline_im::{ConvId, UserId};
use timeline_server::protocol::{ErrorCode, Request, Response};
use timeline_server::Client;

/// How long setup waits for the `Created` deliveries to settle.
const SETTLE_WAIT: Duration = Duration::from_secs(120);
/// Rounds of creating what an election refused (setup).
const CREATE_ATTEMPTS: usize = 5;

pub struct ClusterIm {
    routes: Routes,
    flags: Flags,
    shape: Shape,
}

impl ClusterIm {
    pub fn start(flags: &Flags) -> Result<ClusterIm> {
        Ok(ClusterIm {
            routes: Routes::fetch(flags)?,
            flags: flags.clone(),
            shape: net_shape(flags),
        })
    }

    fn conv_node(&self, conv: ConvId) -> usize {
        self.routes.node_of(Keyspace::STORE.0, conv)
    }

    fn user_node(&self, user: UserId) -> usize {
        self.routes.node_of(Keyspace::SYNC.0, user)
    }

    /// Untimed: wait until the sync timelines of `users` stop moving (the
    /// `Created` deliveries of a large group go on after its create is
    /// answered).
    fn settle(&self, users: &[UserId]) -> Result<()> {
        let deadline = Instant::now() + SETTLE_WAIT;
        let mut before = self.sync_ends(users)?;
        loop {
            // Setup, not a serving path: a pause between two sweeps.
            std::thread::sleep(Duration::from_millis(500));
            let now = self.sync_ends(users)?;
            if now == before {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the conversations' Created deliveries still moved after {SETTLE_WAIT:?}"
                )
                .into());
            }
            before = now;
        }
    }
}

pub struct ClusterImSession<'a> {
    t: &'a ClusterIm,
    conns: Vec<Client>,
    /// The requests in flight, oldest first: (connection, is a send).
    q: VecDeque<(usize, bool)>,
}

impl ImSession for ClusterImSession<'_> {
    fn queue(&mut self, op: ImOp<'_>) -> Result<()> {
        let n = match op {
            ImOp::Send { conv, .. } => self.t.conv_node(conv),
            ImOp::Sync { user, .. } => self.t.user_node(user),
        };
        let (r, send) = im_request(op);
        self.conns[n].queue(&r);
        self.q.push_back((n, send));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        for c in &mut self.conns {
            c.flush()?;
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<ImReply> {
        let (n, send) = self
            .q
            .pop_front()
            .ok_or("complete() with nothing in flight")?;
        im_reply(send, self.conns[n].recv())
    }
}

impl ImTarget for ClusterIm {
    type Session<'a> = ClusterImSession<'a>;
    type Mark = Vec<(String, u64)>;

    fn shape(&self) -> Shape {
        self.shape
    }

    fn create(&mut self, convs: &[ConvSpec]) -> Result<()> {
        let t0 = Instant::now();
        let mut todo: Vec<&ConvSpec> = convs.iter().collect();
        // Creates the last attempt answered `UNCERTAIN`.
        let mut uncertain: std::collections::HashSet<ConvId> = Default::default();
        // A create refused NO_LEADER or MOVED did nothing (an election on
        // a loaded machine), one answered UNCERTAIN may have been applied:
        // asked again, where the leaders are now.
        for attempt in 1..=CREATE_ATTEMPTS {
            let mut by_node: Vec<Vec<&ConvSpec>> = vec![Vec::new(); self.routes.nodes.len()];
            for &c in &todo {
                by_node[self.conv_node(c.id)].push(c);
            }
            let parts: Vec<&[&ConvSpec]> = by_node.iter().map(Vec::as_slice).collect();
            let mut refused =
                create_pipelined(&parts, &self.shape, |n| connect(&self.routes.nodes[n]))?;
            // Made again after `UNCERTAIN`: the try before was applied.
            refused
                .retain(|r| !(r.1 == ErrorCode::CONVERSATION_EXISTS && uncertain.contains(&r.0)));
            let transient = |code: &ErrorCode| {
                matches!(
                    *code,
                    ErrorCode::NO_LEADER | ErrorCode::MOVED | ErrorCode::UNCERTAIN
                )
            };
            if refused.is_empty() {
                break;
            }
            if attempt == CREATE_ATTEMPTS || !refused.iter().all(|r| transient(&r.1)) {
                let exists = refused
                    .iter()
                    .any(|r| r.1 == ErrorCode::CONVERSATION_EXISTS);
                return Err(format!(
                    "{} conversation(s) could not be created{}",
                    refused.len(),
                    if exists {
                        " (CONVERSATION_EXISTS: the cluster holds an earlier run's; the IM workloads need a fresh cluster, e.g. local-cluster.sh with a new directory)"
                    } else {
                        ""
                    }
                )
                .into());
            }
            // Setup, untimed: a pause for the election, then the map again.
            std::thread::sleep(Duration::from_secs(1));
            self.routes = Routes::fetch(&self.flags)?;
            let again: std::collections::HashSet<ConvId> = refused.iter().map(|r| r.0).collect();
            uncertain = refused
                .iter()
                .filter(|r| r.1 == ErrorCode::UNCERTAIN)
                .map(|r| r.0)
                .collect();
            todo.retain(|c| again.contains(&c.id));
        }
        let mut users: Vec<UserId> = convs.iter().flat_map(|c| c.members.clone()).collect();
        users.sort_unstable();
        users.dedup();
        self.settle(&users)?;
        eprintln!(
            "setup: {} conversations created on the cluster and delivered in {:.3} s",
            convs.len(),
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn session(&self) -> Result<ClusterImSession<'_>> {
        Ok(ClusterImSession {
            t: self,
            conns: self.routes.connect_all()?,
            q: VecDeque::new(),
        })
    }

    fn sync_ends(&self, users: &[UserId]) -> Result<Vec<SeqId>> {
        let mut conns = self.routes.connect_all()?;
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(1024) {
            for &u in chunk {
                conns[self.user_node(u)].queue(&Request::LastSeq {
                    timeline: wire::timeline(TimelineId::sync(u)),
                });
            }
            for c in &mut conns {
                c.flush()?;
            }
            for &u in chunk {
                match conns[self.user_node(u)].recv()? {
                    Response::LastSeq(s) => out.push(s),
                    other => return Err(format!("LAST_SEQ of {u} answered {other:?}").into()),
                }
            }
        }
        Ok(out)
    }

    /// Each user subscribed on its partition's leader: one connection per
    /// node that leads any.
    fn subscribe(&self, users: &[UserId]) -> Result<Vec<Box<dyn Subscriber + '_>>> {
        let mut by_node: Vec<Vec<UserId>> = vec![Vec::new(); self.routes.nodes.len()];
        for &u in users {
            by_node[self.user_node(u)].push(u);
        }
        let mut out: Vec<Box<dyn Subscriber + '_>> = Vec::new();
        for (n, us) in by_node
            .into_iter()
            .enumerate()
            .filter(|(_, u)| !u.is_empty())
        {
            let mut c = connect(&self.routes.nodes[n])?;
            for u in us {
                match c.call(&Request::Subscribe { user: u })? {
                    Response::Subscribe => {}
                    other => return Err(format!("SUBSCRIBE answered {other:?}").into()),
                }
            }
            out.push(Box::new(PushConn(c)));
        }
        Ok(out)
    }

    fn line(&self, workload: &str) -> ResultLine {
        let mut l = base_line(&self.flags, workload, "cluster");
        l.durability = "quorum".into();
        l.io = "cluster".into();
        l.keyspace = "store+sync".into();
        self.shape.set(&mut l);
        l
    }

    fn mark(&self) -> Result<Self::Mark> {
        self.routes.all_stats()
    }

    fn measure(&self, m: &Self::Mark, line: &mut ResultLine) -> Result<()> {
        let s1 = self.routes.all_stats()?;
        let d = |k: &str| stat(&s1, k).saturating_sub(stat(m, k));
        // Applied records on every replica (store and sync), and all the
        // engines wrote (Raft logs and meta too).
        let applied = d("store_bytes_written") + d("sync_bytes_written");
        set_written(line, applied, d("bytes_written"), d("fsyncs"));
        Ok(())
    }

    fn close(self, _last: Option<&mut ResultLine>) -> Result<()> {
        Ok(())
    }
}
