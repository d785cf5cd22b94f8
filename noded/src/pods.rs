//! The static-pod reconciler: makes containerd run exactly the pods whose manifests are in
//! the manifests directory. It owns each pod's life through CRI (images pulled, sandbox,
//! init containers in order, app containers restarted per policy with back-off, graceful
//! stop when the manifest goes), the pods' emptyDir directories, and the status report
//! the control socket serves.
//!
//! Pods survive a noded restart: each sandbox carries the manifest file and a hash of
//! it as labels, and a new noded adopts a running sandbox whose hash still matches
//! instead of recreating it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::cri::{api::*, Client};
use crate::logs;
use crate::manifest::{self, Container, Pod, VolumeSource};
use crate::probes::{self, Prober};
use crate::volumes::Volumes;

const LABEL_MANAGED: &str = "io.edgeos.managed-by";
const LABEL_FILE: &str = "io.edgeos.pod-file";
const LABEL_HASH: &str = "io.edgeos.pod-hash";
const MANAGER: &str = "noded";

/// Kubelet's ceiling for the crash-loop back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The delay before the next start of a container that has been restarted `restarts`
/// times: `base`, doubling per restart, at most [`BACKOFF_MAX`] (kubelet: 10 s … 5 min).
pub fn backoff(base: Duration, restarts: u32) -> Duration {
    edge_common::Backoff::after(base, BACKOFF_MAX, restarts)
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub manifests_dir: PathBuf,
    /// Pod manifests the core delivers (fabricd's `<downlink dir>/pods`), reconciled
    /// like `manifests_dir`; their files are known as `downlink/<name>`.
    pub downlink_manifests_dir: Option<PathBuf>,
    /// Pod manifests provisioned for the site (init unpacks the bundle's `pods/` there),
    /// reconciled the same way; their files are known as `site/<name>`.
    pub site_manifests_dir: Option<PathBuf>,
    /// The pods bound to this node on the Kubernetes API server, as the apiserver module
    /// mirrors them; their files are known as `api/<namespace>_<name>.yaml`.
    pub api_manifests_dir: Option<PathBuf>,
    /// Pod log directories are `<log_dir>/<namespace>_<name>_<uid>/`.
    pub log_dir: PathBuf,
    /// emptyDir volumes live under `<state_dir>/pods/<uid>/volumes/`.
    pub state_dir: PathBuf,
    pub backoff_base: Duration,
    /// A container's live log is rotated when it grows past this.
    pub log_max_bytes: u64,
    /// Log files kept per container attempt, the live one included (at least 2).
    pub log_max_files: usize,
    /// When set, a pod starts only if each of its images is on the allowlist.
    pub image_policy: Option<crate::policy::Policy>,
    /// storaged's CSI socket, for pods' `csi` volumes; without it they are refused.
    pub csi_socket: Option<PathBuf>,
}

/// What `{"op":"pods"}` answers, one per manifest file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PodReport {
    pub file: String,
    pub name: String,
    pub namespace: String,
    /// The pod's uid (its manifest hash): names its log directory.
    #[serde(default)]
    pub uid: String,
    /// pending, initializing, running, succeeded, failed, invalid
    pub state: String,
    pub error: Option<String>,
    pub containers: Vec<ContainerReport>,
    /// Its last start was refused because an image is not on the allowlist (for the
    /// metrics; `error` says which).
    #[serde(skip)]
    pub image_refused: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContainerReport {
    pub name: String,
    pub init: bool,
    /// waiting, running, back-off, exited, completed
    pub state: String,
    pub restarts: u32,
    pub exit_code: Option<i32>,
    pub last_error: Option<String>,
    /// Running and, if it has a readiness probe, passing it (after its startup probe).
    #[serde(default)]
    pub ready: bool,
}

impl PodReport {
    /// Running with every container ready, or run to completion.
    pub fn is_up(&self) -> bool {
        self.state == "succeeded"
            || (self.state == "running" && self.containers.iter().all(|c| c.init || c.ready))
    }
}

pub type Status = Arc<Mutex<Vec<PodReport>>>;

/// A file a manifests directory's pod comes from: `*.yaml` or `*.yml`, not a dot file
/// (fabricd's partial downloads, editors' temporary files).
pub fn is_manifest_file(name: &str) -> bool {
    (name.ends_with(".yaml") || name.ends_with(".yml")) && !name.starts_with('.')
}

/// Whether every pod of the image's own manifests (`files`, the static directory's
/// manifest files) is up: a box whose static pods do not run is not healthy.
pub fn static_pods_up(files: &[String], reports: &[PodReport]) -> Result<(), String> {
    let down: Vec<&str> = files
        .iter()
        .filter(|f| !reports.iter().any(|r| &r.file == *f && r.is_up()))
        .map(String::as_str)
        .collect();
    match down.as_slice() {
        [] => Ok(()),
        d => Err(format!("not up: {}", d.join(", "))),
    }
}

pub struct Reconciler {
    ctx: Ctx,
    settings: Arc<Settings>,
    /// The pods no step is running for.
    pods: BTreeMap<String, PodRun>,
    /// The pods a step is running for (their `PodRun` is in that step's task).
    busy: BTreeMap<String, Busy>,
    /// Serials of busy pods whose manifest went or changed: torn down when their step
    /// returns.
    doomed: BTreeSet<u64>,
    /// One task per busy pod, returning it when its step is done.
    steps: tokio::task::JoinSet<(String, PodRun)>,
    /// Permits for steps: at most [`STEPS_AT_ONCE`] run, the rest wait their turn.
    turns: Arc<tokio::sync::Semaphore>,
    /// file → what is wrong with a manifest that was not taken; logged once per version.
    invalid: BTreeMap<String, Invalid>,
    status: Status,
    adopted: bool,
}

/// What the reconciler knows of a pod while its step runs.
struct Busy {
    serial: u64,
    source: String,
    hash: String,
    name: String,
    namespace: String,
    /// Its report when the step began, until the step publishes a newer one.
    report: PodReport,
}

/// Set when a pass begins; when the last step that pass started has ended, the pass's
/// duration goes to the metrics.
struct Pass(Instant);

impl Drop for Pass {
    fn drop(&mut self) {
        crate::metrics::pass_took(self.0.elapsed());
    }
}

/// What stepping a pod needs, shared by the tasks that step pods at the same time.
#[derive(Clone)]
struct Ctx {
    cri: Client,
    settings: Arc<Settings>,
    volumes: Arc<Volumes>,
}

