//! noded as the dynamic provisioner of storaged's volumes for its own node, in the place
//! of the upstream external-provisioner and external-resizer sidecars (which would be
//! two more Go processes and a CSI controller socket on a box with one node).
//!
//! A StorageClass whose `provisioner` is `storaged.edgeos` and whose binding mode is
//! `WaitForFirstConsumer` (image/examples/storage.yaml) leaves a claim unbound until the
//! scheduler puts its first pod on a node and names that node in the claim's
//! `volume.kubernetes.io/selected-node` annotation. The noded of that node then:
//! - creates the storaged volume `pvc-<claim uid>` with the claim's size, access mode
//!   and volume mode (and the class's `csi.storage.k8s.io/fstype`), and the
//!   PersistentVolume for it, bound to the claim, labelled with this node and with a
//!   node affinity to it; the controller manager binds the two and the scheduler the pod.
//!   A claim or class that asks for what storaged cannot give is a `ProvisioningFailed`
//!   event on the claim naming the field, told once, retried.
//! - grows the volume, its filesystem and the PersistentVolume when the claim asks for
//!   more (the class must allow expansion; the API server refuses the edit otherwise),
//!   and reports the new capacity in the claim's status.
//! - once the claim is deleted and its PersistentVolume `Released`, deletes the volume
//!   and then the PersistentVolume when its reclaim policy is `Delete`; `Retain` keeps
//!   both for the operator.
//!
//! noded watches every claim (the selected node is an annotation, which no selector
//! reaches) and the PersistentVolumes labelled with its node, as the upstream
//! provisioner does in its per-node mode; it acts on each change and every 10 s, and
//! every step is idempotent, so a change seen twice only repeats one. A pod's claim
//! becomes its `csi` volume in `volumes.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

use super::calls::{timed, Limited, Retry};
use super::events::{self, Transition};
use super::Shared;
use crate::error::Error;
use crate::manifest::{parse_memory, AccessMode, CsiVolume, CSI_DRIVER};
use crate::volumes::Volumes;

/// Where the scheduler names the node a claim's first pod goes to.
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Where the controller manager names the provisioner it waits for.
const PROVISIONER_KEYS: [&str; 2] = [
    "volume.kubernetes.io/storage-provisioner",
    "volume.beta.kubernetes.io/storage-provisioner",
];
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// The label on each PersistentVolume noded made, naming its node.
pub const NODE_LABEL: &str = "noded.edgeos.io/node";
/// The one class parameter storaged takes (CSI's well-known key).
const FS_PARAMETER: &str = "csi.storage.k8s.io/fstype";
/// What failed (a volume storaged could not make yet, a PersistentVolume not created)
/// is tried again this often, besides at every change the watches see.
const RETRY: Duration = Duration::from_secs(10);

pub(super) async fn run(shared: Arc<Shared>, volumes: Volumes) {
    use kube::runtime::{reflector, watcher, WatchStreamExt};
    let s = &shared.settings;
    let (claims, claims_in) = reflector::store::<PersistentVolumeClaim>();
    let (pvs, pvs_in) = reflector::store::<PersistentVolume>();
    let mine = watcher::Config::default().labels(&format!("{NODE_LABEL}={}", s.node_name));
    let claim_events = reflector(
        claims_in,
        watcher(Api::all(shared.client.clone()), watcher::Config::default()),
    )
    .backoff(Retry::new(s.retry_max))
    .map(|e| e.map(drop));
    let pv_events = reflector(pvs_in, watcher(Api::all(shared.client.clone()), mine))
        .backoff(Retry::new(s.retry_max))
        .map(|e| e.map(drop));
    let mut events = std::pin::pin!(futures_util::stream::select(claim_events, pv_events));
    let mut log = Limited::new("watching claims to provision");
    let mut told = Told::default();
    let mut forbidden = false;
    let mut retry = tokio::time::interval(RETRY);
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some(e) => if !heard(e, &mut log, &mut forbidden) {
                    continue;
                },
                None => return,
            },
            _ = retry.tick() => {}
        }
        // One pass for a burst of changes (an error among them told as above).
        while let Some(Some(e)) = events.next().now_or_never() {
            if !heard(e, &mut log, &mut forbidden) {
                break;
            }
        }
        let (claims, pvs) = (claims.state(), pvs.state());
        for pvc in claims.iter().filter(|c| waits_for(c, &s.node_name)) {
            provision(&shared, &volumes, pvc, &mut told).await;
        }
        for pv in &pvs {
            look_after(&shared, &volumes, pv, &claims, &mut told).await;
        }
        // What was told of objects that are gone is forgotten.
        told.0.retain(|uid, _| {
            let is = |m: &kube::api::ObjectMeta| m.uid.as_deref() == Some(uid);
            claims.iter().any(|c| is(&c.metadata)) || pvs.iter().any(|v| is(&v.metadata))
        });
    }
}

