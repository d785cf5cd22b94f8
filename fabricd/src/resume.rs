//! Where a class's uplink resumes when a session starts: after its last ack, or after the
//! newest of its records the core already holds, whichever is later; but after its last
//! ack alone while the last session's publishes are well inside the duplicate window.
//!
//! The core drops a resent record (same `Nats-Msg-Id`) only within its stream's duplicate
//! window. A cut link loses the acks of records the core had stored; when the partition
//! lasts longer than the window, resending them from the last ack would store them twice.
//! So before it resends, the box asks the core for the last message on each subject its
//! unacked records go to (a JetStream direct get, allowed only on the site's own
//! subjects), and skips every record up to the newest one the core holds. A class's
//! records reach the core in offset order, so holding that one means holding all before
//! it. The window then only has to cover a crash between an ack and its persisting.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::store::{Cursor, Log};

/// How far past the last ack the box looks for records the core may hold: the
/// publishes in flight at a cut are at most `window` per class, and acks taken but not
/// yet persisted (every 200 ms) add to that after a crash.
const SCAN_RECORDS: usize = 16_384;
const SCAN_BYTES: usize = 64 << 20;
/// A core that does not answer a direct get (a stream made without `allow_direct`, or a
/// box not allowed to ask) leaves the duplicate window as the only guard; the session
/// goes on without waiting longer than this.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether to resend every unacked record, the core's duplicate window dropping those
/// it holds: when the last session of this process ended (`session_ended`) recently
/// enough that what it had in flight, published within an ack timeout before, is inside
/// half the window. A core that is a cluster may hold a later record and not an earlier
/// one (a new stream leader elected between them), which resuming after the newest one
/// held would lose. `None` (the first session of this process): ask the core instead.
pub(crate) fn resend_all(
    session_ended: Option<Instant>,
    ack_timeout: Duration,
    dupe_window: Duration,
) -> bool {
    session_ended.is_some_and(|at| at.elapsed() + ack_timeout < dupe_window / 2)
}

/// What one session needs to ask: the core's records stream and how our records are
/// named on it.
pub(crate) struct Asking<'a> {
    pub client: &'a async_nats::Client,
    pub stream: &'a str,
    pub subject_prefix: &'a str,
    pub id_prefix: &'a str,
}

/// The offset to resume after: `acked`, or a later offset of `class` that the core holds.
/// Failing to ask is not an error (it is logged): the duplicate window still guards.
pub(crate) async fn resume_after(
    ask: &Asking<'_>,
    log: &Log,
    class: usize,
    acked: Option<u64>,
) -> Option<u64> {
    let unacked = match unacked_topics(log, class, acked).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(
                class,
                "cannot read the unacked records to ask the core about: {e}"
            );
            return acked;
        }
    };
    let topics: BTreeSet<&str> = unacked.values().map(String::as_str).collect();
    let mut held = acked;
    for topic in topics {
        let subject = format!("{}{topic}", ask.subject_prefix);
        match last_held(ask, &subject).await {
            Ok(Some(offset)) if unacked.get(&offset).is_some_and(|t| t == topic) => {
                held = held.max(Some(offset));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(
                    stream = ask.stream,
                    "{e}; a resend is kept out only by the stream's duplicate window (edgectl \
                     setup makes the stream with allow_direct)"
                );
                return acked;
            }
        }
    }
    if held > acked {
        tracing::info!(
            class,
            acked = ?acked,
            held = ?held,
            "the core already holds records whose acks were lost: resuming after them"
        );
    }
    held
}

/// The offsets and topics of the class's records after `acked` that may have reached the
/// core (the first [`SCAN_RECORDS`], or [`SCAN_BYTES`]).
async fn unacked_topics(
    log: &Log,
    class: usize,
    acked: Option<u64>,
) -> std::io::Result<BTreeMap<u64, String>> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        let mut cur = Cursor::new(class, acked.map_or(0, |a| a + 1));
        let (mut found, mut bytes) = (BTreeMap::new(), 0usize);
        while found.len() < SCAN_RECORDS && bytes < SCAN_BYTES {
            let batch = log.read(&mut cur, 1 << 20)?;
            if batch.is_empty() {
                break;
            }
            for s in batch {
                bytes += s.record.value.len();
                found.insert(s.offset, s.record.topic);
            }
        }
        Ok(found)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The offset of the last message the core holds on `subject`, if it is one of ours.
async fn last_held(ask: &Asking<'_>, subject: &str) -> Result<Option<u64>> {
    let api = format!("$JS.API.DIRECT.GET.{}.{subject}", ask.stream);
    let failed = |detail: String| Error::Core {
        op: format!("asking the core for the last message on {subject}"),
        detail,
    };
    let reply = tokio::time::timeout(ASK_TIMEOUT, ask.client.request(api, "".into()))
        .await
        .map_err(|_| failed(format!("no answer within {ASK_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    if let Some(status) = reply.status {
        // 404: the core holds nothing on the subject.
        if status == async_nats::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        return Err(failed(format!(
            "answered {status}{}",
            reply
                .description
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        )));
    }
    Ok(reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .and_then(|id| offset_of(id.as_str(), ask.id_prefix)))
}

/// `<site>/<machine>/<offset>` when the prefix is ours.
fn offset_of(msg_id: &str, id_prefix: &str) -> Option<u64> {
    msg_id.strip_prefix(id_prefix)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_session_resends_everything_and_an_old_or_unknown_one_asks_the_core() {
        let (ack, window) = (Duration::from_secs(30), Duration::from_secs(600));
        let now = Instant::now();
        assert!(resend_all(Some(now), ack, window));
        assert!(!resend_all(None, ack, window));
        // A window too short for the ack timeout never resends blindly.
        assert!(!resend_all(Some(now), ack, Duration::from_secs(2)));
        if let Some(long_ago) = now.checked_sub(Duration::from_secs(300)) {
            assert!(!resend_all(Some(long_ago), ack, window));
        }
    }

    #[test]
    fn only_our_own_message_ids_name_an_offset() {
        assert_eq!(offset_of("s1/m1/42", "s1/m1/"), Some(42));
        assert_eq!(offset_of("s1/m2/42", "s1/m1/"), None);
        assert_eq!(offset_of("s1/m1/x", "s1/m1/"), None);
        assert_eq!(offset_of("s1/m1/", "s1/m1/"), None);
    }
}
