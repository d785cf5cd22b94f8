//! Writing the inactive slot from a bundle (or a delta rebuilt against the running
//! slot): its entries first, its parts hashed again as they are copied, its UKI last.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::say;

use super::floor::admit;
use super::slots::{
    entry_name, held_entry, other_slot, slot_entries, slot_version, Installed, Running, Target,
};
use super::state::{Attempt, Phase, State};
use super::trial::Outcome;
use super::updater::{unix_ms, window_of};
use super::{NAME, UPDATE_KEY};

pub(super) fn size_of(path: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    std::fs::File::open(path)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(Error::io("size", path))
}

/// Copies one checked part (by name) into a writer: from a bundle, or rebuilt from a
/// delta; the part's SHA-256 is checked again on the way.
pub type CopyPart<'a> = &'a dyn Fn(&str, &mut dyn std::io::Write) -> Result<()>;

/// Writes the update whose checked manifest is `m` into the inactive slot described by
/// `target`, its parts from `copy`. The slot's entries go first, the UKI last; every
/// step that fails says what, and leaves the running slot and its entry as they were.
pub fn install(
    m: &edge_update::Manifest,
    copy: CopyPart,
    slot: &str,
    target: &Target,
) -> Result<Installed> {
    let part_size = |name: &str| m.part(name).map_or(0, |p| p.size);
    for (part, dev) in [("root.erofs", target.root), ("root.verity", target.verity)] {
        let have = size_of(dev)?;
        if part_size(part) > have {
            return Err(Error::Bundle {
                detail: format!(
                    "its {part} is {} bytes and slot {slot}'s partition {} holds {have}",
                    part_size(part),
                    dev.display()
                ),
            });
        }
    }
    for name in slot_entries(target.entries, slot) {
        let path = target.entries.join(&name);
        std::fs::remove_file(&path).map_err(Error::io("remove", &path))?;
    }
    sync_dir(target.entries)?;
    for (part, dev) in [("root.erofs", target.root), ("root.verity", target.verity)] {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .open(dev)
            .map_err(Error::io("open for writing", dev))?;
        copy(part, &mut out).map_err(Error::step(format!("writing {}", dev.display())))?;
        out.sync_all().map_err(Error::io("sync", dev))?;
    }
    let uki = format!("uki-{slot}.efi");
    let tmp = target
        .entries
        .join(format!(".{NAME}-{}-{slot}.tmp", m.version));
    let mut entry = entry_name(&m.version, slot, target.tries);
    if target.hold {
        entry = held_entry(&entry);
    }
    let written = (|| -> Result<()> {
        let mut out = std::fs::File::create(&tmp).map_err(Error::io("create", &tmp))?;
        copy(&uki, &mut out).map_err(Error::step(format!("writing {}", tmp.display())))?;
        out.sync_all().map_err(Error::io("sync", &tmp))?;
        std::fs::rename(&tmp, target.entries.join(&entry))
            .map_err(Error::io_to("rename", &tmp, "to", &entry))?;
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

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io("sync", dir))
}

/// Where a delta's parts are rebuilt first when its base is the slot they go to:
/// writing that slot destroys the blocks they are rebuilt from. A power cut while the
/// slot is written leaves them here, checked, for the install that starts again.
pub const STAGED: &str = "/var/lib/edge/update/staged";

/// The parts a slot is written from, in the order they are rebuilt (after the index).
fn slot_parts(slot: &str) -> [String; 3] {
    [
        format!("uki-{slot}.efi"),
        "root.verity".into(),
        "root.erofs".into(),
    ]
}

/// A delta's parts, rebuilt from the blocks of the slot that holds its base (its root
/// and verity tree, the root's block index, its UKI) and the delta's pack.
pub(super) struct Rebuild<'a> {
    delta: &'a edge_update::delta::Delta,
    seeds: edge_update::delta::Seeds,
    index: Vec<u8>,
    /// The parts were rebuilt into this directory: they are copied from there.
    staged: Option<PathBuf>,
}

/// Whether `dir` holds part `name` of `m` whole and unchanged.
fn is_staged(m: &edge_update::Manifest, dir: &Path, name: &str) -> bool {
    m.copy_part_file(&dir.join(name), name, &mut std::io::sink())
        .is_ok()
}

