//! The optional Kubernetes API server path (kube-rs). With an `[apiserver]` table in
//! noded's config it registers the Node, heartbeats through a Lease in
//! `kube-node-lease`, mirrors every pod bound to this node into a cache directory as
//! one manifest per pod, and reports those pods' status from the reconciler's
//! [`Status`].
//!
//! The reconciler runs the cache like any other manifests directory (files known as
//! `api/<namespace>_<name>.yaml`), which is what gives the edge its autonomy: pods keep
//! running through API-server outages and come back after a reboot with no control
//! plane, because the cache is on the data partition and only the server can empty it
//! (a delete, or a relist that no longer has the pod). Nothing in the reconciler waits
//! on the server; every call here has a timeout, is retried with back-off and its
//! failures are logged at most every [`LOG_EVERY`].

mod bootstrap;
mod cache;
mod calls;
mod conditions;
mod events;
mod eviction;
mod host;
mod kubelet;
mod node;
mod provisioner;
mod status;
mod translate;
mod tunnel;
mod volumes;

use cache::watch_pods;
use calls::{timed, Limited, Retry};
pub use conditions::Thresholds;
use edge_common::lock;
use host::{arch, first_ipv4, hostname, meminfo_kib, micro_now, os_image, time_now};
use node::node_and_lease;
use status::report_pods;
pub use translate::edge_manifest;
use translate::{check_label_key, check_label_value, check_subdomain};

use std::collections::BTreeMap;

use serde_json::Value;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::{Error, Result};
use crate::pods::Status;

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Labels noded sets itself; configured labels may not override them.
const OWN_LABELS: [&str; 4] = [
    "kubernetes.io/hostname",
    "kubernetes.io/os",
    "kubernetes.io/arch",
    ZONE_LABEL,
];
/// No single call may hold a loop longer than this (kube's client has no read timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A failing call is logged once, then at most this often while it keeps failing.
pub const LOG_EVERY: Duration = Duration::from_secs(30);
/// kubelet's default `maxPods`.
const MAX_PODS: u32 = 110;

/// The `[apiserver]` table of noded's config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A standard kubeconfig (its current context is used). With `bootstrap_kubeconfig`,
    /// where noded keeps the credential it obtains (on the data partition).
    pub kubeconfig: PathBuf,
    /// A kubeconfig with a bootstrap token: noded asks the API server for its own client
    /// certificate with it (a CertificateSigningRequest, bootstrap.rs) whenever
    /// `kubeconfig` holds no valid one.
    #[serde(default)]
    pub bootstrap_kubeconfig: Option<PathBuf>,
    /// The Node's name; defaults to the host name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The site: the Node's `topology.kubernetes.io/zone` label.
    pub zone: String,
    /// More Node labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The Lease's duration; it is renewed every quarter of it.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u32,
    /// Where the pods bound to this node are mirrored; default `<state_dir>/apiserver/pods`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// `host:port` of the core's konnectivity-server agent port: noded dials out to it
    /// so that the API server reaches this node's kubelet API (`kubectl logs`,
    /// tunnel.rs). Without it the core cannot reach the box.
    #[serde(default)]
    pub tunnel: Option<String>,
    /// With `bootstrap_kubeconfig`: the node's key is made in the TPM (`edge-tpm
    /// site-key create`) and never leaves it; the certificate request and every TLS
    /// handshake with the API server and the tunnel are signed there (bootstrap.rs;
    /// the client in `client_from`).
    #[serde(default)]
    pub tpm_key: bool,
    /// The program that makes and signs with the TPM key (`edge-tpm`, on the verified
    /// root).
    #[serde(default = "default_tpm_program")]
    pub tpm_program: PathBuf,
}

fn default_lease_seconds() -> u32 {
    40
}

fn default_tpm_program() -> PathBuf {
    "/usr/bin/edge-tpm".into()
}

