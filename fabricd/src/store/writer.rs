//! The writer thread: takes every append waiting, writes them per class, fsyncs once
//! per group and only then acks (group commit); rolls segments and keeps the offset
//! floor.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::mpsc;

use crate::config::ClassConfig;
use crate::record::{self, FRAME_HEADER};

use super::segment::{io_err, seg_path, sync_dir, Active};
use super::{
    Ack, AppendError, Limits, Meta, Op, SegInfo, Shared, MAX_GROUP_BYTES, SPARE_BODIES,
    SPARE_BODY_BYTES,
};

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) classes: Vec<ClassConfig>,
    pub(super) limits: Limits,
    pub(super) active: Vec<Active>,
    /// Bytes on disk per class including what this group wrote (ahead of `Meta`).
    pub(super) class_bytes: Vec<u64>,
    pub(super) next_offset: u64,
    pub(super) floor_persisted: u64,
    pub(super) last_age_check: Instant,
}

impl Writer {
    pub(super) fn run(&mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            let mut bytes = 0usize;
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Append { bodies, .. } = &op {
                            bytes += bodies.iter().map(|(_, b)| b.len()).sum::<usize>();
                        }
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.group(batch);
        }
        tracing::debug!("log writer stopped");
    }

    pub(super) fn class_dir(&self, class: usize) -> PathBuf {
        self.shared.dir.join(&self.classes[class].name)
    }

    pub(super) fn group(&mut self, batch: Vec<Op>) {
        // Each op's results, in its bodies' order, answered once the group is synced.
        let mut answers: Vec<(Ack, Vec<Result<u64, AppendError>>)> =
            Vec::with_capacity(batch.len());
        // (class, framed size) of every append written.
        let mut written = Vec::new();
        let mut done = Vec::new();
        let mut failed: Option<String> = None;
        for op in batch {
            let Op::Append { bodies, ack } = op else {
                continue;
            };
            let mut results = Vec::with_capacity(bodies.len());
            for (class, body) in bodies {
                let result = match &failed {
                    Some(e) => Err(AppendError::Io(e.clone())),
                    None => self.write_one(class, body, &mut failed, &mut written, &mut done),
                };
                results.push(result);
            }
            answers.push((ack, results));
        }
        // Their bytes are in the pending buffers now.
        self.keep_spare(done);
        if let Err(e) = self.flush_all() {
            tracing::error!("{e}");
            // What was written but not synced may or may not survive; no producer is
            // told it is durable, and the writer reopens its segments on next start.
            for (ack, mut results) in answers {
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(AppendError::Io(e.to_string()));
                }
                let _ = ack.send(results);
            }
            return;
        }
        self.publish(&written);
        for (ack, results) in answers {
            let _ = ack.send(results);
        }
        self.retention();
    }

    /// Puts one body into its class's pending buffers (rolling the segment or making
    /// room first) and gives it its offset; an I/O failure is kept in `failed` so that
    /// the rest of the group is refused too.
    fn write_one(
        &mut self,
        class: usize,
        mut body: Vec<u8>,
        failed: &mut Option<String>,
        written: &mut Vec<(usize, u64)>,
        done: &mut Vec<Vec<u8>>,
    ) -> Result<u64, AppendError> {
        let size = (FRAME_HEADER + body.len()) as u64;
        let a = &self.active[class];
        // Index entries hold the offset relative to the segment's base in 32 bits;
        // offsets are global, so a quiet class among busy ones can outrun that.
        let rel_overflow = self.next_offset - a.base > u32::MAX as u64;
        if a.len > 0 && (a.len + size > self.limits.segment_bytes || rel_overflow) {
            if let Err(e) = self.roll(class) {
                tracing::error!("{e}");
                *failed = Some(e.to_string());
                return Err(AppendError::Io(e.to_string()));
            }
        }
        if let Err(e) = self.make_room(class, size) {
            if let AppendError::Io(m) = &e {
                *failed = Some(m.clone());
            }
            self.meta_mut().classes[class].stats.refused_full += 1;
            return Err(e);
        }
        let offset = self.next_offset;
        self.next_offset += 1;
        body[..8].copy_from_slice(&offset.to_le_bytes());
        let a = &mut self.active[class];
        let pos = a.len;
        a.pending_idx
            .extend_from_slice(&((offset - a.base) as u32).to_le_bytes());
        a.pending_idx.extend_from_slice(&(pos as u32).to_le_bytes());
        record::frame(&body, &mut a.pending);
        done.push(body);
        a.len += size;
        a.records += 1;
        a.last = Some(offset);
        self.class_bytes[class] += size;
        written.push((class, size));
        Ok(offset)
    }

    /// Hands bodies back for reuse (`Log::body_buffer`), as many as are kept.
    fn keep_spare(&self, bodies: Vec<Vec<u8>>) {
        let mut spare = edge_common::lock(&self.shared.spare);
        for mut b in bodies {
            if spare.len() >= SPARE_BODIES {
                break;
            }
            if b.capacity() <= SPARE_BODY_BYTES {
                b.clear();
                spare.push(b);
            }
        }
    }

    pub(super) fn meta_mut(&self) -> MutexGuard<'_, Meta> {
        edge_common::lock(&self.shared.meta)
    }

    /// Writes every class's pending bytes and makes them durable with one fsync per
    /// written segment.
    pub(super) fn flush_all(&mut self) -> io::Result<()> {
        for class in 0..self.active.len() {
            self.flush(class)?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self, class: usize) -> io::Result<()> {
        let dir = self.class_dir(class);
        let a = &mut self.active[class];
        if a.pending.is_empty() {
            return Ok(());
        }
        let lp = seg_path(&dir, a.base, "log");
        a.log
            .write_all(&a.pending)
            .and_then(|_| a.log.sync_data())
            .map_err(|e| io_err("write segment", &lp, e))?;
        // The index is rebuilt from the log after a crash, so it need not be synced here.
        a.idx
            .write_all(&a.pending_idx)
            .map_err(|e| io_err("write index", &seg_path(&dir, a.base, "idx"), e))?;
        a.pending.clear();
        a.pending_idx.clear();
        self.meta_mut().classes[class].stats.log_syncs += 1;
        Ok(())
    }

    /// Makes the just-synced appends visible to readers and counts them.
    pub(super) fn publish(&mut self, written: &[(usize, u64)]) {
        let mut meta = self.meta_mut();
        for (class, size) in written {
            let st = &mut meta.classes[*class].stats;
            st.appended_records += 1;
            st.appended_bytes += size;
        }
        for (class, a) in self.active.iter().enumerate() {
            let c = &mut meta.classes[class];
            c.bytes = self.class_bytes[class];
            if let Some(seg) = c.segments.back_mut() {
                if seg.base == a.base && seg.len != a.len {
                    seg.len = a.len;
                    seg.records = a.records;
                    seg.last = a.last;
                    seg.modified = SystemTime::now();
                }
            }
        }
        meta.next_offset = self.next_offset;
        drop(meta);
        self.shared.committed.send_replace(self.next_offset);
    }

    /// Seals the class's segment (synced with its index) and starts a new one.
    pub(super) fn roll(&mut self, class: usize) -> io::Result<()> {
        self.flush(class)?;
        let dir = self.class_dir(class);
        let a = &self.active[class];
        a.idx
            .sync_data()
            .map_err(|e| io_err("sync index", &seg_path(&dir, a.base, "idx"), e))?;
        let base = self.next_offset;
        let info = SegInfo {
            base,
            len: 0,
            records: 0,
            last: None,
            modified: SystemTime::now(),
        };
        let new = Active::open(&dir, &info)?;
        sync_dir(&dir)?;
        let old = std::mem::replace(&mut self.active[class], new);
        let mut meta = self.meta_mut();
        let segs = &mut meta.classes[class].segments;
        // `publish` only updates the class's newest segment: the appends of this group
        // that went into the sealed one (synced by the flush above) must be made
        // visible here, or readers, seeing a newer segment, skip past them.
        if let Some(seg) = segs.iter_mut().rev().find(|s| s.base == old.base) {
            seg.len = old.len;
            seg.records = old.records;
            seg.last = old.last;
            seg.modified = SystemTime::now();
        }
        segs.push_back(info);
        Ok(())
    }
}
