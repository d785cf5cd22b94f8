//! What a pod takes from the API server besides its spec: configMap, secret and
//! downwardAPI volumes (and projected volumes made of those), and environment values
//! from `configMapKeyRef`, `secretKeyRef` and `fieldRef`, and whole ConfigMaps and
//! Secrets from `envFrom`; and `persistentVolumeClaim` volumes, as the `csi` volume of
//! the storaged volume bound to the claim (provisioner.rs). noded reads the objects the pod
//! names (the Node authorizer lets a node read those its pods reference), writes the
//! volumes' files under `<cache_dir>/.volumes/<namespace>_<name>/<volume>/` on the data
//! partition, and caches the pod with each such volume as a read-only `hostPath` of that
//! directory and each such variable as its value: the reconciler runs it as any other
//! manifest, through outages and reboots. A missing object (not `optional`) or a server
//! that does not answer leaves the pod uncached and retried; what cannot be done here
//! (a resource field, a cluster trust bundle) is refused naming it.
//!
//! A projected `serviceAccountToken` is asked for with a TokenRequest bound to the pod
//! (the Node authorizer lets a node ask for its pods' service accounts), and asked for
//! again once `Settings::token_refresh` of its lifetime has passed (at most a day), as
//! kubelet does: the new token replaces the file in place, so the running pod reads it
//! with no restart. Through an outage the last token stays until it expires.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use serde_json::{json, Value};

use super::{timed, Shared};
use crate::error::{Error, Result};

/// Why a pod cannot be cached yet, or at all.
#[derive(Debug)]
pub(super) enum Unresolved {
    /// An object it needs is not there, or the server did not answer: retried.
    Waiting(String),
    /// It asks for what noded cannot give: named; retried too (it may be deleted).
    Refused(String),
}

impl Unresolved {
    pub(super) fn message(&self) -> &str {
        match self {
            Unresolved::Waiting(m) | Unresolved::Refused(m) => m,
        }
    }
}

/// One file of a volume: its path inside the volume, its bytes and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct File {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Kubernetes' default file mode for these volumes (0644).
const DEFAULT_MODE: u32 = 0o644;

/// A ConfigMap's or Secret's keys and their bytes.
type Keys = BTreeMap<String, Vec<u8>>;

/// The objects a pod's volumes and variables read, fetched once each per pass.
struct Objects<'a> {
    shared: &'a Shared,
    namespace: String,
    /// (kind, name) → its keys, or `None` when the server has no such object.
    seen: BTreeMap<(&'static str, String), Option<Keys>>,
    /// When the first token written this pass is to be asked for again.
    refresh: Option<std::time::Instant>,
}

/// A pod's volume files by volume, and when its tokens are to be asked for again.
#[derive(Debug, Default)]
pub(super) struct Resolved {
    pub volumes: BTreeMap<String, Vec<File>>,
    pub refresh: Option<std::time::Instant>,
}

impl Objects<'_> {
    async fn get(
        &mut self,
        kind: &'static str,
        name: &str,
    ) -> std::result::Result<Option<&Keys>, Unresolved> {
        let k = (kind, name.to_string());
        if !self.seen.contains_key(&k) {
            let client = self.shared.client.clone();
            let fetched = match kind {
                "configmap" => {
                    let api: Api<ConfigMap> = Api::namespaced(client, &self.namespace);
                    timed(api.get_opt(name)).await.map(|o| {
                        o.map(|cm| {
                            let mut keys: Keys = cm
                                .data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.into_bytes()))
                                .collect();
                            for (k, v) in cm.binary_data.unwrap_or_default() {
                                keys.insert(k, v.0);
                            }
                            keys
                        })
                    })
                }
                _ => {
                    let api: Api<Secret> = Api::namespaced(client, &self.namespace);
                    timed(api.get_opt(name)).await.map(|o| {
                        o.map(|s| {
                            s.data
                                .unwrap_or_default()
                                .into_iter()
                                .map(|(k, v)| (k, v.0))
                                .collect()
                        })
                    })
                }
            };
            let v = fetched.map_err(|e: Error| {
                Unresolved::Waiting(format!("reading {kind} {:?}: {e}", name))
            })?;
            self.seen.insert(k.clone(), v);
        }
        Ok(self.seen[&k].as_ref())
    }

    /// The keys of a configMap or secret a pod names, or `None` for a missing optional
    /// one; a missing required one is waited for.
    async fn keys(
        &mut self,
        kind: &'static str,
        name: &str,
        optional: bool,
    ) -> std::result::Result<Option<Keys>, Unresolved> {
        match self.get(kind, name).await? {
            Some(k) => Ok(Some(k.clone())),
            None if optional => Ok(None),
            None => Err(Unresolved::Waiting(format!(
                "{kind} {:?} not found in namespace {:?}",
                name, self.namespace
            ))),
        }
    }
}

