//! A power cut right after the first boot pulled and started the pods: the next boot
//! finds the data partition unclean, recovers it, and the pods start again.

use qemu_tests::Machine;
use std::time::Duration;

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
    wait_pods_started(&mut m, &["sensor", "inference"])?;
    m.power_cut();

    m.reboot_same_disk()?;
    m.wait_ready()?;
    let st = m.status()?;
    assert_eq!(
        st["data"]["clean"], false,
        "a power cut left data clean: {st}"
    );
    wait_pods_started(&mut m, &["sensor", "inference"])?;
    m.finish();
    Ok(())
}

fn wait_pods_started(m: &mut Machine, pods: &[&str]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = pods.to_vec();
    while !missing.is_empty() {
        let line = m.wait_for_console_unless(
            "container started pod=",
            &[
                "pod failed to start",
                "rejected pod manifest",
                "container failed to start",
            ],
            Duration::from_secs(180),
        )?;
        missing.retain(|p| {
            !(line.contains(&format!("pod={p} ")) && line.contains(&format!("container={p}")))
        });
    }
    Ok(())
}
