//! What goes when: room made within the quota by priority (lower classes' oldest
//! sealed segments first, then a drop-oldest class's own), and the size and age limits
//! per class.

use std::fs::{self, File};
use std::io::{self, Write};
use std::time::{Duration, Instant};

use crate::config::WhenFull;

use super::segment::{io_err, read_index, seg_path, sync_dir};
use super::writer::Writer;
use super::{AppendError, FLOOR_FILE};

impl Writer {
    /// Frees space for `size` more bytes of `class` within the quota: lower-priority
    /// classes give up their oldest sealed segments first, then this class if it is
    /// drop-oldest. Otherwise the producer is told "full".
    pub(super) fn make_room(&mut self, class: usize, size: u64) -> Result<(), AppendError> {
        let me = self.classes[class].clone();
        let mut victims: Vec<usize> = (0..self.classes.len())
            .filter(|&c| {
                self.classes[c].priority < me.priority
                    || (c == class && me.when_full == WhenFull::DropOldest)
            })
            .collect();
        // Lowest priority first; our own class last among equals.
        victims.sort_by_key(|&c| (self.classes[c].priority, c == class));
        let mut vi = 0;
        while self.class_bytes.iter().sum::<u64>() + size > self.limits.quota_bytes {
            let Some(&victim) = victims.get(vi) else {
                return Err(AppendError::Full(me.name));
            };
            match self.delete_oldest(victim, "quota") {
                Ok(true) => {}
                Ok(false) => vi += 1,
                Err(e) => {
                    tracing::error!("{e}");
                    return Err(AppendError::Io(e.to_string()));
                }
            }
        }
        Ok(())
    }

    /// Deletes the oldest sealed segment of `class`; false when it has none.
    pub(super) fn delete_oldest(&mut self, class: usize, why: &str) -> io::Result<bool> {
        let (seg, acked) = {
            let meta = self.meta_mut();
            let c = &meta.classes[class];
            if c.segments.len() < 2 {
                return Ok(false);
            }
            (c.segments[0].clone(), c.acked)
        };
        // The floor must be durable before the highest offsets could vanish with a file.
        if self.floor_persisted < self.next_offset {
            let path = self.shared.dir.join(FLOOR_FILE);
            let tmp = self.shared.dir.join("offsets.floor.tmp");
            let mut f = File::create(&tmp).map_err(|e| io_err("create", &tmp, e))?;
            f.write_all(format!("{}\n", self.next_offset).as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| io_err("write", &tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| io_err("rename", &tmp, e))?;
            sync_dir(&self.shared.dir)?;
            self.floor_persisted = self.next_offset;
        }
        let dir = self.class_dir(class);
        let unsent = match (acked, seg.last) {
            (_, None) => 0,
            (None, Some(_)) => seg.records,
            (Some(a), Some(last)) if last <= a => 0,
            (Some(a), Some(_)) if seg.base > a => seg.records,
            (Some(a), Some(_)) => {
                let idx = read_index(&seg_path(&dir, seg.base, "idx"))?;
                idx.iter()
                    .filter(|(rel, _)| seg.base + *rel as u64 > a)
                    .count() as u64
            }
        };
        for ext in ["log", "idx"] {
            let p = seg_path(&dir, seg.base, ext);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("delete", &p, e)),
            }
        }
        self.class_bytes[class] -= seg.len.min(self.class_bytes[class]);
        let mut meta = self.meta_mut();
        let c = &mut meta.classes[class];
        c.segments.pop_front();
        c.bytes = self.class_bytes[class];
        c.stats.retired_records += seg.records;
        c.stats.dropped_records += unsent;
        if unsent > 0 {
            tracing::warn!(class = %c.name, segment = seg.base, records = seg.records, unsent, reason = why, "deleted a segment whose records the core had not acknowledged");
        } else {
            tracing::info!(class = %c.name, segment = seg.base, records = seg.records, reason = why, "deleted a segment");
        }
        Ok(true)
    }

    /// Size and age limits per class; only sealed segments go.
    pub(super) fn retention(&mut self) {
        let check_age = self.last_age_check.elapsed() >= Duration::from_secs(1);
        if check_age {
            self.last_age_check = Instant::now();
        }
        for class in 0..self.classes.len() {
            // A quiet class's only segment would never be sealed and so never age out:
            // seal it once its newest record is older than the limit.
            let stale_active = check_age
                && self.active[class].len > 0
                && self.classes[class].max_age_secs.is_some_and(|age| {
                    let meta = self.meta_mut();
                    meta.classes[class].segments.back().is_some_and(|s| {
                        s.modified
                            .elapsed()
                            .is_ok_and(|e| e > Duration::from_secs(age))
                    })
                });
            if stale_active {
                if let Err(e) = self.roll(class) {
                    tracing::error!("{e}");
                }
            }
            loop {
                let over_size = self.classes[class]
                    .max_bytes
                    .is_some_and(|m| self.class_bytes[class] > m);
                let too_old = check_age
                    && self.classes[class].max_age_secs.is_some_and(|age| {
                        let meta = self.meta_mut();
                        let c = &meta.classes[class];
                        c.segments.len() >= 2
                            && c.segments[0]
                                .modified
                                .elapsed()
                                .is_ok_and(|e| e > Duration::from_secs(age))
                    });
                if !over_size && !too_old {
                    break;
                }
                let why = if over_size {
                    "max_bytes"
                } else {
                    "max_age_secs"
                };
                match self.delete_oldest(class, why) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        tracing::error!("{e}");
                        break;
                    }
                }
            }
        }
    }
}
