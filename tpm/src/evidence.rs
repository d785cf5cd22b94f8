//! The core's half of attestation, without a TPM: the credential a box can open only if
//! its attestation key lives in the TPM that holds its endorsement key
//! (TPM2_MakeCredential, done in software), and the check of a quote the box returns
//! (signature, nonce, PCR values). Every structure is read from the TPM's wire format
//! (TPM 2.0 Library, Part 2) by hand: the core runs edgectl, not tpm2-tss.
//!
//! Only the algorithms `identity` uses are taken: ECC P-256 keys with SHA-256 names, an
//! ECDSA/SHA-256 attestation key, an AES-128-CFB endorsement key (the TCG EK Credential
//! Profile's low-range ECC template). Anything else is refused by name.

use ring::{agreement, hmac, rand, signature};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::error::Error;
use crate::policy::{base64_decode, base64_encode, ALG_SHA256};

const ALG_ECC: u16 = 0x0023;
const ALG_RSA: u16 = 0x0001;
const ALG_NULL: u16 = 0x0010;
const ALG_AES: u16 = 0x0006;
const ALG_CFB: u16 = 0x0043;
const ALG_ECDSA: u16 = 0x0018;
const ECC_NIST_P256: u16 = 0x0003;
const TPM_GENERATED: u32 = 0xFF54_4347;
const ST_ATTEST_QUOTE: u16 = 0x8018;
const ST_ATTEST_CERTIFY: u16 = 0x8017;

/// TPMA_OBJECT bits.
const FIXED_TPM: u32 = 1 << 1;
const FIXED_PARENT: u32 = 1 << 4;
const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const RESTRICTED: u32 = 1 << 16;
const DECRYPT: u32 = 1 << 17;
const SIGN: u32 = 1 << 18;

/// Which of the TCG EK Credential Profile's low-range templates the endorsement key is
/// made from. Real TPMs carry a manufacturer's certificate for the RSA one at least
/// (NV index 0x01c00002), often for the ECC one too (0x01c0000a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Endorsement {
    Rsa2048,
    EccP256,
}

/// TPM2_Certify's output: the TPMS_ATTEST and TPMT_SIGNATURE, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certified {
    pub attest: String,
    pub signature: String,
}

/// What the box answers a challenge with: TPMS_ATTEST as the TPM signed it, the
/// TPMT_SIGNATURE, and the values of the PCRs it quotes (which the check recomputes the
/// quoted digest from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quote {
    /// TPMS_ATTEST, base64.
    pub attest: String,
    /// TPMT_SIGNATURE, base64.
    pub signature: String,
    /// Each quoted PCR of the SHA-256 bank and its value (hex), in ascending order.
    pub pcrs: Vec<(u32, String)>,
}

/// The two halves of TPM2_ActivateCredential's input, as the TPM takes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// TPM2B_ID_OBJECT's contents: the integrity HMAC and the encrypted credential, base64.
    pub id_object: String,
    /// TPM2B_ENCRYPTED_SECRET's contents, base64: the seed encrypted to an RSA endorsement
    /// key, or the ephemeral point of the ECDH with an ECC one.
    pub secret: String,
}

/// What a checked quote says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quoted {
    /// The PCRs quoted (SHA-256 bank), in ascending order.
    pub pcrs: Vec<(u32, [u8; 32])>,
    /// The TPM's reset count: it changes at every boot of the box.
    pub reset_count: u32,
}

fn refused(why: String) -> Error {
    Error::Untrusted(why)
}

/// A cursor over one TPM structure; running out is an error naming the structure.
struct Reader<'a> {
    what: &'static str,
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, b: &'a [u8]) -> Self {
        Reader { what, b }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.b.len() < n {
            return Err(Error::Input {
                what: self.what,
                why: format!("ends early ({} bytes left, {n} needed)", self.b.len()),
            });
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    /// A TPM2B: a 16-bit size, then that many bytes.
    fn sized(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn end(&self) -> Result<(), Error> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(Error::Input {
                what: self.what,
                why: format!("{} bytes after its end", self.b.len()),
            })
        }
    }
}

