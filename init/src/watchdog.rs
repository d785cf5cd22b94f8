//! The hardware watchdog (/dev/watchdog; i6300esb in QEMU). Once armed it is never closed
//! or disarmed: if PID 1 stops petting it, hangs or dies, the box resets.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

// _IOR('W', 2, int), _IOR('W', 5, int) and _IOWR('W', 6, int) from linux/watchdog.h.
const WDIOC_GETBOOTSTATUS: libc::c_ulong = 0x8004_5702;
const WDIOC_KEEPALIVE: libc::c_ulong = 0x8004_5705;
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;
/// The boot-status bit of a card that reset the machine (linux/watchdog.h).
const WDIOF_CARDRESET: libc::c_int = 0x0020;

/// Locks every page PID 1 has mapped (its program and libraries, read from the verified
/// root) into memory, so that petting the watchdog, the control port and the console
/// never wait for the disk: a page evicted, or a code path first run while the disk
/// stalls (QEMU's NVMe model does, a worn disk can), would otherwise hold the loop until
/// the watchdog resets a box that was only slow. Later heap and stacks are anonymous, and
/// the box has no swap. Returns the kernel's refusal, which leaves things as they were.
pub fn keep_init_in_memory() -> std::io::Result<()> {
    rustix::mm::mlockall(rustix::mm::MlockAllFlags::CURRENT).map_err(std::io::Error::from)
}

pub struct Watchdog {
    file: File,
    interval: Duration,
    last: Instant,
    pub timeout_s: i32,
    /// The device says it reset the machine: the previous boot stopped petting it (PID 1
    /// hung, or the kernel did). Drivers that cannot tell say no.
    pub reset_the_last_boot: bool,
}

impl Watchdog {
    /// Opens and arms the device. `Ok(None)` when there is no watchdog.
    pub fn open(device: &Path, timeout_s: u32) -> crate::error::Result<Option<Watchdog>> {
        if !device.exists() {
            return Ok(None);
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(crate::error::Error::io("open", device))?;
        let mut t: libc::c_int = timeout_s as libc::c_int;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes one int we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut t) };
        if r != 0 {
            // The device still runs with its default timeout; pet at a third of ours,
            // which is safe unless the default is shorter than that.
            t = timeout_s as libc::c_int;
        }
        let mut status: libc::c_int = 0;
        // SAFETY: WDIOC_GETBOOTSTATUS writes one int we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_GETBOOTSTATUS as _, &mut status) };
        let mut w = Watchdog {
            file,
            interval: Duration::from_secs((t.max(3) / 3) as u64),
            last: Instant::now(),
            timeout_s: t,
            reset_the_last_boot: r == 0 && status & WDIOF_CARDRESET != 0,
        };
        w.pet();
        Ok(Some(w))
    }

    pub fn pet(&mut self) {
        let mut dummy: libc::c_int = 0;
        // SAFETY: WDIOC_KEEPALIVE takes a pointer to an int it ignores.
        unsafe { libc::ioctl(self.file.as_raw_fd(), WDIOC_KEEPALIVE as _, &mut dummy) };
        self.last = Instant::now();
    }

    /// Pets when a third of the timeout has passed.
    pub fn tick(&mut self) {
        if self.last.elapsed() >= self.interval {
            self.pet();
        }
    }
}

/// The control port's `watchdog-test`: PID 1 stops here, its services left running and
/// nobody reaping them, as a hung init would, and the hardware watchdog resets the box.
/// The next boot says `previous_boot: reset by the watchdog`.
pub fn hang_for_the_test(ctl: &mut crate::control::Control, timeout_s: i32) -> ! {
    crate::say!(
        "watchdog test: PID 1 stops petting the watchdog; the box resets within {timeout_s} s"
    );
    ctl.event(&serde_json::json!({"event": "watchdog-test", "timeout_s": timeout_s}));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
