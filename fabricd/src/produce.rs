//! The framed produce protocol, spoken on the unix socket and the TCP listener.
//! Every integer is big-endian. A request is `[u32 len][len bytes]`:
//! `[u8 op = 1][i64 timestamp_ms, 0 = now][u16 topic_len][topic]
//!  [u32 key_len, 0xFFFFFFFF = no key][key][u16 header_count]
//!  {[u16 name_len][name][u32 value_len][value]}[value: the rest of the frame]`.
//! Each request gets one reply, in order (clients may pipeline):
//! `[u32 len][u8 status][payload]`, status 0 = durable with payload `[u64 offset]`;
//! otherwise the payload is a UTF-8 message: 1 full, 2 bad request, 3 too large,
//! 4 no class for the topic, 5 storage error. After 2 and 3 the connection is closed
//! (the stream can no longer be trusted to be in step); the daemon goes on.

use std::sync::Arc;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::record::{check_topic, Record};
use crate::store::{AppendError, Durable, Log};

pub const OP_PRODUCE: u8 = 1;
pub const OK: u8 = 0;
pub const FULL: u8 = 1;
pub const BAD_REQUEST: u8 = 2;
pub const TOO_LARGE: u8 = 3;
pub const NO_CLASS: u8 = 4;
pub const STORAGE: u8 = 5;
/// The producer sent more than `producer_bytes_per_sec` allows: retry later.
pub const SLOW_DOWN: u8 = 6;

/// The header fabricd stamps on every record with who produced it (the connection's
/// identity, never the producer's word): the core can trust it. A producer that sends
/// it is refused.
pub const PRODUCER_HEADER: &str = "Edge-Producer";

/// How much of a connection's input one read takes in.
const READ_BUFFER: usize = 64 * 1024;

/// Bytes a request may carry beyond the record's own (op, timestamp and lengths).
const REQUEST_OVERHEAD: usize = 1 + 8 + 2 + 4 + 2;

/// What the produce listeners need: the log, how to place and bound records, and each
/// producer's allowance.
pub struct Ingest {
    pub log: Log,
    pub config: Arc<Config>,
    allowance: std::sync::Mutex<std::collections::HashMap<String, Allowance>>,
}

/// A producer's token bucket: bytes it may still send, refilled at the configured rate
/// up to one second's worth.
struct Allowance {
    bytes: f64,
    at: std::time::Instant,
}

/// The identity of a program on the unix socket: its name and uid from the kernel's
/// peer credentials (`local:<comm>/uid=<n>`), or `local` when they cannot be read.
pub fn local_producer(cred: Option<tokio::net::unix::UCred>) -> String {
    let Some(c) = cred else {
        return "local".to_owned();
    };
    let comm = c
        .pid()
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".to_owned());
    format!("local:{comm}/uid={}", c.uid())
}

/// Why a request was refused, with the status it is answered with.
#[derive(Debug)]
pub struct Refusal {
    pub status: u8,
    pub message: String,
}

