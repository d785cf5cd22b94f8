//! Stage 1, in the initramfs: open the slot's verified root and the data partition,
//! then switch into them. Every failure ends in one console line naming the step and the
//! thing, then a reboot after 10 s, so the boot loader's boot counting can fall back.

use crate::error::Error;
use crate::sealed_data::{self, Unlock};
use crate::status::Boot;
use crate::{data_journaling, disk, dm, ext4, mounts, rootexec, say, verity};
use rustix::mount::MountFlags;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SYSROOT: &str = "/sysroot";
const DM_NAME: &str = verity::ROOT_DM_NAME;
const PARTITION_TIMEOUT: Duration = Duration::from_secs(30);
const PARTITION_POLL: Duration = Duration::from_millis(50);
const REBOOT_DELAY: Duration = Duration::from_secs(10);

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

fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> Fatal {
    move |e| Fatal::Step {
        step,
        detail: e.to_string(),
    }
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

    for e in edge_kmod::load_list(
        Path::new("/etc/edge/modules"),
        &edge_kmod::running_kernel_dir(),
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
    // Before the root is opened: a fresh disk whose slot A does not verify must still
    // have slot B's entry to fall back to.
    crate::standby::write_if_shipped();

    let root_node = open_verity(
        root_part,
        verity_part,
        &root_label,
        &params.roothash,
        dev_dir,
    )?;
    mount_root(&root_node, &root_label)?;

    let bind_pcrs = params.extra.get("tpm_bind_pcrs").map(String::as_str);
    // Stage 1 runs programs from the root (edge-tpm, cryptsetup, mke2fs): a block of
    // theirs that does not verify fails them with an I/O error or SIGBUS. Whatever the
    // step then says, a root that met a corrupt block is the cause, and is named so.
    let data =
        open_data(data_part, dev_dir, bind_pcrs).map_err(|f| blame_the_root(f, &root_label))?;
    if verity::root_is_corrupt(dev_dir) {
        // A failure stage 1 lives with (a locked data partition) may hide it.
        return Err(Fatal::Verity {
            partition: root_label,
            detail: format!(
                "a block read in stage 1 did not verify{}",
                data.locked
                    .map(|why| format!("; the data partition stayed locked: {why}"))
                    .unwrap_or_default()
            ),
        });
    }
    for fs in ["/proc", "/sys", "/dev", "/run"] {
        mounts::move_mount(Path::new(fs), &Path::new(SYSROOT).join(&fs[1..]))
            .map_err(step("moving mounts into the new root"))?;
    }

    let stage1_ms = start.elapsed().as_millis() as u64;
    let info = Boot {
        slot: params.slot.clone(),
        version: params.version.clone(),
        data_formatted: data.formatted,
        data_clean: data.clean,
        data_locked: data.locked,
        stage1_start_ms: Some(
            crate::logs::uptime()
                .saturating_sub(start.elapsed())
                .as_millis() as u64,
        ),
        stage1_ms: Some(stage1_ms),
        tpm_ms: Some(data.tpm.as_millis() as u64),
        services_start_ms: None,
    };
    write_boot_info(&info).map_err(step("writing /run/edge/boot.json"))?;
    say!("stage 1 done in {stage1_ms} ms; switching to the root");
    let e = mounts::switch_root(Path::new(SYSROOT), "/sbin/init");
    Err(blame_the_root(
        Fatal::Step {
            step: "switching root",
            detail: e,
        },
        &root_label,
    ))
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
    let sb =
        verity::read_superblock(&hash.node(dev_dir)).map_err(|e| verity_fail(e.to_string()))?;
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
        return Err(verity_fail(e.to_string()));
    }
    let node = disk::BlockDev {
        devname: format!("dm-{minor}"),
        partname: None,
        major,
        minor,
    };
    disk::ensure_node(&node, dev_dir).map_err(step("creating the dm-verity device node"))
}

/// A step that failed once the root was open: a verity failure if the root met a
/// corrupt block meanwhile (the step's own words kept as the detail).
fn blame_the_root(f: Fatal, label: &str) -> Fatal {
    match f {
        Fatal::Step { step, detail } if verity::root_is_corrupt(Path::new("/dev")) => {
            Fatal::Verity {
                partition: label.to_owned(),
                detail: format!("{step}: {detail}"),
            }
        }
        other => other,
    }
}

/// Mounts the verified root read-only; a read error or a corrupt status is a verity failure.
fn mount_root(node: &Path, label: &str) -> Result<(), Fatal> {
    let source = node.to_string_lossy().into_owned();
    let mounted = mounts::mount(&source, Path::new(SYSROOT), "erofs", MountFlags::RDONLY, "");
    let corrupt = verity::root_is_corrupt(Path::new("/dev"));
    match mounted {
        // A read error under dm-verity is a block that did not verify.
        Err(Error::Mount { errno, .. }) if corrupt || errno == rustix::io::Errno::IO => {
            Err(Fatal::Verity {
                partition: label.to_owned(),
                detail: format!("mount: {}", mounts::errno_text(errno)),
            })
        }
        Err(e) => Err(step("mounting the root")(e)),
        Ok(()) if corrupt => Err(Fatal::Verity {
            partition: label.to_owned(),
            detail: "device-mapper status reports a corrupted block".to_owned(),
        }),
        Ok(()) => Ok(()),
    }
}

