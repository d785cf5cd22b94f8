//! noded's Prometheus `/metrics` (config `metrics_listen`): pods and containers by
//! state, containers' restarts, refused pods, failed probes, failed CRI calls and how
//! long the last reconcile pass took.
//!
//! What describes pods is rendered from the status the control socket serves, so the
//! two never disagree. The event counts (probe failures, CRI errors, the pass time)
//! are process-wide: they are counted where they happen (the probe loops, the CRI
//! client, the reconciler), which share nothing else to carry a handle through.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use edge_common::metrics::{labels, Exposition, Labels};

use crate::pods::{PodReport, Status};

/// The pod states a report can have, each rendered (0 when none) so a series exists
/// before its first pod.
const POD_STATES: [&str; 6] = [
    "pending",
    "initializing",
    "running",
    "succeeded",
    "failed",
    "invalid",
];
const CONTAINER_STATES: [&str; 5] = ["waiting", "running", "back-off", "exited", "completed"];

/// The probe kinds, in the order of [`Counts::probe_failures`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

const PROBE_KINDS: [(ProbeKind, &str); 3] = [
    (ProbeKind::Liveness, "liveness"),
    (ProbeKind::Readiness, "readiness"),
    (ProbeKind::Startup, "startup"),
];

static PROBE_FAILURES: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
/// (CRI method, gRPC code) → failed calls.
static CRI_ERRORS: Mutex<BTreeMap<(&'static str, String), u64>> = Mutex::new(BTreeMap::new());
/// The last pass's duration in seconds as f64 bits; u64::MAX until the first pass.
static PASS_SECONDS: AtomicU64 = AtomicU64::new(u64::MAX);

/// One probe run that failed (not only the one that crossed its threshold).
pub fn probe_failed(kind: ProbeKind) {
    PROBE_FAILURES[kind as usize].fetch_add(1, Ordering::Relaxed);
}

/// One CRI call that the runtime failed or could not be made; `method` is the gRPC
/// path (`/runtime.v1.RuntimeService/PullImage`), counted by its last part.
pub fn cri_failed(method: &'static str, code: tonic::Code) {
    let method = method.rsplit('/').next().unwrap_or(method);
    let code = crate::volumes::code_name(code).to_string();
    if let Ok(mut m) = CRI_ERRORS.lock() {
        *m.entry((method, code)).or_default() += 1;
    }
}

/// How long the reconcile pass that just ended took.
pub fn pass_took(d: Duration) {
    PASS_SECONDS.store(d.as_secs_f64().to_bits(), Ordering::Relaxed);
}

/// The event counts at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Liveness, readiness, startup.
    pub probe_failures: [u64; 3],
    pub cri_errors: BTreeMap<(String, String), u64>,
    pub pass_seconds: Option<f64>,
}

impl Counts {
    pub fn now() -> Counts {
        let bits = PASS_SECONDS.load(Ordering::Relaxed);
        Counts {
            probe_failures: std::array::from_fn(|i| PROBE_FAILURES[i].load(Ordering::Relaxed)),
            cri_errors: CRI_ERRORS
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|((method, code), n)| ((method.to_string(), code.clone()), *n))
                        .collect()
                })
                .unwrap_or_default(),
            pass_seconds: (bits != u64::MAX).then(|| f64::from_bits(bits)),
        }
    }
}

/// The exposition (edge-common's, OpenMetrics text) of the pods and the counts.
pub fn render(pods: &[PodReport], counts: &Counts) -> String {
    let mut e = Exposition::new();
    let by_state = |states: &[&str], n: &dyn Fn(&str) -> usize| -> Vec<(Labels, u64)> {
        states
            .iter()
            .map(|s| (labels(&[("state", s)]), n(s) as u64))
            .collect()
    };
    e.gauge(
        "noded_pods",
        "Pods by state, one per manifest file (invalid: a manifest that was refused).",
        by_state(&POD_STATES, &|s| {
            pods.iter().filter(|p| p.state == s).count()
        }),
    );
    e.gauge(
        "noded_containers",
        "Containers (init containers included) of the pods by state.",
        by_state(&CONTAINER_STATES, &|s| {
            pods.iter()
                .flat_map(|p| &p.containers)
                .filter(|c| c.state == s)
                .count()
        }),
    );
    e.counter(
        "noded_container_restarts_total",
        "Restarts of each container of the running pods (starts over when a pod is recreated).",
        pods.iter()
            .flat_map(|p| p.containers.iter().map(move |c| (p, c)))
            .map(|(p, c)| {
                let l = [
                    ("namespace", p.namespace.as_str()),
                    ("pod", p.name.as_str()),
                    ("container", c.name.as_str()),
                ];
                (labels(&l), u64::from(c.restarts))
            }),
    );
    let invalid = pods.iter().filter(|p| p.state == "invalid").count();
    let not_allowed = pods.iter().filter(|p| p.image_refused).count();
    e.gauge(
        "noded_pods_refused",
        "Pods that do not run because their manifest is invalid or an image is not on the allowlist.",
        [
            (labels(&[("reason", "invalid_manifest")]), invalid as u64),
            (labels(&[("reason", "image_not_allowed")]), not_allowed as u64),
        ],
    );
    e.counter(
        "noded_probe_failures_total",
        "Probe runs that failed, by probe kind.",
        PROBE_KINDS.iter().map(|(k, name)| {
            (
                labels(&[("probe", name)]),
                counts.probe_failures[*k as usize],
            )
        }),
    );
    e.counter(
        "noded_cri_errors_total",
        "CRI calls that failed, by method and gRPC code.",
        counts
            .cri_errors
            .iter()
            .map(|((method, code), n)| (labels(&[("method", method), ("code", code)]), *n)),
    );
    if let Some(s) = counts.pass_seconds {
        e.gauge_f64(
            "noded_reconcile_pass_seconds",
            "How long the last reconcile pass took: from its rescan until the last pod step it began ended.",
            [(Labels::none(), s)],
        );
    }
    e.render()
}

