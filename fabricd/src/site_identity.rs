//! The box's TLS identity toward the core: the CA that signed the core's certificate, the
//! site's client certificate, and the site's key. The key is either a PEM file or a key
//! made in the TPM (`edge-tpm site-key create` writes its file: the TPM's wrapped blobs,
//! which no other TPM can load). With a TPM key, each handshake's one signature is made
//! by `edge-tpm site-key sign`, a short process per connect (fabricd is static and cannot
//! link the TPM libraries; docs/security.md), so a copied disk in another box cannot
//! connect as the site.

use std::path::Path;
use std::sync::Arc;

use async_nats::rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls::{ClientConfig, RootCertStore};

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
    let is_tpm = edge_tpm::program::is_tpm_key(&key_text)
        .map_err(Error::NotTpmKey)
        .map_err(bad(key_name, key_path))?;
    let key: Arc<dyn SigningKey> = if is_tpm {
        Arc::new(edge_tpm::program::TpmKey {
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
        .with_client_cert_resolver(Arc::new(edge_tpm::program::OneCertificate(Arc::new(
            CertifiedKey::new(chain, key),
        )))))
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

/// Runs `program` (edge-tpm) with `args` and `input` on its stdin: its stdout, or the
/// reason it printed last on its stderr (edge_tpm::program, shared with noded).
pub fn edge_tpm(program: &Path, args: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    use edge_tpm::program::Failure;
    edge_tpm::program::run(program, args, input).map_err(|f| match f {
        Failure::Run { program, source } => Error::io("run", program)(source),
        Failure::Refused { program, reason } => Error::TpmFailed { program, reason },
        Failure::Write { program, source } => Error::io("write to", program)(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

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
}
