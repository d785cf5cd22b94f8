//! `cargo xtask run [--core]`: build the image if stale and boot it with the console on
//! this terminal; with `--core`, joined to the core `cargo xtask core up` runs. Every
//! process started is gone when this returns (also after Ctrl-C).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Host packages the QEMU machine needs (the image builder asks for its own).
pub const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "ovmf",
    "swtpm",
    "swtpm-tools",
];

pub fn run(core: bool) -> Result<()> {
    crate::host::ensure_packages(VM_PACKAGES)?;
    let joining = core.then(crate::core::joining).transpose()?;
    if joining.is_some() {
        crate::host::ensure_packages(&["socat"])?;
    }
    let out = crate::image::build(&Default::default()).context("failed to build the image")?;
    let manufacturer = joining.as_ref().map(|j| j.fabric.join("tpm-manufacturer"));
    // The operator enrolls the box once it asks (edgectl waits for its request).
    let mut enroll = match (&joining, &manufacturer) {
        (Some(j), Some(m)) => Some(start_enrollment(j, m, &out)?),
        _ => None,
    };
    let status = qemu_tests::interactive::run(&out.raw, |opts| {
        if let (Some(j), Some(m)) = (&joining, &manufacturer) {
            opts.guestfwd.extend(j.guestfwd.iter().cloned());
            opts.fw_cfg
                .push(("opt/org.edgeos/provision".into(), j.provision.clone()));
            opts.tpm_manufacturer = Some(m.clone());
        }
    });
    if let Some(child) = enroll.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = status?;
    // QEMU exits 0 on guest power-off and on Ctrl-A x; a signal (Ctrl-C) is the user's
    // way out too, not a failure.
    if !status.success() && status.code().is_some() {
        bail!("QEMU exited with {status}");
    }
    Ok(())
}

/// `edgectl enroll` for this box, in the background: it waits for the box's request
/// (the box's TPM is made by the manufacturer whose CA is in `manufacturer`, when the
/// machine starts), checks its boot against this image's pcr11.json and issues its site
/// certificate. What it says goes to `<fabric>/enroll.log`.
fn start_enrollment(
    j: &crate::core::Joining,
    manufacturer: &Path,
    out: &crate::image::ImageOutputs,
) -> Result<Child> {
    let log = j.fabric.join("enroll.log");
    let log_file = std::fs::File::create(&log)?;
    // The manufacturer's CA exists once the machine has made its TPM: the script waits.
    let root = manufacturer.join("swtpm-localca-rootca-cert.pem");
    let script = format!(
        "while [ ! -s '{}' ]; do sleep 1; done; exec \"$0\" \"$@\"",
        root.display()
    );
    let f = |n: &str| j.fabric.join(n);
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(&j.edgectl)
        .args([
            "--server",
            &format!("tls://127.0.0.1:{}", crate::core::NATS_PORT),
        ])
        .arg("--ca")
        .arg(f("ca.pem"))
        .arg("--cert")
        .arg(f("operator.pem"))
        .arg("--key")
        .arg(f("operator.key"))
        .args(["enroll", "--site", "site0", "--timeout-secs", "1800"])
        .arg("--manufacturer-ca")
        .arg(&root)
        .arg("--manufacturer-ca")
        .arg(manufacturer.join("issuercert.pem"))
        .arg("--release")
        .arg(format!("{}={}", out.version, out.pcr11.display()))
        .arg("--release-key")
        .arg(&out.release_key)
        .arg("--issuer-cert")
        .arg(f("ca.pem"))
        .arg("--issuer-key")
        .arg(f("ca.key"))
        .arg("--escrow-key")
        .arg(f("escrow.pub"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("failed to start edgectl enroll")?;
    eprintln!(
        "edgeos: joining the core: site0 at tls://127.0.0.1:{}; edgectl enroll waits for the box ({})",
        crate::core::NATS_PORT,
        log.display()
    );
    Ok(child)
}