/// A key's TPMT_PUBLIC, as far as the checks need it.
pub(crate) struct TpmPublic {
    attributes: u32,
    /// TPMT_SYM_DEF_OBJECT: (algorithm, key bits, mode); ALG_NULL for none.
    symmetric: (u16, u16, u16),
    /// The signing or decryption scheme: (scheme, hash); ALG_NULL for none.
    scheme: (u16, u16),
    pub(crate) key: PublicKey,
}

pub(crate) enum PublicKey {
    /// RSA: the modulus (big-endian, no leading zeros) and the exponent.
    Rsa { modulus: Vec<u8>, exponent: u32 },
    /// ECC NIST P-256: the point, 0x04 || x || y.
    EccP256([u8; 65]),
}

/// A TPMT_PUBLIC of an RSA or an ECC P-256 key with a SHA-256 name.
pub(crate) fn parse_public(what: &'static str, b: &[u8]) -> Result<TpmPublic, Error> {
    let bad = |why: String| Error::Input { what, why };
    let mut r = Reader::new(what, b);
    let kind = r.u16()?;
    if kind != ALG_ECC && kind != ALG_RSA {
        return Err(bad(format!(
            "a key of algorithm {kind:#06x}, where an RSA ({ALG_RSA:#06x}) or ECC ({ALG_ECC:#06x}) key is needed"
        )));
    }
    let name_alg = r.u16()?;
    if name_alg != ALG_SHA256 {
        return Err(bad(format!(
            "a name algorithm {name_alg:#06x}, where SHA-256 is needed"
        )));
    }
    let attributes = r.u32()?;
    r.sized()?; // authPolicy
    let sym_alg = r.u16()?;
    let symmetric = if sym_alg == ALG_NULL {
        (ALG_NULL, 0, 0)
    } else {
        (sym_alg, r.u16()?, r.u16()?)
    };
    let scheme_alg = r.u16()?;
    let scheme = match scheme_alg {
        ALG_NULL => (ALG_NULL, 0),
        // ECDAA carries a count after the hash.
        0x001A => {
            let hash = r.u16()?;
            r.u16()?;
            (scheme_alg, hash)
        }
        _ => (scheme_alg, r.u16()?),
    };
    let key = if kind == ALG_RSA {
        r.u16()?; // keyBits: the modulus says it
        let exponent = match r.u32()? {
            0 => 65537,
            e => e,
        };
        let n = r.sized()?;
        let first = n.iter().position(|&b| b != 0).unwrap_or(n.len());
        PublicKey::Rsa {
            modulus: n[first..].to_vec(),
            exponent,
        }
    } else {
        let curve = r.u16()?;
        if curve != ECC_NIST_P256 {
            return Err(bad(format!(
                "curve {curve:#06x}, where NIST P-256 is needed"
            )));
        }
        if r.u16()? != ALG_NULL {
            r.u16()?; // the KDF's hash
        }
        let x = r.sized()?;
        let y = r.sized()?;
        if x.len() > 32 || y.len() > 32 {
            return Err(bad("a point coordinate longer than 32 bytes".into()));
        }
        let mut point = [0u8; 65];
        point[0] = 4;
        point[33 - x.len()..33].copy_from_slice(x);
        point[65 - y.len()..].copy_from_slice(y);
        PublicKey::EccP256(point)
    };
    r.end()?;
    Ok(TpmPublic {
        attributes,
        symmetric,
        scheme,
        key,
    })
}

/// An object's name: its name algorithm (SHA-256) and the hash of its TPMT_PUBLIC.
pub fn name(public: &[u8]) -> Vec<u8> {
    let mut n = ALG_SHA256.to_be_bytes().to_vec();
    n.extend_from_slice(&sha2::Sha256::digest(public));
    n
}

