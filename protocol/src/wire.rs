//! Field-level encoding shared by every body: integers, byte strings, lists,
//! and the engine and IM types the replies carry. Little-endian throughout.
//!
//! ```text
//! u8 u16 u32 u64      fixed width, little-endian
//! bool                u8, 0 or 1 (anything else is malformed)
//! bytes               len:u32 data:[u8; len]
//! str                 bytes holding UTF-8
//! list<T>             count:u32 T × count
//! ```
//!
//! Decoders are strict so that decoding is the inverse of encoding on every
//! input it accepts (the fuzz target checks `encode(decode(b)) == b`): no
//! trailing bytes, booleans 0 or 1, enum tags from their tables, unused
//! fields 0. A list's count is checked against the bytes left before
//! anything is allocated, so a 4-byte count cannot ask for gigabytes.

use super::types::{
    Body, ConvKind, ConvSummary, Direction, Durability, Entry, GroupPage, Keyspace, Record,
    SendAck, SyncEntry, TimelineId,
};
use bytes::{Buf, BufMut};

/// Why a body failed to decode (becomes `ProtocolError::Malformed`).
pub(crate) type Why = &'static str;
pub(crate) type R<T> = Result<T, Why>;

const TRUNCATED: Why = "truncated body";

/// A cursor over a body: the protocol's shapes (bool, str, lists, the end)
/// over `bytes::Buf`'s checked little-endian reads, which fail rather than
/// panic on a short body.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Reader { b }
    }
    pub(crate) fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let (h, t) = self.b.split_at_checked(n).ok_or(TRUNCATED)?;
        self.b = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self) -> R<[u8; N]> {
        let mut a = [0u8; N];
        self.b.try_copy_to_slice(&mut a).map_err(|_| TRUNCATED)?;
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> R<u8> {
        self.b.try_get_u8().map_err(|_| TRUNCATED)
    }
    pub(crate) fn u16(&mut self) -> R<u16> {
        self.b.try_get_u16_le().map_err(|_| TRUNCATED)
    }
    pub(crate) fn u32(&mut self) -> R<u32> {
        self.b.try_get_u32_le().map_err(|_| TRUNCATED)
    }
    pub(crate) fn u64(&mut self) -> R<u64> {
        self.b.try_get_u64_le().map_err(|_| TRUNCATED)
    }
    pub(crate) fn magic(&mut self) -> R<[u8; 4]> {
        self.array()
    }
    pub(crate) fn bool(&mut self) -> R<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err("boolean not 0 or 1"),
        }
    }
    pub(crate) fn bytes(&mut self) -> R<&'a [u8]> {
        let n = self.u32()?;
        self.take(usize::try_from(n).map_err(|_| "truncated body")?)
    }
    pub(crate) fn str(&mut self) -> R<&'a str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| "string not UTF-8")
    }
    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    /// A list count, no larger than the bytes left allow for items of at
    /// least `min_item` bytes.
    pub(crate) fn count(&mut self, min_item: usize) -> R<usize> {
        let n = usize::try_from(self.u32()?).map_err(|_| "list count exceeds the body")?;
        if n > self.b.len() / min_item.max(1) {
            return Err("list count exceeds the body");
        }
        Ok(n)
    }
    pub(crate) fn end(&self) -> R<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes")
        }
    }
    pub(crate) fn list<T: Wire<'a>>(&mut self) -> R<Vec<T>> {
        let n = self.count(T::MIN_LEN)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(T::decode(self)?);
        }
        Ok(v)
    }
}

/// Writing the protocol's shapes into a caller's buffer; integers go
/// through `bytes::BufMut`'s `put_*_le` (little-endian, stated once here).
pub(crate) trait Put {
    fn put_bool(&mut self, v: bool);
    fn put_blob(&mut self, v: &[u8]);
    fn put_list<'a, T: Wire<'a>>(&mut self, v: &[T]);
}

