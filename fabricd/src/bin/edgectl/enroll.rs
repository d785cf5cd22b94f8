//! `edgectl enroll` and `edgectl recovery-key`: the core's side of a box's enrollment
//! (the registrar's checks, the certificate issued, the recovery key escrowed) and the
//! escrowed key read back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;

use fabricd::config::is_token;

use crate::error::{Error, Result};
use crate::{read, unix_now, Cli};

#[derive(clap::Args)]
pub(crate) struct Args {
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
}

#[derive(clap::Args)]
pub(crate) struct RecoveryArgs {
    #[arg(long)]
    site: String,
    #[arg(long)]
    machine: String,
    #[arg(long)]
    out: PathBuf,
}

/// The registrar of `Cmd::Enroll`, from its files.
pub(crate) fn registrar(
    site: &str,
    cas: &[PathBuf],
    releases: &[String],
    release_key: &Path,
) -> Result<edge_tpm::enrollment::Registrar> {
    if !is_token(site) {
        return Err(Error::invalid(
            format!("site {site:?}"),
            "must be letters, digits, '-' or '_' (it is a subject token)",
        ));
    }
    let mut trusted = Vec::new();
    for path in cas {
        let certs = edge_tpm::ek_certificate::pem_certificates("a manufacturer CA", &read(path)?)
            .map_err(Error::tpm(path.display()))?;
        trusted.extend(certs);
    }
    Ok(edge_tpm::enrollment::Registrar::new(
        site,
        trusted,
        accepted_releases(releases, Some(release_key))?,
    ))
}

/// The releases of `--release NAME=PATH` flags, each checked against `--release-key`.
pub(crate) fn accepted_releases(
    flags: &[String],
    key: Option<&Path>,
) -> Result<Vec<edge_tpm::replay::Release>> {
    let Some(key_path) = key else {
        return Ok(Vec::new());
    };
    let key = edge_tpm::policy::parse_pcrpkey(&read(key_path)?).map_err(Error::tpm(
        format_args!("--release-key {}", key_path.display()),
    ))?;
    flags
        .iter()
        .map(|r| {
            let (name, path) = r
                .split_once('=')
                .ok_or_else(|| Error::invalid(format!("--release {r:?}"), "is not NAME=PATH"))?;
            edge_tpm::replay::release(name, &read(&PathBuf::from(path))?, &key)
                .map_err(Error::tpm(path))
        })
        .collect()
}

