//! Stage 1, in the initramfs: open the slot's verified root and the data partition,
//! then switch into them. Every failure ends in one console line naming the step and the
//! thing, then a reboot after 10 s, so the boot loader's boot counting can fall back.

use crate::{disk, dm, ext4, journal, modules, mounts, say, verity};
use rustix::mount::MountFlags;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SYSROOT: &str = "/sysroot";
const DM_NAME: &str = "root";
const PARTITION_TIMEOUT: Duration = Duration::from_secs(30);
const PARTITION_POLL: Duration = Duration::from_millis(50);
const REBOOT_DELAY: Duration = Duration::from_secs(10);
const MKE2FS: &str = "/usr/sbin/mke2fs";

/// Why stage 1 gives up.
enum Fatal {
    /// The root slot failed verification: the line operators and tests look for.
    Verity {
        partition: String,
        detail: String,
    },
    Step {
        step: &'static str,
        detail: String,
    },
}

fn step(step: &'static str) -> impl FnOnce(String) -> Fatal {
    move |detail| Fatal::Step { step, detail }
}

/// What stage 2 learns from stage 1 (`/run/edge/boot.json`).
#[derive(serde::Serialize)]
struct BootInfo<'a> {
    slot: &'a str,
    version: &'a str,
    data_formatted: bool,
    data_clean: bool,
    stage1_ms: u64,
}

pub fn run() -> ! {
    let start = Instant::now();
    let fatal = match boot(start) {
        Ok(never) => match never {},
        Err(f) => f,
    };
    match fatal {
        Fatal::Verity { partition, detail } => {
            say!("dm-verity: {partition} failed verification ({detail}); refusing to boot")
        }
        Fatal::Step { step, detail } => say!("stage 1 failed: {step}: {detail}"),
    }
    reboot_after_delay()
}

fn reboot_after_delay() -> ! {
    say!("rebooting in {} s", REBOOT_DELAY.as_secs());
    rustix::fs::sync();
    std::thread::sleep(REBOOT_DELAY);
    if let Err(e) = rustix::system::reboot(rustix::system::RebootCommand::Restart) {
        say!("reboot failed: {}", std::io::Error::from(e));
    }
    // Only reached when not PID 1 or lacking CAP_SYS_BOOT; never exit (PID 1 exiting
    // panics the kernel with a far less useful message than the line above).
    loop {
        std::thread::park();
    }
}

fn boot(start: Instant) -> Result<std::convert::Infallible, Fatal> {
    mounts::mount_early().map_err(step("mounting /proc, /sys, /dev, /run"))?;
    let params = crate::cmdline::read().map_err(step("reading the kernel command line"))?;
    say!("stage 1: slot {} version {}", params.slot, params.version);

    for e in modules::load_list(
        Path::new("/etc/edge/modules"),
        &modules::running_kernel_dir(),
    ) {
        say!("modules: {e}");
    }

    let root_label = format!("root-{}", params.slot);
    let verity_label = format!("{root_label}-verity");
    let parts = disk::wait_for_labels(
        Path::new("/sys/class/block"),
        &[&root_label, &verity_label, "data"],
        PARTITION_TIMEOUT,
        PARTITION_POLL,
    )
    .map_err(step("finding partitions"))?;
    let dev_dir = Path::new("/dev");
    for d in parts.values() {
        disk::ensure_node(d, dev_dir).map_err(step("creating device nodes"))?;
    }
    let (root_part, verity_part, data_part) =
        (&parts[&root_label], &parts[&verity_label], &parts["data"]);

    let root_node = open_verity(
        root_part,
        verity_part,
        &root_label,
        &params.roothash,
        dev_dir,
    )?;
    mount_root(&root_node, &root_label)?;

    let (data_formatted, data_clean) = open_data(data_part, dev_dir)?;
    for fs in ["/proc", "/sys", "/dev", "/run"] {
        mounts::move_mount(Path::new(fs), &Path::new(SYSROOT).join(&fs[1..]))
            .map_err(step("moving mounts into the new root"))?;
    }

    let info = BootInfo {
        slot: &params.slot,
        version: &params.version,
        data_formatted,
        data_clean,
        stage1_ms: start.elapsed().as_millis() as u64,
    };
    write_boot_info(&info).map_err(step("writing /run/edge/boot.json"))?;
    say!(
        "stage 1 done in {} ms; switching to the root",
        info.stage1_ms
    );
    let e = mounts::switch_root(Path::new(SYSROOT), "/sbin/init");
    Err(Fatal::Step {
        step: "switching root",
        detail: e,
    })
}