/// The `[apiserver]` keys the site provisioned in `file` (noded.toml's `apiserver_file`):
/// `None` when there is no such file, or when it is bad, which is logged naming the file
/// and the key; the pods from the manifest directories run either way.
pub fn provisioned(file: &Path) -> Option<Config> {
    if !file.exists() {
        tracing::info!(
            "no Kubernetes API server: {} is not provisioned",
            file.display()
        );
        return None;
    }
    match edge_common::load_config::<Config>(file) {
        Ok(c) => {
            tracing::info!(
                "Kubernetes API server: as provisioned in {}",
                file.display()
            );
            Some(c)
        }
        Err(e) => {
            tracing::error!("no Kubernetes API server: {e}");
            None
        }
    }
}

impl edge_common::Validate for Config {
    fn validate(&self) -> std::result::Result<(), (String, String)> {
        Config::validate(self)
    }
}

impl Config {
    /// Checks every key (errors are `(apiserver.<key>, message)`), reading the kubeconfig
    /// so an unreadable or malformed one is refused at start, naming the file.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let key = |k: &str| format!("apiserver.{k}");
        for (k, p) in [
            ("kubeconfig", Some(&self.kubeconfig)),
            ("bootstrap_kubeconfig", self.bootstrap_kubeconfig.as_ref()),
            ("cache_dir", self.cache_dir.as_ref()),
        ] {
            if let Some(p) = p.filter(|p| !p.is_absolute()) {
                return Err((key(k), format!("{} is not an absolute path", p.display())));
            }
        }
        if let Some(n) = &self.node_name {
            check_subdomain(n).map_err(|e| (key("node_name"), e.to_string()))?;
        }
        if self.zone.is_empty() {
            return Err((key("zone"), "must not be empty".into()));
        }
        check_label_value(&self.zone).map_err(|e| (key("zone"), e.to_string()))?;
        for (k, v) in &self.labels {
            if OWN_LABELS.contains(&k.as_str()) {
                return Err((key("labels"), format!("{k} is set by noded")));
            }
            check_label_key(k).map_err(|e| (key("labels"), format!("{k}: {e}")))?;
            check_label_value(v).map_err(|e| (key("labels"), format!("{k}: {e}")))?;
        }
        if let Some(t) = &self.tunnel {
            let port = t.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
            if !matches!(port, Some((h, Ok(p))) if !h.is_empty() && p != 0) {
                return Err((key("tunnel"), format!("{t:?} is not host:port")));
            }
        }
        if self.tpm_key && self.bootstrap_kubeconfig.is_none() {
            return Err((
                key("tpm_key"),
                "needs bootstrap_kubeconfig: a key made in the TPM is certified through \
                 the bootstrap request"
                    .into(),
            ));
        }
        if self.tpm_key && !self.tpm_program.is_absolute() {
            return Err((
                key("tpm_program"),
                format!("{} is not an absolute path", self.tpm_program.display()),
            ));
        }
        if self.lease_seconds < 4 {
            return Err((
                key("lease_seconds"),
                "must be at least 4 (it is renewed every quarter of it)".into(),
            ));
        }
        // With a bootstrap credential the node's own is obtained (and made again when
        // it cannot be used): the bootstrap one must be readable now.
        let (k, path) = match &self.bootstrap_kubeconfig {
            Some(b) => ("bootstrap_kubeconfig", b),
            None => ("kubeconfig", &self.kubeconfig),
        };
        Kubeconfig::read_from(path)
            .map_err(|e| (key(k), format!("failed to read {}: {e}", path.display())))?;
        Ok(())
    }

    /// The task's settings; `state_dir` and `log_dir` are noded's, `runtime_version`
    /// what CRI Version said.
    pub fn settings(
        &self,
        state_dir: &Path,
        log_dir: &Path,
        csi_socket: Option<&Path>,
        runtime_version: String,
    ) -> Result<Settings> {
        let node_name = match &self.node_name {
            Some(n) => n.clone(),
            None => hostname()?,
        };
        let mut labels = self.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), node_name.clone());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert("kubernetes.io/arch".into(), arch().into());
        labels.insert(ZONE_LABEL.into(), self.zone.clone());
        let lease = Duration::from_secs(self.lease_seconds.into());
        Ok(Settings {
            kubeconfig: self.kubeconfig.clone(),
            bootstrap_kubeconfig: self.bootstrap_kubeconfig.clone(),
            node_name,
            labels,
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(|| state_dir.join("apiserver/pods")),
            lease_duration: lease,
            renew_every: lease / 4,
            node_status_every: Duration::from_secs(60),
            pod_status_every: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            runtime_version,
            tunnel: self.tunnel.clone(),
            log_dir: log_dir.to_path_buf(),
            csi_socket: csi_socket.map(Path::to_path_buf),
            state_dir: state_dir.to_path_buf(),
            tpm_program: self.tpm_key.then(|| self.tpm_program.clone()),
            renew_after: 0.8,
            token_refresh: 0.8,
            thresholds: conditions::Thresholds::default(),
            eviction_every: Duration::from_secs(10),
        })
    }
}

