//! The boot's measurement logs, for the control port's `measurements` request: the
//! extends init made (PCR 11 phases, `edge-tpm`'s JSON lines) and the firmware's own TCG
//! event log (PCRs 0-7 and the stub's PCR 11 sections), so that a verifier can replay
//! the PCRs a quote reports.

use serde_json::{json, Value};

pub const SECURITYFS: &str = "/sys/kernel/security";
const FIRMWARE_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
/// Written by `edge-tpm` (`tpm/src/eventlog.rs`).
const OUR_LOG: &str = "/run/edge/tpm/events.jsonl";

pub fn read() -> Value {
    json!({
        "events": ours(OUR_LOG),
        "firmware_log": firmware(FIRMWARE_LOG),
    })
}

/// Our records, oldest first; a line that does not parse is kept as a string.
fn ours(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::from(l)))
        .collect()
}

/// The firmware's binary log (TCG PC Client format) in hex, or why there is none.
fn firmware(path: &str) -> Value {
    match std::fs::read(path) {
        Ok(bytes) => json!({"format": "tcg-pc-client", "bytes": bytes.len(),
                            "hex": crate::verity::hex(&bytes)}),
        Err(e) => json!({"error": format!("{path}: {e}")}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_logs_are_reported_and_absence_is_said() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("events.jsonl");
        std::fs::write(&log, "{\"recnum\":0,\"pcr\":11}\nnot json\n").unwrap();
        let v = ours(log.to_str().unwrap());
        assert_eq!(v[0]["pcr"], 11);
        assert_eq!(v[1], "not json");
        let fw = d.path().join("fw");
        std::fs::write(&fw, [0u8, 0xff]).unwrap();
        assert_eq!(firmware(fw.to_str().unwrap())["hex"], "00ff");
        let none = firmware("/nonexistent/log");
        assert!(none["error"].as_str().unwrap().contains("/nonexistent/log"));
    }
}
