//! The `pool` partition: where the pool lives on a box without a spare NVMe disk. The
//! partition labelled `pool` is used when there is one; otherwise storaged makes it in
//! the free space after the last partition of the system disk (the disk holding the
//! `data` partition), writing the GPT entry itself (primary and backup tables, after the
//! UEFI specification's layout) and telling the kernel with BLKPG_ADD_PARTITION (the
//! disk's other partitions are mounted, so re-reading the whole table would fail busy).
//!
//! The image is built small and written onto bigger disks, so its backup table sits
//! where the image ended, not at the end of the disk: making the partition moves the
//! backup table to the disk's end first, as partitioning tools do.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The partition's GPT name.
pub const LABEL: &str = "pool";
/// The partition type: "Linux filesystem data" (0fc63daf-8483-4772-8e79-3d69d8477de4),
/// in the on-disk mixed-endian byte order. The name, not the type, is what marks it.
const TYPE_GUID: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];
/// The label of the partition that marks the system disk.
const SYSTEM_LABEL: &str = "data";
/// Partitions start and end on MiB boundaries.
const ALIGN_BYTES: u64 = 1 << 20;

/// CRC-32 as GPT uses it (IEEE 802.3, reflected, polynomial 0xEDB88320).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A GPT as read from one of its two copies.
#[derive(Debug, Clone)]
struct Gpt {
    /// Logical block size.
    lbs: u64,
    /// The header's block (header fields in its first `header_size` bytes).
    header: Vec<u8>,
    entries: Vec<u8>,
    entry_size: usize,
    count: usize,
}

impl Gpt {
    fn alternate_lba(&self) -> u64 {
        u64_at(&self.header, 32)
    }
    fn first_usable(&self) -> u64 {
        u64_at(&self.header, 40)
    }
    fn last_usable(&self) -> u64 {
        u64_at(&self.header, 48)
    }
    fn array_blocks(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(self.lbs)
    }

    fn entry(&self, i: usize) -> &[u8] {
        &self.entries[i * self.entry_size..(i + 1) * self.entry_size]
    }

    fn used(&self, i: usize) -> bool {
        self.entry(i)[..16].iter().any(|&b| b != 0)
    }

    /// (first, last) LBA of entry `i`.
    fn range(&self, i: usize) -> (u64, u64) {
        let e = self.entry(i);
        (u64_at(e, 32), u64_at(e, 40))
    }

    fn name(&self, i: usize) -> String {
        let e = self.entry(i);
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }

    fn find(&self, label: &str) -> Option<usize> {
        (0..self.count).find(|&i| self.used(i) && self.name(i) == label)
    }

    /// The header block as it is stored at `my_lba`, with its entry array at
    /// `entries_lba` and the other copy at `alternate`, and both CRCs filled in.
    fn header_at(
        &self,
        my_lba: u64,
        alternate: u64,
        entries_lba: u64,
        last_usable: u64,
    ) -> Vec<u8> {
        let mut h = self.header.clone();
        put_u64(&mut h, 24, my_lba);
        put_u64(&mut h, 32, alternate);
        put_u64(&mut h, 48, last_usable);
        put_u64(&mut h, 72, entries_lba);
        put_u32(&mut h, 88, crc32(&self.entries));
        let size = u32_at(&h, 12) as usize;
        put_u32(&mut h, 16, 0);
        let crc = crc32(&h[..size]);
        put_u32(&mut h, 16, crc);
        h
    }
}

fn disk_io(op: &'static str, disk: &Path, offset: u64) -> impl FnOnce(std::io::Error) -> Error {
    let path = disk.to_owned();
    move |source| Error::DiskIo {
        op,
        path,
        offset,
        source,
    }
}

fn read_at(f: &File, disk: &Path, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off)
        .map_err(disk_io("read", disk, off))?;
    Ok(b)
}

fn write_at(f: &File, disk: &Path, off: u64, b: &[u8]) -> Result<()> {
    f.write_all_at(b, off).map_err(disk_io("write", disk, off))
}

fn sync(f: &File, disk: &Path) -> Result<()> {
    f.sync_all().map_err(Error::io("failed to flush", disk))
}

fn table(disk: &Path, detail: impl Into<String>) -> Error {
    Error::PartitionTable {
        disk: disk.to_owned(),
        detail: detail.into(),
    }
}

