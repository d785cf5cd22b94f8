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

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{ClassConfig, WhenFull};
use crate::record::{self, Stored, FRAME_HEADER};

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
}

type Ack = oneshot::Sender<Result<u64, AppendError>>;

enum Op {
    Append {
        class: usize,
        body: Vec<u8>,
        ack: Ack,
    },
    Tick,
}

/// Handle to the log; cheap to clone.
#[derive(Clone)]
pub struct Log {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
}

fn seg_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

fn io_err(what: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("failed to {what} {}: {e}", path.display()),
    )
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("sync directory", dir, e))
}

fn read_index(path: &Path) -> io::Result<Vec<(u32, u32)>> {
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

/// Trusts a sealed segment's index when its last entry names a whole, valid record that
/// ends exactly at the end of the file.
fn quick_check(log: &Path, idx: &Path, base: u64) -> io::Result<Option<SegInfo>> {
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
        Ok(Some(n)) if n == frame.len() && record::frame_offset(&frame) == base + rel => {
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
fn scan_and_repair(log: &Path, idx: &Path, base: u64) -> io::Result<SegInfo> {
    let data = fs::read(log).map_err(|e| io_err("read segment", log, e))?;
    let mut pos = 0usize;
    let mut entries = Vec::new();
    let mut last = None;
    let mut problem = None;
    while pos < data.len() {
        match record::check_frame(&data[pos..]) {
            Ok(Some(n)) => {
                let off = record::frame_offset(&data[pos..]);
                let in_order =
                    off >= base && last.is_none_or(|l| off > l) && off - base <= u32::MAX as u64;
                if n < FRAME_HEADER + 8 || !in_order {
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

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
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

struct Active {
    base: u64,
    log: File,
    idx: File,
    /// Bytes written (durable after the next fsync).
    len: u64,
    records: u64,
    last: Option<u64>,
    pending: Vec<u8>,
    pending_idx: Vec<u8>,
}

impl Active {
    fn open(dir: &Path, info: &SegInfo) -> io::Result<Active> {
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

struct Writer {
    shared: Arc<Shared>,
    classes: Vec<ClassConfig>,
    limits: Limits,
    active: Vec<Active>,
    /// Bytes on disk per class including what this group wrote (ahead of `Meta`).
    class_bytes: Vec<u64>,
    next_offset: u64,
    floor_persisted: u64,
    last_age_check: Instant,
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

    /// Queues a record body for the next group commit; the receiver resolves once it is
    /// durable (or refused). Waits while the writer's queue is full.
    pub async fn submit(
        &self,
        class: usize,
        body: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<u64, AppendError>>, AppendError> {
        let (ack, rx) = oneshot::channel();
        self.tx
            .send(Op::Append { class, body, ack })
            .await
            .map_err(|_| AppendError::Closed)?;
        Ok(rx)
    }

    /// Appends one record body and waits until it is durable; returns its offset.
    pub async fn append(&self, class: usize, body: Vec<u8>) -> Result<u64, AppendError> {
        self.submit(class, body)
            .await?
            .await
            .map_err(|_| AppendError::Closed)?
    }

    pub fn meta(&self) -> MutexGuard<'_, Meta> {
        self.shared.meta.lock().unwrap_or_else(|p| p.into_inner())
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
                        let s =
                            record::decode_body(&buf[at + FRAME_HEADER..at + n]).map_err(|e| {
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

impl Writer {
    fn run(&mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            let mut bytes = 0usize;
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(op) => {
                        if let Op::Append { body, .. } = &op {
                            bytes += body.len();
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

    fn class_dir(&self, class: usize) -> PathBuf {
        self.shared.dir.join(&self.classes[class].name)
    }

    fn group(&mut self, batch: Vec<Op>) {
        let mut acks = Vec::with_capacity(batch.len());
        let mut failed: Option<String> = None;
        for op in batch {
            let Op::Append {
                class,
                mut body,
                ack,
            } = op
            else {
                continue;
            };
            if let Some(e) = &failed {
                let _ = ack.send(Err(AppendError::Io(e.clone())));
                continue;
            }
            let size = (FRAME_HEADER + body.len()) as u64;
            let a = &self.active[class];
            // Index entries hold the offset relative to the segment's base in 32 bits;
            // offsets are global, so a quiet class among busy ones can outrun that.
            let rel_overflow = self.next_offset - a.base > u32::MAX as u64;
            if a.len > 0 && (a.len + size > self.limits.segment_bytes || rel_overflow) {
                if let Err(e) = self.roll(class) {
                    tracing::error!("{e}");
                    failed = Some(e.to_string());
                    let _ = ack.send(Err(AppendError::Io(e.to_string())));
                    continue;
                }
            }
            if let Err(e) = self.make_room(class, size) {
                if let AppendError::Io(m) = &e {
                    failed = Some(m.clone());
                }
                self.meta_mut().classes[class].stats.refused_full += 1;
                let _ = ack.send(Err(e));
                continue;
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
            a.len += size;
            a.records += 1;
            a.last = Some(offset);
            self.class_bytes[class] += size;
            acks.push((class, size, ack, offset));
        }
        if let Err(e) = self.flush_all() {
            tracing::error!("{e}");
            // What was written but not synced may or may not survive; no producer is
            // told it is durable, and the writer reopens its segments on next start.
            for (_, _, ack, _) in acks {
                let _ = ack.send(Err(AppendError::Io(e.to_string())));
            }
            return;
        }
        self.publish(&acks);
        for (_, _, ack, offset) in acks {
            let _ = ack.send(Ok(offset));
        }
        self.retention();
    }

    fn meta_mut(&self) -> MutexGuard<'_, Meta> {
        self.shared.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes every class's pending bytes and makes them durable with one fsync per
    /// written segment.
    fn flush_all(&mut self) -> io::Result<()> {
        for class in 0..self.active.len() {
            self.flush(class)?;
        }
        Ok(())
    }

    fn flush(&mut self, class: usize) -> io::Result<()> {
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
        Ok(())
    }

    /// Makes the just-synced appends visible to readers and counts them.
    fn publish(&mut self, acks: &[(usize, u64, Ack, u64)]) {
        let mut meta = self.meta_mut();
        for (class, size, _, _) in acks {
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
    fn roll(&mut self, class: usize) -> io::Result<()> {
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

    /// Frees space for `size` more bytes of `class` within the quota: lower-priority
    /// classes give up their oldest sealed segments first, then this class if it is
    /// drop-oldest. Otherwise the producer is told "full".
    fn make_room(&mut self, class: usize, size: u64) -> Result<(), AppendError> {
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
    fn delete_oldest(&mut self, class: usize, why: &str) -> io::Result<bool> {
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
    fn retention(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;

    fn class(name: &str, priority: u8, when_full: WhenFull) -> ClassConfig {
        ClassConfig {
            name: name.into(),
            topics: vec![format!("{name}.>")],
            priority,
            max_bytes: None,
            max_age_secs: None,
            when_full,
        }
    }

    fn body(topic: &str, n: u64, size: usize) -> Vec<u8> {
        let mut value = n.to_le_bytes().to_vec();
        value.resize(size.max(8), b'x');
        Record {
            topic: topic.into(),
            key: None,
            headers: vec![],
            timestamp_ms: 1,
            value,
        }
        .encode_body()
    }

    fn limits(quota: u64, segment: u64) -> Limits {
        Limits {
            quota_bytes: quota,
            segment_bytes: segment,
        }
    }

    fn read_all(log: &Log, class: usize) -> Vec<Stored> {
        let mut cur = Cursor::new(class, 0);
        let mut out = Vec::new();
        loop {
            let got = log.read(&mut cur, 4096).unwrap();
            if got.is_empty() {
                return out;
            }
            out.extend(got);
        }
    }

    fn value_ids(records: &[Stored]) -> Vec<u64> {
        records
            .iter()
            .map(|s| u64::from_le_bytes(s.record.value[..8].try_into().unwrap()))
            .collect()
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let bases = list_segments(dir).unwrap();
        seg_path(dir, *bases.last().unwrap(), "log")
    }

    #[tokio::test]
    async fn records_survive_reopen_across_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let classes = [class("a", 0, WhenFull::Backpressure)];
        let log = Log::open(tmp.path(), &classes, limits(1 << 30, 4096)).unwrap();
        for n in 0..100 {
            assert_eq!(log.append(0, body("a.x", n, 100)).await.unwrap(), n);
        }
        assert!(log.meta().classes[0].segments.len() > 2, "segments roll");
        drop(log);
        let log = Log::open(tmp.path(), &classes, limits(1 << 30, 4096)).unwrap();
        let all = read_all(&log, 0);
        assert_eq!(value_ids(&all), (0..100).collect::<Vec<_>>());
        assert_eq!(
            all.iter().map(|s| s.offset).collect::<Vec<_>>(),
            (0..100).collect::<Vec<_>>()
        );
        assert_eq!(log.append(0, body("a.x", 100, 100)).await.unwrap(), 100);
        // A cursor in the middle starts exactly there.
        let mut cur = Cursor::new(0, 57);
        assert_eq!(log.read(&mut cur, 1 << 20).unwrap()[0].offset, 57);
    }

    /// A group of appends that rolls the segment part-way: the records written to the
    /// old segment in that group must stay visible to readers (the uplink), or the
    /// reader jumps to the new segment and the core never gets them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_sees_every_record_of_a_group_that_rolls_the_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let classes = [class("a", 0, WhenFull::Backpressure)];
        let log = Log::open(tmp.path(), &classes, limits(1 << 30, 4096)).unwrap();
        let mut follower = Cursor::new(0, 0);
        let mut followed = Vec::new();
        for round in 0..8u64 {
            let mut appends = tokio::task::JoinSet::new();
            for i in 0..60 {
                let log = log.clone();
                appends.spawn(async move { log.append(0, body("a.x", round * 60 + i, 100)).await });
            }
            while let Some(r) = appends.join_next().await {
                r.unwrap().unwrap();
            }
            loop {
                let got = log.read(&mut follower, 1 << 20).unwrap();
                if got.is_empty() {
                    break;
                }
                followed.extend(got.into_iter().map(|s| s.offset));
            }
        }
        assert!(log.meta().classes[0].segments.len() > 8, "segments roll");
        assert_eq!(followed, (0..480).collect::<Vec<_>>(), "a live reader");
        let all: Vec<u64> = read_all(&log, 0).iter().map(|s| s.offset).collect();
        assert_eq!(all, (0..480).collect::<Vec<_>>(), "a reader from the start");
    }

    #[tokio::test]
    async fn torn_tail_is_cut_and_earlier_records_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let classes = [class("a", 0, WhenFull::Backpressure)];
        let log = Log::open(tmp.path(), &classes, limits(1 << 30, 1 << 20)).unwrap();
        for n in 0..10 {
            log.append(0, body("a.x", n, 50)).await.unwrap();
        }
        drop(log);
        let seg = last_segment(&tmp.path().join("a"));
        let len = fs::metadata(&seg).unwrap().len();
        // A crash in the middle of writing the tenth record.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 7)
            .unwrap();
        let log = Log::open(tmp.path(), &classes, limits(1 << 30, 1 << 20)).unwrap();
        assert_eq!(value_ids(&read_all(&log, 0)), (0..9).collect::<Vec<_>>());
        // The cut offset is given again: it was never acked.
        assert_eq!(log.append(0, body("a.x", 99, 50)).await.unwrap(), 9);
        assert_eq!(
            value_ids(&read_all(&log, 0)),
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 99]
        );
    }

    #[tokio::test]
    async fn corrupted_tail_is_cut_and_earlier_records_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let classes = [class("a", 0, WhenFull::Backpressure)];
        let log = Log::open(tmp.path(), &classes, limits(1 << 30, 1 << 20)).unwrap();
        for n in 0..10 {
            log.append(0, body("a.x", n, 50)).await.unwrap();
        }
        drop(log);
        let seg = last_segment(&tmp.path().join("a"));
        let mut data = fs::read(&seg).unwrap();
        let at = data.len() - 20;
        data[at] ^= 0xff;
        // And garbage appended after it, as a half-written sector would leave.
        data.extend_from_slice(&[0xab; 30]);
        fs::write(&seg, &data).unwrap();
        let log = Log::open(tmp.path(), &classes, limits(1 << 30, 1 << 20)).unwrap();
        assert_eq!(value_ids(&read_all(&log, 0)), (0..9).collect::<Vec<_>>());
        assert_eq!(log.meta().classes[0].segments[0].records, 9);
    }

    #[tokio::test]
    async fn full_quota_answers_full_for_backpressure_class() {
        let tmp = tempfile::tempdir().unwrap();
        let classes = [class("a", 0, WhenFull::Backpressure)];
        let log = Log::open(tmp.path(), &classes, limits(8192, 4096)).unwrap();
        let mut ok = 0;
        let err = loop {
            match log.append(0, body("a.x", ok, 200)).await {
                Ok(_) => ok += 1,
                Err(e) => break e,
            }
            assert!(ok < 1000, "quota never reached");
        };
        assert_eq!(err, AppendError::Full("a".into()));
        assert!(err.to_string().contains("full"));
        // Nothing acked was lost.
        assert_eq!(value_ids(&read_all(&log, 0)), (0..ok).collect::<Vec<_>>());
        assert_eq!(log.meta().classes[0].stats.refused_full, 1);
    }

    #[tokio::test]
    async fn drop_oldest_class_keeps_accepting_and_counts_drops() {
        let tmp = tempfile::tempdir().unwrap();
        let classes = [class("bulk", 0, WhenFull::DropOldest)];
        let log = Log::open(tmp.path(), &classes, limits(8192, 4096)).unwrap();
        for n in 0..200 {
            log.append(0, body("bulk.x", n, 200)).await.unwrap();
        }
        let kept = value_ids(&read_all(&log, 0));
        assert_eq!(*kept.last().unwrap(), 199);
        assert!(kept.len() < 200);
        // The survivors are the newest, without gaps.
        assert_eq!(kept, (200 - kept.len() as u64..200).collect::<Vec<_>>());
        let st = log.meta().classes[0].stats.clone();
        assert_eq!(st.dropped_records, 200 - kept.len() as u64);
        assert!(log.meta().classes[0].bytes <= 8192);
    }

    #[tokio::test]
    async fn alarms_outlive_bulk_telemetry_when_the_disk_fills() {
        let tmp = tempfile::tempdir().unwrap();
        let classes = [
            class("bulk", 0, WhenFull::Backpressure),
            class("alarms", 9, WhenFull::Backpressure),
        ];
        let log = Log::open(tmp.path(), &classes, limits(16384, 4096)).unwrap();
        let mut n = 0;
        while log.append(0, body("bulk.x", n, 200)).await.is_ok() {
            n += 1;
        }
        // Bulk is full, yet alarms get in by taking bulk's oldest space.
        for a in 0..30 {
            log.append(1, body("alarms.x", a, 200)).await.unwrap();
        }
        assert_eq!(value_ids(&read_all(&log, 1)), (0..30).collect::<Vec<_>>());
        let m = log.meta();
        assert!(m.classes[0].stats.dropped_records > 0);
        assert_eq!(m.classes[1].stats.dropped_records, 0);
    }

    #[tokio::test]
    async fn records_older_than_max_age_go_even_from_a_quiet_class() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = class("events", 0, WhenFull::Backpressure);
        c.max_age_secs = Some(1);
        let log = Log::open(tmp.path(), &[c], limits(1 << 30, 1 << 20)).unwrap();
        for n in 0..5 {
            log.append(0, body("events.x", n, 10)).await.unwrap();
        }
        // The ticker drives retention while nobody writes.
        let start = Instant::now();
        while log.meta().classes[0].stats.retired_records < 5 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "old records were kept"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(read_all(&log, 0).is_empty());
        assert_eq!(
            log.meta().classes[0].stats.dropped_records,
            5,
            "never sent: counted"
        );
        assert_eq!(log.append(0, body("events.x", 9, 10)).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn acked_records_deleted_are_not_counted_as_drops_and_offsets_never_repeat() {
        let tmp = tempfile::tempdir().unwrap();
        let classes = [class("bulk", 0, WhenFull::DropOldest)];
        let log = Log::open(tmp.path(), &classes, limits(8192, 4096)).unwrap();
        for n in 0..100 {
            log.append(0, body("bulk.x", n, 200)).await.unwrap();
        }
        log.set_acked(0, 99);
        let before = log.meta().classes[0].stats.dropped_records;
        let retired = log.meta().classes[0].stats.retired_records;
        for n in 100..110 {
            log.append(0, body("bulk.x", n, 200)).await.unwrap();
        }
        let st = log.meta().classes[0].stats.clone();
        assert!(st.retired_records > retired, "a segment was deleted");
        assert_eq!(st.dropped_records, before);
        assert_eq!(log.lag(0).unwrap().0, 10, "records after the ack");
        log.set_acked(0, 105);
        assert_eq!(log.lag(0).unwrap().0, 4);
        drop(log);
        let log = Log::open(tmp.path(), &classes, limits(8192, 4096)).unwrap();
        assert_eq!(log.append(0, body("bulk.x", 0, 200)).await.unwrap(), 110);
    }
}
