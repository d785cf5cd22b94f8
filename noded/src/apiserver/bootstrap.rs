//! The node's own credential, obtained through Kubernetes' TLS bootstrap: with only a
//! bootstrap token (`apiserver.bootstrap_kubeconfig`), noded makes a key on the data
//! partition, asks the API server for a client certificate with a
//! CertificateSigningRequest for `system:node:<name>` in `system:nodes` (signer
//! `kubernetes.io/kube-apiserver-client-kubelet`, which the controller manager approves
//! for a bootstrap token's group and signs), and keeps the certificate and key in
//! `apiserver.kubeconfig`, which it uses from then on. The token is needed once: a node
//! that has its certificate needs it again only once that certificate has expired.
//!
//! The key is written before the request, so a restart while the request waits for
//! approval asks again with the same key under the same name, and no second request is
//! left behind.
//!
//! With `apiserver.tpm_key` the key is made in the TPM (`edge-tpm site-key create`) and
//! never leaves it: the request is signed there, the kubeconfig names the key's file
//! (`<kubeconfig>.key-<hash>.json`, the TPM's wrapped blobs, which no other TPM can
//! load), and every TLS handshake as the node is signed there too (mod.rs's
//! `client_from` and `identity`). A copied disk in another box cannot act as the node.
//!
//! The certificate is renewed before it expires ([`renewed`]): a new key and request,
//! asked for with the node's own certificate, as kubelet rotates its client
//! certificate; the API tasks then start again with the new one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::config::{AuthInfo, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext};
use sha2::{Digest, Sha256};

use super::calls::{timed, Limited, Retry};
use super::Settings;
use crate::error::{Error, Result};

/// The signer whose certificates the API server takes as a node's (kubelet's) client
/// identity; the controller manager signs its approved requests with the cluster CA.
pub const SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// How often a request is looked at while it waits for approval.
const POLL: Duration = Duration::from_secs(1);
/// A request not signed within this is given up for now and asked again after the
/// back-off (the same name: the server keeps the first).
const WAIT_SIGNED: Duration = Duration::from_secs(60);

/// A client with the node's own credential: the stored one while its certificate is
/// valid, else one obtained with the bootstrap credential (retried with back-off and
/// logged at most every [`super::LOG_EVERY`] until it works: the pods never wait on it).
pub(super) async fn client(settings: &Settings, bootstrap: &Path) -> kube::Client {
    let mut retry = Retry::new(settings.retry_max);
    let mut log = Limited::new("getting the node's certificate");
    loop {
        match obtain(settings, bootstrap).await {
            Ok(c) => {
                log.ok();
                return c;
            }
            Err(e) => log.fail(&e),
        }
        tokio::time::sleep(retry.next_delay()).await;
    }
}

async fn obtain(settings: &Settings, bootstrap: &Path) -> Result<kube::Client> {
    let stored = &settings.kubeconfig;
    match usable(stored, &settings.node_name) {
        Ok(()) => return super::client_from(stored, settings.tpm_program.as_deref()).await,
        Err(why) => tracing::info!(
            "the node's credential {}: {why}; asking the API server for one with the \
             bootstrap credential {}",
            stored.display(),
            bootstrap.display()
        ),
    }
    let requester = super::client_from(bootstrap, None).await?;
    request(settings, bootstrap, requester).await
}

