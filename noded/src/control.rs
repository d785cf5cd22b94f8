//! noded's control socket: one JSON request per line, one JSON answer per line, so
//! `noded pods`, `noded logs` and init's console relay read the pods' state and their
//! containers' logs without going through containerd. The protocol's types and its
//! client are the edge-node-api crate's.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use edge_node_api::{Answer, Client, LogsAnswer, LogsRequest, Request};

use crate::error::{Error, Result};
use crate::pods::{PodReport, Status};

/// Binds `path` (replacing a stale socket from an earlier run) and serves in a task.
/// Logs are read from `log_dir`, the reconciler's.
pub fn spawn(path: &Path, status: Status, log_dir: PathBuf) -> Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io("failed to create", dir))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("failed to remove stale", path)(e)),
    }
    let listener =
        UnixListener::bind(path).map_err(Error::io("failed to bind control socket", path))?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, status.clone(), log_dir.clone()));
                }
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn answer(stream: UnixStream, status: Status, log_dir: PathBuf) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let pods = || status.lock().map(|s| s.clone()).unwrap_or_default();
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(r) if r.op == "pods" => Answer {
                pods: Some(pods()),
                ..Default::default()
            },
            Ok(r) if r.op == "logs" => {
                let (pods, dir) = (pods(), log_dir.clone());
                // Logs may be tens of MiB: read them off the async threads.
                let pod = r.logs.pod.clone();
                let read = tokio::task::spawn_blocking(move || read_logs(&pods, &dir, &r.logs))
                    .await
                    .unwrap_or_else(|e| {
                        Err(Error::Logs {
                            pod,
                            detail: format!("log reader failed: {e}"),
                        })
                    });
                match read {
                    Ok(l) => Answer {
                        logs: Some(l),
                        ..Default::default()
                    },
                    Err(e) => Answer {
                        error: Some(e.to_string()),
                        ..Default::default()
                    },
                }
            }
            Ok(r) => Answer {
                error: Some(format!("unknown op {:?}", r.op)),
                ..Default::default()
            },
            Err(e) => Answer {
                error: Some(format!("bad request: {e}")),
                ..Default::default()
            },
        };
        let Ok(mut out) = serde_json::to_vec(&answer) else {
            return;
        };
        out.push(b'\n');
        if wr.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Where a container attempt's logs are: its directory, the attempt, and how to name it.
#[derive(Debug, Clone)]
pub struct Located {
    pub dir: PathBuf,
    pub attempt: u32,
    /// `container "app" of pod default/web`.
    pub what: String,
}

impl Located {
    /// The attempt's lines (`pod` as the request named it, for the error).
    pub fn read(&self, pod: &str) -> Result<crate::logs::Lines> {
        crate::logs::read(&self.dir, self.attempt).map_err(|e| Error::Logs {
            pod: pod.to_string(),
            detail: format!("failed to read the logs of {}: {e}", self.what),
        })
    }
}

/// Finds the pod and container a logs request names, and reads that attempt's logs.
pub fn read_logs(pods: &[PodReport], log_dir: &Path, req: &LogsRequest) -> Result<LogsAnswer> {
    let read = locate_logs(pods, log_dir, req)?.read(&req.pod)?;
    let mut lines = read.lines;
    if let Some(n) = req.tail {
        lines.drain(..lines.len().saturating_sub(n));
    }
    Ok(LogsAnswer {
        lines,
        malformed: read.malformed,
    })
}

/// Finds the pod, container and attempt a logs request names (the kubelet API's
/// `follow` reads on from there).
pub fn locate_logs(pods: &[PodReport], log_dir: &Path, req: &LogsRequest) -> Result<Located> {
    let refused = |detail| Error::Logs {
        pod: req.pod.clone(),
        detail,
    };
    let (ns, name) = match req.pod.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, req.pod.as_str()),
    };
    let found: Vec<&PodReport> = pods
        .iter()
        .filter(|p| !p.name.is_empty() && p.name == name && ns.is_none_or(|ns| p.namespace == ns))
        .collect();
    let pod = match found.as_slice() {
        [p] => *p,
        [] => {
            let known: Vec<String> = pods
                .iter()
                .filter(|p| !p.name.is_empty())
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            return Err(refused(format!(
                "no pod named {:?} (pods: {})",
                req.pod,
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            )));
        }
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            return Err(refused(format!(
                "pod name {:?} is ambiguous ({}): give <namespace>/<name>",
                req.pod,
                names.join(", ")
            )));
        }
    };
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    let container = match &req.container {
        Some(c) if names.contains(&c.as_str()) => c.clone(),
        Some(c) => {
            return Err(refused(format!(
                "pod {}/{} has no container {c:?} (containers: {})",
                pod.namespace,
                pod.name,
                names.join(", ")
            )))
        }
        None => {
            let apps: Vec<&str> = pod
                .containers
                .iter()
                .filter(|c| !c.init)
                .map(|c| c.name.as_str())
                .collect();
            match apps.as_slice() {
                [one] => one.to_string(),
                _ => {
                    return Err(refused(format!(
                        "pod {}/{} has several containers ({}): name one",
                        pod.namespace,
                        pod.name,
                        names.join(", ")
                    )))
                }
            }
        }
    };
    let dir =
        crate::pods::pod_log_dir_of(log_dir, &pod.namespace, &pod.name, &pod.uid).join(&container);
    let attempts = match crate::logs::attempts(&dir) {
        Ok(a) => a,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io("failed to list", &dir)(e)),
    };
    let what = format!(
        "container {container:?} of pod {}/{}",
        pod.namespace, pod.name
    );
    let attempt = match (attempts.as_slice(), req.previous) {
        ([], _) => return Err(refused(format!("{what} has no logs yet"))),
        ([.., last], false) => *last,
        ([.., prev, _], true) => *prev,
        ([_], true) => return Err(refused(format!("{what} has no previous attempt"))),
    };
    Ok(Located { dir, attempt, what })
}

