//! The Node and its Lease: registration, the Node's status and labels, and the
//! heartbeat that keeps it Ready.

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams, TypeMeta};
use serde_json::{json, Value};

use crate::cri::api::ListImagesRequest;
use crate::error::Error;

use super::conditions::{self, Measured};
use super::events::{self, Transition};

use super::{
    arch, first_ipv4, lock, meminfo_kib, micro_now, os_image, time_now, timed, Limited, Retry,
    Shared, LEASE_NAMESPACE, MAX_PODS,
};

pub(super) async fn node_and_lease(shared: Arc<Shared>) {
    let s = &shared.settings;
    // Objects go through DynamicObject (JSON) rather than k8s-openapi's structs: their
    // generated (de)serializers would add megabytes to the binary for the few fields
    // noded reads.
    let nodes: Api<DynamicObject> =
        Api::all_with(shared.client.clone(), &ApiResource::erase::<Node>(&()));
    let leases: Api<DynamicObject> = Api::namespaced_with(
        shared.client.clone(),
        LEASE_NAMESPACE,
        &ApiResource::erase::<Lease>(&()),
    );
    let mut node_uid: Option<String> = None;
    let mut lease: Option<DynamicObject> = None;
    let mut next_status = Instant::now();
    let (mut node_log, mut lease_log) = (
        Limited::new("registering the node"),
        Limited::new("renewing the node's lease"),
    );
    let mut retry = Retry::new(s.retry_max);
    let mut started_told = false;
    loop {
        let mut failed = false;
        if node_uid.is_none() {
            refresh_images(&shared).await;
            match timed(register(&shared, &nodes)).await {
                Ok(uid) => {
                    node_log.ok();
                    tracing::info!(node = %s.node_name, "node registered");
                    if !started_told {
                        started_told = true;
                        events::record_node(
                            &shared,
                            Transition {
                                warning: false,
                                reason: "Starting",
                                message: format!("Starting noded {}.", env!("CARGO_PKG_VERSION")),
                            },
                        );
                    }
                    tell_conditions(&shared);
                    node_uid = Some(uid);
                    next_status = Instant::now() + s.node_status_every;
                }
                Err(e) => {
                    node_log.fail(&e);
                    failed = true;
                }
            }
        } else if Instant::now() >= next_status {
            refresh_images(&shared).await;
            // Strategic: conditions (and addresses) merge by type, so conditions other
            // components set on the Node stay.
            let patch = json!({ "status": node_status(&shared) });
            match timed(nodes.patch_status(
                &s.node_name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            ))
            .await
            {
                Ok(_) => {
                    node_log.ok();
                    tell_conditions(&shared);
                    next_status = Instant::now() + s.node_status_every;
                }
                Err(Error::ApiCall {
                    code: Some(404), ..
                }) => {
                    tracing::warn!(node = %s.node_name, "the node was deleted on the API server: registering it again");
                    node_uid = None;
                    failed = true;
                }
                Err(e) => {
                    node_log.fail(&e);
                    failed = true;
                }
            }
        }
        match timed(renew(&shared, &leases, &mut lease, node_uid.as_deref())).await {
            Ok(()) => lease_log.ok(),
            Err(e) => {
                // A conflict or any other failure: read it afresh next time.
                lease = None;
                lease_log.fail(&e);
                failed = true;
            }
        }
        let wait = if failed {
            retry.next_delay().min(s.renew_every)
        } else {
            retry.reset();
            s.renew_every
        };
        tokio::time::sleep(wait).await;
    }
}

/// The conditions' changes the server took, as Node events (`NodeReady`,
/// `NodeHasDiskPressure`...).
fn tell_conditions(shared: &Arc<Shared>) {
    for (kind, status) in shared.transitions.take_untold() {
        if let Some((warning, reason)) = conditions::event_for(kind, status) {
            let node = &shared.settings.node_name;
            events::record_node(
                shared,
                Transition {
                    warning,
                    reason,
                    message: format!("Node {node} status is now: {reason}"),
                },
            );
        }
    }
}

/// The annotation naming the labels noded set on the Node (comma-separated keys), so a
/// label taken out of the config is taken off the Node, and labels others set stay.
pub const LABELS_ANNOTATION: &str = "noded.edgeos.io/labels";

/// Creates the Node, or brings an existing one's labels up to date; returns its uid.
pub(super) async fn register(
    shared: &Shared,
    nodes: &Api<DynamicObject>,
) -> Result<String, kube::Error> {
    let s = &shared.settings;
    let ours: Vec<&str> = s.labels.keys().map(String::as_str).collect();
    let annotations = json!({ LABELS_ANNOTATION: ours.join(",") });
    let node: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": s.node_name, "labels": s.labels, "annotations": annotations },
        "status": node_status(shared),
    }))
    .map_err(kube::Error::SerdeError)?;
    let created = match nodes.create(&PostParams::default(), &node).await {
        Ok(n) => n,
        Err(kube::Error::Api(e)) if e.is_already_exists() => {
            // The labels noded set before and no longer has are removed (null in a
            // merge patch); the others the Node has are not noded's to touch.
            let before = nodes.get(&s.node_name).await?;
            let mut labels = serde_json::Map::new();
            if let Some(old) = before
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LABELS_ANNOTATION))
            {
                for k in old.split(',').filter(|k| !k.is_empty()) {
                    if !s.labels.contains_key(k) {
                        labels.insert(k.to_string(), Value::Null);
                    }
                }
            }
            for (k, v) in &s.labels {
                labels.insert(k.clone(), Value::String(v.clone()));
            }
            let patch = json!({ "metadata": { "labels": labels, "annotations": annotations } });
            nodes
                .patch(&s.node_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            let status = json!({ "status": node_status(shared) });
            nodes
                .patch_status(
                    &s.node_name,
                    &PatchParams::default(),
                    &Patch::Strategic(&status),
                )
                .await?
        }
        Err(e) => return Err(e),
    };
    Ok(created.metadata.uid.unwrap_or_default())
}

