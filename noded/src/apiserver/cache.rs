//! The pods bound to this node, mirrored into the cache directory the reconciler
//! runs: one manifest per pod, written as the watch sees them and emptied only by the
//! server (a delete, or a relist without the pod).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher;
use serde_json::Value;

use crate::error::Error;

use super::events::{self, Transition};
use super::volumes::{self, Unresolved};
use super::{check_subdomain, edge_manifest, lock, Known, Limited, Retry, Settings, Shared};

/// Pods waiting on what their volumes or variables read are tried again this often.
const RETRY_UNRESOLVED: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) async fn watch_pods(shared: Arc<Shared>) {
    let s = &shared.settings;
    let api: Api<DynamicObject> =
        Api::all_with(shared.client.clone(), &ApiResource::erase::<Pod>(&()));
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", s.node_name));
    let stream = kube::runtime::WatchStreamExt::backoff(watcher(api, wc), Retry::new(s.retry_max));
    let mut stream = std::pin::pin!(stream);
    let mut log = Limited::new("watching this node's pods");
    let mut listed: Option<BTreeSet<String>> = None;
    let mut retry = tokio::time::interval(RETRY_UNRESOLVED);
    loop {
        let event = tokio::select! {
            e = stream.next() => match e {
                Some(e) => e,
                None => break,
            },
            _ = retry.tick() => {
                let mut again: Vec<DynamicObject> =
                    lock(&shared.unresolved).values().map(|(p, _)| p.clone()).collect();
                // Pods whose tokens are due to be asked for again.
                let now = std::time::Instant::now();
                again.extend(
                    lock(&shared.refresh)
                        .values()
                        .filter(|(due, _)| *due <= now)
                        .map(|(_, p)| p.clone()),
                );
                for pod in again {
                    apply(&shared, &pod).await;
                }
                continue;
            }
        };
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
                if let (Some(key), Some(l)) = (apply(&shared, &pod).await, listed.as_mut()) {
                    l.insert(key);
                }
            }
            watcher::Event::InitDone => {
                if let Some(l) = listed.take() {
                    prune(&shared, &l);
                }
            }
            watcher::Event::Apply(pod) => {
                apply(&shared, &pod).await;
            }
            watcher::Event::Delete(pod) => {
                if let Some(key) = cache_key(&pod) {
                    tracing::info!(pod = %key, "pod deleted on the API server");
                    remove_cached(s, &key);
                    lock(&shared.known).remove(&key);
                    lock(&shared.unresolved).remove(&key);
                    lock(&shared.refresh).remove(&key);
                    lock(&shared.evicted).remove(&key);
                }
            }
        }
    }
}

/// `<namespace>_<name>.yaml`, if both are names Kubernetes allows (no `/`, `_` or
/// leading dot can reach a path).
pub(super) fn cache_key(pod: &DynamicObject) -> Option<String> {
    let name = pod.metadata.name.as_deref()?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    if check_subdomain(name).is_err() || check_subdomain(ns).is_err() {
        tracing::warn!("ignoring a pod named {ns:?}/{name:?} by the API server: not a valid name");
        return None;
    }
    Some(format!("{ns}_{name}.yaml"))
}

/// Mirrors one pod into the cache, with what its volumes and variables read from the
/// server (volumes.rs); returns its key.
pub(super) async fn apply(shared: &Arc<Shared>, pod: &DynamicObject) -> Option<String> {
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
        qos: match full["status"]["qosClass"].as_str() {
            Some("Guaranteed") => 2,
            Some("Burstable") => 1,
            _ => 0,
        },
        priority: full["spec"]["priority"].as_i64().unwrap_or(0),
        created: full["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        // Evicted by this noded, or (after a restart) failed as evicted at the server.
        evicted: lock(&shared.evicted)
            .get(&key)
            .is_some_and(|(uid, _, _)| Some(uid) == pod.metadata.uid.as_ref())
            || (full["status"]["phase"] == "Failed" && full["status"]["reason"] == "Evicted"),
    };
    let previous = lock(&shared.known).insert(key.clone(), known.clone());
    if known.evicted && !deleting {
        remove_cached(s, &key);
        return Some(key);
    }
    if deleting {
        lock(&shared.unresolved).remove(&key);
        lock(&shared.refresh).remove(&key);
        if previous.is_none_or(|p| !p.deleting) {
            tracing::info!(pod = %key, "pod being deleted on the API server: stopping it");
        }
        remove_cached(s, &key);
        return Some(key);
    }
    let (mut manifest, dropped) = edge_manifest(&full);
    if volumes::needs_resolving(&manifest) {
        match volumes::resolve(shared, &full, &mut manifest).await {
            Ok(resolved) => {
                let dir = volumes::pod_dir(&s.cache_dir, &key);
                if let Err(e) = volumes::write_volumes(&dir, &resolved.volumes, &mut manifest) {
                    tracing::error!(pod = %key, "failed to write the pod's volumes: {e}");
                    return Some(key);
                }
                match resolved.refresh {
                    Some(due) => {
                        lock(&shared.refresh).insert(key.clone(), (due, pod.clone()));
                    }
                    None => {
                        lock(&shared.refresh).remove(&key);
                    }
                }
                if lock(&shared.unresolved).remove(&key).is_some() {
                    tracing::info!(pod = %key, "what the pod reads from the API server is there now");
                }
            }
            Err(u) => {
                unresolved(shared, &key, pod, &known, u);
                return Some(key);
            }
        }
    }
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
    // Root's alone: a variable may hold a secret's value.
    match edge_common::write_atomic(&path, text.as_bytes(), 0o600)
        .map_err(Error::io("failed to write", &path))
    {
        Ok(()) => {
            crate::pods::wake();
            tracing::info!(pod = %key, "pod from the API server cached");
            if !dropped.is_empty() {
                tracing::info!(pod = %key, "dropped from the pod (not applicable at the edge): {}", dropped.join(", "));
            }
        }
        Err(e) => tracing::error!(pod = %key, "failed to cache the pod: {e}"),
    }
    Some(key)
}

/// A pod that cannot be cached yet: kept to be tried again, and told once per reason
/// (the log, and a `FailedMount` event as kubelet records).
fn unresolved(shared: &Arc<Shared>, key: &str, pod: &DynamicObject, known: &Known, u: Unresolved) {
    let message = u.message().to_string();
    let before = lock(&shared.unresolved).insert(key.to_string(), (pod.clone(), message.clone()));
    if before.is_some_and(|(_, m)| m == message) {
        return;
    }
    match &u {
        Unresolved::Waiting(m) => tracing::warn!(pod = %key, "not started until it can be: {m}"),
        Unresolved::Refused(m) => tracing::error!(pod = %key, "refused: {m}"),
    }
    events::record(
        shared,
        known,
        Transition {
            warning: true,
            reason: "FailedMount",
            message,
        },
    );
}

/// After a relist: cached pods the server no longer has are removed.
pub(super) fn prune(shared: &Shared, listed: &BTreeSet<String>) {
    let s = &shared.settings;
    lock(&shared.known).retain(|k, _| listed.contains(k));
    lock(&shared.unresolved).retain(|k, _| listed.contains(k));
    lock(&shared.refresh).retain(|k, _| listed.contains(k));
    lock(&shared.evicted).retain(|k, _| listed.contains(k));
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

pub(super) fn remove_cached(s: &Settings, key: &str) {
    volumes::remove(&s.cache_dir, key);
    let path = s.cache_dir.join(key);
    match std::fs::remove_file(&path) {
        Ok(()) => crate::pods::wake(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!("failed to remove {}: {e}", path.display()),
    }
}
