//! The data partition sealed to the TPM. A boot without a TPM leaves the blank partition
//! blank; the first boot with one makes it LUKS2 under a key the
//! TPM seals to the image's signed PCR 11 policy, and PCR 11 at the unseal is the value
//! the image builder predicted. A UKI whose command line was changed on the ESP boots
//! far enough to say, on the console and the control port, that the TPM refused the
//! key, and leaves every byte of the partition as it was; put back, the same UKI opens
//! it again with its data. Provisioning put on the ESP is left there while the data is
//! locked, then measured into PCR 15 (logged on the control port), unpacked and removed.
//!
//! (The unsealing on a second boot of an untouched disk is `boot`'s power cycle.)

use std::time::Duration;

use anyhow::{bail, Context, Result};
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

const ESP_PROVISION: &str = "edgeos/provision.toml";

/// The machine's ESP as a file of its own (`esp.img` in its directory), for mtools, and
/// where it sits on the disk.
fn esp_image(m: &Machine) -> Result<(std::path::PathBuf, u64)> {
    let parts = m.partitions()?;
    let esp = gpt::find(&parts, "esp")?;
    let scratch = qemu_tests::disk::scratch_in(m.dir());
    let bytes = qemu_tests::disk::read(m.disk(), esp.offset(), esp.size(), &scratch)?;
    let image = m.dir().join("esp.img");
    std::fs::write(&image, bytes)?;
    Ok((image, esp.offset()))
}

fn mtools(tool: &str, image: &std::path::Path, args: &[&str]) -> Result<std::process::Output> {
    std::process::Command::new(tool)
        .arg("-i")
        .arg(image)
        .args(args)
        .output()
        .with_context(|| format!("failed to run {tool} (mtools)"))
}

/// Writes `path` (at most one directory deep) on the machine's ESP, as a user would on
/// a workstation. The machine must be off.
fn put_on_esp(m: &Machine, path: &str, contents: &[u8]) -> Result<()> {
    let (image, offset) = esp_image(m)?;
    let local = m.dir().join("esp-file");
    std::fs::write(&local, contents)?;
    if let Some((dir, _)) = path.split_once('/') {
        mtools("mmd", &image, &["-D", "s", &format!("::/{dir}")])?;
    }
    let out = mtools(
        "mcopy",
        &image,
        &["-o", &local.to_string_lossy(), &format!("::/{path}")],
    )?;
    if !out.status.success() {
        bail!("mcopy: {}", String::from_utf8_lossy(&out.stderr));
    }
    qemu_tests::disk::write(
        m.disk(),
        offset,
        &std::fs::read(&image)?,
        &qemu_tests::disk::scratch_in(m.dir()),
    )
}

/// The file at `path` on the machine's ESP, if there is one.
fn read_from_esp(m: &Machine, path: &str) -> Result<Option<Vec<u8>>> {
    let (image, _) = esp_image(m)?;
    let out = mtools("mtype", &image, &[&format!("::/{path}")])?;
    Ok(out.status.success().then_some(out.stdout))
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
    // Provisioning as on hardware: a file the user put on the ESP. Stage 2 takes it only
    // with the data partition open, measures it into PCR 15, unpacks it onto data and
    // removes it from the ESP.
    let mut m = Machine::new("sealed_data")?;
    let provisioning = "\"notes/site.txt\" = \"sealed_data test site\"\n";
    put_on_esp(&m, ESP_PROVISION, provisioning.as_bytes())?;
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
    assert_eq!(
        read_from_esp(&m, ESP_PROVISION)?.as_deref(),
        Some(provisioning.as_bytes()),
        "a locked box must leave the provisioning on the ESP"
    );
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
    // PCR 15 is zeros extended once with the provisioning's SHA-256.
    let measured = wait(&mut m, "edgeos: tpm: provisioning (")?;
    let digest: [u8; 32] = sha2::Sha256::digest(provisioning).into();
    let want = edge_tpm::policy::hex(&edge_tpm::policy::extend(&[0; 32], &digest));
    assert!(
        measured
            .trim_end()
            .ends_with(&format!("measured: PCR 15 {want}")),
        "{measured:?}, want PCR 15 {want}"
    );
    wait(&mut m, "removed from the ESP")?;
    m.wait_ready()?;
    let st = m.status()?;
    assert_eq!(st["data"]["formatted"], true, "{st}");
    assert!(st["data"]["locked"].is_null(), "{st}");
    let reply = m.request(serde_json::json!({"cmd": "measurements"}))?;
    let record = reply["measurements"]["events"]
        .as_array()
        .and_then(|e| e.iter().find(|r| r["pcr"] == 15).cloned())
        .with_context(|| format!("no PCR 15 record: {reply}"))?;
    assert_eq!(
        record["digests"][0]["digest"],
        edge_tpm::policy::hex(&digest),
        "{record}"
    );
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(90))?;
    assert_eq!(
        read_from_esp(&m, ESP_PROVISION)?,
        None,
        "the provisioning's secrets stayed on the ESP"
    );
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
        phases[..3],
        ["enter-initrd", "leave-initrd", "sysinit"],
        "{ms}"
    );
    assert!(
        !phases.iter().any(|p| p.contains("provisioning")),
        "the provisioning was taken once, not at every boot: {ms}"
    );
    assert!(
        ms["firmware_log"]["bytes"].as_u64().is_some_and(|n| n > 0),
        "no firmware event log: {}",
        ms["firmware_log"]
    );
    m.finish();
    Ok(())
}
