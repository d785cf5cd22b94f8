//! The operator's signing key. One ed25519 key pair signs what the appliance trusts from
//! outside its image: the image allowlist shipped in the image (signed here), and the
//! manifests and allowlists the core delivers (signed by `edgectl` with the same key).
//! The image carries only the public key, as `/etc/edge/core-ed25519.pub`.
//!
//! The pair lives outside the repository, where `edgectl keygen --out` puts it:
//! `manifest.key` (PKCS#8) and `manifest.pub` (64 hex digits), in `EDGEOS_KEY_DIR` or
//! `~/.config/edgeos/keys`. The first build on a machine without one makes one and says
//! so: the images it builds trust that key from then on.
//!
//! Next to it, the PCR-policy key: an RSA-2048 pair that signs each UKI's expected PCR 11
//! (`.pcrsig`, see `pcr.rs`), `pcr-policy.key` (PEM PKCS#8) and `pcr-policy.pub.pem` (PEM
//! SubjectPublicKeyInfo, shipped as the UKI's `.pcrpkey`). A build without one makes one
//! with the host's openssl and marks it `pcr-policy.development`; every build signed
//! with a marked key warns so.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ring::signature::{Ed25519KeyPair, KeyPair, RsaKeyPair};
use sha2::{Digest, Sha256};

pub struct SigningKey {
    pair: Ed25519KeyPair,
    /// The public key as the image and `edgectl` write it: 64 lowercase hex digits.
    pub public_hex: String,
}

impl SigningKey {
    /// The public key's 32 bytes.
    pub fn public(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// The ed25519 signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }

    /// `signature || body`: the framing of fabricd's manifests and noded's allowlists.
    pub fn sign_framed(&self, body: &[u8]) -> Vec<u8> {
        let mut out = self.sign(body);
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
    ed25519_pair(
        dir,
        "manifest",
        "images built from now on trust it: keep it, and sign the core's downlink items with it (edgectl --signing-key)",
    )
}

/// The update key: signs each build's update bundle (`edge-update`); the image carries
/// its public half as `/etc/edge/update-ed25519.pub`. A build without one makes a
/// development pair, marked `update.development`, and warns on every build.
pub struct UpdateKey {
    pub key: SigningKey,
    pub development: bool,
    dir: PathBuf,
}

impl UpdateKey {
    pub fn development_warning(&self) -> String {
        format!(
            "WARNING: the update bundle is signed with a development key made by a build ({}): to sign with your own, put an ed25519 pair there as update.key (PKCS#8) and update.pub (64 hex digits; `edgectl keygen --name update --out <dir>` makes one) and remove update.development",
            self.dir.join("update.key").display()
        )
    }
}

pub fn update_key(dir: &Path) -> Result<UpdateKey> {
    let marker = dir.join("update.development");
    let made = !dir.join("update.key").exists();
    let key = ed25519_pair(
        dir,
        "update",
        "a development update key: boxes running images built from now on accept the bundles it signs",
    )?;
    if made {
        std::fs::write(
            &marker,
            "made by `cargo xtask image`; remove this file once the pair here is your own
",
        )
        .with_context(|| format!("failed to write {}", marker.display()))?;
    }
    Ok(UpdateKey {
        key,
        development: marker.exists(),
        dir: dir.to_path_buf(),
    })
}

/// The ed25519 pair `<stem>.key` (PKCS#8) and `<stem>.pub` (hex) in `dir`, made (and
/// `made` said of it) when there is none.
fn ed25519_pair(dir: &Path, stem: &str, made: &str) -> Result<SigningKey> {
    let key_path = dir.join(format!("{stem}.key"));
    let pub_path = dir.join(format!("{stem}.pub"));
    ensure_pair(&key_path, &pub_path, || {
        make(dir, &key_path, &pub_path, made)
    })?;
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

/// Runs `make` when the private key is missing; a public half alone is refused (making a
/// new pair would silently orphan every image that trusts the old one).
fn ensure_pair(key_path: &Path, pub_path: &Path, make: impl FnOnce() -> Result<()>) -> Result<()> {
    if key_path.exists() {
        return Ok(());
    }
    if pub_path.exists() {
        bail!(
            "{} exists without its private key {}: restore the key, or move both away to make a new pair",
            pub_path.display(),
            key_path.display()
        );
    }
    make()
}

/// Writes a private key into a new file made 0600 (never one that exists), synced.
fn write_private(dir: &Path, key_path: &Path, key: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key_path)
        .with_context(|| format!("failed to create {}", key_path.display()))?;
    f.write_all(key)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("failed to write {}", key_path.display()))
}

fn make(dir: &Path, key_path: &Path, pub_path: &Path, made: &str) -> Result<()> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("failed to generate an ed25519 key"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("failed to use the generated key"))?;
    write_private(dir, key_path, pkcs8.as_ref())?;
    let public_hex = hex(pair.public_key().as_ref());
    std::fs::write(pub_path, format!("{public_hex}\n"))
        .with_context(|| format!("failed to write {}", pub_path.display()))?;
    eprintln!(
        "image: made a new signing key {} (public {public_hex}); {made}",
        key_path.display()
    );
    Ok(())
}

