//! `format::record::{decode, decode_header}` on arbitrary bytes: never panic,
//! agree with each other, and whatever decodes re-encodes to exactly the bytes
//! it was decoded from. A second pass recomputes the CRC first (so the fuzzer
//! reaches everything behind the checksum check), and a third builds a header
//! from the input and checks encode -> decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use timeline_engine::format::record::{
    decode, decode_header, encode_into, encode_to_vec, encoded_len, RecordHeader,
};
use timeline_engine::format::{FormatError, RECORD_HEADER_LEN};

fn check(data: &[u8]) {
    let hdr = decode_header(data);
    let full = decode(data);
    match (&hdr, &full) {
        (Ok(h), Ok((d, payload))) => {
            assert_eq!(h, d, "decode_header and decode disagree");
            assert_eq!(payload.len(), d.len as usize);
            let n = d.encoded_len();
            assert!(n <= data.len());
            let mut v = Vec::new();
            encode_to_vec(d, payload, &mut v);
            assert_eq!(&v[..], &data[..n], "re-encoding differs from the decoded bytes");
            let mut w = vec![0xAAu8; encoded_len(payload.len())];
            encode_into(d, payload, &mut w);
            assert_eq!(w, v, "encode_into and encode_to_vec disagree");
            // Trailing bytes never matter.
            assert_eq!(decode(&data[..n]), Ok((*d, *payload)));
        }
        (Ok(h), Err(e)) => {
            // The header fits, so only the checksum can be wrong.
            assert!(
                matches!(e, FormatError::BadChecksum { .. }),
                "header {h:?} decodes but decode fails with {e:?}"
            );
        }
        (Err(e1), Err(e2)) => assert_eq!(e1, e2),
        (Err(e), Ok(_)) => panic!("decode succeeds where decode_header fails: {e:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);

    // Same bytes with a correct CRC over what the header says the record spans.
    if data.len() >= RECORD_HEADER_LEN {
        let mut b = data.to_vec();
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as usize;
        let end = (RECORD_HEADER_LEN + len).min(b.len());
        let crc = crc32(&b[4..end]);
        b[0..4].copy_from_slice(&crc.to_le_bytes());
        check(&b);
        if RECORD_HEADER_LEN + len <= b.len() {
            assert!(decode(&b).is_ok(), "a record with a fixed-up CRC must decode");
        }
    }

    // Encode -> decode with fields taken from the input.
    if data.len() >= 36 {
        let u64at = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap_or_default());
        let u32at = |i: usize| u32::from_le_bytes(data[i..i + 4].try_into().unwrap_or_default());
        let payload = &data[36..];
        let h = RecordHeader {
            len: payload.len() as u32,
            timeline: u64at(0),
            seq: u64at(8),
            ts_ms: u64at(16),
            prev: u32at(24),
            anchor: u32at(28),
        };
        let _ = u32at(32);
        let mut v = Vec::new();
        encode_to_vec(&h, payload, &mut v);
        assert_eq!(v.len(), h.encoded_len());
        assert_eq!(decode(&v), Ok((h, payload)));
        // Any single bit flip is detected.
        let bit = u32at(32) as usize % (v.len() * 8);
        v[bit / 8] ^= 1 << (bit % 8);
        assert!(decode(&v).is_err(), "bit flip at {bit} not detected");
    }
});

fn crc32(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}
