//! The CSI phase (`vmtest.phase=csi`): the daemon's CSI server code (`storaged::csi`,
//! the same `Driver` and `serve_on` that main.rs runs) serves the pool disk on a unix
//! socket in this process, and a CSI client drives it over that socket the way a
//! kubelet and the provisioner sidecars would.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use storaged::csi::api::*;
use storaged::csi::{Client, Driver};
use tonic::Code;
use volume_capability::{AccessMode, AccessType, BlockVolume, Mode, MountVolume};

use super::{disk, opts, pattern, report};

const SOCKET: &str = "/run/storaged/csi.sock";
const MIB: i64 = 1 << 20;

pub(crate) fn cap(block: bool, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })
        }),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub(crate) fn create(name: &str, bytes: i64, c: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![c],
        parameters: HashMap::new(),
        volume_content_source: None,
    }
}

pub(crate) fn stage(id: &str, staging: &str, c: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: HashMap::new(),
        staging_target_path: staging.into(),
        volume_capability: Some(c),
        volume_context: HashMap::new(),
    }
}

pub(crate) fn publish(
    id: &str,
    staging: &str,
    target: &str,
    c: VolumeCapability,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        publish_context: HashMap::new(),
        staging_target_path: staging.into(),
        target_path: target.into(),
        volume_capability: Some(c),
        readonly,
        volume_context: HashMap::new(),
    }
}

pub(crate) fn unpublish(id: &str, target: &str) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
    }
}

pub(crate) fn unstage(id: &str, staging: &str) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
    }
}

/// One call; a failure reads "<method>: <code>: <message>".
pub(crate) async fn call<Req, Resp>(
    c: &Client,
    method: &'static str,
    req: Req,
) -> Result<Resp, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    c.call(method, req)
        .await
        .map_err(|s| format!("{method}: {:?}: {}", s.code(), s.message()))
}

/// A call that must fail with `code`; returns its message.
pub(crate) async fn refused<Req, Resp>(
    c: &Client,
    method: &'static str,
    req: Req,
    code: Code,
) -> Result<String, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    match c.call::<Req, Resp>(method, req).await {
        Ok(_) => Err(format!("{method} succeeded; expected {code:?}")),
        Err(s) if s.code() == code => Ok(s.message().to_owned()),
        Err(s) => Err(format!(
            "{method}: {:?} ({}); expected {code:?}",
            s.code(),
            s.message()
        )),
    }
}

pub(crate) fn write_file(path: &Path, data: &[u8]) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    f.write_all_at(data, 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))
}

pub(crate) fn content(seed: u64, mib: u64) -> Vec<u8> {
    (0..mib * 256).flat_map(|b| pattern(seed, b)).collect()
}

const STAGE: &str = "/csi/staging/model";
const POD_A: &str = "/pods/a/model";
const POD_B: &str = "/pods/b/model";
const POD_C: &str = "/pods/c/model";

/// The scenarios on a fresh pool, leaving volume `keep` with data and a snapshot; or,
/// `after_reboot`, what the next boot of the same pool disk finds.
pub fn run(after_reboot: bool) {
    // The driver's log on the console, as the daemon's would be: what was formatted,
    // staged, published, and every refused call with its code.
    let _ = edge_common::init_logging("info");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report("csi_server", Err(format!("tokio runtime: {e}"))),
    };
    rt.block_on(async {
        let pool = match disk("pool0")
            .and_then(|d| storaged::Pool::open(&d, opts()).map_err(|e| e.to_string()))
        {
            Ok(p) => p,
            Err(e) => return report("csi_server", Err(e)),
        };
        let listener = match storaged::csi::bind(Path::new(SOCKET)) {
            Ok(l) => l,
            Err(e) => return report("csi_server", Err(e.to_string())),
        };
        let driver = Driver::new(Some(pool), "vm".into());
        // The metrics endpoint as main.rs serves it, over the same pool.
        let metrics = match storaged_guest::loopback_up() {
            Ok(()) => storaged::metrics::bind(super::metrics::ADDR)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match metrics {
            Ok(l) => {
                tokio::spawn(storaged::metrics::serve(l, driver.shared_pool()));
            }
            Err(e) => report("csi_metrics", Err(e)),
        }
        tokio::spawn(storaged::csi::serve_on(listener, driver));
        match Client::connect(Path::new(SOCKET)).await {
            Ok(c) if after_reboot => reboot_scenarios(&c).await,
            Ok(c) => {
                report("csi_metrics_move", super::metrics::metrics_move(&c).await);
                scenarios(&c).await;
                report("csi_keep_a_volume", keep(&c).await);
            }
            Err(e) => report("csi_server", Err(e.message().to_owned())),
        }
    });
}

