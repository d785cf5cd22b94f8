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
//!
//! That newest record must be this log's own: the same offset, topic and CRC. A log
//! restored from a backup numbers its new records from where the backup ended, at offsets
//! the core already holds other records at; the core's record then differs from the log's
//! (or the log has none there), which is said loudly (`Resumed::diverged`), and the class
//! resends from its last ack instead of skipping the log's new records.

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

/// Where a class resumes, and whether the core holds a record of ours that this log does
/// not.
pub(crate) struct Resumed {
    /// The offset to resume after.
    pub after: Option<u64>,
    /// Said when the core's newest record on one of the class's subjects names an offset
    /// after the last ack that this log holds another record at, or none at all: the log
    /// was restored from a backup (or lost its tail, or another box has this identity).
    /// The class then resumes after its last ack: records of the log's own that the core
    /// holds have the same ids and are dropped as duplicates within the window, and the
    /// others, named by their own CRC, are stored.
    pub diverged: Option<String>,
}

/// The offset to resume after: `acked`, or a later offset of `class` that the core holds.
/// Failing to ask is not an error (it is logged): the duplicate window still guards.
pub(crate) async fn resume_after(
    ask: &Asking<'_>,
    log: &Log,
    class: usize,
    acked: Option<u64>,
) -> Resumed {
    let from_ack = |diverged| Resumed {
        after: acked,
        diverged,
    };
    let (unacked, complete, acked_topic) = match unacked_records(log, class, acked).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(
                class,
                "cannot read the unacked records to ask the core about: {e}"
            );
            return from_ack(None);
        }
    };
    let read_to = unacked.keys().next_back().copied();
    // The last acked record's subject too: a restored log with nothing unacked shows on
    // it (the core holds later records of ours there than the log has).
    let topics: BTreeSet<&str> = unacked
        .values()
        .map(|(t, _)| t.as_str())
        .chain(acked_topic.as_deref())
        .collect();
    let mut held = acked;
    for topic in topics {
        let subject = format!("{}{topic}", ask.subject_prefix);
        let (id, offset, crc) = match last_held(ask, &subject).await {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(
                    stream = ask.stream,
                    "{e}; a resend is kept out only by the stream's duplicate window (edgectl \
                     setup makes the stream with allow_direct)"
                );
                return from_ack(None);
            }
        };
        if acked.is_some_and(|a| offset <= a) {
            continue;
        }
        let ours = match unacked.get(&offset) {
            Some((t, c)) if t == topic && crc.is_none_or(|crc| crc == *c) => true,
            Some(_) => false,
            // Past what was read of a long backlog: not known.
            None if !complete && read_to.is_none_or(|r| offset > r) => continue,
            None => false,
        };
        if !ours {
            let said = format!(
                "the core holds {id} on {subject}, and this box's log holds {} at offset \
                 {offset}: the log was restored from a backup (or lost its tail, or another box \
                 has this identity); its records {} are sent again under ids of their own \
                 content, so none is lost",
                if unacked.contains_key(&offset) {
                    "another record"
                } else {
                    "no record"
                },
                acked.map_or("from the first".to_string(), |a| format!(
                    "after offset {a}"
                )),
            );
            tracing::error!(class, "{said}");
            return from_ack(Some(said));
        }
        held = held.max(Some(offset));
    }
    if held > acked {
        tracing::info!(
            class,
            acked = ?acked,
            held = ?held,
            "the core already holds records whose acks were lost: resuming after them"
        );
    }
    Resumed {
        after: held,
        diverged: None,
    }
}

/// The class's records after `acked` that may have reached the core, by offset, with
/// their topics and CRCs (the first [`SCAN_RECORDS`], or [`SCAN_BYTES`]); whether that is
/// all of them; and the last acked record's topic, if the log still holds it.
type Unacked = (BTreeMap<u64, (String, u32)>, bool, Option<String>);

async fn unacked_records(log: &Log, class: usize, acked: Option<u64>) -> std::io::Result<Unacked> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || {
        let mut cur = Cursor::new(class, acked.unwrap_or(0));
        let (mut found, mut bytes, mut acked_topic) = (BTreeMap::new(), 0usize, None);
        while found.len() < SCAN_RECORDS && bytes < SCAN_BYTES {
            let batch = log.read(&mut cur, 1 << 20)?;
            if batch.is_empty() {
                return Ok((found, true, acked_topic));
            }
            for s in batch {
                if Some(s.offset) == acked {
                    acked_topic = Some(s.record.topic);
                    continue;
                }
                bytes += s.record.value.len();
                found.insert(s.offset, (s.record.topic, s.crc));
            }
        }
        Ok((found, false, acked_topic))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The id, offset and CRC of the last message the core holds on `subject`, if it is one
/// of ours.
async fn last_held(ask: &Asking<'_>, subject: &str) -> Result<Option<(String, u64, Option<u32>)>> {
    let op = format!("asking the core for the last message on {subject}");
    let Some(reply) = direct_last(ask.client, ask.stream, subject, ASK_TIMEOUT, op).await? else {
        return Ok(None);
    };
    let Some(id) = reply.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) else {
        return Ok(None);
    };
    Ok(ours(id.as_str(), ask.id_prefix).map(|(o, c)| (id.to_string(), o, c)))
}

/// The last message the core's `stream` holds on `subject`, by a JetStream direct get
/// (any replica answers it, and it leaves nothing behind at the core): `None` when it
/// holds none. `op` names the question in an error; no answer within `timeout` is one.
pub(crate) async fn direct_last(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    timeout: Duration,
    op: String,
) -> Result<Option<async_nats::Message>> {
    let failed = |detail: String| Error::Core {
        op: op.clone(),
        detail,
    };
    let api = format!("$JS.API.DIRECT.GET.{stream}.{subject}");
    let reply = tokio::time::timeout(timeout, client.request(api, "".into()))
        .await
        .map_err(|_| failed(format!("no answer within {timeout:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    match reply.status {
        None => Ok(Some(reply)),
        // 404: the core holds nothing on the subject.
        Some(async_nats::StatusCode::NOT_FOUND) => Ok(None),
        Some(status) => Err(failed(format!(
            "answered {status}{}",
            reply
                .description
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ))),
    }
}

/// The offset and CRC a message id names when its prefix is ours.
fn ours(msg_id: &str, id_prefix: &str) -> Option<(u64, Option<u32>)> {
    match crate::uplink::parse_message_id(msg_id)? {
        (prefix, offset, crc) if prefix == id_prefix => Some((offset, crc)),
        _ => None,
    }
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
        assert_eq!(ours("s1/m1/42", "s1/m1/"), Some((42, None)));
        assert_eq!(ours("s1/m1/42.0000002a", "s1/m1/"), Some((42, Some(42))));
        assert_eq!(ours("s1/m2/42.0000002a", "s1/m1/"), None);
        assert_eq!(ours("x/s1/m1/42", "s1/m1/"), None);
        assert_eq!(ours("s1/m1/x", "s1/m1/"), None);
        assert_eq!(ours("s1/m1/", "s1/m1/"), None);
    }
}