/// Sets up the dm-verity device `root` over the slot and returns its node.
fn open_verity(
    data: &disk::BlockDev,
    hash: &disk::BlockDev,
    label: &str,
    roothash: &str,
    dev_dir: &Path,
) -> Result<PathBuf, Fatal> {
    let verity_fail = |detail: String| Fatal::Verity {
        partition: label.to_owned(),
        detail,
    };
    let sb = verity::read_superblock(&hash.node(dev_dir)).map_err(verity_fail)?;
    let table = sb.table(
        &format!("{}:{}", data.major, data.minor),
        &format!("{}:{}", hash.major, hash.minor),
        roothash,
    );
    let ctl = dm::Control::open(dev_dir).map_err(step("opening device-mapper"))?;
    let (major, minor) = ctl
        .create(DM_NAME, dm::READONLY_FLAG)
        .map_err(step("creating the dm-verity device"))?;
    let loaded = ctl
        .load_table(
            DM_NAME,
            dm::READONLY_FLAG,
            sb.data_sectors(),
            "verity",
            &table,
        )
        .and_then(|()| ctl.resume(DM_NAME));
    if let Err(e) = loaded {
        // A table the kernel refuses (bad hash, sizes beyond the partition) is this
        // slot's fault: report it as a verity failure so the operator looks at the slot.
        let _ = ctl.remove(DM_NAME);
        return Err(verity_fail(e));
    }
    let node = disk::BlockDev {
        devname: format!("dm-{minor}"),
        partname: None,
        major,
        minor,
    };
    disk::ensure_node(&node, dev_dir).map_err(step("creating the dm-verity device node"))
}

/// Mounts the verified root read-only; a read error or a corrupt status is a verity failure.
fn mount_root(node: &Path, label: &str) -> Result<(), Fatal> {
    let source = node.to_string_lossy().into_owned();
    let mounted = mounts::mount(&source, Path::new(SYSROOT), "erofs", MountFlags::RDONLY, "");
    let corrupt = dm::Control::open(Path::new("/dev"))
        .and_then(|c| c.status(DM_NAME))
        .map(|s| s.iter().any(|t| verity::status_is_corrupt(t)))
        .unwrap_or(false);
    match mounted {
        Err(e) if corrupt || e.contains("Input/output error") => Err(Fatal::Verity {
            partition: label.to_owned(),
            detail: format!("mount: {}", e.rsplit(": ").next().unwrap_or(&e)),
        }),
        Err(e) => Err(Fatal::Step {
            step: "mounting the root",
            detail: e,
        }),
        Ok(()) if corrupt => Err(Fatal::Verity {
            partition: label.to_owned(),
            detail: "device-mapper status reports a corrupted block".to_owned(),
        }),
        Ok(()) => Ok(()),
    }
}

