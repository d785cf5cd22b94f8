//! noded: the Kubernetes node. It waits until containerd answers and reports ready;
//! meanwhile it reads the bundled OCI archives, which it serves to containerd through
//! the local registry; then it runs the pods of the manifests directory and of the
//! core's downlink directory, and reports them on its control socket. `noded pods` and
//! `noded logs` ask a running noded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use noded::cri::Client;
use noded::pods::{Reconciler, Settings};
use noded::registry::Registry;
use noded::{Error, Result};

/// How often the manifests are rescanned and the containers polled.
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// containerd's socket (CRI and native services).
    containerd_socket: PathBuf,
    /// Where static pod manifests are kept (on the data partition).
    manifests_dir: PathBuf,
    /// Pod manifests the core delivers: fabricd's `<downlink.dir>/pods`. Optional.
    #[serde(default)]
    downlink_manifests_dir: Option<PathBuf>,
    /// Pod manifests provisioned for the site (init unpacks the bundle's `pods/` into
    /// `/var/lib/edge/provision/pods`). Optional; absent until a bundle brings pods.
    #[serde(default)]
    site_manifests_dir: Option<PathBuf>,
    /// OCI archives (`*.tar`) served to containerd as `edge.local/<name>:<tag>`.
    #[serde(default = "default_images_dir")]
    images_dir: PathBuf,
    /// Where the registry listens; containerd's hosts.toml for edge.local points here.
    #[serde(default = "default_registry_listen")]
    registry_listen: SocketAddr,
    /// Containers' CRI logs, one directory per pod.
    #[serde(default = "default_log_dir")]
    log_dir: PathBuf,
    /// noded's own state (emptyDir volumes).
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    /// First restart delay of a crashing container; doubles per restart up to 5 min.
    #[serde(default = "default_backoff_ms")]
    restart_backoff_base_ms: u64,
    /// Answers `{"op":"pods"}` and `{"op":"logs",...}`.
    #[serde(default = "default_control_socket")]
    control_socket: PathBuf,
    /// A container's live log is rotated past this size.
    #[serde(default = "default_log_max_bytes")]
    log_max_bytes: u64,
    /// Log files kept per container attempt, the live one included.
    #[serde(default = "default_log_max_files")]
    log_max_files: usize,
    /// The signed image allowlist shipped in the image. With this or the next key set,
    /// a pod's images must be on the allowlist in force.
    #[serde(default)]
    image_allowlist: Option<PathBuf>,
    /// A signed image allowlist the core delivers (fabricd's `<downlink.dir>/config/...`).
    #[serde(default)]
    downlink_image_allowlist: Option<PathBuf>,
    /// The ed25519 key the allowlists are signed with: 64 hex digits.
    #[serde(default)]
    image_allowlist_public_key: Option<PathBuf>,
    /// storaged's CSI socket, for pods' `csi` volumes. Unset: such pods are refused.
    #[serde(default)]
    csi_socket: Option<PathBuf>,
    /// fabricd's `pod_channels`: each pod gets a directory there, mounted read-only at
    /// `/run/edge/fabric` in its containers, where fabricd listens for its records.
    /// Absent: pods have no channel.
    #[serde(default)]
    fabric_pod_channels: Option<PathBuf>,
    /// Serves Prometheus text at `GET /metrics` on this address. Absent: no endpoint.
    #[serde(default)]
    metrics_listen: Option<SocketAddr>,
    /// A Kubernetes API server (control plane) to register with and take pods from.
    /// Absent: none; the pods come from the manifest directories only.
    #[serde(default)]
    apiserver: Option<noded::apiserver::Config>,
    /// The same keys as `[apiserver]`, in a file the site provisions (the image's root is
    /// read-only: this is how a shipped box joins a control plane). Read at start;
    /// absent: no API server. Not with `[apiserver]`.
    #[serde(default)]
    apiserver_file: Option<PathBuf>,
}

