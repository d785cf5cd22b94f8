//! Over-the-air updates from the core, in the booted image: the operator publishes the
//! bundle of a newer build of the same tree (`cargo xtask test` builds it as version
//! 0.1.0.1 and passes it in `EDGEOS_UPDATE_BUNDLE`) to a real nats-server on the host,
//! as a delta from the version the box runs (only the blocks it lacks) beside the whole
//! bundle; the box's fabricd downloads the delta alone, init checks it, rebuilds and writes the inactive slot, reboots
//! into it, and blesses it once every service is ready; the core sees each step in the
//! box's status reports (`edgectl update status`). Before that, bundles the box must
//! refuse reach it through the same downlink: one whose signature does not verify, one
//! with a changed block of the root; after it (0.1.0.1 carries security version 2, which
//! the blessing raises the floor to, in the TPM's counter too), an older version of
//! security version 1. Each is refused with
//! its reason, reported to the core, and the slots are untouched. The trial is blessed
//! only once noded said its static pods run and fabricd that it reached the core. Last,
//! a bad version (0.1.0.2, built with a service that never starts), published whole to
//! `--sites all`: cancelled mid-download (nothing installed), published again with a
//! window hours away and the link cut mid-download (the download resumes: at most 5 %
//! is fetched twice), written and staged for the window (its entry held back: a power
//! cut brings the box back on 0.1.0.1, still staged), which the operator lifts by
//! publishing it again without one; tried once, given up, and the box is back on
//! 0.1.0.1 by itself, saying why, and does not try it again until the operator
//! publishes it anew (the same bytes, not downloaded again): then it is tried, and rolled
//! back from, again. Then its fix (0.1.0.3), published as a delta from 0.1.0.2 alone,
//! which only the box's other slot holds: the box fetches the delta, rebuilds the new
//! slot from that slot's own blocks (staged on the data partition first, since it is the
//! slot written) and blesses 0.1.0.3.
//!
//! The box gets a site certificate by hand (provisioned PEM, no TPM enrollment: that is
//! the fabric scenario's).

use anyhow::{bail, Context, Result};
use qemu_tests::core::{operator_key, run, toml_string, Operator};
use qemu_tests::{all_ready, Machine, Options};
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn bundle_from_env() -> Result<(PathBuf, PathBuf)> {
    let bundle = std::env::var_os("EDGEOS_UPDATE_BUNDLE")
        .context("EDGEOS_UPDATE_BUNDLE is not set: run the system tests with `cargo xtask test`, which builds the update bundle")?;
    let public = std::env::var_os("EDGEOS_UPDATE_PUB").context("EDGEOS_UPDATE_PUB is not set")?;
    Ok((bundle.into(), public.into()))
}

/// Where each entry of a ustar archive starts: (name, data offset, size).
fn entries(bytes: &[u8]) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= bytes.len() && bytes[at] != 0 {
        let h = &bytes[at..at + 512];
        let name = String::from_utf8_lossy(&h[..100])
            .trim_end_matches('\0')
            .to_owned();
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&h[124..136]).trim_matches(|c: char| c == '\0' || c == ' '),
            8,
        )
        .unwrap_or(0);
        out.push((name, at + 512, size));
        at += 512 + size.div_ceil(512) * 512;
    }
    out
}

/// Puts `file` into the object store as `name` and makes it the site's `updates` item in
/// a signed manifest of `version`: the downlink's own path, for bundles `edgectl update
/// publish` would rightly refuse to send.
fn offer_raw(op: &Operator, key: &Path, version: u64, name: &str, file: &Path) -> Result<()> {
    run(op.cmd().args(["put-object", "--name", name]).arg(file))?;
    let sha = hex(&sha2::Sha256::digest(std::fs::read(file)?));
    op.publish(
        key,
        &serde_json::json!({"version": version, "items": [
            {"kind": "updates", "name": name, "store": "object", "key": name, "sha256": sha}
        ]}),
    )
}

