//! `edgectl update`: an OS update bundle published to sites through the downlink, and
//! where each box's update stands, from the status it reports (docs/update.md).

use std::path::{Path, PathBuf};

use async_nats::jetstream;
use ring::signature::KeyPair;

use crate::error::{Error, Result};

#[derive(clap::Subcommand)]
pub enum UpdateCmd {
    /// Check a bundle as the boxes will, put it into the object store, and make it the
    /// `updates` item of each site's signed downlink manifest (replacing an earlier
    /// bundle there; the other items stay). The boxes download it, install it into their
    /// inactive slot and try it.
    Publish {
        #[command(flatten)]
        to: Targets,
        /// The update key's public half (`update.pub`): the bundle must verify with it.
        #[arg(long)]
        update_key: PathBuf,
        /// The bundle of a version boxes run, once per version: a box running it
        /// downloads only the delta from it (the blocks it does not hold); a box running
        /// none of them downloads the whole bundle, which is put beside the deltas.
        #[arg(long)]
        delta_from: Vec<PathBuf>,
        /// When the boxes may reboot into it, `HH:MM-HH:MM` (UTC, by the box's clock):
        /// they download and write it at once, and switch only then. None: at once.
        #[arg(long)]
        window: Option<String>,
        bundle: PathBuf,
    },
    /// Withdraw the update offered to each site: its downlink manifest offers none
    /// any more (signed anew). A box that has not yet rebooted into it drops it, its
    /// partial download included; one already trying or running it keeps it.
    Cancel {
        #[command(flatten)]
        to: Targets,
    },
    /// Write the delta from the bundle of the version the boxes run to a new bundle,
    /// beside it, without a core, and print its size: what a box on that version would
    /// download (`publish --delta-from` makes the same file).
    Delta {
        /// The update key's public half (`update.pub`): both bundles must verify with it.
        #[arg(long)]
        update_key: PathBuf,
        /// The bundle of the version the boxes run.
        #[arg(long)]
        from: PathBuf,
        bundle: PathBuf,
    },
    /// Each box: the OS it runs and where its latest update stands.
    Status {
        /// Each box's status report as it sent it, one JSON object per line:
        /// `{"box": "<site>.<machine>", "report": {...}}`.
        #[arg(long)]
        json: bool,
    },
}

/// The manifests `publish` and `cancel` rewrite, and the key that signs them.
#[derive(clap::Args)]
pub struct Targets {
    /// The sites: `--site a --site b`, `--sites a,b`, or `--sites all` (every site with a
    /// downlink manifest or a status report at the core).
    #[arg(long = "site", alias = "sites", required = true, value_delimiter = ',')]
    sites: Vec<String>,
    /// Only this machine of each site (its own manifest).
    #[arg(long)]
    machine: Option<String>,
    /// The operator's downlink key (ed25519 PKCS#8), as for `edgectl publish`.
    #[arg(long)]
    signing_key: PathBuf,
}

/// The subcommands that need no core: `Some` when `cmd` is one, with its result.
pub(crate) fn offline(cmd: &UpdateCmd) -> Option<Result<()>> {
    let UpdateCmd::Delta {
        update_key,
        from,
        bundle,
    } = cmd
    else {
        return None;
    };
    Some((|| {
        let key = super::read_update_key(update_key)?;
        let checked = edge_update::open(bundle, &key).map_err(Error::bundle(bundle))?;
        make_delta(&key, &checked, bundle, from).map(|_| ())
    })())
}

/// Writes the delta from `base_path` to the checked `bundle` beside the bundle, prints
/// its size, and returns its object name, path and base version.
fn make_delta(
    key: &[u8],
    checked: &edge_update::Bundle,
    bundle: &Path,
    base_path: &Path,
) -> Result<(String, PathBuf, String)> {
    let m = &checked.manifest;
    let base = edge_update::open(base_path, key).map_err(Error::bundle(base_path))?;
    let name = format!(
        "{}-{}-from-{}.delta",
        m.name, m.version, base.manifest.version
    );
    let sent = bundle.with_file_name(&name);
    let w = edge_update::delta::write((&base, base_path), (checked, bundle), &sent).map_err(
        |source| Error::Delta {
            base: base_path.to_owned(),
            source,
        },
    )?;
    let whole = std::fs::metadata(bundle).map_or(0, |m| m.len());
    println!(
        "delta from {} ({}): {} bytes, {:.2} % of the bundle's {whole} ({} blocks packed)",
        base.manifest.version,
        sent.display(),
        w.bytes,
        100.0 * w.bytes as f64 / whole.max(1) as f64,
        w.packed_blocks
    );
    Ok((name, sent, base.manifest.version.clone()))
}

