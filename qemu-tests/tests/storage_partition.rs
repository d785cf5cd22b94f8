//! storaged's pool on a `pool` partition, for a box with no spare disk, in the light VM.
//! The system disk is a GPT made by sfdisk on a small file that is then grown (an image
//! written onto a bigger disk: its backup table is where the image ended): storaged
//! adds a `pool` partition in the free space, moving the backup table to the disk's
//! end; the pool and a volume work; a second boot finds both by the label the kernel
//! reads from the table. A disk with no free space gets a clear error and is left
//! unchanged; a `pool` partition holding ext4 is refused and left unchanged, and the
//! daemon then serves without a pool.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use qemu_tests::lightvm::{self, Kernel};

mod storaged_vm;
use storaged_vm::{assert_passed, daemon_binary, raw_disk, run, vmtest_binary};

const MODULES: &[&str] = &["crc32c_generic", "virtio_pci", "virtio_blk", "dm_thin_pool"];
const MIB: u64 = 1 << 20;

fn sfdisk(disk: &Path, script: &str) {
    let mut child = Command::new("sfdisk")
        .arg("--quiet")
        .arg(disk)
        .stdin(Stdio::piped())
        .spawn()
        .expect("run sfdisk (fdisk package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("write sfdisk script");
    assert!(
        child.wait().expect("wait sfdisk").success(),
        "sfdisk {script}"
    );
}

/// sfdisk's view of the table, whitespace removed; fails on any warning it prints.
fn table(disk: &Path) -> String {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .output()
        .expect("run sfdisk --json");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "sfdisk --json {}: {err}",
        disk.display()
    );
    String::from_utf8_lossy(&out.stdout)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

fn write_at(disk: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .and_then(|f| f.write_all_at(data, off))
        .expect("write disk");
}

#[test]
fn pool_partition_made_in_free_space_and_refused_on_bad_disks() {
    let bin = vmtest_binary();
    let kernel = Kernel::get().expect("kernel");
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("initrd.cpio");
    lightvm::initramfs_with_files(
        &kernel,
        &bin,
        MODULES,
        &[(daemon_binary(), "sbin/storaged".into())],
        &initrd,
    )
    .expect("initramfs");

    // A 48 MiB "image" (esp, root-a, data) on a 256 MiB disk.
    let sys = dir.path().join("sys0.raw");
    raw_disk(&sys, 48 * MIB);
    sfdisk(
        &sys,
        "label: gpt\nsize=4MiB, name=esp\nsize=8MiB, name=root-a\nsize=16MiB, name=data\n",
    );
    // What the data partition holds (it starts at 13 MiB) must not move.
    let marker: Vec<u8> = (0..MIB).map(|i| (i % 253) as u8).collect();
    write_at(&sys, 13 * MIB, &marker);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&sys)
        .and_then(|f| f.set_len(256 * MIB))
        .expect("grow the disk");

    let console = run(
        &kernel,
        &initrd,
        dir.path(),
        "part",
        vec![(sys.clone(), "sys0".into())],
    );
    println!("{console}");
    assert!(
        console.contains("GPT:"),
        "the grown image's misplaced backup table went unnoticed"
    );
    assert_passed(
        &console,
        "part",
        &[
            "part_made_in_free_space",
            "part_pool_volumes",
            "part_found_again_not_made_twice",
        ],
    );
    // The table as another tool reads it: four partitions, the new one named pool from
    // the first MiB after data to the last whole MiB before the moved backup table.
    let t = table(&sys);
    assert!(t.contains("\"lastlba\":524254"), "{t}");
    assert!(
        t.contains(
            "\"start\":59392,\"size\":462848,\"type\":\"0FC63DAF-8483-4772-8E79-3D69D8477DE4\""
        ),
        "{t}"
    );
    assert!(t.contains("\"name\":\"pool\""), "{t}");
    let verify = Command::new("sfdisk")
        .arg("--verify")
        .arg(&sys)
        .output()
        .expect("sfdisk");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let data = std::fs::read(&sys).expect("read disk");
    assert!(
        data[(13 * MIB) as usize..(14 * MIB) as usize] == marker[..],
        "the data partition changed"
    );

    let console = run(
        &kernel,
        &initrd,
        dir.path(),
        "part-reboot",
        vec![(sys, "sys0".into())],
    );
    println!("{console}");
    assert_passed(&console, "part-reboot", &["part_pool_survives_reboot"]);
    // The kernel checks both tables at boot: the first boot saw the backup where the
    // image ended and said so; after storaged moved it, nothing to say.
    assert!(
        !console.contains("GPT:"),
        "the kernel found GPT errors:\n{console}"
    );

    // A disk its partitions fill, and one whose pool partition holds ext4.
    let full = dir.path().join("full0.raw");
    raw_disk(&full, 64 * MIB);
    sfdisk(&full, "label: gpt\nsize=4MiB, name=esp\nname=data\n");
    let foreign = dir.path().join("foreign0.raw");
    raw_disk(&foreign, 64 * MIB);
    sfdisk(&foreign, "label: gpt\nsize=8MiB, name=data\nname=pool\n");
    // An ext4 superblock magic 1080 bytes into the pool partition (at 9 MiB).
    write_at(&foreign, 9 * MIB + 1080, &[0x53, 0xef]);
    let (full_before, foreign_before) = (
        std::fs::read(&full).expect("read"),
        std::fs::read(&foreign).expect("read"),
    );
    let console = run(
        &kernel,
        &initrd,
        dir.path(),
        "part-refused",
        vec![
            (full.clone(), "full0".into()),
            (foreign.clone(), "foreign0".into()),
        ],
    );
    println!("{console}");
    assert_passed(
        &console,
        "part-refused",
        &[
            "part_no_room_is_a_clear_error",
            "part_foreign_data_refused",
            "part_daemon_serves_without_a_pool",
        ],
    );
    assert!(
        std::fs::read(&full).expect("read") == full_before,
        "the full disk changed"
    );
    assert!(
        std::fs::read(&foreign).expect("read") == foreign_before,
        "the disk with the foreign pool partition changed"
    );
}
