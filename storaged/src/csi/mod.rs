//! The CSI endpoint: gRPC services `csi.v1.Identity`, `csi.v1.Controller` and
//! `csi.v1.Node` on a unix socket, routed by hand (one tower service over tonic's
//! `server::Grpc` codec, no generated code) to the driver in `driver/`. The messages
//! and the client are the edge-csi crate's, shared with noded.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::body::Body;
use tonic::codec::ProstCodec;
use tonic::codegen::http;
use tonic::Status;

mod driver;

pub use driver::Driver;
pub use edge_csi::{api, client, Client};

type Handler<Req, Resp> =
    fn(Arc<Driver>, Req) -> Pin<Box<dyn Future<Output = Result<Resp, Status>> + Send>>;

/// Decodes one request, runs `handler` on it and encodes the reply or the status.
async fn unary<Req, Resp>(
    driver: Arc<Driver>,
    req: http::Request<Body>,
    handler: Handler<Req, Resp>,
) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
{
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default());
    let svc = tower::service_fn(move |r: tonic::Request<Req>| {
        let fut = handler(driver.clone(), r.into_inner());
        async move {
            let reply = fut.await;
            if let Err(s) = &reply {
                tracing::info!(code = ?s.code(), message = s.message(), "CSI call refused");
            }
            reply.map(tonic::Response::new)
        }
    });
    grpc.unary(svc, req).await
}

/// The CSI calls one method served since storaged started (its `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Calls {
    /// Answered without an error.
    pub answered: u64,
    /// Answered with an error status.
    pub refused: u64,
    /// Time from the request to the answer, all calls.
    pub seconds: f64,
}

/// Per method, only the methods storaged serves (a caller cannot add labels).
static CALLS: Mutex<BTreeMap<&'static str, Calls>> = Mutex::new(BTreeMap::new());

/// The CSI calls served so far, by method.
pub fn calls() -> Vec<(&'static str, Calls)> {
    let calls = edge_common::lock(&CALLS);
    calls.iter().map(|(m, c)| (*m, *c)).collect()
}

/// Runs one call of `method` and counts it, refused when its answer carries an error
/// status (tonic puts an error in the headers of a unary answer).
async fn counted(
    method: &'static str,
    call: impl Future<Output = http::Response<Body>>,
) -> http::Response<Body> {
    let start = Instant::now();
    let resp = call.await;
    let refused = resp
        .headers()
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() != b"0");
    let mut calls = edge_common::lock(&CALLS);
    let c = calls.entry(method).or_default();
    if refused {
        c.refused += 1;
    } else {
        c.answered += 1;
    }
    c.seconds += start.elapsed().as_secs_f64();
    resp
}

/// The three CSI services behind one tower service.
#[derive(Clone)]
pub struct Server {
    driver: Arc<Driver>,
}

macro_rules! routes {
    ($path:expr, $driver:expr, $req:expr, { $($svc:literal / $method:literal => $fn:ident),* $(,)? }) => {
        match $path {
            $(concat!("/csi.v1.", $svc, "/", $method) => {
                counted($method, unary($driver, $req, |d, r| Box::pin(async move { d.$fn(r).await }))).await
            })*
            other => Status::unimplemented(format!("storaged does not implement {other}")).into_http(),
        }
    };
}

impl tower::Service<http::Request<Body>> for Server {
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let driver = self.driver.clone();
        let path = req.uri().path().to_owned();
        let span = tracing::info_span!("csi", method = %path);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let resp = routes!(path.as_str(), driver, req, {
                    "Identity" / "GetPluginInfo" => get_plugin_info,
                    "Identity" / "GetPluginCapabilities" => get_plugin_capabilities,
                    "Identity" / "Probe" => probe,
                    "Controller" / "CreateVolume" => create_volume,
                    "Controller" / "DeleteVolume" => delete_volume,
                    "Controller" / "ValidateVolumeCapabilities" => validate_volume_capabilities,
                    "Controller" / "ListVolumes" => list_volumes,
                    "Controller" / "GetCapacity" => get_capacity,
                    "Controller" / "ControllerGetCapabilities" => controller_get_capabilities,
                    "Controller" / "CreateSnapshot" => create_snapshot,
                    "Controller" / "DeleteSnapshot" => delete_snapshot,
                    "Controller" / "ControllerExpandVolume" => controller_expand_volume,
                    "Node" / "NodeStageVolume" => node_stage_volume,
                    "Node" / "NodeUnstageVolume" => node_unstage_volume,
                    "Node" / "NodePublishVolume" => node_publish_volume,
                    "Node" / "NodeUnpublishVolume" => node_unpublish_volume,
                    "Node" / "NodeGetVolumeStats" => node_get_volume_stats,
                    "Node" / "NodeExpandVolume" => node_expand_volume,
                    "Node" / "NodeGetCapabilities" => node_get_capabilities,
                    "Node" / "NodeGetInfo" => node_get_info,
                });
                Ok(resp)
            },
            span,
        ))
    }
}

/// Binds the CSI socket, so the caller can report readiness once it accepts
/// connections. A stale socket file (from a previous run) is replaced; the socket is
/// 0600 (only root's kubelet or noded talk to it).
pub fn bind(socket: &Path) -> crate::Result<tokio::net::UnixListener> {
    use crate::Error;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("failed to create", dir))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("failed to remove stale", socket)(e)),
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(|source| Error::Bind {
        what: "CSI socket",
        addr: socket.display().to_string(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io("failed to chmod", socket))?;
    Ok(listener)
}

/// Serves CSI on `listener` until the server fails.
pub async fn serve_on(listener: tokio::net::UnixListener, driver: Driver) -> crate::Result<()> {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .serve_with_incoming(
            Server {
                driver: Arc::new(driver),
            },
            incoming,
        )
        .await
        .map_err(crate::Error::Serve)
}
