//! storaged: volumes from the NVMe pool, served through CSI. It claims the configured
//! pool device (or says there is none), activates the thin pool, rediscovers the
//! catalog's volumes, binds the CSI socket, reports ready and serves CSI.

use std::path::{Path, PathBuf};

/// `pool_device = "auto"`.
const AUTO: &str = "auto";

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Where storaged keeps node-local state (on the data partition).
    state_dir: PathBuf,
    /// The CSI endpoint (unix socket) it serves.
    csi_socket: PathBuf,
    /// The device the pool lives on, e.g. `/dev/nvme1n1`, or `auto`: the NVMe disk
    /// that is not the system's (below). Absent: no pool on this box.
    #[serde(default)]
    pool_device: Option<PathBuf>,
    /// Or the pool's disk by the serial number it reports (NVMe controller or virtio
    /// disk): stable where names are not (NVMe controllers probe in parallel, so
    /// `nvme0`/`nvme1` can swap between boots).
    #[serde(default)]
    pool_serial: Option<String>,
    /// Overwrite whatever the pool device holds (a partition table, a filesystem,
    /// another pool). Never set this in a shipped config.
    #[serde(default)]
    pool_force: bool,
    /// Volumes may promise this percentage of the pool's data area in total.
    #[serde(default = "default_overcommit")]
    overcommit_percent: u32,
    /// The thin block size a new pool is formatted with, in KiB (a power of two from 64
    /// to 1048576). Larger blocks split large requests less and need less metadata;
    /// smaller ones copy less on the first write after a snapshot. An existing pool
    /// keeps its own.
    #[serde(default = "default_block_kib")]
    pool_block_kib: u32,
    /// Serves Prometheus text at `GET /metrics` on this TCP address (e.g.
    /// `127.0.0.1:9402`). Absent: no metrics endpoint.
    #[serde(default)]
    metrics_listen: Option<String>,
}

/// How often the pool's use is looked at for the near-full warnings.
const FULLNESS_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

fn default_overcommit() -> u32 {
    200
}

fn default_block_kib() -> u32 {
    storaged::superblock::DATA_BLOCK_SECTORS / 2
}

impl edge_common::Validate for Config {
    fn validate(&self) -> Result<(), (String, String)> {
        edge_common::require_absolute(&[
            ("state_dir", Some(&self.state_dir)),
            ("csi_socket", Some(&self.csi_socket)),
            (
                "pool_device",
                self.pool_device
                    .as_deref()
                    .filter(|d| *d != Path::new(AUTO)),
            ),
        ])?;
        if self.pool_device.is_some() && self.pool_serial.is_some() {
            return Err((
                "pool_serial".into(),
                "give either pool_device or pool_serial, not both".into(),
            ));
        }
        if !(100..=1000).contains(&self.overcommit_percent) {
            return Err((
                "overcommit_percent".into(),
                format!("{} is not within 100..=1000", self.overcommit_percent),
            ));
        }
        if !storaged::superblock::valid_block_sectors(self.pool_block_kib.saturating_mul(2)) {
            return Err((
                "pool_block_kib".into(),
                format!(
                    "{} is not a power of two from 64 to 1048576",
                    self.pool_block_kib
                ),
            ));
        }
        if let Some(addr) = &self.metrics_listen {
            addr.parse::<std::net::SocketAddr>().map_err(|e| {
                (
                    "metrics_listen".to_string(),
                    format!("{addr:?} is not an address:port ({e})"),
                )
            })?;
        }
        Ok(())
    }
}

/// The whole-disk block device whose disk reports `serial`: `/sys/block/<dev>/serial`
/// (virtio) or `/sys/block/<dev>/device/serial` (the NVMe controller).
fn device_by_serial(serial: &str) -> Option<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let dev = entry.path();
        let reported = ["serial", "device/serial"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dev.join(f)).ok());
        if reported.is_some_and(|r| r.trim() == serial) {
            found.push(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    found.sort();
    // An NVMe controller with several namespaces: the first one.
    found.into_iter().next()
}

/// The first bytes of `dev` as the pool's probe reads them.
fn probe(dev: &Path) -> Option<storaged::superblock::Probe> {
    use std::io::Read;
    let mut buf = vec![0u8; storaged::superblock::PROBE_BYTES];
    std::fs::File::open(dev)
        .and_then(|mut f| f.read_exact(&mut buf))
        .ok()?;
    Some(storaged::superblock::probe(&buf))
}

/// Among the NVMe disks with no partitions (the system disk has its GPT partitions; a
/// disk with someone's partition table is never a candidate): the one holding our pool,
/// and the first that is all zeros.
fn nvme_candidates() -> (Option<PathBuf>, Option<PathBuf>) {
    let mut disks: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("nvme"))
                .collect()
        })
        .unwrap_or_default();
    // Partitions show as subdirectories named after the disk.
    disks.retain(|n| {
        std::fs::read_dir(Path::new("/sys/block").join(n))
            .map(|d| {
                !d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(n.as_str()))
            })
            .unwrap_or(false)
    });
    disks.sort();
    let (mut ours, mut empty) = (None, None);
    for n in disks {
        let dev = Path::new("/dev").join(&n);
        match probe(&dev) {
            Some(storaged::superblock::Probe::Pool(_)) if ours.is_none() => ours = Some(dev),
            Some(storaged::superblock::Probe::Empty) if empty.is_none() => empty = Some(dev),
            Some(storaged::superblock::Probe::Foreign(what)) => {
                tracing::info!(disk = %n, "not a pool candidate: it holds {what}");
            }
            _ => {}
        }
    }
    (ours, empty)
}

