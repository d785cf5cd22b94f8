//! The uplink: mirrors every class of the local log to the core's JetStream, exactly
//! once and in order. Each record goes to `<prefix>.<site>.<machine>.<topic>` with
//! `Nats-Msg-Id: <site>/<machine>/<offset>`, so a resend after a crash or partition is
//! dropped by the stream's duplicate window. Publishes are pipelined, at most `window`
//! per class awaiting acks; the highest offset acked in order is persisted per class
//! (`<log_dir>/<class>/uplink.acked`) and is where the next session resumes.
//!
//! A session is one NATS connection. The client's own reconnect is disabled: after a
//! reconnect it would send what was queued for the dead connection behind records that
//! were lost with it, and the core would store them out of order. Instead the session
//! ends, the connection is dropped with everything queued on it, and a new one resumes
//! from the last ack, after an exponential backoff.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use tokio::sync::mpsc;

use crate::config::{Config, CoreConfig};
use crate::log::{Cursor, Log};
use crate::record::Stored;

/// What the uplink reports (for `/metrics` and the logs).
#[derive(Default)]
pub struct Status {
    pub connected: AtomicBool,
    pub sessions: AtomicU64,
    pub reconnects: AtomicU64,
    pub published_records: AtomicU64,
    pub published_bytes: AtomicU64,
    /// Acks the core marked duplicate (resends it already had).
    pub duplicates: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl Status {
    fn error(&self, e: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_owned());
    }
}

fn acked_path(log: &Log, class: &str) -> PathBuf {
    log.class_dir(class).join("uplink.acked")
}

fn load_acked(path: &Path) -> Result<Option<u64>, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{} does not hold an offset", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("failed to read {}: {e}", path.display())),
    }
}

/// Written atomically; a stale value only means resends the core deduplicates.
fn store_acked(path: &Path, offset: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset}\n"))?;
    std::fs::File::open(&tmp)?.sync_data()?;
    std::fs::rename(&tmp, path)
}

/// Checks the TLS files before each attempt so that a missing or malformed one is
/// reported by name, not as a handshake failure.
fn check_tls_files(core: &CoreConfig) -> Result<(), String> {
    for (key, path) in [
        ("core.ca", &core.ca),
        ("core.cert", &core.cert),
        ("core.key", &core.key),
    ] {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("bad TLS material: {key} {}: {e}", path.display()))?;
        if !text.contains("-----BEGIN ") {
            return Err(format!(
                "bad TLS material: {key} {} is not PEM",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Flattens an error and its sources into one line: the reason is usually at the end
/// (e.g. the TLS alert the core sent).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// Runs forever: connect, mirror, and after any failure back off and start again.
pub async fn run(log: Log, config: Arc<Config>, status: Arc<Status>) {
    let Some(core) = config.core.clone() else {
        return;
    };
    let mut backoff = Duration::from_millis(100);
    let max = Duration::from_millis(core.backoff_max_ms.max(100));
    loop {
        status.sessions.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = session(&log, &config, &core, &status).await;
        status.connected.store(false, Ordering::Relaxed);
        let e = match result {
            Ok(()) => "the session ended".to_string(),
            Err(e) => e,
        };
        tracing::warn!(servers = ?core.servers, "uplink to the core: {e}; retrying in {backoff:?}");
        status.error(&e);
        // A session that ran a while was healthy: start the backoff over.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100);
        }
        // Up to a quarter of jitter so that a site's boxes do not reconnect in step.
        let jitter = (std::process::id() as u64 ^ started.elapsed().as_nanos() as u64)
            % (backoff.as_millis() as u64 / 4 + 1);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(max);
        status.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// One TLS connection to the core that never reconnects by itself (see the module comment).
pub async fn connect(
    core: &CoreConfig,
    lost: mpsc::UnboundedSender<String>,
) -> Result<async_nats::Client, String> {
    check_tls_files(core)?;
    let connected = Arc::new(AtomicBool::new(false));
    let once = connected.clone();
    let opts = async_nats::ConnectOptions::new()
        .add_root_certificates(core.ca.clone())
        .add_client_certificate(core.cert.clone(), core.key.clone())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(10))
        // The session, not the client, reconnects (see the module comment). A client
        // whose connection broke parks its reconnect forever (tokio caps the sleep):
        // were it to reconnect later, it would send its stale queue, perhaps after the
        // core's duplicate window. The parked task costs what was queued on it.
        .reconnect_delay_callback(move |_| {
            if once.load(Ordering::Relaxed) {
                Duration::MAX
            } else {
                Duration::ZERO
            }
        })
        .event_callback(move |event| {
            let lost = lost.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        let _ = lost.send(format!("connection to the core lost ({event})"));
                    }
                    async_nats::Event::ServerError(e) => {
                        let _ = lost.send(format!("the core reported an error: {e}"));
                    }
                    _ => {}
                }
            }
        });
    let servers: Vec<&str> = core.servers.iter().map(String::as_str).collect();
    let client = opts
        .connect(servers.as_slice())
        .await
        .map_err(|e| format!("cannot connect to the core: {}", chain(&e)))?;
    connected.store(true, Ordering::Relaxed);
    Ok(client)
}

async fn session(
    log: &Log,
    config: &Config,
    core: &CoreConfig,
    status: &Arc<Status>,
) -> Result<(), String> {
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let client = connect(core, lost_tx).await?;
    tracing::info!(servers = ?core.servers, "uplink connected to the core");
    status.connected.store(true, Ordering::Relaxed);
    let js = jetstream::context::ContextBuilder::new()
        .timeout(core.ack_timeout())
        .max_ack_inflight(core.window * config.classes.len() + 16)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let mut pumps = tokio::task::JoinSet::new();
    for (class, c) in config.classes.iter().enumerate() {
        let path = acked_path(log, &c.name);
        // This process may know of acks newer than the file (written every 200 ms).
        let acked = load_acked(&path)?.max(log.meta().classes[class].acked);
        if let Some(a) = acked {
            log.set_acked(class, a);
        }
        pumps.spawn(pump(
            log.clone(),
            js.clone(),
            config.subject_prefix(core),
            config.msg_id_prefix(),
            core.window,
            class,
            path,
            acked,
            status.clone(),
        ));
    }
    let result = tokio::select! {
        r = pumps.join_next() => match r {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(format!("uplink task failed: {e}")),
            _ => Ok(()),
        },
        e = lost_rx.recv() => Err(e.unwrap_or_else(|| "connection to the core lost".into())),
    };
    pumps.abort_all();
    drop(js);
    drop(client);
    result
}

impl Config {
    /// `<prefix>.<site>.<machine>.`: the topic follows.
    pub fn subject_prefix(&self, core: &CoreConfig) -> String {
        format!("{}.{}.{}.", core.prefix, self.site, self.machine)
    }
    /// `<site>/<machine>/`: the offset follows.
    pub fn msg_id_prefix(&self) -> String {
        format!("{}/{}/", self.site, self.machine)
    }
}

/// Header values travel as text; binary ones are sent hex-encoded under `<name>-Hex`.
fn put_header(h: &mut HeaderMap, name: &str, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(s) if !s.contains(['\r', '\n']) => h.append(name, s),
        _ => {
            let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
            h.append(format!("{name}-Hex").as_str(), hex.as_str());
        }
    }
}

