//! What the bundled workloads share: a minimal HTTP/1.1 client and server side, and a
//! reader for flat JSON objects. Only the standard library: each workload goes into a
//! scratch image as one static file.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The largest request or reply body either side accepts.
pub const MAX_BODY: usize = 64 * 1024;

/// `http://host:port/path` split into (`host:port`, `/path`), or `unix:<socket>:/path`
/// (HTTP over a unix socket, such as the fabric channel noded mounts into each pod at
/// `/run/edge/fabric/produce.sock`) into (`<socket>`, `/path`); `what` names the setting
/// in errors.
pub fn parse_url(what: &str, url: &str) -> Result<(String, String), String> {
    if let Some(rest) = url.strip_prefix("unix:") {
        return match rest.split_once(":/") {
            Some((socket, path)) if socket.starts_with('/') => {
                Ok((socket.to_owned(), format!("/{path}")))
            }
            _ => Err(format!(
                "{what} `{url}` must be unix:<absolute socket path>:/<path>"
            )),
        };
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{what} `{url}` must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{what} `{url}` names no host"));
    }
    Ok((authority.to_owned(), path.to_owned()))
}

/// POSTs a JSON body to `authority` (`host:port`, or a unix socket's path) and returns
/// the reply's status code and body.
pub fn post(authority: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let connect = |e| format!("connect {authority}: {e}");
    if authority.starts_with('/') {
        let s = std::os::unix::net::UnixStream::connect(authority).map_err(connect)?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        return exchange(s, "localhost", authority, path, body);
    }
    let s = TcpStream::connect(authority).map_err(connect)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    exchange(s, authority, authority, path, body)
}

fn exchange(
    mut s: impl Read + Write,
    host: &str,
    authority: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send to {authority}: {e}"))?;
    let mut reply = Vec::new();
    (&mut s)
        .take(MAX_BODY as u64 + 4096)
        .read_to_end(&mut reply)
        .map_err(|e| format!("reply from {authority}: {e}"))?;
    let reply = String::from_utf8_lossy(&reply);
    let status = reply
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("POST {path}: no HTTP status in the reply"))?;
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

/// One request as a server reads it.
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one request (request line, headers, a body of Content-Length bytes).
pub fn read_request(stream: &TcpStream) -> Result<Request, String> {
    let mut r = BufReader::new(stream.take(MAX_BODY as u64 + 16 * 1024));
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("reading the request line: {e}"))?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(format!("malformed request line `{}`", line.trim_end()));
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)
            .map_err(|e| format!("reading headers: {e}"))?
            == 0
        {
            return Err("the connection ended inside the headers".into());
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                len = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad Content-Length `{}`", value.trim()))?;
            }
        }
    }
    if len > MAX_BODY {
        return Err(format!(
            "body of {len} bytes is over the limit of {MAX_BODY}"
        ));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)
        .map_err(|e| format!("reading a body of {len} bytes: {e}"))?;
    Ok(Request { method, path, body })
}

/// Writes a reply and closes the exchange.
pub fn respond(mut stream: &TcpStream, status: u16, content_type: &str, body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A value of a flat JSON object.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Str(String),
    Bool(bool),
    Null,
}

/// Parses a JSON object whose values are numbers, strings, booleans or null (what
/// sensors send). Nested objects and arrays are refused by key.
pub fn parse_flat_object(text: &str) -> Result<Vec<(String, Value)>, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    p.ws();
    p.expect(b'{')?;
    let mut out = Vec::new();
    p.ws();
    if p.peek() == Some(b'}') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            let key = p.string()?;
            p.ws();
            p.expect(b':')?;
            p.ws();
            let value = match p.peek() {
                Some(b'"') => Value::Str(p.string()?),
                Some(b't') => p.word("true", Value::Bool(true))?,
                Some(b'f') => p.word("false", Value::Bool(false))?,
                Some(b'n') => p.word("null", Value::Null)?,
                Some(b'{' | b'[') => {
                    return Err(format!(
                        "`{key}`: nested objects and arrays are not supported"
                    ))
                }
                _ => Value::Number(p.number(&key)?),
            };
            out.push((key, value));
            p.ws();
            match p.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(format!("expected `,` or `}}` at byte {}", p.i)),
            }
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing characters at byte {}", p.i));
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", c as char, self.i - 1))
        }
    }
    fn word(&mut self, w: &str, v: Value) -> Result<Value, String> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            Err(format!("bad literal at byte {}", self.i))
        }
    }
    fn number(&mut self, key: &str) -> Result<f64, String> {
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        ) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i])
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
            .filter(|n| n.is_finite())
            .ok_or_else(|| format!("`{key}`: not a number at byte {start}"))
    }
    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            match self.next() {
                None => return Err("unterminated string".into()),
                Some(b'"') => break,
                Some(b'\\') => match self.next() {
                    Some(b'"') => out.push(b'"'),
                    Some(b'\\') => out.push(b'\\'),
                    Some(b'/') => out.push(b'/'),
                    Some(b'n') => out.push(b'\n'),
                    Some(b't') => out.push(b'\t'),
                    Some(b'r') => out.push(b'\r'),
                    _ => return Err(format!("unsupported escape at byte {}", self.i - 1)),
                },
                Some(c) => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| "string is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_or_refused_by_name() {
        assert_eq!(
            parse_url("FABRIC_URL", "http://127.0.0.1:7401/topics/sensors.temp").unwrap(),
            ("127.0.0.1:7401".into(), "/topics/sensors.temp".into())
        );
        assert_eq!(
            parse_url(
                "FABRIC_URL",
                "unix:/run/edge/fabric/produce.sock:/topics/pods.sensor.temp0"
            )
            .unwrap(),
            (
                "/run/edge/fabric/produce.sock".into(),
                "/topics/pods.sensor.temp0".into()
            )
        );
        for bad in ["unix:relative.sock:/t", "unix:/no/path"] {
            assert!(parse_url("FABRIC_URL", bad)
                .unwrap_err()
                .contains("must be unix:<absolute socket path>:/<path>"));
        }
        assert!(parse_url("FABRIC_URL", "https://x/y")
            .unwrap_err()
            .contains("FABRIC_URL `https://x/y` must start with http://"));
        assert!(parse_url("X", "http:///y").unwrap_err().contains("no host"));
    }

    #[test]
    fn flat_objects_parse_and_nesting_is_refused_by_key() {
        let v = parse_flat_object(
            r#" {"sensor":"temp0","seq":7,"celsius":-21.5e0,"ok":true,"x":null,"q":"a\"b"} "#,
        )
        .unwrap();
        assert_eq!(v[0], ("sensor".into(), Value::Str("temp0".into())));
        assert_eq!(v[1], ("seq".into(), Value::Number(7.0)));
        assert_eq!(v[2], ("celsius".into(), Value::Number(-21.5)));
        assert_eq!(v[3], ("ok".into(), Value::Bool(true)));
        assert_eq!(v[4], ("x".into(), Value::Null));
        assert_eq!(v[5], ("q".into(), Value::Str("a\"b".into())));
        assert!(parse_flat_object("{}").unwrap().is_empty());
        assert!(parse_flat_object(r#"{"a":{"b":1}}"#)
            .unwrap_err()
            .contains("`a`: nested"));
        assert!(parse_flat_object(r#"{"a":1x}"#).is_err());
        assert!(parse_flat_object(r#"{"a":1} tail"#)
            .unwrap_err()
            .contains("trailing"));
        assert!(parse_flat_object(r#"{"a":"#).is_err());
        assert!(parse_flat_object(r#"{"a":nan}"#).is_err());
    }
}