/// Resolves the manifest's volumes and variables in place (`pod` is the server's whole
/// object, for the downward API). Returns the volumes' files by volume name, for
/// [`write_volumes`].
pub(super) async fn resolve(
    shared: &Shared,
    pod: &Value,
    manifest: &mut Value,
) -> std::result::Result<Resolved, Unresolved> {
    let namespace = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let mut objects = Objects {
        shared,
        namespace,
        seen: BTreeMap::new(),
        refresh: None,
    };
    let host_ip = shared.host_ip.map(|ip| ip.to_string());
    let mut volumes = BTreeMap::new();
    let vols = manifest["spec"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (i, v) in vols.iter().enumerate() {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let path = format!("spec.volumes[{i}] ({name})");
        let files = if let Some(c) = v.get("configMap") {
            source_files(&mut objects, "configmap", c, &path, None).await?
        } else if let Some(s) = v.get("secret") {
            source_files(&mut objects, "secret", s, &path, None).await?
        } else if let Some(d) = v.get("downwardAPI") {
            downward_files(pod, d, &path, None, host_ip.as_deref())?
        } else if let Some(p) = v.get("projected") {
            projected_files(&mut objects, pod, p, &path, host_ip.as_deref()).await?
        } else if let Some(c) = v.get("persistentVolumeClaim") {
            let csi = claim_volume(&objects, c, &path).await?;
            manifest["spec"]["volumes"][i] = json!({"name": name, "csi": csi});
            continue;
        } else {
            continue;
        };
        volumes.insert(name, files);
    }
    for list in ["initContainers", "containers"] {
        let Some(Value::Array(cs)) = manifest["spec"].get_mut(list) else {
            continue;
        };
        for (ci, c) in cs.iter_mut().enumerate() {
            let Some(c) = c.as_object_mut() else {
                continue;
            };
            let mut out = Env::default();
            if let Some(sources) = c.remove("envFrom") {
                let path = format!("spec.{list}[{ci}].envFrom");
                for (name, value) in env_from(&mut objects, &sources, &path).await? {
                    out.set(json!({"name": name, "value": value}));
                }
            }
            let env = match c.remove("env") {
                Some(Value::Array(env)) => env,
                Some(_) => {
                    return Err(Unresolved::Refused(format!(
                        "spec.{list}[{ci}].env is not a list"
                    )))
                }
                None => Vec::new(),
            };
            for (ei, e) in env.into_iter().enumerate() {
                let Some(from) = e.get("valueFrom") else {
                    out.set(e);
                    continue;
                };
                let path = format!("spec.{list}[{ci}].env[{ei}].valueFrom");
                let name = e["name"].clone();
                if let Some(v) =
                    env_value(&mut objects, pod, from, &path, host_ip.as_deref()).await?
                {
                    out.set(json!({"name": name, "value": v}));
                }
            }
            if !out.0.is_empty() {
                c.insert("env".into(), Value::Array(out.0));
            }
        }
    }
    Ok(Resolved {
        volumes,
        refresh: objects.refresh,
    })
}

/// A `persistentVolumeClaim` volume as the `csi` volume of the storaged volume bound to
/// the claim (provisioner.rs makes them): cached so, the pod gets its volume through
/// outages and reboots. A claim not bound yet is waited for; one bound to a volume of
/// another kind is refused naming it.
async fn claim_volume(
    objects: &Objects<'_>,
    c: &Value,
    path: &str,
) -> std::result::Result<Value, Unresolved> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let claim = c["claimName"].as_str().unwrap_or_default();
    let ns = &objects.namespace;
    let waiting = |m: String| Unresolved::Waiting(format!("{path}: {m}"));
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(objects.shared.client.clone(), ns);
    let pvc = timed(claims.get_opt(claim))
        .await
        .map_err(|e| waiting(format!("reading persistentVolumeClaim {claim:?}: {e}")))?
        .ok_or_else(|| {
            waiting(format!(
                "persistentVolumeClaim {claim:?} not found in namespace {ns:?}"
            ))
        })?;
    let bound = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| waiting(format!("persistentVolumeClaim {claim:?} is not bound yet")))?;
    let pvs: Api<PersistentVolume> = Api::all(objects.shared.client.clone());
    let pv = timed(pvs.get_opt(&bound))
        .await
        .map_err(|e| waiting(format!("reading persistentVolume {bound:?}: {e}")))?
        .ok_or_else(|| waiting(format!("persistentVolume {bound:?} not found")))?;
    let spec = pv.spec.unwrap_or_default();
    let ours = spec.claim_ref.as_ref().and_then(|r| r.uid.as_deref());
    if ours.is_none() || ours != pvc.metadata.uid.as_deref() {
        return Err(waiting(format!(
            "persistentVolume {bound:?} is not bound to claim {claim:?}"
        )));
    }
    let driver = crate::manifest::CSI_DRIVER;
    let Some(csi) = spec.csi.filter(|c| c.driver == driver) else {
        return Err(Unresolved::Refused(format!(
            "{path}: claim {claim:?} is bound to persistentVolume {bound:?}, which is not a \
             volume of {driver} (the one driver of this node)"
        )));
    };
    // The size it was made with (it only grows): the cached manifest does not change,
    // and the pods do not restart, when it is grown.
    let size = csi
        .volume_attributes
        .as_ref()
        .and_then(|a| a.get("size").cloned())
        .or_else(|| {
            spec.capacity
                .unwrap_or_default()
                .remove("storage")
                .map(|q| q.0)
        })
        .unwrap_or_default();
    let mode = super::provisioner::access_mode(&spec.access_modes.unwrap_or_default())
        .map_err(|e| Unresolved::Refused(format!("{path}: persistentVolume {bound:?}: {e}")))?;
    let block = spec.volume_mode.as_deref() == Some("Block");
    let mut out = json!({
        "driver": driver,
        "readOnly": c["readOnly"] == true,
        "volumeAttributes": {
            "volume": csi.volume_handle,
            "size": size,
            "accessMode": format!("{mode:?}"),
            "volumeMode": if block { "Block" } else { "Filesystem" },
        },
    });
    if let Some(fs) = csi.fs_type.filter(|f| !f.is_empty() && !block) {
        out["fsType"] = json!(fs);
    }
    Ok(out)
}

