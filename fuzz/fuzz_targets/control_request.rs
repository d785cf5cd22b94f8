//! One line on init's control port or socket (docs/contracts.md), as an operator's tool
//! or anything on the virtio-serial port sends it. The request parser is init's own
//! file, compiled here as it is (it has nothing of init's besides).
#![no_main]

#[path = "../../init/src/control/request.rs"]
#[allow(dead_code)]
mod request;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if request::parse_relay(line).is_none() {
        let _ = request::parse_request(line);
    }
});
