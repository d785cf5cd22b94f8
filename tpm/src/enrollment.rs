//! Enrollment: how a box earns its site certificate. Two rounds over NATS, the box always
//! asking (the core never dials in), on `edgeos.enroll.<site>`:
//!
//! 1. `Request`: the box's endorsement key, its manufacturer's certificate and a new
//!    attestation key. The core (`Registrar::challenge`) checks the certificate against
//!    the manufacturer CAs it trusts and answers with a credential only that TPM can
//!    open, and only for that attestation key (TPM2_MakeCredential in software).
//! 2. `Answer`: the box opens the credential (TPM2_ActivateCredential) and uses the secret
//!    inside as the nonce of a quote over PCR 11 and PCR 15 and of TPM2_Certify over its
//!    site key, and sends both with its event log. The core (`Registrar::admit`) checks
//!    the quote, replays the log to a release it accepts, checks the certification, and
//!    only then issues the site's client certificate for that key (`issue_certificate`).
//!
//! The box reaches the core for this with an enrollment certificate the operator
//! provisions (`enroll-<site>`), which may only publish on the enrollment subject: it
//! proves nothing about the box, the TPM does.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;
use crate::evidence::{self, Certified, Credential, Endorsement, Quote};
use crate::policy::{base64_decode, hex};
use crate::replay::{self, Release};
use crate::{ek_certificate, policy};

/// The subject a site's boxes send their enrollment messages to.
pub fn subject(site: &str) -> String {
    format!("edgeos.enroll.{site}")
}

/// The inbox prefix of a box's enrollment requests (the core's answers come back under it;
/// the enrollment certificate may read nothing else). Not `_INBOX_...`: a site's own
/// inbox is `_INBOX_<site>`, and a site named `enroll_s1` would share it.
pub fn inbox_prefix(site: &str) -> String {
    format!("_ENROLL_{site}")
}

/// Whether `reply` is a subject the core may answer a box of `site` on: under the site's
/// enrollment inbox. The box names the subject, and the core answers with the
/// operator's rights, so any other subject (a stream's API, another site's records) is
/// never answered.
pub fn is_reply_subject(site: &str, reply: &str) -> bool {
    reply
        .strip_prefix(&inbox_prefix(site))
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .split('.')
                    .all(|t| !t.is_empty() && !t.contains(['*', '>', ' ']))
        })
}

/// The longest a site certificate may be issued for.
pub const MAX_DAYS: u32 = 3650;

/// The PCRs the enrollment quote covers: the UKI and boot phases, and the provisioning.
pub const QUOTED_PCRS: [u32; 2] = [policy::PCR_UKI, policy::PCR_PROVISION];

/// What the box sends, one message a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Message {
    Request(Request),
    Answer(Answer),
}

/// Round 1 (see the module comment). Binary fields are base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub site: String,
    pub machine: String,
    pub ek: Endorsement,
    /// The manufacturer's certificate of the endorsement key (DER).
    pub ek_certificate: String,
    /// The endorsement key's TPMT_PUBLIC.
    pub ek_public: String,
    /// The attestation key's TPMT_PUBLIC.
    pub ak_public: String,
}

/// Round 2 (see the module comment).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub site: String,
    pub machine: String,
    /// The attestation key of the request this answers.
    pub ak_public: String,
    /// Over `QUOTED_PCRS`, with the credential's secret as nonce.
    pub quote: Quote,
    /// The site key's TPMT_PUBLIC, and its certification with the same nonce.
    pub site_key_public: String,
    pub certify: Certified,
    /// The box's event log (`eventlog`), a record an element.
    pub events: Vec<Value>,
    /// The data partition's recovery key, encrypted to the core's escrow key when the
    /// challenge named one (`escrow`), base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<String>,
}

