//! The hardware watchdog (/dev/watchdog; i6300esb in QEMU). Once armed it is never closed
//! or disarmed: if PID 1 stops petting it, hangs or dies, the box resets.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

// _IOR('W', 5, int) and _IOWR('W', 6, int) from linux/watchdog.h.
const WDIOC_KEEPALIVE: libc::c_ulong = 0x8004_5705;
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;

pub struct Watchdog {
    file: File,
    interval: Duration,
    last: Instant,
    pub timeout_s: i32,
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
        let mut w = Watchdog {
            file,
            interval: Duration::from_secs((t.max(3) / 3) as u64),
            last: Instant::now(),
            timeout_s: t,
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
