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
mod apply;
mod fetch;
mod manifest;
mod status;
#[cfg(test)]
mod tests;

pub use manifest::{verify_manifest, Item, Manifest};
pub use status::{DownlinkReport, Status};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::config::{Config, CoreConfig, DownlinkConfig};
use crate::error::{Error, Result};
use apply::apply;
use fetch::Objects;
use manifest::{load_public_key, Holds};

/// What init says the other slot holds (`{"slot","version"}`), beside its boot record.
const OTHER_SLOT: &str = "other-slot.json";

/// Kinds of items and so the directories under `dir`; other daemons watch these.
pub const KINDS: [&str; 5] = ["config", "pods", "models", "images", "updates"];

#[derive(serde::Serialize)]
struct Report<'a> {
    site: &'a str,
    machine: &'a str,
    version: Option<u64>,
    applied: Vec<String>,
    refused: Vec<(String, String)>,
    /// An item's fetch failed for the core, not for its bytes: the manifest is applied
    /// again.
    #[serde(skip)]
    interrupted: bool,
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
) -> Result<()> {
    let public_key = load_public_key(&down.public_key)?;
    let (lost_tx, mut lost_rx) = tokio::sync::mpsc::unbounded_channel();
    let client = crate::uplink::connect(core, &config.site, lost_tx).await?;
    let js = async_nats::jetstream::new(client.clone());
    let kv = js
        .get_key_value(&down.bucket)
        .await
        .map_err(Error::core(format!(
            "no KV bucket `{}` at the core",
            down.bucket
        )))?;
    let objects = Objects {
        store: js
            .get_object_store(&down.objects)
            .await
            .map_err(Error::core(format!(
                "no object store `{}` at the core",
                down.objects
            )))?,
        stream: js
            .get_stream(format!("OBJ_{}", down.objects))
            .await
            .map_err(Error::core(format!(
                "no object store `{}` at the core",
                down.objects
            )))?,
        client: client.clone(),
        bucket: down.objects.clone(),
        max_bytes_per_sec: down.max_kib_per_sec.map(|k| k.max(1) * 1024),
    };
    let site_key = format!("{}.manifest", config.site);
    let machine_key = format!("{}.{}.manifest", config.site, config.machine);
    let mut watch = watch_site(&kv, &client, &config.site, &config.machine).await?;
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
                lost = lost_rx.recv() => return Err(lost.unwrap_or_else(|| Error::lost(None))),
            };
            if let Some((k, v)) = manifest_entry(entry, &kv.prefix, &site_key, &machine_key)? {
                pending.insert(k, v);
            }
            continue;
        };
        // What the other slot holds changes with each install: read at each manifest.
        let other = crate::uplink::read_os(&config.boot_file.with_file_name(OTHER_SLOT))
            .map(|os| os.version);
        let holds = Holds {
            running: running.as_deref(),
            other: other.as_deref(),
        };
        let applying = apply(
            &key,
            &payload,
            &public_key,
            &kv,
            &objects,
            &down.dir,
            holds,
            Report {
                site: &config.site,
                machine: &config.machine,
                version: None,
                applied: vec![],
                refused: vec![],
                interrupted: false,
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
                lost = lost_rx.recv() => return Err(lost.unwrap_or_else(|| Error::lost(None))),
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
        if report.interrupted {
            // A core that lost a server can leave a chunk or key unanswered for a while
            // with this session's connection still up: start over, after the back-off,
            // and the watch gives the manifest again.
            return Err(Error::Ended {
                what: "a download was interrupted",
                event: None,
            });
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
) -> Result<Option<(String, bytes::Bytes)>> {
    let entry = match entry {
        Some(Ok(e)) => e,
        Some(Err(e)) => return Err(Error::core("KV watch failed")(e)),
        None => {
            return Err(Error::Ended {
                what: "KV watch ended",
                event: None,
            })
        }
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
) -> Result<async_nats::jetstream::consumer::push::Ordered> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy, ReplayPolicy};
    let op = format!("failed to watch KV bucket `{}`", kv.name);
    let mut id = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| Error::core(op.clone())("no randomness for the watch's name"))?;
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
        .map_err(Error::core(op.clone()))?
        .messages()
        .await
        .map_err(Error::core(op))
}
