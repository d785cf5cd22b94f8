//! Events for a pod's important transitions, as kubelet records them, so that `kubectl
//! describe pod` and `kubectl get events` at the core say what happened on the box: a
//! container started, a container crash-looping, a manifest refused, a pod failed; and
//! the Node's (noded starting, each condition taking a status).
//! Best effort: an event the server does not take is logged, never retried, and never
//! holds the status reports (each is posted on a task of its own).

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::json;

use crate::pods::PodReport;

use super::status::without_source;
use std::sync::Arc;

use super::{time_now, timed, Known, Shared};

/// One event to record.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Transition {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What changed from `before` to `after` that an operator should hear of. A pod first
/// seen (noded restarted, or the pod is new) says nothing: its next change does.
pub(super) fn transitions(before: Option<&PodReport>, after: &PodReport) -> Vec<Transition> {
    let Some(before) = before else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if after.state != before.state {
        let error = after
            .error
            .as_deref()
            .map(without_source)
            .unwrap_or_default();
        match after.state.as_str() {
            "invalid" => out.push(Transition {
                warning: true,
                reason: "ManifestRefused",
                message: error,
            }),
            "failed" => out.push(Transition {
                warning: true,
                reason: "Failed",
                message: error,
            }),
            _ => {}
        }
    }
    for c in &after.containers {
        let was = before.containers.iter().find(|b| b.name == c.name);
        let state_was = was.map_or("", |b| b.state.as_str());
        if c.state == "running" && state_was != "running" {
            out.push(Transition {
                warning: false,
                reason: "Started",
                message: format!("Started container {}", c.name),
            });
        }
        if c.state == "back-off" && state_was != "back-off" {
            let why = c
                .last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            out.push(Transition {
                warning: true,
                reason: "BackOff",
                message: format!("Back-off restarting failed container {}{why}", c.name),
            });
        }
    }
    out
}

/// Records `t` on the pod at the server (core/v1 Event, source noded on this node), on a
/// task of its own so that a server that does not answer holds nothing.
pub(super) fn record(shared: &Arc<Shared>, pod: &Known, t: Transition) {
    let (shared, pod) = (shared.clone(), pod.clone());
    let involved = json!({
        "apiVersion": "v1", "kind": "Pod",
        "namespace": pod.namespace, "name": pod.name, "uid": pod.uid,
    });
    tokio::spawn(async move { post(&shared, &pod.namespace, &pod.name, involved, &t).await });
}

/// Records `t` on this Node, in the `default` namespace with the node's name as its uid,
/// where kubelet records its Node events (`kubectl describe node` shows them).
pub(super) fn record_node(shared: &Arc<Shared>, t: Transition) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let node = shared.settings.node_name.clone();
        let involved = json!({"apiVersion": "v1", "kind": "Node", "name": node, "uid": node});
        post(&shared, "default", &node, involved, &t).await
    });
}

/// Records `t` on another object noded acts for (a PersistentVolumeClaim it provisions
/// for, a PersistentVolume it reclaims): `involved` names it, `namespace` is its own or
/// `default` for a cluster-scoped one.
pub(super) fn record_on(
    shared: &Arc<Shared>,
    namespace: &str,
    involved: serde_json::Value,
    t: Transition,
) {
    let (shared, namespace) = (shared.clone(), namespace.to_string());
    let name = involved["name"].as_str().unwrap_or_default().to_string();
    tokio::spawn(async move { post(&shared, &namespace, &name, involved, &t).await });
}

async fn post(
    shared: &Shared,
    namespace: &str,
    name: &str,
    involved: serde_json::Value,
    t: &Transition,
) {
    let node = &shared.settings.node_name;
    let now = time_now();
    let event = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": { "generateName": format!("{name}."), "namespace": namespace },
        "involvedObject": involved,
        "reason": t.reason,
        "message": t.message,
        "type": if t.warning { "Warning" } else { "Normal" },
        "source": { "component": "noded", "host": node },
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "reportingComponent": "noded",
        "reportingInstance": node,
    });
    let Ok(event) = serde_json::from_value::<DynamicObject>(event) else {
        return;
    };
    let api: Api<DynamicObject> = Api::namespaced_with(
        shared.client.clone(),
        namespace,
        &ApiResource::erase::<k8s_openapi::api::core::v1::Event>(&()),
    );
    if let Err(e) = timed(api.create(&PostParams::default(), &event)).await {
        tracing::warn!(object = %name, reason = t.reason, "event not recorded: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::ContainerReport;

    fn report(
        state: &str,
        containers: &[(&str, &str, Option<&str>)],
        error: Option<&str>,
    ) -> PodReport {
        PodReport {
            file: "api/default_web.yaml".into(),
            name: "web".into(),
            namespace: "default".into(),
            uid: "u".into(),
            state: state.into(),
            error: error.map(str::to_string),
            containers: containers
                .iter()
                .map(|(name, state, err)| ContainerReport {
                    name: (*name).into(),
                    init: false,
                    state: (*state).into(),
                    restarts: 0,
                    exit_code: None,
                    last_error: err.map(str::to_string),
                    ready: *state == "running",
                })
                .collect(),
            ip: None,
            image_refused: false,
        }
    }

    #[test]
    fn a_started_container_and_a_crash_loop_are_events_once() {
        let pending = report("pending", &[("main", "waiting", None)], None);
        let running = report("running", &[("main", "running", None)], None);
        assert!(
            transitions(None, &running).is_empty(),
            "first sight: nothing"
        );
        let t = transitions(Some(&pending), &running);
        assert_eq!(
            t,
            [Transition {
                warning: false,
                reason: "Started",
                message: "Started container main".into()
            }]
        );
        assert!(
            transitions(Some(&running), &running).is_empty(),
            "no change"
        );
        let looping = report(
            "running",
            &[("main", "back-off", Some("exited with 3"))],
            None,
        );
        let t = transitions(Some(&running), &looping);
        assert_eq!(t.len(), 1);
        assert!(t[0].warning);
        assert_eq!(t[0].reason, "BackOff");
        assert_eq!(
            t[0].message,
            "Back-off restarting failed container main: exited with 3"
        );
        assert!(transitions(Some(&looping), &looping).is_empty());
    }

    #[test]
    fn a_refused_manifest_and_a_failed_pod_are_warnings_naming_why() {
        let pending = report("pending", &[], None);
        let refused = report(
            "invalid",
            &[],
            Some("/var/lib/edge/noded/apiserver/pods/default_web.yaml: spec.affinity is not supported yet"),
        );
        let t = transitions(Some(&pending), &refused);
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].warning, t[0].reason), (true, "ManifestRefused"));
        assert_eq!(t[0].message, "spec.affinity is not supported yet");
        let failed = report(
            "failed",
            &[],
            Some("image edge.local/x:1 is not on the allowlist"),
        );
        let t = transitions(Some(&pending), &failed);
        assert_eq!((t[0].warning, t[0].reason), (true, "Failed"));
    }
}
