//! A minimal CSI client over the unix socket: one generic unary call by method path.
//! noded's pod volumes and storaged's guest tests use it; upstream COs bring their own.

use std::path::Path;

use tonic::transport::Channel;
use tonic::Status;

#[derive(Clone)]
pub struct Client {
    grpc: tonic::client::Grpc<Channel>,
}

impl Client {
    /// A connection to the plugin at `socket`; UNAVAILABLE, naming it, when there is none.
    pub async fn connect(socket: &Path) -> Result<Client, Status> {
        let channel = crate::unix::channel(socket).await.map_err(|e| {
            Status::unavailable(format!("failed to connect to {}: {e}", socket.display()))
        })?;
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
        crate::unix::unary(&self.grpc, method, req)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable => {
                    Status::unavailable(format!("{method}: {}", s.message()))
                }
                _ => s,
            })
    }
}
