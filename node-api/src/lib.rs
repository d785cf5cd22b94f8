//! noded's control protocol, typed, for both ends: noded serves it on its control
//! socket, init relays the console's `pods` and `logs` to it and the `noded pods` and
//! `noded logs` commands ask it. One JSON request per line, one JSON answer per line:
//! `{"op":"pods"}`, and
//! `{"op":"logs","pod":"[<ns>/]<name>","container":"<c>","previous":false,"tail":N}`
//! (container, previous and tail optional). Only serde here, so PID 1 links it cheaply.

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where noded serves it.
pub const SOCKET: &str = "/run/noded/noded.sock";

/// A request line.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Request {
    /// `pods` or `logs`; another is answered with an error naming it.
    pub op: String,
    #[serde(flatten)]
    pub logs: LogsRequest,
}

impl Request {
    pub fn pods() -> Request {
        Request {
            op: "pods".into(),
            logs: LogsRequest::default(),
        }
    }

    pub fn logs(logs: LogsRequest) -> Request {
        Request {
            op: "logs".into(),
            logs,
        }
    }
}

/// Which logs are wanted.
#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct LogsRequest {
    /// `<name>` or `<namespace>/<name>`.
    #[serde(default)]
    pub pod: String,
    /// May be left out when the pod has one app container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The attempt before the current one.
    #[serde(default)]
    pub previous: bool,
    /// Only the last N lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
}

/// The answer to a logs request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogsAnswer {
    pub lines: Vec<String>,
    /// Lines not in the CRI log format, left out.
    pub malformed: usize,
}

/// An answer line: the pods, the logs, or what was wrong.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<Vec<PodReport>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogsAnswer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `{"op":"pods"}` answers, one per manifest file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PodReport {
    pub file: String,
    pub name: String,
    pub namespace: String,
    /// The pod's uid (its manifest hash): names its log directory.
    #[serde(default)]
    pub uid: String,
    /// pending, initializing, running, succeeded, failed, invalid
    pub state: String,
    pub error: Option<String>,
    pub containers: Vec<ContainerReport>,
    /// Its own address on the pod network (CNI), once its sandbox has one; none for a
    /// pod on the host's network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Its last start was refused because an image is not on the allowlist (for the
    /// metrics; `error` says which).
    #[serde(skip)]
    pub image_refused: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ContainerReport {
    pub name: String,
    pub init: bool,
    /// waiting, running, back-off, exited, completed
    pub state: String,
    pub restarts: u32,
    pub exit_code: Option<i32>,
    pub last_error: Option<String>,
    /// Running and, if it has a readiness probe, passing it (after its startup probe).
    #[serde(default)]
    pub ready: bool,
}

impl PodReport {
    /// Running with every container ready, or run to completion.
    pub fn is_up(&self) -> bool {
        self.state == "succeeded"
            || (self.state == "running" && self.containers.iter().all(|c| c.init || c.ready))
    }
}

/// A blocking client: one connection per request, every read and write within
/// `timeout` of the connect, and an answer longer than `max_answer` bytes refused.
#[derive(Debug, Clone)]
pub struct Client<'a> {
    pub socket: &'a Path,
    pub timeout: Duration,
    pub max_answer: u64,
}

impl<'a> Client<'a> {
    /// A client of `socket` with a 30 s timeout and answers up to 256 MiB (a whole log
    /// without a tail can be large).
    pub fn new(socket: &'a Path) -> Self {
        Client {
            socket,
            timeout: Duration::from_secs(30),
            max_answer: 256 << 20,
        }
    }

    /// The pods noded runs; the error noded answered, or why there was no answer.
    pub fn pods(&self) -> Result<Vec<PodReport>, Error> {
        let answer = self.ask(&Request::pods())?;
        answer.pods.ok_or_else(|| refused(answer.error))
    }

    /// A container's logs, or the error noded answered.
    pub fn logs(&self, req: LogsRequest) -> Result<LogsAnswer, Error> {
        let answer = self.ask(&Request::logs(req))?;
        answer.logs.ok_or_else(|| refused(answer.error))
    }

