//! The downlink: what the core sends to this edge (config, pod manifests, models,
//! container images, update bundles), verified before anything is written.
//!
//! The core puts a signed manifest into the KV bucket under `<site>.manifest` (or
//! `<site>.<machine>.manifest` for one box): the value is a 64-byte ed25519 signature
//! followed by the manifest JSON it signs. The manifest lists items, each with its kind,
//! name, where it is (`kv` key or `object` name) and its sha256. Small items live in the
//! KV bucket, large ones in the object store. An item whose hash does not match, or a
//! manifest whose signature does not verify with the image's public key, is refused,
//! reported on `<prefix>.<site>.<machine>._downlink` and never written. A verified item
//! is written to `<dir>/<kind>/<name>` atomically (temp file, fsync, rename).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, CoreConfig, DownlinkConfig};

/// Kinds of items and so the directories under `dir`; other daemons watch these.
pub const KINDS: [&str; 5] = ["config", "pods", "models", "images", "updates"];

#[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Grows with every manifest; an older one is refused (no rollback by replay).
    pub version: u64,
    pub items: Vec<Item>,
}

#[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub kind: String,
    pub name: String,
    /// `kv` (key in the bucket) or `object` (name in the object store).
    pub store: String,
    pub key: String,
    /// Lowercase hex.
    pub sha256: String,
}

/// Splits and verifies a signed manifest.
pub fn verify_manifest(signed: &[u8], public_key: &[u8]) -> Result<Manifest, String> {
    if signed.len() < 64 {
        return Err("manifest is shorter than its signature".into());
    }
    let (sig, body) = signed.split_at(64);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(body, sig)
        .map_err(|_| {
            "manifest signature does not verify with the image's public key".to_string()
        })?;
    let m: Manifest =
        serde_json::from_slice(body).map_err(|e| format!("signed manifest is not valid: {e}"))?;
    for item in &m.items {
        check_item(item)?;
    }
    Ok(m)
}

fn check_item(item: &Item) -> Result<(), String> {
    if !KINDS.contains(&item.kind.as_str()) {
        return Err(format!(
            "item `{}`: unknown kind `{}`",
            item.name, item.kind
        ));
    }
    let safe = !item.name.is_empty()
        && !item.name.starts_with('.')
        && item
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !safe {
        return Err(format!(
            "item name `{}` is not a plain file name",
            item.name.escape_debug()
        ));
    }
    if item.store != "kv" && item.store != "object" {
        return Err(format!("item `{}`: store must be kv or object", item.name));
    }
    if item.sha256.len() != 64 || !item.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "item `{}`: sha256 must be 64 hex digits",
            item.name
        ));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the public key file: 64 hex digits (whitespace around is fine).
pub fn load_public_key(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("failed to read downlink.public_key {}: {e}", path.display()))?;
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "downlink.public_key {} must hold 64 hex digits (an ed25519 public key)",
            path.display()
        ));
    }
    Ok((0..32)
        .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect())
}

fn sha256_file(path: &Path) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    Some(hex(
        ring::digest::digest(&ring::digest::SHA256, &data).as_ref()
    ))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Streams one item into a temp file beside its destination while hashing it; renames
