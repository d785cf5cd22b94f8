//! XFS filesystem volumes from storaged's CSI endpoint, in the light VM (Debian's
//! kernel and xfsprogs): `fs_type: xfs` formats a new volume, which is written and read,
//! grown online with xfs_growfs, snapshotted and restored into a volume mounted beside
//! its still-mounted origin (the same XFS UUID twice: storaged mounts XFS with
//! `nouuid`); unknown fs types and volumes too small for XFS are refused by name, and an
//! XFS volume is not staged as ext4. A second boot of the same pool disk mounts the
//! volume as the XFS it holds, with its file and its new size: never formatted again.
//! As on the appliance, the XFS module is not loaded at boot: storaged loads it from its
//! on-demand list at the first XFS mount (edge-kmod's `load_on_demand`).

use qemu_tests::lightvm::{self, Kernel};

mod storaged_vm;
use storaged_vm::{assert_passed, host_programs, raw_disk, run, vmtest_binary};

const MODULES: &[&str] = &["crc32c_generic", "virtio_pci", "virtio_blk", "dm_thin_pool"];

#[test]
fn xfs_volumes_grow_snapshot_beside_origin_and_survive_reboot() {
    let bin = vmtest_binary();
    let kernel = Kernel::get().expect("kernel");
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("initrd.cpio");
    let mut programs = host_programs(&["mkfs.xfs", "xfs_growfs"]);
    // XFS and what it needs beyond the boot's modules, with the list the image builder
    // writes for it, in the same places.
    let booted = kernel.load_order(MODULES).expect("load order");
    let mut with_xfs = MODULES.to_vec();
    with_xfs.push("xfs");
    let on_demand: Vec<String> = kernel
        .load_order(&with_xfs)
        .expect("load order")
        .into_iter()
        .filter(|m| !booted.contains(m))
        .collect();
    assert!(
        on_demand.iter().any(|m| m.ends_with("/xfs.ko")),
        "{on_demand:?}"
    );
    for m in &on_demand {
        programs.push((
            kernel.modules_dir.join(m),
            format!("lib/modules/{}/{m}", kernel.release),
        ));
    }
    let list = dir.path().join("xfs-modules");
    std::fs::write(&list, on_demand.join("\n") + "\n").expect("write the list");
    programs.push((list, "etc/edge/modules-on-demand/xfs".into()));
    lightvm::initramfs_with_files(&kernel, &bin, MODULES, &programs, &initrd).expect("initramfs");
    // Sparse: XFS needs volumes of 300 MiB or more, and mkfs.xfs writes a 64 MiB log.
    let pool = dir.path().join("pool0.raw");
    raw_disk(&pool, 1 << 30);
    let console = run(
        &kernel,
        &initrd,
        dir.path(),
        "xfs",
        vec![(pool.clone(), "pool0".into())],
    );
    println!("{console}");
    assert_passed(
        &console,
        "xfs",
        &[
            "xfs_volume_write_and_read",
            "xfs_expand_online",
            "xfs_snapshot_restored_beside_its_origin",
            "xfs_bad_fs_types_and_sizes_refused",
        ],
    );
    let console = run(
        &kernel,
        &initrd,
        dir.path(),
        "xfs-reboot",
        vec![(pool, "pool0".into())],
    );
    println!("{console}");
    assert_passed(&console, "xfs-reboot", &["xfs_volume_not_formatted_again"]);
}
