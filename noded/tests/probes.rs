//! Probes through the real daemon: a container whose exec liveness probe starts failing
//! is stopped and restarted (its restart count grows, the status and noded's log say
//! "liveness probe failed"); HTTP and TCP probes make a serving container ready; a
//! startup probe that never succeeds holds back a liveness probe that would fail and
//! keeps its container not ready. Readiness shows in `noded pods`.

use std::time::Instant;

use noded::pods::{ContainerReport, PodReport};

mod common;
use common::*;

fn pod(web: u16, closed: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: probed}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: flaky
      image: edge.local/hello:1
      args: ["flaky"]
      env: [{{name: HELLO_HEALTHY_MS, value: "1500"}}]
      livenessProbe:
        exec: {{command: [/hello, --check, /healthy]}}
        periodSeconds: 1
        failureThreshold: 1
    - name: web
      image: edge.local/hello:1
      args: ["web"]
      env: [{{name: HELLO_LISTEN, value: "{web}"}}]
      ports: [{{containerPort: {web}, name: http}}]
      startupProbe: {{httpGet: {{path: /started, port: http}}, periodSeconds: 1, failureThreshold: 30}}
      readinessProbe: {{tcpSocket: {{port: {web}}}, periodSeconds: 1}}
    - name: held
      image: edge.local/hello:1
      args: ["held"]
      startupProbe: {{tcpSocket: {{port: {closed}}}, periodSeconds: 1, failureThreshold: 1000}}
      livenessProbe: {{exec: {{command: [/hello, --check, /nothing]}}, periodSeconds: 1, failureThreshold: 1}}
"#
    )
}

fn ctr<'a>(pods: &'a [PodReport], name: &str) -> Option<&'a ContainerReport> {
    pods.iter()
        .find(|p| p.name == "probed")?
        .containers
        .iter()
        .find(|c| c.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_liveness_restarts_and_readiness_is_reported() {
    let started = Instant::now();
    let node = Node::start("noded-probes-", "").await;
    let env = &node.env;
    let (web, closed) = (free_port(), free_port());
    std::fs::write(node.manifests.join("probed.yaml"), pod(web, closed)).unwrap();

    let pods = env
        .wait_for("web ready", |p| ctr(p, "web").is_some_and(|c| c.ready))
        .await;
    let held = ctr(&pods, "held").unwrap();
    assert_eq!((held.state.as_str(), held.ready), ("running", false));

    let pods = env
        .wait_for("flaky restarted twice", |p| {
            ctr(p, "flaky").is_some_and(|c| c.restarts >= 2)
        })
        .await;
    let flaky = ctr(&pods, "flaky").unwrap();
    let why = flaky.last_error.as_deref().unwrap_or("");
    assert!(
        why.starts_with(
            "liveness probe failed: exec [\"/hello\", \"--check\", \"/healthy\"] exited with 1"
        ),
        "{why}"
    );
    let log = env.noded_log();
    assert!(
        log.lines().any(|l| l.contains("container=flaky")
            && l.contains("liveness probe failed")
            && l.contains("stopping the container")),
        "{log}"
    );
    // The startup probe never succeeded, so the failing liveness probe never ran.
    let held = ctr(&pods, "held").unwrap();
    assert_eq!((held.restarts, held.ready), (0, false), "{held:?}");
    assert!(ctr(&pods, "web").unwrap().ready);
    assert_eq!(ctr(&pods, "web").unwrap().restarts, 0);

    let (ok, out, err) = env.cli(&["pods"]);
    assert!(ok, "{err}");
    assert!(out.contains("  web  running  ready  restarts=0"), "{out}");
    assert!(
        out.contains("  held  running  not-ready  restarts=0"),
        "{out}"
    );
    assert!(out.contains("liveness probe failed"), "{out}");
    eprintln!("took {:?}", started.elapsed());
}
