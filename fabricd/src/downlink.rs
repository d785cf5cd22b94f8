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
//!
//! Objects come chunk by chunk; every few chunks the partial file is synced and its
//! progress (object nuid, bytes, next chunk's stream sequence) saved beside it, so a
//! download cut by a lost link, a restart or a crash resumes where it stopped instead of
//! starting again over a thin link.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

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

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub kind: String,
    pub name: String,
    /// `kv` (key in the bucket) or `object` (name in the object store).
    pub store: String,
    pub key: String,
    /// Lowercase hex.
    pub sha256: String,
    /// An update's window (`HH:MM-HH:MM`, UTC): the box reboots into it only then.
    /// fabricd writes it beside the bundle as `<name>.window` for init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// An update's version: a box already running it fetches nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A delta's base, the version it is made from: only a box running that version
    /// fetches it, and such a box then fetches no whole bundle of the same manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// When the operator published an update (unix ms): the box's copy gets it as its
    /// modification time, so that init takes a copy published anew for a new one (a
    /// version it rolled back from is tried again only then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_ms: Option<u64>,
}

/// Whether `need` more bytes of `name` fit on a file system with `free` of `total` bytes
/// free, leaving a twentieth of it free for the log and the rest of the box: a download
/// that would fill the data partition does not start (it is retried with the next
/// manifest or session, from what it has).
fn room_for(name: &str, need: u64, free: u64, total: u64) -> Result<(), String> {
    let keep = total / 20;
    if need == 0 || free >= need.saturating_add(keep) {
        return Ok(());
    }
    Err(format!(
        "the data partition has {free} bytes free: `{name}` needs {need} more, and {keep} stay free for the log"
    ))
}

/// Gives an update's file the time it was published as its modification time.
fn stamp_published(path: &Path, ms: u64) -> Result<(), String> {
    let when = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .map_err(|e| format!("failed to open {}: {e}", path.display()))?;
    if file.metadata().and_then(|m| m.modified()).ok() == Some(when) {
        return Ok(());
    }
    file.set_modified(when)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("failed to set the time of {}: {e}", path.display()))
}

/// The items a box running `running` fetches: all but the updates that are not for it
/// (its own version; a delta from another; a whole bundle when a delta from its version
/// is offered). A box that does not know what it runs fetches them all and leaves the
/// choice to init.
pub fn for_this_box<'m>(items: &'m [Item], running: Option<&str>) -> Vec<&'m Item> {
    let Some(running) = running else {
        return items.iter().collect();
    };
    let delta_for_us = items
        .iter()
        .any(|i| i.kind == "updates" && i.base.as_deref() == Some(running));
    items
        .iter()
        .filter(|i| {
            i.kind != "updates"
                || (i.version.as_deref() != Some(running)
                    && match i.base.as_deref() {
                        Some(base) => base == running,
                        None => !delta_for_us,
                    })
        })
        .collect()
}

/// Splits and verifies a signed manifest.
pub fn verify_manifest(signed: &[u8], public_key: &[u8]) -> Result<Manifest, String> {
    let body =
        edge_common::signed::open(signed, public_key).map_err(|e| format!("manifest: {e}"))?;
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
    if item.kind != "updates"
        && (item.version.is_some() || item.base.is_some() || item.published_ms.is_some())
    {
        return Err(format!(
            "item `{}`: only an update has a version, a base and a publishing time",
            item.name
        ));
    }
    if let Some(w) = &item.window {
        if item.kind != "updates" {
            return Err(format!("item `{}`: only an update has a window", item.name));
        }
        edge_update::window::Window::parse(w).map_err(|e| format!("item `{}`: {e}", item.name))?;
    }
    if item.sha256.len() != 64 || !item.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "item `{}`: sha256 must be 64 hex digits",
            item.name
        ));
    }
    Ok(())
}

/// Reads the public key file: 64 hex digits (whitespace around is fine).
pub fn load_public_key(path: &Path) -> Result<Vec<u8>, String> {
    edge_common::signed::read_public_key(path, "downlink.public_key")
}