/// Tells a watch error once (a cluster whose operator has not let nodes read claims, no
/// claims from storaged there, as one info line); false for an error.
fn heard(
    e: Result<(), kube::runtime::watcher::Error>,
    log: &mut Limited,
    forbidden: &mut bool,
) -> bool {
    use kube::runtime::watcher;
    match e {
        Ok(()) => {
            *forbidden = false;
            log.ok();
            true
        }
        Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) if status.code == 403 => {
            if !*forbidden {
                tracing::info!(
                    "claims are not provisioned here until the core lets nodes list them \
                     (image/examples/storage.yaml): {}",
                    status.message
                );
                *forbidden = true;
            }
            false
        }
        Err(e) => {
            log.fail(&e);
            false
        }
    }
}

/// The last warning told per object (uid): a failure retried every pass is one event.
#[derive(Default)]
struct Told(BTreeMap<String, String>);

impl Told {
    fn warn(
        &mut self,
        shared: &Arc<Shared>,
        involved: &Value,
        reason: &'static str,
        message: String,
    ) {
        let uid = involved["uid"].as_str().unwrap_or_default().to_string();
        if self.0.get(&uid) == Some(&message) {
            return;
        }
        tracing::warn!(object = %involved["name"], "{reason}: {message}");
        self.0.insert(uid, message.clone());
        let t = Transition {
            warning: true,
            reason,
            message,
        };
        events::record_on(shared, namespace_of(involved), involved.clone(), t);
    }

    fn tell(&mut self, shared: &Arc<Shared>, involved: &Value, reason: &'static str, m: String) {
        tracing::info!(object = %involved["name"], "{reason}: {m}");
        self.0.remove(involved["uid"].as_str().unwrap_or_default());
        let t = Transition {
            warning: false,
            reason,
            message: m,
        };
        events::record_on(shared, namespace_of(involved), involved.clone(), t);
    }
}

/// An object's namespace for its events: `default` for a cluster-scoped one.
fn namespace_of(involved: &Value) -> &str {
    involved["namespace"].as_str().unwrap_or("default")
}

fn annotation<'a>(meta: &'a kube::api::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// An unbound claim, not being deleted, that the scheduler gave this node and the
/// controller manager gave storaged.
fn waits_for(pvc: &PersistentVolumeClaim, node: &str) -> bool {
    let m = &pvc.metadata;
    annotation(m, SELECTED_NODE) == Some(node)
        && PROVISIONER_KEYS
            .iter()
            .any(|k| annotation(m, k) == Some(CSI_DRIVER))
        && m.deletion_timestamp.is_none()
        && pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref())
            .is_none_or(str::is_empty)
}

fn reference(kind: &str, m: &kube::api::ObjectMeta) -> Value {
    let mut r = json!({
        "apiVersion": "v1", "kind": kind,
        "name": m.name.clone().unwrap_or_default(),
        "uid": m.uid.clone().unwrap_or_default(),
    });
    if let Some(ns) = &m.namespace {
        r["namespace"] = json!(ns);
    }
    r
}