/// Checks that a TPMT_PUBLIC is an attestation key: an ECDSA/SHA-256 P-256 key that signs
/// only what the TPM itself produced (restricted), was made inside the TPM and can never
/// leave it (fixedTPM, fixedParent, sensitiveDataOrigin).
fn attestation_key(public: &[u8]) -> Result<[u8; 65], Error> {
    let key = parse_public("the attestation key", public)?;
    let need = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
    if key.attributes & need != need || key.attributes & DECRYPT != 0 {
        return Err(refused(format!(
            "the attestation key's attributes {:#010x} are not those of a restricted signing key that never leaves its TPM",
            key.attributes
        )));
    }
    if key.scheme != (ALG_ECDSA, ALG_SHA256) {
        return Err(refused(format!(
            "the attestation key's scheme is {:#06x}/{:#06x}, not ECDSA with SHA-256",
            key.scheme.0, key.scheme.1
        )));
    }
    match key.key {
        PublicKey::EccP256(point) => Ok(point),
        PublicKey::Rsa { .. } => Err(refused(
            "the attestation key is an RSA key; an ECC P-256 key is needed".into(),
        )),
    }
}

/// KDFa (Part 1, 11.4.10.2) with HMAC-SHA-256: `bits` of key from `key`, the label (a NUL
/// is added), and the two contexts.
fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = Vec::new();
    let mut counter = 1u32;
    while out.len() * 8 < bits as usize {
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(bits as usize / 8);
    out
}

/// KDFe (Part 1, 11.4.10.3) with SHA-256: the seed from an ECDH shared secret `z`.
fn kdfe(z: &[u8], label: &str, party_u: &[u8], party_v: &[u8], bits: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut counter = 1u32;
    while out.len() * 8 < bits as usize {
        let mut h = sha2::Sha256::new();
        h.update(counter.to_be_bytes());
        h.update(z);
        h.update(label.as_bytes());
        h.update([0]);
        h.update(party_u);
        h.update(party_v);
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(bits as usize / 8);
    out
}

/// `N` bytes from the system's random numbers.
pub(crate) fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    rand::SecureRandom::fill(&rand::SystemRandom::new(), &mut bytes).map_err(|_| Error::Input {
        what: "the system's random numbers",
        why: "none could be read".into(),
    })?;
    Ok(bytes)
}

/// The seed of a credential for an RSA endorsement key: 32 random bytes, and them
/// encrypted to the key with OAEP (SHA-256, label "IDENTITY").
fn seed_rsa(modulus: &[u8], exponent: u32) -> Result<(Vec<u8>, Vec<u8>), Error> {
    use rsa::{BigUint, Oaep, RsaPublicKey};
    let bad = |why: String| Error::Input {
        what: "the endorsement key",
        why,
    };
    let key = RsaPublicKey::new(BigUint::from_bytes_be(modulus), BigUint::from(exponent))
        .map_err(|e| bad(e.to_string()))?;
    let seed = random::<32>()?.to_vec();
    let encrypted = key
        .encrypt(
            &mut rsa::rand_core::OsRng,
            Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|e| bad(format!("failed to encrypt the seed: {e}")))?;
    Ok((seed, encrypted))
}

/// The seed of a credential for an ECC P-256 endorsement key: from an ephemeral ECDH
/// with it (KDFe), and the ephemeral point (TPMS_ECC_POINT) the TPM repeats it with.
fn seed_ecc(ek: &[u8; 65]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let failed = |what: &'static str| {
        move |_| Error::Input {
            what,
            why: "the ECDH exchange failed (not a point on P-256?)".into(),
        }
    };
    let rng = rand::SystemRandom::new();
    let ephemeral = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
        .map_err(failed("the ephemeral key"))?;
    let public = ephemeral
        .compute_public_key()
        .map_err(failed("the ephemeral key"))?;
    let (ex, ey) = (&public.as_ref()[1..33], &public.as_ref()[33..65]);
    let seed = agreement::agree_ephemeral(
        ephemeral,
        &agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &ek[..]),
        |z| kdfe(z, "IDENTITY", ex, &ek[1..33], 256),
    )
    .map_err(failed("the endorsement key"))?;
    let mut secret = Vec::with_capacity(68);
    for coordinate in [ex, ey] {
        secret.extend_from_slice(&32u16.to_be_bytes());
        secret.extend_from_slice(coordinate);
    }
    Ok((seed, secret))
}