/// What the core answers each message with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Challenge {
        credential: Credential,
        /// The operator's escrow key (RSA public key, PEM) the box encrypts its recovery
        /// key to, if the core keeps recovery keys.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        escrow_key: Option<String>,
    },
    /// The site's client certificate, PEM.
    Certificate {
        pem: String,
    },
    Refused {
        reason: String,
    },
}

/// What the core learned about an admitted box.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub machine: String,
    /// Its attestation key (TPMT_PUBLIC, base64): what its later boot reports are
    /// checked with.
    pub ak_public: String,
    /// The EK certificate's chain, its issuer first (common names).
    pub manufacturer: Vec<String>,
    /// `ek_fingerprint` of the request the box's challenge answered.
    pub ek_fingerprint: String,
    /// The release and slot the quoted boot replays to.
    pub release: String,
    pub slot: String,
    /// The site key, as the PEM SubjectPublicKeyInfo the certificate is issued for.
    pub site_key_pem: String,
}

struct Pending {
    request: Request,
    manufacturer: Vec<String>,
    secret: [u8; 32],
}

/// The core's half: what it trusts, and the challenges it has sent and not yet seen
/// answered (each is answered once).
pub struct Registrar {
    site: String,
    manufacturer_cas: Vec<Vec<u8>>,
    releases: Vec<Release>,
    pending: Vec<Pending>,
}

fn b64(what: &'static str, s: &str) -> Result<Vec<u8>, Error> {
    base64_decode(s).map_err(|why| Error::Input { what, why })
}

impl Registrar {
    /// A registrar for `site` that trusts the manufacturers' CA certificates (DER) and
    /// accepts the boots of `releases`.
    pub fn new(site: &str, manufacturer_cas: Vec<Vec<u8>>, releases: Vec<Release>) -> Registrar {
        Registrar {
            site: site.to_owned(),
            manufacturer_cas,
            releases,
            pending: Vec::new(),
        }
    }

    fn own_site(&self, site: &str) -> Result<(), Error> {
        if site == self.site {
            Ok(())
        } else {
            Err(Error::Untrusted(format!(
                "the box asks to enroll into site {site:?}, and this enrollment is for {:?}",
                self.site
            )))
        }
    }

    /// Round 1: checks the EK certificate and makes the credential.
    pub fn challenge(&mut self, request: &Request) -> Result<Credential, Error> {
        self.own_site(&request.site)?;
        let ek_public = b64("the endorsement key", &request.ek_public)?;
        let ek_cert = b64("the EK certificate", &request.ek_certificate)?;
        let ak_public = b64("the attestation key", &request.ak_public)?;
        let manufacturer = ek_certificate::check(
            &ek_cert,
            &ek_public,
            &self.manufacturer_cas,
            &ek_certificate::now_utc(),
        )?;
        let secret = evidence::random::<32>()?;
        let credential =
            evidence::make_credential(&ek_public, &evidence::name(&ak_public), &secret)?;
        // A box that asks again (it restarted) gets a new challenge; the old one is void.
        self.pending
            .retain(|p| p.request.ak_public != request.ak_public);
        self.pending.push(Pending {
            request: request.clone(),
            manufacturer,
            secret,
        });
        Ok(credential)
    }

    /// Round 2: the quote, the replayed boot and the site key's certification, each
    /// against the challenge's secret. The challenge is spent whatever the outcome.
    pub fn admit(&mut self, answer: &Answer) -> Result<Admitted, Error> {
        self.own_site(&answer.site)?;
        let i = self
            .pending
            .iter()
            .position(|p| p.request.ak_public == answer.ak_public)
            .ok_or_else(|| {
                Error::Untrusted(
                    "the answer is for no challenge this enrollment sent (another attestation key, or a challenge already answered)".into(),
                )
            })?;
        let pending = self.pending.swap_remove(i);
        if answer.machine != pending.request.machine {
            return Err(Error::Untrusted(format!(
                "the answer comes from machine {:?}, and the request from {:?}",
                answer.machine, pending.request.machine
            )));
        }
        let ak_public = b64("the attestation key", &answer.ak_public)?;
        let quoted = evidence::check_quote(&ak_public, &answer.quote, &pending.secret)?;
        let (release, slot) = replay::check_boot(&quoted.pcrs, &answer.events, &self.releases)?;
        let site_key = b64("the site key", &answer.site_key_public)?;
        evidence::check_certify(
            &ak_public,
            &site_key,
            &answer.certify.attest,
            &answer.certify.signature,
            &pending.secret,
        )?;
        Ok(Admitted {
            machine: answer.machine.clone(),
            ak_public: answer.ak_public.clone(),
            ek_fingerprint: ek_fingerprint(&pending.request),
            manufacturer: pending.manufacturer,
            release,
            slot,
            site_key_pem: evidence::site_key_pem(&site_key)?,
        })
    }
}