const KEEP_STAGE: &str = "/csi/staging/keep";
const KEEP_POD: &str = "/pods/k/vol";

fn rwo() -> VolumeCapability {
    cap(false, Mode::SingleNodeWriter)
}

async fn stage_and_publish(
    c: &Client,
    id: &str,
    staging: &str,
    target: &str,
) -> Result<(), String> {
    let _: NodeStageVolumeResponse =
        call(c, "/csi.v1.Node/NodeStageVolume", stage(id, staging, rwo())).await?;
    let _: NodePublishVolumeResponse = call(
        c,
        "/csi.v1.Node/NodePublishVolume",
        publish(id, staging, target, rwo(), false),
    )
    .await?;
    Ok(())
}

async fn unpublish_and_unstage(
    c: &Client,
    id: &str,
    staging: &str,
    target: &str,
) -> Result<(), String> {
    let _: NodeUnpublishVolumeResponse =
        call(c, "/csi.v1.Node/NodeUnpublishVolume", unpublish(id, target)).await?;
    let _: NodeUnstageVolumeResponse =
        call(c, "/csi.v1.Node/NodeUnstageVolume", unstage(id, staging)).await?;
    Ok(())
}

/// An RWO volume with a file and a snapshot of it, left for the next boot.
async fn keep(c: &Client) -> Result<(), String> {
    let _: CreateVolumeResponse = call(
        c,
        "/csi.v1.Controller/CreateVolume",
        create("keep", 32 * MIB, rwo()),
    )
    .await?;
    stage_and_publish(c, "keep", KEEP_STAGE, KEEP_POD).await?;
    write_file(&Path::new(KEEP_POD).join("db"), &content(5, 2))?;
    let _: CreateSnapshotResponse = call(
        c,
        "/csi.v1.Controller/CreateSnapshot",
        CreateSnapshotRequest {
            source_volume_id: "keep".into(),
            name: "keep-snap".into(),
            parameters: HashMap::new(),
        },
    )
    .await?;
    unpublish_and_unstage(c, "keep", KEEP_STAGE, KEEP_POD).await
}

