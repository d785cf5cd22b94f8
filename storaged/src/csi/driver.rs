//! What each CSI call does with the pool and the node's mounts, and which gRPC code
//! each failure gets (the codes of the CSI specification's error tables).
//!
//! Volume and snapshot ids are their catalog names (stable, unique in the pool). Every
//! pool or mount operation runs on the blocking pool behind one mutex: device-mapper
//! ioctls, mkfs and mount(2) block, and one at a time keeps stage/publish/delete from
//! racing each other.

// tonic::Status is the reply itself on every error path; boxing it buys nothing.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::Status;

use super::api::*;
use crate::catalog::{Kind, State, Volume as CatalogVolume};
use crate::mounts::{self, Content, Fs, MountEntry};
use crate::{Error, Pool};
use volume_capability::{AccessType, Mode};

/// Size of a volume whose request names no capacity.
const DEFAULT_BYTES: u64 = 1 << 30;
const PLUGIN_NAME: &str = "storaged.edgeos";

pub struct Driver {
    pool: Arc<Mutex<Option<Pool>>>,
    node_id: String,
}

fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::BadRequest { .. } => Status::invalid_argument(msg),
        Error::VolumeExists(_) => Status::already_exists(msg),
        Error::NoVolume(_) => Status::not_found(msg),
        Error::Overcommit { .. } | Error::OutOfSpace { .. } => Status::resource_exhausted(msg),
        Error::Busy { .. } => Status::failed_precondition(msg),
        Error::ForeignData { .. } | Error::TooSmall { .. } => Status::failed_precondition(msg),
        Error::Io { .. } | Error::BadPool { .. } | Error::DeviceMapper { .. } => {
            Status::internal(msg)
        }
    }
}

fn required(value: &str, what: &str, call: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{call}: {what} is required"
        )));
    }
    Ok(())
}

/// A volume capability, checked.
#[derive(Debug, Clone)]
struct Cap {
    block: bool,
    /// The filesystem asked for; None: what the volume holds, ext4 if it is new.
    fs: Option<Fs>,
    mount_flags: Vec<String>,
    mode: Mode,
}

impl Cap {
    fn read_only(&self) -> bool {
        matches!(
            self.mode,
            Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly
        )
    }
}

fn mode_name(m: Mode) -> String {
    format!("{m:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
            sep.into_iter()
                .chain(std::iter::once(c.to_ascii_uppercase()))
        })
        .collect()
}

fn check_cap(c: &VolumeCapability) -> Result<Cap, Status> {
    let mode = c
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .filter(|m| *m != Mode::Unknown)
        .ok_or_else(|| Status::invalid_argument("volume capability: access_mode is required"))?;
    match &c.access_type {
        None => Err(Status::invalid_argument(
            "volume capability: one of block or mount is required",
        )),
        Some(AccessType::Block(_)) => match mode {
            Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter => Ok(Cap {
                block: true,
                fs: None,
                mount_flags: vec![],
                mode,
            }),
            // Several writers (or readers) of one raw device would need a shared-disk
            // filesystem above it; only filesystem volumes are shared.
            other => Err(Status::invalid_argument(format!(
                "access mode {} is for filesystem volumes only; block volumes are \
                 SINGLE_NODE_WRITER or SINGLE_NODE_SINGLE_WRITER",
                mode_name(other)
            ))),
        },
        Some(AccessType::Mount(m)) => {
            let fs = Fs::parse(&m.fs_type).map_err(Status::invalid_argument)?;
            if !m.volume_mount_group.is_empty() {
                return Err(Status::invalid_argument(
                    "volume_mount_group is not supported",
                ));
            }
            Ok(Cap {
                block: false,
                fs,
                mount_flags: m.mount_flags.clone(),
                mode,
            })
        }
    }
}

fn check_caps(caps: &[VolumeCapability], call: &str) -> Result<Vec<Cap>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{call}: volume_capabilities are required"
        )));
    }
    caps.iter().map(check_cap).collect()
}

fn the_cap(c: Option<&VolumeCapability>, call: &str) -> Result<Cap, Status> {
    check_cap(c.ok_or_else(|| {
        Status::invalid_argument(format!("{call}: volume_capability is required"))
    })?)
}

/// A volume of `size` bytes is too small for a filesystem one of `caps` asks for.
fn check_fs_size(caps: &[Cap], name: &str, size: u64) -> Result<(), Status> {
    for fs in caps.iter().filter_map(|c| c.fs) {
        if size < fs.min_bytes() {
            return Err(Status::out_of_range(format!(
                "volume {name}: {size} bytes is too small for {} (at least {} MiB)",
                fs.name(),
                fs.min_bytes() >> 20
            )));
        }
    }
    Ok(())
}

