//! Kubernetes Pod manifests: the subset of the Pod schema noded runs, as typed structs.
//!
//! The YAML is read into a value tree and walked by hand rather than through
//! k8s-openapi's generated types: those accept every Pod field, so each field noded
//! cannot honour would need its own check, and they cost a large extra compile. Here
//! every key is either understood or refused with its path
//! (`spec.containers[0].livenessProbe is not supported yet`): a pod never runs with a
//! setting silently dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_yaml::{Mapping, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
    pub restart_policy: RestartPolicy,
    pub host_network: bool,
    pub termination_grace_period_seconds: i64,
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether a container that exited with `exit_code` runs again.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// CPU limit in millicores.
    pub cpu_limit_millis: Option<i64>,
    pub memory_limit_bytes: Option<i64>,
    pub ports: Vec<Port>,
    pub volume_mounts: Vec<VolumeMount>,
    /// Block csi volumes given to the container as device nodes.
    pub volume_devices: Vec<VolumeDevice>,
    pub liveness_probe: Option<Probe>,
    pub readiness_probe: Option<Probe>,
    pub startup_probe: Option<Probe>,
}

/// A container probe with Kubernetes' timing fields (defaults as Kubernetes documents
/// them: no initial delay, every 10 s, 1 s timeout, 1 success, 3 failures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub action: ProbeAction,
    pub initial_delay_seconds: u32,
    pub period_seconds: u32,
    pub timeout_seconds: u32,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// Run in the container (CRI ExecSync); exit code 0 is success.
    Exec { command: Vec<String> },
    /// GET over plain HTTP; 200-399 is success. `host` defaults to the pod's IP.
    HttpGet {
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A TCP connection that opens is success.
    TcpSocket { host: Option<String>, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub container_port: i32,
    pub host_port: Option<i32>,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    pub read_only: bool,
}

/// A container's `volumeDevices` entry: a Block csi volume as a device node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDevice {
    pub name: String,
    /// Where the device node appears in the container.
    pub device_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub source: VolumeSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    EmptyDir,
    HostPath {
        path: PathBuf,
        create: bool,
    },
    /// A storaged volume (Kubernetes' CSI inline volume shape). Unlike Kubernetes'
    /// ephemeral inline volumes it is persistent and named: the pod creates it if it
    /// does not exist, and deleting the pod never deletes it.
    Csi(CsiVolume),
}

/// The one CSI driver noded talks to.
pub const CSI_DRIVER: &str = "storaged.edgeos";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiVolume {
    /// storaged's volume id (its name), shared by every pod that names it.
    pub volume: String,
    /// The size it is created with; an existing volume must be at least this big.
    pub size_bytes: i64,
    pub access_mode: AccessMode,
    /// `volumeMode: Block`: a raw device, which containers cannot mount.
    pub block: bool,
    /// The filesystem storaged formats a Filesystem volume with at its first stage:
    /// `ext4` (the default) or `xfs`; empty for a Block volume.
    pub fs_type: String,
    /// Published read-only into this pod (the kernel enforces it).
    pub read_only: bool,
}

/// Kubernetes' access modes, as storaged's CSI modes on this single node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    ReadWriteOnce,
    ReadWriteMany,
    ReadOnlyMany,
}

/// Kubernetes' default grace period.
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// Parses one manifest; `source` (the file) starts every error message.
pub fn parse(source: &str, text: &str) -> Result<Pod, String> {
    let value: Value =
        serde_yaml::from_str(text).map_err(|e| format!("{source}: not valid YAML: {e}"))?;
    Walker { source }.pod(&value)
}

struct Walker<'a> {
    source: &'a str,
}

type R<T> = Result<T, String>;

