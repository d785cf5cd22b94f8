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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions,
    TypeMeta,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use serde_json::{json, Map, Value};

use crate::pods::{ContainerReport, PodReport, Status, API_PREFIX};

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
    /// A standard kubeconfig (its current context is used).
    pub kubeconfig: PathBuf,
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
}

fn default_lease_seconds() -> u32 {
    40
}

impl Config {
    /// Checks every key (errors are `(apiserver.<key>, message)`), reading the kubeconfig
    /// so an unreadable or malformed one is refused at start, naming the file.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let key = |k: &str| format!("apiserver.{k}");
        for (k, p) in [
            ("kubeconfig", Some(&self.kubeconfig)),
            ("cache_dir", self.cache_dir.as_ref()),
        ] {
            if let Some(p) = p.filter(|p| !p.is_absolute()) {
                return Err((key(k), format!("{} is not an absolute path", p.display())));
            }
        }
        if let Some(n) = &self.node_name {
            check_subdomain(n).map_err(|e| (key("node_name"), e))?;
        }
        if self.zone.is_empty() {
            return Err((key("zone"), "must not be empty".into()));
        }
        check_label_value(&self.zone).map_err(|e| (key("zone"), e))?;
        for (k, v) in &self.labels {
            if OWN_LABELS.contains(&k.as_str()) {
                return Err((key("labels"), format!("{k} is set by noded")));
            }
            check_label_key(k).map_err(|e| (key("labels"), format!("{k}: {e}")))?;
            check_label_value(v).map_err(|e| (key("labels"), format!("{k}: {e}")))?;
        }
        if self.lease_seconds < 4 {
            return Err((
                key("lease_seconds"),
                "must be at least 4 (it is renewed every quarter of it)".into(),
            ));
        }
        Kubeconfig::read_from(&self.kubeconfig).map_err(|e| {
            (
                key("kubeconfig"),
                format!("failed to read {}: {e}", self.kubeconfig.display()),
            )
        })?;
        Ok(())
    }

    /// The task's settings; `state_dir` is noded's, `runtime_version` what CRI Version said.
    pub fn settings(&self, state_dir: &Path, runtime_version: String) -> Result<Settings, String> {
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
        })
    }
}

/// What the task runs with; the intervals are fields so tests can shorten them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kubeconfig: PathBuf,
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
}

/// The running task; dropping it stops it.
pub struct Agent {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
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
}

/// Reads the kubeconfig, creates the cache directory and starts the Node, Lease, pod
/// watch and pod status loops.
pub async fn start(
    settings: Settings,
    status: Status,
    cri: Option<crate::cri::Client>,
) -> Result<Agent, String> {
    let path = settings.kubeconfig.display().to_string();
    let kubeconfig =
        Kubeconfig::read_from(&settings.kubeconfig).map_err(|e| format!("{path}: {e}"))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let client = kube::Client::try_from(config).map_err(|e| format!("{path}: {e}"))?;
    std::fs::create_dir_all(&settings.cache_dir)
        .map_err(|e| format!("failed to create {}: {e}", settings.cache_dir.display()))?;
    tracing::info!(node = %settings.node_name, server = %path, cache = %settings.cache_dir.display(), "API server configured");
    let shared = Arc::new(Shared {
        client,
        cri,
        settings,
        known: Mutex::new(BTreeMap::new()),
        relists: AtomicU64::new(0),
        host_ip: first_ipv4(),
        started: time_now(),
    });
    Ok(Agent {
        tasks: vec![
            tokio::spawn(node_and_lease(shared.clone())),
            tokio::spawn(watch_pods(shared.clone())),
            tokio::spawn(report_pods(shared, status)),
        ],
    })
}

// ---------------------------------------------------------------------------------
// Node and Lease