/// How many pods are stepped at once: starting one is mostly waiting for containerd
/// and storaged, but each start also costs them CPU, which the appliance has little of.
const STEPS_AT_ONCE: usize = 4;

struct Invalid {
    hash: String,
    error: String,
    /// Refused because another file defines the same pod: looked at again each pass,
    /// since that may change while this file does not.
    duplicate: bool,
}

/// A manifest file found by a scan.
struct Scanned {
    /// The file's path, for messages.
    path: String,
    hash: String,
    text: String,
}

/// The key under which files of the downlink directory are known (status, labels).
const DOWNLINK_PREFIX: &str = "downlink/";
/// The key under which files of the site's provisioned directory are known.
const SITE_PREFIX: &str = "site/";
/// The key under which the Kubernetes API server's pods (its cache directory) are known.
pub const API_PREFIX: &str = "api/";

/// Which source wins when two define a pod in the same pass: the image's, then the
/// site's, then the core's, then the API server's.
fn source_rank(key: &str) -> u8 {
    if key.starts_with(API_PREFIX) {
        3
    } else if key.starts_with(DOWNLINK_PREFIX) {
        2
    } else if key.starts_with(SITE_PREFIX) {
        1
    } else {
        0
    }
}

struct PodRun {
    /// Unique in this process: tells this run from a later one of the same manifest.
    serial: u64,
    file: String,
    /// The manifest's path, for messages.
    source: String,
    hash: String,
    pod: Pod,
    sandbox: Option<String>,
    error: Option<String>,
    failures: u32,
    retry_at: Instant,
    containers: Vec<Ctr>,
    failed: bool,
    /// Where HTTP and TCP probes go: the sandbox's IP, 127.0.0.1 on the host network.
    ip: Option<String>,
    /// The last start failed on the image allowlist.
    image_refused: bool,
}

struct Ctr {
    spec: Container,
    init: bool,
    id: Option<String>,
    /// The exited container a restart replaces.
    dead: Option<String>,
    /// CRI attempt number of the next container created; unique per sandbox.
    attempt: u32,
    restarts: u32,
    state: &'static str,
    exit_code: Option<i32>,
    last_error: Option<String>,
    next_start: Instant,
    done: bool,
    /// The running container's probes, if it has any.
    prober: Option<Prober>,
    /// Why the running container is being stopped by us (a failed probe).
    killing: Option<String>,
}

impl Reconciler {
    pub fn new(cri: Client, settings: Settings, status: Status) -> Self {
        let volumes = Arc::new(Volumes::new(
            settings.csi_socket.clone(),
            settings.state_dir.clone(),
        ));
        let settings = Arc::new(settings);
        Reconciler {
            ctx: Ctx {
                cri,
                settings: settings.clone(),
                volumes,
            },
            settings,
            pods: BTreeMap::new(),
            busy: BTreeMap::new(),
            doomed: BTreeSet::new(),
            steps: tokio::task::JoinSet::new(),
            turns: Arc::new(tokio::sync::Semaphore::new(STEPS_AT_ONCE)),
            invalid: BTreeMap::new(),
            status,
            adopted: false,
        }
    }

    /// Reconciles every `period` forever.
    pub async fn run(mut self, period: Duration) {
        loop {
            self.tick().await;
            tokio::time::sleep(period).await;
        }
    }

