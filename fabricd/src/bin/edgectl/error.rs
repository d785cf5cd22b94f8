//! edgectl's error: the library's [`fabricd::Error`] for what the two share (files, calls
//! to the core, JSON, what a box would refuse), and the operator's own: flags and files
//! given, bundles, the registrar's inputs, a core that does not answer in time. main
//! prints it as `edgectl: <error>`; an enrollment refusal is also sent to the box.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Fabric(#[from] fabricd::Error),
    /// Something the operator gave (a flag, a file's content, a name) or asked for that
    /// cannot be: `what` it is, and `why` not (`<what> is not ...`, `<what> must ...`).
    #[error("{what} {why}")]
    Invalid { what: String, why: String },
    /// An error about one thing: a file, a box, a record.
    #[error("{what}: {source}")]
    In { what: String, source: Box<Error> },
    #[error("--days {days}: 1 to {max} are issued")]
    Days { days: u32, max: u32 },
    #[error("--delta-from {path}: a second base of version {version}")]
    SecondBase { path: PathBuf, version: String },
    #[error("no site to send to: the core knows of none yet (name them with --site)")]
    NoSites,
    /// An update window as the update crate refused it.
    #[error(transparent)]
    Window(edge_update::Error),
    /// The update key file (the update crate's error names it).
    #[error(transparent)]
    UpdateKey(edge_update::Error),
    #[error("{path}: {source}")]
    Bundle {
        path: PathBuf,
        source: edge_update::Error,
    },
    #[error("making the delta from {base}: {source}")]
    Delta {
        base: PathBuf,
        source: edge_update::Error,
    },
    /// The registrar's inputs (CAs, releases, the escrow key) or its verdict on a box.
    #[error("{what}: {source}")]
    Tpm {
        what: String,
        source: edge_tpm::Error,
    },
    #[error("{key}: the escrowed recovery key is not base64: {detail}")]
    Escrow { key: String, detail: String },
    #[error("{}", not_enrolled(.site, *.secs, .last_refusal))]
    NotEnrolled {
        site: String,
        secs: u64,
        last_refusal: Option<String>,
    },
    #[error("{key}: {source}; not replacing a manifest this key did not sign")]
    Foreign {
        key: String,
        source: Box<fabricd::Error>,
    },
    #[error("failed to {0}")]
    Keygen(&'static str),
    #[error("the core did not finish answering within {secs} s")]
    Timeout { secs: u64 },
}

pub(crate) type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(what: impl Into<String>, why: impl Into<String>) -> Error {
        Error::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }

    /// `map_err(Error::within(path.display()))`: the error was about `what`.
    pub(crate) fn within<E: Into<Error>>(what: impl std::fmt::Display) -> impl FnOnce(E) -> Error {
        let what = what.to_string();
        move |e| Error::In {
            what,
            source: Box::new(e.into()),
        }
    }

    /// `map_err(Error::tpm(path.display()))`.
    pub(crate) fn tpm(what: impl std::fmt::Display) -> impl FnOnce(edge_tpm::Error) -> Error {
        let what = what.to_string();
        move |source| Error::Tpm { what, source }
    }

    /// `map_err(Error::bundle(path))`.
    pub(crate) fn bundle(path: &std::path::Path) -> impl FnOnce(edge_update::Error) -> Error {
        let path = path.to_owned();
        move |source| Error::Bundle { path, source }
    }
}

fn not_enrolled(site: &str, secs: u64, last_refusal: &Option<String>) -> String {
    match last_refusal {
        Some(why) => {
            format!("no box of site {site} enrolled within {secs} s; the last refused: {why}")
        }
        None => format!(
            "no box of site {site} finished enrolling within {secs} s (is it provisioned with an enroll-{site} certificate, and can it reach the core?)"
        ),
    }
}
