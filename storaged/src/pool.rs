//! The pool: claiming the configured device (refusing foreign data unless forced),
//! formatting it (superblock, catalog slots, zeroed thin metadata), reading the catalog
//! back, and building the thin pool from two linear device-mapper devices over the
//! metadata and data areas. Volume operations are in `volumes.rs`.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use edge_dm::{Control, ThinPoolStatus};

use crate::catalog::{self, Catalog};
use crate::error::{Error, Result};
use crate::superblock::{self, Probe, Superblock};

#[derive(Debug, Clone)]
pub struct Options {
    /// Where device nodes live (`/dev`); volume nodes go to `<dev_dir>/mapper/`.
    pub dev_dir: PathBuf,
    /// Overwrite whatever the device holds. Only ever set by an explicit instruction.
    pub force: bool,
    /// Volumes may promise this percentage of the data area in total.
    pub overcommit_percent: u32,
    /// Prefix of the device-mapper names (`<prefix>`, `<prefix>-meta`, `<prefix>-v-<volume>`).
    pub dm_prefix: String,
    /// The thin block size in sectors a new pool is formatted with (a power of two from
    /// 64 KiB to 1 GiB); an existing pool keeps the one it was made with.
    pub block_sectors: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dev_dir: PathBuf::from("/dev"),
            force: false,
            overcommit_percent: 200,
            dm_prefix: "edgepool".into(),
            block_sectors: superblock::DATA_BLOCK_SECTORS,
        }
    }
}

pub struct Pool {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) sb: Superblock,
    pub(crate) generation: u64,
    pub(crate) catalog: Catalog,
    pub(crate) ctl: Control,
    pub(crate) opts: Options,
    /// (major, minor) of the thin-pool device.
    pub(crate) pool_dev: (u32, u32),
    /// Whether `open` formatted the device (it was empty, or forced).
    pub formatted: bool,
    /// The near-full thresholds data and metadata use have crossed.
    pub(crate) near_full: crate::metrics::NearFull,
}

