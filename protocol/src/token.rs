//! Credentials: a token that names a user and a role until an expiry time,
//! signed by the server's secret with HMAC-SHA256 (RustCrypto's `hmac` and
//! `sha2`).
//!
//! ```text
//! token (49 bytes, little-endian)
//!  0   8  user          the user the connection acts as
//!  8   8  expires_unix  seconds since the Unix epoch; invalid from then on
//!  16  1  role          0 user, 1 admin
//!  17  32 mac           HMAC-SHA256(server secret, bytes 0..17)
//! ```
//!
//! The server keeps no token state: whoever holds the secret mints tokens
//! (`sign`), the server checks them (`verify`). There is no revocation
//! short of expiry or a new secret. Text form (CLI flags, config files):
//! lowercase hex, 98 characters.

use super::types::UserId;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a token.
pub const TOKEN_LEN: usize = 49;
/// Bytes the MAC covers.
pub const CLAIMS_LEN: usize = 17;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sync, subscribe and mark as this user; send to and read the
    /// conversations it is a member of.
    User = 0,
    /// Everything, including raw timelines and membership administration.
    Admin = 1,
}

/// What a token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    pub user: UserId,
    /// Seconds since the Unix epoch; the token is refused from this second on.
    pub expires_unix: u64,
    pub role: Role,
}

impl Claims {
    fn bytes(&self) -> [u8; CLAIMS_LEN] {
        let mut b = [0u8; CLAIMS_LEN];
        let (user, rest) = b.split_at_mut(8);
        let (exp, role) = rest.split_at_mut(8);
        user.copy_from_slice(&self.user.to_le_bytes());
        exp.copy_from_slice(&self.expires_unix.to_le_bytes());
        role.copy_from_slice(&[self.role as u8]);
        b
    }
}

/// Why a token was refused (all map to `UNAUTHORIZED`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is {0} bytes long, not {TOKEN_LEN}")]
    Length(usize),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token has unknown role {0}")]
    UnknownRole(u8),
    #[error("token expired at {expires_unix} (now {now})")]
    Expired { expires_unix: u64, now: u64 },
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of every length (longer ones are hashed first), so
    // `new_from_slice` has no failing case for HMAC-SHA256.
    #[allow(clippy::expect_used)]
    <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length")
}

/// Mint a token for `claims` with the server's `secret`.
pub fn sign(secret: &[u8], claims: &Claims) -> [u8; TOKEN_LEN] {
    let body = claims.bytes();
    let mut m = mac(secret);
    m.update(&body);
    let tag = m.finalize().into_bytes();
    let mut t = [0u8; TOKEN_LEN];
    let (head, tail) = t.split_at_mut(CLAIMS_LEN);
    head.copy_from_slice(&body);
    tail.copy_from_slice(&tag);
    t
}

/// Check `token` against the server's `secret` at `now_unix` (seconds):
/// length, then the MAC (compared in constant time), then role and expiry.
pub fn verify(secret: &[u8], token: &[u8], now_unix: u64) -> Result<Claims, TokenError> {
    if token.len() != TOKEN_LEN {
        return Err(TokenError::Length(token.len()));
    }
    let (body, tag) = token.split_at(CLAIMS_LEN);
    let mut m = mac(secret);
    m.update(body);
    m.verify_slice(tag).map_err(|_| TokenError::BadSignature)?;
    let mut r = super::wire::Reader::new(body);
    let (user, expires_unix, role) = match (r.u64(), r.u64(), r.u8()) {
        (Ok(u), Ok(e), Ok(ro)) => (u, e, ro),
        _ => return Err(TokenError::Length(token.len())),
    };
    let role = match role {
        0 => Role::User,
        1 => Role::Admin,
        x => return Err(TokenError::UnknownRole(x)),
    };
    if now_unix >= expires_unix {
        return Err(TokenError::Expired {
            expires_unix,
            now: now_unix,
        });
    }
    Ok(Claims {
        user,
        expires_unix,
        role,
    })
}

/// Lowercase hex: the text form of a token (or a secret).
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        for nibble in [b >> 4, b & 0x0f] {
            s.push(char::from(
                DIGITS.get(usize::from(nibble)).copied().unwrap_or(b'0'),
            ));
        }
    }
    s
}

/// Parse hex (either case); `None` for an odd length or a non-hex digit.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let pairs = s.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    pairs
        .map(|p| match p {
            [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"server secret";

    fn claims(role: Role) -> Claims {
        Claims {
            user: 42,
            expires_unix: 1_000,
            role,
        }
    }

    #[test]
    fn layout_is_claims_then_mac() {
        let t = sign(SECRET, &claims(Role::Admin));
        assert_eq!(&t[..8], &42u64.to_le_bytes());
        assert_eq!(&t[8..16], &1000u64.to_le_bytes());
        assert_eq!(t[16], 1);
        let mut m = mac(SECRET);
        m.update(&t[..17]);
        assert_eq!(&t[17..], &m.finalize().into_bytes()[..]);
    }

    #[test]
    fn sign_then_verify() {
        for role in [Role::User, Role::Admin] {
            let t = sign(SECRET, &claims(role));
            assert_eq!(verify(SECRET, &t, 999).unwrap(), claims(role));
        }
    }

    #[test]
    fn refusals() {
        let t = sign(SECRET, &claims(Role::User));
        assert_eq!(
            verify(SECRET, &t, 1_000),
            Err(TokenError::Expired {
                expires_unix: 1_000,
                now: 1_000
            })
        );
        assert_eq!(verify(b"other", &t, 0), Err(TokenError::BadSignature));
        assert_eq!(verify(SECRET, &t[..48], 0), Err(TokenError::Length(48)));
        assert_eq!(verify(SECRET, &[], 0), Err(TokenError::Length(0)));
        // A raised role or user, or a later expiry, breaks the MAC.
        for i in [0, 8, 16] {
            let mut bad = t;
            bad[i] ^= 1;
            assert_eq!(
                verify(SECRET, &bad, 0),
                Err(TokenError::BadSignature),
                "{i}"
            );
        }
        // A validly signed unknown role is still refused.
        let mut body = claims(Role::User).bytes();
        body[16] = 7;
        let mut m = mac(SECRET);
        m.update(&body);
        let mut forged = body.to_vec();
        forged.extend_from_slice(&m.finalize().into_bytes());
        assert_eq!(verify(SECRET, &forged, 0), Err(TokenError::UnknownRole(7)));
    }

    #[test]
    fn hex() {
        assert_eq!(to_hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(from_hex("00AB7f"), Some(vec![0x00, 0xab, 0x7f]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        let t = sign(SECRET, &claims(Role::User));
        assert_eq!(to_hex(&t).len(), 98);
        assert_eq!(from_hex(&to_hex(&t)).unwrap(), t.to_vec());
    }

    proptest! {
        #[test]
        fn any_bytes_verify_cleanly(b in proptest::collection::vec(any::<u8>(), 0..64), now: u64) {
            prop_assert!(verify(SECRET, &b, now).is_err());
        }

        #[test]
        fn any_claims_round_trip(user: u64, exp in 1u64.., admin: bool) {
            let role = if admin { Role::Admin } else { Role::User };
            let c = Claims { user, expires_unix: exp, role };
            prop_assert_eq!(verify(SECRET, &sign(SECRET, &c), exp - 1), Ok(c));
        }
    }
}
