//! The serial console log: QEMU appends to a file, tests wait for lines in it.

use std::path::{Path, PathBuf};

/// Reads a growing log file line by line, remembering how far the test has read.
pub struct ConsoleLog {
    path: PathBuf,
    /// Byte offset just past the last line a wait consumed.
    cursor: usize,
}

impl ConsoleLog {
    pub fn new(path: &Path) -> ConsoleLog {
        ConsoleLog {
            path: path.to_path_buf(),
            cursor: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything written so far (lossy: firmware output is not always UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.path).unwrap_or_default()).into_owned()
    }

    /// Looks for `pattern` in the complete lines after the cursor; on a match moves the
    /// cursor past that line, so the next wait looks only at what came later.
    pub fn take_line(&mut self, pattern: &str) -> Option<String> {
        let bytes = std::fs::read(&self.path).ok()?;
        let (line, end) = find_line(&bytes[self.cursor.min(bytes.len())..], pattern)?;
        self.cursor += end;
        Some(line)
    }

    /// Like [`take_line`](Self::take_line) for several patterns: the earliest line
    /// matching any of them, and the index of the pattern it matched.
    pub fn take_first(&mut self, patterns: &[&str]) -> Option<(usize, String)> {
        let bytes = std::fs::read(&self.path).ok()?;
        let rest = &bytes[self.cursor.min(bytes.len())..];
        let (i, line, end) = patterns
            .iter()
            .enumerate()
            .filter_map(|(i, p)| find_line(rest, p).map(|(l, e)| (i, l, e)))
            .min_by_key(|(_, _, e)| *e)?;
        self.cursor += end;
        Some((i, line))
    }

    /// Skips everything logged so far (before starting a new boot, for example).
    pub fn skip_to_end(&mut self) {
        self.cursor = std::fs::metadata(&self.path)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The first complete line (ended by `\n`) containing `pattern`, without its line
/// ending, and the offset just past it. A line still being written is not matched, so a
/// pattern never matches half of a ready line.
pub fn find_line(bytes: &[u8], pattern: &str) -> Option<(String, usize)> {
    let mut start = 0;
    while let Some(nl) = bytes[start..].iter().position(|&b| b == b'\n') {
        let end = start + nl + 1;
        let line = String::from_utf8_lossy(&bytes[start..end]);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.contains(pattern) {
            return Some((line.to_string(), end));
        }
        start = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_complete_lines() {
        let log = b"BdsDxe: loading\r\nedgeos: ready version=0.1.0 sl";
        assert_eq!(find_line(log, "edgeos: ready"), None);
        let log = b"BdsDxe: loading\r\nedgeos: ready version=0.1.0 slot=a uptime_ms=9\r\n";
        let (line, end) = find_line(log, "edgeos: ready").unwrap();
        assert_eq!(line, "edgeos: ready version=0.1.0 slot=a uptime_ms=9");
        assert_eq!(end, log.len());
    }

    #[test]
    fn successive_waits_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "edgeos: ready slot=a\nother\n").unwrap();
        let mut c = ConsoleLog::new(&path);
        assert!(c.take_line("ready").is_some());
        assert!(
            c.take_line("ready").is_none(),
            "the same line matched twice"
        );
        std::fs::write(&path, "edgeos: ready slot=a\nother\nedgeos: ready slot=b\n").unwrap();
        assert_eq!(c.take_line("ready").unwrap(), "edgeos: ready slot=b");
    }

    #[test]
    fn the_earliest_of_several_patterns_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "edgeos: stage 1 failed: x\nedgeos: ready slot=a\n").unwrap();
        let mut c = ConsoleLog::new(&path);
        let (i, line) = c.take_first(&["edgeos: ready", "stage 1 failed"]).unwrap();
        assert_eq!((i, line.as_str()), (1, "edgeos: stage 1 failed: x"));
        assert_eq!(c.take_first(&["edgeos: ready"]).unwrap().0, 0);
    }
}