/// The primary GPT, checked (signature, header and entry array CRCs). Anything else is
/// an error: a table storaged cannot verify is not one it writes to.
fn read_primary(f: &File, disk: &Path, lbs: u64) -> Result<Gpt> {
    let bad = |why: &str| table(disk, why);
    let header = read_at(f, disk, lbs, lbs as usize)?;
    if &header[..8] != b"EFI PART" {
        return Err(bad("no GPT (no \"EFI PART\" header at LBA 1)"));
    }
    let size = u32_at(&header, 12) as usize;
    if !(92..=lbs as usize).contains(&size) {
        return Err(bad("GPT header size is impossible"));
    }
    let mut h = header[..size].to_vec();
    put_u32(&mut h, 16, 0);
    if crc32(&h) != u32_at(&header, 16) {
        return Err(bad("GPT header checksum mismatch"));
    }
    if u64_at(&header, 24) != 1 {
        return Err(bad("GPT header at LBA 1 does not say it is the primary"));
    }
    let count = u32_at(&header, 80) as usize;
    let entry_size = u32_at(&header, 84) as usize;
    if entry_size < 128
        || !entry_size.is_multiple_of(8)
        || count == 0
        || count * entry_size > 1 << 20
    {
        return Err(bad("GPT entry array has an impossible size"));
    }
    let entries = read_at(f, disk, u64_at(&header, 72) * lbs, count * entry_size)?;
    if crc32(&entries) != u32_at(&header, 88) {
        return Err(bad("GPT entry array checksum mismatch"));
    }
    Ok(Gpt {
        lbs,
        header,
        entries,
        entry_size,
        count,
    })
}

fn random_guid() -> [u8; 16] {
    let mut g = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        let _ = f.read_exact_at(&mut g, 0);
    }
    if g == [0; 16] {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        g = t.to_le_bytes();
    }
    // RFC 4122 version 4, variant 1 (GUID fields are little-endian on disk).
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

/// Where a new partition labelled `pool` goes, and the table that holds it; or the
/// existing entry. Returns (1-based partition number, first LBA, last LBA).
fn ensure_entry(
    f: &File,
    disk: &Path,
    disk_bytes: u64,
    lbs: u64,
    min_bytes: u64,
) -> Result<(u32, u64, u64)> {
    let mut gpt = read_primary(f, disk, lbs)?;
    if let Some(i) = gpt.find(LABEL) {
        let (first, last) = gpt.range(i);
        return Ok((i as u32 + 1, first, last));
    }
    let blocks = disk_bytes / lbs;
    let old_alternate = gpt.alternate_lba();
    let array = gpt.array_blocks();
    if old_alternate >= blocks || old_alternate <= gpt.last_usable() {
        return Err(table(
            disk,
            format!(
                "GPT backup header at LBA {old_alternate} does not fit a disk of {blocks} blocks"
            ),
        ));
    }
    let used: Vec<usize> = (0..gpt.count).filter(|&i| gpt.used(i)).collect();
    let highest = used.iter().map(|&i| gpt.range(i).1).max().unwrap_or(0);
    let slot = (0..gpt.count)
        .find(|&i| !gpt.used(i))
        .ok_or_else(|| table(disk, "every GPT entry is in use; no room for a pool entry"))?;
    // The backup array and header at the disk's end, and the usable area up to them.
    let new_alternate = blocks - 1;
    let new_backup_array = new_alternate - array;
    let last_usable = new_backup_array - 1;
    let align = (ALIGN_BYTES / lbs).max(1);
    let first = (highest + 1).max(gpt.first_usable()).div_ceil(align) * align;
    let last = ((last_usable + 1) / align * align).saturating_sub(1);
    let free = if last >= first {
        (last + 1 - first) * lbs
    } else {
        0
    };
    if free < min_bytes {
        return Err(Error::NoRoom {
            disk: disk.to_owned(),
            free_mib: free >> 20,
            min_mib: min_bytes >> 20,
        });
    }
    // The old backup copy must lie beyond every partition, or zeroing it below would
    // destroy data.
    let old_array = old_alternate.saturating_sub(array);
    if old_alternate != new_alternate && old_array <= highest {
        return Err(table(
            disk,
            format!("GPT backup table at LBA {old_array} overlaps a partition"),
        ));
    }

    let e = &mut gpt.entries[slot * gpt.entry_size..(slot + 1) * gpt.entry_size];
    e.fill(0);
    e[..16].copy_from_slice(&TYPE_GUID);
    e[16..32].copy_from_slice(&random_guid());
    put_u64(e, 32, first);
    put_u64(e, 40, last);
    for (k, u) in LABEL.encode_utf16().enumerate() {
        e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
    }
    let array_bytes = gpt.entries.clone();
    // Backup first (a crash leaves the old primary, still valid), then the stale copy
    // where the image ended is cleared (it would sit inside the new partition), then the
    // primary, which is what the kernel and firmware read first.
    let backup = gpt.header_at(new_alternate, 1, new_backup_array, last_usable);
    write_at(f, disk, new_backup_array * lbs, &array_bytes)?;
    write_at(f, disk, new_alternate * lbs, &backup)?;
    sync(f, disk)?;
    if old_alternate != new_alternate {
        let zeros = vec![0u8; ((array + 1) * lbs) as usize];
        write_at(f, disk, old_array * lbs, &zeros)?;
        sync(f, disk)?;
    }
    let primary_array = u64_at(&gpt.header, 72);
    let primary = gpt.header_at(1, new_alternate, primary_array, last_usable);
    write_at(f, disk, primary_array * lbs, &array_bytes)?;
    write_at(f, disk, lbs, &primary)?;
    // A protective MBR covers the whole disk (or as much as 32 bits of LBA say).
    let mut mbr = read_at(f, disk, 0, 512)?;
    if mbr[510..512] == [0x55, 0xaa] && mbr[446 + 4] == 0xee {
        let size = (blocks - 1).min(u64::from(u32::MAX)) as u32;
        put_u32(&mut mbr, 446 + 12, size);
        write_at(f, disk, 0, &mbr)?;
    }
    sync(f, disk)?;
    tracing::info!(
        disk = %disk.display(),
        partition = slot + 1,
        first_lba = first,
        last_lba = last,
        bytes = free,
        "made the {LABEL} partition"
    );
    Ok((slot as u32 + 1, first, last))
}

