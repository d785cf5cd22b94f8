//! Pods' CSI volumes from storaged: owns the CSI calls that provision, stage and
//! publish a pod's `csi` volumes before its sandbox starts, and unpublish and unstage
//! them after it is gone, and the directories they are mounted on:
//! `<state_dir>/csi/staging/<volume>` (one per volume on the node) and
//! `<state_dir>/csi/pods/<uid>/<volume name>` (one per pod that uses it).
//!
//! Volumes are persistent and named: a pod never deletes one. Only the API server's
//! reclaim of a PersistentVolume that noded provisioned does ([`Volumes::delete`],
//! called by `apiserver/provisioner.rs`), and storaged refuses that while it is mounted.
//!
//! A volume grown while no pod had it staged keeps a marker
//! (`<state_dir>/csi/grow/<volume>`): its filesystem is grown when it is staged next.
//!
//! Which pods use which volume is kept here, behind one lock that every stage,
//! publish, unpublish and unstage goes through, so a pod starting while another that
//! shares its volume is torn down never finds the staging mount gone under it. Each
//! pod's volumes are also recorded in `<state_dir>/csi/pods/<uid>.json` until they are
//! released, so a noded that starts after a pod went (noded down, or a reboot) still
//! unpublishes and unstages what that pod held.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use edge_csi::api::{
    volume_capability, CapacityRange, ControllerExpandVolumeRequest,
    ControllerExpandVolumeResponse, CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeRequest,
    DeleteVolumeResponse, NodeExpandVolumeRequest, NodeExpandVolumeResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, VolumeCapability,
};
use edge_csi::Client;

use crate::error::{Error, Result};
use crate::manifest::{AccessMode, CsiVolume, Pod, VolumeSource};

pub struct Volumes {
    socket: Option<PathBuf>,
    state_dir: PathBuf,
    /// volume id → the (pod uid, pod volume name) pairs that may have it published:
    /// entered before the first stage call, so a failed attempt is cleaned up too.
    users: tokio::sync::Mutex<BTreeMap<String, BTreeSet<(String, String)>>>,
}

impl Volumes {
    /// `socket`: storaged's CSI socket; without one, pods with csi volumes are refused.
    pub fn new(socket: Option<PathBuf>, state_dir: PathBuf) -> Self {
        Volumes {
            socket,
            state_dir,
            users: Default::default(),
        }
    }

    /// Where a pod's volume is published, and what its containers mount.
    pub fn target(&self, uid: &str, name: &str) -> PathBuf {
        self.pod_dir(uid).join(name)
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.state_dir.join("csi/pods").join(uid)
    }

    fn staging(&self, volume: &str) -> PathBuf {
        self.state_dir.join("csi/staging").join(volume)
    }

    fn grow_marker(&self, volume: &str) -> PathBuf {
        self.state_dir.join("csi/grow").join(volume)
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.state_dir.join("csi/pods").join(format!("{uid}.json"))
    }

