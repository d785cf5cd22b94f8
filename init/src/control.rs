//! The control protocol (docs/contracts.md): JSON lines on the unix socket
//! `/run/edge/init.sock` and on the virtio-serial port `org.edgeos.control`. Requests are
//! parsed here and answered by the caller; events go to the serial port only. All I/O is
//! non-blocking: a slow or absent reader never holds up PID 1.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    Kill { service: String, signal: i32 },
    Restart { service: String },
    Poweroff,
    Reboot,
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Kill { .. } => "kill",
            Request::Restart { .. } => "restart",
            Request::Poweroff => "poweroff",
            Request::Reboot => "reboot",
        }
    }
}

/// Parses one request line. The error is the complete reply to send.
pub fn parse_request(line: &str) -> Result<Request, Value> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| error_reply("invalid", &format!("not a JSON object: {e}")))?;
    let cmd = v.get("cmd").and_then(Value::as_str).unwrap_or("");
    let service = || {
        v.get("service")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| error_reply(cmd, "missing \"service\""))
    };
    match cmd {
        "status" => Ok(Request::Status),
        "kill" => {
            let signal = match v.get("signal") {
                None => libc::SIGTERM,
                Some(s) => s
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(|| error_reply(cmd, "\"signal\" must be a number"))?,
            };
            Ok(Request::Kill {
                service: service()?,
                signal,
            })
        }
        "restart" => Ok(Request::Restart {
            service: service()?,
        }),
        "poweroff" => Ok(Request::Poweroff),
        "reboot" => Ok(Request::Reboot),
        "" => Err(error_reply("invalid", "missing \"cmd\"")),
        other => Err(error_reply(other, &format!("unknown cmd `{other}`"))),
    }
}

pub fn error_reply(cmd: &str, error: &str) -> Value {
    json!({"reply": cmd, "ok": false, "error": error})
}

pub fn ok_reply(cmd: &str) -> Value {
    json!({"reply": cmd, "ok": true})
}

/// Bound on what is queued for one peer; beyond it the oldest output is dropped.
const MAX_OUT: usize = 256 * 1024;
const MAX_IN: usize = 64 * 1024;

enum Io {
    Sock(UnixStream),
    Port(File),
}

struct Conn {
    io: Io,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    closed: bool,
}

impl Conn {
    fn fd(&self) -> RawFd {
        match &self.io {
            Io::Sock(s) => s.as_raw_fd(),
            Io::Port(f) => f.as_raw_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.io {
            Io::Sock(s) => s.read(buf),
            Io::Port(f) => f.read(buf),
        }
    }
    fn queue(&mut self, v: &Value) {
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        if self.out.len() + line.len() > MAX_OUT {
            // Keep the newest lines: an event log with a gap beats a wedged queue.
            let excess = self.out.len() + line.len() - MAX_OUT;
            let cut = self.out[..excess.min(self.out.len())]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(self.out.len().min(excess), |p| p + 1);
            self.out.drain(..cut);
        }
        self.out.extend_from_slice(&line);
    }
    fn flush(&mut self) {
        while !self.out.is_empty() {
            let r = match &mut self.io {
                Io::Sock(s) => s.write(&self.out),
                Io::Port(f) => f.write(&self.out),
            };
            match r {
                Ok(0) => break,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    match self.io {
                        Io::Sock(_) => self.closed = true,
                        // No host on the other end: drop what is queued.
                        Io::Port(_) => self.out.clear(),
                    }
                    break;
                }
            }
        }
    }
}

/// Finds `/dev/vportXpY` whose sysfs name is `name`.
pub fn find_port(sys_class: &Path, dev: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_class).ok()?;
    for e in entries.flatten() {
        let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(dev.join(e.file_name()));
        }
    }
    None
}

pub struct Control {
    listener: Option<UnixListener>,
    conns: Vec<Conn>,
    /// Index into `conns` of the serial port, which is never closed.
    port: Option<usize>,
    /// A port without a host reports hangup on every poll; it is left out of the poll
    /// set until then so the loop does not spin.
    port_quiet_until: Option<Instant>,
}

impl Control {
    pub fn new() -> Control {
        Control {
            listener: None,
            conns: Vec::new(),
            port: None,
            port_quiet_until: None,
        }
    }

    /// Listens on the unix socket (replacing a stale file from an earlier run).
    pub fn listen(&mut self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .map_err(|e| format!("failed to listen on {}: {e}", path.display()))?;
        l.set_nonblocking(true)
            .map_err(|e| format!("failed to configure {}: {e}", path.display()))?;
        self.listener = Some(l);
        Ok(())
    }

