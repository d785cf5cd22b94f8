//! `cargo xtask bench update`: the update scenario (qemu-tests/tests/update.rs) without
//! its refusals and power cuts, timed from `edgectl update publish` to the state the core
//! sees: blessed for a good version (sent as a delta from the running one), rolled back
//! for a bad one (sent whole). The delta's size is against the whole bundle's.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::process::Command;

pub fn run() -> Result<()> {
    let mut packages: Vec<&str> = crate::run::VM_PACKAGES.to_vec();
    packages.extend(crate::bench_fabric::CORE_PACKAGES);
    packages.push("socat");
    crate::host::ensure_packages(&packages)?;
    let image = crate::image::build_default()?;
    let bundles = crate::test::update_bundles()?;
    let figures = crate::image::target_dir(&crate::image::repo()?).join("bench-update.json");
    let _ = std::fs::remove_file(&figures);
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.args([
        "test",
        "-p",
        "qemu-tests",
        "--test",
        "update",
        "--",
        "--nocapture",
    ])
    .env("EDGEOS_IMAGE", &image)
    .env("EDGEOS_UPDATE_FIGURES", &figures);
    bundles.pass_to(&mut c)?;
    let st = c.status().context("failed to run the update scenario")?;
    if !st.success() {
        bail!("the update scenario failed ({st})");
    }
    let f: Value = serde_json::from_slice(
        &std::fs::read(&figures)
            .with_context(|| format!("failed to read {}", figures.display()))?,
    )?;
    let num = |k: &str| f.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    println!(
        "bundle: {} bytes; delta from the running version (same tree, another version string): {} bytes ({:.2} %)",
        num("bundle_bytes"),
        num("delta_bytes"),
        100.0 * num("delta_bytes") / num("bundle_bytes")
    );
    println!(
        "publish -> blessed at the core: {:.1} s; bad version: publish -> rolled back at the core {:.1} s, {:.1} s after its trial boot reached stage 2",
        num("publish_to_blessed_s"),
        num("rollback_s"),
        num("rollback_after_trial_boot_s")
    );
    println!(
        "{}",
        json!({
            "bench": "update",
            "bundle_bytes": f["bundle_bytes"],
            // The name for it: the small change is the version string.
            "delta_bytes_small_change": f["delta_bytes"],
            "delta_ratio": num("delta_bytes") / num("bundle_bytes"),
            "publish_to_blessed_s": f["publish_to_blessed_s"],
            "rollback_s": f["rollback_s"],
            "rollback_after_trial_boot_s": f["rollback_after_trial_boot_s"],
        })
    );
    Ok(())
}
