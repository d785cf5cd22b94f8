//! Each pod's own produce channel. noded makes a directory
//! `<pod_channels>/<namespace>_<name>_<uid>/` for every pod it starts, mounts it read-only
//! into the pod's containers at `/run/edge/fabric`, and removes it with the pod; fabricd
//! listens on `produce.sock` inside each such directory, speaking the framed protocol and
//! HTTP (told apart by the first byte), and stamps each record the pod sends with
//! `pod:<namespace>/<name>`. The directory's name is the identity: only noded (root)
//! makes directories there, and a pod sees only its own, read-only, so it cannot speak
//! as another pod. Directories are looked for once a second.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::task::JoinHandle;

use crate::produce::Ingest;
use crate::{Error, Result};

/// The socket's name inside a pod's directory (and so inside the pod).
pub const SOCKET: &str = "produce.sock";

/// How often the directory is looked at for pods come and gone.
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// The producer a pod directory's name stands for (`pod:<namespace>/<name>`), or why the
/// name is not one noded makes.
pub fn producer_of(dir_name: &str) -> std::result::Result<String, &'static str> {
    let mut parts = dir_name.split('_');
    let (Some(ns), Some(name), Some(uid), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("is not <namespace>_<name>_<uid>");
    };
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !dns(ns) || !dns(name) {
        return Err("has a namespace or name that is not a Kubernetes name");
    }
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("has a uid that is not letters, digits and '-'");
    }
    Ok(format!("pod:{ns}/{name}"))
}

/// A pod's listener: every connection on it is that pod.
struct PodListener {
    listener: tokio::net::UnixListener,
    producer: String,
}

impl crate::Listener for PodListener {
    type Conn = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Conn, String)> {
        let (s, _) = self.listener.accept().await?;
        Ok((s, self.producer.clone()))
    }
}

/// Serves one connection on a pod's socket: HTTP when it begins with a letter (a
/// method), the framed protocol otherwise (its length's first byte).
async fn serve_either(ingest: Arc<Ingest>, stream: tokio::net::UnixStream, producer: String) {
    let mut stream = tokio::io::BufReader::new(stream);
    let first = match stream.fill_buf().await {
        Ok([b, ..]) => *b,
        _ => return,
    };
    if first.is_ascii_alphabetic() {
        crate::http::serve_conn(ingest, stream, producer).await
    } else {
        crate::produce::serve_conn(ingest, stream, producer).await
    }
}

/// Binds the socket of one pod's directory, writable by any user in the pod.
fn listen(dir: &Path, producer: String) -> Result<PodListener> {
    let path = dir.join(SOCKET);
    let listener = crate::bind_unix(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .map_err(Error::io("set the permissions of", &path))?;
    Ok(PodListener { listener, producer })
}

/// Keeps one listener per pod directory under `dir` for as long as fabricd runs.
pub async fn run(dir: PathBuf, ingest: Arc<Ingest>) {
    let mut open: HashMap<String, JoinHandle<()>> = HashMap::new();
    // Names already complained of, so that a bad one is logged once.
    let mut refused: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(SCAN_EVERY);
    loop {
        tick.tick().await;
        let names = match pod_dirs(&dir) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("{e}");
                continue;
            }
        };
        open.retain(|name, task| {
            let keep = names.contains(name);
            if !keep {
                task.abort();
                tracing::info!(pod = %name, "pod channel closed (its directory is gone)");
            }
            keep
        });
        refused.retain(|name| names.contains(name));
        for name in names {
            if open.contains_key(&name) || refused.contains(&name) {
                continue;
            }
            let producer = match producer_of(&name) {
                Ok(p) => p,
                Err(why) => {
                    tracing::warn!(
                        "pod channel {} not opened: the name {why}",
                        dir.join(&name).display()
                    );
                    refused.insert(name);
                    continue;
                }
            };
            match listen(&dir.join(&name), producer.clone()) {
                Ok(listener) => {
                    tracing::info!(%producer, dir = %dir.join(&name).display(), "pod channel listening");
                    let ingest = ingest.clone();
                    let task = tokio::spawn(crate::accept_each(
                        listener,
                        producer,
                        move |stream, peer| serve_either(ingest.clone(), stream, peer),
                    ));
                    open.insert(name, task);
                }
                // Tried again on the next look (the directory may be going away).
                Err(e) => tracing::warn!("pod channel not opened: {e}"),
            }
        }
    }
}

/// The names of the directories under `dir`; none when it does not exist (yet).
fn pod_dirs(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io("read", dir)(e)),
    };
    let mut names = vec![];
    for e in entries {
        let e = e.map_err(Error::io("read", dir))?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if let Some(n) = e.file_name().to_str() {
                names.push(n.to_owned());
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_name_is_a_pod_or_refused_with_why() {
        assert_eq!(
            producer_of("default_sensor_3f9a0c").unwrap(),
            "pod:default/sensor"
        );
        assert_eq!(
            producer_of("kube-system_dns.a-1_x").unwrap(),
            "pod:kube-system/dns.a-1"
        );
        for (bad, why) in [
            ("default_sensor", "is not"),
            ("a_b_c_d", "is not"),
            ("Default_sensor_1", "Kubernetes name"),
            ("default__1", "Kubernetes name"),
            ("default_se/nsor_1", "Kubernetes name"),
            ("default_sensor_", "uid"),
            ("default_sensor_a:b", "uid"),
        ] {
            let e = producer_of(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
