//! fabricd's configuration: identity, where the log lives, its quota and topic classes,
//! the produce listeners and the (optional) core. Validated at load so that a bad value
//! is reported with the file and key by `edge_common`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::record::check_topic;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Site (data center) name: a token of every subject.
    pub site: String,
    /// Machine name within the site.
    pub machine: String,
    /// Where the local log's segments live (on the data partition).
    pub log_dir: PathBuf,
    /// Bytes all classes together may hold on disk.
    #[serde(default = "default_quota")]
    pub quota_bytes: u64,
    /// A segment is sealed and a new one started past this size.
    #[serde(default = "default_segment")]
    pub segment_bytes: u64,
    /// Largest record (topic, key, headers and value together) a producer may send.
    #[serde(default = "default_max_record")]
    pub max_record_bytes: usize,
    /// Bytes per second one producer (a connection's identity: its IP, or its program
    /// and uid on the unix socket) may send, with a second's worth as burst; 0: no limit.
    /// So that one noisy pod cannot fill the log ahead of the others' alarms.
    #[serde(default)]
    pub producer_bytes_per_sec: u64,
    /// Unix socket for the framed produce protocol.
    pub unix_socket: Option<PathBuf>,
    /// Where noded makes each pod's directory (`<namespace>_<name>_<uid>/`); fabricd
    /// listens on `produce.sock` in each and stamps the pod's records with its name
    /// (pod_channels.rs).
    pub pod_channels: Option<PathBuf>,
    /// TCP address for the framed produce protocol (the pod network).
    pub tcp_listen: Option<SocketAddr>,
    /// TCP address for `POST /topics/<topic>`.
    pub http_listen: Option<SocketAddr>,
    /// Client certificates for `tcp_listen` and `http_listen`: required when either
    /// listens on an address that is not loopback (other machines on the site network).
    pub lan_tls: Option<LanTlsConfig>,
    /// TCP address for Prometheus `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Topic classes, matched in order; a topic no class matches is refused.
    #[serde(rename = "class", default = "default_classes")]
    pub classes: Vec<ClassConfig>,
    /// The core's JetStream; without it records are kept locally only.
    pub core: Option<CoreConfig>,
    /// A file holding the `[core]` table, read at start if it exists: the core's
    /// address and this box's TLS identity are site provisioning, not image content.
    pub core_file: Option<PathBuf>,
    /// What the core sends to this edge (needs `[core]`).
    pub downlink: Option<DownlinkConfig>,
    /// init's record of this boot (`version`, `slot`), reported to the core as `os`.
    #[serde(default = "default_boot_file")]
    pub boot_file: PathBuf,
    /// init's update state (docs/update.md), reported to the core as `update`.
    #[serde(default = "default_update_state")]
    pub update_state: PathBuf,
    /// init's health file (docs/contracts.md), reported to the core as `health`.
    #[serde(default = "default_health_file")]
    pub health_file: PathBuf,
    /// The box's own `/metrics` endpoints, scraped and sent to the core as records
    /// (scrape.rs).
    pub scrape: Option<ScrapeConfig>,
    /// The box's log files, followed and sent to the core as records (logs.rs).
    pub logs: Option<LogsConfig>,
}

/// `[logs]`: the services' and the containers' log files fabricd follows.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// init's service logs (`<service>.log`, rotated to `.log.1`).
    pub services_dir: Option<PathBuf>,
    /// The containers' CRI logs (`<namespace>_<pod>_<uid>/<container>/<attempt>.log`).
    pub pods_dir: Option<PathBuf>,
    /// Milliseconds between two looks at the files.
    #[serde(default = "default_logs_interval")]
    pub interval_ms: u64,
    /// Most bytes of one file in one record.
    #[serde(default = "default_logs_batch")]
    pub max_batch_bytes: usize,
}

fn default_logs_interval() -> u64 {
    1000
}
fn default_logs_batch() -> usize {
    64 << 10
}

