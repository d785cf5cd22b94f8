//! `sensor`: the bundled demo workload. Every `SENSOR_INTERVAL_MS` (default 1000) it
//! takes a reading (a temperature that drifts with time, so a dashboard shows movement)
//! and prints it as one JSON line on stdout, which the container runtime keeps as the
//! container's log. With `FABRIC_URL` set (e.g. `http://127.0.0.1:7401/topics/sensors.temp`)
//! it also POSTs each reading there, so fabricd mirrors it to the core; a failed POST is
//! reported on stderr and the next reading tried, never fatal. With `INFERENCE_URL` set
//! (the bundled `inference` service's `/infer`) each reading is first scored there and
//! carries the model's `score` and `anomaly`; a reading the service cannot score goes
//! out without them.
//!
//! Only the standard library: the program goes into a scratch image as one static file.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use workloads::{parse_url, post};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The URL in `name`, split; None (said once on stderr) when unset or malformed.
fn target(name: &str) -> Option<(String, String)> {
    let url = std::env::var(name).ok()?;
    parse_url(name, &url)
        .map_err(|e| eprintln!("sensor: {e}; ignoring it"))
        .ok()
}

/// The reading with the model's verdict from the inference service added
/// (`"score"` and `"anomaly"` copied from its answer), or unchanged when it has none.
fn scored(reading: &str, authority: &str, path: &str) -> Result<String, String> {
    let (status, body) = post(authority, path, reading)?;
    if status != 200 {
        return Err(format!("inference answered {status}: {}", body.trim()));
    }
    let answer = workloads::parse_flat_object(body.trim())?;
    let field = |k: &str| answer.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match (field("score"), field("anomaly")) {
        (Some(workloads::Value::Number(s)), Some(workloads::Value::Bool(a))) => Ok(format!(
            r#"{},"score":{s:.4},"anomaly":{a}}}"#,
            reading.trim_end_matches('}')
        )),
        _ => Err(format!(
            "inference answered without score and anomaly: {}",
            body.trim()
        )),
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
    let fabric = target("FABRIC_URL");
    let inference = target("INFERENCE_URL");
    let mut seq = 0u64;
    loop {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut line = reading(seq, t, &name);
        if let Some((authority, path)) = &inference {
            match scored(&line, authority, path) {
                Ok(l) => line = l,
                Err(e) => eprintln!("sensor: reading {seq} not scored: {e}"),
            }
        }
        println!("{line}");
        if let Some((authority, path)) = &fabric {
            match post(authority, path, &line) {
                Ok((200, _)) => {}
                Ok((status, body)) => {
                    eprintln!("sensor: reading {seq} not sent: {status} {}", body.trim())
                }
                Err(e) => eprintln!("sensor: reading {seq} not sent: {e}"),
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
    fn readings_carry_the_inference_verdict() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for (i, s) in listener.incoming().enumerate() {
                let mut s = s.unwrap();
                let _ = s.read(&mut [0u8; 4096]);
                let body = if i == 0 {
                    r#"{"model":"m","score":0.25,"anomaly":false}"#
                } else {
                    r#"{"error":"feature `celsius` is missing"}"#
                };
                let status = if i == 0 { "200 OK" } else { "400 Bad Request" };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        let r = reading(1, 0, "t");
        assert_eq!(
            scored(&r, &addr, "/infer").unwrap(),
            format!(r#"{},"score":0.2500,"anomaly":false}}"#, &r[..r.len() - 1])
        );
        assert!(scored(&r, &addr, "/infer")
            .unwrap_err()
            .contains("answered 400"));
    }

    #[test]
    fn readings_are_json_lines() {
        let r = reading(7, 150_000, "temp0");
        assert!(r.starts_with(r#"{"sensor":"temp0","seq":7,"time_ms":150000,"celsius":23.00"#));
        assert!(!r.contains('\n'));
    }
}