/// Formats `data` if it is not ext4 yet, mounts it on /sysroot/var and reports
/// (formatted now, last shutdown clean).
fn open_data(part: &disk::BlockDev, dev_dir: &Path) -> Result<(bool, bool), Fatal> {
    let node = part.node(dev_dir);
    let before = ext4::read(&node).map_err(step("reading the data partition"))?;
    let (formatted, clean) = match before {
        None => {
            format_data(&part.devname)?;
            (true, false)
        }
        Some(state) => {
            if state.errors {
                say!(
                    "data: the kernel recorded file system errors on {}",
                    part.devname
                );
            }
            (false, !state.needs_recovery)
        }
    };
    // nodelalloc: the per-file data journaling of `journal` needs it.
    mounts::mount(
        &node.to_string_lossy(),
        &Path::new(SYSROOT).join("var"),
        "ext4",
        MountFlags::NOSUID,
        "nodelalloc",
    )
    .map_err(step("mounting the data partition"))?;
    for tree in journal::JOURNALED {
        let dir = Path::new(SYSROOT).join("var").join(tree);
        match journal::journal_data(&dir) {
            Ok(0) => {}
            Ok(n) => say!("data: /var/{tree} journals file data ({n} inodes changed)"),
            // The box still boots; a power cut may then cost that tree's newest files.
            Err(e) => say!("data: /var/{tree} does not journal file data: {e}"),
        }
    }
    say!(
        "data: {}",
        if formatted {
            "formatted"
        } else if clean {
            "clean"
        } else {
            "recovered after unclean shutdown"
        }
    );
    Ok((formatted, clean))
}

/// Runs mke2fs from the new root (the initramfs carries no e2fsprogs), with /dev and
/// /proc bound into it for the time it runs: it opens the node and checks /proc/mounts.
/// The binds go away again so that the real mounts can be moved there afterwards.
fn format_data(devname: &str) -> Result<(), Fatal> {
    let dev = format!("/dev/{devname}");
    say!("data: {dev} holds no ext4; formatting");
    let mut bound = Vec::new();
    let mut result = Ok(());
    for fs in ["/dev", "/proc"] {
        let target = Path::new(SYSROOT).join(&fs[1..]);
        match rustix::mount::mount_bind(fs, &target) {
            Ok(()) => bound.push(target),
            Err(e) => {
                result = Err(step("formatting the data partition")(format!(
                    "failed to bind {fs} into {}: {}",
                    target.display(),
                    std::io::Error::from(e)
                )));
                break;
            }
        }
    }
    if result.is_ok() {
        result = run_mke2fs(&dev);
    }
    for target in bound.iter().rev() {
        if let Err(e) = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH) {
            say!(
                "data: failed to unmount {}: {}",
                target.display(),
                std::io::Error::from(e)
            );
        }
    }
    result
}

fn run_mke2fs(dev: &str) -> Result<(), Fatal> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(MKE2FS);
    cmd.args(["-t", "ext4", "-q", "-L", "data", "-E"])
        .arg("lazy_itable_init=1,lazy_journal_init=1")
        .arg(dev);
    // SAFETY: chroot and chdir are async-signal-safe syscalls; nothing is allocated.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::chroot(SYSROOT)?;
            rustix::process::chdir("/")?;
            Ok(())
        });
    }
    let status = cmd
        .status()
        .map_err(|e| step("formatting the data partition")(format!("{MKE2FS} {dev}: {e}")))?;
    if !status.success() {
        return Err(step("formatting the data partition")(format!(
            "{MKE2FS} {dev} failed: {status}"
        )));
    }
    Ok(())
}

fn write_boot_info(info: &BootInfo) -> Result<(), String> {
    let dir = Path::new(SYSROOT).join("run/edge");
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
    let path = dir.join("boot.json");
    let json = serde_json::to_string(info).map_err(|e| e.to_string())?;
    std::fs::write(&path, json + "\n")
        .map_err(|e| format!("failed to write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_json_has_the_contract_fields() {
        let info = BootInfo {
            slot: "a",
            version: "0.1.0",
            data_formatted: true,
            data_clean: false,
            stage1_ms: 1234,
        };
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"slot":"a","version":"0.1.0","data_formatted":true,"data_clean":false,"stage1_ms":1234}"#
        );
    }
}