/// `[scrape]`: which of the box's endpoints fabricd scrapes, how often, and the topic
/// each scrape goes to (`<topic>.<job>`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeConfig {
    /// Seconds between two scrapes of every target.
    #[serde(default = "default_scrape_interval")]
    pub interval_secs: u64,
    /// The topic's first tokens; the job's name follows.
    #[serde(default = "default_scrape_topic")]
    pub topic: String,
    /// Job name to the address of its `GET /metrics` (loopback).
    #[serde(default)]
    pub targets: std::collections::BTreeMap<String, SocketAddr>,
    /// Job name to a file holding its exposition, rewritten by its program (init's
    /// `/run/edge/metrics/init.prom`); one not rewritten for 60 s is a failed scrape.
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, PathBuf>,
}

fn default_scrape_interval() -> u64 {
    15
}
fn default_scrape_topic() -> String {
    "metrics".into()
}

fn default_boot_file() -> PathBuf {
    "/run/edge/boot.json".into()
}
fn default_update_state() -> PathBuf {
    "/var/lib/edge/update/state.json".into()
}
fn default_health_file() -> PathBuf {
    "/run/edge/health.json".into()
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkConfig {
    /// The core's ed25519 public key (64 hex digits), shipped with the image.
    pub public_key: PathBuf,
    /// Verified items go to `<dir>/<kind>/<name>`.
    pub dir: PathBuf,
    /// KV bucket holding manifests and small items.
    #[serde(default = "default_bucket")]
    pub bucket: String,
    /// Object store holding large items.
    #[serde(default = "default_objects")]
    pub objects: String,
    /// Caps object downloads (KiB/s) so a model or bundle does not starve the uplink on
    /// a thin link; none by default.
    pub max_kib_per_sec: Option<u64>,
    /// How often the box asks the core for its manifests (seconds, at least 1).
    #[serde(default = "default_poll_secs")]
    pub poll_secs: u64,
}

fn default_poll_secs() -> u64 {
    5
}

fn default_bucket() -> String {
    "edge-config".into()
}
fn default_objects() -> String {
    "edge-objects".into()
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    pub name: String,
    /// Topic patterns: dot-separated tokens, `*` matches one token, a final `>` the rest.
    pub topics: Vec<String>,
    /// When the quota is reached, classes of lower priority give up space first.
    #[serde(default)]
    pub priority: u8,
    /// Oldest segments beyond this size are deleted.
    pub max_bytes: Option<u64>,
    /// Segments older than this are deleted.
    pub max_age_secs: Option<u64>,
    /// What a producer of this class sees when the quota is full.
    #[serde(default)]
    pub when_full: WhenFull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// The producer is answered "full" and keeps its record.
    #[default]
    Backpressure,
    /// The class's oldest records are deleted (and counted) to make room.
    DropOldest,
}

/// TLS on the site-network listeners (lan.rs): fabricd's certificate and key, and the
/// CA whose client certificates it takes; a producer is named by its certificate's CN.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreConfig {
    /// NATS URL(s) of the core, e.g. `tls://core.example:4222`.
    pub servers: Vec<String>,
    /// First token of every subject.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The core's stream of records (`edgectl setup --stream`), asked at each session
    /// what it already holds of this box's records (resume.rs).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// CA that signed the core's certificate (PEM).
    pub ca: PathBuf,
    /// Our client certificate (PEM) and key: a PEM file, or a site key made in the TPM
    /// (`edge-tpm site-key create`'s file); the core requires them.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The program that signs with a TPM key (`edge-tpm`, on the verified root).
    #[serde(default = "default_tpm_program")]
    pub tpm_program: PathBuf,
    /// A box not enrolled yet: while `cert` does not exist, fabricd makes the site key in
    /// the TPM at `key` and asks the core for its certificate with this enrollment
    /// certificate (enrollment.rs).
    pub enroll: Option<EnrollConfig>,
    /// Publishes awaiting the core's ack at once, per class.
    #[serde(default = "default_window")]
    pub window: usize,
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
    /// The core stream's duplicate window (`edgectl setup --dupe-window-secs`): a record
    /// resent within it is dropped at the core, so a session that follows one which
    /// ended well inside it resends every unacked record (resume.rs).
    #[serde(default = "default_dupe_window")]
    pub dupe_window_secs: u64,
    /// Longest pause between reconnect attempts.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Values at least this long are sent zstd-compressed when that saves an eighth or
    /// more; 0 sends every value as it is.
    #[serde(default = "default_compress_min")]
    pub compress_min_bytes: usize,
    /// How often the box puts its status (lag, acked offset) into the core's KV bucket
    /// `status_bucket` under `<site>.<machine>`; 0 sends no reports.
    #[serde(default = "default_status_interval")]
    pub status_interval_secs: u64,
    #[serde(default = "default_status_bucket")]
    pub status_bucket: String,
    /// How often an enrolled box quotes its boot for its status reports; 0 never does.
    #[serde(default = "default_quote_interval")]
    pub quote_interval_secs: u64,
}

