//! Machine and process facts read from `/proc`: peak RSS, cores, memory.

use std::path::Path;

/// The machine a run happened on.
#[derive(Debug, Clone, Copy)]
pub struct Machine {
    pub cores: usize,
    pub mem_bytes: u64,
}

impl Machine {
    pub fn detect() -> Machine {
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_bytes: proc_kb("/proc/meminfo", "MemTotal:").unwrap_or(0) * 1024,
        }
    }

    /// One line for the human output.
    pub fn describe(&self) -> String {
        format!(
            "machine: {} cores ({}), {:.1} GiB RAM, linux {}",
            self.cores,
            cpu_model(),
            self.mem_bytes as f64 / (1u64 << 30) as f64,
            kernel()
        )
    }
}

/// The CPU's model name from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into())
}

/// The kernel release.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_kb("/proc/self/status", "VmHWM:").unwrap_or(0) * 1024
}

/// Current (anonymous, file-backed) resident bytes: file-backed pages are
/// mapped segment files, which the page cache could drop.
pub fn rss_split() -> (u64, u64) {
    let f = "/proc/self/status";
    (
        proc_kb(f, "RssAnon:").unwrap_or(0) * 1024,
        proc_kb(f, "RssFile:").unwrap_or(0) * 1024,
    )
}

/// This process's storage write counters from `/proc/self/io` (all its
/// threads, including exited ones and a RocksDB's background threads).
/// `write_bytes` counts pages the process dirtied (or wrote directly), at the
/// moment they are dirtied, whether or not writeback has happened yet;
/// `cancelled_write_bytes` counts dirty pages that were dropped before being
/// written back (a file truncated or deleted while still in the page cache).
/// All zero when the kernel has no task I/O accounting.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskIo {
    pub write_bytes: u64,
    pub cancelled_write_bytes: u64,
}

impl DiskIo {
    pub fn now() -> DiskIo {
        DiskIo::of(None)
    }

    /// The counters of process `pid` (`None`: this process). Zero if they
    /// cannot be read (another user's process, no task I/O accounting).
    pub fn of(pid: Option<u32>) -> DiskIo {
        let s = std::fs::read_to_string(proc_path(pid, "io")).unwrap_or_default();
        let field = |key: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
                .unwrap_or(0)
        };
        DiskIo {
            write_bytes: field("write_bytes:"),
            cancelled_write_bytes: field("cancelled_write_bytes:"),
        }
    }
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// Peak resident set size (VmHWM) of process `pid` (`None`: this one).
pub fn peak_rss_of(pid: Option<u32>) -> u64 {
    proc_kb(&proc_path(pid, "status"), "VmHWM:").unwrap_or(0) * 1024
}

/// Resident set size (VmRSS) of process `pid` now (`None`: this one).
pub fn rss_of(pid: Option<u32>) -> u64 {
    proc_kb(&proc_path(pid, "status"), "VmRSS:").unwrap_or(0) * 1024
}

/// Threads of process `pid` now (`None`: this one); 0 if unreadable.
pub fn threads_of(pid: Option<u32>) -> u64 {
    std::fs::read_to_string(proc_path(pid, "status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Clock ticks per second of `/proc/PID/stat`'s times (`USER_HZ`, 100 on
/// every Linux architecture the project runs on; reading `sysconf` would
/// need `unsafe`).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system, all threads, exited ones included) process
/// `pid` has used so far (`None`: this one); 0 if unreadable. Resolution:
/// 10 ms.
pub fn cpu_secs(pid: Option<u32>) -> f64 {
    stat_cpu_secs(&proc_path(pid, "stat"))
}

/// utime + stime of a `/proc/.../stat` file, in seconds (0 if unreadable).
fn stat_cpu_secs(path: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields from the last ')'. utime and stime are fields 14, 15.
    let Some(rest) = s.rfind(')').and_then(|i| s.get(i + 1..)) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // `rest` starts at field 3 (state): field n is at index n - 3.
    (tick(11) + tick(12)) as f64 / USER_HZ
}

/// CPU seconds used so far by this process's threads whose name starts
/// with one of `prefixes` (from `/proc/self/task/*/comm`): the storage
/// side's own threads in an in-process run (the IM workers and the
/// engine's maintenance thread), without the workload's client threads.
/// Threads that already exited are not counted: take both readings while
/// the threads live.
pub fn threads_cpu_secs(prefixes: &[&str]) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| prefixes.iter().any(|p| c.trim_end().starts_with(p)))
        })
        .map(|e| stat_cpu_secs(&e.path().join("stat").to_string_lossy()))
        .sum()
}

/// A `Key:   123 kB` value from a /proc file.
fn proc_kb(file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(file).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.get(key.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Regular files under `dir`, recursively.
pub fn count_files(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => n += count_files(&e.path()),
            Ok(t) if t.is_file() => n += 1,
            _ => {}
        }
    }
    n
}
