//! fabricd: the durable edge log, its produce API, and its mirror to the core.
//! The binary (`main.rs`) is `serve` under the shared daemon kit; tests and the bench use
//! the modules directly. Every fallible step returns the crate's one error type,
//! [`Error`] (`error.rs`), whose text is what the logs show and the core is told.

pub mod config;
pub mod downlink;
pub mod enrollment;
pub mod error;
pub mod http;
pub mod lan;
pub mod logs;
pub mod metrics;
pub mod pod_channels;
pub mod produce;
pub mod record;
pub mod resume;
pub mod scrape;
pub mod site_identity;
pub mod store;
pub mod uplink;

use std::sync::Arc;

use config::Config;
pub use error::{Error, Result};
use produce::Ingest;

/// A listener of the produce API: unix socket or TCP.
pub(crate) trait Listener: Send + 'static {
    type Conn: Send + 'static;
    /// The next connection, and who it is from: the producer's identity, which fabricd
    /// stamps on its records (`produce::PRODUCER_HEADER`) and meters them by.
    fn next(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Conn, String)>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Conn, String)> {
        let (s, _) = self.accept().await?;
        let who = produce::local_producer(s.peer_cred().ok());
        Ok((s, who))
    }
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<(Self::Conn, String)> {
        // The address, not the port: one producer's connections are metered together.
        self.accept()
            .await
            .map(|(s, peer)| (s, peer.ip().to_canonical().to_string()))
    }
}

