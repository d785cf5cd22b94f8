//! Prometheus `/metrics` on a local TCP port (config `metrics_listen`) and the pool's
//! near-full warnings: the thin pool's data and metadata use, what the volumes were
//! promised, and per volume its size, mapped bytes and block I/O counters.
//!
//! The near-full state lives in the `Pool` (`Pool::check_fullness`): it is updated on a
//! timer, when the pool is opened and after each create, snapshot, expand or CSI call,
//! and it logs once per threshold crossed rather than on every look.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edge_common::metrics::{labels, Exposition, Labels};
use tokio::net::TcpListener;

use crate::catalog::{Kind, State};
use crate::Pool;

/// The pool as the CSI driver and the metrics endpoint share it (None: no pool device).
pub type SharedPool = Arc<Mutex<Option<Pool>>>;

/// Use percentages that raise a warning when crossed upwards.
pub const THRESHOLDS: [u64; 3] = [80, 90, 95];
/// Below this again, storaged says the pool has room.
const CLEAR: u64 = 80;
/// Metadata blocks of a thin pool are 4 KiB (kernel documentation).
const META_BLOCK_BYTES: u64 = 4096;

/// The highest threshold each resource has crossed (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NearFull {
    pub data: u64,
    pub metadata: u64,
}

/// The highest threshold `used` of `total` has reached.
fn level(used: u64, total: u64) -> u64 {
    THRESHOLDS
        .iter()
        .rev()
        .copied()
        .find(|t| total > 0 && u128::from(used) * 100 >= u128::from(*t) * u128::from(total))
        .unwrap_or(0)
}

/// What changed for one resource: Some(level) when a warning (level > 0) or the all
/// clear (0) is due.
fn crossing(old: u64, used: u64, total: u64) -> (u64, Option<u64>) {
    let new = level(used, total);
    let event = if new > old {
        Some(new)
    } else if new < CLEAR && old >= CLEAR {
        Some(0)
    } else {
        None
    };
    (new, event)
}

impl NearFull {
    /// Records the pool's use and logs each crossing; returns the crossings as
    /// (resource, threshold or 0 for back below 80%).
    pub fn observe(
        &mut self,
        pool: &str,
        st: &edge_dm::ThinPoolStatus,
    ) -> Vec<(&'static str, u64)> {
        let mut events = Vec::new();
        for (resource, slot, used, total) in [
            (
                "data",
                &mut self.data,
                st.used_data_blocks,
                st.total_data_blocks,
            ),
            (
                "metadata",
                &mut self.metadata,
                st.used_meta_blocks,
                st.total_meta_blocks,
            ),
        ] {
            let (new, event) = crossing(*slot, used, total);
            *slot = new;
            let pct = if total == 0 {
                0.0
            } else {
                used as f64 * 100.0 / total as f64
            };
            match event {
                Some(0) => tracing::info!(
                    "pool {pool}: {resource} space {pct:.1}% used ({used}/{total} blocks), \
                     back below {CLEAR}%"
                ),
                Some(t) => tracing::warn!(
                    "pool {pool}: {resource} space {pct:.1}% used ({used}/{total} blocks), \
                     past {t}%"
                ),
                None => continue,
            }
            events.extend(event.map(|t| (resource, t)));
        }
        events
    }
}

/// Block I/O counters of a device-mapper device from `/sys/block/dm-<minor>/stat`:
/// (reads completed, sectors read, writes completed, sectors written).
fn io_stats(minor: u32) -> Option<[u64; 4]> {
    let text = std::fs::read_to_string(format!("/sys/block/dm-{minor}/stat")).ok()?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    Some([*f.first()?, *f.get(2)?, *f.get(4)?, *f.get(6)?])
}

