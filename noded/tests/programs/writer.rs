//! A test workload, built by the integration tests (not a cargo target): writes its
//! second argument into the file named by its first, prints whether that worked
//! (`wrote <path>` or `write to <path> failed: <error>`) and sleeps, so a test can
//! see from the host what a container may do to a volume. std only (static build).

use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), Some(text)) = (args.first(), args.get(1)) else {
        println!("usage: writer <path> <text>");
        std::process::exit(2);
    };
    match std::fs::write(path, text) {
        Ok(()) => println!("wrote {path}"),
        Err(e) => println!("write to {path} failed: {e}"),
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
