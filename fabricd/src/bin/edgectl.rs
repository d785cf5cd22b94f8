//! edgectl: the operator's tool on the core side. Sets up the stream, KV bucket and
//! object store the edges mirror into and download from, makes the manifest signing
//! key, publishes objects and signed manifests to one site or one machine, shows each
//! site's last contact, and tails a site's topics.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use ring::signature::KeyPair;

#[derive(Parser)]
#[command(
    name = "edgectl",
    about = "Operate the core side of the edge data fabric"
)]
struct Cli {
    /// NATS URL of the core.
    #[arg(long, default_value = "tls://127.0.0.1:4222")]
    server: String,
    /// CA of the core's certificate, and the operator's client certificate and key.
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    /// First subject token of edge records.
    #[arg(long, default_value = "edge")]
    prefix: String,
    #[arg(long, default_value = "EDGE")]
    stream: String,
    #[arg(long, default_value = "edge-config")]
    bucket: String,
    #[arg(long, default_value = "edge-objects")]
    objects: String,
    /// KV bucket where each box keeps its latest status report.
    #[arg(long, default_value = "edge-status")]
    status_bucket: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the stream (with its duplicate window), KV bucket and object store.
    Setup {
        /// Must outlast the longest the edges may hold unacked records in flight.
        #[arg(long, default_value_t = 600)]
        dupe_window_secs: u64,
    },
    /// Make an ed25519 signing key (`<out>/manifest.key`, PKCS#8) and the public key for
    /// the image (`<out>/manifest.pub`, hex).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a signed image allowlist (noded's format: the signature, then
    /// `{"version","digests"}`), to deliver as the downlink config item `image-allowlist`.
    /// A box takes it when its version is higher than the list it has.
    Allowlist {
        #[arg(long)]
        signing_key: PathBuf,
        #[arg(long)]
        version: u64,
        #[arg(long)]
        out: PathBuf,
        /// Image manifest digests, `sha256:<64 hex>`.
        #[arg(required = true)]
        digests: Vec<String>,
    },
    /// Put a file into the object store.
    PutObject {
        #[arg(long)]
        name: String,
        file: PathBuf,
    },
    /// Put a file's bytes under a KV key.
    PutKv {
        #[arg(long, name = "kv-key")]
        kv_key: String,
        file: PathBuf,
    },
    /// Sign a manifest (JSON) and publish it to a site, or one machine of it.
    Publish {
        #[arg(long)]
        site: String,
        #[arg(long)]
        machine: Option<String>,
        #[arg(long)]
        signing_key: PathBuf,
        manifest: PathBuf,
    },
    /// Each site and machine: records held, last offset, the box's acked offset and lag,
    /// drops and last contact.
    Status {
        /// Count only these topics (a NATS pattern, e.g. `sensors.>`).
        #[arg(long, default_value = ">")]
        topic: String,
    },
    /// Print a site's records as they arrive (`--all` from the start).
    Tail {
        #[arg(long)]
        site: String,
        #[arg(long, default_value = "*")]
        machine: String,
        #[arg(long, default_value = ">")]
        topic: String,
        #[arg(long)]
        all: bool,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgectl: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgectl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One box as `status` shows it: what the core holds of it, and what it last said.
#[derive(Default)]
struct MachineRow {
    records: usize,
    last_offset: u64,
    /// Newest message of any subject from the box (unix seconds).
    contact: i64,
    status: Option<fabricd::uplink::BoxStatus>,
}

async fn connect(cli: &Cli) -> Result<async_nats::Client, String> {
    let mut opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5));
    if let Some(ca) = &cli.ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    opts.connect(cli.server.as_str())
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", cli.server))
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("failed to read {}: {e}", path.display()))
}