impl<'a> Rebuild<'a> {
    /// Finds the slot that holds the delta's base (the running one, or the other one by
    /// its boot entry), gathers its blocks and rebuilds every part the new slot needs
    /// once, so that a delta that cannot make them is refused before anything is
    /// touched. Parts already staged for this manifest are used as they are.
    fn prepare(
        delta: &'a edge_update::delta::Delta,
        running: &Running,
        node: &dyn Fn(String) -> Result<PathBuf>,
        slot: &str,
        staged: &Path,
    ) -> Result<Rebuild<'a>> {
        if slot_parts(slot)
            .iter()
            .all(|p| is_staged(&delta.manifest, staged, p))
        {
            say!(
                "update: slot {slot}'s parts are staged already ({})",
                staged.display()
            );
            return Ok(Rebuild {
                delta,
                seeds: edge_update::delta::Seeds::default(),
                index: Vec::new(),
                staged: Some(staged.to_path_buf()),
            });
        }
        let base = &delta.info.base_version;
        let (other_holds, uki) = crate::esp::with_esp(|esp| {
            let dir = esp.join("EFI/Linux");
            let other_holds = slot_version(&dir, slot);
            let from = if *base == running.version {
                &running.slot
            } else {
                slot
            };
            let stem = format!("{NAME}-{base}-{from}");
            let uki = slot_entries(&dir, from)
                .into_iter()
                .find(|n| n.starts_with(&stem))
                .and_then(|n| std::fs::read(dir.join(n)).ok());
            (other_holds, uki)
        })?;
        let from = if *base == running.version {
            running.slot.clone()
        } else if other_holds.as_deref() == Some(base.as_str()) {
            slot.to_owned()
        } else {
            return Err(Error::Bundle {
                detail: format!(
                    "it is a delta from {base}, and this box runs {} (slot {slot} holds {})",
                    running.version,
                    other_holds.as_deref().unwrap_or("no known version")
                ),
            });
        };
        let mut seeds = edge_update::delta::Seeds::default();
        let index = seeds.add_file(&node(format!("root-{from}"))?, delta.info.base_root_bytes)?;
        seeds.add_bytes(index);
        seeds.add_file(
            &node(format!("root-{from}-verity"))?,
            delta.info.base_verity_bytes,
        )?;
        match uki {
            Some(bytes) => seeds.add_bytes(bytes),
            None => say!(
                "update: no UKI of {base} in slot {from} found; its blocks come from the delta"
            ),
        }
        Rebuild::new(delta, seeds, slot, (from == slot).then_some(staged))
    }

    /// Rebuilds the block index, then each of the slot's parts: into nothing, only to
    /// check them, or into `staged` when the slot to write holds the blocks.
    pub(super) fn new(
        delta: &'a edge_update::delta::Delta,
        seeds: edge_update::delta::Seeds,
        slot: &str,
        staged: Option<&Path>,
    ) -> Result<Rebuild<'a>> {
        let t = Instant::now();
        let mut index = Vec::new();
        let mut held = delta
            .rebuild("root.blockhash", &seeds, None, &mut index)?
            .held;
        if let Some(dir) = staged {
            std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
            let need: u64 = slot_parts(slot)
                .iter()
                .filter_map(|p| delta.manifest.part(p))
                .map(|p| p.size)
                .sum();
            let free = rustix::fs::statvfs(dir)
                .map(|st| st.f_bavail.saturating_mul(st.f_frsize))
                .unwrap_or(u64::MAX);
            if need > free {
                return Err(Error::Bundle {
                    detail: format!(
                        "its base is in slot {slot}, which it replaces: its parts are rebuilt on the data partition first, and they need {need} bytes where {free} are free"
                    ),
                });
            }
        }
        for part in slot_parts(slot) {
            let Some(dir) = staged else {
                held += delta
                    .rebuild(&part, &seeds, Some(&index), &mut std::io::sink())?
                    .held;
                continue;
            };
            let (tmp, to) = (dir.join(format!(".{part}.tmp")), dir.join(&part));
            let written = (|| -> Result<u64> {
                let file = std::fs::File::create(&tmp).map_err(Error::io("create", &tmp))?;
                let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
                let r = delta.rebuild(&part, &seeds, Some(&index), &mut out)?;
                let file = out
                    .into_inner()
                    .map_err(|e| Error::io("write", &tmp)(e.into_error()))?;
                file.sync_all().map_err(Error::io("sync", &tmp))?;
                std::fs::rename(&tmp, &to).map_err(Error::io_to("rename", &tmp, "to", &to))?;
                Ok(r.held)
            })();
            match written {
                Ok(h) => held += h,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
        }
        if let Some(dir) = staged {
            sync_dir(dir)?;
        }
        say!(
            "update: the delta rebuilds slot {slot} ({held} blocks from this box's own, {} known{}) in {} ms",
            seeds.len(),
            staged.map_or(String::new(), |d| format!(", staged in {}", d.display())),
            t.elapsed().as_millis()
        );
        Ok(Rebuild {
            delta,
            seeds,
            index,
            staged: staged.map(Path::to_path_buf),
        })
    }

    pub(super) fn copy(&self, part: &str, out: &mut dyn std::io::Write) -> Result<()> {
        match &self.staged {
            Some(dir) => {
                self.delta
                    .manifest
                    .copy_part_file(&dir.join(part), part, out)?;
            }
            None => {
                self.delta
                    .rebuild(part, &self.seeds, Some(&self.index), out)?;
            }
        }
        Ok(())
    }
}

