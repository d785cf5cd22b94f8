//! The one error type of the crate: what was being done, and with what.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input we were handed (a file, a token, a signature) is not what it must be.
    #[error("{what}: {why}")]
    Input { what: &'static str, why: String },
    /// No TPM could be opened.
    #[error("no TPM at {tcti}: {why}")]
    NoTpm { tcti: String, why: String },
    /// A TPM command failed.
    #[cfg(feature = "tpm")]
    #[error("the TPM failed to {op}: {source}")]
    Tpm {
        op: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    /// Attestation evidence (a quote, a key) that does not prove what it claims.
    #[error("attestation refused: {0}")]
    Untrusted(String),
    /// The TPM (or our check ahead of it) refused the sealed key to this boot.
    #[error("the TPM refused the data key: {0}")]
    Refused(String),
}

/// `map_err(tpm_op("load the sealed key"))`.
#[cfg(feature = "tpm")]
pub(crate) fn tpm_op(op: &'static str) -> impl FnOnce(tss_esapi::Error) -> Error {
    move |source| Error::Tpm { op, source }
}