/// What became of the data partition.
struct Data {
    formatted: bool,
    clean: bool,
    locked: Option<String>,
    tpm: Duration,
}

/// Opens the sealed data partition (making it on the first boot) and mounts it on
/// /sysroot/var. A partition the TPM will not open stays closed and unmounted: that is
/// not fatal, stage 2 reports it.
fn open_data(
    part: &disk::BlockDev,
    dev_dir: &Path,
    bind_pcrs: Option<&str>,
) -> Result<Data, Fatal> {
    let binds =
        rootexec::Binds::new(Path::new(SYSROOT)).map_err(step("binding /dev /proc /sys /run"))?;
    let (unlock, tpm) = sealed_data::open(&binds, part, dev_dir, bind_pcrs);
    drop(binds);
    let (node, recovery) = match unlock {
        Unlock::Opened { node, recovery } => (node, recovery),
        Unlock::Locked(why) => {
            say!("data: locked: {why}");
            say!("data: not mounted, nothing on it touched; the services stay down");
            return Ok(Data {
                formatted: false,
                clean: false,
                locked: Some(why),
                tpm,
            });
        }
    };
    let state = ext4::read(&node)
        .map_err(step("reading the data partition"))?
        .ok_or_else(|| {
            step("reading the data partition")(format!("{} holds no ext4", node.display()))
        })?;
    if state.errors {
        say!(
            "data: the kernel recorded file system errors on {}",
            node.display()
        );
    }
    let formatted = recovery.is_some();
    let clean = !formatted && !state.needs_recovery;
    // nodelalloc: the per-file data journaling of `data_journaling` needs it.
    mounts::mount(
        &node.to_string_lossy(),
        &Path::new(SYSROOT).join("var"),
        "ext4",
        MountFlags::NOSUID,
        "nodelalloc",
    )
    .map_err(step("mounting the data partition"))?;
    for tree in data_journaling::JOURNALED {
        let dir = Path::new(SYSROOT).join("var").join(tree);
        match data_journaling::journal_data(&dir) {
            Ok(0) => {}
            Ok(n) => say!("data: /var/{tree} journals file data ({n} inodes changed)"),
            // The box still boots; a power cut may then cost that tree's newest files.
            Err(e) => say!("data: /var/{tree} does not journal file data: {e}"),
        }
    }
    if let Some(recovery) = recovery {
        match sealed_data::keep_for_escrow(&Path::new(SYSROOT).join("var"), &recovery) {
            Ok(()) => say!(
                "data: the recovery key waits in /var/{} for enrollment to escrow it to the core",
                sealed_data::RECOVERY_FOR_ESCROW
            ),
            // The console showed it; only the escrow is lost.
            Err(e) => say!("data: the recovery key is not kept for escrow: {e}"),
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
    Ok(Data {
        formatted,
        clean,
        locked: None,
        tpm,
    })
}

fn write_boot_info(info: &Boot) -> Result<(), Error> {
    let dir = Path::new(SYSROOT).join("run/edge");
    std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
    let path = dir.join("boot.json");
    let json = serde_json::to_string(info).map_err(Error::io("serialize", &path))?;
    std::fs::write(&path, json + "\n").map_err(Error::io("write", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_json_has_the_contract_fields_and_reads_back() {
        let info = Boot {
            slot: "a".into(),
            version: "0.1.0".into(),
            data_formatted: true,
            data_clean: false,
            data_locked: None,
            stage1_start_ms: Some(2100),
            stage1_ms: Some(1234),
            tpm_ms: Some(120),
            services_start_ms: None,
        };
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(
            json,
            r#"{"slot":"a","version":"0.1.0","data_formatted":true,"data_clean":false,"stage1_start_ms":2100,"stage1_ms":1234,"tpm_ms":120}"#
        );
        assert_eq!(serde_json::from_str::<Boot>(&json).unwrap(), info);
        let locked = Boot {
            data_locked: Some("the TPM refused the data key: ...".into()),
            ..info
        };
        assert!(serde_json::to_string(&locked)
            .unwrap()
            .contains(r#""data_locked":"the TPM refused the data key: ...""#));
        // What an older stage 1 left out reads as it did before.
        let old: Boot = serde_json::from_str(r#"{"slot":"b","version":"0.0.9"}"#).unwrap();
        assert!(old.data_clean && !old.data_formatted && old.stage1_ms.is_none());
    }
}