/// The sha256 of a file already in place, read in chunks (an update bundle can be
/// larger than the memory to spare); None when it cannot be read.
async fn sha256_file(path: &Path) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf).await.ok()? {
            0 => return Some(edge_common::hex::encode(ctx.finish().as_ref())),
            n => ctx.update(&buf[..n]),
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Downlink counters for `/metrics`.
#[derive(Default)]
pub struct Status {
    pub applied: AtomicU64,
    pub refused: AtomicU64,
    /// Object and KV bytes fetched from the core.
    pub fetched_bytes: AtomicU64,
    /// Bytes not fetched again because an interrupted download resumed after them.
    pub resumed_bytes: AtomicU64,
    /// The object download under way, for the status report.
    pub downloading: std::sync::Mutex<Option<Download>>,
}

impl Status {
    fn set_downloading(&self, d: Option<Download>) {
        *self.downloading.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    /// What the box reports of its downlink (`BoxStatus::downlink`).
    pub fn report(&self) -> DownlinkReport {
        DownlinkReport {
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            resumed_bytes: self.resumed_bytes.load(Ordering::Relaxed),
            downloading: self
                .downloading
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// An object download under way: `bytes` of `size` are on disk.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Download {
    pub kind: String,
    pub name: String,
    pub bytes: u64,
    pub size: u64,
}

/// The downlink in the box's status report: bytes fetched from the core since fabricd
/// started, bytes a resumed download did not fetch again, and the download under way.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DownlinkReport {
    pub fetched_bytes: u64,
    pub resumed_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloading: Option<Download>,
}

/// Where objects come from: the store (for their info) and its stream (for the chunks,
/// from any sequence).
struct Objects {
    store: async_nats::jetstream::object_store::ObjectStore,
    stream: async_nats::jetstream::stream::Stream,
    client: async_nats::Client,
    bucket: String,
    max_bytes_per_sec: Option<u64>,
}

/// Progress of an interrupted object download, saved beside its partial file.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct Progress {
    nuid: String,
    bytes: u64,
    next_seq: u64,
}

async fn save_progress(path: &Path, p: &Progress) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, serde_json::to_vec(p).unwrap_or_default()).await?;
    tokio::fs::File::open(&tmp).await?.sync_data().await?;
    tokio::fs::rename(&tmp, path).await
}

/// Why a fetch failed: a transfer that can be resumed later, or bytes that must go.
enum Failure {
    Interrupted(String),
    Refused(String),
}

