//! Containers' CRI log files: reading them back for `noded logs`, and rotating them.
//!
//! containerd writes each container's output to `<pod log dir>/<container>/<attempt>.log`,
//! one line per write: `<RFC3339Nano timestamp> <stdout|stderr> <P|F>[:tags] <content>`,
//! where `P` marks a partial line continued by the next line of the same stream.
//!
//! Rotation renames the live file to `<attempt>.log.<n>` (`n` counts up from 1, so the
//! highest is the newest), asks the runtime to reopen the log, and deletes the oldest
//! rotated files beyond the limit. Lines written between the rename and the reopen land
//! at the end of the renamed file, so none are lost.

use std::io;
use std::path::{Path, PathBuf};

/// What a read of one container attempt's logs returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lines {
    pub lines: Vec<String>,
    /// Lines that were not in the CRI format and were left out.
    pub malformed: usize,
}

pub use edge_common::cri_log::{parse_line, Entry};

/// Joins CRI log text (files in order, oldest first) into output lines: a partial line
/// is completed by the next line of its own stream.
pub fn join(texts: &[String]) -> Lines {
    let mut out = Lines::default();
    // Partial content per stream: stdout, stderr.
    let mut pending = [String::new(), String::new()];
    for text in texts {
        // A last line without its newline is still being written (the runtime's write
        // may land in pieces, and a read can come between them): left out until whole.
        for line in text.split_inclusive('\n') {
            let Some(line) = line.strip_suffix('\n') else {
                continue;
            };
            let line = line.strip_suffix('\r').unwrap_or(line);
            let Some(e) = parse_line(line) else {
                if !line.is_empty() {
                    out.malformed += 1;
                }
                continue;
            };
            let buf = &mut pending[e.stderr as usize];
            buf.push_str(e.content);
            if !e.partial {
                out.lines.push(std::mem::take(buf));
            }
        }
    }
    // A partial line still waiting for its end (the container is writing it) is shown.
    for p in pending {
        if !p.is_empty() {
            out.lines.push(p);
        }
    }
    out
}

