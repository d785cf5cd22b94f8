//! A pod's life as data: its containers' states, restart counts and back-off, and the
//! decisions taken on them (what a container's exit leads to, what a pod reports),
//! apart from the CRI calls that carry them out.

use std::time::{Duration, Instant};

use super::report::{ContainerReport, PodReport};
use crate::manifest::{Container, Pod, RestartPolicy};
use crate::probes::Prober;

/// Kubelet's ceiling for the crash-loop back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The delay before the next start of a container that has been restarted `restarts`
/// times: `base`, doubling per restart, at most [`BACKOFF_MAX`] (kubelet: 10 s … 5 min).
pub fn backoff(base: Duration, restarts: u32) -> Duration {
    edge_common::Backoff::after(base, BACKOFF_MAX, restarts)
}

pub(super) struct PodRun {
    /// Unique in this process: tells this run from a later one of the same manifest.
    pub(super) serial: u64,
    pub(super) file: String,
    /// The manifest's path, for messages.
    pub(super) source: String,
    pub(super) hash: String,
    pub(super) pod: Pod,
    pub(super) sandbox: Option<String>,
    pub(super) error: Option<String>,
    pub(super) failures: u32,
    pub(super) retry_at: Instant,
    pub(super) containers: Vec<ContainerRun>,
    pub(super) failed: bool,
    /// Where HTTP and TCP probes go: the sandbox's IP, 127.0.0.1 on the host network.
    pub(super) ip: Option<String>,
    /// The last start failed on the image allowlist.
    pub(super) image_refused: bool,
    /// The allowlist in force (version, file) when its images were last found allowed:
    /// a running pod is checked again when another list comes into force.
    pub(super) allowed_under: Option<(u64, String)>,
}

pub(super) struct ContainerRun {
    pub(super) spec: Container,
    pub(super) init: bool,
    pub(super) id: Option<String>,
    /// The exited container a restart replaces.
    pub(super) dead: Option<String>,
    /// CRI attempt number of the next container created; unique per sandbox.
    pub(super) attempt: u32,
    pub(super) restarts: u32,
    pub(super) state: &'static str,
    pub(super) exit_code: Option<i32>,
    pub(super) last_error: Option<String>,
    pub(super) next_start: Instant,
    pub(super) done: bool,
    /// The running container's probes, if it has any.
    pub(super) prober: Option<Prober>,
    /// Why the running container is being stopped by us (a failed probe).
    pub(super) killing: Option<String>,
}

