//! A pod as CRI configuration: its sandbox's and containers' configs, devices,
//! resources and labels, and where its logs and emptyDir volumes live; pure functions
//! of the manifest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::cri::api::*;
use crate::manifest::{self, Container, Pod, VolumeSource};

pub(super) const LABEL_MANAGED: &str = "io.edgeos.managed-by";
pub(super) const LABEL_FILE: &str = "io.edgeos.pod-file";
pub(super) const LABEL_HASH: &str = "io.edgeos.pod-hash";
pub(super) const MANAGER: &str = "noded";

/// device node (bind-mounted there by the CSI driver), which the runtime creates at
/// `devicePath` and allows in the device cgroup, read-only for a read-only volume.
pub(super) fn devices(pod: &Pod, c: &Container, target: impl Fn(&str) -> PathBuf) -> Vec<Device> {
    c.volume_devices
        .iter()
        .filter_map(|d| {
            let v = pod.volumes.iter().find(|v| v.name == d.name)?;
            let VolumeSource::Csi(csi) = &v.source else {
                return None;
            };
            Some(Device {
                container_path: d.device_path.clone(),
                host_path: target(&v.name).display().to_string(),
                permissions: if csi.read_only { "r" } else { "rw" }.into(),
            })
        })
        .collect()
}

/// CPU limit → CFS quota per 100 ms period; memory limit → the cgroup's memory.max.
pub(super) fn resources(c: &Container) -> LinuxContainerResources {
    const PERIOD: i64 = 100_000;
    let mut r = LinuxContainerResources::default();
    if let Some(m) = c.cpu_limit_millis {
        r.cpu_period = PERIOD;
        // Kubelet's floor: the kernel refuses quotas under 1 ms.
        r.cpu_quota = (m * PERIOD / 1000).max(1000);
    }
    if let Some(b) = c.memory_limit_bytes {
        r.memory_limit_in_bytes = b;
    }
    r
}

pub(super) fn pod_ip(pod: &Pod, status: Option<&PodSandboxStatus>) -> Option<String> {
    if pod.host_network {
        return Some("127.0.0.1".into());
    }
    status
        .and_then(|s| s.network.as_ref())
        .map(|n| n.ip.clone())
        .filter(|ip| !ip.is_empty())
}

pub fn pod_log_dir_of(log_dir: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    log_dir.join(format!("{namespace}_{name}_{uid}"))
}

pub(super) fn pod_log_dir(log_dir: &Path, pod: &Pod, uid: &str) -> PathBuf {
    pod_log_dir_of(log_dir, &pod.namespace, &pod.name, uid)
}

pub(super) fn pod_state_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("pods").join(uid)
}

/// Where a pod's containers find their fabric channel (fabricd's `produce.sock`).
pub(super) const FABRIC_CHANNEL: &str = "/run/edge/fabric";

/// The pod's fabric channel directory under fabricd's `pod_channels`: its name is the
/// identity fabricd stamps on the pod's records, so it is the pod's own.
pub(super) fn fabric_channel(dir: &Path, pod: &Pod, uid: &str) -> PathBuf {
    dir.join(format!("{}_{}_{uid}", pod.namespace, pod.name))
}

/// Where a pod's emptyDir volume `volume` lives.
pub(super) fn empty_dir(state_dir: &Path, uid: &str, volume: &str) -> PathBuf {
    pod_state_dir(state_dir, uid).join("volumes").join(volume)
}

