//! The controller calls: volumes and snapshots created, listed, expanded and deleted
//! in the pool.

// tonic::Status is the reply itself on every error path; boxing it buys nothing.
#![allow(clippy::result_large_err)]

use tonic::Status;

use crate::catalog::{Kind, State, Volume as CatalogVolume};
use crate::csi::api::*;
use crate::Pool;

use super::checks::{check_cap, check_caps, check_fs_size, fits, wanted_size};
use super::node::mounts_of;
use super::{now_unix, required, status, Driver};

/// A ready entry of `kind` named `id`.
pub(super) fn entry<'a>(pool: &'a Pool, id: &str, kind: Kind) -> Option<&'a CatalogVolume> {
    pool.catalog()
        .get(id)
        .filter(|v| v.state == State::Ready && v.kind == kind)
}

pub(super) fn volume_of<'a>(pool: &'a Pool, id: &str) -> Result<&'a CatalogVolume, Status> {
    entry(pool, id, Kind::Volume)
        .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
}

pub(super) fn csi_volume(v: &CatalogVolume, source: Option<VolumeContentSource>) -> Volume {
    Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.name.clone(),
        volume_context: Default::default(),
        content_source: source,
    }
}

impl Driver {
    // ---- Controller ----

    pub async fn create_volume(
        &self,
        req: CreateVolumeRequest,
    ) -> Result<CreateVolumeResponse, Status> {
        required(&req.name, "name", "CreateVolume")?;
        let caps = check_caps(&req.volume_capabilities, "CreateVolume")?;
        let (size, _) = wanted_size(req.capacity_range.as_ref())?;
        let source = req.volume_content_source.clone();
        let source_id = match source.as_ref().and_then(|s| s.r#type.as_ref()) {
            None => None,
            Some(volume_content_source::Type::Snapshot(s)) => {
                required(&s.snapshot_id, "snapshot_id", "CreateVolume")?;
                Some((s.snapshot_id.clone(), Kind::Snapshot))
            }
            Some(volume_content_source::Type::Volume(v)) => {
                required(&v.volume_id, "volume_id", "CreateVolume")?;
                Some((v.volume_id.clone(), Kind::Volume))
            }
        };
        let range = req.capacity_range;
        let name = req.name;
        let volume = self
            .with_pool(move |pool| {
                if let Some(v) = pool.catalog().get(&name).cloned() {
                    let same_source = source_id.as_ref().map(|s| &s.0) == v.origin.as_ref();
                    if v.state == State::Ready
                        && v.kind == Kind::Volume
                        && fits(&v, range.as_ref())
                        && same_source
                    {
                        return Ok(v);
                    }
                    return Err(Status::already_exists(format!(
                        "volume {name} exists with {} bytes{}, incompatible with this request",
                        v.size_bytes,
                        v.origin
                            .as_ref()
                            .map(|o| format!(" from {o}"))
                            .unwrap_or_default()
                    )));
                }
                let limit = pool.overcommit_limit();
                let within = |size: u64| {
                    if size > limit {
                        return Err(Status::out_of_range(format!(
                            "volume {name}: {size} bytes is more than this pool can ever \
                             provide ({limit} bytes with overcommit)"
                        )));
                    }
                    Ok(())
                };
                let Some((src, kind)) = source_id else {
                    within(size)?;
                    check_fs_size(&caps, &name, size)?;
                    return pool.create_volume(&name, size).cloned().map_err(status);
                };
                let s = entry(pool, &src, kind)
                    .ok_or_else(|| {
                        Status::not_found(format!("{kind:?} {src} does not exist").to_lowercase())
                    })?
                    .clone();
                // No size asked for: the source's. A size is never less than the source's.
                let no_size = range
                    .as_ref()
                    .is_none_or(|r| r.required_bytes <= 0 && r.limit_bytes <= 0);
                // Checked only now: with no size asked for, the default is not the size.
                let size = if no_size { s.size_bytes } else { size };
                within(size)?;
                check_fs_size(&caps, &name, size)?;
                if size < s.size_bytes {
                    return Err(Status::out_of_range(format!(
                        "volume {name}: {size} bytes is smaller than its source {src} ({} bytes)",
                        s.size_bytes
                    )));
                }
                // At its final size in one catalog step: a crash leaves the whole volume
                // or none, never a clone of the source's size that a retry asking for
                // more would find incompatible.
                pool.clone_volume_sized(&src, &name, size)
                    .cloned()
                    .map_err(status)
            })
            .await?;
        tracing::info!(volume = %volume.name, size = volume.size_bytes, "CSI volume ready");
        Ok(CreateVolumeResponse {
            volume: Some(csi_volume(&volume, source)),
        })
    }