/// The signed allowlist of `digests`, refusing anything noded would not run.
fn allowlist(key: &[u8], version: u64, digests: &[String]) -> Result<Vec<u8>, String> {
    for d in digests {
        let hex = d.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!(
                "digest {d:?} is not sha256:<64 lowercase hex digits>"
            ));
        }
    }
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(key)
        .map_err(|_| "the signing key is not an ed25519 PKCS#8 key".to_string())?;
    let body = serde_json::to_vec(&serde_json::json!({"version": version, "digests": digests}))
        .map_err(|e| format!("failed to encode the allowlist: {e}"))?;
    Ok(sign_framed(&kp, &body))
}

/// The 64-byte ed25519 signature of `body`, then `body`: how manifests and allowlists
/// travel, so the reader can split at 64 and verify.
fn sign_framed(kp: &ring::signature::Ed25519KeyPair, body: &[u8]) -> Vec<u8> {
    let mut signed = kp.sign(body).as_ref().to_vec();
    signed.extend_from_slice(body);
    signed
}

async fn run(cli: Cli) -> Result<(), String> {
    use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
    if let Cmd::Allowlist {
        signing_key,
        version,
        out,
        digests,
    } = &cli.cmd
    {
        let signed = allowlist(&read(signing_key)?, *version, digests)
            .map_err(|e| format!("{}: {e}", signing_key.display()))?;
        std::fs::write(out, signed)
            .map_err(|e| format!("failed to write {}: {e}", out.display()))?;
        println!(
            "allowlist version {version} with {} digest(s) written to {}",
            digests.len(),
            out.display()
        );
        return Ok(());
    }
    if let Cmd::Keygen { out } = &cli.cmd {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| "failed to generate a key".to_string())?;
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| "failed to use the generated key".to_string())?;
        std::fs::create_dir_all(out)
            .map_err(|e| format!("failed to create {}: {e}", out.display()))?;
        let hex: String = kp
            .public_key()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        for (name, data) in [
            ("manifest.key", pkcs8.as_ref().to_vec()),
            ("manifest.pub", format!("{hex}\n").into_bytes()),
        ] {
            let p = out.join(name);
            std::fs::write(&p, data)
                .map_err(|e| format!("failed to write {}: {e}", p.display()))?;
        }
        println!(
            "public key {hex} (ship {} in the image)",
            out.join("manifest.pub").display()
        );
        return Ok(());
    }
    let client = connect(&cli).await?;
    let js = async_nats::jetstream::new(client.clone());
    match &cli.cmd {
        Cmd::Keygen { .. } | Cmd::Allowlist { .. } => unreachable!("handled above"),
        Cmd::Setup { dupe_window_secs } => {
            // The KV and object store layouts are made as plain streams: the client's
            // create_key_value needs account info newer servers send (nats-server 2.9
            // does not), and the layout is what the bucket API reads either way.
            let kv_layout = |bucket: &str| Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                discard: DiscardPolicy::New,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                storage: StorageType::File,
                ..Default::default()
            };
            let streams = [
                Config {
                    name: cli.stream.clone(),
                    subjects: vec![format!("{}.>", cli.prefix)],
                    duplicate_window: Duration::from_secs(*dupe_window_secs),
                    storage: StorageType::File,
                    ..Default::default()
                },
                kv_layout(&cli.bucket),
                kv_layout(&cli.status_bucket),
                Config {
                    name: format!("OBJ_{}", cli.objects),
                    subjects: vec![
                        format!("$O.{}.C.>", cli.objects),
                        format!("$O.{}.M.>", cli.objects),
                    ],
                    discard: DiscardPolicy::New,
                    allow_rollup: true,
                    allow_direct: true,
                    storage: StorageType::File,
                    ..Default::default()
                },
            ];
            for config in streams {
                let name = config.name.clone();
                js.get_or_create_stream(config.clone())
                    .await
                    .map_err(|e| format!("failed to create stream {name}: {e}"))?;
                // A stream made by an older edgectl gets today's settings.
                js.update_stream(config)
                    .await
                    .map_err(|e| format!("failed to update stream {name}: {e}"))?;
                println!("stream {name} ready");
            }
        }
        Cmd::PutObject { name, file } => {
            let store = js
                .get_object_store(&cli.objects)
                .await
                .map_err(|e| format!("no object store {}: {e}", cli.objects))?;
            let mut f = tokio::fs::File::open(file)
                .await
                .map_err(|e| format!("failed to open {}: {e}", file.display()))?;
            store
                .put(name.as_str(), &mut f)
                .await
                .map_err(|e| format!("failed to put object {name}: {e}"))?;
            let digest = ring::digest::digest(&ring::digest::SHA256, &read(file)?);
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            println!("object {name} sha256 {hex}");
        }
        Cmd::PutKv { kv_key, file } => {
            let kv = js
                .get_key_value(&cli.bucket)
                .await
                .map_err(|e| format!("no KV bucket {}: {e}", cli.bucket))?;
            let data = read(file)?;
            let digest = ring::digest::digest(&ring::digest::SHA256, &data);
            kv.put(kv_key, data.into())
                .await
                .map_err(|e| format!("failed to put {kv_key}: {e}"))?;
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            println!("kv {kv_key} sha256 {hex}");
        }
        Cmd::Publish {
            site,
            machine,
            signing_key,
            manifest,
        } => {
            let body = read(manifest)?;
            // Refuse to sign what the edges would refuse to read.
            let parsed: fabricd::downlink::Manifest = serde_json::from_slice(&body)
                .map_err(|e| format!("{} is not a manifest: {e}", manifest.display()))?;
            let kp = ring::signature::Ed25519KeyPair::from_pkcs8(&read(signing_key)?)
                .map_err(|_| format!("{} is not an ed25519 PKCS#8 key", signing_key.display()))?;
            let signed = sign_framed(&kp, &body);
            fabricd::downlink::verify_manifest(&signed, kp.public_key().as_ref())?;
            let key = match machine {
                Some(m) => format!("{site}.{m}.manifest"),
                None => format!("{site}.manifest"),
            };
            let kv = js
                .get_key_value(&cli.bucket)
                .await
                .map_err(|e| format!("no KV bucket {}: {e}", cli.bucket))?;
            kv.put(&key, signed.into())
                .await
                .map_err(|e| format!("failed to put {key}: {e}"))?;
            println!(
                "manifest version {} with {} items published to {key}",
                parsed.version,
                parsed.items.len()
            );
        }
        Cmd::Status { topic } => {
            let stream = js
                .get_stream(&cli.stream)
                .await
                .map_err(|e| format!("no stream {}: {e}", cli.stream))?;
            let mut subjects = stream
                .info_with_subjects(format!("{}.*.*.{topic}", cli.prefix))
                .await
                .map_err(|e| format!("failed to list subjects: {e}"))?;
            let mut machines: std::collections::BTreeMap<String, MachineRow> = Default::default();
            while let Some(item) = subjects.next().await {
                let (subject, count) = item.map_err(|e| format!("failed to list subjects: {e}"))?;
                let tokens: Vec<&str> = subject.splitn(4, '.').collect();
                if tokens.len() < 4 || tokens[3].starts_with("_downlink") {
                    continue;
                }
                let last = stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .map_err(|e| format!("failed to read the last of {subject}: {e}"))?;
                let row = machines
                    .entry(format!("{}.{}", tokens[1], tokens[2]))
                    .or_default();
                row.contact = row.contact.max(last.time.unix_timestamp());
                let offset = last
                    .headers
                    .get("Nats-Msg-Id")
                    .and_then(|v| v.as_str().rsplit('/').next().and_then(|o| o.parse().ok()))
                    .unwrap_or(0);
                row.records += count;
                row.last_offset = row.last_offset.max(offset);
            }
            // Each box's latest report, keyed `<site>.<machine>`.
            let reports = js
                .get_key_value(&cli.status_bucket)
                .await
                .map_err(|e| format!("no KV bucket {}: {e}", cli.status_bucket))?;
            let mut keys = reports
                .keys()
                .await
                .map_err(|e| format!("failed to list {}: {e}", cli.status_bucket))?;
            while let Some(key) = keys.next().await {
                let key = key.map_err(|e| format!("failed to list {}: {e}", cli.status_bucket))?;
                let Ok(Some(entry)) = reports.entry(&key).await else {
                    continue;
                };
                let row = machines.entry(key.clone()).or_default();
                row.contact = row.contact.max(entry.created.unix_timestamp());
                match serde_json::from_slice::<fabricd::uplink::BoxStatus>(&entry.value) {
                    Ok(s) => row.status = Some(s),
                    Err(e) => eprintln!("{key}: unreadable status report: {e}"),
                }
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            // `box acked` and the lag are what the box last reported (`?`: no report yet).
            println!(
                "{:<28} {:>10} {:>12} {:>10} {:>12} {:>12} {:>8} {:>14}",
                "site.machine",
                "records",
                "last offset",
                "box acked",
                "lag records",
                "lag bytes",
                "dropped",
                "last contact"
            );
            for (m, row) in machines {
                let [acked, lag, lag_bytes, dropped] = match &row.status {
                    Some(s) => {
                        let sum = |f: fn(&fabricd::uplink::ClassStatus) -> u64| {
                            s.classes.iter().map(f).sum::<u64>().to_string()
                        };
                        [
                            s.classes
                                .iter()
                                .filter_map(|c| c.acked)
                                .max()
                                .map_or("-".into(), |a| a.to_string()),
                            sum(|c| c.lag_records),
                            sum(|c| c.lag_bytes),
                            sum(|c| c.dropped_records),
                        ]
                    }
                    None => ["?", "?", "?", "?"].map(String::from),
                };
                println!(
                    "{m:<28} {:>10} {:>12} {acked:>10} {lag:>12} {lag_bytes:>12} {dropped:>8} {:>12}s ago",
                    row.records,
                    row.last_offset,
                    now - row.contact
                );
            }
        }
        Cmd::Tail {
            site,
            machine,
            topic,
            all,
            count,
        } => {
            use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
            let stream = js
                .get_stream(&cli.stream)
                .await
                .map_err(|e| format!("no stream {}: {e}", cli.stream))?;
            let consumer = stream
                .create_consumer(pull::Config {
                    filter_subject: format!("{}.{site}.{machine}.{topic}", cli.prefix),
                    ack_policy: AckPolicy::None,
                    deliver_policy: if *all {
                        DeliverPolicy::All
                    } else {
                        DeliverPolicy::New
                    },
                    inactive_threshold: Duration::from_secs(60),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("failed to create a consumer: {e}"))?;
            let mut msgs = consumer
                .messages()
                .await
                .map_err(|e| format!("failed to read: {e}"))?;
            let mut n = 0;
            while count.is_none_or(|c| n < c) {
                let Some(m) = msgs.next().await else { break };
                let m = m.map_err(|e| format!("failed to read: {e}"))?;
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                let encoding = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Fabric-Encoding"))
                    .map(|v| v.as_str().to_owned());
                let value = fabricd::uplink::decode(&m.payload, encoding.as_deref(), 64 << 20)
                    .map_err(|e| format!("{} {id}: {e}", m.subject))?;
                println!(
                    "{} {id} {}",
                    m.subject,
                    String::from_utf8_lossy(&value).escape_debug()
                );
                n += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ED25519};

    #[test]
    fn an_allowlist_is_signed_json_and_bad_digests_are_named() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let d = format!("sha256:{}", "ab".repeat(32));
        let signed = allowlist(pkcs8.as_ref(), 7, std::slice::from_ref(&d)).unwrap();
        let (sig, body) = signed.split_at(64);
        UnparsedPublicKey::new(&ED25519, kp.public_key().as_ref())
            .verify(body, sig)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v, serde_json::json!({"version": 7, "digests": [d]}));
        for bad in [
            "sha256:AB",
            "md5:00",
            &format!("sha256:{}", "AB".repeat(32)),
        ] {
            let e = allowlist(pkcs8.as_ref(), 1, &[bad.to_string()]).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(allowlist(b"not a key", 1, &[d])
            .unwrap_err()
            .contains("PKCS#8"));
    }
}