pub(crate) async fn run(
    cmd: &UpdateCmd,
    js: &jetstream::Context,
    bucket: &str,
    objects: &str,
    status_bucket: &str,
) -> Result<()> {
    match cmd {
        UpdateCmd::Publish {
            to,
            update_key,
            delta_from,
            window,
            bundle,
        } => {
            publish(
                js,
                (bucket, objects, status_bucket),
                to,
                update_key,
                bundle,
                delta_from,
                window.as_deref(),
            )
            .await
        }
        UpdateCmd::Cancel { to } => {
            let (kp, sites) = to.resolve(js, bucket, status_bucket).await?;
            rewrite_manifests(js, bucket, &kp, &sites, to.machine.as_deref(), |m| {
                let offered: Vec<String> = m
                    .items
                    .iter()
                    .filter(|i| i.kind == "updates")
                    .map(|i| i.name.clone())
                    .collect();
                m.items.retain(|i| i.kind != "updates");
                match offered.as_slice() {
                    [] => None,
                    o => Some(format!("withdraws {}", o.join(", "))),
                }
            })
            .await
        }
        UpdateCmd::Status { json } => status(js, status_bucket, *json).await,
        UpdateCmd::Delta { .. } => unreachable!("handled by `offline`"),
    }
}

async fn publish(
    js: &jetstream::Context,
    (bucket, objects, status_bucket): (&str, &str, &str),
    to: &Targets,
    update_key: &Path,
    bundle: &Path,
    delta_from: &[PathBuf],
    window: Option<&str>,
) -> Result<()> {
    let window = match window {
        Some(w) => Some(
            edge_update::window::Window::parse(w)
                .map_err(Error::Window)?
                .to_string(),
        ),
        None => None,
    };
    let key = super::read_update_key(update_key)?;
    // Refuse to send what every box would refuse after downloading it.
    let checked = edge_update::open(bundle, &key).map_err(Error::bundle(bundle))?;
    let m = &checked.manifest;
    // What is sent: the bundle, and a delta from each version named, written beside it.
    let mut sent = vec![(
        format!("{}-{}.bundle", m.name, m.version),
        bundle.to_path_buf(),
        None,
    )];
    for base_path in delta_from {
        let (name, path, base) = make_delta(&key, &checked, bundle, base_path)?;
        if sent.iter().any(|(_, _, b)| b.as_ref() == Some(&base)) {
            return Err(Error::SecondBase {
                path: base_path.clone(),
                version: base,
            });
        }
        sent.push((name, path, Some(base)));
    }
    let (kp, sites) = to.resolve(js, bucket, status_bucket).await?;

    let store = js
        .get_object_store(objects)
        .await
        .map_err(fabricd::Error::core(format!("no object store {objects}")))?;
    let mut items = Vec::new();
    // Published anew, even with the same bytes: a box tries a version it rolled back
    // from again (fabricd stamps its copy with this time; docs/update.md).
    let published_ms = edge_common::unix_ms();
    for (name, path, base) in sent {
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(fabricd::Error::io("open", &path))?;
        store
            .put(name.as_str(), &mut file)
            .await
            .map_err(fabricd::Error::core(format!("failed to put object {name}")))?;
        println!(
            "{} {} (security version {}) put as object {name}",
            m.name, m.version, m.security_version
        );
        items.push(fabricd::downlink::Item {
            kind: "updates".into(),
            name: name.clone(),
            store: "object".into(),
            key: name,
            sha256: sha256_file(&path)?,
            window: window.clone(),
            version: Some(m.version.clone()),
            base,
            published_ms: Some(published_ms),
        });
    }
    rewrite_manifests(js, bucket, &kp, &sites, to.machine.as_deref(), |manifest| {
        manifest.items.retain(|i| i.kind != "updates");
        manifest.items.extend(items.iter().cloned());
        Some(match &window {
            Some(w) => format!("offers {} {} (window {w} UTC)", m.name, m.version),
            None => format!("offers {} {}", m.name, m.version),
        })
    })
    .await
}

