//! A CSI server double for the tests of noded's volumes: it speaks storaged's wire
//! format (edge-csi's `csi::api` messages over gRPC on a unix socket), records every
//! call, and stands in for a volume with a directory (or, for a Block volume, a loop
//! device): stage bind-mounts it on the staging path, publish bind-mounts the staging
//! path on the target (read-only when asked), as storaged does with the ext4 mount.
//! It stands in for storaged because storaged's volumes are device-mapper thin devices
//! and the host kernel has no device-mapper (storaged runs in the QEMU tests).

// The handlers answer with gRPC statuses, as tonic's own services do.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use edge_csi::api::*;
use tonic::body::Body;
use tonic::codec::ProstCodec;
use tonic::codegen::http;
use tonic::{Code, Status};

/// One CSI call as the double saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: &'static str,
    pub volume: String,
    /// The staging path (stage, unstage) or target path (publish, unpublish).
    pub path: String,
    pub read_only: bool,
    /// CreateVolume's size and every call's access mode, where given.
    pub size: i64,
    pub mode: i32,
}

#[derive(Default)]
pub struct State {
    pub calls: Vec<Call>,
    /// CreateVolume of these names fails with this code.
    pub refuse: BTreeMap<String, (Code, String)>,
    /// NodePublishVolume calls wait while this is set: a volume that is slow to come.
    pub hold_publish: bool,
    /// Block volumes: volume → the loop device backed by `<root>/<volume>.img`.
    pub loops: BTreeMap<String, String>,
}

/// Detaches the double's loop devices, also when an assertion fails.
pub struct Loops(pub Arc<Mutex<State>>);

impl Drop for Loops {
    fn drop(&mut self) {
        let loops = std::mem::take(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()).loops);
        for dev in loops.values() {
            let _ = std::process::Command::new("losetup")
                .args(["-d", dev])
                .status();
        }
    }
}

pub fn is_block(cap: &Option<VolumeCapability>) -> bool {
    matches!(
        cap.as_ref().and_then(|c| c.access_type.as_ref()),
        Some(volume_capability::AccessType::Block(_))
    )
}

/// The CSI double: its volumes are directories under `root`.
#[derive(Clone)]
pub struct Double {
    pub root: PathBuf,
    pub state: Arc<Mutex<State>>,
}

pub fn mode_of(cap: &Option<VolumeCapability>) -> i32 {
    cap.as_ref()
        .and_then(|c| c.access_mode.as_ref())
        .map_or(0, |m| m.mode)
}

