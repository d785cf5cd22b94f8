//! A read-only OCI registry on loopback, serving the images of verified OCI archives.
//!
//! containerd 1.6 cannot import an image over CRI, so images reach it the way a
//! registry mirror would deliver them: containerd is configured with a mirror for the
//! pseudo-registry host `edge.local` pointing here, and a CRI PullImage of
//! `edge.local/<name>:<tag>` fetches, verifies and unpacks into the `k8s.io` namespace.
//! Only what containerd's puller uses is served: `GET /v2/`, `HEAD`/`GET` of manifests
//! by tag or digest and of blobs by digest. Anything else is a distribution-API error.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};

const MAX_HEAD: usize = 16 * 1024;

#[derive(Default)]
struct Repo {
    /// tag → manifest digest
    tags: HashMap<String, String>,
    /// Every digest (manifests, configs, layers) an image of this repo references.
    digests: HashSet<String>,
}

/// A blob's bytes: in memory (an archive added whole), or where they lie in an archive
/// file of the image directory, read when asked: those stay in the page cache, which
/// the kernel can take back, instead of in noded's own memory for its whole life.
#[derive(Clone)]
enum Body {
    Bytes(Arc<Vec<u8>>),
    File {
        file: Arc<File>,
        offset: u64,
        len: usize,
    },
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Bytes(b) => b.len(),
            Body::File { len, .. } => *len,
        }
    }
}

/// How much of a file-held blob one read takes (off the async threads).
const FILE_CHUNK: usize = 256 * 1024;

/// The images served, by repository. Built once; requests only read it.
#[derive(Default)]
pub struct Registry {
    repos: HashMap<String, Repo>,
    blobs: HashMap<String, Body>,
    /// manifest digest → media type
    manifests: HashMap<String, String>,
}

/// An archive in the image directory that could not be served, and why.
#[derive(Debug)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: Error,
}

/// The pseudo-registry host containerd is configured to pull from here.
pub const HOST: &str = "edge.local";

/// Splits an image's ref-name annotation into repository and tag. A leading
/// registry host (`edge.local/`, `localhost:5000/`) is dropped: clients ask this
/// registry for the path below the host.
pub fn split_ref(name: &str) -> Option<(String, String)> {
    let mut rest = name;
    if let Some((first, tail)) = name.split_once('/') {
        if first.contains('.') || first.contains(':') || first == "localhost" {
            rest = tail;
        }
    }
    let (repo, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], &rest[i + 1..]),
        _ => (rest, "latest"),
    };
    (!repo.is_empty() && !tag.is_empty()).then(|| (repo.to_string(), tag.to_string()))
}

impl Registry {
    /// Adds every named image of `archive`. `source` names the archive in errors.
    pub fn add(&mut self, source: &str, archive: edge_oci::Archive) -> Result<()> {
        self.add_images(source, &archive)?;
        for (digest, data) in archive.blobs {
            self.blobs
                .entry(digest)
                .or_insert_with(|| Body::Bytes(Arc::new(data)));
        }
        Ok(())
    }

    /// Adds every named image of the archive `bytes`, read from `file`: checked whole,
    /// then served from the file.
    fn add_file(&mut self, source: &str, file: File, bytes: &[u8]) -> Result<()> {
        let archive = edge_oci::read_archive(bytes)?;
        self.add_images(source, &archive)?;
        let file = Arc::new(file);
        for f in edge_oci::tar::read(bytes)? {
            let Some(hex) = f.path.strip_prefix("blobs/sha256/") else {
                continue;
            };
            let digest = format!("sha256:{hex}");
            // Only what the archive's images reference (what reading it kept).
            if !archive.blobs.contains_key(&digest) {
                continue;
            }
            // `data` is a slice of `bytes`: its place in the file.
            let offset = (f.data.as_ptr() as usize - bytes.as_ptr() as usize) as u64;
            self.blobs.entry(digest).or_insert_with(|| Body::File {
                file: file.clone(),
                offset,
                len: f.data.len(),
            });
        }
        Ok(())
    }

