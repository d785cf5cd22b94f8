//! Sealing and unsealing against a real TPM emulator (swtpm, started here on loopback):
//! the signed policy unlocks, another PCR 11 or another key does not, and the policy
//! digests computed in `policy` are the ones the TPM computes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use edge_tpm::policy::{self, PolicyKey, SignedPolicy};
use edge_tpm::{ek_certificate, evidence, identity, Endorsement, Error, Tpm};

#[path = "common/swtpm.rs"]
mod swtpm_harness;
use swtpm_harness::{manufactured, swtpm, Swtpm};

impl Swtpm {
    fn open(&self) -> Tpm {
        Tpm::open(&format!("swtpm:host=127.0.0.1,port={}", self.port)).unwrap()
    }
}

/// An RSA-2048 key pair made by openssl: (private PEM path, public PEM bytes).
fn keypair(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let key = dir.join(format!("{name}.pem"));
    let st = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    (key, out.stdout)
}

/// What `systemd-measure sign` does: RSA PKCS#1 v1.5 over SHA-256(policy digest).
fn sign(key: &Path, policy_digest: &[u8], fingerprint: &str) -> SignedPolicy {
    let dir = key.parent().unwrap();
    let msg = dir.join("policy.bin");
    std::fs::write(&msg, policy_digest).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .arg(&msg)
        .output()
        .unwrap();
    assert!(out.status.success());
    SignedPolicy {
        pcrs: vec![11],
        key_fingerprint: fingerprint.to_owned(),
        policy: policy_digest.to_vec(),
        signature: out.stdout,
    }
}

/// A release's pcr11.json as `cargo xtask image` writes it: slot a's PCR 11 at
/// enter-initrd and the `.pcrsig` of its policy digest, signed by `key`.
fn release_json(key: &Path, pk: &PolicyKey, enter_initrd: &[u8; 32]) -> String {
    let signed = sign(key, &policy::policy_pcr(11, enter_initrd), &pk.fingerprint);
    serde_json::json!({"a": {
        "enter-initrd": policy::hex(enter_initrd),
        "pcrsig": {"sha256": [{
            "pcrs": signed.pcrs,
            "pkfp": signed.key_fingerprint,
            "pol": policy::hex(&signed.policy),
            "sig": policy::base64_encode(&signed.signature),
        }]},
    }})
    .to_string()
}

/// A release the core accepts: signed by the release key, for that key.
fn accepted(dir: &Path, enter_initrd: &[u8; 32]) -> edge_tpm::replay::Release {
    let (key, public) = keypair(dir, "release");
    let pk = policy::parse_pcrpkey(&public).unwrap();
    let json = release_json(&key, &pk, enter_initrd);
    edge_tpm::replay::release("0.1.0", json.as_bytes(), &pk).unwrap()
}

/// The release list is signed by the image's PCR-policy key: a value it signed is
/// accepted, one another key signed, one whose value was changed after signing, and
/// one with a signature over another value are refused, each saying why.
#[test]
fn a_release_is_accepted_only_as_the_release_key_signed_it() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "release");
    let pk = policy::parse_pcrpkey(&public).unwrap();
    let (other, other_public) = keypair(dir.path(), "other");
    let other_pk = policy::parse_pcrpkey(&other_public).unwrap();
    let value = [0x5A; 32];

    let good = release_json(&key, &pk, &value);
    let r = edge_tpm::replay::release("1.0", good.as_bytes(), &pk).unwrap();
    assert_eq!(r.enter_initrd, vec![("a".to_string(), value)]);

    let by_other = release_json(&other, &other_pk, &value);
    let e = edge_tpm::replay::release("1.0", by_other.as_bytes(), &pk)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not by the release key"), "{e}");

    let changed = good.replace(&policy::hex(&value), &policy::hex(&[0x5B; 32]));
    let e = edge_tpm::replay::release("1.0", changed.as_bytes(), &pk)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no signature of the release key"), "{e}");

    // The fingerprint claimed is the release key's, the signature another key's.
    let forged = release_json(&other, &pk, &value);
    let e = edge_tpm::replay::release("1.0", forged.as_bytes(), &pk)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no signature of the release key"), "{e}");
}

