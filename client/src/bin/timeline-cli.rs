//! `timeline-cli`: a small command-line client in the spirit of redis-cli.
//!
//! ```text
//! timeline-cli --addr 127.0.0.1:7420 ping
//! timeline-cli append 42 hello            # store timeline 42
//! timeline-cli scan 42 --from 1
//! timeline-cli sync 7 --checkpoint 0
//! timeline-cli subscribe 7
//! timeline-cli token --user 7             # mint a token (secret from $TIMELINE_SECRET)
//! timeline-cli --addr 127.0.0.1:7421,127.0.0.1:7422 append 42 hi   # a cluster: routed, follows MOVED
//! timeline-cli --addr 127.0.0.1:7421 cluster-map
//! ```
//! Exits 0 on success, 1 on a server or connection error, 2 on bad usage.

use timeline_client::outln as out;

use clap::{Parser, Subcommand, ValueEnum};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use timeline_client::cluster::ClusterClient;
use timeline_client::protocol::token::{self, Claims, Role};
use timeline_client::protocol::{
    Body, ConvKind, Direction, Durability, Entry, HistoryFrom, Push, Request, Response, TimelineId,
};
use timeline_client::{Client, ClientError};

#[derive(Parser, Debug)]
#[command(name = "timeline-cli", version, about = "Talk to a timeline-server")]
struct Args {
    /// The server, or a cluster's seed nodes: `HOST:PORT[,HOST:PORT...]`.
    /// With more than one, raw-timeline commands go to their partition's
    /// leader (following `MOVED`).
    #[arg(long, default_value = "127.0.0.1:7420")]
    addr: String,
    /// Credential (hex) for a server with --auth; also $TIMELINE_TOKEN.
    #[arg(long)]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Ks {
    Store,
    Sync,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Dur {
    Default,
    None,
    Group,
    Sync,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Ping,
    Stats,
    /// A cluster node's partition map and the leaders it knows.
    ClusterMap,
    /// Append TEXT to raw timeline ID.
    Append {
        id: u64,
        text: String,
        #[arg(long, value_enum, default_value = "store")]
        keyspace: Ks,
        #[arg(long, value_enum, default_value = "default")]
        durability: Dur,
    },
    Get {
        id: u64,
        seq: u64,
        #[arg(long, value_enum, default_value = "store")]
        keyspace: Ks,
    },
    /// Records of raw timeline ID from --from (forward, or --backward).
    Scan {
        id: u64,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        backward: bool,
        #[arg(long, value_enum, default_value = "store")]
        keyspace: Ks,
    },
    LastSeq {
        id: u64,
        #[arg(long, value_enum, default_value = "store")]
        keyspace: Ks,
    },
    /// Create a conversation: KIND direct|group, then the members.
    Create {
        conv: u64,
        kind: String,
        members: Vec<u64>,
    },
    AddMember {
        conv: u64,
        user: u64,
    },
    RemoveMember {
        conv: u64,
        user: u64,
    },
    Members {
        conv: u64,
    },
    /// Send TEXT to CONV as SENDER.
    Send {
        conv: u64,
        sender: u64,
        text: String,
        /// Client message id (default: the current time in nanoseconds).
        #[arg(long)]
        cmid: Option<u64>,
    },
    /// Entries of USER's sync timeline after --checkpoint.
    Sync {
        user: u64,
        #[arg(long, default_value_t = 0)]
        checkpoint: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// A read-fan-out group checkpoint, CONV:SEQ (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    History {
        conv: u64,
        user: u64,
        #[arg(long)]
        before: Option<u64>,
        #[arg(long)]
        after: Option<u64>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    Conversations {
        user: u64,
    },
    MarkRead {
        user: u64,
        conv: u64,
        seq: u64,
    },
    Recall {
        conv: u64,
        user: u64,
        seq: u64,
    },
    /// Print USER's pushes as they arrive (--count N to stop after N).
    Subscribe {
        user: u64,
        #[arg(long)]
        count: Option<u64>,
    },
    /// Mint a token with the secret in $TIMELINE_SECRET (no connection).
    Token {
        #[arg(long)]
        user: u64,
        #[arg(long)]
        admin: bool,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86400)]
        ttl: u64,
    },
}

fn tl(ks: Ks, id: u64) -> TimelineId {
    match ks {
        Ks::Store => TimelineId::store(id),
        Ks::Sync => TimelineId::sync(id),
    }
}

fn show(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!("<{} bytes>", b.len()),
    }
}

