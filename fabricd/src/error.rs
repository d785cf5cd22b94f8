//! fabricd's one error type. Every variant says what was being done and with what: the
//! file, the call to the core, the certificate, the manifest item. Its text is what the
//! logs show, what the status report tells the core (`last_error`, the downlink's
//! refusals) and what a producer is answered; edgectl prints it too.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Files, sockets and threads of this box.
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to rename {from} into place: {source}")]
    Rename {
        from: PathBuf,
        source: std::io::Error,
    },
    /// A produce or metrics listener: a socket path or an address.
    #[error("failed to listen on {on}: {source}")]
    Listen { on: String, source: std::io::Error },
    /// The uplink's, downlink's or enrollment's own runtime or thread.
    #[error("failed to start the {name} {what}: {source}")]
    Start {
        name: &'static str,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Task {
        what: &'static str,
        source: tokio::task::JoinError,
    },
    /// The daemon kit: directories, the provisioned core file, readiness.
    #[error(transparent)]
    Common(#[from] edge_common::Error),

    // The local log.
    /// The log could not be opened (the store's own message names the segment).
    #[error("{source}")]
    OpenLog {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to read the log: {0}")]
    ReadLog(std::io::Error),
    /// A class's `uplink.acked` that holds no offset.
    #[error("{0} does not hold an offset")]
    NotAnOffset(PathBuf),
    /// The applied manifest version (anti-replay) is unreadable: every manifest is refused.
    #[error("{0} does not hold a manifest version; refusing every manifest rather than take an old one as new")]
    NotAVersion(PathBuf),

    // Records.
    /// A topic or header name a producer gave that cannot travel as a NATS subject
    /// token or header name.
    #[error("{what} `{}` must be {rule}", .name.escape_debug())]
    Name {
        what: &'static str,
        name: String,
        rule: &'static str,
    },
    #[error("topic must be 1 to {} bytes", crate::record::MAX_TOPIC)]
    TopicLength,
    /// A record's value on the wire (`Fabric-Encoding`): undecodable (`source`) or an
    /// encoding we do not know.
    #[error("{}", payload(.encoding, .source))]
    Payload {
        encoding: String,
        source: Option<std::io::Error>,
    },

    // The box's TLS identity toward the core, and on the site network (`key` is the
    // config key of the file).
    #[error("bad TLS material: {key} {path}: {detail}")]
    Tls {
        key: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("bad TLS material: {key} {path} is not PEM (no CERTIFICATE block)")]
    NoCertificate { key: &'static str, path: PathBuf },
    /// A key file that starts like JSON but is not edge-tpm's site key.
    /// A JSON key file that is not edge-tpm's: what it lacks.
    #[error("{0}")]
    NotTpmKey(String),
    /// Our certificate is not valid now; `problem` says which date and what to do.
    #[error("{key} {path} {problem}")]
    Validity {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("TLS: {0}")]
    TlsConfig(async_nats::rustls::Error),

    // The TPM, through `edge-tpm`.
    /// `edge-tpm` failed: the reason it printed last, or what was wrong with its output.
    #[error("{reason}")]
    TpmFailed { program: PathBuf, reason: String },
    #[error("making the site key in the TPM: {0}")]
    MakeSiteKey(#[source] Box<Error>),
    #[error(transparent)]
    Tpm(#[from] edge_tpm::Error),

    // The core.
    /// A NATS or JetStream call: `op` names it with its subject, bucket, key or record.
    #[error("{op}: {detail}")]
    Core { op: String, detail: String },
    /// The connection (and why, when the client said) or a watch ended.
    #[error("{what}{}", in_parens(.event))]
    Ended {
        what: &'static str,
        event: Option<String>,
    },
    #[error("the core refused the box: {reason}")]
    Refused { reason: String },
    #[error("the core answered out of turn")]
    OutOfTurn,
    /// JSON that did not encode or decode: `what` says whose.
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },

    // The downlink.
    #[error("manifest: {0}")]
    Signature(&'static str),
    #[error("item `{name}`: {detail}")]
    Item { name: String, detail: String },
    #[error("item name `{}` is not a plain file name", .0.escape_debug())]
    ItemName(String),
    /// The image's public key file (`downlink.public_key`).
    #[error("{detail}")]
    PublicKey { path: PathBuf, detail: String },
    #[error(
        "the data partition has {free} bytes free: `{name}` needs {need} more, and {keep} stay free for the log"
    )]
    NoRoom {
        name: String,
        need: u64,
        free: u64,
        keep: u64,
    },
    #[error("item `{name}` ({store} {key}): sha256 is {digest}, the manifest says {expected}")]
    HashMismatch {
        name: String,
        store: String,
        key: String,
        digest: String,
        expected: String,
    },
    #[error("KV key {0} does not exist")]
    NoKvKey(String),
    #[error("object {key} has more bytes than its info says ({size})")]
    ObjectTooLong { key: String, size: u64 },
    /// Fetching an object's info or chunks: `what` is the step.
    #[error("{what} object {key}: {detail}")]
    Object {
        what: String,
        key: String,
        detail: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `map_err(Error::io("read", path))`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// `map_err(Error::core(format!("no KV bucket {b}")))`: a call to the core that failed.
    pub fn core<E: std::fmt::Display>(op: impl Into<String>) -> impl FnOnce(E) -> Error {
        let op = op.into();
        move |e| Error::Core {
            op,
            detail: e.to_string(),
        }
    }

    /// The connection to the core was lost; `event` is what the client said.
    pub fn lost(event: Option<String>) -> Error {
        Error::Ended {
            what: "connection to the core lost",
            event,
        }
    }

    /// `map_err(Error::json("encode"))`.
    pub fn json(what: impl Into<String>) -> impl FnOnce(serde_json::Error) -> Error {
        let what = what.into();
        move |source| Error::Json { what, source }
    }
}

fn payload(encoding: &str, source: &Option<std::io::Error>) -> String {
    match source {
        Some(e) => format!("bad {encoding} payload: {e}"),
        None => format!("unknown Fabric-Encoding `{encoding}`"),
    }
}

fn in_parens(event: &Option<String>) -> String {
    event
        .as_ref()
        .map(|e| format!(" ({e})"))
        .unwrap_or_default()
}