fn refused(r: Result<Vec<u8>, Error>) -> String {
    match r {
        Err(Error::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_signed_policy_unseals_and_nothing_else_does() {
    let tpm_a = swtpm();
    let dir = tempfile::tempdir().unwrap();
    let (key_a, pub_a) = keypair(dir.path(), "a");
    let (key_b, pub_b) = keypair(dir.path(), "b");
    let pk_a: PolicyKey = policy::parse_pcrpkey(&pub_a).unwrap();
    let pk_b: PolicyKey = policy::parse_pcrpkey(&pub_b).unwrap();
    assert_ne!(pk_a.fingerprint, pk_b.fingerprint);

    let mut tpm = tpm_a.open();
    let secret = b"0123456789abcdef0123456789abcdef";
    let sealed = tpm.seal(secret, &pk_a, &[]).unwrap();
    // The blob is not the secret in another form.
    let token = serde_json::to_string(&sealed).unwrap();
    assert!(!token.contains("0123456789abcdef"));

    // The boot reaches the phase the image signed for.
    tpm.extend_phase("enter-initrd").unwrap();
    let pcr11 = tpm.read_pcr11().unwrap();
    let good = sign(&key_a, &policy::policy_pcr(11, &pcr11), &pk_a.fingerprint);
    assert_eq!(
        tpm.unseal(&sealed, &pk_a, std::slice::from_ref(&good))
            .unwrap(),
        secret
    );
    // A second handle on the same TPM (a later boot's process) unseals too.
    {
        let mut again = tpm_a.open();
        assert_eq!(
            again
                .unseal(&sealed, &pk_a, std::slice::from_ref(&good))
                .unwrap(),
            secret
        );
    }

    // A policy for another PCR 11 value (a UKI the build did not sign, or another
    // command line) names this boot's value and is refused before the TPM is asked.
    let other = sign(&key_a, &policy::policy_pcr(11, &[7; 32]), &pk_a.fingerprint);
    let why = refused(tpm.unseal(&sealed, &pk_a, &[other]));
    assert!(
        why.contains(&policy::hex(&pcr11)) && why.contains("not the signed one"),
        "{why}"
    );

    // A policy for this PCR 11 value signed by another key, presented with key A's
    // fingerprint: the TPM's signature check fails.
    let mut forged = sign(&key_b, &policy::policy_pcr(11, &pcr11), &pk_a.fingerprint);
    forged.key_fingerprint = pk_a.fingerprint.clone();
    let why = refused(tpm.unseal(&sealed, &pk_a, &[forged]));
    assert!(why.contains("does not verify"), "{why}");

    // Key B's own valid signature: not the key the data key was sealed to.
    let by_b = sign(&key_b, &policy::policy_pcr(11, &pcr11), &pk_b.fingerprint);
    let why = refused(tpm.unseal(&sealed, &pk_b, &[by_b]));
    assert!(
        why.contains("not the key the data key was sealed to"),
        "{why}"
    );

    // The next phase: this boot can no longer unseal (what stage 1 does right after).
    tpm.extend_phase("leave-initrd").unwrap();
    let why = refused(tpm.unseal(&sealed, &pk_a, std::slice::from_ref(&good)));
    assert!(why.contains("not the signed one"), "{why}");

    // Another TPM (the disk in another machine): the blob does not even load.
    let tpm_b = swtpm();
    let mut other_tpm = tpm_b.open();
    other_tpm.extend_phase("enter-initrd").unwrap();
    let pcr_b = other_tpm.read_pcr11().unwrap();
    assert_eq!(
        pcr_b, pcr11,
        "fresh TPMs have the same PCR 11 after one phase"
    );
    match other_tpm.unseal(&sealed, &pk_a, &[good]) {
        Err(Error::Tpm { op, .. }) => assert_eq!(op, "load the sealed data key"),
        other => panic!("another TPM must not load the blob: {other:?}"),
    }
}

#[test]
fn a_damaged_sealed_key_is_named() {
    let t = swtpm();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "a");
    let pk = policy::parse_pcrpkey(&public).unwrap();
    let mut tpm = t.open();
    let mut sealed = tpm.seal(b"secret", &pk, &[]).unwrap();
    let pcr11 = tpm.read_pcr11().unwrap();
    let good = sign(&key, &policy::policy_pcr(11, &pcr11), &pk.fingerprint);
    sealed.public = "!!".into();
    let e = tpm.unseal(&sealed, &pk, &[good]).unwrap_err().to_string();
    assert!(
        e.contains("sealed data key") && e.contains("tpm2-public"),
        "{e}"
    );
}

#[test]
fn extend_matches_the_pcrphase_formula() {
    let t = swtpm();
    let mut tpm = t.open();
    let before = tpm.read_pcr11().unwrap();
    let digest = tpm.extend_phase("sysinit").unwrap();
    use sha2::Digest as _;
    assert_eq!(digest, <[u8; 32]>::from(sha2::Sha256::digest(b"sysinit")));
    assert_eq!(tpm.read_pcr11().unwrap(), policy::extend(&before, &digest));
    // Our PCR for the provisioning: starts at zeros, one extend.
    let provisioning = <[u8; 32]>::from(sha2::Sha256::digest(b"core = \"tls://10.0.2.100:4222\""));
    tpm.extend(policy::PCR_PROVISION, &provisioning).unwrap();
    assert_eq!(
        tpm.read_pcr(policy::PCR_PROVISION).unwrap(),
        policy::extend(&[0; 32], &provisioning)
    );
    assert!(tpm.extend(24, &provisioning).is_err());
}

#[test]
fn the_key_fingerprint_is_systemds_pkfp() {
    // systemd-measure's pkfp: SHA-256 of the PKCS#1 RSAPublicKey DER.
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "a");
    let out = Command::new("openssl")
        .args(["rsa", "-RSAPublicKey_out", "-outform", "DER", "-in"])
        .arg(&key)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    use sha2::Digest as _;
    let want = policy::hex(&sha2::Sha256::digest(&out.stdout));
    assert_eq!(policy::parse_pcrpkey(&public).unwrap().fingerprint, want);
}

fn untrusted<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::Untrusted(why)) => why,
        other => panic!("expected the evidence refused, got {other:?}"),
    }
}