/// TPM2_MakeCredential in software (Part 1, 24: credential protection): `credential`
/// (at most 32 bytes) encrypted so that only the TPM holding the endorsement key
/// `ek_public` can open it, and only for the object named `ak_name`; the TPM checks the
/// name itself, so the credential coming back proves `ak_name` is an object of that TPM.
pub fn make_credential(
    ek_public: &[u8],
    ak_name: &[u8],
    credential: &[u8],
) -> Result<Credential, Error> {
    let ek = parse_public("the endorsement key", ek_public)?;
    let need = FIXED_TPM | FIXED_PARENT | RESTRICTED | DECRYPT;
    if ek.attributes & need != need || ek.attributes & SIGN != 0 {
        return Err(refused(format!(
            "the endorsement key's attributes {:#010x} are not those of a restricted decryption key that never leaves its TPM",
            ek.attributes
        )));
    }
    if ek.symmetric != (ALG_AES, 128, ALG_CFB) {
        return Err(Error::Input {
            what: "the endorsement key",
            why: format!(
                "its symmetric algorithm is {:#06x}/{}/{:#06x}, not AES-128-CFB",
                ek.symmetric.0, ek.symmetric.1, ek.symmetric.2
            ),
        });
    }
    if credential.is_empty() || credential.len() > 32 {
        return Err(Error::Input {
            what: "the credential",
            why: format!("{} bytes; 1 to 32 are allowed", credential.len()),
        });
    }
    let (seed, secret) = match &ek.key {
        PublicKey::Rsa { modulus, exponent } => seed_rsa(modulus, *exponent)?,
        PublicKey::EccP256(point) => seed_ecc(point)?,
    };

    // encIdentity: the credential as a TPM2B_DIGEST, AES-128-CFB with a zero IV.
    let sym_key = kdfa(&seed, "STORAGE", ak_name, &[], 128);
    let mut enc_identity = (credential.len() as u16).to_be_bytes().to_vec();
    enc_identity.extend_from_slice(credential);
    {
        use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
        cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &[0u8; 16])
            .map_err(|e| Error::Input {
                what: "the credential key",
                why: e.to_string(),
            })?
            .encrypt(&mut enc_identity);
    }
    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let mut ctx = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    ctx.update(&enc_identity);
    ctx.update(ak_name);
    let outer = ctx.sign();

    let mut id_object = (outer.as_ref().len() as u16).to_be_bytes().to_vec();
    id_object.extend_from_slice(outer.as_ref());
    id_object.extend_from_slice(&enc_identity);
    Ok(Credential {
        id_object: base64_encode(&id_object),
        secret: base64_encode(&secret),
    })
}

/// A TPMS_ATTEST that the attestation key signed, made for the nonce asked.
struct SignedAttest {
    attest: Vec<u8>,
    /// Where the type-specific part (`attested`) starts.
    attested: usize,
    reset_count: u32,
}