impl PodRun {
    pub(super) fn new(file: String, source: String, hash: String, pod: Pod) -> Self {
        let now = Instant::now();
        let containers = pod
            .init_containers
            .iter()
            .map(|c| (c, true))
            .chain(pod.containers.iter().map(|c| (c, false)))
            .map(|(c, init)| ContainerRun {
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
            allowed_under: None,
        }
    }

    /// Back to "not started", keeping restart counts (the sandbox is gone).
    pub(super) fn reset(&mut self) {
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

    /// Its sandbox did not start or went away: tried again after the back-off.
    pub(super) fn start_failed(&mut self, base: Duration, now: Instant) {
        self.retry_at = now + backoff(base, self.failures);
        self.failures += 1;
    }

    pub(super) fn report(&self) -> PodReport {
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
            ip: self.ip.clone().filter(|_| !self.pod.host_network),
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

impl ContainerRun {
    /// It could not be created or started: tried again after the back-off.
    pub(super) fn start_failed(&mut self, base: Duration, now: Instant) {
        self.state = "back-off";
        self.next_start = now + backoff(base, self.restarts);
        self.restarts += 1;
    }

    /// It exited with `exit_code` (the runtime's `reason` for it, if any): done, or to
    /// be started again after the returned delay, as the pod's restart policy says (an
    /// init container is only ever run again after a failure, and not under `Never`).
    pub(super) fn exited(
        &mut self,
        exit_code: i32,
        reason: &str,
        policy: RestartPolicy,
        base: Duration,
        now: Instant,
    ) -> Option<Duration> {
        self.exit_code = Some(exit_code);
        self.prober = None;
        if let Some(why) = self.killing.take() {
            self.last_error = Some(format!("{why} (stopped, exit code {exit_code})"));
        } else if exit_code != 0 {
            self.last_error = Some(if reason.is_empty() {
                format!("exited with code {exit_code}")
            } else {
                format!("exited with code {exit_code} ({reason})")
            });
        }
        let again = if self.init {
            exit_code != 0 && policy != RestartPolicy::Never
        } else {
            policy.restarts(exit_code)
        };
        if !again {
            self.done = true;
            self.state = if exit_code == 0 {
                "completed"
            } else {
                "exited"
            };
            return None;
        }
        let delay = backoff(base, self.restarts);
        // The exited container stays until its successor starts: its attempt number
        // is what a restarted noded counts restarts from.
        self.dead = self.id.take();
        self.restarts += 1;
        self.next_start = now + delay;
        self.state = "back-off";
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn pod(policy: &str) -> PodRun {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  restartPolicy: {policy}\n  initContainers:\n  - {{name: setup, image: i}}\n  containers:\n  - {{name: app, image: i}}\n"
        );
        let pod = crate::manifest::parse("p.yaml", &text).unwrap();
        PodRun::new("p.yaml".into(), "/m/p.yaml".into(), "h".into(), pod)
    }

    #[test]
    fn an_app_container_restarts_as_its_policy_says_with_a_growing_delay() {
        let base = Duration::from_secs(10);
        let now = Instant::now();
        let mut run = pod("Always");
        let app = &mut run.containers[1];
        app.id = Some("c1".into());
        assert_eq!(
            app.exited(0, "", RestartPolicy::Always, base, now),
            Some(base)
        );
        // The exited container is kept until its successor starts, and counted.
        assert_eq!((app.dead.as_deref(), app.id.as_deref()), (Some("c1"), None));
        assert_eq!(
            (app.state, app.restarts, app.next_start),
            ("back-off", 1, now + base)
        );
        assert_eq!(app.last_error, None);
        app.id = Some("c2".into());
        let second = app.exited(137, "OOMKilled", RestartPolicy::Always, base, now);
        assert_eq!(second, Some(2 * base));
        assert_eq!(
            app.last_error.as_deref(),
            Some("exited with code 137 (OOMKilled)")
        );

        let mut run = pod("OnFailure");
        let app = &mut run.containers[1];
        app.id = Some("c1".into());
        assert_eq!(app.exited(0, "", RestartPolicy::OnFailure, base, now), None);
        assert!(app.done);
        assert_eq!((app.state, app.exit_code), ("completed", Some(0)));
        let mut run = pod("Never");
        let app = &mut run.containers[1];
        app.id = Some("c1".into());
        assert_eq!(app.exited(2, "", RestartPolicy::Never, base, now), None);
        assert_eq!((app.state, app.done), ("exited", true));
    }

    #[test]
    fn an_init_container_runs_again_only_after_a_failure_and_never_under_never() {
        let (base, now) = (Duration::from_secs(1), Instant::now());
        let mut run = pod("Always");
        let init = &mut run.containers[0];
        assert!(init.init);
        init.id = Some("i1".into());
        assert_eq!(init.exited(0, "", RestartPolicy::Always, base, now), None);
        assert_eq!((init.done, init.state), (true, "completed"));
        let mut run = pod("Always");
        run.containers[0].id = Some("i1".into());
        assert!(run.containers[0]
            .exited(1, "", RestartPolicy::Always, base, now)
            .is_some());
        let mut run = pod("Never");
        run.containers[0].id = Some("i1".into());
        assert_eq!(
            run.containers[0].exited(1, "", RestartPolicy::Never, base, now),
            None
        );
        assert_eq!(run.containers[0].state, "exited");
    }

    #[test]
    fn a_container_stopped_for_a_failed_probe_says_so() {
        let (base, now) = (Duration::from_secs(1), Instant::now());
        let mut run = pod("Always");
        let app = &mut run.containers[1];
        app.id = Some("c1".into());
        app.killing = Some("liveness probe failed: HTTP 500".into());
        app.exited(143, "Error", RestartPolicy::Always, base, now);
        assert_eq!(
            app.last_error.as_deref(),
            Some("liveness probe failed: HTTP 500 (stopped, exit code 143)")
        );
        assert_eq!(app.killing, None);
    }

    #[test]
    fn a_pod_reports_pending_initializing_running_succeeded_and_failed() {
        let (base, now) = (Duration::from_secs(1), Instant::now());
        let mut run = pod("OnFailure");
        assert_eq!(run.report().state, "pending");
        run.start_failed(base, now);
        run.start_failed(base, now);
        assert_eq!((run.failures, run.retry_at), (2, now + 2 * base));
        run.sandbox = Some("s".into());
        assert_eq!(run.report().state, "initializing");
        run.containers[0].id = Some("i".into());
        run.containers[0].exited(0, "", RestartPolicy::OnFailure, base, now);
        run.containers[1].id = Some("c".into());
        run.containers[1].state = "running";
        let report = run.report();
        assert_eq!(report.state, "running");
        // No probes: running is ready.
        assert!(report.containers[1].ready && report.is_up());
        run.containers[1].exited(0, "", RestartPolicy::OnFailure, base, now);
        assert_eq!(run.report().state, "succeeded");
        // A restart keeps the counts but forgets the sandbox's containers.
        run.reset();
        assert_eq!(run.report().state, "pending");
        assert_eq!(run.containers[1].state, "waiting");
        run.failed = true;
        assert_eq!(run.report().state, "failed");
    }
}