async fn node_and_lease(shared: Arc<Shared>) {
    let s = &shared.settings;
    // Objects go through DynamicObject (JSON) rather than k8s-openapi's structs: their
    // generated (de)serializers would add megabytes to the binary for the few fields
    // noded reads.
    let nodes: Api<DynamicObject> =
        Api::all_with(shared.client.clone(), &ApiResource::erase::<Node>(&()));
    let leases: Api<DynamicObject> = Api::namespaced_with(
        shared.client.clone(),
        LEASE_NAMESPACE,
        &ApiResource::erase::<Lease>(&()),
    );
    let mut node_uid: Option<String> = None;
    let mut lease: Option<DynamicObject> = None;
    let mut next_status = Instant::now();
    let (mut node_log, mut lease_log) = (
        Limited::new("registering the node"),
        Limited::new("renewing the node's lease"),
    );
    let mut retry = Retry::new(s.retry_max);
    loop {
        let mut failed = false;
        if node_uid.is_none() {
            match timed(register(&shared, &nodes)).await {
                Ok(uid) => {
                    node_log.ok();
                    tracing::info!(node = %s.node_name, "node registered");
                    node_uid = Some(uid);
                    next_status = Instant::now() + s.node_status_every;
                }
                Err(e) => {
                    node_log.fail(&e);
                    failed = true;
                }
            }
        } else if Instant::now() >= next_status {
            let patch = json!({ "status": node_status(&shared) });
            match timed(nodes.patch_status(
                &s.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ))
            .await
            {
                Ok(_) => {
                    node_log.ok();
                    next_status = Instant::now() + s.node_status_every;
                }
                Err(e) if e.code == Some(404) => {
                    tracing::warn!(node = %s.node_name, "the node was deleted on the API server: registering it again");
                    node_uid = None;
                    failed = true;
                }
                Err(e) => {
                    node_log.fail(&e);
                    failed = true;
                }
            }
        }
        match timed(renew(&shared, &leases, &mut lease, node_uid.as_deref())).await {
            Ok(()) => lease_log.ok(),
            Err(e) => {
                // A conflict or any other failure: read it afresh next time.
                lease = None;
                lease_log.fail(&e);
                failed = true;
            }
        }
        let wait = if failed {
            retry.next_delay().min(s.renew_every)
        } else {
            retry.reset();
            s.renew_every
        };
        tokio::time::sleep(wait).await;
    }
}

/// Creates the Node, or brings an existing one's labels up to date; returns its uid.
async fn register(shared: &Shared, nodes: &Api<DynamicObject>) -> Result<String, kube::Error> {
    let s = &shared.settings;
    let node: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": s.node_name, "labels": s.labels },
        "status": node_status(shared),
    }))
    .map_err(kube::Error::SerdeError)?;
    let created = match nodes.create(&PostParams::default(), &node).await {
        Ok(n) => n,
        Err(kube::Error::Api(e)) if e.is_already_exists() => {
            let patch = json!({ "metadata": { "labels": s.labels } });
            nodes
                .patch(&s.node_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            let status = json!({ "status": node_status(shared) });
            nodes
                .patch_status(
                    &s.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await?
        }
        Err(e) => return Err(e),
    };
    Ok(created.metadata.uid.unwrap_or_default())
}

/// The Node's status as noded sees the host now.
fn node_status(shared: &Shared) -> Value {
    let s = &shared.settings;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = mem_total_kib().map(|k| format!("{k}Ki"));
    let mut resources = json!({ "cpu": cpus.to_string(), "pods": MAX_PODS.to_string() });
    if let Some(m) = memory {
        resources["memory"] = m.into();
    }
    let mut addresses = Vec::new();
    if let Some(ip) = shared.host_ip {
        addresses.push(json!({ "type": "InternalIP", "address": ip.to_string() }));
    }
    addresses.push(json!({ "type": "Hostname", "address": s.node_name }));
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "addresses": addresses,
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "noded is posting ready status",
            "lastHeartbeatTime": time_now(),
            "lastTransitionTime": shared.started,
        }],
        "nodeInfo": {
            "machineID": read("/etc/machine-id"),
            "systemUUID": read("/sys/class/dmi/id/product_uuid"),
            "bootID": read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": read("/proc/sys/kernel/osrelease"),
            "osImage": os_image(),
            "containerRuntimeVersion": s.runtime_version,
            "kubeletVersion": format!("noded/{}", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": arch(),
        },
    })
}

