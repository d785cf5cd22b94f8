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

/// Runs forever: ask for the manifests of this site and machine and apply them.
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
    let mut manifests = Manifests::new(
        &client,
        &down.bucket,
        [site_key, machine_key],
        Duration::from_secs(down.poll_secs.max(1)),
    );
    let report_subject = format!("{}{}", config.subject_prefix(core), "_downlink");
    tracing::info!(bucket = %down.bucket, objects = %down.objects, every_secs = down.poll_secs.max(1), "downlink asking for manifests");
    // The latest manifest of each key not yet applied. A manifest that changes while
    // the last one is applied (an update cancelled or replaced mid-download) stops that
    // apply at once: the partial download stays for a resume, or goes when no manifest
    // offers it any more.
    let mut pending: std::collections::BTreeMap<String, bytes::Bytes> = Default::default();
    // The version this boot runs (init's boot record), for which updates are its own.
    let running = crate::uplink::read_os(&config.boot_file).map(|os| os.version);
    loop {
        let Some((key, payload)) = pending.pop_first() else {
            let (k, v) = tokio::select! {
                m = manifests.next() => m?,
                lost = lost_rx.recv() => return Err(lost.unwrap_or_else(|| Error::lost(None))),
            };
            pending.insert(k, v);
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
                m = manifests.next() => {
                    let (k, v) = m?;
                    let newer = k == key;
                    pending.insert(k, v);
                    if newer {
                        tracing::info!(manifest = %key, "a newer manifest came: applying it instead");
                        break None;
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
            // and the first look gives the manifest again.
            return Err(Error::Ended {
                what: "a download was interrupted",
                event: None,
            });
        }
    }
}

/// This box's two manifests (its site's and its own) as the core holds them, asked for
/// with a JetStream direct get of each key's last message every `every`: a new sequence
/// is a manifest put since the last look. Not a KV watch: a watch is a consumer at the
/// core per box, which a cluster's meta layer assigns and, after a server's loss, every
/// box makes again; at 1,000 boxes that churn was the first suspect when the records
/// stream went without a leader for more than ten minutes (docs/fleet.md). A direct get
/// is answered by any replica and leaves nothing behind. Each session starts from
/// nothing seen, so its first look gives the current manifests again (applying one
/// twice writes nothing twice).
struct Manifests<'a> {
    client: &'a async_nats::Client,
    /// `KV_<bucket>` and `$KV.<bucket>.`.
    stream: String,
    prefix: String,
    keys: [String; 2],
    seen: [u64; 2],
    ticks: tokio::time::Interval,
}

/// A direct get the core leaves unanswered this long ends the session.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

impl<'a> Manifests<'a> {
    fn new(
        client: &'a async_nats::Client,
        bucket: &str,
        keys: [String; 2],
        every: Duration,
    ) -> Self {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Manifests {
            client,
            stream: format!("KV_{bucket}"),
            prefix: format!("$KV.{bucket}."),
            keys,
            seen: [0; 2],
            ticks,
        }
    }

    /// The next manifest put since the last look, its key and value; looks at once, then
    /// every tick until there is one. Cancel-safe: a look dropped half-way is made again.
    async fn next(&mut self) -> Result<(String, bytes::Bytes)> {
        loop {
            for i in 0..2 {
                if let Some(value) = self.ask(i).await? {
                    return Ok((self.keys[i].clone(), value));
                }
            }
            self.ticks.tick().await;
        }
    }

    /// Key `i`'s last message when it is new: `None` when the core holds none, the same
    /// one as last time, or a delete or purge marker.
    async fn ask(&mut self, i: usize) -> Result<Option<bytes::Bytes>> {
        let subject = format!("{}{}", self.prefix, self.keys[i]);
        let op = format!("asking the core for manifest {}", self.keys[i]);
        let reply = crate::resume::direct_last(
            self.client,
            &self.stream,
            &subject,
            ASK_TIMEOUT,
            op.clone(),
        )
        .await?;
        let Some(reply) = reply else {
            return Ok(None);
        };
        let header = |name: &str| {
            reply
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let Some(seq) = header("Nats-Sequence").and_then(|s| s.parse::<u64>().ok()) else {
            return Err(Error::Core {
                op,
                detail: "a reply without its Nats-Sequence".into(),
            });
        };
        if seq == self.seen[i] {
            return Ok(None);
        }
        self.seen[i] = seq;
        if header("KV-Operation").is_some() {
            return Ok(None);
        }
        Ok(Some(reply.payload))
    }
}