impl Refusal {
    fn new(status: u8, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
    /// Whether the connection is closed after answering.
    pub fn fatal(&self) -> bool {
        matches!(self.status, BAD_REQUEST | TOO_LARGE)
    }
}

fn now_ms() -> i64 {
    edge_common::unix_ms() as i64
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Refusal> {
        if self.0.len() < n {
            return Err(Refusal::new(
                BAD_REQUEST,
                format!("frame ends inside its {what}"),
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn be<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Refusal> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
}

/// Parses one request body into a record.
pub fn parse_request(frame: &[u8]) -> Result<Record, Refusal> {
    let mut c = Cursor(frame);
    let [op] = c.be::<1>("op")?;
    if op != OP_PRODUCE {
        return Err(Refusal::new(BAD_REQUEST, format!("unknown op {op}")));
    }
    let ts = i64::from_be_bytes(c.be("timestamp")?);
    let tlen = u16::from_be_bytes(c.be("topic length")?) as usize;
    let topic = std::str::from_utf8(c.take(tlen, "topic")?)
        .map_err(|_| Refusal::new(BAD_REQUEST, "topic is not UTF-8"))?
        .to_owned();
    check_topic(&topic).map_err(|e| Refusal::new(BAD_REQUEST, e.to_string()))?;
    let klen = u32::from_be_bytes(c.be("key length")?);
    let key = if klen == u32::MAX {
        None
    } else {
        Some(c.take(klen as usize, "key")?.to_vec())
    };
    let n = u16::from_be_bytes(c.be("header count")?);
    let mut headers = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let nlen = u16::from_be_bytes(c.be("header name length")?) as usize;
        let name = std::str::from_utf8(c.take(nlen, "header name")?)
            .map_err(|_| Refusal::new(BAD_REQUEST, "header name is not UTF-8"))?;
        check_header_name(name).map_err(|e| Refusal::new(BAD_REQUEST, e.to_string()))?;
        let vlen = u32::from_be_bytes(c.be("header value length")?) as usize;
        headers.push((name.to_owned(), c.take(vlen, "header value")?.to_vec()));
    }
    Ok(Record {
        topic,
        key,
        headers,
        timestamp_ms: if ts == 0 { now_ms() } else { ts },
        value: c.0.to_vec(),
    })
}

/// Header names travel as NATS header names: visible ASCII without ':'.
pub fn check_header_name(name: &str) -> Result<(), crate::Error> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if ok {
        Ok(())
    } else {
        Err(crate::Error::Name {
            what: "header name",
            name: name.to_owned(),
            rule: "visible ASCII without ':'",
        })
    }
}

/// Encodes a produce request frame (used by tests and the bench; the format is the
/// documentation's).
pub fn encode_request(rec: &Record) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + REQUEST_OVERHEAD + rec.encoded_len());
    b.extend_from_slice(&[0; 4]);
    b.push(OP_PRODUCE);
    b.extend_from_slice(&rec.timestamp_ms.to_be_bytes());
    b.extend_from_slice(&(rec.topic.len() as u16).to_be_bytes());
    b.extend_from_slice(rec.topic.as_bytes());
    match &rec.key {
        Some(k) => {
            b.extend_from_slice(&(k.len() as u32).to_be_bytes());
            b.extend_from_slice(k);
        }
        None => b.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
    b.extend_from_slice(&(rec.headers.len() as u16).to_be_bytes());
    for (n, v) in &rec.headers {
        b.extend_from_slice(&(n.len() as u16).to_be_bytes());
        b.extend_from_slice(n.as_bytes());
        b.extend_from_slice(&(v.len() as u32).to_be_bytes());
        b.extend_from_slice(v);
    }
    b.extend_from_slice(&rec.value);
    let len = (b.len() - 4) as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

impl Ingest {
    pub fn new(log: Log, config: Arc<Config>) -> Ingest {
        Ingest {
            log,
            config,
            allowance: Default::default(),
        }
    }

    /// Takes `size` bytes from `producer`'s allowance, or says it is over it.
    fn meter(&self, producer: &str, size: usize) -> Result<(), Refusal> {
        let rate = self.config.producer_bytes_per_sec;
        if rate == 0 {
            return Ok(());
        }
        // A second's worth, and never less than one whole record.
        let cap = rate.max(self.config.max_record_bytes as u64) as f64;
        let now = std::time::Instant::now();
        let mut all = edge_common::lock(&self.allowance);
        if all.len() > 4096 {
            // Those idle long enough to be full again are forgotten.
            all.retain(|_, a| {
                a.bytes + now.duration_since(a.at).as_secs_f64() * (rate as f64) < cap
            });
        }
        let a = all.entry(producer.to_owned()).or_insert(Allowance {
            bytes: cap,
            at: now,
        });
        a.bytes = (a.bytes + now.duration_since(a.at).as_secs_f64() * rate as f64).min(cap);
        a.at = now;
        if a.bytes < size as f64 {
            return Err(Refusal::new(
                SLOW_DOWN,
                format!(
                    "producer {producer} is over producer_bytes_per_sec ({rate}): slow down and retry"
                ),
            ));
        }
        a.bytes -= size as f64;
        Ok(())
    }

    /// Largest request frame accepted.
    pub fn max_frame(&self) -> usize {
        self.config.max_record_bytes + REQUEST_OVERHEAD
    }

    /// Checks a record, stamps who produced it and queues it; it resolves once it is
    /// durable.
    pub async fn submit(&self, rec: Record, producer: &str) -> Result<Durable, Refusal> {
        let (class, body) = self.prepare(rec, producer)?;
        self.log.submit(class, body).await.map_err(append_refusal)
    }

    /// Checks a record against the limits, the classes and its producer's allowance,
    /// and encodes it stamped with who produced it: its class and body, to be queued.
    fn prepare(&self, rec: Record, producer: &str) -> Result<(usize, Vec<u8>), Refusal> {
        if rec
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(PRODUCER_HEADER))
        {
            return Err(Refusal::new(
                BAD_REQUEST,
                format!(
                    "header {PRODUCER_HEADER} is fabricd's to set (this producer is {producer})"
                ),
            ));
        }
        check_header_count(rec.headers.len())?;
        let size = rec.encoded_len() - 16;
        if size > self.config.max_record_bytes {
            return Err(Refusal::new(
                TOO_LARGE,
                format!(
                    "record of {size} bytes is over max_record_bytes ({})",
                    self.config.max_record_bytes
                ),
            ));
        }
        let class = self.config.class_of(&rec.topic).ok_or_else(|| {
            Refusal::new(NO_CLASS, format!("no class takes topic `{}`", rec.topic))
        })?;
        self.meter(producer, size)?;
        let mut body = self.log.body_buffer();
        rec.encode_body_into(Some((PRODUCER_HEADER, producer.as_bytes())), &mut body);
        Ok((class, body))
    }
}

/// A stored record's header count is 16 bits and fabricd adds its stamp: a record may
/// bring one header fewer than that holds.
fn check_header_count(n: usize) -> Result<(), Refusal> {
    let most = u16::MAX as usize - 1;
    if n > most {
        return Err(Refusal::new(
            BAD_REQUEST,
            format!("{n} headers: at most {most} are taken"),
        ));
    }
    Ok(())
}

pub fn append_refusal(e: AppendError) -> Refusal {
    match e {
        AppendError::Full(_) => Refusal::new(FULL, e.to_string()),
        _ => Refusal::new(STORAGE, e.to_string()),
    }
}

/// The answers to the frames of one read, in order: each frame refused here, or queued
/// in `durable` (which answers those in their order).
struct Replies {
    refused: Vec<Option<Refusal>>,
    durable: Option<Durable>,
}

/// Frames a connection's read brought in are queued to the log as one batch, at most
/// this many.
const MAX_BATCH: usize = 256;

/// Serves one produce connection until the peer closes it or sends garbage.
pub async fn serve_conn<S>(ingest: Arc<Ingest>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    // Producers pipeline: one read takes in many frames, not two reads per frame.
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    // Bounded so that a producer that pipelines without reading replies is slowed down
    // (at most 16 batches, 4096 records, wait for their replies to be taken).
    let (tx, mut rx) = mpsc::channel::<Replies>(16);
    let writer = tokio::spawn(async move {
        let mut wr = BufWriter::new(wr);
        while let Some(replies) = rx.recv().await {
            let mut results = Vec::new().into_iter();
            if let Some(durable) = replies.durable {
                // Not durable yet: the replies written so far go out before the wait
                // for the next group commit, not after it.
                if !durable.is_ready() && wr.flush().await.is_err() {
                    return;
                }
                results = durable.all().await.into_iter();
            }
            for refused in replies.refused {
                let offset;
                let refusal;
                let (status, payload, close): (u8, &[u8], bool) = match refused {
                    Some(r) => {
                        refusal = r;
                        (refusal.status, refusal.message.as_bytes(), refusal.fatal())
                    }
                    None => match results.next().unwrap_or(Err(AppendError::Closed)) {
                        Ok(o) => {
                            offset = o.to_be_bytes();
                            (OK, &offset, false)
                        }
                        Err(AppendError::Closed) => (STORAGE, b"the log is shut down", true),
                        Err(e) => {
                            refusal = append_refusal(e);
                            (refusal.status, refusal.message.as_bytes(), false)
                        }
                    },
                };
                let mut head = [0u8; 5];
                head[..4].copy_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
                head[4] = status;
                if wr.write_all(&head).await.is_err() || wr.write_all(payload).await.is_err() {
                    return;
                }
                if close {
                    let _ = wr.flush().await;
                    let _ = wr.shutdown().await;
                    return;
                }
            }
            if rx.is_empty() && wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.flush().await;
    });
    let max = ingest.max_frame();
    let mut buf = Vec::new();
    loop {
        // The first frame is waited for; those already in the buffer behind it join it.
        let mut len = [0u8; 4];
        match rd.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => {
                tracing::debug!(%peer, "produce connection read failed: {e}");
                break;
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        let first = if len > max {
            Err(too_large(len, max))
        } else {
            buf.resize(len, 0);
            if let Err(e) = rd.read_exact(&mut buf).await {
                tracing::debug!(%peer, "produce connection ended inside a frame: {e}");
                break;
            }
            parse_request(&buf)
        };
        let mut replies = Replies {
            refused: Vec::new(),
            durable: None,
        };
        let mut bodies = Vec::new();
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            match frame.and_then(|rec| ingest.prepare(rec, &peer)) {
                Ok(body) => {
                    bodies.push(body);
                    replies.refused.push(None);
                }
                Err(r) => {
                    tracing::warn!(%peer, status = r.status, "refused a produce request: {}", r.message);
                    let fatal = r.fatal();
                    replies.refused.push(Some(r));
                    if fatal {
                        break;
                    }
                }
            }
            if replies.refused.len() < MAX_BATCH {
                next = buffered_frame(&mut rd, max);
            }
        }
        let fatal = matches!(replies.refused.last(), Some(Some(r)) if r.fatal());
        if !bodies.is_empty() {
            match ingest.log.submit_all(bodies).await {
                Ok(d) => replies.durable = Some(d),
                Err(e) => {
                    // Every queued frame is answered with the log's refusal.
                    let message = append_refusal(e);
                    for r in replies.refused.iter_mut().filter(|r| r.is_none()) {
                        *r = Some(Refusal::new(message.status, message.message.clone()));
                    }
                }
            }
        }
        if tx.send(replies).await.is_err() || fatal {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn too_large(len: usize, max: usize) -> Refusal {
    Refusal::new(
        TOO_LARGE,
        format!("frame of {len} bytes is over the limit of {max}"),
    )
}

/// The next frame, parsed, if the read buffer holds all of it; a frame over `max` is
/// refused as soon as its length is seen.
fn buffered_frame<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    max: usize,
) -> Option<Result<Record, Refusal>> {
    let b = rd.buffer();
    let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    if len > max {
        return Some(Err(too_large(len, max)));
    }
    let frame = parse_request(b.get(4..4 + len)?);
    rd.consume(4 + len);
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let rec = Record {
            topic: "temp.rack1".into(),
            key: Some(b"k".to_vec()),
            headers: vec![("unit".into(), b"C".to_vec())],
            timestamp_ms: 77,
            value: b"21.5".to_vec(),
        };
        let frame = encode_request(&rec);
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        assert_eq!(parse_request(&frame[4..]).unwrap(), rec);
    }

    #[test]
    fn a_record_must_leave_room_for_the_producers_stamp() {
        assert!(check_header_count(u16::MAX as usize - 1).is_ok());
        let r = check_header_count(u16::MAX as usize).unwrap_err();
        assert_eq!(r.status, BAD_REQUEST);
        assert!(r.message.contains("65535 headers"), "{}", r.message);
    }

    #[test]
    fn garbage_is_a_bad_request() {
        for garbage in [
            &b""[..],
            b"\x07",
            b"\x01\x00\x00",
            b"\x01\0\0\0\0\0\0\0\0\x00\x05ab",
        ] {
            let r = parse_request(garbage).unwrap_err();
            assert_eq!(r.status, BAD_REQUEST, "{garbage:?}");
            assert!(r.fatal());
        }
    }
}
