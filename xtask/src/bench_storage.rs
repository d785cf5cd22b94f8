//! `cargo xtask bench storage`: Debian's fio in the light VM (qemu-tests' `lightvm`:
//! Debian's kernel, raw virtio disks, TCG) on the raw disk, on an RWO thin volume of
//! storaged's pool, on an LVM thin volume made by Debian's lvm2 on a disk of its own (the
//! peer), and through four bind mounts of one ext4 volume (RWX) and four NFS mounts of it
//! from the kernel's NFS server in the same guest (the RWX peer). The guest side
//! is `storaged-vmbench` (qemu-tests/storaged-guest); this builds it, boots it once, and
//! prints the figures and ratios, then one JSON line last.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use qemu_tests::lightvm::{self, Boot, Kernel};
use serde_json::Value;

/// fio, mke2fs, lvm and the NFS server's programs are copied from the host into the
/// guest; kmod's depmod and dpkg-deb unpack the kernel.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "fio",
    "e2fsprogs",
    "kmod",
    "lvm2",
    "nfs-kernel-server",
];

/// The NFS server's programs (NFSv4 only: no rpcbind).
const NFS_PROGRAMS: &[&str] = &["exportfs", "rpc.mountd", "rpc.nfsd"];

/// What libtirpc and name lookups read in the guest.
const NFS_FILES: &[&str] = &["/etc/netconfig", "/etc/protocols", "/etc/services"];

const MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "dm_thin_pool",
    "ext4",
    "nfsd",
    "nfsv4",
];

const GIB: u64 = 1 << 30;

/// The figures the guest reports (see storaged-vmbench for how each is measured).
#[derive(Debug, Clone, PartialEq)]
struct Block {
    randread_iops: f64,
    randwrite_iops: f64,
    seq_mib_s: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct Figures {
    raw: Block,
    rwo: Block,
    /// The peer: an LVM thin volume of the same size on its own disk.
    lvmthin: Block,
    /// One reader through the volume's only bind mount.
    rwo_fs_read_mib_s: f64,
    /// All readers together, each through its own bind mount of the same staging mount.
    rwx_read_mib_s: f64,
    readers: u64,
    per_reader_mib_s: Vec<f64>,
    /// All readers together, each through its own NFS mount of the same file.
    nfs_read_mib_s: f64,
}

fn num(v: &Value, ptr: &str) -> Result<f64> {
    v.pointer(ptr)
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("the guest's result has no number at {ptr}: {v}"))
}

fn block(v: &Value, which: &str) -> Result<Block> {
    Ok(Block {
        randread_iops: num(v, &format!("/{which}/randread_iops"))?,
        randwrite_iops: num(v, &format!("/{which}/randwrite_iops"))?,
        seq_mib_s: num(v, &format!("/{which}/seq_mib_s"))?,
    })
}

/// The guest's `VMBENCH RESULT <json>` line, or its `VMBENCH FAILED: <why>`.
fn parse_console(console: &str) -> Result<Figures> {
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(why) = line.split_once("VMBENCH FAILED: ").map(|x| x.1) {
            bail!("the guest failed: {why}");
        }
        let Some(doc) = line.split_once("VMBENCH RESULT ").map(|x| x.1) else {
            continue;
        };
        let v: Value = serde_json::from_str(doc)
            .with_context(|| format!("the guest's result is not JSON: {doc}"))?;
        let per_reader_mib_s = v
            .pointer("/rwx/per_reader_mib_s")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("the guest's result has no per-reader figures: {v}"))?
            .iter()
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| anyhow!("bad per-reader figure {x}"))
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Figures {
            raw: block(&v, "raw")?,
            rwo: block(&v, "rwo")?,
            lvmthin: block(&v, "lvmthin")?,
            rwo_fs_read_mib_s: num(&v, "/rwo/fs_read_mib_s")?,
            rwx_read_mib_s: num(&v, "/rwx/read_mib_s")?,
            readers: num(&v, "/rwx/readers")? as u64,
            per_reader_mib_s,
            nfs_read_mib_s: num(&v, "/rwx/nfs_read_mib_s")?,
        });
    }
    bail!("the guest printed no VMBENCH RESULT line")
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        round(a / b, 3)
    } else {
        0.0
    }
}

