//! The host side of the control port (`org.edgeos.control`): JSON lines, one reply per
//! request, events in between. A reader thread sorts lines into replies and events and
//! logs every line to `control.log`.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What one line from the guest is.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Reply(Value),
    Event(Value),
    /// Not a JSON object with "reply" or "event": logged and otherwise ignored.
    Other(String),
}

pub fn classify(line: &str) -> Incoming {
    match serde_json::from_str::<Value>(line.trim()) {
        Ok(v) if v.get("reply").is_some() => Incoming::Reply(v),
        Ok(v) if v.get("event").is_some() => Incoming::Event(v),
        _ => Incoming::Other(line.to_string()),
    }
}

/// Checks a reply belongs to the request `cmd` and succeeded; returns it whole.
pub fn check_reply(cmd: &str, reply: Value) -> Result<Value> {
    let name = reply.get("reply").and_then(Value::as_str).unwrap_or("");
    if name != cmd {
        bail!("reply {reply} does not answer request {cmd:?}");
    }
    if reply.get("ok") != Some(&Value::Bool(true)) {
        let err = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("(no error text)");
        bail!("request {cmd:?} failed in the guest: {err}");
    }
    Ok(reply)
}

pub type Events = Arc<Mutex<Vec<Value>>>;

pub struct Control {
    writer: UnixStream,
    replies: Receiver<Value>,
    events: Events,
    log: Arc<Mutex<std::fs::File>>,
}

impl Control {
    /// Connects to QEMU's end of the port. Events go into `events`, which outlives
    /// this connection so a test sees the events of every boot of its machine.
    pub fn connect(sock: &Path, log_path: &Path, events: Events) -> Result<Control> {
        let stream = UnixStream::connect(sock)
            .with_context(|| format!("failed to connect to control socket {}", sock.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("failed to open {}", log_path.display()))?;
        let log = Arc::new(Mutex::new(log));
        let reader = stream
            .try_clone()
            .context("failed to clone control socket")?;
        let (tx, rx) = mpsc::channel();
        let (ev, lg) = (events.clone(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut f) = lg.lock() {
                    let _ = writeln!(f, "<- {line}");
                }
                match classify(&line) {
                    Incoming::Reply(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Incoming::Event(v) => ev.lock().expect("events lock").push(v),
                    Incoming::Other(_) => {}
                }
            }
        });
        Ok(Control {
            writer: stream,
            replies: rx,
            events,
            log,
        })
    }

    /// Sends one request and waits for its reply. A reply that came late for an
    /// earlier, timed-out request is discarded rather than mistaken for this one.
    pub fn request(&mut self, req: &Value, timeout: Duration) -> Result<Value> {
        let reply = self.request_any(req, timeout)?;
        let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
        check_reply(cmd, reply)
    }

    /// Like [`request`](Self::request), but a reply with `"ok": false` is returned, not
    /// an error (for tests of refusals); it must still answer this request.
    pub fn request_any(&mut self, req: &Value, timeout: Duration) -> Result<Value> {
        let cmd = req
            .get("cmd")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("request {req} has no \"cmd\""))?
            .to_string();
        while self.replies.try_recv().is_ok() {}
        let line = format!("{req}\n");
        if let Ok(mut f) = self.log.lock() {
            let _ = write!(f, "-> {line}");
        }
        self.writer
            .write_all(line.as_bytes())
            .with_context(|| format!("failed to send {req} on the control port"))?;
        match self.replies.recv_timeout(timeout) {
            Ok(v) if v.get("reply").and_then(Value::as_str) == Some(cmd.as_str()) => Ok(v),
            Ok(v) => bail!("reply {v} does not answer request {cmd:?}"),
            Err(RecvTimeoutError::Timeout) => {
                bail!("no reply to {req} on the control port within {timeout:?}")
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("control port closed while waiting for the reply to {req}")
            }
        }
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().expect("events lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_replies_events_and_noise() {
        assert_eq!(
            classify(r#"{"reply":"status","ok":true,"status":{}}"#),
            Incoming::Reply(json!({"reply":"status","ok":true,"status":{}}))
        );
        assert_eq!(
            classify("{\"event\":\"ready\",\"slot\":\"a\"}\r"),
            Incoming::Event(json!({"event":"ready","slot":"a"}))
        );
        assert!(matches!(classify("garbage"), Incoming::Other(_)));
        assert!(matches!(classify("[1,2]"), Incoming::Other(_)));
    }

    #[test]
    fn reply_must_match_and_succeed() {
        assert!(check_reply("status", json!({"reply":"status","ok":true})).is_ok());
        let e = check_reply("status", json!({"reply":"kill","ok":true})).unwrap_err();
        assert!(e.to_string().contains("does not answer"));
        let e = check_reply(
            "kill",
            json!({"reply":"kill","ok":false,"error":"no such service"}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no such service"));
    }

    #[test]
    fn request_reply_over_a_socket_with_events_in_between() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let guest = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "{\"cmd\":\"status\"}\n");
            w.write_all(b"{\"event\":\"service\",\"service\":\"noded\",\"state\":\"ready\"}\n")
                .unwrap();
            w.write_all(b"{\"reply\":\"status\",\"ok\":true,\"status\":{\"ready\":true}}\n")
                .unwrap();
        });
        let events = Events::default();
        let mut c = Control::connect(&sock, &dir.path().join("control.log"), events).unwrap();
        let r = c
            .request(&json!({"cmd":"status"}), Duration::from_secs(5))
            .unwrap();
        assert_eq!(r["status"]["ready"], true);
        guest.join().unwrap();
        assert_eq!(c.events()[0]["service"], "noded");
        let log = std::fs::read_to_string(dir.path().join("control.log")).unwrap();
        assert!(log.contains("-> {\"cmd\":\"status\"}") && log.contains("<- {\"reply\""));
    }
}
