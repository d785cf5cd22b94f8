//! Lines for the operator on the console (the serial port in QEMU). There is no shell
//! on the box, so the console and the control port are all anyone sees.

use std::io::Write;

/// Writes one line, prefixed `edgeos: `, to /dev/console, falling back to stderr (tests,
/// or a console that cannot be opened). Never fails: nothing must stop init over a line.
pub fn line(text: &str) {
    let mut buf = Vec::with_capacity(text.len() + 9);
    buf.extend_from_slice(b"edgeos: ");
    buf.extend_from_slice(text.as_bytes());
    buf.push(b'\n');
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/console")
        .and_then(|mut c| c.write_all(&buf));
    if written.is_err() {
        let _ = std::io::stderr().write_all(&buf);
    }
}

/// `say!("format {}", args)`: one console line.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::console::line(&format!($($arg)*)) };
}
