//! The build fingerprint nodes compare when they connect (`net`, "the
//! hello"): a CRC-32 and the byte count of every source that decides what
//! a node sends another (this crate's, the engine's and the protocol's,
//! whose types its messages and Raft entries carry), of their manifests
//! and the workspace's (features), and of `Cargo.lock` (openraft's and
//! bincode's versions decide the bytes too). The nodes of
//! one cluster must run the same build (docs/scaling.md, "Versions"):
//! with this, two different builds refuse each other with a message
//! instead of misreading each other's bincode.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = here.parent().expect("the crate sits in the workspace");
    let mut files = Vec::new();
    for dir in ["cluster/src", "engine/src", "protocol/src"] {
        let d = root.join(dir);
        println!("cargo:rerun-if-changed={}", d.display());
        sources(&d, &mut files);
    }
    for f in [
        "Cargo.lock",
        "Cargo.toml",
        "cluster/Cargo.toml",
        "engine/Cargo.toml",
        "protocol/Cargo.toml",
    ] {
        let f = root.join(f);
        println!("cargo:rerun-if-changed={}", f.display());
        files.push(f);
    }
    files.sort();
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    for f in &files {
        // Paths relative to the workspace: the same checkout built in
        // another directory is the same build.
        let rel = f.strip_prefix(root).unwrap_or(f);
        crc.update(rel.to_string_lossy().as_bytes());
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        len += bytes.len() as u64;
        crc.update(&bytes);
    }
    let fingerprint = (u64::from(crc.finalize()) << 32) | (len & 0xFFFF_FFFF);
    println!("cargo:rustc-env=TIMELINE_PEER_BUILD={fingerprint}");
}