/// What the task runs with; the intervals are fields so tests can shorten them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kubeconfig: PathBuf,
    /// Obtain the node's credential into `kubeconfig` with this one (bootstrap.rs).
    pub bootstrap_kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// Every Node label, noded's own included.
    pub labels: BTreeMap<String, String>,
    pub cache_dir: PathBuf,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// The Node's status (heartbeat time, capacity) is patched this often.
    pub node_status_every: Duration,
    /// The reconciler's status is looked at this often; only changes are patched.
    pub pod_status_every: Duration,
    /// Failed calls are retried after 200 ms, doubling up to this.
    pub retry_max: Duration,
    /// The Node's `containerRuntimeVersion` (`containerd://1.6.20`).
    pub runtime_version: String,
    /// konnectivity-server's agent address (`Config::tunnel`).
    pub tunnel: Option<String>,
    /// Where noded keeps the containers' logs, which the kubelet API serves.
    pub log_dir: PathBuf,
    /// storaged's CSI socket: with it, noded provisions, grows and reclaims the
    /// volumes of claims whose pods the scheduler puts here (provisioner.rs).
    pub csi_socket: Option<PathBuf>,
    /// noded's state directory, where its CSI volumes are staged.
    pub state_dir: PathBuf,
    /// The node's key is made in the TPM with this program (edge-tpm); `None`: on the
    /// data partition.
    pub tpm_program: Option<PathBuf>,
    /// With a bootstrap credential, the node's certificate is renewed once this
    /// fraction of its lifetime has passed (0.8).
    pub renew_after: f64,
    /// A pod's service-account token is asked for again once this fraction of its
    /// lifetime has passed (0.8, as kubelet; at most a day).
    pub token_refresh: f64,
    /// Memory and disk pressure start under these (kubelet's defaults).
    pub thresholds: Thresholds,
    /// Under pressure, one pod from the API server is evicted this often.
    pub eviction_every: Duration,
}

/// The running tasks; dropping it stops them.
pub struct Agent {
    _tasks: tokio::task::JoinSet<()>,
}

/// What the watcher learnt about a pod, for the status reports.
#[derive(Debug, Clone)]
struct Known {
    namespace: String,
    name: String,
    uid: String,
    /// container name → image, for containerStatuses.
    images: BTreeMap<String, String>,
    /// The server has set deletionTimestamp: the cached manifest is gone and, once the
    /// reconciler no longer reports the pod, the deletion is finished with grace 0.
    deleting: bool,
    /// `spec.hostNetwork`: its IP is the node's.
    host_network: bool,
    /// What eviction ranks by: the QoS class the server gave it (0 BestEffort, 1
    /// Burstable, 2 Guaranteed), `spec.priority`, and when it was created.
    qos: u8,
    priority: i64,
    created: String,
    /// Evicted by noded under pressure: not run again, its status not reported.
    evicted: bool,
}