fn headers_of(s: &Stored, id_prefix: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("{id_prefix}{}", s.offset).as_str());
    h.insert(
        "Fabric-Timestamp",
        s.record.timestamp_ms.to_string().as_str(),
    );
    if let Some(k) = &s.record.key {
        put_header(&mut h, "Fabric-Key", k);
    }
    for (n, v) in &s.record.headers {
        put_header(&mut h, n, v);
    }
    h
}

type AckFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
            > + Send,
    >,
>;

/// Mirrors one class: a reader that publishes ahead (bounded by the window) and an
/// acker that awaits the acks in order and records the progress.
#[allow(clippy::too_many_arguments)]
async fn pump(
    log: Log,
    js: jetstream::Context,
    subject_prefix: String,
    id_prefix: String,
    window: usize,
    class: usize,
    acked_file: PathBuf,
    acked: Option<u64>,
    status: Arc<Status>,
) -> Result<(), String> {
    let (tx, mut rx) = mpsc::channel::<(u64, usize, AckFuture)>(window);
    let acker_log = log.clone();
    let acker_status = status.clone();
    let acker = async move {
        let mut last_store = Instant::now();
        let mut stored = acked;
        let mut current = acked;
        loop {
            let next = if current != stored {
                // Persist when idle or every 200 ms, not per ack.
                match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    Ok(n) => n,
                    Err(_) => {
                        persist(&acked_file, current, &mut stored, &mut last_store)?;
                        continue;
                    }
                }
            } else {
                rx.recv().await
            };
            let Some((offset, bytes, fut)) = next else {
                return Ok::<(), String>(());
            };
            let ack = fut
                .await
                .map_err(|e| format!("the core did not take record {offset}: {}", chain(&e)))?;
            if ack.duplicate {
                acker_status.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            acker_status
                .published_records
                .fetch_add(1, Ordering::Relaxed);
            acker_status
                .published_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
            current = Some(offset);
            acker_log.set_acked(class, offset);
            if last_store.elapsed() > Duration::from_millis(200) {
                persist(&acked_file, current, &mut stored, &mut last_store)?;
            }
        }
    };
    let sender = async move {
        let mut committed = log.subscribe();
        let mut cursor = Some(Cursor::new(class, acked.map_or(0, |a| a + 1)));
        loop {
            committed.borrow_and_update();
            let reader = log.clone();
            let mut cur = cursor.take().expect("cursor is put back after each read");
            let (cur, batch) = tokio::task::spawn_blocking(move || {
                let r = reader.read(&mut cur, 1 << 20);
                (cur, r)
            })
            .await
            .map_err(|e| format!("log reader failed: {e}"))?;
            cursor = Some(cur);
            let batch = batch.map_err(|e| format!("failed to read the log: {e}"))?;
            if batch.is_empty() {
                let _ = committed.changed().await;
                continue;
            }
            for s in batch {
                let subject = format!("{subject_prefix}{}", s.record.topic);
                let headers = headers_of(&s, &id_prefix);
                let bytes = s.record.value.len();
                let fut = js
                    .publish_with_headers(subject, headers, bytes::Bytes::from(s.record.value))
                    .await
                    .map_err(|e| format!("failed to publish record {}: {}", s.offset, chain(&e)))?;
                let fut: AckFuture = Box::pin(std::future::IntoFuture::into_future(fut));
                if tx.send((s.offset, bytes, fut)).await.is_err() {
                    return Ok(());
                }
            }
        }
    };
    tokio::select! {
        r = acker => r,
        r = sender => r,
    }
}

fn persist(
    path: &Path,
    current: Option<u64>,
    stored: &mut Option<u64>,
    last: &mut Instant,
) -> Result<(), String> {
    if let Some(c) = current {
        store_acked(path, c).map_err(|e| format!("failed to write {}: {e}", path.display()))?;
    }
    *stored = current;
    *last = Instant::now();
    Ok(())
}
