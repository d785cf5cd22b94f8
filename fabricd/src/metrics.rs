//! Prometheus `/metrics` on a local port: records and bytes in (per class) and out,
//! lag in records and bytes, disk use per class, drops, refusals, uplink state.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::store::Log;
use crate::uplink::Status;

pub struct Metrics {
    pub log: Log,
    pub status: Arc<Status>,
    pub downlink: Arc<crate::downlink::Status>,
    pub quota_bytes: u64,
    pub core_configured: bool,
}

impl Metrics {
    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let classes: Vec<_> = {
            let meta = self.log.meta();
            meta.classes
                .iter()
                .map(|c| (c.name.clone(), c.bytes, c.stats.clone()))
                .collect()
        };
        let mut family = |name: &str, kind: &str, help: &str, values: Vec<(String, u64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in values {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        let per = |f: &dyn Fn(usize) -> u64| -> Vec<(String, u64)> {
            classes
                .iter()
                .enumerate()
                .map(|(i, (n, _, _))| (format!("{{class=\"{n}\"}}"), f(i)))
                .collect()
        };
        family(
            "fabricd_records_in_total",
            "counter",
            "Records made durable.",
            per(&|i| classes[i].2.appended_records),
        );
        family(
            "fabricd_bytes_in_total",
            "counter",
            "Bytes made durable (framed).",
            per(&|i| classes[i].2.appended_bytes),
        );
        family(
            "fabricd_disk_bytes",
            "gauge",
            "Bytes on disk per class.",
            per(&|i| classes[i].1),
        );
        family(
            "fabricd_dropped_records_total",
            "counter",
            "Records deleted by retention or the quota before the core acked them.",
            per(&|i| classes[i].2.dropped_records),
        );
        family(
            "fabricd_retired_records_total",
            "counter",
            "Records deleted by retention or the quota.",
            per(&|i| classes[i].2.retired_records),
        );
        family(
            "fabricd_refused_full_total",
            "counter",
            "Appends answered full (backpressure).",
            per(&|i| classes[i].2.refused_full),
        );
        let lags: Vec<(u64, u64)> = (0..classes.len())
            .map(|i| self.log.lag(i).unwrap_or((0, 0)))
            .collect();
        family(
            "fabricd_lag_records",
            "gauge",
            "Durable records the core has not acked.",
            per(&|i| lags[i].0),
        );
        family(
            "fabricd_lag_bytes",
            "gauge",
            "Durable bytes the core has not acked.",
            per(&|i| lags[i].1),
        );
        let one = |v: u64| vec![(String::new(), v)];
        let s = &self.status;
        family(
            "fabricd_quota_bytes",
            "gauge",
            "Local quota for all classes.",
            one(self.quota_bytes),
        );
        family(
            "fabricd_records_out_total",
            "counter",
            "Records the core acked.",
            one(s.published_records.load(Ordering::Relaxed)),
        );
        family(
            "fabricd_bytes_out_total",
            "counter",
            "Value bytes the core acked.",
            one(s.published_bytes.load(Ordering::Relaxed)),
        );
        family(
            "fabricd_uplink_wire_bytes_total",
            "counter",
            "Payload bytes the core acked as sent on the wire (after compression).",
            one(s.wire_bytes.load(Ordering::Relaxed)),
        );
        family(
            "fabricd_uplink_compressed_records_total",
            "counter",
            "Records sent zstd-compressed.",
            one(s.compressed_records.load(Ordering::Relaxed)),
        );
        family(
            "fabricd_uplink_duplicates_total",
            "counter",
            "Resent records the core already had.",
            one(s.duplicates.load(Ordering::Relaxed)),
        );
        family(
            "fabricd_uplink_reconnects_total",
            "counter",
            "Uplink sessions started again after a failure.",
            one(s.reconnects.load(Ordering::Relaxed)),
        );
        family(
            "fabricd_uplink_connected",
            "gauge",
            "1 while connected to the core.",
            one(s.connected.load(Ordering::Relaxed) as u64),
        );
        family(
            "fabricd_uplink_configured",
            "gauge",
            "1 when a core is configured.",
            one(self.core_configured as u64),
        );
        let d = &self.downlink;
        family(
            "fabricd_downlink_items_total",
            "counter",
            "Downlink items verified and written, or refused.",
            vec![
                (
                    "{result=\"applied\"}".into(),
                    d.applied.load(Ordering::Relaxed),
                ),
                (
                    "{result=\"refused\"}".into(),
                    d.refused.load(Ordering::Relaxed),
                ),
            ],
        );
        family(
            "fabricd_downlink_bytes_total",
            "counter",
            "Item bytes fetched from the core.",
            one(d.fetched_bytes.load(Ordering::Relaxed)),
        );
        family(
            "fabricd_downlink_resumed_bytes_total",
            "counter",
            "Bytes an interrupted download did not fetch again.",
            one(d.resumed_bytes.load(Ordering::Relaxed)),
        );
        out
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