#[test]
fn a_credential_opens_only_in_the_tpm_of_its_endorsement_key_for_its_attestation_key() {
    for kind in [Endorsement::Rsa2048, Endorsement::EccP256] {
        credential_for(kind);
    }
}

fn credential_for(kind: Endorsement) {
    let (a, b) = (swtpm(), swtpm());
    let (mut tpm_a, mut tpm_b) = (a.open(), b.open());
    let ek_a = tpm_a.endorsement_key(kind).unwrap();
    // The endorsement key is made from the template: the same key every time.
    assert_eq!(tpm_a.endorsement_key(kind).unwrap(), ek_a);
    let ek_b = tpm_b.endorsement_key(kind).unwrap();
    assert_ne!(ek_a, ek_b);
    let ak_a = tpm_a.create_attestation_key(kind).unwrap();
    let ak_b = tpm_b.create_attestation_key(kind).unwrap();
    let name_a = evidence::name(&ak_a.public().unwrap());
    let name_b = evidence::name(&ak_b.public().unwrap());

    let secret = b"nonce-from-the-core-0123456789ab";
    let for_a = evidence::make_credential(&ek_a, &name_a, secret).unwrap();
    assert_eq!(tpm_a.activate_credential(&ak_a, &for_a).unwrap(), secret);

    // Another TPM (its EK and its AK) cannot open A's credential.
    let why = untrusted(tpm_b.activate_credential(&ak_b, &for_a));
    assert!(why.contains("cannot open the credential"), "{why}");
    // A credential for B's EK, naming A's AK, does not open in A.
    let for_b_ek = evidence::make_credential(&ek_b, &name_a, secret).unwrap();
    untrusted(tpm_a.activate_credential(&ak_a, &for_b_ek));
    // A's EK with B's AK named (a box claiming another TPM's AK as its own): B's AK
    // does not load in A, and A's own AK is not the one named.
    let naming_b = evidence::make_credential(&ek_a, &name_b, secret).unwrap();
    assert!(tpm_a.activate_credential(&ak_b, &naming_b).is_err());
    untrusted(tpm_a.activate_credential(&ak_a, &naming_b));

    // An attestation key's public part is not an endorsement key.
    let e = evidence::make_credential(&ak_a.public().unwrap(), &name_a, secret).unwrap_err();
    assert!(e.to_string().contains("endorsement key"), "{e}");
}