impl Walker<'_> {
    fn err(&self, path: &str, what: &str) -> String {
        format!("{}: {path} {what}", self.source)
    }

    fn unsupported(&self, path: &str) -> String {
        self.err(path, "is not supported yet")
    }

    /// The mapping at `path`, after checking it has only `known` keys.
    fn map<'v>(&self, v: &'v Value, path: &str, known: &[&str]) -> R<&'v Mapping> {
        let m = v
            .as_mapping()
            .ok_or_else(|| self.err(path, "must be a mapping"))?;
        for key in m.keys() {
            let k = key
                .as_str()
                .ok_or_else(|| self.err(path, "has a key that is not a string"))?;
            if !known.contains(&k) {
                return Err(self.unsupported(&join(path, k)));
            }
        }
        Ok(m)
    }

    fn string(&self, m: &Mapping, path: &str, key: &str) -> R<Option<String>> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(&join(path, key), "must be a string")),
        }
    }

    fn required(&self, m: &Mapping, path: &str, key: &str) -> R<String> {
        match self.string(m, path, key)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(self.err(&join(path, key), "is required")),
        }
    }

    fn boolean(&self, m: &Mapping, path: &str, key: &str) -> R<bool> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.err(&join(path, key), "must be true or false")),
        }
    }

    fn int(&self, m: &Mapping, path: &str, key: &str) -> R<Option<i64>> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(&join(path, key), "must be an integer")),
            Some(_) => Err(self.err(&join(path, key), "must be an integer")),
        }
    }

    fn list<'v>(&self, m: &'v Mapping, path: &str, key: &str) -> R<&'v [Value]> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Sequence(s)) => Ok(s),
            Some(_) => Err(self.err(&join(path, key), "must be a list")),
        }
    }

    fn strings(&self, m: &Mapping, path: &str, key: &str) -> R<Vec<String>> {
        let p = join(path, key);
        self.list(m, path, key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(&format!("{p}[{i}]"), "must be a string"))
            })
            .collect()
    }

    fn pod(&self, v: &Value) -> R<Pod> {
        let top = self.map(v, "manifest", &["apiVersion", "kind", "metadata", "spec"])?;
        match self.string(top, "", "apiVersion")?.as_deref() {
            Some("v1") => {}
            _ => return Err(self.err("apiVersion", "must be v1")),
        }
        match self.string(top, "", "kind")?.as_deref() {
            Some("Pod") => {}
            _ => return Err(self.err("kind", "must be Pod")),
        }
        let meta_v = top
            .get("metadata")
            .ok_or_else(|| self.err("metadata", "is required"))?;
        let meta = self.map(meta_v, "metadata", &["name", "namespace", "labels"])?;
        let name = self.required(meta, "metadata", "name")?;
        check_dns_label(&name).map_err(|e| self.err("metadata.name", &e))?;
        let namespace = self
            .string(meta, "metadata", "namespace")?
            .unwrap_or_else(|| "default".into());
        check_dns_label(&namespace).map_err(|e| self.err("metadata.namespace", &e))?;
        let mut labels = BTreeMap::new();
        if let Some(l) = meta.get("labels") {
            let lm = l
                .as_mapping()
                .ok_or_else(|| self.err("metadata.labels", "must be a mapping"))?;
            for (k, v) in lm {
                let k = k
                    .as_str()
                    .ok_or_else(|| self.err("metadata.labels", "has a non-string key"))?;
                let v = v
                    .as_str()
                    .ok_or_else(|| self.err(&format!("metadata.labels.{k}"), "must be a string"))?;
                labels.insert(k.to_string(), v.to_string());
            }
        }

        let spec_v = top
            .get("spec")
            .ok_or_else(|| self.err("spec", "is required"))?;
        let spec = self.map(
            spec_v,
            "spec",
            &[
                "containers",
                "initContainers",
                "restartPolicy",
                "hostNetwork",
                "terminationGracePeriodSeconds",
                "volumes",
            ],
        )?;
        let restart_policy = match self.string(spec, "spec", "restartPolicy")?.as_deref() {
            None | Some("Always") => RestartPolicy::Always,
            Some("OnFailure") => RestartPolicy::OnFailure,
            Some("Never") => RestartPolicy::Never,
            Some(other) => {
                return Err(self.err(
                    "spec.restartPolicy",
                    &format!("is {other:?}, not Always, OnFailure or Never"),
                ))
            }
        };
        let host_network = self.boolean(spec, "spec", "hostNetwork")?;
        let grace = self
            .int(spec, "spec", "terminationGracePeriodSeconds")?
            .unwrap_or(DEFAULT_GRACE_SECONDS);
        if grace < 0 {
            return Err(self.err("spec.terminationGracePeriodSeconds", "must not be negative"));
        }

        let mut volumes = Vec::new();
        for (i, v) in self.list(spec, "spec", "volumes")?.iter().enumerate() {
            volumes.push(self.volume(v, &format!("spec.volumes[{i}]"))?);
        }
        for (i, a) in volumes.iter().enumerate() {
            if volumes[..i].iter().any(|b| b.name == a.name) {
                return Err(self.err(
                    &format!("spec.volumes[{i}].name"),
                    &format!("{:?} is used twice", a.name),
                ));
            }
        }

        let mut init_containers = Vec::new();
        for (i, c) in self
            .list(spec, "spec", "initContainers")?
            .iter()
            .enumerate()
        {
            init_containers.push(self.container(
                c,
                &format!("spec.initContainers[{i}]"),
                true,
                &volumes,
            )?);
        }
        let mut containers = Vec::new();
        for (i, c) in self.list(spec, "spec", "containers")?.iter().enumerate() {
            containers.push(self.container(
                c,
                &format!("spec.containers[{i}]"),
                false,
                &volumes,
            )?);
        }
        if containers.is_empty() {
            return Err(self.err("spec.containers", "must list at least one container"));
        }
        let all: Vec<&Container> = init_containers.iter().chain(&containers).collect();
        for (i, a) in all.iter().enumerate() {
            if all[..i].iter().any(|b| b.name == a.name) {
                return Err(self.err("spec", &format!("names container {:?} twice", a.name)));
            }
        }
        Ok(Pod {
            name,
            namespace,
            labels,
            init_containers,
            containers,
            restart_policy,
            host_network,
            termination_grace_period_seconds: grace,
            volumes,
        })
    }

    fn volume(&self, v: &Value, path: &str) -> R<Volume> {
        let m = self.map(v, path, &["name", "emptyDir", "hostPath", "csi"])?;
        let name = self.required(m, path, "name")?;
        check_dns_label(&name).map_err(|e| self.err(&join(path, "name"), &e))?;
        let sources: Vec<&str> = ["emptyDir", "hostPath", "csi"]
            .into_iter()
            .filter(|k| m.contains_key(*k))
            .collect();
        if sources.len() > 1 {
            return Err(self.err(
                path,
                &format!("must have only one of {}", sources.join(", ")),
            ));
        }
        if let Some(c) = m.get("csi") {
            let source = VolumeSource::Csi(self.csi(c, &join(path, "csi"))?);
            return Ok(Volume { name, source });
        }
        let source = match (m.get("emptyDir"), m.get("hostPath")) {
            (Some(e), None) => {
                // `emptyDir: {}` only: medium and sizeLimit are not honoured.
                if !e.is_null() {
                    self.map(e, &join(path, "emptyDir"), &[])?;
                }
                VolumeSource::EmptyDir
            }
            (None, Some(h)) => {
                let hp = join(path, "hostPath");
                let hm = self.map(h, &hp, &["path", "type"])?;
                let p = self.required(hm, &hp, "path")?;
                if !p.starts_with('/') {
                    return Err(self.err(&join(&hp, "path"), "must be an absolute path"));
                }
                let create = match self.string(hm, &hp, "type")?.as_deref() {
                    None | Some("") | Some("Directory") | Some("File") => false,
                    Some("DirectoryOrCreate") => true,
                    Some(other) => {
                        return Err(self.err(
                            &join(&hp, "type"),
                            &format!("{other:?} is not supported yet"),
                        ))
                    }
                };
                VolumeSource::HostPath {
                    path: PathBuf::from(p),
                    create,
                }
            }
            (Some(_), Some(_)) => {
                return Err(self.err(path, "must have one of emptyDir or hostPath, not both"))
            }
            (None, None) => return Err(self.err(path, "must have emptyDir, hostPath or csi")),
        };
        Ok(Volume { name, source })
    }

    fn csi(&self, v: &Value, path: &str) -> R<CsiVolume> {
        let m = self.map(
            v,
            path,
            &["driver", "fsType", "readOnly", "volumeAttributes"],
        )?;
        let driver = self.required(m, path, "driver")?;
        if driver != CSI_DRIVER {
            return Err(self.err(
                &join(path, "driver"),
                &format!("{driver:?} is not a driver of this node (only {CSI_DRIVER})"),
            ));
        }
        let ap = join(path, "volumeAttributes");
        let a = m
            .get("volumeAttributes")
            .ok_or_else(|| self.err(&ap, "is required"))?;
        let am = self.map(a, &ap, &["volume", "size", "accessMode", "volumeMode"])?;
        let volume = self.required(am, &ap, "volume")?;
        check_volume_id(&volume).map_err(|e| self.err(&join(&ap, "volume"), &e))?;
        let size_bytes = match am.get("size") {
            None | Some(Value::Null) => return Err(self.err(&join(&ap, "size"), "is required")),
            Some(q) => {
                let s = quantity_text(q)
                    .ok_or_else(|| self.err(&join(&ap, "size"), "must be a quantity"))?;
                parse_memory(&s).map_err(|e| self.err(&join(&ap, "size"), &e))?
            }
        };
        let access_mode = match self.string(am, &ap, "accessMode")?.as_deref() {
            None | Some("ReadWriteOnce") => AccessMode::ReadWriteOnce,
            Some("ReadWriteMany") => AccessMode::ReadWriteMany,
            Some("ReadOnlyMany") => AccessMode::ReadOnlyMany,
            Some(other) => {
                return Err(self.err(
                    &join(&ap, "accessMode"),
                    &format!("is {other:?}, not ReadWriteOnce, ReadWriteMany or ReadOnlyMany"),
                ))
            }
        };
        let block = match self.string(am, &ap, "volumeMode")?.as_deref() {
            None | Some("Filesystem") => false,
            Some("Block") => true,
            Some(other) => {
                return Err(self.err(
                    &join(&ap, "volumeMode"),
                    &format!("is {other:?}, not Filesystem or Block"),
                ))
            }
        };
        let fs_type = match self.string(m, path, "fsType")?.as_deref() {
            None | Some("") if block => String::new(),
            None | Some("") => "ext4".to_string(),
            Some(_) if block => {
                return Err(self.err(&join(path, "fsType"), "must not be set for a Block volume"))
            }
            Some(fs @ ("ext4" | "xfs")) => fs.to_string(),
            Some(other) => {
                return Err(self.err(
                    &join(path, "fsType"),
                    &format!("{other:?} is not supported (ext4 or xfs)"),
                ))
            }
        };
        if block && access_mode != AccessMode::ReadWriteOnce {
            return Err(self.err(
                &join(&ap, "accessMode"),
                "must be ReadWriteOnce for a Block volume (only filesystems are shared)",
            ));
        }
        Ok(CsiVolume {
            volume,
            size_bytes,
            access_mode,
            block,
            fs_type,
            read_only: self.boolean(m, path, "readOnly")?,
        })
    }

    fn container(&self, v: &Value, path: &str, init: bool, volumes: &[Volume]) -> R<Container> {
        let known: &[&str] = &[
            "name",
            "image",
            "command",
            "args",
            "env",
            "resources",
            "ports",
            "volumeMounts",
            "volumeDevices",
            "livenessProbe",
            "readinessProbe",
            "startupProbe",
        ];
        let m = self.map(v, path, known)?;
        let name = self.required(m, path, "name")?;
        check_dns_label(&name).map_err(|e| self.err(&join(path, "name"), &e))?;
        let image = self.required(m, path, "image")?;
        let command = self.strings(m, path, "command")?;
        let args = self.strings(m, path, "args")?;

        let mut env = Vec::new();
        for (i, e) in self.list(m, path, "env")?.iter().enumerate() {
            let p = format!("{path}.env[{i}]");
            let em = self.map(e, &p, &["name", "value"])?;
            let key = self.required(em, &p, "name")?;
            let value = match em.get("value") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                // YAML turns `value: 3` into a number; Kubernetes rejects it, and so do we,
                // rather than guess at its spelling.
                Some(_) => return Err(self.err(&join(&p, "value"), "must be a string")),
            };
            env.push((key, value));
        }

        let (mut cpu_limit_millis, mut memory_limit_bytes) = (None, None);
        if let Some(r) = m.get("resources") {
            let rp = join(path, "resources");
            let rm = self.map(r, &rp, &["limits", "requests"])?;
            // Requests only place pods on nodes; on a single node they change nothing.
            if let Some(req) = rm.get("requests") {
                self.map(req, &join(&rp, "requests"), &["cpu", "memory"])?;
            }
            if let Some(l) = rm.get("limits") {
                let lp = join(&rp, "limits");
                let lm = self.map(l, &lp, &["cpu", "memory"])?;
                if let Some(q) = lm.get("cpu") {
                    let s = quantity_text(q)
                        .ok_or_else(|| self.err(&join(&lp, "cpu"), "must be a quantity"))?;
                    cpu_limit_millis =
                        Some(parse_cpu(&s).map_err(|e| self.err(&join(&lp, "cpu"), &e))?);
                }
                if let Some(q) = lm.get("memory") {
                    let s = quantity_text(q)
                        .ok_or_else(|| self.err(&join(&lp, "memory"), "must be a quantity"))?;
                    memory_limit_bytes =
                        Some(parse_memory(&s).map_err(|e| self.err(&join(&lp, "memory"), &e))?);
                }
            }
        }

        let mut ports = Vec::new();
        let mut port_names = Vec::new();
        let port_list = self.list(m, path, "ports")?;
        if init && !port_list.is_empty() {
            return Err(self.err(&join(path, "ports"), "is not allowed on an init container"));
        }
        for (i, p) in port_list.iter().enumerate() {
            let pp = format!("{path}.ports[{i}]");
            let pm = self.map(p, &pp, &["containerPort", "hostPort", "protocol", "name"])?;
            let container_port = self
                .int(pm, &pp, "containerPort")?
                .ok_or_else(|| self.err(&join(&pp, "containerPort"), "is required"))?;
            let host_port = self.int(pm, &pp, "hostPort")?;
            let port_range = |v: i64, key: &str| {
                if (1..=65535).contains(&v) {
                    Ok(v as i32)
                } else {
                    Err(self.err(&join(&pp, key), "must be between 1 and 65535"))
                }
            };
            let protocol = match self.string(pm, &pp, "protocol")?.as_deref() {
                None | Some("TCP") => Protocol::Tcp,
                Some("UDP") => Protocol::Udp,
                Some("SCTP") => Protocol::Sctp,
                Some(other) => {
                    return Err(self.err(
                        &join(&pp, "protocol"),
                        &format!("is {other:?}, not TCP, UDP or SCTP"),
                    ))
                }
            };
            if let Some(name) = self.string(pm, &pp, "name")? {
                port_names.push((name, port_range(container_port, "containerPort")?));
            }
            ports.push(Port {
                container_port: port_range(container_port, "containerPort")?,
                host_port: host_port.map(|h| port_range(h, "hostPort")).transpose()?,
                protocol,
            });
        }

        let mut volume_mounts = Vec::new();
        for (i, vm) in self.list(m, path, "volumeMounts")?.iter().enumerate() {
            let p = format!("{path}.volumeMounts[{i}]");
            let mm = self.map(vm, &p, &["name", "mountPath", "readOnly"])?;
            let mount_path = self.required(mm, &p, "mountPath")?;
            if !mount_path.starts_with('/') {
                return Err(self.err(&join(&p, "mountPath"), "must be an absolute path"));
            }
            let name = self.required(mm, &p, "name")?;
            match volumes.iter().find(|v| v.name == name).map(|v| &v.source) {
                None => {
                    return Err(self.err(
                        &join(&p, "name"),
                        &format!("names volume {name:?}, which spec.volumes does not list"),
                    ))
                }
                Some(VolumeSource::Csi(c)) if c.block => {
                    return Err(self.err(
                        &join(&p, "name"),
                        &format!(
                        "names volume {name:?}, a Block volume, which has no filesystem to mount"
                    ),
                    ))
                }
                Some(_) => {}
            }
            volume_mounts.push(VolumeMount {
                name,
                mount_path,
                read_only: self.boolean(mm, &p, "readOnly")?,
            });
        }

        let mut volume_devices: Vec<VolumeDevice> = Vec::new();
        for (i, vd) in self.list(m, path, "volumeDevices")?.iter().enumerate() {
            let p = format!("{path}.volumeDevices[{i}]");
            let dm = self.map(vd, &p, &["name", "devicePath"])?;
            let device_path = self.required(dm, &p, "devicePath")?;
            if !device_path.starts_with('/') {
                return Err(self.err(&join(&p, "devicePath"), "must be an absolute path"));
            }
            if volume_devices.iter().any(|d| d.device_path == device_path)
                || volume_mounts.iter().any(|m| m.mount_path == device_path)
            {
                return Err(self.err(
                    &join(&p, "devicePath"),
                    &format!("{device_path:?} is already used by another volume of the container"),
                ));
            }
            let name = self.required(dm, &p, "name")?;
            match volumes.iter().find(|v| v.name == name).map(|v| &v.source) {
                None => {
                    return Err(self.err(
                        &join(&p, "name"),
                        &format!("names volume {name:?}, which spec.volumes does not list"),
                    ))
                }
                Some(VolumeSource::Csi(c)) if c.block => {}
                Some(_) => {
                    return Err(self.err(
                        &join(&p, "name"),
                        &format!(
                            "names volume {name:?}, which is not a Block csi volume \
                             (volumeAttributes.volumeMode: Block); mount it with volumeMounts"
                        ),
                    ))
                }
            }
            volume_devices.push(VolumeDevice { name, device_path });
        }

        let mut probes = [None, None, None];
        for (slot, key) in
            probes
                .iter_mut()
                .zip(["livenessProbe", "readinessProbe", "startupProbe"])
        {
            let Some(v) = m.get(key) else { continue };
            let pp = join(path, key);
            if init {
                return Err(self.err(&pp, "is not allowed on an init container"));
            }
            // Kubernetes: liveness and startup probes must succeed once to count.
            let single_success = key != "readinessProbe";
            *slot = Some(self.probe(v, &pp, single_success, &port_names)?);
        }
        let [liveness_probe, readiness_probe, startup_probe] = probes;

        Ok(Container {
            liveness_probe,
            readiness_probe,
            startup_probe,
            name,
            image,
            command,
            args,
            env,
            cpu_limit_millis,
            memory_limit_bytes,
            ports,
            volume_mounts,
            volume_devices,
        })
    }
}

