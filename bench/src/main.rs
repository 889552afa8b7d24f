//! `timeline-bench`: the workload driver for the timeline engine.
//!
//! ```text
//! timeline-bench <append|read|fanout|im|fanout-sweep|reopen|devices|torture|abuse|compare> [flags]
//! ```
//!
//! The workloads, units and output fields are defined in the project's
//! `workload.md`. Each workload is written once, in `workloads/`, over the
//! targets it takes; a target (`targets/`) only adapts operations and
//! reports its own costs:
//!
//! | target | what | workloads |
//! |---|---|---|
//! | `engine` (default) | the engine (and for W3–W5 the IM layer) in this process | append, read, fanout, im, fanout-sweep, reopen |
//! | `server` | `timeline-server` over TCP (`--addr`, or the binary next to this one started on a free loopback port and stopped with SIGTERM), `--connections` × `--pipeline` requests in flight, `--refill` (1: a sliding window; the pipeline depth: whole batches) | append, read, fanout, im, devices |
//! | `cluster` | a running cluster of `timeline-server --cluster` nodes (`--addr HOST:PORT,...`, e.g. from `server/scripts/local-cluster.sh`): single `APPEND`s and `SCAN`s sent to each timeline's partition leader, `--connections` × `--pipeline` in flight; W4's `SEND`s and `SYNC`s and W6's devices on their conversation's or user's partition leader | append, read, im, devices |
//! | `redis` | Redis Streams (one stream per timeline; `redis-server` started with `--save ""` and `--appendonly no` / `everysec` / `always` for `none` / `group` / `sync`) | append, read, devices |
//! | `rocksdb` | RocksDB as a timeline store and (W3) as a write-fan-out IM store, with the optional `rocksdb` feature | append, read, fanout |
//!
//! `targets/server.rs`, `targets/redis.rs` and `targets/rocksdb.rs` say how
//! each maps the operations and its figures.
//!
//! Result lines of the network targets carry `connections`, `pipeline`,
//! `refill`, `server_cpu_secs` and `client_cpu_secs` (CPU of the server
//! process and of the bench over the timed section, from /proc), and their
//! `peak_rss_bytes` and `disk_write_bytes` are the server process's (when
//! the bench started it; the bench's own RSS is `client_peak_rss_bytes`).
//! `threads` is the number of connections.
//!
//! The workloads:
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
//! - **`fanout` (W3)**, **`im` (W4)**, **`fanout-sweep` (W5)**: the IM
//!   workloads, on the IM layer `timeline_im` (`--target engine`), a
//!   server it starts (`--target server`) or, W3 and W4, a running
//!   cluster (`--target cluster --addr ...`; its nodes' own
//!   `--hybrid-threshold` decides the fan-out mode: give W3 the same
//!   value, a `--fanout-mode` the groups would not get is refused),
//!   described below.
//!
//! # The IM workloads (W3, W4, W5)
//!
//! Shared by the three (`workloads/imkit.rs`):
//!
//! - **Configuration.** `--durability none|group|sync` is
//!   `ImConfig::durability` = `Buffered` / `GroupCommit` / `Sync` (the
//!   durability of every store and sync write, so of an acknowledged send);
//!   `--entries copy|reference` is `ImConfig::entries`. `--fanout-mode`
//!   sets `ImConfig::hybrid_threshold` (groups with more members than it use
//!   read fan-out): `write` = `usize::MAX` (never), `read` = 0 (every group;
//!   a group's `Created` event, seq 1, is still written to every member,
//!   read fan-out starts at seq 2), `hybrid` = `--hybrid-threshold` (500).
//!   Direct (1:1) conversations always use write fan-out.
//! - **Setup** (untimed, `setup_secs`): the conversations are created by an
//!   `Im` opened with reference entries, which is then closed and reopened
//!   with the run's configuration, so the timed section starts from a freshly
//!   opened layer (see `imkit` for the history of this detour).
//! - **Sends** are `Im::send_async` from `--threads` sender threads, each
//!   keeping up to `--in-flight` (default 256) sends outstanding; with
//!   `--rate N` (an extension, messages/s over all threads, 0 = unlimited)
//!   the senders are paced. `p50_us`/`p99_us`/`p999_us` are per send: from
//!   the `send_async` call to the sender seeing its ack, and the IM layer
//!   acks a send only once it is stored and every member's sync entry is
//!   durable (per `--durability`) and visible, so for write fan-out it is
//!   "append to visible in the last receiver's sync timeline". Without
//!   `--rate` the senders saturate the layer and these latencies are mostly
//!   queueing (about in-flight / throughput).
//! - **Units.** `ops` = `messages` = messages sent (timed).
//!   `deliveries` = one per receiving member per message, the sender
//!   included (its sync timeline gets the entry too, for its other devices),
//!   taken from the layer's counters: sync entries written plus members
//!   reached through a read-fan-out group's store timeline
//!   (`ImStats::sync_writes + read_fanout_deliveries`); W3 and W5 check it
//!   equals messages x members. `storage_writes_per_message` = (store
//!   entries + sync entries written) / messages; journal and catalog writes
//!   are separate (`meta_writes_per_message`). `writes_per_delivery` =
//!   storage writes / deliveries. `reads_per_delivery` = (sync-timeline
//!   range reads + store reads + read-fan-out group polls) / messages
//!   returned to devices, `storage_reads_per_delivery` the same without the
//!   polls (a poll is answered by an in-memory watermark; the IM layer counts
//!   it as the read it would be without one). `bytes_written` = engine bytes
//!   written, both keyspaces, over the timed section (after `Engine::sync`);
//!   `write_amplification` = bytes written / record bytes appended (the
//!   engine's definition); `bytes_per_payload_byte` = bytes written /
//!   (messages x `--payload`), which includes the fan-out.
//! - **Devices** keep their own checkpoints (sync timeline seq, plus one per
//!   read-fan-out group) and call `Im::sync`; they start where setup left
//!   them. Every message a device receives must be the next seq of its
//!   conversation (no gap, no duplicate), and after the run every checked
//!   device must end each conversation at exactly 1 + the acknowledged
//!   sends; `errors` counts violations (and failed sends), and the exit
//!   status is 2 if there are any.
//!
//! **`fanout` (W3).** `--groups` G messages (default 10,000) to groups of
//! `--fanout` M members (default 200) drawn at random among `--timelines` T
//! users (default 100,000). min(G, 10,000) groups are created, and message i
//! goes to group i mod that (so by default each group receives one message;
//! a larger G reuses them round-robin), from a random member. The timed
//! section runs from the first send to the last ack; `messages_per_sec` is
//! group messages/s, `deliveries_per_sec` deliveries/s. Afterwards up to
//! 1,000 random receivers sync everything from their post-setup checkpoint
//! and must get exactly their groups' messages (`errors`).
//!
//! **`im` (W4).** `--users` U users (default 100,000), each with
//! `--devices` D devices ("1-3": uniform per user; or "2").
//! Conversations: U direct (1:1) ones between random pairs (each user in
//! two on average); U/10 small groups (3-20 members, uniform), U/400 medium
//! ones (21-500, log-uniform), U/20,000 large ones (at least one; sizes
//! log-spaced from 501 to 20,000); members at random, sizes capped at U.
//! Groups above `--hybrid-threshold` H (default 500) use read fan-out.
//! Activity: each message goes to a direct conversation with probability
//! 0.65, a small group 0.30, a medium one 0.049, a large one 0.001, and
//! within the class to a Zipf-chosen conversation (exponent `--zipf`,
//! default 1.0; the hottest are random ones), from a random member: about
//! 20 deliveries per message at U = 100,000 (printed on stderr).
//! `--messages` N (default 2,000,000) are sent (payload: the send time in
//! the first 8 bytes, then random bytes).
//! Reads, concurrent with the sends: a device is *online* if it was picked,
//! in random order, until the online devices' expected share of deliveries
//! reaches 10 per message sent (so, each online device reading everything
//! its user receives, the message-level read:write ratio is ~10:1;
//! `read_write_ratio` reports the measured entries read / messages). An
//! online device syncs when notified: when a send is acked the sender flags
//! the online devices of the conversation's members (standing in for a push
//! notification), and `--threads` device threads sync each flagged device
//! (pages of 100, following `has_more`). `sync_ops` counts every sync call,
//! `entries_read` the messages returned. **Visible latency** (`visible_*`):
//! latency probes are one member of each of the 8 hottest conversations of
//! each class (their first device); one probe thread syncs them in a tight
//! loop (20 us pause after a pass that found nothing), so append -> visible
//! is measured without a poll interval: for every message a probe receives,
//! now minus the send time carried in the payload, which overstates the true
//! figure by at most one pass over the probes. **Push latency** (`push_*`):
//! the first `--push` probe users (extension, default 16, 0 = none) also
//! subscribe (`Im::subscribe`), one thread each, and record send -> push
//! received; `push_resyncs` counts overflows. After the run every online
//! device and 1,000 offline users' first devices catch up and are checked.
//!
//! **`fanout-sweep` (W5).** For each size S in `--sizes` (default 2, 5, 10,
//! 20, 50, 100, 200, 500, 1,000, 2,000, 5,000, 10,000, 20,000) and each mode
//! (write, read, hybrid; or only `--fanout-mode`), one result line from a
//! fresh `Im` in a fresh subdirectory (removed after the point unless
//! `--keep`): max(5,000, S) users, round(4 x users / S) groups of S random
//! members (so every user is in about 4 groups at every size). Phase A
//! (timed): `--messages` per point (default: 2,000,000 / S clamped to
//! 200..=100,000 where the groups use write fan-out, 100,000 where they use
//! read fan-out, whose cost per message does not grow with S), round-robin over the groups from random members,
//! pipelined as above: `messages_per_sec`, `deliveries_per_sec`, latency,
//! `storage_writes_per_message`, bytes. Then 1,000 random *observed* users
//! (one device each) catch up, untimed: devices read everything and are
//! checked until 1,000,000 messages were read back, the others move their
//! checkpoints to the end. Phase B, the read model:
//! min(200, messages) times, one message is sent to a random group and
//! acked, then every observed member of that group syncs once (it was
//! notified) and must receive exactly that message. So each member reads
//! each message once, and each sync of a user in K groups polls all of its
//! read-fan-out groups: write fan-out costs one sync-timeline read per
//! delivery, read fan-out one store read plus K polls. `reads_per_delivery`
//! and `storage_reads_per_delivery` come from phase B's counters,
//! `sync_ops_per_sec` is phase B's syncs per second spent in `sync`, and
//! `read_write_ratio` = reads per message (reads_per_delivery x S, every
//! member reading) / storage writes per message. The run's results
//! directory holds them drawn as `fanout-sweep.svg` (docs/fanout-sweep.svg).
//!
//! The subcommands share one flag vocabulary; each uses the part `APPLIES`
//! lists for it, and a flag it does not use is an error naming those it does. Engine flags: `--shards` (4), `--segment-mb`
//! (64, both keyspaces), `--io std|uring|auto`, `--keyspace store|sync`
//! (where W1/W2 write), `--dir` (default: a fresh directory under /tmp,
//! removed at the end unless `--keep`; a given `--dir` is never removed,
//! but W5's per-point subdirectories in it are, unless `--keep`).
//! `--in-flight` defaults to 1 for W1 and 256 for W3-W5. With `--target
//! server` the data directory is the spawned server's, `--shards` is passed
//! to it, the other engine flags are ignored (the server runs its engine
//! defaults), and `--in-flight` is not used (`--pipeline` is). Extensions
//! beyond `workload.md`'s vocabulary: `--rate` (W3, W4) and `--push` (W4),
//! above, and `--refill` (network targets). Environment:
//! `TIMELINE_BENCH_REDIS_CLIENT=crate` makes `--target redis` read replies
//! with the `redis` crate's parser instead of the bench's lean RESP reader
//! (`targets/resp.rs` says why the lean one is the default).
//!
//! Output: a machine line and an aligned table on stdout (for the IM
//! workloads a second table: deliveries/s, sync ops/s, writes per message
//! and per delivery, reads per delivery, read:write ratio, visible and push
//! latency), or with `--json` one JSON object per result line and nothing
//! else on stdout (progress goes to stderr). Every line carries `cores` and
//! `mem_bytes`. Latencies are measured in nanoseconds and reported in
//! microseconds.

