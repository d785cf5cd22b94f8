//! The head of an HTTP request to fabricd's `POST /topics/<topic>` (a pod's channel or
//! the site network's listener).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fabricd::http::parse_head(data);
});