struct Shared {
    client: kube::Client,
    /// containerd, to see that a deleted pod's sandbox is gone before the deletion is
    /// finished on the server; without it, the reconciler dropping the pod is enough.
    cri: Option<crate::cri::Client>,
    settings: Settings,
    /// cache file name (`<namespace>_<name>.yaml`) → pod.
    known: Mutex<BTreeMap<String, Known>>,
    /// Bumped when a relist starts: the server may have lost what was reported before.
    relists: AtomicU64,
    host_ip: Option<Ipv4Addr>,
    started: String,
    /// The Node's conditions' transition times (conditions.rs).
    transitions: conditions::Transitions,
    /// The images containerd holds, as the Node's `status.images` (refreshed before
    /// each status patch).
    images: Mutex<Value>,
    /// Pods not cached yet for what their volumes or variables read (cache key → the
    /// pod and the reason last told), tried again by the watch loop.
    unresolved: Mutex<BTreeMap<String, (kube::api::DynamicObject, String)>>,
    /// Pods evicted under pressure: cache key → (uid, why, whether the server was told).
    evicted: Mutex<BTreeMap<String, (String, String, bool)>>,
    /// Pods with service-account tokens (cache key → when to ask again, the pod).
    refresh: Mutex<BTreeMap<String, (std::time::Instant, kube::api::DynamicObject)>>,
}

/// A client from a kubeconfig file (its current context). A user key that is a TPM key
/// (bootstrap.rs made it with `tpm`, edge-tpm) signs through the TPM: kube cannot read
/// such a key, so the client is built on our own TLS configuration.
async fn client_from(path: &Path, tpm: Option<&Path>) -> Result<kube::Client> {
    let unusable = |source| Error::Kubeconfig {
        path: path.to_path_buf(),
        source,
    };
    let mut kubeconfig = Kubeconfig::read_from(path).map_err(unusable)?;
    if !holds_tpm_key(&kubeconfig) {
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(unusable)?;
        return kube::Client::try_from(config).map_err(|source| Error::Kube {
            kubeconfig: path.to_path_buf(),
            source,
        });
    }
    let (roots, certified) = identity(path, tpm).map_err(Error::Bootstrap)?;
    // kube's configuration for the server, its CA and the namespace; the user's
    // certificate and key are ours to present.
    for a in kubeconfig
        .auth_infos
        .iter_mut()
        .filter_map(|a| a.auth_info.as_mut())
    {
        a.client_key = None;
        a.client_key_data = None;
        a.client_certificate = None;
        a.client_certificate_data = None;
    }
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(unusable)?;
    let tls = tls_client(roots, certified).map_err(Error::Bootstrap)?;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    // As kube's own client: a server that does not answer a connect is given up.
    http.set_connect_timeout(config.connect_timeout);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, kube::client::Body>(https);
    use kube::client::ConfigExt;
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .service(client);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// Whether the kubeconfig's user key is a file holding a TPM key.
fn holds_tpm_key(k: &Kubeconfig) -> bool {
    current(k)
        .1
        .and_then(|u| u.client_key.as_ref())
        .and_then(|f| std::fs::read(f).ok())
        .is_some_and(|text| edge_tpm::program::is_tpm_key(&text).unwrap_or(false))
}

/// TLS to the core as the node: its CA, and its certificate and key for every server
/// that asks.
fn tls_client(
    roots: tokio_rustls::rustls::RootCertStore,
    certified: Arc<tokio_rustls::rustls::sign::CertifiedKey>,
) -> std::result::Result<tokio_rustls::rustls::ClientConfig, String> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Ok(
        tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(edge_tpm::program::OneCertificate(certified))),
    )
}

