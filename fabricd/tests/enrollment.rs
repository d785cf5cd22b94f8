//! Enrollment end to end on the host: a box (fabricd with a TPM from the factory: swtpm
//! with a manufacturer's EK certificate) that has only its site's enrollment certificate
//! asks the core (a real nats-server running `edgectl nats-config`'s access rules) to
//! enroll it; `edgectl enroll` checks the TPM and the boot and issues the certificate for
//! the site key in the TPM, and the box's records then reach the core under it. A TPM of
//! a manufacturer the core does not trust, and a boot no accepted release explains, get
//! no certificate, and both sides say why.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::site_core::Core;
use common::swtpm::{manufactured, Swtpm};
use common::*;

/// An RSA-2048 pair made by openssl in `dir`: the private key in `key`, its public
/// half (PEM) in `public`.
fn rsa_pair(dir: &Path, key: &str, public: &str) {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key,
        ],
    );
    openssl(dir, &["pkey", "-in", key, "-pubout", "-out", public]);
}

/// `tpm_run`, its output as text.
fn tpm_text(program: &Path, tpm: &Swtpm, log: &Path, args: &[&str], input: &[u8]) -> String {
    String::from_utf8(tpm_run(program, tpm, log, args, input)).unwrap()
}

/// Boots `tpm` as init does (the phases and a provisioning measurement, logged in
/// `log`); PCR 11 at `enter-initrd`, which an accepted release's pcr11.json names.
fn boot(program: &Path, tpm: &Swtpm, log: &Path) -> String {
    let enter = tpm_text(program, tpm, log, &["phase", "enter-initrd"], b"");
    for word in ["leave-initrd", "sysinit"] {
        tpm_run(program, tpm, log, &["phase", word], b"");
    }
    tpm_run(
        program,
        tpm,
        log,
        &[
            "measure",
            "provisioning",
            "edgeos provisioning: fabricd-core.toml",
        ],
        b"[core]\n",
    );
    tpm_run(program, tpm, log, &["phase", "ready"], b"");
    enter.trim().to_owned()
}

/// A box of site s1 with TPM `tpm`, booted, provisioned with the enrollment certificate
/// and no site certificate.
struct NewBox {
    f: Fabricd,
    dir: PathBuf,
    _tpm: Swtpm,
}

impl NewBox {
    fn start(core: &Core, program: &Path, tpm: Swtpm, name: &str) -> (NewBox, String) {
        let dir = core.tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("events.jsonl");
        let enter_initrd = boot(program, &tpm, &log);
        // What init keeps on a first boot's data partition for escrow.
        std::fs::create_dir_all(dir.join("identity")).unwrap();
        std::fs::write(dir.join("identity/recovery-key"), RECOVERY).unwrap();
        let mut f = Fabricd::configure(
            &dir,
            &format!(
                "[core]\nservers = [\"{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ntpm_program = \"{}\"\nbackoff_max_ms = 1000\nstatus_interval_secs = 1\nquote_interval_secs = 1\n[core.enroll]\ncert = \"{}\"\nkey = \"{}\"\nrecovery_key = \"{}\"\n",
                core.url(),
                core.pki.path("ca.pem").display(),
                dir.join("identity/site.pem").display(),
                dir.join("identity/site-key.json").display(),
                program.display(),
                core.pki.path("enroll-s1.pem").display(),
                core.pki.path("enroll-s1.key").display(),
                dir.join("identity/recovery-key").display(),
            ),
        );
        f.env = vec![
            ("EDGE_TPM_TCTI".into(), tcti(&tpm)),
            ("EDGE_TPM_EVENTLOG".into(), log.display().to_string()),
        ];
        f.start();
        (NewBox { f, dir, _tpm: tpm }, enter_initrd)
    }

    fn certificate(&self) -> PathBuf {
        self.dir.join("identity/site.pem")
    }
}

/// The recovery key the box keeps for escrow.
const RECOVERY: &str = "0123-4567-89ab-cdef-0123-4567-89ab-cdef\n";