fn block_json(b: &Block) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("randread_iops".into(), round(b.randread_iops, 0).into());
    m.insert("randwrite_iops".into(), round(b.randwrite_iops, 0).into());
    m.insert("seq_mib_s".into(), round(b.seq_mib_s, 1).into());
    m
}

/// The last line, keys in the issue's order (serde_json's maps would sort them).
fn result_line(f: &Figures) -> String {
    let raw = Value::Object(block_json(&f.raw));
    let mut rwo = block_json(&f.rwo);
    rwo.insert("fs_read_mib_s".into(), round(f.rwo_fs_read_mib_s, 1).into());
    let rwx = serde_json::json!({
        "read_mib_s": round(f.rwx_read_mib_s, 1),
        "readers": f.readers,
        "nfs_read_mib_s": round(f.nfs_read_mib_s, 1),
    });
    format!(
        "{{\"bench\":\"storage\",\"rwo_randread_vs_raw\":{},\"rwo_randwrite_vs_raw\":{},\
         \"rwo_seq_vs_raw\":{},\"rwx_read_vs_rwo\":{},\"rwo_randread_vs_lvmthin\":{},\
         \"rwo_randwrite_vs_lvmthin\":{},\"rwo_seq_vs_lvmthin\":{},\"rwx_read_vs_nfs\":{},\
         \"raw\":{raw},\"rwo\":{},\
         \"lvmthin\":{},\"rwx\":{rwx}}}",
        ratio(f.rwo.randread_iops, f.raw.randread_iops),
        ratio(f.rwo.randwrite_iops, f.raw.randwrite_iops),
        ratio(f.rwo.seq_mib_s, f.raw.seq_mib_s),
        ratio(f.rwx_read_mib_s, f.rwo_fs_read_mib_s),
        ratio(f.rwo.randread_iops, f.lvmthin.randread_iops),
        ratio(f.rwo.randwrite_iops, f.lvmthin.randwrite_iops),
        ratio(f.rwo.seq_mib_s, f.lvmthin.seq_mib_s),
        ratio(f.rwx_read_mib_s, f.nfs_read_mib_s),
        Value::Object(rwo),
        Value::Object(block_json(&f.lvmthin)),
    )
}

/// Builds the guest program statically, as the image builder builds its binaries, in
/// the workspace cargo runs in. Its path comes from cargo's own report: the target
/// directory may be shared with other clones of the workspace, so a path derived from
/// a crate's compile-time manifest directory can name another clone's build.
fn guest_binary() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--target", "x86_64-unknown-linux-gnu"])
        .args(["-p", "storaged-guest", "--bin", "storaged-vmbench"])
        .arg("--message-format=json-render-diagnostics")
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        )
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("failed to run cargo build -p storaged-guest --bin storaged-vmbench")?;
    if !out.status.success() {
        bail!("building storaged-vmbench failed ({})", out.status);
    }
    executable(&String::from_utf8_lossy(&out.stdout), "storaged-vmbench")
}

/// The executable cargo's JSON messages name for binary target `name`.
fn executable(messages: &str, name: &str) -> Result<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo reported no executable for {name}"))
}

/// A host program and the shared libraries and loader `ldd` names for it, each at its
/// host path inside the initramfs (the loader's built-in search path finds them there).
fn with_libraries(program: &Path, files: &mut Vec<(PathBuf, String)>) -> Result<()> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("failed to run ldd {}", program.display()))?;
    if !out.status.success() {
        bail!("ldd {} failed ({})", program.display(), out.status);
    }
    let mut paths = vec![program.to_string_lossy().into_owned()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libx.so.1 => /lib/.../libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            paths.push(p.to_owned());
        }
    }
    for p in paths {
        let inside = p.trim_start_matches('/').to_owned();
        if !files.iter().any(|(_, i)| *i == inside) {
            files.push((PathBuf::from(&p), inside));
        }
    }
    Ok(())
}

fn find_program(name: &str) -> Result<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("{name} is not installed on the host"))
}

