//! Self-healing: a killed service is restarted and the box returns to ready; a service
//! that keeps dying is given up on (state failed) while the others stay up.

use qemu_tests::{all_ready, service, Machine};
use serde_json::{json, Value};
use std::time::Duration;

const HEAL_TIMEOUT: Duration = Duration::from_secs(120);

fn pid_of(st: &Value, name: &str) -> u64 {
    service(st, name)
        .and_then(|s| s["pid"].as_u64())
        .unwrap_or_else(|| panic!("{name} has no pid in {st}"))
}

fn restarts_of(st: &Value, name: &str) -> u64 {
    service(st, name)
        .and_then(|s| s["restarts"].as_u64())
        .unwrap_or_else(|| panic!("{name} has no restarts counter in {st}"))
}

#[test]
fn killed_services_come_back_and_a_crash_loop_is_contained() -> anyhow::Result<()> {
    let mut m = Machine::new("heal")?;
    m.boot()?;
    m.wait_ready()?;
    m.wait_status(HEAL_TIMEOUT, "all services ready", all_ready)?;

    // fabricd last: its restart here counts towards the crash loop below only if the
    // loop starts within the restart window, which the loop tolerates.
    for name in ["containerd", "storaged", "noded", "fabricd"] {
        let before = m.status()?;
        let (pid, restarts) = (pid_of(&before, name), restarts_of(&before, name));
        m.request(json!({"cmd":"kill","service":name,"signal":9}))?;
        let after = m.wait_status(HEAL_TIMEOUT, &format!("{name} restarted"), |st| {
            all_ready(st)
                && service(st, name).is_some_and(|s| s["pid"].as_u64().is_some_and(|p| p != pid))
        })?;
        assert!(
            restarts_of(&after, name) > restarts,
            "{name}: restarts counter did not grow: {after}"
        );
        assert_eq!(
            after["ready"], true,
            "not ready after {name} came back: {after}"
        );
    }

    // Crash loop: kill fabricd each time it is back, until init gives up.
    let victim = "fabricd";
    let others: Vec<(String, u64)> = {
        let st = m.status()?;
        st["services"]
            .as_array()
            .expect("services")
            .iter()
            .filter(|s| s["name"] != victim)
            .map(|s| {
                (
                    s["name"].as_str().unwrap_or("").to_string(),
                    pid_of(&st, s["name"].as_str().unwrap_or("")),
                )
            })
            .collect()
    };
    let mut kills = 0;
    // A killed process can show in the status until init has reaped it (slow under
    // TCG); only a new process is killed, and only a kill init confirms counts.
    let mut killed_pid = None;
    let failed = loop {
        let st = m.wait_status(HEAL_TIMEOUT, &format!("{victim} running or failed"), |st| {
            service(st, victim).is_some_and(|s| {
                s["state"] == "failed"
                    || (s["pid"].as_u64().is_some()
                        && s["pid"].as_u64() != killed_pid
                        && s["state"] != "backoff")
            })
        })?;
        let s = service(&st, victim).expect("victim in status").clone();
        if s["state"] == "failed" {
            break st;
        }
        assert!(
            kills < 12,
            "{victim} still restarted after {kills} kills: {st}"
        );
        // The service may die between the status and the kill; that is fine.
        if m.request(json!({"cmd":"kill","service":victim,"signal":9}))
            .is_ok()
        {
            kills += 1;
            killed_pid = s["pid"].as_u64();
        }
    };
    assert!(
        kills >= 2,
        "{victim} failed after only {kills} kills: {failed}"
    );
    let s = service(&failed, victim).expect("victim");
    assert!(s["pid"].is_null(), "a failed service has no process: {s}");
    for (name, pid) in &others {
        let o = service(&failed, name).expect("other service");
        assert_eq!(
            o["state"], "ready",
            "{name} disturbed by {victim}'s crash loop: {failed}"
        );
        assert_eq!(
            o["pid"].as_u64(),
            Some(*pid),
            "{name} restarted meanwhile: {failed}"
        );
    }
    assert!(
        m.events()
            .iter()
            .any(|e| e["event"] == "service" && e["service"] == victim && e["state"] == "failed"),
        "no failed event for {victim}"
    );
    m.finish();
    Ok(())
}
