//! The reconciler's reports as the pods' status on the server: phase, conditions,
//! container statuses, and the end of a deletion once the pod's sandbox is gone.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use serde_json::{json, Value};

use crate::error::Error;
use crate::pods::{ContainerReport, PodReport, Status, API_PREFIX};

use super::{lock, time_now, timed, Known, Limited, Retry, Shared, CALL_TIMEOUT};

pub(super) async fn report_pods(shared: Arc<Shared>, status: Status) {
    let s = &shared.settings;
    // key → the status last accepted by the server (without times).
    let mut sent: HashMap<String, Value> = HashMap::new();
    let mut times = Times::default();
    let mut relists = 0;
    let mut log = Limited::new("reporting pod status");
    // key → the report last seen, for the events of what changed (events.rs).
    let mut seen: HashMap<String, PodReport> = HashMap::new();
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
                    Err(Error::ApiCall {
                        code: Some(404 | 409),
                        ..
                    }) => {
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
            // Evicted: its Failed status is eviction.rs's to send.
            if pod.evicted {
                continue;
            }
            let Some(report) = reports.get(key) else {
                continue;
            };
            for t in super::events::transitions(seen.get(key), report) {
                super::events::record(&shared, pod, t);
            }
            seen.insert(key.clone(), report.clone());
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
                Err(Error::ApiCall {
                    code: Some(404 | 409),
                    ..
                }) => {
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
        seen.retain(|k, _| known.contains_key(k));
        if failed {
            tokio::time::sleep(retry.next_delay().max(s.pod_status_every)).await;
        } else {
            retry.reset();
            // A pod that just started is reported now, not at the next round.
            tokio::select! {
                _ = tokio::time::sleep(s.pod_status_every) => {}
                _ = crate::pods::reported() => {}
            }
        }
    }
}

/// Whether the pod of cache file `key` still has a sandbox (the reconciler's teardown
/// removes it last); an unanswered question counts as yes.
pub(super) async fn sandbox_left(cri: &crate::cri::Client, key: &str) -> bool {
    use crate::cri::api::{ListPodSandboxRequest, PodSandboxFilter};
    // the reconciler (pods/spec.rs) labels each sandbox with its manifest's key under this name.
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
pub(super) fn pod_status(report: &PodReport, pod: &Known, host_ip: Option<Ipv4Addr>) -> Value {
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
        // A pod on the host network has the node's address, as kubelet reports it.
        if pod.host_network {
            status["podIP"] = ip.to_string().into();
            status["podIPs"] = json!([{ "ip": ip.to_string() }]);
        }
    }
    // A pod on the pod network: the address CNI gave its sandbox.
    if let Some(ip) = report.ip.as_ref().filter(|_| !pod.host_network) {
        status["podIP"] = ip.clone().into();
        status["podIPs"] = json!([{ "ip": ip }]);
    }
    if let Some(e) = error.filter(|_| invalid) {
        status["reason"] = "ManifestRefused".into();
        status["message"] = e.into();
    }
    status
}

/// The reconciler's errors start with the manifest's path, which means nothing on the
/// server: `…/default_web.yaml: spec.affinity is not supported yet` → `spec.affinity …`.
pub(super) fn without_source(e: &str) -> String {
    match e.split_once(".yaml: ") {
        Some((path, rest)) if !path.contains(' ') => rest.to_string(),
        _ => e.to_string(),
    }
}

/// startTime and the conditions' lastTransitionTime, kept apart from the compared status.
#[derive(Default)]
pub(super) struct Times {
    started: HashMap<String, String>,
    /// (key, condition type) → (status, since).
    transitions: HashMap<(String, String), (String, String)>,
}

impl Times {
    pub(super) fn stamp(&mut self, key: &str, status: &Value) -> Value {
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

    pub(super) fn retain(&mut self, known: &BTreeMap<String, Known>) {
        self.started.retain(|k, _| known.contains_key(k));
        self.transitions.retain(|(k, _), _| known.contains_key(k));
    }
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
            qos: 0,
            priority: 0,
            created: String::new(),
            evicted: false,
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
        assert!(
            pod_status(&r, &own_network, Some(ip))["podIP"].is_null(),
            "no address from CNI yet: none"
        );
        let with_address = PodReport {
            ip: Some("10.88.0.5".into()),
            ..r.clone()
        };
        let s = pod_status(&with_address, &own_network, Some(ip));
        assert_eq!(
            (s["podIP"].as_str(), s["hostIP"].as_str()),
            (Some("10.88.0.5"), Some("192.0.2.7"))
        );
        assert_eq!(s["podIPs"], json!([{"ip": "10.88.0.5"}]));
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
}
