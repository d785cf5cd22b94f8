//! The image policy: which images may run, as a signed allowlist of image digests.
//!
//! An allowlist file is a 64-byte ed25519 signature followed by the JSON it signs,
//! `{"version": N, "digests": ["sha256:<64 hex>", ...]}` (the same framing as fabricd's
//! downlink manifests, checked with a key in the same format: a file of 64 hex
//! digits). One list ships in the image; the core may deliver another. The valid one
//! with the highest version is in force, so the core can both add and revoke digests;
//! a file that is missing, unsigned or malformed is left out and named. With no valid
//! list at all, nothing is allowed.
//!
//! A digest matches an image by its manifest digest (the `@sha256:...` of its repo
//! digests, what the registry and `edge-oci` name it by) or its image id.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The list in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    pub version: u64,
    pub digests: BTreeSet<String>,
    /// The file it came from.
    pub source: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    version: u64,
    digests: Vec<String>,
}

/// Splits and verifies one signed allowlist; `source` names it in errors.
pub fn verify(signed: &[u8], public_key: &[u8], source: &str) -> Result<Allowlist> {
    let left_out = |detail| Error::Allowlist {
        file: source.to_string(),
        detail,
    };
    let body = edge_common::signed::open(signed, public_key).map_err(|e| left_out(e.into()))?;
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| left_out(format!("signed allowlist is not valid: {e}")))?;
    for d in &b.digests {
        let ok = d.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        });
        if !ok {
            return Err(left_out(format!(
                "digest {d:?} is not sha256:<64 lowercase hex digits>"
            )));
        }
    }
    Ok(Allowlist {
        version: b.version,
        digests: b.digests.into_iter().collect(),
        source: source.to_string(),
    })
}

/// Reads a public key file: 64 hex digits (whitespace around is fine).
pub fn load_public_key(path: &Path) -> Result<Vec<u8>> {
    edge_common::signed::read_public_key(path, "the image policy key").map_err(|detail| {
        Error::PolicyKey {
            path: path.to_path_buf(),
            detail,
        }
    })
}

/// The allowlist files and the key they are signed with. The files are read again at
/// each check, so a list the core delivers applies to the next pod that starts.
#[derive(Debug, Clone)]
pub struct Policy {
    pub public_key: Vec<u8>,
    /// The image's list first, then the core's; either may be missing.
    pub files: Vec<PathBuf>,
}

impl Policy {
    /// The list in force, and what is wrong with the files that were left out.
    pub fn current(&self) -> (Option<Allowlist>, Vec<Error>) {
        let mut best: Option<Allowlist> = None;
        let mut problems = Vec::new();
        for f in &self.files {
            let source = f.display().to_string();
            let list = match std::fs::read(f) {
                Ok(b) => verify(&b, &self.public_key, &source),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => Err(Error::io("failed to read", f)(e)),
            };
            match list {
                Ok(l) if best.as_ref().is_none_or(|b| l.version > b.version) => best = Some(l),
                Ok(_) => {}
                Err(e) => problems.push(e),
            }
        }
        (best, problems)
    }

    /// Which list is in force, as (version, file), without logging the files left out:
    /// cheap enough to ask on every pass over the running pods.
    pub fn in_force(&self) -> Option<(u64, String)> {
        self.current().0.map(|l| (l.version, l.source))
    }

    /// Whether an image with these digests (its repo digests and id) may run; the
    /// error says why not, naming the image and the list.
    pub fn check(&self, image: &str, digests: &[String]) -> Result<()> {
        let (list, problems) = self.current();
        for p in &problems {
            tracing::error!("image allowlist left out: {p}");
        }
        let refused = |allowlist| Error::ImageRefused {
            image: image.to_string(),
            digest: digests
                .first()
                .map_or("no digest", String::as_str)
                .to_string(),
            allowlist,
        };
        let Some(list) = list else {
            return Err(refused(None));
        };
        if digests.iter().any(|d| list.digests.contains(d)) {
            return Ok(());
        }
        Err(refused(Some((list.source, list.version))))
    }
}

