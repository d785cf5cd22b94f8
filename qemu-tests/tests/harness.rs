//! The harness itself, on firmware alone (no appliance image needed): a machine boots
//! OVMF with its TPM, the console is captured as it grows, QMP answers, partitions are
//! found by label and corrupted only in the machine's own disk, and every process
//! dies with the machine.

use qemu_tests::{Machine, Options};
use std::process::Command;
use std::time::Duration;

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn firmware_boot_is_captured_and_cleaned_up() -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let image = work.path().join("blank.raw");
    std::fs::write(&image, vec![0u8; 8 << 20])?;
    let mut sfdisk = Command::new("sfdisk")
        .arg("--quiet")
        .arg(&image)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write;
    sfdisk.stdin.take().unwrap().write_all(
        b"label: gpt\nstart=2048, size=4096, type=4f68bce3-e8cd-4db1-96e7-fbcaf984b709, name=root-a\n",
    )?;
    assert!(sfdisk.wait()?.success(), "sfdisk failed");
    let before = std::fs::read(&image)?;

    let mut m = Machine::with_options("harness", Options::new(&image))?;
    let root = m
        .partitions()?
        .into_iter()
        .find(|p| p.name == "root-a")
        .expect("root-a in table");
    assert_eq!(root.offset(), 2048 * 512);
    let (old, new) = m.corrupt("root-a", 1024)?;
    assert_eq!((old, new), (0x00, 0xff));
    assert_eq!(
        std::fs::read(&image)?,
        before,
        "the shared image was written"
    );

    m.boot()?;
    // OVMF finds nothing to boot on the blank disk and says so on the serial console.
    m.wait_for_console("BdsDxe", Duration::from_secs(120))?;
    let status = qemu_tests::qmp::execute(
        &m.dir().join("qmp.sock"),
        "query-status",
        Duration::from_secs(10),
    )?;
    assert_eq!(status["running"], true);
    let qemu_pids: Vec<u32> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&*m.dir().to_string_lossy()))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        qemu_pids.len() >= 2,
        "expected qemu and swtpm, found {qemu_pids:?}"
    );
    let dir = m.dir().to_path_buf();
    m.finish();
    assert!(!dir.exists(), "temp dir survived a passing test");
    for pid in qemu_pids {
        assert!(!pid_alive(pid), "process {pid} outlived the machine");
    }
    Ok(())
}