mod compare;
mod progress;
mod report;
mod results;
mod sysinfo;
mod targets;
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
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
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
    /// W6: thousands of connected devices, push then sync (--target server|cluster|redis).
    Devices(Flags),
    /// Crash torture: SIGKILL the server under load, restart, verify every acknowledgement.
    Torture(Flags),
    /// Good clients' throughput and p99 while abusive clients hammer the server.
    Abuse(Flags),
    /// Run one workload on several targets back to back (same seed, same
    /// flags, one process, one machine) and print each figure with its
    /// ratio to the first target; `--sweep` repeats that over a flag's values.
    Compare(compare::CompareArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Engine,
    Server,
    /// A running cluster (`--addr` its nodes): W1, W2 and W6.
    Cluster,
    Rocksdb,
    Redis,
}

/// How `--target rocksdb` is configured (docs/benchmarks.md, "RocksDB").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RocksdbTuning {
    /// RocksDB's defaults, no compression, 64 MiB write buffer, 512 MiB cache.
    NearDefault,
    /// RocksDB's tuning guide for this shape, level compaction.
    Tuned,
    /// The same with universal compaction (less write amplification).
    TunedUniversal,
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

/// The flag vocabulary, shared by the subcommands; each uses the part
/// `APPLIES` lists for it, and any other flag given is an error.
#[derive(Args, Debug, Clone)]
pub struct Flags {
    /// What to run the workload on: `engine` (in process; every workload but
    /// devices), `server` (timeline-server over TCP: append, read, fanout,
    /// im, devices), `cluster` (running cluster nodes, `--addr`: append,
    /// read, devices), `rocksdb` (in process, needs the `rocksdb` feature:
    /// append, read, fanout) or `redis` (Redis Streams: append, read,
    /// devices).
    #[arg(long, value_enum, default_value = "engine")]
    pub target: Target,
    /// Data directory (default: a fresh temporary directory, removed at the end unless --keep).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the temporary data directory.
    #[arg(long)]
    pub keep: bool,
    /// Write the results directory (`<DIR>/<UTC time>-<command>/`: JSON
    /// lines, CSV, machine facts, SVG plots) under DIR. `im` and
    /// `fanout-sweep` write it under `results` unless `--no-results`; the
    /// other subcommands only when this flag is given.
    #[arg(long, value_name = "DIR")]
    pub results: Option<PathBuf>,
    /// `im`, `fanout-sweep`: do not write the results directory.
    #[arg(long, conflicts_with = "results")]
    pub no_results: bool,
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
    /// Address of a running timeline-server (--target server); without it
    /// the bench starts one on a free loopback port.
    #[arg(long)]
    pub addr: Option<String>,
    /// Connections to the server (--target server, redis; default 4), each
    /// driven by its own client thread.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Requests kept in flight per connection (--target server, redis;
    /// default 16).
    #[arg(long)]
    pub pipeline: Option<usize>,
    /// Extension (--target server, redis): queue more requests once at most
    /// `pipeline - N` are in flight (1, the default: a sliding window, one
    /// more request per reply; N = --pipeline: whole batches).
    #[arg(long)]
    pub refill: Option<usize>,
    #[arg(long, default_value_t = 100_000)]
    pub timelines: u64,
    /// Messages to send (W1/W4: total, default 2,000,000; W5: per point,
    /// default 2,000,000 / group size clamped to 200..=100,000, or 100,000
    /// for read fan-out).
    #[arg(long = "messages", value_name = "N")]
    pub messages_arg: Option<u64>,
    /// `--messages` resolved with the workload's default (`Flags::resolve`).
    #[arg(skip)]
    pub messages: u64,
    /// Zipf exponent for timeline choice (uniform if absent).
    #[arg(long)]
    pub zipf: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Appends in flight per thread (W1 with group durability: async
    /// tickets; default 1), or sends in flight per sender thread (W3, W4, W5;
    /// default 256).
    #[arg(long = "in-flight", value_name = "N")]
    pub in_flight_arg: Option<usize>,
    /// `--in-flight` resolved with the workload's default.
    #[arg(skip)]
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
    /// W6: connected devices in all (default 10,000).
    #[arg(long)]
    pub devices_total: Option<u64>,
    #[arg(long)]
    pub hybrid_threshold: Option<usize>,
    #[arg(long, value_delimiter = ',')]
    pub sizes: Option<Vec<u64>>,
    /// Extension (W3, W4): total send rate in messages/s over all sender
    /// threads; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Extension (W4): users (of the latency probes) subscribed to push;
    /// 0 = no subscriber at all (push costs the IM layer work per delivery
    /// as soon as anyone subscribes).
    #[arg(long, default_value_t = 16)]
    pub push: usize,
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
    /// `torture`: SIGKILL cycles (default 20).
    #[arg(long)]
    pub cycles: Option<u64>,
    /// `torture`: kill the server this many ms into each cycle's load, a
    /// random point in `MIN,MAX` (default 100,600).
    #[arg(long, value_delimiter = ',')]
    pub kill_ms: Option<Vec<u64>>,
    /// `abuse`: seconds of each measured phase (default 5).
    #[arg(long)]
    pub secs: Option<u64>,
    /// `--target rocksdb`: its configuration (every setting is printed in
    /// the result's `rocksdb_options`).
    #[arg(long, value_enum, default_value = "tuned")]
    pub rocksdb_tuning: RocksdbTuning,
    /// `abuse`: sockets that never send HELLO (default 10,000).
    #[arg(long)]
    pub silent: Option<u64>,
    /// `abuse`: the abuser threads' nice value (default 0, the good
    /// clients' and the server's). 19 stands for abusers on other machines:
    /// they get the CPU the server and the good clients leave, and the
    /// abuse volume they reached is printed beside the result.
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub abuser_nice: Option<i32>,
    /// Start the server with `RUST_LOG=warn` (unless RUST_LOG is set);
    /// `torture` always does.
    #[arg(skip)]
    pub quiet_server: bool,
}

/// The flags each subcommand uses (for at least one of its targets); any
/// other flag given on the command line is an error that lists these.
#[rustfmt::skip]
const APPLIES: &[(&str, &[&str])] = &[
    ("abuse", &["abuser-nice", "connections", "dir", "durability", "json", "keep", "pipeline", "secs", "seed", "shards", "silent"]),
    ("append", &["addr", "batch", "rocksdb-tuning", "connections", "dir", "durability", "in-flight", "io", "json", "keep", "keyspace", "messages", "payload", "pipeline", "refill", "regroup", "results", "seal", "seed", "segment-mb", "shards", "target", "threads", "timelines", "zipf"]),
    ("devices", &["addr", "connections", "devices-total", "dir", "durability", "json", "keep", "messages", "payload", "rate", "results", "seed", "shards", "target", "users", "zipf"]),
    ("fanout", &["addr", "connections", "dir", "durability", "entries", "fanout", "fanout-mode", "groups", "hybrid-threshold", "in-flight", "io", "json", "keep", "payload", "pipeline", "rate", "refill", "regroup", "results", "rocksdb-tuning", "seed", "segment-mb", "shards", "target", "threads", "timelines"]),
    ("fanout-sweep", &["dir", "durability", "entries", "fanout-mode", "hybrid-threshold", "in-flight", "io", "json", "keep", "messages", "no-results", "payload", "regroup", "results", "seed", "segment-mb", "shards", "sizes", "target", "threads"]),
    ("im", &["addr", "connections", "devices", "dir", "durability", "entries", "hybrid-threshold", "in-flight", "io", "json", "keep", "messages", "no-results", "payload", "pipeline", "push", "rate", "refill", "regroup", "results", "seed", "segment-mb", "shards", "target", "threads", "users", "zipf"]),
    ("read", &["addr", "batch", "rocksdb-tuning", "connections", "dir", "durability", "in-flight", "io", "json", "keep", "keyspace", "messages", "payload", "pipeline", "read-len", "reads", "refill", "regroup", "results", "seal", "seed", "segment-mb", "shards", "target", "threads", "timelines", "warm", "zipf"]),
    ("reopen", &["dir", "durability", "io", "json", "keyspace", "payload", "read-len", "regroup", "results", "seed", "segment-mb", "target", "threads", "timelines", "zipf"]),
    ("torture", &["cycles", "dir", "durability", "json", "keep", "kill-ms", "payload", "pipeline", "seed", "shards"]),
];

/// The first flag given on the command line that the subcommand does not
/// use, as an error naming the flags it does use.
pub(crate) fn inapplicable(matches: &clap::ArgMatches) -> Option<String> {
    let (name, sub) = matches.subcommand()?;
    let applies = APPLIES.iter().find(|(n, _)| *n == name)?.1;
    let cmd = <Cli as clap::CommandFactory>::command();
    let args = cmd.find_subcommand(name)?;
    for arg in args.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
            && !applies.contains(&long)
        {
            let list: Vec<String> = applies.iter().map(|f| format!("--{f}")).collect();
            return Some(format!(
                "--{long} does not apply to `{name}`; its flags are: {}",
                list.join(" ")
            ));
        }
    }
    None
}

