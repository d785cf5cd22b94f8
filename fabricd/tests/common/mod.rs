//! The test harness: the real fabricd binary with a temp config, a framed-protocol
//! client, and (for the uplink tests) a real nats-server with TLS.
#![allow(dead_code)] // each test file uses a part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabricd::produce;
use fabricd::record::Record;

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Fabricd {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub tcp: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
    /// Every stderr line of every run of this instance.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Fabricd {
    /// Writes a config under `dir` (log in `dir/log`) with `extra` TOML appended.
    pub fn configure(dir: &Path, extra: &str) -> Fabricd {
        let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let socket = dir.join("produce.sock");
        let config = dir.join("fabricd.toml");
        let text = format!(
            "site = \"s1\"\nmachine = \"m1\"\nlog_dir = \"{}\"\nunix_socket = \"{}\"\ntcp_listen = \"{tcp}\"\nhttp_listen = \"{http}\"\n{extra}\n",
            dir.join("log").display(),
            socket.display()
        );
        std::fs::write(&config, text).unwrap();
        Fabricd {
            child: None,
            dir: dir.to_owned(),
            config,
            socket,
            tcp,
            http,
            metrics,
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Starts the binary and waits for `READY=1` on its NOTIFY_FD.
    pub fn start(&mut self) {
        let (mut ready_rd, ready_wr) = std::io::pipe().unwrap();
        let fd = ready_wr.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fabricd"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("info")
            .env("NOTIFY_FD", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: dup2 is async-signal-safe; the child gets the pipe's write end as fd 3.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn fabricd");
        drop(ready_wr);
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("FABRICD_TEST_VERBOSE").is_some() {
                    eprintln!("fabricd: {line}");
                }
                log.lock().unwrap().push(line);
            }
        });
        let mut got = String::new();
        // Read until READY or EOF (the child died).
        let _ = ready_rd.read_to_string(&mut got);
        if !got.contains("READY=1") {
            let status = child.wait().unwrap();
            panic!(
                "fabricd did not become ready ({status}); stderr:\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Fabricd {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn record(topic: &str, value: &[u8]) -> Record {
    Record {
        topic: topic.into(),
        key: None,
        headers: vec![],
        timestamp_ms: 0,
        value: value.to_vec(),
    }
}

/// Reads one reply frame: (status, payload). None when the server closed the stream.
pub fn read_reply(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((body[0], body[1..].to_vec()))
}

/// Sends one record and waits for its reply; Ok(offset) or Err((status, message)).
pub fn produce<S: Read + Write>(s: &mut S, rec: &Record) -> Result<u64, (u8, String)> {
    s.write_all(&produce::encode_request(rec)).unwrap();
    let (status, payload) = read_reply(s).expect("a reply");
    if status == produce::OK {
        Ok(u64::from_be_bytes(payload[..8].try_into().unwrap()))
    } else {
        Err((status, String::from_utf8_lossy(&payload).into_owned()))
    }
}

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// One plain HTTP/1.1 request on a fresh connection: (status, body).
pub fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = tcp(addr);
    s.write_all(request).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}
