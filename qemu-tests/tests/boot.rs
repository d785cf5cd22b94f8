//! Booting: the appliance reaches ready with every service up, runs its static pods
//! (sensor and inference), keeps its data partition across a power cycle (the pods come
//! back), an ACPI power-off is a clean shutdown, a disk that stalls does not hold PID 1,
//! and a hung PID 1 is reset by the hardware watchdog, which the next boot reports.
//!
//! Three boots of one machine (each boot under TCG costs ~30 s, so they are combined).

use qemu_tests::{all_ready, Machine};
use serde_json::json;
use std::time::Duration;

const SERVICES: [&str; 4] = ["containerd", "storaged", "fabricd", "noded"];

#[test]
fn boots_to_ready_and_keeps_data_across_a_clean_power_cycle() -> anyhow::Result<()> {
    let mut m = Machine::new("boot")?;

    // First boot of a fresh disk: data is formatted, every service comes up.
    m.boot()?;
    let ready = m.wait_ready()?;
    assert_eq!(ready.slot, "a", "a fresh disk boots slot A");
    assert!(!ready.version.is_empty());
    assert!(ready.uptime_ms > 0);
    let st = m.status()?;
    assert_eq!(st["ready"], true, "status: {st}");
    assert_eq!(st["version"], ready.version.as_str());
    assert_eq!(st["slot"], "a");
    for name in SERVICES {
        let s = qemu_tests::service(&st, name)
            .unwrap_or_else(|| panic!("{name} missing from status {st}"));
        assert_eq!(s["state"], "ready", "{name}: {s}");
        assert!(s["pid"].as_u64().is_some_and(|p| p > 1), "{name}: {s}");
    }
    assert!(all_ready(&st), "{st}");
    // Where the boot's time went (what `bench boot` breaks it down from): stage 1 ends
    // before stage 2 starts the services, each of which is ready after that and by the
    // time the box says ready; stage 2 says where its set-up went.
    let ms = |v: &serde_json::Value| {
        v.as_u64()
            .unwrap_or_else(|| panic!("not a number: {v} in {st}"))
    };
    let stage1_end = ms(&st["stage1_start_ms"]) + ms(&st["stage1_ms"]);
    let services_start = ms(&st["services_start_ms"]);
    assert!(stage1_end <= services_start, "{st}");
    for name in SERVICES {
        let s = qemu_tests::service(&st, name).expect("listed above");
        let at = ms(&s["ready_uptime_ms"]);
        assert!(at >= services_start, "{name}: {st}");
        // (A service that restarted since became ready again later.)
        assert!(at <= ready.uptime_ms || s["restarts"] != 0, "{name}: {st}");
    }
    let console = std::fs::read_to_string(m.console_log())?;
    assert!(
        console.contains("stage 2: set up in ") && console.contains("modules "),
        "no stage 2 set-up line on the console"
    );
    assert_eq!(
        st["data"]["formatted"], true,
        "first boot formats data: {st}"
    );
    assert_eq!(st["previous_boot"], "none", "{st}");
    // The image ships slot B's UKI as the bytes it differs from A's by; stage 1 of the
    // first boot writes the standby entry from them (the verity test boots it).
    let standby = format!("standby entry written: edgeos-{}-b+0.efi", ready.version);
    assert!(console.contains(&standby), "no {standby:?} on the console");
    assert!(
        m.events().iter().any(|e| e["event"] == "ready"
            && e["slot"] == "a"
            && e["version"] == ready.version.as_str()),
        "no ready event: {:?}",
        m.events()
    );
    // Nothing listens on the network: fabricd's HTTP port for the site network (the one
    // listener system.toml declares) stays off until the site provisions its TLS
    // certificate (qemu-tests/tests/fabric.rs does), and the framed TCP port is off in
    // the image. init looks every 10 s: a look well after fabricd started.
    // Asked each second for 12 s (the control port read all along, as in the other
    // waits), so that each answer is held to it.
    let until = std::time::Instant::now() + Duration::from_secs(12);
    let st = loop {
        let st = m.status()?;
        assert_eq!(
            st["listening"]["open"],
            json!([]),
            "nothing open to the network: {st}"
        );
        if std::time::Instant::now() >= until {
            break st;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(
        st["listening"]["undeclared"],
        json!([]),
        "undeclared listeners: {st}"
    );
    // The image's static pods (sensor and inference): their images are served by
    // noded's loopback registry, pulled through CRI, and the containers run under
    // containerd and runc.
    m.wait_pods_started(&["sensor", "inference"])?;

    // ACPI power button: init shuts down cleanly and QEMU exits.
    let from = m.events().len();
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(90))?;
    assert!(
        m.events()[from..]
            .iter()
            .any(|e| e["event"] == "shutdown" && e["action"] == "poweroff"),
        "no shutdown event after the power button: {:?}",
        &m.events()[from..]
    );

    // Second boot, same disk, vars and TPM: data is reused and was unmounted cleanly.
    m.reboot_same_disk()?;
    let again = m.wait_ready()?;
    assert_eq!(again.slot, "a");
    let st = m.status()?;
    assert_eq!(
        st["data"]["formatted"], false,
        "data reformatted on reboot: {st}"
    );
    assert_eq!(
        st["data"]["clean"], true,
        "power-off left data unclean: {st}"
    );
    assert!(all_ready(&st), "{st}");
    assert_eq!(st["previous_boot"], "shut down cleanly", "{st}");
    let console = std::fs::read_to_string(m.console_log())?;
    assert_eq!(
        console.matches(&standby).count(),
        1,
        "the standby entry is written at the first boot only"
    );
    assert!(!console.contains("no standby entry written"), "{console}");
    // The pod comes back after the reboot with no control plane anywhere.
    m.wait_pods_started(&["sensor", "inference"])?;

    // The disk all but stalls (one request a second for 25 s, as a worn disk or QEMU's
    // NVMe model can): PID 1's pages are locked in memory and nothing in its loop waits
    // for the disk, so it answers the control port each time within seconds (the same
    // loop pets the watchdog), and the box is ready as before once the disk is back.
    let locked = st["init_locked_kib"].as_u64().unwrap_or(0);
    assert!(locked >= 1024, "PID 1's pages are locked in memory: {st}");
    m.throttle_boot_disk(Some(1))?;
    let stalled = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    while stalled.elapsed() < Duration::from_secs(25) {
        let asked = std::time::Instant::now();
        let st = m.status()?;
        slowest = slowest.max(asked.elapsed());
        assert_eq!(st["ready"], true, "{st}");
        std::thread::sleep(Duration::from_secs(1));
    }
    m.throttle_boot_disk(None)?;
    assert!(
        slowest < Duration::from_secs(5),
        "PID 1 answered in {slowest:?} at the slowest while the disk stalled"
    );
    let st = m.status()?;
    assert!(all_ready(&st), "{st}");
    eprintln!("disk stall: PID 1 answered within {slowest:?} ({locked} KiB locked)");

    // PID 1 hangs (the control port's watchdog test stops its loop): nothing pets the
    // i6300esb, which resets the machine; the next boot says so and comes up ready.
    let from = m.events().len();
    let reply = m.request(json!({"cmd": "watchdog-test"}))?;
    assert_eq!(reply["ok"], true, "{reply}");
    let hung_at = std::time::Instant::now();
    m.wait_for_console(
        "previous boot: reset by the watchdog",
        Duration::from_secs(240),
    )?;
    let reset_after = hung_at.elapsed();
    let again = m.wait_ready()?;
    assert_eq!(again.slot, "a");
    let st = m.status()?;
    assert_eq!(st["previous_boot"], "reset by the watchdog", "{st}");
    assert_eq!(
        st["data"]["clean"], false,
        "a reset leaves data unclean: {st}"
    );
    assert!(all_ready(&st), "{st}");
    assert!(
        m.events()[from..]
            .iter()
            .any(|e| e["event"] == "watchdog-test"),
        "no watchdog-test event: {:?}",
        &m.events()[from..]
    );
    eprintln!("watchdog: reset and rebooted {reset_after:?} after PID 1 stopped");
    m.finish();
    Ok(())
}