/// it into place only when the hash matches.
async fn fetch_item(
    item: &Item,
    kv: &async_nats::jetstream::kv::Store,
    objects: &async_nats::jetstream::object_store::ObjectStore,
    dir: &Path,
) -> Result<bool, String> {
    let kind_dir = dir.join(&item.kind);
    tokio::fs::create_dir_all(&kind_dir)
        .await
        .map_err(|e| format!("failed to create {}: {e}", kind_dir.display()))?;
    let dest = kind_dir.join(&item.name);
    if sha256_file(&dest).as_deref() == Some(item.sha256.to_ascii_lowercase().as_str()) {
        return Ok(false);
    }
    let tmp = kind_dir.join(format!(".{}.partial", item.name));
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| format!("failed to create {}: {e}", tmp.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let result: Result<(), String> = async {
        if item.store == "kv" {
            let value = kv
                .get(&item.key)
                .await
                .map_err(|e| format!("failed to get KV key {}: {e}", item.key))?
                .ok_or_else(|| format!("KV key {} does not exist", item.key))?;
            ctx.update(&value);
            file.write_all(&value).await.map_err(|e| e.to_string())?;
        } else {
            let mut obj = objects
                .get(&item.key)
                .await
                .map_err(|e| format!("failed to get object {}: {e}", item.key))?;
            let mut buf = vec![0u8; 128 * 1024];
            loop {
                let n = obj
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("failed to read object {}: {e}", item.key))?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
                file.write_all(&buf[..n])
                    .await
                    .map_err(|e| format!("failed to write {}: {e}", tmp.display()))?;
            }
        }
        Ok(())
    }
    .await;
    let digest = hex(ctx.finish().as_ref());
    let verdict = result.and_then(|()| {
        if digest.eq_ignore_ascii_case(&item.sha256) {
            Ok(())
        } else {
            Err(format!(
                "item `{}` ({} {}): sha256 is {digest}, the manifest says {}",
                item.name, item.store, item.key, item.sha256
            ))
        }
    });
    if let Err(e) = verdict {
        drop(file);
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    file.sync_all()
        .await
        .map_err(|e| format!("failed to sync {}: {e}", tmp.display()))?;
    drop(file);
    tokio::fs::rename(&tmp, &dest)
        .await
        .map_err(|e| format!("failed to rename {} into place: {e}", tmp.display()))?;
    sync_dir(&kind_dir).map_err(|e| format!("failed to sync {}: {e}", kind_dir.display()))?;
    Ok(true)
}

#[derive(serde::Serialize)]
struct Report<'a> {
    site: &'a str,
    machine: &'a str,
    version: Option<u64>,
    applied: Vec<String>,
    refused: Vec<(String, String)>,
}