async fn reboot_scenarios(c: &Client) {
    report(
        "csi_volume_survives_reboot",
        async {
            let list: ListVolumesResponse = call(
                c,
                "/csi.v1.Controller/ListVolumes",
                ListVolumesRequest {
                    max_entries: 0,
                    starting_token: String::new(),
                },
            )
            .await?;
            let ids: Vec<&str> = list
                .entries
                .iter()
                .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.as_str()))
                .collect();
            if ids != ["keep"] {
                return Err(format!("volumes after reboot: {ids:?}"));
            }
            // Staged again: mounted as it is, never formatted again.
            stage_and_publish(c, "keep", KEEP_STAGE, KEEP_POD).await?;
            let db = read_file(&Path::new(KEEP_POD).join("db"))?;
            unpublish_and_unstage(c, "keep", KEEP_STAGE, KEEP_POD).await?;
            if db != content(5, 2) {
                return Err("the file changed across the reboot".into());
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_snapshot_survives_reboot",
        async {
            let again: CreateSnapshotResponse = call(
                c,
                "/csi.v1.Controller/CreateSnapshot",
                CreateSnapshotRequest {
                    source_volume_id: "keep".into(),
                    name: "keep-snap".into(),
                    parameters: HashMap::new(),
                },
            )
            .await?;
            refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("keep-snap", 32 * MIB, rwo()),
                Code::AlreadyExists,
            )
            .await?;
            match again.snapshot {
                Some(s) if s.source_volume_id == "keep" && s.size_bytes == 32 * MIB => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
        .await,
    );
}

async fn scenarios(c: &Client) {
    let rwx = || cap(false, Mode::MultiNodeMultiWriter);
    report(
        "csi_identity_probe",
        async {
            let info: GetPluginInfoResponse =
                call(c, "/csi.v1.Identity/GetPluginInfo", GetPluginInfoRequest {}).await?;
            let probe: ProbeResponse = call(c, "/csi.v1.Identity/Probe", ProbeRequest {}).await?;
            let node: NodeGetInfoResponse =
                call(c, "/csi.v1.Node/NodeGetInfo", NodeGetInfoRequest {}).await?;
            if info.name != "storaged.edgeos" || probe.ready.as_ref().map(|r| r.value) != Some(true)
            {
                return Err(format!("{info:?} {probe:?}"));
            }
            if node.node_id != "vm" {
                return Err(format!("{node:?}"));
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_create_is_idempotent",
        async {
            let a: CreateVolumeResponse = call(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("model", 64 * MIB, rwx()),
            )
            .await?;
            let b: CreateVolumeResponse = call(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("model", 64 * MIB, rwx()),
            )
            .await?;
            if a != b || a.volume.as_ref().map(|v| v.capacity_bytes) != Some(64 * MIB) {
                return Err(format!("first {a:?}, again {b:?}"));
            }
            let mut other = create("model", 32 * MIB, rwx());
            other.capacity_range = Some(CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 32 * MIB,
            });
            refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                other,
                Code::AlreadyExists,
            )
            .await
            .map(|_| ())
        }
        .await,
    );
    report(
        "csi_create_beyond_the_pool",
        async {
            // More than the pool could ever hold: OUT_OF_RANGE; more than what the
            // overcommit limit has left now: RESOURCE_EXHAUSTED.
            refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("huge", 1 << 40, rwx()),
                Code::OutOfRange,
            )
            .await?;
            let _: CreateVolumeResponse = call(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("filler", 280 * MIB, rwx()),
            )
            .await?;
            let msg = refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("more", 64 * MIB, rwx()),
                Code::ResourceExhausted,
            )
            .await?;
            let _: DeleteVolumeResponse = call(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: "filler".into(),
                },
            )
            .await?;
            if !msg.contains("overcommit") {
                return Err(format!("RESOURCE_EXHAUSTED without the reason: {msg}"));
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_block_rwx_refused",
        async {
            let msg = refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("rawshared", 8 * MIB, cap(true, Mode::MultiNodeMultiWriter)),
                Code::InvalidArgument,
            )
            .await?;
            if !msg.contains("MULTI_NODE_MULTI_WRITER") {
                return Err(format!("the message does not name the mode: {msg}"));
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_rwx_two_pods_see_each_others_writes",
        async {
            for _ in 0..2 {
                let _: NodeStageVolumeResponse = call(
                    c,
                    "/csi.v1.Node/NodeStageVolume",
                    stage("model", STAGE, rwx()),
                )
                .await?;
            }
            for target in [POD_A, POD_B] {
                for _ in 0..2 {
                    let _: NodePublishVolumeResponse = call(
                        c,
                        "/csi.v1.Node/NodePublishVolume",
                        publish("model", STAGE, target, rwx(), false),
                    )
                    .await?;
                }
            }
            let weights = content(1, 4);
            write_file(&Path::new(POD_A).join("weights.bin"), &weights)?;
            if read_file(&Path::new(POD_B).join("weights.bin"))? != weights {
                return Err("pod b reads other bytes than pod a wrote".into());
            }
            write_file(&Path::new(POD_B).join("from-b"), b"hello from b")?;
            if read_file(&Path::new(POD_A).join("from-b"))? != b"hello from b" {
                return Err("pod a does not see pod b's file".into());
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_readonly_publish_refuses_writes",
        async {
            let _: NodePublishVolumeResponse = call(
                c,
                "/csi.v1.Node/NodePublishVolume",
                publish("model", STAGE, POD_C, rwx(), true),
            )
            .await?;
            if read_file(&Path::new(POD_C).join("weights.bin"))? != content(1, 4) {
                return Err("read-only pod reads other bytes".into());
            }
            match std::fs::write(Path::new(POD_C).join("x"), b"x") {
                Err(e) if e.raw_os_error() == Some(libc::EROFS) => Ok(()),
                other => Err(format!("write through a read-only publish: {other:?}")),
            }
        }
        .await,
    );
    report(
        "csi_volume_stats",
        async {
            let st: NodeGetVolumeStatsResponse = call(
                c,
                "/csi.v1.Node/NodeGetVolumeStats",
                NodeGetVolumeStatsRequest {
                    volume_id: "model".into(),
                    volume_path: POD_A.into(),
                    staging_target_path: STAGE.into(),
                },
            )
            .await?;
            let bytes = st
                .usage
                .iter()
                .find(|u| u.unit == volume_usage::Unit::Bytes as i32);
            let inodes = st
                .usage
                .iter()
                .find(|u| u.unit == volume_usage::Unit::Inodes as i32);
            match (bytes, inodes) {
                (Some(b), Some(i))
                    if b.total > 50 * MIB
                        && b.total <= 64 * MIB
                        && b.used >= 4 * MIB
                        && i.total > 0
                        && i.used > 0 =>
                {
                    Ok(())
                }
                _ => Err(format!("{st:?}")),
            }
        }
        .await,
    );
    report(
        "csi_snapshot_and_restore",
        async {
            let snap = CreateSnapshotRequest {
                source_volume_id: "model".into(),
                name: "model-v1".into(),
                parameters: HashMap::new(),
            };
            let s1: CreateSnapshotResponse =
                call(c, "/csi.v1.Controller/CreateSnapshot", snap.clone()).await?;
            let s2: CreateSnapshotResponse =
                call(c, "/csi.v1.Controller/CreateSnapshot", snap).await?;
            if s1 != s2 || !s1.snapshot.as_ref().is_some_and(|s| s.ready_to_use) {
                return Err(format!("{s1:?} then {s2:?}"));
            }
            // The model changes after the snapshot; a volume restored from it has v1.
            write_file(&Path::new(POD_A).join("weights.bin"), &content(2, 4))?;
            let mut req = create("restored", 64 * MIB, cap(false, Mode::SingleNodeWriter));
            req.volume_content_source = Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: "model-v1".into(),
                    },
                )),
            });
            let _: CreateVolumeResponse = call(c, "/csi.v1.Controller/CreateVolume", req).await?;
            let _: NodeStageVolumeResponse = call(
                c,
                "/csi.v1.Node/NodeStageVolume",
                stage("restored", "/csi/staging/restored", rwo()),
            )
            .await?;
            let _: NodePublishVolumeResponse = call(
                c,
                "/csi.v1.Node/NodePublishVolume",
                publish(
                    "restored",
                    "/csi/staging/restored",
                    "/pods/r/vol",
                    rwo(),
                    false,
                ),
            )
            .await?;
            let old = read_file(Path::new("/pods/r/vol/weights.bin"))?;
            let _: NodeUnpublishVolumeResponse = call(
                c,
                "/csi.v1.Node/NodeUnpublishVolume",
                unpublish("restored", "/pods/r/vol"),
            )
            .await?;
            let _: NodeUnstageVolumeResponse = call(
                c,
                "/csi.v1.Node/NodeUnstageVolume",
                unstage("restored", "/csi/staging/restored"),
            )
            .await?;
            let _: DeleteVolumeResponse = call(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: "restored".into(),
                },
            )
            .await?;
            if old != content(1, 4) {
                return Err("the restored volume does not hold the snapshot's data".into());
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_clone_of_a_volume",
        async {
            let mut req = create("copy", 64 * MIB, rwo());
            req.volume_content_source = Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Volume(
                    volume_content_source::VolumeSource {
                        volume_id: "model".into(),
                    },
                )),
            });
            let _: CreateVolumeResponse = call(c, "/csi.v1.Controller/CreateVolume", req).await?;
            stage_and_publish(c, "copy", "/csi/staging/copy", "/pods/copy/vol").await?;
            let got = read_file(Path::new("/pods/copy/vol/weights.bin"))?;
            // The clone is its own volume: writing it leaves the model alone.
            write_file(Path::new("/pods/copy/vol/weights.bin"), b"changed")?;
            let model = read_file(&Path::new(POD_A).join("weights.bin"))?;
            unpublish_and_unstage(c, "copy", "/csi/staging/copy", "/pods/copy/vol").await?;
            let _: DeleteVolumeResponse = call(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: "copy".into(),
                },
            )
            .await?;
            if got != content(2, 4) || model != content(2, 4) {
                return Err(
                    "the clone does not hold the model's data, or writing it changed the model"
                        .into(),
                );
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_capacity_validate_and_list",
        async {
            let cap_now: GetCapacityResponse = call(
                c,
                "/csi.v1.Controller/GetCapacity",
                GetCapacityRequest {
                    volume_capabilities: vec![rwx()],
                    parameters: HashMap::new(),
                },
            )
            .await?;
            // 120 MiB of data at 300 %, minus model (64 MiB) and its snapshot (64 MiB).
            let limit = (120 * MIB) / 100 * 300;
            if cap_now.available_capacity != limit - 128 * MIB {
                return Err(format!("GetCapacity: {cap_now:?}"));
            }
            let ok: ValidateVolumeCapabilitiesResponse = call(
                c,
                "/csi.v1.Controller/ValidateVolumeCapabilities",
                ValidateVolumeCapabilitiesRequest {
                    volume_id: "model".into(),
                    volume_context: HashMap::new(),
                    volume_capabilities: vec![rwx()],
                    parameters: HashMap::new(),
                },
            )
            .await?;
            let no: ValidateVolumeCapabilitiesResponse = call(
                c,
                "/csi.v1.Controller/ValidateVolumeCapabilities",
                ValidateVolumeCapabilitiesRequest {
                    volume_id: "model".into(),
                    volume_context: HashMap::new(),
                    volume_capabilities: vec![cap(true, Mode::MultiNodeMultiWriter)],
                    parameters: HashMap::new(),
                },
            )
            .await?;
            if ok.confirmed.is_none() || no.confirmed.is_some() || no.message.is_empty() {
                return Err(format!("validate: {ok:?} / {no:?}"));
            }
            let _: CreateVolumeResponse = call(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("second", MIB, rwo()),
            )
            .await?;
            let page1: ListVolumesResponse = call(
                c,
                "/csi.v1.Controller/ListVolumes",
                ListVolumesRequest {
                    max_entries: 1,
                    starting_token: String::new(),
                },
            )
            .await?;
            let page2: ListVolumesResponse = call(
                c,
                "/csi.v1.Controller/ListVolumes",
                ListVolumesRequest {
                    max_entries: 1,
                    starting_token: page1.next_token.clone(),
                },
            )
            .await?;
            let _: DeleteVolumeResponse = call(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: "second".into(),
                },
            )
            .await?;
            let ids: Vec<String> = [&page1, &page2]
                .iter()
                .flat_map(|p| p.entries.iter())
                .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.clone()))
                .collect();
            if ids != ["model", "second"] || !page2.next_token.is_empty() {
                return Err(format!("pages: {page1:?} / {page2:?}"));
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_expand_grows_the_filesystem",
        async {
            let r: ControllerExpandVolumeResponse = call(
                c,
                "/csi.v1.Controller/ControllerExpandVolume",
                ControllerExpandVolumeRequest {
                    volume_id: "model".into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: 96 * MIB,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(rwx()),
                },
            )
            .await?;
            if r.capacity_bytes != 96 * MIB || !r.node_expansion_required {
                return Err(format!("{r:?}"));
            }
            let n: NodeExpandVolumeResponse = call(
                c,
                "/csi.v1.Node/NodeExpandVolume",
                NodeExpandVolumeRequest {
                    volume_id: "model".into(),
                    volume_path: POD_A.into(),
                    capacity_range: None,
                    staging_target_path: STAGE.into(),
                    volume_capability: Some(rwx()),
                },
            )
            .await?;
            let st = storaged::mounts::statvfs(Path::new(POD_B)).map_err(|e| e.to_string())?;
            if n.capacity_bytes != 96 * MIB || st.bytes_total <= 80 * MIB as u64 {
                return Err(format!(
                    "{n:?}; filesystem seen by pod b: {} bytes",
                    st.bytes_total
                ));
            }
            if read_file(&Path::new(POD_B).join("weights.bin"))? != content(2, 4) {
                return Err("data changed across the expansion".into());
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_bad_requests_get_spec_codes",
        async {
            refused::<_, NodeStageVolumeResponse>(
                c,
                "/csi.v1.Node/NodeStageVolume",
                stage("nope", "/csi/staging/nope", rwx()),
                Code::NotFound,
            )
            .await?;
            refused::<_, NodePublishVolumeResponse>(
                c,
                "/csi.v1.Node/NodePublishVolume",
                publish("nope", STAGE, "/pods/x/v", rwx(), false),
                Code::NotFound,
            )
            .await?;
            refused::<_, ControllerExpandVolumeResponse>(
                c,
                "/csi.v1.Controller/ControllerExpandVolume",
                ControllerExpandVolumeRequest {
                    volume_id: "nope".into(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: MIB,
                        limit_bytes: 0,
                    }),
                    volume_capability: None,
                },
                Code::NotFound,
            )
            .await?;
            refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("", MIB, rwx()),
                Code::InvalidArgument,
            )
            .await?;
            let mut nocaps = create("nocaps", MIB, rwx());
            nocaps.volume_capabilities.clear();
            refused::<_, CreateVolumeResponse>(
                c,
                "/csi.v1.Controller/CreateVolume",
                nocaps,
                Code::InvalidArgument,
            )
            .await?;
            let msg = refused::<_, DeleteVolumeResponse>(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: "model".into(),
                },
                Code::FailedPrecondition,
            )
            .await?;
            let _: DeleteVolumeResponse = call(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: "nope".into(),
                },
            )
            .await?;
            if !msg.contains("mounted") {
                return Err(format!("delete of a mounted volume: {msg}"));
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_block_volume_and_no_format_over_data",
        async {
            let blk = || cap(true, Mode::SingleNodeWriter);
            let _: CreateVolumeResponse = call(
                c,
                "/csi.v1.Controller/CreateVolume",
                create("raw", 16 * MIB, blk()),
            )
            .await?;
            let _: NodeStageVolumeResponse = call(
                c,
                "/csi.v1.Node/NodeStageVolume",
                stage("raw", "/csi/staging/raw", blk()),
            )
            .await?;
            let _: NodePublishVolumeResponse = call(
                c,
                "/csi.v1.Node/NodePublishVolume",
                publish("raw", "/csi/staging/raw", "/pods/d/dev", blk(), false),
            )
            .await?;
            // Data past the first 64 KiB only: the start still reads as zeros.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/pods/d/dev")
                .map_err(|e| format!("open /pods/d/dev: {e}"))?;
            f.write_all_at(&pattern(7, 0), 8 * MIB as u64)
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("write /pods/d/dev: {e}"))?;
            drop(f);
            let _: NodeUnpublishVolumeResponse = call(
                c,
                "/csi.v1.Node/NodeUnpublishVolume",
                unpublish("raw", "/pods/d/dev"),
            )
            .await?;
            let _: NodeUnstageVolumeResponse = call(
                c,
                "/csi.v1.Node/NodeUnstageVolume",
                unstage("raw", "/csi/staging/raw"),
            )
            .await?;
            if Path::new("/pods/d/dev").exists() {
                return Err("unpublish left the block target file".into());
            }
            // Staged as a filesystem now: it holds data, so it must not be formatted.
            refused::<_, NodeStageVolumeResponse>(
                c,
                "/csi.v1.Node/NodeStageVolume",
                stage(
                    "raw",
                    "/csi/staging/raw",
                    cap(false, Mode::SingleNodeWriter),
                ),
                Code::FailedPrecondition,
            )
            .await?;
            let node = Path::new("/dev/mapper/edgepool-v-raw");
            let f = std::fs::File::open(node).map_err(|e| format!("open {node:?}: {e}"))?;
            let mut back = vec![0u8; 4096];
            f.read_exact_at(&mut back, 8 * MIB as u64)
                .map_err(|e| format!("read {node:?}: {e}"))?;
            drop(f);
            let _: DeleteVolumeResponse = call(
                c,
                "/csi.v1.Controller/DeleteVolume",
                DeleteVolumeRequest {
                    volume_id: "raw".into(),
                },
            )
            .await?;
            if back != pattern(7, 0) {
                return Err("the block volume's data changed".into());
            }
            Ok(())
        }
        .await,
    );
    report(
        "csi_teardown_is_idempotent",
        async {
            for target in [POD_A, POD_B, POD_C, POD_C] {
                let _: NodeUnpublishVolumeResponse = call(
                    c,
                    "/csi.v1.Node/NodeUnpublishVolume",
                    unpublish("model", target),
                )
                .await?;
                if Path::new(target).exists() {
                    return Err(format!("unpublish left {target}"));
                }
            }
            for _ in 0..2 {
                let _: NodeUnstageVolumeResponse =
                    call(c, "/csi.v1.Node/NodeUnstageVolume", unstage("model", STAGE)).await?;
            }
            for _ in 0..2 {
                let _: DeleteVolumeResponse = call(
                    c,
                    "/csi.v1.Controller/DeleteVolume",
                    DeleteVolumeRequest {
                        volume_id: "model".into(),
                    },
                )
                .await?;
                let _: DeleteSnapshotResponse = call(
                    c,
                    "/csi.v1.Controller/DeleteSnapshot",
                    DeleteSnapshotRequest {
                        snapshot_id: "model-v1".into(),
                    },
                )
                .await?;
            }
            let list: ListVolumesResponse = call(
                c,
                "/csi.v1.Controller/ListVolumes",
                ListVolumesRequest {
                    max_entries: 0,
                    starting_token: String::new(),
                },
            )
            .await?;
            if !list.entries.is_empty() {
                return Err(format!("volumes left: {list:?}"));
            }
            Ok(())
        }
        .await,
    );
}
