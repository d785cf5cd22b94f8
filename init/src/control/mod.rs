//! The control protocol (docs/contracts.md): JSON lines on the unix socket
//! `/run/edge/init.sock` and on the virtio-serial port `org.edgeos.control`. Requests are
//! parsed here and answered by the caller; events go to the serial port only. All I/O is
//! non-blocking: a slow or absent reader never holds up PID 1. `pods` and `logs` are
//! noded's to answer: they are relayed to its socket from a short-lived thread, so a
//! noded that hangs delays only that connection's reply, never PID 1's loop.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod request;
pub use request::*;

/// noded's control socket, where `pods` and `logs` are relayed.
pub const NODED_SOCKET: &str = edge_node_api::SOCKET;
/// How long a relayed request may take, connect to last byte.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);
/// The most read from noded for one answer, and the most relayed: log lines are dropped
/// oldest first until the reply fits (long lines can make even 1000 large).
const RELAY_READ_MAX: u64 = 4 << 20;
const RELAY_REPLY_MAX: usize = 128 * 1024;
/// Relays in flight at once; more are refused rather than piling up threads in PID 1.
const RELAYS_MAX: usize = 4;

impl Relay {
    /// The request in noded's protocol (`op` where init says `cmd`).
    fn noded_request(&self) -> edge_node_api::Request {
        match self {
            Relay::Pods => edge_node_api::Request::pods(),
            Relay::Logs {
                pod,
                container,
                previous,
                tail,
            } => edge_node_api::Request::logs(edge_node_api::LogsRequest {
                pod: pod.clone(),
                container: container.clone(),
                previous: *previous,
                tail: usize::try_from(*tail).ok(),
            }),
        }
    }
}

/// Asks noded at `socket` and turns its answer into init's reply: noded's `pods` or
/// `logs` value unchanged under the same key, or `ok:false` naming the socket.
pub fn relay(socket: &Path, req: &Relay) -> Value {
    let cmd = req.name();
    let client = edge_node_api::Client {
        socket,
        timeout: RELAY_TIMEOUT,
        max_answer: RELAY_READ_MAX,
    };
    let answer = match client.ask(&req.noded_request()) {
        Err(e) => return error_reply(cmd, &e.to_string()),
        Ok(a) => a,
    };
    let value = match req {
        Relay::Pods => answer.pods.map(serde_json::to_value),
        Relay::Logs { .. } => answer.logs.map(serde_json::to_value),
    };
    match value {
        Some(Ok(v)) => {
            let mut reply = json!({"reply": cmd, "ok": true});
            reply[cmd] = v;
            fit_reply(reply)
        }
        Some(Err(e)) => error_reply(cmd, &format!("noded's answer: {e}")),
        None => {
            let e = answer
                .error
                .unwrap_or_else(|| "an answer without it".into());
            error_reply(cmd, &format!("noded ({}): {e}", socket.display()))
        }
    }
}

/// Drops the oldest log lines until the reply fits [`RELAY_REPLY_MAX`], saying so with
/// `"truncated": true`; a serial port is slow and a reply is one line.
fn fit_reply(mut reply: Value) -> Value {
    let size = |v: &Value| v.to_string().len();
    if size(&reply) <= RELAY_REPLY_MAX {
        return reply;
    }
    if let Some(lines) = reply
        .get_mut("logs")
        .and_then(|l| l.get_mut("lines"))
        .and_then(Value::as_array_mut)
    {
        let mut total: usize = lines.iter().map(|l| size(l) + 1).sum();
        let mut cut = 0;
        while cut < lines.len() && total > RELAY_REPLY_MAX / 2 {
            total -= size(&lines[cut]) + 1;
            cut += 1;
        }
        lines.drain(..cut);
        reply["truncated"] = json!(true);
        if size(&reply) <= RELAY_REPLY_MAX {
            return reply;
        }
    }
    let cmd = reply["reply"].as_str().unwrap_or("").to_owned();
    error_reply(
        &cmd,
        &format!("noded's answer is over {RELAY_REPLY_MAX} bytes even trimmed"),
    )
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
    /// Identifies the connection to a relay's answer across index shifts.
    id: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    closed: bool,
    /// A relayed request is out: later lines wait, so replies keep the requests' order.
    waiting: bool,
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
    noded_socket: PathBuf,
    next_id: u64,
    /// Relays in flight: the connection's id and where its reply will arrive.
    relays: Vec<(u64, mpsc::Receiver<Value>)>,
}