/// The pod's sandbox: labelled with the manifest `file` and its `uid` (the hash), so a
/// later noded can tell whether to adopt it; logs under `log_dir` (its pod log directory).
pub(super) fn sandbox_config(file: &str, uid: &str, pod: &Pod, log_dir: &Path) -> PodSandboxConfig {
    let mut labels: HashMap<String, String> = pod.labels.clone().into_iter().collect();
    labels.insert(LABEL_MANAGED.into(), MANAGER.into());
    labels.insert(LABEL_FILE.into(), file.to_string());
    labels.insert(LABEL_HASH.into(), uid.to_string());
    let network = if pod.host_network {
        NamespaceMode::Node
    } else {
        NamespaceMode::Pod
    };
    let port_mappings = pod
        .containers
        .iter()
        .flat_map(|c| &c.ports)
        .map(|p| PortMapping {
            protocol: match p.protocol {
                manifest::Protocol::Tcp => Protocol::Tcp,
                manifest::Protocol::Udp => Protocol::Udp,
                manifest::Protocol::Sctp => Protocol::Sctp,
            } as i32,
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or(0),
            host_ip: String::new(),
        })
        .collect();
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: pod.name.clone(),
            uid: uid.to_string(),
            namespace: pod.namespace.clone(),
            attempt: 0,
        }),
        // In the host's UTS namespace runc may not set a hostname; CRI allows it
        // empty in exactly that case.
        hostname: if pod.host_network {
            String::new()
        } else {
            pod.name.clone()
        },
        log_directory: log_dir.display().to_string(),
        port_mappings,
        labels,
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: network as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One container of the pod, attempt `attempt`: its emptyDir volumes under `state_dir`,
/// its CSI volumes at `csi_target(volume)` (read-only when the claim or the mount is), its
/// log at `<name>/<attempt>.log` in the pod's log directory, and the pod's fabric
/// `channel` directory (when there is one) read-only at [`FABRIC_CHANNEL`].
pub(super) fn container_config(
    pod: &Pod,
    uid: &str,
    c: &Container,
    attempt: u32,
    state_dir: &Path,
    csi_target: impl Fn(&str) -> PathBuf,
    channel: Option<&Path>,
) -> ContainerConfig {
    let channel = channel.map(|dir| Mount {
        container_path: FABRIC_CHANNEL.into(),
        host_path: dir.display().to_string(),
        readonly: true,
        ..Default::default()
    });
    let mounts = c
        .volume_mounts
        .iter()
        .filter_map(|m| {
            let v = pod.volumes.iter().find(|v| v.name == m.name)?;
            let (host, read_only) = match &v.source {
                VolumeSource::EmptyDir => (empty_dir(state_dir, uid, &v.name), false),
                VolumeSource::HostPath { path, .. } => (path.clone(), false),
                VolumeSource::Csi(c) => (
                    csi_target(&v.name),
                    c.read_only || c.access_mode == manifest::AccessMode::ReadOnlyMany,
                ),
            };
            Some(Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                readonly: m.read_only || read_only,
                ..Default::default()
            })
        })
        .chain(channel)
        .collect();
    ContainerConfig {
        devices: devices(pod, c, &csi_target),
        metadata: Some(ContainerMetadata {
            name: c.name.clone(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: c.image.clone(),
            ..Default::default()
        }),
        command: c.command.clone(),
        args: c.args.clone(),
        envs: c
            .env
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        mounts,
        log_path: format!("{}/{attempt}.log", c.name),
        linux: Some(LinuxContainerConfig {
            resources: Some(resources(c)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_limit_becomes_a_cfs_quota_and_memory_a_byte_limit() {
        let pod = manifest::parse(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: a\n    image: i\n    resources: {limits: {cpu: 250m, memory: 1Gi}}\n",
        )
        .unwrap();
        let r = resources(&pod.containers[0]);
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 25_000));
        assert_eq!(r.memory_limit_in_bytes, 1 << 30);
        let none = resources(&Container {
            cpu_limit_millis: None,
            memory_limit_bytes: None,
            ..pod.containers[0].clone()
        });
        assert_eq!(none, LinuxContainerResources::default());
    }

    #[test]
    fn block_volumes_become_devices_read_only_when_the_volume_is() {
        let pod = manifest::parse(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  volumes:\n  - name: raw\n    csi: {driver: storaged.edgeos, volumeAttributes: {volume: r1, size: 1Gi, volumeMode: Block}}\n  - name: ro\n    csi: {driver: storaged.edgeos, readOnly: true, volumeAttributes: {volume: r2, size: 1Gi, volumeMode: Block}}\n  - name: fs\n    emptyDir: {}\n  containers:\n  - name: a\n    image: i\n    volumeMounts: [{name: fs, mountPath: /fs}]\n    volumeDevices: [{name: raw, devicePath: /dev/xvda}, {name: ro, devicePath: /dev/xvdb}]\n",
        )
        .unwrap();
        let got = devices(&pod, &pod.containers[0], |name| {
            PathBuf::from(format!("/state/csi/pods/u/{name}"))
        });
        let dev = |c: &str, h: &str, p: &str| Device {
            container_path: c.into(),
            host_path: h.into(),
            permissions: p.into(),
        };
        assert_eq!(
            got,
            [
                dev("/dev/xvda", "/state/csi/pods/u/raw", "rw"),
                dev("/dev/xvdb", "/state/csi/pods/u/ro", "r"),
            ]
        );
        // On the wire: ContainerConfig.devices is field 8, Device's fields 1-3.
        let bytes = prost::Message::encode_to_vec(&ContainerConfig {
            devices: got[..1].to_vec(),
            ..Default::default()
        });
        let mut want = vec![8 << 3 | 2, 38, 10, 9];
        want.extend_from_slice(b"/dev/xvda");
        want.extend_from_slice(&[18, 21]);
        want.extend_from_slice(b"/state/csi/pods/u/raw");
        want.extend_from_slice(&[26, 2]);
        want.extend_from_slice(b"rw");
        assert_eq!(bytes, want);
    }

    #[test]
    fn a_container_mounts_its_volumes_where_they_live_read_only_when_shared_read_only() {
        let pod = manifest::parse(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  volumes:\n  - name: model\n    csi: {driver: storaged.edgeos, volumeAttributes: {volume: m, size: 1Gi, accessMode: ReadOnlyMany}}\n  - name: db\n    csi: {driver: storaged.edgeos, volumeAttributes: {volume: d, size: 1Gi}}\n  - name: tmp\n    emptyDir: {}\n  containers:\n  - name: a\n    image: i\n    env: [{name: K, value: v}]\n    volumeMounts: [{name: model, mountPath: /m}, {name: db, mountPath: /d}, {name: tmp, mountPath: /t, readOnly: true}]\n",
        )
        .unwrap();
        let channel = fabric_channel(Path::new("/run/fabricd/pods"), &pod, "u");
        let c = container_config(
            &pod,
            "u",
            &pod.containers[0],
            3,
            Path::new("/state"),
            |n| PathBuf::from(format!("/state/csi/pods/u/{n}")),
            Some(&channel),
        );
        let mounts: Vec<(&str, &str, bool)> = c
            .mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.readonly))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/m", "/state/csi/pods/u/model", true),
                ("/d", "/state/csi/pods/u/db", false),
                ("/t", "/state/pods/u/volumes/tmp", true),
                // Its own fabric channel, named for it, which it cannot write to.
                ("/run/edge/fabric", "/run/fabricd/pods/default_a_u", true),
            ]
        );
        assert_eq!(c.log_path, "a/3.log");
        assert_eq!(c.metadata.map(|m| m.attempt), Some(3));
        assert_eq!(c.envs[0].key, "K");
    }

    #[test]
    fn a_sandbox_carries_what_a_later_noded_needs_to_adopt_it() {
        let pod = manifest::parse(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: x}}\nspec:\n  hostNetwork: true\n  containers:\n  - name: a\n    image: i\n",
        )
        .unwrap();
        let s = sandbox_config("site/p.yaml", "u1", &pod, Path::new("/logs/default_a_u1"));
        assert_eq!(
            s.labels.get(LABEL_FILE).map(String::as_str),
            Some("site/p.yaml")
        );
        assert_eq!(s.labels.get(LABEL_HASH).map(String::as_str), Some("u1"));
        assert_eq!(
            s.labels.get(LABEL_MANAGED).map(String::as_str),
            Some(MANAGER)
        );
        assert_eq!(s.labels.get("app").map(String::as_str), Some("x"));
        assert_eq!(s.log_directory, "/logs/default_a_u1");
        // The host's UTS namespace: no hostname of its own.
        assert_eq!(s.hostname, "");
    }
}
