//! What a service says on its notify pipe (`NOTIFY_FD`, docs/services.md): `READY=1`
//! once it serves, then `HEALTHY=1` once its `health` holds; the pipe is read until
//! nothing is left to say.

use std::io::Read;
use std::time::Instant;

use super::{State, Supervisor};

/// What the whole lines read so far said.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Said {
    pub(super) ready: bool,
    pub(super) healthy: bool,
}

/// Takes the whole lines out of `buf` (a line cut between two reads stays for the next)
/// and says which words were among them.
pub(super) fn take_said(buf: &mut Vec<u8>) -> Said {
    let whole = buf.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let said = |what: &[u8]| {
        buf[..whole]
            .split(|&b| b == b'\n')
            .any(|l| l.trim_ascii() == what)
    };
    let out = Said {
        ready: said(b"READY=1"),
        healthy: said(b"HEALTHY=1"),
    };
    buf.drain(..whole);
    out
}

impl Supervisor {
    /// Reads service `i`'s notify pipe and acts on what it said.
    pub(super) fn read_notify(&mut self, i: usize, now: Instant) {
        let s = &mut self.services[i];
        let Some(f) = s.notify.as_mut() else {
            return;
        };
        let mut buf = [0u8; 256];
        let mut closed = false;
        loop {
            match f.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    s.notify_buf.extend_from_slice(&buf[..n]);
                    if s.notify_buf.len() > 4096 {
                        let cut = s.notify_buf.len() - 4096;
                        s.notify_buf.drain(..cut);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let Said {
            ready: said_ready,
            healthy: said_healthy,
        } = take_said(&mut s.notify_buf);
        if said_ready && s.state == State::Starting {
            self.became_ready(i, now);
        }
        let s = &mut self.services[i];
        if said_healthy && s.state == State::Ready && !s.healthy {
            if let Some(what) = &s.spec.health {
                s.healthy = true;
                let ms = now.duration_since(s.started).as_millis();
                let text = format!("service {}: healthy ({what}) after {ms} ms", s.spec.name);
                self.say(text);
            }
        }
        // Read on while the service has something left to say: readiness, then health.
        let s = &mut self.services[i];
        let more = s.state == State::Starting
            || (s.state == State::Ready && s.spec.health.is_some() && !s.healthy);
        if closed || !more {
            s.notify = None;
            s.notify_buf.clear();
        }
    }

    pub(super) fn became_ready(&mut self, i: usize, now: Instant) {
        let s = &mut self.services[i];
        s.deadline = None;
        let ms = now.duration_since(s.started).as_millis();
        let text = format!("service {}: ready after {ms} ms", s.spec.name);
        s.ready_uptime_ms = Some(crate::logs::uptime().as_millis() as u64);
        self.set_state(i, State::Ready);
        self.say(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_lines_count_and_a_cut_one_waits() {
        let mut buf = b"STATUS=x\nREADY=".to_vec();
        assert_eq!(take_said(&mut buf), Said::default());
        assert_eq!(buf, b"READY=");
        buf.extend_from_slice(b"1\n HEALTHY=1 \nHEALTHY=");
        assert_eq!(
            take_said(&mut buf),
            Said {
                ready: true,
                healthy: true
            }
        );
        assert_eq!(buf, b"HEALTHY=");
        // Another word that starts the same is not it.
        let mut buf = b"READY=10\n".to_vec();
        assert_eq!(take_said(&mut buf), Said::default());
        assert!(buf.is_empty());
    }
}
