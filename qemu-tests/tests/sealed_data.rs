//! The data partition sealed to the TPM. A boot without a TPM leaves the blank partition
//! blank; the first boot with one makes it LUKS2 under a key the
//! TPM seals to the image's signed PCR 11 policy, and PCR 11 at the unseal is the value
//! the image builder predicted. A UKI whose command line was changed on the ESP boots
//! far enough to say, on the console and the control port, that the TPM refused the
//! key, and leaves every byte of the partition as it was; put back, the same UKI opens
//! it again with its data. The provisioning item is measured into PCR 12 before it is
//! unpacked, and logged on the control port.
//!
//! (The unsealing on a second boot of an untouched disk is `boot`'s power cycle.)

use std::time::Duration;

use anyhow::{bail, Context, Result};
use qemu_tests::machine::Options;
use qemu_tests::machine::BOOT_TIMEOUT;
use qemu_tests::{gpt, Machine};
use sha2::Digest as _;

/// The PCR 11 value `cargo xtask image` predicted for a slot at the unseal.
fn predicted_pcr11(slot: &str) -> Result<String> {
    let image = qemu_tests::image_from_env()?;
    let path = image.with_file_name("pcr11.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v[slot]["enter-initrd"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{}: no {slot}.enter-initrd", path.display()))
}

/// Where in the ESP partition the first byte of slot A's kernel command line is ("quiet"
/// in the static part, which the kernel ignores when changed).
fn slot_a_cmdline_byte(m: &Machine) -> Result<u64> {
    let parts = m.partitions()?;
    let esp = gpt::find(&parts, "esp")?;
    let bytes = qemu_tests::disk::read(
        m.disk(),
        esp.offset(),
        esp.size(),
        &qemu_tests::disk::scratch_in(m.dir()),
    )?;
    let marker = b"edge.slot=a edge.version=";
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .context("slot A's command line is not on the ESP")?;
    let start = at.saturating_sub(512);
    let quiet = bytes[start..at]
        .windows(5)
        .rposition(|w| w == b"quiet")
        .context("no \"quiet\" before edge.slot=a")?;
    Ok((start + quiet) as u64)
}

fn data_partition(m: &Machine) -> Result<Vec<u8>> {
    let parts = m.partitions()?;
    let data = gpt::find(&parts, "data")?;
    qemu_tests::disk::read(
        m.disk(),
        data.offset(),
        data.size(),
        &qemu_tests::disk::scratch_in(m.dir()),
    )
}

