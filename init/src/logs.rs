//! Captured service output: splitting pipe bytes into lines, judging each line's level,
//! and the bounded per-service log files on the data partition (`<dir>/<service>.log`,
//! rotated to `.1`). A full disk drops lines and is reported once; it never stops a service.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "error" | "err" | "fatal" | "panic" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            "trace" => Some(Level::Trace),
            _ => None,
        }
    }
}

/// The level a line was logged at. Understands the `tracing` format our daemons write
/// (`  INFO target: ...`) and the logfmt of Go programs such as containerd
/// (`level=info msg=...`). Anything else takes `default` (warn for stderr, info for stdout).
pub fn line_level(line: &str, default: Level) -> Level {
    let first = line.split_ascii_whitespace().next().unwrap_or("");
    if first.len() <= 5 && first.bytes().all(|b| b.is_ascii_uppercase()) {
        if let Some(l) = Level::parse(first) {
            return l;
        }
    }
    if let Some(pos) = line.find("level=") {
        let rest = &line[pos + 6..];
        let word: String = rest
            .trim_start_matches('"')
            .chars()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect();
        if let Some(l) = Level::parse(&word) {
            return l;
        }
    }
    default
}

/// Longest line kept whole; a longer run without a newline is cut into pieces this size,
/// so a service printing binary junk cannot make init buffer without bound.
pub const MAX_LINE: usize = 4096;

/// Turns a byte stream into lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                lines.push(self.take());
            } else {
                self.buf.push(b);
                if self.buf.len() >= MAX_LINE {
                    lines.push(self.take());
                }
            }
        }
        lines
    }

    /// What is left when the stream ends without a final newline.
    pub fn finish(&mut self) -> Option<String> {
        if self.buf.is_empty() {
            None
        } else {
            Some(self.take())
        }
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.buf)
            .trim_end_matches('\r')
            .to_owned();
        self.buf.clear();
        line
    }
}

/// Seconds since boot (CLOCK_BOOTTIME), the only clock that is right on a box without RTC
/// trust or NTP.
pub fn uptime() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    std::time::Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

struct Open {
    file: File,
    size: u64,
}

/// The log files of all services, written on the log writer's thread (see [`LogStore`]).
/// Writes never fail outward.
struct Files {
    dir: Option<PathBuf>,
    max_bytes: u64,
    files: HashMap<String, Open>,
    /// Lines that could not be written since boot; shared with [`LogStore`], which adds
    /// the lines it could not queue.
    dropped: Arc<AtomicU64>,
    full_reported: bool,
    other_reported: bool,
}

impl Files {
    fn new(dir: Option<PathBuf>, max_bytes: u64, dropped: Arc<AtomicU64>) -> Files {
        Files {
            dir,
            max_bytes: max_bytes.max(4096),
            files: HashMap::new(),
            dropped,
            full_reported: false,
            other_reported: false,
        }
    }

    fn path(&self, service: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{service}.log")))
    }

    /// Appends one line logged at `t` (uptime). Returns a warning to report, at most once
    /// per condition (full disk: until [`Files::clear_full`]).
    fn write(&mut self, service: &str, stream: &str, line: &str, t: Duration) -> Option<String> {
        let path = self.path(service)?;
        let record = format!(
            "[{:>6}.{:03}] {stream} {line}\n",
            t.as_secs(),
            t.subsec_millis()
        );
        if !self.files.contains_key(service) {
            match open_append(&path) {
                Ok(open) => {
                    self.files.insert(service.to_owned(), open);
                }
                Err(e) => return self.failed(&path, e),
            }
        }
        let needs_rotation = self
            .files
            .get(service)
            .is_some_and(|o| o.size > 0 && o.size + record.len() as u64 > self.max_bytes);
        if needs_rotation {
            self.files.remove(service);
            let old = path.with_extension("log.1");
            // A failed rename leaves the full file in place; truncating it is still better
            // than growing past the bound.
            let _ = std::fs::rename(&path, &old);
            match std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
            {
                Ok(file) => {
                    self.files
                        .insert(service.to_owned(), Open { file, size: 0 });
                }
                Err(e) => return self.failed(&path, e),
            }
        }
        let open = self.files.get_mut(service)?;
        match open.file.write_all(record.as_bytes()) {
            Ok(()) => {
                open.size += record.len() as u64;
                None
            }
            Err(e) => {
                // Drop the handle: the next line reopens, which also recovers a file
                // removed or replaced behind our back.
                self.files.remove(service);
                self.failed(&path, e)
            }
        }
    }

    fn failed(&mut self, path: &std::path::Path, e: std::io::Error) -> Option<String> {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        let full = matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
        if full {
            if !self.full_reported {
                self.full_reported = true;
                return Some(format!(
                    "data partition full: dropping service log lines ({})",
                    path.display()
                ));
            }
        } else if !self.other_reported {
            self.other_reported = true;
            return Some(format!(
                "failed to write service log {}: {e}; dropping lines",
                path.display()
            ));
        }
        None
    }