/// A container's variables in order, each name once: a later one with the same name
/// takes the earlier one's value (an `env` entry over an `envFrom` key, a later
/// `envFrom` source over an earlier one), as kubelet does.
#[derive(Default)]
struct Env(Vec<Value>);

impl Env {
    fn set(&mut self, entry: Value) {
        match self.0.iter_mut().find(|e| e["name"] == entry["name"]) {
            Some(e) => *e = entry,
            None => self.0.push(entry),
        }
    }
}

/// Variables' names and values, in order.
type Vars = Vec<(String, String)>;

/// The variables of a container's `envFrom`: every key of each ConfigMap or Secret,
/// with the source's `prefix`. A key that cannot be a variable's name (empty, or with
/// `=` or a control character) is left out and logged, as kubelet leaves it out with an
/// event; a missing `optional` source gives nothing.
async fn env_from(
    objects: &mut Objects<'_>,
    sources: &Value,
    path: &str,
) -> std::result::Result<Vars, Unresolved> {
    let refused = |m: String| Unresolved::Refused(m);
    let Some(sources) = sources.as_array() else {
        return Err(refused(format!("{path} is not a list")));
    };
    let mut out = Vec::new();
    for (si, s) in sources.iter().enumerate() {
        let path = format!("{path}[{si}]");
        let (kind, key, r) = match (s.get("configMapRef"), s.get("secretRef")) {
            (Some(r), None) => ("configmap", "configMapRef", r),
            (None, Some(r)) => ("secret", "secretRef", r),
            _ => {
                return Err(refused(format!(
                    "{path} must name one of configMapRef and secretRef"
                )))
            }
        };
        let prefix = s["prefix"].as_str().unwrap_or_default();
        let name = r["name"].as_str().unwrap_or_default();
        let Some(keys) = objects.keys(kind, name, r["optional"] == true).await? else {
            continue;
        };
        let what = format!("{path}.{key}: {kind} {name:?}");
        let (vars, skipped) = variables(prefix, keys, &what)?;
        if !skipped.is_empty() {
            tracing::warn!("{what}: keys left out, not variable names: {skipped:?}");
        }
        out.extend(vars);
    }
    Ok(out)
}