impl Pool {
    /// Claims `path`: opens the pool it holds, or formats it if it is empty (or `force`),
    /// then activates the thin pool and finishes any create or delete a crash cut short.
    pub fn open(path: &Path, opts: Options) -> Result<Pool> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Error::io("failed to open pool device", path))?;
        let bytes = (&file)
            .seek(SeekFrom::End(0))
            .map_err(Error::io("failed to size pool device", path))?;
        let mut head = vec![0u8; superblock::PROBE_BYTES.min(bytes as usize)];
        file.read_exact_at(&mut head, 0)
            .map_err(Error::io("failed to read pool device", path))?;
        let bad = |detail: String| Error::BadPool {
            path: path.to_owned(),
            detail,
        };
        let existing = match superblock::probe(&head) {
            Probe::Pool(Ok(sb)) if sb.device_bytes > bytes => {
                return Err(bad(format!(
                    "superblock says {} bytes but the device has {bytes} (device shrank?)",
                    sb.device_bytes
                )))
            }
            Probe::Pool(Ok(sb)) => Some(sb),
            Probe::Empty => None,
            _ if opts.force => None,
            Probe::Pool(Err(detail)) => return Err(bad(detail)),
            Probe::Foreign(found) => {
                return Err(Error::ForeignData {
                    path: path.to_owned(),
                    found,
                })
            }
        };
        let ctl = Control::open(&opts.dev_dir).map_err(|source| Error::DeviceMapper {
            path: path.to_owned(),
            source,
        })?;
        let formatted = existing.is_none();
        let (sb, generation, catalog) = match existing {
            Some(sb) => {
                let (generation, catalog) = read_catalog(&file, path, &sb)?;
                (sb, generation, catalog)
            }
            None => {
                let sb = format(&file, path, bytes, opts.block_sectors)?;
                (sb, 1, Catalog::default())
            }
        };
        tracing::info!(
            device = %path.display(),
            uuid = %sb.uuid_string(),
            generation,
            volumes = catalog.volumes.len(),
            formatted,
            "pool claimed"
        );
        let mut pool = Pool {
            path: path.to_owned(),
            file,
            sb,
            generation,
            catalog,
            ctl,
            opts,
            pool_dev: (0, 0),
            formatted,
            near_full: Default::default(),
        };
        pool.activate_pool()?;
        pool.recover()?;
        // A pool already past a threshold is worth a warning at every start.
        if let Err(e) = pool.check_fullness() {
            tracing::warn!("pool use check: {e}");
        }
        Ok(pool)
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn device(&self) -> &Path {
        &self.path
    }

    pub(crate) fn dm_err(&self) -> impl Fn(edge_dm::Error) -> Error + '_ {
        move |source| Error::DeviceMapper {
            path: self.path.clone(),
            source,
        }
    }

    pub(crate) fn pool_name(&self) -> String {
        self.opts.dm_prefix.clone()
    }

    /// The thin pool's status: transaction id, metadata and data blocks used, mode.
    pub fn status(&self) -> Result<ThinPoolStatus> {
        let lines = self.ctl.status(&self.pool_name()).map_err(self.dm_err())?;
        let line = lines.first().ok_or_else(|| Error::BadPool {
            path: self.path.clone(),
            detail: "device-mapper: thin pool has no target".into(),
        })?;
        ThinPoolStatus::parse(line).map_err(self.dm_err())
    }

    /// Reads the pool's use and logs a warning for each near-full threshold (80, 90,
    /// 95%) data or metadata use crossed since the last look, or that it is back below.
    pub fn check_fullness(&mut self) -> Result<ThinPoolStatus> {
        let st = self.status()?;
        let name = format!("{} on {}", self.pool_name(), self.path.display());
        self.near_full.observe(&name, &st);
        Ok(st)
    }

    /// The highest near-full thresholds crossed at the last look.
    pub fn near_full(&self) -> crate::metrics::NearFull {
        self.near_full
    }

    /// Bytes the volumes may promise in total.
    pub fn overcommit_limit(&self) -> u64 {
        self.sb.data_bytes / 100 * u64::from(self.opts.overcommit_percent)
    }

    /// Writes the next catalog generation to the slot the current one is not in, and
    /// makes it durable before returning.
    pub(crate) fn save(&mut self, catalog: Catalog) -> Result<()> {
        let generation = self.generation + 1;
        write_catalog(&self.file, &self.path, &self.sb, generation, &catalog)?;
        self.generation = generation;
        self.catalog = catalog;
        Ok(())
    }

    fn activate_pool(&mut self) -> Result<()> {
        let meta = std::fs::metadata(&self.path)
            .map_err(Error::io("failed to stat pool device", &self.path))?;
        // A regular file cannot back a linear target; the kernel would refuse anyway, but
        // this names the real problem.
        if meta.rdev() == 0 {
            return Err(Error::BadPool {
                path: self.path.clone(),
                detail: "not a block device".into(),
            });
        }
        let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
        let p = self.opts.dm_prefix.clone();
        let meta_dev = self.ensure_device(
            &format!("{p}-meta"),
            self.sb.meta_bytes / 512,
            "linear",
            &edge_dm::linear_params(major, minor, self.sb.meta_offset / 512),
        )?;
        let data_dev = self.ensure_device(
            &format!("{p}-data"),
            self.sb.data_bytes / 512,
            "linear",
            &edge_dm::linear_params(major, minor, self.sb.data_offset / 512),
        )?;
        let blocks = self.sb.data_bytes / (u64::from(self.sb.data_block_sectors) * 512);
        // error_if_no_space: a full pool fails writes at once instead of queueing them
        // for a minute, so the writer sees the error while its earlier data stays intact.
        let params = format!(
            "{}:{} {}:{} {} {} 1 error_if_no_space",
            meta_dev.0,
            meta_dev.1,
            data_dev.0,
            data_dev.1,
            self.sb.data_block_sectors,
            (blocks / 10).max(1)
        );
        self.pool_dev = self.ensure_device(&p, self.sb.data_bytes / 512, "thin-pool", &params)?;
        Ok(())
    }

    /// Creates, loads and resumes a one-target device unless it already exists (storaged
    /// restarted without a reboot).
    pub(crate) fn ensure_device(
        &self,
        name: &str,
        sectors: u64,
        target: &str,
        params: &str,
    ) -> Result<(u32, u32)> {
        if let Some(dev) = self.ctl.info(name).map_err(self.dm_err())? {
            return Ok(dev);
        }
        let dev = self.ctl.create(name, 0).map_err(self.dm_err())?;
        let live = self
            .ctl
            .load_table(name, 0, sectors, target, params)
            .and_then(|()| self.ctl.resume(name));
        if let Err(e) = live {
            let _ = self.ctl.remove(name);
            return Err(self.dm_err()(e));
        }
        Ok(dev)
    }

    /// Undoes creates and finishes deletes that a crash interrupted, and resumes volume
    /// devices a crash left suspended (a snapshot suspends its active origin around
    /// `create_snap`; a suspended device blocks every reader and writer).
    fn recover(&mut self) -> Result<()> {
        for v in self
            .catalog
            .volumes
            .iter()
            .filter(|v| v.state == catalog::State::Ready)
        {
            let dm = self.volume_dm_name(&v.name);
            if self.ctl.info(&dm).map_err(self.dm_err())?.is_some() {
                // Without a new table this only resumes a suspended device.
                self.ctl.resume(&dm).map_err(self.dm_err())?;
            }
        }
        let mut catalog = self.catalog.clone();
        let before = catalog.volumes.len();
        let pool = self.pool_name();
        catalog.volumes.retain(|v| {
            if v.state == catalog::State::Ready {
                return true;
            }
            // Either step may have happened or not; a delete of an id the pool does not
            // have fails harmlessly.
            let r = self.ctl.message(&pool, &format!("delete {}", v.thin_id));
            tracing::warn!(volume = %v.name, state = ?v.state, result = ?r, "finishing an interrupted operation");
            false
        });
        if catalog.volumes.len() != before {
            self.save(catalog)?;
        }
        Ok(())
    }

    /// Removes the volume devices and the pool devices (the pool commits its metadata
    /// when it is suspended for removal). The on-disk pool is untouched.
    pub fn close(self) -> Result<()> {
        let p = self.opts.dm_prefix.clone();
        for v in &self.catalog.volumes {
            let name = self.volume_dm_name(&v.name);
            if self.ctl.info(&name).map_err(self.dm_err())?.is_some() {
                self.ctl.remove(&name).map_err(self.dm_err())?;
            }
        }
        for name in [p.clone(), format!("{p}-data"), format!("{p}-meta")] {
            if self.ctl.info(&name).map_err(self.dm_err())?.is_some() {
                self.ctl.remove(&name).map_err(self.dm_err())?;
            }
        }
        Ok(())
    }

    pub(crate) fn volume_dm_name(&self, volume: &str) -> String {
        format!("{}-v-{volume}", self.opts.dm_prefix)
    }
}

