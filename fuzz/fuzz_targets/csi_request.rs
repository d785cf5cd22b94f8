//! A CSI controller request as storaged's gRPC server receives it: the first byte picks
//! the call, the rest is its protobuf message. The driver has no pool, so each call runs
//! its request checks and then answers that the pool is not ready; the node calls are
//! left out because they mount and make directories at the paths they are given.
#![no_main]

use prost::Message;
use storaged::csi::api::*;
use storaged::csi::Driver;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    static DRIVER: Driver = Driver::new(None, "fuzz".into());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&call, body)) = data.split_first() else {
        return;
    };
    DRIVER.with(|d| {
        RUNTIME.with(|rt| {
            rt.block_on(async {
                macro_rules! call {
                    ($req:ty, $method:ident) => {
                        if let Ok(req) = <$req>::decode(body) {
                            let _ = d.$method(req).await;
                        }
                    };
                }
                match call % 8 {
                    0 => call!(CreateVolumeRequest, create_volume),
                    1 => call!(DeleteVolumeRequest, delete_volume),
                    2 => call!(
                        ValidateVolumeCapabilitiesRequest,
                        validate_volume_capabilities
                    ),
                    3 => call!(ListVolumesRequest, list_volumes),
                    4 => call!(GetCapacityRequest, get_capacity),
                    5 => call!(CreateSnapshotRequest, create_snapshot),
                    6 => call!(DeleteSnapshotRequest, delete_snapshot),
                    _ => call!(ControllerExpandVolumeRequest, controller_expand_volume),
                }
            })
        })
    });
});