/// Renews (or creates) the node's Lease, as kubelet does: holder, duration, renewTime.
async fn renew(
    shared: &Shared,
    leases: &Api<DynamicObject>,
    cached: &mut Option<DynamicObject>,
    node_uid: Option<&str>,
) -> Result<(), kube::Error> {
    let s = &shared.settings;
    let duration = i32::try_from(s.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let mut lease = match cached.take() {
        Some(l) => l,
        None => match leases.get_opt(&s.node_name).await? {
            Some(l) => l,
            None => {
                let mut meta = json!({ "name": s.node_name, "namespace": LEASE_NAMESPACE });
                if let Some(uid) = node_uid.filter(|u| !u.is_empty()) {
                    meta["ownerReferences"] = json!([{
                        "apiVersion": "v1", "kind": "Node", "name": s.node_name, "uid": uid,
                    }]);
                }
                let lease: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": meta,
                    "spec": {
                        "holderIdentity": s.node_name,
                        "leaseDurationSeconds": duration,
                        "renewTime": micro_now(),
                    },
                }))
                .map_err(kube::Error::SerdeError)?;
                *cached = Some(leases.create(&PostParams::default(), &lease).await?);
                return Ok(());
            }
        },
    };
    lease.types = Some(TypeMeta {
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
    });
    let spec = &mut lease.data["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    spec["holderIdentity"] = s.node_name.clone().into();
    spec["leaseDurationSeconds"] = duration.into();
    spec["renewTime"] = micro_now();
    *cached = Some(
        leases
            .replace(&s.node_name, &PostParams::default(), &lease)
            .await?,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// Pods bound to this node → the cache directory

async fn watch_pods(shared: Arc<Shared>) {
    let s = &shared.settings;
    let api: Api<DynamicObject> =
        Api::all_with(shared.client.clone(), &ApiResource::erase::<Pod>(&()));
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", s.node_name));
    let stream = kube::runtime::WatchStreamExt::backoff(watcher(api, wc), Retry::new(s.retry_max));
    let mut stream = std::pin::pin!(stream);
    let mut log = Limited::new("watching this node's pods");
    let mut listed: Option<BTreeSet<String>> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                log.fail(&e);
                continue;
            }
        };
        log.ok();
        match event {
            watcher::Event::Init => {
                listed = Some(BTreeSet::new());
                // A (re)list: the server may have lost the status reported before; what
                // is reported from now on reaches the server that lists.
                shared.relists.fetch_add(1, Ordering::Relaxed);
            }
            watcher::Event::InitApply(pod) => {
                if let (Some(key), Some(l)) = (apply(&shared, &pod), listed.as_mut()) {
                    l.insert(key);
                }
            }
            watcher::Event::InitDone => {
                if let Some(l) = listed.take() {
                    prune(&shared, &l);
                }
            }
            watcher::Event::Apply(pod) => {
                apply(&shared, &pod);
            }
            watcher::Event::Delete(pod) => {
                if let Some(key) = cache_key(&pod) {
                    tracing::info!(pod = %key, "pod deleted on the API server");
                    remove_cached(s, &key);
                    lock(&shared.known).remove(&key);
                }
            }
        }
    }
}

/// `<namespace>_<name>.yaml`, if both are names Kubernetes allows (no `/`, `_` or
/// leading dot can reach a path).
fn cache_key(pod: &DynamicObject) -> Option<String> {
    let name = pod.metadata.name.as_deref()?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    if check_subdomain(name).is_err() || check_subdomain(ns).is_err() {
        tracing::warn!("ignoring a pod named {ns:?}/{name:?} by the API server: not a valid name");
        return None;
    }
    Some(format!("{ns}_{name}.yaml"))
}

/// Mirrors one pod into the cache; returns its key.
fn apply(shared: &Shared, pod: &DynamicObject) -> Option<String> {
    let s = &shared.settings;
    let key = cache_key(pod)?;
    let full = serde_json::to_value(pod).unwrap_or(Value::Null);
    let mut images = BTreeMap::new();
    for list in ["initContainers", "containers"] {
        for c in full["spec"][list].as_array().into_iter().flatten() {
            if let (Some(n), Some(i)) = (c["name"].as_str(), c["image"].as_str()) {
                images.insert(n.to_string(), i.to_string());
            }
        }
    }
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let known = Known {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        images,
        deleting,
        host_network: full["spec"]["hostNetwork"] == true,
    };
    let previous = lock(&shared.known).insert(key.clone(), known);
    if deleting {
        if previous.is_none_or(|p| !p.deleting) {
            tracing::info!(pod = %key, "pod being deleted on the API server: stopping it");
        }
        remove_cached(s, &key);
        return Some(key);
    }
    let (manifest, dropped) = edge_manifest(&full);
    let uid = pod.metadata.uid.as_deref().unwrap_or("");
    let text = match serde_yaml::to_string(&manifest) {
        Ok(t) => format!(
            "# Mirrored by noded from the Kubernetes API server (pod uid {uid}); rewritten from there.\n{t}"
        ),
        Err(e) => {
            tracing::warn!(pod = %key, "could not write the pod as YAML: {e}");
            return Some(key);
        }
    };
    let path = s.cache_dir.join(&key);
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Some(key);
    }
    // The reconciler skips dot-named files: the temporary one is never read as a pod.
    match edge_common::write_atomic(&path, text.as_bytes(), 0o644)
        .map_err(|e| format!("failed to write {}: {e}", path.display()))
    {
        Ok(()) => {
            tracing::info!(pod = %key, "pod from the API server cached");
            if !dropped.is_empty() {
                tracing::info!(pod = %key, "dropped from the pod (not applicable at the edge): {}", dropped.join(", "));
            }
        }
        Err(e) => tracing::error!(pod = %key, "failed to cache the pod: {e}"),
    }
    Some(key)
}

