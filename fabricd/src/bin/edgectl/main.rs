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

mod update;

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
    Enroll {
        #[arg(long)]
        site: String,
        /// A CA certificate (PEM) of a TPM manufacturer the core trusts (repeat).
        #[arg(long = "manufacturer-ca", required = true)]
        manufacturer_cas: Vec<PathBuf>,
        /// A release the core accepts: NAME=PATH of the pcr11.json `cargo xtask image`
        /// wrote for it (repeat). Each must be signed by --release-key.
        #[arg(long = "release", required = true)]
        releases: Vec<String>,
        /// The release key: the image's PCR-policy public key (`pcr-policy.pub.pem` in
        /// the keys directory the image was built with, the UKI's `.pcrpkey`).
        #[arg(long)]
        release_key: PathBuf,
        /// The CA that signs client certificates (nats-config's --tls-ca) and its key.
        #[arg(long)]
        issuer_cert: PathBuf,
        #[arg(long)]
        issuer_key: PathBuf,
        /// The certificate subject of the site's boxes (nats-config's --site-subject).
        #[arg(long, default_value = "CN=site-{site}")]
        site_subject: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Stop after enrolling this many boxes.
        #[arg(long, default_value_t = 1)]
        boxes: usize,
        /// Give up when the boxes have not all enrolled by then.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
        /// The operator's escrow key (RSA public key, PEM, 2048 bits or more): each box
        /// sends its data partition's recovery key encrypted to it, kept with the box's
        /// enrollment record (`recovery-key` writes it out).
        #[arg(long)]
        escrow_key: Option<PathBuf>,
        /// The endorsement key fingerprint a box must have (repeat), as fabricd logs it
        /// when it asks ("endorsement key <hex>"); without it, any TPM that checks.
        #[arg(long = "ek-fingerprint")]
        ek_fingerprints: Vec<String>,
        /// Enroll a machine that is already enrolled, replacing its record (its escrowed
        /// recovery key is kept unless the box sends a new one).
        #[arg(long)]
        replace: bool,
    },
    /// Write a box's escrowed recovery key (still encrypted to the escrow key) to a file,
    /// and print the openssl command that opens it with the escrow key's private half.
    RecoveryKey {
        #[arg(long)]
        site: String,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// OS updates: publish a bundle to sites, see where each box stands.
    Update {
        #[command(subcommand)]
        cmd: update::UpdateCmd,
    },
    /// Each site and machine: records held, last offset, the box's acked offset and lag,
    /// drops and last contact.
    Status {
        /// Count only these topics (a NATS pattern, e.g. `sensors.>`).
        #[arg(long, default_value = ">")]
        topic: String,
        /// Releases the core accepts, NAME=PATH of their pcr11.json (repeat): each
        /// enrolled box's last boot report is replayed against them.
        #[arg(long = "release", requires = "release_key")]
        releases: Vec<String>,
        /// The key the releases must be signed by (as for `enroll`).
        #[arg(long)]
        release_key: Option<PathBuf>,
        /// A boot report older than this (by the box's clock against ours) is refused.
        #[arg(long, default_value_t = 900)]
        report_max_age_secs: u64,
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
    // `status` is a few listings and reads: a core that stops answering mid-way (a key
    // listing that never ends was seen once) is an error, not a hang. Publishing and
    // tailing may rightly take as long as they take.
    let limit = match cli.cmd {
        Cmd::Status { .. }
        | Cmd::Update {
            cmd: update::UpdateCmd::Status { .. },
        } => Some(std::time::Duration::from_secs(60)),
        _ => None,
    };
    let result = rt.block_on(async {
        match limit {
            Some(limit) => tokio::time::timeout(limit, run(cli))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "the core did not finish answering within {} s",
                        limit.as_secs()
                    ))
                }),
            None => run(cli).await,
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

/// The keys of KV bucket `bucket`, from its stream's subjects. Not the client's `keys()`:
/// that runs a consumer which, on a bucket the boxes keep writing to (their status every
/// few seconds), can wait for idle heartbeats before it knows it has seen every key. A
/// deleted key is still listed (its last entry is the delete).
async fn kv_keys(js: &async_nats::jetstream::Context, bucket: &str) -> Result<Vec<String>, String> {
    let failed = |e: &dyn std::fmt::Display| format!("failed to list {bucket}: {e}");
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| failed(&e))?;
    let prefix = format!("$KV.{bucket}.");
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| failed(&e))?;
    let mut keys = Vec::new();
    while let Some(item) = subjects.next().await {
        let (subject, _) = item.map_err(|e| failed(&e))?;
        if let Some(key) = subject.strip_prefix(&prefix) {
            keys.push(key.to_owned());
        }
    }
    keys.sort();
    Ok(keys)
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

