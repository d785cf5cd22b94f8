//! Producers on the site network. `tcp_listen` and `http_listen` on an address other
//! machines reach take only TLS with a client certificate signed by the site's CA
//! (`[lan_tls]`), and such a producer is named by its certificate: `lan:<CN>` is the
//! Edge-Producer on its records and what `producer_bytes_per_sec` meters. On loopback
//! (the box's own programs) and without `[lan_tls]` the listeners stay plain.

use std::sync::Arc;
use std::time::Duration;

use async_nats::rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::LanTlsConfig;
use crate::site_identity::{bad, certificates, read};
use crate::{Error, Result};

/// A producer's connection: plain, or TLS.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS side of the site-network listeners, from `[lan_tls]`'s files; an error names
/// the file and what is wrong with it.
pub fn acceptor(t: &LanTlsConfig) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in certificates("lan_tls.client_ca", &t.client_ca)? {
        roots
            .add(c)
            .map_err(bad("lan_tls.client_ca", &t.client_ca))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(bad("lan_tls.client_ca", &t.client_ca))?;
    let chain = certificates("lan_tls.cert", &t.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read("lan_tls.key", &t.key)?)
        .map_err(|e| bad("lan_tls.key", &t.key)(format!("is not a PEM private key: {e}")))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(Error::TlsConfig)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(bad("lan_tls.key", &t.key))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The connection to serve and who it is from: as it came without TLS, or once the
/// handshake proved a client certificate of the site's CA, `lan:<its CN>`. `None`
/// (logged with the peer's address and why) for a client that did not prove one.
pub async fn accept(
    tls: Option<&TlsAcceptor>,
    stream: TcpStream,
    peer: String,
) -> Option<(Box<dyn Conn>, String)> {
    let Some(tls) = tls else {
        return Some((Box::new(stream), peer));
    };
    let refused = |why: String| {
        tracing::warn!(%peer, "refused a producer on the site network: {why}");
        None
    };
    let s = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refused(format!("TLS handshake failed: {e}")),
        Err(_) => return refused("no TLS handshake within 10 s".into()),
    };
    let Some(cert) = s.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return refused("no client certificate".into());
    };
    match edge_tpm::ek_certificate::subject_common_name(cert) {
        Ok(cn) => Some((Box::new(s), format!("lan:{cn}"))),
        Err(e) => refused(format!("client certificate: {e}")),
    }
}
