//! Disks for test machines: disposable copy-on-write overlays of the shared image, and
//! byte-level access to them for corruption tests. The shared image is never written.

use crate::gpt::{self, Partition};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Image format as `qemu-img` names it, from the file name.
pub fn format_of(image: &Path) -> &'static str {
    match image.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        _ => "raw",
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates `overlay` (qcow2) on top of `image`; writes go to the overlay only.
pub fn create_overlay(image: &Path, overlay: &Path) -> Result<()> {
    let image = image
        .canonicalize()
        .with_context(|| format!("image {} not found", image.display()))?;
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&image)
        .args(["-F", format_of(&image)])
        .arg(overlay))
    .with_context(|| format!("failed to create overlay of {}", image.display()))?;
    Ok(())
}

/// Creates an empty qcow2 disk of `mib` MiB (it reads as zeros until written).
pub fn create_empty(path: &Path, mib: u64) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(format!("{mib}M")))
    .with_context(|| format!("failed to create the empty disk {}", path.display()))?;
    Ok(())
}

/// Reads `len` bytes at `offset` (both multiples of 512) through QEMU's block layer, so
/// raw images and qcow2 overlays read alike.
pub fn read(disk: &Path, offset: u64, len: u64, scratch: &Path) -> Result<Vec<u8>> {
    if !offset.is_multiple_of(512) || !len.is_multiple_of(512) {
        bail!("unaligned read {offset}+{len} of {}", disk.display());
    }
    // The largest block that divides both: qemu-img dd of a whole partition in 512-byte
    // blocks takes minutes.
    let bs = [1 << 20, 64 << 10, 4096, 512]
        .into_iter()
        .find(|bs| offset.is_multiple_of(*bs) && len.is_multiple_of(*bs))
        .unwrap_or(512u64);
    let _ = std::fs::remove_file(scratch);
    run(Command::new("qemu-img")
        .args(["dd", "-f", format_of(disk), "-O", "raw"])
        .arg(format!("bs={bs}"))
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", scratch.display()))
        .arg(format!("skip={}", offset / bs))
        // qemu-img dd counts `count` from the start of the input, not from `skip`.
        .arg(format!("count={}", (offset + len) / bs)))?;
    let data =
        std::fs::read(scratch).with_context(|| format!("failed to read {}", scratch.display()))?;
    if data.len() as u64 != len {
        bail!(
            "read {} bytes at {offset} of {}, wanted {len}",
            data.len(),
            disk.display()
        );
    }
    Ok(data)
}

/// The partition table of a disk image.
pub fn partitions(disk: &Path, scratch: &Path) -> Result<Vec<Partition>> {
    let head = read(disk, 0, gpt::TABLE_BYTES as u64, scratch)?;
    gpt::parse(&head).with_context(|| format!("failed to read the GPT of {}", disk.display()))
}

/// Inverts every bit of the byte at `offset` of a qcow2 overlay. Returns (old, new).
pub fn flip_byte(overlay: &Path, offset: u64, scratch: &Path) -> Result<(u8, u8)> {
    let sector = offset / 512 * 512;
    let old = read(overlay, sector, 512, scratch)?[(offset - sector) as usize];
    let new = !old;
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {new:#04x} {offset} 1"))
        .arg(overlay))
    .with_context(|| format!("failed to write byte {offset} of {}", overlay.display()))?;
    let now = read(overlay, sector, 512, scratch)?[(offset - sector) as usize];
    if now != new {
        bail!(
            "byte {offset} of {} reads {now:#04x} after writing {new:#04x}",
            overlay.display()
        );
    }
    Ok((old, new))
}

/// Writes `data` at `offset` of a qcow2 overlay (the machine must be off).
pub fn write(overlay: &Path, offset: u64, data: &[u8], scratch: &Path) -> Result<()> {
    std::fs::write(scratch, data)
        .with_context(|| format!("failed to write {}", scratch.display()))?;
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!(
            "write -q -s {} {offset} {}",
            scratch.display(),
            data.len()
        ))
        .arg(overlay))
    .with_context(|| format!("failed to write at {offset} of {}", overlay.display()))?;
    let _ = std::fs::remove_file(scratch);
    Ok(())
}

/// A scratch file name inside `dir`.
pub fn scratch_in(dir: &Path) -> PathBuf {
    dir.join("scratch.bin")
}