fn default_images_dir() -> PathBuf {
    "/usr/share/edge/images".into()
}
fn default_registry_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}
fn default_log_dir() -> PathBuf {
    "/var/log/pods".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/edge/noded".into()
}
fn default_backoff_ms() -> u64 {
    10_000
}
fn default_control_socket() -> PathBuf {
    "/run/noded/noded.sock".into()
}
fn default_log_max_bytes() -> u64 {
    10 << 20
}
fn default_log_max_files() -> usize {
    3
}

impl edge_common::Validate for Config {
    fn validate(&self) -> Result<(), (String, String)> {
        edge_common::require_absolute(&[
            ("containerd_socket", Some(&self.containerd_socket)),
            ("manifests_dir", Some(&self.manifests_dir)),
            (
                "downlink_manifests_dir",
                self.downlink_manifests_dir.as_deref(),
            ),
            ("site_manifests_dir", self.site_manifests_dir.as_deref()),
            ("images_dir", Some(&self.images_dir)),
            ("log_dir", Some(&self.log_dir)),
            ("state_dir", Some(&self.state_dir)),
            ("control_socket", Some(&self.control_socket)),
            ("image_allowlist", self.image_allowlist.as_deref()),
            (
                "downlink_image_allowlist",
                self.downlink_image_allowlist.as_deref(),
            ),
            (
                "image_allowlist_public_key",
                self.image_allowlist_public_key.as_deref(),
            ),
            ("csi_socket", self.csi_socket.as_deref()),
            ("fabric_pod_channels", self.fabric_pod_channels.as_deref()),
            ("apiserver_file", self.apiserver_file.as_deref()),
        ])?;
        if self.apiserver.is_some() && self.apiserver_file.is_some() {
            return Err((
                "apiserver_file".into(),
                "give either [apiserver] or apiserver_file".into(),
            ));
        }
        if (self.image_allowlist.is_some() || self.downlink_image_allowlist.is_some())
            && self.image_allowlist_public_key.is_none()
        {
            return Err((
                "image_allowlist_public_key".into(),
                "is required when an image allowlist is configured".into(),
            ));
        }
        if self.restart_backoff_base_ms == 0 {
            return Err((
                "restart_backoff_base_ms".into(),
                "must be more than 0 (a crashing container would restart in a tight loop)".into(),
            ));
        }
        if self.log_max_bytes == 0 {
            return Err(("log_max_bytes".into(), "must be more than 0".into()));
        }
        if let Some(a) = &self.apiserver {
            a.validate()?;
        }
        if self.log_max_files < 2 {
            return Err((
                "log_max_files".into(),
                "must be at least 2 (the live file and one rotated)".into(),
            ));
        }
        Ok(())
    }
}