/// The size a capacity range asks for: (size to create, limit or 0).
fn wanted_size(range: Option<&CapacityRange>) -> Result<(u64, u64), Status> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: sizes must not be negative",
        ));
    }
    let (req, lim) = (req as u64, lim as u64);
    let size = match (req, lim) {
        (0, 0) => DEFAULT_BYTES,
        (0, l) => l.min(DEFAULT_BYTES),
        (r, _) => r,
    };
    let size = size.checked_next_multiple_of(4096).unwrap_or(u64::MAX);
    if lim > 0 && size > lim {
        return Err(Status::out_of_range(format!(
            "capacity_range: no size in whole 4 KiB blocks between {req} and {lim} bytes"
        )));
    }
    Ok((size, lim))
}

fn fits(v: &CatalogVolume, range: Option<&CapacityRange>) -> bool {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    v.size_bytes >= req.max(0) as u64 && (lim <= 0 || v.size_bytes <= lim as u64)
}

/// A ready entry of `kind` named `id`.
fn entry<'a>(pool: &'a Pool, id: &str, kind: Kind) -> Option<&'a CatalogVolume> {
    pool.catalog()
        .get(id)
        .filter(|v| v.state == State::Ready && v.kind == kind)
}

fn volume_of<'a>(pool: &'a Pool, id: &str) -> Result<&'a CatalogVolume, Status> {
    entry(pool, id, Kind::Volume)
        .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
}

fn csi_volume(v: &CatalogVolume, source: Option<VolumeContentSource>) -> Volume {
    Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.name.clone(),
        volume_context: Default::default(),
        content_source: source,
    }
}

fn io_status(what: &str, path: &Path, e: std::io::Error) -> Status {
    let msg = format!("{what} {}: {e}", path.display());
    match e.kind() {
        std::io::ErrorKind::NotFound => Status::not_found(msg),
        std::io::ErrorKind::InvalidInput => Status::invalid_argument(msg),
        _ => Status::internal(msg),
    }
}

fn read_mounts() -> Result<Vec<MountEntry>, Status> {
    mounts::mounts().map_err(|e| Status::internal(format!("failed to read mountinfo: {e}")))
}

/// Every mount of volume `id` on this node: its filesystem (staging and bind mounts)
/// and bind mounts of its device node (block publishes).
fn mounts_of(pool: &Pool, id: &str) -> Result<Vec<MountEntry>, Status> {
    let dev = pool.device_number(id).map_err(status)?;
    let node = pool.device_node(id);
    let tail = node.strip_prefix("/dev").unwrap_or(&node).to_path_buf();
    Ok(read_mounts()?
        .into_iter()
        .filter(|m| Some(m.dev) == dev || m.root.ends_with(&tail) && m.root != Path::new("/"))
        .collect())
}

fn is_ours(pool: &Pool, id: &str, m: &MountEntry) -> Result<bool, Status> {
    Ok(Some(m.dev) == pool.device_number(id).map_err(status)?)
}