/// What an enrolled box adds to its status reports every so often, so the core sees
/// what it booted since: a quote over `QUOTED_PCRS` whose nonce is `time` (unix seconds,
/// `report_nonce`), and its event log. The box picks the time, so a quote proves it was
/// made by the box's TPM with those PCRs, but not when: a box could show a quote it made
/// in an earlier boot with a time ahead (enrollment's quote, on the core's challenge,
/// has no such gap).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootReport {
    pub time: u64,
    pub quote: Quote,
    pub events: Vec<Value>,
}

/// The nonce of a boot report made at `time`.
pub fn report_nonce(time: u64) -> [u8; 8] {
    time.to_be_bytes()
}

/// What the core keeps of each enrolled box (`edgectl enroll` writes it, `edgectl
/// status` checks boot reports against it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub ak_public: String,
    /// `ek_fingerprint` of its request.
    pub ek: String,
    /// What it booted when it enrolled.
    pub release: String,
    pub slot: String,
    /// Unix seconds.
    pub time: u64,
    /// The box's recovery key as it sent it: encrypted to the escrow key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<String>,
}

/// Checks a box's boot report against its enrollment: the quote is its attestation
/// key's, made for the report's time, which is within `max_age` seconds of `now`; with
/// `releases` given, the boot is replayed to one of them (release and slot returned).
pub fn check_report(
    enrolled: &Enrolled,
    report: &BootReport,
    now: u64,
    max_age: u64,
    releases: &[Release],
) -> Result<Option<(String, String)>, Error> {
    if report.time.abs_diff(now) > max_age {
        return Err(Error::Untrusted(format!(
            "the last boot report is from {} s {} the core's clock (more than {max_age} s)",
            report.time.abs_diff(now),
            if report.time < now {
                "behind"
            } else {
                "ahead of"
            }
        )));
    }
    let ak_public = b64("the attestation key", &enrolled.ak_public)?;
    let quoted = evidence::check_quote(&ak_public, &report.quote, &report_nonce(report.time))?;
    if releases.is_empty() {
        return Ok(None);
    }
    replay::check_boot(&quoted.pcrs, &report.events, releases).map(Some)
}

/// The operator's escrow key: an RSA public key (PEM, SubjectPublicKeyInfo) of 2048 bits
/// or more.
pub fn escrow_key(pem: &str) -> Result<rsa::RsaPublicKey, Error> {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPublicKey::from_public_key_pem(pem).map_err(|e| Error::Input {
        what: "the escrow key",
        why: format!("not an RSA public key in PEM: {e}"),
    })?;
    if key.size() < 256 {
        return Err(Error::Input {
            what: "the escrow key",
            why: format!("{} bits; 2048 or more are needed", key.size() * 8),
        });
    }
    Ok(key)
}

/// `secret` encrypted to the escrow key (RSA-OAEP with SHA-256, no label), base64: what
/// `openssl pkeyutl -decrypt -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256`
/// opens with the escrow key's private half. Only the operator holds that; nothing of
/// ours decrypts.
pub fn escrow(pem: &str, secret: &[u8]) -> Result<String, Error> {
    let key = escrow_key(pem)?;
    let encrypted = key
        .encrypt(
            &mut rsa::rand_core::OsRng,
            rsa::Oaep::new::<sha2::Sha256>(),
            secret,
        )
        .map_err(|e| Error::Input {
            what: "the recovery key",
            why: format!("failed to encrypt it to the escrow key: {e}"),
        })?;
    Ok(crate::policy::base64_encode(&encrypted))
}