/// An `envFrom` source's keys as variables named `<prefix><key>`, and the names left
/// out (empty, or holding `=` or a control character). `what` names the source.
fn variables(
    prefix: &str,
    keys: Keys,
    what: &str,
) -> std::result::Result<(Vars, Vec<String>), Unresolved> {
    let (mut vars, mut skipped) = (Vec::new(), Vec::new());
    for (k, v) in keys {
        let var = format!("{prefix}{k}");
        if var.is_empty() || var.contains('=') || var.chars().any(char::is_control) {
            skipped.push(var);
            continue;
        }
        let v = String::from_utf8(v)
            .map_err(|_| Unresolved::Refused(format!("{what}: key {k:?} is not UTF-8 text")))?;
        vars.push((var, v));
    }
    Ok((vars, skipped))
}

/// One variable's value; `None` for an optional one whose object or key is missing.
async fn env_value(
    objects: &mut Objects<'_>,
    pod: &Value,
    from: &Value,
    path: &str,
    host_ip: Option<&str>,
) -> std::result::Result<Option<String>, Unresolved> {
    let refused = |m: String| Unresolved::Refused(m);
    for (key, kind) in [("configMapKeyRef", "configmap"), ("secretKeyRef", "secret")] {
        let Some(r) = from.get(key) else { continue };
        let name = r["name"].as_str().unwrap_or_default();
        let k = r["key"].as_str().unwrap_or_default();
        let optional = r["optional"] == true;
        let Some(keys) = objects.keys(kind, name, optional).await? else {
            return Ok(None);
        };
        return match keys.get(k) {
            Some(v) => String::from_utf8(v.clone()).map(Some).map_err(|_| {
                refused(format!(
                    "{path}.{key}: key {k:?} of {kind} {name:?} is not UTF-8 text"
                ))
            }),
            None if optional => Ok(None),
            None => Err(Unresolved::Waiting(format!(
                "{kind} {name:?} has no key {k:?} ({path}.{key})"
            ))),
        };
    }
    if let Some(f) = from.get("fieldRef") {
        let field = f["fieldPath"].as_str().unwrap_or_default();
        return downward_value(pod, field, host_ip)
            .map(|v| Some(String::from_utf8_lossy(&v).into_owned()))
            .map_err(|e| refused(format!("{path}.fieldRef: {e}")));
    }
    Err(refused(format!(
        "{path}.{} is not supported here",
        first_key(from)
    )))
}

/// The files of a configMap or secret source: every key, or the `items` named.
async fn source_files(
    objects: &mut Objects<'_>,
    kind: &'static str,
    src: &Value,
    path: &str,
    projected_mode: Option<u32>,
) -> std::result::Result<Vec<File>, Unresolved> {
    let name_key = if kind == "secret" && src.get("secretName").is_some() {
        "secretName"
    } else {
        "name"
    };
    let name = src[name_key].as_str().unwrap_or_default();
    let optional = src["optional"] == true;
    let default = mode(&src["defaultMode"], path)?
        .or(projected_mode)
        .unwrap_or(DEFAULT_MODE);
    let Some(keys) = objects.keys(kind, name, optional).await? else {
        return Ok(Vec::new());
    };
    let mut files = Vec::new();
    match src["items"].as_array() {
        None => {
            for (k, v) in &keys {
                files.push(File {
                    path: checked_path(k, path)?,
                    data: v.clone(),
                    mode: default,
                });
            }
        }
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                let k = item["key"].as_str().unwrap_or_default();
                let p = format!("{path}.items[{i}]");
                let Some(v) = keys.get(k) else {
                    if optional {
                        continue;
                    }
                    return Err(Unresolved::Waiting(format!(
                        "{kind} {name:?} has no key {k:?} ({p})"
                    )));
                };
                files.push(File {
                    path: checked_path(item["path"].as_str().unwrap_or_default(), &p)?,
                    data: v.clone(),
                    mode: mode(&item["mode"], &p)?.unwrap_or(default),
                });
            }
        }
    }
    Ok(files)
}

