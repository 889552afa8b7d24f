//! The bytes the IM layer keeps in engine records. Sans-I/O: encode into a
//! caller's buffer, decode from a slice, every length checked first.
//! Little-endian, like the engine. Byte grids: `docs/design.md`, "IM layer".

use crate::{ConvId, UserId};
use bytes::{Buf, BufMut};

/// A malformed IM record (a damaged file or a foreign record in an IM
/// timeline); never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} record: {why}")]
pub struct DecodeError {
    pub what: &'static str,
    pub why: &'static str,
}

/// A cursor over one IM record: `bytes::Buf`'s checked little-endian reads
/// (the workspace's one byte-order helper), with the record's name for
/// errors.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn truncated(&self) -> DecodeError {
        self.bad("truncated")
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.b.try_get_u8().map_err(|_| self.truncated())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.b.try_get_u32_le().map_err(|_| self.truncated())
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.b.try_get_u64_le().map_err(|_| self.truncated())
    }
    fn bad(&self, why: &'static str) -> DecodeError {
        DecodeError {
            what: self.what,
            why,
        }
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
}

/// What a conversation store record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A message; `body` is its payload.
    Message = 1,
    /// The conversation was created; `arg` is its [`ConvKind`] code, `body`
    /// the initial members (`u64` each).
    Created = 2,
    /// `arg` joined.
    MemberAdded = 3,
    /// `arg` left (it still receives this event, nothing after it).
    MemberRemoved = 4,
    /// The sender recalled its message `arg` (for everyone).
    Recall = 5,
}

impl EventKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => EventKind::Message,
            2 => EventKind::Created,
            3 => EventKind::MemberAdded,
            4 => EventKind::MemberRemoved,
            5 => EventKind::Recall,
            _ => return None,
        })
    }
}

/// 1:1 or group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvKind {
    Direct = 1,
    Group = 2,
}

impl ConvKind {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(ConvKind::Direct),
            2 => Some(ConvKind::Group),
            _ => None,
        }
    }
}

/// A record of a conversation's store timeline:
/// `kind:u8 sender:u64 cmid:u64 arg:u64 body:[u8]` (25-byte header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreEntry<'a> {
    pub kind: EventKind,
    pub sender: UserId,
    /// The sender's client message id (idempotency key); 0 for events.
    pub cmid: u64,
    pub arg: u64,
    pub body: &'a [u8],
}

pub const STORE_HEADER: usize = 25;

impl<'a> StoreEntry<'a> {
    pub fn encoded_len(&self) -> usize {
        STORE_HEADER + self.body.len()
    }
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        out.put_u64_le(self.sender);
        out.put_u64_le(self.cmid);
        out.put_u64_le(self.arg);
        out.extend_from_slice(self.body);
    }
    pub fn decode(b: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b, what: "store" };
        let kind = EventKind::from_u8(r.u8()?).ok_or(r.bad("unknown event kind"))?;
        Ok(StoreEntry {
            kind,
            sender: r.u64()?,
            cmid: r.u64()?,
            arg: r.u64()?,
            body: r.b,
        })
    }
}

/// The initial members in a `Created` record's body (whole `u64`s only).
pub fn created_members(mut body: &[u8]) -> Vec<UserId> {
    let mut v = Vec::with_capacity(body.len() / 8);
    while let Ok(m) = body.try_get_u64_le() {
        v.push(m);
    }
    v
}

/// The body a sync copy of `e` carries: all of it, except a `Created`
/// record's member list (O(members) bytes in each of O(members) timelines).
pub fn sync_body<'a>(e: &StoreEntry<'a>) -> &'a [u8] {
    if e.kind == EventKind::Created {
        &[]
    } else {
        e.body
    }
}

/// A record of a user's sync timeline:
/// `tag:u8 conv:u64 seq:u64` then, for tag 1 (copy), `ts_ms:u64` and the
/// conversation's [`StoreEntry`] bytes. Tags: 1 copy, 2 reference (read the
/// store at `(conv, seq)`), 3 read marker (`seq` = read through), 4 deleted
/// for this user (`seq` = the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRecord<'a> {
    Copy {
        conv: ConvId,
        seq: u64,
        ts_ms: u64,
        entry: StoreEntry<'a>,
    },
    Ref {
        conv: ConvId,
        seq: u64,
    },
    ReadMarker {
        conv: ConvId,
        seq: u64,
    },
    Deleted {
        conv: ConvId,
        seq: u64,
    },
}