/// The command line, each subcommand's `--help` showing only its flags.
fn command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    for (name, applies) in APPLIES {
        cmd = cmd.mut_subcommand(name, |sub| {
            let other: Vec<String> = sub
                .get_arguments()
                .filter(|a| a.get_long().is_some_and(|l| !applies.contains(&l)))
                .map(|a| a.get_id().to_string())
                .collect();
            other
                .iter()
                .fold(sub, |s, id| s.mut_arg(id.as_str(), |a| a.hide(true)))
        });
    }
    cmd
}

fn main() {
    let matches = command().get_matches();
    if let Some(e) = inapplicable(&matches) {
        eprintln!("timeline-bench: error: {e}");
        std::process::exit(2);
    }
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
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
    let errors = match &cli.cmd {
        Cmd::Compare(c) => compare::run(c)?,
        cmd => execute(cmd, true)?.1,
    };
    if errors > 0 {
        eprintln!("timeline-bench: {errors} verification error(s)");
        return Ok(2);
    }
    Ok(0)
}

/// Runs a workload subcommand: prints its lines and (with `results`) writes
/// its results directory. Returns the reporter and the verification errors.
pub(crate) fn execute(cmd: &Cmd, results: bool) -> Result<(report::Reporter, u64)> {
    let (name, flags) = match cmd {
        Cmd::Append(f) => ("append", f),
        Cmd::Read(f) => ("read", f),
        Cmd::Fanout(f) => ("fanout", f),
        Cmd::Im(f) => ("im", f),
        Cmd::FanoutSweep(f) => ("fanout-sweep", f),
        Cmd::Reopen(f) => ("reopen", f),
        Cmd::Devices(f) => ("devices", f),
        Cmd::Torture(f) => ("torture", f),
        Cmd::Abuse(f) => ("abuse", f),
        Cmd::Compare(_) => return Err("compare cannot compare compare".into()),
    };
    let mut flags = flags.clone();
    flags.resolve(cmd);
    flags.quiet_server = matches!(cmd, Cmd::Torture(_) | Cmd::Abuse(_));
    let flags = &flags;
    // The targets each workload takes; the workload is written once over them.
    let takes: &[Target] = match cmd {
        Cmd::Torture(_) | Cmd::Abuse(_) => &[
            Target::Engine,
            Target::Server,
            Target::Rocksdb,
            Target::Redis,
        ],
        Cmd::Append(_) | Cmd::Read(_) => &[
            Target::Engine,
            Target::Server,
            Target::Cluster,
            Target::Rocksdb,
            Target::Redis,
        ],
        Cmd::Fanout(_) => &[
            Target::Engine,
            Target::Server,
            Target::Cluster,
            Target::Rocksdb,
        ],
        Cmd::Im(_) => &[Target::Engine, Target::Server, Target::Cluster],
        Cmd::Devices(_) => &[Target::Server, Target::Cluster, Target::Redis],
        _ => &[Target::Engine],
    };
    let named = |t: Target| {
        t.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    };
    if !takes.contains(&flags.target) {
        let list: Vec<String> = takes.iter().map(|&t| named(t)).collect();
        return Err(format!(
            "{name} --target {}: {name} runs on {}",
            named(flags.target),
            list.join(", ")
        )
        .into());
    }
    if flags.target == Target::Rocksdb
        && !cfg!(feature = "rocksdb")
        && !matches!(cmd, Cmd::Torture(_) | Cmd::Abuse(_))
    {
        return Err("--target rocksdb: built without the `rocksdb` feature: \
             cargo run --release -p timeline-bench --features rocksdb -- ... \
             (with ROCKSDB_LIB_DIR=/usr/lib/x86_64-linux-gnu to link Debian's \
             librocksdb-dev instead of compiling RocksDB; see \
             bench/src/targets/rocksdb.rs)"
            .into());
    }
    flags.validate()?;
    let machine = sysinfo::Machine::detect();
    let results_root = match (&flags.results, cmd) {
        _ if !results => None,
        (Some(d), _) => Some(d.clone()),
        (None, Cmd::Im(_) | Cmd::FanoutSweep(_)) if !flags.no_results => {
            Some(PathBuf::from("results"))
        }
        _ => None,
    };
    // Measured before the run, on the file system the data will live on.
    let facts = results_root.as_ref().map(|_| {
        let at = flags.dir.clone().unwrap_or_else(std::env::temp_dir);
        let f = results::Facts::measure(&machine, &at, 20);
        if !flags.json {
            eprintln!("{}", f.describe());
        }
        f
    });
    let mut rep = report::Reporter::new(flags.json, machine);
    let errors = match cmd {
        Cmd::Append(_) | Cmd::Read(_) => on_target(cmd, flags, &mut rep)?,
        Cmd::Devices(_) => workloads::devices::run(flags, &mut rep)?,
        Cmd::Torture(_) => workloads::torture::run(flags, &mut rep)?,
        Cmd::Abuse(_) => workloads::abuse::run(flags, &mut rep)?,
        Cmd::Reopen(_) => workloads::reopen::run(flags, &mut rep)?,
        Cmd::Fanout(_) | Cmd::Im(_) => on_im_target(cmd, flags, &mut rep)?,
        Cmd::FanoutSweep(_) => workloads::sweep::run(flags, &mut rep)?,
        Cmd::Compare(_) => return Err("compare cannot compare compare".into()),
    };
    rep.finish();
    if let (Some(root), Some(facts)) = (&results_root, &facts) {
        if rep.is_empty() {
            eprintln!("results: {name} reports on stdout only; no results directory written");
        } else {
            let dir = rep.write_results(root, name, facts)?;
            eprintln!("results: {}", dir.display());
        }
    }
    Ok((rep, errors))
}

