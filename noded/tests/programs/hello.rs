//! A test workload, built by the integration tests (not a cargo target): prints one
//! line (its arguments, or a greeting) and sleeps, so a test can see the line arrive
//! in the container's CRI log while it still runs. With `HELLO_EXIT=<code>` in its
//! environment it exits with that code after printing instead, so a test can watch
//! restarts. std only, so it builds statically with a single `rustc` call.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let line = if args.is_empty() {
        "hello from an edge container".to_string()
    } else {
        args.join(" ")
    };
    println!("{line}");
    if let Ok(code) = std::env::var("HELLO_EXIT") {
        std::process::exit(code.trim().parse().unwrap_or(1));
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
