//! `cargo xtask test`: every check in order (format, lints, unit tests, image build,
//! reproducibility, system tests under QEMU), ending with `N passed, N failed`.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// The version the update scenario moves the box to (newer than any 0.1.0).
pub const UPDATE_VERSION: &str = "0.1.0.1";
/// Its security version and the bad one's: one above the definition's, so that the
/// blessed update raises the box's floor (kept in the TPM's counter).
pub const UPDATE_SECURITY_VERSION: u64 = 2;

/// The update scenario's bundles (qemu-tests/tests/update.rs).
pub struct UpdateBundles {
    pub good: PathBuf,
    pub bad: PathBuf,
    pub fixed: PathBuf,
}

impl UpdateBundles {
    /// Hands them to the system tests, with the update key they are signed with.
    pub fn pass_to(&self, c: &mut Command) -> Result<()> {
        c.env("EDGEOS_UPDATE_BUNDLE", &self.good)
            .env("EDGEOS_BAD_UPDATE_BUNDLE", &self.bad)
            .env("EDGEOS_FIXED_UPDATE_BUNDLE", &self.fixed)
            .env("EDGEOS_UPDATE_PUB", crate::image::update_public_key()?);
        Ok(())
    }
}

/// The same tree built as three newer versions: a good one, a bad one with a service
/// that cannot start (an update to roll back from), and the bad one's fix.
pub fn update_bundles() -> Result<UpdateBundles> {
    // The same tree under `version` (security version 2), with `overlay` laid over it.
    let build = |version: &str, overlay: Option<PathBuf>| {
        crate::image::build(&crate::image::BuildOptions {
            force: false,
            version: Some(version.into()),
            overlay,
            security_version: Some(UPDATE_SECURITY_VERSION),
            erofs_pcluster_kib: None,
        })
        .map(|out| out.bundle)
    };
    Ok(UpdateBundles {
        good: build(UPDATE_VERSION, None)?,
        bad: build(BAD_UPDATE_VERSION, Some(bad_overlay()?))?,
        fixed: build(FIXED_UPDATE_VERSION, None)?,
    })
}

/// A newer version whose trial fails: one of its services can never start.
pub const BAD_UPDATE_VERSION: &str = "0.1.0.2";
/// The bad version's fix, sent as a delta from the bad one (which the box's other slot
/// holds once it has rolled back from it).
pub const FIXED_UPDATE_VERSION: &str = "0.1.0.3";

