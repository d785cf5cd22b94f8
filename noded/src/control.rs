//! noded's control socket: one JSON request per line (`{"op":"pods"}`), one JSON answer
//! per line, so `noded pods` and tests read the pods' state without going through
//! containerd.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::pods::{PodReport, Status};

#[derive(serde::Deserialize)]
struct Request {
    op: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pods: Option<Vec<PodReport>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Binds `path` (replacing a stale socket from an earlier run) and serves in a task.
pub fn spawn(path: &Path, status: Status) -> Result<tokio::task::JoinHandle<()>, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("failed to remove stale {}: {e}", path.display())),
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("failed to bind control socket {}: {e}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, status.clone()));
                }
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn answer(stream: UnixStream, status: Status) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(r) if r.op == "pods" => Answer {
                pods: Some(status.lock().map(|s| s.clone()).unwrap_or_default()),
                error: None,
            },
            Ok(r) => Answer {
                pods: None,
                error: Some(format!("unknown op {:?}", r.op)),
            },
            Err(e) => Answer {
                pods: None,
                error: Some(format!("bad request: {e}")),
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

/// Asks a running noded for its pods.
pub async fn pods(path: &Path) -> Result<Vec<PodReport>, String> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("failed to connect to {}: {e}", path.display()))?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(b"{\"op\":\"pods\"}\n")
        .await
        .map_err(|e| format!("failed to write to {}: {e}", path.display()))?;
    let line = BufReader::new(rd)
        .lines()
        .next_line()
        .await
        .map_err(|e| format!("failed to read from {}: {e}", path.display()))?
        .ok_or_else(|| format!("{} closed without an answer", path.display()))?;
    let answer: Answer = serde_json::from_str(&line)
        .map_err(|e| format!("bad answer from {}: {e}", path.display()))?;
    match (answer.pods, answer.error) {
        (Some(p), _) => Ok(p),
        (None, e) => Err(e.unwrap_or_else(|| "empty answer".into())),
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
            state: "running".into(),
            error: None,
            containers: vec![ContainerReport {
                name: "a".into(),
                init: false,
                state: "running".into(),
                restarts: 2,
                exit_code: Some(0),
                last_error: None,
            }],
        };
        let status: Status = std::sync::Arc::new(std::sync::Mutex::new(vec![report.clone()]));
        let task = spawn(&path, status).unwrap();
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
}