/// The site's enrollment certificate and its key (PEM), provisioned: it may only ask the
/// core to enroll the box.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The data partition's recovery key, which init keeps there on the first boot
    /// (`/var/lib/edge/identity/recovery-key`): sent to the core encrypted to its escrow
    /// key when it asks for it, then removed.
    pub recovery_key: Option<PathBuf>,
}

fn default_dupe_window() -> u64 {
    600
}
fn default_quote_interval() -> u64 {
    300
}
fn default_quota() -> u64 {
    1 << 30
}
fn default_segment() -> u64 {
    64 << 20
}
fn default_max_record() -> usize {
    1 << 20
}
fn default_tpm_program() -> PathBuf {
    "/usr/bin/edge-tpm".into()
}
fn default_prefix() -> String {
    "edge".into()
}
fn default_stream() -> String {
    "EDGE".into()
}
fn default_window() -> usize {
    512
}
fn default_ack_timeout() -> u64 {
    30_000
}
fn default_backoff_max() -> u64 {
    30_000
}
fn default_compress_min() -> usize {
    512
}
fn default_status_interval() -> u64 {
    10
}
fn default_status_bucket() -> String {
    "edge-status".into()
}
fn default_classes() -> Vec<ClassConfig> {
    vec![ClassConfig {
        name: "default".into(),
        topics: vec![">".into()],
        priority: 0,
        max_bytes: None,
        max_age_secs: None,
        when_full: WhenFull::Backpressure,
    }]
}

impl CoreConfig {
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    pub fn dupe_window(&self) -> Duration {
        Duration::from_secs(self.dupe_window_secs)
    }
}

