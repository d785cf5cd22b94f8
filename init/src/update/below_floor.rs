//! A release below the box's security floor does not run, whichever way it was booted:
//! each UKI carries its security version on its signed command line
//! (`edge.security_version`); when a blessing raises the floor, the other slot's entries
//! below it are marked bad (`+0`: no tries left, so boot counting never picks them), and a
//! boot of one anyway (chosen in the boot menu, or the only entry left) keeps the services
//! down, marks its entry bad and reboots into the other slot.

use std::path::Path;

use super::slots::{slot_entries, Running};
use super::state::State;
use crate::error::{Error, Result};

/// A release that does not say its security version is of version 1.
const UNSAID: u64 = 1;

/// The security version on a command line (`edge.security_version=N`).
pub fn of_cmdline(extra: &std::collections::BTreeMap<String, String>) -> u64 {
    extra
        .get("security_version")
        .and_then(|v| v.parse().ok())
        .unwrap_or(UNSAID)
}

/// The security version a UKI's command line carries (its `.cmdline` section is plain
/// text inside the file).
pub fn of_uki(bytes: &[u8]) -> u64 {
    const KEY: &[u8] = b"edge.security_version=";
    let Some(at) = bytes.windows(KEY.len()).position(|w| w == KEY) else {
        return UNSAID;
    };
    let digits: Vec<u8> = bytes[at + KEY.len()..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    String::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(UNSAID)
}

/// `edgeos-<version>-<slot>[+<counter>].efi` marked bad: `edgeos-<version>-<slot>+0.efi`.
/// `None` when it already is, or is no entry.
pub fn bad_name(entry: &str) -> Option<String> {
    let stem = entry.strip_suffix(".efi")?;
    let (base, counter) = match stem.split_once('+') {
        Some((b, c)) => (b, Some(c)),
        None => (stem, None),
    };
    if counter.is_some_and(|c| c == "0" || c.starts_with("0-")) {
        return None;
    }
    Some(format!("{base}+0.efi"))
}

/// Marks bad the entries of `slot` (of any version) whose UKI is below `floor`; returns
/// `(entry, its security version)` of each marked.
pub fn mark_below(entries: &Path, slot: &str, floor: u64) -> Result<Vec<(String, u64)>> {
    let mut marked = Vec::new();
    for name in slot_entries(entries, slot) {
        if name.ends_with(".held") {
            continue;
        }
        let path = entries.join(&name);
        let sv = of_uki(&std::fs::read(&path).map_err(Error::io("read", &path))?);
        if sv >= floor {
            continue;
        }
        if let Some(bad) = bad_name(&name) {
            std::fs::rename(&path, entries.join(&bad)).map_err(Error::io("rename", &path))?;
            marked.push((name, sv));
        }
    }
    if !marked.is_empty() {
        super::install::sync_dir(entries)?;
    }
    Ok(marked)
}

/// Whether `entries` holds an entry of `slot` with tries left or blessed (one boot
/// counting would pick before a bad one).
fn has_good_entry(entries: &Path, slot: &str) -> bool {
    slot_entries(entries, slot)
        .iter()
        .any(|n| !n.ends_with(".held") && bad_name(n).is_some())
}

/// What this boot does when its release is below the floor kept in `state`: `None` when
/// it is not; else the reason, and whether to reboot (only when the other slot has an
/// entry to go to; with none the box stays up, its services down, saying why).
pub fn refuse(running: &Running, state: &State) -> Option<(String, bool)> {
    if running.security_version >= state.security_floor {
        return None;
    }
    let reason = format!(
        "this release ({} in slot {}) has security version {}, below the lowest this box \
         runs ({})",
        running.version, running.slot, running.security_version, state.security_floor
    );
    let other = super::slots::other_slot(&running.slot);
    let outcome = crate::esp::with_esp(|esp| {
        let entries = esp.join("EFI/Linux");
        let marked = mark_below(&entries, &running.slot, state.security_floor)?;
        Ok::<_, Error>((marked, has_good_entry(&entries, other)))
    })
    .and_then(|r| r);
    match outcome {
        Ok((_, true)) => Some((
            format!("{reason}: its entry is marked bad; rebooting into slot {other}"),
            true,
        )),
        Ok((_, false)) => Some((
            format!("{reason}, and slot {other} has no entry to boot: the services stay down"),
            false,
        )),
        Err(e) => Some((format!("{reason} ({e}): the services stay down"), false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_security_version_is_read_from_the_command_line_and_the_uki() {
        let mut extra = std::collections::BTreeMap::new();
        assert_eq!(of_cmdline(&extra), 1);
        extra.insert("security_version".into(), "3".into());
        assert_eq!(of_cmdline(&extra), 3);
        let uki = b"MZ....\0.cmdline\0console=ttyS0 edge.slot=a edge.security_version=12 edge.roothash=ab\0";
        assert_eq!(of_uki(uki), 12);
        assert_eq!(of_uki(b"MZ no such parameter"), 1);
    }

    #[test]
    fn entries_are_marked_bad_by_their_counter() {
        assert_eq!(
            bad_name("edgeos-0.1.0-a.efi").as_deref(),
            Some("edgeos-0.1.0-a+0.efi")
        );
        assert_eq!(
            bad_name("edgeos-0.1.0-a+3.efi").as_deref(),
            Some("edgeos-0.1.0-a+0.efi")
        );
        assert_eq!(
            bad_name("edgeos-0.1.0-a+1-2.efi").as_deref(),
            Some("edgeos-0.1.0-a+0.efi")
        );
        assert_eq!(bad_name("edgeos-0.1.0-a+0.efi"), None);
        assert_eq!(bad_name("edgeos-0.1.0-a+0-3.efi"), None);
        assert_eq!(bad_name("loader.conf"), None);
    }

    #[test]
    fn only_the_slots_entries_below_the_floor_are_marked() {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path();
        let uki = |sv: u64| {
            format!("MZ edge.slot=x edge.security_version={sv} edge.roothash=ff").into_bytes()
        };
        std::fs::write(e.join("edgeos-0.1.0-a.efi"), uki(1)).unwrap();
        std::fs::write(e.join("edgeos-0.2.0-b.efi"), uki(2)).unwrap();
        std::fs::write(e.join("edgeos-0.3.0-a+1.efi.held"), uki(1)).unwrap();
        let marked = mark_below(e, "a", 2).unwrap();
        assert_eq!(marked, [("edgeos-0.1.0-a.efi".to_string(), 1)]);
        assert!(e.join("edgeos-0.1.0-a+0.efi").exists());
        assert!(
            e.join("edgeos-0.3.0-a+1.efi.held").exists(),
            "a held entry is left alone"
        );
        assert!(
            mark_below(e, "b", 2).unwrap().is_empty(),
            "at the floor: kept"
        );
        assert!(has_good_entry(e, "b"));
        assert!(!has_good_entry(e, "a"), "a bad entry is not one to go to");
    }
}