    /// The disk has room again: a later full disk is reported anew.
    fn clear_full(&mut self) {
        self.full_reported = false;
    }

    /// Closes every file (before /var is unmounted).
    fn close_all(&mut self) {
        self.files.clear();
        self.dir = None;
    }
}

/// Lines waiting for the writer; past this the disk is not keeping up (or stalls) and
/// lines are dropped, counted, rather than held in init's memory.
const QUEUED_LINES: usize = 8192;
/// How long a shutdown waits for the writer to close its files.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

enum ToWriter {
    Line {
        service: String,
        stream: &'static str,
        line: String,
        at: Duration,
    },
    ClearFull,
    /// Answered once everything sent before it is written (or dropped).
    #[cfg(test)]
    Flush(mpsc::Sender<()>),
    Close(mpsc::Sender<()>),
}

/// The services' log files, written by a thread of their own: init's loop, which also
/// pets the hardware watchdog, only queues lines, so a data partition that stalls (a
/// failing disk, a full journal) costs dropped lines and a warning, never a watchdog
/// reset. `dir = None` keeps no files (the data partition is missing).
pub struct LogStore {
    dir: Option<PathBuf>,
    to_writer: Option<mpsc::SyncSender<ToWriter>>,
    warnings: mpsc::Receiver<String>,
    /// Lines not written (full disk, I/O error, a writer that does not keep up) since boot.
    dropped: Arc<AtomicU64>,
    stall_reported: bool,
}

impl LogStore {
    pub fn new(dir: Option<PathBuf>, max_bytes: u64) -> LogStore {
        let (to_writer, from_store) = mpsc::sync_channel(QUEUED_LINES);
        let (warn, warnings) = mpsc::channel();
        let dropped = Arc::new(AtomicU64::new(0));
        let mut files = Files::new(dir.clone(), max_bytes, dropped.clone());
        let spawned = std::thread::Builder::new()
            .name("init-logs".into())
            .spawn(move || {
                // Signals are for init's loop (its signalfd), never this thread.
                // SAFETY: a sigset we own, filled, then this thread's mask.
                unsafe {
                    let mut all: libc::sigset_t = std::mem::zeroed();
                    libc::sigfillset(&mut all);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
                }
                for msg in from_store {
                    match msg {
                        ToWriter::Line {
                            service,
                            stream,
                            line,
                            at,
                        } => {
                            if let Some(w) = files.write(&service, stream, &line, at) {
                                let _ = warn.send(w);
                            }
                        }
                        ToWriter::ClearFull => files.clear_full(),
                        #[cfg(test)]
                        ToWriter::Flush(done) => {
                            let _ = done.send(());
                        }
                        ToWriter::Close(done) => {
                            files.close_all();
                            let _ = done.send(());
                        }
                    }
                }
            });
        let to_writer = match spawned {
            Ok(_) => Some(to_writer),
            Err(e) => {
                crate::say!(
                    "warning: cannot start the log writer ({e}); service output is not kept"
                );
                None
            }
        };
        LogStore {
            dir,
            to_writer,
            warnings,
            dropped,
            stall_reported: false,
        }
    }