pub struct PcrPolicyKey {
    pair: RsaKeyPair,
    /// `pcr-policy.pub.pem`, whose bytes are the UKI's `.pcrpkey` section.
    pub public_pem_path: PathBuf,
    /// The key was made by a build, not given by the operator.
    pub development: bool,
}

impl PcrPolicyKey {
    /// RSA PKCS#1 v1.5 with SHA-256 over `msg`, as OpenSSL's EVP_DigestSign does for
    /// `systemd-measure sign`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        let mut sig = vec![0; self.pair.public().modulus_len()];
        self.pair
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                msg,
                &mut sig,
            )
            .map_err(|_| anyhow::anyhow!("failed to sign with the PCR-policy key"))?;
        Ok(sig)
    }

    /// SHA-256 of the DER RSAPublicKey (PKCS#1): systemd's `pkfp`.
    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(self.pair.public().as_ref()).into()
    }

    pub fn public_pem(&self) -> Result<Vec<u8>> {
        std::fs::read(&self.public_pem_path)
            .with_context(|| format!("failed to read {}", self.public_pem_path.display()))
    }

    /// The line every build signed with a development key prints.
    pub fn development_warning(&self) -> String {
        format!(
            "WARNING: the UKIs' PCR policy is signed with a development key made by a build ({}): \
             to sign with your own, put an RSA-2048 pair (pcr-policy.key, PKCS#8 PEM, and \
             pcr-policy.pub.pem) in {} and remove pcr-policy.development",
            self.public_pem_path.display(),
            self.public_pem_path
                .parent()
                .unwrap_or(Path::new("."))
                .display()
        )
    }
}

/// The PEM file's body, base64-decoded, if its label is `label`.
fn pem_body(path: &Path, label: &str) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(body, _)| body)
        .with_context(|| format!("{} is not a PEM file with a {label}", path.display()))?;
    let b64: String = body.split_whitespace().collect();
    edge_tpm::policy::base64_decode(&b64)
        .map_err(|e| anyhow::anyhow!("{}: {e} in the PEM body", path.display()))
}

/// Loads the PCR-policy pair from `dir`, making a development one when there is none.
pub fn pcr_policy_key(dir: &Path) -> Result<PcrPolicyKey> {
    let key_path = dir.join("pcr-policy.key");
    let pub_path = dir.join("pcr-policy.pub.pem");
    let marker = dir.join("pcr-policy.development");
    ensure_pair(&key_path, &pub_path, || {
        make_pcr_policy(dir, &key_path, &pub_path, &marker)
    })?;
    let pkcs8 = pem_body(&key_path, "PRIVATE KEY")?;
    let pair = RsaKeyPair::from_pkcs8(&pkcs8).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an RSA-2048 PKCS#8 key ({e}); `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` makes one",
            key_path.display()
        )
    })?;
    let bits = pair.public().modulus_len() * 8;
    if bits != 2048 {
        bail!(
            "{} is an RSA-{bits} key; the PCR policy wants RSA 2048",
            key_path.display()
        );
    }
    // Parsed as the box parses `.pcrpkey`: the fingerprints must agree.
    let public = std::fs::read(&pub_path)
        .with_context(|| format!("failed to read {}", pub_path.display()))?;
    let parsed = edge_tpm::policy::parse_pcrpkey(&public)
        .map_err(|e| anyhow::anyhow!("{}: {e}", pub_path.display()))?;
    if parsed.fingerprint != hex(&Sha256::digest(pair.public().as_ref())) {
        bail!(
            "{} does not hold the public key of {}; `openssl pkey -in {} -pubout` writes it",
            pub_path.display(),
            key_path.display(),
            key_path.display()
        );
    }
    Ok(PcrPolicyKey {
        pair,
        public_pem_path: pub_path,
        development: marker.exists(),
    })
}