/// Letters, digits, `-` and `_`: a subject token (a site or machine name).
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Does `topic` match `pattern` (`*` one token, final `>` one or more tokens)?
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut t = topic.split('.');
    for p in pattern.split('.') {
        if p == ">" {
            return t.next().is_some();
        }
        match t.next() {
            Some(tok) if p == "*" || p == tok => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// A topic pattern's tokens: letters, digits, '-', '_', '*' or a final '>'.
fn is_pattern(p: &str) -> bool {
    let tokens: Vec<&str> = p.split('.').collect();
    tokens
        .iter()
        .enumerate()
        .all(|(i, tok)| *tok == "*" || (*tok == ">" && i == tokens.len() - 1) || is_token(tok))
}

impl Config {
    /// Index of the class that takes `topic`.
    pub fn class_of(&self, topic: &str) -> Option<usize> {
        self.classes
            .iter()
            .position(|c| c.topics.iter().any(|p| topic_matches(p, topic)))
    }
}

fn check_scrape(config: &Config, sc: &ScrapeConfig) -> Result<(), (String, String)> {
    if sc.interval_secs == 0 || sc.interval_secs > 3600 {
        return Err((
            "scrape.interval_secs".into(),
            "must be between 1 and 3600".into(),
        ));
    }
    for (job, path) in &sc.files {
        let key = format!("scrape.files.{job}");
        check_token(&key, job)?;
        edge_common::require_absolute(&[(key.as_str(), Some(path))])?;
        if sc.targets.contains_key(job) {
            return Err((key, format!("job {job} is also in scrape.targets")));
        }
        check_scrape_topic(config, sc, job)?;
    }
    for (job, addr) in &sc.targets {
        check_token(&format!("scrape.targets.{job}"), job)?;
        if !addr.ip().is_loopback() {
            return Err((
                format!("scrape.targets.{job}"),
                format!("{addr} is not on loopback: fabricd scrapes the box's own endpoints"),
            ));
        }
        check_scrape_topic(config, sc, job)?;
    }
    Ok(())
}

/// The topic of job `job`'s scrapes is one, and a class takes it.
fn check_scrape_topic(
    config: &Config,
    sc: &ScrapeConfig,
    job: &str,
) -> Result<(), (String, String)> {
    let topic = format!("{}.{job}", sc.topic);
    if check_topic(&topic).is_err() {
        return Err((
            "scrape.topic".into(),
            format!("`{topic}` is not a topic (dot-separated tokens)"),
        ));
    }
    if config.class_of(&topic).is_none() {
        return Err((
            "scrape.topic".into(),
            format!("no class takes topic `{topic}`: add it to a class's topics"),
        ));
    }
    Ok(())
}

fn check_logs(config: &Config, l: &LogsConfig) -> Result<(), (String, String)> {
    edge_common::require_absolute(&[
        ("logs.services_dir", l.services_dir.as_deref()),
        ("logs.pods_dir", l.pods_dir.as_deref()),
    ])?;
    if l.interval_ms < 100 || l.interval_ms > 60_000 {
        return Err((
            "logs.interval_ms".into(),
            "must be between 100 and 60000".into(),
        ));
    }
    if l.max_batch_bytes < 1024 || l.max_batch_bytes > config.max_record_bytes / 2 {
        return Err((
            "logs.max_batch_bytes".into(),
            format!(
                "must be between 1024 and half of max_record_bytes ({})",
                config.max_record_bytes / 2
            ),
        ));
    }
    for topic in ["logs.service.x", "logs.pod.x.x.x"] {
        if config.class_of(topic).is_none() {
            return Err((
                "logs".into(),
                format!("no class takes topic `{topic}`: add `logs.>` to a class's topics"),
            ));
        }
    }
    Ok(())
}

fn check_core(core: &CoreConfig) -> Result<(), (String, String)> {
    if core.servers.is_empty() {
        return Err(("core.servers".into(), "at least one URL is needed".into()));
    }
    if check_topic(&core.prefix).is_err() {
        return Err((
            "core.prefix".into(),
            format!("`{}` must be dot-separated subject tokens", core.prefix),
        ));
    }
    // A stream name is one subject token (it goes into the API subjects).
    if core.stream.is_empty()
        || !core
            .stream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err((
            "core.stream".into(),
            format!("`{}` must be letters, digits, - and _", core.stream),
        ));
    }
    if core.window == 0 || core.window > 65536 {
        return Err(("core.window".into(), "must be between 1 and 65536".into()));
    }
    edge_common::require_absolute(&[
        ("core.ca", Some(&core.ca)),
        ("core.cert", Some(&core.cert)),
        ("core.key", Some(&core.key)),
        (
            "core.enroll.cert",
            core.enroll.as_ref().map(|e| e.cert.as_path()),
        ),
        (
            "core.enroll.key",
            core.enroll.as_ref().map(|e| e.key.as_path()),
        ),
        (
            "core.enroll.recovery_key",
            core.enroll.as_ref().and_then(|e| e.recovery_key.as_deref()),
        ),
    ])
}

/// The provisioned core file: the `[core]` table, and the site's and the machine's
/// names when the provisioning gives them (the image's `site` and `machine` are only
/// defaults: one image serves every site).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreFile {
    pub site: Option<String>,
    pub machine: Option<String>,
    /// The site link's pace for downloads from the core (KiB/s): replaces the image's
    /// `[downlink] max_kib_per_sec`, since a link's width is the site's.
    pub downlink_max_kib_per_sec: Option<u64>,
    pub core: CoreConfig,
}

impl edge_common::Validate for CoreFile {
    fn validate(&self) -> Result<(), (String, String)> {
        for (key, name) in [("site", &self.site), ("machine", &self.machine)] {
            if let Some(token) = name {
                check_token(key, token)?;
            }
        }
        check_core(&self.core)
    }
}

/// Reads the provisioned core file from `path`: None when the box has none (no file).
pub fn load_core_file(path: &std::path::Path) -> crate::Result<Option<CoreFile>> {
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(edge_common::load_config::<CoreFile>(path)?))
}

fn check_token(key: &str, token: &str) -> Result<(), (String, String)> {
    if !is_token(token) {
        return Err((
            key.into(),
            format!("`{token}` must be non-empty letters, digits, '-' or '_' (it becomes a subject token)"),
        ));
    }
    Ok(())
}