impl<'a> SyncRecord<'a> {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (tag, conv, seq) = match *self {
            SyncRecord::Copy { conv, seq, .. } => (1u8, conv, seq),
            SyncRecord::Ref { conv, seq } => (2, conv, seq),
            SyncRecord::ReadMarker { conv, seq } => (3, conv, seq),
            SyncRecord::Deleted { conv, seq } => (4, conv, seq),
        };
        out.push(tag);
        out.put_u64_le(conv);
        out.put_u64_le(seq);
        if let SyncRecord::Copy { ts_ms, entry, .. } = self {
            out.put_u64_le(*ts_ms);
            entry.encode_into(out);
        }
    }
    pub fn decode(b: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b, what: "sync" };
        let tag = r.u8()?;
        let conv = r.u64()?;
        let seq = r.u64()?;
        let rec = match tag {
            1 => {
                let ts_ms = r.u64()?;
                return Ok(SyncRecord::Copy {
                    conv,
                    seq,
                    ts_ms,
                    entry: StoreEntry::decode(r.b)?,
                });
            }
            2 => SyncRecord::Ref { conv, seq },
            3 => SyncRecord::ReadMarker { conv, seq },
            4 => SyncRecord::Deleted { conv, seq },
            _ => return Err(r.bad("unknown sync record tag")),
        };
        r.end()?;
        Ok(rec)
    }
}

/// One operation a fan-out batch applied to a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntentOp {
    pub conv: ConvId,
    pub seq: u64,
    pub kind: EventKind,
    pub sender: UserId,
    pub cmid: u64,
    pub arg: u64,
}

const INTENT_OP: usize = 41;

/// A record of a worker's journal timeline (store keyspace):
/// * tag 1, intent: `batch:u64 count:u32` then `count` ops of
///   `conv:u64 seq:u64 kind:u8 sender:u64 cmid:u64 arg:u64` (41 bytes):
///   written in the same engine write as, and before, the batch's
///   conversation records;
/// * tag 2, done: `batch:u64`: every batch up to it is fully fanned out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalRecord {
    Intent { batch: u64, ops: Vec<IntentOp> },
    Done { batch: u64 },
}

impl JournalRecord {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            JournalRecord::Intent { batch, ops } => {
                out.reserve(13 + ops.len() * INTENT_OP);
                out.push(1);
                out.put_u64_le(*batch);
                out.put_u32_le(ops.len() as u32);
                for o in ops {
                    out.put_u64_le(o.conv);
                    out.put_u64_le(o.seq);
                    out.push(o.kind as u8);
                    out.put_u64_le(o.sender);
                    out.put_u64_le(o.cmid);
                    out.put_u64_le(o.arg);
                }
            }
            JournalRecord::Done { batch } => {
                out.push(2);
                out.put_u64_le(*batch);
            }
        }
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b, what: "journal" };
        let rec = match r.u8()? {
            1 => {
                let batch = r.u64()?;
                let n = r.u32()? as usize;
                if r.b.len() != n.saturating_mul(INTENT_OP) {
                    return Err(r.bad("intent length does not match its count"));
                }
                let mut ops = Vec::with_capacity(n);
                for _ in 0..n {
                    let conv = r.u64()?;
                    let seq = r.u64()?;
                    let kind = EventKind::from_u8(r.u8()?).ok_or(r.bad("unknown event kind"))?;
                    ops.push(IntentOp {
                        conv,
                        seq,
                        kind,
                        sender: r.u64()?,
                        cmid: r.u64()?,
                        arg: r.u64()?,
                    });
                }
                JournalRecord::Intent { batch, ops }
            }
            2 => JournalRecord::Done { batch: r.u64()? },
            _ => return Err(r.bad("unknown journal tag")),
        };
        r.end()?;
        Ok(rec)
    }
}

/// A record of a worker's catalog timeline (store keyspace, replayed whole
/// on open): durable membership and per-user state.
/// * tag 1, member: `conv:u64 user:u64 at:u64 op:u8 (1 add, 2 remove)
///   conv_kind:u8 read_since:u64` (`read_since` 0 = write fan-out, else the
///   first seq served by read fan-out);
/// * tag 2, recall: `conv:u64 target:u64 at:u64`;
/// * tag 3, read marker: `user:u64 conv:u64 seq:u64`;
/// * tag 4, deleted for a user: `user:u64 conv:u64 seq:u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogRecord {
    Member {
        conv: ConvId,
        user: UserId,
        at: u64,
        add: bool,
        kind: ConvKind,
        read_since: u64,
    },
    Recall {
        conv: ConvId,
        target: u64,
        at: u64,
    },
    ReadMark {
        user: UserId,
        conv: ConvId,
        seq: u64,
    },
    Delete {
        user: UserId,
        conv: ConvId,
        seq: u64,
    },
}