    /// Sends one request and reads its answer line.
    pub fn ask(&self, req: &Request) -> Result<Answer, Error> {
        let deadline = Instant::now() + self.timeout;
        let socket = || self.socket.to_owned();
        let io = |op: &'static str| {
            move |source| Error::Io {
                op,
                socket: socket(),
                source,
            }
        };
        let s = UnixStream::connect(self.socket).map_err(io("connect to noded at"))?;
        s.set_write_timeout(Some(self.timeout))
            .and_then(|()| s.set_read_timeout(Some(self.timeout)))
            .map_err(io("configure the connection to"))?;
        let mut line = serde_json::to_vec(req).map_err(Error::Request)?;
        line.push(b'\n');
        (&s).write_all(&line).map_err(io("write to noded at"))?;
        let mut r = std::io::BufReader::new((&s).take(self.max_answer));
        let mut answer = Vec::new();
        let late = || Error::Late {
            socket: socket(),
            timeout: self.timeout,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(late());
            }
            let _ = s.set_read_timeout(Some(left));
            match r.read_until(b'\n', &mut answer) {
                Ok(_) if answer.ends_with(b"\n") => break,
                Ok(0) if answer.len() as u64 >= self.max_answer => {
                    return Err(Error::TooLong {
                        socket: socket(),
                        max: self.max_answer,
                    })
                }
                Ok(0) => return Err(Error::Closed { socket: socket() }),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(late())
                }
                Err(e) => return Err(io("read from noded at")(e)),
            }
        }
        serde_json::from_slice(&answer).map_err(|source| Error::BadAnswer {
            socket: socket(),
            source,
        })
    }
}

/// What noded answered instead (its own words, as `noded logs` prints them).
fn refused(error: Option<String>) -> Error {
    Error::Refused(error.unwrap_or_else(|| "an answer without it".into()))
}

/// Why a request got no answer, or the error noded answered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {op} {socket}: {source}")]
    Io {
        op: &'static str,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("bad request: {0}")]
    Request(serde_json::Error),
    #[error("noded did not answer on {socket} within {timeout:?}")]
    Late { socket: PathBuf, timeout: Duration },
    #[error("noded's answer on {socket} is over {max} bytes: ask for a smaller \"tail\"")]
    TooLong { socket: PathBuf, max: u64 },
    #[error("noded closed {socket} without an answer")]
    Closed { socket: PathBuf },
    #[error("bad answer from noded at {socket}: {source}")]
    BadAnswer {
        socket: PathBuf,
        source: serde_json::Error,
    },
    /// noded's own words.
    #[error("{0}")]
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_the_lines_noded_has_always_read() {
        let line = serde_json::to_string(&Request::pods()).unwrap();
        assert_eq!(line, r#"{"op":"pods","pod":"","previous":false}"#);
        let logs = Request::logs(LogsRequest {
            pod: "edge/cam".into(),
            container: Some("c".into()),
            previous: true,
            tail: Some(10),
        });
        let v: serde_json::Value = serde_json::to_value(&logs).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"logs","pod":"edge/cam","container":"c","previous":true,"tail":10})
        );
        let back: Request = serde_json::from_str(r#"{"op":"logs","pod":"cam"}"#).unwrap();
        assert_eq!(back.logs.tail, None);
    }

    #[test]
    fn a_silent_or_closing_server_is_named_with_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noded.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            // The first connection is held open and never answered, the second closed.
            let (held, _) = listener.accept().unwrap();
            let (closed, _) = listener.accept().unwrap();
            std::io::BufReader::new(&closed)
                .read_line(&mut String::new())
                .unwrap();
            drop(closed);
            std::thread::sleep(Duration::from_millis(500));
            drop(held);
        });
        let client = Client {
            timeout: Duration::from_millis(200),
            ..Client::new(&path)
        };
        let e = client.pods().unwrap_err();
        assert!(matches!(e, Error::Late { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("did not answer") && e.contains("noded.sock"),
            "{e}"
        );
        let e = client.pods().unwrap_err().to_string();
        assert!(
            e.contains("closed") && e.contains("without an answer"),
            "{e}"
        );
        server.join().unwrap();
        let e = client.pods().unwrap_err().to_string();
        assert!(e.contains("failed to connect to noded"), "{e}");
    }

    #[test]
    fn an_error_answer_is_the_callers_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noded.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&s).read_line(&mut line).unwrap();
            assert!(line.starts_with(r#"{"op":"logs""#), "{line}");
            s.write_all(b"{\"error\":\"no pod named cam\"}\n").unwrap();
        });
        let e = Client::new(&path)
            .logs(LogsRequest {
                pod: "cam".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            matches!(&e, Error::Refused(w) if w == "no pod named cam"),
            "{e:?}"
        );
        server.join().unwrap();
    }
}
