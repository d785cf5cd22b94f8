//! `edge-tpm`: the TPM steps of the boot, for init (which is static and cannot link the
//! TPM libraries) to run from the verified root. One line on stderr and a non-zero exit
//! on failure: 2 when the TPM refused the data key to this boot, 3 when no TPM could be
//! opened (so nothing was measured; init's stage 1 decides on this status), 1 for anything
//! else.
//!
//! ```text
//! edge-tpm phase <word>                           extend PCR 11, log the event, print it
//! edge-tpm pcr11                                  print PCR 11 (hex)
//! edge-tpm counter [raise N]                      print the security counter (`none`
//!                                                 before its first count); raise: count
//!                                                 it up to N at least, defining it first
//! edge-tpm measure provisioning <event> < data     extend our provisioning PCR (15)
//!                                                 with SHA-256(data), log <event>,
//!                                                 print `PCR <n> <value>`
//! edge-tpm seal --pcrpkey <pem> [--bind-pcrs 7] [--initrd] < secret
//!     {"sealed": {...}}: the sealed key (the LUKS2 token's fields); --bind-pcrs binds
//!     those PCRs' present values too (the PCR 7 option)
//! edge-tpm unseal --pcrpkey <pem> --pcrsig <json> [--initrd] < sealed
//!     {"secret": "..."}: the secret, which must be text
//! edge-tpm site-key create > key.json             a new site key, made in the TPM (its
//!                                                 blobs: useless without this TPM)
//! edge-tpm site-key public < key.json             its public key, PEM, for a certificate
//! edge-tpm site-key sign key.json < digest-hex    ECDSA over a SHA-256 digest, DER as hex
//!                                                 (fabricd's TLS handshakes)
//! edge-tpm enroll request --site S --machine M --ak ak.json
//!     enrollment's round 1 (edge_tpm::enrollment::Request); makes the attestation key
//!     into ak.json first if that file does not exist
//! edge-tpm enroll answer --site S --machine M --ak ak.json --site-key key.json < credential
//!     round 2 (Answer): opens the core's credential, quotes PCR 11 and 15 and certifies
//!     the site key with its secret, and adds the event log
//! edge-tpm quote --ak ak.json --time <unix seconds>
//!     a boot report (BootReport): PCR 11 and 15 quoted with the time as nonce, and the
//!     event log
//! ```
//! `--initrd`: stage 1's one call. Extends `enter-initrd` first (and adds `"pcr11"`, its
//! value then, to the output), and `leave-initrd` after, whatever the outcome, so that
//! the phase a key can be unsealed at ends in the same process.
//! The TPM is `/dev/tpmrm0`, or the TCTI in `EDGE_TPM_TCTI` (tests: `swtpm:port=N`).

use std::io::{Read, Write};
use std::path::Path;

use edge_tpm::identity::SiteKey;
use edge_tpm::{
    enrollment, eventlog, evidence, policy, AttestationKey, Endorsement, Error, Sealed, Tpm,
};

fn main() {
    // tpm2-tss logs every TPM error response to stderr itself; the one line below says
    // what failed, in words.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+NONE");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("edge-tpm: {e}");
            std::process::exit(exit_status(&e));
        }
    }
}

/// The TPM refused the data key to this boot.
const EXIT_REFUSED: i32 = 2;
/// No TPM could be opened: nothing was measured (init measures the initrd phases itself
/// then, as it does for a refusal made before edge-tpm ran).
const EXIT_NO_TPM: i32 = 3;

/// The exit status for a failure: callers decide on it, never on the words on stderr.
fn exit_status(e: &Error) -> i32 {
    match e {
        Error::Refused(_) => EXIT_REFUSED,
        Error::NoTpm { .. } => EXIT_NO_TPM,
        _ => 1,
    }
}

fn usage(why: &str) -> Error {
    Error::Input {
        what: "usage",
        why: format!(
            "{why}; edge-tpm phase <word> | measure provisioning <event> | pcr11 | counter [raise N] | seal --pcrpkey <pem> [--bind-pcrs 7] [--initrd] | unseal --pcrpkey <pem> --pcrsig <json> [--initrd] | site-key create | site-key public | site-key sign <key.json> | enroll request|answer --site S --machine M --ak <ak.json> [--site-key <key.json>] | quote --ak <ak.json> --time <unix seconds>"
        ),
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Result<&'a str, Error> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .ok_or_else(|| usage(&format!("{name} is missing")))
}

fn read_file(path: &str, what: &'static str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Input {
        what,
        why: format!("failed to read {path}: {e}"),
    })
}

