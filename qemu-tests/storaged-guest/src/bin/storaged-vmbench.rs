//! The storage bench's guest program: PID 1 of the light VM that `cargo xtask bench
//! storage` boots (Debian's kernel, raw virtio disks `pool0`, `raw0` and `lvm0`, Debian's
//! fio, mke2fs, lvm and NFS server programs copied into the initramfs). It builds
//! storaged's pool on `pool0` with the library and an LVM thin pool on `lvm0` with
//! Debian's lvm2 (what TopoLVM and OpenEBS LVM-LocalPV give Kubernetes users), and runs
//! the same fio jobs on the raw disk, on an RWO thin volume of the same size and on an
//! LVM thin volume of that size. Then it reads one file of an ext4 volume through one
//! bind mount (RWO), through four bind mounts of the same staging mount at once (RWX, as
//! the CSI node service publishes it) and through four NFS mounts of that staging mount
//! served by the kernel's NFS server in the same guest (the RWX peer). It prints
//! `VMBENCH RESULT <json>` (or `VMBENCH FAILED: <why>`), then `VMBENCH DONE`, and powers
//! off. Between the two it prints figures that are not part of the result but explain
//! it: the cost of each device-mapper layer with the guest's CPU use, and the thin
//! volume on pools of other block sizes (disks `pool1`..`pool3`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use storaged::{mounts, Options, Pool};
use storaged_guest::disk;

const MIB: u64 = 1 << 20;
/// The size of the raw disk and of the RWO volume: the whole device is the test area.
const DEVICE_BYTES: u64 = 1 << 30;
const FS_VOLUME_BYTES: u64 = 512 * MIB;
/// The file every reader reads (one model, many inference pods).
const MODEL_MIB: u64 = 256;
const READERS: usize = 4;
const FIO: &str = "/usr/bin/fio";
const LVM: &str = "/usr/sbin/lvm";
/// lvm2 with no udev, no lvmetad, no dmeventd and no thin_check in the guest: it makes
/// its device nodes itself and checks nothing it has not just made.
const LVM_CONFIG: &str = "activation { udev_sync = 0 udev_rules = 0 \
    verify_udev_operations = 1 monitoring = 0 } devices { obtain_device_list_from_udev = 0 } \
    global { thin_check_executable = \"\" }";
/// Each measured job runs 10 s after a 2 s ramp that is not measured.
const RUNTIME: &str = "--runtime=10";
const RAMP: &str = "--ramp_time=2";
/// Rounds of each random 4 KiB job on every device; the figure is their median.
const RANDOM_ROUNDS: usize = 3;
const STAGING: &str = "/var/lib/edge/staging/model";

