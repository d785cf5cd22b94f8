//! `cargo xtask`: the one entry point that builds, runs, tests and benchmarks the image.

use clap::{Parser, Subcommand};

mod bench;
mod bench_all;
mod bench_fabric;
mod bench_fleet;
mod bench_pods;
mod bench_storage;
mod bench_update;
mod controlplane;
mod core;
mod fuzz;
mod go_toolchain;
mod host;
mod image;
mod run;
mod test;

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark the edge appliance image")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the bootable disk image; prints its absolute path last.
    Image {
        /// Rebuild even if the image is up to date.
        #[arg(long)]
        force: bool,
        /// Build the root twice from scratch and fail unless both are byte-identical.
        #[arg(long)]
        check_reproducible: bool,
        /// Build under this version instead of the definition's (into `image-<version>/`).
        #[arg(long = "as-version")]
        as_version: Option<String>,
        /// A directory whose files are laid over image/overlay (a site's own files).
        #[arg(long)]
        overlay: Option<std::path::PathBuf>,
        /// Build under this security version instead of the definition's.
        #[arg(long = "security-version")]
        security_version: Option<u64>,
    },
    /// Build the image if stale and boot it in QEMU with the serial console here.
    Run {
        /// Join the core `cargo xtask core up` started: the box is provisioned for it,
        /// reaches it through guest forwards, and is enrolled by the operator's edgectl.
        #[arg(long)]
        core: bool,
    },
    /// fmt check, clippy, unit tests, then the QEMU system tests.
    Test {
        /// Only the system tests whose name contains this (passed to the test harness).
        filter: Option<String>,
    },
    /// Runs each fuzz target (fuzz/) for a bounded time; a crash fails (docs/fuzzing.md).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Only this target.
        target: Option<String>,
    },
    /// Builds the upstream Kubernetes control plane and etcd from their pinned source
    /// into the cache (once per pin); prints where.
    Controlplane,
    /// A local core on loopback for the box to join: the control plane, left running.
    Core {
        #[command(subcommand)]
        action: CoreAction,
    },
    /// Benchmarks that print figures (last line: one JSON object).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum CoreAction {
    /// Starts it (building the control plane if needed); prints what runs and where.
    Up,
    /// Stops what `up` started.
    Down,
    /// Prints the shell lines that point kubectl at it.
    Env,
}

#[derive(Subcommand)]
enum Bench {
    /// One disk booted once to set it up, then N later boots: medians to ready, memory,
    /// where the time goes; the first boot reported on its own.
    Boot {
        /// How many boots to take the median of.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Also build and boot the same tree with these erofs physical cluster sizes
        /// (KiB, comma-separated), for their size and boot time in the same run.
        #[arg(long = "pcluster-kib", value_delimiter = ',')]
        pcluster_kib: Vec<u32>,
    },
    /// fabricd against a real nats-server: ingest, end to end, catch-up after a partition;
    /// and in the same run a JetStream leaf node (the peer) and the disk's own limit.
    Fabric,
    /// A three-server JetStream cluster and N sites (real fabricd processes, default
    /// 1,000; FLEET_SITES): a server killed, a third of the sites cut off for 60 s; lost,
    /// duplicated, lag, catch-up, and what each site costs the core.
    Fleet,
    /// fio in a light VM: the raw disk, an RWO thin volume, an RWX volume's bind mounts;
    /// and in the same guest an LVM thin volume and NFS mounts (the peers).
    Storage,
    /// The image booted with M pods provisioned: each pod's manifest-to-running time.
    Pods {
        /// How many pods to apply.
        #[arg(long, default_value_t = 10)]
        pods: u32,
    },
    /// The update scenario timed: publish to blessed (a delta), publish to rolled back.
    Update,
    /// Every bench in turn, then one table of ours, the peer's and the ratio per figure
    /// and one JSON object with every bench's line.
    All,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Image {
            force,
            check_reproducible,
            as_version,
            overlay,
            security_version,
        } => {
            if check_reproducible {
                image::check_reproducible()?;
            }
            let out = image::build(&image::BuildOptions {
                force,
                version: as_version,
                overlay,
                security_version,
                erofs_pcluster_kib: None,
            })?;
            println!("{}", out.raw.display());
            Ok(())
        }
        Cmd::Run { core } => run::run(core),
        Cmd::Test { filter } => test::run(filter),
        Cmd::Fuzz { seconds, target } => fuzz::run(seconds, target.as_deref()),
        Cmd::Core { action } => match action {
            CoreAction::Up => core::up(),
            CoreAction::Down => core::down(),
            CoreAction::Env => core::env(),
        },
        Cmd::Controlplane => {
            println!("{}", controlplane::build()?.display());
            Ok(())
        }
        Cmd::Bench { which } => match which {
            Bench::Boot { runs, pcluster_kib } => bench::run(runs, &pcluster_kib),
            Bench::Fabric => bench_fabric::run(),
            Bench::Fleet => bench_fleet::run(),
            Bench::Storage => bench_storage::run(),
            Bench::Pods { pods } => bench_pods::run(pods),
            Bench::Update => bench_update::run(),
            Bench::All => bench_all::run(),
        },
    }
}