    /// One pass: take back the pods whose step ended, rescan the manifests, adopt (first
    /// pass), stop what went, take in what is new, and begin a step (start, poll,
    /// restart) for every pod not in one. Returns without waiting for the steps.
    pub async fn tick(&mut self) {
        let pass = Arc::new(Pass(Instant::now()));
        self.collect();
        let scanned = self.scan();
        if !self.adopted {
            match self.adopt(&scanned).await {
                Ok(()) => self.adopted = true,
                Err(e) => tracing::warn!("could not list pods to adopt: {e}"),
            }
        }
        // Pods whose manifest went away or changed stop first.
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(file, run)| scanned.get(*file).is_none_or(|f| f.hash != run.hash))
            .map(|(f, _)| f.clone())
            .collect();
        for file in gone {
            if let Some(run) = self.pods.remove(&file) {
                tracing::info!(pod = %run.pod.name, file = %file, "manifest removed or changed: stopping the pod");
                self.stop(run);
            }
        }
        // A pod in the middle of a step is stopped when the step returns: its sandbox
        // may be being made right now.
        let gone: Vec<String> = self
            .busy
            .iter()
            .filter(|(file, b)| scanned.get(*file).is_none_or(|f| f.hash != b.hash))
            .map(|(f, _)| f.clone())
            .collect();
        for file in gone {
            if let Some(b) = self.busy.remove(&file) {
                tracing::info!(pod = %b.name, file = %file, "manifest removed or changed: stopping the pod when its current step ends");
                self.doomed.insert(b.serial);
            }
        }
        self.invalid.retain(|f, _| scanned.contains_key(f));
        // Static manifests first, then the site's, then the core's: when two sources
        // define a pod in the same pass, the earlier one runs and the later is refused. A pod already running
        // always keeps running.
        let mut ordered: Vec<(&String, &Scanned)> = scanned.iter().collect();
        ordered.sort_by_key(|(f, _)| source_rank(f));
        for (file, found) in ordered {
            if self.pods.contains_key(file) || self.busy.contains_key(file) {
                continue;
            }
            let known = self.invalid.get(file).filter(|i| i.hash == found.hash);
            if known.is_some_and(|i| !i.duplicate) {
                continue;
            }
            let source = &found.path;
            let mut duplicate = false;
            let parsed = manifest::parse(source, &found.text).and_then(|pod| {
                let idle = self
                    .pods
                    .values()
                    .find(|r| r.pod.name == pod.name && r.pod.namespace == pod.namespace)
                    .map(|r| &r.source);
                let busy = self
                    .busy
                    .values()
                    .find(|b| b.name == pod.name && b.namespace == pod.namespace)
                    .map(|b| &b.source);
                match idle.or(busy) {
                    Some(other) => {
                        duplicate = true;
                        Err(format!(
                            "{source}: metadata.name: pod {}/{} is already defined by {other}",
                            pod.namespace, pod.name
                        ))
                    }
                    None => Ok(pod),
                }
            });
            match parsed {
                Ok(pod) => {
                    self.invalid.remove(file);
                    tracing::info!(pod = %pod.name, file = %file, "new pod");
                    self.pods.insert(
                        file.clone(),
                        PodRun::new(file.clone(), source.clone(), found.hash.clone(), pod),
                    );
                }
                Err(e) => {
                    if known.is_none_or(|i| i.error != e) {
                        tracing::error!("rejected pod manifest: {e}");
                    }
                    self.invalid.insert(
                        file.clone(),
                        Invalid {
                            hash: found.hash.clone(),
                            error: e,
                            duplicate,
                        },
                    );
                }
            }
        }
        // New pods show as pending now, not once they have started.
        self.publish();
        // Every pod not in a step gets one, in its own task (so never two at once); at
        // most STEPS_AT_ONCE run, the rest wait for a turn. Each step publishes its
        // pod's report as it ends, and the pass does not wait for them: a pod whose
        // image pull or volume takes long holds up neither the others (their next
        // steps come a pass later as usual) nor the status.
        for (file, mut run) in std::mem::take(&mut self.pods) {
            self.busy.insert(
                file.clone(),
                Busy {
                    serial: run.serial,
                    source: run.source.clone(),
                    hash: run.hash.clone(),
                    name: run.pod.name.clone(),
                    namespace: run.pod.namespace.clone(),
                    report: run.report(),
                },
            );
            let (ctx, status) = (self.ctx.clone(), self.status.clone());
            let (turns, pass) = (self.turns.clone(), pass.clone());
            self.steps.spawn(async move {
                let _turn = turns.acquire_owned().await;
                ctx.step(&mut run).await;
                ctx.rotate_logs(&run).await;
                update_report(&status, run.report());
                drop(pass);
                (file, run)
            });
        }
    }

    /// Takes back the pods whose step has ended; those whose manifest went meanwhile
    /// are stopped now.
    fn collect(&mut self) {
        while let Some(done) = self.steps.try_join_next() {
            match done {
                Ok((file, run)) => {
                    if self.doomed.remove(&run.serial) {
                        self.stop(run);
                    } else {
                        self.busy.remove(&file);
                        self.pods.insert(file, run);
                    }
                }
                // A step that panicked lost its pod's state: panic as a pass that
                // panicked did before, rather than forget a pod whose sandbox may run.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => tracing::error!("a pod's step was cancelled: {e}"),
            }
        }
    }

    /// Stops and removes a pod in the background.
    fn stop(&self, run: PodRun) {
        let cri = self.ctx.cri.clone();
        let settings = self.settings.clone();
        let volumes = self.ctx.volumes.clone();
        tokio::spawn(async move { teardown(&cri, &settings, &volumes, run).await });
    }

    /// Manifest files of all sources by key (the file name; `site/<name>` and
    /// `downlink/<name>` for those directories'), with their hash and text. Unreadable
    /// files and directories are logged and their pods, if any, keep their last state
    /// until they read again; a site or downlink directory that does not exist (yet)
    /// has no pods.
    fn scan(&self) -> BTreeMap<String, Scanned> {
        let mut out = BTreeMap::new();
        self.scan_dir(&self.settings.manifests_dir, "", &mut out);
        if let Some(dir) = &self.settings.site_manifests_dir {
            self.scan_dir(dir, SITE_PREFIX, &mut out);
        }
        if let Some(dir) = &self.settings.downlink_manifests_dir {
            self.scan_dir(dir, DOWNLINK_PREFIX, &mut out);
        }
        if let Some(dir) = &self.settings.api_manifests_dir {
            self.scan_dir(dir, API_PREFIX, &mut out);
        }
        out
    }

    fn scan_dir(&self, dir: &Path, prefix: &str, out: &mut BTreeMap<String, Scanned>) {
        // File names have no '/': only the other sources' keys do.
        let ours = |key: &String| match prefix {
            "" => !key.contains('/'),
            p => key.starts_with(p),
        };
        let keep = |out: &mut BTreeMap<String, Scanned>, key: &String, source: &str, hash: &str| {
            out.insert(
                key.clone(),
                Scanned {
                    path: source.to_string(),
                    hash: hash.to_string(),
                    text: String::new(),
                },
            );
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !prefix.is_empty() => return,
            Err(e) => {
                tracing::warn!("failed to read manifests directory {}: {e}", dir.display());
                for (key, run) in self.pods.iter().filter(|(k, _)| ours(k)) {
                    keep(out, key, &run.source, &run.hash);
                }
                for (key, b) in self.busy.iter().filter(|(k, _)| ours(k)) {
                    keep(out, key, &b.source, &b.hash);
                }
                return;
            }
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !is_manifest_file(&name) {
                continue;
            }
            let key = format!("{prefix}{name}");
            match std::fs::read_to_string(entry.path()) {
                Ok(text) => {
                    let hash = manifest_hash(&key, &text);
                    let path = entry.path().display().to_string();
                    out.insert(key, Scanned { path, hash, text });
                }
                Err(e) => {
                    tracing::warn!("failed to read {}: {e}", entry.path().display());
                    if let Some(run) = self.pods.get(&key) {
                        keep(out, &key, &run.source, &run.hash);
                    } else if let Some(b) = self.busy.get(&key) {
                        keep(out, &key, &b.source, &b.hash);
                    }
                }
            }
        }
    }

    /// Takes over the sandboxes an earlier noded left running. One whose manifest is
    /// unchanged keeps running with its containers; the rest are stopped and removed.
    async fn adopt(&mut self, scanned: &BTreeMap<String, Scanned>) -> Result<(), String> {
        let listed = self
            .ctx
            .cri
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: [(LABEL_MANAGED.to_string(), MANAGER.to_string())].into(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|e| e.to_string())?;
        for sb in listed.items {
            let file = sb.labels.get(LABEL_FILE).cloned().unwrap_or_default();
            let hash = sb.labels.get(LABEL_HASH).cloned().unwrap_or_default();
            let ready = sb.state == PodSandboxState::SandboxReady as i32;
            let matching = scanned
                .get(&file)
                .filter(|f| f.hash == hash && ready && !self.pods.contains_key(&file));
            let pod = matching.and_then(|f| {
                let pod = manifest::parse(&f.path, &f.text).ok()?;
                // Two files of one pod: only the first adopted keeps its sandbox.
                let taken = self
                    .pods
                    .values()
                    .any(|r| r.pod.name == pod.name && r.pod.namespace == pod.namespace);
                (!taken).then_some(pod)
            });
            let Some(pod) = pod else {
                if ready {
                    tracing::info!(sandbox = %sb.id, file = %file, "removing a pod left by an earlier noded whose manifest is gone or changed");
                } else {
                    // After a reboot or power cut every sandbox is here, with its
                    // processes gone; the pod starts again below if its manifest is.
                    tracing::info!(sandbox = %sb.id, file = %file, "removing a pod sandbox an earlier noded left that is no longer running");
                }
                stop_sandbox(&self.ctx.cri, &sb.id, &[], 0).await;
                continue;
            };
            let source = matching.map(|f| f.path.clone()).unwrap_or_default();
            let mut run = PodRun::new(file.clone(), source, hash, pod);
            run.sandbox = Some(sb.id.clone());
            let containers = self
                .ctx
                .cri
                .list_containers(ListContainersRequest {
                    filter: Some(ContainerFilter {
                        pod_sandbox_id: sb.id.clone(),
                        ..Default::default()
                    }),
                })
                .await
                .map_err(|e| e.to_string())?
                .containers;
            let app_started = containers.iter().any(|c| {
                let name = c.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("");
                run.containers
                    .iter()
                    .any(|r| !r.init && r.spec.name == name)
            });
            for ctr in &mut run.containers {
                let latest = containers
                    .iter()
                    .filter_map(|c| c.metadata.as_ref().map(|m| (m, c)))
                    .filter(|(m, _)| m.name == ctr.spec.name)
                    .max_by_key(|(m, _)| m.attempt);
                if ctr.init && app_started {
                    ctr.done = true;
                    ctr.state = "completed";
                    ctr.exit_code = Some(0);
                }
                if let Some((m, c)) = latest {
                    ctr.attempt = m.attempt + 1;
                    ctr.restarts = m.attempt;
                    if !ctr.done {
                        ctr.id = Some(c.id.clone());
                    }
                }
            }
            self.ctx.volumes.adopt(&run.hash, &run.pod).await;
            tracing::info!(pod = %run.pod.name, file = %file, sandbox = %sb.id, "adopted a running pod");
            self.pods.insert(file, run);
        }
        // Volumes still published for pods that went while no noded watched (their
        // sandboxes were just removed, or a reboot took them): released in the
        // background, like any other pod's after its teardown.
        let live: BTreeSet<String> = scanned.values().map(|f| f.hash.clone()).collect();
        for (uid, pod) in self.ctx.volumes.orphans(&live).await {
            tracing::info!(pod = %pod, uid = %uid, "releasing the csi volumes of a pod that is gone");
            let volumes = self.ctx.volumes.clone();
            let base = self.settings.backoff_base;
            tokio::spawn(
                async move { volumes.detach_retrying(&uid, &pod, base, BACKOFF_MAX).await },
            );
        }
        Ok(())
    }
}

