//! The XFS phases (`vmtest.phase=xfs`, `xfs-reboot`): filesystem volumes asked for with
//! `fs_type: xfs` through the daemon's CSI server code, as in `csi.rs`. Create, stage,
//! publish, write and read; online growth with xfs_growfs; a snapshot restored into a
//! new volume mounted beside its still-mounted origin (same XFS UUID); unknown fs types
//! and sizes XFS cannot hold refused; then, on the next boot, the volume is mounted as
//! the XFS it holds and never formatted again.

use std::collections::HashMap;
use std::path::Path;

use storaged::csi::api::*;
use storaged::csi::{Client, Driver};
use tonic::Code;
use volume_capability::{AccessMode, AccessType, Mode, MountVolume};

use super::csi::{
    call, content, create, publish, read_file, refused, stage, unpublish, unstage, write_file,
};
use super::{disk, opts, report};

const SOCKET: &str = "/run/storaged/csi.sock";
const MIB: i64 = 1 << 20;
const STAGE: &str = "/csi/staging/x";
const POD: &str = "/pods/x/vol";
const CLONE_STAGE: &str = "/csi/staging/x-restored";
const CLONE_POD: &str = "/pods/x-restored/vol";

fn fs_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn xfs() -> VolumeCapability {
    fs_cap("xfs")
}

/// The filesystem type mountinfo shows at `path`.
fn fs_at(path: &str) -> Result<String, String> {
    let all = storaged::mounts::mounts().map_err(|e| e.to_string())?;
    storaged::mounts::mount_at(&all, Path::new(path))
        .map(|m| m.fs_type.clone())
        .ok_or_else(|| format!("nothing is mounted at {path}"))
}

async fn up(
    c: &Client,
    id: &str,
    staging: &str,
    target: &str,
    cap: VolumeCapability,
) -> Result<(), String> {
    let _: NodeStageVolumeResponse = call(
        c,
        "/csi.v1.Node/NodeStageVolume",
        stage(id, staging, cap.clone()),
    )
    .await?;
    let _: NodePublishVolumeResponse = call(
        c,
        "/csi.v1.Node/NodePublishVolume",
        publish(id, staging, target, cap, false),
    )
    .await?;
    Ok(())
}

async fn down(c: &Client, id: &str, staging: &str, target: &str) -> Result<(), String> {
    let _: NodeUnpublishVolumeResponse =
        call(c, "/csi.v1.Node/NodeUnpublishVolume", unpublish(id, target)).await?;
    let _: NodeUnstageVolumeResponse =
        call(c, "/csi.v1.Node/NodeUnstageVolume", unstage(id, staging)).await?;
    Ok(())
}

pub fn run(after_reboot: bool) {
    let _ = edge_common::init_logging("info");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report("xfs_server", Err(format!("tokio runtime: {e}"))),
    };
    rt.block_on(async {
        let pool = match disk("pool0")
            .and_then(|d| storaged::Pool::open(&d, opts()).map_err(|e| e.to_string()))
        {
            Ok(p) => p,
            Err(e) => return report("xfs_server", Err(e)),
        };
        let listener = match storaged::csi::bind(Path::new(SOCKET)) {
            Ok(l) => l,
            Err(e) => return report("xfs_server", Err(e.to_string())),
        };
        tokio::spawn(storaged::csi::serve_on(
            listener,
            Driver::new(Some(pool), "vm".into()),
        ));
        match Client::connect(Path::new(SOCKET)).await {
            Ok(c) if after_reboot => reboot(&c).await,
            Ok(c) => scenarios(&c).await,
            Err(e) => report("xfs_server", Err(e.message().to_owned())),
        }
    });
}