/// Streams one item into a temp file beside its destination while hashing it; renames
/// it into place only when the hash matches. An interrupted object download keeps its
/// partial file and progress for the next attempt; a refused item leaves nothing.
async fn fetch_item(
    item: &Item,
    kv: &async_nats::jetstream::kv::Store,
    objects: &Objects,
    dir: &Path,
    status: &Status,
) -> Result<bool, String> {
    let kind_dir = dir.join(&item.kind);
    tokio::fs::create_dir_all(&kind_dir)
        .await
        .map_err(|e| format!("failed to create {}: {e}", kind_dir.display()))?;
    let dest = kind_dir.join(&item.name);
    if sha256_file(&dest).await.as_deref() == Some(item.sha256.to_ascii_lowercase().as_str()) {
        return Ok(false);
    }
    let tmp = kind_dir.join(format!(".{}.partial", item.name));
    let progress = kind_dir.join(format!(".{}.progress", item.name));
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let fetched = if item.store == "kv" {
        fetch_kv(item, kv, &tmp, &mut ctx, status).await
    } else {
        // No download shown once this one ends, or is dropped (a newer manifest came).
        struct Shown<'a>(&'a Status);
        impl Drop for Shown<'_> {
            fn drop(&mut self) {
                self.0.set_downloading(None);
            }
        }
        let _shown = Shown(status);
        fetch_object(item, objects, &tmp, &progress, &mut ctx, status).await
    };
    let digest = edge_common::hex::encode(ctx.finish().as_ref());
    let verdict = fetched.and_then(|()| {
        if digest.eq_ignore_ascii_case(&item.sha256) {
            Ok(())
        } else {
            Err(Failure::Refused(format!(
                "item `{}` ({} {}): sha256 is {digest}, the manifest says {}",
                item.name, item.store, item.key, item.sha256
            )))
        }
    });
    match verdict {
        Ok(()) => {}
        Err(Failure::Interrupted(e)) => return Err(e),
        Err(Failure::Refused(e)) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            let _ = tokio::fs::remove_file(&progress).await;
            return Err(e);
        }
    }
    // The daemon's runtime is single-threaded: file I/O goes through tokio::fs so a
    // sync does not stall the producers.
    let synced = match tokio::fs::OpenOptions::new().write(true).open(&tmp).await {
        Ok(f) => f.sync_all().await,
        Err(e) => Err(e),
    };
    synced.map_err(|e| format!("failed to sync {}: {e}", tmp.display()))?;
    // Stamped before it is in place: init never sees the copy with another time.
    if let Some(ms) = item.published_ms {
        stamp_published(&tmp, ms)?;
    }
    tokio::fs::rename(&tmp, &dest)
        .await
        .map_err(|e| format!("failed to rename {} into place: {e}", tmp.display()))?;
    let _ = tokio::fs::remove_file(&progress).await;
    sync_dir(&kind_dir).map_err(|e| format!("failed to sync {}: {e}", kind_dir.display()))?;
    Ok(true)
}

async fn fetch_kv(
    item: &Item,
    kv: &async_nats::jetstream::kv::Store,
    tmp: &Path,
    ctx: &mut ring::digest::Context,
    status: &Status,
) -> Result<(), Failure> {
    let value = kv
        .get(&item.key)
        .await
        .map_err(|e| Failure::Interrupted(format!("failed to get KV key {}: {e}", item.key)))?
        .ok_or_else(|| Failure::Refused(format!("KV key {} does not exist", item.key)))?;
    status
        .fetched_bytes
        .fetch_add(value.len() as u64, Ordering::Relaxed);
    ctx.update(&value);
    tokio::fs::write(tmp, &value)
        .await
        .map_err(|e| Failure::Interrupted(format!("failed to write {}: {e}", tmp.display())))
}

