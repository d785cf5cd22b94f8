//! The static-pod reconciler: makes containerd run exactly the pods whose manifests are in
//! the manifests directory. It owns each pod's life through CRI (images pulled, sandbox,
//! init containers in order, app containers restarted per policy with back-off, graceful
//! stop when the manifest goes), the pods' emptyDir directories, and the status report
//! the control socket serves.
//!
//! Pods survive a noded restart: each sandbox carries the manifest file and a hash of
//! it as labels, and a new noded adopts a running sandbox whose hash still matches
//! instead of recreating it.
//!
//! The rooms: `sources` (which manifest files, from which directory, win), `lifecycle`
//! (a pod's life as data and the decisions on it, without CRI), `spec` (a pod as CRI
//! configuration), `runtime` (the CRI calls that carry a step out), `adopt` (an earlier
//! noded's sandboxes), `report` (what is reported); this file wires them into passes.

mod adopt;
mod lifecycle;
mod report;
mod runtime;
mod sources;
mod spec;

pub use report::{reported, static_pods_up, ContainerReport, PodReport, Status};
pub use runtime::running_ids;
pub use sources::{is_manifest_file, API_PREFIX};
pub use spec::pod_log_dir_of;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cri::Client;
use crate::error::Error;
use crate::manifest;
use crate::volumes::Volumes;
use lifecycle::PodRun;
use report::update_report;
use runtime::{teardown, Driver};
use sources::{source_rank, Scanned};

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
    /// Each pod's fabric channel is `<dir>/<namespace>_<name>_<uid>/`, mounted read-only
    /// at `/run/edge/fabric` in its containers (fabricd's pod_channels.rs).
    pub fabric_pod_channels: Option<PathBuf>,
    /// The images the box's own registry serves (`edge.local/<repo>:<tag>` → manifest
    /// digest): such an image on the box is current only with that digest, so an OS
    /// update that ships a new image under the same tag is pulled whatever the policy.
    pub served_images: BTreeMap<String, String>,
}

pub struct Reconciler {
    driver: Driver,
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

/// How many pods are stepped at once: starting one is mostly waiting for containerd
/// and storaged, but each start also costs them CPU, which the appliance has little of.
const STEPS_AT_ONCE: usize = 4;

/// Rings when a manifest source changed under the reconciler (the API server's pods
/// written to their cache): the next pass comes now rather than at the next tick.
/// One per process: noded runs one reconciler (a stray ring only brings a pass early).
static WAKE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Asks for a reconcile pass now (a manifest was written or removed).
pub fn wake() {
    WAKE.notify_one();
}

/// A manifest file that was not taken, and why.
struct Invalid {
    hash: String,
    error: Error,
    /// Refused because another file (this one) defines the same pod: looked at again
    /// each pass, since that may change while this file does not.
    duplicate_of: Option<String>,
}

impl Reconciler {
    pub fn new(cri: Client, settings: Settings, status: Status) -> Self {
        let volumes = Arc::new(Volumes::new(
            settings.csi_socket.clone(),
            settings.state_dir.clone(),
        ));
        let settings = Arc::new(settings);
        Reconciler {
            driver: Driver {
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

    /// Reconciles every `period` forever, and at once when [`wake`] is called.
    pub async fn run(mut self, period: Duration) {
        loop {
            self.tick().await;
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = WAKE.notified() => {}
            }
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
            if known.is_some_and(|i| i.duplicate_of.is_none()) {
                continue;
            }
            let source = &found.path;
            let mut duplicate_of = None;
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
                        duplicate_of = Some(other.clone());
                        Err(Error::Manifest {
                            file: source.clone(),
                            detail: format!(
                                "metadata.name: pod {}/{} is already defined by {other}",
                                pod.namespace, pod.name
                            ),
                        })
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
                    // Logged once per version of the file, and again when the file a
                    // duplicate repeats changes.
                    if known.is_none_or(|i| i.duplicate_of != duplicate_of) {
                        tracing::error!("rejected pod manifest: {e}");
                    }
                    self.invalid.insert(
                        file.clone(),
                        Invalid {
                            hash: found.hash.clone(),
                            error: e,
                            duplicate_of,
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
            let (driver, status) = (self.driver.clone(), self.status.clone());
            let (turns, pass) = (self.turns.clone(), pass.clone());
            self.steps.spawn(async move {
                let _turn = turns.acquire_owned().await;
                driver.step(&mut run).await;
                driver.rotate_logs(&run).await;
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
        let cri = self.driver.cri.clone();
        let settings = self.settings.clone();
        let volumes = self.driver.volumes.clone();
        tokio::spawn(async move { teardown(&cri, &settings, &volumes, run).await });
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
            error: Some(i.error.to_string()),
            containers: Vec::new(),
            ip: None,
            image_refused: false,
        }));
        reports.sort_by(|a, b| a.file.cmp(&b.file));
        if let Ok(mut s) = self.status.lock() {
            *s = reports;
        }
    }
}