/// `pool_device = "auto"`. Where a pool already is wins over where one could go: an
/// NVMe disk holding our pool, else the partition labelled `pool` holding it, else the
/// first all-zero NVMe disk, else the `pool` partition on the system disk (found, or
/// made in its free space: `partition.rs`). Names alone would not do: NVMe controllers
/// probe in parallel, so `nvme0`/`nvme1` can swap between boots.
fn auto_device(block_sectors: u32) -> storaged::Result<Option<PathBuf>> {
    let (sys, dev) = (Path::new("/sys"), Path::new("/dev"));
    let (ours, empty) = nvme_candidates();
    if ours.is_some() {
        return Ok(ours);
    }
    let part = storaged::partition::labelled_pool(sys, dev);
    if let Some(p) = part.filter(|p| matches!(probe(p), Some(storaged::superblock::Probe::Pool(_))))
    {
        return Ok(Some(p));
    }
    if empty.is_some() {
        return Ok(empty);
    }
    let min = storaged::superblock::min_device_bytes(block_sectors);
    let made = storaged::partition::pool_partition(sys, dev, min)?;
    if let Some(p) = &made {
        tracing::info!(device = %p.display(), "no spare NVMe disk: the pool is the pool partition");
    }
    Ok(made)
}

fn claim(config: &Config) -> storaged::Result<Option<storaged::Pool>> {
    let device = match (&config.pool_device, &config.pool_serial) {
        (Some(d), _) if d == Path::new(AUTO) => match auto_device(config.pool_block_kib * 2)? {
            Some(d) => d,
            None => {
                tracing::warn!("no pool device: no NVMe disk without partitions holds our pool or zeros, and no disk has a data partition to put a pool partition beside; serving no volumes");
                return Ok(None);
            }
        },
        (Some(d), _) => d.clone(),
        (None, Some(serial)) => match device_by_serial(serial) {
            Some(d) => d,
            None => {
                tracing::warn!(serial = %serial, "no pool device: no disk reports that serial; serving no volumes");
                return Ok(None);
            }
        },
        (None, None) => {
            tracing::warn!(
                "no pool device configured (pool_device or pool_serial): serving no volumes"
            );
            return Ok(None);
        }
    };
    let device = &device;
    if !device.exists() {
        tracing::warn!(device = %device.display(), "no pool device: it does not exist; serving no volumes");
        return Ok(None);
    }
    let opts = storaged::Options {
        force: config.pool_force,
        overcommit_percent: config.overcommit_percent,
        block_sectors: config.pool_block_kib * 2,
        ..Default::default()
    };
    let pool = storaged::Pool::open(device, opts)?;
    let st = pool.status()?;
    tracing::info!(
        device = %device.display(),
        volumes = pool.volumes().len(),
        data_used = st.used_data_blocks,
        data_total = st.total_data_blocks,
        meta_used = st.used_meta_blocks,
        meta_total = st.total_meta_blocks,
        "pool ready"
    );
    Ok(Some(pool))
}

async fn serve(config: Config) -> storaged::Result<()> {
    edge_common::ensure_dir(&config.state_dir)?;
    // A pool device that cannot be claimed (foreign data, a damaged superblock) needs
    // an operator, not a restart loop or a rolled-back update: storaged says why and
    // serves without a pool, and CSI calls for volumes get FAILED_PRECONDITION.
    let pool = claim(&config).unwrap_or_else(|e| {
        tracing::error!("the pool is not in use: {e}");
        None
    });
    let listener = storaged::csi::bind(&config.csi_socket)?;
    tracing::info!(socket = %config.csi_socket.display(), "CSI endpoint serving");
    let driver = storaged::csi::Driver::new(pool, storaged::csi::Driver::hostname());
    let shared = driver.shared_pool();
    if let Some(addr) = &config.metrics_listen {
        let metrics = storaged::metrics::bind(addr).await?;
        tracing::info!(address = %addr, "metrics endpoint serving");
        tokio::spawn(storaged::metrics::serve(metrics, shared.clone()));
    }
    tokio::spawn(storaged::metrics::watch(shared, FULLNESS_PERIOD));
    edge_common::notify_ready()?;
    storaged::csi::serve_on(listener, driver).await
}

fn main() -> std::process::ExitCode {
    edge_common::run("storaged", serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &str) -> Result<Config, edge_common::Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storaged.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"/var/lib/storaged\"\ncsi_socket = \"/run/storaged/csi.sock\"\n{extra}"
            ),
        )
        .unwrap();
        edge_common::load_config(&path)
    }

    #[test]
    fn the_pool_block_size_defaults_to_512_kib_and_bad_sizes_are_named() {
        assert_eq!(load("").unwrap().pool_block_kib, 512);
        assert_eq!(load("pool_block_kib = 64").unwrap().pool_block_kib, 64);
        for bad in [0, 32, 96, 2097152] {
            let err = load(&format!("pool_block_kib = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("pool_block_kib") && err.contains(&format!("{bad} is not")),
                "{err}"
            );
        }
    }
}
