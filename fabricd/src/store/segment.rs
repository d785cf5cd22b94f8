//! One segment on disk: its file names, its index, the directory's list of them, and
//! the open segment a class appends to.

use std::fs::{self, File, OpenOptions};
use std::io::{self};
use std::path::{Path, PathBuf};

use super::{SegInfo, INDEX_ENTRY};

pub(super) fn seg_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

pub(super) fn io_err(what: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("failed to {what} {}: {e}", path.display()),
    )
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("sync directory", dir, e))
}

pub(super) fn read_index(path: &Path) -> io::Result<Vec<(u32, u32)>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("read index", path, e)),
    };
    Ok(bytes
        .chunks_exact(INDEX_ENTRY as usize)
        .map(|c| {
            (
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect())
}

pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err("list", dir, e))? {
        let entry = entry.map_err(|e| io_err("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log") {
            match stem.parse::<u64>() {
                Ok(b) if stem.len() == 20 => bases.push(b),
                _ => {
                    tracing::warn!(file = %entry.path().display(), "ignoring a file that is not a segment")
                }
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

pub(super) struct Active {
    pub(super) base: u64,
    pub(super) log: File,
    pub(super) idx: File,
    /// Bytes written (durable after the next fsync).
    pub(super) len: u64,
    pub(super) records: u64,
    pub(super) last: Option<u64>,
    pub(super) pending: Vec<u8>,
    pub(super) pending_idx: Vec<u8>,
}

impl Active {
    pub(super) fn open(dir: &Path, info: &SegInfo) -> io::Result<Active> {
        let lp = seg_path(dir, info.base, "log");
        let ip = seg_path(dir, info.base, "idx");
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| io_err("open", p, e))
        };
        Ok(Active {
            base: info.base,
            log: open(&lp)?,
            idx: open(&ip)?,
            len: info.len,
            records: info.records,
            last: info.last,
            pending: Vec::new(),
            pending_idx: Vec::new(),
        })
    }
}
