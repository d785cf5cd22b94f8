use ring::signature::KeyPair;

use super::apply::{applied_version, withdraw, write_window};
use super::fetch::room_for;
use super::manifest::{check_item, for_this_box, Holds};
use super::*;

fn keypair() -> ring::signature::Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn signed(kp: &ring::signature::Ed25519KeyPair, body: &[u8]) -> Vec<u8> {
    let mut v = kp.sign(body).as_ref().to_vec();
    v.extend_from_slice(body);
    v
}

const BODY: &str = r#"{"version":3,"items":[{"kind":"models","name":"m.onnx","store":"object","key":"m1","sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#;

#[test]
fn an_update_no_manifest_offers_any_more_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let updates = tmp.path().join("updates");
    let offer = |names: &[&str]| Manifest {
        version: 1,
        items: names
            .iter()
            .map(|n| Item {
                kind: "updates".into(),
                name: n.to_string(),
                store: "object".into(),
                key: n.to_string(),
                sha256: "0".repeat(64),
                window: None,
                version: None,
                base: None,
                published_ms: None,
            })
            .collect(),
    };
    let put = |name: &str| std::fs::write(updates.join(name), b"x").unwrap();
    // Nothing offered yet: nothing to remove, no record written.
    assert!(withdraw(&updates, "updates", "s.manifest", &offer(&[])).is_empty());
    assert!(!updates.exists());
    assert!(withdraw(&updates, "updates", "s.manifest", &offer(&["a.bundle"])).is_empty());
    put("a.bundle");
    assert!(withdraw(&updates, "updates", "s.m.manifest", &offer(&["b.delta"])).is_empty());
    put(".b.delta.partial");
    put(".b.delta.progress");
    // The site's manifest replaces a.bundle by b.delta, which the machine's also
    // offers: only a.bundle goes.
    assert_eq!(
        withdraw(&updates, "updates", "s.manifest", &offer(&["b.delta"])),
        vec!["a.bundle".to_string()]
    );
    assert!(!updates.join("a.bundle").exists());
    // The site withdraws it; the machine's manifest still offers it: kept.
    assert!(withdraw(&updates, "updates", "s.manifest", &offer(&[])).is_empty());
    assert!(updates.join(".b.delta.partial").exists());
    // The machine's withdraws it too: the partial download goes.
    assert_eq!(
        withdraw(&updates, "updates", "s.m.manifest", &offer(&[])),
        vec!["b.delta".to_string()]
    );
    assert!(!updates.join(".b.delta.partial").exists());
    assert!(!updates.join(".b.delta.progress").exists());
}

#[test]
fn a_pod_or_model_the_manifest_no_longer_offers_is_removed_and_others_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let (pods, models) = (tmp.path().join("pods"), tmp.path().join("models"));
    let item = |kind: &str, name: &str| Item {
        kind: kind.into(),
        name: name.into(),
        store: "kv".into(),
        key: format!("s.{name}"),
        sha256: "0".repeat(64),
        window: None,
        version: None,
        base: None,
        published_ms: None,
    };
    let manifest = |items: Vec<Item>| Manifest { version: 1, items };
    let first = manifest(vec![
        item("pods", "relay.yaml"),
        item("pods", "camera.yaml"),
        item("models", "m.onnx"),
    ]);
    assert!(withdraw(&pods, "pods", "s.manifest", &first).is_empty());
    assert!(withdraw(&models, "models", "s.manifest", &first).is_empty());
    for (dir, name) in [
        (&pods, "relay.yaml"),
        (&pods, "camera.yaml"),
        (&models, "m.onnx"),
    ] {
        std::fs::write(dir.join(name), b"x").unwrap();
    }
    // A file no manifest ever offered (an older fabricd's) is not this code's to remove.
    std::fs::write(pods.join("old.yaml"), b"x").unwrap();
    // The core takes back the relay pod and the model; the camera stays.
    let second = manifest(vec![item("pods", "camera.yaml")]);
    assert_eq!(
        withdraw(&pods, "pods", "s.manifest", &second),
        vec!["relay.yaml".to_string()]
    );
    assert_eq!(
        withdraw(&models, "models", "s.manifest", &second),
        vec!["m.onnx".to_string()]
    );
    assert!(!pods.join("relay.yaml").exists() && !models.join("m.onnx").exists());
    assert!(pods.join("camera.yaml").exists() && pods.join("old.yaml").exists());
    // A pod of the same name in another kind's offer is not this kind's.
    let third = manifest(vec![item("models", "camera.yaml")]);
    assert_eq!(
        withdraw(&pods, "pods", "s.manifest", &third),
        vec!["camera.yaml".to_string()]
    );
}

#[test]
fn a_signed_manifest_verifies() {
    let kp = keypair();
    let m = verify_manifest(&signed(&kp, BODY.as_bytes()), kp.public_key().as_ref()).unwrap();
    assert_eq!(m.version, 3);
    assert_eq!(m.items[0].name, "m.onnx");
}

#[test]
fn a_tampered_or_foreign_manifest_is_refused() {
    let kp = keypair();
    let mut s = signed(&kp, BODY.as_bytes());
    let last = s.len() - 3;
    s[last] ^= 1;
    let e = verify_manifest(&s, kp.public_key().as_ref())
        .unwrap_err()
        .to_string();
    assert!(e.contains("signature"), "{e}");
    let other = keypair();
    let s = signed(&other, BODY.as_bytes());
    assert!(verify_manifest(&s, kp.public_key().as_ref()).is_err());
    assert!(verify_manifest(b"short", kp.public_key().as_ref()).is_err());
}

