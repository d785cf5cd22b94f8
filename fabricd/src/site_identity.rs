//! The box's TLS identity toward the core: the CA that signed the core's certificate, the
//! site's client certificate, and the site's key. The key is either a PEM file or a key
//! made in the TPM (`edge-tpm site-key create` writes its file: the TPM's wrapped blobs,
//! which no other TPM can load). With a TPM key, each handshake's one signature is made
//! by `edge-tpm site-key sign`, a short process per connect (fabricd is static and cannot
//! link the TPM libraries; docs/security.md), so a copied disk in another box cannot
//! connect as the site.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use async_nats::rustls;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{ClientConfig, RootCertStore, SignatureAlgorithm, SignatureScheme};

use crate::config::{CoreConfig, EnrollConfig};
use crate::error::{Error, Result};

/// `map_err(bad(key, path))`: what is wrong with the file of config key `key`.
pub(crate) fn bad<E: std::fmt::Display>(key: &'static str, path: &Path) -> impl FnOnce(E) -> Error {
    let path = path.to_owned();
    move |e| Error::Tls {
        key,
        path,
        detail: e.to_string(),
    }
}

pub(crate) fn read(key: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(bad(key, path))
}

pub(crate) fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(bad(key, path))?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Whether the key file is a TPM site key (edge-tpm's JSON), not a PEM key.
fn is_tpm_key(text: &[u8]) -> Result<bool> {
    if !text.trim_ascii_start().starts_with(b"{") {
        return Ok(false);
    }
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| Error::NotTpmKey(Some(e)))?;
    if v["private"].is_string() && v["public"].is_string() {
        Ok(true)
    } else {
        Err(Error::NotTpmKey(None))
    }
}

/// The TLS configuration fabricd connects to the core with. Read before each attempt so
/// that a missing or malformed file is reported by name, not as a handshake failure.
pub fn client_config(core: &CoreConfig) -> Result<ClientConfig> {
    tls_config(core, ("core.cert", &core.cert), ("core.key", &core.key))
}

/// The TLS configuration a box that has no site certificate yet asks to be enrolled
/// with: the site's enrollment certificate (enrollment.rs).
pub fn enrollment_config(core: &CoreConfig, enroll: &EnrollConfig) -> Result<ClientConfig> {
    tls_config(
        core,
        ("core.enroll.cert", &enroll.cert),
        ("core.enroll.key", &enroll.key),
    )
}

/// The core's CA, and the certificate and key of the given config keys.
fn tls_config(
    core: &CoreConfig,
    (cert_name, cert): (&'static str, &Path),
    (key_name, key_path): (&'static str, &Path),
) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in certificates("core.ca", &core.ca)? {
        roots.add(c).map_err(bad("core.ca", &core.ca))?;
    }
    let chain = certificates(cert_name, cert)?;
    within_validity(
        cert_name,
        cert,
        &chain[0],
        &edge_tpm::ek_certificate::now_utc(),
    )?;
    let key_text = read(key_name, key_path)?;
    let key: Arc<dyn SigningKey> = if is_tpm_key(&key_text).map_err(bad(key_name, key_path))? {
        Arc::new(TpmKey {
            program: core.tpm_program.clone(),
            key: key_path.to_owned(),
        })
    } else {
        let der = PrivateKeyDer::from_pem_slice(&key_text)
            .map_err(|e| bad(key_name, key_path)(format!("is not a PEM private key: {e}")))?;
        rustls::crypto::ring::sign::any_supported_type(&der).map_err(bad(key_name, key_path))?
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::TlsConfig)?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Identity(Arc::new(CertifiedKey::new(chain, key))))))
}

