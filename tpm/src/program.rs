//! A key made in the TPM (`edge-tpm site-key create`), used by the static daemons
//! through the `edge-tpm` program, which alone links the TPM libraries: each signature
//! is one short `edge-tpm site-key sign <key>` process, the digest in hex on its stdin,
//! the DER signature in hex on its stdout. fabricd signs its TLS handshakes to the core
//! with the site key this way, noded its node certificate's request and its handshakes
//! to the Kubernetes API server with the node key. The key file holds the TPM's wrapped
//! blobs, which no other TPM can load: a copied disk cannot sign.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

/// Why running `edge-tpm` gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("failed to run {}: {source}", program.display())]
    Run {
        program: PathBuf,
        source: std::io::Error,
    },
    /// It ran and refused: the last line it printed on its stderr.
    #[error("{}: {reason}", program.display())]
    Refused { program: PathBuf, reason: String },
    #[error("failed to write to {}: {source}", program.display())]
    Write {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// Runs `program` (edge-tpm) with `args` and `input` on its stdin: its stdout, or the
/// reason it printed last on its stderr.
pub fn run(program: &Path, args: &[&str], input: &[u8]) -> Result<Vec<u8>, Failure> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Failure::Run {
            program: program.to_owned(),
            source,
        })?;
    // A program that fails before reading its input closes the pipe: its own reason,
    // read below, says more than the broken pipe.
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(input),
        None => Ok(()),
    };
    let out = child.wait_with_output().map_err(|source| Failure::Run {
        program: program.to_owned(),
        source,
    })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(Failure::Refused {
            program: program.to_owned(),
            reason: why.lines().last().unwrap_or("no reason given").to_owned(),
        });
    }
    written.map_err(|source| Failure::Write {
        program: program.to_owned(),
        source,
    })?;
    Ok(out.stdout)
}

/// Whether a key file is a TPM key (edge-tpm's JSON with `private` and `public`) rather
/// than a PEM key; a JSON file of another shape is an error naming what it lacks.
pub fn is_tpm_key(text: &[u8]) -> Result<bool, String> {
    if !text.trim_ascii_start().starts_with(b"{") {
        return Ok(false);
    }
    let v: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| format!("is neither a PEM key nor a TPM site key: {e}"))?;
    if v["private"].is_string() && v["public"].is_string() {
        Ok(true)
    } else {
        Err("is neither a PEM key nor a TPM site key (no \"private\" and \"public\")".into())
    }
}

/// A key in the TPM: ECDSA P-256 with SHA-256, signed by `program` (edge-tpm) with the
/// key file `key`.
#[derive(Debug, Clone)]
pub struct TpmKey {
    pub program: PathBuf,
    pub key: PathBuf,
}

impl TpmKey {
    /// The DER ECDSA signature of a SHA-256 digest.
    pub fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, Failure> {
        let key = self.key.to_string_lossy();
        let out = run(
            &self.program,
            &["site-key", "sign", &key],
            format!("{}\n", crate::policy::hex(digest)).as_bytes(),
        )?;
        crate::policy::from_hex(String::from_utf8_lossy(&out).trim())
            .ok()
            .filter(|sig| !sig.is_empty())
            .ok_or_else(|| Failure::Refused {
                program: self.program.clone(),
                reason: "printed no signature".into(),
            })
    }

    /// The DER ECDSA signature of `message` (hashed with SHA-256 here).
    pub fn sign_message(&self, message: &[u8]) -> Result<Vec<u8>, Failure> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        self.sign_digest(digest.as_ref())
    }

    /// The key's public half as PEM (SubjectPublicKeyInfo), as `edge-tpm site-key
    /// public` prints it.
    pub fn public_pem(&self) -> Result<String, Failure> {
        let blob = std::fs::read(&self.key).map_err(|source| Failure::Run {
            program: self.key.clone(),
            source,
        })?;
        let out = run(&self.program, &["site-key", "public"], &blob)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

impl SigningKey for TpmKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl Signer for TpmKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.sign_message(message)
            .map_err(|e| rustls::Error::General(format!("the TPM did not sign: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// A client's one certificate and key, whatever the server asks for (rustls keeps its
/// own such resolver private).
#[derive(Debug)]
pub struct OneCertificate(pub Arc<CertifiedKey>);

impl ResolvesClientCert for OneCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_pem_or_a_tpm_site_key_and_nothing_else() {
        assert!(!is_tpm_key(b"-----BEGIN PRIVATE KEY-----\n").unwrap());
        assert!(is_tpm_key(b" {\"private\": \"AAA=\", \"public\": \"AAA=\"}\n").unwrap());
        let e = is_tpm_key(b"{\"private\": 1}").unwrap_err();
        assert!(e.contains("TPM site key"), "{e}");
        let e = is_tpm_key(b"{not json").unwrap_err();
        assert!(e.contains("TPM site key"), "{e}");
    }

    #[test]
    fn a_signer_that_fails_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("edge-tpm");
        std::fs::write(
            &program,
            "#!/bin/sh\necho 'edge-tpm: tpm: load the site key (made by another TPM?)' >&2\nexit 1\n",
        )
        .unwrap();
        let mut perms = std::fs::metadata(&program).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&program, perms).unwrap();
        let key = TpmKey {
            program,
            key: dir.path().join("key.json"),
        };
        let e = key.sign(b"transcript").unwrap_err().to_string();
        assert!(
            e.contains("the TPM did not sign") && e.contains("another TPM"),
            "{e}"
        );
        let missing = TpmKey {
            program: dir.path().join("absent"),
            key: dir.path().join("key.json"),
        };
        let e = missing.sign(b"transcript").unwrap_err().to_string();
        assert!(e.contains("failed to run"), "{e}");
    }
}
