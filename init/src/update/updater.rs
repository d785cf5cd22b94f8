//! The updates' part of PID 1's loop: the trial's verdict, windows, and installs one at
//! a time on a thread of their own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::say;

use super::floor::keep_floor_in_tpm;
use super::install::{attempt, sync_dir};
use super::slots::{
    bundle_id, entry_name, held_entry, next_bundle, other_slot, Installed, Running,
};
use super::state::{Phase, State};
use super::trial::{judge, on_boot, BootRole, Health, Outcome};
use super::STATE;

/// The updates' part of PID 1's loop: the trial's verdict, and installs, one at a time
/// on a thread of their own (a bundle is checked and copied in full: seconds).
pub struct Updater {
    config: crate::config::Update,
    running: Running,
    state_file: PathBuf,
    role: BootRole,
    started: Instant,
    judged: bool,
    last_look: Option<Instant>,
    job: Option<std::sync::mpsc::Receiver<Outcome>>,
    /// Bundles of the running version, seen once: not opened again.
    skipped: Vec<String>,
    /// An installed update waiting for its window.
    waiting: Option<Waiting>,
}

/// An update written into the inactive slot whose bundle has a window: the box reboots
/// into it when the window opens (or the core publishes it again without one), or
/// drops it if the core withdraws the bundle first.
pub(super) struct Waiting {
    bundle: PathBuf,
    installed: Installed,
}

/// Marks bad the entries of `slot` whose release is below `floor` (below_floor.rs), on a
/// thread of its own: the UKIs are read from the ESP, which PID 1's loop never waits on.
fn mark_below_floor_in_background(slot: String, floor: u64) {
    let spawned = std::thread::Builder::new()
        .name("floor".into())
        .spawn(move || {
            let marked = crate::esp::with_esp(|esp| {
                super::below_floor::mark_below(&esp.join("EFI/Linux"), &slot, floor)
            })
            .and_then(|r| r);
            match marked {
                Ok(marked) => {
                    for (entry, sv) in marked {
                        say!(
                            "update: slot {slot}'s {entry} has security version {sv}, below the floor {floor}: marked bad, it is not booted again"
                        );
                    }
                }
                Err(e) => say!("warning: update: marking slot {slot}'s entries below the floor: {e}"),
            }
        });
    if let Err(e) = spawned {
        say!("warning: update: marking the entries below the floor: no thread: {e}");
    }
}

/// The window fabricd wrote beside a bundle (`<bundle>.window`); none without one. A
/// window init cannot read is none (fabricd checked it): the update is tried at once.
pub(super) fn window_of(bundle: &Path) -> Option<edge_update::window::Window> {
    let mut path = bundle.as_os_str().to_owned();
    path.push(".window");
    let text = std::fs::read_to_string(PathBuf::from(path)).ok()?;
    match edge_update::window::Window::parse(&text) {
        Ok(w) => Some(w),
        Err(e) => {
            say!("warning: update: {e}; trying it at once");
            None
        }
    }
}

impl Updater {
    /// Moves the state on for this boot and says what this boot is to an update.
    pub fn start(config: crate::config::Update, running: Running) -> Updater {
        let state_file = PathBuf::from(STATE);
        let mut state = State::load(&state_file);
        let role = on_boot(&mut state, &running, unix_ms());
        // The ESP is mounted to read it: not on PID 1's thread, which pets the watchdog.
        let told = running.clone();
        std::thread::spawn(move || super::install::tell_other_slot(&told));
        match &role {
            BootRole::Normal => {}
            BootRole::Trial { version, slot } => say!(
                "update: trying {version} in slot {slot}: every service must be ready and healthy within {} s",
                config.health_limit_s
            ),
            BootRole::RolledBack { version, reason } => say!(
                "update: rolled back from {version} to {} in slot {}: {reason}",
                running.version,
                running.slot
            ),
            BootRole::Interrupted { version } => {
                say!("update: the install of {version} was cut off; it starts again")
            }
            BootRole::Staged { version, slot } => say!(
                "update: {version} is staged in slot {slot} for its window {} UTC (its entry held back)",
                state.update.as_ref().and_then(|u| u.window.as_deref()).unwrap_or("?")
            ),
        }
        // A staged update goes on waiting for its window.
        let waiting = match (&role, &state.update) {
            (BootRole::Staged { version, slot }, Some(u)) => Some(Waiting {
                bundle: config.bundles.join(&u.bundle),
                installed: Installed {
                    version: version.clone(),
                    slot: slot.clone(),
                    entry: held_entry(&entry_name(version, slot, config.tries)),
                },
            }),
            _ => None,
        };
        if !matches!(role, BootRole::Normal | BootRole::Staged { .. }) {
            if let Err(e) = state.save(&state_file) {
                say!("warning: update: {e}");
            }
        }
        Updater {
            config,
            running,
            state_file,
            role,
            started: Instant::now(),
            judged: false,
            last_look: None,
            job: None,
            skipped: Vec::new(),
            waiting,
        }
    }

