//! Cluster routing: which partition a timeline belongs to, and how a
//! `MOVED` answer names where to go (docs/protocol.md §15).
//!
//! The hash is part of the protocol: a client routes by it, so every node
//! and every client build must compute the same partition. It is
//! SplitMix64's finalizer over `id ^ (keyspace << 56)`, not `std`'s
//! `DefaultHasher`, whose output may change between Rust releases.

/// The most partitions a cluster has (P is fixed at its creation; the
/// partition map is one etcd value, and a client keeps a leader per
/// partition). A `CLUSTER_MAP` naming more is refused by the client.
pub const MAX_PARTITIONS: u32 = 1 << 16;

/// The partition of timeline (`keyspace`, `id`) among `partitions` (P).
pub fn partition_of(keyspace: u8, id: u64, partitions: u32) -> u32 {
    let mut x = id ^ (u64::from(keyspace) << 56) ^ 0x9E37_79B9_7F4A_7C15;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x % u64::from(partitions.max(1))) as u32
}

/// The message of a `MOVED` error: `"<partition> <host:port>"` (the
/// error's `arg` is the map version).
pub fn moved_message(partition: u32, addr: &str) -> String {
    format!("{partition} {addr}")
}

/// Parse a `MOVED` message back into (partition, address).
pub fn parse_moved(message: &str) -> Option<(u32, &str)> {
    let (p, addr) = message.split_once(' ')?;
    let p = p.parse().ok()?;
    (!addr.is_empty()).then_some((p, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published hash: these values must never change.
    #[test]
    fn hash_is_pinned() {
        let got: Vec<u32> = [(0u8, 0u64), (0, 1), (1, 1), (0, 42), (3, u64::MAX)]
            .iter()
            .map(|&(k, i)| partition_of(k, i, 64))
            .collect();
        assert_eq!(got, PINNED);
    }

    const PINNED: [u32; 5] = [47, 32, 50, 21, 54];

    #[test]
    fn moved_round_trips() {
        let m = moved_message(12, "127.0.0.1:7421");
        assert_eq!(parse_moved(&m), Some((12, "127.0.0.1:7421")));
        assert_eq!(parse_moved("x 1"), None);
        assert_eq!(parse_moved("3 "), None);
        assert_eq!(parse_moved("3"), None);
    }
}