/// Reads the object's chunks from its stream, from the start or from where an earlier
/// attempt stopped.
async fn fetch_object(
    item: &Item,
    objects: &Objects,
    tmp: &Path,
    progress_file: &Path,
    ctx: &mut ring::digest::Context,
    status: &Status,
) -> Result<(), Failure> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy};
    let interrupted = |what: &str, e: &dyn std::fmt::Display| {
        Failure::Interrupted(format!("{what} object {}: {e}", item.key))
    };
    let info = objects
        .store
        .info(&item.key)
        .await
        .map_err(|e| interrupted("failed to get", &e))?;
    let size = info.size as u64;
    let saved: Option<Progress> = std::fs::read(progress_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(tmp)
        .await
        .map_err(|e| interrupted(&format!("failed to open {} for", tmp.display()), &e))?;
    let have = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    // Resume only the same object (the nuid changes when it is put again), and only up
    // to what was synced before the progress was saved.
    let (mut bytes, deliver) = match saved {
        Some(p) if p.nuid == info.nuid && p.bytes <= have && p.bytes <= size && p.bytes > 0 => {
            tracing::info!(object = %item.key, at = p.bytes, of = size, "resuming the download");
            status.resumed_bytes.fetch_add(p.bytes, Ordering::Relaxed);
            (
                p.bytes,
                DeliverPolicy::ByStartSequence {
                    start_sequence: p.next_seq,
                },
            )
        }
        _ => (0, DeliverPolicy::All),
    };
    let write_err =
        |e: std::io::Error| Failure::Interrupted(format!("failed to write {}: {e}", tmp.display()));
    file.set_len(bytes).await.map_err(write_err)?;
    if let Some(dir) = tmp.parent() {
        if let Ok(st) = rustix::fs::statvfs(dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let total = st.f_blocks.saturating_mul(st.f_frsize);
            room_for(&item.name, size.saturating_sub(bytes), free, total)
                .map_err(Failure::Interrupted)?;
        }
    }
    {
        // The bytes kept are hashed again from the disk: cheaper than fetching them.
        use tokio::io::AsyncReadExt;
        let mut kept = (&mut file).take(bytes);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = kept.read(&mut buf).await.map_err(write_err)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
    }
    if bytes == size {
        return Ok(());
    }
    let mut shown = Download {
        kind: item.kind.clone(),
        name: item.name.clone(),
        bytes,
        size,
    };
    status.set_downloading(Some(shown.clone()));
    let mut chunks = objects
        .stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: objects.client.new_inbox(),
            filter_subject: format!("$O.{}.C.{}", objects.bucket, info.nuid),
            deliver_policy: deliver,
            ..Default::default()
        })
        .await
        .map_err(|e| interrupted("failed to read", &e))?
        .messages()
        .await
        .map_err(|e| interrupted("failed to read", &e))?;
    let started = Instant::now();
    let mut this_session = 0u64;
    let mut last_save = Instant::now();
    let mut saved_at = bytes;
    while bytes < size {
        let chunk = tokio::time::timeout(Duration::from_secs(30), chunks.next())
            .await
            .map_err(|_| interrupted("no chunk for 30 s from", &"timed out"))?
            .ok_or_else(|| interrupted("the chunks ended early for", &"end of stream"))?
            .map_err(|e| interrupted("failed to read", &e))?;
        let seq = chunk
            .info()
            .map_err(|e| interrupted("bad chunk of", &e))?
            .stream_sequence;
        if bytes + chunk.payload.len() as u64 > size {
            return Err(Failure::Refused(format!(
                "object {} has more bytes than its info says ({size})",
                item.key
            )));
        }
        {
            use tokio::io::AsyncWriteExt;
            file.write_all(&chunk.payload).await.map_err(write_err)?;
        }
        ctx.update(&chunk.payload);
        bytes += chunk.payload.len() as u64;
        this_session += chunk.payload.len() as u64;
        status
            .fetched_bytes
            .fetch_add(chunk.payload.len() as u64, Ordering::Relaxed);
        // Saved every half second or MiB: what a cut loses is fetched again.
        if last_save.elapsed() > Duration::from_millis(500)
            || bytes - saved_at >= 1 << 20
            || bytes == size
        {
            {
                use tokio::io::AsyncWriteExt;
                file.flush().await.map_err(write_err)?;
            }
            file.sync_data().await.map_err(write_err)?;
            let p = Progress {
                nuid: info.nuid.clone(),
                bytes,
                next_seq: seq + 1,
            };
            save_progress(progress_file, &p).await.map_err(|e| {
                Failure::Interrupted(format!("failed to write {}: {e}", progress_file.display()))
            })?;
            last_save = Instant::now();
            saved_at = bytes;
            shown.bytes = bytes;
            status.set_downloading(Some(shown.clone()));
        }
        if let Some(rate) = objects.max_bytes_per_sec {
            let due = Duration::from_secs_f64(this_session as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(())
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
pub async fn run(config: Arc<Config>, status: Arc<Status>) {
    let (Some(core), Some(down)) = (config.core.clone(), config.downlink.clone()) else {
        return;
    };
    let mut backoff = edge_common::Backoff::new(
        Duration::from_millis(200),
        Duration::from_millis(core.backoff_max_ms.max(200)),
    );
    loop {
        let delay = backoff.next_delay();
        if let Err(e) = session(&config, &core, &down, &status).await {
            tracing::warn!("downlink: {e}; retrying in {delay:?}");
        }
        tokio::time::sleep(delay).await;
    }
}

fn version_file(dir: &Path) -> PathBuf {
    dir.join(".manifest-version")
}

async fn session(
    config: &Config,
    core: &CoreConfig,
    down: &DownlinkConfig,
    status: &Status,
) -> Result<(), String> {
    let public_key = load_public_key(&down.public_key)?;
    let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel();
    let client = crate::uplink::connect(core, &config.site, lost_tx).await?;
    let js = async_nats::jetstream::new(client.clone());
    let kv = js
        .get_key_value(&down.bucket)
        .await
        .map_err(|e| format!("no KV bucket `{}` at the core: {e}", down.bucket))?;
    let objects = Objects {
        store: js
            .get_object_store(&down.objects)
            .await
            .map_err(|e| format!("no object store `{}` at the core: {e}", down.objects))?,
        stream: js
            .get_stream(format!("OBJ_{}", down.objects))
            .await
            .map_err(|e| format!("no object store `{}` at the core: {e}", down.objects))?,
        client: client.clone(),
        bucket: down.objects.clone(),
        max_bytes_per_sec: down.max_kib_per_sec.map(|k| k.max(1) * 1024),
    };
    let site_key = format!("{}.manifest", config.site);
    let machine_key = format!("{}.{}.manifest", config.site, config.machine);
    let mut watch = watch_site(&kv, &client, &config.site, &config.machine)
        .await
        .map_err(|e| format!("failed to watch KV bucket `{}`: {e}", down.bucket))?;
    let report_subject = format!("{}{}", config.subject_prefix(core), "_downlink");
    tracing::info!(bucket = %down.bucket, objects = %down.objects, "downlink watching manifests");
    // The latest manifest of each key not yet applied. A manifest that changes while
    // the last one is applied (an update cancelled or replaced mid-download) stops that
    // apply at once: the partial download stays for a resume, or goes when no manifest
    // offers it any more.
    let mut pending: std::collections::BTreeMap<String, bytes::Bytes> = Default::default();
    // The version this boot runs (init's boot record), for which updates are its own.
    let running = crate::uplink::read_os(&config.boot_file).map(|os| os.version);
    loop {
        let Some((key, payload)) = pending.pop_first() else {
            let entry = tokio::select! {
                e = watch.next() => e,
                lost = lost_rx.recv() => return Err(lost.unwrap_or_default()),
            };
            if let Some((k, v)) = manifest_entry(entry, &kv.prefix, &site_key, &machine_key)? {
                pending.insert(k, v);
            }
            continue;
        };
        let applying = apply(
            &key,
            &payload,
            &public_key,
            &kv,
            &objects,
            &down.dir,
            running.as_deref(),
            Report {
                site: &config.site,
                machine: &config.machine,
                version: None,
                applied: vec![],
                refused: vec![],
            },
            status,
        );
        tokio::pin!(applying);
        let report = loop {
            tokio::select! {
                report = &mut applying => break Some(report),
                e = watch.next() => {
                    if let Some((k, v)) = manifest_entry(e, &kv.prefix, &site_key, &machine_key)? {
                        let newer = k == key;
                        pending.insert(k, v);
                        if newer {
                            tracing::info!(manifest = %key, "a newer manifest came: applying it instead");
                            break None;
                        }
                    }
                }
                lost = lost_rx.recv() => return Err(lost.unwrap_or_default()),
            }
        };
        let Some(report) = report else {
            continue;
        };
        for (what, why) in &report.refused {
            tracing::error!(manifest = %key, item = %what, "downlink refused: {why}");
        }
        let body = serde_json::to_vec(&report).unwrap_or_default();
        if let Err(e) = client.publish(report_subject.clone(), body.into()).await {
            tracing::warn!("failed to report downlink result to the core: {e}");
        }
    }
}

/// A watched entry that is a manifest of this box (its site's or its own) to apply:
/// its key and value. Other keys, and delete or purge markers, are not.
fn manifest_entry(
    entry: Option<
        Result<async_nats::jetstream::Message, async_nats::jetstream::consumer::push::OrderedError>,
    >,
    prefix: &str,
    site_key: &str,
    machine_key: &str,
) -> Result<Option<(String, bytes::Bytes)>, String> {
    let entry = match entry {
        Some(Ok(e)) => e,
        Some(Err(e)) => return Err(format!("KV watch failed: {e}")),
        None => return Err("KV watch ended".into()),
    };
    let key = entry.subject.strip_prefix(prefix).unwrap_or("");
    if key != site_key && key != machine_key {
        return Ok(None);
    }
    if entry
        .headers
        .as_ref()
        .is_some_and(|h| h.get("KV-Operation").is_some())
    {
        return Ok(None);
    }
    Ok(Some((key.to_owned(), entry.payload.clone())))
}

/// This site's keys of the config bucket: each key's latest value, then every change.
/// Not `Store::watch_with_history`: its consumer is created on
/// `$JS.API.CONSUMER.CREATE.<stream>`, with the filter only in the request, which the
/// core's permissions cannot confine to a site. A named consumer is created on
/// `...CREATE.<stream>.<name>.<filter>`, and nats-server refuses a request whose filter
/// is not the subject's, so the core can allow a site its own keys only (docs/fabric.md,
/// "Authorization at the core"). The name is new each session: a consumer the core still
/// holds from a lost session (it expires after 30 s) is not in the way.
async fn watch_site(
    kv: &async_nats::jetstream::kv::Store,
    client: &async_nats::Client,
    site: &str,
    machine: &str,
) -> Result<async_nats::jetstream::consumer::push::Ordered, String> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
    let mut id = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| "no randomness for the watch's name".to_string())?;
    kv.stream
        .create_consumer(push::OrderedConfig {
            name: Some(format!(
                "downlink-{site}-{machine}-{}",
                edge_common::hex::encode(&id)
            )),
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{}{site}.>", kv.prefix),
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .messages()
        .await
        .map_err(|e| e.to_string())
}

#[allow(clippy::too_many_arguments)]
async fn apply<'a>(
    key: &str,
    signed: &[u8],
    public_key: &[u8],
    kv: &async_nats::jetstream::kv::Store,
    objects: &Objects,
    dir: &Path,
    running: Option<&str>,
    mut report: Report<'a>,
    status: &Status,
) -> Report<'a> {
    let manifest = match verify_manifest(signed, public_key) {
        Ok(m) => m,
        Err(e) => {
            report.refused.push((key.to_owned(), e));
            return report;
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
        return report;
    }
    // Withdrawn first: a replaced bundle must not be installed while its successor
    // downloads.
    for name in withdraw_updates(&dir.join("updates"), key, &manifest) {
        tracing::info!(name = %name, "update withdrawn by the core: removed");
        report.applied.push(format!("updates/{name} withdrawn"));
    }
    let wanted = for_this_box(&manifest.items, running);
    for item in wanted.iter().filter(|i| i.kind == "updates") {
        // A copy already here is stamped before its window changes: init, seeing a
        // window lifted, takes the copy as it then is for the trial's.
        let have = dir.join("updates").join(&item.name);
        if let (Some(ms), true) = (item.published_ms, have.exists()) {
            if let Err(e) = stamp_published(&have, ms) {
                report.refused.push((format!("updates/{}", item.name), e));
            }
        }
        if let Err(e) = write_window(&dir.join("updates"), item) {
            report.refused.push((format!("updates/{}", item.name), e));
        }
    }
    for item in wanted {
        match fetch_item(item, kv, objects, dir, status).await {
            Ok(true) => {
                status.applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(kind = %item.kind, name = %item.name, "downlink item verified and written");
                report.applied.push(format!("{}/{}", item.kind, item.name));
            }
            Ok(false) => {}
            Err(e) => {
                status.refused.fetch_add(1, Ordering::Relaxed);
                report
                    .refused
                    .push((format!("{}/{}", item.kind, item.name), e))
            }
        }
    }
    if report.refused.is_empty() {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(version_file(dir), format!("{}\n", manifest.version));
    }
    report
}

/// An update's window beside it, `<name>.window`, for init; none: the file goes. Written
/// before the bundle is, so init never sees the bundle without its window.
fn write_window(updates: &Path, item: &Item) -> Result<(), String> {
    let path = updates.join(format!("{}.window", item.name));
    match &item.window {
        Some(w) => std::fs::create_dir_all(updates)
            .and_then(|()| edge_common::write_atomic(&path, format!("{w}\n").as_bytes(), 0o644))
            .map_err(|e| format!("failed to write {}: {e}", path.display())),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("failed to remove {}: {e}", path.display()))
            }
            _ => Ok(()),
        },
    }
}

