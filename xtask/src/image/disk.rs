//! The ESP (FAT32 via mkfs.vfat + mtools, no mounting) and the GPT disk: partition table
//! written by sfdisk, partition contents copied in sparsely, then a qcow2 copy.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::cmd;

const MIB: u64 = 1 << 20;

/// Files to place on the ESP: (path on the ESP, host file).
pub fn make_esp(
    out: &Path,
    size_mib: u64,
    volume_id: &str,
    files: &[(String, PathBuf)],
) -> Result<()> {
    if out.exists() {
        std::fs::remove_file(out)?;
    }
    cmd::output(
        Command::new("mkfs.vfat")
            .args([
                "-F",
                "32",
                "-S",
                "512",
                "-s",
                "1",
                "-n",
                "ESP",
                "--invariant",
                "-i",
                volume_id,
                "-C",
            ])
            .arg(out)
            .arg((size_mib * 1024).to_string()),
    )?;
    let mut dirs: Vec<String> = Vec::new();
    for (dst, _) in files {
        let mut acc = String::new();
        for comp in dst
            .trim_start_matches('/')
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, d)| d)
        {
            acc.push('/');
            acc.push_str(comp);
            if !dirs.contains(&acc) {
                dirs.push(acc.clone());
            }
        }
    }
    for d in &dirs {
        cmd::output(mtools("mmd").arg("-i").arg(out).arg(format!("::{d}")))?;
    }
    for (dst, src) in files {
        cmd::output(
            mtools("mcopy")
                .arg("-m")
                .arg("-i")
                .arg(out)
                .arg(src)
                .arg(format!("::{dst}")),
        )?;
    }
    Ok(())
}

fn mtools(tool: &str) -> Command {
    let mut c = Command::new(tool);
    // FAT time starts in 1980; directory entries get this fixed time (mcopy -m keeps
    // the source files' own times for files).
    c.env("MTOOLS_SKIP_CHECK", "1")
        .env("SOURCE_DATE_EPOCH", "315532800");
    c
}

pub struct Part {
    pub label: &'static str,
    pub type_guid: &'static str,
    pub uuid: String,
    pub size_mib: u64,
    /// Contents to copy to the partition's start; None leaves it zero.
    pub contents: Option<PathBuf>,
}

/// The sfdisk script for `parts`, laid out from 1 MiB on, each MiB-aligned.
pub fn sfdisk_script(disk_uuid: &str, parts: &[Part]) -> String {
    let mut s = format!("label: gpt\nlabel-id: {disk_uuid}\nunit: sectors\nfirst-lba: 2048\n");
    let mut start = MIB / 512;
    for p in parts {
        let size = p.size_mib * MIB / 512;
        s.push_str(&format!(
            "start={start}, size={size}, type={}, uuid={}, name=\"{}\"\n",
            p.type_guid, p.uuid, p.label
        ));
        start += size;
    }
    s
}

/// Writes the raw disk: GPT plus partition contents; 1 MiB is left at each end for the
/// primary and backup tables.
pub fn make_disk(out: &Path, disk_uuid: &str, parts: &[Part]) -> Result<()> {
    let total = MIB + parts.iter().map(|p| p.size_mib * MIB).sum::<u64>() + MIB;
    if out.exists() {
        std::fs::remove_file(out)?;
    }
    let f = File::create(out).with_context(|| format!("failed to create {}", out.display()))?;
    f.set_len(total)?;
    drop(f);
    let mut child = Command::new("sfdisk")
        .arg("--quiet")
        .arg("--no-reread")
        .arg("--no-tell-kernel")
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start sfdisk")?;
    child
        .stdin
        .take()
        .context("sfdisk stdin")?
        .write_all(sfdisk_script(disk_uuid, parts).as_bytes())?;
    let res = child.wait_with_output()?;
    if !res.status.success() {
        bail!(
            "sfdisk {} failed: {}",
            out.display(),
            String::from_utf8_lossy(&res.stderr)
        );
    }
    let mut disk = std::fs::OpenOptions::new().write(true).open(out)?;
    let mut offset = MIB;
    for p in parts {
        if let Some(src) = &p.contents {
            let len = std::fs::metadata(src)?.len();
            if len > p.size_mib * MIB {
                bail!(
                    "{} ({len} bytes) does not fit partition {} ({} MiB)",
                    src.display(),
                    p.label,
                    p.size_mib
                );
            }
            copy_sparse(src, &mut disk, offset).with_context(|| {
                format!("failed to copy {} into {}", src.display(), out.display())
            })?;
        }
        offset += p.size_mib * MIB;
    }
    disk.sync_all()?;
    Ok(())
}

/// Copies `src` to `dst` at `offset`, skipping all-zero 4 KiB blocks (the file is sparse).
fn copy_sparse(src: &Path, dst: &mut File, offset: u64) -> Result<()> {
    let mut f = File::open(src)?;
    let mut buf = vec![0u8; MIB as usize];
    let mut pos = offset;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        for (i, block) in buf[..n].chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                dst.seek(SeekFrom::Start(pos + (i * 4096) as u64))?;
                dst.write_all(block)?;
            }
        }
        pos += n as u64;
    }
    Ok(())
}

fn read_full(f: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

pub fn make_qcow2(raw: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_file(out)?;
    }
    cmd::output(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(out),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_each_other_from_one_mib() {
        let parts = [
            Part {
                label: "esp",
                type_guid: "T1",
                uuid: "U1".into(),
                size_mib: 64,
                contents: None,
            },
            Part {
                label: "root-a",
                type_guid: "T2",
                uuid: "U2".into(),
                size_mib: 256,
                contents: None,
            },
        ];
        let s = sfdisk_script("D", &parts);
        assert!(s.starts_with("label: gpt\nlabel-id: D\n"));
        assert!(s.contains("start=2048, size=131072, type=T1, uuid=U1, name=\"esp\"\n"));
        assert!(s.contains("start=133120, size=524288, type=T2, uuid=U2, name=\"root-a\"\n"));
    }

    #[test]
    fn sparse_copy_keeps_content_at_offset() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let mut data = vec![0u8; 3 * 4096 + 10];
        data[4096] = 7;
        data[3 * 4096 + 9] = 9;
        std::fs::write(&src, &data).unwrap();
        let dst_path = dir.path().join("dst");
        let mut dst = File::create(&dst_path).unwrap();
        dst.set_len(100_000).unwrap();
        copy_sparse(&src, &mut dst, 8192).unwrap();
        let got = std::fs::read(&dst_path).unwrap();
        assert_eq!(&got[8192..8192 + data.len()], &data[..]);
    }
}