fn entry(e: &Entry) -> String {
    let body = match &e.body {
        Body::Message(m) => show(m),
        other => format!("{other:?}"),
    };
    format!(
        "conv {} seq {} from {} at {}: {body}",
        e.conv, e.conv_seq, e.sender, e.timestamp_ms
    )
}

fn main() {
    let a = Args::parse();
    if let Cmd::Token { user, admin, ttl } = a.cmd {
        let Ok(secret) = std::env::var("TIMELINE_SECRET") else {
            eprintln!("timeline-cli: token needs $TIMELINE_SECRET");
            std::process::exit(2);
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let c = Claims {
            user,
            expires_unix: now + ttl,
            role: if admin { Role::Admin } else { Role::User },
        };
        out!("{}", token::to_hex(&token::sign(secret.as_bytes(), &c)));
        return;
    }
    match run(a) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("(error) {e}");
            std::process::exit(1);
        }
    }
}

fn run(a: Args) -> Result<(), ClientError> {
    let tok = match a.token.or_else(|| std::env::var("TIMELINE_TOKEN").ok()) {
        Some(h) => token::from_hex(&h).unwrap_or_else(|| {
            eprintln!("timeline-cli: --token is not hex");
            std::process::exit(2)
        }),
        None => Vec::new(),
    };
    let seeds: Vec<String> = a
        .addr
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let text;
    let groups: Vec<(u64, u64)>;
    let req = match &a.cmd {
        Cmd::Ping => Request::Ping(b"ping"),
        Cmd::Stats => Request::Stats,
        Cmd::ClusterMap => Request::ClusterMap,
        Cmd::Append {
            id,
            text: t,
            keyspace,
            durability,
        } => {
            text = t.clone();
            Request::Append {
                timeline: tl(*keyspace, *id),
                durability: match durability {
                    Dur::Default => None,
                    Dur::None => Some(Durability::Buffered),
                    Dur::Group => Some(Durability::GroupCommit),
                    Dur::Sync => Some(Durability::Sync),
                },
                payload: text.as_bytes(),
            }
        }
        Cmd::Get { id, seq, keyspace } => Request::Get {
            timeline: tl(*keyspace, *id),
            seq: *seq,
        },
        Cmd::Scan {
            id,
            from,
            limit,
            backward,
            keyspace,
        } => Request::Scan {
            timeline: tl(*keyspace, *id),
            from: *from,
            limit: *limit,
            direction: if *backward {
                Direction::Backward
            } else {
                Direction::Forward
            },
        },
        Cmd::LastSeq { id, keyspace } => Request::LastSeq {
            timeline: tl(*keyspace, *id),
        },
        Cmd::Create {
            conv,
            kind,
            members,
        } => Request::CreateConversation {
            conv: *conv,
            kind: match kind.as_str() {
                "direct" => ConvKind::Direct,
                "group" => ConvKind::Group,
                _ => {
                    eprintln!("timeline-cli: kind is direct or group");
                    std::process::exit(2)
                }
            },
            members: members.clone(),
        },
        Cmd::AddMember { conv, user } => Request::AddMember {
            conv: *conv,
            user: *user,
        },
        Cmd::RemoveMember { conv, user } => Request::RemoveMember {
            conv: *conv,
            user: *user,
        },
        Cmd::Members { conv } => Request::Members { conv: *conv },
        Cmd::Send {
            conv,
            sender,
            text: t,
            cmid,
        } => {
            text = t.clone();
            Request::Send {
                conv: *conv,
                sender: *sender,
                client_msg_id: cmid.unwrap_or_else(|| {
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(1)
                }),
                payload: text.as_bytes(),
            }
        }
        Cmd::Sync {
            user,
            checkpoint,
            limit,
            groups: gs,
        } => {
            groups = gs
                .iter()
                .map(|g| {
                    let parsed = g
                        .split_once(':')
                        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                    parsed.unwrap_or_else(|| {
                        eprintln!("timeline-cli: --group is CONV:SEQ");
                        std::process::exit(2)
                    })
                })
                .collect();
            Request::Sync {
                user: *user,
                checkpoint: *checkpoint,
                limit: *limit,
                groups: groups.clone(),
            }
        }
        Cmd::History {
            conv,
            user,
            before,
            after,
            limit,
        } => Request::History {
            conv: *conv,
            user: *user,
            from: match (before, after) {
                (_, Some(s)) => HistoryFrom::After(*s),
                (Some(s), None) => HistoryFrom::Before(*s),
                (None, None) => HistoryFrom::Before(u64::MAX),
            },
            limit: *limit,
        },
        Cmd::Conversations { user } => Request::Conversations { user: *user },
        Cmd::MarkRead { user, conv, seq } => Request::MarkRead {
            user: *user,
            conv: *conv,
            seq: *seq,
        },
        Cmd::Recall { conv, user, seq } => Request::Recall {
            conv: *conv,
            user: *user,
            target: *seq,
        },
        Cmd::Subscribe { user, .. } => Request::Subscribe { user: *user },
        Cmd::Token { .. } => return Ok(()),
    };
    if seeds.len() > 1 && !matches!(a.cmd, Cmd::Subscribe { .. }) {
        let mut cc = ClusterClient::connect(&seeds, &tok)?;
        print(&cc.call(&req)?);
        return Ok(());
    }
    let first = seeds.first().map_or("127.0.0.1:7420", String::as_str);
    let mut c = Client::connect(first, &tok)?;
    let resp = c.call(&req)?;
    print(&resp);
    if let Cmd::Subscribe { count, .. } = a.cmd {
        let mut n = 0u64;
        while count.is_none_or(|c| n < c) {
            if let Some((_, p)) = c.next_push(Duration::from_secs(3600))? {
                match p {
                    Push::Entry { user, entry: e } => {
                        out!("push user {user} sync seq {}: {}", e.seq, entry(&e.entry))
                    }
                    Push::Group { user, entry: e } => {
                        out!("push user {user} group: {}", entry(&e))
                    }
                    Push::Resync => out!("push: resync (sync from your checkpoint)"),
                }
                n += 1;
            }
        }
    }
    Ok(())
}

