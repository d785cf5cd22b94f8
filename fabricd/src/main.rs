//! fabricd: the durable edge log, mirrored to the core, and the core-to-edge channel.
//! For now it loads its config, prepares its log directory on the data partition and
//! reports ready; the log and the uplink are issue #3.

use std::path::PathBuf;

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Site (data center) name: the second element of every subject.
    site: String,
    /// Machine name within the site.
    machine: String,
    /// Where the local log's segments live (on the data partition).
    log_dir: PathBuf,
}

impl edge_common::Validate for Config {
    fn validate(&self) -> Result<(), (String, String)> {
        for (key, token) in [("site", &self.site), ("machine", &self.machine)] {
            let ok = !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err((
                    key.into(),
                    format!("`{token}` must be non-empty letters, digits, '-' or '_' (it becomes a subject token)"),
                ));
            }
        }
        if !self.log_dir.is_absolute() {
            return Err(("log_dir".into(), format!("{} is not an absolute path", self.log_dir.display())));
        }
        Ok(())
    }
}

async fn serve(config: Config) -> Result<(), String> {
    edge_common::ensure_dir(&config.log_dir).map_err(|e| e.to_string())?;
    tracing::info!(site = %config.site, machine = %config.machine, log_dir = %config.log_dir.display(), "log directory ready");
    edge_common::notify_ready().map_err(|e| e.to_string())?;
    std::future::pending().await
}

fn main() -> std::process::ExitCode {
    edge_common::run("fabricd", serve)
}