    /// Creates (if new), stages and publishes each csi volume of the pod. The error
    /// names the volume, the CSI call and its code; calling again retries (every
    /// step is idempotent).
    pub async fn attach(&self, uid: &str, pod: &Pod) -> Result<()> {
        let wanted: Vec<(&str, &CsiVolume)> = csi_volumes(pod).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let Some(socket) = &self.socket else {
            return Err(Error::volume(wanted[0].0, None)(Error::Csi {
                code: tonic::Code::FailedPrecondition,
                message: "csi volumes need storaged, and noded's csi_socket is not set".into(),
            }));
        };
        let mut users = self.users.lock().await;
        let record = Record {
            pod: format!("{}/{}", pod.namespace, pod.name),
            volumes: wanted
                .iter()
                .map(|(name, v)| (name.to_string(), v.volume.clone()))
                .collect(),
        };
        self.write_record(uid, &record)?;
        for (name, v) in wanted {
            let why = |e| Error::volume(name, Some(&v.volume))(e);
            let client = connect(socket).await.map_err(why)?;
            let cap = capability(v);
            create(&client, v).await.map_err(why)?;
            users
                .entry(v.volume.clone())
                .or_default()
                .insert((uid.to_string(), name.to_string()));
            let staging = self.staging(&v.volume);
            let _: NodeStageVolumeResponse = call(
                &client,
                "/csi.v1.Node/NodeStageVolume",
                NodeStageVolumeRequest {
                    volume_id: v.volume.clone(),
                    staging_target_path: path_string(&staging),
                    volume_capability: Some(staging_capability(v)),
                    ..Default::default()
                },
            )
            .await
            .map_err(why)?;
            if self.grow_marker(&v.volume).exists() {
                self.grow(&client, &v.volume, &staging, v.block)
                    .await
                    .map_err(why)?;
            }
            let target = self.target(uid, name);
            let _: NodePublishVolumeResponse = call(
                &client,
                "/csi.v1.Node/NodePublishVolume",
                NodePublishVolumeRequest {
                    volume_id: v.volume.clone(),
                    staging_target_path: path_string(&staging),
                    target_path: path_string(&target),
                    volume_capability: Some(cap),
                    readonly: v.read_only || v.access_mode == AccessMode::ReadOnlyMany,
                    ..Default::default()
                },
            )
            .await
            .map_err(why)?;
            tracing::info!(pod = %pod.name, volume = %name, id = %v.volume, target = %target.display(), "csi volume published");
        }
        Ok(())
    }

    /// Creates `v` in storaged (if new) for a claim noded provisions; returns its size
    /// in bytes, at least the size asked for.
    pub async fn create(&self, v: &CsiVolume) -> Result<i64> {
        create(&self.client().await?, v).await
    }

    /// Deletes a volume and its data (a reclaimed PersistentVolume's). storaged
    /// refuses it (FAILED_PRECONDITION) while it is mounted; one already gone is fine.
    pub async fn delete(&self, volume: &str) -> Result<()> {
        let client = self.client().await?;
        let _: DeleteVolumeResponse = call(
            &client,
            "/csi.v1.Controller/DeleteVolume",
            DeleteVolumeRequest {
                volume_id: volume.to_string(),
            },
        )
        .await?;
        let _ = std::fs::remove_file(self.grow_marker(volume));
        Ok(())
    }

