//! Segment header, footer, index entries and index checkpoints on arbitrary
//! bytes: never panic, and whatever decodes re-encodes to the bytes it came
//! from (reserved fields aside, which the decoders do not read).
//!
//! Input: one mode byte, then the bytes. Mode bits ask the target to fix up
//! the header / footer / checkpoint CRCs before decoding, so the fuzzer
//! reaches the checks that sit behind each checksum (version, kind, index
//! bounds, entry count) without having to forge a CRC-32.
#![no_main]

use libfuzzer_sys::fuzz_target;
use timeline_engine::format::checkpoint;
use timeline_engine::format::segment::{
    Footer, IndexEntry, SegmentHeader, ENTRY_LEN, FOOTER_LEN, HEADER_LEN,
};
use timeline_engine::format::FormatError;

fn fix_header(b: &mut [u8]) {
    if b.len() >= HEADER_LEN {
        let c = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
    }
}

fn fix_footer(b: &mut [u8]) {
    if b.len() >= FOOTER_LEN {
        let f = b.len() - FOOTER_LEN;
        let c = crc32fast::hash(&b[f..f + 60]);
        b[f + 60..f + 64].copy_from_slice(&c.to_le_bytes());
    }
}

fn fix_checkpoint(b: &mut [u8]) {
    if b.len() >= 4 {
        let n = b.len() - 4;
        let c = crc32fast::hash(&b[..n]);
        b[n..].copy_from_slice(&c.to_le_bytes());
    }
}

fn check_header(b: &[u8]) {
    if let Ok(h) = SegmentHeader::decode(b) {
        let enc = h.encode();
        assert_eq!(SegmentHeader::decode(&enc), Ok(h), "header round trip");
        // Reserved bytes (20..24, 32..60) are not read back; everything else is.
        let same = |r: std::ops::Range<usize>| enc[r.clone()] == b[r];
        assert!(same(0..20) && same(24..32), "header fields re-encode differently");
        if b[20..24].iter().chain(&b[32..60]).all(|&x| x == 0) {
            assert_eq!(&enc[..], &b[..HEADER_LEN], "header re-encodes differently");
        }
    }
}

fn check_footer(b: &[u8]) {
    if let Ok(f) = Footer::decode_from_file(b) {
        let n = b.len();
        assert!(f.index_off >= HEADER_LEN as u64);
        assert_eq!(f.index_off + f.index_len(), (n - FOOTER_LEN) as u64);
        let enc = f.encode();
        let tail = &b[n - FOOTER_LEN..];
        assert_eq!(&enc[..52], &tail[..52], "footer fields re-encode differently");
        if tail[52..60].iter().all(|&x| x == 0) {
            assert_eq!(&enc[..], tail, "footer re-encodes differently");
        }
        let mut file = b[..n - FOOTER_LEN].to_vec();
        file.extend_from_slice(&enc);
        assert_eq!(Footer::decode_from_file(&file), Ok(f), "footer round trip");
        // Every entry of the index region the footer names decodes.
        let idx = &b[f.index_off as usize..(f.index_off + f.index_len()) as usize];
        for i in 0..(f.entries as usize).min(64) {
            let e = IndexEntry::decode_at(idx, i).expect("entry inside a verified index region");
            assert_eq!(IndexEntry::timeline_at(idx, i), Ok(e.timeline));
        }
    }
}

fn check_entries(b: &[u8]) {
    let n = b.len() / ENTRY_LEN;
    for i in 0..=n + 1 {
        match IndexEntry::decode_at(b, i) {
            Ok(e) => {
                assert!(i < n, "entry {i} decoded from {} bytes", b.len());
                let mut v = Vec::new();
                e.encode_to(&mut v);
                assert_eq!(&v[..], &b[i * ENTRY_LEN..(i + 1) * ENTRY_LEN], "entry round trip");
                assert_eq!(IndexEntry::timeline_at(b, i), Ok(e.timeline));
            }
            Err(e) => {
                assert!(i >= n, "entry {i} of {n} failed: {e:?}");
                assert!(matches!(e, FormatError::Truncated { .. }));
            }
        }
    }
}

fn check_checkpoint(b: &[u8]) {
    if let Ok((gen, entries)) = checkpoint::decode(b) {
        let enc = checkpoint::encode(gen, &entries);
        assert_eq!(enc.len(), b.len(), "checkpoint length");
        assert_eq!(checkpoint::decode(&enc), Ok((gen, entries.clone())));
        // Bytes 10..12 are reserved and not read back.
        if b[10..12] == [0, 0] {
            assert_eq!(enc, b, "checkpoint re-encodes differently");
        } else {
            assert_eq!(&enc[..10], &b[..10]);
            assert_eq!(&enc[12..enc.len() - 4], &b[12..b.len() - 4]);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Raw bytes first: every decoder on exactly what the fuzzer gave.
    check_header(rest);
    check_footer(rest);
    check_entries(rest);
    check_checkpoint(rest);
    if mode & 0x7 != 0 {
        let mut b = rest.to_vec();
        if mode & 1 != 0 {
            fix_header(&mut b);
        }
        if mode & 2 != 0 {
            fix_footer(&mut b);
        }
        if mode & 4 != 0 {
            fix_checkpoint(&mut b);
        }
        check_header(&b);
        check_footer(&b);
        check_checkpoint(&b);
    }
});