impl Control {
    pub fn new() -> Control {
        Control {
            listener: None,
            conns: Vec::new(),
            port: None,
            port_quiet_until: None,
            noded_socket: PathBuf::from(NODED_SOCKET),
            next_id: 0,
            relays: Vec::new(),
        }
    }

    /// Where `pods` and `logs` go instead of [`NODED_SOCKET`].
    #[cfg(test)]
    pub fn relay_to(&mut self, socket: &Path) {
        self.noded_socket = socket.to_path_buf();
    }

    fn conn(next_id: &mut u64, io: Io) -> Conn {
        *next_id += 1;
        Conn {
            io,
            id: *next_id,
            inbuf: Vec::new(),
            out: Vec::new(),
            closed: false,
            waiting: false,
        }
    }

    /// Queues the answers of finished relays on their connections.
    fn collect_relays(&mut self) {
        let conns = &mut self.conns;
        self.relays.retain(|(id, rx)| {
            let reply = match rx.try_recv() {
                Ok(v) => v,
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => {
                    error_reply("invalid", "the relay to noded ended without a reply")
                }
            };
            if let Some(c) = conns.iter_mut().find(|c| c.id == *id) {
                c.queue(&reply);
                c.waiting = false;
            }
            false
        });
    }

    /// Listens on the unix socket (replacing a stale file from an earlier run).
    pub fn listen(&mut self, path: &Path) -> crate::error::Result<()> {
        use crate::error::Error;
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).map_err(Error::io("listen on", path))?;
        l.set_nonblocking(true)
            .map_err(Error::io("configure", path))?;
        self.listener = Some(l);
        Ok(())
    }

    /// Opens the serial port (a character device, or anything read/write in tests).
    pub fn open_port(&mut self, path: &Path) -> crate::error::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(crate::error::Error::io("open control port", path))?;
        let c = Self::conn(&mut self.next_id, Io::Port(f));
        self.conns.push(c);
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
                    let c = Self::conn(&mut self.next_id, Io::Sock(s));
                    self.conns.push(c);
                }
            }
        }
        self.collect_relays();
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
                if c.waiting {
                    break;
                }
                let line: Vec<u8> = c.inbuf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                let reply = match parse_relay(text) {
                    Some(Ok(req)) if self.relays.len() >= RELAYS_MAX => error_reply(
                        req.name(),
                        &format!("{RELAYS_MAX} requests to noded are already waiting: retry"),
                    ),
                    Some(Ok(req)) => {
                        let name = req.name();
                        let (tx, rx) = mpsc::channel();
                        let socket = self.noded_socket.clone();
                        let spawned =
                            std::thread::Builder::new()
                                .name("relay".into())
                                .spawn(move || {
                                    let _ = tx.send(relay(&socket, &req));
                                });
                        match spawned {
                            Ok(_) => {
                                self.relays.push((c.id, rx));
                                c.waiting = true;
                                continue;
                            }
                            Err(e) => {
                                error_reply(name, &format!("failed to start a relay to noded: {e}"))
                            }
                        }
                    }
                    Some(Err(reply)) => reply,
                    None => match parse_request(text) {
                        Ok(req) => handle(req),
                        Err(reply) => reply,
                    },
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
        assert_eq!(
            parse_request(r#"{"cmd":"watchdog-test"}"#),
            Ok(Request::WatchdogTest)
        );
        let e = parse_request(r#"{"cmd":"restart"}"#).unwrap_err();
        assert_eq!(e["reply"], "restart");
        assert_eq!(e["ok"], false);
        let e = parse_request(r#"{"cmd":"dance"}"#).unwrap_err();
        assert!(e["error"].as_str().unwrap().contains("dance"));
        assert_eq!(parse_request("nonsense").unwrap_err()["ok"], false);
    }

    #[test]
    fn pods_and_logs_requests_parse_with_bounded_tail() {
        assert_eq!(parse_relay(r#"{"cmd":"pods"}"#), Some(Ok(Relay::Pods)));
        assert_eq!(
            parse_relay(r#"{"cmd":"logs","pod":"edge/cam"}"#),
            Some(Ok(Relay::Logs {
                pod: "edge/cam".into(),
                container: None,
                previous: false,
                tail: LOGS_TAIL_DEFAULT
            }))
        );
        let logs =
            parse_relay(r#"{"cmd":"logs","pod":"cam","container":"c","previous":true,"tail":5}"#);
        assert_eq!(
            logs,
            Some(Ok(Relay::Logs {
                pod: "cam".into(),
                container: Some("c".into()),
                previous: true,
                tail: 5
            }))
        );
        // noded's own protocol, field for field.
        let Some(Ok(r)) = logs else { unreachable!() };
        assert_eq!(
            serde_json::to_value(r.noded_request()).unwrap(),
            json!({"op":"logs","pod":"cam","container":"c","previous":true,"tail":5})
        );
        for (bad, why) in [
            (r#"{"cmd":"logs"}"#, "missing \"pod\""),
            (r#"{"cmd":"logs","pod":"a","tail":0}"#, "\"tail\" must be"),
            (
                r#"{"cmd":"logs","pod":"a","tail":100000}"#,
                "from 1 to 1000",
            ),
            (
                r#"{"cmd":"logs","pod":"a","previous":"yes"}"#,
                "\"previous\"",
            ),
            (r#"{"cmd":"logs","pod":"a","container":3}"#, "\"container\""),
        ] {
            let e = parse_relay(bad).unwrap().unwrap_err();
            assert_eq!(e["reply"], "logs", "{bad}");
            assert!(e["error"].as_str().unwrap().contains(why), "{bad}: {e}");
        }
        assert_eq!(parse_relay(r#"{"cmd":"status"}"#), None);
        assert_eq!(parse_relay("nonsense"), None);
    }

    /// Sends `lines` on one connection to `ctl` and returns the replies, stepping the
    /// control loop meanwhile as PID 1 does.
    fn exchange(ctl: &mut Control, path: &Path, lines: &str, n: usize) -> Vec<Value> {
        let client = std::thread::spawn({
            let (path, lines) = (path.to_path_buf(), lines.to_owned());
            move || {
                use std::io::{BufRead, BufReader};
                let mut s = UnixStream::connect(&path).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(lines.as_bytes()).unwrap();
                let mut r = BufReader::new(s);
                (0..n)
                    .map(|_| {
                        let mut l = String::new();
                        r.read_line(&mut l).unwrap();
                        serde_json::from_str::<Value>(&l).unwrap()
                    })
                    .collect::<Vec<Value>>()
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !client.is_finished() {
            assert!(Instant::now() < deadline, "no replies");
            ctl.step(&mut |req| ok_reply(req.name()));
            std::thread::sleep(Duration::from_millis(10));
        }
        client.join().unwrap()
    }

    #[test]
    fn pods_and_logs_are_relayed_to_noded_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, noded) = (dir.path().join("init.sock"), dir.path().join("noded.sock"));
        let mut ctl = Control::new();
        ctl.listen(&ours).unwrap();
        ctl.relay_to(&noded);
        // A pod report as noded sends it (edge-node-api's PodReport).
        let cam = json!({"file": "cam.yaml", "name": "cam", "namespace": "default",
            "uid": "0123abcd", "state": "running", "error": null, "containers": []});

        // No noded: the error names its socket; other requests are still answered.
        let r = exchange(
            &mut ctl,
            &ours,
            "{\"cmd\":\"pods\"}\n{\"cmd\":\"status\"}\n",
            2,
        );
        assert_eq!(r[0]["reply"], "pods");
        assert_eq!(r[0]["ok"], false);
        let e = r[0]["error"].as_str().unwrap();
        assert!(e.contains(&noded.display().to_string()), "{e}");
        assert_eq!(r[1]["reply"], "status");

        // A fake noded: answers pods, and logs with more than a reply may carry.
        let listener = UnixListener::bind(&noded).unwrap();
        let answered = cam.clone();
        let fake = std::thread::spawn(move || {
            use std::io::{BufRead, BufReader};
            let mut asked = Vec::new();
            for _ in 0..3 {
                let (s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                let req: Value = serde_json::from_str(&line).unwrap();
                let answer = match req["op"].as_str().unwrap() {
                    "pods" => json!({"pods": [answered.clone()]}),
                    _ if req["pod"] == "big" => {
                        let lines: Vec<String> = (0..1000)
                            .map(|i| format!("{i:04} {}", "x".repeat(400)))
                            .collect();
                        json!({"logs": {"lines": lines, "malformed": 0}})
                    }
                    _ => json!({"error": "no pod named \"nope\""}),
                };
                (&s).write_all(format!("{answer}\n").as_bytes()).unwrap();
                asked.push(req);
            }
            asked
        });
        let r = exchange(
            &mut ctl,
            &ours,
            concat!(
                "{\"cmd\":\"pods\"}\n{\"cmd\":\"status\"}\n",
                "{\"cmd\":\"logs\",\"pod\":\"big\",\"tail\":1000}\n",
                "{\"cmd\":\"logs\",\"pod\":\"nope\"}\n"
            ),
            4,
        );
        assert_eq!(r[0], json!({"reply":"pods","ok":true,"pods":[cam]}));
        assert_eq!(r[1]["reply"], "status", "replies keep the requests' order");
        assert_eq!(r[2]["ok"], true);
        assert_eq!(r[2]["truncated"], true);
        let lines = r[2]["logs"]["lines"].as_array().unwrap();
        assert!(lines.len() > 10 && lines.len() < 1000, "{}", lines.len());
        assert!(lines.last().unwrap().as_str().unwrap().starts_with("0999 "));
        assert!(r[2].to_string().len() <= RELAY_REPLY_MAX);
        assert_eq!(r[3]["ok"], false);
        assert!(
            r[3]["error"].as_str().unwrap().contains("no pod named"),
            "{}",
            r[3]
        );
        let asked = fake.join().unwrap();
        assert_eq!(asked[1]["tail"], 1000);
        assert_eq!(asked[2]["tail"], LOGS_TAIL_DEFAULT);
    }

    #[test]
    fn a_noded_that_does_not_answer_times_out_without_holding_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let (ours, noded) = (dir.path().join("init.sock"), dir.path().join("noded.sock"));
        let _silent = UnixListener::bind(&noded).unwrap();
        let mut ctl = Control::new();
        ctl.listen(&ours).unwrap();
        ctl.relay_to(&noded);
        let started = Instant::now();
        let client = std::thread::spawn({
            let ours = ours.clone();
            move || {
                use std::io::{BufRead, BufReader};
                let mut s = UnixStream::connect(&ours).unwrap();
                s.write_all(b"{\"cmd\":\"pods\"}\n").unwrap();
                let mut l = String::new();
                BufReader::new(s).read_line(&mut l).unwrap();
                serde_json::from_str::<Value>(&l).unwrap()
            }
        });
        let mut longest_step = Duration::ZERO;
        while !client.is_finished() {
            assert!(started.elapsed() < Duration::from_secs(20), "no reply");
            let t = Instant::now();
            ctl.step(&mut |req| ok_reply(req.name()));
            longest_step = longest_step.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = client.join().unwrap();
        assert_eq!(r["ok"], false);
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains("did not answer") && e.contains("noded.sock"),
            "{e}"
        );
        assert!(started.elapsed() >= RELAY_TIMEOUT);
        assert!(
            longest_step < Duration::from_millis(500),
            "{longest_step:?}"
        );
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