/// What `Cmd::Enroll` issues, and what it asks of a box beyond the registrar's checks.
pub(crate) struct Enrollment {
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
pub(crate) async fn enrolled_record(
    bucket: &async_nats::jetstream::kv::Store,
    key: &str,
) -> Result<Option<edge_tpm::enrollment::Enrolled>> {
    match bucket.get(key).await {
        Ok(Some(v)) => Ok(serde_json::from_slice(&v)
            .map(Some)
            .map_err(fabricd::Error::json(format!(
                "{key}: unreadable enrollment record"
            )))?),
        Ok(None) => Ok(None),
        Err(e) => Err(fabricd::Error::core(format!("failed to read {key}"))(e).into()),
    }
}

/// The checks of a request that are the operator's, not the TPM's: a machine name that
/// is a subject token, an expected endorsement key, no second enrollment by mistake.
pub(crate) async fn operator_checks(
    request: &edge_tpm::enrollment::Request,
    bucket: &async_nats::jetstream::kv::Store,
    site: &str,
    e: &Enrollment,
) -> Result<()> {
    let machine = &request.machine;
    if !is_token(machine) {
        return Err(Error::invalid(
            format!("machine {machine:?}"),
            "must be letters, digits, '-' or '_'",
        ));
    }
    let fingerprint = edge_tpm::enrollment::ek_fingerprint(request);
    if !e.ek_pins.is_empty() && !e.ek_pins.contains(&fingerprint) {
        return Err(Error::invalid(
            format!("its endorsement key {fingerprint}"),
            "is not one given with --ek-fingerprint",
        ));
    }
    if let Some(old) = enrolled_record(bucket, &format!("{site}.{machine}")).await? {
        if !e.replace {
            return Err(Error::invalid(
                format!("machine {machine} of site {site}"),
                format!(
                    "is already enrolled (endorsement key {}); enroll it again with --replace",
                    old.ek
                ),
            ));
        }
    }
    Ok(())
}

/// Answers the site's enrollment messages until `boxes` boxes hold a certificate. A
/// refused box is told why, the reason printed and kept in `last_refusal`, and the wait
/// goes on (one bad message must not stop a site's enrollment).
pub(crate) async fn enroll(
    client: &async_nats::Client,
    bucket: &async_nats::jetstream::kv::Store,
    site: &str,
    mut registrar: edge_tpm::enrollment::Registrar,
    e: &Enrollment,
    boxes: usize,
    last_refusal: &mut Option<String>,
) -> Result<()> {
    use edge_tpm::enrollment::{is_reply_subject, issue_certificate, Enrolled, Message, Reply};
    let subject = edge_tpm::enrollment::subject(site);
    let mut sub = client
        .subscribe(subject.clone())
        .await
        .map_err(fabricd::Error::core(format!(
            "cannot subscribe to {subject}"
        )))?;
    // The subscription must reach the core before a box's request can.
    client.flush().await.map_err(fabricd::Error::core(
        "the core did not confirm the subscription",
    ))?;
    println!("waiting for {boxes} box(es) of site {site} on {subject}");
    let mut enrolled = 0;
    while enrolled < boxes {
        let Some(msg) = sub.next().await else {
            return Err(fabricd::Error::Ended {
                what: "the connection to the core ended",
                event: None,
            }
            .into());
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
        let outcome: Result<Reply> = match serde_json::from_slice::<Message>(&msg.payload) {
            Err(err) => {
                Err(fabricd::Error::json("a message that is not an enrollment step")(err).into())
            }
            Ok(Message::Request(request)) => {
                let checked = match operator_checks(&request, bucket, site, e).await {
                    Ok(()) => registrar
                        .challenge(&request)
                        .map_err(|err| fabricd::Error::Tpm(err).into()),
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
                    Err(why) => Err(Error::within(format_args!("machine {}", request.machine))(
                        why,
                    )),
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
                            .map_err(fabricd::Error::json("encode the enrollment record"))?;
                        bucket
                            .put(&key, body.into())
                            .await
                            .map_err(fabricd::Error::core(format!(
                                "failed to record the enrollment of {key}"
                            )))?;
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
                    Err(err) => Err(Error::tpm(format_args!("machine {}", answer.machine))(err)),
                }
            }
        };
        let reply = match outcome {
            Ok(reply) => reply,
            Err(why) => {
                let why = why.to_string();
                println!("refused {why}");
                *last_refusal = Some(why.clone());
                Reply::Refused { reason: why }
            }
        };
        let body = serde_json::to_vec(&reply).map_err(fabricd::Error::json("encode the reply"))?;
        client
            .publish(reply_to, body.into())
            .await
            .map_err(fabricd::Error::core("cannot answer the box"))?;
        client
            .flush()
            .await
            .map_err(fabricd::Error::core("cannot answer the box"))?;
    }
    Ok(())
}

/// `edgectl enroll`.
pub(crate) async fn run(
    cli: &Cli,
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    args: &Args,
) -> Result<()> {
    let Args {
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
    } = args;
    if !(1..=edge_tpm::enrollment::MAX_DAYS).contains(days) {
        return Err(Error::Days {
            days: *days,
            max: edge_tpm::enrollment::MAX_DAYS,
        });
    }
    let registrar = registrar(site, manufacturer_cas, releases, release_key)?;
    let escrow = match escrow_key {
        Some(path) => {
            let pem = pem_text(path)?;
            edge_tpm::enrollment::escrow_key(&pem).map_err(Error::tpm(path.display()))?;
            Some(pem)
        }
        None => None,
    };
    let enrollment = Enrollment {
        subject: site_subject.replace("{site}", site),
        days: *days,
        ca: pem_text(issuer_cert)?,
        key: pem_text(issuer_key)?,
        escrow,
        ek_pins: ek_fingerprints
            .iter()
            .map(|f| f.to_ascii_lowercase())
            .collect(),
        replace: *replace,
    };
    let enrolled = js
        .get_key_value(&cli.enrolled_bucket)
        .await
        .map_err(fabricd::Error::core(format!(
            "no KV bucket {} (run edgectl setup)",
            cli.enrolled_bucket
        )))?;
    let wait = Duration::from_secs(*timeout_secs);
    let mut last_refusal = None;
    let enrolling = enroll(
        client,
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
            return Err(Error::NotEnrolled {
                site: site.clone(),
                secs: *timeout_secs,
                last_refusal,
            })
        }
    }
    Ok(())
}

/// A PEM file's text.
fn pem_text(path: &Path) -> Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| Error::invalid(path.display().to_string(), "is not PEM text"))
}

/// `edgectl recovery-key`.
pub(crate) async fn recovery_key(
    cli: &Cli,
    js: &async_nats::jetstream::Context,
    args: &RecoveryArgs,
) -> Result<()> {
    let RecoveryArgs { site, machine, out } = args;
    let key = format!("{site}.{machine}");
    let bucket = js
        .get_key_value(&cli.enrolled_bucket)
        .await
        .map_err(fabricd::Error::core(format!(
            "no KV bucket {}",
            cli.enrolled_bucket
        )))?;
    let record = bucket
        .get(&key)
        .await
        .map_err(fabricd::Error::core(format!("failed to read {key}")))?
        .ok_or_else(|| Error::invalid(&key, "is not enrolled"))?;
    let record: edge_tpm::enrollment::Enrolled = serde_json::from_slice(&record).map_err(
        fabricd::Error::json(format!("{key}: unreadable enrollment record")),
    )?;
    let sealed = record
        .recovery
        .ok_or_else(|| Error::invalid(&key, "escrowed no recovery key at enrollment"))?;
    let sealed = edge_tpm::policy::base64_decode(&sealed).map_err(|detail| Error::Escrow {
        key: key.clone(),
        detail,
    })?;
    std::fs::write(out, sealed).map_err(fabricd::Error::io("write", out))?;
    println!(
            "the recovery key of {key}, encrypted to the escrow key, is in {0}; open it with
      openssl pkeyutl -decrypt -inkey escrow.key -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -in {0}",
            out.display()
        );
    Ok(())
}
