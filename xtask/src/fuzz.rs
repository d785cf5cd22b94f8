//! `cargo xtask fuzz`: builds `fuzz/` (its own workspace) with libFuzzer's coverage
//! instrumentation on the stable toolchain, without a sanitizer (Rust's bounds and
//! overflow checks, on in its profile, are what catch), and runs each target for a
//! bounded time from its corpus in the repo. A crash fails the run, naming the target
//! and the input libFuzzer kept (docs/fuzzing.md).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Every target, one per decoder of outside bytes (fuzz/Cargo.toml).
pub const TARGETS: [&str; 12] = [
    "pod_yaml",
    "produce_frame",
    "log_segment",
    "uplink_payload",
    "downlink_manifest",
    "image_allowlist",
    "oci_archive",
    "storage_superblock",
    "update_manifest",
    "control_request",
    "http_head",
    "csi_request",
];

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// What cargo-fuzz passes for libFuzzer's coverage (stable `-C` options). With an
/// explicit `--target`, they reach the targets' code and not the build scripts.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing";

pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target `{t}`; there are: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let repo = crate::image::repo()?;
    let fuzz = repo.join("fuzz");
    let cache = crate::image::debs::cache_root()?.join("fuzz");
    let cargo = || Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    let fmt = cargo()
        .arg("fmt")
        .arg("--manifest-path")
        .arg(fuzz.join("Cargo.toml"))
        .args(["--", "--check"])
        .status()
        .context("failed to run cargo fmt on fuzz/")?;
    if !fmt.success() {
        bail!("fuzz/ is not formatted: run cargo fmt --manifest-path fuzz/Cargo.toml");
    }
    let built = cargo()
        .arg("build")
        .arg("--manifest-path")
        .arg(fuzz.join("Cargo.toml"))
        .args(["--target", TRIPLE, "--bins"])
        .env("CARGO_TARGET_DIR", cache.join("target"))
        .env("RUSTFLAGS", RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("failed to build the fuzz targets")?;
    if !built.success() {
        bail!("the fuzz targets did not build ({built})");
    }
    let mut crashed = Vec::new();
    for t in targets {
        match run_target(&fuzz, &cache, t, seconds) {
            Ok(line) => println!("fuzz {line}"),
            Err(e) => {
                println!("fuzz {t}: FAILED: {e:#}");
                crashed.push(t);
            }
        }
    }
    if !crashed.is_empty() {
        bail!("fuzz targets that crashed: {}", crashed.join(", "));
    }
    Ok(())
}

/// One target for `seconds`: new inputs go to a working corpus under the cache (the
/// repo's corpus is read, never written), crashes to `<cache>/artifacts/<target>/`.
fn run_target(fuzz: &Path, cache: &Path, target: &str, seconds: u64) -> Result<String> {
    let bin = cache.join("target").join(TRIPLE).join("debug").join(target);
    let work = cache.join("corpus").join(target);
    let artifacts = cache.join("artifacts").join(target);
    for d in [&work, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("failed to create {}", d.display()))?;
    }
    let out = Command::new(&bin)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&work)
        .arg(fuzz.join("corpus").join(target))
        .output()
        .with_context(|| format!("failed to run {}", bin.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?".to_string(), |v| v.trim().to_string())
    };
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{target} crashed ({}); the input is in {}; its output:\n{}",
            out.status,
            artifacts.display(),
            tail.join("\n")
        );
    }
    let corpus = std::fs::read_dir(&work).map_or(0, |d| d.count());
    Ok(format!(
        "{target}: {} runs in {seconds} s, {} new units, working corpus {corpus}",
        stat("number_of_executed_units"),
        stat("new_units_added"),
    ))
}
