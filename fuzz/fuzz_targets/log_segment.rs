//! A log segment as fabricd reads it back on recovery: frames scanned from the start
//! (torn tails and bad CRCs stop the scan), and each frame decoded. The input is also
//! decoded as one frame straight, since the fuzzer rarely forges a CRC.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(len)) = fabricd::record::check_frame(rest) {
        let frame = &rest[..len];
        let _ = fabricd::record::frame_offset(frame);
        let _ = fabricd::record::decode_frame(frame);
        rest = &rest[len..];
    }
    let _ = fabricd::record::decode_frame(data);
});
