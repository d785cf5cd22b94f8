//! The Node's conditions as the box measures them: Ready, and memory, disk and process
//! ids under pressure at kubelet's default hard eviction thresholds, and the network
//! unavailable while the box has no address. Each keeps its lastTransitionTime across
//! the status patches, which replace the whole list.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use serde_json::{json, Value};

/// kubelet's default `nodefs.available<10%`, and the same share of process ids.
const AVAILABLE_MIN_PERCENT: u64 = 10;

/// Under these the box is under memory or disk pressure: the conditions say so and
/// noded evicts pods (eviction.rs). kubelet's default hard eviction thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `memory.available<100Mi`.
    pub memory_kib: u64,
    /// `nodefs.available<10%`.
    pub disk_percent: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            memory_kib: 100 * 1024,
            disk_percent: AVAILABLE_MIN_PERCENT,
        }
    }
}

/// The resource the box is short of (`memory`, `ephemeral-storage`) and the condition's
/// words, when memory or the data partition is under its threshold.
pub fn pressure(m: &Measured, t: &Thresholds) -> Option<(&'static str, String)> {
    readings(m, t)
        .into_iter()
        .find(|r| r.holds == Some(true) && matches!(r.kind, "MemoryPressure" | "DiskPressure"))
        .map(|r| {
            let resource = if r.kind == "MemoryPressure" {
                "memory"
            } else {
                "ephemeral-storage"
            };
            (resource, r.message)
        })
}

/// What the box is short of, measured now; `None` where it could not be read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measured {
    pub mem_available_kib: Option<u64>,
    /// Bytes available to unprivileged writers and in all, on the data partition.
    pub disk: Option<(u64, u64)>,
    /// Tasks (threads) that exist, and the most the kernel gives out.
    pub pids: Option<(u64, u64)>,
    pub has_address: bool,
}

impl Measured {
    /// `/proc/meminfo`, statvfs of `disk`, `/proc/loadavg` and `kernel.pid_max`.
    pub fn now(disk: &Path, has_address: bool) -> Measured {
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let tasks = loadavg
            .split_whitespace()
            .nth(3)
            .and_then(|f| f.split_once('/'))
            .and_then(|(_, total)| total.parse().ok());
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|t| t.trim().parse().ok());
        let disk = rustix::fs::statvfs(disk)
            .ok()
            .map(|st| (st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize));
        Measured {
            mem_available_kib: super::meminfo_kib("MemAvailable"),
            disk,
            pids: tasks.zip(pid_max),
            has_address,
        }
    }
}

/// One condition as measured: whether it holds (`None`: unknown), why, and in words.
struct Reading {
    kind: &'static str,
    holds: Option<bool>,
    reason: &'static str,
    message: String,
}

fn readings(m: &Measured, t: &Thresholds) -> Vec<Reading> {
    let percent = |avail: u64, total: u64| avail.saturating_mul(100) / total.max(1);
    let mut out = vec![Reading {
        kind: "Ready",
        holds: Some(true),
        reason: "KubeletReady",
        message: "noded is posting ready status".into(),
    }];
    out.push(match m.mem_available_kib {
        Some(k) if k < t.memory_kib => Reading {
            kind: "MemoryPressure",
            holds: Some(true),
            reason: "KubeletHasInsufficientMemory",
            message: format!(
                "{} MiB available, under {} MiB",
                k / 1024,
                t.memory_kib / 1024
            ),
        },
        Some(k) => Reading {
            kind: "MemoryPressure",
            holds: Some(false),
            reason: "KubeletHasSufficientMemory",
            message: format!("{} MiB available", k / 1024),
        },
        None => unknown("MemoryPressure", "/proc/meminfo has no MemAvailable"),
    });
    out.push(match m.disk {
        Some((avail, total)) if percent(avail, total) < t.disk_percent => Reading {
            kind: "DiskPressure",
            holds: Some(true),
            reason: "KubeletHasDiskPressure",
            message: format!(
                "{}% of the data partition available, under {}%",
                percent(avail, total),
                t.disk_percent
            ),
        },
        Some((avail, total)) => Reading {
            kind: "DiskPressure",
            holds: Some(false),
            reason: "KubeletHasNoDiskPressure",
            message: format!("{}% of the data partition available", percent(avail, total)),
        },
        None => unknown("DiskPressure", "the data partition could not be measured"),
    });
    out.push(match m.pids {
        Some((used, max)) if percent(max.saturating_sub(used), max) < AVAILABLE_MIN_PERCENT => {
            Reading {
                kind: "PIDPressure",
                holds: Some(true),
                reason: "KubeletHasInsufficientPID",
                message: format!("{used} of {max} process ids in use"),
            }
        }
        Some((used, max)) => Reading {
            kind: "PIDPressure",
            holds: Some(false),
            reason: "KubeletHasSufficientPID",
            message: format!("{used} of {max} process ids in use"),
        },
        None => unknown("PIDPressure", "the process count could not be read"),
    });
    out.push(if m.has_address {
        Reading {
            kind: "NetworkUnavailable",
            holds: Some(false),
            reason: "NodeHasAddress",
            message: "the box has an address on its uplink".into(),
        }
    } else {
        Reading {
            kind: "NetworkUnavailable",
            holds: Some(true),
            reason: "NodeHasNoAddress",
            message: "no interface but loopback has an IPv4 address".into(),
        }
    });
    out
}

