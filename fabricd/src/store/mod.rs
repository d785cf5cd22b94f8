//! The durable local log: one directory per topic class, each a run of append-only
//! segment files (`<base offset>.log`) with a dense offset index beside each
//! (`<base offset>.idx`, entries `[u32 offset - base][u32 position]`, little-endian).
//!
//! One writer thread owns the open segments. It takes every append waiting in its queue,
//! writes them per class, fsyncs once for the whole group and only then acks the
//! producers (group commit). Offsets are global across classes so that
//! `site/machine/offset` names one record forever; `offsets.floor` keeps the next offset
//! from going back when retention deletes a class's newest records' segment.
//!
//! Readers (the uplink) see only what has been fsynced: the writer publishes each
//! segment's committed length in [`Meta`] after the fsync.
//!
//! The rooms: `segment` (the files, their index, the open segment), `recovery` (a
//! segment checked or repaired when opened), `writer` (the group-commit thread),
//! `retention` (quota by priority, age and size), `cursor` (reads); this file is the
//! handle the rest of fabricd uses.

mod cursor;
mod recovery;
mod retention;
mod segment;
mod writer;

pub use cursor::Cursor;

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::ClassConfig;
use recovery::{quick_check, scan_and_repair};
use segment::{io_err, list_segments, seg_path, sync_dir, Active};
use writer::Writer;

const INDEX_ENTRY: u64 = 8;
const FLOOR_FILE: &str = "offsets.floor";
/// Appends taken into one group commit at most; bounds the latency of the first ack.
const MAX_GROUP_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("full: the local quota is reached and class `{0}` keeps its records")]
    Full(String),
    #[error("log write failed: {0}")]
    Io(String),
    #[error("the log is shut down")]
    Closed,
}

/// The log's limits, from the config.
#[derive(Debug, Clone)]
pub struct Limits {
    pub quota_bytes: u64,
    pub segment_bytes: u64,
}

/// What is known of one segment, as far as it is durable.
#[derive(Debug, Clone)]
pub struct SegInfo {
    pub base: u64,
    /// Committed (fsynced) length in bytes.
    pub len: u64,
    pub records: u64,
    pub last: Option<u64>,
    pub modified: SystemTime,
}

/// Counters per class, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ClassStats {
    pub appended_records: u64,
    pub appended_bytes: u64,
    /// Records deleted by retention or the quota before the core acked them.
    pub dropped_records: u64,
    /// Records deleted by retention or the quota in all.
    pub retired_records: u64,
    /// Appends answered "full".
    pub refused_full: u64,
    /// fsyncs of the class's log (one per group commit that wrote to it).
    pub log_syncs: u64,
}

#[derive(Debug)]
pub struct ClassMeta {
    pub name: String,
    /// Oldest first; the last one is the segment being written.
    pub segments: VecDeque<SegInfo>,
    pub bytes: u64,
    /// Highest offset the core acknowledged (set by the uplink).
    pub acked: Option<u64>,
    pub stats: ClassStats,
}

#[derive(Debug)]
pub struct Meta {
    pub classes: Vec<ClassMeta>,
    /// Offset the next append gets (durable or not).
    pub next_offset: u64,
}

struct Shared {
    dir: PathBuf,
    meta: Mutex<Meta>,
    committed: watch::Sender<u64>,
    /// Bodies the writer is done with, for the next appends to encode into: their memory
    /// is then freed (or reused) by the thread that allocated it, not by the writer,
    /// which would contend with it for the allocator's lock at every record.
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Spare bodies kept at most, and the largest kept (bigger ones are freed).
const SPARE_BODIES: usize = 512;
const SPARE_BODY_BYTES: usize = 4096;

/// The results of one `Op::Append`'s bodies, in their order.
type Ack = oneshot::Sender<Vec<Result<u64, AppendError>>>;

enum Op {
    /// Bodies queued together (a connection's buffered frames), each with its class;
    /// they go into one group commit and are answered at once.
    Append {
        bodies: Vec<(usize, Vec<u8>)>,
        ack: Ack,
    },
    Tick,
}

/// Appends queued together, resolving once the writer synced (or refused) them.
pub struct Durable {
    rx: oneshot::Receiver<Vec<Result<u64, AppendError>>>,
    n: usize,
}

impl Durable {
    /// Whether the results are in (waiting would not block).
    pub fn is_ready(&self) -> bool {
        !self.rx.is_empty()
    }