fn stdin() -> Result<Vec<u8>, Error> {
    let mut buf = Vec::new();
    std::io::stdin()
        .read_to_end(&mut buf)
        .map_err(|e| Error::Input {
            what: "standard input",
            why: e.to_string(),
        })?;
    Ok(buf)
}

fn stdout(bytes: &[u8]) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Error::Input {
            what: "standard output",
            why: e.to_string(),
        })
}

/// Extends PCR 11 with `word` and logs it; the new value, hex.
fn phase(tpm: &mut Tpm, word: &str) -> Result<String, Error> {
    let digest = tpm.extend_phase(word)?;
    log(policy::PCR_UKI, &digest, word);
    Ok(policy::hex(&tpm.read_pcr11()?))
}

/// Records an extend in our event log.
fn log(pcr: u32, digest: &[u8; 32], event: &str) {
    let log = eventlog_path();
    if let Err(e) = eventlog::append(Path::new(&log), pcr, digest, event) {
        // The extend happened; a verifier replaying the log will say what is missing.
        eprintln!("edge-tpm: failed to log the {event} extend in {log}: {e}");
    }
}

fn open() -> Result<Tpm, Error> {
    let tcti = std::env::var("EDGE_TPM_TCTI").unwrap_or_else(|_| edge_tpm::DEVICE.to_owned());
    Tpm::open(&tcti)
}