/// Asks for a certificate with `requester` (the bootstrap credential, or the node's own
/// when it renews), waits for it and keeps it in the node's kubeconfig.
async fn request(
    settings: &Settings,
    bootstrap: &Path,
    requester: kube::Client,
) -> Result<kube::Client> {
    let stored = &settings.kubeconfig;
    let key_path = pending_key_path(stored);
    // The TPM's steps are processes that take a while under emulation.
    let (tpm, node) = (settings.tpm_program.clone(), settings.node_name.clone());
    let kp = key_path.clone();
    let (key, csr) = tokio::task::spawn_blocking(move || {
        let key = pending_key(&kp, tpm.as_deref())?;
        let csr = request_pem(&key, &node)?;
        Ok::<_, Error>((key, csr))
    })
    .await
    .map_err(|e| Error::Bootstrap(format!("making the request: {e}")))??;
    let name = request_name(&settings.node_name, &key);
    let api: Api<CertificateSigningRequest> = Api::all(requester);
    let object = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr.into_bytes()),
            signer_name: SIGNER.into(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    match timed(api.create(&PostParams::default(), &object)).await {
        Ok(_) => tracing::info!(
            "asked for the node's certificate: CertificateSigningRequest {name} \
             (approved by the controller manager for a bootstrap token or a node's \
             renewal, or by `kubectl certificate approve {name}`)"
        ),
        // Asked before this restart, with this key: wait for that one.
        Err(Error::ApiCall {
            code: Some(409), ..
        }) => {}
        Err(e) => return Err(e),
    }
    let cert = signed(&api, &name).await?;
    check_issued(&cert, &key, &settings.node_name)?;
    match &key {
        NodeKey::Here(k) => {
            write_kubeconfig(stored, bootstrap, &cert, KeyIn::Data(&k.serialize_pem()))?;
            let _ = std::fs::remove_file(&key_path);
        }
        NodeKey::Tpm { .. } => {
            // The TPM's file stays, under a name of its own; the kubeconfig names it.
            let kept = tpm_key_path(stored, &name);
            std::fs::rename(&key_path, &kept).map_err(Error::io("failed to rename", &key_path))?;
            write_kubeconfig(stored, bootstrap, &cert, KeyIn::File(&kept))?;
            remove_other_tpm_keys(stored, &kept);
        }
    }
    tracing::info!(
        "the node's certificate for system:node:{} is signed and kept in {}",
        settings.node_name,
        stored.display()
    );
    super::client_from(stored, settings.tpm_program.as_deref()).await
}

/// Returns once the node's certificate is renewed (a new key and certificate kept in
/// the kubeconfig, the new client given back) or, when renewing failed until it
/// expired, `None`: the bootstrap credential is then the way back. The renewal is due
/// once `settings.renew_after` of the certificate's lifetime has passed (kubelet
/// renews at 70 to 90 %); it is asked for with the node's own certificate, which the
/// controller manager approves for a node asking for its own name (the
/// `selfnodeclient` role bound to `system:nodes`, as kubeadm binds it).
pub(super) async fn renewed(
    settings: &Settings,
    bootstrap: &Path,
    current: kube::Client,
) -> Option<kube::Client> {
    let stored = &settings.kubeconfig;
    let due = match validity(stored) {
        Ok((from, until)) => from + ((until - from) as f64 * settings.renew_after) as i64,
        Err(e) => {
            tracing::warn!("the node's certificate in {}: {e}", stored.display());
            return None;
        }
    };
    let now = (edge_common::unix_ms() / 1000) as i64;
    if due > now {
        tracing::info!(
            "the node's certificate is renewed in {} s (at {} % of its lifetime)",
            due - now,
            (settings.renew_after * 100.0).round()
        );
        tokio::time::sleep(Duration::from_secs((due - now) as u64)).await;
    }
    let mut retry = Retry::new(settings.retry_max);
    let mut log = Limited::new("renewing the node's certificate");
    loop {
        if let Err(why) = usable(stored, &settings.node_name) {
            tracing::warn!("the node's certificate was not renewed in time: {why}");
            return None;
        }
        match request(settings, bootstrap, current.clone()).await {
            Ok(c) => {
                log.ok();
                tracing::info!("the node's certificate is renewed");
                return Some(c);
            }
            Err(e) => log.fail(&e),
        }
        tokio::time::sleep(retry.next_delay()).await;
    }
}

