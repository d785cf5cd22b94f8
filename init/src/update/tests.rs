use std::cmp::Ordering::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::floor::{admit, floor_with_counter, version_cmp};
use super::install::install;
use super::slots::{
    bundle_id, entry_slot, entry_version, next_bundle, slot_entries, slot_version, Installed,
    Target,
};
use super::state::{Attempt, Phase, State, ENDED_KEPT};
use super::trial::{judge, on_boot, BootRole};
use super::*;

#[test]
fn versions_compare_by_their_numbers() {
    assert_eq!(version_cmp("0.10.0", "0.9.1"), Greater);
    assert_eq!(version_cmp("0.2.0", "0.2.0"), Equal);
    assert_eq!(version_cmp("0.1.0", "0.2.0"), Less);
    assert_eq!(version_cmp("1.0", "1.0.1"), Less);
}

fn manifest(version: &str, sv: u64) -> edge_update::Manifest {
    edge_update::Manifest {
        format: 1,
        name: NAME.into(),
        version: version.into(),
        security_version: sv,
        kernel_release: "6.1".into(),
        roothash: "0".repeat(64),
        block_size: 4096,
        parts: vec![],
    }
}

#[test]
fn older_versions_other_products_and_low_security_versions_are_refused_naming_both() {
    let running = Running {
        version: "0.2.0".into(),
        slot: "a".into(),
        security_version: 1,
    };
    let admit = |m: &edge_update::Manifest, floor: u64| {
        admit(m, &running, floor).map_err(|e| e.to_string())
    };
    assert_eq!(admit(&manifest("0.3.0", 2), 2), Ok(true));
    assert_eq!(admit(&manifest("0.2.0", 2), 2), Ok(false));
    assert_eq!(
        admit(&manifest("0.1.0", 2), 1),
        Err("version 0.1.0 is older than the running 0.2.0".into())
    );
    assert_eq!(
        admit(&manifest("0.3.0", 1), 2),
        Err("its security version 1 is below the lowest this box accepts (2)".into())
    );
    let mut other = manifest("0.3.0", 2);
    other.name = "otheros".into();
    assert!(admit(&other, 1).unwrap_err().contains("\"otheros\""));
}

#[test]
fn entries_are_known_by_their_slot_whatever_their_counter() {
    assert_eq!(entry_slot("edgeos-0.1.0-a+3.efi").as_deref(), Some("a"));
    assert_eq!(entry_slot("edgeos-0.1.0-b+0-3.efi").as_deref(), Some("b"));
    assert_eq!(entry_slot("edgeos-0.2.0-rc1-b.efi").as_deref(), Some("b"));
    assert_eq!(entry_slot("edgeos-0.1.0-c.efi"), None);
    assert_eq!(entry_slot("other-0.1.0-a.efi"), None);
    assert_eq!(entry_slot(".edgeos-0.1.0-a.tmp"), None);
    assert_eq!(
        entry_version("edgeos-0.2.0-rc1-b+0-3.efi").as_deref(),
        Some("0.2.0-rc1")
    );
    assert_eq!(
        entry_version("edgeos-0.1.0-a+1.efi.held").as_deref(),
        Some("0.1.0")
    );
    assert_eq!(entry_version("edgeos--a.efi"), None);
}

#[test]
fn the_other_slot_holds_the_version_of_its_entry_and_none_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_eq!(slot_version(d, "b"), None);
    std::fs::write(d.join("edgeos-0.1.0-a.efi"), b"").unwrap();
    std::fs::write(d.join("edgeos-0.1.1-b+0-3.efi"), b"").unwrap();
    assert_eq!(slot_version(d, "b").as_deref(), Some("0.1.1"));
    assert_eq!(slot_version(d, "a").as_deref(), Some("0.1.0"));
    // Two versions in one slot: not known.
    std::fs::write(d.join("edgeos-0.1.2-b+1.efi.held"), b"").unwrap();
    assert_eq!(slot_version(d, "b"), None);
    // What init tells fabricd, and that it goes when the slot holds nothing known.
    let file = d.join("other-slot.json");
    super::slots::say_other_slot(&file, "b", Some("0.1.1"));
    let said: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(said, serde_json::json!({"slot": "b", "version": "0.1.1"}));
    super::slots::say_other_slot(&file, "b", None);
    assert!(!file.exists());
}

