//! The start and stop of every edge daemon, so that `storaged`, `fabricd` and `noded`
//! behave alike under init: the same flags, config errors that name the file and key,
//! logs on stderr (init adds the timestamps), readiness through `NOTIFY_FD`, and a clean
//! stop on SIGTERM.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

pub mod backoff;
pub mod cri_log;
pub use backoff::Backoff;
pub use edge_metrics as metrics;
pub mod signed;

/// Flags every daemon takes.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to read config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad config {path}: {message}")]
    ParseConfig { path: PathBuf, message: String },
    #[error("bad config {path}: key `{key}`: {message}")]
    InvalidConfig {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("bad log level `{0}`: expected error, warn, info, debug or trace")]
    LogLevel(String),
    #[error("NOTIFY_FD is `{0}`, not a file descriptor number")]
    NotifyFd(String),
    #[error("failed to report readiness on NOTIFY_FD: {0}")]
    Notify(std::io::Error),
    #[error("failed to prepare directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to handle {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
}

/// A config type says which of its values are out of range; `key` names the TOML key.
pub trait Validate {
    fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}

/// For [`Validate`]: every path given (keyed by its TOML key) must be absolute, since a
/// daemon started by init has no meaningful working directory. `None` is a key left out.
pub fn require_absolute(paths: &[(&str, Option<&Path>)]) -> Result<(), (String, String)> {
    match paths
        .iter()
        .find_map(|(key, p)| p.filter(|p| !p.is_absolute()).map(|p| (key, p)))
    {
        Some((key, p)) => Err((
            key.to_string(),
            format!("{} is not an absolute path", p.display()),
        )),
        None => Ok(()),
    }
}

/// Reads and validates a daemon's TOML config. Unknown keys are errors (a typo must not
/// silently fall back to a default); the message names the file, line and key.
pub fn load_config<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
        path: path.to_owned(),
        source,
    })?;
    let config: T = toml::from_str(&text).map_err(|e| Error::ParseConfig {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', " "),
    })?;
    config
        .validate()
        .map_err(|(key, message)| Error::InvalidConfig {
            path: path.to_owned(),
            key,
            message,
        })?;
    Ok(config)
}

/// Logs go to stderr without timestamps: init stamps every line it captures.
pub fn init_logging(level: &str) -> Result<(), Error> {
    let level: tracing::Level = level.parse().map_err(|_| Error::LogLevel(level.into()))?;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    Ok(())
}

/// The pipe to the supervisor (`NOTIFY_FD`, docs/services.md): `READY=1` once the daemon
/// serves, then, for a service with a `health` in services.toml, `HEALTHY=1` once what
/// it is there for works (a trial boot of an update is blessed only then). Without
/// `NOTIFY_FD` (started by hand) both do nothing.
pub struct Notifier {
    pipe: Option<std::fs::File>,
}

impl Notifier {
    /// Takes `NOTIFY_FD` from the environment: once per process.
    pub fn take() -> Result<Notifier, Error> {
        let Ok(value) = std::env::var("NOTIFY_FD") else {
            return Ok(Notifier { pipe: None });
        };
        let fd: i32 = value.parse().map_err(|_| Error::NotifyFd(value.clone()))?;
        if fd < 3 {
            return Err(Error::NotifyFd(value));
        }
        // SAFETY: init passes this descriptor for our sole use and we take it exactly
        // once (the variable is removed below).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        std::env::remove_var("NOTIFY_FD");
        Ok(Notifier {
            pipe: Some(std::fs::File::from(owned)),
        })
    }

    fn say(&mut self, line: &[u8]) -> Result<(), Error> {
        match &mut self.pipe {
            Some(f) => f.write_all(line).map_err(Error::Notify),
            None => Ok(()),
        }
    }

    /// The daemon serves.
    pub fn ready(&mut self) -> Result<(), Error> {
        self.say(b"READY=1\n")
    }

    /// What the daemon is there for works; the pipe closes (nothing more is said).
    pub fn healthy(mut self) -> Result<(), Error> {
        self.say(b"HEALTHY=1\n")
    }
}

/// Tells the supervisor the daemon serves, and closes the pipe: for a daemon that has
/// no `health` to report.
pub fn notify_ready() -> Result<(), Error> {
    Notifier::take()?.ready()
}

/// Writes `bytes` to `path` whole or not at all, even across a power cut: a dot-named
/// temporary file beside it (created with `mode`), fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A mutex's guard, also when another thread panicked holding it: the daemons' shared
/// state is updated a statement at a time, and what it holds is still the best there is.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The median of a bench's figures (the upper middle one of an even count; 0 for none):
/// a run's figure where single measurements swing with the host.
pub fn median(figures: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = figures.into_iter().collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Creates a daemon's state directory (on the data partition in the appliance).
pub fn ensure_dir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::Dir {
        path: path.to_owned(),
        source,
    })
}