async fn serve(config: Config) -> Result<()> {
    for dir in [&config.manifests_dir, &config.log_dir, &config.state_dir] {
        edge_common::ensure_dir(dir)?;
    }
    // Reading and checking the bundled archives (their every blob hashed) is the longest
    // part of noded's start; only the pods need it, so it runs beside the rest and
    // readiness does not wait for it.
    let images_dir = config.images_dir.clone();
    let reading = tokio::task::spawn_blocking(move || read_images(&images_dir));
    let cri = wait_for_containerd(&config.containerd_socket).await;
    let image_policy = image_policy(&config)?;
    let status = Arc::new(Mutex::new(Vec::new()));
    let _control = noded::control::spawn(
        &config.control_socket,
        status.clone(),
        config.log_dir.clone(),
    )?;
    let _metrics = match config.metrics_listen {
        Some(addr) => Some(noded::metrics::spawn(addr, status.clone()).await?),
        None => None,
    };
    let apiserver = match (&config.apiserver, &config.apiserver_file) {
        (Some(a), _) => Some(a.clone()),
        (None, Some(file)) => noded::apiserver::provisioned(file),
        (None, None) => None,
    };
    let api_settings = match &apiserver {
        Some(a) => Some(a.settings(
            &config.state_dir,
            &config.log_dir,
            config.csi_socket.as_deref(),
            runtime_version(&cri).await,
        )?),
        None => None,
    };
    let _apiserver = match api_settings.clone() {
        Some(s) => Some(noded::apiserver::start(s, status.clone(), Some(cri.clone())).await?),
        None => None,
    };
    let mut notifier = edge_common::Notifier::take()?;
    notifier.ready()?;
    tokio::spawn(report_health(
        notifier,
        config.manifests_dir.clone(),
        status.clone(),
    ));
    let (_registry, served) =
        start_registry(reading, &config.images_dir, config.registry_listen).await?;
    let settings = Settings {
        manifests_dir: config.manifests_dir,
        downlink_manifests_dir: config.downlink_manifests_dir,
        site_manifests_dir: config.site_manifests_dir,
        api_manifests_dir: api_settings.map(|s| s.cache_dir),
        log_dir: config.log_dir,
        state_dir: config.state_dir,
        backoff_base: Duration::from_millis(config.restart_backoff_base_ms),
        log_max_bytes: config.log_max_bytes,
        log_max_files: config.log_max_files,
        image_policy,
        csi_socket: config.csi_socket,
        fabric_pod_channels: config.fabric_pod_channels,
        served_images: served,
    };
    Reconciler::new(cri, settings, status).run(TICK).await;
    Ok(())
}