/// Serves each connection of `listener` on a task of its own, for as long as fabricd
/// runs; a failed accept is logged and tried again 100 ms later.
pub(crate) async fn accept_each<L, F, Fut>(listener: L, what: String, serve: F)
where
    L: Listener,
    F: Fn(L::Conn, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.next().await {
            Ok((conn, peer)) => {
                tokio::spawn(serve(conn, peer));
            }
            Err(e) => {
                tracing::warn!("accept on {what} failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Opens the log, starts the listeners and reports ready. Returns only on a fatal error.
pub async fn serve(mut config: Config) -> Result<()> {
    if let Some(path) = &config.core_file {
        // A bad provisioning file must not stop the log taking records: say why, and
        // keep them locally (as with no core) until it is fixed and fabricd restarted.
        match config::load_core_file(path) {
            Ok(Some(file)) => {
                config.site = file.site.unwrap_or(config.site);
                config.machine = file.machine.unwrap_or(config.machine);
                if let (Some(pace), Some(down)) =
                    (file.downlink_max_kib_per_sec, config.downlink.as_mut())
                {
                    down.max_kib_per_sec = Some(pace);
                }
                tracing::info!(file = %path.display(), servers = ?file.core.servers, site = %config.site, machine = %config.machine, "core provisioned");
                config.core = Some(file.core);
            }
            Ok(None) => {
                tracing::info!(file = %path.display(), "no core provisioned; records stay local")
            }
            Err(e) => tracing::error!("{e}; records stay local"),
        }
    }
    let config = Arc::new(config);
    edge_common::ensure_dir(&config.log_dir)?;
    let limits = store::Limits {
        quota_bytes: config.quota_bytes,
        segment_bytes: config.segment_bytes,
    };
    let log = store::Log::open(&config.log_dir, &config.classes, limits).map_err(|source| {
        Error::OpenLog {
            dir: config.log_dir.clone(),
            source,
        }
    })?;
    let ingest = Arc::new(Ingest::new(log.clone(), config.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    // The TCP listeners' TLS: `Some(None)` plain, `None` off (their certificate is not
    // provisioned, or bad: said, and the log still takes records from the box itself).
    let lan = match &config.lan_tls {
        None => Some(None),
        Some(t) => match lan::acceptor(t) {
            Ok(a) => Some(Some(a)),
            Err(e) => {
                tracing::warn!("{e}: tcp_listen and http_listen stay off until it is provisioned");
                None
            }
        },
    };
    if let Some(path) = &config.unix_socket {
        if let Some(parent) = path.parent() {
            edge_common::ensure_dir(parent)?;
        }
        let listener = bind_unix(path)?;
        tracing::info!(socket = %path.display(), "produce socket listening");
        let ingest = ingest.clone();
        tasks.spawn(accept_each(
            listener,
            "the produce socket".to_owned(),
            move |stream, peer| produce::serve_conn(ingest.clone(), stream, peer),
        ));
    }
    let scrapes = Arc::new(scrape::Stats::default());
    if let Some(sc) = &config.scrape {
        tracing::info!(every_s = sc.interval_secs, targets = ?sc.targets, files = ?sc.files, "scraping the box's metrics for the core");
        tasks.spawn(scrape::run(sc.clone(), ingest.clone(), scrapes.clone()));
    }
    if let Some(l) = &config.logs {
        tracing::info!(services = ?l.services_dir, pods = ?l.pods_dir, "following the box's logs for the core");
        let state = config.log_dir.join("logs-positions.json");
        tasks.spawn(logs::run(l.clone(), ingest.clone(), state));
    }
    if let Some(dir) = &config.pod_channels {
        edge_common::ensure_dir(dir)?;
        tracing::info!(dir = %dir.display(), "pod channels: a produce socket in each pod's directory");
        tasks.spawn(pod_channels::run(dir.clone(), ingest.clone()));
    }
    for (framed, addr) in [(true, config.tcp_listen), (false, config.http_listen)] {
        let (Some(addr), Some(tls)) = (addr, &lan) else {
            continue;
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen {
                on: addr.to_string(),
                source,
            })?;
        let what = if framed { "framed" } else { "HTTP" };
        tracing::info!(%addr, tls = tls.is_some(), "produce {what} listening");
        let (ingest, tls) = (ingest.clone(), tls.clone());
        tasks.spawn(accept_each(
            listener,
            addr.to_string(),
            move |stream: tokio::net::TcpStream, peer| {
                let (ingest, tls) = (ingest.clone(), tls.clone());
                async move {
                    let _ = stream.set_nodelay(framed);
                    let Some((conn, who)) = lan::accept(tls.as_ref(), stream, peer).await else {
                        return;
                    };
                    if framed {
                        produce::serve_conn(ingest, conn, who).await
                    } else {
                        http::serve_conn(ingest, conn, who).await
                    }
                }
            },
        ));
    }
    let status = Arc::new(uplink::Status::default());
    let down_status = Arc::new(downlink::Status::default());
    let mirror = {
        let (log, config, status, down_status) = (
            log.clone(),
            config.clone(),
            status.clone(),
            down_status.clone(),
        );
        move || -> Result<()> {
            if config.core.is_some() {
                let (config, status, down) = (config.clone(), status.clone(), down_status.clone());
                on_own_thread("uplink", uplink::run(log, config, status, down))?;
            } else {
                tracing::info!("no core configured: records are kept locally only");
            }
            if config.downlink.is_some() {
                on_own_thread("downlink", downlink::run(config, down_status))?;
            }
            Ok(())
        }
    };
    match config.core.as_ref().filter(|c| enrollment::needed(c)) {
        // Both directions need the certificate enrollment brings.
        Some(core) => {
            let (config, core, status) = (config.clone(), core.clone(), status.clone());
            on_own_thread("enrollment", async move {
                enrollment::run(config, core, status).await;
                if let Err(e) = mirror() {
                    tracing::error!("{e}");
                }
            })?;
        }
        None => mirror()?,
    }
    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen {
                on: addr.to_string(),
                source,
            })?;
        tracing::info!(%addr, "metrics listening");
        let m = Arc::new(metrics::Metrics {
            log: log.clone(),
            status: status.clone(),
            downlink: down_status.clone(),
            quota_bytes: config.quota_bytes,
            core_configured: config.core.is_some(),
            scrapes: scrapes.clone(),
            files: uplink::OsFiles {
                boot: config.boot_file.clone(),
                update: config.update_state.clone(),
                health: config.health_file.clone(),
            },
        });
        tasks.spawn(metrics::serve(listener, m));
    }
    tracing::info!(site = %config.site, machine = %config.machine, log_dir = %config.log_dir.display(), "serving");
    // The kit has handled SIGTERM since before `serve` began, and stops us through it.
    let mut notifier = edge_common::Notifier::take()?;
    notifier.ready()?;
    // Healthy (services.toml: `health`) once the core was reached, or at once without a
    // core: the trial boot of an update is blessed only then.
    let core_configured = config.core.is_some();
    tasks.spawn(async move {
        while core_configured && !status.connected.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        if let Err(e) = notifier.healthy() {
            tracing::warn!("failed to tell init the core was reached: {e}");
        }
    });
    while tasks.join_next().await.is_some() {}
    std::future::pending().await
}

/// Binds a unix socket at `path`, first removing one a previous run left (it was
/// killed), which would make the bind fail.
pub(crate) fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale socket", path)(e)),
    }
    tokio::net::UnixListener::bind(path).map_err(|source| Error::Listen {
        on: path.display().to_string(),
        source,
    })
}

/// Runs `task` on a thread and runtime of its own. The uplink and the downlink each run
/// so: mirroring then uses the second core instead of taking turns with the producers'
/// connections, and a TLS handshake signed by the TPM (a blocking `edge-tpm` run,
/// site_identity.rs) never stalls the producers.
fn on_own_thread(
    name: &'static str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let start = |what| move |source| Error::Start { name, what, source };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(start("runtime"))?;
    std::thread::Builder::new()
        .name(format!("fabricd-{name}"))
        .spawn(move || runtime.block_on(task))
        .map_err(start("thread"))?;
    Ok(())
}
