//! The hello at the start of every connection between nodes
//! (docs/scaling.md, "The hello"): the same build on both ends, and, when
//! the nodes run with a secret (the server's `--auth` secret), proof that
//! both hold it.
//!
//! ```text
//! connecting node                              accepting node
//!   hello: build | nonce c | (no proof) ─────▶
//!                                        ◀───── hello: build | nonce a | proof a
//!   proof c ───────────────────────────────────▶  (then its requests)
//!
//! proof a = HMAC-SHA256(secret, "timeline peer accept"  | nonce c | nonce a)
//! proof c = HMAC-SHA256(secret, "timeline peer connect" | nonce a | nonce c)
//! ```
//!
//! Each side proves the secret over the other's fresh nonce, so a proof
//! seen on the wire is no use on another connection. Without a secret
//! both proofs are empty, and a node with a secret refuses a peer without
//! one (and the other way round): a half-configured cluster is refused
//! and logged, not half open. The proof authenticates who connects; it
//! does not encrypt or sign the frames after it (docs/scaling.md: keep
//! the peer port on a private network).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;

/// Bytes of a nonce.
const NONCE: usize = 16;
/// Bytes of a proof (HMAC-SHA256).
const PROOF: usize = 32;

/// A hello's body: `build u64 LE | nonce [16] | proof [0 or 32]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) build: u64,
    pub(crate) nonce: [u8; NONCE],
    pub(crate) proof: Vec<u8>,
}

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + NONCE + self.proof.len());
        b.extend_from_slice(&self.build.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.proof);
        b
    }

    /// `None` unless `b` is a hello of this layout (a build from before
    /// it sent 8 bytes: another build either way).
    pub(crate) fn decode(b: &[u8]) -> Option<Hello> {
        let build = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let nonce = b.get(8..8 + NONCE)?.try_into().ok()?;
        let proof = b.get(8 + NONCE..)?.to_vec();
        (proof.is_empty() || proof.len() == PROOF).then_some(Hello {
            build,
            nonce,
            proof,
        })
    }
}

/// A fresh nonce.
pub(crate) fn nonce() -> [u8; NONCE] {
    rand::random()
}

/// The secret the nodes prove to each other, if they run with one.
#[derive(Clone, Default)]
pub struct PeerSecret(Option<Arc<[u8]>>);

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PeerSecret(set)"
        } else {
            "PeerSecret(none)"
        })
    }
}

/// Which side of a connection a proof is made by.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Accepting,
    Connecting,
}

impl PeerSecret {
    pub fn new(secret: Option<&[u8]>) -> PeerSecret {
        PeerSecret(secret.map(Arc::from))
    }

    /// `side`'s proof over its peer's nonce `theirs` and its own `ours`
    /// (empty without a secret).
    pub(crate) fn prove(&self, side: Side, theirs: &[u8], ours: &[u8]) -> Vec<u8> {
        match self.mac(side, theirs, ours) {
            Some(m) => m.finalize().into_bytes().to_vec(),
            None => Vec::new(),
        }
    }

    /// Why `proof`, from the peer on `side`, does not let the connection
    /// go on (`None`: it does). `theirs` is the prover's nonce, `ours` the
    /// one it proved over (this node's).
    pub(crate) fn check(
        &self,
        side: Side,
        proof: &[u8],
        theirs: &[u8],
        ours: &[u8],
    ) -> Option<String> {
        match (self.mac(side, ours, theirs), proof.is_empty()) {
            (None, true) => None,
            (None, false) => {
                Some("it runs with a cluster secret (--auth), this node without one".into())
            }
            (Some(_), true) => {
                Some("it runs without the cluster secret (--auth) this node has".into())
            }
            (Some(m), false) => m.verify_slice(proof).is_err().then(|| {
                "its proof of the cluster secret (--auth) is wrong: another secret".into()
            }),
        }
    }

    fn mac(&self, side: Side, theirs: &[u8], ours: &[u8]) -> Option<Hmac<Sha256>> {
        let key = self.0.as_ref()?;
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).ok()?;
        m.update(match side {
            Side::Accepting => b"timeline peer accept",
            Side::Connecting => b"timeline peer connect",
        });
        m.update(theirs);
        m.update(ours);
        Some(m)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hellos_round_trip_and_bad_ones_do_not_decode() {
        let h = Hello {
            build: 7,
            nonce: [3; NONCE],
            proof: vec![9; PROOF],
        };
        assert_eq!(Hello::decode(&h.encode()), Some(h.clone()));
        let bare = Hello { proof: vec![], ..h };
        assert_eq!(Hello::decode(&bare.encode()), Some(bare));
        assert_eq!(
            Hello::decode(&7u64.to_le_bytes()),
            None,
            "a build before it"
        );
        assert_eq!(
            Hello::decode(&[0; 8 + NONCE + 5]),
            None,
            "a proof of 5 bytes"
        );
        assert_eq!(Hello::decode(&[]), None);
    }

    /// Each side checks the other's proof over its own nonce: the same
    /// secret passes, another secret, no secret on one side, a proof made
    /// for another connection's nonce, or the other side's proof played
    /// back, do not.
    #[test]
    fn only_a_peer_with_the_same_secret_and_this_connections_nonces_passes() {
        let (nc, na) = (nonce(), nonce());
        let s = PeerSecret::new(Some(b"s3cret"));
        let accept = s.prove(Side::Accepting, &nc, &na);
        let connect = s.prove(Side::Connecting, &na, &nc);
        assert_eq!(accept.len(), PROOF);
        assert_eq!(s.check(Side::Accepting, &accept, &na, &nc), None);
        assert_eq!(s.check(Side::Connecting, &connect, &nc, &na), None);
        // Played back: the accepting side's proof as the connecting one's.
        assert!(s.check(Side::Connecting, &accept, &nc, &na).is_some());
        // Another connection's nonce.
        assert!(s.check(Side::Accepting, &accept, &na, &nonce()).is_some());
        let other = PeerSecret::new(Some(b"other"));
        assert!(other.check(Side::Accepting, &accept, &na, &nc).is_some());
        let none = PeerSecret::default();
        assert!(none.prove(Side::Accepting, &nc, &na).is_empty());
        assert_eq!(none.check(Side::Accepting, &[], &na, &nc), None);
        assert!(none.check(Side::Accepting, &accept, &na, &nc).is_some());
        assert!(s.check(Side::Accepting, &[], &na, &nc).is_some());
    }
}
