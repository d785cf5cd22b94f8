//! The core's Prometheus as the tests run it: Debian's `prometheus` on loopback, its
//! remote-write receiver on (`edgectl prometheus` writes into it), samples up to a day
//! late taken (a box that was cut off backfills), and the alert rules of
//! image/observability/ loaded and evaluated every second. Shared with the QEMU fabric
//! scenario (qemu-tests/tests/fabric.rs includes this file), so it needs only std and
//! serde_json.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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
    /// Starts one with its configuration and data under `dir`; returns once it is ready.
    pub fn start(dir: &Path) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  evaluation_interval: 1s\nstorage:\n  tsdb:\n    out_of_order_time_window: 1d\nrule_files:\n  - {}\n",
                observability().join("alerts.yml").display()
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--web.enable-remote-write-receiver")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("run prometheus (Debian's package; cargo xtask test installs it)");
        let p = Prometheus {
            child,
            port,
            dir: dir.to_owned(),
        };
        let start = Instant::now();
        while p.get("/-/ready").map(|(status, _)| status) != Some(200) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "prometheus not ready after 60 s: {}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
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
