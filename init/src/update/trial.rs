//! The trial boot: what this boot is to an update, and the verdict on it (every service
//! healthy within the limit, or not).

use std::time::{Duration, Instant};

use super::slots::{Installed, Running};
use super::state::{Phase, State};
use crate::error::{Error, Result};

/// What this boot is to an update, decided once /var is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootRole {
    /// No update is in flight.
    Normal,
    /// The trial of a new slot: it must be ready by the deadline.
    Trial { version: String, slot: String },
    /// Back on the old slot after a failed trial (the reason is in the state).
    RolledBack { version: String, reason: String },
    /// An install was cut off; the bundle is looked at again.
    Interrupted { version: String },
    /// An update is installed with its entry held back until its window: this boot is
    /// the old slot's, as it should be, and the wait goes on.
    Staged { version: String, slot: String },
}

/// Moves the state on for this boot: an installed update booted is now trying; one that
/// was installed or trying while another slot booted has rolled back.
pub fn on_boot(state: &mut State, running: &Running, now_ms: u64) -> BootRole {
    let Some(u) = state.update.as_mut() else {
        return BootRole::Normal;
    };
    let this_one = u.version == running.version && u.slot == running.slot;
    match u.phase {
        Phase::Installed if !this_one && u.window.is_some() => BootRole::Staged {
            version: u.version.clone(),
            slot: u.slot.clone(),
        },
        Phase::Installed | Phase::Trying if this_one => {
            u.phase = Phase::Trying;
            u.time_ms = now_ms;
            BootRole::Trial {
                version: u.version.clone(),
                slot: u.slot.clone(),
            }
        }
        Phase::Installed | Phase::Trying => {
            let reason = u.reason.clone().unwrap_or_else(|| {
                format!(
                    "slot {} ({}) did not come up; boot counting went back to slot {}",
                    u.slot, u.version, running.slot
                )
            });
            u.phase = Phase::RolledBack;
            u.reason = Some(reason.clone());
            u.time_ms = now_ms;
            let version = u.version.clone();
            state.end();
            BootRole::RolledBack { version, reason }
        }
        Phase::Installing => BootRole::Interrupted {
            version: u.version.clone(),
        },
        Phase::Blessed | Phase::RolledBack | Phase::Refused | Phase::Cancelled => BootRole::Normal,
    }
}

/// What the services say, each turn, as the trial's verdict needs it.
#[derive(Debug, Default)]
pub struct Health {
    /// Every service is ready (the box said `ready`).
    pub ready: bool,
    /// Services given up (once the box settled degraded).
    pub given_up: Vec<String>,
    /// Services with a `health` that have not said it holds, as `name (what)`.
    pub unhealthy: Vec<String>,
}

/// The trial's verdict, each turn: `Some(Ok)` blessed, `Some(Err(reason))` failed.
pub fn judge(h: &Health, started: Instant, limit: Duration) -> Option<Result<()>> {
    let failed = |detail: String| Some(Err(Error::Trial { detail }));
    if h.ready && h.unhealthy.is_empty() {
        Some(Ok(()))
    } else if !h.given_up.is_empty() {
        failed(format!("given up: {}", h.given_up.join(", ")))
    } else if started.elapsed() < limit {
        None
    } else if !h.ready {
        failed(format!(
            "not every service was ready within {} s",
            limit.as_secs()
        ))
    } else {
        failed(format!(
            "not healthy within {} s: {}",
            limit.as_secs(),
            h.unhealthy.join(", ")
        ))
    }
}

/// An install's end: the state to keep, and what it did (`None`: the running version).
pub(super) type Outcome = (State, Result<Option<Installed>>);