/// A projected volume: its configMap, secret and downwardAPI sources in one directory.
async fn projected_files(
    objects: &mut Objects<'_>,
    pod: &Value,
    p: &Value,
    path: &str,
    host_ip: Option<&str>,
) -> std::result::Result<Vec<File>, Unresolved> {
    let default = mode(&p["defaultMode"], path)?;
    let mut files = Vec::new();
    for (i, s) in p["sources"].as_array().into_iter().flatten().enumerate() {
        let sp = format!("{path}.projected.sources[{i}]");
        if let Some(c) = s.get("configMap") {
            files.extend(source_files(objects, "configmap", c, &sp, default).await?);
        } else if let Some(c) = s.get("secret") {
            files.extend(source_files(objects, "secret", c, &sp, default).await?);
        } else if let Some(d) = s.get("downwardAPI") {
            files.extend(downward_files(pod, d, &sp, default, host_ip)?);
        } else if let Some(t) = s.get("serviceAccountToken") {
            files.push(token_file(objects, pod, t, &sp, default).await?);
        } else {
            return Err(Unresolved::Refused(format!(
                "{sp}.{} is not supported here",
                first_key(s)
            )));
        }
    }
    Ok(files)
}

/// Kubernetes' default and least token lifetimes (`expirationSeconds`).
const TOKEN_SECONDS: i64 = 3600;
const TOKEN_SECONDS_MIN: i64 = 600;

/// A `serviceAccountToken` source: a token for the pod's service account, bound to the
/// pod, for the audience asked (the API server's own when none).
async fn token_file(
    objects: &mut Objects<'_>,
    pod: &Value,
    t: &Value,
    path: &str,
    projected_mode: Option<u32>,
) -> std::result::Result<File, Unresolved> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;
    let p = format!("{path}.serviceAccountToken");
    let file = checked_path(t["path"].as_str().unwrap_or_default(), &p)?;
    let seconds = match &t["expirationSeconds"] {
        Value::Null => TOKEN_SECONDS,
        v => v
            .as_i64()
            .filter(|s| *s >= TOKEN_SECONDS_MIN)
            .ok_or_else(|| {
                Unresolved::Refused(format!(
                "{p}.expirationSeconds {v} is not a whole number of at least {TOKEN_SECONDS_MIN}"
            ))
            })?,
    };
    let audiences = match &t["audience"] {
        Value::Null => Vec::new(),
        Value::String(a) if a.is_empty() => Vec::new(),
        Value::String(a) => vec![a.clone()],
        v => {
            return Err(Unresolved::Refused(format!(
                "{p}.audience {v} is not a string"
            )))
        }
    };
    let spec = &pod["spec"];
    let account = spec["serviceAccountName"]
        .as_str()
        .or(spec["serviceAccount"].as_str())
        .filter(|a| !a.is_empty())
        .unwrap_or("default");
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(audiences),
            expiration_seconds: Some(seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod["metadata"]["name"].as_str().map(str::to_string),
                uid: pod["metadata"]["uid"].as_str().map(str::to_string),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api: Api<ServiceAccount> =
        Api::namespaced(objects.shared.client.clone(), &objects.namespace);
    let ns = objects.namespace.clone();
    let answer =
        timed(api.create_token_request(account, &kube::api::PostParams::default(), &request))
            .await
            .map_err(|e| {
                Unresolved::Waiting(format!(
                    "no token for service account {ns}/{account} ({p}): {e}"
                ))
            })?;
    let token = answer
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Unresolved::Waiting(format!(
                "the API server gave no token for service account {ns}/{account} ({p})"
            ))
        })?;
    // Asked for again once the part of its lifetime set has passed, and at least daily.
    let fraction = objects.shared.settings.token_refresh;
    let after = std::time::Duration::from_secs_f64(seconds as f64 * fraction)
        .min(std::time::Duration::from_secs(86_400));
    let due = std::time::Instant::now() + after;
    objects.refresh = Some(objects.refresh.map_or(due, |r| r.min(due)));
    Ok(File {
        path: file,
        data: token.into_bytes(),
        mode: projected_mode.unwrap_or(DEFAULT_MODE),
    })
}

/// A downwardAPI volume's files.
pub(super) fn downward_files(
    pod: &Value,
    d: &Value,
    path: &str,
    projected_mode: Option<u32>,
    host_ip: Option<&str>,
) -> std::result::Result<Vec<File>, Unresolved> {
    let default = mode(&d["defaultMode"], path)?
        .or(projected_mode)
        .unwrap_or(DEFAULT_MODE);
    let mut files = Vec::new();
    for (i, item) in d["items"].as_array().into_iter().flatten().enumerate() {
        let p = format!("{path}.items[{i}]");
        let Some(f) = item.get("fieldRef") else {
            return Err(Unresolved::Refused(format!(
                "{p}: only fieldRef is supported here (not resourceFieldRef)"
            )));
        };
        let field = f["fieldPath"].as_str().unwrap_or_default();
        let data = downward_value(pod, field, host_ip)
            .map_err(|e| Unresolved::Refused(format!("{p}.fieldRef: {e}")))?;
        files.push(File {
            path: checked_path(item["path"].as_str().unwrap_or_default(), &p)?,
            data,
            mode: mode(&item["mode"], &p)?.unwrap_or(default),
        });
    }
    Ok(files)
}

