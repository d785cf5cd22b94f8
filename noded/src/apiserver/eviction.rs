//! Eviction under pressure, as kubelet's hard eviction does it: while memory or the
//! data partition is under its threshold (`Settings::thresholds`, the same the Node's
//! MemoryPressure and DiskPressure conditions use), one running pod from the API server
//! is evicted every `Settings::eviction_every`: BestEffort before Burstable before
//! Guaranteed, then the lowest `spec.priority`, then the newest. The pod's cached
//! manifest goes (the reconciler stops it and it is not cached again), the server gets
//! it as `Failed` with reason `Evicted` and a message naming the resource, and an
//! `Evicted` event; its controller makes a replacement, which the scheduler keeps off
//! this node while the node lifecycle controller taints it for the pressure.
//!
//! The box's own pods (the image's and the site's manifest directories) are never
//! evicted: they are what keeps the box working, as kubelet spares static pods.

use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::json;

use super::cache::remove_cached;
use super::calls::{timed, Limited};
use super::conditions::{pressure, Measured};
use super::events::{self, Transition};
use super::{first_ipv4, Known, Shared};
use crate::pods::{Status, API_PREFIX};
use edge_common::lock;

pub(super) async fn evict_under_pressure(shared: Arc<Shared>, status: Status) {
    let s = &shared.settings;
    let mut log = Limited::new("telling the API server of an evicted pod");
    loop {
        tokio::time::sleep(s.eviction_every).await;
        tell(&shared, &mut log).await;
        let measured = Measured::now(&s.cache_dir, first_ipv4().is_some());
        let Some((resource, why)) = pressure(&measured, &s.thresholds) else {
            continue;
        };
        let running: BTreeSet<String> = lock(&status)
            .iter()
            .filter(|p| p.state == "running" || p.state == "initializing")
            .filter_map(|p| p.file.strip_prefix(API_PREFIX).map(str::to_string))
            .collect();
        let victim = lock(&shared.known)
            .iter()
            .filter(|(k, p)| !p.deleting && !p.evicted && running.contains(*k))
            .min_by_key(|(_, p)| (p.qos, p.priority, Reverse(p.created.clone())))
            .map(|(k, p)| (k.clone(), p.clone()));
        let Some((key, pod)) = victim else {
            continue;
        };
        evict(&shared, &key, &pod, resource, &why);
        tell(&shared, &mut log).await;
    }
}

/// Stops the pod for good on this node and keeps it to be told to the server.
fn evict(shared: &Arc<Shared>, key: &str, pod: &Known, resource: &str, why: &str) {
    let message = format!("The node was low on resource: {resource}. {why}.");
    tracing::warn!(pod = %key, "evicting the pod: {message}");
    lock(&shared.evicted).insert(key.to_string(), (pod.uid.clone(), message.clone(), false));
    if let Some(k) = lock(&shared.known).get_mut(key) {
        k.evicted = true;
    }
    remove_cached(&shared.settings, key);
    events::record(
        shared,
        pod,
        Transition {
            warning: true,
            reason: "Evicted",
            message,
        },
    );
}

/// Sends `Failed`/`Evicted` for each evicted pod the server has not taken yet.
async fn tell(shared: &Arc<Shared>, log: &mut Limited) {
    let untold: Vec<(String, String, String)> = lock(&shared.evicted)
        .iter()
        .filter(|(_, (_, _, told))| !told)
        .map(|(k, (uid, message, _))| (k.clone(), uid.clone(), message.clone()))
        .collect();
    for (key, uid, message) in untold {
        let Some(pod) = lock(&shared.known).get(&key).cloned() else {
            lock(&shared.evicted).remove(&key);
            continue;
        };
        let api: Api<DynamicObject> = Api::namespaced_with(
            shared.client.clone(),
            &pod.namespace,
            &ApiResource::erase::<Pod>(&()),
        );
        let patch = json!({
            "metadata": { "uid": uid },
            "status": { "phase": "Failed", "reason": "Evicted", "message": message },
        });
        match timed(api.patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(&patch)))
            .await
        {
            // Gone or replaced at the server: nothing left to tell.
            Ok(_)
            | Err(crate::error::Error::ApiCall {
                code: Some(404 | 409),
                ..
            }) => {
                log.ok();
                if let Some(e) = lock(&shared.evicted).get_mut(&key) {
                    e.2 = true;
                }
            }
            Err(e) => {
                log.fail(&e);
                return;
            }
        }
    }
}
