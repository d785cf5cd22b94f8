//! Our own measurement log: one JSON object a line for every extend we make, in the
//! shape of the TCG canonical event log's JSON form (recnum, pcr, digests, content), so
//! a verifier can replay PCR 11 from the firmware's log, the stub's sections and these.

use std::io::Write;
use std::path::Path;

use crate::policy::hex;

/// Where init keeps it (tmpfs: rebuilt every boot, as the PCRs are).
pub const PATH: &str = "/run/edge/tpm/events.jsonl";

/// Appends one record: `pcr` extended with the SHA-256 `digest` of the string `event`.
pub fn append(path: &Path, pcr: u32, digest: &[u8; 32], event: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let recnum = std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0);
    let line = serde_json::json!({
        "recnum": recnum,
        "pcr": pcr,
        "digests": [{"hashAlg": "sha256", "digest": hex(digest)}],
        "content_type": "systemd",
        "content": {"string": event},
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}

/// The records of the log at `path`, in order (none when there is no log yet).
pub fn read(path: &Path) -> Result<Vec<serde_json::Value>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("failed to read {}: {e}", path.display())),
    };
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn records_are_numbered_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tpm/events.jsonl");
        super::append(&p, 11, &[1; 32], "enter-initrd").unwrap();
        super::append(&p, 11, &[2; 32], "leave-initrd").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1]["recnum"], 1);
        assert_eq!(recs[1]["content"]["string"], "leave-initrd");
        assert_eq!(recs[0]["digests"][0]["digest"], "01".repeat(32));
    }
}