#[test]
fn item_names_cannot_escape_their_directory() {
    let kp = keypair();
    for bad in ["../x", ".hidden", "a/b", ""] {
        let body = BODY.replace("m.onnx", bad);
        let e = verify_manifest(&signed(&kp, body.as_bytes()), kp.public_key().as_ref())
            .unwrap_err()
            .to_string();
        assert!(e.contains("file name"), "{bad}: {e}");
    }
    let body = BODY.replace("models", "kernels");
    assert!(verify_manifest(&signed(&kp, body.as_bytes()), kp.public_key().as_ref()).is_err());
}

#[test]
fn a_download_that_would_fill_the_data_partition_does_not_start() {
    assert!(room_for("b", 100, 1000, 1000).is_ok());
    // Nothing left to fetch (cut off right before it was put in place): no refusal.
    assert!(room_for("b", 0, 0, 20_000).is_ok());
    // 1000 of 20000 stay free: 1100 is not room for 101.
    assert!(room_for("b", 100, 1100, 20_000).is_ok());
    let e = room_for("edgeos-2.bundle", 101, 1100, 20_000)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "the data partition has 1100 bytes free: `edgeos-2.bundle` needs 101 more, and 1000 stay free for the log"
    );
}

#[test]
fn a_box_fetches_the_delta_from_its_version_or_else_the_whole_bundle() {
    let item = |kind: &str, name: &str, version: Option<&str>, base: Option<&str>| Item {
        kind: kind.into(),
        name: name.into(),
        store: "object".into(),
        key: name.into(),
        sha256: "0".repeat(64),
        window: None,
        version: version.map(Into::into),
        base: base.map(Into::into),
        published_ms: None,
    };
    let items = [
        item("pods", "web.yaml", None, None),
        item("updates", "os-2.bundle", Some("2"), None),
        item("updates", "os-2-from-1.delta", Some("2"), Some("1")),
        item("updates", "os-2-from-1.5.delta", Some("2"), Some("1.5")),
    ];
    let names = |running: Option<&str>, other: Option<&str>| -> Vec<String> {
        for_this_box(&items, Holds { running, other })
            .iter()
            .map(|i| i.name.clone())
            .collect()
    };
    assert_eq!(names(Some("1"), None), ["web.yaml", "os-2-from-1.delta"]);
    assert_eq!(
        names(Some("1.5"), None),
        ["web.yaml", "os-2-from-1.5.delta"]
    );
    // No delta from its version: the whole bundle.
    assert_eq!(names(Some("0.9"), None), ["web.yaml", "os-2.bundle"]);
    // ...unless its other slot holds a version a delta is from (rolled back from it,
    // or the one it ran before); the running version's delta still comes first.
    assert_eq!(
        names(Some("0.9"), Some("1")),
        ["web.yaml", "os-2-from-1.delta"]
    );
    assert_eq!(
        names(Some("1.5"), Some("1")),
        ["web.yaml", "os-2-from-1.5.delta"]
    );
    assert_eq!(names(Some("0.9"), Some("0.8")), ["web.yaml", "os-2.bundle"]);
    // Already running it (blessed, the manifest still offering it): nothing.
    assert_eq!(names(Some("2"), Some("1")), ["web.yaml"]);
    // Not knowing what it runs: everything, init chooses.
    assert_eq!(names(None, Some("1")).len(), 4);
    // Only an update has a version or a base.
    let e = check_item(&item("pods", "x", Some("2"), None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("only an update has a version"), "{e}");
    let mut stamped = item("config", "x", None, None);
    stamped.published_ms = Some(1);
    assert!(check_item(&stamped).is_err());
}

#[test]
fn only_an_update_has_a_window_and_it_must_read_as_one() {
    let item = |kind: &str, window: &str| Item {
        kind: kind.into(),
        name: "x".into(),
        store: "object".into(),
        key: "x".into(),
        sha256: "0".repeat(64),
        window: Some(window.into()),
        version: None,
        base: None,
        published_ms: None,
    };
    assert!(check_item(&item("updates", "02:00-04:00")).is_ok());
    let e = check_item(&item("models", "02:00-04:00"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("only an update has a window"), "{e}");
    let e = check_item(&item("updates", "2am")).unwrap_err().to_string();
    assert!(e.contains("HH:MM-HH:MM"), "{e}");
    // Written beside the bundle for init, and gone when a manifest offers none.
    let tmp = tempfile::tempdir().unwrap();
    let mut it = item("updates", "02:00-04:00");
    write_window(tmp.path(), &it).unwrap();
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("x.window")).unwrap(),
        "02:00-04:00\n"
    );
    it.window = None;
    write_window(tmp.path(), &it).unwrap();
    assert!(!tmp.path().join("x.window").exists());
    write_window(tmp.path(), &it).unwrap();
}

#[test]
fn an_unreadable_applied_version_refuses_rather_than_starting_over() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        applied_version(dir.path()).unwrap(),
        0,
        "no manifest applied yet"
    );
    std::fs::write(version_file(dir.path()), "7\n").unwrap();
    assert_eq!(applied_version(dir.path()).unwrap(), 7);
    for bad in ["", "seven\n", "\0\0\0\0"] {
        std::fs::write(version_file(dir.path()), bad).unwrap();
        let e = applied_version(dir.path()).unwrap_err();
        assert!(matches!(e, crate::Error::NotAVersion(_)), "{bad:?}: {e}");
        assert!(e.to_string().contains(".manifest-version"), "{e}");
    }
    std::fs::remove_file(version_file(dir.path())).unwrap();
    std::fs::create_dir(version_file(dir.path())).unwrap();
    let e = applied_version(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("failed to read") && e.contains(".manifest-version"),
        "{e}"
    );
}
