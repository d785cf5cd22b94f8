//! What the downlink reports: the applied manifest, the download under way, failures.

use std::sync::atomic::{AtomicU64, Ordering};

/// Downlink counters for `/metrics`.
#[derive(Default)]
pub struct Status {
    pub applied: AtomicU64,
    pub refused: AtomicU64,
    /// Object and KV bytes fetched from the core.
    pub fetched_bytes: AtomicU64,
    /// Bytes not fetched again because an interrupted download resumed after them.
    pub resumed_bytes: AtomicU64,
    /// The object download under way, for the status report.
    pub downloading: std::sync::Mutex<Option<Download>>,
}

impl Status {
    pub(super) fn set_downloading(&self, d: Option<Download>) {
        *edge_common::lock(&self.downloading) = d;
    }

    /// What the box reports of its downlink (`BoxStatus::downlink`).
    pub fn report(&self) -> DownlinkReport {
        DownlinkReport {
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            resumed_bytes: self.resumed_bytes.load(Ordering::Relaxed),
            downloading: edge_common::lock(&self.downloading).clone(),
        }
    }
}

/// An object download under way: `bytes` of `size` are on disk.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Download {
    pub kind: String,
    pub name: String,
    pub bytes: u64,
    pub size: u64,
}

/// The downlink in the box's status report: bytes fetched from the core since fabricd
/// started, bytes a resumed download did not fetch again, and the download under way.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DownlinkReport {
    pub fetched_bytes: u64,
    pub resumed_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloading: Option<Download>,
}
