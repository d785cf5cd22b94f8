//! A delta from one bundle to the next packs only the blocks the base does not hold; a
//! box holding the base rebuilds every part of the target byte for byte from it, and a
//! delta with a wrong block, or for another key, is refused naming what was wrong.

use std::path::{Path, PathBuf};

mod common;

use common::{entries, key, retar};
use edge_update::delta::{self, Seeds};
use edge_update::{open, write, Identity, Sources, PARTS};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// A bundle of `version` in `dir`: a root of 40 blocks where `changed` blocks differ by
/// version, UKIs of a shared "kernel" and a per-slot, per-version tail (not a whole
/// number of blocks), and a verity tree.
fn bundle(dir: &Path, key: &Ed25519KeyPair, version: &str, changed: &[usize]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let block = |i: usize, salt: &str| -> Vec<u8> {
        format!("block {i} {salt} ")
            .repeat(400)
            .into_bytes()
            .into_iter()
            .take(4096)
            .collect()
    };
    let mut files = Vec::new();
    for name in PARTS.iter().filter(|p| **p != "root.blockhash") {
        let data: Vec<u8> = match *name {
            "root.erofs" => (0..40)
                .flat_map(|i| {
                    block(
                        i,
                        if changed.contains(&i) {
                            version
                        } else {
                            "same"
                        },
                    )
                })
                .collect(),
            "root.verity" => (0..3).flat_map(|i| block(i, "tree")).collect(),
            "uki-a.efi" | "uki-b.efi" => {
                let mut d: Vec<u8> = (0..20).flat_map(|i| block(i, "kernel")).collect();
                d.extend(format!("{name} of {version}").repeat(50).into_bytes());
                d
            }
            _ => format!("{{\"release\":\"{version}\"}}").into_bytes(),
        };
        let path = dir.join(name);
        std::fs::write(&path, data).unwrap();
        files.push((*name, path));
    }
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let out = dir.join(format!("edgeos-{version}.bundle"));
    write(
        &out,
        &Identity {
            name: "edgeos",
            version,
            security_version: 1,
            kernel_release: "6.1",
            roothash: &"cd".repeat(32),
        },
        &Sources { files: &files },
        |m| key.sign(m).as_ref().to_vec(),
    )
    .unwrap();
    out
}

/// What a box running `base` (slot a) holds: its root and tree, the root's index, its UKI.
fn seeds(base_dir: &Path) -> Seeds {
    let mut s = Seeds::default();
    let root = base_dir.join("root.erofs");
    let len = std::fs::metadata(&root).unwrap().len();
    let index = s.add_file(&root, len).unwrap();
    s.add_bytes(index);
    let verity = base_dir.join("root.verity");
    s.add_file(&verity, std::fs::metadata(&verity).unwrap().len())
        .unwrap();
    s.add_bytes(std::fs::read(base_dir.join("uki-a.efi")).unwrap());
    s
}

#[test]
fn a_delta_packs_only_what_the_base_lacks_and_rebuilds_the_target_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key();
    let pk = k.public_key().as_ref().to_vec();
    let (bd, td) = (tmp.path().join("base"), tmp.path().join("target"));
    let base = bundle(&bd, &k, "0.1.0", &[]);
    let target = bundle(&td, &k, "0.2.0", &[3, 17]);
    let (b, t) = (open(&base, &pk).unwrap(), open(&target, &pk).unwrap());
    let out = tmp.path().join("0.2.0-from-0.1.0.delta");
    let written = delta::write((&b, &base), (&t, &target), &out).unwrap();
    let whole = std::fs::metadata(&target).unwrap().len();
    assert_eq!(written.bytes, std::fs::metadata(&out).unwrap().len());
    // Two root blocks, their index's block, each UKI's tail, the release file.
    assert!(written.packed_blocks <= 8, "{written:?}");
    assert!(written.bytes * 4 < whole, "{} of {whole}", written.bytes);

    let d = delta::open(&out, &pk).unwrap();
    assert_eq!(
        (d.info.base_version.as_str(), d.manifest.version.as_str()),
        ("0.1.0", "0.2.0")
    );
    let s = seeds(&bd);
    let mut index = Vec::new();
    d.rebuild("root.blockhash", &s, None, &mut index).unwrap();
    for name in PARTS {
        let mut rebuilt = Vec::new();
        let r = d.rebuild(name, &s, Some(&index), &mut rebuilt).unwrap();
        let at = t.located(name).unwrap();
        let bytes = std::fs::read(&target).unwrap();
        assert_eq!(
            rebuilt,
            &bytes[at.offset as usize..(at.offset + at.size) as usize],
            "{name}"
        );
        if name == "root.erofs" {
            assert_eq!((r.held, r.packed), (38, 2), "{name}");
        }
    }
}

#[test]
fn a_wrong_block_or_another_key_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let k = key();
    let pk = k.public_key().as_ref().to_vec();
    let (bd, td) = (tmp.path().join("base"), tmp.path().join("target"));
    let base = bundle(&bd, &k, "0.1.0", &[]);
    let target = bundle(&td, &k, "0.2.0", &[5]);
    let (b, t) = (open(&base, &pk).unwrap(), open(&target, &pk).unwrap());
    let out = tmp.path().join("d.delta");
    delta::write((&b, &base), (&t, &target), &out).unwrap();

    let other = key();
    let e = delta::open(&out, other.public_key().as_ref())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not signed by the trusted update key"), "{e}");

    // A packed block changed: the part it belongs to is refused, naming the block.
    let mut parts = entries(&out);
    let pack = parts.iter_mut().find(|(n, _)| n == "pack.bin").unwrap();
    for b in pack.1.iter_mut() {
        *b ^= 0x55;
    }
    let bad = retar(tmp.path(), "bad.delta", &parts);
    let d = delta::open(&bad, &pk).unwrap();
    let s = seeds(&bd);
    let mut index = Vec::new();
    let e = d
        .rebuild("root.blockhash", &s, None, &mut index)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("root.blockhash: block 0 does not match its hash"),
        "{e}"
    );

    // Without the base's blocks, a delta cannot rebuild: it says which block is missing.
    let d = delta::open(&out, &pk).unwrap();
    let e = d
        .rebuild("uki-a.efi", &Seeds::default(), None, &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("uki-a.efi: block 0") && e.contains("is neither held nor packed"),
        "{e}"
    );
}