/// Cuts the power and boots the same disk again, up to stage 2 of `version` in `slot`.
fn power_cut_to(m: &mut Machine, version: &str, slot: &str) -> Result<()> {
    m.power_cut();
    m.reboot_same_disk()?;
    m.wait_for_console(
        &format!("edgeos: stage 2: version {version} slot {slot}"),
        qemu_tests::machine::BOOT_TIMEOUT,
    )?;
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `edgectl update status`'s line for the box, once it contains `want`.
fn wait_core_sees(op: &Operator, want: &str, timeout: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        let out = run(op.cmd().args(["update", "status"]))?;
        if let Some(line) = out.lines().find(|l| l.starts_with("site0.edge0")) {
            if line.contains(want) {
                return Ok(line.to_owned());
            }
            if start.elapsed() > timeout {
                bail!("the core's view of the box after {timeout:?}: {line:?}, not {want:?}");
            }
        } else if start.elapsed() > timeout {
            bail!("the core has no status of site0.edge0 after {timeout:?}: {out}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The box's latest status report as the core holds it (`edgectl update status --json`).
fn box_report(op: &Operator) -> Result<serde_json::Value> {
    let out = run(op.cmd().args(["update", "status", "--json"]))?;
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).with_context(|| l.to_owned())?;
        if v["box"] == "site0.edge0" {
            return Ok(v["report"].clone());
        }
    }
    bail!("the core has no status of site0.edge0: {out}")
}

/// The box's report once `done` holds of it.
fn wait_report(
    op: &Operator,
    what: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        let r = box_report(op)?;
        if done(&r) {
            return Ok(r);
        }
        if start.elapsed() > timeout {
            bail!("{what}: not seen at the core within {timeout:?}; the box reports {r}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The downlink's counters in a report: bytes fetched, bytes a resume did not fetch.
fn fetched(r: &serde_json::Value) -> (u64, u64) {
    let d = &r["downlink"];
    (
        d["fetched_bytes"].as_u64().unwrap_or(0),
        d["resumed_bytes"].as_u64().unwrap_or(0),
    )
}

/// The box's update record, from init's status on the control port.
fn update_state(m: &mut Machine) -> Result<serde_json::Value> {
    Ok(m.status()?.get("update").cloned().unwrap_or_default())
}

#[test]
fn an_update_from_the_core_is_blessed_a_bad_one_rolled_back_and_bad_bundles_refused() -> Result<()>
{
    let (bundle, update_pub) = bundle_from_env()?;
    // `cargo xtask bench update` sets this: the scenario runs without its refusals and
    // power cuts, and writes its timings there.
    let figures = std::env::var_os("EDGEOS_UPDATE_FIGURES").map(PathBuf::from);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (_core, link, op) = qemu_tests::core::start(dir)?;
    let key = operator_key()?;

    let p = "/var/lib/edge/provision";
    // Downloads paced as on a site's link (not for the bench's timings): a download
    // lasts long enough to be cut and cancelled.
    let pace = match figures {
        None => "downlink_max_kib_per_sec = 8192\n",
        Some(_) => "",
    };
    let core_toml = format!(
        "{pace}[core]\nservers = [\"tls://10.0.2.100:4222\"]\nca = \"{p}/ca.pem\"\n\
         cert = \"{p}/site.pem\"\nkey = \"{p}/site.key\"\nbackoff_max_ms = 2000\n\
         status_interval_secs = 2\n"
    );
    let mut provision = toml_string("fabricd-core.toml", &core_toml);
    for f in ["ca.pem", "site.pem", "site.key"] {
        provision.push_str(&toml_string(f, &std::fs::read_to_string(dir.join(f))?));
    }
    let provision_path = dir.join("provision.toml");
    std::fs::write(&provision_path, provision)?;

    let mut opts = Options::new(&qemu_tests::image_from_env()?);
    opts.guestfwd.push(format!(
        "tcp:10.0.2.100:4222-cmd:socat - TCP:127.0.0.1:{}",
        link.port
    ));
    opts.fw_cfg
        .push(("opt/org.edgeos/provision".into(), provision_path.clone()));
    let mut m = Machine::with_options("update", opts)?;
    m.boot()?;
    let ready = m.wait_ready()?;
    m.wait_status(Duration::from_secs(60), "all services ready", all_ready)?;
    let line = wait_core_sees(&op, "no update", Duration::from_secs(120))?;
    assert!(
        line.contains(&format!("running {} (slot {})", ready.version, ready.slot)),
        "{line}"
    );

    let bytes = std::fs::read(&bundle)?;
    let parts = entries(&bytes);
    let find = |n: &str| parts.iter().find(|e| e.0 == n).cloned();
    let (_, sig_at, _) = find("manifest.sig").context("the bundle has no manifest.sig")?;
    let (_, root_at, _) = find("root.erofs").context("the bundle has no root.erofs")?;

    if figures.is_none() {
        // A signature that does not verify: refused from its manifest, before anything else
        // of it is read.
        let mut forged = bytes[..sig_at + 512].to_vec();
        forged[sig_at] ^= 1;
        let forged_path = dir.join("forged.bundle");
        std::fs::write(&forged_path, &forged)?;
        offer_raw(&op, &key, 1, "edgeos-forged.bundle", &forged_path)?;
        let line = m.wait_for_console(
            "update: refused edgeos-forged.bundle",
            Duration::from_secs(180),
        )?;
        assert!(
            line.contains("not signed by the trusted update key"),
            "{line}"
        );
        wait_core_sees(
            &op,
            "refused edgeos-forged.bundle: ",
            Duration::from_secs(60),
        )?;

        // A changed byte in the root's first block: the signature holds, the block index
        // does not. Refused before the slot is written (the bundle is cut after that block).
        let mut tampered = bytes[..root_at + 4096].to_vec();
        tampered[root_at + 100] ^= 0xff;
        let tampered_path = dir.join("tampered.bundle");
        std::fs::write(&tampered_path, &tampered)?;
        offer_raw(&op, &key, 2, "edgeos-tampered.bundle", &tampered_path)?;
        let line = m.wait_for_console(
            "update: refused edgeos-tampered.bundle",
            Duration::from_secs(300),
        )?;
        assert!(
            line.contains("root.erofs: block 0 does not match the block index"),
            "{line}"
        );
        let st = update_state(&mut m)?;
        assert_eq!(st["update"]["phase"], "refused", "{st}");
        assert!(
            !std::fs::read_to_string(m.console_log())?.contains("update: writing"),
            "a refused bundle reached the slot"
        );
    }

    // The real thing, as an operator publishes it: a delta from the version the box
    // runs (the image's own bundle), made beside a copy of the bundle.
    let base =
        qemu_tests::image_from_env()?.with_file_name(format!("edgeos-{}.bundle", ready.version));
    let copy = dir.join(bundle.file_name().context("the bundle has no file name")?);
    std::fs::copy(&bundle, &copy)?;
    let fetched_before = fetched(&box_report(&op)?).0;
    let t = Instant::now();
    let out = run(op
        .cmd()
        .args(["update", "publish", "--site", "site0", "--signing-key"])
        .arg(&key)
        .arg("--update-key")
        .arg(&update_pub)
        .arg("--delta-from")
        .arg(&base)
        .arg(&copy))?;
    eprintln!("{}", out.trim_end());
    let delta = dir.join(format!("edgeos-0.1.0.1-from-{}.delta", ready.version));
    let (delta_bytes, bundle_bytes) = (
        std::fs::metadata(&delta)?.len(),
        std::fs::metadata(&bundle)?.len(),
    );
    assert!(
        delta_bytes * 10 <= bundle_bytes,
        "the delta is {delta_bytes} bytes of the bundle's {bundle_bytes}"
    );
    // The whole bundle is put beside the delta (for boxes on other versions); this box,
    // on the delta's base, fetches the delta alone.
    assert!(
        out.contains("put as object edgeos-0.1.0.1.bundle")
            && out.contains(&format!(
                "put as object edgeos-0.1.0.1-from-{}.delta",
                ready.version
            )),
        "{out}"
    );
    let r = wait_report(&op, "the delta downloaded", Duration::from_secs(300), |r| {
        r["downlink"]["downloading"].is_null() && fetched(r).0 >= fetched_before + delta_bytes
    })?;
    let got = fetched(&r).0 - fetched_before;
    assert!(
        got < bundle_bytes / 10,
        "the box fetched {got} bytes for a delta of {delta_bytes}: the whole bundle ({bundle_bytes}) too"
    );
    let version = if figures.is_none() { 3 } else { 1 };
    assert!(
        out.contains(&format!(
            "site0.manifest: manifest version {version} offers edgeos 0.1.0.1"
        )),
        "{out}"
    );
    if figures.is_none() {
        // The power goes while the slot is being written: the box comes back on the slot
        // it ran (the other's entries went first), says the install was cut off, and
        // starts it again from the bundle it already holds.
        m.wait_for_console(
            "update: writing 0.1.0.1 into slot b",
            Duration::from_secs(600),
        )?;
        std::thread::sleep(Duration::from_millis(1500));
        power_cut_to(&mut m, &ready.version, &ready.slot)?;
        m.wait_for_console(
            "update: the install of 0.1.0.1 was cut off; it starts again",
            Duration::from_secs(60),
        )?;
    }
    let line = m.wait_for_console(
        "update: 0.1.0.1 installed in slot b",
        Duration::from_secs(600),
    )?;
    eprintln!(
        "installed {:?} after publishing: {}",
        t.elapsed(),
        line.trim_end()
    );
    if figures.is_none() {
        // And again right after the switch, before the box reboots by itself: the next
        // power-on boots the new slot's trial all the same.
        m.power_cut();
        m.reboot_same_disk()?;
    }
    m.wait_for_console(
        "edgeos: stage 2: version 0.1.0.1 slot b",
        qemu_tests::machine::BOOT_TIMEOUT,
    )?;
    let line = m.wait_for_console(
        "update: 0.1.0.1 in slot b blessed",
        Duration::from_secs(300),
    )?;
    // 0.1.0.1 carries security version 2 (xtask/src/test.rs): the floor rises to it, in
    // the TPM's counter too (its first count on this fresh swtpm was 1).
    assert!(
        line.contains("security floor 2, the TPM's security counter at 2"),
        "{line}"
    );
    // The release left in slot a (0.1.0, security version 1) is now below the floor:
    // its entry is marked bad, so boot counting never goes back to it.
    m.wait_for_console(
        "update: slot a's edgeos-0.1.0-a.efi has security version 1, below the floor 2: marked bad",
        Duration::from_secs(60),
    )?;
    let line = wait_core_sees(&op, "blessed 0.1.0.1", Duration::from_secs(120))?;
    assert!(line.contains("running 0.1.0.1 (slot b)"), "{line}");
    // Blessed only once the static pods ran and fabricd had reached the core.
    let console = std::fs::read_to_string(m.console_log())?;
    let trial = console
        .rfind("edgeos: stage 2: version 0.1.0.1 slot b")
        .context("no trial boot on the console")?;
    let trial = &console[trial..];
    let at = |what: &str| {
        trial
            .find(what)
            .with_context(|| format!("{what:?} not on the console after the trial's stage 2"))
    };
    let blessed = at("update: 0.1.0.1 in slot b blessed")?;
    for healthy in [
        "service noded: healthy (static pods running)",
        "service fabricd: healthy (the core reached)",
    ] {
        assert!(
            at(healthy)? < blessed,
            "{healthy:?} came after the blessing"
        );
    }
    let to_blessed = t.elapsed();
    eprintln!("publish to blessed at the core: {to_blessed:?}");
    let st = m.status()?;
    assert_eq!(st["version"], "0.1.0.1", "{st}");
    assert_eq!(st["update"]["update"]["from_version"], "0.1.0", "{st}");

    if figures.is_none() {
        // An older version (the image the box came with), of an older security version
        // (1, below the floor of 2 the blessed 0.1.0.1 raised): refused from its
        // manifest, for its security version (the check that comes first).
        let older = ready.version.clone();
        let older_bundle =
            qemu_tests::image_from_env()?.with_file_name(format!("edgeos-{older}.bundle"));
        let older_bytes = std::fs::read(&older_bundle)
            .with_context(|| format!("failed to read {}", older_bundle.display()))?;
        let (_, older_root, _) = entries(&older_bytes)
            .into_iter()
            .find(|e| e.0 == "root.erofs")
            .context("no root.erofs")?;
        let head = dir.join("older.bundle");
        std::fs::write(&head, &older_bytes[..older_root])?;
        offer_raw(&op, &key, 4, &format!("edgeos-{older}.bundle"), &head)?;
        let line = wait_core_sees(
            &op,
            &format!("refused edgeos-{older}.bundle"),
            Duration::from_secs(180),
        )?;
        assert!(
            line.contains("its security version 1 is below the lowest this box accepts (2)"),
            "{line}"
        );
        assert!(line.contains("running 0.1.0.1 (slot b)"), "{line}");
    }

    // A bad version (`canary`, one of its services, can never start): the box writes it
    // into slot a, tries it, finds the service given up and reboots; boot counting
    // brings back 0.1.0.1 in slot b, which says why and tells the core. Not retried.
    let bad = PathBuf::from(
        std::env::var_os("EDGEOS_BAD_UPDATE_BUNDLE")
            .context("EDGEOS_BAD_UPDATE_BUNDLE is not set")?,
    );
    let bad_name = "edgeos-0.1.0.2.bundle";
    let bad_bytes = std::fs::metadata(&bad)?.len();
    let publish_bad = |window: Option<&str>| {
        let mut cmd = op.cmd();
        cmd.args(["update", "publish", "--sites", "all", "--signing-key"])
            .arg(&key)
            .arg("--update-key")
            .arg(&update_pub);
        if let Some(w) = window {
            cmd.args(["--window", w]);
        }
        run(cmd.arg(&bad))
    };
    // The download under way, once `share` of it is on the box.
    let downloading = |share: f64| {
        wait_report(
            &op,
            &format!("{bad_name} downloading"),
            Duration::from_secs(120),
            |r| {
                let d = &r["downlink"]["downloading"];
                d["name"] == bad_name
                    && d["bytes"].as_u64().unwrap_or(0) as f64 >= share * bad_bytes as f64
            },
        )
    };
    if figures.is_none() {
        // Cancelled mid-download: the box stops, drops what it had, installs nothing.
        publish_bad(None)?;
        downloading(0.1)?;
        let out = run(op
            .cmd()
            .args(["update", "cancel", "--sites", "all", "--signing-key"])
            .arg(&key))?;
        assert!(
            out.contains(&format!(
                "site0.manifest: manifest version 6 withdraws {bad_name}"
            )),
            "{out}"
        );
        wait_report(&op, "the download stopped", Duration::from_secs(60), |r| {
            r["downlink"]["downloading"].is_null()
        })?;
        let line = wait_core_sees(&op, "running 0.1.0.1 (slot b)", Duration::from_secs(60))?;
        assert!(!line.contains("downloading"), "{line}");
    }
    // Published again, from nothing (the cancel dropped the partial download), with a
    // window that opens in three hours; the link is cut in the middle of the download,
    // which resumes where it was. The box writes the slot and waits for the window.
    let before = fetched(&box_report(&op)?);
    let t = Instant::now();
    let window = {
        let minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            / 60;
        let hhmm = |m: u64| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
        format!("{}-{}", hhmm(minute + 180), hhmm(minute + 240))
    };
    publish_bad(figures.is_none().then_some(window.as_str()))?;
    if figures.is_none() {
        let r = downloading(0.2)?;
        eprintln!("cutting the link at {}", r["downlink"]["downloading"]);
        link.set_cut(true);
        std::thread::sleep(Duration::from_secs(6));
        link.set_cut(false);
        let r = wait_report(
            &op,
            "the download finished",
            Duration::from_secs(300),
            |r| r["downlink"]["downloading"].is_null() && fetched(r).0 >= before.0 + bad_bytes,
        )?;
        let after = fetched(&r);
        let (total, resumed) = (after.0 - before.0, after.1 - before.1);
        eprintln!("fetched {total} bytes for the {bad_bytes}-byte bundle across the cut ({resumed} not fetched again)");
        assert!(
            resumed > 0,
            "the download did not resume after the cut: {r}"
        );
        assert!(
            total as f64 <= 1.05 * bad_bytes as f64,
            "fetched {total} bytes for a {bad_bytes}-byte bundle"
        );
        let line = m.wait_for_console(
            "update: 0.1.0.2 installed in slot a",
            Duration::from_secs(600),
        )?;
        assert!(
            line.contains(&format!("it is tried in its window {window} UTC"))
                && line.contains("held back"),
            "{line}"
        );
        wait_core_sees(
            &op,
            &format!("staged 0.1.0.2 in slot a for its window {window} UTC"),
            Duration::from_secs(60),
        )?;
        // The power goes while it waits: the entry is held back, so the box comes back
        // on the slot it ran, and the update stays staged for its window.
        power_cut_to(&mut m, "0.1.0.1", "b")?;
        let line = m.wait_for_console(
            "update: 0.1.0.2 is staged in slot a",
            Duration::from_secs(60),
        )?;
        assert!(
            line.contains(&format!("for its window {window} UTC")),
            "{line}"
        );
        // fabricd of this boot reporting: its counters started again (the last process
        // had fetched the whole bundle).
        wait_report(
            &op,
            "fabricd after the power cut",
            Duration::from_secs(180),
            |r| fetched(r).0 < before.0 + bad_bytes / 2,
        )?;
        // The operator lifts the window (the same bundle, published without one): the
        // box switches at once, without downloading it again.
        let out = publish_bad(None)?;
        assert!(out.contains("offers edgeos 0.1.0.2"), "{out}");
        m.wait_for_console(
            "update: the core lifted its window: rebooting to try 0.1.0.2 in slot a",
            Duration::from_secs(120),
        )?;
        let r = box_report(&op)?;
        assert!(
            fetched(&r).0 < bad_bytes / 20,
            "the bundle was fetched again: {r}"
        );
    }
    if figures.is_some() {
        m.wait_for_console(
            "update: 0.1.0.2 installed in slot a",
            Duration::from_secs(600),
        )?;
    }
    m.wait_for_console(
        "edgeos: stage 2: version 0.1.0.2 slot a",
        qemu_tests::machine::BOOT_TIMEOUT,
    )?;
    let trial_booted = Instant::now();
    let line = m.wait_for_console(
        "update: 0.1.0.2 in slot a failed its trial",
        Duration::from_secs(300),
    )?;
    assert!(
        line.contains("given up: canary") && line.contains("rebooting to go back to slot b"),
        "{line}"
    );
    let line = m.wait_for_console(
        "update: rolled back from 0.1.0.2 to 0.1.0.1 in slot b",
        qemu_tests::machine::BOOT_TIMEOUT,
    )?;
    assert!(
        line.contains("the trial failed: given up: canary"),
        "{line}"
    );
    eprintln!("publish to rolled back on the box: {:?}", t.elapsed());
    let line = wait_core_sees(&op, "rolled back from 0.1.0.2", Duration::from_secs(120))?;
    assert!(
        line.contains("running 0.1.0.1 (slot b)") && line.contains("given up: canary"),
        "{line}"
    );
    let (to_rolled_back, after_trial) = (t.elapsed(), trial_booted.elapsed());
    eprintln!("publish to rolled back at the core: {to_rolled_back:?} ({after_trial:?} after the trial's stage 2)");
    if let Some(path) = &figures {
        std::fs::write(
            path,
            serde_json::json!({
                "bundle_bytes": bundle_bytes,
                "delta_bytes": delta_bytes,
                "publish_to_blessed_s": to_blessed.as_secs_f64(),
                "rollback_s": to_rolled_back.as_secs_f64(),
                "rollback_after_trial_boot_s": after_trial.as_secs_f64(),
            })
            .to_string(),
        )?;
    }
    let ready = m.wait_ready()?;
    assert_eq!(
        (ready.version.as_str(), ready.slot.as_str()),
        ("0.1.0.1", "b")
    );
    // The box looks for bundles every 10 s once ready: the rolled-back one is not
    // checked again.
    std::thread::sleep(Duration::from_secs(25));
    let console = std::fs::read_to_string(m.console_log())?;
    for line in console.lines().filter(|l| l.contains("edgeos: update:")) {
        eprintln!("console: {}", line.trim_end());
    }
    assert_eq!(
        console
            .matches("update: checking edgeos-0.1.0.2.bundle")
            .count(),
        1,
        "the rolled-back version was looked at again"
    );
    if figures.is_none() {
        // Until the operator publishes it anew (the same bytes): then the box looks at
        // it again, without downloading it again. (The scenario ends there; the trial
        // it would lead to is the one above.)
        let fetched_then = fetched(&box_report(&op)?).0;
        publish_bad(None)?;
        m.wait_for_console(
            "update: checking edgeos-0.1.0.2.bundle",
            Duration::from_secs(120),
        )?;
        let r = box_report(&op)?;
        assert!(
            fetched(&r).0 < fetched_then + bad_bytes / 20,
            "the bundle was fetched again: {r}"
        );
        // It is tried again, and fails again: the box is back on 0.1.0.1 in slot b, and
        // slot a holds 0.1.0.2.
        m.wait_for_console(
            "update: 0.1.0.2 in slot a failed its trial",
            Duration::from_secs(900),
        )?;
        m.wait_for_console(
            "update: rolled back from 0.1.0.2 to 0.1.0.1 in slot b",
            qemu_tests::machine::BOOT_TIMEOUT,
        )?;
        m.wait_ready()?;
        fixed_from_the_other_slot(&mut m, &op, &key, &update_pub, &bad, dir)?;
    }
    m.finish();
    Ok(())
}

/// The bad version's fix (0.1.0.3), published as a delta from the bad version alone:
/// the box runs 0.1.0.1, and its other slot holds 0.1.0.2, which it rolled back from.
/// fabricd fetches that delta (not the whole bundle); init finds 0.1.0.2 in slot a by
/// its entry, rebuilds the parts from slot a's blocks onto the data partition first
/// (slot a is the one it writes), writes slot a from them, tries and blesses 0.1.0.3.
fn fixed_from_the_other_slot(
    m: &mut Machine,
    op: &Operator,
    key: &Path,
    update_pub: &Path,
    bad: &Path,
    dir: &Path,
) -> Result<()> {
    let fixed = PathBuf::from(
        std::env::var_os("EDGEOS_FIXED_UPDATE_BUNDLE")
            .context("EDGEOS_FIXED_UPDATE_BUNDLE is not set")?,
    );
    let copy = dir.join("edgeos-0.1.0.3.bundle");
    std::fs::copy(&fixed, &copy)?;
    let fetched_before = fetched(&box_report(op)?).0;
    let t = Instant::now();
    let out = run(op
        .cmd()
        .args(["update", "publish", "--sites", "all", "--signing-key"])
        .arg(key)
        .arg("--update-key")
        .arg(update_pub)
        .arg("--delta-from")
        .arg(bad)
        .arg(&copy))?;
    eprintln!("{}", out.trim_end());
    assert!(out.contains("offers edgeos 0.1.0.3"), "{out}");
    let delta = dir.join("edgeos-0.1.0.3-from-0.1.0.2.delta");
    let (delta_bytes, bundle_bytes) = (
        std::fs::metadata(&delta)?.len(),
        std::fs::metadata(&fixed)?.len(),
    );
    assert!(
        delta_bytes * 10 <= bundle_bytes,
        "the delta is {delta_bytes} bytes of the bundle's {bundle_bytes}"
    );
    let line = m.wait_for_console(
        "update: the delta rebuilds slot a",
        Duration::from_secs(600),
    )?;
    assert!(
        line.contains("staged in /var/lib/edge/update/staged"),
        "{line}"
    );
    let r = box_report(op)?;
    let got = fetched(&r).0 - fetched_before;
    assert!(
        got < bundle_bytes / 10,
        "the box fetched {got} bytes for a delta of {delta_bytes}: the whole bundle ({bundle_bytes}) too"
    );
    eprintln!("fetched {got} bytes for 0.1.0.3 (a delta of {delta_bytes} from the other slot's 0.1.0.2; the bundle is {bundle_bytes})");
    m.wait_for_console(
        "update: 0.1.0.3 installed in slot a",
        Duration::from_secs(600),
    )?;
    m.wait_for_console(
        "edgeos: stage 2: version 0.1.0.3 slot a",
        qemu_tests::machine::BOOT_TIMEOUT,
    )?;
    m.wait_for_console(
        "update: 0.1.0.3 in slot a blessed",
        Duration::from_secs(300),
    )?;
    let line = wait_core_sees(op, "blessed 0.1.0.3", Duration::from_secs(120))?;
    assert!(line.contains("running 0.1.0.3 (slot a)"), "{line}");
    eprintln!(
        "0.1.0.3 from the other slot's blocks: publish to blessed at the core {:?}",
        t.elapsed()
    );
    Ok(())
}