async fn scenarios(c: &Client) {
    report(
        "xfs_volume_write_and_read",
        async {
            let _: CreateVolumeResponse = call(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("x", 320 * MIB, xfs()),
            )
            .await?;
            up(c, "x", STAGE, POD, xfs()).await?;
            let fs = fs_at(STAGE)?;
            if fs != "xfs" {
                return Err(format!("staged as {fs}, not xfs"));
            }
            write_file(&Path::new(POD).join("db"), &content(7, 4))?;
            if read_file(&Path::new(POD).join("db"))? != content(7, 4) {
                return Err("read back other data than written".into());
            }
            Ok(())
        }
        .await,
    );
    report(
        "xfs_expand_online",
        async {
            let before = storaged::mounts::statvfs(Path::new(POD))
                .map_err(|e| e.to_string())?
                .bytes_total;
            let r: ControllerExpandVolumeResponse = call(
                c,
                "/csi.v1.Controller/ControllerExpandVolume",
                ControllerExpandVolumeRequest {
                    volume_id: "x".into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: 512 * MIB,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(xfs()),
                },
            )
            .await?;
            if r.capacity_bytes != 512 * MIB || !r.node_expansion_required {
                return Err(format!("{r:?}"));
            }
            let n: NodeExpandVolumeResponse = call(
                c,
                "/csi.v1.Node/NodeExpandVolume",
                NodeExpandVolumeRequest {
                    volume_id: "x".into(),
                    volume_path: POD.into(),
                    capacity_range: None,
                    staging_target_path: STAGE.into(),
                    volume_capability: Some(xfs()),
                },
            )
            .await?;
            let after = storaged::mounts::statvfs(Path::new(POD))
                .map_err(|e| e.to_string())?
                .bytes_total;
            // The log (64 MiB here) is not in the data total; growth is what counts.
            if n.capacity_bytes != 512 * MIB || after < before + 180 * MIB as u64 {
                return Err(format!("{n:?}; filesystem {before} -> {after} bytes"));
            }
            if read_file(&Path::new(POD).join("db"))? != content(7, 4) {
                return Err("data changed across the expansion".into());
            }
            Ok(())
        }
        .await,
    );
    report(
        "xfs_snapshot_restored_beside_its_origin",
        async {
            let _: CreateSnapshotResponse = call(
                c,
                "/csi.v1.Controller/CreateSnapshot",
                CreateSnapshotRequest {
                    source_volume_id: "x".into(),
                    name: "x-snap".into(),
                    parameters: HashMap::new(),
                },
            )
            .await?;
            // Written after the snapshot: the restored volume must not see it.
            write_file(&Path::new(POD).join("later"), b"after the snapshot")?;
            let mut req = create("x-restored", 512 * MIB, xfs());
            req.volume_content_source = Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: "x-snap".into(),
                    },
                )),
            });
            let _: CreateVolumeResponse = call(c, "/csi.v1.Controller/CreateVolume", req).await?;
            // The origin stays mounted: the same XFS UUID is mounted twice.
            up(c, "x-restored", CLONE_STAGE, CLONE_POD, xfs()).await?;
            let got = read_file(&Path::new(CLONE_POD).join("db"))?;
            let later = Path::new(CLONE_POD).join("later").exists();
            write_file(&Path::new(CLONE_POD).join("db"), b"changed in the copy")?;
            let origin = read_file(&Path::new(POD).join("db"))?;
            down(c, "x-restored", CLONE_STAGE, CLONE_POD).await?;
            let _: DeleteVolumeResponse = call(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: "x-restored".into(),
                },
            )
            .await?;
            if got != content(7, 4) || later {
                return Err("the restored volume does not hold the snapshot's data".into());
            }
            if origin != content(7, 4) {
                return Err("writing the restored volume changed its origin".into());
            }
            Ok(())
        }
        .await,
    );
    report(
        "xfs_bad_fs_types_and_sizes_refused",
        async {
            let m = refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("y", 320 * MIB, fs_cap("btrfs")),
                Code::InvalidArgument,
            )
            .await?;
            if !m.contains("btrfs") {
                return Err(format!("CreateVolume with btrfs: {m}"));
            }
            let m = refused::<_, NodeStageVolumeResponse>(
                c,
                "/csi.v1.Node/NodeStageVolume",
                stage("x", "/csi/staging/other", fs_cap("ntfs")),
                Code::InvalidArgument,
            )
            .await?;
            if !m.contains("ntfs") {
                return Err(format!("NodeStageVolume with ntfs: {m}"));
            }
            let m = refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("tiny", 64 * MIB, xfs()),
                Code::OutOfRange,
            )
            .await?;
            if !m.contains("xfs") {
                return Err(format!("a 64 MiB xfs volume: {m}"));
            }
            // An XFS volume staged as ext4 is refused, never formatted over.
            down(c, "x", STAGE, POD).await?;
            let m = refused::<_, NodeStageVolumeResponse>(
                c,
                "/csi.v1.Node/NodeStageVolume",
                stage("x", STAGE, fs_cap("ext4")),
                Code::FailedPrecondition,
            )
            .await?;
            if !m.contains("xfs") {
                return Err(format!("staging the xfs volume as ext4: {m}"));
            }
            Ok(())
        }
        .await,
    );
}

/// After a reboot, staged with no fs_type (what the volume holds) and with xfs: the
/// file written before is there, so nothing formatted the volume again.
async fn reboot(c: &Client) {
    report(
        "xfs_volume_not_formatted_again",
        async {
            for cap in [fs_cap(""), xfs()] {
                up(c, "x", STAGE, POD, cap).await?;
                let fs = fs_at(STAGE)?;
                let db = read_file(&Path::new(POD).join("db"))?;
                let total = storaged::mounts::statvfs(Path::new(POD))
                    .map_err(|e| e.to_string())?
                    .bytes_total;
                down(c, "x", STAGE, POD).await?;
                if fs != "xfs" || db != content(7, 4) {
                    return Err(format!(
                        "after the reboot: {fs}, file intact {}",
                        db == content(7, 4)
                    ));
                }
                if total < 400 * MIB as u64 {
                    return Err(format!("the expansion was lost: {total} bytes"));
                }
            }
            Ok(())
        }
        .await,
    );
}
