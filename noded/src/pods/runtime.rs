//! Carrying a pod's life out through CRI: a step starts, polls or restarts its sandbox
//! and containers, probes and log rotation run beside them, and a teardown stops and
//! removes it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::lifecycle::{ContainerRun, PodRun, BACKOFF_MAX};
use super::{spec, Settings};
use crate::cri::{api::*, Client};
use crate::error::{Error, Result};
use crate::logs;
use crate::manifest::{self, Pod, PullPolicy, VolumeSource};
use crate::probes::{self, Prober};
use crate::volumes::Volumes;

/// What stepping a pod needs, shared by the tasks that step pods at the same time.
#[derive(Clone)]
pub(super) struct Driver {
    pub(super) cri: Client,
    pub(super) settings: Arc<Settings>,
    pub(super) volumes: Arc<Volumes>,
}

impl Driver {
    pub(super) async fn step(&self, run: &mut PodRun) {
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
                            run.ip = spec::pod_ip(&run.pod, s.status.as_ref());
                        }
                        let id = id.clone();
                        if self.revoked(run, &id, now).await
                            || self.lost_a_path(run, &id, now).await
                        {
                            return;
                        }
                        id
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
                        run.start_failed(self.settings.backoff_base, now);
                        return;
                    }
                }
            }
            None => {
                if now < run.retry_at {
                    return;
                }
                let in_force = self
                    .settings
                    .image_policy
                    .as_ref()
                    .and_then(|p| p.in_force());
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
                            Ok(s) => spec::pod_ip(&run.pod, s.status.as_ref()),
                            Err(_) => spec::pod_ip(&run.pod, None),
                        };
                        run.sandbox = Some(id.clone());
                        run.error = None;
                        run.image_refused = false;
                        run.allowed_under = in_force;
                        run.failures = 0;
                        id
                    }
                    Err(e) => {
                        tracing::error!(pod = %run.pod.name, file = %run.file, "pod failed to start: {e}");
                        run.image_refused = e.is_image_refused();
                        run.error = Some(e.to_string());
                        run.start_failed(self.settings.backoff_base, now);
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

    /// A running pod under an allowlist other than the one it started under is checked
    /// again: the core revoking an image's digest stops the pods that run it (stopped,
    /// refused at its next start, and `error` says which list). `true` when stopped.
    async fn revoked(&self, run: &mut PodRun, sandbox: &str, now: Instant) -> bool {
        let Some(policy) = &self.settings.image_policy else {
            return false;
        };
        let in_force = policy.in_force();
        if in_force == run.allowed_under {
            return false;
        }
        let images: Vec<&str> = run_images(run).into_keys().collect();
        for image in images {
            match self.check_image(policy, image).await {
                Ok(()) => {}
                Err(e) if e.is_image_refused() => {
                    self.stop_running(run, sandbox, now, e.to_string()).await;
                    run.image_refused = true;
                    return true;
                }
                // containerd away: asked again next pass.
                Err(e) => {
                    tracing::warn!(pod = %run.pod.name, "could not check its images again: {e}");
                    return false;
                }
            }
        }
        run.allowed_under = in_force;
        false
    }

    /// A running pod whose hostPath went away (a model or a config file the core
    /// withdrew, docs/fabric.md) is stopped: what it read is no longer there. It starts
    /// again, with back-off, once the path is back. `true` when stopped.
    async fn lost_a_path(&self, run: &mut PodRun, sandbox: &str, now: Instant) -> bool {
        let gone = run.pod.volumes.iter().find_map(|v| match &v.source {
            VolumeSource::HostPath {
                path,
                create: false,
            } if !path.exists() => Some(format!(
                "volume {}: its hostPath {} is gone",
                v.name,
                path.display()
            )),
            _ => None,
        });
        let Some(why) = gone else {
            return false;
        };
        self.stop_running(run, sandbox, now, why).await;
        true
    }

    /// Stops a running pod for `why` (logged, and its `error` until it runs again) and
    /// schedules its next start with back-off.
    async fn stop_running(&self, run: &mut PodRun, sandbox: &str, now: Instant, why: String) {
        tracing::warn!(pod = %run.pod.name, file = %run.file, "stopping the pod: {why}");
        let ids: Vec<String> = run.containers.iter().filter_map(|c| c.id.clone()).collect();
        stop_sandbox(
            &self.cri,
            sandbox,
            &ids,
            run.pod.termination_grace_period_seconds,
        )
        .await;
        run.reset();
        run.error = Some(format!("stopped: {why}"));
        run.start_failed(self.settings.backoff_base, now);
    }

    /// Whether the pulled `image` is on the allowlist in force.
    async fn check_image(&self, policy: &crate::policy::Policy, image: &str) -> Result<()> {
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
            .map_err(|source| Error::Image {
                image: image.to_string(),
                source,
            })?;
        let found = status.image.ok_or_else(|| Error::ImageUnknown {
            image: image.to_string(),
        })?;
        policy.check(
            image,
            &crate::policy::image_digests(&found.repo_digests, &found.id),
        )
    }

    /// Starts, polls or restarts one container.
    async fn drive(
        &self,
        pod: &Pod,
        sandbox: &str,
        config: &PodSandboxConfig,
        ctr: &mut ContainerRun,
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
                    ctr.last_error = Some(e.to_string());
                    ctr.start_failed(self.settings.backoff_base, now);
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
        match ctr.exited(exit_code, &reason, policy, self.settings.backoff_base, now) {
            None => {
                tracing::info!(pod = %pod.name, container = %ctr.spec.name, exit_code, "container exited; not restarted (restartPolicy)")
            }
            Some(delay) => {
                tracing::info!(pod = %pod.name, container = %ctr.spec.name, exit_code, restarts = ctr.restarts, "container exited; restarting in {delay:?}")
            }
        }
    }

    /// The probes of a container just started (or adopted), if it has any.
    fn prober(
        &self,
        pod: &Pod,
        ctr: &ContainerRun,
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
    fn watch_probes(
        &self,
        pod: &Pod,
        ctr: &mut ContainerRun,
        id: &str,
        ip: Option<&str>,
        now: Instant,
    ) {
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
    pub(super) async fn rotate_logs(&self, run: &PodRun) {
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

    /// Creates the pod's directories, pulls and checks its images, attaches its csi
    /// volumes and runs its sandbox; returns the sandbox's id.
    async fn start_sandbox(&self, run: &PodRun) -> Result<String> {
        let uid = &run.hash;
        let log_dir = self.log_dir(run);
        std::fs::create_dir_all(&log_dir).map_err(Error::io("failed to create", &log_dir))?;
        for v in &run.pod.volumes {
            let dir = match &v.source {
                VolumeSource::EmptyDir => spec::empty_dir(&self.settings.state_dir, uid, &v.name),
                VolumeSource::HostPath { path, create: true } => path.clone(),
                // Looked for here, so that the pod names the volume rather than the
                // runtime failing its mount.
                VolumeSource::HostPath { path, .. } => {
                    std::fs::metadata(path)
                        .map_err(Error::io("no hostPath", path))
                        .map_err(Error::volume(&v.name, None))?;
                    continue;
                }
                VolumeSource::Csi(_) => continue,
            };
            std::fs::create_dir_all(&dir)
                .map_err(Error::io("failed to create", &dir))
                .map_err(Error::volume(&v.name, None))?;
        }
        for (image, pull) in run_images(run) {
            self.ensure_image(image, pull).await?;
            if let Some(policy) = &self.settings.image_policy {
                self.check_image(policy, image).await?;
            }
        }
        // After the image checks: a pod refused for its images provisions nothing.
        self.volumes.attach(uid, &run.pod).await?;
        if let Some(dir) = channel(&self.settings, &run.pod, uid) {
            std::fs::create_dir_all(&dir).map_err(Error::io("failed to create", &dir))?;
        }
        let config = self.sandbox_config(run);
        Ok(self
            .cri
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                ..Default::default()
            })
            .await
            .map(|r| r.pod_sandbox_id)?)
    }

    /// Pulls `image` as its pull policy says: always, only when the runtime lacks it,
    /// or never (then a missing image is the pod's error, as Kubernetes'
    /// `ErrImageNeverPull`). An image of the box's own registry that the runtime holds
    /// with another digest than the registry serves (the OS was updated) counts as
    /// lacking.
    async fn ensure_image(&self, image: &str, pull: PullPolicy) -> Result<()> {
        let spec = ImageSpec {
            image: image.to_string(),
            ..Default::default()
        };
        let failed = |source| Error::Image {
            image: image.to_string(),
            source,
        };
        if pull != PullPolicy::Always {
            let status = self
                .cri
                .image_status(ImageStatusRequest {
                    image: Some(spec.clone()),
                    verbose: false,
                })
                .await
                .map_err(failed)?;
            let served = self.settings.served_images.get(image);
            let current = status.image.as_ref().is_some_and(|held| {
                served.is_none_or(|d| {
                    held.repo_digests
                        .iter()
                        .any(|r| r.rsplit_once('@').is_some_and(|(_, x)| x == d))
                })
            });
            if current {
                return Ok(());
            }
            // Never pulled: what the box holds runs, stale or not.
            if pull == PullPolicy::Never {
                return match status.image {
                    Some(_) => Ok(()),
                    None => Err(Error::ImageNeverPulled {
                        image: image.to_string(),
                    }),
                };
            }
        }
        self.cri
            .pull_image(PullImageRequest {
                image: Some(spec),
                ..Default::default()
            })
            .await
            .map_err(failed)?;
        Ok(())
    }

    fn log_dir(&self, run: &PodRun) -> PathBuf {
        spec::pod_log_dir(&self.settings.log_dir, &run.pod, &run.hash)
    }

    fn sandbox_config(&self, run: &PodRun) -> PodSandboxConfig {
        spec::sandbox_config(&run.file, &run.hash, &run.pod, &self.log_dir(run))
    }

    async fn start_container(
        &self,
        pod: &Pod,
        sandbox: &str,
        sandbox_config: &PodSandboxConfig,
        ctr: &ContainerRun,
    ) -> Result<String> {
        let uid = sandbox_config
            .metadata
            .as_ref()
            .map(|m| m.uid.clone())
            .unwrap_or_default();
        let config = spec::container_config(
            pod,
            &uid,
            &ctr.spec,
            ctr.attempt,
            &self.settings.state_dir,
            |name| self.volumes.target(&uid, name),
            channel(&self.settings, pod, &uid).as_deref(),
        );
        let id = self
            .cri
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.to_string(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await?
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
            return Err(e.into());
        }
        Ok(id)
    }
}

/// A pod's images, each once, with the most eager pull policy of the containers
/// that run it.
fn run_images(run: &PodRun) -> BTreeMap<&str, PullPolicy> {
    let mut images = BTreeMap::new();
    for c in run.pod.init_containers.iter().chain(&run.pod.containers) {
        let pull = images.entry(c.image.as_str()).or_insert(c.pull_policy);
        *pull = (*pull).max(c.pull_policy);
    }
    images
}

/// Stops a pod: its containers get `grace` seconds after SIGTERM (all at once, as
/// kubelet does), then the sandbox is stopped and removed.
pub(super) async fn stop_sandbox(cri: &Client, sandbox: &str, containers: &[String], grace: i64) {
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

/// The pod's fabric channel directory, when fabricd gives pods one.
fn channel(settings: &Settings, pod: &Pod, uid: &str) -> Option<PathBuf> {
    let dir = settings.fabric_pod_channels.as_ref()?;
    Some(spec::fabric_channel(dir, pod, uid))
}

pub(super) async fn teardown(cri: &Client, settings: &Settings, volumes: &Volumes, run: PodRun) {
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
        spec::pod_state_dir(&settings.state_dir, &run.hash),
        spec::pod_log_dir(&settings.log_dir, &run.pod, &run.hash),
    ]
    .into_iter()
    .chain(channel(settings, &run.pod, &run.hash))
    {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("failed to remove {}: {e}", dir.display());
            }
        }
    }
    tracing::info!(pod = %run.pod.name, file = %run.file, "pod stopped and removed");
}