fn make_pcr_policy(dir: &Path, key_path: &Path, pub_path: &Path, marker: &Path) -> Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    // Through stdout, so the key is only ever written into a file made 0600.
    let key = super::cmd::output(Command::new("openssl").args([
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
    ]))?
    .stdout;
    let mut c = Command::new("openssl")
        .args(["pkey", "-pubout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start `openssl pkey -pubout`")?;
    c.stdin
        .take()
        .context("openssl's stdin")?
        .write_all(&key)
        .context("failed to write to `openssl pkey -pubout`")?;
    let out = c
        .wait_with_output()
        .context("failed to run `openssl pkey -pubout`")?;
    if !out.status.success() {
        bail!(
            "`openssl pkey -pubout` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    write_private(dir, key_path, &key)?;
    std::fs::write(pub_path, &out.stdout)
        .with_context(|| format!("failed to write {}", pub_path.display()))?;
    std::fs::write(
        marker,
        "made by `cargo xtask image`; remove this file once the pair here is your own\n",
    )
    .with_context(|| format!("failed to write {}", marker.display()))?;
    eprintln!(
        "image: made a development PCR-policy key {} (RSA 2048); UKIs signed with it say so",
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

    #[test]
    fn a_made_update_key_is_marked_for_development_and_an_operators_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let made = update_key(&dir).unwrap();
        assert!(made.development);
        assert!(made.development_warning().contains("update.development"));
        let again = update_key(&dir).unwrap();
        assert_eq!(made.key.public_hex, again.key.public_hex);
        // The operator's own pair: the marker removed, no warning.
        std::fs::remove_file(dir.join("update.development")).unwrap();
        assert!(!update_key(&dir).unwrap().development);
        // It is not the manifest key.
        assert_ne!(operator_key(&dir).unwrap().public_hex, made.key.public_hex);
    }

    fn openssl_key(args: &[&str]) -> Vec<u8> {
        let out = std::process::Command::new("openssl")
            .arg("genpkey")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn a_development_pcr_policy_key_is_made_once_marked_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let a = pcr_policy_key(&dir).unwrap();
        assert!(a.development);
        assert!(a.development_warning().contains("development key"));
        let mode = std::fs::metadata(dir.join("pcr-policy.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = pcr_policy_key(&dir).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a
            .public_pem()
            .unwrap()
            .starts_with(b"-----BEGIN PUBLIC KEY-----"));

        let sig = a.sign(b"policy").unwrap();
        assert_eq!(sig.len(), 256);
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            a.pair.public().as_ref(),
        )
        .verify(b"policy", &sig)
        .unwrap();

        // The operator's own pair: no marker, no warning.
        std::fs::remove_file(dir.join("pcr-policy.development")).unwrap();
        assert!(!pcr_policy_key(&dir).unwrap().development);
    }

    #[test]
    fn a_wrong_pcr_policy_key_or_mismatched_public_file_is_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let key = dir.join("pcr-policy.key");
        let public = dir.join("pcr-policy.pub.pem");
        pcr_policy_key(dir).unwrap();

        // Another RSA-2048 key's public half.
        let other = tempfile::tempdir().unwrap();
        pcr_policy_key(other.path()).unwrap();
        std::fs::copy(other.path().join("pcr-policy.pub.pem"), &public).unwrap();
        let e = format!("{:#}", pcr_policy_key(dir).err().unwrap());
        assert!(
            e.contains(&public.display().to_string()) && e.contains("does not hold"),
            "{e}"
        );
        std::fs::write(&public, "not a key\n").unwrap();
        let e = format!("{:#}", pcr_policy_key(dir).err().unwrap());
        assert!(e.contains(&public.display().to_string()), "{e}");

        for (args, says) in [
            (
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
                "is not an RSA-2048",
            ),
            (
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"][..],
                "RSA-3072",
            ),
        ] {
            std::fs::write(&key, openssl_key(args)).unwrap();
            let e = format!("{:#}", pcr_policy_key(dir).err().unwrap());
            assert!(
                e.contains(&key.display().to_string()) && e.contains(says),
                "{e}"
            );
        }
        std::fs::write(
            &key,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let e = format!("{:#}", pcr_policy_key(dir).err().unwrap());
        assert!(e.contains(&key.display().to_string()), "{e}");

        std::fs::remove_file(&key).unwrap();
        let e = format!("{:#}", pcr_policy_key(dir).err().unwrap());
        assert!(e.contains("without its private key"), "{e}");
    }
}