impl Targets {
    /// The signing key and the sites (`all` resolved), each checked: before anything
    /// is put.
    async fn resolve(
        &self,
        js: &jetstream::Context,
        bucket: &str,
        status_bucket: &str,
    ) -> Result<(ring::signature::Ed25519KeyPair, Vec<String>)> {
        let kp = super::read_signing_key(&self.signing_key)?;
        let sites = resolve_sites(
            js,
            bucket,
            status_bucket,
            &self.sites,
            self.machine.as_deref(),
        )
        .await?;
        Ok((kp, sites))
    }
}

/// The sites named, or with `all` every site the core knows: one with a downlink
/// manifest, or a box that reported its status. Each is checked as a subject token.
async fn resolve_sites(
    js: &jetstream::Context,
    bucket: &str,
    status_bucket: &str,
    sites: &[String],
    machine: Option<&str>,
) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for site in sites {
        if site == "all" {
            // Manifests are `<site>[.<machine>].manifest` (the bucket's other keys are
            // items, whose first token is no site); reports are `<site>.<machine>`.
            let manifests = super::kv_keys(js, bucket).await?;
            let mut known: Vec<&str> = manifests
                .iter()
                .filter_map(|k| k.strip_suffix(".manifest"))
                .collect();
            // A core without boxes reporting yet has no status bucket entries: fine.
            let reports = super::kv_keys(js, status_bucket).await.unwrap_or_default();
            known.extend(reports.iter().map(String::as_str));
            out.extend(
                known
                    .iter()
                    .filter_map(|k| k.split('.').next().map(str::to_owned)),
            );
        } else {
            out.push(site.clone());
        }
    }
    out.sort();
    out.dedup();
    for site in out.iter().map(String::as_str).chain(machine) {
        if !super::is_token(site) {
            return Err(Error::invalid(
                format!("{site:?}"),
                "must be letters, digits, '-' or '_' (it is a subject token)",
            ));
        }
    }
    if out.is_empty() {
        return Err(Error::NoSites);
    }
    Ok(out)
}

