//! A box's logs at the core: fabricd follows a service's log file (through a line being
//! written, a rotation while fabricd was stopped, and its restart) and a container's CRI
//! log, mirrors them to a real nats-server, and `edgectl logs` prints each line once, in
//! order.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

fn edgectl_logs(core: &Core, args: &[&str]) -> String {
    let out = run_logs(core, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "edgectl logs {args:?}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn run_logs(core: &Core, args: &[&str]) -> std::process::Output {
    core.edgectl()
        .arg("logs")
        .args(args)
        .output()
        .expect("run edgectl")
}

/// Waits until `edgectl logs` prints `n` lines or more; what it printed.
fn wait_lines(core: &Core, args: &[&str], n: usize) -> Vec<String> {
    let start = Instant::now();
    loop {
        let out = edgectl_logs(core, args);
        let lines: Vec<String> = out.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "edgectl logs {args:?} printed {} of {n} lines after 60 s:\n{out}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn append(path: &std::path::Path, text: &str) {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn lines(range: std::ops::Range<u32>) -> String {
    range.map(|i| format!("noded line-{i:03}\n")).collect()
}

#[test]
fn service_and_pod_logs_reach_the_core_each_line_once_in_order() {
    let core = Core::start();
    let dir = core.tmp.path().join("box");
    let services = dir.join("var-log");
    let container = services.join("pods/default_sensor_u1/app");
    std::fs::create_dir_all(&container).unwrap();
    let log = services.join("noded.log");
    let mut f = Fabricd::configure(
        &dir,
        &format!(
            "[logs]\nservices_dir = \"{}\"\npods_dir = \"{}\"\ninterval_ms = 100\nmax_batch_bytes = 1024\n{}",
            services.display(),
            services.join("pods").display(),
            core.pki.core_toml(&core.nats.url(), "client")
        ),
    );
    f.start();
    let service = ["--site", "s1", "--machine", "m1", "--service", "noded"];

    // Lines as the service writes them; a line half written is not sent until it is whole.
    append(&log, &lines(0..50));
    append(&log, "noded line-0");
    wait_lines(&core, &service, 50);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        edgectl_logs(&core, &service).lines().count(),
        50,
        "half a line was sent"
    );
    append(&log, "50\n");
    append(&log, &lines(51..100));
    wait_lines(&core, &service, 100);

    // fabricd stops; the service writes on and its log rotates (init renames it to
    // .log.1 and starts anew); fabricd comes back and sends the rest of both, once.
    f.terminate();
    append(&log, &lines(100..150));
    std::fs::rename(&log, services.join("noded.log.1")).unwrap();
    append(&log, &lines(150..200));
    f.start();
    let got = wait_lines(&core, &service, 200);
    std::thread::sleep(Duration::from_secs(1));
    let got_again = edgectl_logs(&core, &service);
    assert_eq!(
        got_again.lines().count(),
        200,
        "a line sent twice:\n{got_again}"
    );
    let want: Vec<String> = lines(0..200).lines().map(str::to_owned).collect();
    assert_eq!(got, want);

    // A container's CRI log: its messages, a long line's pieces joined, named by pod.
    append(
        &container.join("0.log"),
        "2026-12-06T04:00:00.000000001Z stdout F reading 1\n\
         2026-12-06T04:00:01.000000001Z stderr P warn: half \n\
         2026-12-06T04:00:01.000000002Z stderr F and the rest\n",
    );
    let pod = ["--site", "s1", "--pod", "sensor"];
    assert_eq!(
        wait_lines(&core, &pod, 2),
        [
            "m1 pod.default.sensor.app: reading 1",
            "m1 pod.default.sensor.app: warn: half and the rest"
        ]
    );
    // Everything of the box, each line naming its source.
    let all = wait_lines(&core, &["--site", "s1"], 202);
    assert_eq!(all[0], "m1 service.noded: noded line-000");
    assert_eq!(all.len(), 202, "{all:?}");
    // A line longer than a batch (1 KiB here) goes in pieces, each marked where the line
    // goes on; bytes that are not UTF-8 are shown replaced, and neither stops the lines
    // after them.
    let noisy = services.join("noisy.log");
    let long = "x".repeat(2500);
    let mut bytes = format!("{long}\n").into_bytes();
    bytes.extend_from_slice(b"bad \xff\xfe bytes\nafter\n");
    std::fs::write(&noisy, bytes).unwrap();
    let noisy_args = ["--site", "s1", "--machine", "m1", "--service", "noisy"];
    let got = wait_lines(&core, &noisy_args, 5);
    assert_eq!(
        got,
        [
            format!("{} [...]", "x".repeat(1024)),
            format!("[...] {} [...]", "x".repeat(1024)),
            format!("[...] {}", "x".repeat(452)),
            "bad \u{fffd}\u{fffd} bytes".to_owned(),
            "after".to_owned(),
        ]
    );
    // A name that cannot be a subject token is refused, naming it.
    let out = run_logs(&core, &["--site", "s1", "--service", "a b"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--service a b must be letters"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.terminate();
}
