//! Framing: a 16-byte header and a body of `len` bytes.
//!
//! ```text
//! header: len:u32 opcode:u16 flags:u16 request_id:u64   (little-endian)
//! frame:  header body:[u8; len]
//! ```
//!
//! This layer only cuts a byte stream into frames; what a body means is
//! [`msg`](super::msg)'s business. Its one fatal error is a frame above the
//! size limit (the stream cannot be trusted to skip it cheaply); everything
//! else (an unknown opcode, a body that does not decode) is answered per
//! request, because the length prefix says where the next frame starts.

use super::codes::Opcode;
use super::ProtocolError;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;

/// The default limit on a whole frame (header + body): 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// Flag bits of the header. Every other bit is reserved and must be 0.
pub mod flags {
    /// The frame answers the request with the same request id.
    pub const REPLY: u16 = 0x0001;
    /// With `REPLY`: the request failed; the body is an error reply.
    pub const ERROR: u16 = 0x0002;
    /// A pushed entry of the subscription whose SUBSCRIBE had this request id.
    pub const PUSH: u16 = 0x0004;
}

/// What a frame is, from its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Client to server (flags 0).
    Request,
    /// Server to client, the request succeeded (`REPLY`).
    Reply,
    /// Server to client, the request failed (`REPLY | ERROR`).
    Error,
    /// Server to client, unasked (`PUSH`).
    Push,
}

impl FrameKind {
    pub fn flags(self) -> u16 {
        match self {
            FrameKind::Request => 0,
            FrameKind::Reply => flags::REPLY,
            FrameKind::Error => flags::REPLY | flags::ERROR,
            FrameKind::Push => flags::PUSH,
        }
    }
    fn from_flags(f: u16) -> Option<FrameKind> {
        Some(match f {
            0 => FrameKind::Request,
            flags::REPLY => FrameKind::Reply,
            x if x == flags::REPLY | flags::ERROR => FrameKind::Error,
            flags::PUSH => FrameKind::Push,
            _ => return None,
        })
    }
}

/// A frame header without its length (that is the body's length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub opcode: Opcode,
    pub flags: u16,
    /// Chosen by the client (never 0), echoed by the reply; for a push, the
    /// request id of the SUBSCRIBE that opened the subscription; 0 on
    /// connection-level errors.
    pub request_id: u64,
}

impl Header {
    /// The frame's kind, or `MALFORMED_FRAME` for a flag combination the
    /// protocol does not define (reserved bits set, `ERROR` without `REPLY`).
    pub fn kind(&self) -> Result<FrameKind, ProtocolError> {
        FrameKind::from_flags(self.flags).ok_or(ProtocolError::Malformed {
            opcode: self.opcode,
            why: "undefined flag bits",
        })
    }
}

/// One frame, its body borrowed from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: Header,
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Header plus body.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Append the frame to `buf`. A body above `u32::MAX` bytes is written
    /// with length `u32::MAX`, which every peer rejects as too large (check
    /// `encoded_len()` against the peer's limit first).
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        buf.reserve(self.encoded_len());
        let start = begin(buf, self.header);
        buf.extend_from_slice(self.body);
        finish(buf, start);
    }
}

/// The total length (header + body) of the frame at the start of `buf`,
/// once its first 4 bytes are there: how much a reader must buffer.
pub fn peek_len(buf: &[u8]) -> Option<u64> {
    let len = buf.get(..4)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(len);
    Some(HEADER_LEN as u64 + u64::from(u32::from_le_bytes(a)))
}

/// The header of the frame at the start of `buf` and the frame's total
/// length (header + body), once its 16 header bytes are there: enough to
/// route or refuse a frame before its body arrives.
pub fn peek_header(buf: &[u8]) -> Option<(Header, u64)> {
    let mut r = super::wire::Reader::new(buf.get(..HEADER_LEN)?);
    // Infallible: the reader holds exactly HEADER_LEN bytes.
    let (len, opcode, flags, request_id) =
        (r.u32().ok()?, r.u16().ok()?, r.u16().ok()?, r.u64().ok()?);
    let header = Header {
        opcode: Opcode(opcode),
        flags,
        request_id,
    };
    Some((header, HEADER_LEN as u64 + u64::from(len)))
}

