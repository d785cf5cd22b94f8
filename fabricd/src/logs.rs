//! The box's logs, sent to the core: fabricd follows the services' log files that init
//! writes (`<services_dir>/<service>.log`, rotated to `.log.1`) and the containers' CRI
//! log files that containerd writes for noded (`<pods_dir>/<namespace>_<pod>_<uid>/
//! <container>/<attempt>.log`), and appends what they gained, whole lines only, as
//! records on `logs.service.<service>` and `logs.pod.<namespace>.<pod>.<container>`
//! (a `.` of a Kubernetes name becomes `_`, which its names never hold). `edgectl logs`
//! reads them at the core.
//!
//! Following files never holds up a service: init and containerd write as they always
//! do, and fabricd reads behind them. Where it stands in each file is kept in
//! `<log_dir>/logs-positions.json` once the records are durable, so a restart of fabricd
//! goes on where it was (lines of the last batch before a crash may be sent twice). A
//! file rotated while fabricd was behind is read to its end under its new name first
//! (init renames `<service>.log` to `.log.1`, noded `<attempt>.log` to `.log.<n>`: a
//! file beside it named `<name>.<anything>` with the inode fabricd was reading); one
//! whose rotated copy is gone too has lost its unread end, which fabricd says.
//!
//! Lines are sent as bytes, whatever their encoding (`edgectl logs` shows invalid UTF-8
//! as U+FFFD). A line longer than a batch (`max_batch_bytes`) goes in pieces of a batch
//! each, every piece but its last marked with [`CONTINUES_HEADER`], so no record is
//! larger than a batch and a reader knows the line goes on.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{is_token, LogsConfig};
use crate::produce::Ingest;
use crate::record::Record;
use crate::store::AppendError;

/// Who the log records are from (their `Edge-Producer`).
pub const PRODUCER: &str = "fabricd/logs";
/// The header of a record that ends in the middle of a line: the next record of its
/// topic goes on with it.
pub const CONTINUES_HEADER: &str = "Log-Continues";
/// Batches one file may send per pass, so that one noisy file does not starve the rest.
const BATCHES_PER_PASS: usize = 16;

/// Where fabricd stands in one file: the file (its inode) and the bytes already sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Position {
    ino: u64,
    offset: u64,
}

/// A log file and the topic its lines go to.
#[derive(Debug, PartialEq)]
struct Source {
    path: PathBuf,
    topic: String,
}

/// The rotated copy of `path` that is inode `ino`: a file beside it named
/// `<name>.<anything>` (init's `.1`, noded's `.<n>`).
fn rotated_copy(path: &Path, ino: u64) -> Option<PathBuf> {
    let prefix = format!("{}.", path.file_name()?.to_str()?);
    sorted_entries(path.parent()?).into_iter().find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix))
            && std::fs::metadata(p).is_ok_and(|m| m.ino() == ino)
    })
}

/// A Kubernetes name as a topic token.
fn token(name: &str) -> String {
    name.replace('.', "_")
}

