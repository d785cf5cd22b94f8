//! edgectl: the operator's tool on the core side. Sets up the stream, KV bucket and
//! object store the edges mirror into and download from, writes the core's access
//! configuration (which certificate may do what), makes the manifest signing key,
//! publishes objects and signed manifests to one site or one machine, shows each site's
//! last contact, and tails a site's topics.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use ring::signature::KeyPair;

mod access;
mod enroll;
mod error;
mod logs;
mod prometheus;
mod publish;
mod status;
mod tail;
mod update;

use access::nats_config;
use enroll::accepted_releases;
use error::{Error, Result};
use fabricd::config::is_token;
use publish::{allowlist, kv_items_of_site, read_signing_key, sign_framed};

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
    /// Seconds to wait for the connection, and for each answer of the core's JetStream
    /// (a cluster loaded by many sites can take longer than a single server).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout: u64,
    /// For how many seconds `setup`, `put-object`, `put-kv`, `publish`, `update publish`
    /// and `status` try again, 2 s apart, when the core does not answer (a server of a
    /// cluster gone, the connection refused or lost, a request timed out); 0: once.
    #[arg(long, default_value_t = 60)]
    retry_secs: u64,
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
    /// KV bucket where `enroll` records each enrolled box (its attestation key), which
    /// `status` checks the boxes' boot reports against. The boxes cannot reach it.
    #[arg(long, default_value = "edge-enrolled")]
    enrolled_bucket: String,
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
        /// How many servers of a JetStream cluster keep each stream and bucket (1 to 5).
        /// Default: 3 when the server is in a cluster, else 1 (docs/fleet.md).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: Option<u8>,
    },
    /// Write the core's access configuration for nats-server: its `tls` block (client
    /// certificates required and mapped to users by subject) and an `authorization` block
    /// with the operator's users (everything) and one user per site, allowed only that
    /// site's subjects. Include the file from nats-server.conf and reload.
    NatsConfig {
        /// A site the core serves (repeat the flag per site).
        #[arg(long = "site", required = true)]
        sites: Vec<String>,
        /// The certificate subject of a site's boxes; `{site}` becomes the site's name.
        #[arg(long, default_value = "CN=site-{site}")]
        site_subject: String,
        /// The certificate subject of a site's enrollment certificate, which a new box
        /// is provisioned with to ask `edgectl enroll` for its site certificate.
        #[arg(long, default_value = "CN=enroll-{site}")]
        enroll_subject: String,
        /// The certificate subject of an operator (repeat for more); they may do anything.
        #[arg(long = "operator", default_value = "CN=edge-operator")]
        operators: Vec<String>,
        /// The core's server certificate and key, and the CA that signs client certificates.
        #[arg(long)]
        tls_cert: PathBuf,
        #[arg(long)]
        tls_key: PathBuf,
        #[arg(long)]
        tls_ca: PathBuf,
        /// Where to write the configuration (standard output without it).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Make an ed25519 signing key (`<out>/<name>.key`, PKCS#8) and the public key for
    /// the image (`<out>/<name>.pub`, hex): `manifest` signs what the core sends down,
    /// `update` signs OS update bundles (docs/update.md).
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "manifest", value_parser = ["manifest", "update"])]
        name: String,
    },
    /// Check an OS update bundle as a box will (the archive, the signature by the update
    /// key, the manifest, every part and every block of the root) and print what it
    /// holds. Needs no core.
    VerifyBundle {
        /// The update key's public half (`update.pub`, 64 hex digits).
        #[arg(long)]
        update_key: PathBuf,
        bundle: PathBuf,
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
    /// Enroll a site's box: wait for it to ask (it provisions an `enroll-<site>`
    /// certificate), check its TPM (the EK certificate against the manufacturers' CAs,
    /// credential activation for its attestation key, a fresh quote replayed against the
    /// accepted releases, the site key's certification) and only then issue the site's
    /// client certificate for its TPM key. A refused box is told why, and edgectl prints
    /// it and waits on.
    Enroll(enroll::Args),
    /// Write a box's escrowed recovery key (still encrypted to the escrow key) to a file,
    /// and print the openssl command that opens it with the escrow key's private half.
    RecoveryKey(enroll::RecoveryArgs),
    /// OS updates: publish a bundle to sites, see where each box stands.
    Update {
        #[command(subcommand)]
        cmd: update::UpdateCmd,
    },
    /// Each site and machine: records held, last offset, the box's acked offset and lag,
    /// drops and last contact.
    Status(status::Args),
    /// Print a site's records as they arrive (`--all` from the start).
    Tail(tail::Args),
    /// Write the boxes' metrics (what their fabricd scrapes) into Prometheus through its
    /// remote-write receiver, each sample at the time its box scraped it. Runs until
    /// stopped; a durable consumer, so a restart goes on where it stopped.
    Prometheus(prometheus::Args),
    /// A box's service or pod logs as its fabricd sent them: what the core holds, then
    /// (`-f`) what arrives.
    Logs(logs::Args),
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
    // `status` is a few listings and reads: a core that stops answering mid-way (a key
    // listing that never ends was seen once) is an error, not a hang. Publishing and
    // tailing may rightly take as long as they take.
    let limit = match cli.cmd {
        Cmd::Status(_)
        | Cmd::Update {
            cmd: update::UpdateCmd::Status { .. },
        } => Some(std::time::Duration::from_secs(60)),
        _ => None,
    };
    let retry_for = match &cli.cmd {
        Cmd::Setup { .. }
        | Cmd::PutObject { .. }
        | Cmd::PutKv { .. }
        | Cmd::Publish { .. }
        | Cmd::Status(_)
        | Cmd::Update {
            cmd: update::UpdateCmd::Publish { .. },
        } => Duration::from_secs(cli.retry_secs),
        _ => Duration::ZERO,
    };
    let began = std::time::Instant::now();
    let result = rt.block_on(async {
        loop {
            let result = match limit {
                Some(limit) => tokio::time::timeout(limit, run(&cli))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::Timeout {
                            secs: limit.as_secs(),
                        })
                    }),
                None => run(&cli).await,
            };
            match result {
                Err(e) if unanswered(&e) && began.elapsed() + RETRY_PAUSE < retry_for => {
                    eprintln!(
                        "edgectl: {e}; trying again in {RETRY_PAUSE:?} (--retry-secs {})",
                        retry_for.as_secs()
                    );
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                done => break done,
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgectl: {e}");
            ExitCode::FAILURE
        }
    }
}