/// Cut the frame at the start of `buf`: `Ok(Some((frame, bytes consumed)))`,
/// `Ok(None)` if more bytes are needed, `Err(FrameTooLarge)` once the header
/// shows a frame (header + body) above `max_frame` bytes; that error is
/// fatal for the connection. Never panics, whatever `buf` holds.
pub fn decode(buf: &[u8], max_frame: usize) -> Result<Option<(Frame<'_>, usize)>, ProtocolError> {
    let Some((header, total)) = peek_header(buf) else {
        return Ok(None);
    };
    if total > max_frame as u64 {
        return Err(ProtocolError::FrameTooLarge {
            request_id: header.request_id,
            opcode: header.opcode,
            len: total,
            max: max_frame as u64,
        });
    }
    // `total <= max_frame`, so it fits a usize.
    let total = total as usize;
    let Some(body) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    Ok(Some((Frame { header, body }, total)))
}

/// Write `h` with a placeholder length; returns where the frame starts.
pub(crate) fn begin(buf: &mut Vec<u8>, h: Header) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&h.opcode.0.to_le_bytes());
    buf.extend_from_slice(&h.flags.to_le_bytes());
    buf.extend_from_slice(&h.request_id.to_le_bytes());
    start
}

/// Patch the length of the frame that starts at `start` (the body is
/// everything written after its header). Writing the body once and patching
/// keeps the length right by construction, without a sizing pass.
pub(crate) fn finish(buf: &mut [u8], start: usize) {
    let body = buf.len().saturating_sub(start + HEADER_LEN);
    let len = u32::try_from(body).unwrap_or(u32::MAX);
    if let Some(slot) = buf.get_mut(start..start + 4) {
        slot.copy_from_slice(&len.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        Frame {
            header: Header {
                opcode: Opcode::PING,
                flags: 0,
                request_id: 7,
            },
            body,
        }
        .encode_into(&mut b);
        b
    }

    #[test]
    fn header_layout_is_little_endian_16_bytes() {
        let b = frame(b"xyz");
        assert_eq!(
            &b[..HEADER_LEN],
            &[3, 0, 0, 0, 0x02, 0x00, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&b[HEADER_LEN..], b"xyz");
        assert_eq!(peek_len(&b), Some(19));
    }

    #[test]
    fn every_prefix_of_a_frame_needs_more_bytes() {
        let b = frame(b"hello");
        for n in 0..b.len() {
            assert_eq!(decode(&b[..n], DEFAULT_MAX_FRAME).unwrap(), None, "{n}");
        }
        let (f, used) = decode(&b, DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!(used, b.len());
        assert_eq!(f.body, b"hello");
        assert_eq!(f.header.request_id, 7);
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut b = frame(b"a");
        b.extend(frame(b"bc"));
        let (f1, n1) = decode(&b, DEFAULT_MAX_FRAME).unwrap().unwrap();
        let (f2, n2) = decode(&b[n1..], DEFAULT_MAX_FRAME).unwrap().unwrap();
        assert_eq!(
            (f1.body, f2.body, n1 + n2),
            (&b"a"[..], &b"bc"[..], b.len())
        );
    }

    #[test]
    fn oversized_frame_is_rejected_from_its_header_alone() {
        let mut b = vec![0u8; HEADER_LEN];
        b[..4].copy_from_slice(&(1000u32).to_le_bytes());
        b[8] = 9;
        let e = decode(&b, 512).unwrap_err();
        assert_eq!(
            e,
            ProtocolError::FrameTooLarge {
                request_id: 9,
                opcode: Opcode(0),
                len: 1016,
                max: 512
            }
        );
        assert_eq!(e.code(), super::super::ErrorCode::FRAME_TOO_LARGE);
        assert!(e.is_fatal());
        // Exactly at the limit is fine.
        assert!(decode(&b, 1016).unwrap().is_none());
        // u32::MAX length: no overflow on 32- or 64-bit usize.
        b[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&b, usize::MAX).unwrap().is_none());
        assert!(decode(&b, DEFAULT_MAX_FRAME).is_err());
    }

    #[test]
    fn flags_define_four_kinds_and_nothing_else() {
        let mut h = Header {
            opcode: Opcode::GET,
            flags: 0,
            request_id: 1,
        };
        for k in [
            FrameKind::Request,
            FrameKind::Reply,
            FrameKind::Error,
            FrameKind::Push,
        ] {
            h.flags = k.flags();
            assert_eq!(h.kind().unwrap(), k);
        }
        for bad in [flags::ERROR, flags::PUSH | flags::REPLY, 0x8000, 0x0008] {
            h.flags = bad;
            assert!(h.kind().is_err(), "{bad:#x}");
        }
    }
}
