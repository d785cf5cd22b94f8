//! `edgectl verify-bundle`: an operator checks an OS update bundle with the update key
//! made by `edgectl keygen --name update`, as a box will; a changed byte or another key
//! is refused, naming what, with exit status 1.

use std::path::{Path, PathBuf};
use std::process::Command;

use ring::signature::KeyPair;

fn edgectl(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgectl"))
        .args(args)
        .output()
        .expect("run edgectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The update key `edgectl keygen --name update` makes in `dir`.
fn keygen(dir: &Path) -> ring::signature::Ed25519KeyPair {
    let (ok, out) = edgectl(&["keygen", "--name", "update", "--out", dir.to_str().unwrap()]);
    assert!(ok, "{out}");
    let pkcs8 = std::fs::read(dir.join("update.key")).unwrap();
    ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap()
}

/// A bundle of small parts (a root of three blocks) signed with `key`.
fn bundle(dir: &Path, key: &ring::signature::Ed25519KeyPair) -> PathBuf {
    let files: Vec<(&str, PathBuf)> = edge_update::PARTS
        .iter()
        .filter(|p| **p != "root.blockhash")
        .map(|name| {
            let path = dir.join(name);
            let data: Vec<u8> = if *name == "root.erofs" {
                (0..3 * 4096).map(|i| (i % 253) as u8).collect()
            } else {
                format!("{name} ").repeat(50).into_bytes()
            };
            std::fs::write(&path, data).unwrap();
            (*name, path)
        })
        .collect();
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let out = dir.join("edgeos-0.2.0.bundle");
    edge_update::write(
        &out,
        &edge_update::Identity {
            name: "edgeos",
            version: "0.2.0",
            security_version: 2,
            kernel_release: "6.1.0-56-amd64",
            roothash: &"ab".repeat(32),
        },
        &edge_update::Sources { files: &files },
        |m| key.sign(m).as_ref().to_vec(),
    )
    .unwrap();
    out
}

#[test]
fn an_operator_checks_a_bundle_with_the_update_key() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    let key = keygen(&keys);
    let path = bundle(tmp.path(), &key);
    let pubkey = keys.join("update.pub");
    let args = |p: &Path| {
        [
            "verify-bundle".to_string(),
            "--update-key".into(),
            pubkey.display().to_string(),
            p.display().to_string(),
        ]
    };
    let run = |p: &Path| {
        let a = args(p);
        edgectl(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let (ok, out) = run(&path);
    assert!(ok, "{out}");
    assert!(
        out.contains("edgeos 0.2.0 (security version 2")
            && out.contains("root.blockhash")
            && out.contains("all 3 blocks of the root check"),
        "{out}"
    );

    // A byte of the root's second block changed.
    let mut bytes = std::fs::read(&path).unwrap();
    let root = edge_update::open(&path, key.public_key().as_ref())
        .unwrap()
        .located("root.erofs")
        .unwrap()
        .clone();
    bytes[(root.offset + 4096 + 9) as usize] ^= 4;
    let bad = tmp.path().join("bad.bundle");
    std::fs::write(&bad, &bytes).unwrap();
    let (ok, out) = run(&bad);
    assert!(!ok);
    assert!(
        out.contains("bad.bundle") && out.contains("block 1 does not match the block index"),
        "{out}"
    );

    // Signed by another update key.
    let other = keygen(&tmp.path().join("other"));
    let foreign = bundle(&tmp.path().join("other"), &other);
    let (ok, out) = run(&foreign);
    assert!(!ok);
    assert!(
        out.contains("not signed by the trusted update key"),
        "{out}"
    );
}