/// After a relist: cached pods the server no longer has are removed.
fn prune(shared: &Shared, listed: &BTreeSet<String>) {
    let s = &shared.settings;
    lock(&shared.known).retain(|k, _| listed.contains(k));
    let Ok(entries) = std::fs::read_dir(&s.cache_dir) else {
        return;
    };
    for e in entries.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if name.ends_with(".yaml") && !name.starts_with('.') && !listed.contains(&name) {
            tracing::info!(pod = %name, "pod no longer bound to this node on the API server");
            remove_cached(s, &name);
        }
    }
}

fn remove_cached(s: &Settings, key: &str) {
    let path = s.cache_dir.join(key);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!("failed to remove {}: {e}", path.display()),
    }
}

/// The pod as a manifest noded's parser reads: what the server adds that makes no sense
/// at the edge is removed (and named in the second value when it was a user's setting
/// rather than a server default); anything else unsupported stays, so the parser
/// refuses the pod naming the field, as for every other source.
pub fn edge_manifest(pod: &Value) -> (Value, Vec<String>) {
    let mut dropped = Vec::new();
    let mut meta = Map::new();
    for k in ["name", "namespace", "labels"] {
        if let Some(v) = pod["metadata"].get(k).filter(|v| !v.is_null()) {
            meta.insert(k.into(), v.clone());
        }
    }
    let mut out = Map::new();
    out.insert("apiVersion".into(), "v1".into());
    out.insert("kind".into(), "Pod".into());
    out.insert("metadata".into(), Value::Object(meta));
    let mut spec = pod["spec"].as_object().cloned().unwrap_or_default();
    for k in [
        "nodeName",
        "schedulerName",
        "dnsPolicy",
        "serviceAccount",
        "serviceAccountName",
        "automountServiceAccountToken",
        "tolerations",
        "priority",
        "priorityClassName",
        "preemptionPolicy",
        "enableServiceLinks",
    ] {
        spec.remove(k);
    }
    if spec.get("securityContext").is_some_and(is_empty) {
        spec.remove("securityContext");
    }
    // The service-account token volume the server injects: there is no token
    // projection at the edge (and no in-cluster API access for pods).
    let token = |name: &str| name.starts_with("kube-api-access-");
    if let Some(Value::Array(vols)) = spec.get_mut("volumes") {
        vols.retain(|v| {
            let name = v["name"].as_str().unwrap_or("");
            let drop = token(name) && v.get("projected").is_some();
            if drop {
                dropped.push(format!("volume {name} (service-account token)"));
            }
            !drop
        });
        if vols.is_empty() {
            spec.remove("volumes");
        }
    }
    for list in ["initContainers", "containers"] {
        let Some(Value::Array(cs)) = spec.get_mut(list) else {
            continue;
        };
        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
            for k in [
                "terminationMessagePath",
                "terminationMessagePolicy",
                "imagePullPolicy",
            ] {
                c.remove(k);
            }
            if c.get("securityContext").is_some_and(is_empty) {
                c.remove("securityContext");
            }
            if c.get("resources").is_some_and(is_empty) {
                c.remove("resources");
            }
            if let Some(Value::Array(mounts)) = c.get_mut("volumeMounts") {
                mounts.retain(|m| !token(m["name"].as_str().unwrap_or("")));
                if mounts.is_empty() {
                    c.remove("volumeMounts");
                }
            }
        }
    }
    out.insert("spec".into(), Value::Object(spec));
    (Value::Object(out), dropped)
}

fn is_empty(v: &Value) -> bool {
    v.is_null() || v.as_object().is_some_and(Map::is_empty)
}

// ---------------------------------------------------------------------------------
// Pod status

