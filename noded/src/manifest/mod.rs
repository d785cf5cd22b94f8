//! Kubernetes Pod manifests: the subset of the Pod schema noded runs, as typed structs.
//!
//! The YAML is read into a value tree and walked by hand rather than through
//! k8s-openapi's generated types: those accept every Pod field, so each field noded
//! cannot honour would need its own check, and they cost a large extra compile. Here
//! every key is either understood or refused with its path
//! (`spec.containers[0].livenessProbe is not supported yet`): a pod never runs with a
//! setting silently dropped.

mod checks;
pub use checks::parse_memory;
mod container;
mod pod;
mod walker;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_yaml::Value;
use walker::Walker;

use crate::error::{Error, Result};

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

/// When a container's image is pulled (`imagePullPolicy`). As in Kubernetes, the
/// default is `Always` for an image tagged `latest` or not tagged (and not named by
/// digest), else `IfNotPresent`: a box cut off from its registry still starts a pod
/// whose image it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PullPolicy {
    Never,
    IfNotPresent,
    Always,
}

impl PullPolicy {
    /// Kubernetes' default for `image`.
    pub fn default_for(image: &str) -> Self {
        if image.contains('@') {
            return PullPolicy::IfNotPresent;
        }
        match crate::registry::split_ref(image) {
            Some((_, tag)) if tag != "latest" => PullPolicy::IfNotPresent,
            _ => PullPolicy::Always,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub name: String,
    pub image: String,
    pub pull_policy: PullPolicy,
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
pub fn parse(source: &str, text: &str) -> Result<Pod> {
    let value: Value = serde_yaml::from_str(text).map_err(|e| Error::Manifest {
        file: source.to_string(),
        detail: format!("not valid YAML: {e}"),
    })?;
    Walker::new(source).pod(&value)
}

#[cfg(test)]
mod tests;