async fn provision(
    shared: &Arc<Shared>,
    volumes: &Volumes,
    pvc: &PersistentVolumeClaim,
    told: &mut Told,
) {
    let involved = reference("PersistentVolumeClaim", &pvc.metadata);
    let class_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default();
    let classes: Api<StorageClass> = Api::all(shared.client.clone());
    let class = match timed(classes.get_opt(&class_name)).await {
        Ok(Some(c)) if c.provisioner == CSI_DRIVER => c,
        Ok(Some(_)) => return,
        Ok(None) => {
            let m = format!("StorageClass {class_name:?} not found");
            return told.warn(shared, &involved, "ProvisioningFailed", m);
        }
        Err(e) => {
            tracing::warn!(class = %class_name, "reading the claim's StorageClass failed: {e}");
            return;
        }
    };
    let volume = match wanted(pvc, &class) {
        Ok(v) => v,
        Err(e) => return told.warn(shared, &involved, "ProvisioningFailed", e),
    };
    let size = match volumes.create(&volume).await {
        Ok(s) => s,
        Err(e) => {
            let m = format!("storaged volume {}: {e}", volume.volume);
            return told.warn(shared, &involved, "ProvisioningFailed", m);
        }
    };
    let node = &shared.settings.node_name;
    let pv = persistent_volume(pvc, &class, &volume, size, node);
    let pvs: Api<PersistentVolume> = Api::all(shared.client.clone());
    let pv: PersistentVolume = match serde_json::from_value(pv) {
        Ok(pv) => pv,
        Err(e) => return tracing::error!("a PersistentVolume noded cannot express: {e}"),
    };
    match timed(pvs.create(&PostParams::default(), &pv)).await {
        Ok(_) => {
            let m = format!(
                "Successfully provisioned volume {} ({} of storaged on {node})",
                volume.volume,
                quantity(size)
            );
            told.tell(shared, &involved, "ProvisioningSucceeded", m);
        }
        // Made by an earlier pass whose claim the list had not seen bound yet.
        Err(Error::ApiCall {
            code: Some(409), ..
        }) => {}
        Err(e) => {
            let m = format!("PersistentVolume {}: {e}", volume.volume);
            told.warn(shared, &involved, "ProvisioningFailed", m);
        }
    }
}

/// The storaged volume a claim and its class ask for; the error names the claim's field
/// or the class's parameter that storaged cannot give.
fn wanted(
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
) -> std::result::Result<CsiVolume, String> {
    let claim = format!(
        "claim {}/{}",
        pvc.metadata.namespace.as_deref().unwrap_or_default(),
        pvc.metadata.name.as_deref().unwrap_or_default()
    );
    let bad = |field: &str, why: &str| format!("{claim}: {field}: {why}");
    let spec = pvc.spec.as_ref().ok_or_else(|| bad("spec", "missing"))?;
    if spec.data_source.is_some() || spec.data_source_ref.is_some() {
        return Err(bad(
            "spec.dataSource",
            "storaged's volumes start empty (no clones or snapshots)",
        ));
    }
    if spec.selector.is_some() {
        return Err(bad(
            "spec.selector",
            "a dynamically provisioned claim cannot select volumes",
        ));
    }
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .ok_or_else(|| bad("spec.resources.requests.storage", "is required"))?;
    let size_bytes = parse_memory(&size.0)
        .map_err(|e| bad("spec.resources.requests.storage", &e.to_string()))?;
    let modes = spec.access_modes.clone().unwrap_or_default();
    let access_mode = access_mode(&modes).map_err(|e| bad("spec.accessModes", &e))?;
    let block = match spec.volume_mode.as_deref() {
        None | Some("Filesystem") => false,
        Some("Block") => true,
        Some(o) => return Err(bad("spec.volumeMode", &format!("{o:?} is not a mode"))),
    };
    if block && access_mode != AccessMode::ReadWriteOnce {
        return Err(bad(
            "spec.accessModes",
            "a Block volume is ReadWriteOnce (only filesystems are shared)",
        ));
    }
    let class_name = class.metadata.name.as_deref().unwrap_or_default();
    let mut fs_type = "ext4".to_string();
    for (k, v) in class.parameters.iter().flatten() {
        match (k.as_str(), v.as_str()) {
            (FS_PARAMETER, "ext4" | "xfs") => fs_type = v.clone(),
            (FS_PARAMETER, other) => {
                return Err(format!(
                    "StorageClass {class_name:?}: parameter {k}: {other:?} is not ext4 or xfs"
                ))
            }
            _ => {
                return Err(format!(
                    "StorageClass {class_name:?}: parameter {k:?} is not one storaged takes \
                     (only {FS_PARAMETER})"
                ))
            }
        }
    }
    Ok(CsiVolume {
        volume: format!("pvc-{}", pvc.metadata.uid.as_deref().unwrap_or_default()),
        size_bytes,
        access_mode,
        block,
        fs_type: if block { String::new() } else { fs_type },
        read_only: false,
    })
}