/// A pod field as the downward API gives it. Labels and annotations whole are one
/// `key="value"` line each, sorted.
pub(super) fn downward_value(
    pod: &Value,
    field: &str,
    host_ip: Option<&str>,
) -> std::result::Result<Vec<u8>, String> {
    let text = |v: &Value| v.as_str().unwrap_or_default().as_bytes().to_vec();
    let meta = &pod["metadata"];
    let keyed = |prefix: &str| {
        field
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
    };
    Ok(match field {
        "metadata.name" => text(&meta["name"]),
        "metadata.namespace" => text(&meta["namespace"]),
        "metadata.uid" => text(&meta["uid"]),
        "spec.nodeName" => text(&pod["spec"]["nodeName"]),
        "spec.serviceAccountName" => text(&pod["spec"]["serviceAccountName"]),
        "status.hostIP" | "status.hostIPs" => host_ip.unwrap_or_default().as_bytes().to_vec(),
        "metadata.labels" | "metadata.annotations" => {
            let map = meta[&field["metadata.".len()..]]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let lines: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        Value::String(v.as_str().unwrap_or_default().into())
                    )
                })
                .collect();
            lines.join("\n").into_bytes()
        }
        _ => {
            if let Some(k) = keyed("metadata.labels") {
                text(&meta["labels"][k])
            } else if let Some(k) = keyed("metadata.annotations") {
                text(&meta["annotations"][k])
            } else {
                return Err(format!("fieldPath {field:?} is not supported here"));
            }
        }
    })
}

/// The first key of an object (the kind of source it is), for a refusal.
fn first_key(v: &Value) -> String {
    v.as_object()
        .and_then(|m| m.keys().next().cloned())
        .unwrap_or_default()
}

/// A file mode from the spec (an integer, as JSON has no octal), or none.
fn mode(v: &Value, path: &str) -> std::result::Result<Option<u32>, Unresolved> {
    match v {
        Value::Null => Ok(None),
        v => match v.as_u64().filter(|m| *m <= 0o777) {
            Some(m) => Ok(Some(m as u32)),
            None => Err(Unresolved::Refused(format!(
                "{path}: mode {v} is not a file mode (0 to 0777, written in decimal)"
            ))),
        },
    }
}

/// A relative path inside the volume: no `..`, no empty or absolute parts.
fn checked_path(p: &str, path: &str) -> std::result::Result<String, Unresolved> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(Unresolved::Refused(format!(
            "{path}: {p:?} is not a relative path inside the volume"
        )));
    }
    Ok(p.to_string())
}

/// Where a cached pod's volumes are written: `<cache_dir>/.volumes/<key without .yaml>`
/// (the reconciler skips dot-named entries).
pub(super) fn pod_dir(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir
        .join(".volumes")
        .join(key.trim_end_matches(".yaml"))
}

