//! storaged: volumes from the NVMe pool, served through CSI. For now it loads its config,
//! prepares its catalog directory on the data partition and reports ready; the pool and
//! CSI are issue #5.

use std::path::PathBuf;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Where the volume catalog lives (on the data partition).
    state_dir: PathBuf,
    /// The CSI endpoint (unix socket) it will serve.
    csi_socket: PathBuf,
}

impl edge_common::Validate for Config {
    fn validate(&self) -> Result<(), (String, String)> {
        for (key, path) in [
            ("state_dir", &self.state_dir),
            ("csi_socket", &self.csi_socket),
        ] {
            if !path.is_absolute() {
                return Err((
                    key.into(),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        Ok(())
    }
}

async fn serve(config: Config) -> Result<(), String> {
    edge_common::ensure_dir(&config.state_dir).map_err(|e| e.to_string())?;
    tracing::info!(state_dir = %config.state_dir.display(), "catalog directory ready");
    edge_common::notify_ready().map_err(|e| e.to_string())?;
    std::future::pending().await
}

fn main() -> std::process::ExitCode {
    edge_common::run("storaged", serve)
}