/// Mount flags the kernel takes as flags; the rest go to ext4 as options.
fn split_flags(flags: &[String]) -> (libc::c_ulong, String) {
    let mut bits = 0;
    let mut data = Vec::new();
    for f in flags {
        match f.as_str() {
            "ro" => bits |= libc::MS_RDONLY,
            "noatime" => bits |= libc::MS_NOATIME,
            "nodiratime" => bits |= libc::MS_NODIRATIME,
            "relatime" => bits |= libc::MS_RELATIME,
            "nosuid" => bits |= libc::MS_NOSUID,
            "nodev" => bits |= libc::MS_NODEV,
            "noexec" => bits |= libc::MS_NOEXEC,
            "sync" => bits |= libc::MS_SYNCHRONOUS,
            "dirsync" => bits |= libc::MS_DIRSYNC,
            "rw" | "defaults" => {}
            other => data.push(other.to_owned()),
        }
    }
    (bits, data.join(","))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Driver {
    /// A driver over `pool` (None: no pool device on this box; volume calls fail with
    /// FAILED_PRECONDITION). `node_id` is what NodeGetInfo reports.
    pub fn new(pool: Option<Pool>, node_id: String) -> Driver {
        Driver {
            pool: Arc::new(Mutex::new(pool)),
            node_id,
        }
    }

    /// The pool as this driver holds it, for the metrics endpoint and the use timer.
    pub fn shared_pool(&self) -> crate::metrics::SharedPool {
        self.pool.clone()
    }

    /// The host name, the usual CSI node id.
    pub fn hostname() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }

    /// Runs `f` with the pool on the blocking pool, one call at a time.
    async fn with_pool<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Pool) -> Result<T, Status> + Send + 'static,
    {
        let pool = self.pool.clone();
        // The call's span follows it onto the blocking thread.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _in_call = span.enter();
            let mut guard = pool.lock().unwrap_or_else(|p| p.into_inner());
            match guard.as_mut() {
                Some(p) => {
                    let r = f(p);
                    // Staging formats and writes; one status ioctl tells whether that
                    // crossed a near-full threshold.
                    let _ = p.check_fullness();
                    r
                }
                None => Err(Status::failed_precondition(
                    "no pool device: this node has no storage pool",
                )),
            }
        })
        .await
        .map_err(|e| Status::internal(format!("volume operation did not finish: {e}")))?
    }

    // ---- Identity ----

    pub async fn get_plugin_info(
        &self,
        _: GetPluginInfoRequest,
    ) -> Result<GetPluginInfoResponse, Status> {
        Ok(GetPluginInfoResponse {
            name: PLUGIN_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        })
    }

    pub async fn get_plugin_capabilities(
        &self,
        _: GetPluginCapabilitiesRequest,
    ) -> Result<GetPluginCapabilitiesResponse, Status> {
        use plugin_capability::*;
        Ok(GetPluginCapabilitiesResponse {
            capabilities: vec![
                PluginCapability {
                    r#type: Some(Type::Service(Service {
                        r#type: ServiceType::ControllerService as i32,
                    })),
                },
                PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: ExpansionType::Online as i32,
                    })),
                },
            ],
        })
    }

    /// Ready once serving: without a pool the plugin is healthy and says so through
    /// FAILED_PRECONDITION on volume calls, not through a restart loop.
    pub async fn probe(&self, _: ProbeRequest) -> Result<ProbeResponse, Status> {
        Ok(ProbeResponse {
            ready: Some(BoolValue { value: true }),
        })
    }

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
            let guard = pool.lock().unwrap_or_else(|p| p.into_inner());
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
                    mounts::mkfs(fs, &device).map_err(Status::internal)?;
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
            mounts::mount_fs(&device, &staging, fs.name(), flags, &data).map_err(|e| {
                let msg = format!(
                    "failed to mount {} on {} (flags {:?}): {e}",
                    device.display(),
                    staging.display(),
                    cap.mount_flags
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
                mounts::grow(fs, &pool.device_node(&id), &path).map_err(Status::internal)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(block: bool, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(if block {
                AccessType::Block(volume_capability::BlockVolume {})
            } else {
                AccessType::Mount(volume_capability::MountVolume::default())
            }),
            access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn shared_access_modes_are_for_filesystems_only() {
        for m in [
            Mode::SingleNodeMultiWriter,
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeReaderOnly,
            Mode::SingleNodeReaderOnly,
        ] {
            assert!(check_cap(&cap(false, m)).is_ok(), "{m:?}");
            let e = check_cap(&cap(true, m)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(&mode_name(m)), "{}", e.message());
        }
        assert!(check_cap(&cap(true, Mode::SingleNodeWriter)).is_ok());
        assert_eq!(
            mode_name(Mode::MultiNodeMultiWriter),
            "MULTI_NODE_MULTI_WRITER"
        );
        assert!(check_cap(&cap(false, Mode::Unknown)).is_err());
    }

    #[test]
    fn fs_types_ext4_and_xfs_only() {
        let with = |fs: &str| VolumeCapability {
            access_type: Some(AccessType::Mount(volume_capability::MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
            access_mode: Some(volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert_eq!(check_cap(&with("")).unwrap().fs, None);
        assert_eq!(check_cap(&with("ext4")).unwrap().fs, Some(Fs::Ext4));
        let xfs = check_cap(&with("xfs")).unwrap();
        assert_eq!(xfs.fs, Some(Fs::Xfs));
        let e = check_cap(&with("btrfs")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("btrfs"), "{}", e.message());
        let small = check_fs_size(std::slice::from_ref(&xfs), "v", 100 << 20).unwrap_err();
        assert_eq!(small.code(), tonic::Code::OutOfRange);
        assert!(small.message().contains("xfs"), "{}", small.message());
        assert!(check_fs_size(&[xfs], "v", 300 << 20).is_ok());
    }

    #[test]
    fn capacity_ranges() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(wanted_size(None).unwrap().0, DEFAULT_BYTES);
        assert_eq!(wanted_size(Some(&r(5000, 0))).unwrap().0, 8192);
        assert_eq!(wanted_size(Some(&r(0, 4096))).unwrap().0, 4096);
        assert_eq!(
            wanted_size(Some(&r(5000, 6000))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            wanted_size(Some(&r(-1, 0))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn mount_flags_split_into_bits_and_options() {
        let (bits, data) = split_flags(&["noatime".into(), "ro".into(), "data=ordered".into()]);
        assert_eq!(bits, libc::MS_NOATIME | libc::MS_RDONLY);
        assert_eq!(data, "data=ordered");
    }
}