/// The release as `cargo xtask image` writes it: `dir/pcr11.json`, slot a's PCR 11 at
/// enter-initrd with the `.pcrsig` entry signing it, by the release key
/// `dir/release.key` (made on first use); returns the file and the key's public PEM.
fn signed_release(dir: &Path, enter_initrd: &str) -> (PathBuf, PathBuf) {
    let (key, public) = (dir.join("release.key"), dir.join("release.pub.pem"));
    if !key.exists() {
        rsa_pair(dir, "release.key", "release.pub.pem");
    }
    let value: [u8; 32] = edge_tpm::policy::from_hex(enter_initrd)
        .unwrap()
        .try_into()
        .unwrap();
    let pol = edge_tpm::policy::policy_pcr(11, &value);
    std::fs::write(dir.join("pol.bin"), pol).unwrap();
    let sig = openssl(dir, &["dgst", "-sha256", "-sign", "release.key", "pol.bin"]);
    let pk = edge_tpm::policy::parse_pcrpkey(&std::fs::read(&public).unwrap()).unwrap();
    let json = serde_json::json!({"a": {
        "enter-initrd": enter_initrd,
        "pcrsig": {"sha256": [{"pcrs": [11], "pkfp": pk.fingerprint,
            "pol": edge_tpm::policy::hex(&pol), "sig": edge_tpm::policy::base64_encode(&sig)}]},
    }});
    let release = dir.join("pcr11.json");
    std::fs::write(&release, json.to_string()).unwrap();
    (release, public)
}