/// The update key's public half (`update.pub`), as the boxes read theirs.
fn read_update_key(path: &Path) -> Result<Vec<u8>, String> {
    edge_update::read_public_key(path).map_err(|e| e.to_string())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
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

/// The operator's downlink signing key (ed25519 PKCS#8) from its file.
fn read_signing_key(path: &Path) -> Result<ring::signature::Ed25519KeyPair, String> {
    ring::signature::Ed25519KeyPair::from_pkcs8(&read(path)?)
        .map_err(|_| format!("{} is not an ed25519 PKCS#8 key", path.display()))
}

/// The 64-byte ed25519 signature of `body`, then `body`: how manifests and allowlists
/// travel, so the reader can split at 64 and verify.
fn sign_framed(kp: &ring::signature::Ed25519KeyPair, body: &[u8]) -> Vec<u8> {
    let mut signed = kp.sign(body).as_ref().to_vec();
    signed.extend_from_slice(body);
    signed
}

/// The names the core's stream, buckets and subjects go by (the global flags).
struct Names<'a> {
    prefix: &'a str,
    bucket: &'a str,
    objects: &'a str,
    status_bucket: &'a str,
}

use fabricd::config::is_token;

/// What a box of `site` may publish at the core, each with why fabricd needs it. Read off
/// fabricd's client calls (src/uplink.rs, src/downlink/) and the subjects async-nats
/// sends them on; a subject missing here shows as a permissions violation that ends the
/// box's session, which the site_authorization test would catch.
fn site_publish(n: &Names, site: &str) -> Vec<(String, &'static str)> {
    let Names {
        prefix,
        bucket,
        objects,
        status_bucket,
    } = n;
    vec![
        (
            format!("{prefix}.{site}.>"),
            "records of every machine of the site, and the downlink reports (<machine>._downlink)",
        ),
        (
            format!("$KV.{status_bucket}.{site}.*"),
            "each machine's status report, under its key <site>.<machine>",
        ),
        (
            format!("$JS.API.STREAM.INFO.KV_{bucket}"),
            "opening the config bucket",
        ),
        (
            format!("$JS.API.CONSUMER.CREATE.KV_{bucket}.*.$KV.{bucket}.{site}.>"),
            "watching the site's keys: a named consumer, whose filter nats-server checks against this subject",
        ),
        (
            format!("$JS.FC.KV_{bucket}.>"),
            "flow control replies of that watch",
        ),
        (
            format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{site}.>"),
            "reading the site's kv items (keys under <site>.)",
        ),
        (
            format!("$JS.API.STREAM.INFO.OBJ_{objects}"),
            "opening the object store and its stream",
        ),
        (
            format!("$JS.API.DIRECT.GET.OBJ_{objects}.$O.{objects}.M.*"),
            "an object's info (size, chunk id) by name: any object",
        ),
        (
            format!("$JS.API.CONSUMER.CREATE.OBJ_{objects}"),
            "reading an object's chunks (the filter is only in the request: any object)",
        ),
        (
            format!("$JS.FC.OBJ_{objects}.>"),
            "flow control replies of those reads",
        ),
    ]
}