/// The stored certificate's validity (Unix seconds from, until).
fn validity(path: &Path) -> std::result::Result<(i64, i64), String> {
    let cert = stored_certificate(path)?;
    Ok((cert.not_before, cert.not_after))
}

/// The client certificate a kubeconfig holds as data.
fn stored_certificate(path: &Path) -> std::result::Result<Certificate, String> {
    if !path.exists() {
        return Err("there is none yet".into());
    }
    let k = Kubeconfig::read_from(path).map_err(|e| format!("unreadable ({e})"))?;
    let pem = k
        .auth_infos
        .first()
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.client_certificate_data.as_ref())
        .ok_or("it holds no client certificate")?;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(pem.trim())
        .map_err(|e| format!("its client-certificate-data is not base64 ({e})"))?;
    Certificate::parse(&pem)
}

/// Why the stored credential cannot be used (absent, unreadable, no certificate of
/// this node's, expired), or `Ok` when it can.
fn usable(path: &Path, node: &str) -> std::result::Result<(), String> {
    let cert = stored_certificate(path)?;
    if cert.common_name != format!("system:node:{node}") {
        return Err(format!(
            "its certificate is for {:?}, not system:node:{node}",
            cert.common_name
        ));
    }
    let now = edge_common::unix_ms() / 1000;
    if cert.not_after <= now as i64 {
        return Err(format!(
            "its certificate expired at {} (Unix time)",
            cert.not_after
        ));
    }
    Ok(())
}

/// `<kubeconfig>.key.pending`: the key a request was made with, until it is signed.
fn pending_key_path(kubeconfig: &Path) -> PathBuf {
    let name = kubeconfig.file_name().unwrap_or_default().to_string_lossy();
    kubeconfig.with_file_name(format!("{name}.key.pending"))
}

/// The node's key: made here and kept as PEM, or made in the TPM and kept as edge-tpm's
/// file of the TPM's wrapped blobs, signing through the TPM.
enum NodeKey {
    Here(Box<rcgen::KeyPair>),
    Tpm {
        key: edge_tpm::program::TpmKey,
        /// The public key (the EC point), as rcgen writes it into the request.
        public: Vec<u8>,
    },
}

impl rcgen::PublicKeyData for NodeKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            NodeKey::Here(k) => k.der_bytes(),
            NodeKey::Tpm { public, .. } => public,
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            NodeKey::Here(k) => k.algorithm(),
            NodeKey::Tpm { .. } => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl rcgen::SigningKey for NodeKey {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        match self {
            NodeKey::Here(k) => k.sign(msg),
            NodeKey::Tpm { key, .. } => key.sign_message(msg).map_err(|e| {
                tracing::warn!("the TPM did not sign the certificate request: {e}");
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}

/// The key of a request made before (a restart while it waited), or a new one, kept
/// first (mode 0600) so that request is the one waited for: made here, or in the TPM
/// with `tpm` (edge-tpm) when given.
fn pending_key(path: &Path, tpm: Option<&Path>) -> Result<NodeKey> {
    let Some(program) = tpm else {
        return software_key(path).map(|k| NodeKey::Here(Box::new(k)));
    };
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Error::Bootstrap(format!("{what} the node's key in the TPM: {e}"))
    };
    let usable = std::fs::read(path)
        .ok()
        .is_some_and(|t| edge_tpm::program::is_tpm_key(&t) == Ok(true));
    if !usable {
        let blob = edge_tpm::program::run(program, &["site-key", "create"], b"")
            .map_err(|e| failed("making", &e))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io("failed to create", dir))?;
        }
        edge_common::write_atomic(path, &blob, 0o600)
            .map_err(Error::io("failed to write", path))?;
    }
    let key = edge_tpm::program::TpmKey {
        program: program.to_path_buf(),
        key: path.to_path_buf(),
    };
    let pem = key.public_pem().map_err(|e| failed("reading", &e))?;
    let public = ec_point(&pem).map_err(|e| failed("reading", &e))?;
    Ok(NodeKey::Tpm { key, public })
}

