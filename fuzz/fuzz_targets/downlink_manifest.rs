//! A downlink manifest from the core: the signature check, then the JSON and every
//! item's checks. The input is signed here with a fixed key so the parser sees it.
#![no_main]
use ring::signature::{Ed25519KeyPair, KeyPair};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let kp = Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).expect("a seed");
    let public = kp.public_key().as_ref().to_vec();
    let _ = fabricd::downlink::verify_manifest(data, &public);
    let mut signed = kp.sign(data).as_ref().to_vec();
    signed.extend_from_slice(data);
    let _ = fabricd::downlink::verify_manifest(&signed, &public);
});
