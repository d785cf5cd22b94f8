//! A test workload, built by tests/containerd.rs (not a cargo target): prints one
//! line (its arguments, or a greeting) and sleeps, so the test can see the line arrive
//! in the container's CRI log while it still runs. std only, so it builds statically
//! with a single `rustc` call.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let line = if args.is_empty() {
        "hello from an edge container".to_string()
    } else {
        args.join(" ")
    };
    println!("{line}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