/// Binds `addr` and serves the metrics of `status` in a task.
pub async fn spawn(addr: SocketAddr, status: Status) -> crate::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(crate::Error::bind("failed to bind the metrics port", addr))?;
    tracing::info!(address = %addr, "metrics endpoint serving");
    Ok(tokio::spawn(edge_common::serve_metrics(
        listener,
        move || {
            let pods = status.lock().map(|s| s.clone()).unwrap_or_default();
            async move { render(&pods, &Counts::now()) }
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::ContainerReport;

    fn ctr(name: &str, state: &str, restarts: u32) -> ContainerReport {
        ContainerReport {
            name: name.into(),
            init: false,
            state: state.into(),
            restarts,
            exit_code: None,
            last_error: None,
            ready: false,
        }
    }

    fn pod(file: &str, name: &str, state: &str, containers: Vec<ContainerReport>) -> PodReport {
        PodReport {
            file: file.into(),
            name: name.into(),
            namespace: "default".into(),
            uid: "u".into(),
            state: state.into(),
            error: None,
            containers,
            ip: None,
            image_refused: false,
        }
    }

    #[test]
    fn pods_containers_and_counts_render_as_prometheus_text() {
        let mut refused = pod("r.yaml", "r", "pending", vec![ctr("c", "waiting", 0)]);
        refused.image_refused = true;
        let pods = vec![
            pod(
                "a.yaml",
                "a",
                "running",
                vec![ctr("web", "running", 0), ctr("side", "back-off", 3)],
            ),
            pod("b.yaml", "b", "running", vec![ctr("web", "running", 1)]),
            refused,
            pod("bad.yaml", "", "invalid", vec![]),
        ];
        let counts = Counts {
            probe_failures: [2, 0, 5],
            cri_errors: [(("PullImage".into(), "NOT_FOUND".into()), 4)].into(),
            pass_seconds: Some(1.5),
        };
        let text = render(&pods, &counts);
        for line in [
            "# HELP noded_pods Pods by state",
            "# TYPE noded_pods gauge",
            "noded_pods{state=\"running\"} 2",
            "noded_pods{state=\"pending\"} 1",
            "noded_pods{state=\"invalid\"} 1",
            "noded_pods{state=\"failed\"} 0",
            "noded_containers{state=\"running\"} 2",
            "noded_containers{state=\"back-off\"} 1",
            "noded_containers{state=\"waiting\"} 1",
            "# TYPE noded_container_restarts counter",
            "noded_container_restarts_total{namespace=\"default\",pod=\"a\",container=\"side\"} 3",
            "noded_container_restarts_total{namespace=\"default\",pod=\"b\",container=\"web\"} 1",
            "noded_pods_refused{reason=\"invalid_manifest\"} 1",
            "noded_pods_refused{reason=\"image_not_allowed\"} 1",
            "noded_probe_failures_total{probe=\"liveness\"} 2",
            "noded_probe_failures_total{probe=\"readiness\"} 0",
            "noded_probe_failures_total{probe=\"startup\"} 5",
            "noded_cri_errors_total{method=\"PullImage\",code=\"NOT_FOUND\"} 4",
            "# TYPE noded_reconcile_pass_seconds gauge",
            "noded_reconcile_pass_seconds 1.5",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(line)),
                "no {line:?} in:\n{text}"
            );
        }
        // Every sample's family has its HELP and TYPE before it (a counter's samples
        // carry `_total` after the family's name).
        let mut declared = String::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared = rest.split(' ').next().unwrap().to_string();
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                let family = name.strip_suffix("_total").unwrap_or(name);
                assert!(
                    name == declared || family == declared,
                    "{l} after {declared}"
                );
            }
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // No pass yet: no pass duration rather than a made-up 0.
        let first = render(&[], &Counts::default());
        assert!(!first.contains("noded_reconcile_pass_seconds"), "{first}");
        assert!(first.contains("noded_pods{state=\"running\"} 0"), "{first}");
    }

    #[test]
    fn label_values_are_escaped() {
        let pods = vec![pod(
            "x.yaml",
            "odd",
            "running",
            vec![ctr("a\"b\\c\nd", "running", 0)],
        )];
        let text = render(&pods, &Counts::default());
        assert!(text.contains("container=\"a\\\"b\\\\c\\nd\"} 0"), "{text}");
    }

    #[test]
    fn counted_events_show_in_the_counts() {
        let before = Counts::now();
        probe_failed(ProbeKind::Readiness);
        cri_failed(
            "/runtime.v1.RuntimeService/StartContainer",
            tonic::Code::Unknown,
        );
        pass_took(Duration::from_millis(250));
        let after = Counts::now();
        assert!(after.probe_failures[1] > before.probe_failures[1]);
        let key = ("StartContainer".to_string(), "UNKNOWN".to_string());
        assert!(after.cri_errors.get(&key) > before.cri_errors.get(&key));
        assert!(after.pass_seconds.is_some());
    }
}