/// A site's boxes may read only their site's keys of the config bucket (`<site>.` ...),
/// so a manifest naming another key could never be applied: refused before it is signed.
fn kv_items_of_site(manifest: &fabricd::downlink::Manifest, site: &str) -> Result<(), String> {
    let own = format!("{site}.");
    match manifest
        .items
        .iter()
        .find(|i| i.store == "kv" && !i.key.starts_with(&own))
    {
        Some(i) => Err(format!(
            "item `{}`: kv key `{}` is not under `{own}`, and the boxes of site {site} may read only their site's keys",
            i.name, i.key
        )),
        None => Ok(()),
    }
}

/// The registrar of `Cmd::Enroll`, from its files.
fn registrar(
    site: &str,
    cas: &[PathBuf],
    releases: &[String],
    release_key: &Path,
) -> Result<edge_tpm::enrollment::Registrar, String> {
    if !is_token(site) {
        return Err(format!(
            "site {site:?} must be letters, digits, '-' or '_' (it is a subject token)"
        ));
    }
    let mut trusted = Vec::new();
    for path in cas {
        let certs = edge_tpm::ek_certificate::pem_certificates("a manufacturer CA", &read(path)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        trusted.extend(certs);
    }
    Ok(edge_tpm::enrollment::Registrar::new(
        site,
        trusted,
        accepted_releases(releases, Some(release_key))?,
    ))
}

/// The releases of `--release NAME=PATH` flags, each checked against `--release-key`.
fn accepted_releases(
    flags: &[String],
    key: Option<&Path>,
) -> Result<Vec<edge_tpm::replay::Release>, String> {
    let Some(key_path) = key else {
        return Ok(Vec::new());
    };
    let key = edge_tpm::policy::parse_pcrpkey(&read(key_path)?)
        .map_err(|e| format!("--release-key {}: {e}", key_path.display()))?;
    flags
        .iter()
        .map(|r| {
            let (name, path) = r
                .split_once('=')
                .ok_or_else(|| format!("--release {r:?} is not NAME=PATH"))?;
            edge_tpm::replay::release(name, &read(&PathBuf::from(path))?, &key)
                .map_err(|e| format!("{path}: {e}"))
        })
        .collect()
}

fn unix_now() -> u64 {
    edge_common::unix_ms() / 1000
}

/// What `Cmd::Enroll` issues, and what it asks of a box beyond the registrar's checks.
struct Enrollment {
    subject: String,
    days: u32,
    ca: String,
    key: String,
    /// The escrow key (PEM) sent with each challenge.
    escrow: Option<String>,
    /// Endorsement key fingerprints the operator expects (none: any TPM that checks).
    ek_pins: Vec<String>,
    /// Enroll a machine that already has a record (its old one is replaced).
    replace: bool,
}

/// A box's enrollment record in the enrolled bucket, if it has one.
async fn enrolled_record(
    bucket: &async_nats::jetstream::kv::Store,
    key: &str,
) -> Result<Option<edge_tpm::enrollment::Enrolled>, String> {
    match bucket.get(key).await {
        Ok(Some(v)) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| format!("{key}: unreadable enrollment record: {e}")),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("failed to read {key}: {e}")),
    }
}

/// The checks of a request that are the operator's, not the TPM's: a machine name that
/// is a subject token, an expected endorsement key, no second enrollment by mistake.
async fn operator_checks(
    request: &edge_tpm::enrollment::Request,
    bucket: &async_nats::jetstream::kv::Store,
    site: &str,
    e: &Enrollment,
) -> Result<(), String> {
    let machine = &request.machine;
    if !is_token(machine) {
        return Err(format!(
            "machine {machine:?} must be letters, digits, '-' or '_'"
        ));
    }
    let fingerprint = edge_tpm::enrollment::ek_fingerprint(request);
    if !e.ek_pins.is_empty() && !e.ek_pins.contains(&fingerprint) {
        return Err(format!(
            "its endorsement key {fingerprint} is not one given with --ek-fingerprint"
        ));
    }
    if let Some(old) = enrolled_record(bucket, &format!("{site}.{machine}")).await? {
        if !e.replace {
            return Err(format!(
                "machine {machine} of site {site} is already enrolled (endorsement key {}); enroll it again with --replace",
                old.ek
            ));
        }
    }
    Ok(())
}

