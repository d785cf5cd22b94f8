//! `sensor`: the bundled demo workload. Every `SENSOR_INTERVAL_MS` (default 1000) it
//! takes a reading (a temperature that drifts with time, so a dashboard shows movement)
//! and prints it as one JSON line on stdout, which the container runtime keeps as the
//! container's log. With `FABRIC_URL` set (e.g. `http://127.0.0.1:7401/topics/sensors.temp`)
//! it also POSTs each reading there, so fabricd mirrors it to the core; a failed POST is
//! reported on stderr and the next reading tried, never fatal. With `INFERENCE_URL` set
//! (the bundled `inference` service's `/infer`) each reading is first scored there and
//! carries the model's `score` and `anomaly`; a reading the service cannot score goes
//! out without them. With `SENSOR_FILE` set (a file on a volume) each reading is also
//! appended there and synced, and a restarted sensor continues the sequence after the
//! last reading the file holds, so readings survive restarts and reboots on the box.
//! With `SENSOR_DEVICE` set (a raw block device, a pod's `volumeDevices`) the newest
//! readings are kept in a ring of 512-byte records at the start of the device, the way a
//! database writes its own blocks, and a restarted sensor resumes after the newest.
//!
//! `sensor --once` prints one reading and exits (`kubectl exec` into its pod).
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

/// The `seq` of the file's last complete reading; None for a missing or empty file. A
/// torn last line (a crash mid-append) is skipped.
fn last_seq(path: &std::path::Path) -> Result<Option<u64>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    Ok(text
        .lines()
        .rev()
        .filter_map(|l| workloads::parse_flat_object(l).ok())
        .find_map(|fields| {
            fields.into_iter().find_map(|(k, v)| match (k.as_str(), v) {
                ("seq", workloads::Value::Number(n)) if n >= 0.0 => Some(n as u64),
                _ => None,
            })
        }))
}

