//! Prometheus `/metrics` on a local port: records and bytes in (per class) and out,
//! lag in records and bytes, disk use per class, drops, refusals, uplink state; and the
//! box's own state as init's files tell it (`edge_*`: the running OS, readiness, services
//! given up, the last update's phase), so that the core's Prometheus sees it too.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use edge_common::metrics::{labels, Exposition, Labels};
use tokio::net::TcpListener;

use crate::store::Log;
use crate::uplink::Status;

pub struct Metrics {
    pub log: Log,
    pub status: Arc<Status>,
    pub downlink: Arc<crate::downlink::Status>,
    pub quota_bytes: u64,
    pub core_configured: bool,
    /// The scrapes of the box's metrics for the core (`[scrape]`).
    pub scrapes: Arc<crate::scrape::Stats>,
    /// init's files: the boot record, the update state, the health file.
    pub files: crate::uplink::OsFiles,
}

impl Metrics {
    /// The exposition (edge-common's, OpenMetrics text).
    pub fn render(&self) -> String {
        let classes: Vec<_> = {
            let meta = self.log.meta();
            meta.classes
                .iter()
                .map(|c| (c.name.clone(), c.bytes, c.stats.clone()))
                .collect()
        };
        let per = |f: &dyn Fn(usize) -> u64| -> Vec<(Labels, u64)> {
            classes
                .iter()
                .enumerate()
                .map(|(i, (n, _, _))| (labels(&[("class", n)]), f(i)))
                .collect()
        };
        let one = |v: u64| [(Labels::none(), v)];
        let mut e = Exposition::new();
        e.counter(
            "fabricd_records_in_total",
            "Records made durable.",
            per(&|i| classes[i].2.appended_records),
        );
        e.counter(
            "fabricd_bytes_in_total",
            "Bytes made durable (framed).",
            per(&|i| classes[i].2.appended_bytes),
        );
        e.counter(
            "fabricd_log_syncs_total",
            "fsyncs of the log (one per group commit that wrote to the class).",
            per(&|i| classes[i].2.log_syncs),
        );
        e.gauge(
            "fabricd_disk_bytes",
            "Bytes on disk per class.",
            per(&|i| classes[i].1),
        );
        e.counter(
            "fabricd_dropped_records_total",
            "Records deleted by retention or the quota before the core acked them.",
            per(&|i| classes[i].2.dropped_records),
        );
        e.counter(
            "fabricd_retired_records_total",
            "Records deleted by retention or the quota.",
            per(&|i| classes[i].2.retired_records),
        );
        e.counter(
            "fabricd_refused_full_total",
            "Appends answered full (backpressure).",
            per(&|i| classes[i].2.refused_full),
        );
        let lags: Vec<(u64, u64)> = (0..classes.len())
            .map(|i| self.log.lag(i).unwrap_or((0, 0)))
            .collect();
        e.gauge(
            "fabricd_lag_records",
            "Durable records the core has not acked.",
            per(&|i| lags[i].0),
        );
        e.gauge(
            "fabricd_lag_bytes",
            "Durable bytes the core has not acked.",
            per(&|i| lags[i].1),
        );
        let s = &self.status;
        let load = |a: &std::sync::atomic::AtomicU64| one(a.load(Ordering::Relaxed));
        e.gauge(
            "fabricd_quota_bytes",
            "Local quota for all classes.",
            one(self.quota_bytes),
        );
        e.counter(
            "fabricd_records_out_total",
            "Records the core acked.",
            load(&s.published_records),
        );
        e.counter(
            "fabricd_bytes_out_total",
            "Value bytes the core acked.",
            load(&s.published_bytes),
        );
        e.counter(
            "fabricd_uplink_wire_bytes_total",
            "Payload bytes the core acked as sent on the wire (after compression).",
            load(&s.wire_bytes),
        );
        e.counter(
            "fabricd_uplink_compressed_records_total",
            "Records sent zstd-compressed.",
            load(&s.compressed_records),
        );
        e.counter(
            "fabricd_uplink_duplicates_total",
            "Resent records the core already had.",
            load(&s.duplicates),
        );
        e.counter(
            "fabricd_uplink_log_diverged_total",
            "Sessions that found the core holding a record of ours this log does not (a log restored from a backup).",
            load(&s.log_diverged),
        );
        e.counter(
            "fabricd_uplink_reconnects_total",
            "Uplink sessions started again after a failure.",
            load(&s.reconnects),
        );
        e.gauge(
            "fabricd_uplink_connected",
            "1 while connected to the core.",
            one(s.connected.load(Ordering::Relaxed) as u64),
        );
        e.gauge(
            "fabricd_uplink_configured",
            "1 when a core is configured.",
            one(self.core_configured as u64),
        );
        let d = &self.downlink;
        e.counter(
            "fabricd_downlink_items_total",
            "Downlink items verified and written, or refused.",
            [
                (
                    labels(&[("result", "applied")]),
                    d.applied.load(Ordering::Relaxed),
                ),
                (
                    labels(&[("result", "refused")]),
                    d.refused.load(Ordering::Relaxed),
                ),
            ],
        );
        e.counter(
            "fabricd_downlink_bytes_total",
            "Item bytes fetched from the core.",
            load(&d.fetched_bytes),
        );
        e.counter(
            "fabricd_downlink_resumed_bytes_total",
            "Bytes an interrupted download did not fetch again.",
            load(&d.resumed_bytes),
        );
        let scrapes = self.scrapes.snapshot();
        e.counter(
            "fabricd_scrapes_total",
            "Scrapes of the box's metrics made for the core, per target (its job at the core).",
            scrapes
                .iter()
                .map(|(job, n, _)| (labels(&[("target", job)]), *n))
                .collect::<Vec<_>>(),
        );
        e.counter(
            "fabricd_scrape_failures_total",
            "Scrapes that failed (no answer, an error, a stale file, not the exposition format), per target.",
            scrapes
                .iter()
                .map(|(job, _, failed)| (labels(&[("target", job)]), *failed))
                .collect::<Vec<_>>(),
        );
        self.box_state(&mut e);
        e.render()
    }

