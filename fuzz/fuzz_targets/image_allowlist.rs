//! A signed image allowlist (the image's, or one the core delivers) as noded reads it.
#![no_main]
use ring::signature::{Ed25519KeyPair, KeyPair};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let kp = Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).expect("a seed");
    let public = kp.public_key().as_ref().to_vec();
    let _ = noded::policy::verify(data, &public, "fuzz");
    let mut signed = kp.sign(data).as_ref().to_vec();
    signed.extend_from_slice(data);
    let _ = noded::policy::verify(&signed, &public, "fuzz");
});