/// W1 or W2 on the target `--target` names.
fn on_target(cmd: &Cmd, flags: &Flags, rep: &mut report::Reporter) -> Result<u64> {
    use targets::{engine::EngineTarget, redis::RedisTarget, server::ServerTarget};
    fn on<T: targets::Target>(
        cmd: &Cmd,
        flags: &Flags,
        t: T,
        rep: &mut report::Reporter,
    ) -> Result<u64> {
        match cmd {
            Cmd::Read(_) => workloads::read::run(flags, t, rep),
            _ => workloads::append::run(flags, t, rep),
        }
    }
    match flags.target {
        Target::Engine => on(cmd, flags, EngineTarget::open(flags)?, rep),
        Target::Server => on(cmd, flags, ServerTarget::start(flags)?, rep),
        Target::Cluster => on(
            cmd,
            flags,
            targets::cluster::ClusterTarget::start(flags)?,
            rep,
        ),
        Target::Redis => on(cmd, flags, RedisTarget::start(flags)?, rep),
        #[cfg(feature = "rocksdb")]
        Target::Rocksdb => on(cmd, flags, targets::rocksdb::RocksTarget::open(flags)?, rep),
        #[cfg(not(feature = "rocksdb"))]
        Target::Rocksdb => Err("built without the rocksdb feature".into()),
    }
}