    /// `edge_*`: what init's files say; a file missing or unreadable leaves its families
    /// out (or empty), never a made-up value.
    fn box_state(&self, e: &mut Exposition) {
        if let Some(os) = self.files.os() {
            e.gauge(
                "edge_os_info",
                "The running OS version and slot (always 1).",
                [(labels(&[("version", &os.version), ("slot", &os.slot)]), 1)],
            );
        }
        if let Some(h) = self.files.health() {
            e.gauge(
                "edge_ready",
                "1 once every service reached ready this boot.",
                [(Labels::none(), h.ready as u64)],
            );
            e.gauge(
                "edge_service_given_up",
                "1 for each service init gave up after its crash-loop limit.",
                h.failed.iter().map(|s| (labels(&[("service", s)]), 1)),
            );
            e.gauge(
                "edge_degraded_since_timestamp_seconds",
                "When the box last became degraded (a service given up).",
                h.degraded_since_ms.map(|ms| (Labels::none(), ms / 1000)),
            );
            e.gauge(
                "edge_root_corrupt",
                "1 when the running slot's verified root met a block that did not verify.",
                [(Labels::none(), h.root_corrupt as u64)],
            );
        }
        let update = self.files.update();
        let attempt = update.as_ref().and_then(|u| u.get("update"));
        let text = |k: &str| {
            attempt
                .and_then(|a| a.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        if attempt.is_some_and(|a| a.is_object()) {
            e.gauge(
                "edge_update_phase",
                "The last update's phase (installing, installed, trying, blessed, rolled-back, refused, cancelled) and version (always 1).",
                [(
                    labels(&[("phase", &text("phase")), ("version", &text("version"))]),
                    1,
                )],
            );
        }
    }
}

/// Serves `GET /metrics` (edge-common's responder).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    edge_common::serve_metrics(listener, move || {
        let metrics = metrics.clone();
        async move { metrics.render() }
    })
    .await
}