/// The files laid over the image for [`BAD_UPDATE_VERSION`]: the image's services plus
/// `canary`, whose program does not exist, given up after two restarts.
fn bad_overlay() -> Result<PathBuf> {
    let repo = crate::image::repo()?;
    let services = repo.join("image/overlay/etc/edge/services.toml");
    let mut text = std::fs::read_to_string(&services)
        .with_context(|| format!("failed to read {}", services.display()))?;
    text.push_str(
        "\n# The update tests' bad version (xtask/src/test.rs): a service that never starts.\n\
         [[service]]\nname = \"canary\"\nexec = [\"/usr/bin/edge-canary\"]\n\
         backoff_initial_ms = 200\nbackoff_max_ms = 500\nrestart_limit = 2\n",
    );
    let dir = crate::image::target_dir(&repo).join("bad-update-overlay");
    let file = dir.join("etc/edge/services.toml");
    std::fs::create_dir_all(file.parent().context("no parent")?)?;
    std::fs::write(&file, text).with_context(|| format!("failed to write {}", file.display()))?;
    Ok(dir)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn status(mut cmd: Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

struct Outcome {
    name: &'static str,
    result: Result<()>,
    secs: f64,
}

pub fn run(filter: Option<String>) -> Result<()> {
    let mut done: Vec<Outcome> = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| {
        println!("==> {name}");
        let t = Instant::now();
        let result = f();
        match &result {
            Ok(()) => println!("==> {name}: ok"),
            Err(e) => println!("==> {name}: FAILED: {e:#}"),
        }
        let ok = result.is_ok();
        done.push(Outcome {
            name,
            result,
            secs: t.elapsed().as_secs_f64(),
        });
        ok
    };

    let mut packages: Vec<&str> = crate::run::VM_PACKAGES.to_vec();
    packages.push("fdisk"); // sfdisk, for the harness self-test and storaged's GPT test
    packages.push("e2fsprogs"); // mke2fs, for init's ext4 tests
    packages.push("xfsprogs"); // mkfs.xfs, xfs_growfs for the storage_xfs light VM
    packages.push("socat"); // the fabric scenario's relay from the guest to the core
    packages.push("faketime"); // a box whose clock is off (fabricd/tests/uplink.rs)
                               // fabricd's tests and the fabric scenario run a real core and make its certificates.
    packages.extend(crate::bench_fabric::CORE_PACKAGES);
    // The core's Prometheus and promtool: the box's metrics written into it, the alert
    // rules and the dashboard checked (fabricd/tests/prometheus.rs).
    packages.push("prometheus");
    // noded's tests run a real containerd.
    packages.extend(["containerd", "runc"]);
    // edge-tpm links tpm2-tss (found with pkg-config); its tests reach swtpm over TCP.
    packages.extend([
        // init's tests read LUKS2 headers that cryptsetup made.
        "cryptsetup-bin",
        "libtss2-dev",
        "pkg-config",
        "libtss2-tcti-swtpm0",
        "openssl",
        // edge-tpm's lockout test puts its swtpm into dictionary-attack lockout.
        "tpm2-tools",
    ]);
    step("host packages", &mut || {
        crate::host::ensure_packages(&packages)
    });
    step("cargo fmt --check", &mut || {
        let mut c = cargo();
        c.args(["fmt", "--all", "--", "--check"]);
        status(c)
    });
    step("cargo clippy", &mut || {
        let mut c = cargo();
        c.args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        status(c)
    });
    // noded's tests run against the upstream control plane, built from source once.
    let mut controlplane = None;
    step("control plane (from source)", &mut || {
        controlplane = Some(crate::controlplane::build()?);
        Ok(())
    });
    step("unit tests", &mut || {
        let mut c = cargo();
        c.args(["test", "--workspace", "--exclude", "qemu-tests"]);
        if let Some(bin) = &controlplane {
            c.env("EDGEOS_CONTROLPLANE_BIN", bin);
        }
        // The host packages above are installed: a test missing one fails
        // (edge_common::precondition_missing).
        c.env("EDGEOS_TEST_HOST", "required");
        status(c)
    });
    step("fuzz (30 s per target)", &mut || crate::fuzz::run(30, None));
    let mut image = None;
    let built = step("image", &mut || {
        image = Some(crate::image::build_default()?);
        Ok(())
    });
    // The update scenario's newer versions: the same tree under other version strings,
    // the second with a service that cannot start (a bad update, to roll back from).
    let mut update = None;
    step("update bundles", &mut || {
        update = Some(update_bundles()?);
        Ok(())
    });
    step("image reproducible", &mut || {
        if !built {
            bail!("skipped: the image did not build");
        }
        crate::image::check_reproducible()
    });
    step("system tests (QEMU)", &mut || {
        let Some(image) = &image else {
            bail!("skipped: the image did not build");
        };
        let mut c = cargo();
        // Every scenario runs and reports, even after one has failed.
        c.args(["test", "-p", "qemu-tests", "--no-fail-fast"])
            .env("EDGEOS_IMAGE", image);
        if let Some(bundles) = &update {
            bundles.pass_to(&mut c)?;
        }
        if let Some(f) = &filter {
            c.args(["--", f]);
        }
        status(c)
    });

    println!();
    for o in &done {
        let mark = if o.result.is_ok() { "ok    " } else { "FAILED" };
        println!("{mark} {:<24} {:>7.1}s", o.name, o.secs);
    }
    let failed = done.iter().filter(|o| o.result.is_err()).count();
    println!("{} passed, {} failed", done.len() - failed, failed);
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
