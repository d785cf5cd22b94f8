//! A minimal CSI client over the unix socket: one generic unary call by method path.
//! noded's pod volumes and storaged's guest tests use it; upstream COs bring their own.

use std::path::Path;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Status;

#[derive(Clone)]
pub struct Client {
    grpc: tonic::client::Grpc<Channel>,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Client, String> {
        let channel = crate::unix::channel(socket)
            .await
            .map_err(|e| format!("failed to connect to {}: {e}", socket.display()))?;
        Ok(Client {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    /// Calls `method` (e.g. `/csi.v1.Identity/Probe`).
    pub async fn call<Req, Resp>(&self, method: &'static str, req: Req) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc.clone();
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("{method}: {e}")))?;
        let codec = tonic::codec::ProstCodec::<Req, Resp>::default();
        grpc.unary(
            tonic::Request::new(req),
            PathAndQuery::from_static(method),
            codec,
        )
        .await
        .map(tonic::Response::into_inner)
    }
}
