//! The numbers in the `status` reply: memory from /proc/meminfo, resident set sizes from
//! /proc/<pid>/status, and the assembly of the status object (docs/contracts.md).

use serde_json::{json, Value};

/// `(MemTotal, MemAvailable)` in KiB.
pub fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    (
        field_kib(&text, "MemTotal:").unwrap_or(0),
        field_kib(&text, "MemAvailable:").unwrap_or(0),
    )
}

/// Every `Key: N kB` line of /proc/meminfo, in KiB: with no shell on the box, this is
/// how an operator sees where the memory went.
pub fn meminfo_all() -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (key, rest) = l.split_once(':')?;
            let n: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((key.to_owned(), Value::from(n)))
        })
        .collect()
}

/// A `Key:   123 kB` field of a /proc file, in KiB.
pub fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// VmRSS of a process; `None` for a process that is gone (or a kernel thread).
pub fn rss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field_kib(&text, "VmRSS:")
}

/// What stage 1 learned of this boot: it writes it as `/run/edge/boot.json` (which
/// fabricd reads the running version from, docs/contracts.md) and stage 2 reads it back
/// for the status object.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Boot {
    pub slot: String,
    pub version: String,
    #[serde(default)]
    pub data_formatted: bool,
    #[serde(default = "clean_unless_told")]
    pub data_clean: bool,
    /// Why the data partition stayed closed (the TPM refused its key, ...); stage 2 then
    /// keeps the services down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_locked: Option<String>,
    /// Stage 1's time, and the part of it spent on the TPM and the unlock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage1_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_ms: Option<u64>,
}

fn clean_unless_told() -> bool {
    true
}

/// How the previous boot ended, as far as this one can tell: the watchdog's own word
/// first, then whether the data partition was left mounted.
pub fn previous_boot(boot: &Boot, watchdog_reset: bool) -> &'static str {
    if watchdog_reset {
        "reset by the watchdog"
    } else if boot.data_locked.is_some() {
        "unknown"
    } else if boot.data_formatted {
        "none"
    } else if !boot.data_clean {
        "cut off: a power loss, a crash or a reset"
    } else {
        "shut down cleanly"
    }
}

/// What the box tells the core of its health, written by init to [`HEALTH_FILE`] on each
/// change (fabricd reports it, docs/contracts.md): a box nobody visits must say that it
/// is degraded, since when, and why.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HealthReport {
    pub ready: bool,
    /// Services given up after their crash-loop limit (retried later, restart.rs).
    pub failed: Vec<String>,
    /// When `failed` last went from empty to not (unix ms), while it is not empty.
    pub degraded_since_ms: Option<u64>,
    pub previous_boot: String,
    /// Sockets open to the network that system.toml's `network.listeners` does not
    /// declare (listeners.rs), as `tcp/0.0.0.0:22`.
    pub undeclared_listeners: Vec<String>,
    /// The verified root met a block that did not verify since boot (verity.rs).
    pub root_corrupt: bool,
}

pub const HEALTH_FILE: &str = "/run/edge/health.json";

impl HealthReport {
    /// Moves on to this turn's facts; `true` when anything the core should hear changed.
    pub fn update(
        &mut self,
        ready: bool,
        failed: Vec<String>,
        undeclared_listeners: &[String],
        root_corrupt: bool,
        now_ms: u64,
    ) -> bool {
        if ready == self.ready
            && failed == self.failed
            && undeclared_listeners == self.undeclared_listeners
            && root_corrupt == self.root_corrupt
        {
            return false;
        }
        self.root_corrupt = root_corrupt;
        self.undeclared_listeners = undeclared_listeners.to_vec();
        self.degraded_since_ms = match (failed.is_empty(), self.degraded_since_ms) {
            (true, _) => None,
            (false, Some(t)) => Some(t),
            (false, None) => Some(now_ms),
        };
        self.ready = ready;
        self.failed = failed;
        true
    }
}

/// `log_lines_dropped`: service output not kept since boot (logs.rs).
pub fn build(
    boot: &Boot,
    ready: bool,
    data_full: bool,
    log_lines_dropped: u64,
    services: Vec<Value>,
) -> Value {
    let (total, available) = meminfo();
    json!({
        "version": boot.version,
        "slot": boot.slot,
        "uptime_ms": crate::logs::uptime().as_millis() as u64,
        "ready": ready,
        "mem_total_kib": total,
        "mem_available_kib": available,
        "meminfo_kib": meminfo_all(),
        "init_rss_kib": rss_kib(std::process::id() as i32),
        "stage1_ms": boot.stage1_ms,
        "tpm_ms": boot.tpm_ms,
        "data": {"formatted": boot.data_formatted, "clean": boot.data_clean, "full": data_full,
                 "locked": boot.data_locked, "log_lines_dropped": log_lines_dropped},
        "services": services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_boot_is_told_from_the_watchdog_then_the_data_partition() {
        let boot = |formatted, clean, locked: Option<&str>| Boot {
            data_formatted: formatted,
            data_clean: clean,
            data_locked: locked.map(str::to_owned),
            ..Boot::default()
        };
        assert_eq!(
            previous_boot(&boot(false, false, None), true),
            "reset by the watchdog"
        );
        assert_eq!(previous_boot(&boot(true, true, None), false), "none");
        assert_eq!(
            previous_boot(&boot(false, false, None), false),
            "cut off: a power loss, a crash or a reset"
        );
        assert_eq!(
            previous_boot(&boot(false, true, None), false),
            "shut down cleanly"
        );
        assert_eq!(
            previous_boot(&boot(false, true, Some("tpm")), false),
            "unknown"
        );
    }

    #[test]
    fn health_changes_are_seen_once_and_degraded_keeps_its_start() {
        let mut h = HealthReport::default();
        assert!(!h.update(false, vec![], &[], false, 1), "nothing changed");
        assert!(h.update(true, vec![], &[], false, 2));
        assert_eq!(h.degraded_since_ms, None);
        assert!(h.update(false, vec!["fabricd".into()], &[], false, 3));
        assert_eq!(h.degraded_since_ms, Some(3));
        assert!(!h.update(false, vec!["fabricd".into()], &[], false, 4));
        assert!(h.update(false, vec!["fabricd".into(), "noded".into()], &[], false, 5));
        assert_eq!(
            h.degraded_since_ms,
            Some(3),
            "still degraded since the first failure"
        );
        assert!(h.update(true, vec![], &[], false, 6));
        assert_eq!((h.ready, h.degraded_since_ms), (true, None));
        let door = ["tcp/0.0.0.0:22".to_string()];
        assert!(
            h.update(true, vec![], &door, false, 7),
            "a new listener is news"
        );
        assert!(!h.update(true, vec![], &door, false, 8));
        assert_eq!(h.undeclared_listeners, door);
        assert!(
            h.update(true, vec![], &door, true, 9),
            "a corrupt root is news"
        );
    }

    #[test]
    fn meminfo_fields_parse() {
        let text = "MemTotal:        2014880 kB\nMemFree:  1 kB\nMemAvailable:    1800000 kB\n";
        assert_eq!(field_kib(text, "MemTotal:"), Some(2014880));
        assert_eq!(field_kib(text, "MemAvailable:"), Some(1800000));
        assert_eq!(field_kib(text, "Cached:"), None);
    }

    #[test]
    fn own_rss_is_reported() {
        assert!(rss_kib(std::process::id() as i32).is_some_and(|k| k > 0));
    }
}