#[test]
fn the_floor_is_the_higher_of_the_state_and_the_tpm_and_the_tpm_catches_up() {
    // The TPM's counter started at 1 (base 0) and the state says 3 (blessed before the
    // counter was kept, or the count was cut off): the counter is raised to 3.
    assert_eq!(floor_with_counter(3, 0, 1), (3, Some(3)));
    // An old copy of the data partition says 1, the TPM 4: the box keeps 4.
    assert_eq!(floor_with_counter(1, 0, 4), (4, None));
    // A TPM whose first count started at 41 (base 40): 42 in it is floor 2.
    assert_eq!(floor_with_counter(2, 40, 42), (2, None));
    assert_eq!(floor_with_counter(5, 40, 42), (5, Some(45)));
    // A data partition made anew on such a TPM (base unknown, 0) only raises it.
    assert_eq!(floor_with_counter(0, 0, 42), (42, None));
}

fn attempt(phase: Phase) -> State {
    State {
        ended: Vec::new(),
        security_floor: 1,
        tpm_counter_base: None,
        update: Some(Attempt {
            phase,
            bundle: "edgeos-0.2.0.bundle".into(),
            bundle_id: "1:2:3".into(),
            version: "0.2.0".into(),
            security_version: 1,
            slot: "b".into(),
            from_version: "0.1.0".into(),
            from_slot: "a".into(),
            reason: None,
            window: None,
            time_ms: 0,
        }),
    }
}