impl Put for Vec<u8> {
    fn put_bool(&mut self, v: bool) {
        self.push(u8::from(v));
    }
    fn put_blob(&mut self, v: &[u8]) {
        // Above u32::MAX the frame is above every limit too: the peer
        // rejects it by its header before reading this field.
        self.put_u32_le(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.extend_from_slice(v);
    }
    fn put_list<'a, T: Wire<'a>>(&mut self, v: &[T]) {
        self.put_u32_le(u32::try_from(v.len()).unwrap_or(u32::MAX));
        for x in v {
            x.encode(self);
        }
    }
}

/// Encoded size of a `bytes` field.
pub(crate) fn bytes_len(v: &[u8]) -> usize {
    4 + v.len()
}

/// Encoded size of a `list<T>` field.
pub(crate) fn list_len<'a, T: Wire<'a>>(v: &[T]) -> usize {
    4 + v.iter().map(Wire::encoded_len).sum::<usize>()
}

/// A value with one wire encoding.
pub(crate) trait Wire<'a>: Sized {
    /// The smallest encoding: bounds a list's count before allocating.
    const MIN_LEN: usize;
    fn encoded_len(&self) -> usize;
    fn encode(&self, b: &mut Vec<u8>);
    fn decode(r: &mut Reader<'a>) -> R<Self>;
}

impl<'a> Wire<'a> for u64 {
    const MIN_LEN: usize = 8;
    fn encoded_len(&self) -> usize {
        8
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u64_le(*self);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        r.u64()
    }
}

/// `(conv:u64, seq:u64)`: a read-fan-out group checkpoint.
impl<'a> Wire<'a> for (u64, u64) {
    const MIN_LEN: usize = 16;
    fn encoded_len(&self) -> usize {
        16
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u64_le(self.0);
        b.put_u64_le(self.1);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok((r.u64()?, r.u64()?))
    }
}

// -- small enums -----------------------------------------------------------

/// The wire names a keyspace by its engine id; the server serves the
/// default configuration's two (0 store, 1 sync) and refuses other codes.
pub(crate) fn keyspace_code(k: Keyspace) -> u8 {
    k.0
}

/// `timeline = keyspace:u8 (0 store, 1 sync) id:u64`.
impl<'a> Wire<'a> for TimelineId {
    const MIN_LEN: usize = 9;
    fn encoded_len(&self) -> usize {
        9
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u8(keyspace_code(self.keyspace));
        b.put_u64_le(self.id);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        let keyspace = match r.u8()? {
            0 => Keyspace::STORE,
            1 => Keyspace::SYNC,
            _ => return Err("unknown keyspace"),
        };
        Ok(TimelineId {
            keyspace,
            id: r.u64()?,
        })
    }
}

/// `durability:u8`: 0 the server's default, 1 none (page cache), 2 group
/// commit, 3 its own fdatasync.
pub(crate) fn durability_code(d: Option<Durability>) -> u8 {
    match d {
        None => 0,
        Some(Durability::Buffered) => 1,
        Some(Durability::GroupCommit) => 2,
        Some(Durability::Sync) => 3,
    }
}

pub(crate) fn durability(r: &mut Reader<'_>) -> R<Option<Durability>> {
    Ok(match r.u8()? {
        0 => None,
        1 => Some(Durability::Buffered),
        2 => Some(Durability::GroupCommit),
        3 => Some(Durability::Sync),
        _ => return Err("unknown durability"),
    })
}

/// `direction:u8`: 0 forward, 1 backward.
pub(crate) fn direction_code(d: Direction) -> u8 {
    match d {
        Direction::Forward => 0,
        Direction::Backward => 1,
    }
}

pub(crate) fn direction(r: &mut Reader<'_>) -> R<Direction> {
    match r.u8()? {
        0 => Ok(Direction::Forward),
        1 => Ok(Direction::Backward),
        _ => Err("unknown direction"),
    }
}

/// `kind:u8`: 1 direct, 2 group (the IM layer's own codes).
pub(crate) fn conv_kind_code(k: ConvKind) -> u8 {
    match k {
        ConvKind::Direct => 1,
        ConvKind::Group => 2,
    }
}

pub(crate) fn conv_kind(r: &mut Reader<'_>) -> R<ConvKind> {
    match r.u8()? {
        1 => Ok(ConvKind::Direct),
        2 => Ok(ConvKind::Group),
        _ => Err("unknown conversation kind"),
    }
}

// -- engine and IM values --------------------------------------------------

/// One append of a batch: `timeline payload:bytes`, the payload borrowed
/// from the request (it goes to `Engine::append_batch` as it is).
impl<'a> Wire<'a> for (TimelineId, &'a [u8]) {
    const MIN_LEN: usize = 9 + 4;
    fn encoded_len(&self) -> usize {
        9 + bytes_len(self.1)
    }
    fn encode(&self, b: &mut Vec<u8>) {
        self.0.encode(b);
        b.put_blob(self.1);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok((TimelineId::decode(r)?, r.bytes()?))
    }
}

/// `record = seq:u64 timestamp_ms:u64 payload:bytes`.
impl<'a> Wire<'a> for Record {
    const MIN_LEN: usize = 20;
    fn encoded_len(&self) -> usize {
        16 + bytes_len(&self.payload)
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u64_le(self.seq);
        b.put_u64_le(self.timestamp_ms);
        b.put_blob(&self.payload);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok(Record {
            seq: r.u64()?,
            timestamp_ms: r.u64()?,
            payload: r.bytes()?.to_vec(),
        })
    }
}

/// `body = tag:u8` then per tag: 1 message `payload:bytes`, 2 recalled,
/// 3 deleted, 4 created `kind:u8`, 5 member added `user:u64`, 6 member
/// removed `user:u64`, 7 recall `target:u64`, 8 read marker, 9 deleted marker.
impl<'a> Wire<'a> for Body {
    const MIN_LEN: usize = 1;
    fn encoded_len(&self) -> usize {
        1 + match self {
            Body::Message(p) => bytes_len(p),
            Body::Created { .. } => 1,
            Body::MemberAdded(_) | Body::MemberRemoved(_) | Body::Recall { .. } => 8,
            Body::Recalled | Body::Deleted | Body::ReadMarker | Body::DeletedMarker => 0,
        }
    }
    fn encode(&self, b: &mut Vec<u8>) {
        match self {
            Body::Message(p) => {
                b.put_u8(1);
                b.put_blob(p);
            }
            Body::Recalled => b.put_u8(2),
            Body::Deleted => b.put_u8(3),
            Body::Created { kind } => {
                b.put_u8(4);
                b.put_u8(conv_kind_code(*kind));
            }
            Body::MemberAdded(u) => {
                b.put_u8(5);
                b.put_u64_le(*u);
            }
            Body::MemberRemoved(u) => {
                b.put_u8(6);
                b.put_u64_le(*u);
            }
            Body::Recall { target } => {
                b.put_u8(7);
                b.put_u64_le(*target);
            }
            Body::ReadMarker => b.put_u8(8),
            Body::DeletedMarker => b.put_u8(9),
        }
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok(match r.u8()? {
            1 => Body::Message(r.bytes()?.to_vec()),
            2 => Body::Recalled,
            3 => Body::Deleted,
            4 => Body::Created {
                kind: conv_kind(r)?,
            },
            5 => Body::MemberAdded(r.u64()?),
            6 => Body::MemberRemoved(r.u64()?),
            7 => Body::Recall { target: r.u64()? },
            8 => Body::ReadMarker,
            9 => Body::DeletedMarker,
            _ => return Err("unknown entry body tag"),
        })
    }
}

/// `entry = conv:u64 conv_seq:u64 sender:u64 timestamp_ms:u64 body`.
impl<'a> Wire<'a> for Entry {
    const MIN_LEN: usize = 32 + Body::MIN_LEN;
    fn encoded_len(&self) -> usize {
        32 + self.body.encoded_len()
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u64_le(self.conv);
        b.put_u64_le(self.conv_seq);
        b.put_u64_le(self.sender);
        b.put_u64_le(self.timestamp_ms);
        self.body.encode(b);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok(Entry {
            conv: r.u64()?,
            conv_seq: r.u64()?,
            sender: r.u64()?,
            timestamp_ms: r.u64()?,
            body: Body::decode(r)?,
        })
    }
}

/// `sync_entry = seq:u64 entry`.
impl<'a> Wire<'a> for SyncEntry {
    const MIN_LEN: usize = 8 + Entry::MIN_LEN;
    fn encoded_len(&self) -> usize {
        8 + self.entry.encoded_len()
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u64_le(self.seq);
        self.entry.encode(b);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok(SyncEntry {
            seq: r.u64()?,
            entry: Entry::decode(r)?,
        })
    }
}

/// `group_page = conv:u64 checkpoint:u64 has_more:bool entries:list<entry>`.
impl<'a> Wire<'a> for GroupPage {
    const MIN_LEN: usize = 8 + 8 + 1 + 4;
    fn encoded_len(&self) -> usize {
        17 + list_len(&self.entries)
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u64_le(self.conv);
        b.put_u64_le(self.checkpoint);
        b.put_bool(self.has_more);
        b.put_list(&self.entries);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok(GroupPage {
            conv: r.u64()?,
            checkpoint: r.u64()?,
            has_more: r.bool()?,
            entries: r.list()?,
        })
    }
}

const SUMMARY_MEMBER: u8 = 0x01;
const SUMMARY_READ_FANOUT: u8 = 0x02;

/// `conv_summary = conv:u64 kind:u8 last_seq:u64 read_seq:u64 unread:u64
/// flags:u8` (bit 0 member, bit 1 read fan-out; other bits 0).
impl<'a> Wire<'a> for ConvSummary {
    const MIN_LEN: usize = 34;
    fn encoded_len(&self) -> usize {
        34
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u64_le(self.conv);
        b.put_u8(conv_kind_code(self.kind));
        b.put_u64_le(self.last_seq);
        b.put_u64_le(self.read_seq);
        b.put_u64_le(self.unread);
        let mut f = 0;
        if self.member {
            f |= SUMMARY_MEMBER;
        }
        if self.read_fanout {
            f |= SUMMARY_READ_FANOUT;
        }
        b.put_u8(f);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        let conv = r.u64()?;
        let kind = conv_kind(r)?;
        let (last_seq, read_seq, unread) = (r.u64()?, r.u64()?, r.u64()?);
        let f = r.u8()?;
        if f & !(SUMMARY_MEMBER | SUMMARY_READ_FANOUT) != 0 {
            return Err("undefined conversation summary flags");
        }
        Ok(ConvSummary {
            conv,
            kind,
            last_seq,
            read_seq,
            unread,
            member: f & SUMMARY_MEMBER != 0,
            read_fanout: f & SUMMARY_READ_FANOUT != 0,
        })
    }
}

/// `send_ack = conv:u64 seq:u64 duplicate:bool`.
impl<'a> Wire<'a> for SendAck {
    const MIN_LEN: usize = 17;
    fn encoded_len(&self) -> usize {
        17
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_u64_le(self.conv);
        b.put_u64_le(self.seq);
        b.put_bool(self.duplicate);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok(SendAck {
            conv: r.u64()?,
            seq: r.u64()?,
            duplicate: r.bool()?,
        })
    }
}

/// A STATS line: `key:str value:u64`.
impl<'a> Wire<'a> for (String, u64) {
    const MIN_LEN: usize = 12;
    fn encoded_len(&self) -> usize {
        bytes_len(self.0.as_bytes()) + 8
    }
    fn encode(&self, b: &mut Vec<u8>) {
        b.put_blob(self.0.as_bytes());
        b.put_u64_le(self.1);
    }
    fn decode(r: &mut Reader<'a>) -> R<Self> {
        Ok((r.str()?.to_owned(), r.u64()?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_huge_count_is_refused_before_allocating() {
        let mut b = Vec::new();
        b.put_u32_le(u32::MAX);
        b.extend_from_slice(&[0; 15]);
        assert_eq!(
            Reader::new(&b).list::<u64>(),
            Err("list count exceeds the body")
        );
        // One u64 fits in 15 bytes; the leftover 7 are trailing.
        let mut b = Vec::new();
        b.put_u32_le(1);
        b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 9]);
        let mut r = Reader::new(&b);
        assert_eq!(r.list::<u64>().unwrap(), vec![1]);
        assert_eq!(r.end(), Err("trailing bytes"));
    }

    #[test]
    fn strict_scalars() {
        assert_eq!(Reader::new(&[2]).bool(), Err("boolean not 0 or 1"));
        assert_eq!(
            Reader::new(&[2, 0, 0, 0, 0xff, 0xfe]).str(),
            Err("string not UTF-8")
        );
        assert_eq!(Reader::new(&[5, 0, 0, 0, 1]).bytes(), Err("truncated body"));
        assert_eq!(Reader::new(&[7]).u16(), Err("truncated body"));
    }
}
