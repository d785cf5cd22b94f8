//! `cargo xtask bench fabric`: fabricd (release build, a real process) against a real
//! nats-server on loopback: durable ingest, end to end against direct JetStream
//! publishing, catch-up after a 60 s partition, losses and duplicates counted at the
//! core, fabricd's RSS; and in the same run the peer an edge user would deploy instead
//! (a nats-server leaf node with JetStream, every publish synced) and the disk's own
//! limit; and what scraping and shipping the box's metrics costs fabricd (CPU and bytes
//! a day at the 15 s interval, against fabricd without `[scrape]`). The measuring code is fabricd's `fabric_bench` test (it shares the harness of
//! fabricd's integration tests); this runs it in release and prints its figures, then
//! its JSON line last.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The leaf node's nats-server: Debian 12's (2.9.10) has no `sync_interval`, so it
/// cannot sync each publish before the ack the way fabricd does. This release is built
/// from its module through the Go module proxy into the cache, once.
const LEAF_NATS: &str = "v2.15.3";

/// The core side of the fabric as the tests and the bench run it: a real nats-server,
/// and openssl for the CA and the certificates of mutual TLS.
pub const CORE_PACKAGES: &[&str] = &["nats-server", "openssl"];

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// `<cache>/peers/nats-server-<LEAF_NATS>/nats-server`, built if it is not there.
fn leaf_nats_server() -> Result<PathBuf> {
    let dir = crate::image::debs::cache_root()?
        .join("peers")
        .join(format!("nats-server-{LEAF_NATS}"));
    let bin = dir.join("nats-server");
    if bin.is_file() {
        return Ok(bin);
    }
    let go = crate::go_toolchain::go()?;
    println!(
        "bench fabric: building nats-server {LEAF_NATS} (the leaf node) into {} (once)",
        dir.display()
    );
    let st = Command::new(&go)
        .args([
            "install",
            "-trimpath",
            "-ldflags=-s -w",
            &format!("github.com/nats-io/nats-server/v2@{LEAF_NATS}"),
        ])
        .env("GOBIN", &dir)
        .status()
        .context("failed to run go install nats-server")?;
    if !st.success() || !bin.is_file() {
        bail!("go install github.com/nats-io/nats-server/v2@{LEAF_NATS} failed ({st})");
    }
    Ok(bin)
}

pub fn run() -> Result<()> {
    crate::host::ensure_packages(CORE_PACKAGES)?;
    let leaf = leaf_nats_server()?;
    let st = cargo()
        .args(["build", "--release", "-p", "fabricd"])
        .status()
        .context("failed to run cargo build --release -p fabricd")?;
    if !st.success() {
        bail!("cargo build --release -p fabricd failed ({st})");
    }
    run_test_bench(
        "fabric",
        "bench",
        "fabric_bench",
        &[("FABRIC_BENCH_LEAF_NATS_SERVER", leaf.as_os_str())],
    )
}

/// Runs fabricd's ignored test `test` of `file` (tests/<file>.rs) in release as bench
/// `bench`, with `env`: its figures echoed as they come, then its JSON line
/// (`{"bench":"<bench>",...}`) checked and printed last.
pub fn run_test_bench(
    bench: &str,
    file: &str,
    test: &str,
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<()> {
    let mut child = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "fabricd",
            "--test",
            file,
            "--",
            "--ignored",
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("failed to run the {bench} bench (cargo test --release -p fabricd)")
        })?;
    // The test's figures come on stderr (with cargo's progress), its JSON on stdout.
    let stderr = child.stderr.take().context("no stderr")?;
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    let mut json = None;
    let start = format!("{{\"bench\":\"{bench}\"");
    for line in BufReader::new(child.stdout.take().context("no stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        // The test harness's "test <name> ... " may share the JSON's line.
        match line.find(&start) {
            Some(i) => {
                if !line[..i].trim().is_empty() {
                    println!("{}", line[..i].trim_end());
                }
                json = Some(line[i..].to_string());
            }
            None => println!("{line}"),
        }
    }
    let st = child
        .wait()
        .with_context(|| format!("waiting for the {bench} bench"))?;
    let _ = echo.join();
    if !st.success() {
        bail!("the {bench} bench failed ({st})");
    }
    let json = json.with_context(|| format!("the {bench} bench printed no JSON line"))?;
    serde_json::from_str::<serde_json::Value>(&json)
        .with_context(|| format!("the {bench} bench's JSON line does not parse: {json}"))?;
    println!("{json}");
    Ok(())
}
