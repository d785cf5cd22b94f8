//! The node side of volumes: what is mounted where (from /proc/self/mountinfo), mounting
//! and bind-mounting, probing a device for a filesystem before formatting it, ext4 and
//! XFS format and online grow (e2fsprogs, xfsprogs), and statvfs usage.

use std::ffi::CString;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Result};

/// One line of /proc/self/mountinfo, the fields storaged uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The device of the mounted filesystem.
    pub dev: (u32, u32),
    /// The path inside that filesystem that is mounted (a bind mount of a file or
    /// directory shows it here).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub read_only: bool,
    pub fs_type: String,
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let f: Vec<&str> = pre.split(' ').collect();
            let (major, minor) = f.get(2)?.split_once(':')?;
            let opts = f.get(5)?;
            Some(MountEntry {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                root: PathBuf::from(unescape(f.get(3)?)),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                read_only: opts.split(',').any(|o| o == "ro"),
                fs_type: post.split(' ').next()?.to_owned(),
            })
        })
        .collect()
}

pub fn mounts() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The last mount on `path` (the one a process sees), if any.
pub fn mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

fn cstr(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// mount(2) of a filesystem.
pub fn mount_fs(
    source: &Path,
    target: &Path,
    fs_type: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let (s, t) = (cstr(source)?, cstr(target)?);
    let f = CString::new(fs_type).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let d = CString::new(data).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: NUL-terminated strings that live across the call.
    check(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) })
}

