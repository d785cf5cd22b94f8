//! What a checked quote means: the box's own event log (init's extends, `eventlog`)
//! replayed against the quoted PCRs. PCR 11 must be the value an accepted release's UKI
//! leads to at `enter-initrd` (its `pcr11.json`, written by `cargo xtask image`),
//! extended with the phase words the log records after it, in the order the boot makes
//! them; PCR 15 must be zeros extended with the provisioning digests the log records.
//! A quote whose PCR 11 no accepted release explains is a box that booted something else.

use serde_json::Value;
use sha2::Digest as _;

use crate::error::Error;
use crate::policy::{
    extend, from_hex, hex, parse_pcrsig, policy_pcr, PolicyKey, PCR_PROVISION, PCR_UKI, PHASES,
    UNSEAL_PHASE,
};

/// One image version the core accepts: PCR 11 at `enter-initrd` for each of its slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub name: String,
    /// (slot, value).
    pub enter_initrd: Vec<(String, [u8; 32])>,
}

/// A release from the image builder's `pcr11.json`: per slot, PCR 11 at `enter-initrd`
/// and the `.pcrsig` entry the slot's UKI carries
/// (`{"a":{"enter-initrd":"<hex>","pcrsig":{"sha256":[...]}},...}`). Each slot's value
/// is accepted only when `key` (the release key: the image's PCR-policy key, whose
/// public half is each UKI's `.pcrpkey`) signed the PolicyPCR digest of it: the list the
/// core accepts is the one the TPM itself unseals for, signed once at release.
pub fn release(name: &str, pcr11_json: &[u8], key: &PolicyKey) -> Result<Release, Error> {
    let bad = |why: String| Error::Input {
        what: "a release's pcr11.json",
        why: format!("{name}: {why}"),
    };
    let v: Value = serde_json::from_slice(pcr11_json).map_err(|e| bad(e.to_string()))?;
    let slots = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let mut enter_initrd = Vec::new();
    for (slot, phases) in slots {
        let text = phases[UNSEAL_PHASE]
            .as_str()
            .ok_or_else(|| bad(format!("slot {slot} has no \"{UNSEAL_PHASE}\"")))?;
        let value = from_hex(text)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| bad(format!("slot {slot}: {text:?} is not 32 bytes of hex")))?;
        let signed = &phases["pcrsig"];
        if signed.is_null() {
            return Err(bad(format!(
                "slot {slot} has no \"pcrsig\": an unsigned release (built before releases were signed, or edited)"
            )));
        }
        let entries = parse_pcrsig(signed.to_string().as_bytes())
            .map_err(|e| bad(format!("slot {slot}: {e}")))?;
        let pol = policy_pcr(PCR_UKI, &value);
        let ours: Vec<_> = entries
            .iter()
            .filter(|e| e.key_fingerprint == key.fingerprint)
            .collect();
        if ours.is_empty() {
            let by: Vec<&str> = entries.iter().map(|e| e.key_fingerprint.as_str()).collect();
            return Err(Error::Untrusted(format!(
                "release {name}: slot {slot} is signed by key {by:?}, not by the release key {}",
                key.fingerprint
            )));
        }
        if !ours
            .iter()
            .any(|e| e.pcrs == [PCR_UKI] && e.policy == pol && key.verifies(&pol, &e.signature))
        {
            return Err(Error::Untrusted(format!(
                "release {name}: slot {slot}: no signature of the release key over PCR 11 = {text} verifies"
            )));
        }
        enter_initrd.push((slot.clone(), value));
    }
    if enter_initrd.is_empty() {
        return Err(bad("no slot".into()));
    }
    Ok(Release {
        name: name.to_owned(),
        enter_initrd,
    })
}

/// One record of our event log: the PCR, the SHA-256 extended, and the event text.
fn record(v: &Value) -> Result<(u32, [u8; 32], &str), String> {
    let pcr = v["pcr"].as_u64().ok_or("no pcr")? as u32;
    let digest = v["digests"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["hashAlg"] == "sha256"))
        .and_then(|d| d["digest"].as_str())
        .ok_or("no sha256 digest")?;
    let digest = from_hex(digest)
        .ok()
        .and_then(|d| <[u8; 32]>::try_from(d).ok())
        .ok_or("a digest that is not 32 bytes of hex")?;
    let event = v["content"]["string"].as_str().unwrap_or("");
    Ok((pcr, digest, event))
}

