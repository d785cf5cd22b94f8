//! The site key in the TPM: fabricd connects to a real nats-server (TLS, client
//! certificates required) with a certificate whose key was made in a TPM (swtpm) and
//! never left it, every record reaching the core; the same key file and certificate with
//! another TPM (a copied disk in another box) cannot connect, and the box says why.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

/// Runs `edge-tpm site-key <args>` against `tpm` with `input`; its stdout.
fn site_key(program: &Path, tpm: &swtpm::Swtpm, args: &[&str], input: &[u8]) -> Vec<u8> {
    let args: Vec<&str> = ["site-key"].iter().chain(args).copied().collect();
    tpm_run(program, tpm, Path::new("/dev/null"), &args, input)
}

#[test]
fn a_site_key_in_the_tpm_connects_and_a_copy_in_another_tpm_cannot() {
    let program = edge_tpm();
    let (tpm, other_tpm) = (swtpm::swtpm(), swtpm::swtpm());
    let s = Core::start();
    let pki_dir = s.pki.path("");

    // The box makes its key in its TPM; the CA certifies the public half.
    let key = pki_dir.join("site-key.json");
    std::fs::write(&key, site_key(&program, &tpm, &["create"], b"")).unwrap();
    let public = pki_dir.join("site-key.pub.pem");
    let key_json = std::fs::read(&key).unwrap();
    std::fs::write(&public, site_key(&program, &tpm, &["public"], &key_json)).unwrap();
    s.pki
        .issue_client_for("tpm-client", "/CN=tpm-client", &public);
    let text = String::from_utf8_lossy(&key_json).into_owned();
    assert!(
        !text.contains("PRIVATE KEY"),
        "the key file is the TPM's wrapped blob, not a key: {text}"
    );

    let config = |tpm_program: &Path| {
        format!(
            "[core]\nservers = [\"{}\"]\nprefix = \"edge\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ntpm_program = \"{}\"\nbackoff_max_ms = 1000\nack_timeout_ms = 10000\nstatus_interval_secs = 0\n",
            s.nats.url(),
            s.pki.path("ca.pem").display(),
            s.pki.path("tpm-client.pem").display(),
            key.display(),
            tpm_program.display()
        )
    };

    // In its own TPM: records flow.
    let dir = s.tmp.path().join("edge");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = Fabricd::configure(&dir, &config(&program));
    f.env = vec![("EDGE_TPM_TCTI".into(), tcti(&tpm))];
    f.start();
    let mut t = tcp(f.tcp);
    for i in 0..20u32 {
        produce(&mut t, &record("tpm.data", &i.to_be_bytes())).unwrap();
    }
    let at_core = s.rt.block_on(read_core(&s.js, 20, Duration::from_secs(60)));
    assert_eq!(at_core.len(), 20, "{}", f.log_text());
    for (i, m) in at_core.iter().enumerate() {
        assert_eq!(m.payload, (i as u32).to_be_bytes(), "record {i}");
    }
    assert_eq!(f.terminate().code(), Some(0));

    // The same disk (key file, certificate, log) in a box with another TPM.
    let mut f = Fabricd::configure(&dir, &config(&program));
    f.env = vec![("EDGE_TPM_TCTI".into(), tcti(&other_tpm))];
    f.start();
    let mut t = tcp(f.tcp);
    produce(&mut t, &record("tpm.data", b"from the copy")).unwrap();
    wait_for(
        "fabricd to report that it cannot connect",
        Duration::from_secs(30),
        || f.log_contains("cannot connect to the core").then_some(()),
    );
    let text = f.log_text();
    let line = text
        .lines()
        .find(|l| l.contains("cannot connect to the core"))
        .unwrap();
    assert!(
        line.contains("the TPM did not sign") && line.contains("load the site key"),
        "the reason names the TPM: {line}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        s.rt.block_on(stream_count(&s.js)),
        20,
        "nothing more at the core"
    );
    assert!(f.is_running(), "the daemon stays up");
}
