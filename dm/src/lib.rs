//! The device-mapper control interface (`/dev/mapper/control`), spoken directly: the
//! `struct dm_ioctl` header and `struct dm_target_spec` from linux/dm-ioctl.h (interface
//! version 4), packed by hand into a byte buffer. What init's dm-verity root and storaged's
//! thin pool need: create a device, load a one-target table, suspend and resume, read the
//! target status (and parse the thin-pool and thin forms), send target messages, remove.
//! Facts come from linux/dm-ioctl.h and the kernel's thin-provisioning documentation.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// What went wrong, with what it was done to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid device-mapper name {0:?}")]
    Name(String),
    /// A table, target type or message that does not fit the ioctl buffer.
    #[error("{0}")]
    TooLong(String),
    #[error("failed to {action} {}: {source}", path.display())]
    Control {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// An ioctl the kernel refused; `what` names the device and the operation.
    #[error("device-mapper {cmd:?} failed: {source} ({what})")]
    Ioctl {
        cmd: Cmd,
        what: String,
        source: std::io::Error,
    },
    #[error("device-mapper status of {0} does not fit 1 MiB")]
    StatusTooLarge(String),
    /// A target's status line that is not in its documented form.
    #[error("unexpected {target} status {line:?}")]
    BadStatus { target: &'static str, line: String },
    /// The target reports `Fail`.
    #[error("{0} has failed (status Fail)")]
    Failed(&'static str),
}

impl Error {
    /// The errno of a refused ioctl or a failed open.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Ioctl { source, .. } | Error::Control { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `sizeof(struct dm_ioctl)`: version[3], data_size, data_start, target_count, open_count,
/// flags, event_nr, padding (8 x u32 = 40), dev (u64), name[128], uuid[129], data[7].
pub const HEADER_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`: sector_start, length (u64), status, next (u32),
/// target_type[16].
pub const TARGET_SPEC_SIZE: usize = 40;
const NAME_LEN: usize = 128;

// Field offsets inside struct dm_ioctl.
const OFF_DATA_SIZE: usize = 12;
const OFF_DATA_START: usize = 16;
const OFF_TARGET_COUNT: usize = 20;
const OFF_FLAGS: usize = 28;
const OFF_DEV: usize = 40;
const OFF_NAME: usize = 48;

pub const READONLY_FLAG: u32 = 1 << 0;
/// With DM_DEV_SUSPEND: suspend (without it the same command resumes).
pub const SUSPEND_FLAG: u32 = 1 << 1;
const BUFFER_FULL_FLAG: u32 = 1 << 8;

/// Command numbers (`DM_*_CMD`), the low byte of the ioctl request.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum Cmd {
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    DevStatus = 7,
    TableLoad = 9,
    TableStatus = 12,
    TargetMsg = 14,
}

/// `_IOWR(DM_IOCTL = 0xfd, cmd, struct dm_ioctl)`: direction read|write (3) in bits 30-31,
/// argument size in bits 16-29, type in 8-15, number in 0-7.
pub const fn request(cmd: Cmd) -> u32 {
    (3 << 30) | ((HEADER_SIZE as u32) << 16) | (0xfd << 8) | cmd as u32
}

/// A dm_ioctl buffer: the header followed by the payload area, 8-byte aligned because the
/// kernel reads the u64 fields in place.
pub struct Buffer {
    words: Vec<u64>,
}

impl Buffer {
    pub fn new(name: &str, flags: u32, total_size: usize) -> Result<Self> {
        if name.is_empty() || name.len() >= NAME_LEN || name.contains('/') {
            return Err(Error::Name(name.to_string()));
        }
        let total = total_size.max(HEADER_SIZE).div_ceil(8) * 8;
        let mut b = Buffer {
            words: vec![0; total / 8],
        };
        let bytes = b.bytes_mut();
        // Interface 4.0.0: the kernel accepts any 4.x at or below its own.
        bytes[0..4].copy_from_slice(&4u32.to_ne_bytes());
        put_u32(bytes, OFF_DATA_SIZE, total as u32);
        put_u32(bytes, OFF_DATA_START, HEADER_SIZE as u32);
        put_u32(bytes, OFF_FLAGS, flags);
        bytes[OFF_NAME..OFF_NAME + name.len()].copy_from_slice(name.as_bytes());
        Ok(b)
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: a u64 slice viewed as bytes; u8 has no alignment or validity demands.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.words.len() * 8) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and the borrow is unique.
        unsafe {
            std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.words.len() * 8)
        }
    }

    /// Appends one target (`sector_start` 0) with its parameter string after the header.
    pub fn set_single_target(
        &mut self,
        length_sectors: u64,
        target_type: &str,
        params: &str,
    ) -> Result<()> {
        if target_type.len() >= 16 {
            return Err(Error::TooLong(format!(
                "target type {target_type:?} too long"
            )));
        }
        let needed = HEADER_SIZE + TARGET_SPEC_SIZE + params.len() + 1;
        if needed > self.bytes().len() {
            return Err(Error::TooLong(format!(
                "device-mapper table too long ({} bytes)",
                params.len()
            )));
        }
        let bytes = self.bytes_mut();
        let spec = HEADER_SIZE;
        put_u64(bytes, spec, 0);
        put_u64(bytes, spec + 8, length_sectors);
        put_u32(bytes, spec + 16, 0);
        // `next` is unused for the last target.
        put_u32(bytes, spec + 20, 0);
        bytes[spec + 24..spec + 24 + target_type.len()].copy_from_slice(target_type.as_bytes());
        let p = spec + TARGET_SPEC_SIZE;
        bytes[p..p + params.len()].copy_from_slice(params.as_bytes());
        bytes[p + params.len()] = 0;
        put_u32(bytes, OFF_TARGET_COUNT, 1);
        Ok(())
    }

    /// Puts a `struct dm_target_msg` (sector u64, then the NUL-terminated message) after
    /// the header: the message goes to the target that covers `sector`.
    pub fn set_message(&mut self, sector: u64, message: &str) -> Result<()> {
        let needed = HEADER_SIZE + 8 + message.len() + 1;
        if needed > self.bytes().len() {
            return Err(Error::TooLong(format!(
                "device-mapper message {message:?} too long"
            )));
        }
        let bytes = self.bytes_mut();
        put_u64(bytes, HEADER_SIZE, sector);
        bytes[HEADER_SIZE + 8..HEADER_SIZE + 8 + message.len()].copy_from_slice(message.as_bytes());
        bytes[HEADER_SIZE + 8 + message.len()] = 0;
        Ok(())
    }

    pub fn flags(&self) -> u32 {
        get_u32(self.bytes(), OFF_FLAGS)
    }

    /// The device number the kernel filled in, in its `huge_encode_dev` form.
    pub fn dev(&self) -> (u32, u32) {
        decode_dev(u64::from_ne_bytes(
            self.bytes()[OFF_DEV..OFF_DEV + 8]
                .try_into()
                .unwrap_or([0; 8]),
        ))
    }

    /// The status strings of the targets in a DM_TABLE_STATUS reply, in order.
    pub fn target_statuses(&self) -> Vec<String> {
        let b = self.bytes();
        let count = get_u32(b, OFF_TARGET_COUNT) as usize;
        let start = get_u32(b, OFF_DATA_START) as usize;
        let end = (get_u32(b, OFF_DATA_SIZE) as usize).min(b.len());
        let mut out = Vec::new();
        let mut spec = start;
        for _ in 0..count {
            let text = spec + TARGET_SPEC_SIZE;
            if text > end {
                break;
            }
            let nul = b[text..end]
                .iter()
                .position(|&c| c == 0)
                .unwrap_or(end - text);
            out.push(String::from_utf8_lossy(&b[text..text + nul]).into_owned());
            // In replies `next` counts from the start of the data area.
            spec = start + get_u32(b, spec + 20) as usize;
        }
        out
    }
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .unwrap_or(0)
}

/// Inverse of the kernel's `new_encode_dev`: minor low byte in bits 0-7, major in 8-19,
/// the rest of the minor from bit 20 on.
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff_ff00)) as u32;
    (major, minor)
}

/// An open `/dev/mapper/control`.
pub struct Control {
    file: File,
}

impl Control {
    /// Opens the control node, creating it (misc 10:236) if devtmpfs has not.
    pub fn open(dev_dir: &Path) -> Result<Self> {
        let path = dev_dir.join("mapper/control");
        if !path.exists() {
            let _ = std::fs::create_dir_all(dev_dir.join("mapper"));
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &path,
                rustix::fs::FileType::CharacterDevice,
                rustix::fs::Mode::from_raw_mode(0o600),
                rustix::fs::makedev(10, 236),
            )
            .map_err(|e| Error::Control {
                action: "create",
                path: path.clone(),
                source: e.into(),
            })?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| Error::Control {
                action: "open",
                path: path.clone(),
                source,
            })?;
        Ok(Control { file })
    }

    fn ioctl(&self, cmd: Cmd, buf: &mut Buffer, what: impl FnOnce() -> String) -> Result<()> {
        // SAFETY: the buffer is at least HEADER_SIZE bytes, its data_size field says how
        // long it is, and the kernel writes no further than that.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                request(cmd) as _,
                buf.words.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(Error::Ioctl {
                cmd,
                what: what(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// DM_DEV_CREATE; returns the new device's (major, minor).
    pub fn create(&self, name: &str, flags: u32) -> Result<(u32, u32)> {
        let mut b = Buffer::new(name, flags, HEADER_SIZE)?;
        self.ioctl(Cmd::DevCreate, &mut b, || format!("device {name}"))?;
        Ok(b.dev())
    }

    /// DM_TABLE_LOAD of one target covering `length_sectors`.
    pub fn load_table(
        &self,
        name: &str,
        flags: u32,
        length_sectors: u64,
        target_type: &str,
        params: &str,
    ) -> Result<()> {
        let mut b = Buffer::new(
            name,
            flags,
            HEADER_SIZE + TARGET_SPEC_SIZE + params.len() + 1,
        )?;
        b.set_single_target(length_sectors, target_type, params)?;
        self.ioctl(Cmd::TableLoad, &mut b, || {
            format!(
                "device {name}, table {target_type} {}",
                printable_params(target_type, params)
            )
        })
    }

    /// DM_DEV_SUSPEND without DM_SUSPEND_FLAG (1 << 1) resumes: makes the loaded table live.
    pub fn resume(&self, name: &str) -> Result<()> {
        let mut b = Buffer::new(name, 0, HEADER_SIZE)?;
        self.ioctl(Cmd::DevSuspend, &mut b, || {
            format!("resume of device {name}")
        })
    }

    /// DM_DEV_SUSPEND with DM_SUSPEND_FLAG: queues new I/O and flushes what is in flight,
    /// so a snapshot of the device sees a consistent image.
    pub fn suspend(&self, name: &str) -> Result<()> {
        let mut b = Buffer::new(name, SUSPEND_FLAG, HEADER_SIZE)?;
        self.ioctl(Cmd::DevSuspend, &mut b, || {
            format!("suspend of device {name}")
        })
    }

    /// DM_DEV_STATUS: the (major, minor) of an existing device, `None` if there is no
    /// device of that name (ENXIO).
    pub fn info(&self, name: &str) -> Result<Option<(u32, u32)>> {
        let mut b = Buffer::new(name, 0, HEADER_SIZE)?;
        // SAFETY: as in `ioctl`; done inline to tell ENXIO apart from other failures.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                request(Cmd::DevStatus) as _,
                b.words.as_mut_ptr(),
            )
        };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(Error::Ioctl {
                cmd: Cmd::DevStatus,
                what: format!("device {name}"),
                source: err,
            });
        }
        Ok(Some(b.dev()))
    }

    /// DM_TARGET_MSG to the target at sector 0, e.g. `create_thin 1` to a thin pool.
    pub fn message(&self, name: &str, message: &str) -> Result<()> {
        let mut b = Buffer::new(name, 0, HEADER_SIZE + 8 + message.len() + 1)?;
        b.set_message(0, message)?;
        self.ioctl(Cmd::TargetMsg, &mut b, || {
            format!("message {message:?} to device {name}")
        })
    }

    /// DM_TABLE_STATUS (info form): one status string per target, e.g. `V` or `C` for
    /// verity.
    pub fn status(&self, name: &str) -> Result<Vec<String>> {
        let mut size = 4096;
        loop {
            let mut b = Buffer::new(name, 0, size)?;
            self.ioctl(Cmd::TableStatus, &mut b, || {
                format!("status of device {name}")
            })?;
            if b.flags() & BUFFER_FULL_FLAG == 0 {
                return Ok(b.target_statuses());
            }
            if size >= 1 << 20 {
                return Err(Error::StatusTooLarge(name.to_string()));
            }
            size *= 4;
        }
    }

    /// DM_DEV_REMOVE.
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut b = Buffer::new(name, 0, HEADER_SIZE)?;
        self.ioctl(Cmd::DevRemove, &mut b, || {
            format!("remove of device {name}")
        })
    }
}

/// A table's parameters as an error may show them: a crypt target's key (its second
/// word) is never printed.
fn printable_params(target_type: &str, params: &str) -> String {
    if target_type != "crypt" {
        return params.to_owned();
    }
    params
        .split(' ')
        .enumerate()
        .map(|(i, w)| if i == 1 { "<key>" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parameters of a `linear` target: `<device> <offset in sectors>`.
pub fn linear_params(major: u32, minor: u32, offset_sectors: u64) -> String {
    format!("{major}:{minor} {offset_sectors}")
}

/// The status line of a `thin-pool` target, from the kernel's thin-provisioning
/// documentation: `<transaction id> <used metadata blocks>/<total metadata blocks>
/// <used data blocks>/<total data blocks> <held metadata root> ro|rw|out_of_data_space
/// ...`, or `Fail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPoolStatus {
    pub transaction_id: u64,
    pub used_meta_blocks: u64,
    pub total_meta_blocks: u64,
    pub used_data_blocks: u64,
    pub total_data_blocks: u64,
    /// `rw`, `ro` or `out_of_data_space`.
    pub mode: String,
    /// The kernel asks for a metadata check before the pool may be used read-write.
    pub needs_check: bool,
}

impl ThinPoolStatus {
    pub fn parse(line: &str) -> Result<Self> {
        let bad = || Error::BadStatus {
            target: "thin-pool",
            line: line.to_string(),
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"Fail") {
            return Err(Error::Failed("thin pool"));
        }
        if f.len() < 3 {
            return Err(bad());
        }
        let ratio = |s: &str| -> Result<(u64, u64)> {
            let (a, b) = s.split_once('/').ok_or_else(bad)?;
            Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
        };
        let (used_meta_blocks, total_meta_blocks) = ratio(f[1])?;
        let (used_data_blocks, total_data_blocks) = ratio(f[2])?;
        Ok(ThinPoolStatus {
            transaction_id: f[0].parse().map_err(|_| bad())?,
            used_meta_blocks,
            total_meta_blocks,
            used_data_blocks,
            total_data_blocks,
            mode: f.get(4).unwrap_or(&"rw").to_string(),
            needs_check: f.contains(&"needs_check"),
        })
    }
}

/// The status line of a `thin` target: `<nr mapped sectors> <highest mapped sector>`
/// (`-` when nothing is mapped), or `Fail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinStatus {
    pub mapped_sectors: u64,
    pub highest_mapped_sector: Option<u64>,
}

impl ThinStatus {
    pub fn parse(line: &str) -> Result<Self> {
        let bad = || Error::BadStatus {
            target: "thin",
            line: line.to_string(),
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() == Some(&"Fail") {
            return Err(Error::Failed("thin device"));
        }
        if f.len() < 2 {
            return Err(bad());
        }
        Ok(ThinStatus {
            mapped_sectors: f[0].parse().map_err(|_| bad())?,
            highest_mapped_sector: match f[1] {
                "-" => None,
                n => Some(n.parse().map_err(|_| bad())?),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crypt_tables_key_is_never_shown_in_an_error() {
        let crypt = "aes-xts-plain64 00112233 0 259:6 32768 1 sector_size:4096";
        assert_eq!(
            printable_params("crypt", crypt),
            "aes-xts-plain64 <key> 0 259:6 32768 1 sector_size:4096"
        );
        assert_eq!(printable_params("linear", "259:6 0"), "259:6 0");
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values of DM_DEV_CREATE etc. as the kernel's _IOWR computes them on x86-64/arm64.
        assert_eq!(request(Cmd::DevCreate), 0xc138_fd03);
        assert_eq!(request(Cmd::DevRemove), 0xc138_fd04);
        assert_eq!(request(Cmd::DevSuspend), 0xc138_fd06);
        assert_eq!(request(Cmd::TableLoad), 0xc138_fd09);
        assert_eq!(request(Cmd::TableStatus), 0xc138_fd0c);
        assert_eq!(request(Cmd::DevStatus), 0xc138_fd07);
        assert_eq!(request(Cmd::TargetMsg), 0xc138_fd0e);
    }

    #[test]
    fn message_follows_the_header_after_its_sector() {
        let mut b = Buffer::new("pool", 0, 312 + 8 + 14).unwrap();
        b.set_message(0, "create_thin 7").unwrap();
        let bytes = b.bytes();
        assert_eq!(u64::from_ne_bytes(bytes[312..320].try_into().unwrap()), 0);
        assert_eq!(&bytes[320..334], b"create_thin 7\0");
        assert!(b.set_message(0, &"x".repeat(20)).is_err());
    }

    #[test]
    fn thin_pool_status_is_parsed() {
        let s = ThinPoolStatus::parse(
            "3 141/1024 80/2000 - rw discard_passdown queue_if_no_space - 1024",
        )
        .unwrap();
        assert_eq!(s.transaction_id, 3);
        assert_eq!((s.used_meta_blocks, s.total_meta_blocks), (141, 1024));
        assert_eq!((s.used_data_blocks, s.total_data_blocks), (80, 2000));
        assert_eq!(s.mode, "rw");
        assert!(!s.needs_check);
        let full = ThinPoolStatus::parse(
            "0 10/10 5/5 - out_of_data_space discard_passdown error_if_no_space needs_check 4",
        )
        .unwrap();
        assert_eq!(full.mode, "out_of_data_space");
        assert!(full.needs_check);
        assert!(ThinPoolStatus::parse("Fail").is_err());
        assert!(ThinPoolStatus::parse("1 2 3").is_err());
    }

    #[test]
    fn thin_status_is_parsed() {
        assert_eq!(
            ThinStatus::parse("2048 4095").unwrap(),
            ThinStatus {
                mapped_sectors: 2048,
                highest_mapped_sector: Some(4095)
            }
        );
        assert_eq!(
            ThinStatus::parse("0 -").unwrap().highest_mapped_sector,
            None
        );
        assert!(ThinStatus::parse("Fail").is_err());
    }

    #[test]
    fn linear_params_name_device_and_offset() {
        assert_eq!(linear_params(259, 1, 8192), "259:1 8192");
    }

    #[test]
    fn header_carries_version_sizes_flags_and_name() {
        let b = Buffer::new("root", READONLY_FLAG, 1000).unwrap();
        let bytes = b.bytes();
        assert_eq!(bytes.len(), 1000);
        assert_eq!(get_u32(bytes, 0), 4);
        assert_eq!(get_u32(bytes, 4), 0);
        assert_eq!(get_u32(bytes, OFF_DATA_SIZE), 1000);
        assert_eq!(get_u32(bytes, OFF_DATA_START), 312);
        assert_eq!(b.flags(), READONLY_FLAG);
        assert_eq!(&bytes[48..53], b"root\0");
        // uuid (176..305) stays empty.
        assert!(bytes[176..305].iter().all(|&c| c == 0));
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(Buffer::new("", 0, 312).is_err());
        assert!(Buffer::new("a/b", 0, 312).is_err());
        assert!(Buffer::new(&"x".repeat(128), 0, 312).is_err());
    }

    #[test]
    fn one_target_table_is_laid_out_after_the_header() {
        let params = "1 259:2 259:3 4096 4096 100 1 sha256 ab cd";
        let mut b = Buffer::new("root", READONLY_FLAG, 312 + 40 + params.len() + 1).unwrap();
        b.set_single_target(800, "verity", params).unwrap();
        let bytes = b.bytes();
        assert_eq!(get_u32(bytes, OFF_TARGET_COUNT), 1);
        assert_eq!(u64::from_ne_bytes(bytes[312..320].try_into().unwrap()), 0);
        assert_eq!(u64::from_ne_bytes(bytes[320..328].try_into().unwrap()), 800);
        assert_eq!(&bytes[336..343], b"verity\0");
        assert_eq!(&bytes[352..352 + params.len()], params.as_bytes());
        assert_eq!(bytes[352 + params.len()], 0);
        // A reply-shaped buffer reads back the same string.
        assert_eq!(b.target_statuses(), vec![params.to_owned()]);
    }

    #[test]
    fn table_longer_than_the_buffer_is_refused() {
        let mut b = Buffer::new("root", 0, 360).unwrap();
        assert!(b.set_single_target(8, "verity", &"x".repeat(100)).is_err());
    }

    #[test]
    fn device_numbers_decode_like_the_kernel_encodes() {
        // new_encode_dev(MKDEV(254, 0)) and MKDEV(253, 300): minor above 255 splits.
        assert_eq!(decode_dev(254 << 8), (254, 0));
        let enc = (300u64 & 0xff) | (253 << 8) | ((300u64 & !0xff) << 12);
        assert_eq!(decode_dev(enc), (253, 300));
    }
}
