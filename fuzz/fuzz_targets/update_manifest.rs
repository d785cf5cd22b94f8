//! An OS update bundle's manifest and an update window, as init and fabricd read them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = edge_update::Manifest::parse(data);
    let _ = edge_update::window::Window::parse(&String::from_utf8_lossy(data));
});