/// Every log file there is now, services' first.
fn sources(config: &LogsConfig) -> Vec<Source> {
    let mut out = Vec::new();
    if let Some(dir) = &config.services_dir {
        for path in sorted_entries(dir) {
            let Some(service) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".log"))
            else {
                continue;
            };
            if !is_token(service) || !path.is_file() {
                continue;
            }
            out.push(Source {
                topic: format!("logs.service.{service}"),
                path,
            });
        }
    }
    if let Some(dir) = &config.pods_dir {
        for pod_dir in sorted_entries(dir) {
            let name = pod_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let mut parts = name.splitn(3, '_');
            let (Some(ns), Some(pod), Some(_uid)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            for container_dir in sorted_entries(&pod_dir) {
                let container = container_dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .to_owned();
                let topic = format!(
                    "logs.pod.{}.{}.{}",
                    token(ns),
                    token(pod),
                    token(&container)
                );
                if crate::record::check_topic(&topic).is_err() {
                    continue;
                }
                for path in sorted_entries(&container_dir) {
                    if path.extension().is_some_and(|e| e == "log") && path.is_file() {
                        out.push(Source {
                            path,
                            topic: topic.clone(),
                        });
                    }
                }
            }
        }
    }
    out
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Up to `max` bytes of `path` from `offset`, cut after its last whole line; a line
/// longer than `max` is sent in pieces of `max`.
fn read_lines(path: &Path, offset: u64, max: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::with_capacity(max.min(64 << 10));
    f.take(max as u64).read_to_end(&mut buf)?;
    match buf.iter().rposition(|b| *b == b'\n') {
        Some(end) => buf.truncate(end + 1),
        None if buf.len() == max => {}
        None => buf.clear(),
    }
    Ok(buf)
}

/// Follows every log file, for as long as fabricd runs.
pub async fn run(config: LogsConfig, ingest: Arc<Ingest>, state: PathBuf) {
    let mut positions: BTreeMap<PathBuf, Position> = std::fs::read(&state)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let every = Duration::from_millis(config.interval_ms);
    loop {
        let mut moved = false;
        let all = sources(&config);
        for src in &all {
            match follow(src, &mut positions, &ingest, config.max_batch_bytes).await {
                Ok(m) => moved |= m,
                Err(why) => tracing::warn!(file = %src.path.display(), "log not sent: {why}"),
            }
        }
        // Files gone (a pod removed, a container's old attempt) are forgotten.
        let before = positions.len();
        positions.retain(|p, _| all.iter().any(|s| &s.path == p));
        if moved || positions.len() != before {
            match serde_json::to_vec(&positions) {
                Ok(bytes) => {
                    if let Err(e) = edge_common::write_atomic(&state, &bytes, 0o600) {
                        tracing::warn!(file = %state.display(), "failed to keep the log positions: {e}");
                    }
                }
                Err(e) => tracing::warn!("failed to serialize the log positions: {e}"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Sends what `src` gained since its position; whether anything was sent.
async fn follow(
    src: &Source,
    positions: &mut BTreeMap<PathBuf, Position>,
    ingest: &Ingest,
    max: usize,
) -> Result<bool, String> {
    let meta = std::fs::metadata(&src.path).map_err(|e| e.to_string())?;
    let known = positions.get(&src.path).copied();
    let mut moved = false;
    let mut pos = match known {
        None => Position {
            ino: meta.ino(),
            offset: 0,
        },
        Some(p) if p.ino == meta.ino() => p,
        Some(p) => {
            // Rotated: the rest of the old file first, if its copy is still there.
            match rotated_copy(&src.path, p.ino) {
                Some(old) => {
                    let mut at = p.offset;
                    while let Some(n) = send(src, &old, at, ingest, max).await? {
                        at += n;
                        moved = true;
                    }
                }
                None => {
                    tracing::warn!(file = %src.path.display(), "rotated and its old copy gone before it was read to its end: those lines were not sent")
                }
            }
            Position {
                ino: meta.ino(),
                offset: 0,
            }
        }
    };
    if meta.len() < pos.offset {
        tracing::warn!(file = %src.path.display(), "shorter than what was sent (truncated): sending it from its start");
        pos.offset = 0;
    }
    for _ in 0..BATCHES_PER_PASS {
        match send(src, &src.path, pos.offset, ingest, max).await {
            Ok(Some(n)) => {
                pos.offset += n;
                moved = true;
            }
            Ok(None) => break,
            Err(e) => {
                positions.insert(src.path.clone(), pos);
                return Err(e);
            }
        }
    }
    moved |= known != Some(pos);
    positions.insert(src.path.clone(), pos);
    Ok(moved)
}

/// One batch of `file` from `offset`, made durable: the bytes it took, or None when
/// there is no whole line to send.
async fn send(
    src: &Source,
    file: &Path,
    offset: u64,
    ingest: &Ingest,
    max: usize,
) -> Result<Option<u64>, String> {
    let lines = read_lines(file, offset, max).map_err(|e| e.to_string())?;
    if lines.is_empty() {
        return Ok(None);
    }
    let n = lines.len() as u64;
    let headers = if lines.ends_with(b"\n") {
        Vec::new()
    } else {
        vec![(CONTINUES_HEADER.to_owned(), b"1".to_vec())]
    };
    let rec = Record {
        topic: src.topic.clone(),
        key: None,
        headers,
        timestamp_ms: edge_common::unix_ms() as i64,
        value: lines,
    };
    let durable = ingest
        .submit(rec, PRODUCER)
        .await
        .map_err(|r| format!("the log refused it: {}", r.message))?;
    match durable.one().await {
        Ok(_) => Ok(Some(n)),
        Err(AppendError::Closed) => Err("the log stopped".into()),
        Err(e) => Err(format!("the log refused it: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_lines_are_read_and_a_long_one_in_pieces() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("x.log");
        std::fs::write(&f, "one\ntwo\nthr").unwrap();
        assert_eq!(read_lines(&f, 0, 100).unwrap(), b"one\ntwo\n");
        assert_eq!(read_lines(&f, 8, 100).unwrap(), b"");
        assert_eq!(read_lines(&f, 0, 6).unwrap(), b"one\n");
        assert_eq!(
            read_lines(&f, 8, 3).unwrap(),
            b"thr",
            "a line longer than a batch"
        );
    }

    #[test]
    fn services_and_containers_are_found_with_their_topics() {
        let tmp = tempfile::tempdir().unwrap();
        let svc = tmp.path().join("log");
        let pods = svc.join("pods");
        std::fs::create_dir_all(pods.join("default_web.v2_u1/app")).unwrap();
        std::fs::create_dir_all(pods.join("no-uid/app")).unwrap();
        for f in [
            "log/noded.log",
            "log/noded.log.1",
            "log/bad.name.log",
            "log/pods/default_web.v2_u1/app/0.log",
            "log/pods/default_web.v2_u1/app/1.log",
            "log/pods/no-uid/app/0.log",
        ] {
            std::fs::write(tmp.path().join(f), "x\n").unwrap();
        }
        let found = sources(&LogsConfig {
            services_dir: Some(svc.clone()),
            pods_dir: Some(pods.clone()),
            interval_ms: 1000,
            max_batch_bytes: 1024,
        });
        let got: Vec<(String, String)> = found
            .iter()
            .map(|s| {
                (
                    s.path
                        .strip_prefix(tmp.path())
                        .unwrap()
                        .display()
                        .to_string(),
                    s.topic.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("log/noded.log", "logs.service.noded"),
                (
                    "log/pods/default_web.v2_u1/app/0.log",
                    "logs.pod.default.web_v2.app"
                ),
                (
                    "log/pods/default_web.v2_u1/app/1.log",
                    "logs.pod.default.web_v2.app"
                ),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        // Rotated copies, init's and noded's, are found by the inode being read.
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let svc_old = svc.join("noded.log.1");
        assert_eq!(
            rotated_copy(&svc.join("noded.log"), ino(&svc_old)),
            Some(svc_old)
        );
        let app = pods.join("default_web.v2_u1/app");
        std::fs::write(app.join("0.log.3"), "y\n").unwrap();
        let pod_old = app.join("0.log.3");
        assert_eq!(
            rotated_copy(&app.join("0.log"), ino(&pod_old)),
            Some(pod_old.clone())
        );
        assert_eq!(rotated_copy(&app.join("1.log"), ino(&pod_old)), None);
    }
}