/// The catalog a pool device holds now, read without claiming the device or touching
/// device-mapper (for tools and tests that look while storaged runs).
pub fn read_catalog_of(path: &Path) -> Result<(u64, Catalog)> {
    let file = File::open(path).map_err(Error::io("failed to open pool device", path))?;
    let mut head = vec![0u8; superblock::PROBE_BYTES];
    file.read_exact_at(&mut head, 0)
        .map_err(Error::io("failed to read pool device", path))?;
    match superblock::probe(&head) {
        Probe::Pool(Ok(sb)) => read_catalog(&file, path, &sb),
        _ => Err(Error::BadPool {
            path: path.to_owned(),
            detail: "no valid pool superblock".into(),
        }),
    }
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        let _ = f.read_exact_at(&mut u, 0);
    }
    if u == [0; 16] {
        // No urandom node: the time is unique enough to tell pools apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(1);
        u = t.to_le_bytes();
    }
    // RFC 4122 version 4, variant 1.
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Formats the device. The superblock is written last, so a crash before it leaves a
/// device whose start is zero: the next claim formats again.
fn format(file: &File, path: &Path, bytes: u64, block_sectors: u32) -> Result<Superblock> {
    if !superblock::valid_block_sectors(block_sectors) {
        return Err(Error::BadPool {
            path: path.to_owned(),
            detail: format!(
                "a thin block of {block_sectors} sectors: the kernel takes a power of two from 64 KiB to 1 GiB"
            ),
        });
    }
    let sb = Superblock::layout(random_uuid(), bytes, block_sectors).ok_or(Error::TooSmall {
        path: path.to_owned(),
        bytes,
        min: superblock::min_device_bytes(block_sectors),
    })?;
    let write = |off: u64, b: &[u8]| {
        file.write_all_at(b, off)
            .map_err(Error::io("failed to write pool device", path))
    };
    // Old signatures in the first MiB, both catalog slot headers, and the start of the
    // thin metadata (all-zero there makes the kernel format fresh metadata).
    write(0, &vec![0u8; 1 << 20])?;
    write(sb.catalog_offset, &[0u8; 4096])?;
    write(sb.catalog_offset + sb.catalog_slot_bytes, &[0u8; 4096])?;
    write(sb.meta_offset, &[0u8; 4096])?;
    write_catalog(file, path, &sb, 1, &Catalog::default())?;
    write(0, &sb.encode())?;
    file.sync_all()
        .map_err(Error::io("failed to flush pool device", path))?;
    tracing::info!(device = %path.display(), uuid = %sb.uuid_string(), data_bytes = sb.data_bytes, "pool formatted");
    Ok(sb)
}

fn slot_offset(sb: &Superblock, generation: u64) -> u64 {
    sb.catalog_offset + (generation % 2) * sb.catalog_slot_bytes
}

fn write_catalog(
    file: &File,
    path: &Path,
    sb: &Superblock,
    generation: u64,
    catalog: &Catalog,
) -> Result<()> {
    let record = catalog::encode(&sb.uuid, generation, catalog, sb.catalog_slot_bytes).ok_or(
        Error::BadPool {
            path: path.to_owned(),
            detail: "catalog no longer fits its slot".into(),
        },
    )?;
    file.write_all_at(&record, slot_offset(sb, generation))
        .map_err(Error::io("failed to write catalog on", path))?;
    file.sync_data()
        .map_err(Error::io("failed to flush catalog on", path))
}

fn read_catalog(file: &File, path: &Path, sb: &Superblock) -> Result<(u64, Catalog)> {
    let mut slots = [
        vec![0u8; sb.catalog_slot_bytes as usize],
        vec![0u8; sb.catalog_slot_bytes as usize],
    ];
    for (g, slot) in slots.iter_mut().enumerate() {
        file.read_exact_at(slot, slot_offset(sb, g as u64))
            .map_err(Error::io("failed to read catalog on", path))?;
    }
    catalog::newest(&sb.uuid, [&slots[0], &slots[1]]).ok_or(Error::BadPool {
        path: path.to_owned(),
        detail: "neither catalog slot holds a valid record".into(),
    })
}
