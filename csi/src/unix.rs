//! A tonic channel to a gRPC server on a unix socket (CSI's and CRI's endpoints).

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

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
