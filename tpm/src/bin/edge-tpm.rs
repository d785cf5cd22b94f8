//! `edge-tpm`: the TPM steps of the boot, for init (which is static and cannot link the
//! TPM libraries) to run from the verified root. One line on stderr and a non-zero exit
//! on failure: 2 when the TPM refused the data key to this boot, 1 for anything else.
//!
//! ```text
//! edge-tpm phase <word>                           extend PCR 11, log the event
//! edge-tpm pcr11                                  print PCR 11 (hex)
//! edge-tpm seal --pcrpkey <pem>  < secret         print the sealed key (JSON)
//! edge-tpm unseal --pcrpkey <pem> --pcrsig <json> < sealed   print the secret
//! ```
//! The TPM is `/dev/tpmrm0`, or the TCTI in `EDGE_TPM_TCTI` (tests: `swtpm:port=N`).

use std::io::{Read, Write};
use std::path::Path;

use edge_tpm::{eventlog, pcr, policy, Error, Sealed, Tpm};

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
            std::process::exit(if matches!(e, Error::Refused(_)) { 2 } else { 1 });
        }
    }
}

fn usage(why: &str) -> Error {
    Error::Input {
        what: "usage",
        why: format!(
            "{why}; edge-tpm phase <word> | pcr11 | seal --pcrpkey <pem> | unseal --pcrpkey <pem> --pcrsig <json>"
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
            if !pcr::PHASES.contains(&word.as_str()) {
                return Err(usage(&format!("{word:?} is not one of {:?}", pcr::PHASES)));
            }
            let mut tpm = open()?;
            let digest = tpm.extend_phase(word)?;
            let log = std::env::var("EDGE_TPM_EVENTLOG").unwrap_or_else(|_| eventlog::PATH.into());
            if let Err(e) = eventlog::append(Path::new(&log), policy::PCR_UKI, &digest, word) {
                // The extend happened; a verifier replaying the log will say what is missing.
                eprintln!("edge-tpm: failed to log the {word} extend in {log}: {e}");
            }
            let value = tpm.read_pcr11()?;
            stdout(format!("{}\n", policy::hex(&value)).as_bytes())
        }
        "pcr11" => {
            let value = open()?.read_pcr11()?;
            stdout(format!("{}\n", policy::hex(&value)).as_bytes())
        }
        "seal" => {
            let key = policy::parse_pcrpkey(&read_file(
                flag(args, "--pcrpkey")?,
                "the PCR public key (.pcrpkey)",
            )?)?;
            let secret = stdin()?;
            let sealed = open()?.seal(&secret, &key)?;
            let json = serde_json::to_string(&sealed).map_err(|e| Error::Input {
                what: "the sealed key",
                why: e.to_string(),
            })?;
            stdout(format!("{json}\n").as_bytes())
        }
        "unseal" => {
            let key = policy::parse_pcrpkey(&read_file(
                flag(args, "--pcrpkey")?,
                "the PCR public key (.pcrpkey)",
            )?)?;
            let signed = policy::parse_pcrsig(&read_file(
                flag(args, "--pcrsig")?,
                "the PCR signature (.pcrsig)",
            )?)?;
            let sealed: Sealed = serde_json::from_slice(&stdin()?).map_err(|e| Error::Input {
                what: "the sealed data key",
                why: e.to_string(),
            })?;
            let secret = open()?.unseal(&sealed, &key, &signed)?;
            stdout(&secret)
        }
        other => Err(usage(&format!("unknown command {other:?}"))),
    }
}