/// The exposition (edge-common's, OpenMetrics text).
pub fn render(pool: Option<&Pool>) -> String {
    let mut f = Exposition::new();
    let one = |v: u64| [(Labels::none(), v)];
    f.gauge(
        "storaged_pool_present",
        "1 when a pool device is claimed and its thin pool active.",
        one(pool.is_some() as u64),
    );
    csi_calls(&mut f, &crate::csi::calls());
    let Some(pool) = pool else {
        return f.render();
    };
    match pool.status() {
        Ok(st) => {
            f.gauge(
                "storaged_pool_data_blocks",
                "Data blocks in the thin pool.",
                one(st.total_data_blocks),
            );
            f.gauge(
                "storaged_pool_data_used_blocks",
                "Data blocks in use (mapped by some volume or snapshot).",
                one(st.used_data_blocks),
            );
            f.gauge(
                "storaged_pool_metadata_blocks",
                "Metadata blocks of the thin pool.",
                one(st.total_meta_blocks),
            );
            f.gauge(
                "storaged_pool_metadata_used_blocks",
                "Metadata blocks in use.",
                one(st.used_meta_blocks),
            );
        }
        Err(e) => tracing::warn!("metrics: {e}"),
    }
    f.gauge(
        "storaged_pool_data_block_bytes",
        "Bytes per data block.",
        one(u64::from(pool.superblock().data_block_sectors) * 512),
    );
    f.gauge(
        "storaged_pool_metadata_block_bytes",
        "Bytes per metadata block.",
        one(META_BLOCK_BYTES),
    );
    let near = pool.near_full();
    f.gauge(
        "storaged_pool_near_full",
        "Highest use threshold (80, 90, 95 percent) crossed, 0 if none.",
        [
            (labels(&[("resource", "data")]), near.data),
            (labels(&[("resource", "metadata")]), near.metadata),
        ],
    );
    f.gauge(
        "storaged_pool_overcommit_limit_bytes",
        "Bytes all volumes may be promised in total.",
        one(pool.overcommit_limit()),
    );
    f.gauge(
        "storaged_pool_provisioned_bytes",
        "Bytes promised to volumes and snapshots (their sizes).",
        one(pool.catalog().provisioned_bytes()),
    );
    let ready: Vec<_> = pool
        .volumes()
        .iter()
        .filter(|v| v.state == State::Ready)
        .collect();
    let count = |k: Kind| ready.iter().filter(|v| v.kind == k).count() as u64;
    f.gauge(
        "storaged_volumes",
        "Volumes and snapshots in the catalog.",
        [
            (labels(&[("kind", "volume")]), count(Kind::Volume)),
            (labels(&[("kind", "snapshot")]), count(Kind::Snapshot)),
        ],
    );
    let label = |n: &str| labels(&[("volume", n)]);
    let mut size = Vec::new();
    let mut active = Vec::new();
    let mut mapped = Vec::new();
    let mut io: [Vec<(Labels, u64)>; 4] = Default::default();
    for v in &ready {
        size.push((label(&v.name), v.size_bytes));
        let dev = pool.device_number(&v.name).ok().flatten();
        active.push((label(&v.name), dev.is_some() as u64));
        let Some((_, minor)) = dev else { continue };
        if let Ok(u) = pool.usage(&v.name) {
            mapped.push((label(&v.name), u.mapped_sectors * 512));
        }
        if let Some(s) = io_stats(minor) {
            for (i, n) in s.iter().enumerate() {
                // Sectors are 512 bytes in this file whatever the device's block size.
                let n = if i % 2 == 1 { n * 512 } else { *n };
                io[i].push((label(&v.name), n));
            }
        }
    }
    f.gauge(
        "storaged_volume_size_bytes",
        "Size of each volume and snapshot.",
        size,
    );
    f.gauge(
        "storaged_volume_active",
        "1 while the volume's thin device exists (staged or being used).",
        active,
    );
    f.gauge(
        "storaged_volume_mapped_bytes",
        "Bytes of an active volume backed by pool blocks (shared ones included).",
        mapped,
    );
    let [reads, read_bytes, writes, written_bytes] = io;
    f.counter(
        "storaged_volume_reads_completed_total",
        "Reads completed on an active volume since it was activated.",
        reads,
    );
    f.counter(
        "storaged_volume_read_bytes_total",
        "Bytes read from an active volume since it was activated.",
        read_bytes,
    );
    f.counter(
        "storaged_volume_writes_completed_total",
        "Writes completed on an active volume since it was activated.",
        writes,
    );
    f.counter(
        "storaged_volume_written_bytes_total",
        "Bytes written to an active volume since it was activated.",
        written_bytes,
    );
    f.render()
}

/// The CSI calls served, per method: how many (ok or refused) and the seconds they took
/// (their mean latency is `rate(storaged_csi_call_seconds_total[5m]) /
/// sum without (result) (rate(storaged_csi_calls_total[5m]))`).
fn csi_calls(f: &mut Exposition, calls: &[(&str, crate::csi::Calls)]) {
    f.counter(
        "storaged_csi_calls_total",
        "CSI calls answered, per method and result (ok, or refused with an error status).",
        calls.iter().flat_map(|(m, c)| {
            [
                (labels(&[("method", m), ("result", "ok")]), c.answered),
                (labels(&[("method", m), ("result", "refused")]), c.refused),
            ]
        }),
    );
    f.counter_f64(
        "storaged_csi_call_seconds_total",
        "Seconds from a CSI request to its answer, summed per method.",
        calls
            .iter()
            .map(|(m, c)| (labels(&[("method", m)]), c.seconds)),
    );
}

