//! The uplink: mirrors every class of the local log to the core's JetStream, exactly
//! once and in order. Each record goes to `<prefix>.<site>.<machine>.<topic>` with
//! `Nats-Msg-Id: <site>/<machine>/<offset>.<crc>` (the record's CRC32C in hex), so a
//! resend after a crash or partition is dropped by the stream's duplicate window, and
//! another record at the same offset (a log restored from a backup) is not. Publishes
//! are pipelined, at most `window` per class awaiting acks; the highest offset acked in
//! order is persisted per class (`<log_dir>/<class>/uplink.acked`) and is where the next
//! session resumes.
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
use edge_common::lock;
use tokio::sync::mpsc;

use crate::config::{Config, CoreConfig};
use crate::error::{Error, Result};
use crate::record::Stored;
use crate::store::{Cursor, Log};

/// What the uplink reports (for `/metrics` and the logs).
#[derive(Default)]
pub struct Status {
    pub connected: AtomicBool,
    pub sessions: AtomicU64,
    pub reconnects: AtomicU64,
    pub published_records: AtomicU64,
    pub published_bytes: AtomicU64,
    /// Payload bytes that went on the wire for the acked records (after compression).
    pub wire_bytes: AtomicU64,
    /// Records sent zstd-compressed.
    pub compressed_records: AtomicU64,
    /// Acks the core marked duplicate (resends it already had).
    pub duplicates: AtomicU64,
    /// Sessions that found the core holding a record of ours this log does not (a log
    /// restored from a backup), and what each class's last such finding said.
    pub log_diverged: AtomicU64,
    pub diverged: Mutex<std::collections::BTreeMap<String, String>>,
    pub last_error: Mutex<Option<String>>,
    /// When the last session ended (an ack that failed, the link lost): every record it
    /// had in flight was published within an ack timeout before then.
    pub session_ended: Mutex<Option<Instant>>,
}

impl Status {
    pub(crate) fn error(&self, e: &str) {
        *lock(&self.last_error) = Some(e.to_owned());
    }

    fn session_ended(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        lock(&self.session_ended)
    }
}

fn acked_path(log: &Log, class: &str) -> PathBuf {
    log.class_dir(class).join("uplink.acked")
}

fn load_acked(path: &Path) -> Result<Option<u64>> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::NotAnOffset(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path)(e)),
    }
}

/// Written atomically; a stale value only means resends the core deduplicates.
fn store_acked(path: &Path, offset: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset}\n"))?;
    std::fs::File::open(&tmp)?.sync_data()?;
    std::fs::rename(&tmp, path)
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
pub async fn run(
    log: Log,
    config: Arc<Config>,
    status: Arc<Status>,
    downlink: Arc<crate::downlink::Status>,
) {
    let Some(core) = config.core.clone() else {
        return;
    };
    let mut backoff = edge_common::Backoff::new(
        Duration::from_millis(100),
        Duration::from_millis(core.backoff_max_ms.max(100)),
    );
    loop {
        status.sessions.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = session(&log, &config, &core, &status, &downlink).await;
        status.connected.store(false, Ordering::Relaxed);
        let e = match result {
            Ok(()) => "the session ended".to_string(),
            Err(e) => e.to_string(),
        };
        // A session that ran a while was healthy: start the backoff over.
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(servers = ?core.servers, "uplink to the core: {e}; retrying in {delay:?}");
        status.error(&e);
        // Up to a quarter of jitter so that a site's boxes do not reconnect in step.
        let jitter = (std::process::id() as u64 ^ started.elapsed().as_nanos() as u64)
            % (delay.as_millis() as u64 / 4 + 1);
        tokio::time::sleep(delay + Duration::from_millis(jitter)).await;
        status.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// The subject prefix of a box's replies and consumer deliveries: per site, so that the
/// core can let a site's boxes subscribe to their own replies and nobody else's (the
/// default `_INBOX.` is shared by every client; docs/fabric.md, "Authorization at the core").
pub fn inbox_prefix(site: &str) -> String {
    format!("_INBOX_{site}")
}

/// One TLS connection to the core that never reconnects by itself (see the module comment).
pub async fn connect(
    core: &CoreConfig,
    site: &str,
    lost: mpsc::UnboundedSender<Error>,
) -> Result<async_nats::Client> {
    let tls = crate::site_identity::client_config(core)?;
    let connected = Arc::new(AtomicBool::new(false));
    let once = connected.clone();
    let opts = async_nats::ConnectOptions::new()
        .tls_client_config(tls)
        .require_tls(true)
        .custom_inbox_prefix(inbox_prefix(site))
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
                        let _ = lost.send(Error::lost(Some(event.to_string())));
                    }
                    async_nats::Event::ServerError(e) => {
                        let _ = lost.send(Error::core("the core reported an error")(e));
                    }
                    _ => {}
                }
            }
        });
    let servers: Vec<&str> = core.servers.iter().map(String::as_str).collect();
    let client = opts
        .connect(servers.as_slice())
        .await
        .map_err(|e| Error::Core {
            op: "cannot connect to the core".into(),
            detail: chain(&e),
        })?;
    connected.store(true, Ordering::Relaxed);
    Ok(client)
}

