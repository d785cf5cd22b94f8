//! The core's Prometheus as the tests and `cargo xtask core up` run it: Debian's
//! `prometheus` on loopback, its remote-write receiver on (`edgectl prometheus` writes
//! into it), samples up to a day late taken (a box that was cut off backfills), and the
//! alert rules of image/observability/ loaded (evaluated every second in the tests). Shared with the QEMU fabric
//! scenario (qemu-tests/tests/fabric.rs includes this file) and with `cargo xtask core
//! up` (xtask/src/core.rs), so it needs only std and serde_json.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// image/observability/: the alert rules, their tests, the dashboard.
pub fn observability() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/observability")
}

pub struct Prometheus {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Prometheus {
    /// Starts one with its configuration and data under `dir`, on a free port, its rules
    /// evaluated every second; returns once it is ready.
    pub fn start(dir: &Path) -> Prometheus {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        Prometheus::try_start(dir, port, "1s").unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts one on 127.0.0.1:`port` with its configuration and data under `dir`, the
    /// rules evaluated every `evaluation_interval`, in a process group of its own; returns
    /// once it is ready, or why not.
    pub fn try_start(
        dir: &Path,
        port: u16,
        evaluation_interval: &str,
    ) -> Result<Prometheus, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  evaluation_interval: {evaluation_interval}\nstorage:\n  tsdb:\n    out_of_order_time_window: 1d\nrule_files:\n  - {}\n",
                observability().join("alerts.yml").display()
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-remote-write-receiver")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run prometheus (Debian's package; cargo xtask test installs it): {e}"
                )
            })?;
        let mut p = Prometheus {
            child,
            port,
            dir: dir.to_owned(),
        };
        let start = Instant::now();
        while p.get("/-/ready").map(|(status, _)| status) != Some(200) {
            let exited = p.child.try_wait().ok().flatten();
            if exited.is_some() || start.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "prometheus not ready on 127.0.0.1:{port} ({}): {}",
                    exited.map_or("after 60 s".to_owned(), |st| format!("it exited, {st}")),
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(p)
    }

    /// Leaves it running after this handle: its process group id.
    pub fn detach(self) -> u32 {
        let pid = self.child.id();
        std::mem::forget(self);
        pid
    }

    /// Where `edgectl prometheus --write-url` writes.
    pub fn write_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `GET path` (HTTP/1.0: the answer comes whole, not chunked): status and body, or
    /// None while nothing listens.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(self.addr()).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1.to_owned();
        Some((status, body))
    }

    /// `/api/v1/query` of `expr` (at `time`, unix seconds, if given): the JSON answer.
    pub fn query(&self, expr: &str, time: Option<f64>) -> serde_json::Value {
        let mut path = format!("/api/v1/query?query={}", percent(expr));
        if let Some(t) = time {
            path.push_str(&format!("&time={t:.3}"));
        }
        let (_, body) = self
            .get(&path)
            .unwrap_or_else(|| panic!("prometheus did not answer {expr}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{expr}: {e}: {body}"))
    }

    /// The value of `expr` when it has exactly one series, else None.
    pub fn value(&self, expr: &str, time: Option<f64>) -> Option<f64> {
        let answer = self.query(expr, time);
        match &answer["data"]["result"].as_array()?[..] {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Every query of the dashboard, `$site` taken as every site.
    pub fn dashboard_queries() -> Vec<String> {
        let text = std::fs::read_to_string(observability().join("dashboard.json")).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut exprs = Vec::new();
        for p in dashboard["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                exprs.push(t["expr"].as_str().unwrap().replace("$site", ".*"));
            }
        }
        exprs
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bridge (`edgectl prometheus`) a test started: stopped when dropped, also when the
/// test fails, so none is left writing into a Prometheus that is gone.
pub struct Bridge(pub Child);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A query string value, percent-encoded.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
