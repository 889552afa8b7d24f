//! `timeline-bench`: the workload driver for the timeline engine.
//!
//! ```text
//! timeline-bench <append|read|fanout|im|fanout-sweep|reopen> [flags]
//! ```
//!
//! The workloads, units and output fields are defined in the project's
//! `workload.md`; this binary implements them for `--target engine` (the
//! engine linked in-process) and, for `append` and `read`, `--target
//! rocksdb`: RocksDB used as a timeline store (key = timeline id ‖ seq),
//! the general-purpose KV baseline, built only with the optional `rocksdb`
//! cargo feature (see `workloads/rocksdb.rs` for the build command, options
//! and how its figures map onto the engine's). Implemented so far:
//!
//! - **`append` (W1)**: `--messages` appends of `--payload`-byte random
//!   payloads to `--timelines` timelines (uniform, or Zipf with `--zipf S`),
//!   in batches of `--batch`, split over `--threads` threads. Durability:
//!   `none` = `Durability::Buffered`, `sync` = `Durability::Sync`, `group` =
//!   `Durability::GroupCommit`, or with `--in-flight N > 1` up to
//!   `N / batch` `append_async` tickets kept in flight per thread (latency is
//!   from the append call to its ticket's `wait` returning). Reports
//!   messages/s, per-batch latency, bytes written (after `Engine::sync`),
//!   write amplification, peak RSS, index bytes, files. `ops` counts
//!   messages (a batch counts its messages); `calls` counts batches.
//!   `disk_write_bytes` is the kernel's count (/proc/self/io `write_bytes`)
//!   over the timed section plus the final sync, taken the same way for every
//!   target, unlike `bytes_written`, which is the target's own count.
//! - **`read` (W2)**: loads the data with W1 first (same flags; reported
//!   as a `phase: "load"` line) unless `--dir` already holds data for the
//!   keyspace, then `--reads` range reads of `--read-len` records from a random
//!   timeline that has data, at a random start seq inside it: half forward,
//!   half backward (newest-first), reported as two lines with `direction`.
//!   Every page is checked (consecutive seqs, expected length); `errors`
//!   counts failures and the exit status is non-zero if any. When data is
//!   loaded from disk, `--warm` reads everything once before timing.
//! - **`reopen`**: opens an existing `--dir` (after a clean shutdown or a
//!   kill -9) and reports the `Engine::open` wall time (`open_secs`), the
//!   timelines recovered, and `messages`: the sum of `last_seq` over timeline
//!   ids `0..--timelines` of `--keyspace` (the engine cannot list timelines,
//!   so this assumes W1's id space), then spot-checks pages of up to 1,000
//!   timelines (`errors`).
//! - `fanout` (W3), `im` (W4), `fanout-sweep` (W5): not implemented yet.
//!
//! Every subcommand accepts the whole flag vocabulary; a flag a workload
//! does not use is ignored. Engine flags: `--shards` (4), `--segment-mb`
//! (64, both keyspaces), `--io std|uring|auto`, `--keyspace store|sync`
//! (where W1/W2 write), `--dir` (default: a fresh directory under /tmp,
//! removed at the end unless `--keep`; a given `--dir` is never removed).
//!
//! Output: a machine line and an aligned table on stdout, or with `--json`
//! one JSON object per result line and nothing else on stdout (progress goes
//! to stderr). Every line carries `cores` and `mem_bytes`. Latencies are
//! measured in nanoseconds and reported in microseconds.

mod report;
mod sysinfo;
mod workloads;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, BoxError>;

