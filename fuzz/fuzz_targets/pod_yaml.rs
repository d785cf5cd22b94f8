//! A pod manifest as noded reads it from the static, site and downlink directories.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = noded::manifest::parse("fuzz.yaml", &text);
});