#[test]
fn a_quote_is_checked_and_a_forged_one_refused() {
    let (a, b) = (swtpm(), swtpm());
    let (mut tpm_a, mut tpm_b) = (a.open(), b.open());
    let ak_a = tpm_a.create_attestation_key(Endorsement::EccP256).unwrap();
    let ak_b = tpm_b.create_attestation_key(Endorsement::EccP256).unwrap();
    let public_a = ak_a.public().unwrap();
    tpm_a.extend_phase("enter-initrd").unwrap();
    let pcr11 = tpm_a.read_pcr11().unwrap();

    let nonce = b"challenge-1";
    let quote = tpm_a.quote(&ak_a, nonce, &[11, 0, 7]).unwrap();
    let quoted = evidence::check_quote(&public_a, &quote, nonce).unwrap();
    let indices: Vec<u32> = quoted.pcrs.iter().map(|p| p.0).collect();
    assert_eq!(indices, [0, 7, 11]);
    assert_eq!(quoted.pcrs[2].1, pcr11);

    // Another nonce: an old answer replayed.
    let why = untrusted(evidence::check_quote(&public_a, &quote, b"challenge-2"));
    assert!(why.contains("another nonce"), "{why}");
    // Other PCR values than the TPM quoted.
    let mut other_values = quote.clone();
    other_values.pcrs[2].1 = policy::hex(&[7; 32]);
    let why = untrusted(evidence::check_quote(&public_a, &other_values, nonce));
    assert!(why.contains("not the ones the TPM quoted"), "{why}");
    // Fewer PCRs than quoted.
    let mut fewer = quote.clone();
    fewer.pcrs.pop();
    let why = untrusted(evidence::check_quote(&public_a, &fewer, nonce));
    assert!(why.contains("covers PCRs"), "{why}");
    // Another TPM's quote presented as A's, and A's quote with one byte changed.
    let by_b = tpm_b.quote(&ak_b, nonce, &[0, 7, 11]).unwrap();
    let why = untrusted(evidence::check_quote(&public_a, &by_b, nonce));
    assert!(why.contains("not the attestation key's"), "{why}");
    let mut attest = policy::base64_decode(&quote.attest).unwrap();
    let last = attest.len() - 1;
    attest[last] ^= 1;
    let tampered = edge_tpm::evidence::Quote {
        attest: policy::base64_encode(&attest),
        ..quote.clone()
    };
    untrusted(evidence::check_quote(&public_a, &tampered, nonce));
    // A key that is not an attestation key (the endorsement key) is not taken.
    let ek = tpm_a.endorsement_key(Endorsement::EccP256).unwrap();
    assert!(evidence::check_quote(&ek, &quote, nonce).is_err());

    // What `quote` takes again when it sees it: a PCR extended between the read of the
    // values and the quote (init extends PCR 11 at ready while fabricd enrolls).
    use tss_esapi::traits::UnMarshall;
    let attest =
        tss_esapi::structures::Attest::unmarshall(&policy::base64_decode(&quote.attest).unwrap())
            .unwrap();
    assert!(identity::quotes_values(&attest, &quoted.pcrs));
    tpm_a.extend_phase("ready").unwrap();
    let now: Vec<(u32, [u8; 32])> = [0, 7, 11]
        .iter()
        .map(|&i| (i, tpm_a.read_pcr(i).unwrap()))
        .collect();
    assert_ne!(now[2].1, pcr11);
    assert!(!identity::quotes_values(&attest, &now));
    let again = tpm_a.quote(&ak_a, nonce, &[0, 7, 11]).unwrap();
    let quoted = evidence::check_quote(&public_a, &again, nonce).unwrap();
    assert_eq!(quoted.pcrs, now);
}

