//! `cargo xtask`: the one entry point that builds, runs, tests and benchmarks the image.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark the edge appliance image")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the bootable disk image; prints its absolute path last.
    Image,
    /// Build the image if stale and boot it in QEMU with the serial console here.
    Run,
    /// fmt check, clippy, unit tests, then the QEMU system tests.
    Test,
    /// Benchmarks that print figures (last line: one JSON object).
    Bench {
        /// Which benchmark: boot
        which: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Image | Cmd::Run | Cmd::Test | Cmd::Bench { .. } => {
            anyhow::bail!("not implemented yet")
        }
    }
}
