//! Container probes: one task per running container that has any, running its startup,
//! liveness and readiness probes on their own schedules and keeping a [`Health`] the
//! reconciler reads each pass. The task only observes; killing a container whose
//! liveness failed, and restarting it per policy, is the reconciler's.
//!
//! As in Kubernetes: a startup probe holds the other two back until it succeeds; each
//! probe first runs `initialDelaySeconds` after the container started, then every
//! `periodSeconds`; `failureThreshold` failures in a row fail it, `successThreshold`
//! successes in a row (readiness only) make the container ready again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cri::{api::ExecSyncRequest, Client};
use crate::error::{Error, Result};
use crate::manifest::{Container, Probe, ProbeAction};

/// What the probes say about one container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The startup probe succeeded (or there is none).
    pub started: bool,
    pub ready: bool,
    /// The startup or liveness probe failed: the container must be restarted. Starts
    /// with "startup probe failed" or "liveness probe failed".
    pub failed: Option<String>,
}

/// The probes of one container; they stop when this is dropped.
pub struct Prober {
    health: Arc<Mutex<Health>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the probes go: the container for exec, `ip` (the pod's address, 127.0.0.1 for
/// a host-network pod) for HTTP and TCP unless the probe names a host.
#[derive(Clone)]
pub struct Target {
    pub cri: Client,
    pub container_id: String,
    pub ip: String,
    /// For log lines.
    pub pod: String,
    pub container: String,
}

pub fn has_probes(c: &Container) -> bool {
    c.liveness_probe.is_some() || c.readiness_probe.is_some() || c.startup_probe.is_some()
}

impl Prober {
    /// Starts probing a container that started at `started_at`.
    pub fn start(target: Target, spec: &Container, started_at: Instant) -> Prober {
        let health = Arc::new(Mutex::new(Health::default()));
        let task = tokio::spawn(run(
            target,
            spec.startup_probe.clone(),
            spec.liveness_probe.clone(),
            spec.readiness_probe.clone(),
            started_at,
            health.clone(),
        ));
        Prober { health, task }
    }

    pub fn health(&self) -> Health {
        self.health.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

fn set(health: &Mutex<Health>, f: impl FnOnce(&mut Health)) {
    if let Ok(mut h) = health.lock() {
        f(&mut h);
    }
}

async fn run(
    t: Target,
    startup: Option<Probe>,
    liveness: Option<Probe>,
    readiness: Option<Probe>,
    t0: Instant,
    health: Arc<Mutex<Health>>,
) {
    if let Some(p) = &startup {
        if let Err(why) = until_threshold(&t, p, t0, true).await {
            tracing::warn!(pod = %t.pod, container = %t.container, "startup probe failed: {why}");
            set(&health, |h| {
                h.failed = Some(format!("startup probe failed: {why}"))
            });
            return;
        }
        tracing::info!(pod = %t.pod, container = %t.container, "startup probe succeeded");
    }
    set(&health, |h| {
        h.started = true;
        h.ready = readiness.is_none();
    });
    let live = async {
        match &liveness {
            Some(p) => until_threshold(&t, p, t0, false).await,
            None => std::future::pending().await,
        }
    };
    let ready = async {
        match &readiness {
            Some(p) => readiness_loop(&t, p, t0, &health).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = live => {
            let why = r.err().map(|e| e.to_string()).unwrap_or_default();
            tracing::warn!(pod = %t.pod, container = %t.container, "liveness probe failed: {why}");
            set(&health, |h| {
                h.ready = false;
                h.failed = Some(format!("liveness probe failed: {why}"));
            });
        }
        () = ready => {}
    }
}

/// Runs `p` on its schedule. With `until_success`, returns Ok at the first success (a
/// startup probe); otherwise runs until it fails `failureThreshold` times in a row.
async fn until_threshold(t: &Target, p: &Probe, t0: Instant, until_success: bool) -> Result<()> {
    let mut next = t0 + Duration::from_secs(p.initial_delay_seconds.into());
    let mut failures = 0;
    loop {
        tokio::time::sleep_until(next.into()).await;
        match check(t, p).await {
            Ok(()) if until_success => return Ok(()),
            Ok(()) => failures = 0,
            Err(why) => {
                failures += 1;
                crate::metrics::probe_failed(if until_success {
                    crate::metrics::ProbeKind::Startup
                } else {
                    crate::metrics::ProbeKind::Liveness
                });
                tracing::debug!(pod = %t.pod, container = %t.container, failures, "probe failed: {why}");
                if failures >= p.failure_threshold {
                    return Err(why);
                }
            }
        }
        next = Instant::now() + Duration::from_secs(p.period_seconds.into());
    }
}

async fn readiness_loop(t: &Target, p: &Probe, t0: Instant, health: &Mutex<Health>) {
    let mut next = t0 + Duration::from_secs(p.initial_delay_seconds.into());
    let (mut successes, mut failures) = (0u32, 0u32);
    loop {
        tokio::time::sleep_until(next.into()).await;
        let was = health.lock().map(|h| h.ready).unwrap_or(false);
        match check(t, p).await {
            Ok(()) => {
                failures = 0;
                successes = successes.saturating_add(1);
                if !was && successes >= p.success_threshold {
                    tracing::info!(pod = %t.pod, container = %t.container, "readiness probe succeeded: ready");
                    set(health, |h| h.ready = true);
                }
            }
            Err(why) => {
                crate::metrics::probe_failed(crate::metrics::ProbeKind::Readiness);
                successes = 0;
                failures = failures.saturating_add(1);
                if was && failures >= p.failure_threshold {
                    tracing::warn!(pod = %t.pod, container = %t.container, "readiness probe failed: not ready: {why}");
                    set(health, |h| h.ready = false);
                }
            }
        }
        next = Instant::now() + Duration::from_secs(p.period_seconds.into());
    }
}

/// One run of a probe, bounded by its timeout.
pub async fn check(t: &Target, p: &Probe) -> Result<()> {
    let timeout = Duration::from_secs(p.timeout_seconds.into());
    match &p.action {
        ProbeAction::Exec { command } => {
            let req = ExecSyncRequest {
                container_id: t.container_id.clone(),
                cmd: command.clone(),
                timeout: p.timeout_seconds.into(),
            };
            // The runtime enforces the timeout; ours is a backstop for a runtime that
            // does not answer at all.
            let exec = |outcome| Error::ExecProbe {
                command: command.clone(),
                outcome,
            };
            let r = tokio::time::timeout(timeout + Duration::from_secs(2), t.cri.exec_sync(req))
                .await
                .map_err(|_| exec(format!("timed out after {timeout:?}")))?
                .map_err(|e| Error::Probe {
                    probe: format!("exec {command:?}"),
                    detail: e.to_string(),
                })?;
            if r.exit_code == 0 {
                return Ok(());
            }
            let out = if r.stderr.is_empty() {
                r.stdout
            } else {
                r.stderr
            };
            let out = String::from_utf8_lossy(&out);
            let out: String = out.trim().chars().take(200).collect();
            Err(exec(if out.is_empty() {
                format!("exited with {}", r.exit_code)
            } else {
                format!("exited with {}: {out}", r.exit_code)
            }))
        }
        ProbeAction::TcpSocket { host, port } => {
            let host = host.as_deref().unwrap_or(&t.ip);
            let failed = |detail| Error::Probe {
                probe: format!("tcp {}", addr(host, *port)),
                detail,
            };
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, *port)))
                .await
                .map_err(|_| failed(format!("timed out after {timeout:?}")))?
                .map(drop)
                .map_err(|e| failed(e.to_string()))
        }
        ProbeAction::HttpGet {
            host,
            port,
            path,
            headers,
        } => {
            let host = host.as_deref().unwrap_or(&t.ip);
            let url = format!("http://{}{path}", addr(host, *port));
            let failed = |detail| get_failed(&url, detail);
            let status = tokio::time::timeout(timeout, http_get(&url, host, *port, path, headers))
                .await
                .map_err(|_| failed(format!("timed out after {timeout:?}")))??;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(failed(format!("HTTP status {status}")))
            }
        }
    }
}

fn addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn get_failed(url: &str, detail: String) -> Error {
    Error::Probe {
        probe: format!("GET {url}"),
        detail,
    }
}

/// A plain HTTP/1.1 GET of `url` (`host`, `port`, `path`); returns the status code.
/// Only the status line is read.
async fn http_get(
    url: &str,
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16> {
    let failed = |detail| get_failed(url, detail);
    let mut s = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kube-probe/noded\r\nAccept: */*\r\nConnection: close\r\n",
        addr(host, port)
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| failed(format!("failed to send the request: {e}")))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| failed(format!("failed to read the answer: {e}")))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    status_code(&buf).ok_or_else(|| {
        let first: String = String::from_utf8_lossy(&buf)
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(80)
            .collect();
        failed(format!("not an HTTP answer: {first:?}"))
    })
}

/// The code of an `HTTP/1.x NNN reason` status line.
fn status_code(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.trim_end().splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_give_their_code() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 302 Found\r\nLocation: /"), Some(302));
        assert_eq!(status_code(b"HTTP/1.1 503"), Some(503));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(status_code(b""), None);
    }

    fn probe(action: ProbeAction) -> Probe {
        Probe {
            action,
            initial_delay_seconds: 0,
            period_seconds: 1,
            timeout_seconds: 1,
            success_threshold: 1,
            failure_threshold: 1,
        }
    }

    /// A one-shot HTTP server answering `status`.
    async fn serve(status: &'static str) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        port
    }

    #[tokio::test]
    async fn http_and_tcp_probes_succeed_on_2xx_3xx_and_open_ports_only() {
        // Exec needs a runtime; a client to a socket nobody serves is enough for the rest.
        let target = Target {
            cri: Client::lazy(std::path::Path::new("/nonexistent.sock")),
            container_id: String::new(),
            ip: "127.0.0.1".into(),
            pod: "p".into(),
            container: "c".into(),
        };
        let get = |port| {
            probe(ProbeAction::HttpGet {
                host: None,
                port,
                path: "/healthz".into(),
                headers: vec![("X-Probe".into(), "1".into())],
            })
        };
        for (status, ok) in [
            ("200 OK", true),
            ("302 Found", true),
            ("404 Not Found", false),
            ("500 Oops", false),
        ] {
            let port = serve(status).await;
            let r = check(&target, &get(port)).await;
            assert_eq!(r.is_ok(), ok, "{status}: {r:?}");
            if let Err(e) = r.map_err(|e| e.to_string()) {
                assert!(
                    e.starts_with(&format!("GET http://127.0.0.1:{port}/healthz: HTTP status")),
                    "{e}"
                );
            }
        }
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = open.local_addr().unwrap().port();
        assert!(
            check(&target, &probe(ProbeAction::TcpSocket { host: None, port }))
                .await
                .is_ok()
        );
        drop(open);
        let e = check(&target, &probe(ProbeAction::TcpSocket { host: None, port }))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("tcp 127.0.0.1:{port}: ")), "{e}");
        let e = check(&target, &get(port)).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("GET http://127.0.0.1:{port}/healthz: ")),
            "{e}"
        );
    }
}
