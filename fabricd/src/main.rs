//! fabricd: the durable edge log, mirrored to the core, and the core-to-edge channel.

#[allow(dead_code)] // listeners and the uplink use the rest (next steps)
mod config;
#[allow(dead_code)]
mod log;
#[allow(dead_code)]
mod record;

use config::Config;

async fn serve(config: Config) -> Result<(), String> {
    edge_common::ensure_dir(&config.log_dir).map_err(|e| e.to_string())?;
    let limits = log::Limits {
        quota_bytes: config.quota_bytes,
        segment_bytes: config.segment_bytes,
    };
    let _log =
        log::Log::open(&config.log_dir, &config.classes, limits).map_err(|e| e.to_string())?;
    tracing::info!(site = %config.site, machine = %config.machine, log_dir = %config.log_dir.display(), "log ready");
    edge_common::notify_ready().map_err(|e| e.to_string())?;
    std::future::pending().await
}

fn main() -> std::process::ExitCode {
    edge_common::run("fabricd", serve)
}
