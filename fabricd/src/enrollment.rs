//! A new box earns its site certificate before it mirrors anything (docs/security.md,
//! "Enrollment"). While `core.cert` does not exist and `core.enroll` is provisioned,
//! fabricd makes the site key in the TPM (at `core.key`) and an attestation key beside
//! it, and asks the core on `edgeos.enroll.<site>` with the site's enrollment
//! certificate; `edgectl enroll` at the core checks the TPM and the boot and answers with
//! the certificate, which fabricd writes to `core.cert`. The TPM steps are `edge-tpm
//! enroll` (fabricd is static and cannot link the TPM libraries); the protocol is
//! `edge_tpm::enrollment`. Records keep being taken locally meanwhile, and mirror once
//! the box is enrolled. An enrolled box then quotes its boot every so often into its
//! status reports (`BootReports`), so the core sees a box that booted something else.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edge_tpm::enrollment::{self, Message, Reply};

use crate::config::{Config, CoreConfig, EnrollConfig};
use crate::error::{Error, Result};
use crate::site_identity::{edge_tpm, enrollment_config};
use crate::uplink::Status;

/// Whether the box must enroll before it can connect.
pub fn needed(core: &CoreConfig) -> bool {
    core.enroll.is_some() && !core.cert.exists()
}

/// The boot reports of an enrolled box (its attestation key exists): a fresh one every
/// `core.quote_interval_secs`, the last one in between. A box that is not enrolled
/// through its TPM has none.
pub struct BootReports {
    program: PathBuf,
    ak: PathBuf,
    every: Duration,
    last: Option<(std::time::Instant, enrollment::BootReport)>,
    warned: bool,
}

impl BootReports {
    pub fn new(core: &CoreConfig) -> BootReports {
        BootReports {
            program: core.tpm_program.clone(),
            ak: attestation_key_path(core),
            every: Duration::from_secs(core.quote_interval_secs),
            last: None,
            warned: false,
        }
    }

    pub async fn latest(&mut self) -> Option<enrollment::BootReport> {
        let stale = self
            .last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= self.every);
        if self.every.is_zero() || !stale || !self.ak.exists() {
            return self.last.as_ref().map(|(_, r)| r.clone());
        }
        let time = edge_common::unix_ms() / 1000;
        let args = vec![
            "quote".into(),
            "--ak".into(),
            self.ak.to_string_lossy().into_owned(),
            "--time".into(),
            time.to_string(),
        ];
        let made = tpm_step(&self.program, args, Vec::new())
            .await
            .and_then(|out| {
                serde_json::from_slice(&out).map_err(Error::json("edge-tpm's boot report"))
            });
        match made {
            Ok(report) => {
                self.last = Some((std::time::Instant::now(), report));
                self.warned = false;
            }
            Err(e) if !self.warned => {
                tracing::warn!("the boot could not be quoted for the core: {e}");
                self.warned = true;
            }
            Err(_) => {}
        }
        self.last.as_ref().map(|(_, r)| r.clone())
    }
}

/// Where the attestation key is kept: beside the site key.
fn attestation_key_path(core: &CoreConfig) -> PathBuf {
    core.key.with_file_name("attestation-key.json")
}

/// Enrolls, retrying with backoff until the core has issued the certificate. Each failed
/// attempt is logged and shown in the uplink's status.
pub async fn run(config: Arc<Config>, core: CoreConfig, status: Arc<Status>) {
    let Some(enroll) = core.enroll.clone() else {
        return;
    };
    let mut backoff = edge_common::Backoff::new(
        Duration::from_secs(1),
        Duration::from_millis(core.backoff_max_ms.max(1000)),
    );
    loop {
        match attempt(&config, &core, &enroll).await {
            Ok(()) => {
                tracing::info!(cert = %core.cert.display(), "enrolled: the core issued the site certificate");
                return;
            }
            Err(e) => {
                let e = format!("enrollment: {e}");
                let delay = backoff.next_delay();
                tracing::warn!("{e}; retrying in {delay:?}");
                status.error(&e);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Writes a secret or the certificate whole, readable by root only.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        edge_common::ensure_dir(dir)?;
    }
    edge_common::write_atomic(path, bytes, 0o600).map_err(Error::io("write", path))
}

/// One `edge-tpm` step on a blocking thread (the TPM takes a while under emulation).
async fn tpm_step(program: &Path, args: Vec<String>, input: Vec<u8>) -> Result<Vec<u8>> {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        edge_tpm(&program, &args, &input)
    })
    .await
    .map_err(|source| Error::Task {
        what: "the TPM step did not finish",
        source,
    })?
}

