//! A power cut right after the first boot pulled and started the pods: the next boot
//! finds the data partition unclean, recovers it, and the pods start again.

use qemu_tests::Machine;

#[test]
fn pods_start_again_after_a_power_cut_right_after_their_first_start() -> anyhow::Result<()> {
    let mut m = Machine::new("power-cut")?;
    m.boot()?;
    m.wait_ready()?;
    let console = std::fs::read_to_string(m.console_log())?;
    assert!(
        !console.contains("does not journal file data"),
        "containerd's tree is not journaled:\n{console}"
    );
    m.wait_pods_started(&["sensor", "inference"])?;
    m.power_cut();

    m.reboot_same_disk()?;
    m.wait_ready()?;
    let st = m.status()?;
    assert_eq!(
        st["data"]["clean"], false,
        "a power cut left data clean: {st}"
    );
    m.wait_pods_started(&["sensor", "inference"])?;
    m.finish();
    Ok(())
}