    /// Queues one line, timestamped now. Returns a warning to report: the writer's (a
    /// full disk, an I/O error), or that lines are dropped because it does not keep up,
    /// once until it does again.
    pub fn write(&mut self, service: &str, stream: &'static str, line: &str) -> Option<String> {
        let to_writer = self.to_writer.as_ref()?;
        self.dir.as_ref()?;
        let msg = ToWriter::Line {
            service: service.to_owned(),
            stream,
            line: line.to_owned(),
            at: uptime(),
        };
        match to_writer.try_send(msg) {
            Ok(()) => self.stall_reported = false,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if !self.stall_reported {
                    self.stall_reported = true;
                    return Some(format!(
                        "service logs are not being written ({} lines queued for the data \
                         partition): dropping lines",
                        QUEUED_LINES
                    ));
                }
            }
        }
        self.warnings.try_recv().ok()
    }

    /// Lines not written since boot.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The disk has room again: a later full disk is reported anew.
    pub fn clear_full(&mut self) {
        if let Some(t) = &self.to_writer {
            let _ = t.try_send(ToWriter::ClearFull);
        }
    }

    /// Waits (up to `wait`) until every line queued so far is written; false if the
    /// writer did not get there.
    #[cfg(test)]
    pub fn flush(&self, wait: Duration) -> bool {
        self.ask(ToWriter::Flush, wait)
    }

    /// Closes every file (before /var is unmounted), waiting a few seconds at most: a
    /// stalled disk must not hold up the power-off.
    pub fn close_all(&mut self) {
        self.ask(ToWriter::Close, CLOSE_WAIT);
        self.dir = None;
        self.to_writer = None;
    }

    fn ask(&self, msg: fn(mpsc::Sender<()>) -> ToWriter, wait: Duration) -> bool {
        let Some(t) = &self.to_writer else {
            return true;
        };
        let (done, answered) = mpsc::channel();
        let deadline = std::time::Instant::now() + wait;
        let mut m = msg(done);
        // A full queue drains as the writer works: retry until the deadline.
        loop {
            match t.try_send(m) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    m = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        answered
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<Open> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(Open { file, size })
}

/// Whether the file system holding `path` has less than `min_free` bytes available.
pub fn is_full(path: &std::path::Path, min_free: u64) -> Option<bool> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize) < min_free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_of_tracing_and_logfmt_lines() {
        assert_eq!(line_level("  INFO noded: up", Level::Warn), Level::Info);
        assert_eq!(line_level("ERROR x: boom", Level::Info), Level::Error);
        assert_eq!(
            line_level("time=\"2024\" level=debug msg=\"x\"", Level::Warn),
            Level::Debug
        );
        assert_eq!(line_level("plain words", Level::Warn), Level::Warn);
        assert_eq!(line_level("INFORMATION here", Level::Error), Level::Error);
    }

    #[test]
    fn splitter_keeps_partial_lines_until_newline_and_caps_length() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"hel").is_empty());
        assert_eq!(s.push(b"lo\r\nwor"), ["hello"]);
        assert_eq!(s.finish().as_deref(), Some("wor"));
        let long = vec![b'x'; MAX_LINE + 10];
        let lines = s.push(&long);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE);
    }

    #[test]
    fn log_rotates_to_dot_one_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::new(Some(dir.path().to_owned()), 4096);
        let line = "y".repeat(100);
        for _ in 0..100 {
            assert_eq!(store.write("svc", "out", &line), None);
        }
        assert!(store.flush(Duration::from_secs(10)));
        let cur = std::fs::metadata(dir.path().join("svc.log")).unwrap().len();
        let old = std::fs::metadata(dir.path().join("svc.log.1"))
            .unwrap()
            .len();
        assert!(cur <= 4096, "current log {cur} bytes");
        assert!(old <= 4096 && old > 3000, "rotated log {old} bytes");
        let text = std::fs::read_to_string(dir.path().join("svc.log")).unwrap();
        assert!(text
            .lines()
            .all(|l| l.starts_with('[') && l.contains(" out yyy")));
    }

    #[test]
    fn full_disk_drops_lines_and_warns_once() {
        let dir = tempfile::tempdir().unwrap();
        // /dev/full answers every write with ENOSPC, like a full data partition.
        std::os::unix::fs::symlink("/dev/full", dir.path().join("svc.log")).unwrap();
        let mut store = Files::new(Some(dir.path().to_owned()), 1 << 20, Default::default());
        let t = uptime();
        let first = store.write("svc", "err", "one", t);
        assert!(
            first
                .as_deref()
                .is_some_and(|w| w.contains("data partition full")),
            "{first:?}"
        );
        assert_eq!(store.write("svc", "err", "two", t), None);
        assert_eq!(store.write("svc", "err", "three", t), None);
        assert_eq!(store.dropped.load(Ordering::Relaxed), 3);
        store.clear_full();
        assert!(store.write("svc", "err", "four", t).is_some());
    }

    /// The writer's warning reaches init through the store, and the lines are counted.
    #[test]
    fn a_full_disk_is_reported_through_the_store() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join("svc.log")).unwrap();
        let mut store = LogStore::new(Some(dir.path().to_owned()), 1 << 20);
        let mut said = store.write("svc", "err", "one");
        assert!(store.flush(Duration::from_secs(10)));
        said = said.or_else(|| store.write("svc", "err", "two"));
        assert!(
            said.as_deref()
                .is_some_and(|w| w.contains("data partition full")),
            "{said:?}"
        );
        assert!(store.flush(Duration::from_secs(10)));
        assert_eq!(store.dropped(), 2);
    }

    /// A data partition that stalls (here: a log "file" that is a FIFO nobody reads, so
    /// opening it never returns) holds up only the writer: init's loop queues, then drops
    /// and says so once, without waiting; and a shutdown does not wait for it for long.
    #[test]
    fn a_stalled_disk_never_blocks_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("svc.log").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let mut store = LogStore::new(Some(dir.path().to_owned()), 1 << 20);
        let start = std::time::Instant::now();
        let mut warnings = Vec::new();
        for n in 0..QUEUED_LINES + 100 {
            warnings.extend(store.write("svc", "out", &format!("line {n}")));
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "queueing took {:?}",
            start.elapsed()
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("dropping lines"), "{warnings:?}");
        assert!(store.dropped() >= 99, "{}", store.dropped());
        assert!(
            !store.flush(Duration::from_millis(200)),
            "the writer is stuck"
        );
        let start = std::time::Instant::now();
        store.close_all();
        assert!(start.elapsed() < CLOSE_WAIT + Duration::from_secs(1));
    }
}