/// `key=value` lines of a sysfs uevent file.
fn uevent(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn value<'a>(ev: &'a [(String, String)], key: &str) -> Option<&'a str> {
    ev.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The block device (DEVNAME) whose partition name is `label`, and its sysfs directory.
fn labelled(sys: &Path, label: &str) -> Option<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(sys.join("class/block"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let ev = uevent(&e.path().join("uevent"));
            (value(&ev, "PARTNAME") == Some(label))
                .then(|| value(&ev, "DEVNAME").map(|d| (d.to_owned(), e.path())))
                .flatten()
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The whole disk a partition's sysfs entry belongs to (its parent directory).
fn disk_of(part_sys: &Path) -> Option<String> {
    let real = std::fs::canonicalize(part_sys).ok()?;
    Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
}

/// The kernel's name for partition `pno` of `disk`, if it knows it.
fn kernel_partition(sys: &Path, disk: &str, pno: u32) -> Option<String> {
    std::fs::read_dir(sys.join("block").join(disk))
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("partition"))
                .is_ok_and(|p| p.trim() == pno.to_string())
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// BLKPG_ADD_PARTITION: the kernel learns one partition without re-reading a table
/// whose other partitions are in use.
fn blkpg_add(f: &File, disk: &Path, pno: u32, start: u64, length: u64) -> Result<()> {
    #[repr(C)]
    struct BlkpgPartition {
        start: libc::c_longlong,
        length: libc::c_longlong,
        pno: libc::c_int,
        devname: [libc::c_char; 64],
        volname: [libc::c_char; 64],
    }
    #[repr(C)]
    struct BlkpgIoctlArg {
        op: libc::c_int,
        flags: libc::c_int,
        datalen: libc::c_int,
        data: *mut libc::c_void,
    }
    // <linux/blkpg.h>: BLKPG is _IO(0x12, 105); BLKPG_ADD_PARTITION is 1.
    const BLKPG: libc::c_ulong = 0x1269;
    const BLKPG_ADD_PARTITION: libc::c_int = 1;
    let mut part = BlkpgPartition {
        start: start as libc::c_longlong,
        length: length as libc::c_longlong,
        pno: pno as libc::c_int,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_ADD_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    use std::os::fd::AsRawFd;
    // SAFETY: the argument points at a live, correctly laid out blkpg_partition.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKPG, &mut arg) };
    if rc != 0 {
        return Err(Error::Blkpg {
            disk: disk.to_owned(),
            pno,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The partition labelled `pool` on the system disk `disk` (a name under /sys/block):
/// the existing entry, or a new one made in the free space at the disk's end (at least
/// `min_bytes`). Returns its device node once the kernel has it.
pub fn pool_partition_on(sys: &Path, dev: &Path, disk: &str, min_bytes: u64) -> Result<PathBuf> {
    let path = dev.join(disk);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(Error::io("failed to open", &path))?;
    let disk_bytes = {
        use std::io::{Seek, SeekFrom};
        (&f).seek(SeekFrom::End(0))
            .map_err(Error::io("failed to size", &path))?
    };
    let lbs: u64 = std::fs::read_to_string(
        sys.join("block")
            .join(disk)
            .join("queue/logical_block_size"),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(512);
    let (pno, first, last) = ensure_entry(&f, &path, disk_bytes, lbs, min_bytes)?;
    let name = match kernel_partition(sys, disk, pno) {
        Some(n) => n,
        None => {
            blkpg_add(&f, &path, pno, first * lbs, (last + 1 - first) * lbs)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(n) = kernel_partition(sys, disk, pno) {
                    break n;
                }
                if Instant::now() > deadline {
                    return Err(table(
                        &path,
                        format!("the kernel accepted partition {pno} but shows no device for it"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    // devtmpfs makes the node as the kernel announces the partition.
    let node = dev.join(&name);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.exists() {
        if Instant::now() > deadline {
            return Err(Error::NoDeviceNode(node));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(node)
}

/// The partition the kernel knows as `pool` (on any disk), without making one.
pub fn labelled_pool(sys: &Path, dev: &Path) -> Option<PathBuf> {
    labelled(sys, LABEL).map(|(name, _)| dev.join(name))
}

/// The pool partition: one the kernel knows as `pool` (any disk), else the `pool` entry
/// of the system disk's GPT, made in its free space if there is none. `Ok(None)`: no
/// system disk (no partition labelled `data`), so nowhere to make one.
pub fn pool_partition(sys: &Path, dev: &Path, min_bytes: u64) -> Result<Option<PathBuf>> {
    if let Some((name, _)) = labelled(sys, LABEL) {
        return Ok(Some(dev.join(name)));
    }
    let Some((_, data_sys)) = labelled(sys, SYSTEM_LABEL) else {
        return Ok(None);
    };
    let disk = disk_of(&data_sys).ok_or_else(|| {
        table(
            &data_sys,
            format!("cannot tell which disk holds the {SYSTEM_LABEL} partition"),
        )
    })?;
    pool_partition_on(sys, dev, &disk, min_bytes).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_ieee_one() {
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    /// A disk image made by sfdisk (when the host has it): a small GPT image written to
    /// a bigger disk gets a pool partition in the space after its last partition, the
    /// backup table moves to the end, and sfdisk reads the result without complaint.
    #[test]
    fn pool_entry_in_an_sfdisk_table_grown_disk() {
        let Ok(sfdisk) = which("sfdisk") else {
            edge_common::precondition_missing("sfdisk");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        let f = File::create(&img).unwrap();
        f.set_len(40 << 20).unwrap();
        let script =
            "label: gpt\nsize=4MiB, name=esp\nsize=8MiB, name=root-a\nsize=8MiB, name=data\n";
        run_sfdisk(&sfdisk, &img, script);
        // Flashed onto a bigger disk: the backup table stays where the image ended.
        f.set_len(100 << 20).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let (pno, first, last) = ensure_entry(&f, &img, 100 << 20, 512, 32 << 20).unwrap();
        assert_eq!(pno, 4);
        assert_eq!(first % 2048, 0);
        assert!(first * 512 >= 21 << 20, "{first}");
        assert_eq!((last + 1) % 2048, 0);
        // Found again, not made twice.
        assert_eq!(
            ensure_entry(&f, &img, 100 << 20, 512, 32 << 20).unwrap(),
            (pno, first, last)
        );
        let out = std::process::Command::new(&sfdisk)
            .arg("--json")
            .arg(&img)
            .output()
            .unwrap();
        let text: String = String::from_utf8_lossy(&out.stdout)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.trim().is_empty(), "{err}");
        assert!(
            text.contains(
                "\"start\":43008,\"size\":159744,\"type\":\"0FC63DAF-8483-4772-8E79-3D69D8477DE4\""
            ),
            "{text}"
        );
        assert!(text.contains("\"name\":\"pool\""), "{text}");
        assert!(text.contains("\"lastlba\":204766"), "{text}");
        let verify = std::process::Command::new(&sfdisk)
            .arg("--verify")
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
        // The stale backup where the image ended is gone.
        let old = read_at(&f, &img, (40 << 20) - 512, 512).unwrap();
        assert!(old.iter().all(|&b| b == 0));
    }

    #[test]
    fn no_room_is_a_clear_error() {
        let Ok(sfdisk) = which("sfdisk") else {
            edge_common::precondition_missing("sfdisk");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.raw");
        File::create(&img).unwrap().set_len(40 << 20).unwrap();
        run_sfdisk(
            &sfdisk,
            &img,
            "label: gpt\nsize=4MiB, name=esp\nname=data\n",
        );
        let before = std::fs::read(&img).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let e = ensure_entry(&f, &img, 40 << 20, 512, 32 << 20).unwrap_err();
        assert!(matches!(e, Error::NoRoom { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("no room for a pool partition") && e.contains("disk.raw"),
            "{e}"
        );
        assert!(std::fs::read(&img).unwrap() == before, "the disk changed");
        // No table at all: refused, not written.
        let blank = dir.path().join("blank.raw");
        File::create(&blank).unwrap().set_len(40 << 20).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&blank)
            .unwrap();
        let e = ensure_entry(&f, &blank, 40 << 20, 512, 32 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no GPT"), "{e}");
    }

    fn which(prog: &str) -> Result<PathBuf, ()> {
        ["/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(prog))
            .find(|p| p.exists())
            .ok_or(())
    }

    fn run_sfdisk(sfdisk: &Path, img: &Path, script: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new(sfdisk)
            .arg("--quiet")
            .arg(img)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
}
