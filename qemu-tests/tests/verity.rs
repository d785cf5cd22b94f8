//! Verified boot: a root partition changed by a single byte is refused at boot, and the
//! box heals itself by falling back to the other slot.

use qemu_tests::Machine;
use std::time::Duration;

#[test]
fn a_flipped_byte_in_root_a_is_refused_and_the_box_comes_up_on_slot_b() -> anyhow::Result<()> {
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