    /// Each append's offset or refusal, in the order they were queued.
    pub async fn all(self) -> Vec<Result<u64, AppendError>> {
        match self.rx.await {
            Ok(results) => results,
            Err(_) => vec![Err(AppendError::Closed); self.n],
        }
    }

    /// The first append's result (for a single one).
    pub async fn one(self) -> Result<u64, AppendError> {
        self.all()
            .await
            .into_iter()
            .next()
            .unwrap_or(Err(AppendError::Closed))
    }
}

/// Handle to the log; cheap to clone.
#[derive(Clone)]
pub struct Log {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
}

impl Log {
    /// Opens (recovering) or creates the log under `dir` and starts its writer thread.
    pub fn open(dir: &Path, classes: &[ClassConfig], limits: Limits) -> io::Result<Log> {
        fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        let floor = match fs::read_to_string(dir.join(FLOOR_FILE)) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} does not hold a number", dir.join(FLOOR_FILE).display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err("read", &dir.join(FLOOR_FILE), e)),
        };
        let mut next_offset = floor;
        let mut metas = Vec::new();
        for class in classes {
            let cdir = dir.join(&class.name);
            fs::create_dir_all(&cdir).map_err(|e| io_err("create", &cdir, e))?;
            let bases = list_segments(&cdir)?;
            let mut segments = VecDeque::new();
            for (i, &base) in bases.iter().enumerate() {
                let (lp, ip) = (seg_path(&cdir, base, "log"), seg_path(&cdir, base, "idx"));
                let is_last = i + 1 == bases.len();
                let info = match (!is_last)
                    .then(|| quick_check(&lp, &ip, base))
                    .transpose()?
                {
                    Some(Some(info)) => info,
                    _ => scan_and_repair(&lp, &ip, base)?,
                };
                next_offset = next_offset.max(info.last.map_or(base, |l| l + 1));
                segments.push_back(info);
            }
            let bytes = segments.iter().map(|s| s.len).sum();
            metas.push(ClassMeta {
                name: class.name.clone(),
                segments,
                bytes,
                acked: None,
                stats: ClassStats::default(),
            });
        }
        // Every class needs a segment to write into; an empty one starts at the next offset.
        let mut active = Vec::new();
        for (class, meta) in classes.iter().zip(metas.iter_mut()) {
            let cdir = dir.join(&class.name);
            if meta.segments.is_empty() {
                meta.segments.push_back(SegInfo {
                    base: next_offset,
                    len: 0,
                    records: 0,
                    last: None,
                    modified: SystemTime::now(),
                });
                File::create(seg_path(&cdir, next_offset, "log"))
                    .and_then(|_| File::create(seg_path(&cdir, next_offset, "idx")))
                    .map_err(|e| io_err("create segment in", &cdir, e))?;
                sync_dir(&cdir)?;
            }
            let info = meta.segments.back().expect("pushed above");
            active.push(Active::open(&cdir, info)?);
        }
        let class_bytes = metas.iter().map(|m| m.bytes).collect();
        let (committed, _) = watch::channel(next_offset);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            meta: Mutex::new(Meta {
                classes: metas,
                next_offset,
            }),
            committed,
            spare: Mutex::new(Vec::new()),
        });
        let (tx, rx) = mpsc::channel(16384);
        let mut writer = Writer {
            shared: shared.clone(),
            classes: classes.to_vec(),
            limits,
            active,
            class_bytes,
            next_offset,
            floor_persisted: floor,
            last_age_check: Instant::now(),
        };
        std::thread::Builder::new()
            .name("fabricd-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io::Error::other(format!("failed to start the log writer: {e}")))?;
        let ticker = tx.downgrade();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            // Age retention must also run while no producer writes.
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match ticker.upgrade() {
                        Some(tx) => {
                            let _ = tx.try_send(Op::Tick);
                        }
                        None => break,
                    }
                }
            });
        }
        tracing::info!(dir = %dir.display(), next_offset, "log open");
        Ok(Log { shared, tx })
    }

    /// An empty buffer to encode a body into: one the writer is done with when there is.
    pub fn body_buffer(&self) -> Vec<u8> {
        let mut spare = edge_common::lock(&self.shared.spare);
        spare.pop().unwrap_or_default()
    }

    /// Queues a record body for the next group commit; it resolves once it is durable
    /// (or refused). Waits while the writer's queue is full.
    pub async fn submit(&self, class: usize, body: Vec<u8>) -> Result<Durable, AppendError> {
        self.submit_all(vec![(class, body)]).await
    }

    /// Queues record bodies, each with its class, for one group commit; they resolve
    /// together, in their order. One hand-off to the writer for all of them.
    pub async fn submit_all(&self, bodies: Vec<(usize, Vec<u8>)>) -> Result<Durable, AppendError> {
        let (ack, rx) = oneshot::channel();
        let n = bodies.len();
        self.tx
            .send(Op::Append { bodies, ack })
            .await
            .map_err(|_| AppendError::Closed)?;
        Ok(Durable { rx, n })
    }

    /// Appends one record body and waits until it is durable; returns its offset.
    pub async fn append(&self, class: usize, body: Vec<u8>) -> Result<u64, AppendError> {
        self.submit(class, body).await?.one().await
    }

    pub fn meta(&self) -> MutexGuard<'_, Meta> {
        edge_common::lock(&self.shared.meta)
    }

    /// Resolves whenever more records became durable.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    /// Records that the core holds everything of `class` up to `offset`.
    pub fn set_acked(&self, class: usize, offset: u64) {
        let mut meta = self.meta();
        let c = &mut meta.classes[class];
        if c.acked.is_none_or(|a| a < offset) {
            c.acked = Some(offset);
        }
    }

    /// Records and bytes of `class` the core has not acknowledged yet (durable ones).
    pub fn lag(&self, class: usize) -> io::Result<(u64, u64)> {
        let (segs, acked, dir) = {
            let meta = self.meta();
            let c = &meta.classes[class];
            (
                c.segments.iter().cloned().collect::<Vec<_>>(),
                c.acked,
                self.class_dir(&c.name),
            )
        };
        let (mut records, mut bytes) = (0, 0);
        for seg in segs {
            match (acked, seg.last) {
                (_, None) => {}
                (Some(a), Some(last)) if last <= a => {}
                (Some(a), Some(_)) if seg.base <= a => {
                    // The acked record is inside: find it by binary search in the index.
                    let ip = seg_path(&dir, seg.base, "idx");
                    let f = File::open(&ip).map_err(|e| io_err("open index", &ip, e))?;
                    let n = seg.records;
                    let entry = |i: u64| -> io::Result<(u64, u64)> {
                        let mut b = [0u8; 8];
                        f.read_exact_at(&mut b, i * INDEX_ENTRY)
                            .map_err(|e| io_err("read index", &ip, e))?;
                        Ok((
                            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64,
                            u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as u64,
                        ))
                    };
                    // First entry with an offset beyond the ack.
                    let (mut lo, mut hi) = (0, n);
                    while lo < hi {
                        let mid = (lo + hi) / 2;
                        if seg.base + entry(mid)?.0 <= a {
                            lo = mid + 1;
                        } else {
                            hi = mid;
                        }
                    }
                    if lo < n {
                        records += n - lo;
                        bytes += seg.len.saturating_sub(entry(lo)?.1);
                    }
                }
                _ => {
                    records += seg.records;
                    bytes += seg.len;
                }
            }
        }
        Ok((records, bytes))
    }

    pub fn class_dir(&self, class: &str) -> PathBuf {
        self.shared.dir.join(class)
    }
}

#[cfg(test)]
mod tests;