fn unknown(kind: &'static str, why: &str) -> Reading {
    Reading {
        kind,
        holds: None,
        reason: "NodeStatusUnknown",
        message: why.into(),
    }
}

/// Each condition's status and since when it has had it, and the changes not yet told
/// as Node events.
#[derive(Default)]
pub struct Transitions {
    seen: Mutex<BTreeMap<&'static str, (&'static str, String)>>,
    /// (type, status) of each change, oldest first.
    untold: Mutex<Vec<(&'static str, &'static str)>>,
}

/// The Node event kubelet records when a condition takes a status: (warning, reason).
/// `NetworkUnavailable` and `Unknown` statuses have none.
pub fn event_for(kind: &str, status: &str) -> Option<(bool, &'static str)> {
    Some(match (kind, status) {
        ("Ready", "True") => (false, "NodeReady"),
        ("Ready", "False") => (true, "NodeNotReady"),
        ("MemoryPressure", "False") => (false, "NodeHasSufficientMemory"),
        ("MemoryPressure", "True") => (true, "NodeHasInsufficientMemory"),
        ("DiskPressure", "False") => (false, "NodeHasNoDiskPressure"),
        ("DiskPressure", "True") => (true, "NodeHasDiskPressure"),
        ("PIDPressure", "False") => (false, "NodeHasSufficientPID"),
        ("PIDPressure", "True") => (true, "NodeHasInsufficientPID"),
        _ => return None,
    })
}

impl Transitions {
    /// The conditions list for this measurement at `now`; a condition whose status
    /// changed (or is new) takes `now` as its transition time, or `first` on the very
    /// first list (when noded started).
    pub fn conditions(&self, m: &Measured, t: &Thresholds, now: &str, first: &str) -> Vec<Value> {
        let mut seen = edge_common::lock(&self.seen);
        let mut untold = edge_common::lock(&self.untold);
        let initial = seen.is_empty();
        readings(m, t)
            .into_iter()
            .map(|r| {
                let status = match r.holds {
                    Some(true) => "True",
                    Some(false) => "False",
                    None => "Unknown",
                };
                let since = match seen.get(r.kind) {
                    Some((s, t)) if *s == status => t.clone(),
                    _ => {
                        let t = if initial { first } else { now }.to_string();
                        seen.insert(r.kind, (status, t.clone()));
                        untold.push((r.kind, status));
                        t
                    }
                };
                json!({
                    "type": r.kind,
                    "status": status,
                    "reason": r.reason,
                    "message": r.message,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": since,
                })
            })
            .collect()
    }