impl edge_common::Validate for Config {
    fn validate(&self) -> Result<(), (String, String)> {
        for (key, token) in [("site", &self.site), ("machine", &self.machine)] {
            check_token(key, token)?;
        }
        edge_common::require_absolute(&[
            ("log_dir", Some(&self.log_dir)),
            ("unix_socket", self.unix_socket.as_deref()),
            ("pod_channels", self.pod_channels.as_deref()),
        ])?;
        for (key, addr) in [
            ("tcp_listen", self.tcp_listen),
            ("http_listen", self.http_listen),
        ] {
            if addr.is_some_and(|a| !a.ip().is_loopback()) && self.lan_tls.is_none() {
                return Err((
                    key.into(),
                    format!(
                        "{} takes producers from other machines: it needs [lan_tls] (the CA of their client certificates)",
                        addr.map(|a| a.to_string()).unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(t) = &self.lan_tls {
            edge_common::require_absolute(&[
                ("lan_tls.cert", Some(&t.cert)),
                ("lan_tls.key", Some(&t.key)),
                ("lan_tls.client_ca", Some(&t.client_ca)),
            ])?;
        }
        if let Some(sc) = &self.scrape {
            check_scrape(self, sc)?;
        }
        if let Some(l) = &self.logs {
            check_logs(self, l)?;
        }
        if self.segment_bytes < 4096 || self.segment_bytes > u32::MAX as u64 {
            return Err((
                "segment_bytes".into(),
                "must be between 4096 and 4294967295 (index positions are 32-bit)".into(),
            ));
        }
        if self.quota_bytes < 2 * self.segment_bytes {
            return Err((
                "quota_bytes".into(),
                format!(
                    "{} is less than two segments ({} bytes)",
                    self.quota_bytes,
                    2 * self.segment_bytes
                ),
            ));
        }
        if self.max_record_bytes == 0 || self.max_record_bytes as u64 > self.segment_bytes / 2 {
            return Err((
                "max_record_bytes".into(),
                "must be between 1 and half of segment_bytes".into(),
            ));
        }
        if self.classes.is_empty() {
            return Err(("class".into(), "at least one class is needed".into()));
        }
        for (i, c) in self.classes.iter().enumerate() {
            let key = |k: &str| format!("class[{i}].{k}");
            if !is_token(&c.name) {
                return Err((
                    key("name"),
                    format!("`{}` must be letters, digits, '-' or '_'", c.name),
                ));
            }
            if self.classes[..i].iter().any(|o| o.name == c.name) {
                return Err((key("name"), format!("`{}` is used twice", c.name)));
            }
            if c.topics.is_empty() {
                return Err((key("topics"), "at least one pattern is needed".into()));
            }
            for p in &c.topics {
                if !is_pattern(p) {
                    return Err((
                        key("topics"),
                        format!(
                            "pattern `{p}`: tokens are letters, digits, '-', '_', '*' or a final '>'"
                        ),
                    ));
                }
            }
            if c.max_bytes.is_some_and(|b| b < self.segment_bytes) {
                return Err((key("max_bytes"), "must be at least segment_bytes".into()));
            }
        }
        if let Some(core) = &self.core {
            check_core(core)?;
        }
        if let Some(f) = &self.core_file {
            if self.core.is_some() {
                return Err(("core_file".into(), "give either [core] or core_file".into()));
            }
            edge_common::require_absolute(&[("core_file", Some(f))])?;
        }
        if let Some(d) = &self.downlink {
            if self.core.is_none() && self.core_file.is_none() {
                return Err((
                    "downlink".into(),
                    "needs a [core] (or core_file) to download from".into(),
                ));
            }
            edge_common::require_absolute(&[
                ("downlink.public_key", Some(&d.public_key)),
                ("downlink.dir", Some(&d.dir)),
            ])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_nats_subjects() {
        assert!(topic_matches(">", "a"));
        assert!(topic_matches(">", "a.b"));
        assert!(topic_matches("alarms.>", "alarms.door"));
        assert!(!topic_matches("alarms.>", "alarms"));
        assert!(topic_matches("temp.*", "temp.rack1"));
        assert!(!topic_matches("temp.*", "temp.rack1.x"));
        assert!(!topic_matches("temp", "temperature"));
    }

    #[test]
    fn appliance_config_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../image/overlay/etc/edge/fabricd.toml"
        );
        let c: Config = edge_common::load_config(std::path::Path::new(path)).unwrap();
        assert!(c.core.is_none(), "the image holds no site's core");
        assert_eq!(
            c.core_file.as_deref(),
            Some(std::path::Path::new(
                "/var/lib/edge/provision/fabricd-core.toml"
            ))
        );
        assert!(c.class_of("anything.at.all").is_some());
        assert!(
            c.lan_tls.is_some() && c.tcp_listen.is_none(),
            "the site network produces only over TLS, and the framed port is off"
        );
        assert!(c.pod_channels.is_some(), "each pod gets its own channel");
        // Every daemon's metrics go to the core, in a class below alarms and above the
        // rest of the telemetry.
        let scrape = c.scrape.as_ref().expect("[scrape]");
        let ports: Vec<u16> = scrape.targets.values().map(|a| a.port()).collect();
        assert_eq!(ports, vec![9401, 9403, 9402], "fabricd, noded, storaged");
        assert_eq!(
            scrape.files.get("init").map(|p| p.as_path()),
            Some(std::path::Path::new("/run/edge/metrics/init.prom"))
        );
        let class = |t: &str| &c.classes[c.class_of(t).unwrap()];
        let metrics = class("metrics.noded");
        assert_eq!(metrics.name, "metrics");
        assert!(class("alarms.x").priority > metrics.priority);
        assert!(metrics.priority > class("sensors.x").priority);
        assert_eq!(class("logs.service.noded").name, "metrics");
        let logs = c.logs.as_ref().expect("[logs]");
        assert_eq!(
            logs.services_dir.as_deref(),
            Some(std::path::Path::new("/var/log"))
        );
        assert_eq!(
            logs.pods_dir.as_deref(),
            Some(std::path::Path::new("/var/log/pods"))
        );
    }

    #[test]
    fn a_bad_scrape_table_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("fabricd.toml");
        let base = "site = \"s\"\nmachine = \"m\"\nlog_dir = \"/l\"\n";
        let load = |extra: &str| {
            std::fs::write(&f, format!("{base}{extra}")).unwrap();
            edge_common::load_config::<Config>(&f).map_err(|e| e.to_string())
        };
        let ok = load("[scrape]\ntargets = { fabricd = \"127.0.0.1:9401\" }\n").unwrap();
        let sc = ok.scrape.unwrap();
        assert_eq!((sc.interval_secs, sc.topic.as_str()), (15, "metrics"));
        for (table, key, why) in [
            (
                "interval_secs = 0\ntargets = {}",
                "scrape.interval_secs",
                "must be between 1 and 3600",
            ),
            (
                "targets = { x = \"10.0.0.1:9401\" }",
                "scrape.targets.x",
                "10.0.0.1:9401 is not on loopback",
            ),
            (
                "targets = { \"a.b\" = \"127.0.0.1:1\" }",
                "scrape.targets.a.b",
                "`a.b` must be non-empty letters",
            ),
            (
                "topic = \"m>\"\ntargets = { x = \"127.0.0.1:1\" }",
                "scrape.topic",
                "`m>.x` is not a topic",
            ),
        ] {
            let e = load(&format!("[scrape]\n{table}\n")).unwrap_err();
            assert!(e.contains(&format!("key `{key}`: {why}")), "{e}");
        }
        let e = load("[scrape]\ntargets = { x = \"127.0.0.1:1\" }\n[[class]]\nname = \"a\"\ntopics = [\"alarms.>\"]\npriority = 1\n")
            .unwrap_err();
        assert!(e.contains("no class takes topic `metrics.x`"), "{e}");
        for (table, key, why) in [
            (
                "services_dir = \"log\"",
                "logs.services_dir",
                "log is not an absolute path",
            ),
            (
                "interval_ms = 5",
                "logs.interval_ms",
                "must be between 100 and 60000",
            ),
            (
                "max_batch_bytes = 1048576",
                "logs.max_batch_bytes",
                "must be between 1024 and half of max_record_bytes (524288)",
            ),
        ] {
            let e = load(&format!("[logs]\n{table}\n")).unwrap_err();
            assert!(e.contains(&format!("key `{key}`: {why}")), "{e}");
        }
        let e = load("[scrape]\ntargets = { x = \"nowhere\" }\n").unwrap_err();
        assert!(
            e.contains("line 5") && e.contains("invalid socket address syntax"),
            "{e}"
        );
    }

    #[test]
    fn a_listener_other_machines_reach_needs_client_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("fabricd.toml");
        let base = "site = \"s\"\nmachine = \"m\"\nlog_dir = \"/l\"\n";
        let load = |extra: &str| {
            std::fs::write(&f, format!("{base}{extra}")).unwrap();
            edge_common::load_config::<Config>(&f).map_err(|e| e.to_string())
        };
        // Loopback is this box's own: no certificates needed.
        load("tcp_listen = \"127.0.0.1:7400\"\nhttp_listen = \"[::1]:7401\"\n").unwrap();
        for key in ["tcp_listen", "http_listen"] {
            let e = load(&format!("{key} = \"0.0.0.0:7400\"\n")).unwrap_err();
            assert!(
                e.contains(&format!(
                    "key `{key}`: 0.0.0.0:7400 takes producers from other machines: it needs [lan_tls]"
                )),
                "{e}"
            );
        }
        let e = load(
            "http_listen = \"0.0.0.0:7401\"\n[lan_tls]\ncert = \"c.pem\"\nkey = \"/k\"\nclient_ca = \"/ca\"\n",
        )
        .unwrap_err();
        assert!(e.contains("lan_tls.cert"), "{e}");
        load("http_listen = \"0.0.0.0:7401\"\n[lan_tls]\ncert = \"/c\"\nkey = \"/k\"\nclient_ca = \"/ca\"\n")
            .unwrap();
    }

    #[test]
    fn provisioned_core_file_is_read_when_present_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("fabricd-core.toml");
        assert!(load_core_file(&f).unwrap().is_none(), "no file, no core");
        std::fs::write(
            &f,
            "[core]\nservers = [\"tls://10.0.2.100:4222\"]\nca = \"/p/ca.pem\"\ncert = \"/p/c.pem\"\nkey = \"/p/c.key\"\n",
        )
        .unwrap();
        let file = load_core_file(&f).unwrap().unwrap();
        assert_eq!(file.core.servers, ["tls://10.0.2.100:4222"]);
        assert_eq!(file.core.prefix, "edge");
        assert_eq!(file.core.stream, "EDGE");
        assert_eq!((file.site, file.machine), (None, None));
        // The site's and the machine's names are provisioning too, checked as tokens.
        let named = |site: &str| {
            format!("site = \"{site}\"\nmachine = \"m7\"\n[core]\nservers = [\"tls://c:4222\"]\nca = \"/p/ca.pem\"\ncert = \"/p/c.pem\"\nkey = \"/p/c.key\"\n")
        };
        std::fs::write(&f, named("s9")).unwrap();
        let file = load_core_file(&f).unwrap().unwrap();
        assert_eq!(
            (file.site.as_deref(), file.machine.as_deref()),
            (Some("s9"), Some("m7"))
        );
        std::fs::write(&f, named("s9.>")).unwrap();
        let e = load_core_file(&f).unwrap_err().to_string();
        assert!(e.contains("site") && e.contains("s9.>"), "{e}");
        std::fs::write(
            &f,
            "[core]\nservers = []\nca = \"/p/ca.pem\"\ncert = \"/p/c.pem\"\nkey = \"/p/c.key\"\n",
        )
        .unwrap();
        let e = load_core_file(&f).unwrap_err().to_string();
        assert!(
            e.contains("core.servers") && e.contains("fabricd-core.toml"),
            "{e}"
        );
        // A box to be enrolled: the enrollment certificate, by absolute paths.
        let enroll = |cert: &str| {
            format!("[core]\nservers = [\"tls://c:4222\"]\nca = \"/p/ca.pem\"\ncert = \"/i/site.pem\"\nkey = \"/i/site-key.json\"\n[core.enroll]\ncert = \"{cert}\"\nkey = \"/p/enroll.key\"\n")
        };
        std::fs::write(&f, enroll("/p/enroll.pem")).unwrap();
        let core = load_core_file(&f).unwrap().unwrap().core;
        assert_eq!(
            core.enroll.unwrap().cert,
            std::path::Path::new("/p/enroll.pem")
        );
        assert_eq!(core.quote_interval_secs, 300);
        std::fs::write(&f, enroll("enroll.pem")).unwrap();
        let e = load_core_file(&f).unwrap_err().to_string();
        assert!(e.contains("core.enroll.cert"), "{e}");
    }
}
