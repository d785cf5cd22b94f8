//! The pool-partition phases: no spare disk, only a system disk with a GPT.
//! `part`: the disk (built by the host: a small image's partitions, the file then grown
//! as when an image is written onto a bigger disk) gets a `pool` partition in its free
//! space, the pool is made on it and volumes work; looking again finds the same one.
//! `part-reboot`: the kernel now reads `pool` from the table itself; the pool and its
//! volume are found again. `part-refused`: a full disk gets no partition (a clear error,
//! the disk unchanged), a `pool` partition holding an ext4 superblock is refused, and
//! the real daemon (`pool_device = "auto"`) logs why and serves without a pool.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storaged::csi::api::*;
use storaged::csi::Client;
use storaged::{Error, Pool};
use volume_capability::Mode;

use super::csi::{cap, create};
use super::{check_pattern, disk, e2s, opts, report, write_pattern, MIB};

const MIN: u64 = storaged::superblock::MIN_DEVICE_BYTES;

fn sys() -> &'static Path {
    Path::new("/sys")
}

fn dev() -> &'static Path {
    Path::new("/dev")
}

/// The kernel's partitions of `disk` (names under /sys/block/<disk>).
fn partitions(disk: &Path) -> Vec<String> {
    let name = disk.file_name().unwrap_or_default().to_string_lossy();
    let mut v: Vec<String> = std::fs::read_dir(Path::new("/sys/block").join(&*name))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&*name))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn found() -> Result<PathBuf, String> {
    storaged::partition::pool_partition(sys(), dev(), MIN)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no pool partition and no system disk".to_string())
}

pub fn first() {
    let _ = edge_common::init_logging("info");
    let part = match (|| {
        let sys0 = disk("sys0")?;
        let before = partitions(&sys0);
        if before.len() != 3 {
            return Err(format!("the system disk starts with {before:?}"));
        }
        let p = found()?;
        let after = partitions(&sys0);
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if after.len() != 4 || !after.contains(&name) {
            return Err(format!(
                "partitions after: {after:?}, pool partition {name}"
            ));
        }
        Ok(p)
    })() {
        Ok(p) => {
            report("part_made_in_free_space", Ok(()));
            p
        }
        Err(e) => return report("part_made_in_free_space", Err(e)),
    };
    report(
        "part_pool_volumes",
        (|| {
            let mut pool = Pool::open(&part, opts()).map_err(e2s)?;
            if !pool.formatted {
                return Err("the new partition was not formatted as a pool".into());
            }
            // About 227 MiB of partition: the pool's data area is most of it.
            let data = pool.superblock().data_bytes;
            if data < 200 * MIB {
                return Err(format!("pool data area is only {data} bytes"));
            }
            pool.create_volume("v", 64 * MIB).map_err(e2s)?;
            let v = pool.activate("v").map_err(e2s)?;
            write_pattern(&v, 11, 16 * MIB)?;
            check_pattern(&v, 11, 16 * MIB)?;
            pool.close().map_err(e2s)
        })(),
    );
    report(
        "part_found_again_not_made_twice",
        (|| {
            let again = found()?;
            let n = partitions(&disk("sys0")?).len();
            if again != part || n != 4 {
                return Err(format!(
                    "second look: {} and {n} partitions",
                    again.display()
                ));
            }
            Ok(())
        })(),
    );
}

pub fn reboot() {
    let _ = edge_common::init_logging("info");
    report(
        "part_pool_survives_reboot",
        (|| {
            let p = found()?;
            // The kernel read it from the table at boot: it carries the label now.
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let ev =
                std::fs::read_to_string(Path::new("/sys/class/block").join(&name).join("uevent"))
                    .map_err(|e| e.to_string())?;
            if !ev.lines().any(|l| l == "PARTNAME=pool") {
                return Err(format!("{name} uevent: {ev}"));
            }
            let pool = Pool::open(&p, opts()).map_err(e2s)?;
            if pool.formatted {
                return Err("the pool partition was formatted again".into());
            }
            let v = pool.activate("v").map_err(e2s)?;
            check_pattern(&v, 11, 16 * MIB)?;
            pool.close().map_err(e2s)
        })(),
    );
}

pub fn refused() {
    report(
        "part_no_room_is_a_clear_error",
        (|| {
            let full = disk("full0")?;
            let name = full
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            match storaged::partition::pool_partition_on(sys(), dev(), &name, MIN) {
                Err(e @ Error::NoRoom { .. }) if e.to_string().contains(&name) => {
                    println!("full disk: {e}");
                    Ok(())
                }
                other => Err(format!("full disk: {other:?}")),
            }
        })(),
    );
    report(
        "part_foreign_data_refused",
        (|| {
            let f = disk("foreign0")?;
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let p = storaged::partition::pool_partition_on(sys(), dev(), &name, MIN)
                .map_err(|e| e.to_string())?;
            match Pool::open(&p, opts()) {
                Err(e @ Error::ForeignData { .. }) if e.to_string().contains("ext2/3/4") => Ok(()),
                Err(e) => Err(format!("wrong error: {e}")),
                Ok(_) => Err("claimed a pool partition holding ext4".into()),
            }
        })(),
    );
    report("part_daemon_serves_without_a_pool", daemon());
}

const CONFIG: &str = "/etc/storaged-part.toml";
const SOCKET: &str = "/run/storaged/csi.sock";
const LOG: &str = "/storaged-part.log";

/// The real daemon with `pool_device = "auto"`: it cannot use the pool partition, says
/// so, and still serves CSI, answering volume calls with FAILED_PRECONDITION.
fn daemon() -> Result<(), String> {
    std::fs::create_dir_all("/etc").map_err(|e| e.to_string())?;
    std::fs::write(
        CONFIG,
        format!(
            "state_dir = \"/var/lib/storaged\"\ncsi_socket = \"{SOCKET}\"\npool_device = \"auto\"\n"
        ),
    )
    .map_err(|e| format!("write {CONFIG}: {e}"))?;
    let log = std::fs::File::create(LOG).map_err(|e| format!("create {LOG}: {e}"))?;
    let mut child = Command::new("/sbin/storaged")
        .args(["--config", CONFIG])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("start /sbin/storaged: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let r = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let c = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("storaged exited at start: {st}"));
            }
            if let Ok(c) = Client::connect(Path::new(SOCKET)).await {
                if c.call::<_, ProbeResponse>("/csi.v1.Identity/Probe", ProbeRequest {})
                    .await
                    .is_ok()
                {
                    break c;
                }
            }
            if Instant::now() > deadline {
                return Err("storaged did not serve within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match c
            .call::<_, CreateVolumeResponse>(
                "/csi.v1.Controller/CreateVolume",
                create("v", 8 << 20, cap(true, Mode::SingleNodeWriter)),
            )
            .await
        {
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(()),
            other => Err(format!("CreateVolume without a pool: {other:?}")),
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(LOG).unwrap_or_default();
    print!("{text}");
    r?;
    if !(text.contains("the pool is not in use") && text.contains("refusing to overwrite")) {
        return Err("the daemon's log does not say why there is no pool".into());
    }
    Ok(())
}
