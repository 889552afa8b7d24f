//! Processes for the multi-process cluster tests: an etcd and cluster
//! nodes (`cluster-node`, this crate's child binary), on loopback ports
//! chosen once so that a restarted node comes back at the same address.
//! Every wait here is bounded and panics with what it waited for.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use timeline_client::protocol::Request;
use timeline_client::Client;

/// A loopback port free right now, below Linux's ephemeral range
/// (32768–60999): a port the kernel handed out for `bind(0)` and freed
/// again may be given to any outgoing connection next (the tests open
/// thousands), and then a node or etcd started on it fails to bind, or a
/// readiness probe reaches the wrong process. Ports are taken in turn
/// from a place that differs per test process, each checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LO: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LO + (start + k) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LO}..{}", LO + SPAN)
}

pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < end, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// etcd at `addr` answers its health check (`GET /health`): serving,
/// not only accepting on the port.
fn healthy(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

/// A single-member etcd (Debian's `etcd-server`).
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let mut e = Etcd {
            child: None,
            dir: dir.to_path_buf(),
            client_port: free_port(),
            peer_port: free_port(),
        };
        e.spawn();
        e
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Start it (again, on the same data and ports).
    pub fn spawn(&mut self) {
        let bin = std::env::var("ETCD").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.join("etcd.log"))
            .unwrap_or_else(|e| panic!("etcd log: {e}"));
        let child = Command::new(&bin)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t={peer}"), "--logger", "zap"])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {bin} ({e}): install Debian's etcd-server (.ci/run does)")
            });
        self.child = Some(child);
        let addr = self.endpoint();
        let log = self.dir.join("etcd.log");
        let child = &mut self.child;
        wait_until("etcd accepting", Duration::from_secs(20), || {
            // Accepting on its port, and still running (not another
            // process holding the port while this etcd failed to bind).
            if let Some(Ok(Some(st))) = child.as_mut().map(|c| c.try_wait()) {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("etcd exited: {st}; its log:\n{tail}");
            }
            healthy(&addr)
        });
    }

    /// Stop it with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One cluster node process.
pub struct NodeProc {
    pub id: u64,
    pub client: String,
    raft: String,
    etcd: String,
    data: PathBuf,
    partitions: u32,
    child: Option<Child>,
    /// `--auth`'s secret, if on, and the admin token the harness uses.
    auth: Option<(String, Vec<u8>)>,
    /// Extra environment of the process (the node binary's test knobs).
    env: Vec<(String, String)>,
}

impl NodeProc {
    pub fn new(id: u64, dir: &Path, etcd: &str, partitions: u32) -> NodeProc {
        NodeProc {
            id,
            client: format!("127.0.0.1:{}", free_port()),
            raft: format!("127.0.0.1:{}", free_port()),
            etcd: etcd.to_string(),
            data: dir.join(format!("node{id}")),
            partitions,
            child: None,
            auth: None,
            env: Vec::new(),
        }
    }

    /// With `key=value` in the process's environment (every start).
    pub fn with_env(mut self, key: &str, value: &str) -> NodeProc {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// With `--auth` on, signed by `secret`.
    pub fn with_auth(mut self, secret: &str) -> NodeProc {
        let admin = timeline_client::protocol::token::sign(
            secret.as_bytes(),
            &timeline_client::protocol::token::Claims {
                user: 0,
                expires_unix: u64::MAX,
                role: timeline_client::protocol::token::Role::Admin,
            },
        );
        self.auth = Some((secret.to_string(), admin.to_vec()));
        self
    }

    /// The token the harness connects with (empty without auth).
    fn token(&self) -> Vec<u8> {
        self.auth.as_ref().map(|a| a.1.clone()).unwrap_or_default()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Start the process (not waiting for it to serve).
    pub fn spawn(&mut self, bin: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))
            .unwrap_or_else(|e| panic!("node log: {e}"));
        let child = Command::new(bin)
            .arg(&self.data)
            .arg(&self.client)
            .arg(&self.raft)
            .arg(&self.etcd)
            .arg(self.id.to_string())
            .arg(self.partitions.to_string())
            .args(self.auth.as_ref().map(|a| a.0.clone()))
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn node {}: {e}", self.id));
        self.child = Some(child);
    }

    /// Wait until it answers `CLUSTER_MAP`.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let addr = self.client.clone();
        let id = self.id;
        let log = self.data.with_extension("log");
        let token = self.token();
        let child = &mut self.child;
        wait_until(&format!("node {id} serving"), timeout, || {
            if let Some(c) = child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(20).collect();
                    panic!(
                        "node {id} exited: {st}; its log ends:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            Client::connect(addr.as_str(), &token)
                .and_then(|mut c| c.call(&Request::ClusterMap))
                .is_ok()
        });
    }

    /// Its `STATS`, if it answers within 5 s (a paused node does not).
    pub fn stats(&self) -> Option<std::collections::HashMap<String, u64>> {
        let mut c = Client::connect(self.client.as_str(), &self.token()).ok()?;
        c.set_reply_timeout(Some(Duration::from_secs(5)));
        match c.call(&Request::Stats).ok()? {
            timeline_client::protocol::Response::Stats(kv) => Some(kv.into_iter().collect()),
            _ => None,
        }
    }

