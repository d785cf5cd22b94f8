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

/// This process's memory locked in (`VmLck`; PID 1 locks its pages, watchdog.rs).
fn locked_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    field_kib(&text, "VmLck:")
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
    /// When stage 1 began (the kernel's uptime then: the kernel's own share of the boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage1_start_ms: Option<u64>,
    /// Stage 1's time, and the part of it spent on the TPM and the unlock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage1_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_ms: Option<u64>,
    /// The uptime when stage 2 had set up (mounts, modules, network, ...) and started
    /// the services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_start_ms: Option<u64>,
}

fn clean_unless_told() -> bool {
    true
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
        "init_locked_kib": locked_kib(),
        "stage1_start_ms": boot.stage1_start_ms,
        "stage1_ms": boot.stage1_ms,
        "services_start_ms": boot.services_start_ms,
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
