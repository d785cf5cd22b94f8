//! A tonic channel to a gRPC server on a unix socket (CSI's and CRI's endpoints), and
//! one unary call on it with prost messages.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

/// Connects to the gRPC server at `socket` now; later connections (after the server
/// went away) go to the same path.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    endpoint().connect_with_connector(connector(socket)).await
}

/// A channel to `socket` that connects at its first call: for callers that must not
/// wait for the server.
pub fn lazy_channel(socket: &Path) -> Channel {
    endpoint().connect_with_connector_lazy(connector(socket))
}

/// The URI is required by the API but unused: every connection goes to the socket.
fn endpoint() -> Endpoint {
    Endpoint::from_static("http://[::]:0")
}

fn connector(
    socket: &Path,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let path = socket.to_path_buf();
    tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(&path).await?)) }
    })
}

/// Calls `method` (`/package.Service/Method`) with `req`. A channel that cannot reach
/// the server answers UNAVAILABLE, with why.
pub async fn unary<Req, Resp>(
    grpc: &tonic::client::Grpc<Channel>,
    method: &'static str,
    req: Req,
) -> Result<Resp, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = grpc.clone();
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(error_chain(&e)))?;
    let codec = tonic::codec::ProstCodec::<Req, Resp>::default();
    grpc.unary(
        tonic::Request::new(req),
        PathAndQuery::from_static(method),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// An error and its sources, `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