/// Ends a torn last line, so the next reading starts a line of its own.
fn end_torn_line(path: &std::path::Path) {
    let torn = std::fs::read(path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n'));
    if torn {
        let _ = append(path, "");
    }
}

fn append(path: &std::path::Path, line: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    f.write_all(format!("{line}\n").as_bytes())
        .and_then(|_| f.sync_data())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Records in the device ring: the newest `RING` readings are kept.
const RING: u64 = 64;
const RECORD: usize = 512;

/// The highest `seq` among the ring's records; None for a blank (zeroed) device.
fn device_last_seq(path: &std::path::Path) -> Result<Option<u64>, String> {
    use std::io::Read;
    let mut ring = vec![0u8; RING as usize * RECORD];
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    f.read_exact(&mut ring)
        .map_err(|e| format!("cannot read the ring of {}: {e}", path.display()))?;
    Ok(ring
        .chunks(RECORD)
        .filter_map(|r| {
            let line = std::str::from_utf8(r.split(|&b| b == b'\n').next()?).ok()?;
            workloads::parse_flat_object(line).ok()
        })
        .filter_map(|fields| {
            fields.into_iter().find_map(|(k, v)| match (k.as_str(), v) {
                ("seq", workloads::Value::Number(n)) if n >= 0.0 => Some(n as u64),
                _ => None,
            })
        })
        .max())
}

/// Writes the reading into its ring record (`seq % RING`) and syncs it.
fn device_write(path: &std::path::Path, seq: u64, line: &str) -> Result<(), String> {
    use std::io::{Seek, SeekFrom, Write};
    if line.len() >= RECORD {
        return Err(format!(
            "reading {seq} is longer than a {RECORD}-byte record"
        ));
    }
    let mut record = vec![0u8; RECORD];
    record[..line.len()].copy_from_slice(line.as_bytes());
    record[line.len()] = b'\n';
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    f.seek(SeekFrom::Start((seq % RING) * RECORD as u64))
        .and_then(|_| f.write_all(&record))
        .and_then(|_| f.sync_data())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
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
    if std::env::args().nth(1).as_deref() == Some("--once") {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        println!("{}", reading(0, t, &name));
        return;
    }
    let fabric = target("FABRIC_URL");
    let inference = target("INFERENCE_URL");
    let mut store = std::env::var_os("SENSOR_FILE").map(std::path::PathBuf::from);
    let mut seq = match &store {
        Some(path) => match last_seq(path) {
            Ok(Some(last)) => {
                eprintln!("sensor: resuming after seq {last} from {}", path.display());
                end_torn_line(path);
                last + 1
            }
            Ok(None) => {
                eprintln!("sensor: starting a new file {}", path.display());
                0
            }
            Err(e) => {
                eprintln!("sensor: {e}; readings are not stored");
                store = None;
                0
            }
        },
        None => 0,
    };
    let mut device = std::env::var_os("SENSOR_DEVICE").map(std::path::PathBuf::from);
    if let Some(path) = &device {
        match device_last_seq(path) {
            Ok(Some(last)) => {
                eprintln!(
                    "sensor: resuming after seq {last} from device {}",
                    path.display()
                );
                seq = seq.max(last + 1);
            }
            Ok(None) => eprintln!("sensor: starting on the blank device {}", path.display()),
            Err(e) => {
                eprintln!("sensor: {e}; readings are not kept on the device");
                device = None;
            }
        }
    }
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
        if let Some(path) = &store {
            if let Err(e) = append(path, &line) {
                eprintln!("sensor: reading {seq} not stored: {e}");
            }
        }
        if let Some(path) = &device {
            if let Err(e) = device_write(path, seq, &line) {
                eprintln!("sensor: reading {seq} not kept on the device: {e}");
            }
        }
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
    fn stored_readings_resume_after_the_last_whole_line() {
        let tmp = std::env::temp_dir().join(format!("sensor-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        assert_eq!(last_seq(&tmp).unwrap(), None);
        append(&tmp, &reading(0, 0, "t")).unwrap();
        append(&tmp, &reading(1, 0, "t")).unwrap();
        assert_eq!(last_seq(&tmp).unwrap(), Some(1));
        // A crash in the middle of an append leaves a torn line: the whole one before counts.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, br#"{"sensor":"t","seq":2,"ti"#))
            .unwrap();
        assert_eq!(last_seq(&tmp).unwrap(), Some(1));
        end_torn_line(&tmp);
        append(&tmp, &reading(2, 0, "t")).unwrap();
        assert_eq!(last_seq(&tmp).unwrap(), Some(2));
        std::fs::remove_file(&tmp).unwrap();
    }

    #[test]
    fn the_device_ring_resumes_after_the_newest_reading() {
        let dir = std::env::temp_dir().join(format!("sensor-ring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev = dir.join("dev");
        // A blank device: all zeroes, as a new thin volume reads.
        std::fs::write(&dev, vec![0u8; 64 * 1024]).unwrap();
        assert_eq!(device_last_seq(&dev).unwrap(), None);
        // More readings than the ring holds: the newest wins, not the last slot.
        for seq in 0..(RING + 5) {
            device_write(&dev, seq, &reading(seq, 1000 + seq, "d")).unwrap();
        }
        assert_eq!(device_last_seq(&dev).unwrap(), Some(RING + 4));
        assert_eq!(
            std::fs::metadata(&dev).unwrap().len(),
            64 * 1024,
            "nothing appended"
        );
        // Smaller than the ring: named, not a panic.
        std::fs::write(&dev, [0u8; 100]).unwrap();
        let e = device_last_seq(&dev).unwrap_err();
        assert!(
            e.contains("cannot read the ring of") && e.contains("dev"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn readings_are_json_lines() {
        let r = reading(7, 150_000, "temp0");
        assert!(r.starts_with(r#"{"sensor":"temp0","seq":7,"time_ms":150000,"celsius":23.00"#));
        assert!(!r.contains('\n'));
    }
}
