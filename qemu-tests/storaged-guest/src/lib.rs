//! The guest side of storaged's light-VM tests and bench: what both programs do as PID 1
//! of a Debian kernel booted by qemu-tests' `lightvm` before their scenarios run (the
//! file systems, the console, the kernel modules), and finding a raw disk by its
//! serial number. Not part of the product: the image never holds these programs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Mounts `src` (of type `fstype`) at `target`, making the directory; a failure shows
/// later as the scenario's own.
pub fn mount(src: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (s, t, f) = (c(src), c(target), c(fstype));
    // SAFETY: NUL-terminated strings, no data argument.
    unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
}

/// What PID 1 of the light VM sets up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Setup {
    /// A tmpfs at /tmp.
    pub tmp: bool,
    /// Kernel messages off the console, so they do not cut a result line.
    pub quiet_kernel: bool,
}

/// /proc, /sys, /dev, the console as stdout and stderr, and the modules of
/// /modules.order (each one that fails is printed).
pub fn setup(s: Setup) {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    if s.tmp {
        mount("tmpfs", "/tmp", "tmpfs");
    }
    if let Ok(console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        use std::os::fd::AsRawFd;
        // SAFETY: duplicating a valid descriptor onto stdout and stderr.
        unsafe {
            libc::dup2(console.as_raw_fd(), 1);
            libc::dup2(console.as_raw_fd(), 2);
        }
    }
    if s.quiet_kernel {
        let _ = std::fs::write("/proc/sys/kernel/printk", "1");
    }
    // The light VM's initramfs lists its modules by absolute path.
    for e in edge_kmod::load_list(Path::new("/modules.order"), Path::new("/")) {
        println!("modules: {e}");
    }
}

/// The /dev node of the virtio disk that reports `serial`, waited for up to 15 s.
pub fn disk(serial: &str) -> Result<PathBuf, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for e in std::fs::read_dir("/sys/block")
            .map_err(|e| format!("/sys/block: {e}"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
            let node = Path::new("/dev").join(&name);
            if s.trim() == serial && node.exists() {
                return Ok(node);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no disk with serial {serial}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Brings up `lo`: the initramfs has no network setup (storaged's metrics endpoint and
/// the bench's NFS server are on loopback).
pub fn loopback_up() -> Result<(), String> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: a socket used only for the two interface ioctls on a valid ifreq.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if s < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut rc = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(s, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(s);
        if rc != 0 {
            return Err(format!("bringing up lo: {err}"));
        }
    }
    Ok(())
}
