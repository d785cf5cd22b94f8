//! Over-the-air updates on the box (docs/update.md): installing a bundle into the
//! inactive slot, trying it once, and blessing it or falling back. The slot logic lives
//! here and nowhere else; fabricd only downloads bundles (its downlink, kind `updates`)
//! into [`crate::config::Update::bundles`].
//!
//! The order keeps a bootable default at every moment: the inactive slot's boot entries
//! go first (so nothing boots a half-written slot), then its root and verity partitions
//! are written from a bundle that passed every check (and are hashed again as they are
//! copied), then its UKI lands under a temporary name and is renamed to
//! `edgeos-<version>-<slot>+<tries>.efi`. The running slot is never written. systemd-boot
//! sorts the new, newer entry first while it has tries; the trial boot is blessed once
//! every service is ready within the health limit, or it reboots, and with no tries left
//! the old slot's entry comes first again. What happened is kept in [`STATE`] on the data
//! partition, which fabricd reports to the core.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::say;

/// The image's name: the UKIs are `<NAME>-<version>-<slot>...efi`.
pub const NAME: &str = "edgeos";
/// The update key's public half, from the image (64 hex digits, Ed25519).
pub const UPDATE_KEY: &str = "/etc/edge/update-ed25519.pub";
/// What the box knows about updates, on the data partition.
pub const STATE: &str = "/var/lib/edge/update/state.json";

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
const ENDED_KEPT: usize = 32;

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
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let body = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
        }
        crate::provision::write_atomic(path, &body, 0o644)
            .map_err(|e| format!("failed to write {}: {e}", path.display()))
    }
}

/// The floor kept by both the state (`state_floor`) and the TPM's counter (`counter`
/// less `base`): the higher of the two, and what to raise the counter to when it is
/// behind.
pub fn floor_with_counter(state_floor: u64, base: u64, counter: u64) -> (u64, Option<u64>) {
    let in_tpm = counter.saturating_sub(base);
    let floor = state_floor.max(in_tpm);
    (floor, (in_tpm < floor).then(|| base.saturating_add(floor)))
}

/// Brings the state's security floor and the TPM's security counter (tpm/src/counter.rs)
/// to the higher of the two, counting the TPM's up, defining it on first use. Returns the
/// counter's value. The state is the caller's to save. Runs edge-tpm: PID 1's thread
/// only (its loop reaps every child, so another thread's wait would find none).
fn keep_floor_in_tpm(state: &mut State) -> Result<u64, String> {
    let counter = match crate::sealed_data::security_counter(None)? {
        Some(c) => c,
        None => {
            let first = crate::sealed_data::security_counter(Some(0))?
                .ok_or("edge-tpm counted the security counter up and printed no value")?;
            state.tpm_counter_base = Some(first.saturating_sub(1));
            first
        }
    };
    let base = state.tpm_counter_base.unwrap_or(0);
    let (floor, raise) = floor_with_counter(state.security_floor, base, counter);
    state.security_floor = floor;
    match raise {
        Some(to) => crate::sealed_data::security_counter(Some(to))?
            .ok_or_else(|| "edge-tpm raised the security counter and printed no value".into()),
        None => Ok(counter),
    }
}

/// The slot that is not `running`.
pub fn other_slot(running: &str) -> &'static str {
    if running == "a" {
        "b"
    } else {
        "a"
    }
}

/// Compares versions part by part on `.`, `-` and `+`, numerically where both parts are
/// numbers (`0.10.0` is newer than `0.9.1`).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (pa, pb): (Vec<&str>, Vec<&str>) = (
        a.split(['.', '-', '+']).collect(),
        b.split(['.', '-', '+']).collect(),
    );
    for (x, y) in pa.iter().zip(&pb) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// The running system, as far as updates care.
#[derive(Debug, Clone)]
pub struct Running {
    pub version: String,
    pub slot: String,
}

/// What an install left behind, for the line and the reboot.
#[derive(Debug)]
pub struct Installed {
    pub version: String,
    pub slot: String,
    pub entry: String,
}