async fn report_pods(shared: Arc<Shared>, status: Status) {
    let s = &shared.settings;
    // key → the status last accepted by the server (without times).
    let mut sent: HashMap<String, Value> = HashMap::new();
    let mut times = Times::default();
    let mut relists = 0;
    let mut log = Limited::new("reporting pod status");
    let mut retry = Retry::new(s.retry_max);
    loop {
        let r = shared.relists.load(Ordering::Relaxed);
        if r != relists {
            // After a relist (first list, or the server came back) every pod is
            // reported again: the server may not have what we sent before.
            relists = r;
            sent.clear();
        }
        let reports: BTreeMap<String, PodReport> = lock(&status)
            .iter()
            .filter_map(|p| Some((p.file.strip_prefix(API_PREFIX)?.to_string(), p.clone())))
            .collect();
        let known = lock(&shared.known).clone();
        sent.retain(|k, _| known.contains_key(k));
        let mut failed = false;
        for (key, pod) in &known {
            let api: Api<DynamicObject> = Api::namespaced_with(
                shared.client.clone(),
                &pod.namespace,
                &ApiResource::erase::<Pod>(&()),
            );
            // `sent` holds Null for a pod whose deletion has been finished.
            if pod.deleting {
                if reports.contains_key(key) || sent.get(key) == Some(&Value::Null) {
                    continue;
                }
                // As kubelet: finished only once its containers are gone.
                if let Some(cri) = &shared.cri {
                    if sandbox_left(cri, key).await {
                        continue;
                    }
                }
                // The reconciler has stopped it: finish the deletion, as kubelet does.
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(pod.uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match timed(api.delete(&pod.name, &dp)).await {
                    Ok(_) => {
                        sent.insert(key.clone(), Value::Null);
                    }
                    Err(e) if matches!(e.code, Some(404) | Some(409)) => {
                        sent.insert(key.clone(), Value::Null);
                    }
                    Err(e) => {
                        log.fail(&e);
                        failed = true;
                        break;
                    }
                }
                continue;
            }
            let Some(report) = reports.get(key) else {
                continue;
            };
            let desired = pod_status(report, pod, shared.host_ip);
            if sent.get(key) == Some(&desired) {
                continue;
            }
            let patch = json!({
                "metadata": { "uid": pod.uid },
                "status": times.stamp(key, &desired),
            });
            match timed(api.patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(&patch)))
                .await
            {
                Ok(_) => {
                    log.ok();
                    sent.insert(key.clone(), desired);
                }
                // Gone or replaced on the server: the watch will say so.
                Err(e) if matches!(e.code, Some(404) | Some(409)) => {
                    sent.insert(key.clone(), desired);
                }
                Err(e) => {
                    log.fail(&e);
                    failed = true;
                    break;
                }
            }
        }
        times.retain(&known);
        let wait = if failed {
            retry.next_delay().max(s.pod_status_every)
        } else {
            retry.reset();
            s.pod_status_every
        };
        tokio::time::sleep(wait).await;
    }
}

/// Whether the pod of cache file `key` still has a sandbox (the reconciler's teardown
/// removes it last); an unanswered question counts as yes.
async fn sandbox_left(cri: &crate::cri::Client, key: &str) -> bool {
    use crate::cri::api::{ListPodSandboxRequest, PodSandboxFilter};
    // pods.rs labels each sandbox with its manifest's key under this name.
    let label = (
        "io.edgeos.pod-file".to_string(),
        format!("{API_PREFIX}{key}"),
    );
    let req = ListPodSandboxRequest {
        filter: Some(PodSandboxFilter {
            label_selector: [label].into(),
            ..Default::default()
        }),
    };
    match tokio::time::timeout(CALL_TIMEOUT, cri.list_pod_sandbox(req)).await {
        Ok(Ok(r)) => !r.items.is_empty(),
        _ => true,
    }
}

