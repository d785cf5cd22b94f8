//! `cargo xtask bench fabric`: fabricd (release build, a real process) against a real
//! nats-server on loopback: durable ingest, end to end against direct JetStream
//! publishing, catch-up after a 60 s partition, losses and duplicates counted at the
//! core, fabricd's RSS. The measuring code is fabricd's `fabric_bench` test (it shares
//! the harness of fabricd's integration tests); this runs it in release and prints its
//! figures, then its JSON line last.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The core side of the fabric as the tests and the bench run it: a real nats-server,
/// and openssl for the CA and the certificates of mutual TLS.
pub const CORE_PACKAGES: &[&str] = &["nats-server", "openssl"];

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn run() -> Result<()> {
    crate::host::ensure_packages(CORE_PACKAGES)?;
    let st = cargo()
        .args(["build", "--release", "-p", "fabricd"])
        .status()
        .context("failed to run cargo build --release -p fabricd")?;
    if !st.success() {
        bail!("cargo build --release -p fabricd failed ({st})");
    }
    let mut child = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "fabricd",
            "--test",
            "bench",
            "--",
            "--ignored",
            "--exact",
            "fabric_bench",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to run the fabric bench (cargo test --release -p fabricd)")?;
    // The test's figures come on stderr (with cargo's progress), its JSON on stdout.
    let stderr = child.stderr.take().context("no stderr")?;
    let echo = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    let mut json = None;
    for line in BufReader::new(child.stdout.take().context("no stdout")?)
        .lines()
        .map_while(Result::ok)
    {
        // The test harness's "test fabric_bench ... " may share the JSON's line.
        match line.find("{\"bench\":\"fabric\"") {
            Some(i) => {
                if !line[..i].trim().is_empty() {
                    println!("{}", line[..i].trim_end());
                }
                json = Some(line[i..].to_string());
            }
            None => println!("{line}"),
        }
    }
    let st = child.wait().context("waiting for the fabric bench")?;
    let _ = echo.join();
    if !st.success() {
        bail!("the fabric bench failed ({st})");
    }
    let json = json.context("the fabric bench printed no JSON line")?;
    serde_json::from_str::<serde_json::Value>(&json)
        .with_context(|| format!("the fabric bench's JSON line does not parse: {json}"))?;
    println!("{json}");
    Ok(())
}
