//! The record: what a producer hands us (topic, optional key, headers, timestamp, value)
//! and its stored form, which is the same bytes on disk, in the uplink and in tests.
//!
//! Stored frame (little-endian, as the log is only read on this machine):
//! `[u32 body_len][u32 crc32c(body)][body]`, where body is
//! `[u64 offset][i64 timestamp_ms][u16 topic_len][topic][u32 key_len | u32::MAX = none][key]
//!  [u16 header_count]{[u16 name_len][name][u32 value_len][value]}[value: the rest]`.

use std::fmt;

/// Bytes before the body: its length and its CRC.
pub const FRAME_HEADER: usize = 8;
/// Longest topic; topics become NATS subject tokens.
pub const MAX_TOPIC: usize = 200;
const NO_KEY: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: i64,
    pub value: Vec<u8>,
}

/// A record read back from the log with the offset the log gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub offset: u64,
    /// The CRC32C of its stored body (offset, time, topic, key, headers and value): the
    /// uplink names the record by it beside its offset, so that another record at the
    /// same offset (a log restored from a backup) is told apart at the core.
    pub crc: u32,
    pub record: Record,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Short(&'static str),
    Crc { stored: u32, computed: u32 },
    BadTopic(String),
    NotUtf8(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Short(what) => write!(f, "record ends inside its {what}"),
            DecodeError::Crc { stored, computed } => {
                write!(
                    f,
                    "CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
            DecodeError::BadTopic(why) => write!(f, "bad topic: {why}"),
            DecodeError::NotUtf8(what) => write!(f, "{what} is not UTF-8"),
        }
    }
}

/// A topic is dot-separated tokens of letters, digits, '-' and '_': it is appended to a
/// NATS subject, where '*', '>' and spaces have meanings of their own.
pub fn check_topic(topic: &str) -> Result<(), crate::Error> {
    if topic.is_empty() || topic.len() > MAX_TOPIC {
        return Err(crate::Error::TopicLength);
    }
    for token in topic.split('.') {
        let ok = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(crate::Error::Name {
                what: "topic",
                name: topic.to_owned(),
                rule: "dot-separated tokens of letters, digits, '-' or '_'",
            });
        }
    }
    Ok(())
}

impl Record {
    /// The body as stored, with a zero offset the log fills in when it appends.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.encode_body_into(None, &mut b);
        b
    }

    /// The body as stored into `b` (cleared first, its memory reused), with `extra` as
    /// its last header (the producer's stamp) when given.
    pub fn encode_body_into(&self, extra: Option<(&str, &[u8])>, b: &mut Vec<u8>) {
        let extra_len = extra.map_or(0, |(n, v)| 2 + n.len() + 4 + v.len());
        b.clear();
        b.reserve(self.encoded_len() + extra_len);
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        b.extend_from_slice(&(self.topic.len() as u16).to_le_bytes());
        b.extend_from_slice(self.topic.as_bytes());
        match &self.key {
            Some(k) => {
                b.extend_from_slice(&(k.len() as u32).to_le_bytes());
                b.extend_from_slice(k);
            }
            None => b.extend_from_slice(&NO_KEY.to_le_bytes()),
        }
        let count = self.headers.len() + usize::from(extra.is_some());
        b.extend_from_slice(&(count as u16).to_le_bytes());
        let own = self.headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
        for (name, value) in own.chain(extra) {
            b.extend_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(value.len() as u32).to_le_bytes());
            b.extend_from_slice(value);
        }
        b.extend_from_slice(&self.value);
    }

    /// Length of the body (without the 8-byte frame header).
    pub fn encoded_len(&self) -> usize {
        8 + 8
            + 2
            + self.topic.len()
            + 4
            + self.key.as_ref().map_or(0, Vec::len)
            + 2
            + self
                .headers
                .iter()
                .map(|(n, v)| 2 + n.len() + 4 + v.len())
                .sum::<usize>()
            + self.value.len()
    }
}