/// The Node's status as noded sees the host now.
pub(super) fn node_status(shared: &Shared) -> Value {
    let s = &shared.settings;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = meminfo_kib("MemTotal").map(|k| format!("{k}Ki"));
    let mut resources = json!({ "cpu": cpus.to_string(), "pods": MAX_PODS.to_string() });
    if let Some(m) = memory {
        resources["memory"] = m.into();
    }
    let mut addresses = Vec::new();
    // Behind the tunnel the box's name is its only address: the API server dials the
    // address it prefers (kubeadm's prefer InternalIP), konnectivity-server sends the
    // dial to an agent known by it, and boxes behind NAT can share a site address, so
    // by address the dial could reach another box.
    if let (Some(ip), None) = (shared.host_ip, &s.tunnel) {
        addresses.push(json!({ "type": "InternalIP", "address": ip.to_string() }));
    }
    addresses.push(json!({ "type": "Hostname", "address": s.node_name }));
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    };
    let port = if s.tunnel.is_some() {
        super::tunnel::KUBELET_PORT
    } else {
        0
    };
    json!({
        "daemonEndpoints": { "kubeletEndpoint": { "Port": port } },
        "capacity": resources,
        "allocatable": resources,
        "addresses": addresses,
        "conditions": shared.transitions.conditions(
            &Measured::now(&s.cache_dir, first_ipv4().is_some()),
            &s.thresholds,
            &time_now(),
            &shared.started,
        ),
        "images": lock(&shared.images).clone(),
        "nodeInfo": {
            "machineID": read("/etc/machine-id"),
            "systemUUID": read("/sys/class/dmi/id/product_uuid"),
            "bootID": read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": read("/proc/sys/kernel/osrelease"),
            "osImage": os_image(),
            "containerRuntimeVersion": s.runtime_version,
            "kubeletVersion": format!("noded/{}", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": arch(),
        },
    })
}

/// The images containerd holds, as `status.images` lists them (names and size), most
/// recent first in containerd's order; kept as they were when containerd does not answer.
async fn refresh_images(shared: &Shared) {
    let Some(cri) = &shared.cri else { return };
    let Ok(Ok(list)) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        cri.list_images(ListImagesRequest { filter: None }),
    )
    .await
    else {
        return;
    };
    let images: Vec<Value> = list
        .images
        .iter()
        .map(|i| {
            let names: Vec<&String> = i.repo_tags.iter().chain(&i.repo_digests).collect();
            json!({ "names": names, "sizeBytes": i.size })
        })
        .filter(|i| i["names"].as_array().is_some_and(|n| !n.is_empty()))
        .collect();
    *lock(&shared.images) = Value::Array(images);
}

/// Renews (or creates) the node's Lease, as kubelet does: holder, duration, renewTime.
pub(super) async fn renew(
    shared: &Shared,
    leases: &Api<DynamicObject>,
    cached: &mut Option<DynamicObject>,
    node_uid: Option<&str>,
) -> Result<(), kube::Error> {
    let s = &shared.settings;
    let duration = i32::try_from(s.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let mut lease = match cached.take() {
        Some(l) => l,
        None => match leases.get_opt(&s.node_name).await? {
            Some(l) => l,
            None => {
                let mut meta = json!({ "name": s.node_name, "namespace": LEASE_NAMESPACE });
                if let Some(uid) = node_uid.filter(|u| !u.is_empty()) {
                    meta["ownerReferences"] = json!([{
                        "apiVersion": "v1", "kind": "Node", "name": s.node_name, "uid": uid,
                    }]);
                }
                let lease: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": meta,
                    "spec": {
                        "holderIdentity": s.node_name,
                        "leaseDurationSeconds": duration,
                        "renewTime": micro_now(),
                    },
                }))
                .map_err(kube::Error::SerdeError)?;
                *cached = Some(leases.create(&PostParams::default(), &lease).await?);
                return Ok(());
            }
        },
    };
    lease.types = Some(TypeMeta {
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
    });
    let spec = &mut lease.data["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    spec["holderIdentity"] = s.node_name.clone().into();
    spec["leaseDurationSeconds"] = duration.into();
    spec["renewTime"] = micro_now();
    *cached = Some(
        leases
            .replace(&s.node_name, &PostParams::default(), &lease)
            .await?,
    );
    Ok(())
}