#[test]
fn an_ek_certificate_is_checked_against_the_manufacturers_ca() {
    let (ca_a, ca_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (manufactured(ca_a.path()), manufactured(ca_b.path()));
    let (mut tpm_a, mut tpm_b) = (a.open(), b.open());
    let kind = Endorsement::Rsa2048;
    let (ek_a, cert_a) = (
        tpm_a.endorsement_key(kind).unwrap(),
        tpm_a.ek_certificate(kind).unwrap(),
    );
    let (ek_b, cert_b) = (
        tpm_b.endorsement_key(kind).unwrap(),
        tpm_b.ek_certificate(kind).unwrap(),
    );
    // The operator trusts manufacturer A: its root and its issuing CA.
    let trusted_a = ["swtpm-localca-rootca-cert.pem", "issuercert.pem"]
        .iter()
        .flat_map(|f| {
            ek_certificate::pem_certificates(
                "the CA file",
                &std::fs::read(ca_a.path().join(f)).unwrap(),
            )
            .unwrap()
        })
        .collect::<Vec<_>>();
    let now = ek_certificate::now_utc();
    let chain = ek_certificate::check(&cert_a, &ek_a, &trusted_a, &now).unwrap();
    assert_eq!(chain, ["swtpm-localca", "swtpm-localca-rootca"]);

    // A TPM of another manufacturer (another CA).
    let why = untrusted(ek_certificate::check(&cert_b, &ek_b, &trusted_a, &now));
    assert!(why.contains("not issued by a CA the core trusts"), "{why}");
    // A's certificate presented with B's key: a box replaying another TPM's certificate.
    let why = untrusted(ek_certificate::check(&cert_a, &ek_b, &trusted_a, &now));
    assert!(why.contains("another key"), "{why}");
    // The issuing CA alone, without the root it chains to.
    let why = untrusted(ek_certificate::check(&cert_a, &ek_a, &trusted_a[1..], &now));
    assert!(why.contains("not issued by a CA the core trusts"), "{why}");
    // Before the certificate's validity.
    let why = untrusted(ek_certificate::check(
        &cert_a,
        &ek_a,
        &trusted_a,
        "20000101000000",
    ));
    assert!(why.contains("valid from"), "{why}");
    // One byte of the signed part changed.
    let mut forged = cert_a.clone();
    let at = forged.len() / 2;
    forged[at] ^= 1;
    assert!(ek_certificate::check(&forged, &ek_a, &trusted_a, &now).is_err());
}

#[test]
fn with_pcr_7_bound_a_changed_secure_boot_state_gets_no_key_but_an_update_does() {
    let t = swtpm();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "a");
    let pk = policy::parse_pcrpkey(&public).unwrap();
    let mut tpm = t.open();
    // The firmware has measured its Secure Boot state into PCR 7.
    tpm.extend(7, &[1; 32]).unwrap();
    let secret = b"bound to the signed boot and to PCR 7";
    let sealed = tpm.seal(secret, &pk, &[7]).unwrap();
    assert_eq!(sealed.literal.len(), 1, "{sealed:?}");
    let e = tpm.seal(secret, &pk, &[11]).unwrap_err();
    assert!(
        e.to_string()
            .contains("PCR 11 is bound by the signed policy"),
        "{e}"
    );

    // This boot and a signed update (another PCR 11, another signed policy): unsealed.
    tpm.extend_phase("enter-initrd").unwrap();
    let pcr11 = tpm.read_pcr11().unwrap();
    let good = sign(&key, &policy::policy_pcr(11, &pcr11), &pk.fingerprint);
    assert_eq!(
        tpm.unseal(&sealed, &pk, std::slice::from_ref(&good))
            .unwrap(),
        secret
    );
    tpm.extend_phase("leave-initrd").unwrap();
    let update = tpm.read_pcr11().unwrap();
    let signed_update = sign(&key, &policy::policy_pcr(11, &update), &pk.fingerprint);
    assert_eq!(
        tpm.unseal(&sealed, &pk, std::slice::from_ref(&signed_update))
            .unwrap(),
        secret
    );

    // Secure Boot turned off or its keys changed: PCR 7 differs; refused by name, and by
    // the TPM itself when the check in the open is skipped.
    tpm.extend(7, &[2; 32]).unwrap();
    let why = refused(tpm.unseal(&sealed, &pk, std::slice::from_ref(&signed_update)));
    assert!(
        why.contains("PCR 7 is") && why.contains("Secure Boot"),
        "{why}"
    );
    let mut unchecked = sealed.clone();
    unchecked.literal[0].1 = policy::hex(&tpm.read_pcr(7).unwrap());
    assert!(tpm.unseal(&unchecked, &pk, &[signed_update]).is_err());
}