pub fn mounted(path: &Path) -> bool {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

pub fn bind(src: &Path, dst: &Path, read_only: bool) -> Result<(), Status> {
    let (s, d) = (cstr(src), cstr(dst));
    // SAFETY: valid NUL-terminated paths; null fstype and data are allowed for binds.
    let mut rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc == 0 && read_only {
        // The kernel ignores MS_RDONLY on the bind itself.
        rc = unsafe {
            libc::mount(
                std::ptr::null(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
    }
    if rc != 0 {
        return Err(Status::internal(format!(
            "bind {} on {}: {}",
            src.display(),
            dst.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

pub fn unmount(path: &Path) {
    let p = cstr(path);
    while mounted(path) {
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) } != 0 {
            break;
        }
    }
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

impl Double {
    pub fn record(&self, call: Call) {
        self.state.lock().unwrap().calls.push(call);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn backing(&self, volume: &str) -> PathBuf {
        self.root.join(volume)
    }

    pub fn create(&self, r: CreateVolumeRequest) -> Result<CreateVolumeResponse, Status> {
        let size = r.capacity_range.as_ref().map_or(0, |c| c.required_bytes);
        self.record(Call {
            method: "CreateVolume",
            volume: r.name.clone(),
            path: String::new(),
            read_only: false,
            size,
            mode: mode_of(&r.volume_capabilities.first().cloned()),
        });
        if let Some((code, msg)) = self.state.lock().unwrap().refuse.get(&r.name) {
            return Err(Status::new(*code, msg.clone()));
        }
        if is_block(&r.volume_capabilities.first().cloned()) {
            self.create_block(&r.name, size)?;
        } else {
            std::fs::create_dir_all(self.backing(&r.name))
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(CreateVolumeResponse {
            volume: Some(Volume {
                capacity_bytes: size,
                volume_id: r.name,
                ..Default::default()
            }),
        })
    }

    /// A block volume: a file of `size` bytes behind a loop device, as storaged's thin
    /// device is a block device.
    pub fn create_block(&self, name: &str, size: i64) -> Result<(), Status> {
        if self.state.lock().unwrap().loops.contains_key(name) {
            return Ok(());
        }
        let file = self.root.join(format!("{name}.img"));
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size as u64))
            .map_err(|e| Status::internal(format!("{}: {e}", file.display())))?;
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .map_err(|e| Status::internal(format!("losetup: {e}")))?;
        if !out.status.success() {
            return Err(Status::internal(format!(
                "losetup {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.state.lock().unwrap().loops.insert(name.into(), dev);
        Ok(())
    }

    pub fn loop_device(&self, volume: &str) -> Option<PathBuf> {
        self.state
            .lock()
            .unwrap()
            .loops
            .get(volume)
            .map(PathBuf::from)
    }

    pub fn stage(&self, r: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse, Status> {
        self.record(Call {
            method: "NodeStageVolume",
            volume: r.volume_id.clone(),
            path: r.staging_target_path.clone(),
            read_only: false,
            size: 0,
            mode: mode_of(&r.volume_capability),
        });
        let staging = PathBuf::from(&r.staging_target_path);
        if is_block(&r.volume_capability) {
            // As storaged: nothing to mount, publish binds the device node itself.
            return match self.loop_device(&r.volume_id) {
                Some(_) => Ok(NodeStageVolumeResponse {}),
                None => Err(Status::not_found(format!(
                    "block volume {} does not exist",
                    r.volume_id
                ))),
            };
        }
        if !self.backing(&r.volume_id).is_dir() {
            return Err(Status::not_found(format!(
                "volume {} does not exist",
                r.volume_id
            )));
        }
        if !mounted(&staging) {
            std::fs::create_dir_all(&staging).map_err(|e| Status::internal(e.to_string()))?;
            bind(&self.backing(&r.volume_id), &staging, false)?;
        }
        Ok(NodeStageVolumeResponse {})
    }

    pub fn publish(
        &self,
        r: NodePublishVolumeRequest,
    ) -> Result<NodePublishVolumeResponse, Status> {
        self.record(Call {
            method: "NodePublishVolume",
            volume: r.volume_id.clone(),
            path: r.target_path.clone(),
            read_only: r.readonly,
            size: 0,
            mode: mode_of(&r.volume_capability),
        });
        let (staging, target) = (
            PathBuf::from(&r.staging_target_path),
            PathBuf::from(&r.target_path),
        );
        if is_block(&r.volume_capability) {
            let dev = self.loop_device(&r.volume_id).ok_or_else(|| {
                Status::not_found(format!("block volume {} does not exist", r.volume_id))
            })?;
            if !mounted(&target) {
                std::fs::create_dir_all(target.parent().unwrap())
                    .and_then(|()| std::fs::File::create(&target).map(drop))
                    .map_err(|e| Status::internal(e.to_string()))?;
                bind(&dev, &target, r.readonly)?;
            }
            return Ok(NodePublishVolumeResponse {});
        }
        if !mounted(&staging) {
            return Err(Status::failed_precondition(format!(
                "volume {} is not staged at {}",
                r.volume_id, r.staging_target_path
            )));
        }
        if !mounted(&target) {
            std::fs::create_dir_all(&target).map_err(|e| Status::internal(e.to_string()))?;
            bind(&staging, &target, r.readonly)?;
        }
        Ok(NodePublishVolumeResponse {})
    }

    pub fn unpublish(
        &self,
        r: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse, Status> {
        let target = PathBuf::from(&r.target_path);
        unmount(&target);
        let _ = std::fs::remove_dir(&target).or_else(|_| std::fs::remove_file(&target));
        // Recorded once carried out: a test that sees the call may check its effect.
        self.record(Call {
            method: "NodeUnpublishVolume",
            volume: r.volume_id.clone(),
            path: r.target_path.clone(),
            read_only: false,
            size: 0,
            mode: 0,
        });
        Ok(NodeUnpublishVolumeResponse {})
    }

    /// Deletes a volume's directory; refused while it is staged, as storaged refuses.
    pub fn delete(&self, r: DeleteVolumeRequest) -> Result<DeleteVolumeResponse, Status> {
        self.record(Call {
            method: "DeleteVolume",
            volume: r.volume_id.clone(),
            path: String::new(),
            read_only: false,
            size: 0,
            mode: 0,
        });
        let backing = self.backing(&r.volume_id);
        // Staged: its last stage call came after its last unstage call.
        let staged = self
            .calls()
            .iter()
            .rev()
            .filter(|c| c.volume == r.volume_id)
            .find(|c| matches!(c.method, "NodeStageVolume" | "NodeUnstageVolume"))
            .is_some_and(|c| c.method == "NodeStageVolume");
        if staged {
            return Err(Status::failed_precondition(format!(
                "volume {} is still mounted",
                r.volume_id
            )));
        }
        let _ = std::fs::remove_dir_all(&backing);
        Ok(DeleteVolumeResponse {})
    }

    /// Grows a volume: recorded with its new size (a directory has no size to grow).
    pub fn expand(
        &self,
        r: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, Status> {
        let size = r.capacity_range.as_ref().map_or(0, |c| c.required_bytes);
        self.record(Call {
            method: "ControllerExpandVolume",
            volume: r.volume_id.clone(),
            path: String::new(),
            read_only: false,
            size,
            mode: 0,
        });
        if !self.backing(&r.volume_id).is_dir() {
            return Err(Status::not_found(format!(
                "volume {} does not exist",
                r.volume_id
            )));
        }
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: size,
            node_expansion_required: true,
        })
    }

    /// Grows a staged volume's filesystem: recorded with the path it was asked at.
    pub fn node_expand(
        &self,
        r: NodeExpandVolumeRequest,
    ) -> Result<NodeExpandVolumeResponse, Status> {
        self.record(Call {
            method: "NodeExpandVolume",
            volume: r.volume_id.clone(),
            path: r.volume_path.clone(),
            read_only: false,
            size: 0,
            mode: 0,
        });
        if !mounted(Path::new(&r.volume_path)) {
            return Err(Status::failed_precondition(format!(
                "volume {} is not mounted at {}",
                r.volume_id, r.volume_path
            )));
        }
        Ok(NodeExpandVolumeResponse { capacity_bytes: 0 })
    }

    pub fn unstage(
        &self,
        r: NodeUnstageVolumeRequest,
    ) -> Result<NodeUnstageVolumeResponse, Status> {
        unmount(Path::new(&r.staging_target_path));
        self.record(Call {
            method: "NodeUnstageVolume",
            volume: r.volume_id.clone(),
            path: r.staging_target_path.clone(),
            read_only: false,
            size: 0,
            mode: 0,
        });
        Ok(NodeUnstageVolumeResponse {})
    }
}

/// Decodes one request, answers it with `f` and encodes the reply.
pub async fn unary<Req, Resp>(
    req: http::Request<Body>,
    f: impl Fn(Req) -> Result<Resp, Status> + Clone + Send + Sync + 'static,
) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
{
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default());
    let svc = tower::service_fn(move |r: tonic::Request<Req>| {
        let f = f.clone();
        async move { f(r.into_inner()).map(tonic::Response::new) }
    });
    grpc.unary(svc, req).await
}

impl tower::Service<http::Request<Body>> for Double {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let d = self.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            if path == "/csi.v1.Node/NodePublishVolume" {
                while d.state.lock().unwrap().hold_publish {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Ok(match path.as_str() {
                "/csi.v1.Controller/CreateVolume" => unary(req, move |r| d.create(r)).await,
                "/csi.v1.Node/NodeStageVolume" => unary(req, move |r| d.stage(r)).await,
                "/csi.v1.Node/NodePublishVolume" => unary(req, move |r| d.publish(r)).await,
                "/csi.v1.Node/NodeUnpublishVolume" => unary(req, move |r| d.unpublish(r)).await,
                "/csi.v1.Node/NodeUnstageVolume" => unary(req, move |r| d.unstage(r)).await,
                "/csi.v1.Controller/DeleteVolume" => unary(req, move |r| d.delete(r)).await,
                "/csi.v1.Controller/ControllerExpandVolume" => {
                    unary(req, move |r| d.expand(r)).await
                }
                "/csi.v1.Node/NodeExpandVolume" => unary(req, move |r| d.node_expand(r)).await,
                other => {
                    Status::unimplemented(format!("the double does not serve {other}")).into_http()
                }
            })
        })
    }
}

pub fn serve(socket: &Path, root: &Path) -> Double {
    std::fs::create_dir_all(root).unwrap();
    let double = Double {
        root: root.to_path_buf(),
        state: Default::default(),
    };
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    let svc = double.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming(
                svc,
                tokio_stream::wrappers::UnixListenerStream::new(listener),
            )
            .await
    });
    double
}