/// Says `HEALTHY=1` once every static pod is up (services.toml: `health`): the trial
/// boot of an update is blessed only then.
async fn report_health(notifier: edge_common::Notifier, dir: PathBuf, status: noded::pods::Status) {
    let mut last: Vec<String> = Vec::new();
    loop {
        let files: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| noded::pods::is_manifest_file(n))
                    .collect()
            })
            .unwrap_or_default();
        let verdict = {
            let reports = edge_common::lock(&status);
            noded::pods::static_pods_up(&files, &reports)
        };
        match verdict {
            Ok(()) => {
                tracing::info!(pods = files.len(), "every static pod is up: healthy");
                if let Err(e) = notifier.healthy() {
                    tracing::warn!("failed to tell init the node is healthy: {e}");
                }
                return;
            }
            // Logged when the pods that are down change.
            Err(e) => {
                let down = match &e {
                    Error::NotUp { files } => files.clone(),
                    _ => Vec::new(),
                };
                if down != last {
                    tracing::debug!("static pods: {e}");
                    last = down;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `containerd://1.6.20`, as kubelet reports the runtime; just the name if CRI will not say.
async fn runtime_version(cri: &Client) -> String {
    let req = noded::cri::api::VersionRequest {
        version: "v1".into(),
    };
    match cri.version(req).await {
        Ok(v) => format!("{}://{}", v.runtime_name, v.runtime_version),
        Err(_) => "containerd".into(),
    }
}

/// The allowlists and their key; none configured means every image may run.
fn image_policy(config: &Config) -> Result<Option<noded::policy::Policy>> {
    let files: Vec<PathBuf> = [&config.image_allowlist, &config.downlink_image_allowlist]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let Some(key) = &config.image_allowlist_public_key else {
        tracing::warn!("no image allowlist configured: every image may run");
        return Ok(None);
    };
    if files.is_empty() {
        tracing::warn!("no image allowlist configured: every image may run");
        return Ok(None);
    }
    let policy = noded::policy::Policy {
        public_key: noded::policy::load_public_key(key)?,
        files,
    };
    match policy.current() {
        (Some(l), _) => {
            tracing::info!(source = %l.source, version = l.version, digests = l.digests.len(), "image allowlist in force")
        }
        (None, problems) => tracing::error!(
            "no valid image allowlist: no image may run ({})",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
    Ok(Some(policy))
}

/// Reads and checks the archives of `dir`. A missing directory is an image with no
/// bundled workloads; a bad archive is left out and named, the others are served.
/// Returns the registry and how long the reading took.
fn read_images(dir: &Path) -> Result<(Registry, Duration)> {
    let started = std::time::Instant::now();
    if !dir.is_dir() {
        tracing::info!("no image directory {}: serving no images", dir.display());
        return Ok((Registry::default(), started.elapsed()));
    }
    let (registry, rejected) = Registry::load_dir(dir)?;
    for r in rejected {
        tracing::error!("image archive {} rejected: {}", r.path.display(), r.reason);
    }
    Ok((registry, started.elapsed()))
}

/// Serves what `reading` (`read_images` of `dir`) gives on `listen`. Returns the task
/// and what it serves (`Registry::served`).
async fn start_registry(
    reading: tokio::task::JoinHandle<Result<(Registry, Duration)>>,
    dir: &Path,
    listen: SocketAddr,
) -> Result<(tokio::task::JoinHandle<()>, BTreeMap<String, String>)> {
    let (registry, took) = reading.await.map_err(|e| Error::Archive {
        archive: dir.display().to_string(),
        detail: format!("reading the archives failed: {e}"),
    })??;
    let served = registry.served();
    let (addr, task) = registry
        .spawn(listen)
        .await
        .map_err(Error::bind("failed to start the image registry on", listen))?;
    tracing::info!(
        %addr,
        images = %dir.display(),
        read_ms = took.as_millis() as u64,
        "image registry serving"
    );
    Ok((task, served))
}

/// The node is of no use until the runtime answers; init starts us alongside containerd
/// (services.toml), and containerd may restart under us, so wait rather than fail. Its
/// socket accepts connections before its CRI service is initialized (calls then fail
/// with `server is not initialized yet`), so the wait ends at the first CRI call that
/// succeeds. Tried often: at boot, the box is ready only once we are.
async fn wait_for_containerd(socket: &Path) -> Client {
    const EVERY: Duration = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    loop {
        let answer = match Client::connect(socket).await {
            Ok(cri) => cri.answers().await.map(|_| cri),
            Err(e) => Err(e),
        };
        match answer {
            Ok(cri) => {
                tracing::info!(socket = %socket.display(), "containerd answers");
                return cri;
            }
            Err(e) => {
                if waited.as_millis().is_multiple_of(10_000) && !waited.is_zero() {
                    tracing::info!(socket = %socket.display(), "waiting for containerd: {e}");
                }
                tokio::time::sleep(EVERY).await;
                waited += EVERY;
            }
        }
    }
}

#[derive(clap::Parser)]
#[command(
    name = "noded pods",
    bin_name = "noded pods",
    about = "Print the pods of a running noded"
)]
struct PodsCli {
    /// noded's control socket.
    #[arg(long, default_value = edge_node_api::SOCKET, value_name = "PATH")]
    socket: PathBuf,
    /// Print the raw JSON answer.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Parser)]
#[command(
    name = "noded logs",
    bin_name = "noded logs",
    about = "Print a container's logs from a running noded"
)]
struct LogsCli {
    /// The pod: `<name>` or `<namespace>/<name>`.
    pod: String,
    /// The container; may be left out when the pod has one app container.
    container: Option<String>,
    /// The logs of the attempt before the current one.
    #[arg(long)]
    previous: bool,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    /// noded's control socket.
    #[arg(long, default_value = edge_node_api::SOCKET, value_name = "PATH")]
    socket: PathBuf,
}

fn logs_command(args: Vec<String>) -> std::process::ExitCode {
    use clap::Parser;
    use std::io::Write;
    let cli = LogsCli::parse_from(args);
    let req = edge_node_api::LogsRequest {
        pod: cli.pod,
        container: cli.container,
        previous: cli.previous,
        tail: cli.tail,
    };
    let logs = match edge_node_api::Client::new(&cli.socket).logs(req) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("noded logs: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    for l in &logs.lines {
        // A closed pipe (`| head`) ends the listing quietly.
        if writeln!(out, "{l}").is_err() {
            return std::process::ExitCode::SUCCESS;
        }
    }
    if logs.malformed > 0 {
        eprintln!(
            "noded logs: skipped {} line(s) not in the CRI log format",
            logs.malformed
        );
    }
    std::process::ExitCode::SUCCESS
}

fn pods_command(args: Vec<String>) -> std::process::ExitCode {
    use clap::Parser;
    let cli = PodsCli::parse_from(args);
    let pods = match edge_node_api::Client::new(&cli.socket).pods() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("noded pods: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string(&pods).unwrap_or_default());
        return std::process::ExitCode::SUCCESS;
    }
    for p in pods {
        let name = if p.name.is_empty() {
            p.file.clone()
        } else {
            format!("{}/{}", p.namespace, p.name)
        };
        println!("{name}  {}  ({})", p.state, p.file);
        if let Some(e) = &p.error {
            println!("  error: {e}");
        }
        for c in p.containers {
            let exit = c
                .exit_code
                .map(|x| format!(" exit={x}"))
                .unwrap_or_default();
            let kind = if c.init { " (init)" } else { "" };
            let ready = match (c.init, c.ready) {
                (true, _) => "",
                (false, true) => "  ready",
                (false, false) => "  not-ready",
            };
            println!(
                "  {}{kind}  {}{ready}  restarts={}{exit}{}",
                c.name,
                c.state,
                c.restarts,
                c.last_error
                    .map(|e| format!("  last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    std::process::ExitCode::SUCCESS
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("pods") => return pods_command(args[1..].to_vec()),
        Some("logs") => return logs_command(args[1..].to_vec()),
        _ => {}
    }
    edge_common::run("noded", serve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_config_loads_with_defaults_for_the_new_keys() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/overlay/etc/edge/noded.toml");
        let c: Config = edge_common::load_config(&path).unwrap();
        assert_eq!(c.images_dir, Path::new("/usr/share/edge/images"));
        assert_eq!(c.registry_listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(c.log_dir, Path::new("/var/log/pods"));
        assert_eq!(c.state_dir, Path::new("/var/lib/edge/noded"));
        assert_eq!(c.restart_backoff_base_ms, 10_000);
        assert_eq!(c.control_socket, Path::new("/run/noded/noded.sock"));
        assert_eq!((c.log_max_bytes, c.log_max_files), (10 << 20, 3));
        assert_eq!(
            c.csi_socket.as_deref(),
            Some(Path::new("/run/storaged/csi.sock"))
        );
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9403".parse().unwrap()));
        assert_eq!(
            c.apiserver_file.as_deref(),
            Some(Path::new("/var/lib/edge/provision/noded-apiserver.toml"))
        );
        assert!(c.apiserver.is_none());
    }

    #[test]
    fn a_zero_backoff_is_refused_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noded.toml");
        std::fs::write(
            &path,
            "containerd_socket = \"/c.sock\"\nmanifests_dir = \"/m\"\nrestart_backoff_base_ms = 0\n",
        )
        .unwrap();
        let e = edge_common::load_config::<Config>(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `restart_backoff_base_ms`"), "{e}");
    }

    #[test]
    fn an_allowlist_without_its_key_and_a_single_log_file_are_refused_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noded.toml");
        let base = "containerd_socket = \"/c.sock\"\nmanifests_dir = \"/m\"\n";
        for (extra, key) in [
            ("image_allowlist = \"/a\"\n", "image_allowlist_public_key"),
            (
                "downlink_image_allowlist = \"/a\"\n",
                "image_allowlist_public_key",
            ),
            ("log_max_files = 1\n", "log_max_files"),
            (
                "downlink_manifests_dir = \"pods\"\n",
                "downlink_manifests_dir",
            ),
        ] {
            std::fs::write(&path, format!("{base}{extra}")).unwrap();
            let e = edge_common::load_config::<Config>(&path)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("key `{key}`")), "{extra}: {e}");
        }
    }
}
