//! A test double of kube-apiserver, because no real one can run on this machine: plain
//! HTTP/1.1 on 127.0.0.1 serving only the calls noded makes (nodes get/create/patch and
//! status patch, leases get/create/replace, pods list and watch by
//! `spec.nodeName`, pods status patch and delete). It checks what the real server
//! checks for those calls (bearer token, content types, bodies' kind and names,
//! resourceVersion on replace, uid preconditions) so a wrong request fails the test,
//! and it keeps watch history like the real watch cache: a restart starts a new
//! history, and a watch from before it is answered `410 Expired`, forcing a relist.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_rustls::rustls;

pub const TOKEN: &str = "noded-test-token";

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: String,
    pub body: Value,
    pub status: u16,
}

#[derive(Default)]
struct State {
    rv: u64,
    nodes: BTreeMap<String, Value>,
    leases: BTreeMap<(String, String), Value>,
    pods: BTreeMap<(String, String), Value>,
    /// Pod events since the server (re)started: (resourceVersion, type, object).
    history: Vec<(u64, String, Value)>,
    /// Watches from a resourceVersion older than this are expired.
    oldest: u64,
    requests: Vec<Request>,
    uids: u64,
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn uid(&mut self) -> String {
        self.uids += 1;
        format!("00000000-0000-4000-8000-{:012}", self.uids)
    }

    fn pod_event(&mut self, kind: &str, pod: Value, tx: &broadcast::Sender<(u64, String, Value)>) {
        let rv = pod["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or(self.rv);
        self.history.push((rv, kind.to_string(), pod.clone()));
        let _ = tx.send((rv, kind.to_string(), pod));
    }
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(u64, String, Value)>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// HTTPS with this certificate chain and key (PEM files) when set.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// TLS connections whose handshake failed (the client refused the certificate).
    refused: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        Self::start_with(None).await
    }

