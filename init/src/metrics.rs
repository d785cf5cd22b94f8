//! init's own metrics: every 15 s PID 1 writes them to `/run/edge/metrics/init.prom` (the
//! exposition every daemon serves, from edge-common), which fabricd's scrape reads as the
//! job `init` and sends to the core. A file instead of a socket: PID 1 answers no
//! connection it does not have to, and a write to tmpfs cannot hold up its loop. A
//! file not rewritten for a while (PID 1 stuck) is reported stale by the scrape.
//!
//! The figures: uptime and readiness, stage 1's time, each service's state (one sample
//! per state, 1 for the one it is in), restarts, when it became ready and its memory,
//! the box's memory, service log lines dropped, and the watchdog.

use std::path::Path;

use edge_metrics::{labels, Exposition, Labels};
use serde_json::Value;

use crate::status::Boot;

/// Where the figures are written.
pub const FILE: &str = "/run/edge/metrics/init.prom";
/// How often.
pub const EVERY: std::time::Duration = std::time::Duration::from_secs(15);

const STATES: [&str; 7] = [
    "waiting", "starting", "ready", "backoff", "stopping", "stopped", "failed",
];

/// What the figures are made of.
pub struct Figures<'a> {
    pub boot: &'a Boot,
    pub ready: bool,
    /// The supervisor's `status()` objects.
    pub services: &'a [Value],
    pub log_lines_dropped: u64,
    pub data_full: bool,
    /// The watchdog's timeout and whether it reset the last boot.
    pub watchdog: Option<(i32, bool)>,
}

pub fn render(f: &Figures) -> String {
    let mut e = Exposition::new();
    let one = |v: u64| [(Labels::none(), v)];
    e.gauge_f64(
        "init_uptime_seconds",
        "Seconds since the kernel started.",
        [(Labels::none(), crate::logs::uptime().as_secs_f64())],
    );
    e.gauge(
        "init_ready",
        "1 once every service reached ready this boot.",
        one(f.ready as u64),
    );
    if let Some(ms) = f.boot.stage1_ms {
        e.gauge_f64(
            "init_stage1_seconds",
            "Stage 1's time (TPM, root, data partition, switch root).",
            [(Labels::none(), ms as f64 / 1000.0)],
        );
    }
    let name = |s: &Value| s["name"].as_str().unwrap_or("?").to_owned();
    e.gauge(
        "init_service_state",
        "1 for the state each service is in, 0 for the others.",
        f.services.iter().flat_map(|s| {
            let (service, state) = (name(s), s["state"].as_str().unwrap_or(""));
            STATES.iter().map(move |st| {
                (
                    labels(&[("service", service.as_str()), ("state", st)]),
                    (*st == state) as u64,
                )
            })
        }),
    );
    e.counter(
        "init_service_restarts_total",
        "Restarts of each service this boot.",
        f.services.iter().map(|s| {
            (
                labels(&[("service", &name(s))]),
                s["restarts"].as_u64().unwrap_or(0),
            )
        }),
    );
    e.gauge_f64(
        "init_service_ready_uptime_seconds",
        "The uptime at which each service (last) became ready.",
        f.services.iter().filter_map(|s| {
            let ms = s["ready_uptime_ms"].as_u64()?;
            Some((labels(&[("service", &name(s))]), ms as f64 / 1000.0))
        }),
    );
    e.gauge(
        "init_service_memory_bytes",
        "Resident memory of each running service's main process.",
        f.services.iter().filter_map(|s| {
            let kib = s["rss_kib"].as_u64()?;
            Some((labels(&[("service", &name(s))]), kib * 1024))
        }),
    );
    e.gauge(
        "init_memory_bytes",
        "PID 1's resident memory.",
        crate::status::rss_kib(std::process::id() as i32).map(|k| (Labels::none(), k * 1024)),
    );
    let (total, available) = crate::status::meminfo();
    e.gauge(
        "init_memory_total_bytes",
        "The box's memory.",
        one(total * 1024),
    );
    e.gauge(
        "init_memory_available_bytes",
        "The box's memory available (MemAvailable).",
        one(available * 1024),
    );
    e.counter(
        "init_log_lines_dropped_total",
        "Service log lines not kept (the data partition full or stalled).",
        one(f.log_lines_dropped),
    );
    e.gauge(
        "init_data_full",
        "1 while the data partition is (nearly) full.",
        one(f.data_full as u64),
    );
    if let Some((timeout, reset)) = f.watchdog {
        e.gauge(
            "init_watchdog_timeout_seconds",
            "The hardware watchdog's timeout.",
            one(timeout.max(0) as u64),
        );
        e.gauge(
            "init_watchdog_reset_last_boot",
            "1 when the watchdog reset the previous boot.",
            one(reset as u64),
        );
    }
    e.render()
}

/// Writes `text` to `path` whole (a temporary file renamed over it).
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("prom.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_has_every_state_restarts_and_memory() {
        let boot = Boot {
            slot: "a".into(),
            version: "1.0".into(),
            stage1_ms: Some(2500),
            ..Default::default()
        };
        let services = [
            serde_json::json!({"name": "noded", "state": "ready", "restarts": 2,
                "rss_kib": 100, "ready_uptime_ms": 6500}),
            serde_json::json!({"name": "storaged", "state": "failed", "restarts": 5,
                "rss_kib": null, "ready_uptime_ms": null}),
        ];
        let text = render(&Figures {
            boot: &boot,
            ready: false,
            services: &services,
            log_lines_dropped: 3,
            data_full: false,
            watchdog: Some((30, true)),
        });
        let samples = edge_metrics::parse(&text).unwrap();
        let get = |name: &str, l: &[(&str, &str)]| {
            samples
                .iter()
                .find(|s| {
                    s.name == name
                        && s.labels.len() == l.len()
                        && l.iter()
                            .all(|(k, v)| s.labels.contains(&(k.to_string(), v.to_string())))
                })
                .map(|s| s.value)
        };
        assert_eq!(
            get(
                "init_service_state",
                &[("service", "noded"), ("state", "ready")]
            ),
            Some(1.0)
        );
        assert_eq!(
            get(
                "init_service_state",
                &[("service", "noded"), ("state", "failed")]
            ),
            Some(0.0)
        );
        assert_eq!(
            get(
                "init_service_state",
                &[("service", "storaged"), ("state", "failed")]
            ),
            Some(1.0)
        );
        let states = samples
            .iter()
            .filter(|s| s.name == "init_service_state")
            .count();
        assert_eq!(states, 14);
        assert_eq!(
            get("init_service_restarts_total", &[("service", "storaged")]),
            Some(5.0)
        );
        assert_eq!(
            get("init_service_memory_bytes", &[("service", "noded")]),
            Some(102400.0)
        );
        assert_eq!(
            get("init_service_memory_bytes", &[("service", "storaged")]),
            None
        );
        assert_eq!(
            get("init_service_ready_uptime_seconds", &[("service", "noded")]),
            Some(6.5)
        );
        assert_eq!(get("init_stage1_seconds", &[]), Some(2.5));
        assert_eq!(get("init_ready", &[]), Some(0.0));
        assert_eq!(get("init_log_lines_dropped_total", &[]), Some(3.0));
        assert_eq!(get("init_watchdog_reset_last_boot", &[]), Some(1.0));
        assert!(
            text.contains("# TYPE init_service_restarts counter"),
            "{text}"
        );

        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("metrics/init.prom");
        write(&file, &text).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    }
}
