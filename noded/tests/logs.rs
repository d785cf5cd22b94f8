//! Container logs a user can read: `noded logs` prints a running container's numbered
//! lines; with a tiny `log_max_bytes` the log rotates, no more than `log_max_files`
//! files stay, and the lines that remain run on without a gap across the rotations.
//! Unknown pods and containers are named; lines not in the CRI format are counted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::*;

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: chatty}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  initContainers:
    - name: prepare
      image: edge.local/hello:1
      args: ["init done"]
      env: [{name: HELLO_EXIT, value: "0"}]
  containers:
    - name: counter
      image: edge.local/hello:1
      args: ["line"]
      env: [{name: HELLO_COUNT_MS, value: "10"}]
    - name: blinker
      image: edge.local/hello:1
      args: ["blink"]
      env: [{name: HELLO_EXIT, value: "0"}]
"#;

const MAX_FILES: usize = 3;

fn container_dir(logs: &Path, container: &str) -> Option<PathBuf> {
    let pod = std::fs::read_dir(logs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("default_chatty_"))
        })?;
    Some(pod.join(container))
}

fn files(dir: &Path) -> Vec<String> {
    let mut f: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    f.sort();
    f
}

/// The numbers of `line <n>` lines, checked to follow each other without a gap.
fn numbers(lines: &[&str]) -> Vec<u64> {
    let n: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
        .collect();
    for w in n.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "a line is missing between {} and {}",
            w[0],
            w[1]
        );
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_readable_and_rotate_without_losing_lines() {
    let started = Instant::now();
    let node = Node::start(
        "noded-logs-",
        &format!("log_max_bytes = 2048\nlog_max_files = {MAX_FILES}"),
    )
    .await;
    let env = &node.env;
    std::fs::write(node.manifests.join("chatty.yaml"), POD).unwrap();
    env.wait_for("counter running", |p| {
        p.iter()
            .flat_map(|p| &p.containers)
            .any(|c| c.name == "counter" && c.state == "running")
    })
    .await;

    // The first lines, before any rotation: the greeting, then 1, 2, 3 ...
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = env.cli(&["logs", "chatty", "counter"]);
        assert!(ok, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        if lines.len() >= 4 {
            assert_eq!(lines[..4], ["line", "line 1", "line 2", "line 3"], "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "no lines: {out:?} {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The log rotates; files beyond the limit go.
    let logs = env.dir.join("logs");
    let dir = container_dir(&logs, "counter").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files(&dir).iter().any(|f| f == "0.log.4") {
        assert!(
            Instant::now() < deadline,
            "no 4th rotation: {:?}",
            files(&dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Between a rotation and its prune there can be one more file for a moment.
    let mut within = false;
    for _ in 0..5 {
        let f = files(&dir);
        assert!(f.iter().all(|f| f.starts_with("0.log")), "{f:?}");
        if f.len() <= MAX_FILES && f.contains(&"0.log".to_string()) {
            within = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(within, "more than {MAX_FILES} log files: {:?}", files(&dir));

    // What is left reads oldest first, without a gap, up to lines written just now.
    let (ok, out, err) = env.cli(&["logs", "chatty", "counter"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    let n = numbers(&lines);
    assert!(
        n[0] > 1,
        "the oldest rotated files were not deleted: {}",
        n[0]
    );
    assert!(n.len() > 50, "{} lines", n.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, later, _) = env.cli(&["logs", "chatty", "counter"]);
    let later: Vec<&str> = later.lines().collect();
    let m = numbers(&later);
    assert!(
        m.last() > n.last(),
        "no new lines after the rotations: {:?} then {:?}",
        n.last(),
        m.last()
    );
    // Lines present in both reads are the same lines, wherever the files were cut.
    assert!(
        m[0] <= *n.last().unwrap(),
        "lines were lost: {:?} .. {:?}",
        n.last(),
        m[0]
    );

    let (ok, tail, _) = env.cli(&["logs", "chatty", "counter", "--tail", "3"]);
    assert!(ok);
    let t: Vec<&str> = tail.lines().collect();
    assert_eq!(t.len(), 3, "{tail}");
    assert_eq!(numbers(&t).len(), 3);

    // The restarted container's previous attempt; none for the one still on its first.
    env.wait_for("blinker restarted", |p| {
        p.iter()
            .flat_map(|p| &p.containers)
            .any(|c| c.name == "blinker" && c.restarts >= 1)
    })
    .await;
    let (ok, out, err) = env.cli(&["logs", "chatty", "blinker", "--previous"]);
    assert!(ok, "{err}");
    assert_eq!(out, "blink\n");
    let (ok, _, err) = env.cli(&["logs", "default/chatty", "counter", "--previous"]);
    assert!(!ok);
    assert!(
        err.contains("container \"counter\" of pod default/chatty has no previous attempt"),
        "{err}"
    );

    // Several app containers: one must be named. Unknown names are named back.
    let (ok, _, err) = env.cli(&["logs", "chatty"]);
    assert!(!ok);
    assert!(
        err.contains("has several containers (prepare, counter, blinker)"),
        "{err}"
    );
    let (ok, _, err) = env.cli(&["logs", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("no pod named \"nope\" (pods: default/chatty)"),
        "{err}"
    );
    let (ok, _, err) = env.cli(&["logs", "chatty", "ghost"]);
    assert!(!ok);
    assert!(
        err.contains("pod default/chatty has no container \"ghost\""),
        "{err}"
    );

    // A torn line in a log is skipped and counted, never fatal.
    let init_log = container_dir(&logs, "prepare").unwrap().join("0.log");
    let mut text = std::fs::read_to_string(&init_log).unwrap();
    text.push_str("torn\u{0}line\n");
    std::fs::write(&init_log, text).unwrap();
    let (ok, out, err) = env.cli(&["logs", "chatty", "prepare"]);
    assert!(ok, "{err}");
    assert_eq!(out, "init done\n");
    assert!(
        err.contains("skipped 1 line(s) not in the CRI log format"),
        "{err}"
    );
    eprintln!("took {:?}", started.elapsed());
}