impl Ctx {
    async fn step(&self, run: &mut PodRun) {
        if run.failed {
            return;
        }
        let now = Instant::now();
        let sandbox = match &run.sandbox {
            Some(id) => {
                // A sandbox that died under us (containerd restarted, pause killed) is
                // recreated with all its containers, as kubelet does.
                match self
                    .cri
                    .pod_sandbox_status(PodSandboxStatusRequest {
                        pod_sandbox_id: id.clone(),
                        verbose: false,
                    })
                    .await
                {
                    Ok(s)
                        if s.status
                            .as_ref()
                            .is_some_and(|s| s.state == PodSandboxState::SandboxReady as i32) =>
                    {
                        if run.ip.is_none() {
                            run.ip = pod_ip(&run.pod, s.status.as_ref());
                        }
                        id.clone()
                    }
                    // containerd itself is away: wait for it rather than duplicate the pod.
                    Err(e) if e.code() != tonic::Code::NotFound => {
                        tracing::warn!(pod = %run.pod.name, "{e}");
                        return;
                    }
                    _ => {
                        tracing::warn!(pod = %run.pod.name, sandbox = %id, "pod sandbox is gone or not ready: recreating it");
                        stop_sandbox(&self.cri, id, &[], 0).await;
                        run.reset();
                        run.retry_at = now + backoff(self.settings.backoff_base, run.failures);
                        run.failures += 1;
                        return;
                    }
                }
            }
            None => {
                if now < run.retry_at {
                    return;
                }
                match self.start_sandbox(run).await {
                    Ok(id) => {
                        tracing::info!(pod = %run.pod.name, sandbox = %id, "pod sandbox running");
                        run.ip = match self
                            .cri
                            .pod_sandbox_status(PodSandboxStatusRequest {
                                pod_sandbox_id: id.clone(),
                                verbose: false,
                            })
                            .await
                        {
                            Ok(s) => pod_ip(&run.pod, s.status.as_ref()),
                            Err(_) => pod_ip(&run.pod, None),
                        };
                        run.sandbox = Some(id.clone());
                        run.error = None;
                        run.image_refused = false;
                        run.failures = 0;
                        id
                    }
                    Err(StartError {
                        message: e,
                        image_refused,
                    }) => {
                        tracing::error!(pod = %run.pod.name, file = %run.file, "pod failed to start: {e}");
                        run.error = Some(e);
                        run.image_refused = image_refused;
                        run.retry_at = now + backoff(self.settings.backoff_base, run.failures);
                        run.failures += 1;
                        return;
                    }
                }
            }
        };
        let config = self.sandbox_config(run);
        let policy = run.pod.restart_policy;
        for i in 0..run.containers.len() {
            let init = run.containers[i].init;
            // Init containers run one at a time, in order, each to success.
            if !init && run.containers[..i].iter().any(|c| c.init && !c.done) {
                break;
            }
            let ctr = &mut run.containers[i];
            if ctr.done {
                continue;
            }
            self.drive(&run.pod, &sandbox, &config, ctr, policy, run.ip.as_deref())
                .await;
            if ctr.init && ctr.done && ctr.exit_code != Some(0) {
                run.failed = true;
                run.error = Some(format!(
                    "init container {} failed with exit code {:?}",
                    ctr.spec.name, ctr.exit_code
                ));
                tracing::error!(pod = %run.pod.name, "{}", run.error.as_deref().unwrap_or(""));
                return;
            }
            if init && !run.containers[i].done {
                break;
            }
        }
    }

