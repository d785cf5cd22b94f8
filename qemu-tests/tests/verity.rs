//! Verified boot: a root partition changed by a single byte is refused at boot.

use qemu_tests::Machine;
use std::time::Duration;

#[test]
fn a_flipped_byte_in_root_a_refuses_the_boot() -> anyhow::Result<()> {
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
    let console = std::fs::read_to_string(m.console_log()).unwrap_or_default();
    assert!(
        !console.contains("edgeos: ready"),
        "the corrupted root reached ready:\n{console}"
    );
    // It must not come up on slot A at all; give it a moment to prove it doesn't.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!std::fs::read_to_string(m.console_log())?.contains("edgeos: ready version"));
    m.finish();
    Ok(())
}