    fn add_images(&mut self, source: &str, archive: &edge_oci::Archive) -> Result<()> {
        let unservable = |detail| Error::Archive {
            archive: source.to_string(),
            detail,
        };
        let mut staged = Vec::new();
        for image in &archive.images {
            let name = image.name.as_deref().ok_or_else(|| {
                unservable(format!(
                    "manifest {} has no ref name",
                    image.manifest.digest
                ))
            })?;
            let (repo, tag) = split_ref(name)
                .ok_or_else(|| unservable(format!("ref name {name:?} is not <name>[:<tag>]")))?;
            staged.push((repo, tag, image));
        }
        for (repo, tag, image) in staged {
            let r = self.repos.entry(repo).or_default();
            r.tags.insert(tag, image.manifest.digest.clone());
            r.digests.insert(image.manifest.digest.clone());
            r.digests.insert(image.config.digest.clone());
            r.digests
                .extend(image.layers.iter().map(|l| l.digest.clone()));
            self.manifests.insert(
                image.manifest.digest.clone(),
                image.manifest.media_type.clone(),
            );
        }
        Ok(())
    }

    /// Each image served, as containerd names it (`edge.local/<repo>:<tag>`), with its
    /// manifest digest: what an image of that name on the box must be to be current.
    pub fn served(&self) -> std::collections::BTreeMap<String, String> {
        self.repos
            .iter()
            .flat_map(|(repo, r)| {
                r.tags
                    .iter()
                    .map(move |(tag, digest)| (format!("{HOST}/{repo}:{tag}"), digest.clone()))
            })
            .collect()
    }

    /// Loads every `*.tar` in `dir`. An archive that fails verification is left out
    /// and returned with the reason, so one bad delivery does not hide the others.
    pub fn load_dir(dir: &Path) -> Result<(Registry, Vec<Rejected>)> {
        let entries =
            std::fs::read_dir(dir).map_err(Error::io("failed to read image directory", dir))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .collect();
        paths.sort();
        let mut registry = Registry::default();
        let mut rejected = Vec::new();
        for path in paths {
            // Served later from the same open file that was checked.
            let result = File::open(&path)
                .and_then(|mut file| {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut file, &mut bytes)?;
                    Ok((file, bytes))
                })
                .map_err(Error::io("failed to read", &path))
                .and_then(|(file, bytes)| {
                    registry.add_file(&path.display().to_string(), file, &bytes)
                });
            if let Err(reason) = result {
                rejected.push(Rejected { path, reason });
            }
        }
        Ok((registry, rejected))
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.serve_conn(stream, peer).await });
                }
                Err(e) => {
                    tracing::warn!("registry: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Binds `addr` (use port 0 for any) and serves in a task; returns the bound address.
    pub async fn spawn(
        self,
        addr: SocketAddr,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        Ok((bound, tokio::spawn(Arc::new(self).serve(listener))))
    }

    async fn serve_conn(&self, stream: TcpStream, peer: SocketAddr) {
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        loop {
            let (method, target, close) = match read_head(&mut rd).await {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(%peer, "registry: bad request: {e}");
                    let r = Response::error(400, "Bad Request", "UNSUPPORTED", &e.to_string());
                    let _ = r.write(&mut wr, false).await;
                    return;
                }
            };
            let resp = self.route(&method, &target);
            tracing::debug!(%peer, %method, %target, status = resp.status, "registry request");
            if resp.write(&mut wr, method == "HEAD").await.is_err() || close {
                return;
            }
        }
    }

    fn route(&self, method: &str, target: &str) -> Response {
        if method != "GET" && method != "HEAD" {
            return Response::error(
                405,
                "Method Not Allowed",
                "UNSUPPORTED",
                "read-only registry",
            );
        }
        let path = target.split('?').next().unwrap_or(target);
        if path == "/v2/" || path == "/v2" {
            return Response::ok(
                "application/json",
                Body::Bytes(Arc::new(b"{}".to_vec())),
                None,
            );
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Response::error(404, "Not Found", "NAME_UNKNOWN", "not a /v2/ path");
        };
        if let Some(i) = rest.rfind("/manifests/") {
            let (name, reference) = (&rest[..i], &rest[i + "/manifests/".len()..]);
            self.manifest(name, reference)
        } else if let Some(i) = rest.rfind("/blobs/") {
            let (name, digest) = (&rest[..i], &rest[i + "/blobs/".len()..]);
            self.blob(name, digest)
        } else {
            Response::error(
                404,
                "Not Found",
                "UNSUPPORTED",
                "only manifests and blobs are served",
            )
        }
    }

    fn manifest(&self, name: &str, reference: &str) -> Response {
        let Some(repo) = self.repos.get(name) else {
            return Response::error(
                404,
                "Not Found",
                "NAME_UNKNOWN",
                &format!("repository {name} is not known"),
            );
        };
        let digest = if reference.starts_with("sha256:") {
            Some(reference).filter(|d| repo.digests.contains(*d) && self.manifests.contains_key(*d))
        } else {
            repo.tags.get(reference).map(String::as_str)
        };
        let found = digest.and_then(|d| Some((d, self.blobs.get(d)?, self.manifests.get(d)?)));
        match found {
            Some((digest, data, media)) => Response::ok(media, data.clone(), Some(digest)),
            None => Response::error(
                404,
                "Not Found",
                "MANIFEST_UNKNOWN",
                &format!("manifest {name}:{reference} is not known"),
            ),
        }
    }

    fn blob(&self, name: &str, digest: &str) -> Response {
        let Some(repo) = self.repos.get(name) else {
            return Response::error(
                404,
                "Not Found",
                "NAME_UNKNOWN",
                &format!("repository {name} is not known"),
            );
        };
        match self
            .blobs
            .get(digest)
            .filter(|_| repo.digests.contains(digest))
        {
            Some(data) => Response::ok("application/octet-stream", data.clone(), Some(digest)),
            None => Response::error(
                404,
                "Not Found",
                "BLOB_UNKNOWN",
                &format!("blob {digest} is not known in {name}"),
            ),
        }
    }
}

