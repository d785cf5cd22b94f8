//! What the storaged light-VM tests share: building the static guest program
//! (`storaged-vmtest`), raw disks, booting a phase and checking its TEST lines.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qemu_tests::lightvm::{self, Boot, Kernel};

/// The workspace this test runs from. Cargo sets CARGO_MANIFEST_DIR when it runs a test;
/// the compile-time value baked into `lightvm::workspace_root` can name another clone
/// that shares the target directory (its build of the same path looks fresh to cargo).
fn workspace() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .and_then(|d| d.parent().map(Path::to_path_buf))
        .unwrap_or_else(lightvm::workspace_root)
}

/// Builds the static test program and the daemon the way the image builder builds its
/// binaries; returns the test program.
pub fn vmtest_binary() -> PathBuf {
    let root = workspace();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-p",
            "storaged-guest",
            "--bin",
            "storaged-vmtest",
            "-p",
            "storaged",
            "--bin",
            "storaged",
        ])
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .status()
        .expect("failed to run cargo build");
    assert!(st.success(), "building storaged-vmtest failed");
    lightvm::target_dir().join("x86_64-unknown-linux-gnu/release/storaged-vmtest")
}

/// The static daemon `vmtest_binary` built alongside the test program.
#[allow(dead_code)] // only the kill test runs the daemon itself
pub fn daemon_binary() -> PathBuf {
    lightvm::target_dir().join("x86_64-unknown-linux-gnu/release/storaged")
}

/// The host's programs (Debian's, as in the image) for `sbin/` in the initramfs, and
/// the shared libraries and loader `ldd` names for them.
#[allow(dead_code)] // not every storage test formats filesystems
pub fn host_programs(programs: &[&str]) -> Vec<(PathBuf, String)> {
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for prog in programs {
        let host = ["/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(prog))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{prog} is not installed on the host (e2fsprogs, xfsprogs)"));
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

pub fn raw_disk(path: &Path, bytes: u64) {
    let f = std::fs::File::create(path).expect("create disk");
    f.set_len(bytes).expect("size disk");
}

/// Boots `phase` and returns its console, which must end with the program's DONE line.
#[allow(dead_code)] // the kill test boots with a seed
pub fn run(
    kernel: &Kernel,
    initrd: &Path,
    dir: &Path,
    phase: &str,
    disks: Vec<(PathBuf, String)>,
) -> String {
    run_with(kernel, initrd, dir, phase, "", disks)
}

/// `run` with more kernel command line words (e.g. `vmtest.seed=N`).
pub fn run_with(
    kernel: &Kernel,
    initrd: &Path,
    dir: &Path,
    phase: &str,
    extra: &str,
    disks: Vec<(PathBuf, String)>,
) -> String {
    let console = lightvm::boot(&Boot {
        kernel,
        initramfs: initrd,
        disks,
        append: format!("vmtest.phase={phase} {extra}")
            .trim_end()
            .to_owned(),
        console: dir.join(format!("console-{phase}.log")),
        timeout: Duration::from_secs(300),
        kvm: false,
        progress: None,
    })
    .unwrap_or_else(|e| panic!("{phase} boot: {e:#}"));
    assert!(
        console.contains("VMTEST DONE"),
        "{phase} boot did not finish:\n{console}"
    );
    console
}

/// No TEST line failed and each of `expected` ran.
pub fn assert_passed(console: &str, phase: &str, expected: &[&str]) {
    let lines = lightvm::parse_tests(console);
    let failed: Vec<_> = lines.iter().filter(|l| l.failure.is_some()).collect();
    assert!(
        failed.is_empty(),
        "{phase}: {failed:#?}\nconsole:\n{console}"
    );
    for name in expected {
        assert!(
            lines.iter().any(|l| l.name == *name),
            "{phase}: test {name} did not run\nconsole:\n{console}"
        );
    }
}
