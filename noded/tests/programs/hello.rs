//! A test workload, built by the integration tests (not a cargo target): prints one
//! line (its arguments, or a greeting) and sleeps, so a test can see the line arrive
//! in the container's CRI log while it still runs. std only, so it builds statically
//! with a single `rustc` call. Its environment changes what it does:
//! - `HELLO_EXIT=<code>`: exit with that code after printing (restarts);
//! - `HELLO_COUNT_MS=<ms>`: print `<line> <n>` with n = 1, 2, ... every ms (logs);
//! - `HELLO_LISTEN=<port>`: answer HTTP requests on 127.0.0.1:<port> with 200 (probes);
//! - `HELLO_HEALTHY_MS=<ms>`: create /healthy, remove it after ms (liveness probes).
//!
//! `hello --check <path>` exits 0 if the path exists, 1 if not: an exec probe.
//! `hello --say <words>` prints the words and exits; `hello --cat` copies its input to
//! its output and exits at its end (`kubectl exec`); `hello --tty` says whether its
//! output is a terminal (`kubectl exec -t`).

use std::io::{Read, Write};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--check") {
        let ok = args.get(1).is_some_and(|p| std::path::Path::new(p).exists());
        std::process::exit(if ok { 0 } else { 1 });
    }
    if args.first().map(String::as_str) == Some("--say") {
        println!("{}", args[1..].join(" "));
        return;
    }
    if args.first().map(String::as_str) == Some("--tty") {
        use std::io::IsTerminal;
        let tty = std::io::stdout().is_terminal();
        println!("{}", if tty { "a terminal" } else { "not a terminal" });
        return;
    }
    if args.first().map(String::as_str) == Some("--cat") {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::stdout());
        return;
    }
    let line = if args.is_empty() {
        "hello from an edge container".to_string()
    } else {
        args.join(" ")
    };
    println!("{line}");
    if let Ok(code) = std::env::var("HELLO_EXIT") {
        std::process::exit(code.trim().parse().unwrap_or(1));
    }
    if let Some(ms) = env_u64("HELLO_HEALTHY_MS") {
        std::fs::write("/healthy", b"ok").expect("failed to write /healthy");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            let _ = std::fs::remove_file("/healthy");
            println!("no longer healthy");
        });
    }
    if let Some(port) = env_u64("HELLO_LISTEN") {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port as u16))
            .expect("failed to listen");
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            }
        });
    }
    if let Some(ms) = env_u64("HELLO_COUNT_MS") {
        let mut out = std::io::stdout();
        for n in 1u64.. {
            let _ = writeln!(out, "{line} {n}");
            let _ = out.flush();
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok()?.trim().parse().ok()
}
