//! A minimal QMP client: one connection per command, enough to press the power button
//! and slow a disk down.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Runs one QMP command and returns its "return" value.
pub fn execute(sock: &Path, command: &str, timeout: Duration) -> Result<Value> {
    execute_with(sock, command, json!({}), timeout)
}

/// [`execute`] with the command's arguments.
pub fn execute_with(sock: &Path, command: &str, args: Value, timeout: Duration) -> Result<Value> {
    let stream = UnixStream::connect(sock)
        .with_context(|| format!("failed to connect to QMP socket {}", sock.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let greeting = read_msg(&mut r).context("no QMP greeting")?;
    if greeting.get("QMP").is_none() {
        bail!("unexpected QMP greeting {greeting}");
    }
    call(&mut w, &mut r, "qmp_capabilities", json!({}))?;
    call(&mut w, &mut r, command, args)
}

fn read_msg(r: &mut impl BufRead) -> Result<Value> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("QMP connection closed");
    }
    serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))
}

fn call(w: &mut impl Write, r: &mut impl BufRead, command: &str, args: Value) -> Result<Value> {
    writeln!(w, "{}", json!({ "execute": command, "arguments": args }))?;
    loop {
        let msg = read_msg(r).with_context(|| format!("no answer to QMP {command}"))?;
        if let Some(ret) = msg.get("return") {
            return Ok(ret.clone());
        }
        if let Some(err) = msg.get("error") {
            bail!("QMP {command} failed: {err}");
        }
        // Asynchronous events (POWERDOWN, ...) may come before the answer.
    }
}
