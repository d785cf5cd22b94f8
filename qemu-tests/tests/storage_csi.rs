//! storaged's CSI endpoint on a real kernel device-mapper, in the light VM: the
//! daemon's CSI server code serves the pool disk on a unix socket and a CSI client in
//! the guest (`storaged-vmtest`, phase `csi`) drives it: identity, idempotent create,
//! `/metrics` figures following a create, a write and a delete, sizes beyond the pool, block RWX refused, one RWX filesystem volume published to two
//! pods that see each other's writes, a read-only publish, stats, snapshot and restore,
//! online expansion, bad requests with the spec's codes, a block volume whose data a
//! filesystem stage refuses to format over, idempotent teardown; then a reboot of the
//! same pool disk: the kept volume is listed, stages without a new format and holds its
//! file, and its snapshot is still a snapshot.

use std::path::{Path, PathBuf};
use std::process::Command;

use qemu_tests::lightvm::{self, Kernel};

mod storaged_vm;
use storaged_vm::{assert_passed, raw_disk, run, vmtest_binary};

const MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "dm_thin_pool",
    "ext4",
];

/// The host's e2fsprogs programs (Debian's, as in the image) for `sbin/` in the
/// initramfs, and the shared libraries and loader `ldd` names for them.
fn e2fsprogs() -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for prog in ["mke2fs", "resize2fs"] {
        let host = ["/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(prog))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{prog} is not installed on the host (e2fsprogs)"));
        let out = Command::new("ldd").arg(&host).output().expect("run ldd");
        assert!(out.status.success(), "ldd {}", host.display());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libx.so.2 => /lib/.../libx.so.2 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                let inside = p.trim_start_matches('/').to_owned();
                if !files.iter().any(|(_, i)| *i == inside) {
                    files.push((PathBuf::from(p), inside));
                }
            }
        }
        files.push((host, format!("sbin/{prog}")));
    }
    files
}

#[test]
fn csi_volumes_rwx_snapshots_expand_spec_codes_and_reboot() {
    let bin = vmtest_binary();
    let kernel = Kernel::get().expect("kernel");
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("initrd.cpio");
    lightvm::initramfs_with_files(&kernel, &bin, MODULES, &e2fsprogs(), &initrd)
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
