//! The two slots and their boot entries: which slot is the other, how entries are named
//! (`edgeos-<version>-<slot>+<tries>.efi`, held back as `.efi.held`), and which bundle
//! is next.

use std::path::{Path, PathBuf};

use super::state::State;
use super::NAME;

/// The slot that is not `running`.
pub fn other_slot(running: &str) -> &'static str {
    if running == "a" {
        "b"
    } else {
        "a"
    }
}

/// The running system, as far as updates care.
#[derive(Debug, Clone)]
pub struct Running {
    pub version: String,
    pub slot: String,
    /// Its signed command line's `edge.security_version` (1 when it does not say).
    pub security_version: u64,
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
    parse_entry(name).map(|(_, slot)| slot.to_owned())
}

/// The version and slot of `edgeos-<version>-<slot>[+counter].efi`.
fn parse_entry(name: &str) -> Option<(&str, &str)> {
    let stem = name
        .strip_prefix(NAME)?
        .strip_prefix('-')?
        .strip_suffix(".efi")?;
    let stem = stem.split_once('+').map_or(stem, |(s, _)| s);
    let (version, slot) = stem.rsplit_once('-')?;
    (!version.is_empty() && (slot == "a" || slot == "b")).then_some((version, slot))
}

/// The version of `edgeos-<version>-<slot>[+counter].efi[.held]`.
pub fn entry_version(name: &str) -> Option<String> {
    parse_entry(name.strip_suffix(".held").unwrap_or(name)).map(|(v, _)| v.to_owned())
}

/// The version whose root `slot` holds, by its boot entry (an install removes the
/// slot's entries before it writes the slot, and puts the new one last): `None` when
/// the slot has no entry, or entries of more than one version.
pub fn slot_version(entries: &Path, slot: &str) -> Option<String> {
    let mut versions: Vec<String> = slot_entries(entries, slot)
        .iter()
        .filter_map(|n| entry_version(n))
        .collect();
    versions.sort();
    versions.dedup();
    match versions.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Where init says what the other slot holds, for fabricd to pick a delta from it
/// (`{"slot":"a","version":"0.1.0"}`; no file when it holds nothing known).
pub const OTHER_SLOT_FILE: &str = "/run/edge/other-slot.json";

/// Writes (or removes) [`OTHER_SLOT_FILE`]; what fabricd reads is only a hint: init
/// checks a delta's base against the slot itself.
pub fn say_other_slot(file: &Path, slot: &str, version: Option<&str>) {
    let done = match version {
        Some(v) => {
            let body = serde_json::json!({"slot": slot, "version": v}).to_string() + "\n";
            crate::provision::write_atomic(file, body.as_bytes(), 0o644)
        }
        None => match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    };
    if let Err(e) = done {
        crate::say!("warning: update: {}: {e}", file.display());
    }
}
