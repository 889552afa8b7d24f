//! `timeline-placement`: read or change a cluster's partition map in etcd
//! (docs/scaling.md, "Placement changes").
//!
//! Each change is one etcd transaction on the whole previous map (retried
//! on a newer map if another change got there first); the nodes watch the
//! map and turn it into Raft membership changes. With etcd unreachable the
//! command fails (exit 1) and nothing changes.
//!
//! ```text
//! timeline-placement --etcd 127.0.0.1:2379 show
//! timeline-placement --etcd 127.0.0.1:2379 remove-node 3
//! timeline-placement --etcd 127.0.0.1:2379 move 17 3 4
//! timeline-placement --etcd 127.0.0.1:2379 add-node 5
//! ```
//!
//! (A node started with `--cluster` outside the map adds itself.)

use clap::{Parser, Subcommand};
use timeline_cluster::meta::Meta;
use timeline_cluster::partition::PartitionMap;
use timeline_cluster::reconcile::{self, Change};

#[derive(Parser, Debug)]
#[command(
    name = "timeline-placement",
    version,
    about = "A cluster's partition map in etcd"
)]
struct Args {
    /// etcd endpoints, `HOST:PORT[,HOST:PORT...]`.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    etcd: Vec<String>,
    /// The cluster's name (its keys are under /timeline/NAME/).
    #[arg(long, default_value = "timeline")]
    cluster_name: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the map: its version, each node's replica count, each
    /// partition's replicas.
    Show,
    /// Move replicas to node NODE until it holds its share.
    AddNode { node: u64 },
    /// Move every replica of node NODE to the other live nodes of the map.
    RemoveNode { node: u64 },
    /// Move partition PARTITION's replica from node FROM to node TO.
    Move { partition: u32, from: u64, to: u64 },
}

fn print_map(m: &PartitionMap, live: &std::collections::BTreeSet<u64>) {
    timeline_client::outln!(
        "version {}  partitions {}  replicas {}",
        m.version,
        m.len(),
        m.replicas_per_partition
    );
    for (n, c) in m.load() {
        let state = if live.contains(&n) {
            "live"
        } else {
            "lease gone"
        };
        timeline_client::outln!("node {n}: {c} replicas ({state})");
    }
    for (p, r) in m.partitions.iter().enumerate() {
        timeline_client::outln!("partition {p}: {r:?}");
    }
}

async fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let meta = Meta::connect(&a.etcd, &a.cluster_name).await?;
    let change = match a.cmd {
        Cmd::Show => {
            let m = meta
                .map()
                .await?
                .ok_or("the cluster has no partition map yet")?;
            let live = meta.nodes().await?.into_keys().collect();
            print_map(&m, &live);
            return Ok(());
        }
        Cmd::AddNode { node } => Change::AddNode(node),
        Cmd::RemoveNode { node } => Change::RemoveNode(node),
        Cmd::Move {
            partition,
            from,
            to,
        } => Change::Move {
            partition,
            from,
            to,
        },
    };
    let (map, moves) = reconcile::apply(&meta, change).await?;
    for (p, from, to) in &moves {
        timeline_client::outln!("partition {p}: node {from} -> node {to}");
    }
    timeline_client::outln!("map version {} ({} moves)", map.version, moves.len());
    Ok(())
}

fn main() {
    let a = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("timeline-placement: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(a)) {
        eprintln!("timeline-placement: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commands docs/scaling.md shows parse as the changes they name.
    #[test]
    fn the_documented_commands_parse() {
        let parse = |line: &str| Args::try_parse_from(line.split_whitespace()).map(|a| a.cmd);
        let base = "timeline-placement --etcd 127.0.0.1:2379";
        assert!(matches!(parse(&format!("{base} show")), Ok(Cmd::Show)));
        assert!(matches!(
            parse(&format!("{base} remove-node 3")),
            Ok(Cmd::RemoveNode { node: 3 })
        ));
        assert!(matches!(
            parse(&format!("{base} move 17 3 4")),
            Ok(Cmd::Move {
                partition: 17,
                from: 3,
                to: 4
            })
        ));
        assert!(matches!(
            parse(&format!("{base} add-node 5")),
            Ok(Cmd::AddNode { node: 5 })
        ));
        assert!(parse(&format!("{base} move 17 3")).is_err());
    }
}