/// Binds the metrics port (`metrics_listen`, e.g. `127.0.0.1:9402`).
pub async fn bind(addr: &str) -> crate::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Bind {
            what: "metrics port",
            addr: addr.to_owned(),
            source,
        })
}

async fn with_pool<T: Send + 'static>(
    pool: &SharedPool,
    f: impl FnOnce(Option<&mut Pool>) -> T + Send + 'static,
) -> Option<T> {
    let pool = pool.clone();
    // Status ioctls block; the CSI driver may hold the pool through a long mkfs.
    tokio::task::spawn_blocking(move || {
        let mut guard = edge_common::lock(&pool);
        f(guard.as_mut())
    })
    .await
    .ok()
}

/// Serves `GET /metrics` (edge-common's responder).
pub async fn serve(listener: TcpListener, pool: SharedPool) {
    edge_common::serve_metrics(listener, move || {
        let pool = pool.clone();
        async move {
            with_pool(&pool, |p| render(p.map(|p| &*p)))
                .await
                .unwrap_or_default()
        }
    })
    .await
}

/// Looks at the pool's use every `period`, so filling by writes alone (no storaged
/// call) still raises the near-full warnings.
pub async fn watch(pool: SharedPool, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        with_pool(&pool, |p| {
            if let Some(p) = p {
                if let Err(e) = p.check_fullness() {
                    tracing::warn!("pool use check: {e}");
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(data: (u64, u64), meta: (u64, u64)) -> edge_dm::ThinPoolStatus {
        edge_dm::ThinPoolStatus {
            transaction_id: 0,
            used_meta_blocks: meta.0,
            total_meta_blocks: meta.1,
            used_data_blocks: data.0,
            total_data_blocks: data.1,
            mode: "rw".into(),
            needs_check: false,
        }
    }

    #[test]
    fn levels_are_the_highest_threshold_reached() {
        assert_eq!(level(79, 100), 0);
        assert_eq!(level(80, 100), 80);
        assert_eq!(level(94, 100), 90);
        assert_eq!(level(100, 100), 95);
        assert_eq!(level(5, 0), 0);
    }

    #[test]
    fn each_crossing_is_reported_once() {
        let mut n = NearFull::default();
        assert!(n.observe("p", &st((10, 100), (1, 100))).is_empty());
        assert_eq!(n.observe("p", &st((81, 100), (1, 100))), [("data", 80)]);
        assert!(n.observe("p", &st((85, 100), (1, 100))).is_empty());
        // Straight past two thresholds: one warning, at the higher.
        assert_eq!(n.observe("p", &st((96, 100), (1, 100))), [("data", 95)]);
        assert_eq!(
            n,
            NearFull {
                data: 95,
                metadata: 0
            }
        );
        // Down to 91% and up again: a new crossing of 95%.
        assert!(n.observe("p", &st((91, 100), (1, 100))).is_empty());
        assert_eq!(n.observe("p", &st((95, 100), (1, 100))), [("data", 95)]);
        assert_eq!(
            n.observe("p", &st((50, 100), (90, 100))),
            [("data", 0), ("metadata", 90)]
        );
        assert_eq!(
            n,
            NearFull {
                data: 0,
                metadata: 90
            }
        );
    }

    #[test]
    fn csi_calls_are_counted_per_method_and_result_with_their_seconds() {
        let mut f = Exposition::new();
        let c = crate::csi::Calls {
            answered: 3,
            refused: 1,
            seconds: 0.25,
        };
        csi_calls(&mut f, &[("CreateVolume", c)]);
        let samples = edge_common::metrics::parse(&f.render()).unwrap();
        let v = |name: &str, result: Option<&str>| {
            samples
                .iter()
                .find(|s| {
                    s.name == name
                        && s.labels
                            .iter()
                            .any(|(k, v)| k == "method" && v == "CreateVolume")
                        && result
                            .is_none_or(|r| s.labels.iter().any(|(k, v)| k == "result" && v == r))
                })
                .map(|s| s.value)
        };
        assert_eq!(v("storaged_csi_calls_total", Some("ok")), Some(3.0));
        assert_eq!(v("storaged_csi_calls_total", Some("refused")), Some(1.0));
        assert_eq!(v("storaged_csi_call_seconds_total", None), Some(0.25));
    }

    #[test]
    fn no_pool_renders_present_0() {
        let text = render(None);
        assert!(text.contains("\nstoraged_pool_present 0\n"), "{text}");
    }
}