    /// The state as the box reports it (control `status`, and through fabricd the core).
    pub fn status(&self) -> serde_json::Value {
        serde_json::to_value(State::load(&self.state_file)).unwrap_or_default()
    }

    /// One turn: judge a trial, collect a finished install, or look for a bundle. A
    /// reboot to ask for is returned.
    pub fn step(&mut self, health: &Health) -> Option<crate::power::Action> {
        if let BootRole::Trial { version, slot } = &self.role {
            if !self.judged {
                let limit = Duration::from_secs(self.config.health_limit_s);
                let verdict = judge(health, self.started, limit)?;
                self.judged = true;
                let mut state = State::load(&self.state_file);
                let back = state
                    .update
                    .as_ref()
                    .map_or("the other slot".to_owned(), |u| {
                        format!("slot {}", u.from_slot)
                    });
                if let Some(u) = state.update.as_mut() {
                    u.time_ms = unix_ms();
                    match &verdict {
                        Ok(()) => {
                            u.phase = Phase::Blessed;
                            u.reason = None;
                            state.security_floor = state.security_floor.max(u.security_version);
                        }
                        Err(reason) => u.reason = Some(format!("the trial failed: {reason}")),
                    }
                }
                let mut in_tpm = String::new();
                if verdict.is_ok() {
                    in_tpm = match keep_floor_in_tpm(&mut state) {
                        Ok(counter) => format!(", the TPM's security counter at {counter}"),
                        Err(e) => format!(", kept on the data partition only: {e}"),
                    };
                    state.end();
                }
                if let Err(e) = state.save(&self.state_file) {
                    say!("warning: update: {e}");
                }
                return match verdict {
                    Ok(()) => {
                        say!(
                            "update: {version} in slot {slot} blessed (security floor {}{in_tpm})",
                            state.security_floor
                        );
                        let other = other_slot(slot).to_string();
                        mark_below_floor_in_background(other, state.security_floor);
                        None
                    }
                    Err(reason) => {
                        say!("update: {version} in slot {slot} failed its trial: {reason}; rebooting to go back to {back}");
                        Some(crate::power::Action::Reboot)
                    }
                };
            }
        }
        if let Some(w) = &self.waiting {
            let i = &w.installed;
            if !w.bundle.exists() {
                // Withdrawn before its window: the new slot's entry goes again.
                let removed = crate::esp::with_esp(|esp| {
                    let entries = esp.join("EFI/Linux");
                    std::fs::remove_file(entries.join(&i.entry))
                        .map_err(Error::io("remove", &i.entry))?;
                    sync_dir(&entries)
                })
                .and_then(|r| r);
                let reason = match removed {
                    Ok(()) => format!(
                        "the core withdrew it before its window; slot {}'s entry is removed",
                        i.slot
                    ),
                    Err(e) => format!("the core withdrew it before its window, but {e}"),
                };
                say!("update: {} cancelled: {reason}", i.version);
                let mut state = State::load(&self.state_file);
                if let Some(u) = state.update.as_mut() {
                    u.phase = Phase::Cancelled;
                    u.reason = Some(reason);
                    u.time_ms = unix_ms();
                }
                state.end();
                if let Err(e) = state.save(&self.state_file) {
                    say!("warning: update: {e}");
                }
                self.waiting = None;
                return None;
            }
            let why = match window_of(&w.bundle) {
                Some(window) if !window.contains(unix_ms() / 1000) => return None,
                Some(window) => format!("its window {window} UTC is open"),
                None => "the core lifted its window".to_owned(),
            };
            // The held entry is put in place: the next boot tries the new slot.
            if let Some(live) = i.entry.strip_suffix(".held") {
                let released = crate::esp::with_esp(|esp| {
                    let entries = esp.join("EFI/Linux");
                    std::fs::rename(entries.join(&i.entry), entries.join(live))
                        .map_err(Error::io_to("rename", &i.entry, "to", live))?;
                    sync_dir(&entries)
                })
                .and_then(|r| r);
                let mut state = State::load(&self.state_file);
                if let Some(u) = state.update.as_mut() {
                    u.time_ms = unix_ms();
                    match &released {
                        Ok(()) => {
                            u.window = None;
                            // Lifting a window publishes the bundle anew (a new copy):
                            // the trial is of that copy, which then ends with it.
                            if let Some(id) = bundle_id(&w.bundle) {
                                u.bundle_id = id;
                            }
                        }
                        Err(e) => {
                            u.phase = Phase::Refused;
                            u.reason = Some(format!(
                                "{why}, but its entry could not be put in place: {e}"
                            ));
                        }
                    }
                }
                if released.is_err() {
                    state.end();
                }
                if let Err(e) = state.save(&self.state_file) {
                    say!("warning: update: {e}");
                }
                if let Err(e) = released {
                    say!(
                        "update: {} refused: {why}, but its entry could not be put in place: {e}",
                        i.version
                    );
                    self.waiting = None;
                    return None;
                }
            }
            say!(
                "update: {why}: rebooting to try {} in slot {}",
                i.version,
                i.slot
            );
            self.waiting = None;
            return Some(crate::power::Action::Reboot);
        }
        if let Some(job) = &self.job {
            let (mut state, result) = match job.try_recv() {
                Ok(done) => done,
                Err(std::sync::mpsc::TryRecvError::Empty) => return None,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => (
                    State::load(&self.state_file),
                    Err(Error::Bundle {
                        detail: "the install thread ended without a word".into(),
                    }),
                ),
            };
            self.job = None;
            if let Ok(None) = result {
                return None;
            }
            if let Some(u) = state.update.as_mut() {
                u.time_ms = unix_ms();
                match &result {
                    Ok(_) => u.phase = Phase::Installed,
                    Err(e) => {
                        if u.phase != Phase::Cancelled {
                            u.phase = Phase::Refused;
                        }
                        u.reason = Some(e.to_string());
                    }
                }
            }
            if result.is_err() {
                state.end();
            }
            if let Err(e) = state.save(&self.state_file) {
                say!("warning: update: {e}");
            }
            return match result {
                Ok(Some(i)) => {
                    let bundle = self
                        .config
                        .bundles
                        .join(state.update.as_ref().map_or("", |u| u.bundle.as_str()));
                    if i.entry.ends_with(".held") {
                        let window = state
                            .update
                            .as_ref()
                            .and_then(|u| u.window.clone())
                            .unwrap_or_default();
                        say!(
                            "update: {} installed in slot {} ({}, held back); it is tried in its window {window} UTC",
                            i.version,
                            i.slot,
                            i.entry
                        );
                        self.waiting = Some(Waiting {
                            bundle,
                            installed: i,
                        });
                        return None;
                    }
                    say!(
                        "update: {} installed in slot {} ({}); rebooting to try it",
                        i.version,
                        i.slot,
                        i.entry
                    );
                    Some(crate::power::Action::Reboot)
                }
                Ok(None) => None,
                Err(e) => {
                    match state.update.as_ref() {
                        Some(u) if u.phase == Phase::Cancelled => {
                            say!("update: {} cancelled: {e}", u.version)
                        }
                        u => say!(
                            "update: refused {}: {e}",
                            u.map_or("", |u| u.bundle.as_str())
                        ),
                    }
                    None
                }
            };
        }
        // Only a ready boot installs, and not while its own trial is undecided.
        if !health.ready
            || self
                .last_look
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return None;
        }
        self.last_look = Some(Instant::now());
        let state = State::load(&self.state_file);
        let (path, id) = next_bundle(&self.config.bundles, &state)?;
        let name = path.file_name()?.to_string_lossy().into_owned();
        if self.skipped.contains(&format!("{name}:{id}")) {
            return None;
        }
        self.skipped.push(format!("{name}:{id}"));
        // The TPM's counter is read here, not on the install's thread: PID 1's loop reaps
        // every child, and edge-tpm must be waited for by whoever started it.
        let mut state = state;
        if let Err(e) = keep_floor_in_tpm(&mut state) {
            say!("warning: update: the security floor is read from the data partition only: {e}");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let (running, tries) = (self.running.clone(), self.config.tries);
        let state_file = self.state_file.clone();
        let spawned = std::thread::Builder::new()
            .name("update".into())
            .spawn(move || {
                let _ = tx.send(attempt(
                    &path,
                    &name,
                    &id,
                    &running,
                    state,
                    &state_file,
                    tries,
                ));
            });
        match spawned {
            Ok(_) => self.job = Some(rx),
            Err(e) => say!("warning: update: failed to start the install: {e}"),
        }
        None
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