/// The release and slot whose boot, followed by the extends `events` records, gives the
/// quoted PCR 11 and PCR 15 (`quoted`: PCR and value, as `evidence::check_quote`
/// returns them; both must be quoted). Refused, with the reason, when none does.
pub fn check_boot(
    quoted: &[(u32, [u8; 32])],
    events: &[Value],
    releases: &[Release],
) -> Result<(String, String), Error> {
    let refused = |why: String| Error::Untrusted(why);
    let value_of = |pcr: u32| {
        quoted
            .iter()
            .find(|(i, _)| *i == pcr)
            .map(|(_, v)| *v)
            .ok_or_else(|| refused(format!("the quote does not cover PCR {pcr}")))
    };
    let (pcr11, pcr15) = (value_of(PCR_UKI)?, value_of(PCR_PROVISION)?);

    let mut phases = Vec::new();
    let mut provisioning = [0u8; 32];
    for (i, v) in events.iter().enumerate() {
        let (pcr, digest, event) = record(v).map_err(|why| Error::Input {
            what: "the event log",
            why: format!("record {i}: {why}"),
        })?;
        match pcr {
            PCR_UKI => {
                if !PHASES.contains(&event)
                    || digest != <[u8; 32]>::from(sha2::Sha256::digest(event.as_bytes()))
                {
                    return Err(refused(format!(
                        "event log record {i}: PCR 11 extended with {}, which is not a boot phase",
                        hex(&digest)
                    )));
                }
                phases.push((event, digest));
            }
            PCR_PROVISION => provisioning = extend(&provisioning, &digest),
            // Not ours to judge here.
            _ => {}
        }
    }
    if provisioning != pcr15 {
        return Err(refused(format!(
            "PCR {PCR_PROVISION} is {}, and the provisioning the event log records gives {}",
            hex(&pcr15),
            hex(&provisioning)
        )));
    }
    let words: Vec<&str> = phases.iter().map(|p| p.0).collect();
    if !PHASES.starts_with(&words) || words.first() != Some(&UNSEAL_PHASE) {
        return Err(refused(format!(
            "the event log's boot phases are {words:?}, not in the order a boot makes them"
        )));
    }
    for release in releases {
        for (slot, start) in &release.enter_initrd {
            let replayed = phases[1..]
                .iter()
                .fold(*start, |value, (_, digest)| extend(&value, digest));
            if replayed == pcr11 {
                return Ok((release.name.clone(), slot.clone()));
            }
        }
    }
    Err(refused(format!(
        "PCR 11 is {} after {words:?}, which no accepted release's UKI leads to: the box booted something else",
        hex(&pcr11)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(pcr: u32, digest: &[u8; 32], text: &str) -> Value {
        serde_json::json!({"recnum": 0, "pcr": pcr,
            "digests": [{"hashAlg": "sha256", "digest": hex(digest)}],
            "content_type": "systemd", "content": {"string": text}})
    }

    fn phase(word: &str) -> (Value, [u8; 32]) {
        let d: [u8; 32] = sha2::Sha256::digest(word.as_bytes()).into();
        (event(PCR_UKI, &d, word), d)
    }

    #[test]
    fn a_boot_of_an_accepted_release_replays_and_another_does_not() {
        let uki_a = [0xA1; 32];
        let releases = [Release {
            name: "0.2.0".into(),
            enter_initrd: vec![("a".into(), [0xAA; 32]), ("b".into(), uki_a)],
        }];
        // Slot b's UKI, then enter-initrd (in the release's value), leave-initrd,
        // sysinit, the provisioning, ready.
        let provisioning: [u8; 32] = sha2::Sha256::digest(b"item").into();
        let mut events = Vec::new();
        let mut pcr11 = uki_a;
        for word in PHASES {
            let (e, d) = phase(word);
            events.push(e);
            if word != UNSEAL_PHASE {
                pcr11 = extend(&pcr11, &d);
            }
            if word == "sysinit" {
                events.push(event(
                    PCR_PROVISION,
                    &provisioning,
                    "edgeos provisioning: x",
                ));
            }
        }
        let pcr15 = extend(&[0; 32], &provisioning);
        let quoted = [(11, pcr11), (15, pcr15)];
        assert_eq!(
            check_boot(&quoted, &events, &releases).unwrap(),
            ("0.2.0".to_string(), "b".to_string())
        );

        // Another UKI (no release leads to its PCR 11).
        let other = [(11, extend(&pcr11, &[1; 32])), (15, pcr15)];
        let e = check_boot(&other, &events, &releases)
            .unwrap_err()
            .to_string();
        assert!(e.contains("booted something else"), "{e}");
        // A provisioning the log does not own up to.
        let e = check_boot(&[(11, pcr11), (15, [0; 32])], &events, &releases)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PCR 15"), "{e}");
        // A log that hides an extend of PCR 11.
        let mut hidden = events.clone();
        hidden[0] = event(PCR_UKI, &[9; 32], "enter-initrd");
        let e = check_boot(&quoted, &hidden, &releases)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a boot phase"), "{e}");
        // Phases out of order.
        let mut swapped = events.clone();
        swapped.swap(1, 2);
        let e = check_boot(&quoted, &swapped, &releases)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in the order"), "{e}");
        // PCR 15 not quoted.
        let e = check_boot(&quoted[..1], &events, &releases)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PCR 15"), "{e}");
    }

    #[test]
    fn a_bad_release_file_is_named() {
        let key = PolicyKey {
            modulus: vec![0xC5; 256],
            exponent: 65537,
            fingerprint: hex(&[7; 32]),
        };
        let e = release("0.3.0", b"{\"a\":{}}", &key)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0.3.0") && e.contains("enter-initrd"), "{e}");
        let e = release("x", b"[]", &key).unwrap_err().to_string();
        assert!(e.contains("not a JSON object"), "{e}");
        let unsigned = format!("{{\"a\":{{\"enter-initrd\":\"{}\"}}}}", hex(&[1; 32]));
        let e = release("0.4.0", unsigned.as_bytes(), &key)
            .unwrap_err()
            .to_string();
        assert!(e.contains("slot a has no \"pcrsig\""), "{e}");
    }
}