/// One bundle, from its manifest to an installed slot: `Ok(None)` when it is the running
/// version. The state says `installing` before anything is touched.
pub(super) fn attempt(
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
    let result = (|| -> Result<Option<Installed>> {
        let key = edge_update::read_public_key(Path::new(UPDATE_KEY))?;
        let delta = match name.ends_with(".delta") {
            true => Some(edge_update::delta::open(path, &key)?),
            false => None,
        };
        let m = match &delta {
            Some(d) => d.manifest.clone(),
            None => edge_update::head(path, &key)?,
        };
        record.version = m.version.clone();
        record.security_version = m.security_version;
        if !admit(&m, running, state.security_floor)? {
            return Ok(None);
        }
        let slot = record.slot.clone();
        say!("update: checking {name} ({} for slot {slot})", m.version);
        let devs = crate::disk::scan(Path::new("/sys/class/block"));
        let node = |label: String| -> Result<PathBuf> {
            let found = crate::disk::find_labels(&devs, &[&label]);
            let dev = found.get(&label).ok_or_else(|| Error::NoDevice {
                what: format!("partition labelled {label}"),
            })?;
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
                bundle = edge_update::open(path, &key)?;
                &|part, out| -> Result<()> {
                    bundle.copy_part(path, part, out)?;
                    Ok(())
                }
            }
            Some(d) => {
                rebuild = Rebuild::prepare(d, running, &node, &slot, Path::new(STAGED))?;
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
        crate::esp::with_esp(|esp| {
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
                .map_err(Error::io("remove", &installed.entry))?;
            sync_dir(&entries)?;
            Err(Error::Bundle {
                detail: format!(
                    "the core withdrew it while slot {slot} was written; its entry is removed"
                ),
            })
        })?
        .map(Some)
    })();
    // Staged parts serve only a delta's install cut off by a power loss; this one ended.
    if name.ends_with(".delta") {
        match std::fs::remove_dir_all(STAGED) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                say!("warning: update: remove {STAGED}: {e}")
            }
            _ => {}
        }
    }
    tell_other_slot(running);
    // The running version's bundle leaves the state as it was.
    if !result.as_ref().is_ok_and(Option::is_none) {
        state.update = Some(record);
    }
    (state, result)
}

/// Says what the other slot holds now ([`super::slots::OTHER_SLOT_FILE`]).
pub(super) fn tell_other_slot(running: &Running) {
    let other = other_slot(&running.slot);
    let held = crate::esp::with_esp(|esp| slot_version(&esp.join("EFI/Linux"), other));
    let file = Path::new(super::slots::OTHER_SLOT_FILE);
    match held {
        Ok(v) => super::slots::say_other_slot(file, other, v.as_deref()),
        Err(e) => say!("warning: update: what slot {other} holds: {e}"),
    }
}
