//! A typed CRI v1 client (runtime and image services) over containerd's unix socket.
//! The messages are in `api`; this module owns the connection and turns gRPC
//! failures into errors that carry the method, the gRPC code and the runtime's message.

use std::path::{Path, PathBuf};

use tonic::transport::Channel;

pub mod api;

use api::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to connect to the CRI socket {socket}: {message}")]
    Connect { socket: PathBuf, message: String },
    #[error("CRI {method} failed: {code:?}: {message}")]
    Call {
        method: &'static str,
        code: tonic::Code,
        message: String,
    },
}

impl Error {
    /// The gRPC code of a failed call (`Unavailable` for a connection failure).
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::Connect { .. } => tonic::Code::Unavailable,
            Error::Call { code, .. } => *code,
        }
    }
}

/// A connection to a CRI runtime. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct Client {
    grpc: tonic::client::Grpc<Channel>,
}

macro_rules! rpc {
    ($(#[$doc:meta])* $fn:ident, $service:literal, $method:literal, $req:ty, $resp:ty) => {
        $(#[$doc])*
        pub async fn $fn(&self, req: $req) -> Result<$resp, Error> {
            self.unary(concat!("/runtime.v1.", $service, "/", $method), req).await
        }
    };
}

impl Client {
    /// Connects to the runtime's socket (containerd's `grpc.address`).
    pub async fn connect(socket: &Path) -> Result<Self, Error> {
        let channel = edge_csi::unix::channel(socket)
            .await
            .map_err(|e| Error::Connect {
                socket: socket.to_path_buf(),
                message: edge_csi::unix::error_chain(&e),
            })?;
        Ok(Client {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    /// A client that connects at its first call (and again after the runtime went
    /// away): for callers that must not wait for the runtime here.
    pub fn lazy(socket: &Path) -> Self {
        let channel = edge_csi::unix::lazy_channel(socket);
        Client {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    async fn unary<Req, Resp>(&self, method: &'static str, req: Req) -> Result<Resp, Error>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let result = self.uncounted(method, req).await;
        if let Err(e) = &result {
            crate::metrics::cri_failed(method, e.code());
        }
        result
    }

    async fn uncounted<Req, Resp>(&self, method: &'static str, req: Req) -> Result<Resp, Error>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        edge_csi::unix::unary(&self.grpc, method, req)
            .await
            .map_err(|s| Error::Call {
                method,
                code: s.code(),
                message: s.message().to_string(),
            })
    }

    /// Whether the runtime's CRI service answers yet (a `ListPodSandbox`). containerd
    /// takes connections before its CRI service is initialized; the failures of this
    /// waiting are not counted in `noded_cri_errors_total`, which would otherwise rise
    /// at every boot.
    pub async fn answers(&self) -> Result<(), Error> {
        self.uncounted::<_, ListPodSandboxResponse>(
            "/runtime.v1.RuntimeService/ListPodSandbox",
            ListPodSandboxRequest::default(),
        )
        .await
        .map(|_| ())
    }

    rpc!(
        version,
        "RuntimeService",
        "Version",
        VersionRequest,
        VersionResponse
    );
    rpc!(
        run_pod_sandbox,
        "RuntimeService",
        "RunPodSandbox",
        RunPodSandboxRequest,
        RunPodSandboxResponse
    );
    rpc!(
        stop_pod_sandbox,
        "RuntimeService",
        "StopPodSandbox",
        StopPodSandboxRequest,
        StopPodSandboxResponse
    );
    rpc!(
        remove_pod_sandbox,
        "RuntimeService",
        "RemovePodSandbox",
        RemovePodSandboxRequest,
        RemovePodSandboxResponse
    );
    rpc!(
        pod_sandbox_status,
        "RuntimeService",
        "PodSandboxStatus",
        PodSandboxStatusRequest,
        PodSandboxStatusResponse
    );
    rpc!(
        list_pod_sandbox,
        "RuntimeService",
        "ListPodSandbox",
        ListPodSandboxRequest,
        ListPodSandboxResponse
    );
    rpc!(
        create_container,
        "RuntimeService",
        "CreateContainer",
        CreateContainerRequest,
        CreateContainerResponse
    );
    rpc!(
        start_container,
        "RuntimeService",
        "StartContainer",
        StartContainerRequest,
        StartContainerResponse
    );
    rpc!(
        stop_container,
        "RuntimeService",
        "StopContainer",
        StopContainerRequest,
        StopContainerResponse
    );
    rpc!(
        remove_container,
        "RuntimeService",
        "RemoveContainer",
        RemoveContainerRequest,
        RemoveContainerResponse
    );
    rpc!(
        list_containers,
        "RuntimeService",
        "ListContainers",
        ListContainersRequest,
        ListContainersResponse
    );
    rpc!(
        container_status,
        "RuntimeService",
        "ContainerStatus",
        ContainerStatusRequest,
        ContainerStatusResponse
    );
    rpc!(
        /// Asks the runtime to reopen a container's log file (after it was renamed by
        /// rotation), so the lines that follow go to a fresh file at the same path.
        reopen_container_log,
        "RuntimeService",
        "ReopenContainerLog",
        ReopenContainerLogRequest,
        ReopenContainerLogResponse
    );
    rpc!(exec, "RuntimeService", "Exec", ExecRequest, ExecResponse);
    rpc!(
        port_forward,
        "RuntimeService",
        "PortForward",
        PortForwardRequest,
        PortForwardResponse
    );
    rpc!(
        exec_sync,
        "RuntimeService",
        "ExecSync",
        ExecSyncRequest,
        ExecSyncResponse
    );
    rpc!(
        pull_image,
        "ImageService",
        "PullImage",
        PullImageRequest,
        PullImageResponse
    );
    rpc!(
        image_status,
        "ImageService",
        "ImageStatus",
        ImageStatusRequest,
        ImageStatusResponse
    );
    rpc!(
        list_images,
        "ImageService",
        "ListImages",
        ListImagesRequest,
        ListImagesResponse
    );
    rpc!(
        remove_image,
        "ImageService",
        "RemoveImage",
        RemoveImageRequest,
        RemoveImageResponse
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that takes connections and speaks no gRPC, as containerd's does before
    /// its CRI service is up: waiting on it counts no error, a pod's call does.
    #[tokio::test]
    async fn waiting_for_the_runtime_counts_no_cri_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cri.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        });
        // Failed ListPodSandbox calls, whatever their code.
        let failed = || -> u64 {
            crate::metrics::Counts::now()
                .cri_errors
                .iter()
                .filter(|((method, _), _)| method == "ListPodSandbox")
                .map(|(_, n)| n)
                .sum()
        };
        let cri = Client::lazy(&socket);
        let before = failed();
        cri.answers().await.unwrap_err();
        assert_eq!(failed(), before);
        cri.list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .unwrap_err();
        assert_eq!(failed(), before + 1);
    }
}