const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Whether the core left a command unanswered (worth trying the whole command again on a
/// new connection, for those that do the same when done twice): the connection refused
/// or lost, a request timed out or found no responder (a cluster moving a stream off a
/// server that is gone), or no answer within `status`'s limit. A refusal or a missing
/// bucket is said at once.
fn unanswered(e: &Error) -> bool {
    match e {
        Error::Timeout { .. } | Error::Fabric(fabricd::Error::Ended { .. }) => true,
        Error::Fabric(fabricd::Error::Core { op, detail }) => {
            op.starts_with("cannot connect")
                || ["timed out", "no responders", "disconnected", "broken pipe"]
                    .iter()
                    .any(|w| detail.to_lowercase().contains(w))
        }
        Error::In { source, .. } => unanswered(source),
        _ => false,
    }
}

/// The keys of KV bucket `bucket`, from its stream's subjects. Not the client's `keys()`:
/// that runs a consumer which, on a bucket the boxes keep writing to (their status every
/// few seconds), can wait for idle heartbeats before it knows it has seen every key. A
/// deleted key is still listed (its last entry is the delete).
async fn kv_keys(js: &async_nats::jetstream::Context, bucket: &str) -> Result<Vec<String>> {
    let failed = format!("failed to list {bucket}");
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(fabricd::Error::core(&failed))?;
    let prefix = format!("$KV.{bucket}.");
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(fabricd::Error::core(&failed))?;
    let mut keys = Vec::new();
    while let Some(item) = subjects.next().await {
        let (subject, _) = item.map_err(fabricd::Error::core(&failed))?;
        if let Some(key) = subject.strip_prefix(&prefix) {
            keys.push(key.to_owned());
        }
    }
    keys.sort();
    Ok(keys)
}

async fn connect(cli: &Cli) -> Result<async_nats::Client> {
    let mut opts =
        async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(cli.timeout));
    if let Some(ca) = &cli.ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(opts
        .connect(cli.server.as_str())
        .await
        .map_err(fabricd::Error::core(format!(
            "cannot connect to {}",
            cli.server
        )))?)
}

/// The update key's public half (`update.pub`), as the boxes read theirs.
fn read_update_key(path: &Path) -> Result<Vec<u8>> {
    edge_update::read_public_key(path).map_err(Error::UpdateKey)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    Ok(std::fs::read(path).map_err(fabricd::Error::io("read", path))?)
}

/// The names the core's stream, buckets and subjects go by (the global flags).
struct Names<'a> {
    prefix: &'a str,
    stream: &'a str,
    bucket: &'a str,
    objects: &'a str,
    status_bucket: &'a str,
}

fn unix_now() -> u64 {
    edge_common::unix_ms() / 1000
}

