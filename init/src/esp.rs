//! The ESP, mounted only for a moment: to bless this boot's entry (systemd-boot's boot
//! counting), and for updates to write or release a slot's UKI and for provisioning to
//! read its file.

use std::path::Path;

use crate::error::{Error, Result};
use crate::say;
use crate::status::Boot;

/// One user of /efi at a time: the blessing, an install and the floor's marking run on
/// threads of their own.
static ESP: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Mounts the ESP at /efi for `f`, then syncs it and unmounts it.
pub fn with_esp<T>(f: impl FnOnce(&Path) -> T) -> Result<T> {
    let _one = ESP.lock().unwrap_or_else(|e| e.into_inner());
    let devs = crate::disk::scan(Path::new("/sys/class/block"));
    let esp = crate::disk::find_labels(&devs, &["esp"])
        .remove("esp")
        .cloned()
        .ok_or_else(|| Error::NoDevice {
            what: "partition labelled esp".into(),
        })?;
    let node = crate::disk::ensure_node(&esp, Path::new("/dev"))?;
    let _ = std::fs::create_dir_all("/efi");
    let mount = || {
        rustix::mount::mount(
            node.as_path(),
            "/efi",
            "vfat",
            rustix::mount::MountFlags::NOSUID
                | rustix::mount::MountFlags::NODEV
                | rustix::mount::MountFlags::NOEXEC,
            None,
        )
    };
    match mount() {
        // Still mounted by an earlier user whose unmount failed: detached, then mounted.
        Err(rustix::io::Errno::BUSY) => {
            let _ = rustix::mount::unmount("/efi", rustix::mount::UnmountFlags::DETACH);
            mount()
        }
        other => other,
    }
    .map_err(Error::io_to("mount", &node, "at", "/efi"))?;
    let out = f(Path::new("/efi"));
    // The ESP's writes only (a global sync would also flush everything else dirty, on
    // a first boot the new data partition's file system, before the services start).
    if let Ok(dir) = std::fs::File::open("/efi") {
        let _ = rustix::fs::syncfs(&dir);
    }
    unmount_efi();
    Ok(out)
}

/// Unmounts /efi, whose writes are synced. A service PID 1 forks while /efi is mounted
/// holds a copy of any directory open there until it execs, so the unmount can find it
/// busy for a moment: it is tried again, then detached (the file system goes when the
/// last such copy closes), so that the next user can mount it again.
fn unmount_efi() {
    use rustix::mount::{unmount, UnmountFlags};
    for _ in 0..20 {
        match unmount("/efi", UnmountFlags::empty()) {
            Ok(()) => return,
            Err(rustix::io::Errno::BUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(e) => {
                say!(
                    "warning: failed to unmount /efi: {}",
                    std::io::Error::from(e)
                );
                return;
            }
        }
    }
    if let Err(e) = unmount("/efi", UnmountFlags::DETACH) {
        say!(
            "warning: failed to unmount /efi: busy for 1 s, and detaching it failed: {}",
            std::io::Error::from(e)
        );
    }
}

/// `edgeos-<v>-<s>+<left>[-<done>].efi` -> `edgeos-<v>-<s>.efi`; `None` for other names.
pub fn blessed_name(file: &str, version: &str, slot: &str) -> Option<String> {
    let stem = format!("edgeos-{version}-{slot}");
    let counter = file
        .strip_prefix(&stem)?
        .strip_prefix('+')?
        .strip_suffix(".efi")?;
    let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
    if left.is_empty()
        || !left.bytes().all(|b| b.is_ascii_digit())
        || !done.bytes().all(|b| b.is_ascii_digit())
        || done.is_empty()
    {
        return None;
    }
    Some(format!("{stem}.efi"))
}

/// Marks this boot good for systemd-boot's boot counting: the booted UKI loses its
/// `+left-done` counter.
pub fn bless(boot: &Boot) -> Result<()> {
    let line = with_esp(|esp| -> Result<String> {
        let dir = esp.join("EFI/Linux");
        let entries = std::fs::read_dir(&dir).map_err(Error::io("list", &dir))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(new) = blessed_name(&name, &boot.version, &boot.slot) {
                std::fs::rename(dir.join(&name), dir.join(&new))
                    .map_err(Error::io_to("rename", &name, "to", &new))?;
                return Ok(format!("boot blessed: {name} -> {new}"));
            }
        }
        Ok(format!(
            "boot already blessed (edgeos-{}-{}.efi)",
            boot.version, boot.slot
        ))
    })??;
    say!("{line}");
    Ok(())
}

/// [`bless`] on a thread of its own: the ESP's mount and sync wait for the disk, which the
/// loop that pets the watchdog must not. A failure is said on the console.
pub fn bless_in_background(boot: &Boot) {
    let boot = boot.clone();
    let spawned = std::thread::Builder::new()
        .name("bless".into())
        .spawn(move || {
            if let Err(e) = bless(&boot) {
                say!("warning: failed to bless the boot: {e}");
            }
        });
    if let Err(e) = spawned {
        say!("warning: failed to bless the boot: no thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blessing_drops_the_boot_counter() {
        assert_eq!(
            blessed_name("edgeos-0.1.0-a+2-1.efi", "0.1.0", "a").as_deref(),
            Some("edgeos-0.1.0-a.efi")
        );
        assert_eq!(
            blessed_name("edgeos-0.1.0-a+3.efi", "0.1.0", "a").as_deref(),
            Some("edgeos-0.1.0-a.efi")
        );
        assert_eq!(
            blessed_name("edgeos-0.1.0-a.efi", "0.1.0", "a"),
            None,
            "already blessed"
        );
        assert_eq!(
            blessed_name("edgeos-0.1.0-b+3.efi", "0.1.0", "a"),
            None,
            "other slot"
        );
        assert_eq!(
            blessed_name("edgeos-0.2.0-a+3.efi", "0.1.0", "a"),
            None,
            "other version"
        );
    }
}
