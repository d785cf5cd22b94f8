//! Where manifests come from: the image's static directory, the site's, the core's
//! (fabricd's downlink) and the API server's cache; each file known by a key, hashed,
//! and ranked when two sources define one pod.

use std::collections::BTreeMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::Reconciler;

/// A file a manifests directory's pod comes from: `*.yaml` or `*.yml`, not a dot file
/// (fabricd's partial downloads, editors' temporary files).
pub fn is_manifest_file(name: &str) -> bool {
    (name.ends_with(".yaml") || name.ends_with(".yml")) && !name.starts_with('.')
}

/// A manifest file found by a scan.
pub(super) struct Scanned {
    /// The file's path, for messages.
    pub(super) path: String,
    pub(super) hash: String,
    pub(super) text: String,
}

/// The key under which files of the downlink directory are known (status, labels).
const DOWNLINK_PREFIX: &str = "downlink/";
/// The key under which files of the site's provisioned directory are known.
const SITE_PREFIX: &str = "site/";
/// The key under which the Kubernetes API server's pods (its cache directory) are known.
pub const API_PREFIX: &str = "api/";

/// Which source wins when two define a pod in the same pass: the image's, then the
/// site's, then the core's, then the API server's.
pub(super) fn source_rank(key: &str) -> u8 {
    if key.starts_with(API_PREFIX) {
        3
    } else if key.starts_with(DOWNLINK_PREFIX) {
        2
    } else if key.starts_with(SITE_PREFIX) {
        1
    } else {
        0
    }
}

pub(super) fn manifest_hash(file: &str, text: &str) -> String {
    let mut h = Sha256::new();
    h.update(file.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Reconciler {
    /// Manifest files of all sources by key (the file name; `site/<name>` and
    /// `downlink/<name>` for those directories'), with their hash and text. Unreadable
    /// files and directories are logged and their pods, if any, keep their last state
    /// until they read again; a site or downlink directory that does not exist (yet)
    /// has no pods.
    pub(super) fn scan(&self) -> BTreeMap<String, Scanned> {
        let mut out = BTreeMap::new();
        self.scan_dir(&self.settings.manifests_dir, "", &mut out);
        if let Some(dir) = &self.settings.site_manifests_dir {
            self.scan_dir(dir, SITE_PREFIX, &mut out);
        }
        if let Some(dir) = &self.settings.downlink_manifests_dir {
            self.scan_dir(dir, DOWNLINK_PREFIX, &mut out);
        }
        if let Some(dir) = &self.settings.api_manifests_dir {
            self.scan_dir(dir, API_PREFIX, &mut out);
        }
        out
    }

    fn scan_dir(&self, dir: &Path, prefix: &str, out: &mut BTreeMap<String, Scanned>) {
        // File names have no '/': only the other sources' keys do.
        let ours = |key: &String| match prefix {
            "" => !key.contains('/'),
            p => key.starts_with(p),
        };
        let keep = |out: &mut BTreeMap<String, Scanned>, key: &String, source: &str, hash: &str| {
            out.insert(
                key.clone(),
                Scanned {
                    path: source.to_string(),
                    hash: hash.to_string(),
                    text: String::new(),
                },
            );
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !prefix.is_empty() => return,
            Err(e) => {
                tracing::warn!("failed to read manifests directory {}: {e}", dir.display());
                for (key, run) in self.pods.iter().filter(|(k, _)| ours(k)) {
                    keep(out, key, &run.source, &run.hash);
                }
                for (key, b) in self.busy.iter().filter(|(k, _)| ours(k)) {
                    keep(out, key, &b.source, &b.hash);
                }
                return;
            }
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !is_manifest_file(&name) {
                continue;
            }
            let key = format!("{prefix}{name}");
            match std::fs::read_to_string(entry.path()) {
                Ok(text) => {
                    let hash = manifest_hash(&key, &text);
                    let path = entry.path().display().to_string();
                    out.insert(key, Scanned { path, hash, text });
                }
                Err(e) => {
                    tracing::warn!("failed to read {}: {e}", entry.path().display());
                    if let Some(run) = self.pods.get(&key) {
                        keep(out, &key, &run.source, &run.hash);
                    } else if let Some(b) = self.busy.get(&key) {
                        keep(out, &key, &b.source, &b.hash);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_changes_with_the_manifest_and_its_file() {
        let a = manifest_hash("a.yaml", "x");
        assert_eq!(a.len(), 16);
        assert_eq!(a, manifest_hash("a.yaml", "x"));
        assert_ne!(a, manifest_hash("a.yaml", "y"));
        assert_ne!(a, manifest_hash("b.yaml", "x"));
    }
}