/// Removes the bench's disks and initramfs however the run ends.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sparse_disk(path: &Path, bytes: u64) -> Result<()> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .with_context(|| format!("failed to create disk {}", path.display()))
}

pub fn run() -> Result<()> {
    crate::host::ensure_packages(PACKAGES)?;
    let bin = guest_binary()?;
    let kernel = Kernel::get().context("failed to unpack the kernel")?;
    let work =
        WorkDir(std::env::temp_dir().join(format!("edgeos-bench-storage-{}", std::process::id())));
    std::fs::create_dir_all(&work.0)
        .with_context(|| format!("failed to create {}", work.0.display()))?;
    let mut files = Vec::new();
    // storaged runs mke2fs from /usr/sbin or /sbin; fio is run as /usr/bin/fio.
    with_libraries(&find_program("fio")?, &mut files)?;
    with_libraries(&find_program("mke2fs")?, &mut files)?;
    with_libraries(&find_program("lvm")?, &mut files)?;
    for p in NFS_PROGRAMS {
        with_libraries(&find_program(p)?, &mut files)?;
    }
    for f in NFS_FILES {
        files.push((PathBuf::from(f), f.trim_start_matches('/').to_owned()));
    }
    let initrd = work.0.join("initrd.cpio");
    lightvm::initramfs_with_files(&kernel, &bin, MODULES, &files, &initrd)?;
    // The raw disk and the RWO volume are 1 GiB each; the pool disk also holds the thin
    // metadata and the 512 MiB ext4 volume of the RWX part.
    let pool = work.0.join("pool0.raw");
    let raw = work.0.join("raw0.raw");
    sparse_disk(&pool, 2 * GIB)?;
    sparse_disk(&raw, GIB)?;
    let lvm = work.0.join("lvm0.raw");
    sparse_disk(&lvm, 2 * GIB)?;
    let mut disks = vec![
        (pool, "pool0".to_owned()),
        (raw, "raw0".to_owned()),
        (lvm, "lvm0".to_owned()),
    ];
    for i in 1..=3 {
        let p = work.0.join(format!("pool{i}.raw"));
        sparse_disk(&p, 2 * GIB)?;
        disks.push((p, format!("pool{i}")));
    }
    // On the appliance's own hardware (or any host whose /dev/kvm works) the ratios to
    // the raw disk are the ones that matter; under TCG they measure emulated CPU.
    let kvm = std::env::var("EDGEOS_BENCH_KVM").is_ok_and(|v| v == "1");
    match kvm {
        true => println!("bench storage: booting the light VM (KVM)"),
        false => println!("bench storage: booting the light VM (TCG; about 13 minutes)"),
    }
    let console = lightvm::boot(&Boot {
        kernel: &kernel,
        initramfs: &initrd,
        disks,
        append: String::new(),
        console: work.0.join("console.log"),
        timeout: Duration::from_secs(1500),
        kvm,
        progress: Some("bench "),
    })?;
    let f = parse_console(&console)?;
    if !kvm {
        println!("Under TCG (no KVM) the absolute figures are emulator speeds, not disk speeds; only the ratios mean something.");
    }
    for (name, b) in [
        ("raw disk", &f.raw),
        ("RWO thin volume", &f.rwo),
        ("LVM thin volume", &f.lvmthin),
    ] {
        println!(
            "{name:>16}: 4 KiB randread {:.0} IOPS, 4 KiB randwrite {:.0} IOPS, 1 MiB seq read+write {:.1} MiB/s",
            b.randread_iops, b.randwrite_iops, b.seq_mib_s
        );
    }
    println!(
        "RWO / raw: randread {:.3}x, randwrite {:.3}x, seq {:.3}x (target >= 0.9x)",
        ratio(f.rwo.randread_iops, f.raw.randread_iops),
        ratio(f.rwo.randwrite_iops, f.raw.randwrite_iops),
        ratio(f.rwo.seq_mib_s, f.raw.seq_mib_s)
    );
    println!(
        "RWO / LVM thin: randread {:.3}x, randwrite {:.3}x, seq {:.3}x (target >= 1.0x)",
        ratio(f.rwo.randread_iops, f.lvmthin.randread_iops),
        ratio(f.rwo.randwrite_iops, f.lvmthin.randwrite_iops),
        ratio(f.rwo.seq_mib_s, f.lvmthin.seq_mib_s)
    );
    println!(
        "ext4 volume, 1 MiB sequential reads: 1 reader (RWO, mean of before and after) {:.1} MiB/s; {} readers on bind mounts (RWX) {:.1} MiB/s in all ({})",
        f.rwo_fs_read_mib_s,
        f.readers,
        f.rwx_read_mib_s,
        f.per_reader_mib_s
            .iter()
            .map(|m| format!("{m:.1}"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    println!(
        "RWX / RWO read: {:.3}x (target >= 0.9x)",
        ratio(f.rwx_read_mib_s, f.rwo_fs_read_mib_s)
    );
    println!(
        "{} readers through NFS mounts (the peer) {:.1} MiB/s in all; RWX / NFS read: {:.3}x (target >= 3x)",
        f.readers,
        f.nfs_read_mib_s,
        ratio(f.rwx_read_mib_s, f.nfs_read_mib_s)
    );
    println!("{}", result_line(&f));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "[    1.2] virtio_blk virtio1: [vda] 4194304 512-byte logical blocks\n\
        bench raw: randread 900 IOPS\r\n\
        VMBENCH RESULT {\"raw\":{\"randread_iops\":1000.4,\"randwrite_iops\":800.0,\"seq_mib_s\":200.0},\
        \"rwo\":{\"randread_iops\":950.0,\"randwrite_iops\":400.0,\"seq_mib_s\":190.0,\"fs_read_mib_s\":100.0},\
        \"lvmthin\":{\"randread_iops\":475.0,\"randwrite_iops\":500.0,\"seq_mib_s\":190.0},\
        \"rwx\":{\"read_mib_s\":96.0,\"readers\":4,\"per_reader_mib_s\":[24.0,24.0,24.0,24.0],\"nfs_read_mib_s\":32.0}}\r\n\
        VMBENCH DONE\n";

    #[test]
    fn the_result_line_has_the_issues_keys_in_order_and_the_ratios() {
        let f = parse_console(CONSOLE).unwrap();
        assert_eq!(f.readers, 4);
        let line = result_line(&f);
        assert!(
            line.starts_with(
                "{\"bench\":\"storage\",\"rwo_randread_vs_raw\":0.95,\"rwo_randwrite_vs_raw\":0.5,\
                 \"rwo_seq_vs_raw\":0.95,\"rwx_read_vs_rwo\":0.96,\"rwo_randread_vs_lvmthin\":2,\
                 \"rwo_randwrite_vs_lvmthin\":0.8,\"rwo_seq_vs_lvmthin\":1,\"rwx_read_vs_nfs\":3,\"raw\":{"
            ),
            "{line}"
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["raw"]["randread_iops"], 1000.0);
        assert_eq!(v["rwo"]["fs_read_mib_s"], 100.0);
        assert_eq!(v["lvmthin"]["randwrite_iops"], 500.0);
        assert_eq!(v["rwx"]["read_mib_s"], 96.0);
        assert_eq!(v["rwx"]["readers"], 4);
        assert_eq!(v["rwx"]["nfs_read_mib_s"], 32.0);
    }

    #[test]
    fn the_guest_binary_is_where_cargo_says() {
        let msgs = "{\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"storaged\"},\"executable\":null}\n\
            {\"reason\":\"compiler-artifact\",\"target\":{\"name\":\"storaged-vmbench\"},\"executable\":\"/t/release/storaged-vmbench\"}\n\
            {\"reason\":\"build-finished\",\"success\":true}\n";
        assert_eq!(
            executable(msgs, "storaged-vmbench").unwrap(),
            PathBuf::from("/t/release/storaged-vmbench")
        );
        assert!(executable("{\"reason\":\"build-finished\"}", "storaged-vmbench").is_err());
    }

    #[test]
    fn a_guest_failure_or_a_missing_result_is_an_error() {
        let err = parse_console("VMBENCH FAILED: no disk with serial raw0\nVMBENCH DONE\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no disk with serial raw0"), "{err}");
        assert!(parse_console("VMBENCH DONE\n").is_err());
    }
}