/// The EC point of a PEM SubjectPublicKeyInfo (P-256).
fn ec_point(pem: &str) -> std::result::Result<Vec<u8>, String> {
    use x509_parser::prelude::FromDer;
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM public key: {e}"))?;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&p.contents)
        .map_err(|e| format!("not a public key: {e}"))?;
    Ok(spki.subject_public_key.data.to_vec())
}

/// Where a signed TPM key is kept: `<kubeconfig>.key-<the request's hash>.json`.
fn tpm_key_path(kubeconfig: &Path, request: &str) -> PathBuf {
    let name = kubeconfig.file_name().unwrap_or_default().to_string_lossy();
    let hash = request.rsplit('-').next().unwrap_or(request);
    kubeconfig.with_file_name(format!("{name}.key-{hash}.json"))
}

/// The TPM keys of earlier certificates, now that `kept` is the node's.
fn remove_other_tpm_keys(kubeconfig: &Path, kept: &Path) {
    let name = kubeconfig.file_name().unwrap_or_default().to_string_lossy();
    let prefix = format!("{name}.key-");
    let Some(dir) = kubeconfig.parent() else {
        return;
    };
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(&prefix) && n.ends_with(".json") && p != kept {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// A key made here, kept as PEM (see [`pending_key`]).
fn software_key(path: &Path) -> Result<rcgen::KeyPair> {
    if let Ok(pem) = std::fs::read_to_string(path) {
        match rcgen::KeyPair::from_pem(&pem) {
            Ok(k) => return Ok(k),
            Err(e) => tracing::warn!("{}: not a key ({e}); making a new one", path.display()),
        }
    }
    let key = rcgen::KeyPair::generate().map_err(|e| Error::Bootstrap(e.to_string()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("failed to create", dir))?;
    }
    edge_common::write_atomic(path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(Error::io("failed to write", path))?;
    Ok(key)
}

/// The PKCS#10 request: `CN=system:node:<node>, O=system:nodes`, which is what the
/// signer and the Node authorizer take as this node.
fn request_pem(key: &NodeKey, node: &str) -> Result<String> {
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "system:nodes");
    dn.push(rcgen::DnType::CommonName, format!("system:node:{node}"));
    params.distinguished_name = dn;
    params
        .serialize_request(key)
        .and_then(|r| r.pem())
        .map_err(|e| Error::Bootstrap(format!("making the certificate request: {e}")))
}

/// One name per node and key: `node-csr-<node>-<first 16 hex of the key's SHA-256>`.
fn request_name(node: &str, key: &impl rcgen::PublicKeyData) -> String {
    let h = Sha256::digest(key.subject_public_key_info());
    format!("node-csr-{node}-{}", edge_common::hex::encode(&h[..8]))
}

/// Waits for the request's certificate; a denied or failed request is an error naming
/// its reason.
async fn signed(api: &Api<CertificateSigningRequest>, name: &str) -> Result<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + WAIT_SIGNED;
    loop {
        let csr = timed(api.get(name)).await?;
        let status = csr.status.unwrap_or_default();
        for c in status.conditions.unwrap_or_default() {
            if (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True" {
                return Err(Error::Bootstrap(format!(
                    "CertificateSigningRequest {name} was {}: {} {}",
                    c.type_.to_lowercase(),
                    c.reason.unwrap_or_default(),
                    c.message.unwrap_or_default()
                )));
            }
        }
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            return Ok(cert.0);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Bootstrap(format!(
                "CertificateSigningRequest {name} is not signed within {} s (not approved?)",
                WAIT_SIGNED.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What noded reads from a certificate.
struct Certificate {
    common_name: String,
    /// Unix seconds.
    not_before: i64,
    not_after: i64,
    public_key: Vec<u8>,
}

impl Certificate {
    /// The first certificate of a PEM text.
    fn parse(pem: &[u8]) -> std::result::Result<Certificate, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
            .map_err(|e| format!("its certificate is not PEM ({e})"))?;
        let cert = pem
            .parse_x509()
            .map_err(|e| format!("its certificate does not parse ({e})"))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok(Certificate {
            common_name,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            public_key: cert.public_key().raw.to_vec(),
        })
    }
}

/// The signed certificate must be for this node and this key: a signer that issued
/// another is refused rather than kept.
fn check_issued(pem: &[u8], key: &impl rcgen::PublicKeyData, node: &str) -> Result<()> {
    let cert = Certificate::parse(pem).map_err(Error::Bootstrap)?;
    if cert.public_key != key.subject_public_key_info() {
        return Err(Error::Bootstrap(
            "the signed certificate is not for the key the request was made with".into(),
        ));
    }
    if cert.common_name != format!("system:node:{node}") {
        return Err(Error::Bootstrap(format!(
            "the signed certificate is for {:?}, not system:node:{node}",
            cert.common_name
        )));
    }
    Ok(())
}

/// Where the node's key is: as data (PEM), or a TPM key's file.
enum KeyIn<'a> {
    Data(&'a str),
    File(&'a Path),
}

/// The node's kubeconfig: the bootstrap kubeconfig's server and CA (its file read in, so
/// the result stands alone), the certificate as data and the key as data or its file;
/// mode 0600, whole or not at all.
fn write_kubeconfig(path: &Path, bootstrap: &Path, cert: &[u8], key: KeyIn) -> Result<()> {
    let unusable = |source| Error::Kubeconfig {
        path: bootstrap.to_path_buf(),
        source,
    };
    let from = Kubeconfig::read_from(bootstrap).map_err(unusable)?;
    let mut cluster = super::current(&from)
        .0
        .cloned()
        .ok_or_else(|| Error::Bootstrap(format!("{} names no cluster", bootstrap.display())))?;
    if let Some(ca) = cluster.certificate_authority.take() {
        let pem = std::fs::read(&ca).map_err(Error::io("failed to read", &ca))?;
        cluster.certificate_authority_data =
            Some(base64::engine::general_purpose::STANDARD.encode(pem));
    }
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let out = Kubeconfig {
        clusters: vec![NamedCluster {
            name: "core".into(),
            cluster: Some(cluster),
            ..Default::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "node".into(),
            auth_info: Some(AuthInfo {
                client_certificate_data: Some(b64(cert)),
                client_key_data: match key {
                    KeyIn::Data(pem) => Some(b64(pem.as_bytes()).into()),
                    KeyIn::File(_) => None,
                },
                client_key: match key {
                    KeyIn::File(f) => Some(f.display().to_string()),
                    KeyIn::Data(_) => None,
                },
                ..Default::default()
            }),
            ..Default::default()
        }],
        contexts: vec![NamedContext {
            name: "core".into(),
            context: Some(kube::config::Context {
                cluster: "core".into(),
                user: Some("node".into()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        current_context: Some("core".into()),
        kind: Some("Config".into()),
        api_version: Some("v1".into()),
        ..Default::default()
    };
    let text = serde_json::to_vec_pretty(&out)
        .map_err(|e| Error::Bootstrap(format!("writing the kubeconfig: {e}")))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("failed to create", dir))?;
    }
    edge_common::write_atomic(path, &text, 0o600).map_err(Error::io("failed to write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;

    #[test]
    fn a_request_names_this_node_in_the_nodes_group_and_keeps_its_name_per_key() {
        let key = NodeKey::Here(Box::new(rcgen::KeyPair::generate().unwrap()));
        let pem = request_pem(&key, "edge0").unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{pem}"
        );
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, req) =
            <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(&p.contents)
                .unwrap();
        let subject = req.certification_request_info.subject.to_string();
        assert!(subject.contains("CN=system:node:edge0"), "{subject}");
        assert!(subject.contains("O=system:nodes"), "{subject}");
        assert_eq!(request_name("edge0", &key), request_name("edge0", &key));
        let other = rcgen::KeyPair::generate().unwrap();
        assert_ne!(request_name("edge0", &key), request_name("edge0", &other));
        assert!(request_name("edge0", &key).starts_with("node-csr-edge0-"));
    }

    #[test]
    fn a_pending_key_survives_a_restart_and_a_bad_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = pending_key_path(&dir.path().join("kubeconfig"));
        assert_eq!(path, dir.path().join("kubeconfig.key.pending"));
        let first = pending_key(&path, None).unwrap();
        let again = pending_key(&path, None).unwrap();
        assert_eq!(
            first.subject_public_key_info(),
            again.subject_public_key_info()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "not a key").unwrap();
        let new = pending_key(&path, None).unwrap();
        assert_ne!(
            new.subject_public_key_info(),
            first.subject_public_key_info()
        );
    }

    /// A certificate for `cn` and `key`, valid until the start of `year`.
    fn certificate(cn: &str, key: &rcgen::KeyPair, year: i32) -> String {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(year, 1, 1);
        p.self_signed(key).unwrap().pem()
    }

    #[test]
    fn only_a_signed_certificate_for_this_node_and_key_is_taken() {
        let key = rcgen::KeyPair::generate().unwrap();
        let good = certificate("system:node:edge0", &key, 2099);
        check_issued(good.as_bytes(), &key, "edge0").unwrap();
        let e = check_issued(good.as_bytes(), &key, "edge1").unwrap_err();
        assert!(e.to_string().contains("not system:node:edge1"), "{e}");
        let other = rcgen::KeyPair::generate().unwrap();
        let e = check_issued(good.as_bytes(), &other, "edge0").unwrap_err();
        assert!(e.to_string().contains("not for the key"), "{e}");
        let e = check_issued(b"junk", &key, "edge0").unwrap_err();
        assert!(e.to_string().contains("not PEM"), "{e}");
    }

    #[test]
    fn the_stored_credential_is_used_until_its_certificate_expires() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let boot = dir.path().join("bootstrap.kubeconfig");
        std::fs::write(
            &boot,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    \
                 server: https://10.0.2.100:6443\n    certificate-authority: {}\n\
                 users:\n- name: b\n  user:\n    token: abcdef.0123456789abcdef\n\
                 contexts:\n- name: c\n  context:\n    cluster: c\n    user: b\n\
                 current-context: c\n",
                ca.display()
            ),
        )
        .unwrap();
        let stored = dir.path().join("node/kubeconfig");
        let e = usable(&stored, "edge0").unwrap_err();
        assert!(e.contains("none yet"), "{e}");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = certificate("system:node:edge0", &key, 2099);
        let pem = key.serialize_pem();
        write_kubeconfig(&stored, &boot, cert.as_bytes(), KeyIn::Data(&pem)).unwrap();
        usable(&stored, "edge0").unwrap();
        let k = Kubeconfig::read_from(&stored).unwrap();
        let cluster = k.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.2.100:6443"));
        assert!(cluster.certificate_authority.is_none());
        assert!(cluster.certificate_authority_data.is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = usable(&stored, "edge1").unwrap_err();
        assert!(e.contains("not system:node:edge1"), "{e}");
        let expired = certificate("system:node:edge0", &key, 2021);
        write_kubeconfig(&stored, &boot, expired.as_bytes(), KeyIn::Data(&pem)).unwrap();
        let e = usable(&stored, "edge0").unwrap_err();
        assert!(e.contains("expired"), "{e}");
        std::fs::write(&stored, "{").unwrap();
        let e = usable(&stored, "edge0").unwrap_err();
        assert!(e.contains("unreadable"), "{e}");
    }
}
