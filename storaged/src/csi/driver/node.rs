//! The node calls: a volume staged (its device activated, formatted on first use,
//! mounted once), published into each pod (bind mounts, read-only where asked),
//! expanded, measured, and taken down in the reverse order.

// tonic::Status is the reply itself on every error path; boxing it buys nothing.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};

use tonic::Status;

use crate::csi::api::*;
use crate::mounts::{self, Content, Fs, MountEntry};
use crate::Pool;

use super::checks::{check_cap, check_fs_size, split_flags, the_cap};
use super::controller::volume_of;
use super::{io_status, required, status, Driver};

pub(super) fn read_mounts() -> Result<Vec<MountEntry>, Status> {
    mounts::mounts().map_err(|e| Status::internal(format!("failed to read mountinfo: {e}")))
}

/// Every mount of volume `id` on this node: its filesystem (staging and bind mounts)
/// and bind mounts of its device node (block publishes).
pub(super) fn mounts_of(pool: &Pool, id: &str) -> Result<Vec<MountEntry>, Status> {
    let dev = pool.device_number(id).map_err(status)?;
    let node = pool.device_node(id);
    let tail = node.strip_prefix("/dev").unwrap_or(&node).to_path_buf();
    Ok(read_mounts()?
        .into_iter()
        .filter(|m| Some(m.dev) == dev || m.root.ends_with(&tail) && m.root != Path::new("/"))
        .collect())
}

pub(super) fn is_ours(pool: &Pool, id: &str, m: &MountEntry) -> Result<bool, Status> {
    Ok(Some(m.dev) == pool.device_number(id).map_err(status)?)
}

impl Driver {
    // ---- Node ----

    pub async fn node_stage_volume(
        &self,
        req: NodeStageVolumeRequest,
    ) -> Result<NodeStageVolumeResponse, Status> {
        required(&req.volume_id, "volume_id", "NodeStageVolume")?;
        required(
            &req.staging_target_path,
            "staging_target_path",
            "NodeStageVolume",
        )?;
        let cap = the_cap(req.volume_capability.as_ref(), "NodeStageVolume")?;
        let id = req.volume_id;
        let staging = PathBuf::from(req.staging_target_path);
        self.with_pool(move |pool| {
            volume_of(pool, &id)?;
            let device = pool.activate(&id).map_err(status)?;
            if cap.block {
                // Nothing to mount: publish binds the device node itself.
                return Ok(());
            }
            let all = read_mounts()?;
            if let Some(m) = mounts::mount_at(&all, &staging) {
                if is_ours(pool, &id, m)? {
                    return Ok(());
                }
                return Err(Status::already_exists(format!(
                    "staging path {} already holds another mount",
                    staging.display()
                )));
            }
            let fs = match mounts::probe(&device)
                .map_err(|e| io_status("failed to read", &device, e))?
            {
                Content::Fs(found) => match cap.fs {
                    Some(asked) if asked != found => {
                        return Err(Status::failed_precondition(format!(
                            "volume {id} holds {}, not the {} asked for; refusing to format it",
                            found.name(),
                            asked.name()
                        )))
                    }
                    _ => found,
                },
                Content::Empty => {
                    // Zeros at the start are not enough: a block-mode volume may hold
                    // data further in. Only a volume with no block ever written is new.
                    let mapped = pool.usage(&id).map_err(status)?.mapped_sectors;
                    if mapped > 0 {
                        return Err(Status::failed_precondition(format!(
                            "volume {id} holds data but no filesystem; refusing to format it"
                        )));
                    }
                    let fs = cap.fs.unwrap_or(Fs::Ext4);
                    let size = volume_of(pool, &id)?.size_bytes;
                    check_fs_size(std::slice::from_ref(&cap), &id, size)?;
                    mounts::mkfs(fs, &device).map_err(status)?;
                    tracing::info!(volume = %id, fs = fs.name(), "formatted");
                    fs
                }
                Content::Other(what) => {
                    return Err(Status::failed_precondition(format!(
                        "volume {id} holds {what}, not a filesystem; refusing to format it"
                    )))
                }
            };
            std::fs::create_dir_all(&staging)
                .map_err(|e| io_status("failed to create", &staging, e))?;
            let (mut flags, mut data) = split_flags(&cap.mount_flags);
            if cap.read_only() {
                flags |= libc::MS_RDONLY;
            }
            let always = fs.mount_options();
            if !always.is_empty() && !data.split(',').any(|o| o == always) {
                data = if data.is_empty() {
                    always.to_owned()
                } else {
                    format!("{data},{always}")
                };
            }
            // XFS's module is not loaded at boot (it costs the boot most of a second):
            // the first XFS mount loads it. What failed is said with the mount's error.
            let module = edge_kmod::load_on_demand(fs.name());
            for e in &module {
                tracing::warn!(fs = fs.name(), "{e}");
            }
            mounts::mount_fs(&device, &staging, fs.name(), flags, &data).map_err(|e| {
                let module: Vec<String> = module.iter().map(ToString::to_string).collect();
                let msg = format!(
                    "failed to mount {} on {} (flags {:?}): {e}{}",
                    device.display(),
                    staging.display(),
                    cap.mount_flags,
                    if module.is_empty() {
                        String::new()
                    } else {
                        format!(" (its filesystem's module: {})", module.join("; "))
                    }
                );
                if e.raw_os_error() == Some(libc::EINVAL) {
                    Status::invalid_argument(msg)
                } else {
                    Status::internal(msg)
                }
            })?;
            tracing::info!(volume = %id, staging = %staging.display(), "volume staged");
            Ok(())
        })
        .await?;
        Ok(NodeStageVolumeResponse {})
    }

