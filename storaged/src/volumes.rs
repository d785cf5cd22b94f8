//! Thin volumes in the pool: create (within the overcommit limit), activate as a `thin`
//! device, delete (the pool frees the blocks), snapshot (origin suspended around
//! `create_snap`), expand (reload with the new length). Each step that spans a
//! device-mapper message is recorded in the catalog first, so `Pool::open` can finish
//! or undo it after a crash.

use std::path::PathBuf;

use edge_dm::ThinStatus;

use crate::catalog::{Kind, State, Volume};
use crate::error::{Error, Result};
use crate::pool::Pool;

/// Largest thin device id the pool accepts (24 bits).
const MAX_THIN_ID: u32 = (1 << 24) - 1;

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest {
            name: name.to_owned(),
            detail: "names are 1-64 of a-z 0-9 . _ - and do not start with . or -".into(),
        })
    }
}

fn check_size(name: &str, size_bytes: u64) -> Result<u64> {
    if size_bytes == 0 {
        return Err(Error::BadRequest {
            name: name.to_owned(),
            detail: "size must be more than 0".into(),
        });
    }
    // Whole 4 KiB blocks: the sector size of every filesystem we format.
    size_bytes
        .checked_next_multiple_of(4096)
        .ok_or(Error::BadRequest {
            name: name.to_owned(),
            detail: format!("impossible size {size_bytes}"),
        })
}

impl Pool {
    pub fn volumes(&self) -> &[Volume] {
        &self.catalog.volumes
    }

    pub fn volume(&self, name: &str) -> Result<&Volume> {
        self.catalog
            .get(name)
            .filter(|v| v.state == State::Ready)
            .ok_or_else(|| Error::NoVolume(name.to_owned()))
    }

    fn check_room(&self, name: &str, more_bytes: u64) -> Result<()> {
        let total = self.catalog.provisioned_bytes().saturating_add(more_bytes);
        let limit = self.overcommit_limit();
        if total > limit {
            return Err(Error::Overcommit {
                name: name.to_owned(),
                requested: more_bytes,
                total,
                limit,
            });
        }
        let st = self.status()?;
        if st.mode == "out_of_data_space" || st.used_data_blocks >= st.total_data_blocks {
            return Err(Error::OutOfSpace {
                path: self.path.clone(),
                used: st.used_data_blocks,
                total: st.total_data_blocks,
            });
        }
        Ok(())
    }

    /// Records `volume` as creating, sends `message` to the pool, then records it ready;
    /// a refused message takes the record back out.
    fn create_with(
        &mut self,
        volume: Volume,
        message: impl FnOnce(&Pool) -> Result<()>,
    ) -> Result<()> {
        let name = volume.name.clone();
        let mut next = self.catalog.clone();
        next.next_thin_id = volume.thin_id + 1;
        next.volumes.push(volume);
        self.save(next)?;
        if let Err(e) = message(self) {
            let mut back = self.catalog.clone();
            back.volumes.retain(|v| v.name != name);
            self.save(back)?;
            return Err(e);
        }
        let mut done = self.catalog.clone();
        if let Some(v) = done.get_mut(&name) {
            v.state = State::Ready;
        }
        self.save(done)?;
        // Creating takes metadata blocks; one status ioctl. The volume exists either way.
        let _ = self.check_fullness();
        Ok(())
    }

