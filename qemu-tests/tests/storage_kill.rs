//! storaged killed with SIGKILL in the middle of CSI calls, in the light VM: the guest
//! program (`storaged-vmtest`, phase `kill`) runs the real static daemon as its child
//! with the pool disk, kills it at a random moment during CreateVolume (empty or from a
//! snapshot), DeleteVolume, CreateSnapshot or DeleteSnapshot, 20 times, and restarts it.
//! After each restart the catalog holds only ready entries, acknowledged operations
//! survived, interrupted ones happened wholly or not at all, a retry under the same name
//! succeeds and every volume holds the marker written into it. Deleting everything at
//! the end returns the pool to its empty level with no thin device left behind.
//!
//! The seed is random and printed; `STORAGED_KILL_SEED=<n>` repeats a run.

use qemu_tests::lightvm::{self, Kernel};

mod storaged_vm;
use storaged_vm::{assert_passed, daemon_binary, raw_disk, run_with, vmtest_binary};

const MODULES: &[&str] = &["crc32c_generic", "virtio_pci", "virtio_blk", "dm_thin_pool"];

#[test]
fn daemon_killed_during_csi_calls_recovers() {
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
    let pool = dir.path().join("pool0.raw");
    raw_disk(&pool, 128 << 20);
    let seed = std::env::var("STORAGED_KILL_SEED").unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        (t | 1).to_string()
    });
    println!("STORAGED_KILL_SEED={seed}");
    let console = run_with(
        &kernel,
        &initrd,
        dir.path(),
        "kill",
        &format!("vmtest.seed={seed}"),
        vec![(pool, "pool0".into())],
    );
    println!("{console}");
    assert_passed(&console, "kill", &["kill_trials"]);
    let trials = console
        .lines()
        .filter(|l| l.contains("trial ") && l.contains(" killed at "))
        .count();
    assert_eq!(trials, 20, "trials run:\n{console}");
}
