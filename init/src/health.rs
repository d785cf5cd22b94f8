//! What the box says of its own health, to the control port's status and to the core:
//! how the previous boot ended, the services given up and since when, what listens on
//! the network undeclared (listeners.rs), and a verified root that met a bad block. Stage
//! 2 keeps a [`Watch`]; it writes [`HEALTH_FILE`] whenever the report changes (on /run:
//! no disk to wait for in the loop that pets the watchdog), and fabricd sends it to the
//! core with each status report (docs/contracts.md).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::listeners::{self, Listener};
use crate::status::Boot;

pub const HEALTH_FILE: &str = "/run/edge/health.json";

/// How often the root's verity status and the listeners are looked at.
const LOOK_EVERY: Duration = Duration::from_secs(10);

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

/// Stage 2's side of the health report: what it looked at last, and the report.
pub struct Watch {
    pub previous_boot: &'static str,
    report: HealthReport,
    /// Written at least once: the first [`Watch::tell`] writes the file whatever it holds.
    told: bool,
    listening: Vec<Listener>,
    undeclared: Vec<String>,
    root_corrupt: bool,
    last_look: Option<Instant>,
}

impl Watch {
    pub fn new(previous_boot: &'static str) -> Watch {
        Watch {
            previous_boot,
            report: HealthReport {
                previous_boot: previous_boot.into(),
                ..Default::default()
            },
            told: false,
            listening: Vec::new(),
            undeclared: Vec::new(),
            root_corrupt: false,
            last_look: None,
        }
    }

    /// Every 10 s: the root's verity status (`/dev`) and the listeners (`/proc/net`)
    /// against `declared`. Returns the warnings to give, each once when it appears.
    pub fn look(&mut self, slot: &str, declared: &[String]) -> Vec<String> {
        if self.last_look.is_some_and(|t| t.elapsed() < LOOK_EVERY) {
            return Vec::new();
        }
        self.last_look = Some(Instant::now());
        let mut warnings = Vec::new();
        if !self.root_corrupt && crate::verity::root_is_corrupt(Path::new("/dev")) {
            self.root_corrupt = true;
            // Not a reboot: the next boot's stage 1 may never read the block, and a loop
            // of boots would lose what still runs. The core hears of it.
            warnings.push(format!(
                "dm-verity: root-{slot} failed verification (a block read since boot did not \
                 verify; what read it failed): slot {slot} needs a new copy (an update)"
            ));
        }
        self.listening = listeners::open_to_the_network(Path::new("/proc/net"));
        let undeclared: Vec<String> = listeners::undeclared(&self.listening, declared)
            .iter()
            .map(|l| l.to_string())
            .collect();
        for l in undeclared.iter().filter(|l| !self.undeclared.contains(l)) {
            warnings.push(format!(
                "{l} listens on the network and system.toml's network.listeners does not declare it"
            ));
        }
        self.undeclared = undeclared;
        warnings
    }

    /// This turn's readiness and services given up: the health file is rewritten when
    /// anything in the report changed, and on the first call. A failed write is returned.
    pub fn tell(&mut self, ready: bool, failed: Vec<String>, now_ms: u64) -> Option<String> {
        let changed =
            self.report
                .update(ready, failed, &self.undeclared, self.root_corrupt, now_ms);
        if !changed && self.told {
            return None;
        }
        self.told = true;
        let path = Path::new(HEALTH_FILE);
        serde_json::to_vec(&self.report)
            .map_err(std::io::Error::other)
            .and_then(|body| crate::provision::write_atomic(path, &body, 0o644))
            .err()
            .map(|e| format!("failed to write {}: {e}", path.display()))
    }

    /// Its fields in the control port's status object.
    pub fn status_fields(&self, obj: &mut serde_json::Map<String, serde_json::Value>) {
        obj.insert("previous_boot".into(), self.previous_boot.into());
        obj.insert(
            "listening".into(),
            serde_json::json!({
                "open": self.listening.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
                "undeclared": &self.undeclared,
            }),
        );
        obj.insert("root_corrupt".into(), self.root_corrupt.into());
    }
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
}