/// Asks a running noded for its pods (the blocking client, off the async threads).
pub async fn pods(path: &Path) -> Result<Vec<PodReport>> {
    ask(path, |c| c.pods()).await
}

/// Asks a running noded for a container's logs (as [`pods`]).
pub async fn logs(path: &Path, req: LogsRequest) -> Result<LogsAnswer> {
    ask(path, move |c| c.logs(req)).await
}

/// One request through edge-node-api's blocking client (off the async threads), whose
/// errors are noded's answer, or why there was none, in its words.
async fn ask<T: Send + 'static>(
    path: &Path,
    request: impl FnOnce(&Client) -> std::result::Result<T, edge_node_api::Error> + Send + 'static,
) -> Result<T> {
    let socket = path.to_path_buf();
    let asked = socket.clone();
    match tokio::task::spawn_blocking(move || request(&Client::new(&asked))).await {
        Ok(answer) => Ok(answer?),
        Err(e) => Err(Error::Control {
            socket,
            detail: format!("the client failed: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::ContainerReport;

    #[tokio::test]
    async fn pods_are_answered_and_unknown_ops_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/noded.sock");
        let report = PodReport {
            file: "a.yaml".into(),
            name: "a".into(),
            namespace: "default".into(),
            uid: "u1".into(),
            state: "running".into(),
            error: None,
            containers: vec![ContainerReport {
                name: "a".into(),
                init: false,
                state: "running".into(),
                restarts: 2,
                exit_code: Some(0),
                last_error: None,
                ready: true,
            }],
            ip: None,
            image_refused: false,
        };
        let status: Status = std::sync::Arc::new(std::sync::Mutex::new(vec![report.clone()]));
        let task = spawn(&path, status, dir.path().join("logs")).unwrap();
        assert_eq!(pods(&path).await.unwrap(), vec![report]);

        let stream = UnixStream::connect(&path).await.unwrap();
        let (rd, mut wr) = stream.into_split();
        wr.write_all(b"{\"op\":\"reboot\"}\n").await.unwrap();
        let line = BufReader::new(rd)
            .lines()
            .next_line()
            .await
            .unwrap()
            .unwrap();
        assert!(line.contains("unknown op \\\"reboot\\\""), "{line}");
        task.abort();
    }

    #[tokio::test]
    async fn logs_are_read_by_pod_and_container_with_previous_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let ctr = |name: &str, init| ContainerReport {
            name: name.into(),
            init,
            state: "running".into(),
            restarts: 0,
            exit_code: None,
            last_error: None,
            ready: false,
        };
        let pod = PodReport {
            file: "cam.yaml".into(),
            name: "cam".into(),
            namespace: "edge".into(),
            uid: "u1".into(),
            state: "running".into(),
            error: None,
            containers: vec![ctr("fetch", true), ctr("cam", false)],
            ip: None,
            image_refused: false,
        };
        let cdir = logs.join("edge_cam_u1/cam");
        std::fs::create_dir_all(&cdir).unwrap();
        let ts = "2026-11-21T21:30:51.000000001Z";
        std::fs::write(cdir.join("0.log"), format!("{ts} stdout F first run\n")).unwrap();
        std::fs::write(
            cdir.join("1.log.1"),
            format!("{ts} stdout F a\n{ts} stdout P b\n"),
        )
        .unwrap();
        std::fs::write(
            cdir.join("1.log"),
            format!("{ts} stdout F c\ntorn line\n{ts} stderr F d\n"),
        )
        .unwrap();
        let status: Status = std::sync::Arc::new(std::sync::Mutex::new(vec![pod]));
        let path = dir.path().join("noded.sock");
        let task = spawn(&path, status, logs).unwrap();
        let req = |pod: &str, c: Option<&str>| LogsRequest {
            pod: pod.into(),
            container: c.map(str::to_string),
            ..Default::default()
        };

        // One app container: it is the default; rotated files come first.
        let l = super::logs(&path, req("cam", None)).await.unwrap();
        assert_eq!(l.lines, ["a", "bc", "d"]);
        assert_eq!(l.malformed, 1);
        let l = super::logs(
            &path,
            LogsRequest {
                previous: true,
                ..req("edge/cam", Some("cam"))
            },
        )
        .await
        .unwrap();
        assert_eq!(l.lines, ["first run"]);
        let l = super::logs(
            &path,
            LogsRequest {
                tail: Some(1),
                ..req("cam", None)
            },
        )
        .await
        .unwrap();
        assert_eq!(l.lines, ["d"]);

        let e = super::logs(&path, req("nope", None))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(e, "no pod named \"nope\" (pods: edge/cam)");
        let e = super::logs(&path, req("cam", Some("x")))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "pod edge/cam has no container \"x\" (containers: fetch, cam)"
        );
        let e = super::logs(&path, req("cam", Some("fetch")))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(e, "container \"fetch\" of pod edge/cam has no logs yet");
        let e = super::logs(&path, req("other/cam", None))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("no pod named \"other/cam\""), "{e}");
        task.abort();
    }
}
