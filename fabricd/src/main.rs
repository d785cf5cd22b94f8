//! fabricd: the durable edge log, mirrored to the core, and the core-to-edge channel.

fn main() -> std::process::ExitCode {
    edge_common::run("fabricd", fabricd::serve)
}