async fn ask(client: &async_nats::Client, site: &str, message: &Message) -> Result<Reply> {
    let subject = enrollment::subject(site);
    let body = serde_json::to_vec(message).map_err(Error::json("encode"))?;
    let reply = client
        .request(subject.clone(), body.into())
        .await
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => Error::Core {
                op: format!("no one answers on {subject}"),
                detail: format!("the operator has not started `edgectl enroll --site {site}`"),
            },
            _ => Error::core(format!("no answer on {subject}"))(e),
        })?;
    serde_json::from_slice(&reply.payload)
        .map_err(Error::json("the core's answer is not an enrollment reply"))
}

async fn attempt(config: &Config, core: &CoreConfig, enroll: &EnrollConfig) -> Result<()> {
    let program = &core.tpm_program;
    if !core.key.exists() {
        let key = tpm_step(
            program,
            vec!["site-key".into(), "create".into()],
            Vec::new(),
        )
        .await
        .map_err(|e| Error::MakeSiteKey(Box::new(e)))?;
        write_atomic(&core.key, &key)?;
        tracing::info!(key = %core.key.display(), "site key made in the TPM");
    }
    let ids = |step: &str| -> Vec<String> {
        vec![
            "enroll".into(),
            step.into(),
            "--site".into(),
            config.site.clone(),
            "--machine".into(),
            config.machine.clone(),
            "--ak".into(),
            attestation_key_path(core).to_string_lossy().into_owned(),
            "--site-key".into(),
            core.key.to_string_lossy().into_owned(),
        ]
    };
    let request: enrollment::Request =
        serde_json::from_slice(&tpm_step(program, ids("request"), Vec::new()).await?)
            .map_err(Error::json("edge-tpm's request"))?;

    let tls = enrollment_config(core, enroll)?;
    let servers: Vec<&str> = core.servers.iter().map(String::as_str).collect();
    let client = async_nats::ConnectOptions::new()
        .tls_client_config(tls)
        .require_tls(true)
        .custom_inbox_prefix(enrollment::inbox_prefix(&config.site))
        .connection_timeout(Duration::from_secs(5))
        // The core answers each step at once; the TPM steps are the box's.
        .request_timeout(Some(Duration::from_secs(30)))
        .max_reconnects(Some(1))
        .connect(servers.as_slice())
        .await
        .map_err(Error::core(
            "cannot connect to the core with the enrollment certificate",
        ))?;
    // What the operator may pin with `edgectl enroll --ek-fingerprint`.
    tracing::info!(site = %config.site, "asking the core to enroll this box: endorsement key {}", enrollment::ek_fingerprint(&request));

    let (credential, escrow_key) =
        match ask(&client, &config.site, &Message::Request(request)).await? {
            Reply::Challenge {
                credential,
                escrow_key,
            } => (credential, escrow_key),
            Reply::Refused { reason } => return Err(Error::Refused { reason }),
            Reply::Certificate { .. } => return Err(Error::OutOfTurn),
        };
    let credential = serde_json::to_vec(&credential).map_err(Error::json("encode"))?;
    let mut answer: enrollment::Answer =
        serde_json::from_slice(&tpm_step(program, ids("answer"), credential).await?)
            .map_err(Error::json("edge-tpm's answer"))?;
    // The recovery key goes to the core only encrypted to the operator's escrow key.
    let recovery = enroll.recovery_key.as_deref().filter(|p| p.exists());
    if let (Some(path), Some(pem)) = (recovery, &escrow_key) {
        let key = std::fs::read(path).map_err(Error::io("read the recovery key", path))?;
        answer.recovery = Some(enrollment::escrow(
            pem,
            String::from_utf8_lossy(&key).trim().as_bytes(),
        )?);
    }
    let escrowed = answer.recovery.is_some();
    let pem = match ask(&client, &config.site, &Message::Answer(answer)).await? {
        Reply::Certificate { pem } => pem,
        Reply::Refused { reason } => return Err(Error::Refused { reason }),
        Reply::Challenge { .. } => return Err(Error::OutOfTurn),
    };
    write_atomic(&core.cert, pem.as_bytes())?;
    if let (true, Some(path)) = (escrowed, recovery) {
        // The core holds it now; the box does not need to.
        match std::fs::remove_file(path) {
            Ok(()) => {
                tracing::info!(file = %path.display(), "the recovery key is escrowed to the core and removed from the box")
            }
            Err(e) => tracing::warn!(
                "the recovery key is escrowed, but {} stays: {e}",
                path.display()
            ),
        }
    }
    Ok(())
}