/// Bind-mounts `source` on `target`; read-only takes a second call, as the kernel
/// ignores MS_RDONLY on the bind itself.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> std::io::Result<()> {
    let (s, t) = (cstr(source)?, cstr(target)?);
    // SAFETY: NUL-terminated strings; no filesystem type or data for a bind.
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })?;
    if read_only {
        // SAFETY: as above.
        let r = check(unsafe {
            libc::mount(
                std::ptr::null(),
                t.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        });
        if let Err(e) = r {
            // A writable bind where read-only was asked for must not stay.
            let _ = unmount(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target`; Ok(false) if nothing was mounted there.
pub fn unmount(target: &Path) -> std::io::Result<bool> {
    let t = cstr(target)?;
    // SAFETY: a NUL-terminated path.
    match check(unsafe { libc::umount2(t.as_ptr(), 0) }) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The filesystems a volume may be formatted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Ext4,
    Xfs,
}

impl Fs {
    /// The CSI `fs_type` (and mount(2) type) name.
    pub fn name(self) -> &'static str {
        match self {
            Fs::Ext4 => "ext4",
            Fs::Xfs => "xfs",
        }
    }

    /// `fs_type` as CSI gives it: empty is "no preference" (None).
    pub fn parse(fs_type: &str) -> Result<Option<Fs>, String> {
        match fs_type {
            "" => Ok(None),
            "ext4" => Ok(Some(Fs::Ext4)),
            "xfs" => Ok(Some(Fs::Xfs)),
            other => Err(format!("fs_type {other:?} is not supported (ext4 or xfs)")),
        }
    }

    /// The smallest volume this filesystem can be made on. xfsprogs 5.19 and later
    /// refuse data devices under 300 MiB (the size below which XFS's log and AG
    /// geometry stop being tested upstream).
    pub fn min_bytes(self) -> u64 {
        match self {
            Fs::Ext4 => 0,
            Fs::Xfs => 300 << 20,
        }
    }

    /// Options every mount of this filesystem gets. XFS refuses a second mount of a
    /// filesystem whose UUID is already mounted, and a snapshot or clone of a volume
    /// carries its origin's UUID: `nouuid` lets both be mounted side by side. Giving
    /// the clone a new UUID instead (xfs_admin -U) needs a clean log, which a snapshot
    /// of a mounted volume does not have until it is mounted once.
    pub fn mount_options(self) -> &'static str {
        match self {
            Fs::Ext4 => "",
            Fs::Xfs => "nouuid",
        }
    }
}

/// What the start of a volume holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Zeros (a fresh thin volume): may be formatted.
    Empty,
    Fs(Fs),
    /// Anything else: never formatted over.
    Other(String),
}

/// The ext2/3/4 superblock is at byte 1024; its magic 0xEF53 at offset 56 in it.
const EXT_MAGIC_AT: usize = 1024 + 56;

/// Reads the start of `device` (as much as the pool's probe looks at) and says what
/// it holds.
pub fn probe(device: &Path) -> std::io::Result<Content> {
    let f = std::fs::File::open(device)?;
    let mut head = vec![0u8; crate::superblock::PROBE_BYTES];
    // A volume smaller than the probe is read as far as it goes.
    let mut got = 0;
    while got < head.len() {
        match f.read_at(&mut head[got..], got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    head.truncate(got);
    Ok(classify(&head))
}

fn classify(head: &[u8]) -> Content {
    if head.iter().all(|b| *b == 0) {
        return Content::Empty;
    }
    if head.get(EXT_MAGIC_AT..EXT_MAGIC_AT + 2) == Some(&[0x53, 0xef]) {
        return Content::Fs(Fs::Ext4);
    }
    if head.get(..4) == Some(b"XFSB") {
        return Content::Fs(Fs::Xfs);
    }
    match crate::superblock::probe(head) {
        crate::superblock::Probe::Foreign(what) => Content::Other(what),
        _ => Content::Other("unrecognised data".into()),
    }
}

/// A filesystem program from the usual places (daemons may run with no PATH).
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    let path = tool(program);
    let out = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io("failed to run", &path))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Tool {
        program: path,
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Formats an empty volume as `fs`.
pub fn mkfs(fs: Fs, device: &Path) -> Result<()> {
    match fs {
        Fs::Ext4 => mkfs_ext4(device),
        Fs::Xfs => mkfs_xfs(device),
    }
}

/// Formats an empty volume as ext4. `nodiscard` and `assume_storage_prezeroed`: a new
/// thin volume reads as zeros already, so mke2fs neither discards nor writes inode
/// tables, and the volume takes pool space only for what the filesystem really writes.
/// No reserved blocks: the volume is the pod's, not root's.
pub fn mkfs_ext4(device: &Path) -> Result<()> {
    run(
        "mke2fs",
        &[
            "-q".as_ref(),
            "-t".as_ref(),
            "ext4".as_ref(),
            "-m".as_ref(),
            "0".as_ref(),
            "-E".as_ref(),
            "nodiscard,assume_storage_prezeroed=1".as_ref(),
            device.as_os_str(),
        ],
    )
}

/// Formats an empty volume as XFS. `-K`: no discard, a new thin volume has nothing
/// mapped to discard. (mkfs.xfs still writes its whole log, 64 MiB on small volumes;
/// it has no "storage is zeroed" option.)
pub fn mkfs_xfs(device: &Path) -> Result<()> {
    run(
        "mkfs.xfs",
        &["-q".as_ref(), "-K".as_ref(), device.as_os_str()],
    )
}

/// Grows a mounted filesystem online to its device's size: resize2fs takes the device,
/// xfs_growfs the mount point.
pub fn grow(fs: Fs, device: &Path, mount_point: &Path) -> Result<()> {
    match fs {
        Fs::Ext4 => grow_ext4(device),
        Fs::Xfs => run("xfs_growfs", &["-d".as_ref(), mount_point.as_os_str()]),
    }
}

/// Grows the ext4 filesystem on `device` (mounted: online) to the device's size.
pub fn grow_ext4(device: &Path) -> Result<()> {
    run("resize2fs", &[device.as_os_str()])
}

/// Bytes and inodes of the filesystem at `path`.
pub struct Usage {
    pub bytes_total: u64,
    pub bytes_available: u64,
    pub bytes_used: u64,
    pub inodes_total: u64,
    pub inodes_available: u64,
    pub inodes_used: u64,
}

pub fn statvfs(path: &Path) -> std::io::Result<Usage> {
    let p = cstr(path)?;
    // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    let frsize = st.f_frsize as u64;
    Ok(Usage {
        bytes_total: st.f_blocks as u64 * frsize,
        bytes_available: st.f_bavail as u64 * frsize,
        bytes_used: (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * frsize,
        inodes_total: st.f_files as u64,
        inodes_available: st.f_favail as u64,
        inodes_used: (st.f_files as u64).saturating_sub(st.f_ffree as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/root rw\n\
                    40 35 0:5 /mapper/edgepool-v-x /pods/p1/dev ro,relatime - devtmpfs udev rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[0].mount_point, Path::new("/mnt/a b"));
        assert!(!m[0].read_only);
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[1].root, Path::new("/mapper/edgepool-v-x"));
        assert!(m[1].read_only);
        assert_eq!(mount_at(&m, Path::new("/pods/p1/dev")), Some(&m[1]));
    }

    #[test]
    fn only_zeros_may_be_formatted() {
        let mut head = vec![0u8; 64 * 1024];
        assert_eq!(classify(&head), Content::Empty);
        head[EXT_MAGIC_AT] = 0x53;
        head[EXT_MAGIC_AT + 1] = 0xef;
        assert_eq!(classify(&head), Content::Fs(Fs::Ext4));
        let mut xfs = vec![0u8; 64 * 1024];
        xfs[..4].copy_from_slice(b"XFSB");
        assert_eq!(classify(&xfs), Content::Fs(Fs::Xfs));
        let mut data = vec![0u8; 64 * 1024];
        data[40_000] = 1;
        assert!(matches!(classify(&data), Content::Other(_)));
        let mut swap = vec![0u8; 64 * 1024];
        swap[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(classify(&swap), Content::Other("a swap area".into()));
    }

    #[test]
    fn fs_types() {
        assert_eq!(Fs::parse(""), Ok(None));
        assert_eq!(Fs::parse("xfs"), Ok(Some(Fs::Xfs)));
        let e = Fs::parse("btrfs").unwrap_err();
        assert!(e.contains("\"btrfs\"") && e.contains("ext4 or xfs"), "{e}");
    }
}
