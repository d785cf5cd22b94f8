//! `cargo xtask run`: build the image if stale and boot it with the console on this
//! terminal. Every process started is gone when this returns (also after Ctrl-C).

use anyhow::{bail, Result};

/// Host packages the QEMU machine needs (the image builder asks for its own).
pub const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "ovmf",
    "swtpm",
    "swtpm-tools",
];

pub fn run() -> Result<()> {
    crate::host::ensure_packages(VM_PACKAGES)?;
    let image = crate::image::build_default()?;
    let status = qemu_tests::interactive::run(&image)?;
    // QEMU exits 0 on guest power-off and on Ctrl-A x; a signal (Ctrl-C) is the user's
    // way out too, not a failure.
    if !status.success() && status.code().is_some() {
        bail!("QEMU exited with {status}");
    }
    Ok(())
}
