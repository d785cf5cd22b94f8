//! Writing the inactive slot from a bundle (or a delta rebuilt against the running
//! slot): its entries first, its parts hashed again as they are copied, its UKI last.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::say;

use super::floor::admit;
use super::slots::{entry_name, held_entry, other_slot, slot_entries, Installed, Running, Target};
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

/// A delta's parts, rebuilt from the running slot (its root and verity tree, the root's
/// block index, its UKI) and the delta's pack.
pub(super) struct Rebuild<'a> {
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
        node: &dyn Fn(String) -> Result<PathBuf>,
        slot: &str,
    ) -> Result<Rebuild<'a>> {
        let t = Instant::now();
        let mut seeds = edge_update::delta::Seeds::default();
        let run = &running.slot;
        let index = seeds.add_file(&node(format!("root-{run}"))?, delta.info.base_root_bytes)?;
        seeds.add_bytes(index);
        seeds.add_file(
            &node(format!("root-{run}-verity"))?,
            delta.info.base_verity_bytes,
        )?;
        let uki = crate::esp::with_esp(|esp| {
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
            delta.rebuild(part, &seeds, index, out)
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

    fn copy(&self, part: &str, out: &mut dyn std::io::Write) -> Result<()> {
        self.delta
            .rebuild(part, &self.seeds, Some(&self.index), out)?;
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
        if let Some(d) = &delta {
            if d.info.base_version != running.version {
                return Err(Error::Bundle {
                    detail: format!(
                        "it is a delta from {}, and this box runs {}",
                        d.info.base_version, running.version
                    ),
                });
            }
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
    // The running version's bundle leaves the state as it was.
    if !result.as_ref().is_ok_and(Option::is_none) {
        state.update = Some(record);
    }
    (state, result)
}
