//! The fleet seen from the core: a box's metrics, scraped by its fabricd and mirrored
//! through the fabric, written by `edgectl prometheus` into a real Prometheus (Debian's)
//! with the box's own scrape times, through a cut of the box's link; the alert rules and
//! the dashboard of image/observability/ checked by promtool and by that Prometheus.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::prometheus::{observability, Bridge, Prometheus};
use common::*;

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(observability())
        .output()
        .expect("run promtool (Debian's prometheus package; cargo xtask test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_each_fires_when_it_should() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 11 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

fn unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_box_metrics_reach_prometheus_through_a_cut_with_their_own_times() {
    let core = Core::start();
    let proxy = Proxy::start(core.nats.port);
    let dir = core.tmp.path().join("box");
    std::fs::create_dir_all(&dir).unwrap();
    // init's files, as a box whose last update rolled back and whose storaged was given up.
    let update = dir.join("update-state.json");
    std::fs::write(
        &update,
        r#"{"update":{"phase":"rolled-back","bundle":"edgeos-1.2.0.bundle","bundle_id":"1","version":"1.2.0","slot":"b","from_version":"1.1.0","from_slot":"a","time_ms":1}}"#,
    )
    .unwrap();
    let health = dir.join("health.json");
    std::fs::write(
        &health,
        r#"{"ready":true,"failed":["storaged"],"previous_boot":"shut down cleanly"}"#,
    )
    .unwrap();
    let boot = dir.join("boot.json");
    std::fs::write(&boot, r#"{"version":"1.1.0","slot":"a"}"#).unwrap();
    // Nothing listens on the storaged target: its scrapes fail and say so. The noded
    // target (a file here) holds text that is not the exposition format: the same.
    let nobody = free_port();
    let garbage = dir.join("garbage.prom");
    std::fs::write(&garbage, "<html>502 Bad Gateway</html>\n").unwrap();
    let mut f = Fabricd::configure(&dir, "");
    let extra = format!(
        "boot_file = \"{}\"\nupdate_state = \"{}\"\nhealth_file = \"{}\"\n[scrape]\ninterval_secs = 1\ntargets = {{ fabricd = \"{}\", storaged = \"127.0.0.1:{nobody}\" }}\nfiles = {{ noded = \"{}\" }}\n{}",
        boot.display(),
        update.display(),
        health.display(),
        f.metrics,
        garbage.display(),
        core.pki
            .core_toml(&format!("tls://127.0.0.1:{}", proxy.port), "client")
    );
    let config = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(&f.config, format!("{config}{extra}")).unwrap();
    f.start();

    let prom = Prometheus::start(&core.tmp.path().join("prometheus"));
    let bridge = Bridge(
        core.edgectl()
            .arg("prometheus")
            .arg("--write-url")
            .arg(prom.write_url())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(core.tmp.path().join("bridge.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let bridge_log = || std::fs::read_to_string(core.tmp.path().join("bridge.log")).unwrap();

    // The box's series arrive, labelled with where they came from.
    let up = |job: &str| format!("up{{site=\"s1\",machine=\"m1\",job=\"{job}\"}}");
    wait_for(
        "the box's fabricd scrape in Prometheus",
        Duration::from_secs(60),
        || (prom.value(&up("fabricd"), None) == Some(1.0)).then_some(()),
    );
    assert_eq!(
        prom.value(&up("storaged"), None),
        Some(0.0),
        "{}",
        bridge_log()
    );
    // Counted on the box (fabricd's own figures, at the core too) and logged once, naming
    // the line, not every second.
    assert_eq!(prom.value(&up("noded"), None), Some(0.0));
    wait_for("the failures counted", Duration::from_secs(30), || {
        prom.value(
            r#"fabricd_scrape_failures_total{site="s1",job="fabricd",target="noded"}"#,
            None,
        )
        .filter(|n| *n >= 2.0)
    });
    let text = f.log_text();
    assert_eq!(
        text.matches("scrape failed: not the exposition format: line 1:")
            .count(),
        1,
        "{text}"
    );
    let records = r#"sum(fabricd_records_in_total{site="s1",machine="m1",job="fabricd"})"#;
    // The first scrape came before any record; the next ones count the scrapes.
    wait_for(
        "fabricd's own counters moving",
        Duration::from_secs(30),
        || prom.value(records, None).filter(|n| *n > 0.0),
    );
    assert_eq!(
        prom.value(r#"edge_os_info{site="s1",version="1.1.0",slot="a"}"#, None),
        Some(1.0)
    );
    // The alert rules match what the box sends.
    for alert in ["EdgeUpdateRolledBack", "EdgeServiceGivenUp"] {
        wait_for(alert, Duration::from_secs(30), || {
            let q = format!("ALERTS{{alertname=\"{alert}\",alertstate=\"firing\",site=\"s1\"}}");
            prom.value(&q, None).map(|_| ())
        });
    }
    assert!(
        prom.value(r#"ALERTS{alertname="EdgeSiteSilent",site="s1"}"#, None)
            .is_none(),
        "a box heard from each second is not silent"
    );

    // The link is cut for 15 s: nothing from its time reaches Prometheus while it lasts.
    let stamp = r#"edge_scrape_timestamp_seconds{site="s1",job="fabricd"}"#;
    let during = |at: f64| {
        prom.value(&format!("count_over_time({stamp}[8s])"), Some(at))
            .unwrap_or(0.0)
    };
    proxy.set_cut(true);
    let cut_at = unix_s();
    std::thread::sleep(Duration::from_secs(15));
    let middle = cut_at + 10.0;
    assert_eq!(
        during(middle),
        0.0,
        "samples from the cut arrived during it"
    );
    proxy.set_cut(false);
    // Healed: the scrapes made during the cut arrive with their own times, one a second.
    wait_for(
        "the cut's scrapes in Prometheus",
        Duration::from_secs(60),
        || (during(middle) >= 7.0).then_some(()),
    );
    wait_for("scrapes after the cut", Duration::from_secs(30), || {
        prom.value(&format!("max_over_time({stamp}[5s])"), None)
            .filter(|t| *t > cut_at + 15.0)
    });
    // None was refused (each scrape once, in order).
    let log = bridge_log();
    assert!(!log.contains("refused it"), "{log}");

    // A scrape older than Prometheus takes (a box cut off for longer than its
    // out-of-order window): refused, counted and said, and the scrapes after it still
    // written.
    let old_ms = (unix_s() - 3.0 * 86400.0) as i64 * 1000;
    core.rt.block_on(async {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "s1/m1/old-scrape");
        h.insert("Fabric-Timestamp", old_ms.to_string().as_str());
        core.js
            .publish_with_headers("edge.s1.m1.metrics.fabricd", h, "up_old 1\n".into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    let after = unix_s();
    let start = std::time::Instant::now();
    while !bridge_log().contains("old-scrape: Prometheus refused it") {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the old scrape not refused after 60 s; the bridge said:\n{}",
            bridge_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for(
        "scrapes after the refused one",
        Duration::from_secs(30),
        || {
            prom.value(&format!("max_over_time({stamp}[5s])"), None)
                .filter(|t| *t > after + 1.0)
        },
    );

    // Every query of the dashboard parses and runs.
    let exprs = Prometheus::dashboard_queries();
    assert!(exprs.len() >= 15, "{exprs:?}");
    for e in &exprs {
        let answer = prom.query(e, None);
        assert_eq!(answer["status"], "success", "{e}: {answer}");
    }
    // The first panel counts the boxes heard from: this one.
    let heard = prom.query(&exprs[0], None);
    assert_eq!(heard["data"]["result"][0]["value"][1], "1", "{heard}");

    drop(bridge);
    f.terminate();
}
