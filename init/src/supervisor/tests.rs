//! The supervisor against real processes (sh, sleep) in a temp dir.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;

fn supervisor(table: &str, log_dir: Option<&std::path::Path>) -> Supervisor {
    let t = crate::services::parse(table, "test.toml");
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    Supervisor::new(
        t.services,
        Options {
            log_dir: log_dir.map(|d| d.to_owned()),
            log_max_bytes: 1 << 20,
            cgroup_root: None,
            reap_any: false,
        },
    )
}

/// Steps until `cond` holds; the notes seen so far are returned. Panics after `secs`.
fn run_until(
    sup: &mut Supervisor,
    secs: u64,
    what: &str,
    mut cond: impl FnMut(&Supervisor) -> bool,
) -> Vec<Note> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut notes = Vec::new();
    loop {
        sup.step();
        notes.extend(sup.take_notes());
        if cond(sup) {
            return notes;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {notes:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn shut_down(sup: &mut Supervisor, secs: u64) -> Vec<Note> {
    sup.begin_shutdown();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut notes = Vec::new();
    while !sup.shutdown_step() {
        notes.extend(sup.take_notes());
        assert!(Instant::now() < deadline, "shutdown hung: {notes:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    notes.extend(sup.take_notes());
    notes
}

/// Shuts down; the services in the order they stopped.
fn stopped_in_order(sup: &mut Supervisor) -> Vec<String> {
    events(&shut_down(sup, 15))
        .iter()
        .filter(|e| e["state"] == "stopped")
        .map(|e| e["service"].as_str().unwrap().to_owned())
        .collect()
}

fn console(notes: &[Note]) -> String {
    notes
        .iter()
        .filter_map(|n| match n {
            Note::Console(l) => Some(l.as_str()),
            Note::Event(_) => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn events(notes: &[Note]) -> Vec<Value> {
    notes
        .iter()
        .filter_map(|n| match n {
            Note::Event(e) => Some(e.clone()),
            Note::Console(_) => None,
        })
        .collect()
}

/// A service given up is tried again `retry_failed_s` later with a clean count: the box
/// heals from a failure that went away (a disk that came back, a peer that answered)
/// with nobody asking.
#[test]
fn a_service_given_up_is_tried_again_later() {
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed");
    let mut sup = supervisor(
        &format!(
            r#"
[[service]]
name = "flaky"
exec = ["/bin/sh", "-c", "test -e {} && exec sleep 30; exit 1"]
backoff_initial_ms = 10
backoff_max_ms = 20
restart_limit = 2
retry_failed_s = 1
"#,
            fixed.display()
        ),
        None,
    );
    let notes = run_until(&mut sup, 10, "flaky to be given up", |s| {
        s.state("flaky") == Some(State::Failed)
    });
    assert!(
        console(&notes).contains("giving up, trying again in 1 s"),
        "{}",
        console(&notes)
    );
    assert!(sup.settled(), "given up, the box is settled (degraded)");
    assert_eq!(sup.failed(), ["flaky"]);
    std::fs::write(&fixed, "").unwrap();
    let notes = run_until(&mut sup, 10, "flaky tried again", |s| {
        s.state("flaky") == Some(State::Ready)
    });
    assert!(
        console(&notes).contains("service flaky: given up 1 s ago, trying again"),
        "{}",
        console(&notes)
    );
    assert!(sup.failed().is_empty());
    shut_down(&mut sup, 10);
}

#[test]
fn crash_loop_is_given_up_while_other_services_keep_running() {
    let mut sup = supervisor(
        r#"
[[service]]
name = "crasher"
exec = ["/bin/sh", "-c", "exit 1"]
backoff_initial_ms = 10
backoff_max_ms = 40
restart_limit = 3
restart_window_s = 60

[[service]]
name = "steady"
exec = ["/bin/sleep", "30"]
"#,
        None,
    );
    let notes = run_until(&mut sup, 10, "crasher to fail", |s| {
        s.state("crasher") == Some(State::Failed)
    });
    assert_eq!(
        sup.restarts("crasher"),
        Some(3),
        "three restarts, then given up"
    );
    let text = console(&notes);
    assert!(
        text.contains("service crasher failed") && text.contains("giving up"),
        "{text}"
    );
    assert!(
        events(&notes).iter().any(|e| e["event"] == "service"
            && e["service"] == "crasher"
            && e["state"] == "failed"),
        "a failed event is emitted"
    );
    assert!(
        events(&notes).iter().any(|e| e["event"] == "warning"),
        "the give-up is a warning event"
    );
    let steady_pid = sup.pid("steady").expect("steady runs");
    assert_eq!(sup.state("steady"), Some(State::Ready));
    // Failed services do not hold up readiness of the box.
    assert!(sup.settled());
    assert_eq!(sup.failed(), ["crasher"]);
    std::thread::sleep(Duration::from_millis(200));
    sup.step();
    assert_eq!(sup.state("crasher"), Some(State::Failed), "stays given up");
    assert_eq!(
        sup.pid("steady"),
        Some(steady_pid),
        "steady was never restarted"
    );
    shut_down(&mut sup, 10);
    assert_eq!(sup.state("steady"), Some(State::Stopped));
}

#[test]
fn helpers_die_with_their_service_unless_kill_is_main() {
    let dir = tempfile::tempdir().unwrap();
    let alive = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
    for (mode, survives) in [("group", false), ("main", true)] {
        let pidfile = dir.path().join(format!("{mode}.pid"));
        // The main process leaves a helper in its process group, then exits.
        let mut sup = supervisor(
            &format!(
                r#"
[[service]]
name = "runtime"
exec = ["/bin/sh", "-c", "sleep 30 & echo $! > {}; sleep 0.2; exit 0"]
restart = "never"
kill = "{mode}"
"#,
                pidfile.display()
            ),
            None,
        );
        run_until(&mut sup, 10, "the main process to exit", |s| {
            s.pid("runtime").is_none() && s.state("runtime") != Some(State::Starting)
        });
        let helper: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // A killed helper may linger a moment, then as a zombie until a reaper takes
        // it (kill(pid, 0) succeeds for a zombie): look at its state for a while.
        let running = || {
            let state = std::fs::read_to_string(format!("/proc/{helper}/stat"))
                .ok()
                .and_then(|st| {
                    let rest = st.rsplit(')').next()?.to_string();
                    rest.split_whitespace().next().map(str::to_string)
                });
            alive(helper) && state.as_deref().is_some_and(|s| s != "Z" && s != "X")
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let running = running();
        assert_eq!(running, survives, "kill = {mode}");
        if running {
            unsafe { libc::kill(helper, libc::SIGKILL) };
        }
        shut_down(&mut sup, 10);
    }
}

#[test]
fn health_is_said_after_readiness_and_forgotten_at_a_restart() {
    let mut sup = supervisor(
        r#"
[[service]]
name = "pods"
exec = ["/bin/sh", "-c", "echo READY=1 >&$NOTIFY_FD; sleep 0.5; echo HEALTHY=1 >&$NOTIFY_FD; exec sleep 30"]
ready = "notify"
health = "its pods running"

[[service]]
name = "plain"
exec = ["/bin/sleep", "30"]
"#,
        None,
    );
    run_until(&mut sup, 5, "pods to be ready", |s| {
        s.state("pods") == Some(State::Ready)
    });
    assert_eq!(sup.unhealthy(), vec!["pods (its pods running)".to_string()]);
    let notes = run_until(&mut sup, 5, "pods to be healthy", |s| {
        s.unhealthy().is_empty()
    });
    assert!(
        notes.iter().any(
            |n| matches!(n, Note::Console(t) if t.starts_with("service pods: healthy (its pods running) after"))
        ),
        "{notes:?}"
    );
    let st = sup.status();
    assert_eq!(st[0]["healthy"], true, "{st:?}");
    assert_eq!(st[1]["healthy"], Value::Null, "{st:?}");
    // A restart starts from unhealthy again.
    sup.restart("pods").unwrap();
    run_until(&mut sup, 5, "pods to restart", |s| {
        !s.unhealthy().is_empty()
    });
    run_until(&mut sup, 5, "pods to be healthy again", |s| {
        s.unhealthy().is_empty()
    });
    shut_down(&mut sup, 10);
}

#[test]
fn notify_readiness_gates_the_services_that_require_it() {
    let mut sup = supervisor(
        r#"
[[service]]
name = "base"
exec = ["/bin/sh", "-c", "sleep 0.3; echo READY=1 >&$NOTIFY_FD; exec sleep 30"]
ready = "notify"

[[service]]
name = "top"
exec = ["/bin/sleep", "30"]
requires = ["base"]
"#,
        None,
    );
    run_until(&mut sup, 5, "base to start", |s| {
        s.state("base") == Some(State::Starting)
    });
    assert_eq!(
        sup.state("top"),
        Some(State::Waiting),
        "top waits while base is starting"
    );
    assert!(!sup.settled());
    let notes = run_until(&mut sup, 10, "top to be ready", |s| {
        s.state("top") == Some(State::Ready)
    });
    assert_eq!(sup.state("base"), Some(State::Ready));
    let order: Vec<(String, String)> = events(&notes)
        .iter()
        .filter(|e| e["state"] == "ready" || e["state"] == "starting")
        .map(|e| {
            (
                e["service"].as_str().unwrap().to_owned(),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let base_ready = order
        .iter()
        .position(|p| p == &("base".into(), "ready".into()))
        .unwrap();
    let top_start = order
        .iter()
        .position(|p| p == &("top".into(), "starting".into()))
        .unwrap();
    assert!(base_ready < top_start, "{order:?}");
    assert!(sup.settled());

    // Reverse dependency order on the way down: top stops before base.
    assert_eq!(stopped_in_order(&mut sup), ["top", "base"]);
}

/// `alongside` starts a service as soon as the other has been started, while it is
/// still on its way to ready, and still stops it first.
#[test]
fn alongside_starts_with_the_other_not_after_its_readiness() {
    let mut sup = supervisor(
        r#"
[[service]]
name = "runtime"
exec = ["/bin/sh", "-c", "sleep 1; echo READY=1 >&$NOTIFY_FD; exec sleep 30"]
ready = "notify"

[[service]]
name = "agent"
exec = ["/bin/sleep", "30"]
alongside = ["runtime"]

[[service]]
name = "later"
exec = ["/bin/sleep", "30"]
requires = ["runtime"]
"#,
        None,
    );
    run_until(&mut sup, 5, "the agent to be ready", |s| {
        s.state("agent") == Some(State::Ready)
    });
    assert_eq!(
        sup.state("runtime"),
        Some(State::Starting),
        "the agent is up while the runtime is still starting"
    );
    assert_eq!(sup.state("later"), Some(State::Waiting));
    run_until(&mut sup, 10, "the runtime to be ready", |s| {
        s.state("later") == Some(State::Ready)
    });
    let stopped = stopped_in_order(&mut sup);
    let at = |n: &str| stopped.iter().position(|s| s == n).unwrap();
    assert!(at("agent") < at("runtime"), "{stopped:?}");
    assert!(at("later") < at("runtime"), "{stopped:?}");
}

#[test]
fn socket_readiness_waits_for_a_connectable_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("svc.sock");
    let mut sup = supervisor(
        &format!(
            "[[service]]\nname = \"sock\"\nexec = [\"/bin/sleep\", \"30\"]\nready = \"socket\"\nsocket = \"{}\"\n",
            sock.display()
        ),
        None,
    );
    run_until(&mut sup, 5, "start", |s| {
        s.state("sock") == Some(State::Starting)
    });
    std::thread::sleep(Duration::from_millis(100));
    sup.step();
    assert_eq!(sup.state("sock"), Some(State::Starting), "no socket yet");
    // The listener stands in for the service opening its socket.
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    run_until(&mut sup, 5, "ready", |s| {
        s.state("sock") == Some(State::Ready)
    });
    shut_down(&mut sup, 10);
}

#[test]
fn readiness_timeout_stops_the_service_and_applies_the_policy() {
    let mut sup = supervisor(
        r#"
[[service]]
name = "mute"
exec = ["/bin/sleep", "30"]
ready = "notify"
ready_timeout_ms = 300
restart = "never"
"#,
        None,
    );
    let notes = run_until(&mut sup, 10, "mute to stop", |s| {
        s.state("mute") == Some(State::Stopped)
    });
    let text = console(&notes);
    assert!(text.contains("not ready after 300 ms"), "{text}");
    assert_eq!(sup.pid("mute"), None);
}

#[test]
fn output_is_logged_with_timestamps_and_stderr_echoed_to_console() {
    let dir = tempfile::tempdir().unwrap();
    let mut sup = supervisor(
        r#"
[[service]]
name = "talker"
exec = ["/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; printf no-newline"]
restart = "never"
"#,
        Some(dir.path()),
    );
    let notes = run_until(&mut sup, 10, "talker to exit", |s| {
        s.state("talker") == Some(State::Stopped)
    });
    assert!(
        sup.logs.flush(Duration::from_secs(10)),
        "the log writer is stuck"
    );
    let log = std::fs::read_to_string(dir.path().join("talker.log")).unwrap();
    assert!(log.contains(" out to-stdout\n"), "{log}");
    assert!(log.contains(" err to-stderr\n"), "{log}");
    assert!(log.contains(" out no-newline\n"), "{log}");
    assert!(log.lines().all(|l| l.starts_with('[')), "{log}");
    let text = console(&notes);
    assert!(text.contains("talker: to-stderr"), "{text}");
    assert!(
        !text.contains("talker: to-stdout"),
        "stdout is below the console level: {text}"
    );
}

#[test]
fn stop_timeout_escalates_to_sigkill() {
    let mut sup = supervisor(
        r#"
[[service]]
name = "stubborn"
exec = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
stop_timeout_ms = 300
"#,
        None,
    );
    run_until(&mut sup, 5, "ready", |s| {
        s.state("stubborn") == Some(State::Ready)
    });
    // Give sh time to install its trap.
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let notes = shut_down(&mut sup, 10);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "SIGTERM was ignored, so it waited"
    );
    assert!(console(&notes).contains("sending SIGKILL"), "{notes:?}");
    assert_eq!(sup.state("stubborn"), Some(State::Stopped));
}

#[test]
fn a_service_starts_with_no_signal_blocked_even_when_init_blocks_them() {
    // As PID 1 does (stage2::block_signals), on this thread: fork copies its mask.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
    }
    let dir = tempfile::tempdir().unwrap();
    // grep, not a shell: dash unblocks signals itself, tokio's daemons do not.
    let mut sup = supervisor(
        r#"
[[service]]
name = "mask"
exec = ["/bin/grep", "SigBlk", "/proc/self/status"]
restart = "never"
"#,
        Some(dir.path()),
    );
    run_until(&mut sup, 10, "mask to exit", |s| {
        s.state("mask") == Some(State::Stopped)
    });
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    assert!(
        sup.logs.flush(Duration::from_secs(10)),
        "the log writer is stuck"
    );
    let log = std::fs::read_to_string(dir.path().join("mask.log")).unwrap();
    assert!(log.contains("SigBlk:\t0000000000000000"), "{log}");
}

#[test]
fn restart_request_and_kill_request() {
    let mut sup = supervisor(
        "[[service]]\nname = \"s\"\nexec = [\"/bin/sleep\", \"30\"]\nbackoff_initial_ms = 10\n",
        None,
    );
    run_until(&mut sup, 5, "ready", |s| s.state("s") == Some(State::Ready));
    let first = sup.pid("s").unwrap();
    sup.restart("s").unwrap();
    run_until(&mut sup, 10, "new pid", |s| {
        s.state("s") == Some(State::Ready) && s.pid("s").is_some_and(|p| p != first)
    });
    assert_eq!(sup.restarts("s"), Some(1));
    let second = sup.pid("s").unwrap();
    sup.kill("s", libc::SIGKILL).unwrap();
    run_until(&mut sup, 10, "restart after kill", |s| {
        s.state("s") == Some(State::Ready) && s.pid("s").is_some_and(|p| p != second)
    });
    let st = sup.status();
    assert_eq!(st[0]["last_exit"], json!({"signal": 9}));
    assert!(sup
        .kill("nope", 9)
        .unwrap_err()
        .to_string()
        .contains("nope"));
    shut_down(&mut sup, 10);
}

#[test]
fn missing_binary_backs_off_then_fails() {
    let mut sup = supervisor(
        "[[service]]\nname = \"ghost\"\nexec = [\"/nonexistent/bin\"]\nbackoff_initial_ms = 10\nbackoff_max_ms = 20\nrestart_limit = 2\n",
        None,
    );
    let notes = run_until(&mut sup, 5, "failed", |s| {
        s.state("ghost") == Some(State::Failed)
    });
    assert!(console(&notes).contains("/nonexistent/bin"), "{notes:?}");
}

#[test]
fn control_socket_answers_status_and_kill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("init.sock");
    let mut ctl = crate::control::Control::new();
    ctl.listen(&path).unwrap();
    let mut sup = supervisor(
        "[[service]]\nname = \"s\"\nexec = [\"/bin/sleep\", \"30\"]\n",
        None,
    );
    run_until(&mut sup, 5, "ready", |s| s.state("s") == Some(State::Ready));

    let client = std::thread::spawn({
        let path = path.clone();
        move || {
            use std::io::{BufRead, BufReader, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(
                b"{\"cmd\":\"status\"}\n{\"cmd\":\"kill\",\"service\":\"x\",\"signal\":9}\nbad\n",
            )
            .unwrap();
            let mut r = BufReader::new(s);
            let mut lines = Vec::new();
            for _ in 0..3 {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                lines.push(serde_json::from_str::<Value>(&l).unwrap());
            }
            lines
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client.is_finished() {
        assert!(Instant::now() < deadline, "no replies");
        ctl.step(&mut |req| match req {
            crate::control::Request::Status => {
                let st = crate::status::build(&Default::default(), false, false, 0, sup.status());
                json!({"reply": "status", "ok": true, "status": st})
            }
            crate::control::Request::Kill { service, signal } => match sup.kill(&service, signal) {
                Ok(()) => crate::control::ok_reply("kill"),
                Err(e) => crate::control::error_reply("kill", &e.to_string()),
            },
            other => crate::control::error_reply(other.name(), "not in this test"),
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    let replies = client.join().unwrap();
    assert_eq!(replies[0]["reply"], "status");
    assert_eq!(replies[0]["ok"], true);
    let svc = &replies[0]["status"]["services"][0];
    assert_eq!(svc["name"], "s");
    assert_eq!(svc["state"], "ready");
    assert!(svc["rss_kib"].as_u64().is_some(), "{svc}");
    assert!(replies[0]["status"]["mem_total_kib"].as_u64().unwrap() > 0);
    assert_eq!(replies[1]["reply"], "kill");
    assert_eq!(replies[1]["ok"], false);
    assert_eq!(replies[2]["ok"], false);
    shut_down(&mut sup, 10);
}
