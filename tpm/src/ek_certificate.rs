//! The first thing the core asks of a box that wants in: is its endorsement key one a TPM
//! manufacturer vouches for? The EK certificate (read from the TPM's NV by the box) must
//! certify exactly that key, be within its validity, and chain through the CA
//! certificates the operator trusts up to a self-signed one among them. X.509 is read
//! here with a small DER walker: EK certificates carry TPM-specific extensions (a
//! critical subjectAltName of directory names) that TLS-minded verifiers refuse, and
//! none of their extensions matter to this check.

use ring::signature;

use crate::error::Error;
use crate::evidence::{parse_public, PublicKey};
use crate::policy::base64_decode;

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OID: u8 = 0x06;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const EXPLICIT_0: u8 = 0xA0;

// Object identifiers, DER contents.
const RSA_ENCRYPTION: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01];
const SHA256_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0B];
const SHA384_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0C];
const SHA512_WITH_RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0D];
const EC_PUBLIC_KEY: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
const ECDSA_SHA256: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02];
const ECDSA_SHA384: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x03];
const P256: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
const P384: &[u8] = &[0x2B, 0x81, 0x04, 0x00, 0x22];
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// One DER element: its tag, its whole encoding, and its contents.
#[derive(Clone, Copy)]
struct Der<'a> {
    tag: u8,
    raw: &'a [u8],
    body: &'a [u8],
}

/// The next element of `b`, which moves past it.
fn next<'a>(b: &mut &'a [u8]) -> Result<Der<'a>, String> {
    let all = *b;
    let (&tag, rest) = all.split_first().ok_or("ends early")?;
    let (&first, mut rest) = rest.split_first().ok_or("ends early")?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 3 || rest.len() < n {
            return Err(format!("a length of {n} bytes"));
        }
        let len = rest[..n].iter().fold(0usize, |a, &x| a << 8 | x as usize);
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(format!(
            "an element of {len} bytes with {} left",
            rest.len()
        ));
    }
    let header = all.len() - rest.len();
    *b = &rest[len..];
    Ok(Der {
        tag,
        raw: &all[..header + len],
        body: &rest[..len],
    })
}

fn expect<'a>(b: &mut &'a [u8], tag: u8, field: &str) -> Result<Der<'a>, String> {
    let d = next(b).map_err(|e| format!("{field}: {e}"))?;
    if d.tag != tag {
        return Err(format!(
            "{field}: tag {:#04x} where {tag:#04x} belongs",
            d.tag
        ));
    }
    Ok(d)
}

/// The parts of a certificate the check uses.
struct Certificate<'a> {
    tbs: &'a [u8],
    signature_alg: &'a [u8],
    signature: &'a [u8],
    issuer: &'a [u8],
    subject: &'a [u8],
    /// (notBefore, notAfter) as YYYYMMDDHHMMSS.
    validity: (String, String),
    /// The key's algorithm, its curve (EC), and the BIT STRING's contents.
    key_alg: &'a [u8],
    key_curve: &'a [u8],
    key: &'a [u8],
}

/// Contents of a BIT STRING with no unused bits.
fn bits(d: Der<'_>) -> Result<&[u8], String> {
    match d.body.split_first() {
        Some((0, rest)) => Ok(rest),
        _ => Err("a BIT STRING with unused bits".into()),
    }
}

/// The OID of an AlgorithmIdentifier, and its parameter if that is an OID too.
fn algorithm<'a>(d: Der<'a>) -> Result<(&'a [u8], &'a [u8]), String> {
    let mut b = d.body;
    let oid = expect(&mut b, OID, "algorithm")?.body;
    let param = match next(&mut b) {
        Ok(p) if p.tag == OID => p.body,
        _ => &[],
    };
    Ok((oid, param))
}

fn time(d: Der<'_>) -> Result<String, String> {
    let text = std::str::from_utf8(d.body).map_err(|_| "a time that is not text")?;
    let digits = text.strip_suffix('Z').ok_or("a time not in UTC")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("a time {text:?} that is not digits"));
    }
    match (d.tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy: u32 = digits[..2].parse().map_err(|_| "a bad year")?;
            Ok(format!("{}{digits}", if yy >= 50 { "19" } else { "20" }))
        }
        (GENERALIZED_TIME, 14) => Ok(digits.to_owned()),
        _ => Err(format!("a time {text:?} of an unknown form")),
    }
}