/// Kubernetes' access modes as storaged's on this one node: every pod that mounts the
/// volume runs here, so the widest mode asked for is the one it gets.
pub(super) fn access_mode(modes: &[String]) -> std::result::Result<AccessMode, String> {
    if modes.is_empty() {
        return Err("at least one is required".into());
    }
    if let Some(m) = modes.iter().find(|m| {
        !matches!(
            m.as_str(),
            "ReadWriteOnce" | "ReadWriteOncePod" | "ReadWriteMany" | "ReadOnlyMany"
        )
    }) {
        return Err(format!("{m:?} is not an access mode"));
    }
    let has = |m: &str| modes.iter().any(|x| x == m);
    Ok(if has("ReadWriteMany") {
        AccessMode::ReadWriteMany
    } else if has("ReadWriteOnce") || has("ReadWriteOncePod") {
        AccessMode::ReadWriteOnce
    } else {
        AccessMode::ReadOnlyMany
    })
}

/// The PersistentVolume for a provisioned claim: bound to it, on this node only.
fn persistent_volume(
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    v: &CsiVolume,
    size: i64,
    node: &str,
) -> Value {
    let spec = pvc.spec.clone().unwrap_or_default();
    // The size it was made with, which a pod's volume names: a grown volume's pods are
    // not restarted for a changed manifest.
    let mut csi = json!({"driver": CSI_DRIVER, "volumeHandle": v.volume,
        "volumeAttributes": {"size": quantity(size)}});
    if !v.fs_type.is_empty() {
        csi["fsType"] = json!(v.fs_type);
    }
    let mut claim = reference("PersistentVolumeClaim", &pvc.metadata);
    claim["resourceVersion"] = json!(pvc.metadata.resource_version);
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": v.volume,
            "labels": {NODE_LABEL: node},
            "annotations": {PROVISIONED_BY: CSI_DRIVER},
        },
        "spec": {
            "capacity": {"storage": quantity(size)},
            "accessModes": spec.access_modes,
            "persistentVolumeReclaimPolicy":
                class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "storageClassName": class.metadata.name,
            "volumeMode": if v.block { "Block" } else { "Filesystem" },
            "claimRef": claim,
            "csi": csi,
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
            ]}]}},
        },
    })
}

/// Bytes as a quantity the operator reads at a glance: `64Mi`, `2Gi`, or the bytes.
fn quantity(bytes: i64) -> String {
    match bytes {
        b if b > 0 && b % (1 << 30) == 0 => format!("{}Gi", b >> 30),
        b if b > 0 && b % (1 << 20) == 0 => format!("{}Mi", b >> 20),
        b => b.to_string(),
    }
}

