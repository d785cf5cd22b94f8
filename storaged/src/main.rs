//! storaged: volumes from the NVMe pool, served through CSI. It claims the configured
//! pool device (or says there is none), activates the thin pool, rediscovers the
//! catalog's volumes, binds the CSI socket, reports ready and serves CSI.

use std::path::PathBuf;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Where storaged keeps node-local state (on the data partition).
    state_dir: PathBuf,
    /// The CSI endpoint (unix socket) it serves.
    csi_socket: PathBuf,
    /// The device the pool lives on, e.g. `/dev/nvme1n1`. Absent: no pool on this box.
    #[serde(default)]
    pool_device: Option<PathBuf>,
    /// Overwrite whatever the pool device holds (a partition table, a filesystem,
    /// another pool). Never set this in a shipped config.
    #[serde(default)]
    pool_force: bool,
    /// Volumes may promise this percentage of the pool's data area in total.
    #[serde(default = "default_overcommit")]
    overcommit_percent: u32,
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

impl edge_common::Validate for Config {
    fn validate(&self) -> Result<(), (String, String)> {
        edge_common::require_absolute(&[
            ("state_dir", Some(&self.state_dir)),
            ("csi_socket", Some(&self.csi_socket)),
            ("pool_device", self.pool_device.as_deref()),
        ])?;
        if !(100..=1000).contains(&self.overcommit_percent) {
            return Err((
                "overcommit_percent".into(),
                format!("{} is not within 100..=1000", self.overcommit_percent),
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

fn claim(config: &Config) -> Result<Option<storaged::Pool>, String> {
    let Some(device) = &config.pool_device else {
        tracing::warn!("no pool device configured (pool_device): serving no volumes");
        return Ok(None);
    };
    if !device.exists() {
        tracing::warn!(device = %device.display(), "no pool device: it does not exist; serving no volumes");
        return Ok(None);
    }
    let opts = storaged::Options {
        force: config.pool_force,
        overcommit_percent: config.overcommit_percent,
        ..Default::default()
    };
    let pool = storaged::Pool::open(device, opts).map_err(|e| e.to_string())?;
    let st = pool.status().map_err(|e| e.to_string())?;
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

async fn serve(config: Config) -> Result<(), String> {
    edge_common::ensure_dir(&config.state_dir).map_err(|e| e.to_string())?;
    let pool = claim(&config)?;
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
    edge_common::notify_ready().map_err(|e| e.to_string())?;
    storaged::csi::serve_on(listener, driver).await
}

fn main() -> std::process::ExitCode {
    edge_common::run("storaged", serve)
}