/// Each site's (or machine's) signed downlink manifest, changed by `change` and signed
/// again with a higher version; `change` says what it did (`None`: nothing, and the
/// manifest is left as it is). A manifest this key did not sign is not replaced.
async fn rewrite_manifests(
    js: &jetstream::Context,
    bucket: &str,
    kp: &ring::signature::Ed25519KeyPair,
    sites: &[String],
    machine: Option<&str>,
    mut change: impl FnMut(&mut fabricd::downlink::Manifest) -> Option<String>,
) -> Result<()> {
    let kv = js
        .get_key_value(bucket)
        .await
        .map_err(fabricd::Error::core(format!("no KV bucket {bucket}")))?;
    for site in sites {
        let key = match machine {
            Some(machine) => format!("{site}.{machine}.manifest"),
            None => format!("{site}.manifest"),
        };
        let current = kv
            .get(&key)
            .await
            .map_err(fabricd::Error::core(format!("failed to read {key}")))?;
        let mut manifest = match current {
            Some(signed) => fabricd::downlink::verify_manifest(&signed, kp.public_key().as_ref())
                .map_err(|e| Error::Foreign {
                key: key.clone(),
                source: Box::new(e),
            })?,
            None => fabricd::downlink::Manifest {
                version: 0,
                items: Vec::new(),
            },
        };
        let Some(what) = change(&mut manifest) else {
            println!("{key}: no update offered; left as it is");
            continue;
        };
        manifest.version += 1;
        let body = serde_json::to_vec(&manifest)
            .map_err(fabricd::Error::json("failed to encode the manifest"))?;
        let signed = super::sign_framed(kp, &body);
        fabricd::downlink::verify_manifest(&signed, kp.public_key().as_ref())?;
        kv.put(&key, signed.into())
            .await
            .map_err(fabricd::Error::core(format!("failed to put {key}")))?;
        println!("{key}: manifest version {} {what}", manifest.version);
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(fabricd::Error::io("open", path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(edge_common::hex::encode(ctx.finish().as_ref())),
            Ok(n) => ctx.update(&buf[..n]),
            Err(e) => return Err(fabricd::Error::io("read", path)(e).into()),
        }
    }
}

/// One line per box: `<site>.<machine>  running <version> (slot <s>)  <update>`.
async fn status(js: &jetstream::Context, status_bucket: &str, json: bool) -> Result<()> {
    let reports = js
        .get_key_value(status_bucket)
        .await
        .map_err(fabricd::Error::core(format!(
            "no KV bucket {status_bucket}"
        )))?;
    let mut keys = super::kv_keys(js, status_bucket).await?;
    keys.sort();
    for key in keys {
        let Ok(Some(value)) = reports.get(&key).await else {
            continue;
        };
        match serde_json::from_slice::<fabricd::uplink::BoxStatus>(&value) {
            Ok(s) if json => println!("{}", serde_json::json!({"box": key, "report": s})),
            Ok(s) => println!("{}", line(&key, &s)),
            Err(e) => eprintln!("{key}: unreadable status report: {e}"),
        }
    }
    Ok(())
}

/// What `update status` says of one box.
pub fn line(key: &str, s: &fabricd::uplink::BoxStatus) -> String {
    let running = match &s.os {
        Some(os) => format!("running {} (slot {})", os.version, os.slot),
        None => "running ? (no OS report)".into(),
    };
    let update = s.update.as_ref().and_then(|u| u.get("update"));
    let field = |k: &str| {
        update
            .and_then(|u| u.get(k))
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned()
    };
    let what = match update.and_then(|u| u.get("phase")).and_then(|p| p.as_str()) {
        None => "no update".to_owned(),
        Some(phase) => {
            let (version, slot, reason) = (field("version"), field("slot"), field("reason"));
            match phase {
                "installing" => format!("installing {version} into slot {slot}"),
                "installed" if update.and_then(|u| u.get("window")).is_some() => format!(
                    "staged {version} in slot {slot} for its window {} UTC",
                    field("window")
                ),
                "installed" => format!("installed {version} in slot {slot}, rebooting to try it"),
                "trying" if update.and_then(|u| u.get("reason")).is_some() => {
                    format!("trying {version}: {reason}")
                }
                "trying" => format!("trying {version}"),
                "blessed" => format!("blessed {version}"),
                "rolled-back" => format!("rolled back from {version}: {reason}"),
                "refused" => format!("refused {}: {reason}", field("bundle")),
                "cancelled" => format!("cancelled {version}: {reason}"),
                other => format!("{other} {version}"),
            }
        }
    };
    // A bundle on its way is the newest news of the box.
    let downloading = s
        .downlink
        .as_ref()
        .and_then(|d| d.downloading.as_ref())
        .filter(|d| d.kind == "updates");
    let what = match downloading {
        Some(d) => format!(
            "downloading {} {}% ({} of {} bytes)",
            d.name,
            d.bytes * 100 / d.size.max(1),
            d.bytes,
            d.size
        ),
        None => what,
    };
    format!("{key}  {running}  {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(json: serde_json::Value) -> fabricd::uplink::BoxStatus {
        let mut base = serde_json::json!({"time_ms": 1, "version": "0.1.0", "classes": [],
            "os": {"version": "0.1.0", "slot": "a"}});
        base.as_object_mut()
            .unwrap()
            .extend(json.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn each_box_says_where_its_update_stands() {
        assert_eq!(
            line("s.m", &report(serde_json::json!({}))),
            "s.m  running 0.1.0 (slot a)  no update"
        );
        let downloading = report(serde_json::json!({"downlink": {"fetched_bytes": 10,
            "resumed_bytes": 0, "downloading": {"kind": "updates",
            "name": "edgeos-0.2.0.bundle", "bytes": 43, "size": 100}}}));
        assert_eq!(
            line("s.m", &downloading),
            "s.m  running 0.1.0 (slot a)  downloading edgeos-0.2.0.bundle 43% (43 of 100 bytes)"
        );
        // A model on its way is not an update's news.
        let model = report(serde_json::json!({"downlink": {"fetched_bytes": 10,
            "resumed_bytes": 0, "downloading": {"kind": "models", "name": "m.onnx",
            "bytes": 1, "size": 2}}}));
        assert!(line("s.m", &model).ends_with("no update"));
        let staged = report(
            serde_json::json!({"update": {"update": {"phase": "installed",
            "version": "0.2.0", "slot": "b", "window": "02:00-04:00"}}}),
        );
        assert_eq!(
            line("s.m", &staged),
            "s.m  running 0.1.0 (slot a)  staged 0.2.0 in slot b for its window 02:00-04:00 UTC"
        );
        let rolled = report(
            serde_json::json!({"update": {"security_floor": 1, "update": {
            "phase": "rolled-back", "version": "0.2.0", "slot": "b",
            "reason": "the trial failed: given up: canary"}}}),
        );
        assert_eq!(
            line("s.m", &rolled),
            "s.m  running 0.1.0 (slot a)  rolled back from 0.2.0: the trial failed: given up: canary"
        );
    }
}