async fn session(
    log: &Log,
    config: &Config,
    core: &CoreConfig,
    status: &Arc<Status>,
    downlink: &Arc<crate::downlink::Status>,
) -> Result<()> {
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let client = connect(core, &config.site, lost_tx).await?;
    tracing::info!(servers = ?core.servers, "uplink connected to the core");
    status.connected.store(true, Ordering::Relaxed);
    let js = jetstream::context::ContextBuilder::new()
        .timeout(core.ack_timeout())
        .max_ack_inflight(core.window * config.classes.len() + 16)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let mut pumps = tokio::task::JoinSet::new();
    if core.status_interval_secs > 0 {
        pumps.spawn(report_status(
            log.clone(),
            config.classes.iter().map(|c| c.name.clone()).collect(),
            js.clone(),
            format!(
                "$KV.{}.{}.{}",
                core.status_bucket, config.site, config.machine
            ),
            core.clone(),
            OsFiles {
                boot: config.boot_file.clone(),
                update: config.update_state.clone(),
                health: config.health_file.clone(),
            },
            downlink.clone(),
            status.clone(),
        ));
    }
    let subject_prefix = config.subject_prefix(core);
    let id_prefix = config.msg_id_prefix();
    let asking = crate::resume::Asking {
        client: &client,
        stream: &core.stream,
        subject_prefix: &subject_prefix,
        id_prefix: &id_prefix,
    };
    for (class, c) in config.classes.iter().enumerate() {
        let path = acked_path(log, &c.name);
        // This process may know of acks newer than the file (written every 200 ms).
        let acked = load_acked(&path)?.max(log.meta().classes[class].acked);
        let ended = *status.session_ended();
        let held = if crate::resume::resend_all(ended, core.ack_timeout(), core.dupe_window()) {
            acked
        } else {
            let resumed = crate::resume::resume_after(&asking, log, class, acked).await;
            if let Some(said) = resumed.diverged {
                status.log_diverged.fetch_add(1, Ordering::Relaxed);
                lock(&status.diverged).insert(c.name.clone(), said);
            }
            resumed.after
        };
        if let Some(h) = held.filter(|_| held > acked) {
            store_acked(&path, h).map_err(Error::io("write", &path))?;
        }
        let acked = held;
        if let Some(a) = acked {
            log.set_acked(class, a);
        }
        pumps.spawn(pump(
            log.clone(),
            js.clone(),
            Naming {
                subject_prefix: subject_prefix.clone(),
                id_prefix: id_prefix.clone(),
                compress_min: core.compress_min_bytes,
            },
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
            Some(Err(source)) => Err(Error::Task { what: "uplink task failed", source }),
            _ => Ok(()),
        },
        e = lost_rx.recv() => Err(e.unwrap_or_else(|| Error::lost(None))),
    };
    pumps.abort_all();
    *status.session_ended() = Some(Instant::now());
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

/// A record's `Nats-Msg-Id`: `<site>/<machine>/<offset>.<crc>`.
fn message_id(id_prefix: &str, s: &Stored) -> String {
    format!("{id_prefix}{}.{:08x}", s.offset, s.crc)
}

/// What a `Nats-Msg-Id` of ours names: its `<site>/<machine>/` prefix, the offset and the
/// record's CRC (`None` in the ids of versions before it was added: `<…>/<offset>`).
pub fn parse_message_id(id: &str) -> Option<(&str, u64, Option<u32>)> {
    let slash = id.rfind('/')?;
    let (prefix, last) = (&id[..=slash], &id[slash + 1..]);
    let (offset, crc) = match last.split_once('.') {
        Some((o, c)) if c.len() == 8 => (o, Some(u32::from_str_radix(c, 16).ok()?)),
        Some(_) => return None,
        None => (last, None),
    };
    let digits = !offset.is_empty() && offset.bytes().all(|b| b.is_ascii_digit());
    Some((prefix, offset.parse().ok().filter(|_| digits)?, crc))
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
    h.insert("Nats-Msg-Id", message_id(id_prefix, s).as_str());
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

/// A value as it goes on the wire: zstd-compressed (with `Fabric-Encoding: zstd`) when it
/// is at least `min` bytes and compressing saves an eighth or more; telemetry JSON usually
/// does, already-compressed media does not and is sent as it is.
pub fn encode(value: Vec<u8>, min: usize) -> (Vec<u8>, bool) {
    if min == 0 || value.len() < min {
        return (value, false);
    }
    match zstd::bulk::compress(&value, 3) {
        Ok(c) if c.len() <= value.len() - value.len() / 8 => (c, true),
        _ => (value, false),
    }
}

/// The inverse of [`encode`], for the core's readers (`edgectl tail`); `limit` bounds the
/// decompressed size so a hostile frame cannot exhaust memory.
pub fn decode(payload: &[u8], encoding: Option<&str>, limit: usize) -> Result<Vec<u8>> {
    match encoding {
        None => Ok(payload.to_vec()),
        Some("zstd") => zstd::bulk::decompress(payload, limit).map_err(|e| Error::Payload {
            encoding: "zstd".into(),
            source: Some(e),
        }),
        Some(other) => Err(Error::Payload {
            encoding: other.into(),
            source: None,
        }),
    }
}

/// What the box tells the core about itself: put into the KV bucket `status_bucket`
/// under `<site>.<machine>`, so the core keeps the latest per box (`edgectl status` shows
/// it as the site's lag). A KV bucket rather than a rollup in the records' stream: a
/// subject purge there costs the server a scan of the whole stream.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BoxStatus {
    pub time_ms: u64,
    pub version: String,
    pub classes: Vec<ClassStatus>,
    /// An enrolled box's latest quote of its boot (enrollment.rs, `boot_report`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<edge_tpm::enrollment::BootReport>,
    /// The OS running: `{"version":..,"slot":..}` from init's boot record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsStatus>,
    /// init's update state as it keeps it (docs/update.md): the security floor and the
    /// latest update's phase, versions, slots and reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<serde_json::Value>,
    /// What the downlink fetched and is fetching (an update's download progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downlink: Option<crate::downlink::DownlinkReport>,
    /// init's word on the box's health: services given up and since when, and how the
    /// previous boot ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// init's health file (`/run/edge/health.json`, docs/contracts.md), as the core sees it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    /// The box reached ready this boot.
    #[serde(default)]
    pub ready: bool,
    /// Services given up after their crash-loop limit (init retries them later).
    #[serde(default)]
    pub failed: Vec<String>,
    #[serde(default)]
    pub degraded_since_ms: Option<u64>,
    /// `none`, `shut down cleanly`, `cut off: ...`, `reset by the watchdog`, `unknown`.
    #[serde(default)]
    pub previous_boot: String,
    /// Sockets open to the network that the box's definition does not declare.
    #[serde(default)]
    pub undeclared_listeners: Vec<String>,
    /// The running slot's verified root met a block that did not verify.
    #[serde(default)]
    pub root_corrupt: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OsStatus {
    pub version: String,
    pub slot: String,
}

/// The files init keeps that the box reports; a missing or unreadable one is left out.
#[derive(Debug, Clone)]
pub struct OsFiles {
    pub boot: PathBuf,
    pub update: PathBuf,
    pub health: PathBuf,
}

/// The running OS from init's boot record (`boot_file`).
pub(crate) fn read_os(boot_file: &Path) -> Option<OsStatus> {
    small_json(boot_file).and_then(|v| serde_json::from_value(v).ok())
}

/// A small JSON file init writes; anything larger is not its.
fn small_json(p: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(p).ok().filter(|b| b.len() <= 64 << 10)?;
    serde_json::from_slice(&bytes).ok()
}

impl OsFiles {
    /// The running OS: written once per boot, so read once per session.
    pub(crate) fn os(&self) -> Option<OsStatus> {
        read_os(&self.boot)
    }

    /// The update state, which changes while the box runs.
    pub(crate) fn update(&self) -> Option<serde_json::Value> {
        small_json(&self.update)
    }

    /// init's health, which changes while the box runs.
    pub(crate) fn health(&self) -> Option<Health> {
        small_json(&self.health).and_then(|v| serde_json::from_value(v).ok())
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ClassStatus {
    pub class: String,
    /// The newest record's offset in the class (offsets are shared by all classes).
    pub last_offset: Option<u64>,
    /// The highest offset the core has acked.
    pub acked: Option<u64>,
    pub lag_records: u64,
    pub lag_bytes: u64,
    pub dropped_records: u64,
    /// What the uplink said when the core held a record of ours this log does not (a log
    /// restored from a backup), since fabricd started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged: Option<String>,
}

fn box_status(log: &Log, names: &[String], status: &Status) -> BoxStatus {
    let diverged = lock(&status.diverged).clone();
    let (next, dropped): (Vec<_>, Vec<_>) = {
        let meta = log.meta();
        meta.classes
            .iter()
            .map(|c| {
                let last = c.segments.iter().rev().find_map(|s| s.last);
                ((last, c.acked), c.stats.dropped_records)
            })
            .unzip()
    };
    BoxStatus {
        time_ms: edge_common::unix_ms(),
        version: env!("CARGO_PKG_VERSION").into(),
        boot: None,
        os: None,
        update: None,
        downlink: None,
        health: None,
        classes: names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let (lag_records, lag_bytes) = log.lag(i).unwrap_or((0, 0));
                ClassStatus {
                    class: name.clone(),
                    last_offset: next[i].0,
                    acked: next[i].1,
                    lag_records,
                    lag_bytes,
                    dropped_records: dropped[i],
                    diverged: diverged.get(name).cloned(),
                }
            })
            .collect(),
    }
}

/// Reports the box's lag every `core.status_interval_secs`, with its latest boot report
/// (renewed every `core.quote_interval_secs`) once it is enrolled, for as long as the
/// session lasts. A report the core refuses (no status bucket, say) is logged, not
/// fatal: records matter more.
#[allow(clippy::too_many_arguments)]
async fn report_status(
    log: Log,
    names: Vec<String>,
    js: jetstream::Context,
    subject: String,
    core: CoreConfig,
    os_files: OsFiles,
    downlink: Arc<crate::downlink::Status>,
    status: Arc<Status>,
) -> Result<()> {
    let mut warned = false;
    let mut boot = crate::enrollment::BootReports::new(&core);
    let os = os_files.os();
    loop {
        let mut report = box_status(&log, &names, &status);
        report.boot = boot.latest().await;
        report.os = os.clone();
        report.update = os_files.update();
        report.health = os_files.health();
        report.downlink = Some(downlink.report());
        let body = serde_json::to_vec(&report).unwrap_or_default();
        let sent = match js.publish(subject.clone(), body.into()).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| chain(&e)),
            Err(e) => Err(chain(&e)),
        };
        match sent {
            Ok(()) => warned = false,
            Err(e) if !warned => {
                tracing::warn!(%subject, "the core did not take the status report: {e}");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(core.status_interval_secs)).await;
    }
}

/// Where one class's records go and how they are sent.
struct Naming {
    subject_prefix: String,
    id_prefix: String,
    compress_min: usize,
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
    naming: Naming,
    window: usize,
    class: usize,
    acked_file: PathBuf,
    acked: Option<u64>,
    status: Arc<Status>,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<(u64, usize, usize, AckFuture)>(window);
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
            let Some((offset, bytes, wire, fut)) = next else {
                return Ok::<(), Error>(());
            };
            let ack = fut.await.map_err(|e| Error::Core {
                op: format!("the core did not take record {offset}"),
                detail: chain(&e),
            })?;
            if ack.duplicate {
                acker_status.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            acker_status
                .published_records
                .fetch_add(1, Ordering::Relaxed);
            acker_status
                .published_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
            acker_status
                .wire_bytes
                .fetch_add(wire as u64, Ordering::Relaxed);
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
            .map_err(|source| Error::Task {
                what: "log reader failed",
                source,
            })?;
            cursor = Some(cur);
            let batch = batch.map_err(Error::ReadLog)?;
            if batch.is_empty() {
                let _ = committed.changed().await;
                continue;
            }
            for mut s in batch {
                let subject = format!("{}{}", naming.subject_prefix, s.record.topic);
                let mut headers = headers_of(&s, &naming.id_prefix);
                let bytes = s.record.value.len();
                let (payload, compressed) =
                    encode(std::mem::take(&mut s.record.value), naming.compress_min);
                if compressed {
                    headers.insert("Fabric-Encoding", "zstd");
                    status.compressed_records.fetch_add(1, Ordering::Relaxed);
                }
                let wire = payload.len();
                let fut = js
                    .publish_with_headers(subject, headers, bytes::Bytes::from(payload))
                    .await
                    .map_err(|e| Error::Core {
                        op: format!("failed to publish record {}", s.offset),
                        detail: chain(&e),
                    })?;
                let fut: AckFuture = Box::pin(std::future::IntoFuture::into_future(fut));
                if tx.send((s.offset, bytes, wire, fut)).await.is_err() {
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
) -> Result<()> {
    if let Some(c) = current {
        store_acked(path, c).map_err(Error::io("write", path))?;
    }
    *stored = current;
    *last = Instant::now();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_compressed_only_where_it_pays() {
        let small = b"21.5".to_vec();
        assert_eq!(encode(small.clone(), 512), (small, false));
        let json = br#"{"sensor":"temp","value":21.5}"#.repeat(40);
        let (wire, compressed) = encode(json.clone(), 512);
        assert!(compressed && wire.len() < json.len() / 4, "{}", wire.len());
        assert_eq!(decode(&wire, Some("zstd"), 1 << 20).unwrap(), json);
        // Bytes that do not compress (here a xorshift sequence) go as they are.
        let mut x = 1u32;
        let noise: Vec<u8> = (0..2048)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert_eq!(encode(noise.clone(), 512), (noise, false));
        assert_eq!(encode(json.clone(), 0), (json, false));
    }

    #[test]
    fn bad_payloads_are_named_errors() {
        assert!(decode(b"not zstd", Some("zstd"), 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("bad zstd payload"));
        assert!(decode(b"x", Some("lz4"), 1 << 20)
            .unwrap_err()
            .to_string()
            .contains("unknown Fabric-Encoding `lz4`"));
        // A small frame that would expand past the limit is refused, not allocated.
        let (bomb, _) = encode(vec![0u8; 1 << 20], 512);
        assert!(decode(&bomb, Some("zstd"), 4096).is_err());
    }

    #[test]
    fn message_ids_name_the_offset_and_the_records_crc() {
        let s = Stored {
            offset: 42,
            crc: 0x00ab_cdef,
            record: crate::record::Record {
                topic: "t".into(),
                key: None,
                headers: vec![],
                timestamp_ms: 0,
                value: vec![],
            },
        };
        let id = message_id("s1/m1/", &s);
        assert_eq!(id, "s1/m1/42.00abcdef");
        assert_eq!(
            parse_message_id(&id),
            Some(("s1/m1/", 42, Some(0x00ab_cdef)))
        );
        // Ids of earlier versions name the offset alone.
        assert_eq!(parse_message_id("s1/m1/42"), Some(("s1/m1/", 42, None)));
        for bad in [
            "s1/m1/x",
            "s1/m1/",
            "s1/m1/42.abc",
            "s1/m1/42.0000000g",
            "42",
            "s1/m1/+4",
        ] {
            assert_eq!(parse_message_id(bad), None, "{bad}");
        }
    }
}