fn main() {
    storaged_guest::setup(storaged_guest::Setup {
        tmp: true,
        quiet_kernel: true,
    });
    match bench() {
        Ok(v) => println!("VMBENCH RESULT {v}"),
        Err(e) => println!("VMBENCH FAILED: {}", e.replace('\n', " ")),
    }
    println!("VMBENCH DONE");
    // SAFETY: plain syscalls; powering off is the point.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}

fn bench() -> Result<Value, String> {
    let raw = disk("raw0")?;
    let pool_disk = disk("pool0")?;
    let opts = Options {
        // The disk is the bench's own fresh sparse file; force says so explicitly.
        force: true,
        ..Default::default()
    };
    let mut pool = Pool::open(&pool_disk, opts).map_err(|e| e.to_string())?;
    pool.create_volume("rwo", DEVICE_BYTES)
        .map_err(|e| e.to_string())?;
    let rwo = pool.activate("rwo").map_err(|e| e.to_string())?;
    println!(
        "bench pool: {} KiB thin blocks",
        pool.superblock().data_block_sectors / 2
    );
    let lvm = lvm_thin(&disk("lvm0")?)?;
    queue_limits(&[&raw, &rwo, &lvm]);
    let [raw_figures, mut rwo_figures, lvm_figures] =
        block_jobs([("raw", &raw), ("rwo", &rwo), ("lvmthin", &lvm)])?;
    layers(&raw, &rwo)?;
    for (i, kib) in [64u32, 256, 1024].into_iter().enumerate() {
        block_size(&disk(&format!("pool{}", i + 1))?, kib)?;
    }

    pool.create_volume("model", FS_VOLUME_BYTES)
        .map_err(|e| e.to_string())?;
    let model = pool.activate("model").map_err(|e| e.to_string())?;
    let (one, many, nfs) = fs_jobs(&model)?;
    rwo_figures["fs_read_mib_s"] = json!(one);
    let total: f64 = many.iter().sum();
    Ok(json!({
        "raw": raw_figures,
        "rwo": rwo_figures,
        "lvmthin": lvm_figures,
        "rwx": {
            "read_mib_s": total,
            "readers": READERS,
            "per_reader_mib_s": many,
            "nfs_read_mib_s": nfs.iter().sum::<f64>(),
            "nfs_per_reader_mib_s": nfs,
        },
    }))
}

/// An LVM thin volume of `DEVICE_BYTES` on a thin pool of lvm2's defaults (chunk size,
/// zeroing) filling most of `disk`; returns its device node.
fn lvm_thin(disk: &Path) -> Result<PathBuf, String> {
    for dir in ["/run/lvm", "/run/lock/lvm", "/etc/lvm"] {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    }
    let dev = disk.to_string_lossy().into_owned();
    let size = format!("{}m", DEVICE_BYTES / MIB);
    let steps: [&[&str]; 4] = [
        &["pvcreate", "-y", "-ff", &dev],
        &["vgcreate", "bench", &dev],
        &[
            "lvcreate",
            "-y",
            "--type",
            "thin-pool",
            "-l",
            "90%VG",
            "-n",
            "pool",
            "bench",
        ],
        &[
            "lvcreate",
            "-y",
            "-V",
            &size,
            "-T",
            "bench/pool",
            "-n",
            "rwo",
        ],
    ];
    let lvm = |args: &[&str]| {
        run(Command::new(LVM)
            .args(&args[..1])
            .args(["--config", LVM_CONFIG])
            .args(&args[1..])
            .env("LVM_SUPPRESS_FD_WARNINGS", "1"))
    };
    for args in steps {
        lvm(args)?;
    }
    let shown = lvm(&[
        "lvs",
        "--noheadings",
        "-o",
        "lv_name,chunk_size,zero",
        "bench",
    ])?;
    println!(
        "bench lvm: {}",
        shown.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let node = PathBuf::from("/dev/mapper/bench-rwo");
    if !node.exists() {
        return Err(format!("lvm made no {}", node.display()));
    }
    Ok(node)
}

/// Runs a program to its end with no input; its stdout, or what it said on stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("failed to run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prints the request size limits of each device's queue: how the thin volume's I/O
/// reaches the disk explains part of its figures.
fn queue_limits(devs: &[&Path]) {
    use std::os::unix::fs::MetadataExt;
    for dev in devs {
        let Ok(meta) = std::fs::metadata(dev) else {
            continue;
        };
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let q = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/queue"));
        let read = |f: &str| {
            std::fs::read_to_string(q.join(f))
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".into())
        };
        println!(
            "bench queue {}: max_sectors_kb {}, chunk_sectors {}, optimal_io_size {}",
            dev.display(),
            read("max_sectors_kb"),
            read("chunk_sectors"),
            read("optimal_io_size")
        );
    }
}

/// Random 4 KiB reads and writes and 1 MiB sequential mixed reads and writes on whole
/// block devices, after writing each fully once so that reads hit written (on a thin
/// volume: provisioned) blocks, as they would on a volume in use. The devices take
/// turns job by job (the order rotating), so that a slow spell of the host, which
/// shares its two cores with other work, falls on all rather than on one.
fn block_jobs<const N: usize>(devs: [(&str, &Path); N]) -> Result<[Value; N], String> {
    let files = devs.map(|(_, dev)| format!("--filename={}", dev.display()));
    for ((label, dev), file) in devs.iter().zip(&files) {
        let fill = fio(&[file, "--name=fill", "--rw=write", "--bs=1M", "--iodepth=8"])?;
        println!(
            "bench {label}: filled {} at {:.1} MiB/s",
            dev.display(),
            mib_s(&fill, "write")?
        );
    }
    let timed = timed();
    // (job, rounds): the random jobs are emulated CPU per request here, and a slow
    // spell of the host moves one 10 s figure by up to 40 %: each device's random
    // figures are the median of `RANDOM_ROUNDS` rounds, the order rotating each round.
    let jobs: [(&[&str], usize); 5] = [
        (
            &["--name=randread", "--rw=randread", "--bs=4k"],
            RANDOM_ROUNDS,
        ),
        (
            &["--name=randwrite", "--rw=randwrite", "--bs=4k"],
            RANDOM_ROUNDS,
        ),
        (&["--name=seq", "--rw=rw", "--bs=1M", "--iodepth=8"], 1),
        // Not part of the result: sequential reads and writes each alone, to tell
        // which direction a gap in the mixed figure comes from.
        (
            &["--name=seqread", "--rw=read", "--bs=1M", "--iodepth=8"],
            1,
        ),
        (
            &["--name=seqwrite", "--rw=write", "--bs=1M", "--iodepth=8"],
            1,
        ),
    ];
    // results[job][device][round]
    let mut results: Vec<[Vec<Value>; N]> = Vec::new();
    let mut turn = 0;
    for (job, rounds) in jobs {
        let mut row = [const { Vec::new() }; N];
        for _ in 0..rounds {
            for i in 0..N {
                let d = (turn + i) % N;
                row[d].push(fio(&[&[files[d].as_str()], &timed[..], job].concat())?);
            }
            turn += 1;
        }
        results.push(row);
    }
    // The median over a job's rounds of one figure of a device.
    let figure = |job: usize, d: usize, dir: &str, key: &str| -> Result<f64, String> {
        let each = results[job][d]
            .iter()
            .map(|r| get(r, dir, key))
            .collect::<Result<Vec<f64>, String>>()?;
        if each.len() > 1 {
            let name = jobs[job].0[0].trim_start_matches("--name=");
            println!("bench {}: {name} rounds {each:.0?}", devs[d].0);
        }
        Ok(edge_common::median(each))
    };
    let mut out = [const { Value::Null }; N];
    for (d, (label, _)) in devs.iter().enumerate() {
        let randread = figure(0, d, "read", "iops")?;
        let randwrite = figure(1, d, "write", "iops")?;
        let (seq_read, seq_write) = (
            mib_s(&results[2][d][0], "read")?,
            mib_s(&results[2][d][0], "write")?,
        );
        println!(
            "bench {label}: randread {randread:.0} IOPS, randwrite {randwrite:.0} IOPS, \
             seq {:.1} MiB/s (read {seq_read:.1} + write {seq_write:.1}); \
             seq read alone {:.1} MiB/s, seq write alone {:.1} MiB/s",
            seq_read + seq_write,
            mib_s(&results[3][d][0], "read")?,
            mib_s(&results[4][d][0], "write")?,
        );
        out[d] = json!({
            "randread_iops": randread,
            "randwrite_iops": randwrite,
            "seq_mib_s": seq_read + seq_write,
        });
    }
    Ok(out)
}

/// Not part of the result: what each device-mapper layer costs here. 4 KiB random reads
/// and writes on the raw disk, on one and two `linear` layers over it, and on the thin
/// volume (a thin layer over the pool's `linear` data device), with the guest's CPU
/// use during each job.
fn layers(raw: &Path, rwo: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let ctl = edge_dm::Control::open(Path::new("/dev")).map_err(|e| e.to_string())?;
    let sectors = DEVICE_BYTES / 512;
    let mut lower = raw.to_path_buf();
    let mut devs = vec![("raw".to_owned(), raw.to_path_buf())];
    for name in ["lin1", "lin2"] {
        let rdev = std::fs::metadata(&lower)
            .map_err(|e| format!("stat {}: {e}", lower.display()))?
            .rdev();
        let params = edge_dm::linear_params(libc::major(rdev), libc::minor(rdev), 0);
        let (major, minor) = ctl.create(name, 0).map_err(|e| e.to_string())?;
        ctl.load_table(name, 0, sectors, "linear", &params)
            .map_err(|e| e.to_string())?;
        ctl.resume(name).map_err(|e| e.to_string())?;
        let node = PathBuf::from(format!("/dev/bench-{name}"));
        storaged::volumes::make_node(&node, major, minor).map_err(|e| e.to_string())?;
        devs.push((name.to_owned(), node.clone()));
        lower = node;
    }
    devs.push(("thin".to_owned(), rwo.to_path_buf()));
    let timed = timed();
    for job in [
        ["--name=randread", "--rw=randread", "--bs=4k"],
        ["--name=randwrite", "--rw=randwrite", "--bs=4k"],
    ] {
        let mut line = format!("bench layers {}:", &job[0][7..]);
        for (label, dev) in &devs {
            let file = format!("--filename={}", dev.display());
            let before = cpu_ticks();
            let r = fio(&[&[file.as_str()], &timed[..], &job[..]].concat())?;
            let after = cpu_ticks();
            let dir = if job[0].contains("read") {
                "read"
            } else {
                "write"
            };
            let busy = match (before, after) {
                (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                    100.0 * (b1 - b0) as f64 / (t1 - t0) as f64
                }
                _ => f64::NAN,
            };
            line += &format!(
                " {label} {:.0} IOPS (cpu {busy:.0}%),",
                get(&r, dir, "iops")?
            );
        }
        println!("{}", line.trim_end_matches(','));
    }
    Ok(())
}

/// Not part of the result: the thin volume's figures on a pool of `kib` KiB blocks, and
/// the mean request size its disk saw in each job.
fn block_size(dev: &Path, kib: u32) -> Result<(), String> {
    let opts = Options {
        force: true,
        dm_prefix: format!("bp{kib}"),
        block_sectors: kib * 2,
        ..Default::default()
    };
    let mut pool = Pool::open(dev, opts).map_err(|e| e.to_string())?;
    pool.create_volume("v", DEVICE_BYTES)
        .map_err(|e| e.to_string())?;
    let vol = pool.activate("v").map_err(|e| e.to_string())?;
    let file = format!("--filename={}", vol.display());
    fio(&[&file, "--name=fill", "--rw=write", "--bs=1M", "--iodepth=8"])?;
    let timed = timed();
    let mut line = format!("bench block {kib} KiB:");
    for (name, rw, bs, dir) in [
        ("randread", "randread", "4k", "read"),
        ("randwrite", "randwrite", "4k", "write"),
        ("seqread", "read", "1M", "read"),
        ("seqwrite", "write", "1M", "write"),
    ] {
        let before = disk_stat(dev);
        let args = [
            file.as_str(),
            &format!("--name={name}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            if bs == "4k" {
                "--iodepth=32"
            } else {
                "--iodepth=8"
            },
        ];
        let r = fio(&[&args[..], &timed[..]].concat())?;
        let after = disk_stat(dev);
        let figure = if bs == "4k" {
            format!("{:.0} IOPS", get(&r, dir, "iops")?)
        } else {
            format!("{:.1} MiB/s", mib_s(&r, dir)?)
        };
        // /sys/block/<disk>/stat: reads, merged, sectors, ticks, writes, merged, sectors.
        let (ios, sectors) = if dir == "read" { (0, 2) } else { (4, 6) };
        let req = match (before, after) {
            (Some(b), Some(a)) if a[ios] > b[ios] => {
                (a[sectors] - b[sectors]) as f64 / 2.0 / (a[ios] - b[ios]) as f64
            }
            _ => f64::NAN,
        };
        line += &format!(" {name} {figure} ({req:.0} KiB requests),");
    }
    println!("{}", line.trim_end_matches(','));
    Ok(())
}

fn disk_stat(dev: &Path) -> Option<Vec<u64>> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    let s = std::fs::read_to_string(format!("/sys/block/{name}/stat")).ok()?;
    Some(
        s.split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect(),
    )
}

/// (busy, total) jiffies of all CPUs from /proc/stat; idle and iowait are not busy.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

/// The filesystem path of a volume: formatted and mounted once at its staging path, bind
/// mounted into each pod. Returns the 1 MiB sequential read throughput of one reader
/// through the only bind (RWO; measured before and after the RWX job, the mean), that
/// of each of `READERS` readers through their own binds at the same time (RWX), and
/// that of each of `READERS` readers through their own NFS mounts of the same staging
/// mount (the peer).
fn fs_jobs(dev: &Path) -> Result<(f64, Vec<f64>, Vec<f64>), String> {
    mounts::mkfs_ext4(dev).map_err(|e| e.to_string())?;
    let staging = Path::new(STAGING);
    std::fs::create_dir_all(staging).map_err(|e| format!("mkdir {STAGING}: {e}"))?;
    mounts::mount_fs(dev, staging, "ext4", 0, "")
        .map_err(|e| format!("mount {} on {STAGING}: {e}", dev.display()))?;
    let pods: Vec<PathBuf> = (1..=READERS)
        .map(|i| PathBuf::from(format!("/var/lib/edge/pods/p{i}/model")))
        .collect();
    // The first pod writes the model; the others get it read-only, as inference pods do.
    publish(staging, &pods[0], false)?;
    let model_in = |pod: &Path| pod.join("model.bin").to_string_lossy().into_owned();
    let size = format!("--size={MODEL_MIB}M");
    let first = format!("--filename={}", model_in(&pods[0]));
    let w = fio(&[&first, &size, "--name=model", "--rw=write", "--bs=1M"])?;
    println!(
        "bench fs: wrote the model at {:.1} MiB/s",
        mib_s(&w, "write")?
    );
    let timed = timed();
    let read = [
        &["--rw=read", "--bs=1M", "--iodepth=8", "--readonly"],
        &timed[..],
    ]
    .concat();
    let alone = || -> Result<f64, String> {
        mib_s(
            &fio(&[&read[..], &[&size, &first, "--name=reader1"]].concat())?,
            "read",
        )
    };
    let before = alone()?;
    println!("bench rwo fs: 1 reader {before:.1} MiB/s");

    for pod in &pods[1..] {
        publish(staging, pod, true)?;
    }
    let many = readers(
        "rwx fs",
        &read,
        &size,
        &pods.iter().map(|p| model_in(p)).collect::<Vec<_>>(),
    )?;
    // The single reader again after the four, and the mean of both: a slow spell of
    // the host during either side then weighs on both sides of the ratio.
    let after = alone()?;
    let one = (before + after) / 2.0;
    println!("bench rwo fs: 1 reader again {after:.1} MiB/s (mean {one:.1})");
    // Not part of the result: the same readers through one mount, to tell a cost of
    // the bind mounts from that of four readers sharing the device and the one vCPU.
    let same = fio(&[&read[..], &[&size, &first, "--name=same", "--numjobs=4"]].concat())?;
    println!(
        "bench rwx fs: {READERS} readers through one mount {:.1} MiB/s in all",
        mib_s(&same, "read")?
    );
    let nfs = nfs_readers(staging, &read, &size)?;
    Ok((one, many, nfs))
}

/// `READERS` fio readers with the job `read` of `size`, one per file, at once; each
/// one's MiB/s, printed as `bench <label>: ...`. Options before the first `--name` are
/// global; each job reads its own file.
fn readers(label: &str, read: &[&str], size: &str, files: &[String]) -> Result<Vec<f64>, String> {
    let mut args: Vec<String> = read.iter().map(|s| s.to_string()).collect();
    args.push(size.to_owned());
    for (i, file) in files.iter().enumerate() {
        args.push(format!("--name=reader{}", i + 1));
        args.push(format!("--filename={file}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let each = fio_jobs(&args)?
        .iter()
        .map(|j| mib_s(j, "read"))
        .collect::<Result<Vec<f64>, String>>()?;
    if each.len() != files.len() {
        return Err(format!(
            "fio reported {} {label} readers, not {}",
            each.len(),
            files.len()
        ));
    }
    println!(
        "bench {label}: {} readers {:.1} MiB/s in all ({})",
        each.len(),
        each.iter().sum::<f64>(),
        each.iter()
            .map(|m| format!("{m:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(each)
}

/// The RWX peer, the path Longhorn's and Portworx's shared volumes take: the staging
/// mount exported by the kernel's NFS server (Debian's nfs-kernel-server: exportfs,
/// rpc.mountd and rpc.nfsd, NFSv4 only, so no rpcbind) on the guest's loopback, and
/// `READERS` readers with the same fio job, each through its own NFS mount (each pod
/// mounts the share). The NFS client reads with O_DIRECT as the others do; the server
/// reads the file through its page cache, as an NFS server does.
fn nfs_readers(staging: &Path, read: &[&str], size: &str) -> Result<Vec<f64>, String> {
    storaged_guest::loopback_up()?;
    std::fs::create_dir_all("/proc/fs/nfsd").ok();
    mounts::mount_fs(Path::new("nfsd"), Path::new("/proc/fs/nfsd"), "nfsd", 0, "")
        .map_err(|e| format!("mount nfsd on /proc/fs/nfsd: {e}"))?;
    // The shortest grace period the server allows: opens wait for it to end.
    for (knob, secs) in [("nfsv4leasetime", "10"), ("nfsv4gracetime", "10")] {
        std::fs::write(format!("/proc/fs/nfsd/{knob}"), secs)
            .map_err(|e| format!("/proc/fs/nfsd/{knob}: {e}"))?;
    }
    for dir in [
        "/var/lib/nfs/v4recovery",
        "/etc/exports.d",
        "/run/rpc_pipefs",
    ] {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
    }
    std::fs::write(
        "/etc/exports",
        format!(
            "{} 127.0.0.1(ro,fsid=0,no_subtree_check,no_root_squash,insecure)\n",
            staging.display()
        ),
    )
    .map_err(|e| format!("/etc/exports: {e}"))?;
    run(Command::new("/usr/sbin/exportfs").arg("-ra"))?;
    // rpc.mountd answers the server's export lookups; it stays in the foreground (its
    // own daemon would hold this program's pipes), its messages in a file.
    let mountd_log = "/tmp/rpc.mountd.log";
    let log = std::fs::File::create(mountd_log).map_err(|e| format!("{mountd_log}: {e}"))?;
    let mut mountd = Command::new("/usr/sbin/rpc.mountd")
        .args(["-F", "-N", "3", "--no-udp"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("failed to run /usr/sbin/rpc.mountd: {e}"))?;
    std::thread::sleep(Duration::from_millis(500));
    if let Ok(Some(st)) = mountd.try_wait() {
        return Err(format!(
            "rpc.mountd exited ({st}): {}",
            std::fs::read_to_string(mountd_log)
                .unwrap_or_default()
                .trim()
        ));
    }
    let started = std::time::Instant::now();
    run(Command::new("/usr/sbin/rpc.nfsd").args(["-N", "3", "--no-udp", "8"]))?;
    let mut files = Vec::new();
    for i in 1..=READERS {
        let dir = PathBuf::from(format!("/var/lib/edge/nfs/p{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        mounts::mount_fs(
            Path::new("127.0.0.1:/"),
            &dir,
            "nfs4",
            libc::MS_RDONLY,
            "vers=4.2,proto=tcp,addr=127.0.0.1,clientaddr=127.0.0.1",
        )
        .map_err(|e| format!("mount 127.0.0.1:/ (nfs4) on {}: {e}", dir.display()))?;
        files.push(format!("{}/model.bin", dir.display()));
    }
    // Past the grace period, so that the readers' opens are served at once.
    if let Some(left) = Duration::from_secs(11).checked_sub(started.elapsed()) {
        std::thread::sleep(left);
    }
    readers("rwx nfs", read, size, &files)
}

fn publish(staging: &Path, pod: &Path, read_only: bool) -> Result<(), String> {
    std::fs::create_dir_all(pod).map_err(|e| format!("mkdir {}: {e}", pod.display()))?;
    mounts::bind(staging, pod, read_only)
        .map_err(|e| format!("bind {} on {}: {e}", staging.display(), pod.display()))
}

/// One fio run of the given job options, reported as one group.
fn fio(args: &[&str]) -> Result<Value, String> {
    let mut all = args.to_vec();
    all.push("--group_reporting");
    let mut jobs = fio_jobs(&all)?;
    if jobs.len() != 1 {
        return Err(format!("fio reported {} job groups, not 1", jobs.len()));
    }
    Ok(jobs.remove(0))
}

/// The options of a measured job: it runs for a fixed time after an unmeasured ramp
/// (fills and the model's write run to their size instead).
fn timed() -> [&'static str; 3] {
    ["--time_based", RUNTIME, RAMP]
}

/// Runs fio with the bench's common options (direct I/O through libaio, queue depth 32
/// unless a job says otherwise) and returns its JSON `jobs`.
fn fio_jobs(args: &[&str]) -> Result<Vec<Value>, String> {
    let common = [
        "--output-format=json",
        "--ioengine=libaio",
        "--direct=1",
        "--iodepth=32",
    ];
    let out = Command::new(FIO)
        .args(common)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("failed to run {FIO}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "fio {} failed ({}): {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        ));
    }
    // fio may print notes before the JSON document.
    let doc = stdout
        .find('{')
        .map(|i| &stdout[i..])
        .ok_or_else(|| format!("fio {} printed no JSON: {stdout}", args.join(" ")))?;
    let v: Value = serde_json::from_str(doc)
        .map_err(|e| format!("fio {} printed bad JSON: {e}", args.join(" ")))?;
    let jobs = v
        .get("jobs")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("fio {} reported no jobs", args.join(" ")))?;
    for j in jobs {
        if let Some(err) = j.get("error").and_then(Value::as_i64).filter(|e| *e != 0) {
            return Err(format!("fio {} job error {err}", args.join(" ")));
        }
    }
    Ok(jobs.clone())
}

fn get(job: &Value, dir: &str, key: &str) -> Result<f64, String> {
    job.get(dir)
        .and_then(|d| d.get(key))
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("fio job has no {dir}.{key}"))
}

/// fio's `bw` is KiB/s.
fn mib_s(job: &Value, dir: &str) -> Result<f64, String> {
    Ok(get(job, dir, "bw")? / 1024.0)
}
