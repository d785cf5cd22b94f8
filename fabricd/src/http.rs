//! `POST /topics/<topic>` for the simplest sensors (curl, a shell loop, a PLC gateway):
//! the body is the record's value. A deliberately small HTTP/1.1 server: one route,
//! `Content-Length` bodies only, keep-alive. Optional request headers: `Fabric-Key`,
//! `Fabric-Timestamp` (ms since the epoch), and `Fabric-Header-<name>` per record header.
//! Answers: 200 `{"offset":N}` once durable, 400, 404, 405, 411, 413, 422 (no class for
//! the topic), 507 (quota full), 500.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::produce::{check_header_name, Ingest, Refusal, FULL, NO_CLASS, TOO_LARGE};
use crate::record::{check_topic, Record};

const MAX_HEAD: usize = 16 * 1024;

/// An answer: status line, a JSON body, whether the connection closes after it.
pub struct Response {
    status: u16,
    reason: &'static str,
    body: String,
    close: bool,
}

fn error(status: u16, reason: &'static str, message: impl std::fmt::Display) -> Response {
    Response {
        status,
        reason,
        body: format!("{{\"error\":{:?}}}", message.to_string()),
        close: true,
    }
}

fn refusal(r: Refusal) -> Response {
    let fatal = r.fatal();
    let mut resp = match r.status {
        FULL => error(507, "Insufficient Storage", r.message),
        NO_CLASS => error(422, "Unprocessable Entity", r.message),
        crate::produce::SLOW_DOWN => error(429, "Too Many Requests", r.message),
        TOO_LARGE => error(413, "Payload Too Large", r.message),
        crate::produce::BAD_REQUEST => error(400, "Bad Request", r.message),
        _ => error(500, "Internal Server Error", r.message),
    };
    // Refusals that leave the stream in step keep the connection.
    resp.close = fatal;
    resp
}

/// Serves one HTTP connection until it closes or a request is malformed.
pub async fn serve_conn<S>(ingest: Arc<Ingest>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Send,
{
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    loop {
        let resp = match handle(&ingest, &mut rd, &peer).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(r) => r,
        };
        if resp.status >= 400 {
            tracing::warn!(%peer, status = resp.status, "refused an HTTP produce request: {}", resp.body);
        }
        let text =
            format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{}",
            resp.status,
            resp.reason,
            resp.body.len(),
            if resp.close { "Connection: close\r\n" } else { "" },
            resp.body
        );
        if wr.write_all(text.as_bytes()).await.is_err() || resp.close {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

/// What a request head asks for.
pub struct Head {
    pub topic: String,
    /// The body's length (Content-Length).
    pub length: usize,
    /// The client asked to close after the reply (or spoke HTTP/1.0).
    pub close: bool,
    pub key: Option<Vec<u8>>,
    /// Fabric-Timestamp; 0 = now.
    pub timestamp_ms: i64,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Parses a request head (request line and header lines, up to its blank line) from a
/// client; the error is the answer to send.
pub fn parse_head(head: &[u8]) -> Result<Head, Response> {
    let text = std::str::from_utf8(head)
        .map_err(|_| error(400, "Bad Request", "request head is not UTF-8"))?;
    let mut lines = text.lines();
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if v.starts_with("HTTP/1.") => (m, t, v),
        _ => {
            return Err(error(
                400,
                "Bad Request",
                format!("bad request line `{}`", request_line.escape_debug()),
            ))
        }
    };
    let mut length = None;
    let mut close = version == "HTTP/1.0";
    let mut key = None;
    let mut timestamp_ms = 0i64;
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(error(
                400,
                "Bad Request",
                format!("bad header line `{}`", line.escape_debug()),
            ));
        };
        let value = value.trim();
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| error(400, "Bad Request", "bad Content-Length"))?,
                )
            }
            "transfer-encoding" => {
                return Err(error(
                    411,
                    "Length Required",
                    "chunked bodies are not taken; send Content-Length",
                ))
            }
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "fabric-key" => key = Some(value.as_bytes().to_vec()),
            "fabric-timestamp" => {
                timestamp_ms = value.parse().map_err(|_| {
                    error(
                        400,
                        "Bad Request",
                        "Fabric-Timestamp is not a number of milliseconds",
                    )
                })?
            }
            _ => {
                if let Some(h) = lower.strip_prefix("fabric-header-") {
                    let h = &name[name.len() - h.len()..];
                    check_header_name(h).map_err(|e| error(400, "Bad Request", e.to_string()))?;
                    headers.push((h.to_owned(), value.as_bytes().to_vec()));
                }
            }
        }
    }
    let Some(topic) = target.strip_prefix("/topics/") else {
        return Err(error(
            404,
            "Not Found",
            format!("no route `{target}`: POST /topics/<topic>"),
        ));
    };
    if method != "POST" {
        return Err(error(
            405,
            "Method Not Allowed",
            "only POST /topics/<topic>",
        ));
    }
    check_topic(topic).map_err(|e| error(400, "Bad Request", e.to_string()))?;
    let Some(length) = length else {
        return Err(error(411, "Length Required", "Content-Length is required"));
    };
    Ok(Head {
        topic: topic.to_owned(),
        length,
        close,
        key,
        timestamp_ms,
        headers,
    })
}

/// Reads one request; `Ok(None)` when the peer closed between requests.
async fn handle<R: AsyncRead + Unpin>(
    ingest: &Ingest,
    rd: &mut BufReader<R>,
    producer: &str,
) -> Result<Option<Response>, Response> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = (&mut *rd)
            .take((MAX_HEAD + 1 - head.len()) as u64)
            .read_until(b'\n', &mut head)
            .await
            .map_err(|e| error(400, "Bad Request", e))?;
        if n == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(error(
                400,
                "Bad Request",
                "connection closed inside the request head",
            ));
        }
        if head.len() > MAX_HEAD {
            return Err(error(400, "Bad Request", "request head over 16 KiB"));
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                // Blank lines before a request are tolerated (RFC 9112 2.2).
                head.clear();
                continue;
            }
            break;
        }
    }
    let Head {
        topic,
        length,
        close,
        key,
        timestamp_ms,
        headers,
    } = parse_head(&head)?;
    if length > ingest.config.max_record_bytes {
        return Err(error(
            413,
            "Payload Too Large",
            format!(
                "body of {length} bytes is over max_record_bytes ({})",
                ingest.config.max_record_bytes
            ),
        ));
    }
    let mut value = vec![0u8; length];
    rd.read_exact(&mut value).await.map_err(|e| {
        error(
            400,
            "Bad Request",
            format!("body shorter than Content-Length: {e}"),
        )
    })?;
    let rec = Record {
        topic,
        key,
        headers,
        timestamp_ms: if timestamp_ms == 0 {
            edge_common::unix_ms() as i64
        } else {
            timestamp_ms
        },
        value,
    };
    let mut resp = match ingest.submit(rec, producer).await {
        // A refusal answers this request; the connection stays unless either side
        // asked to close it.
        Err(r) => refusal(r),
        Ok(durable) => match durable.one().await {
            Ok(offset) => Response {
                status: 200,
                reason: "OK",
                body: format!("{{\"offset\":{offset}}}"),
                close: false,
            },
            Err(crate::store::AppendError::Closed) => {
                error(500, "Internal Server Error", "the log is shut down")
            }
            Err(e) => refusal(crate::produce::append_refusal(e)),
        },
    };
    resp.close |= close;
    Ok(Some(resp))
}