/// Creates the cache directory and starts the Node, Lease, pod watch and pod status
/// loops. With a bootstrap credential they start once the node's own is obtained (in
/// the background: the pods do not wait on the server); without one, the kubeconfig
/// must give a client now.
pub async fn start(
    settings: Settings,
    status: Status,
    cri: Option<crate::cri::Client>,
) -> Result<Agent> {
    std::fs::create_dir_all(&settings.cache_dir)
        .map_err(Error::io("failed to create", &settings.cache_dir))?;
    let mut tasks = tokio::task::JoinSet::new();
    match settings.bootstrap_kubeconfig.clone() {
        None => {
            let client = client_from(&settings.kubeconfig, settings.tpm_program.as_deref()).await?;
            run(client, settings, status, cri, &mut tasks);
        }
        Some(bootstrap) => {
            tasks.spawn(async move {
                let mut client = bootstrap::client(&settings, &bootstrap).await;
                loop {
                    let mut inner = tokio::task::JoinSet::new();
                    run(
                        client.clone(),
                        settings.clone(),
                        status.clone(),
                        cri.clone(),
                        &mut inner,
                    );
                    // The tasks run until the certificate is renewed, then again with
                    // the new one (or, if renewing failed until it expired, with one
                    // obtained through the bootstrap credential again).
                    let renewed = tokio::select! {
                        r = bootstrap::renewed(&settings, &bootstrap, client.clone()) => r,
                        _ = async { while inner.join_next().await.is_some() {} } => return,
                    };
                    inner.shutdown().await;
                    client = match renewed {
                        Some(c) => c,
                        None => bootstrap::client(&settings, &bootstrap).await,
                    };
                }
            });
        }
    }
    Ok(Agent { _tasks: tasks })
}

fn run(
    client: kube::Client,
    settings: Settings,
    status: Status,
    cri: Option<crate::cri::Client>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    tracing::info!(node = %settings.node_name, server = %settings.kubeconfig.display(), cache = %settings.cache_dir.display(), "API server configured");
    let shared = Arc::new(Shared {
        client,
        cri,
        settings,
        known: Mutex::new(BTreeMap::new()),
        relists: AtomicU64::new(0),
        host_ip: first_ipv4(),
        started: time_now(),
        transitions: conditions::Transitions::default(),
        images: Mutex::new(Value::Array(Vec::new())),
        unresolved: Mutex::new(BTreeMap::new()),
        refresh: Mutex::new(BTreeMap::new()),
        evicted: Mutex::new(BTreeMap::new()),
    });
    if let Some(address) = shared.settings.tunnel.clone() {
        match tunnel_parts(&shared, address, status.clone()) {
            Ok((t, k)) => {
                tasks.spawn(tunnel::run(t, Arc::new(k), shared.settings.retry_max));
            }
            Err(e) => tracing::error!("no tunnel to the core: {e}"),
        }
    }
    if let Some(socket) = shared.settings.csi_socket.clone() {
        let volumes = crate::volumes::Volumes::new(Some(socket), shared.settings.state_dir.clone());
        tasks.spawn(provisioner::run(shared.clone(), volumes));
    }
    tasks.spawn(node_and_lease(shared.clone()));
    tasks.spawn(watch_pods(shared.clone()));
    tasks.spawn(eviction::evict_under_pressure(
        shared.clone(),
        status.clone(),
    ));
    tasks.spawn(report_pods(shared, status));
}

/// The tunnel (the node's certificate from the kubeconfig, trusting its CA) and the
/// kubelet API it serves (trusting the same CA for clients).
fn tunnel_parts(
    shared: &Shared,
    address: String,
    status: Status,
) -> std::result::Result<(tunnel::Tunnel, kubelet::Kubelet), String> {
    let s = &shared.settings;
    let (roots, certified) = identity(&s.kubeconfig, s.tpm_program.as_deref())?;
    let mut tls = tls_client(roots.clone(), certified)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let kubelet = kubelet::Kubelet::new(
        shared.client.clone(),
        shared.cri.clone(),
        &s.node_name,
        shared.host_ip,
        roots,
        status,
        s.log_dir.clone(),
    )?;
    let tunnel = tunnel::Tunnel {
        address,
        node_name: s.node_name.clone(),
        tls: Arc::new(tls),
    };
    Ok((tunnel, kubelet))
}