    pub async fn delete_volume(
        &self,
        req: DeleteVolumeRequest,
    ) -> Result<DeleteVolumeResponse, Status> {
        required(&req.volume_id, "volume_id", "DeleteVolume")?;
        let id = req.volume_id;
        self.with_pool(move |pool| {
            if entry(pool, &id, Kind::Volume).is_none() {
                tracing::info!(volume = %id, "DeleteVolume of an unknown volume: nothing to do");
                return Ok(());
            }
            let used = mounts_of(pool, &id)?;
            if let Some(m) = used.first() {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is still mounted at {} ({} mount(s)); unpublish and unstage it first",
                    m.mount_point.display(),
                    used.len()
                )));
            }
            pool.delete(&id).map_err(status)
        })
        .await?;
        Ok(DeleteVolumeResponse {})
    }

    pub async fn validate_volume_capabilities(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, Status> {
        required(&req.volume_id, "volume_id", "ValidateVolumeCapabilities")?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument(
                "ValidateVolumeCapabilities: volume_capabilities are required",
            ));
        }
        let id = req.volume_id.clone();
        self.with_pool(move |pool| volume_of(pool, &id).map(|_| ()))
            .await?;
        Ok(match check_caps(&req.volume_capabilities, "") {
            Ok(_) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                }),
                message: String::new(),
            },
            Err(s) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: s.message().to_owned(),
            },
        })
    }

    pub async fn list_volumes(
        &self,
        req: ListVolumesRequest,
    ) -> Result<ListVolumesResponse, Status> {
        if req.max_entries < 0 {
            return Err(Status::invalid_argument(
                "ListVolumes: max_entries must not be negative",
            ));
        }
        let start: usize = match req.starting_token.as_str() {
            "" => 0,
            t => t
                .parse()
                .map_err(|_| Status::aborted(format!("ListVolumes: bad starting_token {t:?}")))?,
        };
        let all: Vec<Volume> = self
            .with_pool(|pool| {
                Ok(pool
                    .volumes()
                    .iter()
                    .filter(|v| v.state == State::Ready && v.kind == Kind::Volume)
                    .map(|v| csi_volume(v, None))
                    .collect())
            })
            .await?;
        if start > all.len() {
            return Err(Status::aborted(format!(
                "ListVolumes: starting_token {start} is past the end"
            )));
        }
        let n = if req.max_entries == 0 {
            all.len()
        } else {
            req.max_entries as usize
        };
        let end = (start + n).min(all.len());
        Ok(ListVolumesResponse {
            entries: all[start..end]
                .iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(v.clone()),
                })
                .collect(),
            next_token: if end < all.len() {
                end.to_string()
            } else {
                String::new()
            },
        })
    }

    /// What CreateVolume would accept now: the overcommit headroom, or nothing when
    /// the pool's data area is full. No pool: no capacity (not an error).
    pub async fn get_capacity(
        &self,
        req: GetCapacityRequest,
    ) -> Result<GetCapacityResponse, Status> {
        check_caps(&req.volume_capabilities, "").or_else(|e| {
            if req.volume_capabilities.is_empty() {
                Ok(vec![])
            } else {
                Err(e)
            }
        })?;
        let pool = self.pool.clone();
        let available = tokio::task::spawn_blocking(move || {
            let guard = edge_common::lock(&pool);
            let Some(pool) = guard.as_ref() else {
                return Ok::<u64, Status>(0);
            };
            let st = pool.status().map_err(status)?;
            if st.used_data_blocks >= st.total_data_blocks {
                return Ok(0);
            }
            Ok(pool
                .overcommit_limit()
                .saturating_sub(pool.catalog().provisioned_bytes()))
        })
        .await
        .map_err(|e| Status::internal(format!("GetCapacity did not finish: {e}")))??;
        Ok(GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: Some(Int64Value {
                value: available as i64,
            }),
            minimum_volume_size: None,
        })
    }

    pub async fn controller_get_capabilities(
        &self,
        _: ControllerGetCapabilitiesRequest,
    ) -> Result<ControllerGetCapabilitiesResponse, Status> {
        use controller_service_capability::{Rpc, RpcType, Type};
        let caps = [
            RpcType::CreateDeleteVolume,
            RpcType::ListVolumes,
            RpcType::GetCapacity,
            RpcType::CreateDeleteSnapshot,
            RpcType::CloneVolume,
            RpcType::ExpandVolume,
            RpcType::SingleNodeMultiWriter,
        ];
        Ok(ControllerGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|t| ControllerServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
                })
                .collect(),
        })
    }

    pub async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<CreateSnapshotResponse, Status> {
        required(&req.name, "name", "CreateSnapshot")?;
        required(&req.source_volume_id, "source_volume_id", "CreateSnapshot")?;
        let (name, source) = (req.name, req.source_volume_id);
        let snap = self
            .with_pool(move |pool| {
                if let Some(v) = pool.catalog().get(&name).cloned() {
                    if v.state == State::Ready
                        && v.kind == Kind::Snapshot
                        && v.origin.as_deref() == Some(&source)
                    {
                        return Ok(v);
                    }
                    return Err(Status::already_exists(format!(
                        "{name} already exists and is not a snapshot of {source}"
                    )));
                }
                volume_of(pool, &source)?;
                pool.snapshot(&source, &name).cloned().map_err(status)
            })
            .await?;
        tracing::info!(snapshot = %snap.name, "CSI snapshot ready");
        let created = if snap.created == 0 {
            now_unix()
        } else {
            snap.created
        };
        Ok(CreateSnapshotResponse {
            snapshot: Some(Snapshot {
                size_bytes: snap.size_bytes as i64,
                snapshot_id: snap.name.clone(),
                source_volume_id: snap.origin.clone().unwrap_or_default(),
                creation_time: Some(Timestamp {
                    seconds: created as i64,
                    nanos: 0,
                }),
                ready_to_use: true,
            }),
        })
    }

    pub async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> Result<DeleteSnapshotResponse, Status> {
        required(&req.snapshot_id, "snapshot_id", "DeleteSnapshot")?;
        let id = req.snapshot_id;
        self.with_pool(move |pool| {
            if entry(pool, &id, Kind::Snapshot).is_none() {
                return Ok(());
            }
            pool.delete(&id).map_err(status)
        })
        .await?;
        Ok(DeleteSnapshotResponse {})
    }

    pub async fn controller_expand_volume(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, Status> {
        required(&req.volume_id, "volume_id", "ControllerExpandVolume")?;
        let range = req.capacity_range.ok_or_else(|| {
            Status::invalid_argument("ControllerExpandVolume: capacity_range is required")
        })?;
        let block = match req.volume_capability.as_ref() {
            Some(c) => check_cap(c)?.block,
            None => false,
        };
        let (size, limit) = wanted_size(Some(&range))?;
        let id = req.volume_id;
        let now = self
            .with_pool(move |pool| {
                let v = volume_of(pool, &id)?.clone();
                if size <= v.size_bytes {
                    if limit > 0 && v.size_bytes > limit {
                        return Err(Status::out_of_range(format!(
                            "volume {id} is {} bytes, more than the limit {limit}",
                            v.size_bytes
                        )));
                    }
                    return Ok(v.size_bytes);
                }
                let max = pool.overcommit_limit();
                if size > max {
                    return Err(Status::out_of_range(format!(
                        "volume {id}: {size} bytes is more than this pool can ever provide \
                         ({max} bytes with overcommit)"
                    )));
                }
                pool.expand(&id, size).map_err(status)?;
                Ok(size)
            })
            .await?;
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: now as i64,
            node_expansion_required: !block,
        })
    }
}