    pub async fn node_unstage_volume(
        &self,
        req: NodeUnstageVolumeRequest,
    ) -> Result<NodeUnstageVolumeResponse, Status> {
        required(&req.volume_id, "volume_id", "NodeUnstageVolume")?;
        required(
            &req.staging_target_path,
            "staging_target_path",
            "NodeUnstageVolume",
        )?;
        let id = req.volume_id;
        let staging = PathBuf::from(req.staging_target_path);
        self.with_pool(move |pool| {
            volume_of(pool, &id)?;
            loop {
                let all = read_mounts()?;
                match mounts::mount_at(&all, &staging) {
                    Some(m) if is_ours(pool, &id, m)? => {
                        let gone = mounts::unmount(&staging)
                            .map_err(|e| io_status("failed to unmount", &staging, e))?;
                        if !gone {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            // The device goes once nothing uses it; a pod still holding it keeps it.
            if mounts_of(pool, &id)?.is_empty() {
                if let Err(e) = pool.deactivate(&id) {
                    tracing::warn!(volume = %id, error = %e, "volume device stays active");
                }
            }
            tracing::info!(volume = %id, staging = %staging.display(), "volume unstaged");
            Ok(())
        })
        .await?;
        Ok(NodeUnstageVolumeResponse {})
    }

    pub async fn node_publish_volume(
        &self,
        req: NodePublishVolumeRequest,
    ) -> Result<NodePublishVolumeResponse, Status> {
        required(&req.volume_id, "volume_id", "NodePublishVolume")?;
        required(&req.target_path, "target_path", "NodePublishVolume")?;
        let cap = the_cap(req.volume_capability.as_ref(), "NodePublishVolume")?;
        let read_only = req.readonly || cap.read_only();
        let id = req.volume_id;
        let target = PathBuf::from(req.target_path);
        let staging = PathBuf::from(req.staging_target_path);
        self.with_pool(move |pool| {
            volume_of(pool, &id)?;
            let all = read_mounts()?;
            let source = if cap.block {
                pool.activate(&id).map_err(status)?
            } else {
                if staging.as_os_str().is_empty() {
                    return Err(Status::failed_precondition(format!(
                        "NodePublishVolume: volume {id} needs staging_target_path (stage it first)"
                    )));
                }
                match mounts::mount_at(&all, &staging) {
                    Some(m) if is_ours(pool, &id, m)? => staging.clone(),
                    _ => {
                        return Err(Status::failed_precondition(format!(
                            "volume {id} is not staged at {}",
                            staging.display()
                        )))
                    }
                }
            };
            if let Some(m) = mounts::mount_at(&all, &target) {
                let same = if cap.block {
                    m.root
                        .ends_with(source.strip_prefix("/dev").unwrap_or(&source))
                } else {
                    is_ours(pool, &id, m)?
                };
                if same && m.read_only == read_only {
                    return Ok(());
                }
                return Err(Status::already_exists(format!(
                    "target {} already holds a different mount{}",
                    target.display(),
                    if same {
                        " (other read-only setting)"
                    } else {
                        ""
                    }
                )));
            }
            if cap.block {
                if let Some(dir) = target.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| io_status("failed to create", dir, e))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .map_err(|e| io_status("failed to create", &target, e))?;
            } else {
                std::fs::create_dir_all(&target)
                    .map_err(|e| io_status("failed to create", &target, e))?;
            }
            mounts::bind(&source, &target, read_only)
                .map_err(|e| io_status("failed to bind-mount onto", &target, e))?;
            tracing::info!(volume = %id, target = %target.display(), read_only, "volume published");
            Ok(())
        })
        .await?;
        Ok(NodePublishVolumeResponse {})
    }

    pub async fn node_unpublish_volume(
        &self,
        req: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse, Status> {
        required(&req.volume_id, "volume_id", "NodeUnpublishVolume")?;
        required(&req.target_path, "target_path", "NodeUnpublishVolume")?;
        let id = req.volume_id;
        let target = PathBuf::from(req.target_path);
        self.with_pool(move |pool| {
            volume_of(pool, &id)?;
            while mounts::mount_at(&read_mounts()?, &target).is_some() {
                if !mounts::unmount(&target)
                    .map_err(|e| io_status("failed to unmount", &target, e))?
                {
                    break;
                }
            }
            // Only an empty directory or the block target file: whatever is left
            // after a failed unmount is never deleted.
            let removed = match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => std::fs::remove_dir(&target),
                Ok(_) => std::fs::remove_file(&target),
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_status("failed to remove", &target, e)),
            }
            tracing::info!(volume = %id, target = %target.display(), "volume unpublished");
            Ok(())
        })
        .await?;
        Ok(NodeUnpublishVolumeResponse {})
    }

    pub async fn node_get_volume_stats(
        &self,
        req: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, Status> {
        required(&req.volume_id, "volume_id", "NodeGetVolumeStats")?;
        required(&req.volume_path, "volume_path", "NodeGetVolumeStats")?;
        let id = req.volume_id;
        let path = PathBuf::from(req.volume_path);
        let usage = self
            .with_pool(move |pool| {
                let v = volume_of(pool, &id)?.clone();
                let meta = std::fs::metadata(&path).map_err(|e| io_status("no", &path, e))?;
                let all = read_mounts()?;
                let mounted = mounts::mount_at(&all, &path).cloned();
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_block_device() {
                    return Ok(vec![VolumeUsage {
                        available: 0,
                        total: v.size_bytes as i64,
                        used: 0,
                        unit: volume_usage::Unit::Bytes as i32,
                    }]);
                }
                match mounted {
                    Some(m) if is_ours(pool, &id, &m)? => {}
                    _ => {
                        return Err(Status::not_found(format!(
                            "volume {id} is not mounted at {}",
                            path.display()
                        )))
                    }
                }
                let u = mounts::statvfs(&path).map_err(|e| io_status("statvfs", &path, e))?;
                Ok(vec![
                    VolumeUsage {
                        available: u.bytes_available as i64,
                        total: u.bytes_total as i64,
                        used: u.bytes_used as i64,
                        unit: volume_usage::Unit::Bytes as i32,
                    },
                    VolumeUsage {
                        available: u.inodes_available as i64,
                        total: u.inodes_total as i64,
                        used: u.inodes_used as i64,
                        unit: volume_usage::Unit::Inodes as i32,
                    },
                ])
            })
            .await?;
        Ok(NodeGetVolumeStatsResponse { usage })
    }

    /// Grows the filesystem of a staged volume online to its device's size (the
    /// controller grew the device).
    pub async fn node_expand_volume(
        &self,
        req: NodeExpandVolumeRequest,
    ) -> Result<NodeExpandVolumeResponse, Status> {
        required(&req.volume_id, "volume_id", "NodeExpandVolume")?;
        required(&req.volume_path, "volume_path", "NodeExpandVolume")?;
        let block = match req.volume_capability.as_ref() {
            Some(c) => check_cap(c)?.block,
            None => false,
        };
        let id = req.volume_id;
        let path = PathBuf::from(req.volume_path);
        let size = self
            .with_pool(move |pool| {
                let v = volume_of(pool, &id)?.clone();
                let meta = std::fs::metadata(&path).map_err(|e| io_status("no", &path, e))?;
                use std::os::unix::fs::FileTypeExt;
                if block || meta.file_type().is_block_device() {
                    return Ok(v.size_bytes);
                }
                let all = read_mounts()?;
                let fs = match mounts::mount_at(&all, &path) {
                    Some(m) if is_ours(pool, &id, m)? => match m.fs_type.as_str() {
                        "ext4" => Fs::Ext4,
                        "xfs" => Fs::Xfs,
                        other => {
                            return Err(Status::failed_precondition(format!(
                                "volume {id} at {} is {other}, which storaged cannot grow",
                                path.display()
                            )))
                        }
                    },
                    _ => {
                        return Err(Status::failed_precondition(format!(
                            "volume {id} is not mounted at {}",
                            path.display()
                        )))
                    }
                };
                mounts::grow(fs, &pool.device_node(&id), &path).map_err(status)?;
                tracing::info!(volume = %id, size = v.size_bytes, fs = fs.name(), "filesystem grown");
                Ok(v.size_bytes)
            })
            .await?;
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        })
    }

    pub async fn node_get_capabilities(
        &self,
        _: NodeGetCapabilitiesRequest,
    ) -> Result<NodeGetCapabilitiesResponse, Status> {
        use node_service_capability::{Rpc, RpcType, Type};
        let caps = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::ExpandVolume,
            RpcType::SingleNodeMultiWriter,
        ];
        Ok(NodeGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        })
    }

    pub async fn node_get_info(
        &self,
        _: NodeGetInfoRequest,
    ) -> Result<NodeGetInfoResponse, Status> {
        Ok(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
        })
    }
}
