//! File data that must survive a power cut in step with its metadata: containerd's tree
//! on the data partition journals file data as well as metadata (ext4's per-inode data
//! journaling, `chattr +j`, which the kernel honours only without delayed allocation:
//! the data partition is mounted `nodelalloc`).
//!
//! Why: containerd (1.6, Debian's) unpacks an image layer into a snapshot directory and
//! then records the snapshot as committed in its bolt database with an fsync, but never
//! syncs the unpacked files. A power cut in the half minute before writeback leaves the
//! snapshot recorded and its files empty (pause, sensor and inference at size 0 in the
//! power_cut test), and every later start of those images fails. With journaled data,
//! an fsync of any file in the tree commits the whole running transaction, so the
//! database's commit carries the files written before it.
//!
//! New files inherit the flag from their directory. A tree made before this (an older
//! image) is walked once; a marker file records that the walk finished.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use rustix::fs::{IFlags, Mode, OFlags};

use crate::error::{Error, Result};

/// Relative to /var: the trees whose file data is journaled.
pub const JOURNALED: &[&str] = &["lib/containerd"];
/// Written in a tree's top directory once every directory and file in it has the flag.
const MARKER: &str = ".edgeos-journaled";

/// Makes `dir` (created, mode 0711, if missing) journal the data of every file in it.
/// Returns how many inodes had to be changed.
pub fn journal_data(dir: &Path) -> Result<u64> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(Error::io("create", dir))?;
    }
    let mut changed = u64::from(set_flag(dir)?);
    if dir.join(MARKER).exists() {
        return Ok(changed);
    }
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d).map_err(Error::io("list", &d))?;
        for entry in entries {
            let entry = entry.map_err(Error::io("list", &d))?;
            let ty = entry.file_type().map_err(Error::io("stat", entry.path()))?;
            // Symlinks, devices (overlayfs whiteouts), fifos and sockets hold no data.
            if ty.is_dir() {
                changed += u64::from(set_flag(&entry.path())?);
                pending.push(entry.path());
            } else if ty.is_file() {
                changed += u64::from(set_flag(&entry.path())?);
            }
        }
    }
    let marker = dir.join(MARKER);
    std::fs::write(&marker, b"")
        .and_then(|()| std::fs::File::open(&marker)?.sync_all())
        .map_err(Error::io("write", &marker))?;
    Ok(changed)
}

/// Sets `FS_JOURNAL_DATA_FL` on one directory or regular file; true if it was not set.
fn set_flag(path: &Path) -> Result<bool> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Error::io("open", path))?;
    let flags =
        rustix::fs::ioctl_getflags(&fd).map_err(Error::io("read the inode flags of", path))?;
    if flags.contains(IFlags::JOURNALING) {
        return Ok(false);
    }
    rustix::fs::ioctl_setflags(&fd, flags | IFlags::JOURNALING)
        .map_err(Error::io("set data journaling on", path))?;
    Ok(true)
}
