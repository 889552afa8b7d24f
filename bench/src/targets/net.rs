//! What the network targets (`--target server`, `--target redis`) share:
//! the child processes the bench starts (timeline-server, redis-server) and
//! the process meters (CPU, disk writes, peak RSS of the server process).

use crate::report::ResultLine;
use crate::sysinfo::{cpu_secs, peak_rss_bytes, peak_rss_of, DiskIo};
use crate::workloads::append::round3;
use crate::Result;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `--connections` default.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// `--pipeline` default.
pub const DEFAULT_PIPELINE: usize = 16;
/// How long a server gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// A process the bench started. Dropping it kills it (SIGKILL) if it is
/// still running; [`Proc::stop`] is the graceful way.
pub struct Proc {
    child: Child,
    name: String,
    /// Kept open so that a late write of the child's does not hit a closed pipe.
    stdout: Option<BufReader<ChildStdout>>,
    done: bool,
}

impl Proc {
    /// Start `cmd` with stdin closed and stderr inherited; stdout piped
    /// (for [`Proc::first_line`]: the child must not write much more to it,
    /// nobody reads it) or discarded.
    pub fn spawn(mut cmd: Command, name: &str, pipe_stdout: bool) -> std::io::Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(if pipe_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().map(BufReader::new);
        Ok(Proc {
            child,
            name: name.into(),
            stdout,
            done: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line the child prints on stdout (without the newline).
    pub fn first_line(&mut self) -> Result<String> {
        let mut s = String::new();
        let n = match self.stdout.as_mut() {
            Some(r) => r.read_line(&mut s)?,
            None => 0,
        };
        if n == 0 {
            let status = self.child.wait()?;
            self.done = true;
            return Err(format!("{} exited ({status}) before printing anything", self.name).into());
        }
        Ok(s.trim_end().to_string())
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        !self.done && matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL (a crash), then wait; the exit status.
    pub fn kill(mut self) -> Result<ExitStatus> {
        self.child.kill()?;
        let st = self.child.wait()?;
        self.done = true;
        Ok(st)
    }

    /// SIGTERM, then wait (SIGKILL after a grace period); the exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let pid = self.pid().to_string();
        // `kill` rather than libc::kill: the workspace denies unsafe code.
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !sent {
            let _ = self.child.kill();
        }
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                self.done = true;
                return Ok(st);
            }
            if t.elapsed() > STOP_GRACE {
                eprintln!(
                    "{}: still running {STOP_GRACE:?} after SIGTERM; killing it",
                    self.name
                );
                let _ = self.child.kill();
                let st = self.child.wait()?;
                self.done = true;
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback port that was free a moment ago (bind port 0, read, close).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// CPU, disk writes and peak RSS around a timed section: of the server
/// process (when the bench started it) and of the bench itself.
pub struct Meter {
    server: Option<u32>,
    server_cpu: f64,
    client_cpu: f64,
    io: DiskIo,
}

impl Meter {
    pub fn start(server: Option<u32>) -> Meter {
        Meter {
            server,
            server_cpu: server.map_or(0.0, |p| cpu_secs(Some(p))),
            client_cpu: cpu_secs(None),
            io: server.map_or_else(DiskIo::default, |p| DiskIo::of(Some(p))),
        }
    }

    /// Fill `server_cpu_secs`, `client_cpu_secs`, the server's
    /// `disk_write_bytes` (call after `payload_bytes` is set) and peak RSS.
    pub fn finish(&self, l: &mut ResultLine) {
        l.client_cpu_secs = Some(round3(cpu_secs(None) - self.client_cpu));
        l.client_peak_rss_bytes = Some(peak_rss_bytes());
        if let Some(p) = self.server {
            l.server_cpu_secs = Some(round3(cpu_secs(Some(p)) - self.server_cpu));
            l.set_disk_io(self.io, DiskIo::of(Some(p)));
            l.peak_rss_bytes = Some(peak_rss_of(Some(p)));
        }
    }
}