/// Frames a body whose offset field is already set.
pub fn frame(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Short(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// Decodes a whole frame whose CRC [`check_frame`] has checked.
pub fn decode_frame(frame: &[u8]) -> Result<Stored, DecodeError> {
    let mut r = Reader { buf: frame };
    let _len = r.u32("frame length")?;
    let crc = r.u32("frame CRC")?;
    decode_body(r.buf, crc)
}

/// Decodes a body whose CRC is `crc`.
fn decode_body(body: &[u8], crc: u32) -> Result<Stored, DecodeError> {
    let mut r = Reader { buf: body };
    let offset = r.u64("offset")?;
    let timestamp_ms = r.u64("timestamp")? as i64;
    let tlen = r.u16("topic length")? as usize;
    let topic = std::str::from_utf8(r.take(tlen, "topic")?)
        .map_err(|_| DecodeError::NotUtf8("topic"))?
        .to_owned();
    let klen = r.u32("key length")?;
    let key = if klen == NO_KEY {
        None
    } else {
        Some(r.take(klen as usize, "key")?.to_vec())
    };
    let n = r.u16("header count")?;
    let mut headers = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let nlen = r.u16("header name length")? as usize;
        let name = std::str::from_utf8(r.take(nlen, "header name")?)
            .map_err(|_| DecodeError::NotUtf8("header name"))?
            .to_owned();
        let vlen = r.u32("header value length")? as usize;
        headers.push((name, r.take(vlen, "header value")?.to_vec()));
    }
    Ok(Stored {
        offset,
        crc,
        record: Record {
            topic,
            key,
            headers,
            timestamp_ms,
            value: r.buf.to_vec(),
        },
    })
}

/// Looks at the frame at the start of `buf`. `Ok(None)`: the buffer ends inside it
/// (a torn tail, or simply not read yet). `Ok(Some(len))`: a whole frame of `len` bytes
/// whose CRC matches.
pub fn check_frame(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < FRAME_HEADER {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let stored = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if buf.len() < FRAME_HEADER + len {
        return Ok(None);
    }
    let body = &buf[FRAME_HEADER..FRAME_HEADER + len];
    let computed = crc32c::crc32c(body);
    if computed != stored {
        return Err(DecodeError::Crc { stored, computed });
    }
    Ok(Some(FRAME_HEADER + len))
}

/// The offset stored in a framed record (the first 8 bytes of its body); `None` when the
/// body is shorter than that (a zero-filled stretch of a segment frames as an empty body
/// with a matching CRC: no record of ours).
pub fn frame_offset(frame: &[u8]) -> Option<u64> {
    let b = frame.get(FRAME_HEADER..FRAME_HEADER + 8)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            topic: "temp.rack1".into(),
            key: Some(b"sensor-7".to_vec()),
            headers: vec![("unit".into(), b"C".to_vec()), ("empty".into(), vec![])],
            timestamp_ms: 1_700_000_000_123,
            value: b"21.5".to_vec(),
        }
    }

    #[test]
    fn record_survives_encode_and_decode() {
        let rec = sample();
        let mut body = rec.encode_body();
        assert_eq!(body.len(), rec.encoded_len());
        body[..8].copy_from_slice(&42u64.to_le_bytes());
        let mut framed = Vec::new();
        frame(&body, &mut framed);
        assert_eq!(check_frame(&framed), Ok(Some(framed.len())));
        assert_eq!(frame_offset(&framed), Some(42));
        // Found by the log_segment fuzz target: eight zero bytes are a whole frame (empty
        // body, CRC 0) whose offset cannot be read; it used to panic.
        assert_eq!(check_frame(&[0u8; 8]).unwrap(), Some(8));
        assert_eq!(frame_offset(&[0u8; 8]), None);
        let back = decode_frame(&framed).unwrap();
        assert_eq!(back.offset, 42);
        assert_eq!(back.crc, crc32c::crc32c(&body));
        assert_eq!(back.record, rec);
    }

    #[test]
    fn an_extra_header_is_stored_last_as_if_the_record_had_it() {
        let rec = sample();
        let mut stamped = rec.clone();
        stamped
            .headers
            .push(("Edge-Producer".into(), b"local:app/uid=0".to_vec()));
        let mut body = Vec::new();
        rec.encode_body_into(Some(("Edge-Producer", b"local:app/uid=0")), &mut body);
        assert_eq!(body, stamped.encode_body());
        assert_eq!(body.len(), stamped.encoded_len());
    }

    #[test]
    fn absent_key_differs_from_empty_key() {
        let mut rec = sample();
        rec.key = None;
        assert_eq!(decode_body(&rec.encode_body(), 0).unwrap().record.key, None);
        rec.key = Some(vec![]);
        assert_eq!(
            decode_body(&rec.encode_body(), 0).unwrap().record.key,
            Some(vec![])
        );
    }

    #[test]
    fn flipped_bit_fails_the_crc_and_short_buffer_is_incomplete() {
        let mut framed = Vec::new();
        frame(&sample().encode_body(), &mut framed);
        assert_eq!(check_frame(&framed[..framed.len() - 1]), Ok(None));
        framed[12] ^= 1;
        assert!(matches!(check_frame(&framed), Err(DecodeError::Crc { .. })));
    }

    #[test]
    fn topics_must_be_subject_tokens() {
        assert!(check_topic("alarms.door-3").is_ok());
        for bad in ["", "a..b", "a.*", "a >", ".a", "a.", "ü"] {
            assert!(check_topic(bad).is_err(), "{bad:?} accepted");
        }
    }
}