    /// Grows a volume to at least `bytes`, and its filesystem: now if a pod has it
    /// staged, else when it is staged next. Returns its size.
    pub async fn expand(&self, volume: &str, bytes: i64, block: bool) -> Result<i64> {
        let client = self.client().await?;
        let r: ControllerExpandVolumeResponse = call(
            &client,
            "/csi.v1.Controller/ControllerExpandVolume",
            ControllerExpandVolumeRequest {
                volume_id: volume.to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            },
        )
        .await?;
        if r.node_expansion_required && !block {
            // Marked first: a stage that comes while this runs grows it too.
            let marker = self.grow_marker(volume);
            marker
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&marker, b""))
                .map_err(Error::io("failed to write", &marker))?;
            let staging = self.staging(volume);
            if staging_mounted(&staging) {
                self.grow(&client, volume, &staging, block).await?;
            }
        }
        Ok(r.capacity_bytes)
    }

    /// Grows the filesystem of a staged volume to its device, and drops its marker.
    async fn grow(&self, client: &Client, volume: &str, staging: &Path, block: bool) -> Result<()> {
        if !block {
            let _: NodeExpandVolumeResponse = call(
                client,
                "/csi.v1.Node/NodeExpandVolume",
                NodeExpandVolumeRequest {
                    volume_id: volume.to_string(),
                    volume_path: path_string(staging),
                    ..Default::default()
                },
            )
            .await?;
            tracing::info!(id = %volume, "csi volume's filesystem grown");
        }
        let marker = self.grow_marker(volume);
        std::fs::remove_file(&marker).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(Error::io("failed to remove", &marker)(e)),
        })
    }

    async fn client(&self) -> Result<Client> {
        match &self.socket {
            Some(socket) => connect(socket).await,
            None => Err(Error::Csi {
                code: tonic::Code::FailedPrecondition,
                message: "storaged's volumes need noded's csi_socket, which is not set".into(),
            }),
        }
    }

    /// Records that an adopted pod (left running by an earlier noded) has its
    /// volumes published, so unstaging waits for it too.
    pub async fn adopt(&self, uid: &str, pod: &Pod) {
        let mut users = self.users.lock().await;
        for (name, v) in csi_volumes(pod) {
            users
                .entry(v.volume.clone())
                .or_default()
                .insert((uid.to_string(), name.to_string()));
        }
    }

    /// Unpublishes the pod's volumes, and unstages each that no other pod on the
    /// node still uses. What fails stays recorded, so calling again retries it.
    pub async fn detach(&self, uid: &str, pod: &str) -> Result<()> {
        let mut users = self.users.lock().await;
        let mine: Vec<(String, String)> = users
            .iter()
            .flat_map(|(id, us)| {
                us.iter()
                    .filter(|(u, _)| u == uid)
                    .map(move |(_, name)| (id.clone(), name.clone()))
            })
            .collect();
        if mine.is_empty() {
            self.remove_record(uid);
            return Ok(());
        }
        let Some(socket) = &self.socket else {
            return Ok(());
        };
        let client = connect(socket).await.map_err(|e| Error::Unpublish {
            pod: pod.to_string(),
            source: Box::new(e),
        })?;
        for (id, name) in mine {
            let why = |e| Error::volume(&name, Some(&id))(e);
            let target = self.target(uid, &name);
            let r: Result<NodeUnpublishVolumeResponse, _> = call(
                &client,
                "/csi.v1.Node/NodeUnpublishVolume",
                NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: path_string(&target),
                },
            )
            .await;
            // NOT_FOUND: the volume is gone from storaged, so nothing of it is mounted.
            match r {
                Ok(_)
                | Err(Error::Csi {
                    code: tonic::Code::NotFound,
                    ..
                }) => {}
                Err(e) => return Err(why(e)),
            }
            let left = users.get_mut(&id).map(|us| {
                us.remove(&(uid.to_string(), name.clone()));
                us.len()
            });
            tracing::info!(pod = %pod, volume = %name, id = %id, "csi volume unpublished");
            if left == Some(0) {
                let staging = self.staging(&id);
                let r: Result<NodeUnstageVolumeResponse, _> = call(
                    &client,
                    "/csi.v1.Node/NodeUnstageVolume",
                    NodeUnstageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: path_string(&staging),
                    },
                )
                .await;
                match r {
                    Ok(_)
                    | Err(Error::Csi {
                        code: tonic::Code::NotFound,
                        ..
                    }) => {}
                    Err(e) => {
                        // Still staged: the retry must come back here, so the volume
                        // keeps a user until then.
                        users
                            .entry(id.clone())
                            .or_default()
                            .insert((uid.to_string(), name.clone()));
                        return Err(why(e));
                    }
                }
                users.remove(&id);
                tracing::info!(id = %id, "csi volume unstaged: no pod on the node uses it");
            }
        }
        self.remove_record(uid);
        // Only empty directories are removed: never a mount that is still there.
        let dir = self.pod_dir(uid);
        if let Err(e) = std::fs::remove_dir(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("failed to remove {}: {e}", dir.display());
            }
        }
        Ok(())
    }

    /// Detaches until it succeeds, waiting `base` doubling up to `max` between tries:
    /// a pod's data must not stay mounted because storaged was away for a while.
    pub async fn detach_retrying(&self, uid: &str, pod: &str, base: Duration, max: Duration) {
        let mut backoff = edge_common::Backoff::new(base, max);
        loop {
            match self.detach(uid, pod).await {
                Ok(()) => return,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(pod = %pod, "{e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Pods an earlier noded published volumes for that are not among `live` (the
    /// uids of the pods this noded runs or will run): their volumes become theirs
    /// again here, for [`Volumes::detach`]. Returns (uid, pod) of each.
    pub async fn orphans(&self, live: &BTreeSet<String>) -> Vec<(String, String)> {
        let dir = self.state_dir.join("csi/pods");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!("failed to read {}: {e}", dir.display());
                return Vec::new();
            }
        };
        let mut users = self.users.lock().await;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(uid) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|u| !u.starts_with('.') && !live.contains(*u))
                .map(str::to_string)
            else {
                continue;
            };
            let record: Record = match std::fs::read(&path)
                .and_then(|b| serde_json::from_slice(&b).map_err(std::io::Error::from))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("ignoring {}: {e}", path.display());
                    continue;
                }
            };
            for (name, id) in record.volumes {
                users.entry(id).or_default().insert((uid.clone(), name));
            }
            out.push((uid, record.pod));
        }
        out
    }

    fn write_record(&self, uid: &str, record: &Record) -> Result<()> {
        let path = self.record_path(uid);
        let tmp = path.with_file_name(format!(".{uid}.json.tmp"));
        let dir = self.state_dir.join("csi/pods");
        serde_json::to_vec(record)
            .map_err(std::io::Error::from)
            .and_then(|text| std::fs::create_dir_all(&dir).map(|()| text))
            .and_then(|text| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(Error::io("failed to write", &path))
    }

    fn remove_record(&self, uid: &str) {
        let path = self.record_path(uid);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("failed to remove {}: {e}", path.display());
            }
        }
    }
}