/// W3 or W4 on the target `--target` names.
fn on_im_target(cmd: &Cmd, flags: &Flags, rep: &mut report::Reporter) -> Result<u64> {
    use targets::{engine::EngineIm, server::ServerIm};
    use workloads::{fanout, im};
    match cmd {
        Cmd::Fanout(_) => {
            let mut p = fanout::Plan::new(flags)?;
            let largest = p.fanout;
            match flags.target {
                Target::Cluster => {
                    p.on_cluster(flags)?;
                    fanout::run(
                        flags,
                        targets::cluster_im::ClusterIm::start(flags)?,
                        &p,
                        rep,
                    )
                }
                Target::Server => fanout::run(
                    flags,
                    ServerIm::start(flags, p.threshold, largest)?,
                    &p,
                    rep,
                ),
                #[cfg(feature = "rocksdb")]
                Target::Rocksdb => fanout::run(
                    flags,
                    targets::rocksdb::RocksIm::open(flags, p.threshold)?,
                    &p,
                    rep,
                ),
                _ => fanout::run(flags, EngineIm::new(flags, p.threshold)?, &p, rep),
            }
        }
        _ => {
            let p = im::plan(flags)?;
            let largest = p.w.members.iter().map(|m| m.len()).max().unwrap_or(0);
            match flags.target {
                Target::Server => im::run(flags, ServerIm::start(flags, p.h, largest)?, &p, rep),
                Target::Cluster => im::run(
                    flags,
                    targets::cluster_im::ClusterIm::start(flags)?,
                    &p,
                    rep,
                ),
                _ => im::run(flags, EngineIm::new(flags, p.h)?, &p, rep),
            }
        }
    }
}