#[test]
fn the_site_key_is_certified_by_the_attestation_key_and_signs_only_in_its_tpm() {
    use sha2::Digest as _;
    let (a, b) = (swtpm(), swtpm());
    let (mut tpm_a, mut tpm_b) = (a.open(), b.open());
    let ak_a = tpm_a.create_attestation_key(Endorsement::EccP256).unwrap();
    let ak_b = tpm_b.create_attestation_key(Endorsement::EccP256).unwrap();
    let site = tpm_a.create_site_key().unwrap();
    let site_public = policy::base64_decode(&site.public).unwrap();

    let nonce = b"enrollment-7";
    let c = tpm_a.certify_site_key(&site, &ak_a, nonce).unwrap();
    let point = evidence::check_certify(
        &ak_a.public().unwrap(),
        &site_public,
        &c.attest,
        &c.signature,
        nonce,
    )
    .unwrap();

    // What the key signs verifies with the certified public key (a TLS handshake's
    // CertificateVerify does exactly this).
    let message = b"TLS 1.3, client CertificateVerify\0transcript hash";
    let digest: [u8; 32] = sha2::Sha256::digest(message).into();
    let sig = tpm_a.sign(&site, &digest).unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &point)
        .verify(message, &sig)
        .expect("the TPM's signature verifies with the certified key");

    // Another nonce; another key presented for this certification; a certification
    // checked against another TPM's attestation key.
    let why = untrusted(evidence::check_certify(
        &ak_a.public().unwrap(),
        &site_public,
        &c.attest,
        &c.signature,
        b"enrollment-8",
    ));
    assert!(why.contains("another nonce"), "{why}");
    let other_key = policy::base64_decode(&tpm_a.create_site_key().unwrap().public).unwrap();
    let why = untrusted(evidence::check_certify(
        &ak_a.public().unwrap(),
        &other_key,
        &c.attest,
        &c.signature,
        nonce,
    ));
    assert!(why.contains("another key"), "{why}");
    let why = untrusted(evidence::check_certify(
        &ak_b.public().unwrap(),
        &site_public,
        &c.attest,
        &c.signature,
        nonce,
    ));
    assert!(why.contains("not the attestation key's"), "{why}");

    // The key's blobs in another TPM (a copied disk): nothing to sign with.
    match tpm_b.sign(&site, &digest) {
        Err(Error::Tpm { op, .. }) => assert!(op.contains("load the site key"), "{op}"),
        other => panic!("another TPM must not load the site key: {other:?}"),
    }
}

#[test]
fn a_quoted_boot_replays_from_the_event_log_to_an_accepted_release() {
    use sha2::Digest as _;
    let t = swtpm();
    let mut tpm = t.open();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    // The boot as init makes it: enter-initrd (PCR 11 then is the release's value),
    // leave-initrd, sysinit, the provisioning, ready; each extend logged.
    let mut release_value = None;
    for word in policy::PHASES {
        let d = tpm.extend_phase(word).unwrap();
        edge_tpm::eventlog::append(&log, 11, &d, word).unwrap();
        if word == policy::UNSEAL_PHASE {
            release_value = Some(tpm.read_pcr11().unwrap());
        }
        if word == "sysinit" {
            let d: [u8; 32] = sha2::Sha256::digest(b"provisioning item").into();
            tpm.extend(policy::PCR_PROVISION, &d).unwrap();
            edge_tpm::eventlog::append(
                &log,
                policy::PCR_PROVISION,
                &d,
                "edgeos provisioning: test",
            )
            .unwrap();
        }
    }
    let releases = [accepted(dir.path(), &release_value.unwrap())];
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    let ak = tpm.create_attestation_key(Endorsement::EccP256).unwrap();
    let quote = tpm.quote(&ak, b"n", &[11, policy::PCR_PROVISION]).unwrap();
    let quoted = evidence::check_quote(&ak.public().unwrap(), &quote, b"n").unwrap();
    assert_eq!(
        edge_tpm::replay::check_boot(&quoted.pcrs, &events, &releases).unwrap(),
        ("0.1.0".to_string(), "a".to_string())
    );
    // One more extend than the log shows.
    tpm.extend(11, &[5; 32]).unwrap();
    let quote = tpm.quote(&ak, b"m", &[11, policy::PCR_PROVISION]).unwrap();
    let quoted = evidence::check_quote(&ak.public().unwrap(), &quote, b"m").unwrap();
    let why = untrusted(edge_tpm::replay::check_boot(
        &quoted.pcrs,
        &events,
        &releases,
    ));
    assert!(why.contains("booted something else"), "{why}");
}

