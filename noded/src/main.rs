//! noded: the Kubernetes node. For now it loads its config, waits until containerd's
//! socket answers and reports ready; pods through CRI are issue #4.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// containerd's socket (CRI and native services).
    containerd_socket: PathBuf,
    /// Where static pod manifests are kept (on the data partition).
    manifests_dir: PathBuf,
}

impl edge_common::Validate for Config {
    fn validate(&self) -> Result<(), (String, String)> {
        edge_common::require_absolute(&[
            ("containerd_socket", Some(&self.containerd_socket)),
            ("manifests_dir", Some(&self.manifests_dir)),
        ])?;
        Ok(())
    }
}

async fn serve(config: Config) -> Result<(), String> {
    edge_common::ensure_dir(&config.manifests_dir).map_err(|e| e.to_string())?;
    // The node is of no use until the runtime answers; init orders us after containerd,
    // but containerd may restart under us, so wait rather than fail.
    let mut waited = Duration::ZERO;
    loop {
        match tokio::net::UnixStream::connect(&config.containerd_socket).await {
            Ok(_) => break,
            Err(e) => {
                if waited.as_secs().is_multiple_of(10) {
                    tracing::info!(socket = %config.containerd_socket.display(), "waiting for containerd: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                waited += Duration::from_millis(200);
            }
        }
    }
    tracing::info!(socket = %config.containerd_socket.display(), "containerd answers");
    edge_common::notify_ready().map_err(|e| e.to_string())?;
    std::future::pending().await
}

fn main() -> std::process::ExitCode {
    edge_common::run("noded", serve)
}
