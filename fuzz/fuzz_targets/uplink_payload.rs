//! A record's payload as the core's readers decode it (zstd, bounded).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fabricd::uplink::decode(data, Some("zstd"), 1 << 20);
    let _ = fabricd::uplink::decode(data, Some("gzip"), 1 << 20);
});