/// The cluster and user of a kubeconfig's current context (its first context, cluster
/// and user when it names none).
fn current(
    k: &Kubeconfig,
) -> (
    Option<&kube::config::Cluster>,
    Option<&kube::config::AuthInfo>,
) {
    let context = k
        .current_context
        .as_ref()
        .and_then(|c| k.contexts.iter().find(|n| &n.name == c))
        .or_else(|| k.contexts.first())
        .and_then(|c| c.context.as_ref());
    let cluster = k
        .clusters
        .iter()
        .find(|c| context.is_some_and(|x| x.cluster == c.name))
        .or_else(|| k.clusters.first())
        .and_then(|c| c.cluster.as_ref());
    let user = k
        .auth_infos
        .iter()
        .find(|a| context.is_some_and(|x| x.user.as_ref() == Some(&a.name)))
        .or_else(|| k.auth_infos.first())
        .and_then(|a| a.auth_info.as_ref());
    (cluster, user)
}

type Identity = (
    tokio_rustls::rustls::RootCertStore,
    Arc<tokio_rustls::rustls::sign::CertifiedKey>,
);

/// The kubeconfig's CA, and its client certificate chain with the key (as data or as
/// files): a PEM key, or a TPM key file signed through `tpm` (edge-tpm).
fn identity(path: &Path, tpm: Option<&Path>) -> std::result::Result<Identity, String> {
    use base64::Engine;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| format!("{}: {what}: {e}", path.display());
    let k = Kubeconfig::read_from(path).map_err(|e| bad("unreadable", &e))?;
    let (cluster, user) = current(&k);
    let cluster = cluster.ok_or_else(|| format!("{} names no cluster", path.display()))?;
    let user = user.ok_or_else(|| format!("{} names no user", path.display()))?;
    let load = |data: Option<&str>,
                file: Option<&String>,
                what: &str|
     -> std::result::Result<Vec<u8>, String> {
        match (data, file) {
            (Some(d), _) => base64::engine::general_purpose::STANDARD
                .decode(d.trim())
                .map_err(|e| bad(&format!("{what}-data is not base64"), &e)),
            (None, Some(f)) => std::fs::read(f).map_err(|e| bad(&format!("{what} {f}"), &e)),
            (None, None) => Err(format!("{} has no {what}", path.display())),
        }
    };
    use secrecy::ExposeSecret;
    let ca = load(
        cluster.certificate_authority_data.as_deref(),
        cluster.certificate_authority.as_ref(),
        "certificate-authority",
    )?;
    let cert = load(
        user.client_certificate_data.as_deref(),
        user.client_certificate.as_ref(),
        "client-certificate",
    )?;
    let key = load(
        user.client_key_data.as_ref().map(|s| s.expose_secret()),
        user.client_key.as_ref(),
        "client-key",
    )?;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        let c = c.map_err(|e| bad("certificate-authority", &e))?;
        roots.add(c).map_err(|e| bad("certificate-authority", &e))?;
    }
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad("client-certificate", &e))?;
    let is_tpm = edge_tpm::program::is_tpm_key(&key).map_err(|e| bad("client-key", &e))?;
    let signer: Arc<dyn tokio_rustls::rustls::sign::SigningKey> = match (is_tpm, tpm) {
        (false, _) => {
            let der = PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad("client-key", &e))?;
            tokio_rustls::rustls::crypto::ring::sign::any_supported_type(&der)
                .map_err(|e| bad("client-key", &e))?
        }
        (true, Some(program)) => match &user.client_key {
            Some(file) => Arc::new(edge_tpm::program::TpmKey {
                program: program.to_path_buf(),
                key: file.into(),
            }),
            None => return Err(bad("client-key-data", &"a TPM key must be a file")),
        },
        (true, None) => {
            return Err(bad(
                "client-key",
                &"is a TPM key, and apiserver.tpm_key is off",
            ))
        }
    };
    Ok((
        roots,
        Arc::new(tokio_rustls::rustls::sign::CertifiedKey::new(chain, signer)),
    ))
}
