//! What the box knows about updates ([`super::STATE`], on the data partition): each
//! attempt's phase, and the bundles that ended.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The inactive slot is being written (a boot that finds this was cut off).
    Installing,
    /// Written; the next boot tries it.
    Installed,
    /// This boot (or the last) is the new slot's trial.
    Trying,
    /// The trial passed: the new slot is the default.
    Blessed,
    /// The trial failed and the box is back on the old slot.
    RolledBack,
    /// The bundle was refused before the slot was touched, or its install failed.
    Refused,
    /// The core withdrew the bundle (`edgectl update cancel`) while the slot was written
    /// or before its window: the new slot's entry is gone again, and the box stays
    /// where it is.
    Cancelled,
}

/// One update, from the bundle seen to its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub phase: Phase,
    /// The bundle's file name and what identifies this copy of it (size, mtime).
    pub bundle: String,
    pub bundle_id: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub security_version: u64,
    #[serde(default)]
    pub slot: String,
    pub from_version: String,
    pub from_slot: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Installed and waiting for the bundle's window (`HH:MM-HH:MM`, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    pub time_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The lowest security version this box installs: raised when an update is blessed,
    /// never lowered.
    #[serde(default)]
    pub security_floor: u64,
    /// What the TPM's security counter read before this box first counted it (its
    /// first count starts past any counter the TPM ever had): the floor in the TPM is
    /// the counter less this. Unknown (a data partition made anew) counts as 0, which
    /// only raises the floor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_counter_base: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Attempt>,
    /// Bundles whose attempt ended (`<file>:<copy id>`, the latest few): not looked at
    /// again while that copy is there, so a version that rolled back is not retried
    /// until the core sends it anew.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ended: Vec<String>,
}

/// How many ended bundles the state remembers.
pub(super) const ENDED_KEPT: usize = 32;

impl State {
    /// Marks the current attempt's bundle as ended.
    pub fn end(&mut self) {
        if let Some(u) = &self.update {
            let id = format!("{}:{}", u.bundle, u.bundle_id);
            if !self.ended.contains(&id) {
                self.ended.push(id);
            }
            let over = self.ended.len().saturating_sub(ENDED_KEPT);
            self.ended.drain(..over);
        }
    }

    pub fn load(path: &Path) -> State {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Written whole (temp file, fsync, rename, directory fsync): a power cut leaves the
    /// old state or the new one.
    pub fn save(&self, path: &Path) -> crate::error::Result<()> {
        use crate::error::Error;
        let body = serde_json::to_vec_pretty(self).map_err(Error::io("serialize", path))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        }
        crate::provision::write_atomic(path, &body, 0o644).map_err(Error::io("write", path))
    }
}
