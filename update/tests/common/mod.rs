//! What the bundle and delta tests share: a fresh Ed25519 key, and taking an archive
//! apart and putting it back together to make bad ones.

#![allow(dead_code)] // each test file uses its own part of this

use std::path::{Path, PathBuf};

use edge_oci::tar;
use ring::signature::Ed25519KeyPair;

pub fn key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

/// The archive's entries, to make bad ones from.
pub fn entries(archive: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(archive).unwrap();
    tar::read(&bytes)
        .unwrap()
        .into_iter()
        .map(|f| (f.path, f.data.to_vec()))
        .collect()
}

/// `entries` as a ustar archive `name` in `dir`.
pub fn retar(dir: &Path, name: &str, entries: &[(String, Vec<u8>)]) -> PathBuf {
    let list: Vec<tar::Entry> = entries
        .iter()
        .map(|(p, d)| tar::Entry {
            path: p,
            data: d,
            mode: 0o644,
            dir: false,
        })
        .collect();
    let out = dir.join(name);
    std::fs::write(&out, tar::write(&list).unwrap()).unwrap();
    out
}