#[derive(Parser, Debug)]
#[command(
    name = "timeline-bench",
    version,
    about = "Workload driver (W1..W5) for the timeline engine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// W1: append messages to timelines.
    Append(Flags),
    /// W2: range reads after a W1 load.
    Read(Flags),
    /// W3: group messages fanned out to receivers' sync timelines.
    Fanout(Flags),
    /// W4: the IM workload (the headline).
    Im(Flags),
    /// W5: fan-out modes across group sizes.
    FanoutSweep(Flags),
    /// Open an existing directory and report recovery time.
    Reopen(Flags),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Engine,
    Server,
    Rocksdb,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    None,
    Group,
    Sync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoArg {
    Std,
    Uring,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyspaceArg {
    Store,
    Sync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FanoutMode {
    Write,
    Read,
    Hybrid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Entries {
    Copy,
    Reference,
}

/// The one flag vocabulary every subcommand accepts.
#[derive(Args, Debug, Clone)]
pub struct Flags {
    /// What to benchmark: `engine`, or `rocksdb` for append/read (needs the `rocksdb` feature).
    #[arg(long, value_enum, default_value = "engine")]
    pub target: Target,
    /// Data directory (default: a fresh temporary directory, removed at the end unless --keep).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the temporary data directory.
    #[arg(long)]
    pub keep: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "none")]
    pub durability: DurabilityArg,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// One JSON object per result line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Server address (--target server).
    #[arg(long)]
    pub addr: Option<String>,
    #[arg(long)]
    pub connections: Option<usize>,
    #[arg(long)]
    pub pipeline: Option<usize>,
    #[arg(long, default_value_t = 100_000)]
    pub timelines: u64,
    #[arg(long, default_value_t = 2_000_000)]
    pub messages: u64,
    /// Zipf exponent for timeline choice (uniform if absent).
    #[arg(long)]
    pub zipf: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Appends in flight per thread (group durability: async tickets).
    #[arg(long, default_value_t = 1)]
    pub in_flight: usize,
    #[arg(long, default_value_t = 200_000)]
    pub reads: u64,
    #[arg(long, default_value_t = 20)]
    pub read_len: usize,
    /// Read everything once before timing reads of data loaded from disk.
    #[arg(long)]
    pub warm: bool,
    #[arg(long)]
    pub groups: Option<u64>,
    #[arg(long)]
    pub fanout: Option<usize>,
    #[arg(long, value_enum)]
    pub fanout_mode: Option<FanoutMode>,
    #[arg(long, value_enum)]
    pub entries: Option<Entries>,
    #[arg(long)]
    pub users: Option<u64>,
    #[arg(long)]
    pub devices: Option<String>,
    #[arg(long)]
    pub hybrid_threshold: Option<usize>,
    #[arg(long, value_delimiter = ',')]
    pub sizes: Option<Vec<u64>>,
    /// Engine shards per keyspace (fixed when a directory is created).
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    /// Segment size in MiB (both keyspaces).
    #[arg(long, default_value_t = 64)]
    pub segment_mb: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub io: IoArg,
    /// The keyspace W1/W2 write to.
    #[arg(long, value_enum, default_value = "store")]
    pub keyspace: KeyspaceArg,
    /// Regroup sealed segments per timeline (`on`/`off`), overriding the
    /// keyspace default (store: on, sync: off).
    #[arg(long, value_parser = clap::builder::BoolishValueParser::new())]
    pub regroup: Option<bool>,
    /// After the load, roll and seal every active segment (untimed, reported
    /// as `seal_secs`): write amplification then covers the data's whole
    /// life, and `read` reads sealed segments instead of in-memory ones.
    #[arg(long)]
    pub seal: bool,
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("timeline-bench: error: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs a subcommand; `Ok(code)` is the exit status.
fn run(cli: Cli) -> Result<i32> {
    let (name, flags) = match &cli.cmd {
        Cmd::Append(f) => ("append", f),
        Cmd::Read(f) => ("read", f),
        Cmd::Fanout(f) => ("fanout", f),
        Cmd::Im(f) => ("im", f),
        Cmd::FanoutSweep(f) => ("fanout-sweep", f),
        Cmd::Reopen(f) => ("reopen", f),
    };
    if matches!(cli.cmd, Cmd::Fanout(_) | Cmd::Im(_) | Cmd::FanoutSweep(_)) {
        return Err(format!("{name}: not implemented yet (issue 3)").into());
    }
    let rocksdb_workload = matches!(cli.cmd, Cmd::Append(_) | Cmd::Read(_));
    match flags.target {
        Target::Engine => {}
        Target::Rocksdb if rocksdb_workload => {
            if !cfg!(feature = "rocksdb") {
                return Err("--target rocksdb: built without the `rocksdb` feature: \
                     cargo run --release -p timeline-bench --features rocksdb -- ... \
                     (with ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu to link Debian's \
                     librocksdb-dev instead of compiling RocksDB; see \
                     bench/src/workloads/rocksdb.rs)"
                    .into());
            }
        }
        t => {
            let t = t
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            return Err(format!(
                "{name} --target {t}: not implemented yet (engine: every workload; rocksdb: append, read)"
            )
            .into());
        }
    }
    flags.validate()?;
    let machine = sysinfo::Machine::detect();
    let mut rep = report::Reporter::new(flags.json, machine);
    let errors = match (&cli.cmd, flags.target) {
        #[cfg(feature = "rocksdb")]
        (Cmd::Append(f), Target::Rocksdb) => workloads::rocksdb::append(f, &mut rep)?,
        #[cfg(feature = "rocksdb")]
        (Cmd::Read(f), Target::Rocksdb) => workloads::rocksdb::read(f, &mut rep)?,
        (Cmd::Append(f), _) => workloads::append::run(f, &mut rep)?,
        (Cmd::Read(f), _) => workloads::read::run(f, &mut rep)?,
        (Cmd::Reopen(f), _) => workloads::reopen::run(f, &mut rep)?,
        _ => 0,
    };
    rep.finish();
    if errors > 0 {
        eprintln!("timeline-bench: {errors} verification error(s)");
        return Ok(2);
    }
    Ok(0)
}

impl Flags {
    fn validate(&self) -> Result<()> {
        if self.threads == 0 || self.batch == 0 || self.in_flight == 0 || self.timelines == 0 {
            return Err(
                "--threads, --batch, --in-flight and --timelines must be at least 1".into(),
            );
        }
        if self.read_len == 0 {
            return Err("--read-len must be at least 1".into());
        }
        if let Some(s) = self.zipf {
            if !(s.is_finite() && s >= 0.0) {
                return Err("--zipf must be a finite number >= 0".into());
            }
        }
        Ok(())
    }
}