/// A pod's status from the reconciler's report, without times (so it compares).
fn pod_status(report: &PodReport, pod: &Known, host_ip: Option<Ipv4Addr>) -> Value {
    let phase = match report.state.as_str() {
        "running" => "Running",
        "succeeded" => "Succeeded",
        "failed" => "Failed",
        // pending, initializing and invalid: kubelet keeps a pod it cannot run Pending.
        _ => "Pending",
    };
    let (init, app): (Vec<&ContainerReport>, Vec<&ContainerReport>) =
        report.containers.iter().partition(|c| c.init);
    let invalid = report.state == "invalid";
    let initialized = match report.state.as_str() {
        "initializing" | "invalid" => false,
        "pending" => init.is_empty(),
        _ => true,
    };
    let ready = phase == "Running" && !app.is_empty() && app.iter().all(|c| c.ready);
    let cond =
        |kind: &str, ok: bool| json!({ "type": kind, "status": if ok { "True" } else { "False" } });
    let mut ready_cond = cond("Ready", ready);
    let mut containers_ready = cond("ContainersReady", ready);
    let error = report.error.as_deref().map(without_source);
    if let Some(e) = &error {
        let reason = if invalid {
            "ManifestRefused"
        } else {
            "PodError"
        };
        for c in [&mut ready_cond, &mut containers_ready] {
            c["reason"] = reason.into();
            c["message"] = e.clone().into();
        }
    }
    let statuses = |list: &[&ContainerReport]| -> Vec<Value> {
        list.iter()
            .map(|c| {
                let state = match c.state.as_str() {
                    "running" => json!({ "running": {} }),
                    "exited" | "completed" => {
                        let code = c.exit_code.unwrap_or(0);
                        let reason = if code == 0 { "Completed" } else { "Error" };
                        json!({ "terminated": { "exitCode": code, "reason": reason } })
                    }
                    "back-off" => {
                        let mut w = json!({ "reason": "CrashLoopBackOff" });
                        if let Some(e) = &c.last_error {
                            w["message"] = e.clone().into();
                        }
                        json!({ "waiting": w })
                    }
                    _ => {
                        let mut w = json!({ "reason": "ContainerCreating" });
                        if let Some(e) = c.last_error.as_ref().or(error.as_ref()) {
                            w["message"] = e.clone().into();
                        }
                        json!({ "waiting": w })
                    }
                };
                json!({
                    "name": c.name,
                    "image": pod.images.get(&c.name).cloned().unwrap_or_default(),
                    "imageID": "",
                    "ready": c.ready && c.state == "running",
                    "restartCount": c.restarts,
                    "started": c.state == "running",
                    "state": state,
                })
            })
            .collect()
    };
    let mut status = json!({
        "phase": phase,
        "conditions": [
            cond("PodScheduled", true),
            cond("Initialized", initialized),
            containers_ready,
            ready_cond,
        ],
        "containerStatuses": statuses(&app),
        "initContainerStatuses": statuses(&init),
    });
    if let Some(ip) = host_ip {
        status["hostIP"] = ip.to_string().into();
        status["hostIPs"] = json!([{ "ip": ip.to_string() }]);
        // A pod on the host network has the node's address, as kubelet reports it; a
        // pod's own (CNI) address is not in the reconciler's report yet.
        if pod.host_network {
            status["podIP"] = ip.to_string().into();
            status["podIPs"] = json!([{ "ip": ip.to_string() }]);
        }
    }
    if let Some(e) = error.filter(|_| invalid) {
        status["reason"] = "ManifestRefused".into();
        status["message"] = e.into();
    }
    status
}

/// The reconciler's errors start with the manifest's path, which means nothing on the
/// server: `…/default_web.yaml: spec.affinity is not supported yet` → `spec.affinity …`.
fn without_source(e: &str) -> String {
    match e.split_once(".yaml: ") {
        Some((path, rest)) if !path.contains(' ') => rest.to_string(),
        _ => e.to_string(),
    }
}

/// startTime and the conditions' lastTransitionTime, kept apart from the compared status.
#[derive(Default)]
struct Times {
    started: HashMap<String, String>,
    /// (key, condition type) → (status, since).
    transitions: HashMap<(String, String), (String, String)>,
}

impl Times {
    fn stamp(&mut self, key: &str, status: &Value) -> Value {
        let now = time_now();
        let mut out = status.clone();
        out["startTime"] = self
            .started
            .entry(key.to_string())
            .or_insert_with(|| now.clone())
            .clone()
            .into();
        if let Some(conds) = out["conditions"].as_array_mut() {
            for c in conds {
                let kind = c["type"].as_str().unwrap_or("").to_string();
                let st = c["status"].as_str().unwrap_or("").to_string();
                let entry = self
                    .transitions
                    .entry((key.to_string(), kind))
                    .or_insert_with(|| (st.clone(), now.clone()));
                if entry.0 != st {
                    *entry = (st, now.clone());
                }
                c["lastTransitionTime"] = entry.1.clone().into();
            }
        }
        out
    }

    fn retain(&mut self, known: &BTreeMap<String, Known>) {
        self.started.retain(|k, _| known.contains_key(k));
        self.transitions.retain(|(k, _), _| known.contains_key(k));
    }
}

// ---------------------------------------------------------------------------------
// Calls, retries, logs

/// A failed call: its message and HTTP status, if the server answered.
#[derive(Debug)]
struct CallError {
    code: Option<u16>,
    message: String,
}