/// A quantity in bytes, or 0 when missing or unreadable.
fn bytes(q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> i64 {
    q.and_then(|q| parse_memory(&q.0).ok()).unwrap_or(0)
}

/// A PersistentVolume noded made: reclaimed once released, grown when its claim asks
/// for more.
async fn look_after(
    shared: &Arc<Shared>,
    volumes: &Volumes,
    pv: &PersistentVolume,
    claims: &[Arc<PersistentVolumeClaim>],
    told: &mut Told,
) {
    let Some(spec) = &pv.spec else { return };
    let Some(csi) = spec.csi.as_ref().filter(|c| c.driver == CSI_DRIVER) else {
        return;
    };
    if annotation(&pv.metadata, PROVISIONED_BY) != Some(CSI_DRIVER)
        || pv.metadata.deletion_timestamp.is_some()
    {
        return;
    }
    let name = pv.metadata.name.clone().unwrap_or_default();
    let involved = reference("PersistentVolume", &pv.metadata);
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    let reclaim = spec.persistent_volume_reclaim_policy.as_deref();
    let pvs: Api<PersistentVolume> = Api::all(shared.client.clone());
    if phase == Some("Released") && reclaim == Some("Delete") {
        if let Err(e) = volumes.delete(&csi.volume_handle).await {
            let m = format!("storaged volume {}: {e}", csi.volume_handle);
            return told.warn(shared, &involved, "VolumeFailedDelete", m);
        }
        match timed(pvs.delete(&name, &DeleteParams::default())).await {
            Ok(_)
            | Err(Error::ApiCall {
                code: Some(404), ..
            }) => tracing::info!(volume = %name, "released volume deleted (reclaim policy Delete)"),
            Err(e) => told.warn(shared, &involved, "VolumeFailedDelete", e.to_string()),
        }
        return;
    }
    if phase != Some("Bound") {
        return;
    }
    let uid = spec.claim_ref.as_ref().and_then(|r| r.uid.as_deref());
    let Some(pvc) = claims
        .iter()
        .find(|c| uid.is_some() && c.metadata.uid.as_deref() == uid)
    else {
        return;
    };
    let claim = reference("PersistentVolumeClaim", &pvc.metadata);
    let want = bytes(
        pvc.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage")),
    );
    let mut have = bytes(spec.capacity.as_ref().and_then(|c| c.get("storage")));
    if want > have {
        let block = spec.volume_mode.as_deref() == Some("Block");
        match volumes.expand(&csi.volume_handle, want, block).await {
            Ok(size) => {
                let patch = json!({"spec": {"capacity": {"storage": quantity(size)}}});
                let p = Patch::Merge(&patch);
                if let Err(e) = timed(pvs.patch(&name, &PatchParams::default(), &p)).await {
                    return tracing::warn!(volume = %name, "recording the grown capacity failed: {e}");
                }
                have = size;
                let m = format!("volume {name} grown to {}", quantity(size));
                told.tell(shared, &claim, "VolumeResizeSuccessful", m);
            }
            Err(e) => {
                let m = format!("growing storaged volume {}: {e}", csi.volume_handle);
                return told.warn(shared, &claim, "VolumeResizeFailed", m);
            }
        }
    }
    // The claim's status says the volume's size (also retried after a failed patch).
    let reported = bytes(
        pvc.status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage")),
    );
    if have > reported && reported > 0 {
        let ns = pvc.metadata.namespace.as_deref().unwrap_or("default");
        let api: Api<PersistentVolumeClaim> = Api::namespaced(shared.client.clone(), ns);
        let patch = json!({"status": {"capacity": {"storage": quantity(have)}}});
        let pvc_name = pvc.metadata.name.as_deref().unwrap_or_default();
        let p = Patch::Merge(&patch);
        if let Err(e) = timed(api.patch_status(pvc_name, &PatchParams::default(), &p)).await {
            tracing::warn!(claim = %pvc_name, "reporting the claim's grown capacity failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(spec: Value) -> PersistentVolumeClaim {
        serde_json::from_value(json!({
            "metadata": {"name": "data", "namespace": "default", "uid": "1234",
                "annotations": {SELECTED_NODE: "edge0", PROVISIONER_KEYS[0]: CSI_DRIVER}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn class(parameters: Value) -> StorageClass {
        serde_json::from_value(json!({
            "metadata": {"name": "storaged-rwx"},
            "provisioner": CSI_DRIVER,
            "reclaimPolicy": "Retain",
            "parameters": parameters,
        }))
        .unwrap()
    }

    #[test]
    fn a_claim_becomes_a_storaged_volume_and_a_persistent_volume_on_this_node() {
        let pvc = claim(json!({"accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "64Mi"}}, "storageClassName": "storaged-rwx"}));
        assert!(waits_for(&pvc, "edge0"));
        assert!(!waits_for(&pvc, "edge1"), "another node's claim");
        let c = class(json!({FS_PARAMETER: "xfs"}));
        let v = wanted(&pvc, &c).unwrap();
        assert_eq!(v.volume, "pvc-1234");
        assert_eq!(v.size_bytes, 64 << 20);
        assert_eq!(v.access_mode, AccessMode::ReadWriteMany);
        assert_eq!(v.fs_type, "xfs");
        let pv = persistent_volume(&pvc, &c, &v, 64 << 20, "edge0");
        assert_eq!(pv["spec"]["claimRef"]["uid"], "1234");
        assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(pv["spec"]["csi"]["volumeHandle"], "pvc-1234");
        assert_eq!(pv["metadata"]["labels"][NODE_LABEL], "edge0");
        assert_eq!(pv["spec"]["capacity"]["storage"], "64Mi");
        assert_eq!(quantity(3 << 30), "3Gi");
        assert_eq!(quantity(1000), "1000");
        assert_eq!(
            pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
                ["values"][0],
            "edge0"
        );
        serde_json::from_value::<PersistentVolume>(pv).unwrap();
        // Bound already: nothing to provision.
        let bound = claim(json!({"volumeName": "pvc-1234", "accessModes": ["ReadWriteOnce"]}));
        assert!(!waits_for(&bound, "edge0"));
    }

    #[test]
    fn what_storaged_cannot_give_is_named() {
        let c = class(json!({}));
        for (spec, names) in [
            (
                json!({"accessModes": ["ReadWriteOnce"]}),
                "spec.resources.requests.storage",
            ),
            (
                json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "lots"}}}),
                "spec.resources.requests.storage",
            ),
            (
                json!({"accessModes": ["WriteSometimes"], "resources": {"requests": {"storage": "1Gi"}}}),
                "\"WriteSometimes\" is not an access mode",
            ),
            (
                json!({"accessModes": ["ReadWriteMany"], "volumeMode": "Block",
                    "resources": {"requests": {"storage": "1Gi"}}}),
                "Block volume is ReadWriteOnce",
            ),
            (
                json!({"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                    "dataSource": {"kind": "VolumeSnapshot", "name": "s"}}),
                "spec.dataSource",
            ),
        ] {
            let e = wanted(&claim(spec), &c).unwrap_err();
            assert!(e.contains(names) && e.contains("default/data"), "{e}");
        }
        let ok = claim(json!({"accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}}}));
        let e = wanted(&ok, &class(json!({"replicas": "3"}))).unwrap_err();
        assert!(
            e.contains("\"replicas\"") && e.contains("storaged-rwx"),
            "{e}"
        );
        let e = wanted(&ok, &class(json!({FS_PARAMETER: "btrfs"}))).unwrap_err();
        assert!(e.contains("btrfs"), "{e}");
    }

    #[test]
    fn the_widest_access_mode_asked_for_is_given() {
        let m = |v: &[&str]| access_mode(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(m(&["ReadWriteOncePod"]), Ok(AccessMode::ReadWriteOnce));
        assert_eq!(
            m(&["ReadOnlyMany", "ReadWriteOnce"]),
            Ok(AccessMode::ReadWriteOnce)
        );
        assert_eq!(
            m(&["ReadWriteOnce", "ReadWriteMany"]),
            Ok(AccessMode::ReadWriteMany)
        );
        assert_eq!(m(&["ReadOnlyMany"]), Ok(AccessMode::ReadOnlyMany));
        assert!(m(&[]).is_err());
    }
}