#[test]
fn data_is_sealed_to_the_signed_boot_and_a_changed_uki_gets_no_key() -> Result<()> {
    // A provisioning item, which stage 2 measures into PCR 12 before it unpacks it.
    let scratch = tempfile::tempdir()?;
    let provisioning = scratch.path().join("provision.toml");
    std::fs::write(
        &provisioning,
        "\"notes/site.txt\" = \"sealed_data test site\"\n",
    )?;
    let mut opts = Options::new(&qemu_tests::image_from_env()?);
    opts.fw_cfg
        .push(("opt/org.edgeos/provision".into(), provisioning.clone()));
    let mut m = Machine::with_options("sealed_data", opts)?;
    let wait = |m: &mut Machine, pattern: &str| m.wait_for_console(pattern, BOOT_TIMEOUT);

    // No TPM on the first boot: nothing can be sealed, so nothing is made.
    m.set_tpm(false);
    m.boot()?;
    let line = wait(&mut m, "edgeos: data: locked:")?;
    assert!(line.contains("no TPM"), "{line}");
    m.wait_status(Duration::from_secs(60), "data locked in the status", |st| {
        st["data"]["locked"].is_string()
    })?;
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(90))?;
    if data_partition(&m)?.iter().any(|&b| b != 0) {
        bail!("a boot without a TPM wrote to the blank data partition");
    }
    m.set_tpm(true);

    // With the TPM: PCR 11 as predicted, a new LUKS2 sealed to it, a recovery key shown.
    m.boot()?;
    wait(&mut m, "is blank; sealing a new key to the TPM")?;
    let pcr = wait(&mut m, "edgeos: tpm: PCR 11 (")?;
    let predicted = predicted_pcr11("a")?;
    assert!(
        pcr.trim_end().ends_with(&predicted),
        "measured {pcr:?}, predicted {predicted}"
    );
    let recovery = wait(&mut m, "edgeos: data: recovery key")?;
    let key = recovery.rsplit(' ').next().unwrap_or("").trim();
    assert_eq!(
        key.len(),
        39,
        "eight groups of four hex digits: {recovery:?}"
    );
    m.wait_ready()?;
    let st = m.status()?;
    assert_eq!(st["data"]["formatted"], true, "{st}");
    assert!(st["data"]["locked"].is_null(), "{st}");
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(90))?;
    let sealed = data_partition(&m)?;
    assert!(
        sealed.starts_with(b"LUKS\xba\xbe\x00\x02"),
        "data is not LUKS2: {:02x?}",
        &sealed[..8]
    );
    assert!(
        !sealed.windows(10).any(|w| w == b"containerd"),
        "the pods' files are readable off the disk"
    );

    // One byte of slot A's command line changed on the ESP: PCR 11 differs from every
    // signed value, the TPM gives no key, and nothing on data is touched.
    let at = slot_a_cmdline_byte(&m)?;
    m.corrupt("esp", at)?;
    m.reboot_same_disk()?;
    let line = wait(&mut m, "edgeos: data: locked:")?;
    assert!(
        line.contains("the TPM refused the data key") && line.contains("not the signed one"),
        "{line}"
    );
    wait(&mut m, "edgeos: locked: the services stay down")?;
    let st = m.wait_status(Duration::from_secs(60), "data locked in the status", |st| {
        st["data"]["locked"].is_string()
    })?;
    let why = st["data"]["locked"].as_str().unwrap_or("");
    assert!(why.contains("not the signed one"), "{st}");
    assert_eq!(st["ready"], false, "{st}");
    assert_eq!(st["services"].as_array().map(Vec::len), Some(0), "{st}");
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(90))?;
    if data_partition(&m)? != sealed {
        bail!("the locked boot changed the data partition");
    }

    // Put back: the signed UKI opens the partition again, data as it was.
    m.corrupt("esp", at)?;
    m.reboot_same_disk()?;
    wait(&mut m, "edgeos: data: unlocked by the TPM")?;
    // PCR 12 is zeros extended once with the provisioning's SHA-256.
    let measured = wait(&mut m, "edgeos: tpm: provisioning (")?;
    let digest: [u8; 32] = sha2::Sha256::digest(std::fs::read(&provisioning)?).into();
    let want = edge_tpm::policy::hex(&edge_tpm::policy::extend(&[0; 32], &digest));
    assert!(
        measured
            .trim_end()
            .ends_with(&format!("measured: PCR 12 {want}")),
        "{measured:?}, want PCR 12 {want}"
    );
    m.wait_ready()?;
    let st = m.status()?;
    assert_eq!(st["data"]["formatted"], false, "{st}");
    assert_eq!(st["data"]["clean"], true, "{st}");
    // The measurement logs on the control port: our phases and the firmware's log.
    let reply = m.request(serde_json::json!({"cmd": "measurements"}))?;
    let ms = &reply["measurements"];
    let phases: Vec<&str> = ms["events"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|r| r["content"]["string"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        phases[..4],
        [
            "enter-initrd",
            "leave-initrd",
            "sysinit",
            "edgeos provisioning: /sys/firmware/qemu_fw_cfg/by_name/opt/org.edgeos/provision/raw"
        ],
        "{ms}"
    );
    let provisioning_record = &ms["events"][3];
    assert_eq!(provisioning_record["pcr"], 12, "{ms}");
    assert_eq!(
        provisioning_record["digests"][0]["digest"],
        edge_tpm::policy::hex(&digest),
        "{ms}"
    );
    assert!(
        ms["firmware_log"]["bytes"].as_u64().is_some_and(|n| n > 0),
        "no firmware event log: {}",
        ms["firmware_log"]
    );
    m.finish();
    Ok(())
}