    fn new_volume(
        &self,
        name: &str,
        size_bytes: u64,
        origin: Option<String>,
        kind: Kind,
    ) -> Result<Volume> {
        if self.catalog.get(name).is_some() {
            return Err(Error::VolumeExists(name.to_owned()));
        }
        let thin_id = self.catalog.next_thin_id.max(1);
        if thin_id > MAX_THIN_ID {
            return Err(Error::BadRequest {
                name: name.to_owned(),
                detail: "the pool has used up its thin device ids".into(),
            });
        }
        Ok(Volume {
            name: name.to_owned(),
            thin_id,
            size_bytes,
            origin,
            state: State::Creating,
            kind,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }

    /// Creates an empty thin volume of `size_bytes` (rounded up to 4 KiB).
    pub fn create_volume(&mut self, name: &str, size_bytes: u64) -> Result<&Volume> {
        check_name(name)?;
        let size = check_size(name, size_bytes)?;
        let volume = self.new_volume(name, size, None, Kind::Volume)?;
        self.check_room(name, size)?;
        let msg = format!("create_thin {}", volume.thin_id);
        self.create_with(volume, |p| {
            p.ctl.message(&p.pool_name(), &msg).map_err(p.dm_err())
        })?;
        tracing::info!(volume = name, size, "volume created");
        self.volume(name)
    }

    /// Snapshots `origin` as `name`: the snapshot keeps the origin's data as it is now.
    /// An active origin is suspended around the message so in-flight writes land first.
    pub fn snapshot(&mut self, origin: &str, name: &str) -> Result<&Volume> {
        self.thin_snapshot(origin, name, Kind::Snapshot, None)
    }

    /// A new volume `name` holding `source`'s data as it is now (a volume or a snapshot);
    /// it shares blocks with the source until either is written.
    pub fn clone_volume(&mut self, source: &str, name: &str) -> Result<&Volume> {
        self.thin_snapshot(source, name, Kind::Volume, None)
    }

    /// `clone_volume` at `size_bytes` (at least the source's size). One step: a thin
    /// device's length is only its table's, so the clone is recorded at its final size
    /// and reads zeros past the source's end; no expand follows that a crash could cut
    /// off.
    pub fn clone_volume_sized(
        &mut self,
        source: &str,
        name: &str,
        size_bytes: u64,
    ) -> Result<&Volume> {
        self.thin_snapshot(source, name, Kind::Volume, Some(size_bytes))
    }

    fn thin_snapshot(
        &mut self,
        origin: &str,
        name: &str,
        kind: Kind,
        size_bytes: Option<u64>,
    ) -> Result<&Volume> {
        check_name(name)?;
        let o = self.volume(origin)?.clone();
        let size = match size_bytes {
            None => o.size_bytes,
            Some(s) => {
                let s = check_size(name, s)?;
                if s < o.size_bytes {
                    return Err(Error::BadRequest {
                        name: name.to_owned(),
                        detail: format!(
                            "{s} bytes is smaller than its source {origin} ({} bytes)",
                            o.size_bytes
                        ),
                    });
                }
                s
            }
        };
        let volume = self.new_volume(name, size, Some(origin.to_owned()), kind)?;
        self.check_room(name, size)?;
        let msg = format!("create_snap {} {}", volume.thin_id, o.thin_id);
        let origin_dm = self.volume_dm_name(origin);
        self.create_with(volume, |p| {
            let active = p.ctl.info(&origin_dm).map_err(p.dm_err())?.is_some();
            if active {
                p.ctl.suspend(&origin_dm).map_err(p.dm_err())?;
            }
            let sent = p.ctl.message(&p.pool_name(), &msg);
            // Resume whatever the message did: a suspended origin blocks its users.
            let resumed = if active {
                p.ctl.resume(&origin_dm)
            } else {
                Ok(())
            };
            sent.and(resumed).map_err(p.dm_err())
        })?;
        tracing::info!(volume = name, origin, ?kind, "snapshot created");
        self.volume(name)
    }

    /// The device node of a volume, creating its `thin` device if it is not active.
    pub fn activate(&self, name: &str) -> Result<PathBuf> {
        let v = self.volume(name)?;
        let dm = self.volume_dm_name(name);
        let params = format!("{}:{} {}", self.pool_dev.0, self.pool_dev.1, v.thin_id);
        let (major, minor) = self.ensure_device(&dm, v.size_bytes / 512, "thin", &params)?;
        let node = self.opts.dev_dir.join("mapper").join(&dm);
        make_node(&node, major, minor)?;
        Ok(node)
    }

    /// Removes a volume's device (fails while it is open or mounted).
    pub fn deactivate(&self, name: &str) -> Result<()> {
        let dm = self.volume_dm_name(name);
        if self.ctl.info(&dm).map_err(self.dm_err())?.is_some() {
            self.ctl.remove(&dm).map_err(|e| Error::Busy {
                name: name.to_owned(),
                detail: e.to_string(),
            })?;
        }
        let _ = std::fs::remove_file(self.opts.dev_dir.join("mapper").join(&dm));
        Ok(())
    }

    /// Deletes a volume; the pool returns its blocks that no snapshot shares.
    pub fn delete(&mut self, name: &str) -> Result<()> {
        let v = self.volume(name)?.clone();
        self.deactivate(name)?;
        let mut next = self.catalog.clone();
        if let Some(e) = next.get_mut(name) {
            e.state = State::Deleting;
        }
        self.save(next)?;
        self.ctl
            .message(&self.pool_name(), &format!("delete {}", v.thin_id))
            .map_err(self.dm_err())?;
        let mut done = self.catalog.clone();
        done.volumes.retain(|e| e.name != name);
        self.save(done)?;
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Grows a volume to `size_bytes`; an active volume gets the new length at once.
    pub fn expand(&mut self, name: &str, size_bytes: u64) -> Result<()> {
        let v = self.volume(name)?.clone();
        let size = check_size(name, size_bytes)?;
        if size < v.size_bytes {
            return Err(Error::BadRequest {
                name: name.to_owned(),
                detail: format!("cannot shrink from {} to {size} bytes", v.size_bytes),
            });
        }
        if size == v.size_bytes {
            return Ok(());
        }
        self.check_room(name, size - v.size_bytes)?;
        let mut next = self.catalog.clone();
        if let Some(e) = next.get_mut(name) {
            e.size_bytes = size;
        }
        self.save(next)?;
        let dm = self.volume_dm_name(name);
        if self.ctl.info(&dm).map_err(self.dm_err())?.is_some() {
            let params = format!("{}:{} {}", self.pool_dev.0, self.pool_dev.1, v.thin_id);
            self.ctl
                .load_table(&dm, 0, size / 512, "thin", &params)
                .and_then(|()| self.ctl.resume(&dm))
                .map_err(self.dm_err())?;
        }
        tracing::info!(volume = name, size, "volume expanded");
        let _ = self.check_fullness();
        Ok(())
    }

    /// The (major, minor) of a volume's device, if it is active.
    pub fn device_number(&self, name: &str) -> Result<Option<(u32, u32)>> {
        self.ctl
            .info(&self.volume_dm_name(name))
            .map_err(self.dm_err())
    }

    /// The device node a volume has when active (whether or not it is now).
    pub fn device_node(&self, name: &str) -> PathBuf {
        self.opts
            .dev_dir
            .join("mapper")
            .join(self.volume_dm_name(name))
    }

    /// Mapped sectors of an active volume.
    pub fn usage(&self, name: &str) -> Result<ThinStatus> {
        self.volume(name)?;
        let lines = self
            .ctl
            .status(&self.volume_dm_name(name))
            .map_err(self.dm_err())?;
        let line = lines.first().cloned().unwrap_or_default();
        ThinStatus::parse(&line).map_err(self.dm_err())
    }
}

/// A block device node for a dm device; replaced if it points elsewhere (minors are
/// reused after a reboot).
pub fn make_node(path: &std::path::Path, major: u32, minor: u32) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let want = libc::makedev(major, minor);
    if let Ok(m) = std::fs::metadata(path) {
        if m.file_type().is_block_device() && m.rdev() == want {
            return Ok(());
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("failed to create", dir))?;
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Error::Io {
        op: "bad node path",
        path: path.to_owned(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    // SAFETY: a NUL-terminated path and plain integers.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, want) } != 0 {
        return Err(Error::io("failed to create device node", path)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_are_checked() {
        assert!(check_name("db-0.data_x").is_ok());
        for bad in ["", "-x", ".x", "A", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_round_up_to_4k_and_zero_is_refused() {
        assert_eq!(check_size("v", 1).unwrap(), 4096);
        assert_eq!(check_size("v", 8192).unwrap(), 8192);
        assert!(check_size("v", 0).is_err());
        assert!(check_size("v", u64::MAX).is_err());
    }
}