/// Writes each volume's files into its directory (mode 0700 directories; each file
/// whole, with its mode), removes files it no longer has, and turns the manifest's
/// volume into a read-only hostPath of that directory.
pub(super) fn write_volumes(
    dir: &Path,
    volumes: &BTreeMap<String, Vec<File>>,
    manifest: &mut Value,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (name, files) in volumes {
        let vdir = dir.join(name);
        std::fs::create_dir_all(&vdir).map_err(Error::io("failed to create", &vdir))?;
        for d in [dir.parent().unwrap_or(dir), dir, vdir.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(Error::io("failed to set the mode of", d))?;
        }
        let mut keep = std::collections::BTreeSet::new();
        for f in files {
            let p = vdir.join(&f.path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(Error::io("failed to create", parent))?;
            }
            let same = std::fs::read(&p).is_ok_and(|d| d == f.data)
                && std::fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o777 == f.mode);
            if !same {
                edge_common::write_atomic(&p, &f.data, f.mode)
                    .map_err(Error::io("failed to write", &p))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode))
                    .map_err(Error::io("failed to set the mode of", &p))?;
            }
            keep.insert(p);
        }
        remove_others(&vdir, &keep);
    }
    let Some(Value::Array(vols)) = manifest["spec"].get_mut("volumes") else {
        return Ok(());
    };
    for v in vols.iter_mut() {
        let Some(name) = v["name"].as_str().map(str::to_string) else {
            continue;
        };
        if volumes.contains_key(&name) {
            *v = json!({"name": name, "hostPath": {
                "path": dir.join(&name).display().to_string(), "type": "Directory"}});
        }
    }
    for list in ["initContainers", "containers"] {
        for c in manifest["spec"][list].as_array_mut().into_iter().flatten() {
            for m in c["volumeMounts"].as_array_mut().into_iter().flatten() {
                let ours = m["name"].as_str().is_some_and(|n| volumes.contains_key(n));
                if let (true, Some(m)) = (ours, m.as_object_mut()) {
                    m.insert("readOnly".into(), Value::Bool(true));
                }
            }
        }
    }
    Ok(())
}

/// Removes the files under `dir` that are not in `keep` (and directories left empty).
fn remove_others(dir: &Path, keep: &std::collections::BTreeSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            remove_others(&p, keep);
            let _ = std::fs::remove_dir(&p);
        } else if !keep.contains(&p) {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// Removes a pod's volume directory with the pod.
pub(super) fn remove(cache_dir: &Path, key: &str) {
    let dir = pod_dir(cache_dir, key);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!("failed to remove {}: {e}", dir.display()),
    }
}