fn run(args: &[String]) -> Result<(), Error> {
    let Some(cmd) = args.first() else {
        return Err(usage("no command"));
    };
    match cmd.as_str() {
        "phase" => {
            let word = args.get(1).ok_or_else(|| usage("phase needs a word"))?;
            if !policy::PHASES.contains(&word.as_str()) {
                return Err(usage(&format!(
                    "{word:?} is not one of {:?}",
                    policy::PHASES
                )));
            }
            let value = phase(&mut open()?, word)?;
            stdout(format!("{value}\n").as_bytes())
        }
        "measure" => {
            // What is measured names the PCR; which PCR that is is ours to keep (policy.rs).
            let pcr = match args.get(1).map(String::as_str) {
                Some("provisioning") => policy::PCR_PROVISION,
                other => {
                    return Err(usage(&format!(
                        "measure {other:?}: only `provisioning` is measured"
                    )))
                }
            };
            let event = args.get(2).ok_or_else(|| usage("measure needs an event"))?;
            use sha2::Digest as _;
            let digest: [u8; 32] = sha2::Sha256::digest(stdin()?).into();
            let mut tpm = open()?;
            tpm.extend(pcr, &digest)?;
            log(pcr, &digest, event);
            let value = policy::hex(&tpm.read_pcr(pcr)?);
            stdout(format!("PCR {pcr} {value}\n").as_bytes())
        }
        "counter" => {
            // The security counter (tpm/src/counter.rs): its value, or `none`.
            let mut tpm = open()?;
            let value = match args.get(1).map(String::as_str) {
                None => tpm.security_counter()?,
                Some("raise") => {
                    let to = args
                        .get(2)
                        .and_then(|n| n.parse::<u64>().ok())
                        .ok_or_else(|| usage("counter raise needs a number"))?;
                    Some(tpm.raise_security_counter(to)?)
                }
                Some(other) => return Err(usage(&format!("counter {other:?}: only `raise`"))),
            };
            let shown = value.map_or("none".to_owned(), |v| v.to_string());
            stdout(format!("{shown}\n").as_bytes())
        }
        "pcr11" => {
            let value = open()?.read_pcr11()?;
            stdout(format!("{}\n", policy::hex(&value)).as_bytes())
        }
        "seal" | "unseal" => {
            let key = policy::parse_pcrpkey(&read_file(
                flag(args, "--pcrpkey")?,
                "the PCR public key (.pcrpkey)",
            )?)?;
            let signed = match cmd.as_str() {
                "unseal" => Some(policy::parse_pcrsig(&read_file(
                    flag(args, "--pcrsig")?,
                    "the PCR signature (.pcrsig)",
                )?)?),
                _ => None,
            };
            // PCRs bound by value besides the signed policy (the PCR 7 option): "7", "0,7".
            let bind = match args.iter().position(|a| a == "--bind-pcrs") {
                None => Vec::new(),
                Some(_) => flag(args, "--bind-pcrs")?
                    .split(',')
                    .map(|p| {
                        p.trim()
                            .parse::<u32>()
                            .map_err(|_| usage(&format!("--bind-pcrs: {p:?} is not a PCR number")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            let input = stdin()?;
            let initrd = args.iter().any(|a| a == "--initrd");
            // Where the time goes (stage 1 says it on the console): ms since the last mark.
            let mut ms = serde_json::Map::new();
            let mut mark = std::time::Instant::now();
            let mut lap = |what: &str| {
                ms.insert(what.into(), (mark.elapsed().as_millis() as u64).into());
                mark = std::time::Instant::now();
            };
            let mut tpm = open()?;
            lap("open");
            let mut out = serde_json::Map::new();
            if initrd {
                let digest = tpm.extend_phase(policy::UNSEAL_PHASE)?;
                lap(policy::UNSEAL_PHASE);
                log(policy::PCR_UKI, &digest, policy::UNSEAL_PHASE);
                lap("log");
                out.insert("pcr11".into(), policy::hex(&tpm.read_pcr11()?).into());
                lap("read");
            }
            let result = match &signed {
                None => tpm.seal(&input, &key, &bind).and_then(|sealed| {
                    serde_json::to_value(&sealed).map_err(|e| Error::Input {
                        what: "the sealed key",
                        why: e.to_string(),
                    })
                }),
                Some(signed) => serde_json::from_slice::<Sealed>(&input)
                    .map_err(|e| Error::Input {
                        what: "the sealed data key",
                        why: e.to_string(),
                    })
                    .and_then(|sealed| tpm.unseal(&sealed, &key, signed))
                    .map(|secret| String::from_utf8_lossy(&secret).into_owned().into()),
            };
            lap(cmd);
            if initrd {
                // Whatever the outcome: from here on nothing in this boot can unseal. A
                // key is not handed out when that step failed.
                // Its value is not needed: no read, one TPM command less.
                let digest = tpm.extend_phase("leave-initrd")?;
                log(policy::PCR_UKI, &digest, "leave-initrd");
                lap("leave-initrd");
            }
            let field = if signed.is_some() { "secret" } else { "sealed" };
            out.insert(field.into(), result?);
            out.insert("ms".into(), ms.into());
            stdout(format!("{}\n", serde_json::Value::Object(out)).as_bytes())
        }
        "site-key" => site_key(args),
        "enroll" => enroll(args),
        "quote" => {
            let ak_path = flag(args, "--ak")?;
            let time: u64 = flag(args, "--time")?
                .parse()
                .map_err(|_| usage("--time must be unix seconds"))?;
            let ak = read_attestation_key(Path::new(ak_path))?;
            let events = read_eventlog()?;
            let quote = open()?.quote(
                &ak,
                &enrollment::report_nonce(time),
                &enrollment::QUOTED_PCRS,
            )?;
            let report = enrollment::BootReport {
                time,
                quote,
                events,
            };
            stdout(&to_json("the boot report", &report)?)
        }
        other => Err(usage(&format!("unknown command {other:?}"))),
    }
}

fn parse_site_key(json: &[u8]) -> Result<SiteKey, Error> {
    serde_json::from_slice(json).map_err(|e| Error::Input {
        what: "the site key (edge-tpm site-key create's output)",
        why: e.to_string(),
    })
}

fn site_key(args: &[String]) -> Result<(), Error> {
    match args.get(1).map(String::as_str) {
        Some("create") => {
            let key = open()?.create_site_key()?;
            let json = serde_json::to_string(&key).map_err(|e| Error::Input {
                what: "the site key",
                why: e.to_string(),
            })?;
            stdout(format!("{json}\n").as_bytes())
        }
        Some("public") => {
            let key = parse_site_key(&stdin()?)?;
            let public = policy::base64_decode(&key.public).map_err(|why| Error::Input {
                what: "the site key's public part",
                why,
            })?;
            stdout(evidence::site_key_pem(&public)?.as_bytes())
        }
        Some("sign") => {
            let path = args
                .get(2)
                .ok_or_else(|| usage("site-key sign needs the key's file"))?;
            let key = parse_site_key(&read_file(path, "the site key")?)?;
            let input = stdin()?;
            let digest: [u8; 32] = policy::from_hex(String::from_utf8_lossy(&input).trim())
                .ok()
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| Error::Input {
                    what: "the digest to sign",
                    why: "not 64 hex digits (a SHA-256 digest)".into(),
                })?;
            let signature = open()?.sign(&key, &digest)?;
            stdout(format!("{}\n", policy::hex(&signature)).as_bytes())
        }
        other => Err(usage(&format!(
            "site-key {other:?}: create, public or sign"
        ))),
    }
}

fn to_json<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, Error> {
    let mut text = serde_json::to_vec(value).map_err(|e| Error::Input {
        what,
        why: e.to_string(),
    })?;
    text.push(b'\n');
    Ok(text)
}

/// The attestation key at `path`, made (under the endorsement key that has a
/// manufacturer's certificate, ECC first) and written there when there is none yet.
fn attestation_key(tpm: &mut Tpm, path: &Path) -> Result<AttestationKey, Error> {
    match std::fs::read(path) {
        Ok(text) => {
            return serde_json::from_slice(&text).map_err(|e| Error::Input {
                what: "the attestation key",
                why: format!("{}: {e}", path.display()),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::Input {
                what: "the attestation key",
                why: format!("failed to read {}: {e}", path.display()),
            })
        }
    }
    let kind = [Endorsement::EccP256, Endorsement::Rsa2048]
        .into_iter()
        .find(|&k| tpm.ek_certificate(k).is_ok())
        .ok_or_else(|| Error::Input {
            what: "the TPM",
            why: "it holds no manufacturer's certificate of its endorsement key (NV 0x01c0000a or 0x01c00002), so the core cannot tell who made it".into(),
        })?;
    let key = tpm.create_attestation_key(kind)?;
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, to_json("the attestation key", &key)?)
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| Error::Input {
        what: "the attestation key",
        why: format!("failed to write {}: {e}", path.display()),
    })?;
    Ok(key)
}

fn read_attestation_key(path: &Path) -> Result<AttestationKey, Error> {
    serde_json::from_slice(&read_file(&path.to_string_lossy(), "the attestation key")?).map_err(
        |e| Error::Input {
            what: "the attestation key",
            why: format!("{}: {e}", path.display()),
        },
    )
}

/// Our event log: `EDGE_TPM_EVENTLOG`, else init's.
fn eventlog_path() -> String {
    std::env::var("EDGE_TPM_EVENTLOG").unwrap_or_else(|_| eventlog::PATH.into())
}

fn read_eventlog() -> Result<Vec<serde_json::Value>, Error> {
    eventlog::read(Path::new(&eventlog_path())).map_err(|why| Error::Input {
        what: "the event log",
        why,
    })
}

fn enroll(args: &[String]) -> Result<(), Error> {
    let site = flag(args, "--site")?.to_owned();
    let machine = flag(args, "--machine")?.to_owned();
    let ak_path = Path::new(flag(args, "--ak")?);
    match args.get(1).map(String::as_str) {
        Some("request") => {
            let mut tpm = open()?;
            let ak = attestation_key(&mut tpm, ak_path)?;
            let request = enrollment::Request {
                site,
                machine,
                ek: ak.ek,
                ek_certificate: policy::base64_encode(&tpm.ek_certificate(ak.ek)?),
                ek_public: policy::base64_encode(&tpm.endorsement_key(ak.ek)?),
                ak_public: ak.public.clone(),
            };
            stdout(&to_json("the request", &request)?)
        }
        Some("answer") => {
            let credential: evidence::Credential =
                serde_json::from_slice(&stdin()?).map_err(|e| Error::Input {
                    what: "the core's credential",
                    why: e.to_string(),
                })?;
            let site_key = parse_site_key(&read_file(flag(args, "--site-key")?, "the site key")?)?;
            let events = read_eventlog()?;
            let mut tpm = open()?;
            let ak = read_attestation_key(ak_path)?;
            let secret = tpm.activate_credential(&ak, &credential)?;
            let quote = tpm.quote(&ak, &secret, &enrollment::QUOTED_PCRS)?;
            let certify = tpm.certify_site_key(&site_key, &ak, &secret)?;
            let answer = enrollment::Answer {
                site,
                machine,
                ak_public: ak.public.clone(),
                quote,
                site_key_public: site_key.public.clone(),
                certify,
                events,
                recovery: None,
            };
            stdout(&to_json("the answer", &answer)?)
        }
        other => Err(usage(&format!("enroll {other:?}: request or answer"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_tpm_and_a_refused_key_exit_with_their_own_status() {
        let no_tpm = Error::NoTpm {
            tcti: "device:/dev/tpmrm0".into(),
            why: "/dev/tpmrm0 does not exist".into(),
        };
        assert_eq!(exit_status(&no_tpm), 3);
        assert_eq!(exit_status(&Error::Refused("PCR 11".into())), 2);
        assert_eq!(exit_status(&usage("no command")), 1);
    }
}
