//! storaged's CSI endpoint on a real kernel device-mapper, in the light VM: the
//! daemon's CSI server code serves the pool disk on a unix socket and a CSI client in
//! the guest (`storaged-vmtest`, phase `csi`) drives it: identity, idempotent create,
//! `/metrics` figures following a create, a write and a delete, sizes beyond the pool, block RWX refused, one RWX filesystem volume published to two
//! pods that see each other's writes, a read-only publish, stats, snapshot and restore,
//! online expansion, bad requests with the spec's codes, a block volume whose data a
//! filesystem stage refuses to format over, idempotent teardown; then a reboot of the
//! same pool disk: the kept volume is listed, stages without a new format and holds its
//! file, and its snapshot is still a snapshot.

use qemu_tests::lightvm::{self, Kernel};

mod storaged_vm;
use storaged_vm::{assert_passed, host_programs, raw_disk, run, vmtest_binary};

const MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "dm_thin_pool",
    "ext4",
];

#[test]
fn csi_volumes_rwx_snapshots_expand_spec_codes_and_reboot() {
    let bin = vmtest_binary();
    let kernel = Kernel::get().expect("kernel");
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("initrd.cpio");
    lightvm::initramfs_with_files(
        &kernel,
        &bin,
        MODULES,
        &host_programs(&["mke2fs", "resize2fs"]),
        &initrd,
    )
    .expect("initramfs");
    let pool = dir.path().join("pool0.raw");
    raw_disk(&pool, 128 << 20);
    let console = run(
        &kernel,
        &initrd,
        dir.path(),
        "csi",
        vec![(pool.clone(), "pool0".into())],
    );
    // Shown with --nocapture: the TEST lines and the driver's log.
    println!("{console}");
    assert_passed(
        &console,
        "csi",
        &[
            "csi_metrics_move",
            "csi_identity_probe",
            "csi_create_is_idempotent",
            "csi_create_beyond_the_pool",
            "csi_block_rwx_refused",
            "csi_rwx_two_pods_see_each_others_writes",
            "csi_readonly_publish_refuses_writes",
            "csi_volume_stats",
            "csi_snapshot_and_restore",
            "csi_clone_of_a_volume",
            "csi_capacity_validate_and_list",
            "csi_expand_grows_the_filesystem",
            "csi_bad_requests_get_spec_codes",
            "csi_block_volume_and_no_format_over_data",
            "csi_teardown_is_idempotent",
            "csi_keep_a_volume",
        ],
    );

    let console = run(
        &kernel,
        &initrd,
        dir.path(),
        "csi-reboot",
        vec![(pool, "pool0".into())],
    );
    println!("{console}");
    assert_passed(
        &console,
        "csi-reboot",
        &["csi_volume_survives_reboot", "csi_snapshot_survives_reboot"],
    );
}
