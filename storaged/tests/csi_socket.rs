//! The CSI endpoint over a real unix socket on the host (no device-mapper here, so no
//! pool): the service names an upstream CO dials, identity answers, node info, and
//! the codes a box without a pool gives. Volume behaviour is tested in the light VM
//! (qemu-tests/tests/storage_csi.rs).

use std::collections::HashMap;

use storaged::csi::api::*;
use storaged::csi::{Client, Driver};
use tonic::Code;

async fn start(dir: &std::path::Path) -> Client {
    let socket = dir.join("csi.sock");
    let listener = storaged::csi::bind(&socket).expect("bind");
    tokio::spawn(storaged::csi::serve_on(
        listener,
        Driver::new(None, "node-1".into()),
    ));
    Client::connect(&socket).await.expect("connect")
}

#[tokio::test]
async fn identity_node_info_and_no_pool_codes() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path()).await;

    let info: GetPluginInfoResponse = c
        .call("/csi.v1.Identity/GetPluginInfo", GetPluginInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.name, "storaged.edgeos");
    let probe: ProbeResponse = c
        .call("/csi.v1.Identity/Probe", ProbeRequest {})
        .await
        .unwrap();
    assert_eq!(probe.ready, Some(BoolValue { value: true }));
    let caps: GetPluginCapabilitiesResponse = c
        .call(
            "/csi.v1.Identity/GetPluginCapabilities",
            GetPluginCapabilitiesRequest {},
        )
        .await
        .unwrap();
    assert_eq!(caps.capabilities.len(), 2);

    let node: NodeGetInfoResponse = c
        .call("/csi.v1.Node/NodeGetInfo", NodeGetInfoRequest {})
        .await
        .unwrap();
    assert_eq!(node.node_id, "node-1");

    let mount = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::Mode::SingleNodeWriter as i32,
        }),
    };
    let create = |name: &str| CreateVolumeRequest {
        name: name.into(),
        capacity_range: None,
        volume_capabilities: vec![mount.clone()],
        parameters: HashMap::new(),
        volume_content_source: None,
    };
    // Checks of the request come before the pool: a bad request is INVALID_ARGUMENT
    // even on a box without a pool; a good one is FAILED_PRECONDITION.
    let e = c
        .call::<_, CreateVolumeResponse>("/csi.v1.Controller/CreateVolume", create(""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .call::<_, CreateVolumeResponse>("/csi.v1.Controller/CreateVolume", create("v1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no pool device"), "{e:?}");

    let cap: GetCapacityResponse = c
        .call(
            "/csi.v1.Controller/GetCapacity",
            GetCapacityRequest {
                volume_capabilities: vec![],
                parameters: HashMap::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(cap.available_capacity, 0);

    let e = c
        .call::<_, ProbeResponse>("/csi.v1.Controller/ListSnapshots", ProbeRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
}
