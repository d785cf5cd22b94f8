//! The kubelet API the core reaches through the tunnel (tunnel.rs): what `kubectl logs`
//! asks for (`GET /containerLogs/<namespace>/<pod>/<container>` with `follow`,
//! `previous`, `tailLines`, `limitBytes`), from the logs noded keeps (logs.rs) of the
//! pods the API server bound here; and `kubectl exec` and `kubectl port-forward`
//! (`/exec/<namespace>/<pod>/<container>`, `/portForward/<namespace>/<pod>`), which
//! containerd's CRI streaming server carries out: noded asks it for the session (CRI
//! `Exec`, `PortForward`) and hands the upgraded connection on to the URL it answers,
//! as kubelet does.
//!
//! HTTPS over the tunnel's pipe, as the API server expects of a kubelet: noded's serving
//! certificate is made at start (kube-apiserver checks it only when given
//! `--kubelet-certificate-authority`); a client must present a certificate the
//! kubeconfig's CA signed, and what it asks is authorized the way kubelet does, by a
//! SubjectAccessReview at the API server for the certificate's user and groups on this
//! Node (`nodes/proxy` for these paths, the verb from the method), cached five minutes
//! when allowed and 30 seconds when denied.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_rustls::rustls;

use super::calls::timed;
use crate::control::{locate_logs, Located};
use crate::pods::Status;
use edge_common::lock;
use edge_node_api::LogsRequest;

type Body = BoxBody<Bytes, Infallible>;

/// How often a followed log is looked at for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Who a connection's client certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Peer {
    user: String,
    groups: Vec<String>,
}

/// Who asked for what: a verb on a subresource of this Node.
type Asked = (Peer, &'static str, &'static str);

pub(super) struct Kubelet {
    tls: tokio_rustls::TlsAcceptor,
    /// The serving certificate (DER), which a test trusts.
    #[cfg_attr(not(test), allow(dead_code))]
    cert: Vec<u8>,
    client: kube::Client,
    /// containerd, whose streaming server runs exec and port-forward.
    cri: Option<crate::cri::Client>,
    node_name: String,
    status: Status,
    log_dir: PathBuf,
    /// (who, verb, subresource) → when decided and whether allowed.
    decided: Mutex<HashMap<Asked, (Instant, bool)>>,
}

