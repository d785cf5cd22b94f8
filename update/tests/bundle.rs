//! A bundle made by `write` opens with its key and gives back its parts; every kind of
//! bad bundle is refused by `open`, naming what was wrong.

use std::path::{Path, PathBuf};

mod common;

use common::{entries, key};
use edge_update::{open, write, Error, Identity, Sources, PARTS};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// A change made to a manifest.
type Edit = dyn Fn(&mut serde_json::Value);

const ROOTHASH: &str = "4a6c419ad505e238a1420e4b7f746738cfb7afa57c0d72e149b1b7f4525e62b1";

/// The parts' files (root: five 4 KiB blocks, each different) in `dir`.
fn parts(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    PARTS
        .iter()
        .filter(|p| **p != "root.blockhash")
        .map(|name| {
            let path = dir.join(name);
            let data: Vec<u8> = match *name {
                "root.erofs" => (0..5 * 4096)
                    .map(|i| (i / 4096 * 7 + i % 251) as u8)
                    .collect(),
                "pcr11.json" => b"{\"a\":{}}\n".to_vec(),
                other => format!("the bytes of {other}").repeat(300).into_bytes(),
            };
            std::fs::write(&path, data).unwrap();
            (*name, path)
        })
        .collect()
}

fn make(dir: &Path, key: &Ed25519KeyPair) -> PathBuf {
    let files = parts(dir);
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let out = dir.join("edgeos-0.2.0.bundle");
    write(
        &out,
        &Identity {
            name: "edgeos",
            version: "0.2.0",
            security_version: 3,
            kernel_release: "6.1.0-56-amd64",
            roothash: ROOTHASH,
        },
        &Sources { files: &files },
        |m| key.sign(m).as_ref().to_vec(),
    )
    .unwrap();
    out
}

fn public(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}

fn retar(dir: &Path, entries: &[(String, Vec<u8>)]) -> PathBuf {
    common::retar(dir, "crafted.bundle", entries)
}

fn refused(path: &Path, key: &[u8]) -> String {
    match open(path, key) {
        Ok(b) => panic!("accepted: {:?}", b.manifest),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_bundle_opens_with_its_key_and_gives_back_every_part() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let path = make(dir.path(), &k);
    let b = open(&path, &public(&k)).unwrap();
    let m = &b.manifest;
    assert_eq!((m.name.as_str(), m.version.as_str()), ("edgeos", "0.2.0"));
    assert_eq!((m.security_version, m.roothash.as_str()), (3, ROOTHASH));
    assert_eq!(m.root_blocks(), 5);
    // It is a plain tar: any tar tool lists the manifest, its signature and the parts.
    let names: Vec<String> = entries(&path).into_iter().map(|(n, _)| n).collect();
    let mut want = vec!["manifest.json".to_string(), "manifest.sig".to_string()];
    want.extend(PARTS.iter().map(|p| p.to_string()));
    assert_eq!(names, want);
    // Each part is where the bundle says, byte for byte.
    let bytes = std::fs::read(&path).unwrap();
    for (name, file) in parts(dir.path()) {
        let at = b.located(name).unwrap();
        assert_eq!(
            &bytes[at.offset as usize..(at.offset + at.size) as usize],
            std::fs::read(file).unwrap(),
            "{name}"
        );
    }
    // The block index: one SHA-256 per 4 KiB block of the root.
    let index = b.located("root.blockhash").unwrap();
    let root = std::fs::read(dir.path().join("root.erofs")).unwrap();
    let want = edge_update::block_index(&root[..], root.len() as u64).unwrap();
    assert_eq!(
        &bytes[index.offset as usize..(index.offset + index.size) as usize],
        &want[..]
    );
}

#[test]
fn a_part_is_copied_out_as_checked_and_a_file_changed_since_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let path = make(dir.path(), &k);
    let b = open(&path, &public(&k)).unwrap();
    let mut out = Vec::new();
    let n = b.copy_part(&path, "uki-b.efi", &mut out).unwrap();
    assert_eq!(out, std::fs::read(dir.path().join("uki-b.efi")).unwrap());
    assert_eq!(n, out.len() as u64);
    // The file is changed under the reader after its checks: the copy says so.
    let mut bytes = std::fs::read(&path).unwrap();
    let at = b.located("root.erofs").unwrap().offset as usize;
    bytes[at + 5] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let e = b
        .copy_part(&path, "root.erofs", &mut std::io::sink())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("root.erofs: it changed since it was checked"),
        "{e}"
    );
    let e = b
        .copy_part(&path, "kernel", &mut std::io::sink())
        .unwrap_err()
        .to_string();
    assert!(e.contains("kernel: not in this bundle"), "{e}");
}