    /// Its data directory (the engine's).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process stays, its sockets open, and does nothing
    /// until [`NodeProc::resume`] (a long GC pause or a VM stall).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`NodeProc::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let c = self.child.as_ref().expect("the node is not running");
        let st = Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill {sig}: {e}"));
        assert!(st.success(), "kill {sig} {}: {st}", c.id());
    }

    /// The tail of its log (for failure messages).
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// An etcd and (usually) three nodes started from `bin` (a `cluster-node`
/// executable) in a temporary directory, stopped when dropped.
pub struct Cluster {
    _tmp: tempfile::TempDir,
    pub etcd: Etcd,
    pub nodes: Vec<NodeProc>,
}

impl Cluster {
    /// Start and wait (up to 60 s) until every node serves.
    pub fn start(bin: &str, partitions: u32) -> Cluster {
        Cluster::start_with(bin, partitions, None)
    }

    /// [`Cluster::start`], with `--auth` on and signed by `secret` if given
    /// (the harness then connects with an admin token).
    pub fn start_with(bin: &str, partitions: u32, secret: Option<&str>) -> Cluster {
        Cluster::start_shaped(bin, partitions, 3, |n| match secret {
            Some(s) => n.with_auth(s),
            None => n,
        })
    }

    /// `count` nodes (ids 1..=count), each made by `shape` from a plain
    /// one (auth, environment), started together.
    pub fn start_shaped(
        bin: &str,
        partitions: u32,
        count: u64,
        shape: impl Fn(NodeProc) -> NodeProc,
    ) -> Cluster {
        Cluster::start_prepared(bin, partitions, count, shape, |_| {})
    }

    /// [`Cluster::start_shaped`], with `prepare` run on etcd's endpoint
    /// before any node starts (to put keys there first).
    pub fn start_prepared(
        bin: &str,
        partitions: u32,
        count: u64,
        shape: impl Fn(NodeProc) -> NodeProc,
        prepare: impl FnOnce(&str),
    ) -> Cluster {
        Cluster::start_in(bin, partitions, count, None, shape, prepare)
    }

    /// Three nodes (shaped by `shape`) whose data directories and logs are
    /// in `nodes_dir` (a small file system of the test's), etcd's in a
    /// temporary directory of its own.
    pub fn start_on(
        bin: &str,
        partitions: u32,
        nodes_dir: &Path,
        shape: impl Fn(NodeProc) -> NodeProc,
    ) -> Cluster {
        Cluster::start_in(bin, partitions, 3, Some(nodes_dir), shape, |_| {})
    }

    fn start_in(
        bin: &str,
        partitions: u32,
        count: u64,
        nodes_dir: Option<&Path>,
        shape: impl Fn(NodeProc) -> NodeProc,
        prepare: impl FnOnce(&str),
    ) -> Cluster {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let etcd = Etcd::start(tmp.path());
        prepare(&etcd.endpoint());
        let dir = nodes_dir.unwrap_or(tmp.path());
        let mut nodes: Vec<NodeProc> = (1..=count)
            .map(|id| shape(NodeProc::new(id, dir, &etcd.endpoint(), partitions)))
            .collect();
        for n in &mut nodes {
            n.spawn(bin);
        }
        for n in &mut nodes {
            n.wait_ready(Duration::from_secs(60));
        }
        Cluster {
            _tmp: tmp,
            etcd,
            nodes,
        }
    }

    /// The directory holding etcd's and the nodes' data.
    pub fn dir(&self) -> &Path {
        self._tmp.path()
    }

    /// The nodes' client addresses.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    /// The end of every node's log (for a failure message).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {}:\n{}", n.id, n.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A tmpfs mounted for a test (it needs root, which CI has), unmounted on
/// drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount one of `size` (`mount`'s syntax: `128m`) at `at`; `None` if
    /// that is not allowed here.
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Bytes free on it now.
    pub fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.0)
            .output()
            .unwrap_or_else(|e| panic!("df: {e}"));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("df printed {:?}", out.stdout))
    }

    /// A ballast file `name` taking all but about `leave` bytes, allocated
    /// in one call (`fallocate`: the writers on the file system meet a
    /// full disk at once, not as it fills), then, for `leave` 0, topped
    /// up by writes until they fail.
    pub fn ballast(&self, name: &str, leave: u64) -> PathBuf {
        let p = self.0.join(name);
        // Some margin for what the nodes write meanwhile.
        let size = self.free().saturating_sub(leave.max(256 << 10));
        let _ = Command::new("fallocate")
            .args(["-l", &size.to_string()])
            .arg(&p)
            .status();
        if leave == 0 {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .unwrap_or_else(|e| panic!("ballast: {e}"));
            let chunk = vec![0u8; 4096];
            while f.write_all(&chunk).is_ok() {}
        }
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