async fn run(cli: &Cli) -> Result<()> {
    use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
    if let Cmd::Allowlist {
        signing_key,
        version,
        out,
        digests,
    } = &cli.cmd
    {
        let signed = allowlist(&read(signing_key)?, *version, digests)
            .map_err(Error::within(signing_key.display()))?;
        std::fs::write(out, signed).map_err(fabricd::Error::io("write", out))?;
        println!(
            "allowlist version {version} with {} digest(s) written to {}",
            digests.len(),
            out.display()
        );
        return Ok(());
    }
    if let Cmd::NatsConfig {
        sites,
        site_subject,
        enroll_subject,
        operators,
        tls_cert,
        tls_key,
        tls_ca,
        out,
    } = &cli.cmd
    {
        let names = Names {
            prefix: &cli.prefix,
            stream: &cli.stream,
            bucket: &cli.bucket,
            objects: &cli.objects,
            status_bucket: &cli.status_bucket,
        };
        let text = nats_config(
            &names,
            sites,
            [site_subject, enroll_subject],
            operators,
            [tls_cert, tls_key, tls_ca].map(PathBuf::as_path),
        )?;
        match out {
            Some(path) => {
                std::fs::write(path, text).map_err(fabricd::Error::io("write", path))?;
                println!(
                    "access for {} site(s) and {} operator(s) written to {}",
                    sites.len(),
                    operators.len(),
                    path.display()
                );
            }
            None => print!("{text}"),
        }
        return Ok(());
    }
    if let Some(done) = match &cli.cmd {
        Cmd::Update { cmd } => update::offline(cmd),
        _ => None,
    } {
        return done;
    }
    if let Cmd::VerifyBundle { update_key, bundle } = &cli.cmd {
        let key = read_update_key(update_key)?;
        let b = edge_update::open(bundle, &key).map_err(Error::bundle(bundle))?;
        let m = &b.manifest;
        println!(
            "{}: {} {} (security version {}, kernel {}), signed by the update key; root hash {}",
            bundle.display(),
            m.name,
            m.version,
            m.security_version,
            m.kernel_release,
            m.roothash
        );
        for p in &m.parts {
            println!("  {:<16} {:>12} bytes  sha256 {}", p.name, p.size, p.sha256);
        }
        println!(
            "every part and all {} blocks of the root check",
            m.root_blocks()
        );
        return Ok(());
    }
    if let Cmd::Keygen { out, name } = &cli.cmd {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| Error::Keygen("generate a key"))?;
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| Error::Keygen("use the generated key"))?;
        std::fs::create_dir_all(out).map_err(fabricd::Error::io("create", out))?;
        let hex = edge_common::hex::encode(kp.public_key().as_ref());
        for (file, data) in [
            (format!("{name}.key"), pkcs8.as_ref().to_vec()),
            (format!("{name}.pub"), format!("{hex}\n").into_bytes()),
        ] {
            let p = out.join(file);
            std::fs::write(&p, data).map_err(fabricd::Error::io("write", &p))?;
        }
        println!(
            "public key {hex} (ship {} in the image)",
            out.join(format!("{name}.pub")).display()
        );
        return Ok(());
    }
    let client = connect(cli).await?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(cli.timeout))
        .build(client.clone());
    match &cli.cmd {
        Cmd::Enroll(args) => enroll::run(cli, &client, &js, args).await?,
        Cmd::RecoveryKey(args) => enroll::recovery_key(cli, &js, args).await?,
        Cmd::Keygen { .. }
        | Cmd::Allowlist { .. }
        | Cmd::NatsConfig { .. }
        | Cmd::VerifyBundle { .. } => {
            unreachable!("handled above")
        }
        Cmd::Setup {
            dupe_window_secs,
            replicas,
        } => {
            let info = client.server_info();
            let replicas = match (replicas, &info.cluster) {
                (Some(r), _) => usize::from(*r),
                (None, Some(_)) => 3,
                (None, None) => 1,
            };
            match &info.cluster {
                Some(c) => println!(
                    "cluster {c} (through {}): {replicas} replica(s) each",
                    info.server_name
                ),
                None => println!(
                    "a single server ({}): {replicas} replica(s) each",
                    info.server_name
                ),
            }
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
                num_replicas: replicas,
                ..Default::default()
            };
            let streams = [
                Config {
                    name: cli.stream.clone(),
                    subjects: vec![format!("{}.>", cli.prefix)],
                    duplicate_window: Duration::from_secs(*dupe_window_secs),
                    storage: StorageType::File,
                    // A box asks for the last message on its subjects before it resends
                    // (fabricd/src/resume.rs).
                    allow_direct: true,
                    num_replicas: replicas,
                    ..Default::default()
                },
                kv_layout(&cli.bucket),
                kv_layout(&cli.status_bucket),
                kv_layout(&cli.enrolled_bucket),
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
                    num_replicas: replicas,
                    ..Default::default()
                },
            ];
            for config in streams {
                let name = config.name.clone();
                js.get_or_create_stream(config.clone())
                    .await
                    .map_err(fabricd::Error::core(format!(
                        "failed to create stream {name}"
                    )))?;
                // A stream made by an older edgectl gets today's settings.
                js.update_stream(config)
                    .await
                    .map_err(fabricd::Error::core(format!(
                        "failed to update stream {name}"
                    )))?;
                println!("stream {name} ready ({replicas} replica(s))");
            }
        }
        Cmd::PutObject { name, file } => {
            let store = js
                .get_object_store(&cli.objects)
                .await
                .map_err(fabricd::Error::core(format!(
                    "no object store {}",
                    cli.objects
                )))?;
            let mut f = tokio::fs::File::open(file)
                .await
                .map_err(fabricd::Error::io("open", file))?;
            store
                .put(name.as_str(), &mut f)
                .await
                .map_err(fabricd::Error::core(format!("failed to put object {name}")))?;
            let digest = ring::digest::digest(&ring::digest::SHA256, &read(file)?);
            let hex = edge_common::hex::encode(digest.as_ref());
            println!("object {name} sha256 {hex}");
        }
        Cmd::PutKv { kv_key, file } => {
            let kv = js
                .get_key_value(&cli.bucket)
                .await
                .map_err(fabricd::Error::core(format!("no KV bucket {}", cli.bucket)))?;
            let data = read(file)?;
            let digest = ring::digest::digest(&ring::digest::SHA256, &data);
            kv.put(kv_key, data.into())
                .await
                .map_err(fabricd::Error::core(format!("failed to put {kv_key}")))?;
            let hex = edge_common::hex::encode(digest.as_ref());
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
            let parsed: fabricd::downlink::Manifest = serde_json::from_slice(&body).map_err(
                fabricd::Error::json(format!("{} is not a manifest", manifest.display())),
            )?;
            kv_items_of_site(&parsed, site).map_err(Error::within(manifest.display()))?;
            let kp = read_signing_key(signing_key)?;
            let signed = sign_framed(&kp, &body);
            fabricd::downlink::verify_manifest(&signed, kp.public_key().as_ref())?;
            let key = match machine {
                Some(m) => format!("{site}.{m}.manifest"),
                None => format!("{site}.manifest"),
            };
            let kv = js
                .get_key_value(&cli.bucket)
                .await
                .map_err(fabricd::Error::core(format!("no KV bucket {}", cli.bucket)))?;
            kv.put(&key, signed.into())
                .await
                .map_err(fabricd::Error::core(format!("failed to put {key}")))?;
            println!(
                "manifest version {} with {} items published to {key}",
                parsed.version,
                parsed.items.len()
            );
        }
        Cmd::Update { cmd } => {
            update::run(cmd, &js, &cli.bucket, &cli.objects, &cli.status_bucket).await?;
        }
        Cmd::Status(args) => status::run(cli, &js, args).await?,
        Cmd::Tail(args) => tail::run(cli, &js, args).await?,
        Cmd::Prometheus(args) => prometheus::run(cli, &js, args).await?,
        Cmd::Logs(args) => logs::run(cli, &js, args).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ED25519};

    const NAMES: Names = Names {
        prefix: "edge",
        stream: "EDGE",
        bucket: "edge-config",
        objects: "edge-objects",
        status_bucket: "edge-status",
    };

    fn config(sites: &[&str], subject: &str, operators: &[&str]) -> Result<String> {
        let sites: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
        let operators: Vec<String> = operators.iter().map(|s| s.to_string()).collect();
        let p = std::path::Path::new;
        nats_config(
            &NAMES,
            &sites,
            [subject, "CN=enroll-{site}"],
            &operators,
            [
                p("/etc/nats/server.pem"),
                p("/etc/nats/server.key"),
                p("/etc/nats/ca.pem"),
            ],
        )
    }

    #[test]
    fn the_access_configuration_gives_each_site_only_its_own_subjects() {
        let text = config(&["s1", "s-2"], "CN=box,OU={site},O=acme", &["CN=ops"]).unwrap();
        assert!(text.contains("verify_and_map: true"), "{text}");
        assert!(text.contains("ca_file: \"/etc/nats/ca.pem\""), "{text}");
        assert!(text.contains("{ user: \"CN=ops\" }"), "{text}");
        let (s1, s2) = text.split_once("user: \"CN=box,OU=s-2,O=acme\"").unwrap();
        assert!(s1.contains("user: \"CN=box,OU=s1,O=acme\""), "{text}");
        for (part, own, other) in [(s1, "s1", "s-2"), (s2, "s-2", "s1")] {
            let part = &part[part.find("permissions").unwrap()..];
            assert!(part.contains(&format!("\"edge.{own}.>\"")), "{part}");
            assert!(
                part.contains(&format!(
                    "\"$JS.API.DIRECT.GET.KV_edge-config.$KV.edge-config.{own}.>\""
                )),
                "{part}"
            );
            assert!(part.contains(&format!("\"_INBOX_{own}.>\"")), "{part}");
            assert!(!part.contains(&format!(".{other}.")), "{part}");
        }
        // A site's enrollment certificate may ask to be enrolled and hear the answer,
        // and nothing else.
        let enroll = &text[text.find("user: \"CN=enroll-s1\"").unwrap()..];
        let enroll = &enroll[..enroll.find("\n    }").unwrap()];
        assert!(
            enroll.contains("publish: { allow: [\"edgeos.enroll.s1\"] }")
                && enroll.contains("subscribe: { allow: [\"_ENROLL_s1.>\"] }")
                && enroll.matches('"').count() == 6,
            "{enroll}"
        );
    }

    #[test]
    fn a_manifest_may_name_only_kv_keys_of_its_site() {
        let manifest = |key: &str| -> fabricd::downlink::Manifest {
            serde_json::from_value(serde_json::json!({"version": 1, "items": [
                {"kind": "models", "name": "m", "store": "object", "key": "any", "sha256": "0"},
                {"kind": "config", "name": "app.toml", "store": "kv", "key": key, "sha256": "0"},
            ]}))
            .unwrap()
        };
        assert!(kv_items_of_site(&manifest("s1.cfg.app"), "s1").is_ok());
        for key in ["s2.cfg.app", "s10.cfg", "s1"] {
            let e = kv_items_of_site(&manifest(key), "s1")
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{key}`")), "{e}");
        }
    }

    #[test]
    fn a_bad_site_subject_or_path_is_named() {
        for (sites, subject, operators, needle) in [
            (&["s.1"][..], "CN=site-{site}", &["CN=ops"][..], "\"s.1\""),
            (&["s1"], "CN=site", &["CN=ops"], "{site}"),
            (&["s1"], "site-{site}", &["CN=ops"], "\"site-s1\""),
            (&["s1"], "CN=site-{site}", &["CN=\"ops\""], "without quotes"),
            (&["s1"], "CN=ops{site}", &["CN=opss1"], "two users"),
            (&["s1", "s1"], "CN=site-{site}", &["CN=ops"], "two users"),
            (&["s1"], "CN=enroll-{site}", &["CN=ops"], "two users"),
        ] {
            let e = config(sites, subject, operators).unwrap_err().to_string();
            assert!(e.contains(needle), "{sites:?} {subject}: {e}");
        }
        let sites = ["s1".to_string()];
        let p = std::path::Path::new;
        let e = nats_config(
            &NAMES,
            &sites,
            ["CN=site-{site}", "CN=enroll-{site}"],
            &["CN=ops".into()],
            [p("server.pem"), p("/k"), p("/c")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--tls-cert server.pem"), "{e}");
    }

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
            let e = allowlist(pkcs8.as_ref(), 1, &[bad.to_string()])
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(allowlist(b"not a key", 1, &[d])
            .unwrap_err()
            .to_string()
            .contains("PKCS#8"));
    }

    #[test]
    fn only_a_core_that_did_not_answer_is_asked_again() {
        let core = |op: &str, detail: &str| {
            Error::Fabric(fabricd::Error::Core {
                op: op.into(),
                detail: detail.into(),
            })
        };
        assert!(unanswered(&core(
            "cannot connect to tls://n0:4222",
            "IO error"
        )));
        assert!(unanswered(&core("failed to put s1", "timed out")));
        assert!(unanswered(&core(
            "no KV bucket edge-config",
            "no responders"
        )));
        assert!(unanswered(&Error::Timeout { secs: 60 }));
        assert!(unanswered(&Error::Fabric(fabricd::Error::lost(None))));
        // A refusal, a missing bucket, a bad manifest: said at once.
        assert!(!unanswered(&core(
            "failed to put s1",
            "permissions violation"
        )));
        assert!(!unanswered(&core(
            "no KV bucket edge-config",
            "stream not found"
        )));
        assert!(!unanswered(&Error::NoSites));
    }
}
