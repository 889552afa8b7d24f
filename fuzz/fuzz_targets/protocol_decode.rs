//! `timeline_protocol` on arbitrary bytes: cutting a stream into
//! frames, then decoding each frame as a request (server side) and as a
//! server message (client side), never panics; `Ok(None)` only when the
//! frame is not all there; `FrameTooLarge` only above the limit; and
//! whatever decodes re-encodes to exactly the bytes it came from and decodes
//! again to the same value (the codec is strict, so decode is the inverse of
//! encode). A second pass puts the input behind a valid header of every
//! known opcode so the body decoders are reached without the fuzzer having
//! to find a matching length first. Tokens are verified too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use timeline_protocol::{
    decode, peek_len, token, Frame, Header, Opcode, ProtocolError, RequestFrame, ServerMsg,
    HEADER_LEN,
};

fn check_frame(frame: &Frame<'_>, bytes: &[u8]) {
    let mut again = Vec::new();
    frame.encode_into(&mut again);
    assert_eq!(again, bytes, "frame re-encoding differs");
    assert_eq!(frame.encoded_len(), bytes.len());

    match RequestFrame::decode(frame) {
        Ok(req) => {
            let mut b = Vec::new();
            req.encode_into(&mut b);
            assert_eq!(b.len(), req.encoded_len());
            assert_eq!(b, bytes, "request re-encoding differs: {req:?}");
            let (f, used) = decode(&b, b.len()).expect("re-encoded").expect("complete");
            assert_eq!(used, b.len());
            assert_eq!(RequestFrame::decode(&f).expect("decodes again"), req);
        }
        Err(e) => assert!(!e.is_fatal(), "body errors are never fatal: {e:?}"),
    }
    match ServerMsg::decode(frame) {
        Ok(msg) => {
            let mut b = Vec::new();
            msg.encode_into(&mut b);
            assert_eq!(b.len(), msg.encoded_len());
            assert_eq!(b, bytes, "server message re-encoding differs: {msg:?}");
            let (f, used) = decode(&b, b.len()).expect("re-encoded").expect("complete");
            assert_eq!(used, b.len());
            assert_eq!(ServerMsg::decode(&f).expect("decodes again"), msg);
        }
        Err(e) => assert!(!e.is_fatal(), "body errors are never fatal: {e:?}"),
    }
}

/// Cut `data` into frames as a connection would, checking each.
fn chew(mut data: &[u8], max: usize) {
    loop {
        match decode(data, max) {
            Ok(Some((frame, used))) => {
                assert!(used >= HEADER_LEN && used <= data.len() && used <= max);
                let (this, rest) = data.split_at(used);
                check_frame(&frame, this);
                data = rest;
            }
            Ok(None) => {
                // Short of a header, or of the body the header announces.
                if data.len() >= HEADER_LEN {
                    let total = peek_len(data).expect("a whole header");
                    assert!(total <= max as u64 && (data.len() as u64) < total);
                }
                return;
            }
            Err(e) => {
                assert!(e.is_fatal(), "only an oversized frame fails the stream: {e:?}");
                match e {
                    ProtocolError::FrameTooLarge { len, max: m, .. } => {
                        assert!(len > m && m == max as u64);
                        assert_eq!(peek_len(data), Some(len));
                    }
                    _ => unreachable!(),
                }
                return;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the frame limit: small ones reach FrameTooLarge.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let max = match sel % 4 {
        0 => usize::from(sel) * 4,
        1 => 1 << 12,
        _ => 1 << 20,
    };
    chew(rest, max);

    // The input as the body of a frame of each known opcode and kind.
    for (op, _) in Opcode::ALL {
        for flags in [0u16, 1, 3, 4] {
            let mut b = Vec::new();
            Frame {
                header: Header {
                    opcode: *op,
                    flags,
                    request_id: u64::from(sel) + 1,
                },
                body: rest,
            }
            .encode_into(&mut b);
            chew(&b, b.len());
        }
    }

    let _ = token::verify(b"fuzz secret", rest, u64::from(sel));
});