/// Answers the site's enrollment messages until `boxes` boxes hold a certificate. A
/// refused box is told why, the reason printed and kept in `last_refusal`, and the wait
/// goes on (one bad message must not stop a site's enrollment).
async fn enroll(
    client: &async_nats::Client,
    bucket: &async_nats::jetstream::kv::Store,
    site: &str,
    mut registrar: edge_tpm::enrollment::Registrar,
    e: &Enrollment,
    boxes: usize,
    last_refusal: &mut Option<String>,
) -> Result<(), String> {
    use edge_tpm::enrollment::{is_reply_subject, issue_certificate, Enrolled, Message, Reply};
    let subject = edge_tpm::enrollment::subject(site);
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| format!("cannot subscribe to {subject}: {e}"))?;
    // The subscription must reach the core before a box's request can.
    client
        .flush()
        .await
        .map_err(|e| format!("the core did not confirm the subscription: {e}"))?;
    println!("waiting for {boxes} box(es) of site {site} on {subject}");
    let mut enrolled = 0;
    while enrolled < boxes {
        let Some(msg) = sub.next().await else {
            return Err("the connection to the core ended".into());
        };
        // We answer with the operator's rights on a subject the box names: only ever
        // under the site's enrollment inbox.
        let Some(reply_to) = msg.reply.clone().filter(|r| is_reply_subject(site, r)) else {
            eprintln!(
                "ignored a message on {subject} whose reply subject {:?} is not under {}.",
                msg.reply.as_deref().unwrap_or(""),
                edge_tpm::enrollment::inbox_prefix(site)
            );
            continue;
        };
        let outcome: Result<Reply, String> = match serde_json::from_slice::<Message>(&msg.payload) {
            Err(err) => Err(format!("a message that is not an enrollment step: {err}")),
            Ok(Message::Request(request)) => {
                let checked = match operator_checks(&request, bucket, site, e).await {
                    Ok(()) => registrar.challenge(&request).map_err(|err| err.to_string()),
                    Err(why) => Err(why),
                };
                match checked {
                    Ok(credential) => {
                        let fingerprint = edge_tpm::enrollment::ek_fingerprint(&request);
                        println!(
                            "machine {} asks to enroll: endorsement key {fingerprint} ({:?}); credential sent",
                            request.machine, request.ek
                        );
                        Ok(Reply::Challenge {
                            credential,
                            escrow_key: e.escrow.clone(),
                        })
                    }
                    Err(why) => Err(format!("machine {}: {why}", request.machine)),
                }
            }
            Ok(Message::Answer(answer)) => {
                let admitted = registrar.admit(&answer).and_then(|a| {
                    issue_certificate(&e.subject, &a.site_key_pem, e.days, &e.ca, &e.key)
                        .map(|pem| (a, pem))
                });
                match admitted {
                    Ok((admitted, pem)) => {
                        let key = format!("{site}.{}", admitted.machine);
                        // A box enrolled again has escrowed its key before: keep that.
                        let old = enrolled_record(bucket, &key).await?;
                        let recovery = answer
                            .recovery
                            .clone()
                            .or_else(|| old.and_then(|o| o.recovery));
                        if e.escrow.is_some() && recovery.is_none() {
                            println!(
                                "machine {} sent no recovery key (core.enroll.recovery_key is not set on it)",
                                admitted.machine
                            );
                        }
                        // Recorded before the box hears it is enrolled: its boot reports
                        // are checked against this.
                        let record = Enrolled {
                            ak_public: admitted.ak_public.clone(),
                            ek: admitted.ek_fingerprint.clone(),
                            release: admitted.release.clone(),
                            slot: admitted.slot.clone(),
                            time: unix_now(),
                            recovery,
                        };
                        let body = serde_json::to_vec(&record)
                            .map_err(|err| format!("encode the enrollment record: {err}"))?;
                        bucket.put(&key, body.into()).await.map_err(|err| {
                            format!("failed to record the enrollment of {key}: {err}")
                        })?;
                        println!(
                            "enrolled machine {} of site {site}: TPM made by {}, booted release {} slot {}; certificate {} for {} days issued",
                            admitted.machine,
                            admitted.manufacturer.join(" <- "),
                            admitted.release,
                            admitted.slot,
                            e.subject,
                            e.days
                        );
                        enrolled += 1;
                        Ok(Reply::Certificate { pem })
                    }
                    Err(err) => Err(format!("machine {}: {err}", answer.machine)),
                }
            }
        };
        let reply = match outcome {
            Ok(reply) => reply,
            Err(why) => {
                println!("refused {why}");
                *last_refusal = Some(why.clone());
                Reply::Refused { reason: why }
            }
        };
        let body = serde_json::to_vec(&reply).map_err(|err| format!("encode the reply: {err}"))?;
        client
            .publish(reply_to, body.into())
            .await
            .map_err(|err| format!("cannot answer the box: {err}"))?;
        client
            .flush()
            .await
            .map_err(|err| format!("cannot answer the box: {err}"))?;
    }
    Ok(())
}