/// CreateVolume of `v` (nothing to do if it exists); its size in bytes.
async fn create(client: &Client, v: &CsiVolume) -> Result<i64> {
    let r: CreateVolumeResponse = call(
        client,
        "/csi.v1.Controller/CreateVolume",
        CreateVolumeRequest {
            name: v.volume.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: v.size_bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability(v)],
            ..Default::default()
        },
    )
    .await?;
    Ok(r.volume.map_or(v.size_bytes, |v| v.capacity_bytes))
}

/// Whether something is mounted at `path` (a staged volume): its device differs
/// from its parent directory's.
fn staging_mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) {
        (Ok(m), Some(Ok(p))) => m.dev() != p.dev(),
        _ => false,
    }
}

/// What `<uid>.json` holds: the pod (namespace/name, for messages) and its csi
/// volumes as (pod volume name, storaged volume id).
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    pod: String,
    volumes: Vec<(String, String)>,
}

fn csi_volumes(pod: &Pod) -> impl Iterator<Item = (&str, &CsiVolume)> {
    pod.volumes.iter().filter_map(|v| match &v.source {
        VolumeSource::Csi(c) => Some((v.name.as_str(), c)),
        _ => None,
    })
}

/// Kubernetes' access modes as CSI's: everything runs on this one node, so the
/// shared modes are the single-node ones storaged advertises.
fn capability(v: &CsiVolume) -> VolumeCapability {
    use volume_capability::Mode;
    with_mode(
        v,
        match v.access_mode {
            AccessMode::ReadWriteOnce => Mode::SingleNodeWriter,
            AccessMode::ReadWriteMany => Mode::SingleNodeMultiWriter,
            AccessMode::ReadOnlyMany => Mode::SingleNodeReaderOnly,
        },
    )
}

/// The capability a volume is staged with. The staging mount is shared by every pod
/// on the node that uses the volume, and storaged mounts it read-only for a reader
/// mode: a ReadOnlyMany pod staging first would leave the volume read-only for the
/// writers that come after it. So it is staged as shared-writable, and its readers'
/// publishes are read-only instead (the kernel still refuses their writes).
fn staging_capability(v: &CsiVolume) -> VolumeCapability {
    match v.access_mode {
        AccessMode::ReadOnlyMany => with_mode(v, volume_capability::Mode::SingleNodeMultiWriter),
        _ => capability(v),
    }
}

fn with_mode(v: &CsiVolume, mode: volume_capability::Mode) -> VolumeCapability {
    use volume_capability::{AccessType, BlockVolume, MountVolume};
    VolumeCapability {
        access_type: Some(if v.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: v.fs_type.clone(),
                ..Default::default()
            })
        }),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

