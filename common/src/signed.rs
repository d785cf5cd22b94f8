//! The signed envelope the core sends: a 64-byte ed25519 signature, then the body it
//! signs (fabricd's downlink manifests, noded's image allowlists), and the public key
//! file that checks it (64 hex digits, as the image ships it).

use std::path::Path;

/// The body of `signed` once its signature verifies with `public_key`; what is wrong
/// with it otherwise (callers say which file or key it was).
pub fn open<'a>(signed: &'a [u8], public_key: &[u8]) -> Result<&'a [u8], &'static str> {
    if signed.len() < 64 {
        return Err("shorter than its signature");
    }
    let (sig, body) = signed.split_at(64);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(body, sig)
        .map_err(|_| "signature does not verify with the image's public key")?;
    Ok(body)
}

/// Reads an ed25519 public key file (64 hex digits, whitespace around is fine); `what`
/// names it in errors (`downlink.public_key`).
pub fn read_public_key(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("failed to read {what} {}: {e}", path.display()))?;
    match crate::hex::decode(text.trim()) {
        Some(key) if key.len() == 32 => Ok(key),
        _ => Err(format!(
            "{what} {} must hold 64 hex digits (an ed25519 public key)",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    #[test]
    fn only_the_body_its_key_signed_opens() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let pk = kp.public_key().as_ref();
        let mut signed = kp.sign(b"body").as_ref().to_vec();
        signed.extend_from_slice(b"body");
        assert_eq!(open(&signed, pk), Ok(&b"body"[..]));
        let mut changed = signed.clone();
        *changed.last_mut().unwrap() = b'x';
        assert_eq!(
            open(&changed, pk),
            Err("signature does not verify with the image's public key")
        );
        assert_eq!(open(&signed[..10], pk), Err("shorter than its signature"));
    }

    #[test]
    fn a_key_file_is_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pub");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(read_public_key(&p, "the key").unwrap(), vec![0xab; 32]);
        std::fs::write(&p, "abc").unwrap();
        let e = read_public_key(&p, "the key").unwrap_err();
        assert!(
            e.starts_with("the key ") && e.contains("must hold 64 hex digits"),
            "{e}"
        );
        let e = read_public_key(&dir.path().join("none"), "the key").unwrap_err();
        assert!(e.starts_with("failed to read the key "), "{e}");
    }
}