/// Reads one request head: method, target, and whether the client asked to close.
/// `None` when the client closed the connection between requests.
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
) -> Result<Option<(String, String, bool)>> {
    let bad = |detail| Error::BadRequest { detail };
    let mut line = String::new();
    let mut total = 0;
    let mut request_line = None;
    let mut close = false;
    loop {
        line.clear();
        let n = rd
            .read_line(&mut line)
            .await
            .map_err(|e| bad(format!("read failed: {e}")))?;
        if n == 0 {
            return match request_line {
                None => Ok(None),
                Some(_) => Err(bad("connection closed inside a request head".into())),
            };
        }
        total += n;
        if total > MAX_HEAD {
            return Err(bad(format!("request head over {MAX_HEAD} bytes")));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if request_line.is_none() {
            if l.is_empty() {
                continue; // tolerated blank lines between requests
            }
            request_line = Some(l.to_string());
            continue;
        }
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
    }
    let request_line = request_line.unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => Ok(Some((
            m.to_string(),
            t.to_string(),
            close || v == "HTTP/1.0",
        ))),
        _ => Err(bad(format!("malformed request line {request_line:?}"))),
    }
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: String,
    body: Body,
    digest: Option<String>,
}

impl Response {
    fn ok(content_type: &str, body: Body, digest: Option<&str>) -> Response {
        Response {
            status: 200,
            reason: "OK",
            content_type: content_type.to_string(),
            body,
            digest: digest.map(str::to_string),
        }
    }

    /// The distribution spec's error body: `{"errors":[{"code","message"}]}`.
    fn error(status: u16, reason: &'static str, code: &str, message: &str) -> Response {
        let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
        Response {
            status,
            reason,
            content_type: "application/json".into(),
            body: Body::Bytes(Arc::new(body.to_string().into_bytes())),
            digest: None,
        }
    }

    async fn write<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        head_only: bool,
    ) -> std::io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nDocker-Distribution-API-Version: registry/2.0\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if let Some(d) = &self.digest {
            head.push_str(&format!("Docker-Content-Digest: {d}\r\n"));
        }
        head.push_str("\r\n");
        wr.write_all(head.as_bytes()).await?;
        if !head_only {
            match &self.body {
                Body::Bytes(b) => wr.write_all(b).await?,
                Body::File { file, offset, len } => {
                    let mut done = 0;
                    while done < *len {
                        let n = FILE_CHUNK.min(len - done);
                        let (file, at) = (file.clone(), offset + done as u64);
                        let chunk = tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0; n];
                            file.read_exact_at(&mut buf, at).map(|_| buf)
                        })
                        .await
                        .map_err(std::io::Error::other)??;
                        wr.write_all(&chunk).await?;
                        done += n;
                    }
                }
            }
        }
        wr.flush().await
    }
}

#[cfg(test)]
mod tests;
