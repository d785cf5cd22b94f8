//! What each CSI call does with the pool and the node's mounts, and which gRPC code
//! each failure gets (the codes of the CSI specification's error tables).
//!
//! Volume and snapshot ids are their catalog names (stable, unique in the pool). Every
//! pool or mount operation runs on the blocking pool behind one mutex: device-mapper
//! ioctls, mkfs and mount(2) block, and one at a time keeps stage/publish/delete from
//! racing each other.

// tonic::Status is the reply itself on every error path; boxing it buys nothing.
#![allow(clippy::result_large_err)]

mod checks;
mod controller;
mod node;

use std::path::Path;
use std::sync::{Arc, Mutex};

use tonic::Status;

use super::api::*;
use crate::{Error, Pool};

/// Size of a volume whose request names no capacity.
pub(super) const DEFAULT_BYTES: u64 = 1 << 30;
const PLUGIN_NAME: &str = "storaged.edgeos";

pub struct Driver {
    pool: Arc<Mutex<Option<Pool>>>,
    node_id: String,
}

pub(super) fn status(e: Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::BadRequest { .. } => Status::invalid_argument(msg),
        Error::VolumeExists(_) => Status::already_exists(msg),
        Error::NoVolume(_) => Status::not_found(msg),
        Error::Overcommit { .. } | Error::OutOfSpace { .. } | Error::NoRoom { .. } => {
            Status::resource_exhausted(msg)
        }
        Error::Busy { .. } => Status::failed_precondition(msg),
        Error::ForeignData { .. } | Error::TooSmall { .. } => Status::failed_precondition(msg),
        Error::Io { .. }
        | Error::DiskIo { .. }
        | Error::BadPool { .. }
        | Error::DeviceMapper { .. }
        | Error::PartitionTable { .. }
        | Error::Blkpg { .. }
        | Error::NoDeviceNode(_)
        | Error::Tool { .. }
        | Error::Bind { .. }
        | Error::Common(_)
        | Error::Serve(_) => Status::internal(msg),
    }
}

pub(super) fn required(value: &str, what: &str, call: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{call}: {what} is required"
        )));
    }
    Ok(())
}

pub(super) fn io_status(what: &str, path: &Path, e: std::io::Error) -> Status {
    let msg = format!("{what} {}: {e}", path.display());
    match e.kind() {
        std::io::ErrorKind::NotFound => Status::not_found(msg),
        std::io::ErrorKind::InvalidInput => Status::invalid_argument(msg),
        _ => Status::internal(msg),
    }
}

pub(super) fn now_unix() -> u64 {
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
            let mut guard = edge_common::lock(&pool);
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
}