async fn connect(socket: &Path) -> Result<Client> {
    let unreachable = |why: String| Error::Csi {
        code: tonic::Code::Unavailable,
        message: format!("storaged is not reachable (UNAVAILABLE): {why}"),
    };
    // A socket whose server hangs would otherwise hold up every pod's reconciling.
    match tokio::time::timeout(Duration::from_secs(10), Client::connect(socket)).await {
        Ok(Ok(c)) => Ok(c),
        // edge-csi's client says why in its own words.
        Ok(Err(why)) => Err(unreachable(why.message().to_owned())),
        Err(_) => Err(unreachable(format!(
            "no connection on {} within 10 s",
            socket.display()
        ))),
    }
}

/// How long one CSI call may take: staging a new volume formats it, which storaged
/// keeps short (a fresh thin volume reads zeros, so mke2fs writes little).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One CSI call; its error keeps the status's code, and its message reads
/// `<Call>: <CODE>: <storaged's message>`.
async fn call<Req, Resp>(client: &Client, method: &'static str, req: Req) -> Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let short = method.rsplit('/').next().unwrap_or(method);
    let status = match tokio::time::timeout(CALL_TIMEOUT, client.call(method, req)).await {
        Ok(Ok(resp)) => return Ok(resp),
        Ok(Err(s)) => s,
        Err(_) => tonic::Status::deadline_exceeded(format!(
            "no answer from storaged within {CALL_TIMEOUT:?}"
        )),
    };
    Err(Error::Csi {
        code: status.code(),
        message: format!(
            "{short}: {}: {}",
            code_name(status.code()),
            status.message()
        ),
    })
}

/// gRPC's own spelling of a status code, as the CSI specification names them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn path_string(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(mode: AccessMode, block: bool) -> CsiVolume {
        CsiVolume {
            volume: "v".into(),
            size_bytes: 1,
            access_mode: mode,
            block,
            fs_type: if block { String::new() } else { "ext4".into() },
            read_only: false,
        }
    }

    #[test]
    fn access_modes_become_storageds_single_node_modes() {
        use volume_capability::{AccessType, Mode};
        let mode = |m| capability(&volume(m, false)).access_mode.unwrap().mode;
        assert_eq!(
            mode(AccessMode::ReadWriteOnce),
            Mode::SingleNodeWriter as i32
        );
        assert_eq!(
            mode(AccessMode::ReadWriteMany),
            Mode::SingleNodeMultiWriter as i32
        );
        assert_eq!(
            mode(AccessMode::ReadOnlyMany),
            Mode::SingleNodeReaderOnly as i32
        );
        let fs = capability(&volume(AccessMode::ReadWriteOnce, false));
        assert!(matches!(fs.access_type, Some(AccessType::Mount(m)) if m.fs_type == "ext4"));
        let block = capability(&volume(AccessMode::ReadWriteOnce, true));
        assert!(matches!(block.access_type, Some(AccessType::Block(_))));
    }

    #[test]
    fn readers_stage_shared_writable_so_later_writers_can_write() {
        use volume_capability::Mode;
        let staged = |m| {
            staging_capability(&volume(m, false))
                .access_mode
                .unwrap()
                .mode
        };
        assert_eq!(
            staged(AccessMode::ReadOnlyMany),
            Mode::SingleNodeMultiWriter as i32
        );
        assert_eq!(
            staged(AccessMode::ReadWriteOnce),
            Mode::SingleNodeWriter as i32
        );
        assert_eq!(
            staged(AccessMode::ReadWriteMany),
            Mode::SingleNodeMultiWriter as i32
        );
    }

    #[tokio::test]
    async fn without_a_socket_csi_volumes_are_refused_by_name() {
        let pod = crate::manifest::parse(
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  volumes:\n  - name: data\n    csi: {driver: storaged.edgeos, volumeAttributes: {volume: db, size: 1Gi}}\n  containers:\n  - name: a\n    image: i\n",
        )
        .unwrap();
        let v = Volumes::new(None, "/nonexistent".into());
        let e = v.attach("uid", &pod).await.unwrap_err().to_string();
        assert!(e.contains("volume data") && e.contains("csi_socket"), "{e}");
        // Nothing was attached, so there is nothing to detach.
        v.detach("uid", "default/a").await.unwrap();
    }
}
