//! noded's one error type: every variant names what it was about (the manifest file,
//! the pod, the container, the image, the volume, the path or the call). Its text is
//! what users read, in noded's log, on the control socket and in pods' status; the
//! CRI client keeps its own [`crate::cri::Error`], wrapped here.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Files, sockets and the daemon kit.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{op} {addr}: {source}")]
    Bind {
        op: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Common(#[from] edge_common::Error),

    // Pod manifests.
    /// A manifest that does not pass its checks; `detail` starts with the field's path.
    #[error("{file}: {detail}")]
    Manifest { file: String, detail: String },
    /// A name or quantity Kubernetes would refuse; `rule` says what it must be.
    #[error("{value:?} {rule}")]
    BadValue { value: String, rule: &'static str },

    // Images: the archives the registry serves, the allowlist, the pulls.
    /// An image of an archive that cannot be served.
    #[error("{archive}: {detail}")]
    Archive { archive: String, detail: String },
    /// An archive that fails verification.
    #[error(transparent)]
    Oci(#[from] edge_oci::Error),
    /// A request the registry cannot read.
    #[error("{detail}")]
    BadRequest { detail: String },
    /// An allowlist file that is left out (unreadable, unsigned or malformed).
    #[error("{file}: {detail}")]
    Allowlist { file: String, detail: String },
    /// The allowlists' public key file; `detail` names it.
    #[error("{detail}")]
    PolicyKey { path: PathBuf, detail: String },
    /// An image the allowlist in force (`allowlist`: its file and version) does not
    /// list, or any image when there is no valid allowlist.
    #[error("image {image} ({digest}) is not allowed{}", refusal(.allowlist))]
    ImageRefused {
        image: String,
        digest: String,
        allowlist: Option<(String, u64)>,
    },
    #[error("image {image}: {source}")]
    Image {
        image: String,
        source: crate::cri::Error,
    },
    #[error("image {image}: not on the box, and imagePullPolicy is Never")]
    ImageNeverPulled { image: String },
    #[error("image {image}: the runtime does not know it after the pull")]
    ImageUnknown { image: String },

    // The runtime.
    #[error(transparent)]
    Cri(#[from] crate::cri::Error),

    // Pods' volumes.
    /// A volume of a pod (`storaged_id`: its csi volume's id) that is not provided.
    #[error("volume {name}{}: {source}", storaged(.storaged_id))]
    Volume {
        name: String,
        storaged_id: Option<String>,
        source: Box<Error>,
    },
    /// A CSI call that failed, or storaged that cannot be called: the gRPC code and a
    /// message that names the call (`CreateVolume: RESOURCE_EXHAUSTED: ...`).
    #[error("{message}")]
    Csi { code: tonic::Code, message: String },
    #[error("pod {pod}: volumes stay published: {source}")]
    Unpublish { pod: String, source: Box<Error> },

    // Probes.
    /// A TCP or HTTP probe (`probe`: `tcp <addr>`, `GET <url>`), or an exec probe the
    /// runtime could not run.
    #[error("{probe}: {detail}")]
    Probe { probe: String, detail: String },
    /// An exec probe that ran: it timed out or exited non-zero.
    #[error("exec {command:?} {outcome}")]
    ExecProbe {
        command: Vec<String>,
        outcome: String,
    },

    // The control socket.
    /// A logs request that cannot be answered; `detail` names the pod and container.
    #[error("{detail}")]
    Logs { pod: String, detail: String },
    /// What a running noded answered instead, or why it did not answer.
    #[error(transparent)]
    NodeApi(#[from] edge_node_api::Error),
    /// The client asking a running noded failed itself.
    #[error("{detail}")]
    Control { socket: PathBuf, detail: String },

    // The Kubernetes API server.
    /// The kubeconfig cannot be read.
    #[error("{path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    /// The kubeconfig gives no client.
    #[error("{kubeconfig}: {source}")]
    Kube {
        kubeconfig: PathBuf,
        source: kube::Error,
    },
    /// A call to the server; `code` is the HTTP status when the server answered.
    #[error("{message}")]
    ApiCall { code: Option<u16>, message: String },
    /// The node's certificate could not be obtained with the bootstrap credential.
    #[error("the node's certificate: {0}")]
    Bootstrap(String),
    #[error("apiserver.node_name is not set and the host name {detail}")]
    NodeName { detail: String },

    // Health.
    /// Static pods that are not up yet.
    #[error("not up: {}", .files.join(", "))]
    NotUp { files: Vec<String> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    pub fn bind(op: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Bind { op, addr, source }
    }

    pub fn bad_value(value: &str, rule: &'static str) -> Error {
        Error::BadValue {
            value: value.to_string(),
            rule,
        }
    }

    /// The failure of a volume of a pod.
    pub fn volume(name: &str, storaged_id: Option<&str>) -> impl FnOnce(Error) -> Error {
        let (name, storaged_id) = (name.to_string(), storaged_id.map(str::to_string));
        move |e| Error::Volume {
            name,
            storaged_id,
            source: Box::new(e),
        }
    }

    /// An image the allowlist refused: the pod reports that, not a start failure.
    pub fn is_image_refused(&self) -> bool {
        matches!(self, Error::ImageRefused { .. })
    }
}

fn refusal(allowlist: &Option<(String, u64)>) -> String {
    match allowlist {
        Some((file, version)) => format!(" by the image allowlist ({file} version {version})"),
        None => ": there is no valid image allowlist".into(),
    }
}

fn storaged(id: &Option<String>) -> String {
    id.as_ref()
        .map(|id| format!(" (storaged volume {id})"))
        .unwrap_or_default()
}