/// Identifies one copy of a bundle file: a new download (the core published it again)
/// is a new copy.
pub fn bundle_id(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(format!("{}:{}:{}", m.len(), m.mtime(), m.mtime_nsec()))
}

/// The next bundle worth a look in `dir`: a `*.bundle` or `*.delta` file whose copy is not
/// in `ended` (refused, rolled back or blessed: every ending calls [`State::end`]). An
/// install cut off by a power loss is looked at again.
pub fn next_bundle(dir: &Path, state: &State) -> Option<(PathBuf, String)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| (n.ends_with(".bundle") || n.ends_with(".delta")) && !n.starts_with('.'))
        .collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let path = dir.join(&name);
        let id = bundle_id(&path)?;
        (!state.ended.contains(&format!("{name}:{id}"))).then_some((path, id))
    })
}

/// The checks made on the signed manifest alone, before the rest of the bundle is read:
/// the product, the version against the running one, the security version against the
/// floor. `Ok(false)`: the bundle is the running version (nothing to do).
pub fn admit(m: &edge_update::Manifest, running: &Running, floor: u64) -> Result<bool, String> {
    if m.name != NAME {
        return Err(format!("it updates {:?}, and this box runs {NAME}", m.name));
    }
    if m.security_version < floor {
        return Err(format!(
            "its security version {} is below the lowest this box accepts ({floor})",
            m.security_version
        ));
    }
    match version_cmp(&m.version, &running.version) {
        std::cmp::Ordering::Equal => Ok(false),
        std::cmp::Ordering::Less => Err(format!(
            "version {} is older than the running {}",
            m.version, running.version
        )),
        std::cmp::Ordering::Greater => Ok(true),
    }
}

/// Where the inactive slot's parts go.
pub struct Target<'a> {
    pub root: &'a Path,
    pub verity: &'a Path,
    /// The mounted ESP's `EFI/Linux`.
    pub entries: &'a Path,
    pub tries: u32,
    /// Hold the new entry back (`<entry>.held`, which the boot loader does not read):
    /// the update waits for its window, and a reboot before then stays on this slot.
    pub hold: bool,
}

/// The entry's held-back name (`Target::hold`).
pub fn held_entry(entry: &str) -> String {
    format!("{entry}.held")
}

/// The new slot's entry, `edgeos-<version>-<slot>+<tries>.efi`.
pub fn entry_name(version: &str, slot: &str, tries: u32) -> String {
    format!("{NAME}-{version}-{slot}+{tries}.efi")
}

/// The boot entries of `slot` (any version, any counter, held back or not) in
/// `EFI/Linux`.
pub fn slot_entries(entries: &Path, slot: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(entries) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| entry_slot(n.strip_suffix(".held").unwrap_or(n)).as_deref() == Some(slot))
        .collect();
    out.sort();
    out
}

/// The slot of `edgeos-<version>-<slot>[+counter].efi`.
pub fn entry_slot(name: &str) -> Option<String> {
    let stem = name
        .strip_prefix(NAME)?
        .strip_prefix('-')?
        .strip_suffix(".efi")?;
    let stem = stem.split_once('+').map_or(stem, |(s, _)| s);
    let (_, slot) = stem.rsplit_once('-')?;
    (slot == "a" || slot == "b").then(|| slot.to_owned())
}

fn size_of(path: &Path) -> Result<u64, String> {
    use std::io::{Seek, SeekFrom};
    std::fs::File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(|e| format!("failed to size {}: {e}", path.display()))
}

/// Copies one checked part (by name) into a writer: from a bundle, or rebuilt from a
/// delta; the part's SHA-256 is checked again on the way.
pub type CopyPart<'a> = &'a dyn Fn(&str, &mut dyn std::io::Write) -> Result<(), String>;

