//! The pod's metadata and spec, and its volumes (emptyDir, hostPath, CSI).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_yaml::Value;

use super::checks::{check_dns_label, check_volume_id, join, parse_memory, quantity_text};
use super::walker::Walker;
use super::{
    AccessMode, Container, CsiVolume, Pod, RestartPolicy, Volume, VolumeSource, CSI_DRIVER,
    DEFAULT_GRACE_SECONDS,
};
use crate::error::Result;

impl Walker<'_> {
    pub(super) fn pod(&self, v: &Value) -> Result<Pod> {
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
        check_dns_label(&name).map_err(self.bad("metadata.name"))?;
        let namespace = self
            .string(meta, "metadata", "namespace")?
            .unwrap_or_else(|| "default".into());
        check_dns_label(&namespace).map_err(self.bad("metadata.namespace"))?;
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

    pub(super) fn volume(&self, v: &Value, path: &str) -> Result<Volume> {
        let m = self.map(v, path, &["name", "emptyDir", "hostPath", "csi"])?;
        let name = self.required(m, path, "name")?;
        check_dns_label(&name).map_err(self.bad(&join(path, "name")))?;
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

    pub(super) fn csi(&self, v: &Value, path: &str) -> Result<CsiVolume> {
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
        check_volume_id(&volume).map_err(self.bad(&join(&ap, "volume")))?;
        let size_bytes = match am.get("size") {
            None | Some(Value::Null) => return Err(self.err(&join(&ap, "size"), "is required")),
            Some(q) => {
                let s = quantity_text(q)
                    .ok_or_else(|| self.err(&join(&ap, "size"), "must be a quantity"))?;
                parse_memory(&s).map_err(self.bad(&join(&ap, "size")))?
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
}