impl Kubelet {
    /// The API with a serving certificate for the node's name and address, trusting
    /// `roots` for clients.
    pub(super) fn new(
        client: kube::Client,
        cri: Option<crate::cri::Client>,
        node_name: &str,
        node_ip: Option<std::net::Ipv4Addr>,
        roots: rustls::RootCertStore,
        status: Status,
        log_dir: PathBuf,
    ) -> Result<Kubelet, String> {
        let mut params = rcgen::CertificateParams::new(vec![node_name.to_string()])
            .map_err(|e| format!("serving certificate: {e}"))?;
        if let Some(ip) = node_ip {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(ip.into()));
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{node_name}@noded"));
        let key = rcgen::KeyPair::generate().map_err(|e| format!("serving key: {e}"))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("serving certificate: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("the kubeconfig's CA cannot verify clients: {e}"))?;
        let der = cert.der().to_vec();
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .map_err(|e| format!("serving certificate: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Kubelet {
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            cert: der,
            client,
            cri,
            node_name: node_name.to_string(),
            status,
            log_dir,
            decided: Mutex::new(HashMap::new()),
        })
    }

    /// Serves one connection (TLS, then HTTP/1.1) until it closes.
    pub(super) async fn serve<S>(self: Arc<Self>, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tls = match self.tls.accept(io).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("kubelet API: TLS refused: {e}");
                return;
            }
        };
        let Some(who) = tls.get_ref().1.peer_certificates().and_then(peer) else {
            tracing::warn!("kubelet API: the client certificate names no user");
            return;
        };
        let me = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (me, who) = (me.clone(), who.clone());
            async move { Ok::<_, Infallible>(me.handle(req, &who).await) }
        });
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
            .with_upgrades()
            .await
        {
            tracing::debug!("kubelet API: connection ended: {e}");
        }
    }

    async fn handle(&self, req: Request<Incoming>, who: &Peer) -> Response<Body> {
        let path = req.uri().path().to_string();
        let verb = verb(req.method());
        let sub = subresource(&path);
        match self.authorized(who, verb, sub).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(user = %who.user, verb, subresource = sub, %path, "kubelet API: forbidden");
                return text(
                    StatusCode::FORBIDDEN,
                    format!(
                        "Forbidden (user={}, verb={verb}, resource=nodes, subresource={sub})",
                        who.user
                    ),
                );
            }
            Err(e) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the request could not be authorized: {e}"),
                )
            }
        }
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (req.method(), segs.as_slice()) {
            (&Method::GET, ["containerLogs", ns, pod, container]) => {
                tracing::info!(user = %who.user, pod = %format!("{ns}/{pod}"), container, "kubelet API: logs");
                self.logs(ns, pod, container, req.uri().query().unwrap_or(""))
                    .await
            }
            (&Method::GET | &Method::POST, ["exec", ns, pod, container]) => {
                tracing::info!(user = %who.user, pod = %format!("{ns}/{pod}"), container, "kubelet API: exec");
                let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
                self.exec(req, &ns, &pod, &container).await
            }
            (&Method::GET | &Method::POST, ["portForward", ns, pod]) => {
                tracing::info!(user = %who.user, pod = %format!("{ns}/{pod}"), "kubelet API: port-forward");
                let (ns, pod) = (ns.to_string(), pod.to_string());
                self.port_forward(req, &ns, &pod).await
            }
            _ => text(
                StatusCode::NOT_FOUND,
                format!(
                    "noded serves /containerLogs, /exec and /portForward of its pods \
                     (kubectl logs, exec and port-forward); not {} {path}",
                    req.method()
                ),
            ),
        }
    }

    /// The reconciler's reports of the pods from the API server: the ones the API server
    /// can ask about (the box's own pods are not its, even under the same name).
    fn api_pods(&self) -> Vec<crate::pods::PodReport> {
        lock(&self.status)
            .iter()
            .filter(|p| p.file.starts_with(crate::pods::API_PREFIX))
            .cloned()
            .collect()
    }

    /// The pod as the reconciler reports it, and containerd's client.
    fn running(
        &self,
        ns: &str,
        pod: &str,
    ) -> Result<(crate::pods::PodReport, &crate::cri::Client), (StatusCode, String)> {
        let Some(cri) = &self.cri else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "noded runs without a container runtime here".into(),
            ));
        };
        let report = self
            .api_pods()
            .into_iter()
            .find(|p| p.namespace == ns && p.name == pod);
        match report {
            Some(r) => Ok((r, cri)),
            None => Err((
                StatusCode::BAD_REQUEST,
                format!("no pod {ns}/{pod} runs on this node"),
            )),
        }
    }

    /// `kubectl exec`: the command runs through containerd's streaming server, to which
    /// the upgraded connection is handed on.
    async fn exec(
        &self,
        req: Request<Incoming>,
        ns: &str,
        pod: &str,
        container: &str,
    ) -> Response<Body> {
        let (report, cri) = match self.running(ns, pod) {
            Ok(r) => r,
            Err((status, e)) => return text(status, e),
        };
        let q = match ExecQuery::parse(req.uri().query().unwrap_or("")) {
            Ok(q) => q,
            Err(e) => return text(StatusCode::BAD_REQUEST, e),
        };
        let id = match crate::pods::running_ids(cri, &report, Some(container)).await {
            Ok((_, Some(id))) => id,
            Ok((_, None)) => return text(StatusCode::BAD_REQUEST, "no container".into()),
            Err(e) => return text(StatusCode::BAD_REQUEST, e),
        };
        let answer = cri
            .exec(crate::cri::api::ExecRequest {
                container_id: id,
                cmd: q.command,
                tty: q.tty,
                stdin: q.stdin,
                stdout: q.stdout,
                stderr: q.stderr && !q.tty,
            })
            .await;
        streamed(req, "exec", answer.map(|a| a.url)).await
    }

    /// `kubectl port-forward`: as exec, to the pod's network.
    async fn port_forward(&self, req: Request<Incoming>, ns: &str, pod: &str) -> Response<Body> {
        let (report, cri) = match self.running(ns, pod) {
            Ok(r) => r,
            Err((status, e)) => return text(status, e),
        };
        let sandbox = match crate::pods::running_ids(cri, &report, None).await {
            Ok((s, _)) => s,
            Err(e) => return text(StatusCode::BAD_REQUEST, e),
        };
        let answer = cri
            .port_forward(crate::cri::api::PortForwardRequest {
                pod_sandbox_id: sandbox,
                port: Vec::new(),
            })
            .await;
        streamed(req, "port-forward", answer.map(|a| a.url)).await
    }

    async fn authorized(
        &self,
        who: &Peer,
        verb: &'static str,
        sub: &'static str,
    ) -> Result<bool, String> {
        let key = (who.clone(), verb, sub);
        if let Some((at, allowed)) = lock(&self.decided).get(&key).copied() {
            let keep = if allowed { 300 } else { 30 };
            if at.elapsed() < Duration::from_secs(keep) {
                return Ok(allowed);
            }
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.user.clone()),
                groups: Some(who.groups.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    resource: Some("nodes".into()),
                    subresource: Some(sub.into()),
                    name: Some(self.node_name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api = kube::Api::<SubjectAccessReview>::all(self.client.clone());
        let answer = timed(api.create(&kube::api::PostParams::default(), &review))
            .await
            .map_err(|e| e.to_string())?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        let mut decided = lock(&self.decided);
        // Kept small: a client with ever new names cannot grow it without bound.
        if decided.len() >= 256 {
            decided.clear();
        }
        decided.insert(key, (Instant::now(), allowed));
        Ok(allowed)
    }

    async fn logs(&self, ns: &str, pod: &str, container: &str, query: &str) -> Response<Body> {
        let q = match LogQuery::parse(query) {
            Ok(q) => q,
            Err(e) => return text(StatusCode::BAD_REQUEST, e),
        };
        let req = LogsRequest {
            pod: format!("{ns}/{pod}"),
            container: Some(container.to_string()),
            previous: q.previous,
            tail: q.tail,
        };
        let pods = self.api_pods();
        let (log_dir, follow) = (self.log_dir.clone(), q.follow && !q.previous);
        let read = tokio::task::spawn_blocking(move || {
            let at = locate_logs(&pods, &log_dir, &req)?;
            let mut lines = at.read(&req.pod)?.lines;
            // Lines the tail leaves out count as sent when following.
            let total = lines.len();
            if let Some(n) = req.tail {
                lines.drain(..lines.len().saturating_sub(n));
            }
            Ok::<_, crate::error::Error>((at, lines, total))
        })
        .await;
        let (at, lines, total) = match read {
            Ok(Ok(r)) => r,
            // The API server passes a 400's text on to kubectl (a 404's it drops).
            Ok(Err(e)) => return text(StatusCode::BAD_REQUEST, e.to_string()),
            Err(e) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("log reader failed: {e}"),
                )
            }
        };
        let first = joined(&lines);
        if !follow {
            let mut b = first;
            if let Some(n) = q.limit_bytes {
                b.truncate(n);
            }
            return respond(StatusCode::OK, Full::new(Bytes::from(b)).boxed());
        }
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        tokio::spawn(follow_on(at, total, first, q.limit_bytes, tx));
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        respond(StatusCode::OK, StreamBody::new(stream).boxed())
    }
}