    /// Starts, polls or restarts one container.
    async fn drive(
        &self,
        pod: &Pod,
        sandbox: &str,
        config: &PodSandboxConfig,
        ctr: &mut Ctr,
        policy: manifest::RestartPolicy,
        ip: Option<&str>,
    ) {
        let now = Instant::now();
        let Some(id) = ctr.id.clone() else {
            if now < ctr.next_start {
                ctr.state = "back-off";
                return;
            }
            match self.start_container(pod, sandbox, config, ctr).await {
                Ok(id) => {
                    tracing::info!(pod = %pod.name, container = %ctr.spec.name, attempt = ctr.attempt, "container started");
                    ctr.prober = self.prober(pod, ctr, &id, ip, now);
                    ctr.id = Some(id);
                    ctr.state = "running";
                    if let Some(dead) = ctr.dead.take() {
                        if let Err(e) = self
                            .cri
                            .remove_container(RemoveContainerRequest { container_id: dead })
                            .await
                        {
                            tracing::warn!(pod = %pod.name, container = %ctr.spec.name, "{e}");
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(pod = %pod.name, container = %ctr.spec.name, "container failed to start: {e}");
                    ctr.last_error = Some(e);
                    ctr.state = "back-off";
                    ctr.next_start = now + backoff(self.settings.backoff_base, ctr.restarts);
                    ctr.restarts += 1;
                }
            }
            ctr.attempt += 1;
            return;
        };
        let status = self
            .cri
            .container_status(ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await;
        let (exit_code, reason) = match status {
            Ok(r) => match r.status {
                Some(s) if s.state == ContainerState::ContainerExited as i32 => {
                    let why = [s.reason, s.message]
                        .into_iter()
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                        .join(": ");
                    (s.exit_code, why)
                }
                Some(s) if s.state == ContainerState::ContainerUnknown as i32 => {
                    (-1, "container state unknown".to_string())
                }
                _ => {
                    ctr.state = "running";
                    self.watch_probes(pod, ctr, &id, ip, now);
                    return;
                }
            },
            Err(e) if e.code() == tonic::Code::NotFound => (-1, format!("container vanished: {e}")),
            Err(e) => {
                tracing::warn!(pod = %pod.name, container = %ctr.spec.name, "{e}");
                return;
            }
        };
        ctr.exit_code = Some(exit_code);
        ctr.prober = None;
        if let Some(why) = ctr.killing.take() {
            ctr.last_error = Some(format!("{why} (stopped, exit code {exit_code})"));
        } else if exit_code != 0 {
            ctr.last_error = Some(if reason.is_empty() {
                format!("exited with code {exit_code}")
            } else {
                format!("exited with code {exit_code} ({reason})")
            });
        }
        let again = if ctr.init {
            exit_code != 0 && policy != manifest::RestartPolicy::Never
        } else {
            policy.restarts(exit_code)
        };
        if !again {
            tracing::info!(pod = %pod.name, container = %ctr.spec.name, exit_code, "container exited; not restarted (restartPolicy)");
            ctr.done = true;
            ctr.state = if exit_code == 0 {
                "completed"
            } else {
                "exited"
            };
            return;
        }
        let delay = backoff(self.settings.backoff_base, ctr.restarts);
        tracing::info!(pod = %pod.name, container = %ctr.spec.name, exit_code, restarts = ctr.restarts + 1, "container exited; restarting in {delay:?}");
        // The exited container stays until its successor starts: its attempt number
        // is what a restarted noded counts restarts from.
        ctr.dead = Some(id);
        ctr.id = None;
        ctr.restarts += 1;
        ctr.next_start = now + delay;
        ctr.state = "back-off";
    }

    /// The probes of a container just started (or adopted), if it has any.
    fn prober(
        &self,
        pod: &Pod,
        ctr: &Ctr,
        id: &str,
        ip: Option<&str>,
        started: Instant,
    ) -> Option<Prober> {
        if !probes::has_probes(&ctr.spec) {
            return None;
        }
        let target = probes::Target {
            cri: self.cri.clone(),
            container_id: id.to_string(),
            ip: ip.unwrap_or("127.0.0.1").to_string(),
            pod: pod.name.clone(),
            container: ctr.spec.name.clone(),
        };
        Some(Prober::start(target, &ctr.spec, started))
    }

    /// A running container whose startup or liveness probe failed is stopped with the
    /// pod's grace period; its exit then takes the restart path like any other.
    fn watch_probes(&self, pod: &Pod, ctr: &mut Ctr, id: &str, ip: Option<&str>, now: Instant) {
        if ctr.prober.is_none() && ctr.killing.is_none() {
            // Adopted from an earlier noded: probing starts over.
            ctr.prober = self.prober(pod, ctr, id, ip, now);
        }
        let Some(failed) = ctr.prober.as_ref().and_then(|p| p.health().failed) else {
            return;
        };
        if ctr.killing.is_some() {
            return;
        }
        let grace = pod.termination_grace_period_seconds;
        tracing::warn!(pod = %pod.name, container = %ctr.spec.name, "{failed}: stopping the container (grace period {grace} s)");
        ctr.last_error = Some(failed.clone());
        ctr.killing = Some(failed);
        let cri = self.cri.clone();
        let (id, pod_name, name) = (id.to_string(), pod.name.clone(), ctr.spec.name.clone());
        // A grace period of up to minutes must not hold up the other pods.
        tokio::spawn(async move {
            if let Err(e) = cri
                .stop_container(StopContainerRequest {
                    container_id: id,
                    timeout: grace,
                })
                .await
            {
                tracing::warn!(pod = %pod_name, container = %name, "{e}");
            }
        });
    }

    /// Rotates the live logs of the pod's running containers that grew past the limit.
    async fn rotate_logs(&self, run: &PodRun) {
        let dir = self.log_dir(run);
        for ctr in &run.containers {
            let Some(id) = &ctr.id else { continue };
            let current = ctr.attempt.saturating_sub(1);
            let cdir = dir.join(&ctr.spec.name);
            if current >= 2 {
                if let Err(e) = logs::remove_attempts_before(&cdir, current - 1) {
                    tracing::warn!(pod = %run.pod.name, container = %ctr.spec.name, "failed to delete old attempts' logs in {}: {e}", cdir.display());
                }
            }
            let live = cdir.join(format!("{current}.log"));
            let rotated = match logs::rotate_if_over(&live, self.settings.log_max_bytes) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(pod = %run.pod.name, container = %ctr.spec.name, "failed to rotate {}: {e}", live.display());
                    continue;
                }
            };
            if let Err(e) = self
                .cri
                .reopen_container_log(ReopenContainerLogRequest {
                    container_id: id.clone(),
                })
                .await
            {
                // The runtime still writes to the renamed file: put it back, so the
                // live path and the lines stay together.
                tracing::warn!(pod = %run.pod.name, container = %ctr.spec.name, "log not rotated: {e}");
                if let Err(e) = logs::unrotate(&rotated, &live) {
                    tracing::warn!("failed to rename {} back: {e}", rotated.display());
                }
                continue;
            }
            tracing::debug!(pod = %run.pod.name, container = %ctr.spec.name, to = %rotated.display(), "log rotated");
            match logs::prune(&live, self.settings.log_max_files.saturating_sub(1)) {
                Ok(removed) => {
                    for r in removed {
                        tracing::debug!(pod = %run.pod.name, "old log {} deleted", r.display());
                    }
                }
                Err(e) => {
                    tracing::warn!(pod = %run.pod.name, container = %ctr.spec.name, "failed to delete old logs of {}: {e}", live.display())
                }
            }
        }
    }

    async fn start_sandbox(&self, run: &PodRun) -> Result<String, StartError> {
        let uid = &run.hash;
        let log_dir = self.log_dir(run);
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| format!("failed to create {}: {e}", log_dir.display()))?;
        for v in &run.pod.volumes {
            match &v.source {
                VolumeSource::EmptyDir => {
                    let d = self.empty_dir(uid, &v.name);
                    std::fs::create_dir_all(&d).map_err(|e| {
                        format!("volume {}: failed to create {}: {e}", v.name, d.display())
                    })?;
                }
                VolumeSource::HostPath { path, create: true } => {
                    std::fs::create_dir_all(path).map_err(|e| {
                        format!(
                            "volume {}: failed to create {}: {e}",
                            v.name,
                            path.display()
                        )
                    })?;
                }
                VolumeSource::HostPath { .. } | VolumeSource::Csi(_) => {}
            }
        }
        let mut images: Vec<&str> = run
            .pod
            .init_containers
            .iter()
            .chain(&run.pod.containers)
            .map(|c| c.image.as_str())
            .collect();
        images.sort();
        images.dedup();
        for image in images {
            self.cri
                .pull_image(PullImageRequest {
                    image: Some(ImageSpec {
                        image: image.to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("image {image}: {e}"))?;
            if let Some(policy) = &self.settings.image_policy {
                let status = self
                    .cri
                    .image_status(ImageStatusRequest {
                        image: Some(ImageSpec {
                            image: image.to_string(),
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await
                    .map_err(|e| format!("image {image}: {e}"))?;
                let found = status.image.ok_or_else(|| {
                    format!("image {image}: the runtime does not know it after the pull")
                })?;
                policy
                    .check(
                        image,
                        &crate::policy::image_digests(&found.repo_digests, &found.id),
                    )
                    .map_err(|message| StartError {
                        message,
                        image_refused: true,
                    })?;
            }
        }
        // After the image checks: a pod refused for its images provisions nothing.
        self.volumes.attach(uid, &run.pod).await?;
        let config = self.sandbox_config(run);
        Ok(self
            .cri
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                ..Default::default()
            })
            .await
            .map(|r| r.pod_sandbox_id)
            .map_err(|e| e.to_string())?)
    }

    fn log_dir(&self, run: &PodRun) -> PathBuf {
        pod_log_dir(&self.settings.log_dir, &run.pod, &run.hash)
    }

    fn empty_dir(&self, uid: &str, volume: &str) -> PathBuf {
        pod_state_dir(&self.settings.state_dir, uid)
            .join("volumes")
            .join(volume)
    }

    fn sandbox_config(&self, run: &PodRun) -> PodSandboxConfig {
        let pod = &run.pod;
        let mut labels: HashMap<String, String> = pod.labels.clone().into_iter().collect();
        labels.insert(LABEL_MANAGED.into(), MANAGER.into());
        labels.insert(LABEL_FILE.into(), run.file.clone());
        labels.insert(LABEL_HASH.into(), run.hash.clone());
        let network = if pod.host_network {
            NamespaceMode::Node
        } else {
            NamespaceMode::Pod
        };
        let port_mappings = pod
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .map(|p| PortMapping {
                protocol: match p.protocol {
                    manifest::Protocol::Tcp => Protocol::Tcp,
                    manifest::Protocol::Udp => Protocol::Udp,
                    manifest::Protocol::Sctp => Protocol::Sctp,
                } as i32,
                container_port: p.container_port,
                host_port: p.host_port.unwrap_or(0),
                host_ip: String::new(),
            })
            .collect();
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.clone(),
                uid: run.hash.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            // In the host's UTS namespace runc may not set a hostname; CRI allows it
            // empty in exactly that case.
            hostname: if pod.host_network {
                String::new()
            } else {
                pod.name.clone()
            },
            log_directory: self.log_dir(run).display().to_string(),
            port_mappings,
            labels,
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: network as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn start_container(
        &self,
        pod: &Pod,
        sandbox: &str,
        sandbox_config: &PodSandboxConfig,
        ctr: &Ctr,
    ) -> Result<String, String> {
        let c = &ctr.spec;
        let uid = sandbox_config
            .metadata
            .as_ref()
            .map(|m| m.uid.clone())
            .unwrap_or_default();
        let mounts = c
            .volume_mounts
            .iter()
            .filter_map(|m| {
                let v = pod.volumes.iter().find(|v| v.name == m.name)?;
                let (host, read_only) = match &v.source {
                    VolumeSource::EmptyDir => (self.empty_dir(&uid, &v.name), false),
                    VolumeSource::HostPath { path, .. } => (path.clone(), false),
                    VolumeSource::Csi(c) => (
                        self.volumes.target(&uid, &v.name),
                        c.read_only || c.access_mode == manifest::AccessMode::ReadOnlyMany,
                    ),
                };
                Some(Mount {
                    container_path: m.mount_path.clone(),
                    host_path: host.display().to_string(),
                    readonly: m.read_only || read_only,
                    ..Default::default()
                })
            })
            .collect();
        let config = ContainerConfig {
            devices: devices(pod, c, |name| self.volumes.target(&uid, name)),
            metadata: Some(ContainerMetadata {
                name: c.name.clone(),
                attempt: ctr.attempt,
            }),
            image: Some(ImageSpec {
                image: c.image.clone(),
                ..Default::default()
            }),
            command: c.command.clone(),
            args: c.args.clone(),
            envs: c
                .env
                .iter()
                .map(|(k, v)| KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts,
            log_path: format!("{}/{}.log", c.name, ctr.attempt),
            linux: Some(LinuxContainerConfig {
                resources: Some(resources(c)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.to_string(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await
            .map_err(|e| e.to_string())?
            .container_id;
        if let Err(e) = self
            .cri
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
        {
            let _ = self
                .cri
                .remove_container(RemoveContainerRequest { container_id: id })
                .await;
            return Err(e.to_string());
        }
        Ok(id)
    }
}

impl Reconciler {
    fn publish(&self) {
        let current = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        let mut reports: Vec<PodReport> = self.pods.values().map(PodRun::report).collect();
        // A busy pod's latest report is the one its step published, if it did.
        reports.extend(self.busy.iter().map(|(file, b)| {
            current
                .iter()
                .find(|r| r.file == *file && r.uid == b.hash)
                .cloned()
                .unwrap_or_else(|| b.report.clone())
        }));
        reports.extend(self.invalid.iter().map(|(file, i)| PodReport {
            file: file.clone(),
            name: String::new(),
            namespace: String::new(),
            uid: String::new(),
            state: "invalid".into(),
            error: Some(i.error.clone()),
            containers: Vec::new(),
            image_refused: false,
        }));
        reports.sort_by(|a, b| a.file.cmp(&b.file));
        if let Ok(mut s) = self.status.lock() {
            *s = reports;
        }
    }
}

/// Why a pod's sandbox did not start.
struct StartError {
    message: String,
    /// An image is not on the allowlist.
    image_refused: bool,
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        StartError {
            message,
            image_refused: false,
        }
    }
}

/// Replaces the report of one pod (same file and uid) in the published status; a pod
/// no longer there (its manifest went during the step) is not brought back.
fn update_report(status: &Status, report: PodReport) {
    let Ok(mut reports) = status.lock() else {
        return;
    };
    if let Some(r) = reports
        .iter_mut()
        .find(|r| r.file == report.file && r.uid == report.uid)
    {
        *r = report;
    }
}

/// The container's block volumes as CRI devices: each publish target is the volume's
/// device node (bind-mounted there by the CSI driver), which the runtime creates at
/// `devicePath` and allows in the device cgroup, read-only for a read-only volume.
fn devices(pod: &Pod, c: &Container, target: impl Fn(&str) -> PathBuf) -> Vec<Device> {
    c.volume_devices
        .iter()
        .filter_map(|d| {
            let v = pod.volumes.iter().find(|v| v.name == d.name)?;
            let VolumeSource::Csi(csi) = &v.source else {
                return None;
            };
            Some(Device {
                container_path: d.device_path.clone(),
                host_path: target(&v.name).display().to_string(),
                permissions: if csi.read_only { "r" } else { "rw" }.into(),
            })
        })
        .collect()
}

/// CPU limit → CFS quota per 100 ms period; memory limit → the cgroup's memory.max.
fn resources(c: &Container) -> LinuxContainerResources {
    const PERIOD: i64 = 100_000;
    let mut r = LinuxContainerResources::default();
    if let Some(m) = c.cpu_limit_millis {
        r.cpu_period = PERIOD;
        // Kubelet's floor: the kernel refuses quotas under 1 ms.
        r.cpu_quota = (m * PERIOD / 1000).max(1000);
    }
    if let Some(b) = c.memory_limit_bytes {
        r.memory_limit_in_bytes = b;
    }
    r
}

fn manifest_hash(file: &str, text: &str) -> String {
    let mut h = Sha256::new();
    h.update(file.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Where a pod's HTTP and TCP probes go by default.
fn pod_ip(pod: &Pod, status: Option<&PodSandboxStatus>) -> Option<String> {
    if pod.host_network {
        return Some("127.0.0.1".into());
    }
    status
        .and_then(|s| s.network.as_ref())
        .map(|n| n.ip.clone())
        .filter(|ip| !ip.is_empty())
}

pub fn pod_log_dir_of(log_dir: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    log_dir.join(format!("{namespace}_{name}_{uid}"))
}

fn pod_log_dir(log_dir: &Path, pod: &Pod, uid: &str) -> PathBuf {
    pod_log_dir_of(log_dir, &pod.namespace, &pod.name, uid)
}

fn pod_state_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("pods").join(uid)
}

/// Stops a pod: its containers get `grace` seconds after SIGTERM (all at once, as
/// kubelet does), then the sandbox is stopped and removed.
async fn stop_sandbox(cri: &Client, sandbox: &str, containers: &[String], grace: i64) {
    let stops: Vec<_> = containers
        .iter()
        .map(|id| {
            let cri = cri.clone();
            let id = id.clone();
            tokio::spawn(async move {
                cri.stop_container(StopContainerRequest {
                    container_id: id,
                    timeout: grace,
                })
                .await
            })
        })
        .collect();
    for s in stops {
        if let Ok(Err(e)) = s.await {
            tracing::warn!(sandbox = %sandbox, "{e}");
        }
    }
    let id = sandbox.to_string();
    if let Err(e) = cri
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
    {
        tracing::warn!(sandbox = %sandbox, "{e}");
    }
    if let Err(e) = cri
        .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
    {
        tracing::warn!(sandbox = %sandbox, "{e}");
    }
}

async fn teardown(cri: &Client, settings: &Settings, volumes: &Volumes, run: PodRun) {
    if let Some(sb) = &run.sandbox {
        let ids: Vec<String> = run.containers.iter().filter_map(|c| c.id.clone()).collect();
        stop_sandbox(cri, sb, &ids, run.pod.termination_grace_period_seconds).await;
    }
    // Unpublished only once no container of the pod can write to them any more.
    volumes
        .detach_retrying(
            &run.hash,
            &format!("{}/{}", run.pod.namespace, run.pod.name),
            settings.backoff_base,
            BACKOFF_MAX,
        )
        .await;
    for dir in [
        pod_state_dir(&settings.state_dir, &run.hash),
        pod_log_dir(&settings.log_dir, &run.pod, &run.hash),
    ] {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("failed to remove {}: {e}", dir.display());
            }
        }
    }
    tracing::info!(pod = %run.pod.name, file = %run.file, "pod stopped and removed");
}

impl PodRun {
    fn new(file: String, source: String, hash: String, pod: Pod) -> Self {
        let now = Instant::now();
        let containers = pod
            .init_containers
            .iter()
            .map(|c| (c, true))
            .chain(pod.containers.iter().map(|c| (c, false)))
            .map(|(c, init)| Ctr {
                spec: c.clone(),
                init,
                id: None,
                dead: None,
                attempt: 0,
                restarts: 0,
                state: "waiting",
                exit_code: None,
                last_error: None,
                next_start: now,
                done: false,
                prober: None,
                killing: None,
            })
            .collect();
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        PodRun {
            serial: SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            file,
            source,
            hash,
            pod,
            sandbox: None,
            error: None,
            failures: 0,
            retry_at: now,
            containers,
            failed: false,
            ip: None,
            image_refused: false,
        }
    }

    /// Back to "not started", keeping restart counts (the sandbox is gone).
    fn reset(&mut self) {
        self.sandbox = None;
        self.ip = None;
        for c in &mut self.containers {
            c.prober = None;
            c.killing = None;
            c.id = None;
            c.dead = None;
            c.done = false;
            c.state = "waiting";
            c.attempt = 0;
        }
    }

    fn report(&self) -> PodReport {
        let state = if self.failed {
            "failed"
        } else if self.sandbox.is_none() {
            "pending"
        } else if self.containers.iter().any(|c| c.init && !c.done) {
            "initializing"
        } else if self.containers.iter().all(|c| c.init || c.done) {
            "succeeded"
        } else {
            "running"
        };
        PodReport {
            file: self.file.clone(),
            name: self.pod.name.clone(),
            namespace: self.pod.namespace.clone(),
            uid: self.hash.clone(),
            state: state.into(),
            error: self.error.clone(),
            containers: self
                .containers
                .iter()
                .map(|c| ContainerReport {
                    name: c.spec.name.clone(),
                    init: c.init,
                    state: c.state.into(),
                    restarts: c.restarts,
                    exit_code: c.exit_code,
                    last_error: c.last_error.clone(),
                    ready: c.id.is_some()
                        && c.state == "running"
                        && c.killing.is_none()
                        && c.prober.as_ref().is_none_or(|p| p.health().ready),
                })
                .collect(),
            image_refused: self.image_refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_healthy_once_every_static_pod_is_up() {
        let report = |file: &str, state: &str, ready: bool| PodReport {
            file: file.into(),
            name: file.trim_end_matches(".yaml").into(),
            namespace: "default".into(),
            uid: String::new(),
            state: state.into(),
            error: None,
            containers: vec![
                ContainerReport {
                    name: "setup".into(),
                    init: true,
                    state: "completed".into(),
                    restarts: 0,
                    exit_code: Some(0),
                    last_error: None,
                    ready: false,
                },
                ContainerReport {
                    name: "main".into(),
                    init: false,
                    state: "running".into(),
                    restarts: 0,
                    exit_code: None,
                    last_error: None,
                    ready,
                },
            ],
            image_refused: false,
        };
        let files = vec!["a.yaml".to_string(), "b.yaml".to_string()];
        // Before the first pass nothing is reported: not up.
        assert_eq!(
            static_pods_up(&files, &[]),
            Err("not up: a.yaml, b.yaml".into())
        );
        let mut reports = vec![
            report("a.yaml", "running", true),
            report("b.yaml", "running", false),
            // Pods of the other sources do not count.
            report("downlink/c.yaml", "failed", false),
        ];
        assert_eq!(
            static_pods_up(&files, &reports),
            Err("not up: b.yaml".into())
        );
        reports[1] = report("b.yaml", "succeeded", false);
        assert_eq!(static_pods_up(&files, &reports), Ok(()));
        reports[0] = report("a.yaml", "pending", false);
        assert!(static_pods_up(&files, &reports).is_err());
        assert_eq!(static_pods_up(&[], &[]), Ok(()));
        assert!(is_manifest_file("a.yml") && !is_manifest_file(".a.yaml.part"));
        assert!(!is_manifest_file("a.json"));
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_five_minutes() {
        let base = Duration::from_secs(10);
        let delays: Vec<u64> = (0..7).map(|n| backoff(base, n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(base, 1000), BACKOFF_MAX);
        assert_eq!(
            backoff(Duration::from_millis(100), 3),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn cpu_limit_becomes_a_cfs_quota_and_memory_a_byte_limit() {
        let pod = manifest::parse(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: a\n    image: i\n    resources: {limits: {cpu: 250m, memory: 1Gi}}\n",
        )
        .unwrap();
        let r = resources(&pod.containers[0]);
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 25_000));
        assert_eq!(r.memory_limit_in_bytes, 1 << 30);
        let none = resources(&Container {
            cpu_limit_millis: None,
            memory_limit_bytes: None,
            ..pod.containers[0].clone()
        });
        assert_eq!(none, LinuxContainerResources::default());
    }

    #[test]
    fn block_volumes_become_devices_read_only_when_the_volume_is() {
        let pod = manifest::parse(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  volumes:\n  - name: raw\n    csi: {driver: storaged.edgeos, volumeAttributes: {volume: r1, size: 1Gi, volumeMode: Block}}\n  - name: ro\n    csi: {driver: storaged.edgeos, readOnly: true, volumeAttributes: {volume: r2, size: 1Gi, volumeMode: Block}}\n  - name: fs\n    emptyDir: {}\n  containers:\n  - name: a\n    image: i\n    volumeMounts: [{name: fs, mountPath: /fs}]\n    volumeDevices: [{name: raw, devicePath: /dev/xvda}, {name: ro, devicePath: /dev/xvdb}]\n",
        )
        .unwrap();
        let got = devices(&pod, &pod.containers[0], |name| {
            PathBuf::from(format!("/state/csi/pods/u/{name}"))
        });
        let dev = |c: &str, h: &str, p: &str| Device {
            container_path: c.into(),
            host_path: h.into(),
            permissions: p.into(),
        };
        assert_eq!(
            got,
            [
                dev("/dev/xvda", "/state/csi/pods/u/raw", "rw"),
                dev("/dev/xvdb", "/state/csi/pods/u/ro", "r"),
            ]
        );
        // On the wire: ContainerConfig.devices is field 8, Device's fields 1-3.
        let bytes = prost::Message::encode_to_vec(&ContainerConfig {
            devices: got[..1].to_vec(),
            ..Default::default()
        });
        let mut want = vec![8 << 3 | 2, 38, 10, 9];
        want.extend_from_slice(b"/dev/xvda");
        want.extend_from_slice(&[18, 21]);
        want.extend_from_slice(b"/state/csi/pods/u/raw");
        want.extend_from_slice(&[26, 2]);
        want.extend_from_slice(b"rw");
        assert_eq!(bytes, want);
    }

    #[test]
    fn the_hash_changes_with_the_manifest_and_its_file() {
        let a = manifest_hash("a.yaml", "x");
        assert_eq!(a.len(), 16);
        assert_eq!(a, manifest_hash("a.yaml", "x"));
        assert_ne!(a, manifest_hash("a.yaml", "y"));
        assert_ne!(a, manifest_hash("b.yaml", "x"));
    }
}