/// Installs the stop signals (SIGTERM from init, SIGINT by hand) at once, so a stop that
/// arrives right after readiness is seen, and returns a future that resolves when one
/// comes. Must be called inside a tokio runtime.
pub fn stop_signals() -> Result<impl std::future::Future<Output = &'static str>, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let handle = |kind, name| {
        signal(kind).map_err(|source| Error::Signal {
            signal: name,
            source,
        })
    };
    let mut term = handle(SignalKind::terminate(), "SIGTERM")?;
    let mut int = handle(SignalKind::interrupt(), "SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// A test whose precondition on the host (a program such as veritysetup or sfdisk, loop
/// devices) is missing. Under `cargo xtask test`, which installs them and sets
/// `EDGEOS_TEST_HOST=required`, that is a failure, never a quiet pass; in a bare
/// `cargo test` on another machine it is said, and the test returns.
pub fn precondition_missing(what: &str) {
    if std::env::var("EDGEOS_TEST_HOST").is_ok_and(|v| v == "required") {
        panic!("test precondition missing on this host: {what} (cargo xtask test installs it)");
    }
    eprintln!("SKIPPED: test precondition missing on this host: {what}");
}

/// The life of a daemon: parse the common flags, load the config, start logging, run
/// `serve` on a tokio runtime until it ends or a stop is requested. `serve` calls
/// [`notify_ready`] once it is serving; SIGTERM is handled from before its first poll.
/// Its error, of any type that displays, is logged and gives exit status 1, so init's
/// restart policy sees a failure.
pub fn run<C, F, Fut, E>(name: &'static str, serve: F) -> std::process::ExitCode
where
    C: DeserializeOwned + Validate,
    F: FnOnce(C) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }
    let cli = Cli::parse();
    let started = (|| {
        init_logging(&cli.common.log_level)?;
        load_config::<C>(&cli.common.config)
    })();
    let config = match started {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: failed to start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // Before `serve` runs: it reports ready, and init may stop us the moment after.
        let stop = match stop_signals() {
            Ok(s) => s,
            Err(e) => return Err(e.to_string()),
        };
        tokio::select! {
            r = serve(config) => r.map_err(|e| e.to_string()),
            sig = stop => {
                tracing::info!(signal = sig, "stopping");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves Prometheus text: `GET /metrics` answers what `render` returns, anything else
/// is 404. One request per connection, each on its own task; a failed accept is retried.
pub async fn serve_metrics<F, Fut>(listener: tokio::net::TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _ = answer_metrics(stream, render).await;
        });
    }
}

async fn answer_metrics<F, Fut>(mut stream: tokio::net::TcpStream, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let ok = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?");
    let (status, body) = if ok {
        ("200 OK", render().await)
    } else {
        ("404 Not Found", "GET /metrics\n".to_string())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        metrics::CONTENT_TYPE,
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Conf {
        dir: PathBuf,
        #[serde(default)]
        limit: u32,
    }
    impl Validate for Conf {
        fn validate(&self) -> Result<(), (String, String)> {
            if self.limit > 10 {
                return Err(("limit".into(), format!("{} is more than 10", self.limit)));
            }
            Ok(())
        }
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn config_loads_typed_values() {
        let f = write("dir = \"/var/lib/x\"\nlimit = 3\n");
        let c: Conf = load_config(f.path()).unwrap();
        assert_eq!(c.dir, PathBuf::from("/var/lib/x"));
        assert_eq!(c.limit, 3);
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let f = write("dir = \"/x\"\nlimt = 3\n");
        let e = load_config::<Conf>(f.path()).unwrap_err().to_string();
        assert!(e.contains(&f.path().display().to_string()), "{e}");
        assert!(e.contains("limt"), "{e}");
    }

    #[test]
    fn out_of_range_value_names_the_key() {
        let f = write("dir = \"/x\"\nlimit = 30\n");
        let e = load_config::<Conf>(f.path()).unwrap_err().to_string();
        assert!(e.contains("key `limit`"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = load_config::<Conf>(Path::new("/nonexistent/x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
    }

    #[test]
    fn relative_paths_are_named_by_key() {
        let ok = require_absolute(&[("a", Some(Path::new("/x"))), ("b", None)]);
        assert_eq!(ok, Ok(()));
        let bad = require_absolute(&[("a", Some(Path::new("/x"))), ("b", Some(Path::new("y")))]);
        assert_eq!(
            bad,
            Err(("b".to_string(), "y is not an absolute path".to_string()))
        );
    }

    #[test]
    fn bad_log_level_is_refused() {
        assert!(matches!(init_logging("loud"), Err(Error::LogLevel(_))));
    }
}

/// Lowercase hex, the form digests and keys take in our files and on the wire.
pub mod hex {
    pub fn encode(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Hex digits (either case, even count) to bytes; None for anything else.
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
            .collect()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips_and_refuses_what_is_not_hex() {
            assert_eq!(super::encode(&[0, 0xab, 0x10]), "00ab10");
            assert_eq!(super::decode("00AB10"), Some(vec![0, 0xab, 0x10]));
            assert_eq!(super::decode("abc"), None);
            assert_eq!(super::decode("zz"), None);
            assert_eq!(super::decode("+1"), None);
        }
    }
}