/// How long the runtime's streaming server may take to answer an upgrade.
const HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(30);

/// The end of exec and port-forward: the upgraded connection handed on to containerd's
/// streaming server at the URL the runtime answered, or what the runtime refused.
async fn streamed<E: std::fmt::Display>(
    req: Request<Incoming>,
    what: &str,
    answer: std::result::Result<String, E>,
) -> Response<Body> {
    match answer {
        Ok(url) => hand_on(req, &url).await,
        Err(e) => text(
            StatusCode::BAD_REQUEST,
            format!("{what} refused by the runtime: {e}"),
        ),
    }
}

/// Hands an upgrade request on to the runtime's streaming server at `url` (as kubelet
/// proxies it): the request goes there with its upgrade headers, the server's answer
/// comes back, and once it switched protocols the two connections are joined.
async fn hand_on(mut req: Request<Incoming>, url: &str) -> Response<Body> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fail = |e: String| {
        text(
            StatusCode::BAD_GATEWAY,
            format!("the runtime's streaming server: {e}"),
        )
    };
    let Some(rest) = url.strip_prefix("http://") else {
        return fail(format!("{url} is not an http:// URL"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    // Up to its answer's head: a streaming server that does not answer must not hold the
    // tunnel's connection (and its slot) for ever.
    let method = req.method().clone();
    let handshake = async {
        let mut upstream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\n");
        for (k, v) in req.headers() {
            if k == hyper::header::HOST || k == hyper::header::CONTENT_LENGTH {
                continue;
            }
            let Ok(v) = v.to_str() else { continue };
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        upstream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // The answer's head (and whatever followed it in the same reads).
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            match upstream.read(&mut chunk).await {
                Ok(0) => return Err("closed before answering".to_string()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e.to_string()),
            }
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok((upstream, buf, i + 4));
            }
            if buf.len() > 64 * 1024 {
                return Err("an answer head over 64 KiB".to_string());
            }
        }
    };
    let (mut upstream, buf, end) = match tokio::time::timeout(HANDSHAKE, handshake).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return fail(e),
        Err(_) => return fail(format!("no answer within {} s", HANDSHAKE.as_secs())),
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    if !matches!(parsed.parse(&buf[..end]), Ok(httparse::Status::Complete(_))) {
        return fail("an answer that is not HTTP".into());
    }
    let code = parsed.code.unwrap_or(502);
    let mut resp = Response::new(Full::new(Bytes::new()).boxed());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    for h in parsed.headers.iter() {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(h.name.as_bytes()),
            hyper::header::HeaderValue::from_bytes(h.value),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    let early = buf[end..].to_vec();
    if code != 101 {
        // An error: its body, as far as the server sent it.
        let mut body = early;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = upstream.read(&mut chunk).await {
                if n == 0 || body.len() > 64 * 1024 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        resp.headers_mut().remove(hyper::header::CONTENT_LENGTH);
        resp.headers_mut().remove(hyper::header::TRANSFER_ENCODING);
        *resp.body_mut() = Full::new(Bytes::from(body)).boxed();
        return resp;
    }
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(&mut req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("kubelet API: the upgrade failed: {e}");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(upgraded);
        if client.write_all(&early).await.is_ok() {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    resp
}

/// An exec request's parameters: `command` (repeated, one per argument), and which
/// streams and whether a terminal.
#[derive(Debug, Default, PartialEq)]
struct ExecQuery {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl ExecQuery {
    fn parse(query: &str) -> Result<ExecQuery, String> {
        let mut q = ExecQuery::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "command" => q.command.push(v.into_owned()),
                "input" | "stdin" => q.stdin = flag(&k, &v)?,
                "output" | "stdout" => q.stdout = flag(&k, &v)?,
                "error" | "stderr" => q.stderr = flag(&k, &v)?,
                "tty" => q.tty = flag(&k, &v)?,
                _ => {}
            }
        }
        if q.command.is_empty() {
            return Err("no command to run (command=...)".into());
        }
        if !(q.stdin || q.stdout || q.stderr) {
            return Err("none of stdin, stdout and stderr asked for".into());
        }
        Ok(q)
    }
}

/// Sends `first`, then the lines the attempt gains, until the client goes, the
/// container starts again (a newer attempt) or its logs are gone. Rotated-away lines
/// are not sent again; lines written and rotated away between two looks are missed.
async fn follow_on(
    at: Located,
    mut sent: usize,
    first: Vec<u8>,
    limit: Option<usize>,
    tx: mpsc::Sender<Bytes>,
) {
    let mut left = limit.unwrap_or(usize::MAX);
    let give = |mut b: Vec<u8>, left: &mut usize| {
        b.truncate(*left);
        *left -= b.len();
        Bytes::from(b)
    };
    if tx.send(give(first, &mut left)).await.is_err() {
        return;
    }
    let mut size = attempt_size(&at.dir, at.attempt);
    while left > 0 {
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        let now = attempt_size(&at.dir, at.attempt);
        if now == size {
            let newer = crate::logs::attempts(&at.dir)
                .map(|a| a.iter().any(|&n| n > at.attempt))
                .unwrap_or(true);
            if newer {
                return;
            }
            continue;
        }
        size = now;
        let (dir, attempt) = (at.dir.clone(), at.attempt);
        let Ok(Ok(read)) =
            tokio::task::spawn_blocking(move || crate::logs::read(&dir, attempt)).await
        else {
            return;
        };
        let lines = read.lines;
        if lines.len() > sent {
            let b = joined(&lines[sent..]);
            if tx.send(give(b, &mut left)).await.is_err() {
                return;
            }
        }
        sent = lines.len();
    }
}

/// The bytes of an attempt's log files (`<attempt>.log` and its rotated pieces).
fn attempt_size(dir: &Path, attempt: u32) -> u64 {
    let prefix = format!("{attempt}.log");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn joined(lines: &[String]) -> Vec<u8> {
    let mut b = Vec::new();
    for l in lines {
        b.extend_from_slice(l.as_bytes());
        b.push(b'\n');
    }
    b
}

/// The logs request's parameters noded honours; the others are refused by name.
#[derive(Debug, Default, PartialEq)]
struct LogQuery {
    follow: bool,
    previous: bool,
    tail: Option<usize>,
    limit_bytes: Option<usize>,
}

impl LogQuery {
    fn parse(query: &str) -> Result<LogQuery, String> {
        let mut q = LogQuery::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let number = || {
                v.parse::<usize>()
                    .map_err(|_| format!("{k}={v}: not a whole number"))
            };
            match k.as_ref() {
                "follow" => q.follow = flag(&k, &v)?,
                "previous" => q.previous = flag(&k, &v)?,
                "tailLines" => q.tail = Some(number()?),
                "limitBytes" => q.limit_bytes = Some(number()?),
                "timestamps" if !flag(&k, &v)? => {}
                "timestamps" | "sinceSeconds" | "sinceTime" | "stream" => {
                    return Err(format!(
                        "{k} is not supported by noded's logs (follow, previous, \
                         tailLines and limitBytes are)"
                    ));
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// A query's true or false (present with no value is true).
fn flag(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("{k}={v}: not true or false")),
    }
}

/// kubelet's verb for a request's method.
fn verb(m: &Method) -> &'static str {
    match *m {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    }
}

/// kubelet's subresource of `nodes` for a path: the named ones, else `proxy` (which
/// covers logs, exec, attach and port-forward).
fn subresource(path: &str) -> &'static str {
    let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
    if under("/stats") {
        "stats"
    } else if under("/metrics") {
        "metrics"
    } else if under("/logs") {
        "log"
    } else {
        "proxy"
    }
}

/// The user (common name) and groups (organizations) of the client's certificate.
fn peer(chain: &[rustls::pki_types::CertificateDer<'_>]) -> Option<Peer> {
    let (_, cert) = x509_parser::parse_x509_certificate(chain.first()?.as_ref()).ok()?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(Peer { user, groups })
}

fn text(status: StatusCode, message: String) -> Response<Body> {
    respond(status, Full::new(Bytes::from(message + "\n")).boxed())
}

fn respond(status: StatusCode, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_logs_parameters_are_read_and_the_unsupported_named() {
        assert_eq!(
            LogQuery::parse("follow=true&tailLines=5&limitBytes=100&timestamps=false").unwrap(),
            LogQuery {
                follow: true,
                previous: false,
                tail: Some(5),
                limit_bytes: Some(100)
            }
        );
        assert_eq!(LogQuery::parse("").unwrap(), LogQuery::default());
        assert!(LogQuery::parse("previous=true").unwrap().previous);
        let e = LogQuery::parse("sinceSeconds=10").unwrap_err();
        assert!(e.starts_with("sinceSeconds is not supported"), "{e}");
        assert!(LogQuery::parse("timestamps=true").is_err());
        let e = LogQuery::parse("tailLines=-1").unwrap_err();
        assert_eq!(e, "tailLines=-1: not a whole number");
        assert!(LogQuery::parse("follow=maybe").is_err());
    }

    #[test]
    fn an_exec_request_gives_its_command_and_streams() {
        let q = ExecQuery::parse("command=cat&command=%2Fdata%2Fx+y&stdin=true&output=1&tty=false")
            .unwrap();
        assert_eq!(q.command, ["cat", "/data/x y"]);
        assert!(q.stdin && q.stdout && !q.stderr && !q.tty);
        assert_eq!(
            ExecQuery::parse("stdout=true").unwrap_err(),
            "no command to run (command=...)"
        );
        assert!(ExecQuery::parse("command=ls").is_err());
        assert!(ExecQuery::parse("command=ls&stdout=yes").is_err());
    }

    /// The authorization against the upstream control plane (built by `cargo xtask
    /// controlplane`): the operator's certificate (system:masters) may read this node's
    /// logs, another node's certificate may not (403 naming the user and what it
    /// asked), and a certificate the cluster CA did not sign does not get past TLS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn who_may_use_the_kubelet_api_is_decided_at_the_api_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some(bin) = qemu_tests::controlplane::built() else {
            edge_common::precondition_missing(
                "the Kubernetes control plane built from source (cargo xtask controlplane)",
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let cp_dir = dir.path().join("core");
        let cp = tokio::task::spawn_blocking(move || {
            qemu_tests::controlplane::ControlPlane::start(&bin, &cp_dir)
        })
        .await
        .unwrap()
        .unwrap();
        let admin = cp.admin_kubeconfig();
        let other = cp.node_kubeconfig("edge-b").unwrap();
        let client = super::super::client_from(&admin, None).await.unwrap();
        let (roots, _) = super::super::identity(&admin, None).unwrap();
        let kubelet = Arc::new(
            Kubelet::new(
                client,
                None,
                "edge-a",
                None,
                roots,
                Arc::default(),
                dir.path().join("logs"),
            )
            .unwrap(),
        );
        // The kubelet's own certificate is the only one its client trusts here.
        let mut trusted = rustls::RootCertStore::empty();
        trusted.add(kubelet.cert.clone().into()).unwrap();
        let ask = |kubeconfig: &Path| {
            let (_, certified) = super::super::identity(kubeconfig, None).unwrap();
            let tls = super::super::tls_client(trusted.clone(), certified).unwrap();
            let kubelet = kubelet.clone();
            async move {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                tokio::spawn(kubelet.serve(theirs));
                let name = rustls::pki_types::ServerName::try_from("edge-a").unwrap();
                let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls))
                    .connect(name, ours)
                    .await?;
                s.write_all(
                    b"GET /containerLogs/default/web/main HTTP/1.1\r\nHost: edge-a\r\n\
                      Connection: close\r\n\r\n",
                )
                .await?;
                let mut out = String::new();
                s.read_to_string(&mut out).await?;
                Ok::<_, std::io::Error>(out)
            }
        };
        let allowed = ask(&admin).await.unwrap();
        assert!(allowed.starts_with("HTTP/1.1 400"), "{allowed}");
        assert!(
            allowed.contains("no pod named \"default/web\""),
            "{allowed}"
        );
        let denied = ask(&other).await.unwrap();
        assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
        assert!(
            denied.contains(
                "Forbidden (user=system:node:edge-b, verb=get, resource=nodes, subresource=proxy)"
            ),
            "{denied}"
        );
        // A certificate of another CA: the handshake is refused.
        let stranger = dir.path().join("stranger");
        std::fs::create_dir_all(&stranger).unwrap();
        std::fs::copy(cp.dir.join("ext.cnf"), stranger.join("ext.cnf")).unwrap();
        qemu_tests::core::make_ca(&stranger, "stranger CA").unwrap();
        qemu_tests::core::issue(&stranger, "me", "/O=system:masters/CN=me", "client").unwrap();
        let text = std::fs::read_to_string(&admin)
            .unwrap()
            .replace(
                &cp.dir.join("admin.pem").display().to_string(),
                &stranger.join("me.pem").display().to_string(),
            )
            .replace(
                &cp.dir.join("admin.key").display().to_string(),
                &stranger.join("me.key").display().to_string(),
            );
        let forged = dir.path().join("forged.kubeconfig");
        std::fs::write(&forged, text).unwrap();
        let refused = ask(&forged).await;
        assert!(
            refused.as_ref().is_err() || refused.as_ref().is_ok_and(|o| o.is_empty()),
            "{refused:?}"
        );
    }

    #[test]
    fn paths_and_methods_map_to_kubelets_authorization_attributes() {
        assert_eq!(subresource("/containerLogs/default/p/c"), "proxy");
        assert_eq!(subresource("/exec/default/p/c"), "proxy");
        assert_eq!(subresource("/stats/summary"), "stats");
        assert_eq!(subresource("/metrics"), "metrics");
        assert_eq!(subresource("/logs/syslog"), "log");
        assert_eq!(subresource("/statsx"), "proxy");
        assert_eq!(verb(&Method::GET), "get");
        assert_eq!(verb(&Method::POST), "create");
    }
}
