//! The control protocol's requests (docs/contracts.md) and its replies' shape: one
//! JSON line in, the request or the complete error reply out. Pure functions of the
//! line with nothing of init's own, so that the fuzz crate compiles this file as it is
//! (fuzz/fuzz_targets/control_request.rs).

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Status,
    /// The boot's measurement logs: ours (PCR 11 phases) and the firmware's.
    Measurements,
    Kill {
        service: String,
        signal: i32,
    },
    Restart {
        service: String,
    },
    Poweroff,
    Reboot,
    /// PID 1 stops its loop and stops petting the watchdog, as a hung init would, so
    /// that an operator sees the hardware watchdog reset the box (docs/contracts.md).
    WatchdogTest,
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Measurements => "measurements",
            Request::Kill { .. } => "kill",
            Request::Restart { .. } => "restart",
            Request::Poweroff => "poweroff",
            Request::Reboot => "reboot",
            Request::WatchdogTest => "watchdog-test",
        }
    }
}

/// Parses one request line. The error is the complete reply to send.
pub fn parse_request(line: &str) -> Result<Request, Value> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| error_reply("invalid", &format!("not a JSON object: {e}")))?;
    let cmd = v.get("cmd").and_then(Value::as_str).unwrap_or("");
    let service = || {
        v.get("service")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| error_reply(cmd, "missing \"service\""))
    };
    match cmd {
        "status" => Ok(Request::Status),
        "measurements" => Ok(Request::Measurements),
        "kill" => {
            let signal = match v.get("signal") {
                None => libc::SIGTERM,
                Some(s) => s
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(|| error_reply(cmd, "\"signal\" must be a number"))?,
            };
            Ok(Request::Kill {
                service: service()?,
                signal,
            })
        }
        "restart" => Ok(Request::Restart {
            service: service()?,
        }),
        "poweroff" => Ok(Request::Poweroff),
        "reboot" => Ok(Request::Reboot),
        "watchdog-test" => Ok(Request::WatchdogTest),
        "" => Err(error_reply("invalid", "missing \"cmd\"")),
        other => Err(error_reply(other, &format!("unknown cmd `{other}`"))),
    }
}

/// Log lines returned when the request names no `tail`, and the most it may ask for.
pub const LOGS_TAIL_DEFAULT: u64 = 100;
pub const LOGS_TAIL_MAX: u64 = 1000;
/// A request for noded, relayed to its socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relay {
    Pods,
    Logs {
        pod: String,
        container: Option<String>,
        previous: bool,
        tail: u64,
    },
}

impl Relay {
    pub fn name(&self) -> &'static str {
        match self {
            Relay::Pods => "pods",
            Relay::Logs { .. } => "logs",
        }
    }
}

/// `Some` when the line is a `pods` or `logs` request (the error is the complete
/// reply); `None` leaves the line to [`parse_request`].
pub fn parse_relay(line: &str) -> Option<Result<Relay, Value>> {
    let v: Value = serde_json::from_str(line).ok()?;
    let cmd = v.get("cmd").and_then(Value::as_str)?;
    let err = |m: &str| Some(Err(error_reply(cmd, m)));
    match cmd {
        "pods" => Some(Ok(Relay::Pods)),
        "logs" => {
            let Some(pod) = v
                .get("pod")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
            else {
                return err("missing \"pod\"");
            };
            let container = match v.get("container") {
                None | Some(Value::Null) => None,
                Some(Value::String(c)) => Some(c.clone()),
                Some(_) => return err("\"container\" must be a string"),
            };
            let previous = match v.get("previous") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return err("\"previous\" must be true or false"),
            };
            let tail = match v.get("tail") {
                None => LOGS_TAIL_DEFAULT,
                Some(t) => match t.as_u64() {
                    Some(n) if (1..=LOGS_TAIL_MAX).contains(&n) => n,
                    _ => {
                        return err(&format!(
                            "\"tail\" must be a number from 1 to {LOGS_TAIL_MAX}"
                        ))
                    }
                },
            };
            Some(Ok(Relay::Logs {
                pod: pod.to_owned(),
                container,
                previous,
                tail,
            }))
        }
        _ => None,
    }
}

pub fn error_reply(cmd: &str, error: &str) -> Value {
    json!({"reply": cmd, "ok": false, "error": error})
}

pub fn ok_reply(cmd: &str) -> Value {
    json!({"reply": cmd, "ok": true})
}