/// `edgectl enroll` for site s1, trusting the manufacturer CA in `manufacturer` and the
/// release whose PCR 11 at enter-initrd is `enter_initrd`, waiting at most `secs` s
/// (refusals do not end it), started in the background.
fn enroll(
    core: &Core,
    manufacturer: &Path,
    enter_initrd: &str,
    secs: u64,
    extra: &[&str],
) -> Child {
    let (release, release_key) = signed_release(core.tmp.path(), enter_initrd);
    Command::new(env!("CARGO_BIN_EXE_edgectl"))
        .arg("--server")
        .arg(core.url())
        .arg("--ca")
        .arg(core.pki.path("ca.pem"))
        .arg("--cert")
        .arg(core.pki.path("operator.pem"))
        .arg("--key")
        .arg(core.pki.path("operator.key"))
        .args([
            "enroll",
            "--site",
            "s1",
            "--timeout-secs",
            &secs.to_string(),
        ])
        // The manufacturer's root and its issuing CA.
        .arg("--manufacturer-ca")
        .arg(manufacturer.join("swtpm-localca-rootca-cert.pem"))
        .arg("--manufacturer-ca")
        .arg(manufacturer.join("issuercert.pem"))
        .arg("--release")
        .arg(format!("0.1.0={}", release.display()))
        .arg("--release-key")
        .arg(release_key)
        .arg("--issuer-cert")
        .arg(core.pki.path("ca.pem"))
        .arg("--issuer-key")
        .arg(core.pki.path("ca.key"))
        .arg("--escrow-key")
        .arg(core.pki.path("escrow.pub"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run edgectl enroll")
}

fn finished(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `edgectl recovery-key` for s1.m1 into `out`: the escrowed key, still encrypted.
fn escrowed_to(core: &Core, out: &Path) {
    core.edgectl(&[
        "recovery-key",
        "--site",
        "s1",
        "--machine",
        "m1",
        "--out",
        out.to_str().unwrap(),
    ]);
}

/// The core, with site s1's enrollment certificate and the operator's escrow key pair.
fn start_core() -> Core {
    let core = Core::start(&["s1"]);
    core.pki.issue_client("enroll-s1", "/CN=enroll-s1");
    let pki = core.pki.path("");
    rsa_pair(&pki, "escrow.key", "escrow.pub");
    core
}

#[test]
fn a_box_enrolled_by_edgectl_mirrors_under_its_tpm_key() {
    let program = edge_tpm();
    let core = start_core();
    let manufacturer = tempfile::tempdir().unwrap();
    let (mut b, enter_initrd) =
        NewBox::start(&core, &program, manufactured(manufacturer.path()), "edge");
    // Records taken before the box is enrolled wait in its log.
    let mut t = tcp(b.f.tcp);
    produce(&mut t, &record("enroll.data", b"before")).unwrap();
    wait_for(
        "the box to find no one answering its enrollment",
        Duration::from_secs(60),
        || b.f.log_contains("edgectl enroll --site s1").then_some(()),
    );
    assert!(!b.certificate().exists());

    let (ok, out) = finished(enroll(&core, manufacturer.path(), &enter_initrd, 90, &[]));
    assert!(ok, "edgectl enroll: {out}");
    assert!(
        out.contains("enrolled machine m1 of site s1")
            && out.contains("swtpm-localca")
            && out.contains("release 0.1.0 slot a"),
        "{out}"
    );
    wait_for("the box to be enrolled", Duration::from_secs(30), || {
        b.f.log_contains("enrolled: the core issued the site certificate")
            .then_some(())
    });
    // The recovery key went to the core encrypted to the escrow key, and left the box.
    assert!(!b.dir.join("identity/recovery-key").exists());
    let sealed = core.pki.path("recovery.sealed");
    escrowed_to(&core, &sealed);
    let opened = openssl(
        &core.pki.path(""),
        &[
            "pkeyutl",
            "-decrypt",
            "-inkey",
            "escrow.key",
            "-pkeyopt",
            "rsa_padding_mode:oaep",
            "-pkeyopt",
            "rsa_oaep_md:sha256",
            "-in",
            "recovery.sealed",
        ],
    );
    assert_eq!(String::from_utf8(opened).unwrap(), RECOVERY.trim());
    let escrowed = std::fs::read(&sealed).unwrap();

    // The certificate names the site's boxes, and its key is the TPM's.
    let cert = std::fs::read_to_string(b.certificate()).unwrap();
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-ext", "extendedKeyUsage"])
        .stdin(std::fs::File::open(b.certificate()).unwrap())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("CN = site-s1") && text.contains("TLS Web Client Authentication"),
        "{text}\n{cert}"
    );
    let key_json = std::fs::read(b.dir.join("identity/site-key.json")).unwrap();
    let public = tpm_text(
        &program,
        &b._tpm,
        &b.dir.join("events.jsonl"),
        &["site-key", "public"],
        &key_json,
    );
    let cert_key = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey"])
        .stdin(std::fs::File::open(b.certificate()).unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cert_key.stdout), public);

    // The records flow under the site certificate, the one from before first.
    produce(&mut t, &record("enroll.data", b"after")).unwrap();
    let at_core = core
        .rt
        .block_on(read_core(&core.operator().js, 2, Duration::from_secs(60)));
    let payloads: Vec<&[u8]> = at_core.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(payloads, [&b"before"[..], b"after"], "{}", b.f.log_text());

    assert_eq!(b.f.terminate().code(), Some(0));

    // The box loses its certificate and asks again: an enrolled machine is not enrolled
    // a second time by mistake, nor with a TPM other than the one pinned; with --replace
    // and its own endorsement key it is, and its escrowed recovery key stays.
    std::fs::remove_file(b.certificate()).unwrap();
    b.f.start();
    // fabricd logs the fingerprint an operator can pin.
    let asked = |b: &NewBox| -> Vec<String> {
        b.f.log_text()
            .lines()
            .filter_map(|l| l.split("enroll this box: endorsement key ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    let fingerprint = wait_for("the box to ask again", Duration::from_secs(60), || {
        asked(&b).get(1).cloned()
    });
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    let (ok, out) = finished(enroll(&core, manufacturer.path(), &enter_initrd, 6, &[]));
    assert!(!ok && out.contains("is already enrolled"), "{out}");
    let (ok, out) = finished(enroll(
        &core,
        manufacturer.path(),
        &enter_initrd,
        6,
        &["--replace", "--ek-fingerprint", &"ab".repeat(32)],
    ));
    assert!(
        !ok && out.contains("is not one given with --ek-fingerprint"),
        "{out}"
    );
    let (ok, out) = finished(enroll(
        &core,
        manufacturer.path(),
        &enter_initrd,
        90,
        &["--replace", "--ek-fingerprint", &fingerprint],
    ));
    assert!(ok, "{out}");
    assert!(out.contains("enrolled machine m1"), "{out}");
    wait_for(
        "the box to be enrolled again",
        Duration::from_secs(30),
        || b.certificate().exists().then_some(()),
    );
    escrowed_to(&core, &sealed);
    assert_eq!(
        std::fs::read(&sealed).unwrap(),
        escrowed,
        "the escrowed key is kept"
    );

    // The enrolled box quotes its boot into its status reports; the core replays them.
    let release = format!("0.1.0={}", core.tmp.path().join("pcr11.json").display());
    let key = core.tmp.path().join("release.pub.pem");
    let status = || {
        core.edgectl(&[
            "status",
            "--release",
            &release,
            "--release-key",
            key.to_str().unwrap(),
        ])
    };
    let row = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("s1.m1 "))
            .unwrap_or_default()
            .to_owned()
    };
    wait_for(
        "the box's boot in edgectl status",
        Duration::from_secs(30),
        || row(&status()).ends_with(" 0.1.0/a").then_some(()),
    );
    // PCR 11 extended with nothing the event log shows: the box now runs something the
    // release does not explain, and its next report says so.
    tpm_run(
        &program,
        &b._tpm,
        Path::new("/dev/null"),
        &["phase", "sysinit"],
        b"",
    );
    // (A report made while the extend lands is refused too, its PCR values no longer
    // the quoted ones; the reports after it are refused for the boot.)
    let out = wait_for("the changed boot refused", Duration::from_secs(30), || {
        let out = status();
        (row(&out).ends_with(" REFUSED") && out.contains("booted something else")).then_some(out)
    });
    assert!(out.contains("s1.m1: boot report refused"), "{out}");
    assert_eq!(b.f.terminate().code(), Some(0));
}