/// Checks that `ak_public` is an attestation key, that it signed `attest` (base64) with
/// `signature` (TPMT_SIGNATURE, base64), that the TPM generated it, that it is of type
/// `kind` and carries `nonce`.
fn signed_attest(
    ak_public: &[u8],
    attest: &str,
    signature: &str,
    nonce: &[u8],
    kind: u16,
    name: &str,
) -> Result<SignedAttest, Error> {
    let ak = attestation_key(ak_public)?;
    let attest = base64_decode(attest).map_err(|why| Error::Input {
        what: "the attest",
        why,
    })?;
    let sig = base64_decode(signature).map_err(|why| Error::Input {
        what: "the attest's signature",
        why,
    })?;

    // TPMT_SIGNATURE: ECDSA, SHA-256, r and s.
    let mut r = Reader::new("the attest's signature", &sig);
    let (alg, hash) = (r.u16()?, r.u16()?);
    if (alg, hash) != (ALG_ECDSA, ALG_SHA256) {
        return Err(refused(format!(
            "the {name} is signed with {alg:#06x}/{hash:#06x}, not ECDSA with SHA-256"
        )));
    }
    let (sr, ss) = (r.sized()?, r.sized()?);
    r.end()?;
    if sr.len() > 32 || ss.len() > 32 {
        return Err(refused(format!(
            "the {name}'s signature is not a P-256 signature"
        )));
    }
    let mut fixed = [0u8; 64];
    fixed[32 - sr.len()..32].copy_from_slice(sr);
    fixed[64 - ss.len()..].copy_from_slice(ss);
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &ak[..])
        .verify(&attest, &fixed)
        .map_err(|_| {
            refused(format!(
                "the {name}'s signature is not the attestation key's: forged, or from another TPM"
            ))
        })?;

    // TPMS_ATTEST up to its type-specific part.
    let mut r = Reader::new("the attest", &attest);
    if r.u32()? != TPM_GENERATED {
        return Err(refused(
            "the attest was not generated by a TPM (magic)".into(),
        ));
    }
    let got = r.u16()?;
    if got != kind {
        return Err(refused(format!(
            "the attest is of type {got:#06x}, not a {name} ({kind:#06x})"
        )));
    }
    r.sized()?; // qualifiedSigner
    let extra = r.sized()?;
    if extra != nonce {
        return Err(refused(format!(
            "the {name} was made for another nonce: a replay, or an answer to another challenge"
        )));
    }
    r.u64()?; // clock
    let reset_count = r.u32()?;
    r.u32()?; // restartCount
    r.u8()?; // safe
    r.u64()?; // firmwareVersion
    let attested = attest.len() - r.b.len();
    Ok(SignedAttest {
        attest,
        attested,
        reset_count,
    })
}

/// Checks a site key's certification (TPM2_Certify by the attestation key `ak_public`,
/// for `nonce`): the TPM vouches that the object named in it is the key `key_public`
/// (TPMT_PUBLIC), and that key is an ECDSA P-256 signing key made in the TPM that cannot
/// leave it. Returns the key's point (0x04 || x || y), for the certificate.
pub fn check_certify(
    ak_public: &[u8],
    key_public: &[u8],
    attest: &str,
    signature: &str,
    nonce: &[u8],
) -> Result<[u8; 65], Error> {
    let key = parse_public("the site key", key_public)?;
    let need = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | SIGN;
    if key.attributes & need != need || key.attributes & (DECRYPT | RESTRICTED) != 0 {
        return Err(refused(format!(
            "the site key's attributes {:#010x} are not those of a signing key made in the TPM that never leaves it",
            key.attributes
        )));
    }
    let PublicKey::EccP256(point) = key.key else {
        return Err(refused("the site key is not an ECC P-256 key".into()));
    };
    let signed = signed_attest(
        ak_public,
        attest,
        signature,
        nonce,
        ST_ATTEST_CERTIFY,
        "certification",
    )?;
    // TPMS_CERTIFY_INFO: the object's name, then its qualified name.
    let mut r = Reader::new("the certification", &signed.attest[signed.attested..]);
    let certified = r.sized()?;
    r.sized()?;
    r.end()?;
    if certified != name(key_public) {
        return Err(refused(
            "the certification is of another key than the one presented".into(),
        ));
    }
    Ok(point)
}

/// The site key's public part (TPMT_PUBLIC) as the PEM SubjectPublicKeyInfo a
/// certificate authority issues a certificate for (`openssl x509 -force_pubkey`).
pub fn site_key_pem(key_public: &[u8]) -> Result<String, Error> {
    let key = parse_public("the site key", key_public)?;
    let PublicKey::EccP256(point) = key.key else {
        return Err(Error::Input {
            what: "the site key",
            why: "not an ECC P-256 key".into(),
        });
    };
    // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (0 unused) point }.
    const PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let der = [&PREFIX[..], &point[..]].concat();
    let b64 = crate::policy::base64_encode(&der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    Ok(format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    ))
}