    /// Opens the serial port (a character device, or anything read/write in tests).
    pub fn open_port(&mut self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| format!("failed to open control port {}: {e}", path.display()))?;
        self.conns.push(Conn {
            io: Io::Port(f),
            inbuf: Vec::new(),
            out: Vec::new(),
            closed: false,
        });
        self.port = Some(self.conns.len() - 1);
        Ok(())
    }

    pub fn has_port(&self) -> bool {
        self.port.is_some()
    }

    /// `(fd, want_write)` pairs to poll.
    pub fn poll_fds(&self) -> Vec<(RawFd, bool)> {
        let now = Instant::now();
        let mut fds = Vec::new();
        if let Some(l) = &self.listener {
            fds.push((l.as_raw_fd(), false));
        }
        for (i, c) in self.conns.iter().enumerate() {
            if Some(i) == self.port && self.port_quiet_until.is_some_and(|t| now < t) {
                continue;
            }
            fds.push((c.fd(), !c.out.is_empty()));
        }
        fds
    }

    /// Queues an event for the serial port.
    pub fn event(&mut self, ev: &Value) {
        if let Some(p) = self.port {
            self.conns[p].queue(ev);
            self.conns[p].flush();
        }
    }

    /// Accepts, reads, answers (through `handle`) and writes; non-blocking.
    pub fn step(&mut self, handle: &mut dyn FnMut(Request) -> Value) {
        if let Some(l) = &self.listener {
            while let Ok((s, _)) = l.accept() {
                if s.set_nonblocking(true).is_ok() && self.conns.len() < 64 {
                    self.conns.push(Conn {
                        io: Io::Sock(s),
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        closed: false,
                    });
                }
            }
        }
        let now = Instant::now();
        let mut buf = [0u8; 4096];
        for i in 0..self.conns.len() {
            let is_port = Some(i) == self.port;
            if is_port && self.port_quiet_until.is_some_and(|t| now < t) {
                self.conns[i].flush();
                continue;
            }
            let c = &mut self.conns[i];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => {
                        if is_port {
                            self.port_quiet_until = Some(now + Duration::from_millis(250));
                        } else {
                            c.closed = true;
                        }
                        break;
                    }
                    Ok(n) => {
                        c.inbuf.extend_from_slice(&buf[..n]);
                        if c.inbuf.len() > MAX_IN && !c.inbuf.contains(&b'\n') {
                            c.inbuf.clear();
                            c.queue(&error_reply("invalid", "request line too long"));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        if is_port {
                            self.port_quiet_until = Some(now + Duration::from_millis(250));
                        } else {
                            c.closed = true;
                        }
                        break;
                    }
                }
            }
            while let Some(pos) = c.inbuf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = c.inbuf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                let reply = match parse_request(text) {
                    Ok(req) => handle(req),
                    Err(reply) => reply,
                };
                c.queue(&reply);
            }
            c.flush();
        }
        // Closing shifts indices; the port is re-found by identity of its variant.
        let port_fd = self.port.map(|p| self.conns[p].fd());
        self.conns
            .retain(|c| !c.closed || matches!(c.io, Io::Port(_)));
        self.port = port_fd.and_then(|fd| self.conns.iter().position(|c| c.fd() == fd));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_get_named_errors() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(r#"{"cmd":"kill","service":"noded","signal":9}"#),
            Ok(Request::Kill {
                service: "noded".into(),
                signal: 9
            })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"restart","service":"x"}"#),
            Ok(Request::Restart {
                service: "x".into()
            })
        );
        let e = parse_request(r#"{"cmd":"restart"}"#).unwrap_err();
        assert_eq!(e["reply"], "restart");
        assert_eq!(e["ok"], false);
        let e = parse_request(r#"{"cmd":"dance"}"#).unwrap_err();
        assert!(e["error"].as_str().unwrap().contains("dance"));
        assert_eq!(parse_request("nonsense").unwrap_err()["ok"], false);
    }

    #[test]
    fn port_is_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join("class");
        for (p, n) in [("vport1p1", "other"), ("vport2p1", "org.edgeos.control")] {
            std::fs::create_dir_all(class.join(p)).unwrap();
            std::fs::write(class.join(p).join("name"), format!("{n}\n")).unwrap();
        }
        assert_eq!(
            find_port(&class, Path::new("/dev"), "org.edgeos.control"),
            Some(PathBuf::from("/dev/vport2p1"))
        );
        assert_eq!(find_port(&class, Path::new("/dev"), "nope"), None);
    }
}
