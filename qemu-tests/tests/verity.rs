//! Verified boot: a root partition changed by a single byte is refused at boot, and the
//! box heals itself by falling back to the other slot. A byte changed deep in the root,
//! inside a program stage 1 runs, is named as the root's corruption, not as that
//! program's failure.

use anyhow::{bail, Context};
use qemu_tests::Machine;
use std::path::Path;
use std::time::Duration;

/// Where a file's first block lies in an erofs image, by erofs-utils' own `dump.erofs`.
fn first_block_of(erofs: &Path, file: &str) -> anyhow::Result<u64> {
    let out = std::process::Command::new("dump.erofs")
        .args([&format!("--path={file}"), "-e"])
        .arg(erofs)
        .output()
        .context("failed to run dump.erofs (erofs-utils)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // ` 0:        0..   11736 |   11736 :   29532160..  29536256 |    4096`
    for line in text.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("0:") {
            let physical = rest.split(':').nth(1).and_then(|p| p.split("..").next());
            if let Some(Ok(at)) = physical.map(|p| p.trim().parse::<u64>()) {
                return Ok(at);
            }
        }
    }
    bail!("no extent for {file} in dump.erofs's output:\n{text}")
}

#[test]
fn a_flipped_byte_in_root_a_is_refused_and_the_box_comes_up_on_slot_b() -> anyhow::Result<()> {
    // Deep: a block of /usr/bin/edge-tpm, which stage 1 runs on every boot to unseal the
    // data partition. The root mounts; the program fails reading it (EIO or SIGBUS).
    let image = qemu_tests::machine::image_from_env()?;
    let erofs = image.with_file_name("root.erofs");
    let at = first_block_of(&erofs, "/usr/bin/edge-tpm")?;
    let mut deep = Machine::new("verity-deep")?;
    deep.corrupt("root-a", at + 100)?;
    deep.boot()?;
    let line = deep.wait_for_console_unless(
        "dm-verity",
        &["edgeos: ready"],
        qemu_tests::machine::BOOT_TIMEOUT,
    )?;
    eprintln!("deep corruption: {}", line.trim_end());
    assert!(
        line.contains("dm-verity: root-a failed verification") && line.contains("refusing to boot"),
        "the failure names the root and its slot, not the program that read it: {line}"
    );
    deep.finish();

    let mut m = Machine::new("verity")?;
    // In the first block, which the erofs superblock (at 1 KiB) lives in: mounting must
    // read it, so the corruption cannot go unnoticed.
    let (old, new) = m.corrupt("root-a", 1024 + 7)?;
    assert_ne!(old, new);
    m.boot()?;
    let line = m.wait_for_console_unless(
        "dm-verity",
        &["edgeos: ready"],
        qemu_tests::machine::BOOT_TIMEOUT,
    )?;
    assert!(
        line.contains("root-a"),
        "the failure names the partition: {line}"
    );
    // Slot A has three tries; each ends in the same refusal and a reboot. Then
    // systemd-boot turns to the standby slot B, which holds an intact copy.
    let ready = m.wait_for_console_unless(
        "edgeos: ready",
        &["Kernel panic", "stage 2 failed"],
        Duration::from_secs(420),
    )?;
    assert!(
        ready.contains("slot=b"),
        "after slot A failed, the box must come up on slot B: {ready}"
    );
    let console = std::fs::read_to_string(m.console_log())?;
    let refusals = console.matches("dm-verity: root-a").count();
    assert!(
        refusals >= 3,
        "slot A is tried three times before the fallback, saw {refusals} refusals"
    );
    assert!(
        !console.contains("slot=a uptime"),
        "the corrupted root-a never reached ready:\n{console}"
    );
    // Slot B is blessed, so the next boots go straight to it.
    let blessed = m.wait_for_console("boot blessed: ", Duration::from_secs(30))?;
    assert!(
        blessed.contains("-b+0"),
        "slot B's standby entry is blessed: {blessed}"
    );
    let st = m.status()?;
    assert_eq!(st["slot"], "b", "status: {st}");
    m.finish();
    Ok(())
}