/// Runs forever: watch the manifests for this site and machine and apply them.
pub async fn run(config: Arc<Config>) {
    let (Some(core), Some(down)) = (config.core.clone(), config.downlink.clone()) else {
        return;
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        if let Err(e) = session(&config, &core, &down).await {
            tracing::warn!("downlink: {e}; retrying in {backoff:?}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(core.backoff_max_ms.max(200)));
    }
}

fn version_file(dir: &Path) -> PathBuf {
    dir.join(".manifest-version")
}

async fn session(config: &Config, core: &CoreConfig, down: &DownlinkConfig) -> Result<(), String> {
    let public_key = load_public_key(&down.public_key)?;
    let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel();
    let client = crate::uplink::connect(core, lost_tx).await?;
    let js = async_nats::jetstream::new(client.clone());
    let kv = js
        .get_key_value(&down.bucket)
        .await
        .map_err(|e| format!("no KV bucket `{}` at the core: {e}", down.bucket))?;
    let objects = js
        .get_object_store(&down.objects)
        .await
        .map_err(|e| format!("no object store `{}` at the core: {e}", down.objects))?;
    let site_key = format!("{}.manifest", config.site);
    let machine_key = format!("{}.{}.manifest", config.site, config.machine);
    let mut watch = kv
        .watch_with_history(format!("{}.>", config.site))
        .await
        .map_err(|e| format!("failed to watch KV bucket `{}`: {e}", down.bucket))?;
    let report_subject = format!("{}{}", config.subject_prefix(core), "_downlink");
    tracing::info!(bucket = %down.bucket, objects = %down.objects, "downlink watching manifests");
    loop {
        let entry = tokio::select! {
            e = watch.next() => e,
            lost = lost_rx.recv() => return Err(lost.unwrap_or_default()),
        };
        let entry = match entry {
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(format!("KV watch failed: {e}")),
            None => return Err("KV watch ended".into()),
        };
        if entry.key != site_key && entry.key != machine_key {
            continue;
        }
        if entry.operation != async_nats::jetstream::kv::Operation::Put {
            continue;
        }
        let mut report = Report {
            site: &config.site,
            machine: &config.machine,
            version: None,
            applied: vec![],
            refused: vec![],
        };
        apply(
            &entry.key,
            &entry.value,
            &public_key,
            &kv,
            &objects,
            &down.dir,
            &mut report,
        )
        .await;
        if !report.refused.is_empty() {
            for (what, why) in &report.refused {
                tracing::error!(manifest = %entry.key, item = %what, "downlink refused: {why}");
            }
        }
        let body = serde_json::to_vec(&report).unwrap_or_default();
        if let Err(e) = client.publish(report_subject.clone(), body.into()).await {
            tracing::warn!("failed to report downlink result to the core: {e}");
        }
    }
}

async fn apply(
    key: &str,
    signed: &[u8],
    public_key: &[u8],
    kv: &async_nats::jetstream::kv::Store,
    objects: &async_nats::jetstream::object_store::ObjectStore,
    dir: &Path,
    report: &mut Report<'_>,
) {
    let manifest = match verify_manifest(signed, public_key) {
        Ok(m) => m,
        Err(e) => {
            report.refused.push((key.to_owned(), e));
            return;
        }
    };
    report.version = Some(manifest.version);
    let applied: u64 = std::fs::read_to_string(version_file(dir))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if manifest.version < applied {
        report.refused.push((
            key.to_owned(),
            format!(
                "manifest version {} is older than the applied {applied}",
                manifest.version
            ),
        ));
        return;
    }
    for item in &manifest.items {
        match fetch_item(item, kv, objects, dir).await {
            Ok(true) => {
                tracing::info!(kind = %item.kind, name = %item.name, "downlink item verified and written");
                report.applied.push(format!("{}/{}", item.kind, item.name));
            }
            Ok(false) => {}
            Err(e) => report
                .refused
                .push((format!("{}/{}", item.kind, item.name), e)),
        }
    }
    if report.refused.is_empty() {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(version_file(dir), format!("{}\n", manifest.version));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn keypair() -> ring::signature::Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn signed(kp: &ring::signature::Ed25519KeyPair, body: &[u8]) -> Vec<u8> {
        let mut v = kp.sign(body).as_ref().to_vec();
        v.extend_from_slice(body);
        v
    }

    const BODY: &str = r#"{"version":3,"items":[{"kind":"models","name":"m.onnx","store":"object","key":"m1","sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#;

    #[test]
    fn a_signed_manifest_verifies() {
        let kp = keypair();
        let m = verify_manifest(&signed(&kp, BODY.as_bytes()), kp.public_key().as_ref()).unwrap();
        assert_eq!(m.version, 3);
        assert_eq!(m.items[0].name, "m.onnx");
    }

    #[test]
    fn a_tampered_or_foreign_manifest_is_refused() {
        let kp = keypair();
        let mut s = signed(&kp, BODY.as_bytes());
        let last = s.len() - 3;
        s[last] ^= 1;
        let e = verify_manifest(&s, kp.public_key().as_ref()).unwrap_err();
        assert!(e.contains("signature"), "{e}");
        let other = keypair();
        let s = signed(&other, BODY.as_bytes());
        assert!(verify_manifest(&s, kp.public_key().as_ref()).is_err());
        assert!(verify_manifest(b"short", kp.public_key().as_ref()).is_err());
    }

    #[test]
    fn item_names_cannot_escape_their_directory() {
        let kp = keypair();
        for bad in ["../x", ".hidden", "a/b", ""] {
            let body = BODY.replace("m.onnx", bad);
            let e = verify_manifest(&signed(&kp, body.as_bytes()), kp.public_key().as_ref())
                .unwrap_err();
            assert!(e.contains("file name"), "{bad}: {e}");
        }
        let body = BODY.replace("models", "kernels");
        assert!(verify_manifest(&signed(&kp, body.as_bytes()), kp.public_key().as_ref()).is_err());
    }
}