impl CatalogRecord {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match *self {
            CatalogRecord::Member {
                conv,
                user,
                at,
                add,
                kind,
                read_since,
            } => {
                out.push(1);
                out.put_u64_le(conv);
                out.put_u64_le(user);
                out.put_u64_le(at);
                out.push(if add { 1 } else { 2 });
                out.push(kind as u8);
                out.put_u64_le(read_since);
            }
            CatalogRecord::Recall { conv, target, at } => {
                out.push(2);
                out.put_u64_le(conv);
                out.put_u64_le(target);
                out.put_u64_le(at);
            }
            CatalogRecord::ReadMark { user, conv, seq } => {
                out.push(3);
                out.put_u64_le(user);
                out.put_u64_le(conv);
                out.put_u64_le(seq);
            }
            CatalogRecord::Delete { user, conv, seq } => {
                out.push(4);
                out.put_u64_le(user);
                out.put_u64_le(conv);
                out.put_u64_le(seq);
            }
        }
    }
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { b, what: "catalog" };
        let rec = match r.u8()? {
            1 => {
                let conv = r.u64()?;
                let user = r.u64()?;
                let at = r.u64()?;
                let add = match r.u8()? {
                    1 => true,
                    2 => false,
                    _ => return Err(r.bad("unknown membership op")),
                };
                let kind = ConvKind::from_u8(r.u8()?).ok_or(r.bad("unknown conversation kind"))?;
                CatalogRecord::Member {
                    conv,
                    user,
                    at,
                    add,
                    kind,
                    read_since: r.u64()?,
                }
            }
            2 => CatalogRecord::Recall {
                conv: r.u64()?,
                target: r.u64()?,
                at: r.u64()?,
            },
            3 => CatalogRecord::ReadMark {
                user: r.u64()?,
                conv: r.u64()?,
                seq: r.u64()?,
            },
            4 => CatalogRecord::Delete {
                user: r.u64()?,
                conv: r.u64()?,
                seq: r.u64()?,
            },
            _ => return Err(r.bad("unknown catalog tag")),
        };
        r.end()?;
        Ok(rec)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = EventKind> {
        prop_oneof![
            Just(EventKind::Message),
            Just(EventKind::Created),
            Just(EventKind::MemberAdded),
            Just(EventKind::MemberRemoved),
            Just(EventKind::Recall)
        ]
    }

    proptest! {
        #[test]
        fn store_and_sync_round_trip(k in kind(), s: u64, c: u64, a: u64, conv: u64, seq: u64,
                                     ts: u64, body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let e = StoreEntry { kind: k, sender: s, cmid: c, arg: a, body: &body };
            let mut b = Vec::new();
            e.encode_into(&mut b);
            prop_assert_eq!(b.len(), e.encoded_len());
            prop_assert_eq!(StoreEntry::decode(&b).unwrap(), e);
            for r in [SyncRecord::Copy { conv, seq, ts_ms: ts, entry: e }, SyncRecord::Ref { conv, seq },
                      SyncRecord::ReadMarker { conv, seq }, SyncRecord::Deleted { conv, seq }] {
                let mut b = Vec::new();
                r.encode_into(&mut b);
                prop_assert_eq!(SyncRecord::decode(&b).unwrap(), r);
                for cut in 0..b.len() {
                    // Any prefix is an error or (copy records with a body) a
                    // shorter body; never a panic.
                    let _ = SyncRecord::decode(&b[..cut]);
                }
            }
        }

        #[test]
        fn journal_and_catalog_round_trip(batch: u64, ops in proptest::collection::vec(
                (any::<u64>(), any::<u64>(), kind(), any::<u64>(), any::<u64>(), any::<u64>()), 0..8),
                u: u64, c: u64, at: u64, add: bool, rs: u64) {
            let ops: Vec<IntentOp> = ops.into_iter().map(|(conv, seq, kind, sender, cmid, arg)|
                IntentOp { conv, seq, kind, sender, cmid, arg }).collect();
            for r in [JournalRecord::Intent { batch, ops }, JournalRecord::Done { batch }] {
                let mut b = Vec::new();
                r.encode_into(&mut b);
                prop_assert_eq!(JournalRecord::decode(&b).unwrap(), r);
                prop_assert!(JournalRecord::decode(&b[..b.len() - 1]).is_err());
            }
            for r in [CatalogRecord::Member { conv: c, user: u, at, add, kind: ConvKind::Group, read_since: rs },
                      CatalogRecord::Recall { conv: c, target: at, at: rs },
                      CatalogRecord::ReadMark { user: u, conv: c, seq: at },
                      CatalogRecord::Delete { user: u, conv: c, seq: at }] {
                let mut b = Vec::new();
                r.encode_into(&mut b);
                prop_assert_eq!(CatalogRecord::decode(&b).unwrap(), r);
                prop_assert!(CatalogRecord::decode(&b[..b.len() - 1]).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = StoreEntry::decode(&b);
            let _ = SyncRecord::decode(&b);
            let _ = JournalRecord::decode(&b);
            let _ = CatalogRecord::decode(&b);
        }
    }
}