/// The attempts that have a log in a container's log directory, ascending.
pub fn attempts(container_dir: &Path) -> io::Result<Vec<u32>> {
    let mut out: Vec<u32> = std::fs::read_dir(container_dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            let (attempt, _) = name.split_once(".log")?;
            attempt.parse().ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The files of one attempt, oldest first: the rotated ones by number, then the live one.
pub fn files(container_dir: &Path, attempt: u32) -> io::Result<Vec<PathBuf>> {
    let live = format!("{attempt}.log");
    let mut rotated = rotated(container_dir, &live)?;
    rotated.sort_unstable_by_key(|(n, _)| *n);
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let live = container_dir.join(live);
    if live.exists() {
        out.push(live);
    }
    Ok(out)
}

/// `<live>.<n>` files next to `live`, with their numbers.
fn rotated(dir: &Path, live: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let prefix = format!("{live}.");
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n = name.to_str()?.strip_prefix(&prefix)?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect())
}

/// Reads one attempt's logs, rotated files included. A file that vanished between the
/// listing and the read (rotated away meanwhile) is skipped.
pub fn read(container_dir: &Path, attempt: u32) -> io::Result<Lines> {
    let mut texts = Vec::new();
    for f in files(container_dir, attempt)? {
        match std::fs::read(&f) {
            Ok(b) => texts.push(String::from_utf8_lossy(&b).into_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", f.display()))),
        }
    }
    Ok(join(&texts))
}

/// Deletes the log files of the attempts before `keep_from` (a crash-looping container
/// would otherwise leave one file per restart forever; kubelet keeps the current and
/// the previous attempt too).
pub fn remove_attempts_before(container_dir: &Path, keep_from: u32) -> io::Result<usize> {
    let mut removed = 0;
    for e in std::fs::read_dir(container_dir)?.flatten() {
        let name = e.file_name();
        let Some(attempt) = name
            .to_str()
            .and_then(|n| n.split_once(".log"))
            .and_then(|(a, _)| a.parse::<u32>().ok())
        else {
            continue;
        };
        if attempt < keep_from {
            std::fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Renames `live` to its next rotated name if it is over `max_bytes`; returns the
/// new name. The caller has the runtime reopen the log, and undoes the rename with
/// [`unrotate`] if it cannot.
pub fn rotate_if_over(live: &Path, max_bytes: u64) -> io::Result<Option<PathBuf>> {
    let size = match std::fs::metadata(live) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if size <= max_bytes {
        return Ok(None);
    }
    let (dir, name) = split(live)?;
    let next = rotated(dir, name)?
        .iter()
        .map(|(n, _)| *n)
        .max()
        .unwrap_or(0)
        + 1;
    let to = dir.join(format!("{name}.{next}"));
    std::fs::rename(live, &to)?;
    Ok(Some(to))
}

/// Puts a rotated file back as the live one (the runtime could not reopen the log and
/// still writes to the renamed file).
pub fn unrotate(rotated: &Path, live: &Path) -> io::Result<()> {
    std::fs::rename(rotated, live)
}

/// Deletes the oldest rotated files of `live` so that at most `keep` remain.
pub fn prune(live: &Path, keep: usize) -> io::Result<Vec<PathBuf>> {
    let (dir, name) = split(live)?;
    let mut all = rotated(dir, name)?;
    all.sort_unstable_by_key(|(n, _)| *n);
    let excess = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, p) in all.into_iter().take(excess) {
        std::fs::remove_file(&p)?;
        removed.push(p);
    }
    Ok(removed)
}

fn split(live: &Path) -> io::Result<(&Path, &str)> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("{}", live.display()));
    let dir = live.parent().ok_or_else(bad)?;
    let name = live.file_name().and_then(|n| n.to_str()).ok_or_else(bad)?;
    Ok((dir, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: &str = "2026-11-21T21:30:51.123456789Z";

    #[test]
    fn partial_lines_join_per_stream_and_malformed_ones_are_counted() {
        let text = format!(
            "{TS} stdout P abc\n{TS} stderr F err\n{TS} stdout F def\nnot a log line\n{TS} stdout F next\n"
        );
        let l = join(&[text]);
        assert_eq!(l.lines, ["err", "abcdef", "next"]);
        assert_eq!(l.malformed, 1);
        // A partial line at the end of a rotated file continues in the next file.
        let l = join(&[
            format!("{TS} stdout P he\n"),
            format!("{TS} stdout F llo\n"),
        ]);
        assert_eq!(l.lines, ["hello"]);
        // A line the runtime is still writing is not shown cut, nor counted as malformed.
        for torn in [format!("{TS} stdout F {{\"sens"), "2026-11-2".to_string()] {
            let l = join(&[format!("{TS} stdout F {{\"seq\":1}}\n{torn}")]);
            assert_eq!(l.lines, ["{\"seq\":1}"], "{torn}");
            assert_eq!(l.malformed, 0, "{torn}");
        }
    }

    #[test]
    fn rotation_numbers_files_prunes_the_oldest_and_reads_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let live = d.join("0.log");
        assert_eq!(rotate_if_over(&live, 10).unwrap(), None);
        for i in 0..4 {
            std::fs::write(&live, format!("{TS} stdout F line {i}\n")).unwrap();
            assert_eq!(rotate_if_over(&live, 1000).unwrap(), None);
            let to = rotate_if_over(&live, 10).unwrap().unwrap();
            assert_eq!(to, d.join(format!("0.log.{}", i + 1)));
            assert!(!live.exists());
        }
        std::fs::write(&live, format!("{TS} stdout F line 4\n")).unwrap();
        std::fs::write(d.join("1.log"), format!("{TS} stdout F other attempt\n")).unwrap();
        let removed = prune(&live, 2).unwrap();
        assert_eq!(removed, [d.join("0.log.1"), d.join("0.log.2")]);
        assert_eq!(read(d, 0).unwrap().lines, ["line 2", "line 3", "line 4"]);
        assert_eq!(attempts(d).unwrap(), [0, 1]);
        // Numbers keep counting up after a prune, so the newest is always the highest.
        let to = rotate_if_over(&live, 10).unwrap().unwrap();
        assert_eq!(to, d.join("0.log.5"));
        unrotate(&to, &live).unwrap();
        assert!(live.exists());
        // A new attempt: the files of the ones before it go, rotated ones included.
        assert_eq!(remove_attempts_before(d, 1).unwrap(), 3);
        assert_eq!(attempts(d).unwrap(), [1]);
    }
}