/// An ECDSA signature (r, s, big-endian) as DER: SEQUENCE { INTEGER r, INTEGER s }.
pub fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    let integer = |v: &[u8]| {
        let first = v
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(v.len().saturating_sub(1));
        let v = &v[first.min(v.len())..];
        let mut out = vec![0x02];
        let pad = v.first().is_none_or(|&b| b & 0x80 != 0);
        out.push((v.len() + pad as usize) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let (r, s) = (integer(r), integer(s));
    let mut out = vec![0x30, (r.len() + s.len()) as u8];
    out.extend(r);
    out.extend(s);
    out
}

/// Checks a quote by the attestation key `ak_public` (TPMT_PUBLIC): that the key is an
/// attestation key, that it signed the TPMS_ATTEST, that the TPM made it for `nonce`, and
/// that the PCR values given are the ones it quoted. Returns those values; whether they
/// are values the core accepts is the caller's question.
pub fn check_quote(ak_public: &[u8], quote: &Quote, nonce: &[u8]) -> Result<Quoted, Error> {
    let signed = signed_attest(
        ak_public,
        &quote.attest,
        &quote.signature,
        nonce,
        ST_ATTEST_QUOTE,
        "quote",
    )?;
    let reset_count = signed.reset_count;
    let mut r = Reader::new("the quote's attest", &signed.attest[signed.attested..]);
    let mut selected = Vec::new();
    for _ in 0..r.u32()? {
        let hash = r.u16()?;
        let size = r.u8()? as usize;
        let bitmap = r.take(size)?;
        if hash != ALG_SHA256 {
            return Err(refused(format!(
                "the quote covers bank {hash:#06x}; only SHA-256 is checked"
            )));
        }
        for (i, byte) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    selected.push(i as u32 * 8 + bit);
                }
            }
        }
    }
    let digest = r.sized()?;
    r.end()?;

    let mut pcrs = Vec::new();
    let mut h = sha2::Sha256::new();
    for (index, value) in &quote.pcrs {
        let v = crate::policy::from_hex(value)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| Error::Input {
                what: "the quote's PCR values",
                why: format!("PCR {index}: {value:?} is not 32 bytes of hex"),
            })?;
        h.update(v);
        pcrs.push((*index, v));
    }
    let given: Vec<u32> = pcrs.iter().map(|p| p.0).collect();
    if given != selected {
        return Err(refused(format!(
            "the quote covers PCRs {selected:?}, the values given are of {given:?}"
        )));
    }
    if h.finalize().as_slice() != digest {
        return Err(refused(
            "the PCR values given are not the ones the TPM quoted".into(),
        ));
    }
    Ok(Quoted { pcrs, reset_count })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_matches_the_specification_shape() {
        // Counter 1, label, NUL, contexts, length in bits: one HMAC block for 256 bits,
        // a prefix of it for 128.
        let long = kdfa(b"seed", "STORAGE", b"u", b"", 256);
        assert_eq!(long.len(), 32);
        let short = kdfa(b"seed", "STORAGE", b"u", b"", 128);
        assert_eq!(short.len(), 16);
        // The length is part of the input: 128 bits is not a prefix of 256.
        assert_ne!(&long[..16], &short[..]);
    }

    #[test]
    fn truncated_or_foreign_structures_are_named() {
        let e = check_quote(
            &[0, 0x23],
            &Quote {
                attest: String::new(),
                signature: String::new(),
                pcrs: vec![],
            },
            b"n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("the attestation key"), "{e}");
        assert!(e.to_string().contains("ends early"), "{e}");
        let e = make_credential(&[0, 8, 0, 0x0B], b"name", b"secret").unwrap_err();
        assert!(e.to_string().contains("the endorsement key"), "{e}");
        assert!(e.to_string().contains("ECC"), "{e}");
    }
}