fn parse(der: &[u8]) -> Result<Certificate<'_>, String> {
    let mut all = der;
    let cert = expect(&mut all, SEQUENCE, "certificate")?;
    if !all.is_empty() {
        return Err("bytes after the certificate".into());
    }
    let mut c = cert.body;
    let tbs = expect(&mut c, SEQUENCE, "tbsCertificate")?;
    let (signature_alg, _) = algorithm(expect(&mut c, SEQUENCE, "signatureAlgorithm")?)?;
    let signature = bits(expect(&mut c, BIT_STRING, "signature")?)?;

    let mut t = tbs.body;
    let mut first = next(&mut t).map_err(|e| format!("tbsCertificate: {e}"))?;
    if first.tag == EXPLICIT_0 {
        first = next(&mut t).map_err(|e| format!("serialNumber: {e}"))?;
    }
    if first.tag != INTEGER {
        return Err("serialNumber: not an INTEGER".into());
    }
    expect(&mut t, SEQUENCE, "signature")?;
    let issuer = expect(&mut t, SEQUENCE, "issuer")?.raw;
    let mut v = expect(&mut t, SEQUENCE, "validity")?.body;
    let not_before = time(next(&mut v).map_err(|e| format!("notBefore: {e}"))?)?;
    let not_after = time(next(&mut v).map_err(|e| format!("notAfter: {e}"))?)?;
    let subject = expect(&mut t, SEQUENCE, "subject")?.raw;
    let mut spki = expect(&mut t, SEQUENCE, "subjectPublicKeyInfo")?.body;
    let (key_alg, key_curve) = algorithm(expect(&mut spki, SEQUENCE, "the key's algorithm")?)?;
    let key = bits(expect(&mut spki, BIT_STRING, "subjectPublicKey")?)?;
    Ok(Certificate {
        tbs: tbs.raw,
        signature_alg,
        signature,
        issuer,
        subject,
        validity: (not_before, not_after),
        key_alg,
        key_curve,
        key,
    })
}

/// The common name of a Name, for messages; `?` when it has none.
fn common_name(name: &[u8]) -> String {
    let walk = || -> Result<String, String> {
        let mut n = name;
        let mut rdns = expect(&mut n, SEQUENCE, "name")?.body;
        while !rdns.is_empty() {
            let mut set = next(&mut rdns)?.body;
            while !set.is_empty() {
                let mut pair = expect(&mut set, SEQUENCE, "attribute")?.body;
                if expect(&mut pair, OID, "attribute")?.body == COMMON_NAME {
                    return Ok(String::from_utf8_lossy(next(&mut pair)?.body).into_owned());
                }
            }
        }
        Err("none".into())
    };
    walk().unwrap_or_else(|_| "?".into())
}

/// Whether `issuer`'s key made `cert`'s signature.
fn signed_by(cert: &Certificate, issuer: &Certificate) -> Result<(), String> {
    use signature::*;
    let alg: &dyn VerificationAlgorithm =
        match (issuer.key_alg, issuer.key_curve, cert.signature_alg) {
            (RSA_ENCRYPTION, _, SHA256_WITH_RSA) => &RSA_PKCS1_2048_8192_SHA256,
            (RSA_ENCRYPTION, _, SHA384_WITH_RSA) => &RSA_PKCS1_2048_8192_SHA384,
            (RSA_ENCRYPTION, _, SHA512_WITH_RSA) => &RSA_PKCS1_2048_8192_SHA512,
            (EC_PUBLIC_KEY, P256, ECDSA_SHA256) => &ECDSA_P256_SHA256_ASN1,
            (EC_PUBLIC_KEY, P256, ECDSA_SHA384) => &ECDSA_P256_SHA384_ASN1,
            (EC_PUBLIC_KEY, P384, ECDSA_SHA256) => &ECDSA_P384_SHA256_ASN1,
            (EC_PUBLIC_KEY, P384, ECDSA_SHA384) => &ECDSA_P384_SHA384_ASN1,
            _ => {
                return Err(format!(
                "a signature algorithm (OID {}) or issuer key (OID {}) this check does not take",
                oid_text(cert.signature_alg),
                oid_text(issuer.key_alg)
            ))
            }
        };
    UnparsedPublicKey::new(alg, issuer.key)
        .verify(cert.tbs, cert.signature)
        .map_err(|_| "the signature does not verify".into())
}

fn oid_text(oid: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut v = 0u64;
    for &b in oid {
        v = v << 7 | (b & 0x7F) as u64;
        if b & 0x80 == 0 {
            if parts.is_empty() {
                parts.push((v.min(80) / 40).to_string());
                parts.push((v - v.min(80) / 40 * 40).to_string());
            } else {
                parts.push(v.to_string());
            }
            v = 0;
        }
    }
    parts.join(".")
}

/// Any X.509 certificate's validity (DER): notBefore and notAfter as YYYYMMDDHHMMSS, UTC,
/// the form `now_utc` gives (fabricd checks its own client certificate with it).
pub fn validity(der: &[u8]) -> Result<(String, String), Error> {
    parse(der).map(|c| c.validity).map_err(|why| Error::Input {
        what: "certificate",
        why,
    })
}

/// Any X.509 certificate's subject common name (DER); fabricd names a site-network
/// producer by its client certificate's.
pub fn subject_common_name(der: &[u8]) -> Result<String, Error> {
    let cert = parse(der).map_err(|why| Error::Input {
        what: "certificate",
        why,
    })?;
    match common_name(cert.subject) {
        n if n == "?" => Err(Error::Input {
            what: "certificate",
            why: "its subject has no common name (CN)".into(),
        }),
        n => Ok(n),
    }
}

