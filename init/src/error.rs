//! init's one error type: every variant names what it was about (the path, the device,
//! the step, the service, the bundle). Where an error leaves the process (a control
//! reply, the update state fabricd reports, a console line) it becomes text there.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Files and devices.
    /// A call on one path (`op`: "open", "read the superblock of", "create cgroup", ...).
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A call between two paths: rename `from` to `to`, bind `from` into `to`, mount `from`
    /// at `to`, move mount `from` to `to`.
    #[error("failed to {op} {from} {prep} {to}: {source}")]
    IoTo {
        op: &'static str,
        from: PathBuf,
        prep: &'static str,
        to: PathBuf,
        source: std::io::Error,
    },
    /// mount(2) of `what` (a device or a pseudo file system) on `target`; `errno` is kept
    /// for the caller to tell a read error (a block that did not verify) apart.
    #[error("failed to mount {what} ({fstype}) on {target}: {}", crate::mounts::errno_text(*.errno))]
    Mount {
        what: String,
        fstype: String,
        target: PathBuf,
        errno: rustix::io::Errno,
    },
    #[error("mount options for {what} contain NUL")]
    MountOptions { what: String },
    #[error("failed to create device node {path} ({major}:{minor}): {source}")]
    DeviceNode {
        path: PathBuf,
        major: u32,
        minor: u32,
        source: std::io::Error,
    },

    // Partitions and device-mapper.
    #[error(
        "missing partition(s) {} after {secs} s; block devices: {}",
        .missing.join(", "),
        list_or_none(.present)
    )]
    MissingPartitions {
        missing: Vec<String>,
        secs: u64,
        /// Every block device seen, as `name (label)`.
        present: Vec<String>,
    },
    /// A device looked for and not there: `no partition labelled esp`.
    #[error("no {what}")]
    NoDevice { what: String },
    /// The root slot's verity superblock (`path`: the hash partition, when read from one).
    #[error("{}{detail}", prefix(.path))]
    Verity {
        path: Option<PathBuf>,
        detail: String,
    },
    #[error(transparent)]
    Dm(#[from] edge_dm::Error),
    #[error("failed to open {dev} with dm-crypt: {source}")]
    DmCrypt {
        dev: PathBuf,
        source: edge_dm::Error,
    },

    // The sealed data partition and the programs run for it.
    /// A program from the root (edge-tpm, cryptsetup, mke2fs) failed: its exit status
    /// and last stderr line.
    #[error(transparent)]
    Run(#[from] crate::rootexec::Failed),
    /// edge-tpm ran but printed not what was asked for.
    #[error("edge-tpm {detail}")]
    EdgeTpm { detail: String },
    /// A LUKS2 header's metadata (its JSON, its one crypt segment), or the key for it,
    /// is not what init opens.
    #[error("{detail}")]
    Luks2 { detail: String },
    /// What the data partition `dev` holds: `<dev> holds ...; it is left as it is`.
    #[error("{dev} {detail}")]
    Data { dev: String, detail: String },
    /// A step on the data partition or the inactive slot (`failed to make /dev/vda6
    /// LUKS2`, `writing /dev/vda4`), and why it failed.
    #[error("{step}: {source}")]
    Step { step: String, source: Box<Error> },
    #[error(
        "the UKI carries no signed PCR policy ({path}: {source}); it was not built by cargo xtask image"
    )]
    NoPcrPolicy {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("getrandom failed: {0}")]
    Random(std::io::Error),

    // Configuration and the kernel command line.
    /// system.toml (`origin`: the file, or `kernel command line` for an `edgeos.*` flag).
    #[error("{origin}: {detail}")]
    Config { origin: String, detail: String },
    #[error(transparent)]
    Cmdline(#[from] crate::cmdline::Error),

    // Site provisioning.
    #[error("provisioning {path} is larger than {max} bytes, the most taken")]
    TooLarge { path: PathBuf, max: u64 },
    /// One file of a provisioning item refused (the line that reports it names `name`).
    #[error("{detail}")]
    BadItem { name: String, detail: &'static str },

    // The network.
    #[error("failed to {op}: {source}")]
    Net {
        /// What was done, naming the interface: `bring eth0 up`.
        op: String,
        source: std::io::Error,
    },
    #[error("bad interface name `{name}`")]
    BadInterface { name: String },

    // Services and control requests.
    /// A request about service `name` refused (`no service named ...`, `... is not running`).
    #[error("{detail}")]
    Service { name: String, detail: String },
    #[error("`{value}` is not a valid {key} value")]
    Limit { key: &'static str, value: String },

    // Updates.
    /// A bundle refused or an install ended: its product, versions, sizes, the slot.
    #[error("{detail}")]
    Bundle { detail: String },
    #[error(transparent)]
    Update(#[from] edge_update::Error),
    /// The trial boot's verdict against the new slot.
    #[error("{detail}")]
    Trial { detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// `<path>: ` before a message about that file, nothing without one.
fn prefix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

impl Error {
    /// `map_err(Error::io("open", path))`, for std's errors and rustix's alike.
    pub fn io<E: Into<std::io::Error>>(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(E) -> Error {
        let path = path.into();
        move |e| Error::Io {
            op,
            path,
            source: e.into(),
        }
    }

    /// `map_err(Error::io_to("rename", from, "to", to))`.
    pub fn io_to<E: Into<std::io::Error>>(
        op: &'static str,
        from: impl Into<PathBuf>,
        prep: &'static str,
        to: impl Into<PathBuf>,
    ) -> impl FnOnce(E) -> Error {
        let (from, to) = (from.into(), to.into());
        move |e| Error::IoTo {
            op,
            from,
            prep,
            to,
            source: e.into(),
        }
    }

    /// edge-tpm ran but printed not what was asked for: `edge-tpm <detail>`.
    pub fn edge_tpm(detail: impl Into<String>) -> Error {
        Error::EdgeTpm {
            detail: detail.into(),
        }
    }

    /// A LUKS2 header's metadata that is not what init opens.
    pub fn luks2(detail: impl Into<String>) -> Error {
        Error::Luks2 {
            detail: detail.into(),
        }
    }

    /// `map_err(Error::step(format!("failed to open {dev}")))`: the step, then why.
    pub fn step(step: impl Into<String>) -> impl FnOnce(Error) -> Error {
        let step = step.into();
        move |e| Error::Step {
            step,
            source: Box::new(e),
        }
    }
}