/// The digests an image is known by: the `sha256:...` after the `@` of each repo digest,
/// then its id.
pub fn image_digests(repo_digests: &[String], id: &str) -> Vec<String> {
    let mut out: Vec<String> = repo_digests
        .iter()
        .filter_map(|r| r.rsplit_once('@').map(|(_, d)| d.to_string()))
        .collect();
    if !id.is_empty() {
        out.push(id.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn key() -> ring::signature::Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn signed(kp: &ring::signature::Ed25519KeyPair, body: &str) -> Vec<u8> {
        let mut out = kp.sign(body.as_bytes()).as_ref().to_vec();
        out.extend_from_slice(body.as_bytes());
        out
    }

    #[test]
    fn the_newest_valid_list_is_in_force_and_bad_ones_are_named() {
        let kp = key();
        let dir = tempfile::tempdir().unwrap();
        let (image, core) = (dir.path().join("image.list"), dir.path().join("core.list"));
        let policy = Policy {
            public_key: kp.public_key().as_ref().to_vec(),
            files: vec![image.clone(), core.clone()],
        };
        let e = policy
            .check("edge.local/a:1", &[D1.into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "image edge.local/a:1 ({D1}) is not allowed: there is no valid image allowlist"
            )
        );

        std::fs::write(
            &image,
            signed(&kp, &format!(r#"{{"version":1,"digests":["{D1}"]}}"#)),
        )
        .unwrap();
        assert_eq!(
            policy
                .check("a", &[D2.into(), D1.into()])
                .map_err(|e| e.to_string()),
            Ok(())
        );
        let e = policy
            .check("edge.local/b:1", &[D2.into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "image edge.local/b:1 ({D2}) is not allowed by the image allowlist ({} version 1)",
                image.display()
            )
        );

        // The core's newer list replaces it: D2 added, D1 revoked.
        std::fs::write(
            &core,
            signed(&kp, &format!(r#"{{"version":2,"digests":["{D2}"]}}"#)),
        )
        .unwrap();
        assert_eq!(
            policy.check("b", &[D2.into()]).map_err(|e| e.to_string()),
            Ok(())
        );
        assert!(policy.check("a", &[D1.into()]).is_err());

        // A tampered delivery is left out, named; the image's list applies again.
        let mut bad = signed(&kp, &format!(r#"{{"version":3,"digests":["{D2}"]}}"#));
        let last = bad.len() - 3;
        bad[last] ^= 1;
        std::fs::write(&core, bad).unwrap();
        let (list, problems) = policy.current();
        assert_eq!(list.unwrap().version, 1);
        assert_eq!(
            problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [format!(
                "{}: signature does not verify with the image's public key",
                core.display()
            )]
        );
        // Signed by someone else.
        std::fs::write(
            &core,
            signed(&key(), &format!(r#"{{"version":3,"digests":["{D2}"]}}"#)),
        )
        .unwrap();
        assert_eq!(policy.current().0.unwrap().version, 1);
    }

    #[test]
    fn malformed_lists_are_refused() {
        let kp = key();
        let pk = kp.public_key().as_ref().to_vec();
        assert!(verify(b"short", &pk, "l")
            .unwrap_err()
            .to_string()
            .contains("shorter than its signature"));
        let e = verify(
            &signed(&kp, r#"{"version":1,"digests":["sha256:ABC"]}"#),
            &pk,
            "l",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "l: digest \"sha256:ABC\" is not sha256:<64 lowercase hex digits>"
        );
        let e = verify(
            &signed(&kp, r#"{"version":1,"digests":[],"extra":1}"#),
            &pk,
            "l",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("l: signed allowlist is not valid: unknown field `extra`"),
            "{e}"
        );
    }

    #[test]
    fn images_are_known_by_manifest_digest_and_id() {
        assert_eq!(
            image_digests(&["edge.local/a@sha256:ab".into()], "sha256:cd"),
            ["sha256:ab", "sha256:cd"]
        );
        assert!(image_digests(&[], "").is_empty());
    }

    #[test]
    fn keys_are_64_hex_digits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(load_public_key(&p).unwrap(), vec![0xab; 32]);
        std::fs::write(&p, "abc").unwrap();
        assert!(load_public_key(&p)
            .unwrap_err()
            .to_string()
            .contains("must hold 64 hex digits"));
    }
}