/// The CERTIFICATE blocks of a PEM text, as DER.
pub fn pem_certificates(what: &'static str, pem: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let bad = |why: String| Error::Input { what, why };
    let text = std::str::from_utf8(pem).map_err(|_| bad("not text (PEM)".into()))?;
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let body = &rest[start + 27..];
        let end = body
            .find("-----END CERTIFICATE-----")
            .ok_or_else(|| bad("a certificate without its END line".into()))?;
        let b64: String = body[..end].split_whitespace().collect();
        out.push(
            base64_decode(&b64).map_err(|e| bad(format!("certificate {}: {e}", out.len() + 1)))?,
        );
        rest = &body[end..];
    }
    if out.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(out)
}

/// Checks `cert` (DER, as read from the TPM) against the endorsement key `ek_public`
/// (TPMT_PUBLIC) and the operator's `trusted` CA certificates (DER) at `now`
/// (YYYYMMDDHHMMSS, UTC). Returns the common names of the chain, the EK certificate's
/// issuer first.
pub fn check(
    cert: &[u8],
    ek_public: &[u8],
    trusted: &[Vec<u8>],
    now: &str,
) -> Result<Vec<String>, Error> {
    let bad = |why: String| Error::Input {
        what: "the EK certificate",
        why,
    };
    let refused = |why: String| Error::Untrusted(format!("the EK certificate {why}"));
    let ek_cert = parse(cert).map_err(bad)?;
    let cas = trusted
        .iter()
        .enumerate()
        .map(|(i, der)| {
            parse(der).map_err(|e| Error::Input {
                what: "a trusted CA certificate",
                why: format!("number {}: {e}", i + 1),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    // The certificate is of this very key.
    let ek = parse_public("the endorsement key", ek_public)?;
    let same = match &ek.key {
        PublicKey::Rsa { modulus, exponent } => {
            ek_cert.key_alg == RSA_ENCRYPTION && {
                let (n, e) = rsa_public(ek_cert.key).map_err(bad)?;
                n == modulus.as_slice()
                    && e == &exponent.to_be_bytes()[exponent.leading_zeros() as usize / 8..]
            }
        }
        PublicKey::EccP256(point) => {
            ek_cert.key_alg == EC_PUBLIC_KEY
                && ek_cert.key_curve == P256
                && ek_cert.key == &point[..]
        }
    };
    if !same {
        return Err(refused(
            "certifies another key than this TPM's endorsement key".into(),
        ));
    }

    // Up the chain to a self-signed certificate the operator trusts.
    let mut names = Vec::new();
    let mut current = &ek_cert;
    for _ in 0..8 {
        let (from, to) = &current.validity;
        if now < from.as_str() || now > to.as_str() {
            return Err(refused(format!(
                "chain has {:?} valid from {from} to {to} (UTC), not now ({now})",
                common_name(current.subject)
            )));
        }
        if !std::ptr::eq(current, &ek_cert)
            && current.subject == current.issuer
            && signed_by(current, current).is_ok()
        {
            return Ok(names);
        }
        let mut why = None;
        let issuer = cas.iter().find(|ca| {
            ca.subject == current.issuer
                && match signed_by(current, ca) {
                    Ok(()) => true,
                    Err(e) => {
                        why = Some(e);
                        false
                    }
                }
        });
        let Some(issuer) = issuer else {
            return Err(refused(format!(
                "is not issued by a CA the core trusts: {:?} names issuer {:?}{}",
                common_name(current.subject),
                common_name(current.issuer),
                why.map(|w| format!(" ({w})")).unwrap_or_default()
            )));
        };
        names.push(common_name(issuer.subject));
        current = issuer;
    }
    Err(refused("chain is longer than 8 certificates".into()))
}

/// (modulus, exponent) of a PKCS#1 RSAPublicKey, without leading zeros.
fn rsa_public(der: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let mut b = der;
    let mut seq = expect(&mut b, SEQUENCE, "RSAPublicKey")?.body;
    let strip = |x: &'_ [u8]| -> usize { x.iter().position(|&b| b != 0).unwrap_or(x.len()) };
    let n = expect(&mut seq, INTEGER, "modulus")?.body;
    let e = expect(&mut seq, INTEGER, "publicExponent")?.body;
    Ok((&n[strip(n)..], &e[strip(e)..]))
}

/// Now, as `check` takes it.
pub fn now_utc() -> String {
    let t = ::time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}{:02}{:02}{:02}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_read_as_dotted_text() {
        assert_eq!(oid_text(SHA256_WITH_RSA), "1.2.840.113549.1.1.11");
        assert_eq!(oid_text(P384), "1.3.132.0.34");
    }

    #[test]
    fn damaged_certificates_are_named() {
        let e = check(&[0x30, 0x05, 0x02], &[], &[], "20260101000000").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the EK certificate: certificate:"),
            "{e}"
        );
        let utc = |t: &[u8]| {
            let mut der = vec![UTC_TIME, t.len() as u8];
            der.extend_from_slice(t);
            time(next(&mut &der[..]).unwrap())
        };
        assert_eq!(utc(b"491231235959Z").unwrap(), "20491231235959");
        assert_eq!(utc(b"500101000000Z").unwrap(), "19500101000000");
        assert!(utc("é0101000000Z".as_bytes()).is_err());
        let e = pem_certificates("the CA file", b"hello").unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE block"), "{e}");
    }
}
