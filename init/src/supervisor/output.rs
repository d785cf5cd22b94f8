//! A service's output: read from its pipes without blocking, split into lines, written
//! to its log file and, up to its console level, said on the console.

use std::fs::File;
use std::io::Read;

use crate::logs::{line_level, Level, LineSplitter};

use super::Supervisor;

/// One output pipe of a running service (`out` or `err`).
pub(super) struct Stream {
    pub(super) file: File,
    pub(super) split: LineSplitter,
    pub(super) name: &'static str,
}

impl Supervisor {
    /// Reads what service `i` wrote (all of it, and any last unended line, when
    /// `final_drain`) and logs it line by line.
    pub(super) fn read_streams(&mut self, i: usize, final_drain: bool) {
        let mut lines = Vec::new();
        let mut buf = [0u8; 4096];
        let s = &mut self.services[i];
        let mut k = 0;
        while k < s.streams.len() {
            let st = &mut s.streams[k];
            let mut closed = false;
            // A bounded number of reads per step keeps one chatty service from starving
            // the rest of the loop.
            for _ in 0..16 {
                match st.file.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        for l in st.split.push(&buf[..n]) {
                            lines.push((st.name, l));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            if closed || final_drain {
                if let Some(l) = st.split.finish() {
                    lines.push((st.name, l));
                }
            }
            if closed {
                s.streams.remove(k);
            } else {
                k += 1;
            }
        }
        if final_drain {
            s.streams.clear();
        }
        for (stream, line) in lines {
            self.log_line(i, stream, &line);
        }
    }

    fn log_line(&mut self, i: usize, stream: &'static str, line: &str) {
        let name = self.services[i].spec.name.clone();
        if let Some(w) = self.logs.write(&name, stream, line) {
            self.warn(w);
        }
        let default = if stream == "err" {
            Level::Warn
        } else {
            Level::Info
        };
        if let Some(max) = self.services[i].spec.console {
            if line_level(line, default) <= max {
                self.say(format!("{name}: {line}"));
            }
        }
    }
}
