//! `cargo xtask bench fleet` (issue #15, docs/fleet.md): a three-server JetStream cluster
//! of real nats-server processes on loopback and N sites (default 1,000), each a real
//! fabricd process (release) with its own log, certificate and subjects, producing
//! 200-byte records at a steady rate; one server killed with SIGKILL and started again,
//! a third of the sites cut off for 60 s; before that, on a cluster of its own, what the
//! stream layout costs the core (one stream for every site against a stream per site,
//! and the duplicate window per id). The measuring code is fabricd's `fleet_bench` test
//! (tests/fleet.rs, the harness of fabricd's integration tests); its shape comes from
//! `FLEET_SITES`, `FLEET_RATE`, `FLEET_RUN_S`, `FLEET_PARTITION_S` and `FLEET_LAYOUT=0`
//! (no layout figures).

use anyhow::{bail, Context, Result};
use std::process::Command;

pub fn run() -> Result<()> {
    crate::host::ensure_packages(crate::bench_fabric::CORE_PACKAGES)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(&cargo)
        .args(["build", "--release", "-p", "fabricd"])
        .status()
        .context("failed to run cargo build --release -p fabricd")?;
    if !st.success() {
        bail!("cargo build --release -p fabricd failed ({st})");
    }
    crate::bench_fabric::run_test_bench("fleet", "fleet", "fleet_bench", &[])
}