fn print(r: &Response) {
    match r {
        Response::Hello(h) => out!("hello {h:?}"),
        Response::Ping(b) => out!("PONG {}", show(b)),
        Response::Stats(kv) => {
            for (k, v) in kv {
                out!("{k}: {v}");
            }
        }
        Response::ClusterMap {
            version,
            partitions,
            leaders,
        } => {
            out!("map version {version}, {partitions} partitions");
            for (addr, p) in leaders {
                out!("partition {p}: leader {addr}");
            }
        }
        Response::Append(s) => out!("seq {s}"),
        Response::AppendBatch(s) => out!("seqs {s:?}"),
        Response::Get(None) => out!("(nil)"),
        Response::Get(Some(rec)) => {
            out!("{} @{}: {}", rec.seq, rec.timestamp_ms, show(&rec.payload))
        }
        Response::Scan(recs) => {
            if recs.is_empty() {
                out!("(empty)");
            }
            for rec in recs {
                out!("{} @{}: {}", rec.seq, rec.timestamp_ms, show(&rec.payload));
            }
        }
        Response::LastSeq(s) => out!("last seq {s}"),
        Response::Send(a) => out!(
            "conv {} seq {}{}",
            a.conv,
            a.seq,
            if a.duplicate {
                " (duplicate: already sent)"
            } else {
                ""
            }
        ),
        Response::Sync(s) => {
            if let Some(f) = s.truncated {
                out!(
                    "truncated: the TTL dropped entries; roam with history, then sync from {}",
                    f - 1
                );
            }
            for e in &s.entries {
                out!("{}: {}", e.seq, entry(&e.entry));
            }
            for g in &s.groups {
                for e in &g.entries {
                    out!("group {}: {}", g.conv, entry(e));
                }
                out!(
                    "group {} checkpoint {}{}",
                    g.conv,
                    g.checkpoint,
                    if g.has_more { " (more)" } else { "" }
                );
            }
            out!(
                "checkpoint {}{}",
                s.checkpoint,
                if s.has_more { " (more)" } else { "" }
            );
        }
        Response::History(h) => {
            for e in &h.entries {
                out!("{}", entry(e));
            }
            if h.has_more {
                out!("(more)");
            }
        }
        Response::Conversations(cs) => {
            for c in cs {
                out!(
                    "conv {} {:?}: last {} read {} unread {}{}{}",
                    c.conv,
                    c.kind,
                    c.last_seq,
                    c.read_seq,
                    c.unread,
                    if c.member { "" } else { " (left)" },
                    if c.read_fanout { " (read fan-out)" } else { "" }
                );
            }
        }
        Response::MarkRead(s) => out!("read through {s}"),
        Response::Recall(s) => out!("recalled (event seq {s})"),
        Response::DeleteForUser(s) => out!("deleted (sync seq {s})"),
        Response::CreateConversation(s) => out!("created (seq {s})"),
        Response::AddMember(s) => out!("added (seq {s})"),
        Response::RemoveMember(s) => out!("removed (seq {s})"),
        Response::Members(m) => out!("{m:?}"),
        Response::Subscribe => out!("subscribed; waiting for pushes"),
        Response::Unsubscribe => out!("unsubscribed"),
    }
}