impl Walker<'_> {
    fn probe(
        &self,
        v: &Value,
        path: &str,
        single_success: bool,
        port_names: &[(String, i32)],
    ) -> R<Probe> {
        let m = self.map(
            v,
            path,
            &[
                "exec",
                "httpGet",
                "tcpSocket",
                "initialDelaySeconds",
                "periodSeconds",
                "timeoutSeconds",
                "successThreshold",
                "failureThreshold",
            ],
        )?;
        let seconds = |key: &str, default: u32, min: i64| -> R<u32> {
            match self.int(m, path, key)? {
                None => Ok(default),
                Some(n) if n >= min && n <= i64::from(u32::MAX) => Ok(n as u32),
                Some(_) => Err(self.err(&join(path, key), &format!("must be at least {min}"))),
            }
        };
        let success_threshold = seconds("successThreshold", 1, 1)?;
        if single_success && success_threshold != 1 {
            return Err(self.err(&join(path, "successThreshold"), "must be 1"));
        }
        let handlers: Vec<&str> = ["exec", "httpGet", "tcpSocket"]
            .into_iter()
            .filter(|k| m.contains_key(*k))
            .collect();
        let action = match handlers.as_slice() {
            ["exec"] => {
                let ep = join(path, "exec");
                let em = self.map(&m["exec"], &ep, &["command"])?;
                let command = self.strings(em, &ep, "command")?;
                if command.is_empty() {
                    return Err(self.err(&join(&ep, "command"), "is required"));
                }
                ProbeAction::Exec { command }
            }
            ["httpGet"] => {
                let hp = join(path, "httpGet");
                let hm = self.map(
                    &m["httpGet"],
                    &hp,
                    &["path", "port", "host", "scheme", "httpHeaders"],
                )?;
                match self.string(hm, &hp, "scheme")?.as_deref() {
                    None | Some("HTTP") => {}
                    Some(other) => {
                        return Err(self.err(
                            &join(&hp, "scheme"),
                            &format!("{other:?} is not supported yet (only HTTP)"),
                        ))
                    }
                }
                let probe_path = self.string(hm, &hp, "path")?.unwrap_or_else(|| "/".into());
                if !probe_path.starts_with('/') || probe_path.contains(|c: char| c.is_whitespace())
                {
                    return Err(
                        self.err(&join(&hp, "path"), "must start with / and have no spaces")
                    );
                }
                let mut headers = Vec::new();
                for (i, h) in self.list(hm, &hp, "httpHeaders")?.iter().enumerate() {
                    let p = format!("{hp}.httpHeaders[{i}]");
                    let hm = self.map(h, &p, &["name", "value"])?;
                    let name = self.required(hm, &p, "name")?;
                    let value = self.string(hm, &p, "value")?.unwrap_or_default();
                    if name.contains(|c: char| c == ':' || c.is_control() || c.is_whitespace())
                        || value.contains(|c: char| c.is_control())
                    {
                        return Err(self.err(&p, "is not a valid HTTP header"));
                    }
                    headers.push((name, value));
                }
                ProbeAction::HttpGet {
                    host: self.probe_host(hm, &hp)?,
                    port: self.probe_port(hm, &hp, port_names)?,
                    path: probe_path,
                    headers,
                }
            }
            ["tcpSocket"] => {
                let tp = join(path, "tcpSocket");
                let tm = self.map(&m["tcpSocket"], &tp, &["port", "host"])?;
                ProbeAction::TcpSocket {
                    host: self.probe_host(tm, &tp)?,
                    port: self.probe_port(tm, &tp, port_names)?,
                }
            }
            [] => return Err(self.err(path, "must have one of exec, httpGet or tcpSocket")),
            _ => {
                return Err(self.err(
                    path,
                    &format!("must have only one of {}", handlers.join(", ")),
                ))
            }
        };
        Ok(Probe {
            action,
            initial_delay_seconds: seconds("initialDelaySeconds", 0, 0)?,
            period_seconds: seconds("periodSeconds", 10, 1)?,
            timeout_seconds: seconds("timeoutSeconds", 1, 1)?,
            success_threshold,
            failure_threshold: seconds("failureThreshold", 3, 1)?,
        })
    }

    fn probe_host(&self, m: &Mapping, path: &str) -> R<Option<String>> {
        match self.string(m, path, "host")? {
            Some(h) if h.is_empty() => Ok(None),
            Some(h) if h.contains(|c: char| c.is_whitespace() || c == '/') => {
                Err(self.err(&join(path, "host"), "is not a host name or address"))
            }
            h => Ok(h),
        }
    }

    /// A port number, or the name of one of the container's ports.
    fn probe_port(&self, m: &Mapping, path: &str, names: &[(String, i32)]) -> R<u16> {
        let p = join(path, "port");
        match m.get("port") {
            Some(Value::Number(n)) => n
                .as_u64()
                .filter(|n| (1..=65535).contains(n))
                .map(|n| n as u16)
                .ok_or_else(|| self.err(&p, "must be between 1 and 65535")),
            Some(Value::String(name)) => names
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, port)| *port as u16)
                .ok_or_else(|| {
                    self.err(
                        &p,
                        &format!("names port {name:?}, which the container's ports do not list"),
                    )
                }),
            None | Some(Value::Null) => Err(self.err(&p, "is required")),
            Some(_) => Err(self.err(&p, "must be a port number or name")),
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Quantities may be written as YAML numbers (`cpu: 2`) or strings (`cpu: "500m"`).
fn quantity_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Names become parts of containerd's names, log directories and label values.
fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
        ))
    }
}