impl Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(kube::Error::Api(s))) => Err(CallError {
            code: Some(s.code),
            message: format!("{} ({} {})", s.message, s.code, s.reason),
        }),
        Ok(Err(e)) => Err(CallError {
            code: None,
            message: e.to_string(),
        }),
        Err(_) => Err(CallError {
            code: None,
            message: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        }),
    }
}

/// Logs a failing operation once, then at most every [`LOG_EVERY`], and says when it
/// works again: an outage is a few lines, not one per retry.
struct Limited {
    what: &'static str,
    failing: bool,
    last: Option<Instant>,
    suppressed: u32,
}

impl Limited {
    fn new(what: &'static str) -> Self {
        Limited {
            what,
            failing: false,
            last: None,
            suppressed: 0,
        }
    }

    fn fail(&mut self, e: &dyn Display) {
        self.failing = true;
        if self.last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            let more = match self.suppressed {
                0 => String::new(),
                n => format!(" ({n} more failures since the last message)"),
            };
            tracing::warn!("{} failed: {e}{more}", self.what);
            self.last = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    fn ok(&mut self) {
        if self.failing {
            tracing::info!("{}: the API server answers again", self.what);
        }
        self.failing = false;
        self.last = None;
        self.suppressed = 0;
    }
}

/// 200 ms, doubling up to a ceiling; also the watcher's back-off (kube's trait, which
/// the shared type cannot take here).
struct Retry(edge_common::Backoff);

impl Retry {
    fn new(max: Duration) -> Self {
        Retry(edge_common::Backoff::new(Duration::from_millis(200), max))
    }

    fn next_delay(&mut self) -> Duration {
        self.0.next_delay()
    }

    fn reset(&mut self) {
        self.0.reset()
    }
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {
        Retry::reset(self)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another task panicked mid-update; the data is still
    // the best we have.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------
// The host

fn time_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Now as a MicroTime (`2026-11-22T00:35:00.123456Z`, as the Lease's renewTime carries).
fn micro_now() -> Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(now.as_secs()).unwrap_or(0);
    let whole = k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default();
    match whole.strip_suffix('Z') {
        Some(w) => format!("{w}.{:06}Z", now.subsec_micros()).into(),
        None => Value::Null,
    }
}

fn hostname() -> Result<String, String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| {
            format!("apiserver.node_name is not set and the host name is unreadable: {e}")
        })?
        .trim()
        .to_lowercase();
    check_subdomain(&name).map_err(|e| {
        format!(
            "apiserver.node_name is not set and the host name {name:?} cannot be a node name: {e}"
        )
    })?;
    Ok(name)
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "edgeos".into())
}

fn mem_total_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The first IPv4 address of an interface that is up, loopback aside.
fn first_ipv4() -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list it points `list` at; it is walked read-only
    // and freed once below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut p = list;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its type.
        if up
            && !ifa.ifa_addr.is_null()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() {
                found = Some(ip);
                break;
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: list came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(list) };
    found
}

// ---------------------------------------------------------------------------------
// Names

/// A DNS subdomain (RFC 1123), as Kubernetes requires of node, pod and namespace names.
fn check_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("{s:?} must be 1 to 253 characters"));
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{s:?} is not a DNS subdomain (lowercase letters, digits, '-' and '.')"
            ));
        }
    }
    Ok(())
}