/// Our certificate must be valid now: the core would refuse it with no reason the box
/// hears (nats-server answers a bad certificate alert), so the box says which date is
/// wrong, or that its clock may be. `now` as YYYYMMDDHHMMSS, UTC.
fn within_validity(name: &'static str, path: &Path, der: &[u8], now: &str) -> Result<()> {
    let (from, to) = edge_tpm::ek_certificate::validity(der).map_err(bad(name, path))?;
    let when = |t: &str| {
        format!(
            "{}-{}-{} {}:{}:{} UTC",
            &t[..4],
            &t[4..6],
            &t[6..8],
            &t[8..10],
            &t[10..12],
            &t[12..14]
        )
    };
    let invalid = |problem| Error::Validity {
        key: name,
        path: path.to_owned(),
        problem,
    };
    if now > to.as_str() {
        return Err(invalid(format!(
            "expired at {} (the clock says {}): the site needs a new certificate",
            when(&to),
            when(now)
        )));
    }
    if now < from.as_str() {
        return Err(invalid(format!(
            "is not valid before {} and the clock says {}: is the box's clock right?",
            when(&from),
            when(now)
        )));
    }
    Ok(())
}

/// The one certificate and key, whatever the core asks for.
#[derive(Debug)]
struct Identity(Arc<CertifiedKey>);

impl ResolvesClientCert for Identity {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The site key in the TPM: ECDSA P-256 with SHA-256, signed by edge-tpm.
#[derive(Debug, Clone)]
struct TpmKey {
    program: PathBuf,
    key: PathBuf,
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
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        self.sign_digest(digest.as_ref())
            .map_err(|e| rustls::Error::General(format!("the TPM did not sign: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

impl TpmKey {
    /// Runs `edge-tpm site-key sign <key>`: the digest in hex on its stdin, the DER
    /// signature in hex on its stdout.
    fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>> {
        let key = self.key.to_string_lossy();
        let out = edge_tpm(
            &self.program,
            &["site-key", "sign", &key],
            format!("{}\n", edge_common::hex::encode(digest)).as_bytes(),
        )?;
        edge_common::hex::decode(String::from_utf8_lossy(&out).trim())
            .filter(|sig| !sig.is_empty())
            .ok_or_else(|| Error::TpmFailed {
                program: self.program.clone(),
                reason: format!("{} printed no signature", self.program.display()),
            })
    }
}

/// Runs `program` (edge-tpm) with `args` and `input` on its stdin: its stdout, or the
/// reason it printed last on its stderr.
pub fn edge_tpm(program: &Path, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io("run", program))?;
    // A program that fails before reading its input closes the pipe: its own reason,
    // read below, says more than the broken pipe.
    let written = match child.stdin.take() {
        Some(mut stdin) => stdin.write_all(input),
        None => Ok(()),
    };
    let out = child
        .wait_with_output()
        .map_err(Error::io("run", program))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(Error::TpmFailed {
            program: program.to_owned(),
            reason: why.lines().last().unwrap_or("no reason given").to_owned(),
        });
    }
    written.map_err(Error::io("write to", program))?;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_pem_or_a_tpm_site_key_and_nothing_else() {
        assert!(!is_tpm_key(b"-----BEGIN PRIVATE KEY-----\n").unwrap());
        assert!(is_tpm_key(b" {\"private\": \"AAA=\", \"public\": \"AAA=\"}\n").unwrap());
        let e = is_tpm_key(b"{\"private\": 1}").unwrap_err().to_string();
        assert!(e.contains("TPM site key"), "{e}");
        let e = is_tpm_key(b"{not json").unwrap_err().to_string();
        assert!(e.contains("TPM site key"), "{e}");
    }

    #[test]
    fn a_certificate_out_of_its_validity_is_named_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let st = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .stderr(Stdio::null())
                .status()
                .expect("run openssl");
            assert!(st.success(), "openssl {args:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "c.key",
            "-out",
            "c.pem",
            "-days",
            "30",
            "-subj",
            "/CN=s1",
        ]);
        let path = dir.path().join("c.pem");
        let der = certificates("core.cert", &path).unwrap().remove(0);
        let (from, to) = edge_tpm::ek_certificate::validity(&der).unwrap();
        within_validity("core.cert", &path, &der, &from).unwrap();
        within_validity("core.cert", &path, &der, &to).unwrap();
        let e = within_validity("core.cert", &path, &der, "21000101000000")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expired at") && e.contains("2100-01-01 00:00:00 UTC"),
            "{e}"
        );
        let e = within_validity("core.cert", &path, &der, "19700101000000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid before") && e.contains("clock"), "{e}");
        let e = within_validity("core.cert", &path, b"\x30\x03\x02\x01\x01", &from)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad TLS material: core.cert"), "{e}");
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
