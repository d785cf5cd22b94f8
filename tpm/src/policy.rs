//! The PCR policy, computed without a TPM: the PolicyPCR digest of PCR 11 at a phase, the
//! PolicyAuthorize digest a sealed object carries, and the two inputs systemd-stub hands
//! us from the UKI (`.pcrsig`, the signed policy, and `.pcrpkey`, the key that signed it).
//! Pure functions, so each can be checked against fixed digests and against the TPM.

use sha2::{Digest, Sha256};

use crate::Error;

/// TPM_CC_PolicyPCR and TPM_CC_PolicyAuthorize (TPM 2.0 Part 2, table 12).
const CC_POLICY_PCR: u32 = 0x0000_017F;
const CC_POLICY_AUTHORIZE: u32 = 0x0000_016A;
/// TPM_ALG_SHA256.
pub const ALG_SHA256: u16 = 0x000B;
/// The PCR the UKI, the boot phases and so the signed policy cover.
pub const PCR_UKI: u32 = 11;
/// Ours: what the box was provisioned with from outside the image (the site's core
/// address, CA and identity), measured before any service reads it. 15 is the PCR the
/// UAPI registry gives to the system's identity, and nothing else in our boot extends
/// it (12, for configuration, already holds the command line: systemd-boot hands the
/// UKI's `.cmdline` to the stub as load options, and they are measured there).
pub const PCR_PROVISION: u32 = 15;

/// The phases, in boot order: stage 1 extends the first on entry and the second right
/// after it has (or has not) unsealed the data key, so nothing later in the same boot
/// can unseal again; stage 2 extends `sysinit` when it starts and `ready` once every
/// service is ready.
pub const PHASES: [&str; 4] = ["enter-initrd", "leave-initrd", "sysinit", "ready"];

/// The phase the data key is unsealed at, and so the one the image signs a policy for.
pub const UNSEAL_PHASE: &str = "enter-initrd";

/// TPML_PCR_SELECTION for one PCR of the SHA-256 bank, marshalled.
pub fn pcr_selection(pcr: u32) -> Vec<u8> {
    let mut select = [0u8; 3];
    select[(pcr / 8) as usize] |= 1 << (pcr % 8);
    let mut out = Vec::with_capacity(10);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&ALG_SHA256.to_be_bytes());
    out.push(3);
    out.extend_from_slice(&select);
    out
}

/// The policy digest of a fresh session after TPM2_PolicyPCR on `pcr` holding `value`.
pub fn policy_pcr(pcr: u32, value: &[u8; 32]) -> [u8; 32] {
    policy_pcr_after(&[0; 32], pcr, value)
}

/// The policy digest `old` after TPM2_PolicyPCR on `pcr` holding `value`.
pub fn policy_pcr_after(old: &[u8; 32], pcr: u32, value: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(CC_POLICY_PCR.to_be_bytes());
    h.update(pcr_selection(pcr));
    h.update(Sha256::digest(value));
    h.finalize().into()
}

/// The policy a sealed object carries: "whatever policy the key named `key_name` signs"
/// (TPM2_PolicyAuthorize with an empty policyRef, from a fresh session).
pub fn policy_authorize(key_name: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(CC_POLICY_AUTHORIZE.to_be_bytes());
    h.update(key_name);
    let first: [u8; 32] = h.finalize().into();
    // Then the policyRef (empty).
    Sha256::digest(first).into()
}

/// What the signer signed for PolicyAuthorize: H(approvedPolicy || policyRef).
pub fn authorization_digest(approved: &[u8]) -> [u8; 32] {
    Sha256::digest(approved).into()
}

/// PCR extend: new = H(old || digest).
pub fn extend(old: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(digest);
    h.finalize().into()
}

/// One entry of `.pcrsig` (systemd-measure's JSON): a policy digest and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicy {
    pub pcrs: Vec<u32>,
    /// SHA-256 of the signing key's DER RSAPublicKey, hex.
    pub key_fingerprint: String,
    pub policy: Vec<u8>,
    pub signature: Vec<u8>,
}

#[derive(serde::Deserialize)]
struct SigEntry {
    pcrs: Vec<u32>,
    pkfp: String,
    pol: String,
    sig: String,
}

/// Every SHA-256 entry of a `.pcrsig` document.
pub fn parse_pcrsig(json: &[u8]) -> Result<Vec<SignedPolicy>, Error> {
    let bad = |why: String| Error::Input {
        what: "the PCR signature (.pcrsig)",
        why,
    };
    let doc: std::collections::BTreeMap<String, Vec<SigEntry>> =
        serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let entries = doc
        .get("sha256")
        .ok_or_else(|| bad("no \"sha256\" entries".into()))?;
    entries
        .iter()
        .map(|e| {
            Ok(SignedPolicy {
                pcrs: e.pcrs.clone(),
                key_fingerprint: e.pkfp.to_ascii_lowercase(),
                policy: from_hex(&e.pol).map_err(|w| bad(format!("pol: {w}")))?,
                signature: base64_decode(&e.sig).map_err(|w| bad(format!("sig: {w}")))?,
            })
        })
        .collect()
}

/// The RSA public key of `.pcrpkey` (PEM SubjectPublicKeyInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyKey {
    pub modulus: Vec<u8>,
    pub exponent: u32,
    /// SHA-256 of the DER RSAPublicKey (PKCS#1, what OpenSSL's i2d_PublicKey writes),
    /// hex: `pkfp` in `.pcrsig`.
    pub fingerprint: String,
}