/// Writes the update whose checked manifest is `m` into the inactive slot described by
/// `target`, its parts from `copy`. The slot's entries go first, the UKI last; every
/// step that fails says what, and leaves the running slot and its entry as they were.
pub fn install(
    m: &edge_update::Manifest,
    copy: CopyPart,
    slot: &str,
    target: &Target,
) -> Result<Installed, String> {
    let part_size = |name: &str| m.part(name).map_or(0, |p| p.size);
    for (part, dev) in [("root.erofs", target.root), ("root.verity", target.verity)] {
        let have = size_of(dev)?;
        if part_size(part) > have {
            return Err(format!(
                "its {part} is {} bytes and slot {slot}'s partition {} holds {have}",
                part_size(part),
                dev.display()
            ));
        }
    }
    for name in slot_entries(target.entries, slot) {
        std::fs::remove_file(target.entries.join(&name))
            .map_err(|e| format!("failed to remove slot {slot}'s entry {name}: {e}"))?;
    }
    sync_dir(target.entries)?;
    for (part, dev) in [("root.erofs", target.root), ("root.verity", target.verity)] {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .open(dev)
            .map_err(|e| format!("failed to open {} for writing: {e}", dev.display()))?;
        copy(part, &mut out).map_err(|e| format!("writing {}: {e}", dev.display()))?;
        out.sync_all()
            .map_err(|e| format!("failed to sync {}: {e}", dev.display()))?;
    }
    let uki = format!("uki-{slot}.efi");
    let tmp = target
        .entries
        .join(format!(".{NAME}-{}-{slot}.tmp", m.version));
    let mut entry = entry_name(&m.version, slot, target.tries);
    if target.hold {
        entry = held_entry(&entry);
    }
    let written = (|| -> Result<(), String> {
        let mut out = std::fs::File::create(&tmp)
            .map_err(|e| format!("failed to create {}: {e}", tmp.display()))?;
        copy(&uki, &mut out).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        out.sync_all()
            .map_err(|e| format!("failed to sync {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, target.entries.join(&entry))
            .map_err(|e| format!("failed to rename {} to {entry}: {e}", tmp.display()))?;
        sync_dir(target.entries)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Installed {
        version: m.version.clone(),
        slot: slot.to_owned(),
        entry,
    })
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("failed to sync {}: {e}", dir.display()))
}

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
pub fn judge(h: &Health, started: Instant, limit: Duration) -> Option<Result<(), String>> {
    if h.ready && h.unhealthy.is_empty() {
        Some(Ok(()))
    } else if !h.given_up.is_empty() {
        Some(Err(format!("given up: {}", h.given_up.join(", "))))
    } else if started.elapsed() < limit {
        None
    } else if !h.ready {
        Some(Err(format!(
            "not every service was ready within {} s",
            limit.as_secs()
        )))
    } else {
        Some(Err(format!(
            "not healthy within {} s: {}",
            limit.as_secs(),
            h.unhealthy.join(", ")
        )))
    }
}

/// An install's end: the state to keep, and what it did (`None`: the running version).
type Outcome = (State, Result<Option<Installed>, String>);

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
struct Waiting {
    bundle: PathBuf,
    installed: Installed,
}

/// The window fabricd wrote beside a bundle (`<bundle>.window`); none without one. A
/// window init cannot read is none (fabricd checked it): the update is tried at once.
fn window_of(bundle: &Path) -> Option<edge_update::window::Window> {
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
                let removed = crate::stage2::with_esp(|esp| {
                    let entries = esp.join("EFI/Linux");
                    std::fs::remove_file(entries.join(&i.entry))
                        .map_err(|e| format!("failed to remove {}: {e}", i.entry))?;
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
                let released = crate::stage2::with_esp(|esp| {
                    let entries = esp.join("EFI/Linux");
                    std::fs::rename(entries.join(&i.entry), entries.join(live))
                        .map_err(|e| format!("failed to rename {} to {live}: {e}", i.entry))?;
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
                    Err("the install thread ended without a word".into()),
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
                        u.reason = Some(e.clone());
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

/// A delta's parts, rebuilt from the running slot (its root and verity tree, the root's
/// block index, its UKI) and the delta's pack.
struct Rebuild<'a> {
    delta: &'a edge_update::delta::Delta,
    seeds: edge_update::delta::Seeds,
    index: Vec<u8>,
}

impl<'a> Rebuild<'a> {
    /// Gathers the running slot's blocks and rebuilds every part the slot needs once
    /// into nothing, so a delta that cannot make them is refused before anything is
    /// touched.
    fn prepare(
        delta: &'a edge_update::delta::Delta,
        running: &Running,
        node: &dyn Fn(String) -> Result<PathBuf, String>,
        slot: &str,
    ) -> Result<Rebuild<'a>, String> {
        let t = Instant::now();
        let mut seeds = edge_update::delta::Seeds::default();
        let run = &running.slot;
        let index = seeds
            .add_file(&node(format!("root-{run}"))?, delta.info.base_root_bytes)
            .map_err(|e| e.to_string())?;
        seeds.add_bytes(index);
        seeds
            .add_file(
                &node(format!("root-{run}-verity"))?,
                delta.info.base_verity_bytes,
            )
            .map_err(|e| e.to_string())?;
        let uki = crate::stage2::with_esp(|esp| {
            let dir = esp.join("EFI/Linux");
            let stem = format!("{NAME}-{}-{run}", running.version);
            slot_entries(&dir, run)
                .into_iter()
                .find(|n| n.starts_with(&stem))
                .and_then(|n| std::fs::read(dir.join(n)).ok())
        })?;
        match uki {
            Some(bytes) => seeds.add_bytes(bytes),
            None => {
                say!("update: no UKI of the running slot found; its blocks come from the delta")
            }
        }
        let mut index = Vec::new();
        let r = |part: &str, out: &mut dyn std::io::Write, index: Option<&[u8]>| {
            delta
                .rebuild(part, &seeds, index, out)
                .map_err(|e| e.to_string())
        };
        let mut held = r("root.blockhash", &mut index, None)?.held;
        for part in [
            format!("uki-{slot}.efi"),
            "root.verity".into(),
            "root.erofs".into(),
        ] {
            held += r(&part, &mut std::io::sink(), Some(&index))?.held;
        }
        say!(
            "update: the delta rebuilds slot {slot} ({held} blocks from this box's own, {} known) in {} ms",
            seeds.len(),
            t.elapsed().as_millis()
        );
        Ok(Rebuild {
            delta,
            seeds,
            index,
        })
    }

    fn copy(&self, part: &str, out: &mut dyn std::io::Write) -> Result<(), String> {
        self.delta
            .rebuild(part, &self.seeds, Some(&self.index), out)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One bundle, from its manifest to an installed slot: `Ok(None)` when it is the running
/// version. The state says `installing` before anything is touched.
fn attempt(
    path: &Path,
    name: &str,
    id: &str,
    running: &Running,
    mut state: State,
    state_file: &Path,
    tries: u32,
) -> Outcome {
    let mut record = Attempt {
        phase: Phase::Refused,
        bundle: name.to_owned(),
        bundle_id: id.to_owned(),
        version: String::new(),
        security_version: 0,
        slot: other_slot(&running.slot).to_owned(),
        from_version: running.version.clone(),
        from_slot: running.slot.clone(),
        reason: None,
        window: None,
        time_ms: unix_ms(),
    };
    let result = (|| -> Result<Option<Installed>, String> {
        let key = edge_update::read_public_key(Path::new(UPDATE_KEY)).map_err(|e| e.to_string())?;
        let delta = match name.ends_with(".delta") {
            true => Some(edge_update::delta::open(path, &key).map_err(|e| e.to_string())?),
            false => None,
        };
        let m = match &delta {
            Some(d) => d.manifest.clone(),
            None => edge_update::head(path, &key).map_err(|e| e.to_string())?,
        };
        record.version = m.version.clone();
        record.security_version = m.security_version;
        if !admit(&m, running, state.security_floor)? {
            return Ok(None);
        }
        if let Some(d) = &delta {
            if d.info.base_version != running.version {
                return Err(format!(
                    "it is a delta from {}, and this box runs {}",
                    d.info.base_version, running.version
                ));
            }
        }
        let slot = record.slot.clone();
        say!("update: checking {name} ({} for slot {slot})", m.version);
        let devs = crate::disk::scan(Path::new("/sys/class/block"));
        let node = |label: String| -> Result<PathBuf, String> {
            let found = crate::disk::find_labels(&devs, &[&label]);
            let dev = found
                .get(&label)
                .ok_or_else(|| format!("no partition labelled {label}"))?;
            crate::disk::ensure_node(dev, Path::new("/dev"))
        };
        let (root, verity) = (
            node(format!("root-{slot}"))?,
            node(format!("root-{slot}-verity"))?,
        );
        let bundle;
        let rebuild;
        let copy: CopyPart = match &delta {
            None => {
                bundle = edge_update::open(path, &key).map_err(|e| e.to_string())?;
                &|part, out| {
                    bundle
                        .copy_part(path, part, out)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            }
            Some(d) => {
                rebuild = Rebuild::prepare(d, running, &node, &slot)?;
                &|part, out| rebuild.copy(part, out)
            }
        };
        // A window not open now: the new entry is held back until it is (the window
        // kept in the state, so that a boot before then knows the wait goes on).
        let hold = window_of(path).filter(|w| !w.contains(unix_ms() / 1000));
        record.window = hold.as_ref().map(ToString::to_string);
        record.phase = Phase::Installing;
        state.update = Some(record.clone());
        state.save(state_file)?;
        say!("update: writing {} into slot {slot}", m.version);
        crate::stage2::with_esp(|esp| {
            let entries = esp.join("EFI/Linux");
            let target = Target {
                root: &root,
                verity: &verity,
                entries: &entries,
                tries,
                hold: hold.is_some(),
            };
            let installed = install(&m, copy, &slot, &target)?;
            if path.exists() {
                return Ok(installed);
            }
            // Withdrawn (fabricd removes a bundle no manifest offers) while it was written.
            record.phase = Phase::Cancelled;
            std::fs::remove_file(entries.join(&installed.entry))
                .map_err(|e| format!("failed to remove {}: {e}", installed.entry))?;
            sync_dir(&entries)?;
            Err(format!(
                "the core withdrew it while slot {slot} was written; its entry is removed"
            ))
        })?
        .map(Some)
    })();
    // The running version's bundle leaves the state as it was.
    if !result.as_ref().is_ok_and(Option::is_none) {
        state.update = Some(record);
    }
    (state, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    #[test]
    fn versions_compare_by_their_numbers() {
        assert_eq!(version_cmp("0.10.0", "0.9.1"), Greater);
        assert_eq!(version_cmp("0.2.0", "0.2.0"), Equal);
        assert_eq!(version_cmp("0.1.0", "0.2.0"), Less);
        assert_eq!(version_cmp("1.0", "1.0.1"), Less);
    }

    fn manifest(version: &str, sv: u64) -> edge_update::Manifest {
        edge_update::Manifest {
            format: 1,
            name: NAME.into(),
            version: version.into(),
            security_version: sv,
            kernel_release: "6.1".into(),
            roothash: "0".repeat(64),
            block_size: 4096,
            parts: vec![],
        }
    }

    #[test]
    fn older_versions_other_products_and_low_security_versions_are_refused_naming_both() {
        let running = Running {
            version: "0.2.0".into(),
            slot: "a".into(),
        };
        assert_eq!(admit(&manifest("0.3.0", 2), &running, 2), Ok(true));
        assert_eq!(admit(&manifest("0.2.0", 2), &running, 2), Ok(false));
        assert_eq!(
            admit(&manifest("0.1.0", 2), &running, 1),
            Err("version 0.1.0 is older than the running 0.2.0".into())
        );
        assert_eq!(
            admit(&manifest("0.3.0", 1), &running, 2),
            Err("its security version 1 is below the lowest this box accepts (2)".into())
        );
        let mut other = manifest("0.3.0", 2);
        other.name = "otheros".into();
        assert!(admit(&other, &running, 1)
            .unwrap_err()
            .contains("\"otheros\""));
    }

    #[test]
    fn entries_are_known_by_their_slot_whatever_their_counter() {
        assert_eq!(entry_slot("edgeos-0.1.0-a+3.efi").as_deref(), Some("a"));
        assert_eq!(entry_slot("edgeos-0.1.0-b+0-3.efi").as_deref(), Some("b"));
        assert_eq!(entry_slot("edgeos-0.2.0-rc1-b.efi").as_deref(), Some("b"));
        assert_eq!(entry_slot("edgeos-0.1.0-c.efi"), None);
        assert_eq!(entry_slot("other-0.1.0-a.efi"), None);
        assert_eq!(entry_slot(".edgeos-0.1.0-a.tmp"), None);
    }

    #[test]
    fn the_floor_is_the_higher_of_the_state_and_the_tpm_and_the_tpm_catches_up() {
        // The TPM's counter started at 1 (base 0) and the state says 3 (blessed before the
        // counter was kept, or the count was cut off): the counter is raised to 3.
        assert_eq!(floor_with_counter(3, 0, 1), (3, Some(3)));
        // An old copy of the data partition says 1, the TPM 4: the box keeps 4.
        assert_eq!(floor_with_counter(1, 0, 4), (4, None));
        // A TPM whose first count started at 41 (base 40): 42 in it is floor 2.
        assert_eq!(floor_with_counter(2, 40, 42), (2, None));
        assert_eq!(floor_with_counter(5, 40, 42), (5, Some(45)));
        // A data partition made anew on such a TPM (base unknown, 0) only raises it.
        assert_eq!(floor_with_counter(0, 0, 42), (42, None));
    }

    fn attempt(phase: Phase) -> State {
        State {
            ended: Vec::new(),
            security_floor: 1,
            tpm_counter_base: None,
            update: Some(Attempt {
                phase,
                bundle: "edgeos-0.2.0.bundle".into(),
                bundle_id: "1:2:3".into(),
                version: "0.2.0".into(),
                security_version: 1,
                slot: "b".into(),
                from_version: "0.1.0".into(),
                from_slot: "a".into(),
                reason: None,
                window: None,
                time_ms: 0,
            }),
        }
    }

    #[test]
    fn a_boot_of_the_new_slot_is_its_trial_and_a_boot_of_the_old_one_a_rollback() {
        let new = Running {
            version: "0.2.0".into(),
            slot: "b".into(),
        };
        let old = Running {
            version: "0.1.0".into(),
            slot: "a".into(),
        };
        let mut s = attempt(Phase::Installed);
        assert!(matches!(on_boot(&mut s, &new, 5), BootRole::Trial { .. }));
        assert_eq!(s.update.as_ref().unwrap().phase, Phase::Trying);

        let mut s = attempt(Phase::Trying);
        s.update.as_mut().unwrap().reason = Some("given up: noded".into());
        match on_boot(&mut s, &old, 5) {
            BootRole::RolledBack { reason, .. } => assert_eq!(reason, "given up: noded"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.update.as_ref().unwrap().phase, Phase::RolledBack);

        // A trial that never reached a verdict (a hang the watchdog reset, a power cut).
        let mut s = attempt(Phase::Installed);
        match on_boot(&mut s, &old, 5) {
            BootRole::RolledBack { reason, .. } => {
                assert!(
                    reason.contains("slot b (0.2.0) did not come up"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        let mut s = attempt(Phase::Installing);
        assert!(matches!(
            on_boot(&mut s, &old, 5),
            BootRole::Interrupted { .. }
        ));
        let mut s = attempt(Phase::Blessed);
        assert_eq!(on_boot(&mut s, &new, 5), BootRole::Normal);

        // Installed for a later window, its entry held back: a boot before then (a power
        // cut) is the old slot's, and the update stays staged.
        let mut s = attempt(Phase::Installed);
        s.update.as_mut().unwrap().window = Some("02:00-04:00".into());
        assert_eq!(
            on_boot(&mut s, &old, 5),
            BootRole::Staged {
                version: "0.2.0".into(),
                slot: "b".into()
            }
        );
        assert_eq!(s.update.as_ref().unwrap().phase, Phase::Installed);
    }

    #[test]
    fn a_bundle_whose_copy_has_ended_is_not_looked_at_again_and_a_new_copy_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edgeos-0.2.0.bundle");
        std::fs::write(&path, b"x").unwrap();
        std::fs::write(dir.path().join(".edgeos-0.2.0.bundle.partial"), b"x").unwrap();
        let mut s = attempt(Phase::RolledBack);
        assert_eq!(
            next_bundle(dir.path(), &s).map(|(p, _)| p),
            Some(path.clone())
        );
        s.update.as_mut().unwrap().bundle_id = bundle_id(&path).unwrap();
        // An install cut off is looked at again.
        s.update.as_mut().unwrap().phase = Phase::Installing;
        assert!(next_bundle(dir.path(), &s).is_some());
        // Rolled back (every attempt that ends is marked so): not looked at again, also
        // once another attempt has taken the record.
        s.update.as_mut().unwrap().phase = Phase::RolledBack;
        s.end();
        assert_eq!(next_bundle(dir.path(), &s), None);
        s.update.as_mut().unwrap().bundle = "edgeos-0.3.0.bundle".into();
        assert_eq!(next_bundle(dir.path(), &s), None);
        for i in 0..40 {
            s.update.as_mut().unwrap().bundle_id = i.to_string();
            s.end();
        }
        assert_eq!(s.ended.len(), ENDED_KEPT);
        assert!(
            next_bundle(dir.path(), &s).is_some(),
            "the oldest are forgotten"
        );
    }

    /// A signed bundle of `version` in `dir` (root: three blocks), opened.
    fn bundle(dir: &Path, version: &str) -> (PathBuf, edge_update::Bundle) {
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let mut files = Vec::new();
        for name in edge_update::PARTS {
            if name == "root.blockhash" {
                continue;
            }
            let data: Vec<u8> = match name {
                "root.erofs" => (0..3 * 4096).map(|i| (i % 253) as u8).collect(),
                other => format!("{other} of {version}").into_bytes(),
            };
            let path = dir.join(name);
            std::fs::write(&path, data).unwrap();
            files.push((name, path));
        }
        let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
        let out = dir.join(format!("edgeos-{version}.bundle"));
        edge_update::write(
            &out,
            &edge_update::Identity {
                name: NAME,
                version,
                security_version: 2,
                kernel_release: "6.1",
                roothash: &"ab".repeat(32),
            },
            &edge_update::Sources { files: &files },
            |m| key.sign(m).as_ref().to_vec(),
        )
        .unwrap();
        let b = edge_update::open(&out, key.public_key().as_ref()).unwrap();
        (out, b)
    }

    /// Slot b as files in `d` (a root partition of `root_blocks` blocks and a verity one
    /// of one, both 0xee), an ESP holding `entries`, and the install of a 0.2.0 bundle
    /// (its root three blocks) into them. Returns what the install said, the root
    /// partition, the verity one and the entries' directory.
    fn install_into(
        d: &Path,
        root_blocks: usize,
        entries: &[&str],
        hold: bool,
    ) -> (Result<Installed, String>, PathBuf, PathBuf, PathBuf) {
        let (path, b) = bundle(d, "0.2.0");
        let dir = d.join("EFI/Linux");
        std::fs::create_dir_all(&dir).unwrap();
        for e in entries {
            std::fs::write(dir.join(e), e).unwrap();
        }
        let (root, verity) = (d.join("root-b"), d.join("root-b-verity"));
        std::fs::write(&root, vec![0xee; root_blocks * 4096]).unwrap();
        std::fs::write(&verity, vec![0xee; 4096]).unwrap();
        let target = Target {
            root: &root,
            verity: &verity,
            entries: &dir,
            tries: 1,
            hold,
        };
        let copy = |n: &str, w: &mut dyn std::io::Write| {
            b.copy_part(&path, n, w)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let done = install(&b.manifest, &copy, "b", &target);
        (done, root, verity, dir)
    }

    #[test]
    fn an_install_replaces_only_the_inactive_slot_and_ends_with_its_counted_entry() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let standing = [
            "edgeos-0.1.0-a.efi",
            "edgeos-0.1.0-b+0.efi",
            "edgeos-0.0.9-b+0-3.efi",
        ];
        let (done, root, verity, entries) = install_into(d, 5, &standing, false);
        assert_eq!(done.unwrap().entry, "edgeos-0.2.0-b+1.efi");
        let mut left: Vec<String> = std::fs::read_dir(&entries)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["edgeos-0.1.0-a.efi", "edgeos-0.2.0-b+1.efi"]);
        assert_eq!(
            std::fs::read(entries.join("edgeos-0.2.0-b+1.efi")).unwrap(),
            b"uki-b.efi of 0.2.0"
        );
        // The root is at the start of its partition; the rest of it is as it was.
        let written = std::fs::read(&root).unwrap();
        assert_eq!(
            &written[..3 * 4096],
            &std::fs::read(d.join("root.erofs")).unwrap()[..]
        );
        assert!(written[3 * 4096..].iter().all(|&x| x == 0xee));
        assert!(std::fs::read(&verity)
            .unwrap()
            .starts_with(b"root.verity of 0.2.0"));
    }

    #[test]
    fn an_install_for_a_later_window_holds_its_entry_back_where_the_loader_does_not_look() {
        let dir = tempfile::tempdir().unwrap();
        // A held entry of an earlier staged update of the slot goes like any other.
        let standing = ["edgeos-0.1.0-a.efi", "edgeos-0.1.5-b+1.efi.held"];
        let (done, _, _, entries) = install_into(dir.path(), 5, &standing, true);
        assert_eq!(done.unwrap().entry, "edgeos-0.2.0-b+1.efi.held");
        let mut left: Vec<String> = std::fs::read_dir(&entries)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["edgeos-0.1.0-a.efi", "edgeos-0.2.0-b+1.efi.held"]);
        // Not an entry systemd-boot boots (type #2 entries end in .efi), but the slot's.
        assert_eq!(entry_slot("edgeos-0.2.0-b+1.efi.held"), None);
        assert_eq!(slot_entries(&entries, "b"), ["edgeos-0.2.0-b+1.efi.held"]);
    }

    #[test]
    fn a_slot_too_small_is_refused_before_anything_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let (done, root, _, entries) =
            install_into(dir.path(), 2, &["edgeos-0.1.0-b+0.efi"], false);
        let e = done.unwrap_err();
        assert!(
            e.contains("its root.erofs is 12288 bytes and slot b's partition")
                && e.contains("holds 8192"),
            "{e}"
        );
        assert!(entries.join("edgeos-0.1.0-b+0.efi").exists());
        assert!(std::fs::read(&root).unwrap().iter().all(|&x| x == 0xee));
    }

    #[test]
    fn the_trial_passes_when_ready_and_healthy_and_fails_when_given_up_or_late() {
        let t = Instant::now();
        let limit = Duration::from_secs(120);
        let h = |ready: bool, given_up: &[&str], unhealthy: &[&str]| Health {
            ready,
            given_up: given_up.iter().map(|s| s.to_string()).collect(),
            unhealthy: unhealthy.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(judge(&h(true, &[], &[]), t, limit), Some(Ok(())));
        assert_eq!(judge(&h(false, &[], &[]), t, limit), None);
        // Ready but a service has not said it is healthy yet: wait, then fail naming it.
        let waiting = h(true, &[], &["noded (static pods running)"]);
        assert_eq!(judge(&waiting, t, limit), None);
        assert_eq!(
            judge(&waiting, t, Duration::ZERO),
            Some(Err(
                "not healthy within 0 s: noded (static pods running)".into()
            ))
        );
        assert_eq!(
            judge(&h(false, &["noded"], &[]), t, limit),
            Some(Err("given up: noded".into()))
        );
        assert_eq!(
            judge(&h(false, &[], &[]), t, Duration::ZERO),
            Some(Err("not every service was ready within 0 s".into()))
        );
    }
}