    /// Serves HTTPS with the PEM certificate chain and key.
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> FakeApiServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Self::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeApiServer {
        let (events, _) = broadcast::channel(1024);
        let mut s = FakeApiServer {
            addr: "127.0.0.1:0".parse().unwrap(),
            state: Arc::new(Mutex::new(State::default())),
            events,
            tasks: Arc::new(Mutex::new(Vec::new())),
            tls,
            refused: Arc::default(),
        };
        s.listen().await;
        s
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let (state, events, tasks) = (self.state.clone(), self.events.clone(), self.tasks.clone());
        let (tls, refused) = (self.tls.clone(), self.refused.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let (state, events, tls, refused) =
                    (state.clone(), events.clone(), tls.clone(), refused.clone());
                let t = tokio::spawn(async move {
                    match tls {
                        // A client that does not trust the certificate fails here.
                        Some(tls) => match tls.accept(conn).await {
                            Ok(conn) => {
                                let _ = serve(conn, state, events).await;
                            }
                            Err(_) => {
                                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        },
                        None => {
                            let _ = serve(conn, state, events).await;
                        }
                    }
                });
                tasks.lock().unwrap().push(t);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// The server goes away: the listener and every connection (watches too) close.
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Back on the same port with the same objects (etcd kept them) but a new watch
    /// history, as a restarted kube-apiserver's watch cache.
    pub async fn restart(&mut self) {
        {
            let mut st = self.state.lock().unwrap();
            st.oldest = st.rv;
            st.history.clear();
        }
        for _ in 0..50 {
            if TcpListener::bind(self.addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.listen().await;
    }

    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_with_ca(None)
    }

    /// A kubeconfig for this server; over HTTPS, trusting the CA file `ca`.
    pub fn kubeconfig_with_ca(&self, ca: Option<&std::path::Path>) -> String {
        let (scheme, ca) = match (&self.tls, ca) {
            (Some(_), Some(ca)) => (
                "https",
                format!("    certificate-authority: {}\n", ca.display()),
            ),
            (Some(_), None) => ("https", String::new()),
            (None, _) => ("http", String::new()),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {scheme}://{}\n{ca}\
             users:\n- name: noded\n  user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: noded\n\
             current-context: fake\n",
            self.addr
        )
    }

    /// Adds a pod as the scheduler would have left it (bound to `node`), with what the
    /// server adds on create: uid, resourceVersion, defaults, the token volume, status.
    pub fn add_pod(&self, namespace: &str, name: &str, node: &str, spec: Value) -> Value {
        let mut st = self.state.lock().unwrap();
        let uid = st.uid();
        let rv = st.next_rv();
        let mut spec = spec;
        let token = format!("kube-api-access-{}", &uid[uid.len() - 5..]);
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array_mut().into_iter().flatten() {
                c["terminationMessagePath"] = "/dev/termination-log".into();
                c["terminationMessagePolicy"] = "File".into();
                c["imagePullPolicy"] = "IfNotPresent".into();
                c["resources"] = c.get("resources").cloned().unwrap_or(json!({}));
                let mut mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
                mounts.push(json!({"name": token, "readOnly": true,
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}));
                c["volumeMounts"] = mounts.into();
            }
        }
        let mut vols = spec["volumes"].as_array().cloned().unwrap_or_default();
        vols.push(json!({"name": token, "projected": {"defaultMode": 420, "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        ]}}));
        spec["volumes"] = vols.into();
        let defaults = json!({
            "nodeName": node,
            "schedulerName": "default-scheduler",
            "dnsPolicy": "ClusterFirst",
            "restartPolicy": "Always",
            "serviceAccount": "default",
            "serviceAccountName": "default",
            "securityContext": {},
            "terminationGracePeriodSeconds": 30,
            "enableServiceLinks": true,
            "priority": 0,
            "preemptionPolicy": "PreemptLowerPriority",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
        });
        for (k, v) in defaults.as_object().unwrap() {
            if spec.get(k).is_none() {
                spec[k] = v.clone();
            }
        }
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid,
                "resourceVersion": rv.to_string(),
                "creationTimestamp": "2026-11-22T00:00:00Z",
                "labels": {"app": name},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1"}],
            },
            "spec": spec,
            "status": {"phase": "Pending", "qosClass": "BestEffort",
                "conditions": [{"type": "PodScheduled", "status": "True"}]},
        });
        st.pods.insert((namespace.into(), name.into()), pod.clone());
        st.pod_event("ADDED", pod.clone(), &self.events);
        pod
    }

    /// `kubectl delete pod` (graceful: deletionTimestamp set, the kubelet finishes it)
    /// or `--force --grace-period=0` (gone at once).
    pub fn delete_pod(&self, namespace: &str, name: &str, graceful: bool) {
        let mut st = self.state.lock().unwrap();
        delete(
            &mut st,
            namespace,
            name,
            if graceful { 30 } else { 0 },
            &self.events,
        );
    }

    /// While the server is down: what another API server instance did meanwhile.
    pub fn delete_pod_silently(&self, namespace: &str, name: &str) {
        let mut st = self.state.lock().unwrap();
        st.next_rv();
        st.pods.remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn delete_node(&self, name: &str) {
        let mut st = self.state.lock().unwrap();
        st.next_rv();
        st.nodes.remove(name);
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.state.lock().unwrap().nodes.get(name).cloned()
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.leases
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    pub fn refused_handshakes(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn now() -> String {
    "2026-11-22T00:00:01Z".into()
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn delete(
    st: &mut State,
    ns: &str,
    name: &str,
    grace: i64,
    tx: &broadcast::Sender<(u64, String, Value)>,
) -> Option<Value> {
    let key = (ns.to_string(), name.to_string());
    let mut pod = st.pods.get(&key)?.clone();
    let rv = st.next_rv();
    pod["metadata"]["resourceVersion"] = rv.to_string().into();
    if grace == 0 {
        st.pods.remove(&key);
        st.pod_event("DELETED", pod.clone(), tx);
    } else {
        pod["metadata"]["deletionTimestamp"] = now().into();
        pod["metadata"]["deletionGracePeriodSeconds"] = grace.into();
        st.pods.insert(key, pod.clone());
        st.pod_event("MODIFIED", pod.clone(), tx);
    }
    Some(pod)
}

struct Http {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

async fn read_request<S: AsyncRead + Unpin>(conn: &mut S) -> Option<Http> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let mut headers = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), unescape(v))
        })
        .collect();
    Some(Http {
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn respond<S: AsyncWrite + Unpin>(conn: &mut S, code: u16, body: &Value) {
    let text = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(text.as_bytes()).await;
    let _ = conn.shutdown().await;
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(u64, String, Value)>,
) -> Option<()> {
    let req = read_request(&mut conn).await?;
    let ctype = req.headers.get("content-type").cloned().unwrap_or_default();
    let body: Value = if req.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&req.body).unwrap_or(json!({"__invalid_json": true}))
    };
    let is_watch = req.method == "GET"
        && req.path == "/api/v1/pods"
        && matches!(
            req.query.get("watch").map(String::as_str),
            Some("true" | "1")
        );
    let (code, answer) = if req.headers.get("authorization").map(String::as_str)
        != Some(&format!("Bearer {TOKEN}"))
    {
        status(401, "Unauthorized", "Unauthorized")
    } else if is_watch {
        let r = watch(&mut conn, &req, &state, &events).await;
        record(&state, &req, &ctype, body, 200);
        return r;
    } else {
        handle(&req, &ctype, &body, &state, &events)
    };
    record(&state, &req, &ctype, body, code);
    respond(&mut conn, code, &answer).await;
    Some(())
}

fn record(state: &Mutex<State>, req: &Http, ctype: &str, body: Value, code: u16) {
    state.lock().unwrap().requests.push(Request {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        content_type: ctype.to_string(),
        body,
        status: code,
    });
}

/// The field selectors the real server supports for pods that noded may use.
fn node_selector(req: &Http) -> Result<Option<String>, (u16, Value)> {
    match req.query.get("fieldSelector") {
        None => Ok(None),
        Some(s) => match s.strip_prefix("spec.nodeName=") {
            Some(n) if !n.contains(',') => Ok(Some(n.to_string())),
            _ => Err(status(
                400,
                "BadRequest",
                &format!("unsupported field selector {s:?}"),
            )),
        },
    }
}

fn on_node(pod: &Value, node: &Option<String>) -> bool {
    node.as_ref()
        .is_none_or(|n| pod["spec"]["nodeName"].as_str() == Some(n.as_str()))
}

async fn watch<S: AsyncWrite + Unpin>(
    conn: &mut S,
    req: &Http,
    state: &Mutex<State>,
    events: &broadcast::Sender<(u64, String, Value)>,
) -> Option<()> {
    let node = match node_selector(req) {
        Ok(n) => n,
        Err((code, body)) => {
            respond(conn, code, &body).await;
            return Some(());
        }
    };
    let from: Option<u64> = req
        .query
        .get("resourceVersion")
        .and_then(|r| r.parse().ok());
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800u64);
    // Under the lock: what is already known, and the subscription for what follows.
    let (backlog, mut rx, expired) = {
        let st = state.lock().unwrap();
        let rx = events.subscribe();
        match from {
            Some(rv) if rv != 0 && rv < st.oldest => (Vec::new(), rx, true),
            Some(rv) if rv != 0 => (
                st.history
                    .iter()
                    .filter(|(r, _, p)| *r > rv && on_node(p, &node))
                    .cloned()
                    .collect(),
                rx,
                false,
            ),
            _ => (
                st.pods
                    .values()
                    .filter(|p| on_node(p, &node))
                    .map(|p| (0, "ADDED".to_string(), p.clone()))
                    .collect(),
                rx,
                false,
            ),
        }
    };
    conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await
    .ok()?;
    let send = |kind: &str, obj: &Value| {
        let line = format!("{}\n", json!({"type": kind, "object": obj}));
        format!("{:x}\r\n{line}\r\n", line.len())
    };
    if expired {
        let (_, s) = status(410, "Expired", "too old resource version");
        conn.write_all(send("ERROR", &s).as_bytes()).await.ok()?;
        conn.write_all(b"0\r\n\r\n").await.ok()?;
        return Some(());
    }
    let mut last = from.unwrap_or(0);
    for (rv, kind, pod) in backlog {
        last = last.max(rv);
        conn.write_all(send(&kind, &pod).as_bytes()).await.ok()?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let next = tokio::time::timeout_at(deadline, rx.recv()).await;
        match next {
            Ok(Ok((rv, kind, pod))) => {
                if rv > last && on_node(&pod, &node) {
                    last = rv;
                    conn.write_all(send(&kind, &pod).as_bytes()).await.ok()?;
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            _ => break,
        }
    }
    conn.write_all(b"0\r\n\r\n").await.ok()?;
    Some(())
}

fn handle(
    req: &Http,
    ctype: &str,
    body: &Value,
    state: &Mutex<State>,
    events: &broadcast::Sender<(u64, String, Value)>,
) -> (u16, Value) {
    let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let mut st = state.lock().unwrap();
    let json_body = |expect_kind: &str, api_version: &str| -> Result<(), (u16, Value)> {
        if ctype != "application/json" {
            return Err(status(
                415,
                "UnsupportedMediaType",
                &format!("unsupported content type {ctype:?}"),
            ));
        }
        if body.get("__invalid_json").is_some() || !body.is_object() {
            return Err(status(400, "BadRequest", "the body is not a JSON object"));
        }
        if body["kind"] != expect_kind || body["apiVersion"] != api_version {
            return Err(status(
                400,
                "BadRequest",
                &format!(
                    "the body is {}/{}, not {api_version}/{expect_kind}",
                    body["apiVersion"], body["kind"]
                ),
            ));
        }
        Ok(())
    };
    let merge_patch = || -> Result<(), (u16, Value)> {
        if ctype != "application/merge-patch+json" {
            return Err(status(
                415,
                "UnsupportedMediaType",
                &format!("the test double applies merge patches only, not {ctype:?}"),
            ));
        }
        if !body.is_object() || body.get("__invalid_json").is_some() {
            return Err(status(400, "BadRequest", "the patch is not a JSON object"));
        }
        Ok(())
    };
    let m = req.method.as_str();
    match parts.as_slice() {
        ["api", "v1", "nodes"] if m == "POST" => {
            if let Err(e) = json_body("Node", "v1") {
                return e;
            }
            let Some(name) = body["metadata"]["name"].as_str().filter(|n| !n.is_empty()) else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            if st.nodes.contains_key(name) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("nodes \"{name}\" already exists"),
                );
            }
            let mut node = body.clone();
            node["metadata"]["uid"] = st.uid().into();
            node["metadata"]["resourceVersion"] = st.next_rv().to_string().into();
            node["metadata"]["creationTimestamp"] = now().into();
            st.nodes.insert(name.to_string(), node.clone());
            (201, node)
        }
        ["api", "v1", "nodes", name] if m == "GET" => match st.nodes.get(*name) {
            Some(n) => (200, n.clone()),
            None => status(404, "NotFound", &format!("nodes \"{name}\" not found")),
        },
        ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"] if m == "PATCH" => {
            // A strategic merge patch of a Node as the server applies one: the lists
            // with a merge key (conditions and addresses, by type) are merged by it.
            let strategic = ctype == "application/strategic-merge-patch+json";
            if strategic && (!body.is_object() || body.get("__invalid_json").is_some()) {
                return status(400, "BadRequest", "the patch is not a JSON object");
            }
            if !strategic {
                if let Err(e) = merge_patch() {
                    return e;
                }
            }
            let sub = parts.len() == 5;
            let rv = st.next_rv();
            let Some(node) = st.nodes.get_mut(*name) else {
                return status(404, "NotFound", &format!("nodes \"{name}\" not found"));
            };
            let mut patched = node.clone();
            let mut body = body.clone();
            if strategic {
                for list in ["conditions", "addresses"] {
                    let (Some(Value::Array(new)), Some(Value::Array(old))) =
                        (body["status"].get(list).cloned(), node["status"].get(list))
                    else {
                        continue;
                    };
                    let mut merged = old.clone();
                    for n in new {
                        match merged.iter_mut().find(|o| o["type"] == n["type"]) {
                            Some(o) => merge(o, &n),
                            None => merged.push(n),
                        }
                    }
                    body["status"][list] = Value::Array(merged);
                }
            }
            merge(&mut patched, &body);
            // The main resource ignores status; the status subresource ignores the rest.
            if sub {
                node["status"] = patched["status"].clone();
            } else {
                patched["status"] = node["status"].clone();
                *node = patched;
            }
            node["metadata"]["resourceVersion"] = rv.to_string().into();
            (200, node.clone())
        }
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"] if m == "POST" => {
            if let Err(e) = json_body("Lease", "coordination.k8s.io/v1") {
                return e;
            }
            let Some(name) = body["metadata"]["name"].as_str() else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            if body["metadata"]["namespace"]
                .as_str()
                .is_some_and(|n| n != *ns)
            {
                return status(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the request",
                );
            }
            let key = (ns.to_string(), name.to_string());
            if st.leases.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("leases \"{name}\" already exists"),
                );
            }
            let mut lease = body.clone();
            lease["metadata"]["namespace"] = (*ns).into();
            lease["metadata"]["uid"] = st.uid().into();
            lease["metadata"]["resourceVersion"] = st.next_rv().to_string().into();
            st.leases.insert(key, lease.clone());
            (201, lease)
        }
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name] if m == "GET" => {
            match st.leases.get(&(ns.to_string(), name.to_string())) {
                Some(l) => (200, l.clone()),
                None => status(
                    404,
                    "NotFound",
                    &format!("leases.coordination.k8s.io \"{name}\" not found"),
                ),
            }
        }
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name] if m == "PUT" => {
            if let Err(e) = json_body("Lease", "coordination.k8s.io/v1") {
                return e;
            }
            if body["metadata"]["name"] != *name {
                return status(
                    400,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                );
            }
            let key = (ns.to_string(), name.to_string());
            let Some(current) = st.leases.get(&key).cloned() else {
                return status(
                    404,
                    "NotFound",
                    &format!("leases.coordination.k8s.io \"{name}\" not found"),
                );
            };
            if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again");
            }
            let mut lease = body.clone();
            lease["metadata"]["uid"] = current["metadata"]["uid"].clone();
            lease["metadata"]["resourceVersion"] = st.next_rv().to_string().into();
            st.leases.insert(key, lease.clone());
            (200, lease)
        }
        ["api", "v1", "pods"] if m == "GET" => {
            let node = match node_selector(req) {
                Ok(n) => n,
                Err(e) => return e,
            };
            let items: Vec<Value> = st
                .pods
                .values()
                .filter(|p| on_node(p, &node))
                .map(|p| {
                    // List items carry no apiVersion and kind.
                    let mut p = p.clone();
                    let o = p.as_object_mut().unwrap();
                    o.remove("apiVersion");
                    o.remove("kind");
                    p
                })
                .collect();
            (
                200,
                json!({"kind": "PodList", "apiVersion": "v1",
                         "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
            )
        }
        ["api", "v1", "namespaces", ns, "pods", name, "status"] if m == "PATCH" => {
            if let Err(e) = merge_patch() {
                return e;
            }
            let key = (ns.to_string(), name.to_string());
            let Some(mut pod) = st.pods.get(&key).cloned() else {
                return status(404, "NotFound", &format!("pods \"{name}\" not found"));
            };
            if let Some(uid) = body["metadata"]["uid"].as_str() {
                if pod["metadata"]["uid"] != uid {
                    return status(
                        409,
                        "Conflict",
                        &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        pod["metadata"]["uid"]
                    ),
                    );
                }
            }
            let mut patched = pod.clone();
            merge(&mut patched, body);
            pod["status"] = patched["status"].clone();
            pod["metadata"]["resourceVersion"] = st.next_rv().to_string().into();
            st.pods.insert(key, pod.clone());
            st.pod_event("MODIFIED", pod.clone(), events);
            (200, pod)
        }
        ["api", "v1", "namespaces", ns, "pods", name] if m == "DELETE" => {
            if !body.is_null() {
                if ctype != "application/json" {
                    return status(415, "UnsupportedMediaType", "DeleteOptions must be JSON");
                }
                if let Some(uid) = body["preconditions"]["uid"].as_str() {
                    let current = st.pods.get(&(ns.to_string(), name.to_string()));
                    if current.is_some_and(|p| p["metadata"]["uid"] != uid) {
                        return status(
                            409,
                            "Conflict",
                            "Precondition failed: UID in precondition does not match",
                        );
                    }
                }
            }
            let grace = body["gracePeriodSeconds"].as_i64().unwrap_or(30);
            match delete(&mut st, ns, name, grace, events) {
                Some(p) => (200, p),
                None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
            }
        }
        _ => status(
            404,
            "NotFound",
            &format!("the test double does not serve {m} {}", req.path),
        ),
    }
}