/// Puts the TPM into dictionary-attack lockout the way a stranger would: one wrong
/// password on a DA-protected object, with the TPM allowing one failure (tpm2-tools).
fn into_lockout(t: &Swtpm) {
    let dir = tempfile::tempdir().unwrap();
    let tools = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", format!("swtpm:port={}", t.port))
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .output()
            .expect("tpm2-tools must be installed (cargo xtask test installs it)")
    };
    let ok = |args: &[&str]| assert!(tools(args).status.success(), "{args:?}");
    ok(&[
        "tpm2_dictionarylockout",
        "-s",
        "-n",
        "1",
        "-t",
        "3600",
        "-l",
        "3600",
    ]);
    ok(&[
        "tpm2_createprimary",
        "-C",
        "o",
        "-c",
        "p.ctx",
        "-p",
        "secret",
        "-Q",
    ]);
    let wrong = tools(&[
        "tpm2_create",
        "-C",
        "p.ctx",
        "-P",
        "wrong",
        "-G",
        "ecc",
        "-u",
        "k.pub",
        "-r",
        "k.priv",
    ]);
    assert!(!wrong.status.success(), "a wrong password is refused");
    // No resource manager: what tpm2-tools left loaded would hold a transient slot.
    ok(&["tpm2_flushcontext", "-t"]);
    let caps = tools(&["tpm2_getcap", "properties-variable"]);
    let caps = String::from_utf8_lossy(&caps.stdout);
    assert!(
        caps.lines()
            .any(|l| l.contains("inLockout") && l.trim_end().ends_with('1')),
        "the TPM is in lockout: {caps}"
    );
}

#[test]
fn a_tpm_in_lockout_still_unseals_attests_and_signs() {
    use sha2::Digest as _;
    let t = swtpm();
    into_lockout(&t);
    let mut tpm = t.open();

    // The data key: sealed and unsealed under the signed policy.
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "a");
    let pk = policy::parse_pcrpkey(&public).unwrap();
    let sealed = tpm.seal(b"secret", &pk, &[]).unwrap();
    let pcr11 = tpm.read_pcr11().unwrap();
    let good = sign(&key, &policy::policy_pcr(11, &pcr11), &pk.fingerprint);
    assert_eq!(tpm.unseal(&sealed, &pk, &[good]).unwrap(), b"secret");

    // Attestation: the credential opens, a quote is made and checks.
    let ek = tpm.endorsement_key(Endorsement::EccP256).unwrap();
    let ak = tpm.create_attestation_key(Endorsement::EccP256).unwrap();
    let secret = b"nonce-from-the-core-0123456789ab";
    let credential =
        evidence::make_credential(&ek, &evidence::name(&ak.public().unwrap()), secret).unwrap();
    assert_eq!(tpm.activate_credential(&ak, &credential).unwrap(), secret);
    let quote = tpm.quote(&ak, secret, &[11]).unwrap();
    evidence::check_quote(&ak.public().unwrap(), &quote, secret).unwrap();

    // The site key signs (fabricd's TLS handshakes).
    let site = tpm.create_site_key().unwrap();
    let digest: [u8; 32] = sha2::Sha256::digest(b"handshake").into();
    tpm.sign(&site, &digest).unwrap();
}

