//! `edgectl update`: an OS update bundle published to sites through the downlink, and
//! where each box's update stands, from the status it reports (docs/update.md).

use std::path::{Path, PathBuf};

use async_nats::jetstream;
use ring::signature::KeyPair;

#[derive(clap::Subcommand)]
pub enum UpdateCmd {
    /// Check a bundle as the boxes will, put it into the object store, and make it the
    /// `updates` item of each site's signed downlink manifest (replacing an earlier
    /// bundle there; the other items stay). The boxes download it, install it into their
    /// inactive slot and try it.
    Publish {
        /// A site to update (repeat for more).
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
        /// Only this machine of the site (its own manifest).
        #[arg(long)]
        machine: Option<String>,
        /// The operator's downlink key (ed25519 PKCS#8), as for `publish`.
        #[arg(long)]
        signing_key: PathBuf,
        /// The update key's public half (`update.pub`): the bundle must verify with it.
        #[arg(long)]
        update_key: PathBuf,
        /// The bundle of the version the boxes run: send only a delta from it (the
        /// blocks they do not hold). A box running another version refuses the delta.
        #[arg(long)]
        delta_from: Option<PathBuf>,
        bundle: PathBuf,
    },
    /// Each box: the OS it runs and where its latest update stands.
    Status,
}

pub async fn run(
    cmd: &UpdateCmd,
    js: &jetstream::Context,
    bucket: &str,
    objects: &str,
    status_bucket: &str,
) -> Result<(), String> {
    match cmd {
        UpdateCmd::Publish {
            sites,
            machine,
            signing_key,
            update_key,
            delta_from,
            bundle,
        } => {
            publish(
                js,
                bucket,
                objects,
                sites,
                machine.as_deref(),
                signing_key,
                update_key,
                bundle,
                delta_from.as_deref(),
            )
            .await
        }
        UpdateCmd::Status => status(js, status_bucket).await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    js: &jetstream::Context,
    bucket: &str,
    objects: &str,
    sites: &[String],
    machine: Option<&str>,
    signing_key: &Path,
    update_key: &Path,
    bundle: &Path,
    delta_from: Option<&Path>,
) -> Result<(), String> {
    let key = super::read_update_key(update_key)?;
    // Refuse to send what every box would refuse after downloading it.
    let checked =
        edge_update::open(bundle, &key).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let m = &checked.manifest;
    let mut name = format!("{}-{}.bundle", m.name, m.version);
    // What is sent: the bundle, or a delta from the boxes' version, written beside it.
    let mut sent = bundle.to_path_buf();
    if let Some(base_path) = delta_from {
        let base = edge_update::open(base_path, &key)
            .map_err(|e| format!("{}: {e}", base_path.display()))?;
        name = format!(
            "{}-{}-from-{}.delta",
            m.name, m.version, base.manifest.version
        );
        sent = bundle.with_file_name(&name);
        let w = edge_update::delta::write((&base, base_path), (&checked, bundle), &sent)
            .map_err(|e| format!("making the delta from {}: {e}", base_path.display()))?;
        let whole = std::fs::metadata(bundle).map_or(0, |m| m.len());
        println!(
            "delta from {} ({}): {} bytes, {:.2} % of the bundle's {whole} ({} blocks packed)",
            base.manifest.version,
            sent.display(),
            w.bytes,
            100.0 * w.bytes as f64 / whole.max(1) as f64,
            w.packed_blocks
        );
    }
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(&super::read(signing_key)?)
        .map_err(|_| format!("{} is not an ed25519 PKCS#8 key", signing_key.display()))?;
    for site in sites.iter().map(String::as_str).chain(machine) {
        if !super::is_token(site) {
            return Err(format!(
                "{site:?} must be letters, digits, '-' or '_' (it is a subject token)"
            ));
        }
    }

    let sha256 = {
        let mut file = tokio::fs::File::open(&sent)
            .await
            .map_err(|e| format!("failed to open {}: {e}", sent.display()))?;
        let store = js
            .get_object_store(objects)
            .await
            .map_err(|e| format!("no object store {objects}: {e}"))?;
        store
            .put(name.as_str(), &mut file)
            .await
            .map_err(|e| format!("failed to put object {name}: {e}"))?;
        sha256_file(&sent)?
    };
    println!(
        "{} {} (security version {}) put as object {name}",
        m.name, m.version, m.security_version
    );

    let kv = js
        .get_key_value(bucket)
        .await
        .map_err(|e| format!("no KV bucket {bucket}: {e}"))?;
    for site in sites {
        let key = match machine {
            Some(machine) => format!("{site}.{machine}.manifest"),
            None => format!("{site}.manifest"),
        };
        let current = kv
            .get(&key)
            .await
            .map_err(|e| format!("failed to read {key}: {e}"))?;
        let mut manifest = match current {
            Some(signed) => fabricd::downlink::verify_manifest(&signed, kp.public_key().as_ref())
                .map_err(|e| {
                format!("{key}: {e}; not replacing a manifest this key did not sign")
            })?,
            None => fabricd::downlink::Manifest {
                version: 0,
                items: Vec::new(),
            },
        };
        manifest.items.retain(|i| i.kind != "updates");
        manifest.items.push(fabricd::downlink::Item {
            kind: "updates".into(),
            name: name.clone(),
            store: "object".into(),
            key: name.clone(),
            sha256: sha256.clone(),
        });
        manifest.version += 1;
        let body = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
        let signed = super::sign_framed(&kp, &body);
        fabricd::downlink::verify_manifest(&signed, kp.public_key().as_ref())?;
        kv.put(&key, signed.into())
            .await
            .map_err(|e| format!("failed to put {key}: {e}"))?;
        println!(
            "{key}: manifest version {} offers {} {}",
            manifest.version, m.name, m.version
        );
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("failed to open {}: {e}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(edge_common::hex::encode(ctx.finish().as_ref())),
            Ok(n) => ctx.update(&buf[..n]),
            Err(e) => return Err(format!("failed to read {}: {e}", path.display())),
        }
    }
}

/// One line per box: `<site>.<machine>  running <version> (slot <s>)  <update>`.
async fn status(js: &jetstream::Context, status_bucket: &str) -> Result<(), String> {
    let reports = js
        .get_key_value(status_bucket)
        .await
        .map_err(|e| format!("no KV bucket {status_bucket}: {e}"))?;
    let mut keys = super::kv_keys(js, status_bucket).await?;
    keys.sort();
    for key in keys {
        let Ok(Some(value)) = reports.get(&key).await else {
            continue;
        };
        match serde_json::from_slice::<fabricd::uplink::BoxStatus>(&value) {
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
                "installed" => format!("installed {version} in slot {slot}, rebooting to try it"),
                "trying" if update.and_then(|u| u.get("reason")).is_some() => {
                    format!("trying {version}: {reason}")
                }
                "trying" => format!("trying {version}"),
                "blessed" => format!("blessed {version}"),
                "rolled-back" => format!("rolled back from {version}: {reason}"),
                "refused" => format!("refused {}: {reason}", field("bundle")),
                other => format!("{other} {version}"),
            }
        }
    };
    format!("{key}  {running}  {what}")
}