/// The running sandbox of a reported pod and, when `container` is named, the id of
/// that container running in it: what the kubelet API's exec and port-forward hand the
/// runtime. `Err` says, for the client, why there is none.
pub async fn running_ids(
    cri: &Client,
    report: &super::PodReport,
    container: Option<&str>,
) -> std::result::Result<(String, Option<String>), String> {
    let pod = format!("pod {}/{}", report.namespace, report.name);
    let failed = |e: crate::cri::Error| format!("the runtime did not answer for {pod}: {e}");
    let sandboxes = cri
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                state: Some(PodSandboxStateValue {
                    state: PodSandboxState::SandboxReady as i32,
                }),
                label_selector: [
                    (spec::LABEL_FILE.to_string(), report.file.clone()),
                    (spec::LABEL_HASH.to_string(), report.uid.clone()),
                ]
                .into(),
                ..Default::default()
            }),
        })
        .await
        .map_err(failed)?
        .items;
    let Some(sandbox) = sandboxes.first().map(|s| s.id.clone()) else {
        return Err(format!("{pod} is not running"));
    };
    let Some(name) = container else {
        return Ok((sandbox, None));
    };
    let containers = cri
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: sandbox.clone(),
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .map_err(failed)?
        .containers;
    let id = containers
        .iter()
        .find(|c| c.metadata.as_ref().is_some_and(|m| m.name == name))
        .map(|c| c.id.clone())
        .ok_or_else(|| format!("container {name:?} of {pod} is not running"))?;
    Ok((sandbox, Some(id)))
}