impl PolicyKey {
    /// Whether `signature` is this key's RSA PKCS#1 v1.5 SHA-256 signature of `message`
    /// (how `systemd-measure sign` and `cargo xtask image` sign a policy digest).
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        let e = self.exponent.to_be_bytes();
        let first = e.iter().take_while(|&&b| b == 0).count();
        ring::signature::RsaPublicKeyComponents::<&[u8]> {
            n: &self.modulus,
            e: &e[first..],
        }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            message,
            signature,
        )
        .is_ok()
    }
}

pub fn parse_pcrpkey(pem: &[u8]) -> Result<PolicyKey, Error> {
    use picky_asn1_x509::{PublicKey, SubjectPublicKeyInfo};
    let bad = |why: String| Error::Input {
        what: "the PCR public key (.pcrpkey)",
        why,
    };
    let text = std::str::from_utf8(pem).map_err(|_| bad("not text".into()))?;
    let body: String = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "-----BEGIN PUBLIC KEY-----")
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err(bad("no PEM \"PUBLIC KEY\" block".into()));
    }
    let der = base64_decode(&body).map_err(bad)?;
    let spki: SubjectPublicKeyInfo =
        picky_asn1_der::from_bytes(&der).map_err(|e| bad(format!("not a public key: {e}")))?;
    let PublicKey::Rsa(rsa) = spki.subject_public_key else {
        return Err(bad("not an RSA key".into()));
    };
    let rsa = rsa.0;
    let pkcs1 = picky_asn1_der::to_vec(&rsa).map_err(|e| bad(format!("re-encoding: {e}")))?;
    let strip = |b: &[u8]| {
        let n = b.iter().take_while(|&&x| x == 0).count();
        b[n..].to_vec()
    };
    let modulus = strip(rsa.modulus.as_unsigned_bytes_be());
    let e = strip(rsa.public_exponent.as_unsigned_bytes_be());
    if e.len() > 4 || modulus.len() != 256 {
        return Err(bad(format!(
            "an RSA key of {} bits; the policy key must be RSA 2048",
            modulus.len() * 8
        )));
    }
    let exponent = e.iter().fold(0u32, |a, &b| (a << 8) | b as u32);
    Ok(PolicyKey {
        modulus,
        exponent,
        fingerprint: hex(&Sha256::digest(&pkcs1)),
    })
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd length {}", s.len()));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("not hex at {i}"))
        })
        .collect()
}

pub fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| format!("bad base64: {e}"))
}

pub fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_of_pcr_11_sets_bit_3_of_byte_1() {
        assert_eq!(
            pcr_selection(11),
            [0, 0, 0, 1, 0x00, 0x0B, 3, 0x00, 0x08, 0x00]
        );
    }

    #[test]
    fn policy_pcr_of_a_zero_pcr_is_the_known_digest() {
        // tpm2_policypcr -l sha256:11 with PCR 11 all zeros (as after a TPM reset),
        // computed by hand from Part 3's PolicyPCR formula.
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update([0x00, 0x00, 0x01, 0x7F]);
        h.update([0, 0, 0, 1, 0x00, 0x0B, 3, 0x00, 0x08, 0x00]);
        h.update(Sha256::digest([0u8; 32]));
        let want: [u8; 32] = h.finalize().into();
        assert_eq!(policy_pcr(11, &[0; 32]), want);
        assert_ne!(policy_pcr(11, &[1; 32]), want);
    }

    #[test]
    fn policy_digest_matches_a_tpm_trial_session() {
        // `systemd-measure sign` (v252, swtpm trial session) for a PCR 11 value of
        // 63d46e...1737: its "pol" field.
        let pcr: [u8; 32] =
            from_hex("63d46ef672ecdfd9791f11b3b7b5231a335ea9c62c2f8344fc764e3fab511737")
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(
            hex(&policy_pcr(11, &pcr)),
            "00baaf33f473c0bbeefa92c18a51c49c7cf30f0e520a745026b2033ce5875eaa"
        );
    }

    #[test]
    fn pcrsig_entries_parse_and_bad_ones_are_named() {
        let json = br#"{"sha256":[{"pcrs":[11],"pkfp":"AB01","pol":"00ff","sig":"AAEC"}]}"#;
        let s = parse_pcrsig(json).unwrap();
        assert_eq!(
            s,
            [SignedPolicy {
                pcrs: vec![11],
                key_fingerprint: "ab01".into(),
                policy: vec![0, 0xff],
                signature: vec![0, 1, 2],
            }]
        );
        let e = parse_pcrsig(b"{\"sha1\":[]}").unwrap_err().to_string();
        assert!(e.contains(".pcrsig") && e.contains("sha256"), "{e}");
        let e = parse_pcrsig(br#"{"sha256":[{"pcrs":[11],"pkfp":"","pol":"0g","sig":""}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pol"), "{e}");
    }

    #[test]
    fn a_pem_that_is_not_a_key_is_refused() {
        let e = parse_pcrpkey(b"hello").unwrap_err().to_string();
        assert!(e.contains(".pcrpkey") && e.contains("PEM"), "{e}");
        let e = parse_pcrpkey(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a public key"), "{e}");
    }
}
