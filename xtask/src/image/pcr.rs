//! PCR 11 at build time: what systemd-stub 252 and systemd-pcrphase will extend into it
//! for a UKI, the TPM2 PolicyPCR digest that binds a secret to that value, and the signed
//! `.pcrsig` JSON that `systemd-measure sign` would write for it. Pure functions; the key
//! and the files come from the caller.
//!
//! The rules, as read in systemd v252 (`src/boot/efi/stub.c` efi_main,
//! `src/boot/measure.c` measure_kernel / measure_phase / verb_sign,
//! `src/boot/pcrphase.c` run):
//! - the stub measures, in the fixed order of [`MEASURED_SECTIONS`], every UKI section
//!   present with a non-zero VirtualSize: first SHA-256 of the name with its NUL, then
//!   SHA-256 of the section's VirtualSize bytes. `.pcrsig` is never measured: it signs
//!   the result.
//! - systemd-pcrphase extends SHA-256 of the phase word, without NUL.
//! - the signature is RSA PKCS#1 v1.5 with SHA-256 over the 32 bytes of the policy digest;
//!   `pkfp` is SHA-256 of the key's DER RSAPublicKey (OpenSSL's `i2d_PublicKey`: PKCS#1,
//!   not SubjectPublicKeyInfo).
//!
//! The TPM arithmetic itself (extend, PolicyPCR) is edge-tpm's `policy`, the same code
//! the box unseals with.

use edge_tpm::policy;
use sha2::{Digest as _, Sha256};

pub use edge_tpm::policy::{extend, hex};

pub type Digest = [u8; 32];

/// The sections systemd-stub 252 measures into PCR 11, in the order it measures them.
pub const MEASURED_SECTIONS: [&str; 7] = [
    ".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey",
];

/// The phase the appliance unseals its data key in: the only one the `.pcrsig` signs.
pub const SIGNED_PHASE: &str = policy::UNSEAL_PHASE;

fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// PCR 11 after systemd-stub measured a UKI with these `(name, contents)` sections,
/// starting from zero. Sections it does not measure (any other name, `.pcrsig`, empty
/// ones) are ignored; given a name twice, the last counts, as in the stub's table scan.
pub fn after_sections(sections: &[(&str, &[u8])]) -> Digest {
    let mut pcr = [0u8; 32];
    for name in MEASURED_SECTIONS {
        let Some((_, contents)) = sections.iter().rev().find(|(n, _)| *n == name) else {
            continue;
        };
        if contents.is_empty() {
            continue;
        }
        let mut with_nul = name.as_bytes().to_vec();
        with_nul.push(0);
        pcr = extend(&pcr, &sha256(&with_nul));
        pcr = extend(&pcr, &sha256(contents));
    }
    pcr
}

/// PCR 11 after systemd-pcrphase extended each word of `phases` (colon-separated, as
/// `systemd-measure --phase=` takes them, e.g. "enter-initrd:leave-initrd").
pub fn after_phases(pcr: &Digest, phases: &str) -> Digest {
    phases
        .split(':')
        .filter(|w| !w.is_empty())
        .fold(*pcr, |pcr, word| extend(&pcr, &sha256(word.as_bytes())))
}

/// The TPM2 policy digest of a PolicyPCR on the SHA-256 bank's PCR 11 alone, holding
/// `value`, from a fresh session.
pub fn policy_pcr11(value: &Digest) -> Digest {
    policy::policy_pcr(policy::PCR_UKI, value)
}

/// The `.pcrsig` section: the JSON `systemd-measure sign --bank=sha256 --json=short`
/// prints, byte for byte (compact, keys in its order, a trailing newline).
/// `pkfp`: SHA-256 of the public key's DER RSAPublicKey; `sig`: the signature of `pol`.
pub fn signature_json(pkfp: &Digest, pol: &Digest, sig: &[u8]) -> String {
    let entry = serde_json::json!({
        "pcrs": [policy::PCR_UKI],
        "pkfp": hex(pkfp),
        "pol": hex(pol),
        "sig": policy::base64_encode(sig),
    });
    // Sorted (serde_json's default) or in insertion order (its preserve_order feature),
    // the keys come out in systemd's order: pcrs, pkfp, pol, sig.
    format!("{}\n", serde_json::json!({ "sha256": [entry] }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_hashes_the_old_value_then_the_digest() {
        // SHA256 of 64 zero bytes: extending a zero PCR by a zero digest.
        assert_eq!(
            hex(&extend(&[0; 32], &[0; 32])),
            "f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b"
        );
    }

    #[test]
    fn sections_are_measured_in_the_stubs_order_whatever_the_input_order() {
        let a = after_sections(&[(".osrel", b"ID=x\n"), (".linux", b"kernel")]);
        let b = after_sections(&[(".linux", b"kernel"), (".osrel", b"ID=x\n")]);
        assert_eq!(a, b);
        let by_hand = {
            let mut p = [0; 32];
            p = extend(&p, &sha256(b".linux\0"));
            p = extend(&p, &sha256(b"kernel"));
            p = extend(&p, &sha256(b".osrel\0"));
            extend(&p, &sha256(b"ID=x\n"))
        };
        assert_eq!(a, by_hand);
    }

    #[test]
    fn the_signature_other_sections_and_empty_ones_are_not_measured() {
        let base = after_sections(&[(".linux", b"kernel")]);
        assert_eq!(
            base,
            after_sections(&[
                (".linux", b"kernel"),
                (".pcrsig", b"{}"),
                (".text", b"code"),
                (".initrd", b""),
            ])
        );
    }

    #[test]
    fn phases_are_words_without_nul_split_at_colons() {
        let p = [7u8; 32];
        let one = extend(&p, &sha256(b"enter-initrd"));
        assert_eq!(after_phases(&p, "enter-initrd"), one);
        assert_eq!(
            after_phases(&p, "enter-initrd::leave-initrd:"),
            extend(&one, &sha256(b"leave-initrd"))
        );
    }

    #[test]
    fn signature_json_is_systemd_measures_short_form() {
        let j = signature_json(&[1; 32], &[2; 32], &[0xff, 0xfe, 0xfd, 0xfc]);
        assert_eq!(
            j,
            format!(
                "{{\"sha256\":[{{\"pcrs\":[11],\"pkfp\":\"{}\",\"pol\":\"{}\",\"sig\":\"//79/A==\"}}]}}\n",
                "01".repeat(32),
                "02".repeat(32)
            )
        );
    }
}