#[test]
fn another_key_a_changed_byte_or_a_cut_bundle_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let path = make(dir.path(), &k);
    let good = std::fs::read(&path).unwrap();
    let b = open(&path, &public(&k)).unwrap();

    let e = refused(&path, &public(&key()));
    assert!(e.contains("not signed by the trusted update key"), "{e}");

    // A byte of the root: its block does not match the index.
    let root = b.located("root.erofs").unwrap();
    let mut bad = good.clone();
    bad[(root.offset + 3 * 4096 + 17) as usize] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let e = refused(&path, &public(&k));
    assert!(
        e.contains("part root.erofs") && e.contains("block 3 does not match"),
        "{e}"
    );

    // A byte of a UKI: its SHA-256.
    let uki = b.located("uki-b.efi").unwrap();
    let mut bad = good.clone();
    bad[(uki.offset + 5) as usize] ^= 0x20;
    std::fs::write(&path, &bad).unwrap();
    let e = refused(&path, &public(&k));
    assert!(
        e.contains("part uki-b.efi") && e.contains("the manifest says"),
        "{e}"
    );

    // Cut short inside the root, and inside the manifest.
    std::fs::write(&path, &good[..(root.offset + 4096) as usize]).unwrap();
    let e = refused(&path, &public(&k));
    assert!(e.contains("ends inside root.erofs"), "{e}");
    std::fs::write(&path, &good[..600]).unwrap();
    let e = refused(&path, &public(&k));
    assert!(e.contains("ends inside manifest.json"), "{e}");

    // Not a bundle at all.
    std::fs::write(&path, b"hello").unwrap();
    let e = refused(&path, &public(&k));
    assert!(e.contains("not a readable update bundle"), "{e}");
}

#[test]
fn a_manifest_signed_but_wrong_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let path = make(dir.path(), &k);
    let original = entries(&path);
    // The manifest changed as `edit` says, signed again with the right key.
    let signed = |edit: &Edit| {
        let mut e = original.clone();
        let mut m: serde_json::Value = serde_json::from_slice(&e[0].1).unwrap();
        edit(&mut m);
        e[0].1 = serde_json::to_vec(&m).unwrap();
        e[1].1 = k.sign(&e[0].1).as_ref().to_vec();
        retar(dir.path(), &e)
    };
    let cases: [(&Edit, &str); 6] = [
        (&|m| m["format"] = 2.into(), "format version 2 is unknown"),
        (
            &|m| m["security_version"] = 0.into(),
            "security_version is 0",
        ),
        (&|m| m["roothash"] = "xyz".into(), "roothash \"xyz\""),
        (
            &|m| m["version"] = "0.2.0/../x".into(),
            "version \"0.2.0/../x\"",
        ),
        (
            &|m| m["parts"].as_array_mut().unwrap().swap(1, 2),
            "exactly",
        ),
        (&|m| m["parts"][5]["size"] = 4097.into(), "whole number"),
    ];
    for (edit, want) in cases {
        let e = refused(&signed(edit), &public(&k));
        assert!(e.contains(want), "{want}: {e}");
    }
    // A part whose size is not what the signed manifest says.
    let e = refused(&signed(&|m| m["parts"][0]["size"] = 3.into()), &public(&k));
    assert!(
        e.contains("part pcr11.json") && e.contains("the manifest says 3"),
        "{e}"
    );

    // Entries out of place: another first entry, one more after the last part.
    let mut e = original.clone();
    e.swap(0, 1);
    let err = refused(&retar(dir.path(), &e), &public(&k));
    assert!(
        err.contains("\"manifest.sig\" where manifest.json should be"),
        "{err}"
    );
    let mut e = original.clone();
    e.push(("extra".into(), b"x".to_vec()));
    let err = refused(&retar(dir.path(), &e), &public(&k));
    assert!(err.contains("\"extra\" after the last part"), "{err}");
    // Signed garbage.
    let mut e = original.clone();
    e[0].1 = b"{not json".to_vec();
    e[1].1 = k.sign(&e[0].1).as_ref().to_vec();
    let err = refused(&retar(dir.path(), &e), &public(&k));
    assert!(err.contains("not JSON"), "{err}");
}

#[test]
fn a_root_that_is_not_whole_blocks_is_not_bundled() {
    let dir = tempfile::tempdir().unwrap();
    let files = parts(dir.path());
    std::fs::write(dir.path().join("root.erofs"), vec![1u8; 4096 + 1]).unwrap();
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let k = key();
    let e = write(
        &dir.path().join("x.bundle"),
        &Identity {
            name: "edgeos",
            version: "0.2.0",
            security_version: 1,
            kernel_release: "k",
            roothash: ROOTHASH,
        },
        &Sources { files: &files },
        |m| k.sign(m).as_ref().to_vec(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(
        e.to_string().contains("whole number of 4096-byte blocks"),
        "{e}"
    );
    assert!(!dir.path().join("x.bundle").exists());
}