/// The site's client certificate: `subject` (a distinguished name as nats-server prints
/// it, `CN=site-s1,O=example`) for the key `site_key_pem`, valid from now for `days`,
/// for client authentication only, signed by the CA `ca_pem` with its key `ca_key_pem`
/// (PKCS#8). PEM.
pub fn issue_certificate(
    subject: &str,
    site_key_pem: &str,
    days: u32,
    ca_pem: &str,
    ca_key_pem: &str,
) -> Result<String, Error> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
    };
    let bad = |what: &'static str| {
        move |e: rcgen::Error| Error::Input {
            what,
            why: e.to_string(),
        }
    };
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(Error::Input {
            what: "the certificate's lifetime",
            why: format!("{days} days; 1 to {MAX_DAYS} are issued"),
        });
    }
    let mut dn = DistinguishedName::new();
    // nats-server prints a subject last attribute first (RFC 2253): the certificate
    // holds them in the reverse of the text's order.
    for part in subject.split(',').rev() {
        let (k, v) = part.trim().split_once('=').ok_or_else(|| Error::Input {
            what: "the certificate subject",
            why: format!("{part:?} is not KEY=value"),
        })?;
        let kind = match k.trim() {
            "CN" => DnType::CommonName,
            "O" => DnType::OrganizationName,
            "OU" => DnType::OrganizationalUnitName,
            "C" => DnType::CountryName,
            "L" => DnType::LocalityName,
            "ST" => DnType::StateOrProvinceName,
            other => {
                return Err(Error::Input {
                    what: "the certificate subject",
                    why: format!("{other:?}: only CN, O, OU, C, L and ST are issued"),
                })
            }
        };
        if dn.get(&kind).is_some() {
            return Err(Error::Input {
                what: "the certificate subject",
                why: format!("{subject:?} names {} twice, which is not issued", k.trim()),
            });
        }
        dn.push(kind, v.trim());
    }
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(bad("the CA's key (PKCS#8 PEM)"))?;
    let issuer =
        Issuer::from_ca_cert_pem(ca_pem, ca_key).map_err(bad("the CA's certificate (PEM)"))?;
    let key = SubjectPublicKeyInfo::from_pem(site_key_pem).map_err(bad("the site key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = ::time::OffsetDateTime::now_utc();
    // A few minutes back, for a box whose clock is a little behind the core's.
    params.not_before = now - ::time::Duration::minutes(5);
    params.not_after = now + ::time::Duration::days(i64::from(days));
    let mut serial = evidence::random::<16>()?;
    // A positive INTEGER.
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(bad("the site certificate"))?;
    Ok(cert.pem())
}

/// The endorsement key's fingerprint, which the box logs when it asks and `edgectl
/// enroll --ek-fingerprint` can pin: SHA-256 of its TPMT_PUBLIC, hex.
pub fn ek_fingerprint(request: &Request) -> String {
    use sha2::Digest as _;
    let ek = base64_decode(&request.ek_public).unwrap_or_default();
    hex(&sha2::Sha256::digest(ek))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_their_step_and_replies_their_kind() {
        let r = Reply::Refused { reason: "x".into() };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"reply":"refused","reason":"x"}"#);
        let bad: Result<Message, _> = serde_json::from_str(r#"{"step":"hello"}"#);
        assert!(bad.unwrap_err().to_string().contains("unknown variant"));
    }

    #[test]
    fn another_sites_request_is_refused() {
        let mut r = Registrar::new("s1", Vec::new(), Vec::new());
        let req = Request {
            site: "s2".into(),
            machine: "m".into(),
            ek: Endorsement::EccP256,
            ek_certificate: String::new(),
            ek_public: String::new(),
            ak_public: String::new(),
        };
        let why = r.challenge(&req).unwrap_err().to_string();
        assert!(why.contains("into site \"s2\""), "{why}");
    }

    #[test]
    fn a_boot_report_too_far_from_the_cores_clock_is_refused() {
        let enrolled = Enrolled {
            ak_public: String::new(),
            ek: String::new(),
            release: "0.1.0".into(),
            slot: "a".into(),
            time: 0,
            recovery: None,
        };
        let report = BootReport {
            time: 10_000,
            quote: Quote {
                attest: String::new(),
                signature: String::new(),
                pcrs: Vec::new(),
            },
            events: Vec::new(),
        };
        let why = check_report(&enrolled, &report, 11_000, 900, &[])
            .unwrap_err()
            .to_string();
        assert!(why.contains("1000 s behind"), "{why}");
        let why = check_report(&enrolled, &report, 9_000, 900, &[])
            .unwrap_err()
            .to_string();
        assert!(why.contains("1000 s ahead of"), "{why}");
        // Within the age, the quote itself is checked: here the (empty) enrolled key.
        let why = check_report(&enrolled, &report, 10_500, 900, &[])
            .unwrap_err()
            .to_string();
        assert!(why.starts_with("the attestation key"), "{why}");
    }

    #[test]
    fn an_escrow_key_must_be_rsa_2048_or_more() {
        let why = escrow(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            b"k",
        )
        .unwrap_err()
        .to_string();
        assert!(
            why.starts_with("the escrow key: not an RSA public key"),
            "{why}"
        );
        let rsa_1024 = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCrCvV6ahbl4NpEIO2E9/vymR+J
wXULd3yDbFSlNBlgzzO6G7YKIJfperVu3mF4Lpahm6veaLsaP5cZyGHq1GuLY3cC
eKr5oaug+actdJvCvW6jZdItpQYw+Te3ejqWVTa+NZI/bPzPEJpMULhVnZPMgSo7
MD7tI3DSxjSfaTY5wwIDAQAB
-----END PUBLIC KEY-----
";
        let why = escrow(rsa_1024, b"k").unwrap_err().to_string();
        assert!(why.contains("1024 bits; 2048 or more"), "{why}");
    }

    #[test]
    fn the_core_answers_only_on_the_sites_enrollment_inbox() {
        assert!(is_reply_subject("s1", "_ENROLL_s1.abc123"));
        assert!(is_reply_subject("s1", "_ENROLL_s1.abc.1"));
        for other in [
            "$KV.edge-enrolled.s1.m1",
            "edge.s2.m1.temp",
            "$JS.API.STREAM.PURGE.EDGE",
            "_ENROLL_s1",
            "_ENROLL_s1.",
            "_ENROLL_s10.abc",
            "_ENROLL_s2.abc",
            "_ENROLL_s1.>",
            "_INBOX_s1.abc",
        ] {
            assert!(!is_reply_subject("s1", other), "{other}");
        }
    }

    #[test]
    fn a_certificate_is_issued_for_sane_subjects_and_lifetimes_only() {
        // Checked before the CA is read (here: none).
        let why = issue_certificate("CN=a,OU=x,OU=y", "", 1, "", "")
            .unwrap_err()
            .to_string();
        assert!(why.contains("names OU twice"), "{why}");
        let why = issue_certificate("CN=a", "", 0, "", "")
            .unwrap_err()
            .to_string();
        assert!(why.contains("0 days; 1 to 3650"), "{why}");
        let why = issue_certificate("CN=a", "", 100_000, "", "")
            .unwrap_err()
            .to_string();
        assert!(why.contains("100000 days"), "{why}");
        let why = issue_certificate("CN=a", "", 1, "", "")
            .unwrap_err()
            .to_string();
        assert!(why.starts_with("the CA's key"), "{why}");
    }
}
