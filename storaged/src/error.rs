//! storaged's one error type: every variant names the device or volume it was about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pool device {path} holds {found}; refusing to overwrite it without an explicit force"
    )]
    ForeignData { path: PathBuf, found: String },
    #[error("pool device {path} is too small: {bytes} bytes, at least {min} needed")]
    TooSmall { path: PathBuf, bytes: u64, min: u64 },
    #[error("pool device {path}: {detail}")]
    BadPool { path: PathBuf, detail: String },
    #[error("pool device {path}: device-mapper: {source}")]
    DeviceMapper {
        path: PathBuf,
        source: edge_dm::Error,
    },
    #[error("failed to {op} {path} at byte {offset}: {source}")]
    DiskIo {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        source: std::io::Error,
    },
    #[error("{disk}: {detail}")]
    PartitionTable { disk: PathBuf, detail: String },
    #[error(
        "no room for a pool partition on {disk}: {free_mib} MiB free after the last partition, \
         the pool needs at least {min_mib} MiB"
    )]
    NoRoom {
        disk: PathBuf,
        free_mib: u64,
        min_mib: u64,
    },
    #[error("failed to add partition {pno} of {disk} to the kernel (BLKPG): {source}")]
    Blkpg {
        disk: PathBuf,
        pno: u32,
        source: std::io::Error,
    },
    #[error("no device node {0} appeared")]
    NoDeviceNode(PathBuf),
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("failed to bind the {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Common(#[from] edge_common::Error),
    #[error("CSI server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("volume {name}: {detail}")]
    BadRequest { name: String, detail: String },
    #[error("volume {name} is in use: {detail}")]
    Busy { name: String, detail: String },
    #[error("volume {0} already exists")]
    VolumeExists(String),
    #[error("volume {0} does not exist")]
    NoVolume(String),
    #[error(
        "volume {name}: {requested} bytes would provision {total} of the {limit} bytes the \
         overcommit limit allows"
    )]
    Overcommit {
        name: String,
        requested: u64,
        total: u64,
        limit: u64,
    },
    #[error("pool on {path} is out of data space ({used} of {total} blocks used)")]
    OutOfSpace {
        path: PathBuf,
        used: u64,
        total: u64,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
