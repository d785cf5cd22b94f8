//! The operator's signing key. One ed25519 key pair signs what the appliance trusts from
//! outside its image: the image allowlist shipped in the image (signed here), and the
//! manifests and allowlists the core delivers (signed by `edgectl` with the same key).
//! The image carries only the public key, as `/etc/edge/core-ed25519.pub`.
//!
//! The pair lives outside the repository, where `edgectl keygen --out` puts it:
//! `manifest.key` (PKCS#8) and `manifest.pub` (64 hex digits), in `EDGEOS_KEY_DIR` or
//! `~/.config/edgeos/keys`. The first build on a machine without one makes one and says
//! so: the images it builds trust that key from then on.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ring::signature::{Ed25519KeyPair, KeyPair};

pub struct SigningKey {
    pair: Ed25519KeyPair,
    /// The public key as the image and `edgectl` write it: 64 lowercase hex digits.
    pub public_hex: String,
}

impl SigningKey {
    /// `signature || body`: the framing of fabricd's manifests and noded's allowlists.
    pub fn sign_framed(&self, body: &[u8]) -> Vec<u8> {
        let mut out = self.pair.sign(body).as_ref().to_vec();
        out.extend_from_slice(body);
        out
    }
}

pub fn key_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("EDGEOS_KEY_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME").context("neither EDGEOS_KEY_DIR nor HOME is set")?;
    Ok(Path::new(&home).join(".config/edgeos/keys"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Loads the key pair from `dir`, making one when the directory has none.
pub fn operator_key(dir: &Path) -> Result<SigningKey> {
    let key_path = dir.join("manifest.key");
    let pub_path = dir.join("manifest.pub");
    if !key_path.exists() {
        if pub_path.exists() {
            bail!(
                "{} exists without its private key {}: restore the key, or move both away to make a new pair",
                pub_path.display(),
                key_path.display()
            );
        }
        make(dir, &key_path, &pub_path)?;
    }
    let pkcs8 = std::fs::read(&key_path)
        .with_context(|| format!("failed to read {}", key_path.display()))?;
    let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an ed25519 PKCS#8 key ({e}); edgectl keygen makes one",
            key_path.display()
        )
    })?;
    let public_hex = hex(pair.public_key().as_ref());
    let written = std::fs::read_to_string(&pub_path)
        .with_context(|| format!("failed to read {}", pub_path.display()))?;
    if written.trim() != public_hex {
        bail!(
            "{} does not hold the public key of {} ({public_hex})",
            pub_path.display(),
            key_path.display()
        );
    }
    Ok(SigningKey { pair, public_hex })
}

fn make(dir: &Path, key_path: &Path, pub_path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("failed to generate an ed25519 key"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("failed to use the generated key"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .with_context(|| format!("failed to create {}", key_path.display()))?;
    f.write_all(pkcs8.as_ref())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("failed to write {}", key_path.display()))?;
    let public_hex = hex(pair.public_key().as_ref());
    std::fs::write(pub_path, format!("{public_hex}\n"))
        .with_context(|| format!("failed to write {}", pub_path.display()))?;
    eprintln!(
        "image: made a new signing key {} (public {public_hex}); images built from now on trust it: keep it, and sign the core's downlink items with it (edgectl --signing-key)",
        key_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_then_reused_and_a_mismatched_pair_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let a = operator_key(&dir).unwrap();
        let b = operator_key(&dir).unwrap();
        assert_eq!(a.public_hex, b.public_hex);
        assert_eq!(a.public_hex.len(), 64);
        let signed = a.sign_framed(b"{}");
        assert_eq!(signed.len(), 64 + 2);
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ED25519,
            a.pair.public_key().as_ref(),
        )
        .verify(b"{}", &signed[..64])
        .unwrap();

        std::fs::write(dir.join("manifest.pub"), "00".repeat(32)).unwrap();
        let e = operator_key(&dir).err().unwrap().to_string();
        assert!(e.contains("does not hold the public key"), "{e}");
        std::fs::remove_file(dir.join("manifest.key")).unwrap();
        let e = operator_key(&dir).err().unwrap().to_string();
        assert!(e.contains("without its private key"), "{e}");
    }
}