/// The registrar's two rounds with a TPM from the factory, the way `edge-tpm enroll`
/// drives them: admitted once; an answer to an earlier challenge (another nonce), a
/// challenge answered twice, and an answer with no challenge are refused.
#[test]
fn enrollment_admits_one_fresh_answer_per_challenge() {
    use edge_tpm::enrollment::{Answer, Registrar, Request, QUOTED_PCRS};
    let maker = tempfile::tempdir().unwrap();
    let t = manufactured(maker.path());
    let mut tpm = t.open();
    let trusted: Vec<Vec<u8>> = ["swtpm-localca-rootca-cert.pem", "issuercert.pem"]
        .iter()
        .flat_map(|f| {
            ek_certificate::pem_certificates("a CA", &std::fs::read(maker.path().join(f)).unwrap())
                .unwrap()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let mut enter = None;
    for word in policy::PHASES {
        let d = tpm.extend_phase(word).unwrap();
        edge_tpm::eventlog::append(&log, 11, &d, word).unwrap();
        if word == policy::UNSEAL_PHASE {
            enter = Some(tpm.read_pcr11().unwrap());
        }
    }
    let release = accepted(dir.path(), &enter.unwrap());
    let mut registrar = Registrar::new("s1", trusted, vec![release]);

    let kind = Endorsement::Rsa2048;
    let ak = tpm.create_attestation_key(kind).unwrap();
    let site_key = tpm.create_site_key().unwrap();
    let request = Request {
        site: "s1".into(),
        machine: "m1".into(),
        ek: kind,
        ek_certificate: policy::base64_encode(&tpm.ek_certificate(kind).unwrap()),
        ek_public: policy::base64_encode(&tpm.endorsement_key(kind).unwrap()),
        ak_public: ak.public.clone(),
    };
    let mut answer_to = |credential: &evidence::Credential| {
        let secret = tpm.activate_credential(&ak, credential).unwrap();
        Answer {
            site: "s1".into(),
            machine: "m1".into(),
            ak_public: ak.public.clone(),
            quote: tpm.quote(&ak, &secret, &QUOTED_PCRS).unwrap(),
            site_key_public: site_key.public.clone(),
            certify: tpm.certify_site_key(&site_key, &ak, &secret).unwrap(),
            events: edge_tpm::eventlog::read(&log).unwrap(),
            recovery: None,
        }
    };

    let first = answer_to(&registrar.challenge(&request).unwrap());
    let second = answer_to(&registrar.challenge(&request).unwrap());
    // The box asked again: the first challenge is void, its answer another nonce's.
    let why = untrusted(registrar.admit(&first));
    assert!(why.contains("another nonce"), "{why}");
    // That refusal spent the second challenge too: one answer per challenge.
    let why = untrusted(registrar.admit(&second));
    assert!(why.contains("no challenge"), "{why}");

    let fresh = answer_to(&registrar.challenge(&request).unwrap());
    let admitted = registrar.admit(&fresh).unwrap();
    assert_eq!(
        (
            admitted.machine.as_str(),
            admitted.release.as_str(),
            admitted.slot.as_str()
        ),
        ("m1", "0.1.0", "a")
    );
    assert_eq!(
        admitted.manufacturer,
        ["swtpm-localca", "swtpm-localca-rootca"]
    );
    assert!(admitted
        .site_key_pem
        .starts_with("-----BEGIN PUBLIC KEY-----"));
    let why = untrusted(registrar.admit(&fresh));
    assert!(why.contains("no challenge"), "{why}");
}

#[test]
fn the_security_counter_only_counts_up_even_when_deleted_and_defined_again() {
    use tss_esapi::handles::{NvIndexTpmHandle, TpmHandle};
    use tss_esapi::interface_types::resource_handles::Provision;
    use tss_esapi::interface_types::session_handles::AuthSession;

    let t = swtpm();
    let mut tpm = t.open();
    assert_eq!(
        tpm.security_counter().unwrap(),
        None,
        "a TPM that never had it"
    );
    // A TPM that never had a counter starts it at 1.
    assert_eq!(tpm.raise_security_counter(0).unwrap(), 1);
    assert_eq!(tpm.raise_security_counter(3).unwrap(), 3);
    // Never lowered by asking for less.
    assert_eq!(tpm.raise_security_counter(2).unwrap(), 3);
    // Another process (a later boot) reads what this one left.
    assert_eq!(t.open().security_counter().unwrap(), Some(3));

    // Whoever holds the owner's authorization deletes the index (what an attacker with
    // the box would try)...
    let tcti = format!("swtpm:host=127.0.0.1,port={}", t.port)
        .parse()
        .unwrap();
    let mut ctx = tss_esapi::Context::new(tcti).unwrap();
    let index = NvIndexTpmHandle::new(edge_tpm::counter::INDEX).unwrap();
    let handle = ctx
        .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(index)))
        .unwrap();
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.nv_undefine_space(Provision::Owner, handle.into())
    })
    .unwrap();
    drop(ctx);
    let mut tpm = t.open();
    assert_eq!(tpm.security_counter().unwrap(), None);
    // ...and the counter made again starts past the highest it ever was.
    let again = tpm.raise_security_counter(0).unwrap();
    assert!(again > 3, "a counter defined again started at {again}");
}
