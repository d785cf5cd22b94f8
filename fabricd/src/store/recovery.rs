//! Opening a segment after a stop or a power cut: a sealed segment's index is trusted
//! when its last entry checks out; otherwise every record is read, a torn or corrupted
//! tail cut off and the index rewritten.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::SystemTime;

use crate::record::{self, FRAME_HEADER};

use super::segment::io_err;
use super::{SegInfo, INDEX_ENTRY};

/// Trusts a sealed segment's index when its last entry names a whole, valid record that
/// ends exactly at the end of the file.
pub(super) fn quick_check(log: &Path, idx: &Path, base: u64) -> io::Result<Option<SegInfo>> {
    let file = File::open(log).map_err(|e| io_err("open segment", log, e))?;
    let m = file
        .metadata()
        .map_err(|e| io_err("stat segment", log, e))?;
    let idx_len = fs::metadata(idx).map(|m| m.len()).unwrap_or(u64::MAX);
    if idx_len == u64::MAX || !idx_len.is_multiple_of(INDEX_ENTRY) {
        return Ok(None);
    }
    let modified = m.modified().unwrap_or(SystemTime::now());
    if idx_len == 0 {
        return Ok((m.len() == 0).then_some(SegInfo {
            base,
            len: 0,
            records: 0,
            last: None,
            modified,
        }));
    }
    let idx_file = File::open(idx).map_err(|e| io_err("open index", idx, e))?;
    let mut entry = [0u8; 8];
    idx_file
        .read_exact_at(&mut entry, idx_len - INDEX_ENTRY)
        .map_err(|e| io_err("read index", idx, e))?;
    let rel = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]) as u64;
    let pos = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]) as u64;
    if pos + FRAME_HEADER as u64 > m.len() {
        return Ok(None);
    }
    let mut frame = vec![0u8; (m.len() - pos) as usize];
    file.read_exact_at(&mut frame, pos)
        .map_err(|e| io_err("read segment", log, e))?;
    match record::check_frame(&frame) {
        Ok(Some(n)) if n == frame.len() && record::frame_offset(&frame) == Some(base + rel) => {
            Ok(Some(SegInfo {
                base,
                len: m.len(),
                records: idx_len / INDEX_ENTRY,
                last: Some(base + rel),
                modified,
            }))
        }
        _ => Ok(None),
    }
}

/// Reads a whole segment, checking every CRC; cuts a torn or corrupted tail off with a
/// warning (every record before it is kept) and rewrites the index.
pub(super) fn scan_and_repair(log: &Path, idx: &Path, base: u64) -> io::Result<SegInfo> {
    let data = fs::read(log).map_err(|e| io_err("read segment", log, e))?;
    let mut pos = 0usize;
    let mut entries = Vec::new();
    let mut last = None;
    let mut problem = None;
    while pos < data.len() {
        match record::check_frame(&data[pos..]) {
            Ok(Some(n)) => {
                let Some(off) = record::frame_offset(&data[pos..n + pos]) else {
                    problem = Some(format!("a {n}-byte frame too short for a record"));
                    break;
                };
                let in_order =
                    off >= base && last.is_none_or(|l| off > l) && off - base <= u32::MAX as u64;
                if !in_order {
                    problem = Some(format!("record offset {off} out of order"));
                    break;
                }
                entries.extend_from_slice(&((off - base) as u32).to_le_bytes());
                entries.extend_from_slice(&(pos as u32).to_le_bytes());
                last = Some(off);
                pos += n;
            }
            Ok(None) => {
                problem = Some("torn record (file ends inside it)".to_string());
                break;
            }
            Err(e) => {
                problem = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(why) = &problem {
        tracing::warn!(
            segment = %log.display(),
            position = pos,
            dropped_bytes = data.len() - pos,
            "truncating segment tail: {why}; the {} records before it are kept",
            entries.len() / INDEX_ENTRY as usize
        );
        let f = OpenOptions::new()
            .write(true)
            .open(log)
            .map_err(|e| io_err("open segment", log, e))?;
        f.set_len(pos as u64)
            .and_then(|_| f.sync_all())
            .map_err(|e| io_err("truncate segment", log, e))?;
    }
    let mut f = File::create(idx).map_err(|e| io_err("create index", idx, e))?;
    f.write_all(&entries)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err("write index", idx, e))?;
    let modified = fs::metadata(log)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::now());
    Ok(SegInfo {
        base,
        len: pos as u64,
        records: entries.len() as u64 / INDEX_ENTRY,
        last,
        modified,
    })
}