/// A label value: at most 63 of letters, digits, `-`, `_`, `.`, starting and ending
/// alphanumeric (or empty).
fn check_label_value(v: &str) -> Result<(), String> {
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!("{v:?} is not a valid label value"))
    }
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain, the name as a value but
/// not empty.
fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        check_subdomain(p)?;
    }
    if name.is_empty() {
        return Err(format!("{k:?} has an empty name"));
    }
    check_label_value(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: &str, containers: Vec<ContainerReport>, error: Option<&str>) -> PodReport {
        // Through serde: fields the reconciler adds for others default.
        serde_json::from_value(json!({
            "file": "api/default_web.yaml", "name": "web", "namespace": "default",
            "uid": "u", "state": state, "error": error, "containers": containers,
        }))
        .unwrap()
    }

    fn ctr(name: &str, init: bool, state: &str, ready: bool) -> ContainerReport {
        ContainerReport {
            name: name.into(),
            init,
            state: state.into(),
            restarts: 2,
            exit_code: (state == "exited").then_some(3),
            last_error: None,
            ready,
        }
    }

    fn known() -> Known {
        Known {
            namespace: "default".into(),
            name: "web".into(),
            uid: "1234".into(),
            images: [("main".to_string(), "edge.local/hello:1".to_string())].into(),
            deleting: false,
            host_network: true,
        }
    }

    #[test]
    fn a_running_pod_reports_running_ready_containers() {
        let r = report(
            "running",
            vec![
                ctr("setup", true, "completed", false),
                ctr("main", false, "running", true),
            ],
            None,
        );
        let s = pod_status(&r, &known(), None);
        assert_eq!(s["phase"], "Running");
        let conds = s["conditions"].as_array().unwrap();
        for kind in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            let c = conds.iter().find(|c| c["type"] == kind).unwrap();
            assert_eq!(c["status"], "True", "{kind}");
        }
        assert_eq!(s["containerStatuses"][0]["state"], json!({"running": {}}));
        assert_eq!(s["containerStatuses"][0]["image"], "edge.local/hello:1");
        assert_eq!(s["containerStatuses"][0]["restartCount"], 2);
        assert_eq!(
            s["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );
        let ip = Ipv4Addr::new(192, 0, 2, 7);
        let s = pod_status(&r, &known(), Some(ip));
        assert_eq!(
            (s["hostIP"].as_str(), s["podIP"].as_str()),
            (Some("192.0.2.7"), Some("192.0.2.7"))
        );
        let own_network = Known {
            host_network: false,
            ..known()
        };
        assert!(pod_status(&r, &own_network, Some(ip))["podIP"].is_null());
    }

    #[test]
    fn a_refused_manifest_stays_pending_with_the_field_named() {
        let r = report(
            "invalid",
            vec![],
            Some("/var/lib/edge/noded/apiserver/pods/default_web.yaml: spec.affinity is not supported yet"),
        );
        let s = pod_status(&r, &known(), None);
        assert_eq!(s["phase"], "Pending");
        assert_eq!(s["message"], "spec.affinity is not supported yet");
        let ready = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "ManifestRefused");
    }

    #[test]
    fn crash_looping_and_exited_containers() {
        let mut c = ctr("main", false, "back-off", false);
        c.last_error = Some("exited with 3".into());
        let s = pod_status(&report("running", vec![c], None), &known(), None);
        assert_eq!(
            s["containerStatuses"][0]["state"]["waiting"]["reason"],
            "CrashLoopBackOff"
        );
        assert_eq!(s["conditions"][3]["status"], "False");
        let s = pod_status(
            &report("failed", vec![ctr("main", false, "exited", false)], None),
            &known(),
            None,
        );
        assert_eq!(s["phase"], "Failed");
        assert_eq!(
            s["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            3
        );
    }

    #[test]
    fn transition_times_change_only_with_the_status() {
        let mut t = Times::default();
        let a = json!({"conditions": [{"type": "Ready", "status": "False"}]});
        let first = t.stamp("k", &a);
        t.transitions
            .get_mut(&("k".to_string(), "Ready".to_string()))
            .unwrap()
            .1 = "then".into();
        assert_eq!(
            t.stamp("k", &a)["conditions"][0]["lastTransitionTime"],
            "then"
        );
        let b = json!({"conditions": [{"type": "Ready", "status": "True"}]});
        assert_ne!(
            t.stamp("k", &b)["conditions"][0]["lastTransitionTime"],
            "then"
        );
        assert_eq!(first["startTime"], t.stamp("k", &b)["startTime"]);
    }

    #[test]
    fn times_are_in_kubernetes_formats() {
        let t = time_now();
        assert_eq!((t.len(), &t[10..11], &t[19..]), (20, "T", "Z"), "{t}");
        let m = micro_now();
        let m = m.as_str().unwrap();
        assert_eq!((m.len(), &m[19..20], &m[26..]), (27, ".", "Z"), "{m}");
        assert!(m[20..26].bytes().all(|b| b.is_ascii_digit()), "{m}");
    }

    #[test]
    fn names_that_could_reach_a_path_are_refused() {
        for bad in ["", "..", "a/b", "a_b", "A", "-a", ".a"] {
            assert!(check_subdomain(bad).is_err(), "{bad}");
        }
        for good in ["a", "web-1", "a.b.c", "0"] {
            assert!(check_subdomain(good).is_ok(), "{good}");
        }
        assert!(check_label_key("example.com/role").is_ok());
        assert!(check_label_key("example.com/").is_err());
        assert!(check_label_value("site-7_a.b").is_ok());
        assert!(check_label_value("-x").is_err());
    }
}