#[test]
fn a_boot_of_the_new_slot_is_its_trial_and_a_boot_of_the_old_one_a_rollback() {
    let new = Running {
        version: "0.2.0".into(),
        slot: "b".into(),
        security_version: 1,
    };
    let old = Running {
        version: "0.1.0".into(),
        slot: "a".into(),
        security_version: 1,
    };
    let mut s = attempt(Phase::Installed);
    assert!(matches!(on_boot(&mut s, &new, 5), BootRole::Trial { .. }));
    assert_eq!(s.update.as_ref().unwrap().phase, Phase::Trying);

    let mut s = attempt(Phase::Trying);
    s.update.as_mut().unwrap().reason = Some("given up: noded".into());
    match on_boot(&mut s, &old, 5) {
        BootRole::RolledBack { reason, .. } => assert_eq!(reason, "given up: noded"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.update.as_ref().unwrap().phase, Phase::RolledBack);

    // A trial that never reached a verdict (a hang the watchdog reset, a power cut).
    let mut s = attempt(Phase::Installed);
    match on_boot(&mut s, &old, 5) {
        BootRole::RolledBack { reason, .. } => {
            assert!(
                reason.contains("slot b (0.2.0) did not come up"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    let mut s = attempt(Phase::Installing);
    assert!(matches!(
        on_boot(&mut s, &old, 5),
        BootRole::Interrupted { .. }
    ));
    let mut s = attempt(Phase::Blessed);
    assert_eq!(on_boot(&mut s, &new, 5), BootRole::Normal);

    // Installed for a later window, its entry held back: a boot before then (a power
    // cut) is the old slot's, and the update stays staged.
    let mut s = attempt(Phase::Installed);
    s.update.as_mut().unwrap().window = Some("02:00-04:00".into());
    assert_eq!(
        on_boot(&mut s, &old, 5),
        BootRole::Staged {
            version: "0.2.0".into(),
            slot: "b".into()
        }
    );
    assert_eq!(s.update.as_ref().unwrap().phase, Phase::Installed);
}

#[test]
fn a_bundle_whose_copy_has_ended_is_not_looked_at_again_and_a_new_copy_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgeos-0.2.0.bundle");
    std::fs::write(&path, b"x").unwrap();
    std::fs::write(dir.path().join(".edgeos-0.2.0.bundle.partial"), b"x").unwrap();
    let mut s = attempt(Phase::RolledBack);
    assert_eq!(
        next_bundle(dir.path(), &s).map(|(p, _)| p),
        Some(path.clone())
    );
    s.update.as_mut().unwrap().bundle_id = bundle_id(&path).unwrap();
    // An install cut off is looked at again.
    s.update.as_mut().unwrap().phase = Phase::Installing;
    assert!(next_bundle(dir.path(), &s).is_some());
    // Rolled back (every attempt that ends is marked so): not looked at again, also
    // once another attempt has taken the record.
    s.update.as_mut().unwrap().phase = Phase::RolledBack;
    s.end();
    assert_eq!(next_bundle(dir.path(), &s), None);
    s.update.as_mut().unwrap().bundle = "edgeos-0.3.0.bundle".into();
    assert_eq!(next_bundle(dir.path(), &s), None);
    for i in 0..40 {
        s.update.as_mut().unwrap().bundle_id = i.to_string();
        s.end();
    }
    assert_eq!(s.ended.len(), ENDED_KEPT);
    assert!(
        next_bundle(dir.path(), &s).is_some(),
        "the oldest are forgotten"
    );
}

/// A signed bundle of `version` in `dir` (root: three blocks), opened.
fn bundle(dir: &Path, version: &str) -> (PathBuf, edge_update::Bundle) {
    let root = (0..3 * 4096).map(|i| (i % 253) as u8).collect();
    bundle_with(dir, &new_key(), version, root)
}

fn new_key() -> ring::signature::Ed25519KeyPair {
    use ring::signature::Ed25519KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

/// A bundle of `version` with `root`, signed by `key`, opened; its other parts say
/// their name and version.
fn bundle_with(
    dir: &Path,
    key: &ring::signature::Ed25519KeyPair,
    version: &str,
    root: Vec<u8>,
) -> (PathBuf, edge_update::Bundle) {
    use ring::signature::KeyPair;
    std::fs::create_dir_all(dir).unwrap();
    let mut root = Some(root);
    let mut files = Vec::new();
    for name in edge_update::PARTS {
        if name == "root.blockhash" {
            continue;
        }
        let data: Vec<u8> = match name {
            "root.erofs" => root.take().unwrap_or_default(),
            other => format!("{other} of {version}").into_bytes(),
        };
        let path = dir.join(name);
        std::fs::write(&path, data).unwrap();
        files.push((name, path));
    }
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let out = dir.join(format!("edgeos-{version}.bundle"));
    edge_update::write(
        &out,
        &edge_update::Identity {
            name: NAME,
            version,
            security_version: 2,
            kernel_release: "6.1",
            roothash: &"ab".repeat(32),
        },
        &edge_update::Sources { files: &files },
        |m| key.sign(m).as_ref().to_vec(),
    )
    .unwrap();
    let b = edge_update::open(&out, key.public_key().as_ref()).unwrap();
    (out, b)
}

/// Slot b as files in `d` (a root partition of `root_blocks` blocks and a verity one
/// of one, both 0xee), an ESP holding `entries`, and the install of a 0.2.0 bundle
/// (its root three blocks) into them. Returns what the install said, the root
/// partition, the verity one and the entries' directory.
fn install_into(
    d: &Path,
    root_blocks: usize,
    entries: &[&str],
    hold: bool,
) -> (crate::error::Result<Installed>, PathBuf, PathBuf, PathBuf) {
    let (path, b) = bundle(d, "0.2.0");
    let dir = d.join("EFI/Linux");
    std::fs::create_dir_all(&dir).unwrap();
    for e in entries {
        std::fs::write(dir.join(e), e).unwrap();
    }
    let (root, verity) = (d.join("root-b"), d.join("root-b-verity"));
    std::fs::write(&root, vec![0xee; root_blocks * 4096]).unwrap();
    std::fs::write(&verity, vec![0xee; 4096]).unwrap();
    let target = Target {
        root: &root,
        verity: &verity,
        entries: &dir,
        tries: 1,
        hold,
    };
    let copy = |n: &str, w: &mut dyn std::io::Write| -> crate::error::Result<()> {
        b.copy_part(&path, n, w)?;
        Ok(())
    };
    let done = install(&b.manifest, &copy, "b", &target);
    (done, root, verity, dir)
}

#[test]
fn an_install_replaces_only_the_inactive_slot_and_ends_with_its_counted_entry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let standing = [
        "edgeos-0.1.0-a.efi",
        "edgeos-0.1.0-b+0.efi",
        "edgeos-0.0.9-b+0-3.efi",
    ];
    let (done, root, verity, entries) = install_into(d, 5, &standing, false);
    assert_eq!(done.unwrap().entry, "edgeos-0.2.0-b+1.efi");
    let mut left: Vec<String> = std::fs::read_dir(&entries)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["edgeos-0.1.0-a.efi", "edgeos-0.2.0-b+1.efi"]);
    assert_eq!(
        std::fs::read(entries.join("edgeos-0.2.0-b+1.efi")).unwrap(),
        b"uki-b.efi of 0.2.0"
    );
    // The root is at the start of its partition; the rest of it is as it was.
    let written = std::fs::read(&root).unwrap();
    assert_eq!(
        &written[..3 * 4096],
        &std::fs::read(d.join("root.erofs")).unwrap()[..]
    );
    assert!(written[3 * 4096..].iter().all(|&x| x == 0xee));
    assert!(std::fs::read(&verity)
        .unwrap()
        .starts_with(b"root.verity of 0.2.0"));
}

#[test]
fn an_install_for_a_later_window_holds_its_entry_back_where_the_loader_does_not_look() {
    let dir = tempfile::tempdir().unwrap();
    // A held entry of an earlier staged update of the slot goes like any other.
    let standing = ["edgeos-0.1.0-a.efi", "edgeos-0.1.5-b+1.efi.held"];
    let (done, _, _, entries) = install_into(dir.path(), 5, &standing, true);
    assert_eq!(done.unwrap().entry, "edgeos-0.2.0-b+1.efi.held");
    let mut left: Vec<String> = std::fs::read_dir(&entries)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["edgeos-0.1.0-a.efi", "edgeos-0.2.0-b+1.efi.held"]);
    // Not an entry systemd-boot boots (type #2 entries end in .efi), but the slot's.
    assert_eq!(entry_slot("edgeos-0.2.0-b+1.efi.held"), None);
    assert_eq!(slot_entries(&entries, "b"), ["edgeos-0.2.0-b+1.efi.held"]);
}

#[test]
fn a_slot_too_small_is_refused_before_anything_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let (done, root, _, entries) = install_into(dir.path(), 2, &["edgeos-0.1.0-b+0.efi"], false);
    let e = done.unwrap_err().to_string();
    assert!(
        e.contains("its root.erofs is 12288 bytes and slot b's partition")
            && e.contains("holds 8192"),
        "{e}"
    );
    assert!(entries.join("edgeos-0.1.0-b+0.efi").exists());
    assert!(std::fs::read(&root).unwrap().iter().all(|&x| x == 0xee));
}

#[test]
fn the_trial_passes_when_ready_and_healthy_and_fails_when_given_up_or_late() {
    let t = Instant::now();
    let limit = Duration::from_secs(120);
    let h = |ready: bool, given_up: &[&str], unhealthy: &[&str]| Health {
        ready,
        given_up: given_up.iter().map(|s| s.to_string()).collect(),
        unhealthy: unhealthy.iter().map(|s| s.to_string()).collect(),
    };
    // The verdict's reason, in the words the state keeps.
    let judge = |h: &Health, t: Instant, limit: Duration| {
        judge(h, t, limit).map(|r| r.map_err(|e| e.to_string()))
    };
    assert_eq!(judge(&h(true, &[], &[]), t, limit), Some(Ok(())));
    assert_eq!(judge(&h(false, &[], &[]), t, limit), None);
    // Ready but a service has not said it is healthy yet: wait, then fail naming it.
    let waiting = h(true, &[], &["noded (static pods running)"]);
    assert_eq!(judge(&waiting, t, limit), None);
    assert_eq!(
        judge(&waiting, t, Duration::ZERO),
        Some(Err(
            "not healthy within 0 s: noded (static pods running)".into()
        ))
    );
    assert_eq!(
        judge(&h(false, &["noded"], &[]), t, limit),
        Some(Err("given up: noded".into()))
    );
    assert_eq!(
        judge(&h(false, &[], &[]), t, Duration::ZERO),
        Some(Err("not every service was ready within 0 s".into()))
    );
}

/// A bundle of `version` signed by `key`, its root 6 blocks of which block 2 carries
/// the version (the rest the same in every version).
fn bundle_signed(
    dir: &Path,
    key: &ring::signature::Ed25519KeyPair,
    version: &str,
) -> (PathBuf, edge_update::Bundle) {
    let root = (0..6)
        .flat_map(|b| {
            let salt = if b == 2 { version } else { "same" };
            format!("root block {b} of {salt};")
                .into_bytes()
                .into_iter()
                .cycle()
                .take(4096)
        })
        .collect();
    bundle_with(dir, key, version, root)
}

#[test]
fn a_delta_from_the_version_the_other_slot_holds_is_staged_before_that_slot_is_written() {
    use super::install::Rebuild;
    use ring::signature::KeyPair;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = new_key();
    // Slot b holds 0.2.0 (rolled back from, say); 0.2.1 comes as a delta from it.
    let (base_path, base) = bundle_signed(&d.join("base"), &key, "0.2.0");
    let (target_path, target) = bundle_signed(&d.join("target"), &key, "0.2.1");
    let delta_path = d.join("edgeos-0.2.1-from-0.2.0.delta");
    edge_update::delta::write((&base, &base_path), (&target, &target_path), &delta_path).unwrap();
    let delta = edge_update::delta::open(&delta_path, key.public_key().as_ref()).unwrap();
    let (root, verity) = (d.join("root-b"), d.join("root-b-verity"));
    let part = |b: &edge_update::Bundle, p: &Path, name: &str| {
        let mut out = Vec::new();
        b.copy_part(p, name, &mut out).unwrap();
        out
    };
    let mut slot_root = part(&base, &base_path, "root.erofs");
    slot_root.resize(10 * 4096, 0xee);
    std::fs::write(&root, &slot_root).unwrap();
    std::fs::write(&verity, part(&base, &base_path, "root.verity")).unwrap();
    let seeds = || {
        let mut s = edge_update::delta::Seeds::default();
        let index = s.add_file(&root, delta.info.base_root_bytes).unwrap();
        s.add_bytes(index);
        s.add_file(&verity, delta.info.base_verity_bytes).unwrap();
        s.add_bytes(part(&base, &base_path, "uki-b.efi"));
        s
    };
    let staged = d.join("staged");
    let rebuild = Rebuild::new(&delta, seeds(), "b", Some(&staged)).unwrap();
    // Rebuilt whole on the data partition before the slot is touched: the install reads
    // nothing from the slot it writes.
    for name in ["uki-b.efi", "root.verity", "root.erofs"] {
        assert_eq!(
            std::fs::read(staged.join(name)).unwrap(),
            part(&target, &target_path, name),
            "{name}"
        );
    }
    std::fs::write(&root, vec![0u8; 10 * 4096]).unwrap();
    let entries = d.join("EFI/Linux");
    std::fs::create_dir_all(&entries).unwrap();
    std::fs::write(entries.join("edgeos-0.2.0-b+0-2.efi"), b"old").unwrap();
    let target_slot = Target {
        root: &root,
        verity: &verity,
        entries: &entries,
        tries: 1,
        hold: false,
    };
    let copy = |n: &str, w: &mut dyn std::io::Write| rebuild.copy(n, w);
    let done = install(&delta.manifest, &copy, "b", &target_slot).unwrap();
    assert_eq!(done.entry, "edgeos-0.2.1-b+1.efi");
    // The slot it was rebuilt from now holds the target, byte for byte.
    let want = part(&target, &target_path, "root.erofs");
    assert_eq!(&std::fs::read(&root).unwrap()[..want.len()], &want[..]);
    assert_eq!(
        std::fs::read(entries.join(&done.entry)).unwrap(),
        part(&target, &target_path, "uki-b.efi")
    );
    // A staged part changed on disk is caught as it is copied.
    std::fs::write(staged.join("root.verity"), b"changed").unwrap();
    let e = rebuild
        .copy("root.verity", &mut std::io::sink())
        .unwrap_err()
        .to_string();
    assert!(e.contains("root.verity"), "{e}");
}
