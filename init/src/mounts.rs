//! Mounting for stage 1: the early API file systems, the new root and data, moving mounts
//! into the new root, and the switch itself (empty the initramfs, make the new root `/`,
//! exec its init).

use rustix::mount::{MountFlags, MountPropagationFlags};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use crate::error::{Error, Result};

/// The error's description without std's " (os error N)" suffix, which reads as noise in
/// a console line that already names what failed.
pub fn errno_text(e: rustix::io::Errno) -> String {
    let mut text = std::io::Error::from(e).to_string();
    if let Some(i) = text.find(" (os error ") {
        text.truncate(i);
    }
    text
}

/// Mounts `fstype` from `source` on `target`, creating the directory if needed. A failure
/// is `Error::Mount`, keeping the kernel's errno (a caller may tell errors apart by it).
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> Result<()> {
    let _ = std::fs::create_dir_all(target);
    let data = CString::new(data).map_err(|_| Error::MountOptions {
        what: source.to_owned(),
    })?;
    rustix::mount::mount(source, target, fstype, flags, data.as_c_str()).map_err(|errno| {
        Error::Mount {
            what: source.to_owned(),
            fstype: fstype.to_owned(),
            target: target.to_path_buf(),
            errno,
        }
    })
}

/// proc, sysfs, devtmpfs and a tmpfs /run. An already-mounted one (the kernel may mount
/// devtmpfs itself with CONFIG_DEVTMPFS_MOUNT) counts as mounted.
pub fn mount_early() -> Result<()> {
    let nosuid_noexec_nodev = MountFlags::NOSUID | MountFlags::NOEXEC | MountFlags::NODEV;
    let list: [(&str, &str, MountFlags, &str); 4] = [
        ("proc", "/proc", nosuid_noexec_nodev, ""),
        ("sysfs", "/sys", nosuid_noexec_nodev, ""),
        ("devtmpfs", "/dev", MountFlags::NOSUID, "mode=0755"),
        (
            "tmpfs",
            "/run",
            MountFlags::NOSUID | MountFlags::NODEV,
            "mode=0755",
        ),
    ];
    for (fstype, target, flags, data) in list {
        if is_mount_point(Path::new(target)) {
            continue;
        }
        mount(fstype, Path::new(target), fstype, flags, data)?;
    }
    Ok(())
}

/// A directory whose device differs from its parent's is a mount point (good enough in
/// the initramfs, where nothing is bind-mounted onto its own file system).
pub fn is_mount_point(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return true;
    };
    match (std::fs::metadata(path), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

/// MS_MOVE of a mount to a new place.
pub fn move_mount(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::create_dir_all(to);
    rustix::mount::mount_move(from, to).map_err(Error::io_to("move mount", from, "to", to))
}

const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Removes everything under `dir` that is on device `dev`, never descending into another
/// mount. Failures are counted, not fatal: a leftover file costs RAM, not the boot.
fn delete_tree(dir: &Path, dev: u64, failures: &mut usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        *failures += 1;
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            *failures += 1;
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        let removed = if meta.is_dir() {
            delete_tree(&path, dev, failures);
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if removed.is_err() {
            *failures += 1;
        }
    }
}

/// Switches from the initramfs to `new_root` (already holding /proc, /sys, /dev, /run):
/// frees the initramfs, makes `new_root` the root and execs `init` in it. Returns only on
/// failure.
pub fn switch_root(new_root: &Path, init: &str) -> String {
    let fail = |what: &str, e: String| format!("switch_root: {what}: {e}");
    let root_meta = match std::fs::metadata("/") {
        Ok(m) => m,
        Err(e) => return fail("stat /", e.to_string()),
    };
    let new_meta = match std::fs::metadata(new_root) {
        Ok(m) => m,
        Err(e) => return fail(&format!("stat {}", new_root.display()), e.to_string()),
    };
    if root_meta.dev() == new_meta.dev() {
        return fail(
            &new_root.display().to_string(),
            "is not a mount point".to_owned(),
        );
    }
    // Only ever empty an initramfs: deleting "/" on any real file system would be a disaster.
    // f_type's width differs between architectures (i64 here, u32 on some).
    #[allow(clippy::unnecessary_cast)]
    let fs_type = rustix::fs::statfs("/").map(|st| st.f_type as i64);
    match fs_type {
        Ok(RAMFS_MAGIC | TMPFS_MAGIC) => {
            let mut failures = 0;
            delete_tree(Path::new("/"), root_meta.dev(), &mut failures);
            if failures > 0 {
                crate::say!("switch_root: {failures} initramfs entries could not be removed");
            }
        }
        Ok(_) => crate::say!("switch_root: / is not an initramfs; leaving its contents"),
        Err(e) => crate::say!("switch_root: statfs /: {}", errno_text(e)),
    }
    if let Err(e) = rustix::process::chdir(new_root) {
        return fail(&format!("chdir {}", new_root.display()), errno_text(e));
    }
    if let Err(e) = rustix::mount::mount_move(".", "/") {
        return fail(&format!("move {} to /", new_root.display()), errno_text(e));
    }
    if let Err(e) = rustix::process::chroot(".") {
        return fail("chroot", errno_text(e));
    }
    if let Err(e) = rustix::process::chdir("/") {
        return fail("chdir /", errno_text(e));
    }
    // Stage 2 expects private propagation as the kernel gives it; nothing to change here,
    // but make it explicit so a future shared root does not surprise the supervisor.
    let _ = rustix::mount::mount_change("/", MountPropagationFlags::PRIVATE);
    let err = std::process::Command::new(init).arg0(init).exec();
    fail(&format!("exec {init}"), err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_tree_removes_files_and_directories_on_its_own_device() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("lib/modules/x")).unwrap();
        std::fs::write(d.join("lib/modules/x/a.ko"), b"x").unwrap();
        std::fs::write(d.join("init"), b"x").unwrap();
        std::os::unix::fs::symlink("/nonexistent", d.join("link")).unwrap();
        let dev = std::fs::metadata(d).unwrap().dev();
        let mut failures = 0;
        delete_tree(d, dev, &mut failures);
        assert_eq!(failures, 0);
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 0);
    }

    #[test]
    fn delete_tree_leaves_other_devices_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep"), b"x").unwrap();
        let mut failures = 0;
        // Pretend the tree is on another device: nothing may be touched.
        delete_tree(dir.path(), u64::MAX, &mut failures);
        assert!(dir.path().join("keep").exists());
    }

    #[test]
    fn errno_text_is_the_plain_description() {
        assert_eq!(errno_text(rustix::io::Errno::IO), "Input/output error");
    }

    #[test]
    fn root_is_a_mount_point_and_a_plain_directory_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(!is_mount_point(&dir.path().join("sub")));
    }
}