/// Whether the manifest names anything [`resolve`] handles.
pub(super) fn needs_resolving(manifest: &Value) -> bool {
    let vol = manifest["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|v| {
            [
                "configMap",
                "secret",
                "downwardAPI",
                "projected",
                "persistentVolumeClaim",
            ]
            .iter()
            .any(|k| v.get(*k).is_some())
        });
    let env = ["initContainers", "containers"].iter().any(|list| {
        manifest["spec"][*list]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c.get("envFrom").is_some()
                    || c["env"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e.get("valueFrom").is_some())
            })
    });
    vol || env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({"metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                 "labels": {"app": "web", "tier": "a\"b"}, "annotations": {"note": "x"}},
               "spec": {"nodeName": "edge0", "serviceAccountName": "default"}})
    }

    #[test]
    fn the_downward_api_gives_the_pods_fields_as_kubelet_writes_them() {
        let p = pod();
        let v = |f| String::from_utf8(downward_value(&p, f, Some("10.0.2.15")).unwrap()).unwrap();
        assert_eq!(v("metadata.name"), "web-1");
        assert_eq!(v("metadata.namespace"), "shop");
        assert_eq!(v("metadata.uid"), "u-1");
        assert_eq!(v("spec.nodeName"), "edge0");
        assert_eq!(v("status.hostIP"), "10.0.2.15");
        assert_eq!(v("metadata.labels"), "app=\"web\"\ntier=\"a\\\"b\"");
        assert_eq!(v("metadata.labels['app']"), "web");
        assert_eq!(v("metadata.annotations['note']"), "x");
        let e = downward_value(&p, "status.podIP", None).unwrap_err();
        assert!(
            e.contains("status.podIP") && e.contains("not supported"),
            "{e}"
        );
    }

    #[test]
    fn downward_files_take_modes_and_refuse_what_is_not_a_field() {
        let d = json!({"defaultMode": 256, "items": [
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
            {"path": "meta/labels", "fieldRef": {"fieldPath": "metadata.labels"}, "mode": 420}]});
        let files = downward_files(&pod(), &d, "v", None, None).unwrap();
        assert_eq!(
            files[0],
            File {
                path: "name".into(),
                data: b"web-1".to_vec(),
                mode: 0o400
            }
        );
        assert_eq!(files[1].path, "meta/labels");
        assert_eq!(files[1].mode, 0o644);
        for (item, says) in [
            (
                json!({"path": "cpu", "resourceFieldRef": {"resource": "limits.cpu"}}),
                "only fieldRef",
            ),
            (
                json!({"path": "../x", "fieldRef": {"fieldPath": "metadata.name"}}),
                "not a relative path",
            ),
            (
                json!({"path": "/x", "fieldRef": {"fieldPath": "metadata.name"}}),
                "not a relative path",
            ),
            (
                json!({"path": "x", "fieldRef": {"fieldPath": "status.podIP"}}),
                "status.podIP",
            ),
            (
                json!({"path": "x", "mode": 4096, "fieldRef": {"fieldPath": "metadata.name"}}),
                "not a file mode",
            ),
        ] {
            let d = json!({"items": [item]});
            let e = downward_files(&pod(), &d, "spec.volumes[0] (info)", None, None).unwrap_err();
            assert!(matches!(e, Unresolved::Refused(_)), "{e:?}");
            assert!(
                e.message().contains(says) && e.message().contains("spec.volumes[0] (info)"),
                "{e:?}"
            );
        }
    }

    #[test]
    fn env_from_keys_become_variables_and_later_ones_win() {
        let keys: Keys = [("mode", "fast"), ("", "x"), ("a=b", "y"), ("level", "2")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        let (vars, skipped) = variables("APP_", keys.clone(), "envFrom[0]").unwrap();
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["APP_", "APP_level", "APP_mode"]);
        assert_eq!(skipped, ["APP_a=b"]);
        let (_, skipped) = variables("", keys, "envFrom[0]").unwrap();
        assert_eq!(skipped, ["", "a=b"]);
        let bad: Keys = [("bin".to_string(), vec![0xff, 0xfe])]
            .into_iter()
            .collect();
        let e = variables(
            "",
            bad,
            "spec.containers[0].envFrom[1].secretRef: secret \"s\"",
        )
        .unwrap_err();
        assert!(
            matches!(&e, Unresolved::Refused(m) if m.contains("secretRef: secret \"s\": key \"bin\" is not UTF-8")),
            "{e:?}"
        );

        let mut env = Env::default();
        env.set(json!({"name": "mode", "value": "from the configmap"}));
        env.set(json!({"name": "other", "value": "1"}));
        env.set(json!({"name": "mode", "value": "from env"}));
        assert_eq!(
            env.0,
            [
                json!({"name": "mode", "value": "from env"}),
                json!({"name": "other", "value": "1"})
            ]
        );
    }

    #[test]
    fn written_volumes_become_read_only_host_paths_and_stale_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let pdir = pod_dir(&dir.path().join("pods"), "shop_web-1.yaml");
        assert_eq!(pdir, dir.path().join("pods/.volumes/shop_web-1"));
        let mut manifest = json!({"spec": {
            "volumes": [{"name": "conf", "configMap": {"name": "c"}}, {"name": "scratch", "emptyDir": {}}],
            "containers": [{"name": "main", "volumeMounts": [
                {"name": "conf", "mountPath": "/etc/app"}, {"name": "scratch", "mountPath": "/tmp"}]}]}});
        let f = |p: &str, d: &str, mode| File {
            path: p.into(),
            data: d.as_bytes().to_vec(),
            mode,
        };
        let mut vols = BTreeMap::new();
        vols.insert(
            "conf".to_string(),
            vec![f("a.conf", "one", 0o644), f("sub/b", "two", 0o400)],
        );
        write_volumes(&pdir, &vols, &mut manifest.clone()).unwrap();
        vols.insert("conf".to_string(), vec![f("a.conf", "three", 0o600)]);
        write_volumes(&pdir, &vols, &mut manifest).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let a = pdir.join("conf/a.conf");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "three");
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            !pdir.join("conf/sub").exists(),
            "a file the volume no longer has is removed"
        );
        assert_eq!(
            std::fs::metadata(&pdir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            manifest["spec"]["volumes"][0]["hostPath"]["path"],
            pdir.join("conf").display().to_string()
        );
        assert_eq!(
            manifest["spec"]["volumes"][1],
            json!({"name": "scratch", "emptyDir": {}})
        );
        let mounts = &manifest["spec"]["containers"][0]["volumeMounts"];
        assert_eq!(mounts[0]["readOnly"], true);
        assert!(mounts[1].get("readOnly").is_none());
        assert!(needs_resolving(
            &json!({"spec": {"volumes": [{"name": "s", "secret": {"secretName": "x"}}]}})
        ));
        assert!(needs_resolving(
            &json!({"spec": {"containers": [{"env": [{"name": "A", "valueFrom": {}}]}]}})
        ));
        assert!(!needs_resolving(
            &json!({"spec": {"containers": [{"env": [{"name": "A", "value": "1"}]}]}})
        ));
        remove(&dir.path().join("pods"), "shop_web-1.yaml");
        assert!(!pdir.exists());
    }
}
