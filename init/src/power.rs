//! Power: the ACPI power button (evdev), and the end of the system — killing what is
//! left, syncing, unmounting /var for real (ext4's clean flag is what the next boot
//! checks) and the final reboot(2).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;
/// struct input_event on 64-bit: timeval (16), type, code (u16 each), value (i32).
const EVENT_SIZE: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Poweroff,
    Reboot,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Poweroff => "poweroff",
            Action::Reboot => "reboot",
        }
    }
}

/// The open "Power Button" input devices.
#[derive(Default)]
pub struct Buttons {
    files: Vec<(String, File)>,
}

impl Buttons {
    /// Opens every input device named "Power Button" not yet open. Returns the new ones.
    pub fn scan(&mut self, class: &Path, dev: &Path) -> Vec<String> {
        let mut new = Vec::new();
        let Ok(entries) = std::fs::read_dir(class) else {
            return new;
        };
        for e in entries.flatten() {
            let node = e.file_name().to_string_lossy().into_owned();
            if !node.starts_with("event") || self.files.iter().any(|(n, _)| *n == node) {
                continue;
            }
            let name = std::fs::read_to_string(e.path().join("device/name")).unwrap_or_default();
            if name.trim() != "Power Button" {
                continue;
            }
            use std::os::unix::fs::OpenOptionsExt;
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(dev.join(&node))
            {
                new.push(node.clone());
                self.files.push((node, f));
            }
        }
        new
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn poll_fds(&self) -> Vec<RawFd> {
        self.files.iter().map(|(_, f)| f.as_raw_fd()).collect()
    }

    /// True when a press arrived.
    pub fn pressed(&mut self) -> bool {
        let mut pressed = false;
        let mut buf = [0u8; EVENT_SIZE * 16];
        for (_, f) in &mut self.files {
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                pressed |= buf[..n].chunks_exact(EVENT_SIZE).any(is_power_press);
            }
        }
        pressed
    }
}

pub fn is_power_press(ev: &[u8]) -> bool {
    let ty = u16::from_ne_bytes([ev[16], ev[17]]);
    let code = u16::from_ne_bytes([ev[18], ev[19]]);
    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
    ty == EV_KEY && code == KEY_POWER && value == 1
}

fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes into our integer.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            break;
        }
    }
}

/// Mount points under (and including) `top`, deepest first.
fn mounts_under(top: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == top || p.starts_with(&format!("{top}/")))
        .map(|p| p.replace("\\040", " "))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    points
}

/// Ends the system: every process gets SIGTERM then SIGKILL, file systems are synced
/// and /var unmounted, then the kernel powers off or reboots. `pet` keeps the watchdog
/// fed so that only a real hang here resets the box.
pub fn finish(action: Action, pet: &mut dyn FnMut()) -> ! {
    // SAFETY: kill(-1) signals every process but ourselves; we are PID 1.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        reap_all();
        // ESRCH from kill(-1, 0) means no process is left to signal.
        // SAFETY: signal 0 only checks.
        if unsafe { libc::kill(-1, 0) } != 0 {
            break;
        }
        pet();
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(100));
    reap_all();
    rustix::fs::sync();
    pet();
    // Containers' root file systems and shm mounts live under /run, and their overlay
    // layers on /var: they go first, or /var stays busy and is left unclean.
    let run_mounts = mounts_under("/run").into_iter().filter(|m| m != "/run");
    for m in run_mounts
        .chain(mounts_under("/efi"))
        .chain(mounts_under("/var"))
    {
        if let Err(e) = rustix::mount::unmount(m.as_str(), rustix::mount::UnmountFlags::empty()) {
            crate::say!(
                "failed to unmount {m}: {}; remounting read-only",
                std::io::Error::from(e)
            );
            let _ = rustix::mount::mount_remount(m.as_str(), rustix::mount::MountFlags::RDONLY, "");
        }
    }
    rustix::fs::sync();
    pet();
    crate::say!(
        "{}",
        if action == Action::Poweroff {
            "powering off"
        } else {
            "rebooting"
        }
    );
    let cmd = match action {
        Action::Poweroff => rustix::system::RebootCommand::PowerOff,
        Action::Reboot => rustix::system::RebootCommand::Restart,
    };
    let r = rustix::system::reboot(cmd);
    crate::say!("reboot(2) failed: {:?}", r.err());
    loop {
        pet();
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&ty.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(1, 116, 1)));
        assert!(!is_power_press(&event(1, 116, 0)), "release");
        assert!(!is_power_press(&event(0, 0, 0)), "sync report");
        assert!(!is_power_press(&event(1, 30, 1)), "another key");
    }
}