impl Flags {
    /// Fill in the defaults that depend on the workload.
    pub(crate) fn resolve(&mut self, cmd: &Cmd) {
        let im = matches!(cmd, Cmd::Fanout(_) | Cmd::Im(_) | Cmd::FanoutSweep(_));
        // W5's per-point default depends on the group size: 0 here, and
        // `workloads::sweep` reads `messages_arg` itself.
        self.messages = self.messages_arg.unwrap_or(match cmd {
            Cmd::FanoutSweep(_) => 0,
            _ => 2_000_000,
        });
        self.in_flight = self.in_flight_arg.unwrap_or(if im { 256 } else { 1 });
    }

    fn validate(&self) -> Result<()> {
        if self.threads == 0 || self.batch == 0 || self.in_flight == 0 || self.timelines == 0 {
            return Err(
                "--threads, --batch, --in-flight and --timelines must be at least 1".into(),
            );
        }
        if self.connections == Some(0) || self.pipeline == Some(0) || self.refill == Some(0) {
            return Err("--connections, --pipeline and --refill must be at least 1".into());
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn check(args: &[&str]) -> std::result::Result<(), String> {
        let m = Cli::command()
            .try_get_matches_from(std::iter::once("timeline-bench").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        inapplicable(&m).map_or(Ok(()), Err)
    }

    #[test]
    fn a_flag_of_another_workload_is_an_error_naming_the_right_ones() {
        let e = check(&["append", "--fanout", "8"]).unwrap_err();
        assert!(e.contains("--fanout does not apply to `append`"), "{e}");
        assert!(e.contains("--batch") && e.contains("--timelines"), "{e}");
        assert!(check(&["torture", "--reads", "5"]).is_err());
        assert!(check(&["im", "--no-results", "--users", "10"]).is_ok());
        // Defaults are not "given": a bare subcommand always passes.
        for (name, _) in APPLIES {
            assert!(check(&[name]).is_ok(), "{name}");
        }
    }

    #[test]
    fn every_subcommand_and_flag_is_in_the_table() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "compare") {
            let applies = APPLIES
                .iter()
                .find(|(n, _)| *n == sub.get_name())
                .unwrap_or_else(|| panic!("{} is missing from APPLIES", sub.get_name()))
                .1;
            for f in applies {
                assert!(
                    sub.get_arguments().any(|a| a.get_long() == Some(f)),
                    "APPLIES names --{f} for {}, which has no such flag",
                    sub.get_name()
                );
            }
        }
    }

    /// Every `timeline-bench` command the README and docs/ show parses and
    /// uses only flags that apply to it.
    #[test]
    fn the_documented_commands_are_accepted() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = vec![root.join("README.md")];
        for e in std::fs::read_dir(root.join("docs")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
        let mut seen = 0;
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for line in text.lines() {
                // `timeline-bench ...`, `cargo run ... -- ...` and the
                // docs' `$B ...` shorthand for the binary.
                let rest = if let Some(i) = line.find("timeline-bench") {
                    &line[i + "timeline-bench".len()..]
                } else if let Some(i) = line.find("$B ") {
                    &line[i + 2..]
                } else {
                    continue;
                };
                let rest = rest.split_once(" -- ").map_or(rest, |(_, r)| r);
                let end = rest
                    .find(['`', '|', '#', '>', '&', ')', ';'])
                    .unwrap_or(rest.len());
                // Placeholders (`R`, `$((R*10))`, `D`) stand for values.
                let args: Vec<&str> = rest[..end]
                    .split_whitespace()
                    .map(|a| {
                        let placeholder = a.contains('$')
                            || (!a.is_empty() && a.chars().all(|c| c.is_ascii_uppercase()));
                        if placeholder {
                            "1"
                        } else {
                            a
                        }
                    })
                    .collect();
                let Some(sub) = args.first() else { continue };
                let mut args = args.clone();
                if *sub == "compare" {
                    // `compare [its flags] <workload> [workload flags]`:
                    // the whole line parses, and the workload's flags apply.
                    Cli::command()
                        .try_get_matches_from(
                            std::iter::once("timeline-bench").chain(args.iter().copied()),
                        )
                        .unwrap_or_else(|e| panic!("{}: `{line}`: {e}", f.display()));
                    let Some(w) = args
                        .iter()
                        .position(|a| APPLIES.iter().any(|(n, _)| n == a))
                    else {
                        continue;
                    };
                    args.drain(..w);
                }
                let sub = args[0];
                if !APPLIES.iter().any(|(n, _)| *n == sub) {
                    continue; // prose, a crate name, a path
                }
                check(&args).unwrap_or_else(|e| panic!("{}: `{line}`: {e}", f.display()));
                seen += 1;
            }
        }
        assert!(seen >= 10, "found only {seen} documented commands");
    }
}