/// An update stays on the box only while a manifest offers it. Each manifest's offer
/// (`key`: the site's or the machine's) is kept in `.offered.<key>`; a bundle this
/// manifest offered before and offers no more (withdrawn by `edgectl update cancel`,
/// replaced by another) is removed with its partial download, unless the other
/// manifest offers it. Returns the names removed.
fn withdraw_updates(updates: &Path, key: &str, manifest: &Manifest) -> Vec<String> {
    let offered = |file: &Path| -> Vec<String> {
        std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let own = updates.join(format!(".offered.{key}"));
    let now: Vec<String> = manifest
        .items
        .iter()
        .filter(|i| i.kind == "updates")
        .map(|i| i.name.clone())
        .collect();
    let mut elsewhere = Vec::new();
    if let Ok(entries) = std::fs::read_dir(updates) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".offered.") && e.path() != own {
                elsewhere.extend(offered(&e.path()));
            }
        }
    }
    let mut removed = Vec::new();
    for name in offered(&own) {
        if now.contains(&name) || elsewhere.contains(&name) {
            continue;
        }
        let mut gone = false;
        for f in [
            name.clone(),
            format!("{name}.window"),
            format!(".{name}.partial"),
            format!(".{name}.progress"),
        ] {
            gone |= std::fs::remove_file(updates.join(f)).is_ok();
        }
        if gone {
            removed.push(name);
        }
    }
    if !now.is_empty() || own.exists() {
        let _ = std::fs::create_dir_all(updates);
        let body = serde_json::to_vec(&now).unwrap_or_default();
        if let Err(e) = edge_common::write_atomic(&own, &body, 0o644) {
            tracing::warn!("failed to write {}: {e}", own.display());
        }
    }
    removed
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
    fn an_update_no_manifest_offers_any_more_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let updates = tmp.path().join("updates");
        let offer = |names: &[&str]| Manifest {
            version: 1,
            items: names
                .iter()
                .map(|n| Item {
                    kind: "updates".into(),
                    name: n.to_string(),
                    store: "object".into(),
                    key: n.to_string(),
                    sha256: "0".repeat(64),
                    window: None,
                    version: None,
                    base: None,
                    published_ms: None,
                })
                .collect(),
        };
        let put = |name: &str| std::fs::write(updates.join(name), b"x").unwrap();
        // Nothing offered yet: nothing to remove, no record written.
        assert!(withdraw_updates(&updates, "s.manifest", &offer(&[])).is_empty());
        assert!(!updates.exists());
        assert!(withdraw_updates(&updates, "s.manifest", &offer(&["a.bundle"])).is_empty());
        put("a.bundle");
        assert!(withdraw_updates(&updates, "s.m.manifest", &offer(&["b.delta"])).is_empty());
        put(".b.delta.partial");
        put(".b.delta.progress");
        // The site's manifest replaces a.bundle by b.delta, which the machine's also
        // offers: only a.bundle goes.
        assert_eq!(
            withdraw_updates(&updates, "s.manifest", &offer(&["b.delta"])),
            vec!["a.bundle".to_string()]
        );
        assert!(!updates.join("a.bundle").exists());
        // The site withdraws it; the machine's manifest still offers it: kept.
        assert!(withdraw_updates(&updates, "s.manifest", &offer(&[])).is_empty());
        assert!(updates.join(".b.delta.partial").exists());
        // The machine's withdraws it too: the partial download goes.
        assert_eq!(
            withdraw_updates(&updates, "s.m.manifest", &offer(&[])),
            vec!["b.delta".to_string()]
        );
        assert!(!updates.join(".b.delta.partial").exists());
        assert!(!updates.join(".b.delta.progress").exists());
    }

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

    #[test]
    fn a_download_that_would_fill_the_data_partition_does_not_start() {
        assert!(room_for("b", 100, 1000, 1000).is_ok());
        // Nothing left to fetch (cut off right before it was put in place): no refusal.
        assert!(room_for("b", 0, 0, 20_000).is_ok());
        // 1000 of 20000 stay free: 1100 is not room for 101.
        assert!(room_for("b", 100, 1100, 20_000).is_ok());
        let e = room_for("edgeos-2.bundle", 101, 1100, 20_000).unwrap_err();
        assert_eq!(
            e,
            "the data partition has 1100 bytes free: `edgeos-2.bundle` needs 101 more, and 1000 stay free for the log"
        );
    }

    #[test]
    fn a_box_fetches_the_delta_from_its_version_or_else_the_whole_bundle() {
        let item = |kind: &str, name: &str, version: Option<&str>, base: Option<&str>| Item {
            kind: kind.into(),
            name: name.into(),
            store: "object".into(),
            key: name.into(),
            sha256: "0".repeat(64),
            window: None,
            version: version.map(Into::into),
            base: base.map(Into::into),
            published_ms: None,
        };
        let items = [
            item("pods", "web.yaml", None, None),
            item("updates", "os-2.bundle", Some("2"), None),
            item("updates", "os-2-from-1.delta", Some("2"), Some("1")),
            item("updates", "os-2-from-1.5.delta", Some("2"), Some("1.5")),
        ];
        let names = |running: Option<&str>| -> Vec<String> {
            for_this_box(&items, running)
                .iter()
                .map(|i| i.name.clone())
                .collect()
        };
        assert_eq!(names(Some("1")), ["web.yaml", "os-2-from-1.delta"]);
        assert_eq!(names(Some("1.5")), ["web.yaml", "os-2-from-1.5.delta"]);
        // No delta from its version: the whole bundle.
        assert_eq!(names(Some("0.9")), ["web.yaml", "os-2.bundle"]);
        // Already running it (blessed, the manifest still offering it): nothing.
        assert_eq!(names(Some("2")), ["web.yaml"]);
        // Not knowing what it runs: everything, init chooses.
        assert_eq!(names(None).len(), 4);
        // Only an update has a version or a base.
        let e = check_item(&item("pods", "x", Some("2"), None)).unwrap_err();
        assert!(e.contains("only an update has a version"), "{e}");
        let mut stamped = item("config", "x", None, None);
        stamped.published_ms = Some(1);
        assert!(check_item(&stamped).is_err());
    }

    #[test]
    fn only_an_update_has_a_window_and_it_must_read_as_one() {
        let item = |kind: &str, window: &str| Item {
            kind: kind.into(),
            name: "x".into(),
            store: "object".into(),
            key: "x".into(),
            sha256: "0".repeat(64),
            window: Some(window.into()),
            version: None,
            base: None,
            published_ms: None,
        };
        assert!(check_item(&item("updates", "02:00-04:00")).is_ok());
        let e = check_item(&item("models", "02:00-04:00")).unwrap_err();
        assert!(e.contains("only an update has a window"), "{e}");
        let e = check_item(&item("updates", "2am")).unwrap_err();
        assert!(e.contains("HH:MM-HH:MM"), "{e}");
        // Written beside the bundle for init, and gone when a manifest offers none.
        let tmp = tempfile::tempdir().unwrap();
        let mut it = item("updates", "02:00-04:00");
        write_window(tmp.path(), &it).unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("x.window")).unwrap(),
            "02:00-04:00\n"
        );
        it.window = None;
        write_window(tmp.path(), &it).unwrap();
        assert!(!tmp.path().join("x.window").exists());
        write_window(tmp.path(), &it).unwrap();
    }
}
