//! What `edgectl` signs: image allowlists and downlink manifests, and the checks that
//! keep it from signing what a box would refuse.

use std::path::Path;

use crate::error::{Error, Result};
use crate::read;

/// The signed allowlist of `digests`, refusing anything noded would not run.
pub(crate) fn allowlist(key: &[u8], version: u64, digests: &[String]) -> Result<Vec<u8>> {
    for d in digests {
        let hex = d.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::invalid(
                format!("digest {d:?}"),
                "is not sha256:<64 lowercase hex digits>",
            ));
        }
    }
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(key)
        .map_err(|_| Error::invalid("the signing key", "is not an ed25519 PKCS#8 key"))?;
    let body = serde_json::to_vec(&serde_json::json!({"version": version, "digests": digests}))
        .map_err(fabricd::Error::json("failed to encode the allowlist"))?;
    Ok(sign_framed(&kp, &body))
}

/// The operator's downlink signing key (ed25519 PKCS#8) from its file.
pub(crate) fn read_signing_key(path: &Path) -> Result<ring::signature::Ed25519KeyPair> {
    ring::signature::Ed25519KeyPair::from_pkcs8(&read(path)?)
        .map_err(|_| Error::invalid(path.display().to_string(), "is not an ed25519 PKCS#8 key"))
}

/// The 64-byte ed25519 signature of `body`, then `body`: how manifests and allowlists
/// travel, so the reader can split at 64 and verify.
pub(crate) fn sign_framed(kp: &ring::signature::Ed25519KeyPair, body: &[u8]) -> Vec<u8> {
    let mut signed = kp.sign(body).as_ref().to_vec();
    signed.extend_from_slice(body);
    signed
}

/// A site's boxes may read only their site's keys of the config bucket (`<site>.` ...),
/// so a manifest naming another key could never be applied: refused before it is signed.
pub(crate) fn kv_items_of_site(manifest: &fabricd::downlink::Manifest, site: &str) -> Result<()> {
    let own = format!("{site}.");
    match manifest
        .items
        .iter()
        .find(|i| i.store == "kv" && !i.key.starts_with(&own))
    {
        Some(i) => Err(Error::invalid(
            format!("item `{}`: kv key `{}`", i.name, i.key),
            format!("is not under `{own}`, and the boxes of site {site} may read only their site's keys"),
        )),
        None => Ok(()),
    }
}