    /// The changes since the last call (the first call: every condition's status).
    pub fn take_untold(&self) -> Vec<(&'static str, &'static str)> {
        std::mem::take(&mut *edge_common::lock(&self.untold))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Measured {
        Measured {
            mem_available_kib: Some(1 << 20),
            disk: Some((50 << 30, 100 << 30)),
            pids: Some((200, 4_194_304)),
            has_address: true,
        }
    }

    fn status_of(list: &[Value], kind: &str) -> (String, String, String) {
        let c = list.iter().find(|c| c["type"] == kind).unwrap();
        (
            c["status"].as_str().unwrap().into(),
            c["reason"].as_str().unwrap().into(),
            c["lastTransitionTime"].as_str().unwrap().into(),
        )
    }

    const PRESSURES: [&str; 4] = [
        "MemoryPressure",
        "DiskPressure",
        "PIDPressure",
        "NetworkUnavailable",
    ];

    #[test]
    fn each_pressure_is_judged_at_kubelets_thresholds() {
        let t = Transitions::default();
        let list = t.conditions(&healthy(), &Thresholds::default(), "t1", "t0");
        let kinds: Vec<&str> = list.iter().map(|c| c["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Ready",
                "MemoryPressure",
                "DiskPressure",
                "PIDPressure",
                "NetworkUnavailable"
            ]
        );
        for kind in PRESSURES {
            assert_eq!(status_of(&list, kind).0, "False", "{kind}");
        }
        let short = Measured {
            mem_available_kib: Some(99 * 1024),
            disk: Some((9 << 30, 100 << 30)),
            pids: Some((3_800_000, 4_194_304)),
            has_address: false,
        };
        let list = Transitions::default().conditions(&short, &Thresholds::default(), "t1", "t0");
        assert_eq!(
            status_of(&list, "MemoryPressure").1,
            "KubeletHasInsufficientMemory"
        );
        assert_eq!(status_of(&list, "DiskPressure").1, "KubeletHasDiskPressure");
        assert_eq!(
            status_of(&list, "PIDPressure").1,
            "KubeletHasInsufficientPID"
        );
        for kind in PRESSURES {
            assert_eq!(status_of(&list, kind).0, "True", "{kind}");
        }
        let blind = Measured::default();
        let list = Transitions::default().conditions(&blind, &Thresholds::default(), "t1", "t0");
        assert_eq!(status_of(&list, "MemoryPressure").0, "Unknown");
        assert_eq!(status_of(&list, "DiskPressure").0, "Unknown");
    }

    #[test]
    fn each_change_is_told_once_as_the_node_event_kubelet_records() {
        let t = Transitions::default();
        t.conditions(&healthy(), &Thresholds::default(), "t1", "t0");
        let first = t.take_untold();
        assert!(first.contains(&("Ready", "True")), "{first:?}");
        assert!(first.contains(&("MemoryPressure", "False")), "{first:?}");
        t.conditions(&healthy(), &Thresholds::default(), "t2", "t0");
        assert!(t.take_untold().is_empty(), "no change, nothing to tell");
        let mut full = healthy();
        full.disk = Some((3 << 30, 100 << 30));
        t.conditions(&full, &Thresholds::default(), "t3", "t0");
        assert_eq!(t.take_untold(), [("DiskPressure", "True")]);
        assert_eq!(
            event_for("DiskPressure", "True"),
            Some((true, "NodeHasDiskPressure"))
        );
        assert_eq!(event_for("Ready", "True"), Some((false, "NodeReady")));
        assert_eq!(event_for("NetworkUnavailable", "False"), None);
        assert_eq!(event_for("Ready", "Unknown"), None);
    }

    #[test]
    fn a_transition_time_moves_only_when_the_status_does() {
        let t = Transitions::default();
        let list = t.conditions(&healthy(), &Thresholds::default(), "t1", "t0");
        assert_eq!(
            status_of(&list, "DiskPressure").2,
            "t0",
            "the first list: start"
        );
        let list = t.conditions(&healthy(), &Thresholds::default(), "t2", "t0");
        assert_eq!(status_of(&list, "DiskPressure").2, "t0");
        assert_eq!(list[0]["lastHeartbeatTime"], "t2");
        let full = Measured {
            disk: Some((1 << 30, 100 << 30)),
            ..healthy()
        };
        let list = t.conditions(&full, &Thresholds::default(), "t3", "t0");
        assert_eq!(
            status_of(&list, "DiskPressure"),
            ("True".into(), "KubeletHasDiskPressure".into(), "t3".into())
        );
        assert_eq!(status_of(&list, "MemoryPressure").2, "t0", "unchanged");
        let list = t.conditions(&healthy(), &Thresholds::default(), "t4", "t0");
        assert_eq!(status_of(&list, "DiskPressure").2, "t4");
    }
}