/// Who a certificate subject of the access configuration is.
enum User<'a> {
    Operator,
    Site(&'a str),
    Enroll(&'a str),
}

/// The core's access configuration (see `Cmd::NatsConfig`): nats-server's configuration
/// syntax, with a comment on every site subject saying why the box needs it.
fn nats_config(
    n: &Names,
    sites: &[String],
    [site_subject, enroll_subject]: [&str; 2],
    operators: &[String],
    tls: [&std::path::Path; 3],
) -> Result<String, String> {
    use std::fmt::Write;
    for (flag, subject) in [
        ("--site-subject", site_subject),
        ("--enroll-subject", enroll_subject),
    ] {
        if !subject.contains("{site}") {
            return Err(format!("{flag} {subject:?} must contain {{site}}"));
        }
    }
    let mut users: Vec<(String, User)> = operators
        .iter()
        .map(|o| (o.clone(), User::Operator))
        .collect();
    for site in sites {
        if !is_token(site) {
            return Err(format!(
                "site {site:?} must be letters, digits, '-' or '_' (it is a subject token)"
            ));
        }
        users.push((site_subject.replace("{site}", site), User::Site(site)));
        users.push((enroll_subject.replace("{site}", site), User::Enroll(site)));
    }
    let mut seen = std::collections::HashSet::new();
    for (subject, _) in &users {
        // Users are matched by the certificate's distinguished name; a value that needs
        // quoting or escaping is more likely a mistake than a subject the CA issues.
        if !subject.contains('=')
            || subject
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_control())
        {
            return Err(format!(
                "certificate subject {subject:?} must be a distinguished name like CN=site-s1,O=example, without quotes or backslashes"
            ));
        }
        if !seen.insert(subject.to_ascii_lowercase()) {
            return Err(format!(
                "certificate subject {subject:?} is given to two users"
            ));
        }
    }
    for (flag, path) in ["--tls-cert", "--tls-key", "--tls-ca"].iter().zip(tls) {
        let text = path.to_str().unwrap_or_default();
        if !path.is_absolute() || text.contains(['"', '\\']) || text.is_empty() {
            return Err(format!(
                "{flag} {} must be an absolute path (as nats-server sees it), without quotes or backslashes",
                path.display()
            ));
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `edgectl nats-config`: who may connect to the core and what each may do.\n\
         # Sites: {}. Include this file from nats-server.conf, which then has no tls or\n\
         # authorization block of its own, and reload nats-server (docs/fabric.md).\n\
         tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  \
         # A client certificate signed by ca_file is required; its subject names the user.\n  \
         verify_and_map: true\n  timeout: 5\n}}\n\
         authorization {{\n  users = [",
        sites.join(", "),
        tls[0].display(),
        tls[1].display(),
        tls[2].display()
    );
    for (subject, user) in &users {
        let site = match user {
            User::Operator => {
                let _ = writeln!(
                    out,
                    "    # An operator: everything.\n    {{ user: \"{subject}\" }}"
                );
                continue;
            }
            User::Enroll(site) => {
                let _ = writeln!(
                    out,
                    "    # Site {site}'s enrollment certificate: it may only ask to be enrolled\n    \
                     # (edgectl enroll checks the TPM) and read the answers.\n    \
                     {{\n      user: \"{subject}\"\n      permissions: {{\n        \
                     publish: {{ allow: [\"{}\"] }}\n        \
                     subscribe: {{ allow: [\"{}.>\"] }}\n      }}\n    }}",
                    edge_tpm::enrollment::subject(site),
                    edge_tpm::enrollment::inbox_prefix(site)
                );
                continue;
            }
            User::Site(site) => site,
        };
        let _ = writeln!(
            out,
            "    # Site {site}: every box of the site presents a certificate with this subject.\n    \
             {{\n      user: \"{subject}\"\n      permissions: {{\n        publish: {{\n          allow: ["
        );
        for (subject, why) in site_publish(n, site) {
            let _ = writeln!(out, "            # {why}\n            \"{subject}\"");
        }
        let _ = writeln!(
            out,
            "          ]\n        }}\n        subscribe: {{\n          allow: [\n            \
             # replies and consumer deliveries, on the box's own inbox prefix\n            \
             \"{}.>\"\n          ]\n        }}\n      }}\n    }}",
            fabricd::uplink::inbox_prefix(site)
        );
    }
    out.push_str("  ]\n}\n");
    Ok(out)
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
                std::fs::write(path, text)
                    .map_err(|e| format!("failed to write {}: {e}", path.display()))?;
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
        let b =
            edge_update::open(bundle, &key).map_err(|e| format!("{}: {e}", bundle.display()))?;
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
            .map_err(|_| "failed to generate a key".to_string())?;
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| "failed to use the generated key".to_string())?;
        std::fs::create_dir_all(out)
            .map_err(|e| format!("failed to create {}: {e}", out.display()))?;
        let hex = edge_common::hex::encode(kp.public_key().as_ref());
        for (file, data) in [
            (format!("{name}.key"), pkcs8.as_ref().to_vec()),
            (format!("{name}.pub"), format!("{hex}\n").into_bytes()),
        ] {
            let p = out.join(file);
            std::fs::write(&p, data)
                .map_err(|e| format!("failed to write {}: {e}", p.display()))?;
        }
        println!(
            "public key {hex} (ship {} in the image)",
            out.join(format!("{name}.pub")).display()
        );
        return Ok(());
    }
    let client = connect(&cli).await?;
    let js = async_nats::jetstream::new(client.clone());
    match &cli.cmd {
        Cmd::Enroll {
            site,
            manufacturer_cas,
            releases,
            release_key,
            issuer_cert,
            issuer_key,
            site_subject,
            days,
            boxes,
            timeout_secs,
            escrow_key,
            ek_fingerprints,
            replace,
        } => {
            if !(1..=edge_tpm::enrollment::MAX_DAYS).contains(days) {
                return Err(format!(
                    "--days {days}: 1 to {} are issued",
                    edge_tpm::enrollment::MAX_DAYS
                ));
            }
            let registrar = registrar(site, manufacturer_cas, releases, release_key)?;
            let escrow = match escrow_key {
                Some(path) => {
                    let pem = String::from_utf8(read(path)?)
                        .map_err(|_| format!("{} is not PEM text", path.display()))?;
                    edge_tpm::enrollment::escrow_key(&pem)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    Some(pem)
                }
                None => None,
            };
            let enrollment = Enrollment {
                subject: site_subject.replace("{site}", site),
                days: *days,
                ca: String::from_utf8(read(issuer_cert)?)
                    .map_err(|_| format!("{} is not PEM text", issuer_cert.display()))?,
                key: String::from_utf8(read(issuer_key)?)
                    .map_err(|_| format!("{} is not PEM text", issuer_key.display()))?,
                escrow,
                ek_pins: ek_fingerprints
                    .iter()
                    .map(|f| f.to_ascii_lowercase())
                    .collect(),
                replace: *replace,
            };
            let enrolled = js.get_key_value(&cli.enrolled_bucket).await.map_err(|e| {
                format!(
                    "no KV bucket {} (run edgectl setup): {e}",
                    cli.enrolled_bucket
                )
            })?;
            let wait = Duration::from_secs(*timeout_secs);
            let mut last_refusal = None;
            let enrolling = enroll(
                &client,
                &enrolled,
                site,
                registrar,
                &enrollment,
                *boxes,
                &mut last_refusal,
            );
            let finished = tokio::time::timeout(wait, enrolling).await;
            match finished {
                Ok(result) => result?,
                Err(_) => {
                    return Err(match last_refusal {
                        Some(why) => format!(
                            "no box of site {site} enrolled within {timeout_secs} s; the last refused: {why}"
                        ),
                        None => format!(
                            "no box of site {site} finished enrolling within {timeout_secs} s (is it provisioned with an enroll-{site} certificate, and can it reach the core?)"
                        ),
                    })
                }
            }
        }
        Cmd::RecoveryKey { site, machine, out } => {
            let key = format!("{site}.{machine}");
            let bucket = js
                .get_key_value(&cli.enrolled_bucket)
                .await
                .map_err(|e| format!("no KV bucket {}: {e}", cli.enrolled_bucket))?;
            let record = bucket
                .get(&key)
                .await
                .map_err(|e| format!("failed to read {key}: {e}"))?
                .ok_or_else(|| format!("{key} is not enrolled"))?;
            let record: edge_tpm::enrollment::Enrolled = serde_json::from_slice(&record)
                .map_err(|e| format!("{key}: unreadable enrollment record: {e}"))?;
            let sealed = record
                .recovery
                .ok_or_else(|| format!("{key} escrowed no recovery key at enrollment"))?;
            let sealed = edge_tpm::policy::base64_decode(&sealed)
                .map_err(|e| format!("{key}: the escrowed recovery key is not base64: {e}"))?;
            std::fs::write(out, sealed)
                .map_err(|e| format!("failed to write {}: {e}", out.display()))?;
            println!(
                "the recovery key of {key}, encrypted to the escrow key, is in {0}; open it with
  openssl pkeyutl -decrypt -inkey escrow.key -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -in {0}",
                out.display()
            );
        }
        Cmd::Keygen { .. }
        | Cmd::Allowlist { .. }
        | Cmd::NatsConfig { .. }
        | Cmd::VerifyBundle { .. } => {
            unreachable!("handled above")
        }
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
            let hex = edge_common::hex::encode(digest.as_ref());
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
            let parsed: fabricd::downlink::Manifest = serde_json::from_slice(&body)
                .map_err(|e| format!("{} is not a manifest: {e}", manifest.display()))?;
            kv_items_of_site(&parsed, site).map_err(|e| format!("{}: {e}", manifest.display()))?;
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
        Cmd::Update { cmd } => {
            update::run(cmd, &js, &cli.bucket, &cli.objects, &cli.status_bucket).await?;
        }
        Cmd::Status {
            topic,
            releases,
            release_key,
            report_max_age_secs,
        } => {
            let releases = accepted_releases(releases, release_key.as_deref())?;
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
            for key in kv_keys(&js, &cli.status_bucket).await? {
                let Ok(Some(entry)) = reports.entry(&key).await else {
                    continue;
                };
                if entry.operation != async_nats::jetstream::kv::Operation::Put {
                    continue;
                }
                let row = machines.entry(key.clone()).or_default();
                row.contact = row.contact.max(entry.created.unix_timestamp());
                match serde_json::from_slice::<fabricd::uplink::BoxStatus>(&entry.value) {
                    Ok(s) => row.status = Some(s),
                    Err(e) => eprintln!("{key}: unreadable status report: {e}"),
                }
            }
            // Each enrolled box's record (none before any enrollment, or for boxes given a
            // certificate by hand).
            let mut enrolled = std::collections::HashMap::new();
            if let Ok(bucket) = js.get_key_value(&cli.enrolled_bucket).await {
                if let Ok(keys) = kv_keys(&js, &cli.enrolled_bucket).await {
                    for key in keys {
                        if let Ok(Some(v)) = bucket.get(&key).await {
                            match serde_json::from_slice::<edge_tpm::enrollment::Enrolled>(&v) {
                                Ok(e) => {
                                    enrolled.insert(key, e);
                                }
                                Err(e) => eprintln!("{key}: unreadable enrollment record: {e}"),
                            }
                        }
                    }
                }
            }
            let now = unix_now() as i64;
            let mut refusals = Vec::new();
            // `box acked` and the lag are what the box last reported (`?`: no report yet).
            // `boot`: the release and slot its last boot report replays to (`quoted`: its
            // quote checks, no --release given; `-`: not enrolled; `MISSING`: enrolled
            // but no boot report; `REFUSED`: the reason is printed below the table).
            println!(
                "{:<28} {:>10} {:>12} {:>10} {:>12} {:>12} {:>8} {:>14} {:>14}",
                "site.machine",
                "records",
                "last offset",
                "box acked",
                "lag records",
                "lag bytes",
                "dropped",
                "last contact",
                "boot"
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
                let boot = match (
                    enrolled.get(&m),
                    row.status.as_ref().and_then(|s| s.boot.as_ref()),
                ) {
                    (Some(e), Some(report)) => match edge_tpm::enrollment::check_report(
                        e,
                        report,
                        now as u64,
                        *report_max_age_secs,
                        &releases,
                    ) {
                        Ok(Some((release, slot))) => format!("{release}/{slot}"),
                        Ok(None) => "quoted".into(),
                        Err(e) => {
                            refusals.push(format!("{m}: boot report refused: {e}"));
                            "REFUSED".into()
                        }
                    },
                    // Enrolled, and no boot in its report: a box that stopped quoting
                    // (or never reported) is not taken on trust.
                    (Some(_), None) => {
                        refusals.push(format!(
                            "{m}: enrolled, but its last status report has no boot report"
                        ));
                        "MISSING".into()
                    }
                    (None, _) => "-".into(),
                };
                println!(
                    "{m:<28} {:>10} {:>12} {acked:>10} {lag:>12} {lag_bytes:>12} {dropped:>8} {:>12}s ago {boot:>14}",
                    row.records,
                    row.last_offset,
                    now - row.contact
                );
            }
            for r in refusals {
                println!("{r}");
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

    const NAMES: Names = Names {
        prefix: "edge",
        bucket: "edge-config",
        objects: "edge-objects",
        status_bucket: "edge-status",
    };

    fn config(sites: &[&str], subject: &str, operators: &[&str]) -> Result<String, String> {
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
            let e = kv_items_of_site(&manifest(key), "s1").unwrap_err();
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
            let e = config(sites, subject, operators).unwrap_err();
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
        .unwrap_err();
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
            let e = allowlist(pkcs8.as_ref(), 1, &[bad.to_string()]).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(allowlist(b"not a key", 1, &[d])
            .unwrap_err()
            .contains("PKCS#8"));
    }
}