/// storaged's rule for volume ids (its catalog names); the id also names noded's
/// staging directory, so it can never be `..` or hold a `/`.
fn check_volume_id(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && !s.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} must be 1-64 of a-z, 0-9, '.', '_' or '-', not starting with '.' or '-'"
        ))
    }
}

/// A CPU quantity in millicores: "500m", "2", "0.5".
pub fn parse_cpu(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not a CPU quantity (like 500m, 2 or 0.5)");
    let millis = if let Some(m) = s.strip_suffix('m') {
        m.parse::<i64>().map_err(|_| bad())?
    } else {
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let frac_millis: i64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<3}").parse().map_err(|_| bad())?
        };
        whole
            .checked_mul(1000)
            .and_then(|w| w.checked_add(frac_millis))
            .ok_or_else(bad)?
    };
    if millis <= 0 {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(millis)
}

/// A memory quantity in bytes: "64Mi", "1G", "1048576", "1e6".
pub fn parse_memory(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not a memory quantity (like 64Mi, 1G or 1048576)");
    const SUFFIXES: &[(&str, i64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (digits, mult) = SUFFIXES
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|d| (d, *m)))
        .unwrap_or((s, 1));
    let (digits, mult) = match digits.split_once(['e', 'E']) {
        Some((d, exp)) if mult == 1 => {
            let exp: u32 = exp.parse().map_err(|_| bad())?;
            (d, 10i64.checked_pow(exp).ok_or_else(bad)?)
        }
        _ => (digits, mult),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if bytes <= 0 {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
