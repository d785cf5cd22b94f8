//! One request frame of fabricd's produce protocol, as a pod or a site machine sends it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fabricd::produce::parse_request(data);
});