#[test]
fn a_foreign_tpm_or_an_unknown_boot_gets_no_certificate() {
    let program = edge_tpm();
    let core = start_core();
    let (trusted, foreign) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Made first: the trusted manufacturer's CA comes into being with its first TPM.
    let trusted_tpm = manufactured(trusted.path());

    // A TPM whose maker the core does not trust: refused at the first step.
    let (b, enter_initrd) = NewBox::start(&core, &program, manufactured(foreign.path()), "foreign");
    let (ok, out) = finished(enroll(&core, trusted.path(), &enter_initrd, 8, &[]));
    assert!(!ok, "{out}");
    assert!(
        out.contains("refused machine m1: attestation refused: the EK certificate is not issued by a CA the core trusts")
            && out.contains("no box of site s1 enrolled within 8 s; the last refused: machine m1"),
        "{out}"
    );
    wait_for("the box to hear why", Duration::from_secs(30), || {
        b.f.log_contains("the core refused the box").then_some(())
    });
    assert!(
        b.f.log_contains("not issued by a CA the core trusts"),
        "{}",
        b.f.log_text()
    );
    assert!(!b.certificate().exists());
    drop(b);

    // A trusted TPM that booted something no accepted release explains.
    let (b, _) = NewBox::start(&core, &program, trusted_tpm, "other-boot");
    let (ok, out) = finished(enroll(&core, trusted.path(), &"00".repeat(32), 8, &[]));
    assert!(!ok, "{out}");
    assert!(out.contains("booted something else"), "{out}");
    wait_for("the box to hear why", Duration::from_secs(30), || {
        b.f.log_contains("booted something else").then_some(())
    });
    assert!(!b.certificate().exists());

    // A release list not signed by the release key is refused before anything else,
    // naming the file: here the escrow key (RSA 2048 too) stands in for another key.
    let release = core.tmp.path().join("pcr11.json");
    let (ok, _, err) = core.edgectl_run(&[
        "status",
        "--release",
        &format!("0.1.0={}", release.display()),
        "--release-key",
        core.pki.path("escrow.pub").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains(&release.display().to_string()) && err.contains("not by the release key"),
        "{err}"
    );
}
