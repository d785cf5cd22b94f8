//! Reading: a cursor per class, records read only up to what the writer has fsynced.

use std::fs::File;
use std::io::{self};
use std::os::unix::fs::FileExt;

use crate::record::{self, Stored, FRAME_HEADER};

use super::segment::{io_err, read_index, seg_path};
use super::Log;

impl Log {
    /// Reads durable records of `class` from the cursor on, at most about `max_bytes`
    /// (at least one record when there is one). Blocking: call from a blocking thread.
    pub fn read(&self, cur: &mut Cursor, max_bytes: usize) -> io::Result<Vec<Stored>> {
        let dir = self.class_dir(&self.meta().classes[cur.class].name);
        loop {
            let (base, committed, sealed_next) = {
                let meta = self.meta();
                let segs = &meta.classes[cur.class].segments;
                let found = cur
                    .seg_base
                    .and_then(|b| segs.iter().position(|s| s.base == b));
                let i = match found {
                    Some(i) => i,
                    None => {
                        // Start, or our segment was deleted by retention: seek.
                        let i = segs.iter().rposition(|s| s.base <= cur.next).unwrap_or(0);
                        cur.seg_base = Some(segs[i].base);
                        cur.pos = None;
                        cur.file = None;
                        i
                    }
                };
                (segs[i].base, segs[i].len, segs.get(i + 1).map(|s| s.base))
            };
            let lp = seg_path(&dir, base, "log");
            if cur.file.is_none() {
                cur.file = Some(File::open(&lp).map_err(|e| io_err("open segment", &lp, e))?);
            }
            let pos = match cur.pos {
                Some(p) => p,
                None => {
                    let idx = read_index(&seg_path(&dir, base, "idx"))?;
                    let want = cur.next.saturating_sub(base);
                    let i = idx.partition_point(|&(rel, _)| (rel as u64) < want);
                    let p = idx
                        .get(i)
                        .map_or(committed, |&(_, p)| (p as u64).min(committed));
                    cur.pos = Some(p);
                    p
                }
            };
            if pos >= committed {
                match sealed_next {
                    Some(next_base) => {
                        cur.seg_base = Some(next_base);
                        cur.pos = Some(0);
                        cur.file = None;
                        cur.next = cur.next.max(next_base);
                        continue;
                    }
                    None => return Ok(Vec::new()),
                }
            }
            let file = cur.file.as_ref().expect("opened above");
            let mut want = (committed - pos).min(max_bytes as u64) as usize;
            let mut buf = vec![0u8; want.max(FRAME_HEADER)];
            loop {
                buf.resize(want, 0);
                file.read_exact_at(&mut buf, pos)
                    .map_err(|e| io_err("read segment", &lp, e))?;
                if buf.len() >= FRAME_HEADER {
                    let first = FRAME_HEADER
                        + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if first > buf.len() && (first as u64) <= committed - pos {
                        want = first;
                        continue;
                    }
                }
                break;
            }
            let mut out = Vec::new();
            let mut at = 0usize;
            while at < buf.len() {
                match record::check_frame(&buf[at..]) {
                    Ok(Some(n)) => {
                        let s = record::decode_frame(&buf[at..at + n]).map_err(|e| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("{} at {}: {e}", lp.display(), pos + at as u64),
                            )
                        })?;
                        at += n;
                        if s.offset >= cur.next {
                            cur.next = s.offset + 1;
                            out.push(s);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Damage inside the durable part: skip the rest of this segment
                        // rather than stall the uplink forever.
                        tracing::error!(segment = %lp.display(), position = pos + at as u64, "skipping the rest of a damaged segment: {e}");
                        at = (committed - pos) as usize;
                        break;
                    }
                }
            }
            if at == 0 {
                // A length field that points past the durable end: damage, not a torn
                // write (those are cut at start-up).
                tracing::error!(segment = %lp.display(), position = pos, "skipping the rest of a segment with a bad record length");
                at = (committed - pos) as usize;
            }
            cur.pos = Some(pos + at as u64);
            if !out.is_empty() || (sealed_next.is_none() && pos + at as u64 >= committed) {
                return Ok(out);
            }
        }
    }
}

/// A reader's position in one class.
pub struct Cursor {
    pub class: usize,
    /// First offset not yet returned.
    pub next: u64,
    seg_base: Option<u64>,
    pos: Option<u64>,
    file: Option<File>,
}

impl Cursor {
    pub fn new(class: usize, next: u64) -> Cursor {
        Cursor {
            class,
            next,
            seg_base: None,
            pos: None,
            file: None,
        }
    }
}
