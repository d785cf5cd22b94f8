//! `sensor`: the bundled demo workload. Every `SENSOR_INTERVAL_MS` (default 1000) it
//! takes a reading (a temperature that drifts with time, so a dashboard shows movement)
//! and prints it as one JSON line on stdout, which the container runtime keeps as the
//! container's log. With `FABRIC_URL` set (e.g. `http://127.0.0.1:7401/topics/sensors.temp`)
//! it also POSTs each reading there, so fabricd mirrors it to the core; a failed POST is
//! reported on stderr and the next reading tried, never fatal.
//!
//! Only the standard library: the program goes into a scratch image as one static file.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// `http://host:port/path` split into (`host:port`, `/path`).
fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("FABRIC_URL `{url}` must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("FABRIC_URL `{url}` names no host"));
    }
    Ok((authority.to_owned(), path.to_owned()))
}

fn post(authority: &str, path: &str, body: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(authority).map_err(|e| format!("connect {authority}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send to {authority}: {e}"))?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("reply from {authority}: {e}"))?;
    let status = reply.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(format!("POST {path}: {status}"))
    }
}

/// The reading at `t_ms`: 21 °C with a slow 2 °C swing.
fn reading(seq: u64, t_ms: u64, name: &str) -> String {
    let phase = (t_ms % 600_000) as f64 / 600_000.0 * std::f64::consts::TAU;
    let value = 21.0 + 2.0 * phase.sin();
    format!(r#"{{"sensor":"{name}","seq":{seq},"time_ms":{t_ms},"celsius":{value:.2}}}"#)
}

fn main() {
    let interval = env_or("SENSOR_INTERVAL_MS", "1000")
        .parse::<u64>()
        .unwrap_or(1000)
        .max(10);
    let name = env_or("SENSOR_NAME", "temp0");
    let target = match std::env::var("FABRIC_URL") {
        Ok(url) => match parse_url(&url) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("sensor: {e}; readings go to stdout only");
                None
            }
        },
        Err(_) => None,
    };
    let mut seq = 0u64;
    loop {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = reading(seq, t, &name);
        println!("{line}");
        if let Some((authority, path)) = &target {
            if let Err(e) = post(authority, path, &line) {
                eprintln!("sensor: reading {seq} not sent: {e}");
            }
        }
        seq += 1;
        std::thread::sleep(Duration::from_millis(interval));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split_or_refused_by_name() {
        assert_eq!(
            parse_url("http://127.0.0.1:7401/topics/sensors.temp").unwrap(),
            ("127.0.0.1:7401".into(), "/topics/sensors.temp".into())
        );
        assert!(parse_url("https://x/y").unwrap_err().contains("http://"));
        assert!(parse_url("http:///y").unwrap_err().contains("no host"));
    }

    #[test]
    fn readings_are_json_lines() {
        let r = reading(7, 150_000, "temp0");
        assert!(r.starts_with(r#"{"sensor":"temp0","seq":7,"time_ms":150000,"celsius":23.00"#));
        assert!(!r.contains('\n'));
    }
}
