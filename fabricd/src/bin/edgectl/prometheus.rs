//! `edgectl prometheus`: the boxes' metrics, as their fabricd scraped them
//! (fabricd/src/scrape.rs), written into the core's Prometheus through its remote-write
//! receiver (`--web.enable-remote-write-receiver`). Every sample keeps the time the box
//! scraped it and gains `site`, `machine` and `job` labels; each scrape also writes
//! `up` (0 when the box could not scrape that job) and `edge_scrape_timestamp_seconds`
//! (the scrape's time, which the "site silent" alert reads).
//!
//! A durable consumer of the core's stream: a scrape is acked once Prometheus took it
//! or refused it for good (4xx: a sample it already holds, or one older than its
//! out-of-order window), never before. Prometheus down is waited out, in order, so a
//! restart of either side loses nothing. One scrape per request: Prometheus takes or
//! refuses a request whole, and a replayed scrape must not take new ones down with it.
//!
//! Beside the scrapes, every `--attestation-every-secs` it writes what the core makes of
//! each enrolled box's last boot report (status.rs's `attestation`, as `edgectl status`
//! shows it): `edge_attestation{site,machine,job="core",state}`, 1 for the state it is
//! in (`trusted`, `quoted`, `refused`, `missing`) and 0 for the others. The box cannot
//! vouch for itself: this is the core's verdict, at the core's time.

use std::time::Duration;

use futures_util::StreamExt;
use prost::Message as _;

use crate::error::{Error, Result};
use crate::status::{attestation, Attestation};
use crate::Cli;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Prometheus' remote-write endpoint (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:9090/api/v1/write")]
    write_url: String,
    /// The durable consumer's name: a bridge restarted under it goes on where it stopped.
    #[arg(long, default_value = "prometheus-bridge")]
    durable: String,
    /// The boxes' scrape topic (fabricd's `[scrape] topic`).
    #[arg(long, default_value = "metrics")]
    topic: String,
    /// Stop after this many scrapes (tests).
    #[arg(long)]
    count: Option<u64>,
    /// Releases the core accepts, NAME=PATH of their pcr11.json (repeat), as for
    /// `status`: an enrolled box is `trusted` when its boot replays to one of them.
    #[arg(long = "release", requires = "release_key")]
    releases: Vec<String>,
    /// The key the releases must be signed by (as for `enroll`).
    #[arg(long)]
    release_key: Option<std::path::PathBuf>,
    /// A boot report older than this (by the box's clock against ours) is refused.
    #[arg(long, default_value_t = 900)]
    report_max_age_secs: u64,
    /// Seconds between two writes of the enrolled boxes' attestation (0: none).
    #[arg(long, default_value_t = 60)]
    attestation_every_secs: u64,
}

/// The states of `edge_attestation`.
const ATTESTATION_STATES: [&str; 4] = ["trusted", "quoted", "refused", "missing"];

/// The enrolled boxes' attestation as one request at `at_ms`: per box
/// (`<site>.<machine>`), one series per state, 1 for its own.
fn attestation_request(boxes: &[(String, Attestation)], at_ms: i64) -> WriteRequest {
    let mut timeseries = Vec::new();
    for (key, a) in boxes {
        let (site, machine) = key.split_once('.').unwrap_or((key, ""));
        let own = match a {
            Attestation::Trusted { .. } => "trusted",
            Attestation::Quoted => "quoted",
            Attestation::Refused(_) => "refused",
            Attestation::Missing => "missing",
        };
        for state in ATTESTATION_STATES {
            let mut labels: Vec<Label> = [
                ("__name__", "edge_attestation"),
                ("job", "core"),
                ("machine", machine),
                ("site", site),
                ("state", state),
            ]
            .iter()
            .map(|(n, v)| Label {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect();
            labels.sort_by(|a, b| a.name.cmp(&b.name));
            timeseries.push(TimeSeries {
                labels,
                samples: vec![Sample {
                    value: if state == own { 1.0 } else { 0.0 },
                    timestamp: at_ms,
                }],
            });
        }
    }
    WriteRequest { timeseries }
}

/// Writes the enrolled boxes' attestation every `--attestation-every-secs`, for as long
/// as the bridge runs; what fails is said and tried again next time.
async fn write_attestations(
    cli: &Cli,
    js: &async_nats::jetstream::Context,
    args: &Args,
    host: &str,
    path: &str,
) -> Result<()> {
    let releases = crate::accepted_releases(&args.releases, args.release_key.as_deref())?;
    if args.attestation_every_secs == 0 {
        return std::future::pending().await;
    }
    loop {
        let reports = crate::status::reports(cli, js).await;
        let enrolled = crate::status::enrolled(cli, js).await;
        let now = crate::unix_now();
        let boxes: Vec<(String, Attestation)> = match &reports {
            Ok(reports) => enrolled
                .iter()
                .filter_map(|(key, e)| {
                    let report = reports.get(key).map(|(_, r)| r);
                    let a = attestation(Some(e), report, now, args.report_max_age_secs, &releases)?;
                    Some((key.clone(), a))
                })
                .collect(),
            Err(e) => {
                eprintln!("edgectl prometheus: the boxes' attestation not written: {e}");
                Vec::new()
            }
        };
        if !boxes.is_empty() {
            let request = attestation_request(&boxes, now as i64 * 1000);
            let body = snap::raw::Encoder::new()
                .compress_vec(&request.encode_to_vec())
                .map_err(|e| Error::Invalid {
                    what: "the attestation request".into(),
                    why: format!("cannot be compressed: {e}"),
                })?;
            match post(host, path, &body).await {
                Ok(Answer::Taken) => {}
                Ok(Answer::Refused(why)) | Err(why) => {
                    eprintln!("edgectl prometheus: the boxes' attestation not written: {why}")
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(args.attestation_every_secs)).await;
    }
}

// Prometheus remote write 1.0 (prometheus/prompb/remote.proto, types.proto): the field
// numbers are the specification's.
#[derive(Clone, PartialEq, prost::Message)]
struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Label {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(double, tag = "1")]
    value: f64,
    #[prost(int64, tag = "2")]
    timestamp: i64,
}

/// Where one scrape came from, read off its subject.
#[derive(Debug, PartialEq)]
struct Origin<'a> {
    site: &'a str,
    machine: &'a str,
    job: &'a str,
}

/// `<prefix>.<site>.<machine>.<topic>.<job>`.
fn origin<'a>(subject: &'a str, prefix: &str, topic: &str) -> Option<Origin<'a>> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (site, rest) = rest.split_once('.')?;
    let (machine, rest) = rest.split_once('.')?;
    let job = rest.strip_prefix(topic)?.strip_prefix('.')?;
    Some(Origin { site, machine, job })
}

/// The labels the core adds; a box's own label of one of these names is kept as
/// `exported_<name>`, as Prometheus does for scraped targets.
const OURS: [&str; 3] = ["job", "machine", "site"];

/// One scrape as a remote-write request: each sample at `at_ms`, labelled with where it
/// came from, then `up` and `edge_scrape_timestamp_seconds`. `exposition` is None when
/// the box could not scrape the job.
fn write_request(from: &Origin, at_ms: i64, exposition: Option<&str>) -> (WriteRequest, String) {
    let (samples, problem) = match exposition.map(edge_common::metrics::parse) {
        Some(Ok(s)) => (s, String::new()),
        Some(Err(why)) => (Vec::new(), format!("not an exposition: {why}")),
        None => (Vec::new(), String::new()),
    };
    let up = exposition.is_some() && problem.is_empty();
    let ours = [
        ("job", from.job),
        ("machine", from.machine),
        ("site", from.site),
    ];
    let series = |name: &str, own: &[(String, String)], value: f64| {
        let mut labels: Vec<Label> = own
            .iter()
            .map(|(n, v)| Label {
                name: if OURS.contains(&n.as_str()) {
                    format!("exported_{n}")
                } else {
                    n.clone()
                },
                value: v.clone(),
            })
            .chain(ours.iter().map(|(n, v)| Label {
                name: n.to_string(),
                value: v.to_string(),
            }))
            .chain([Label {
                name: "__name__".into(),
                value: name.into(),
            }])
            .collect();
        // The specification wants them sorted by name.
        labels.sort_by(|a, b| a.name.cmp(&b.name));
        TimeSeries {
            labels,
            samples: vec![Sample {
                value,
                timestamp: at_ms,
            }],
        }
    };
    let mut timeseries: Vec<TimeSeries> = samples
        .iter()
        .map(|s| series(&s.name, &s.labels, s.value))
        .collect();
    timeseries.push(series("up", &[], if up { 1.0 } else { 0.0 }));
    timeseries.push(series(
        "edge_scrape_timestamp_seconds",
        &[],
        at_ms as f64 / 1000.0,
    ));
    (WriteRequest { timeseries }, problem)
}

/// `http://host:port/path` as (host:port, /path).
fn split_url(url: &str) -> Result<(String, String)> {
    let invalid = |why: &str| Error::Invalid {
        what: format!("--write-url {url}"),
        why: why.into(),
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("must start with http:// (Prometheus on the core's network)"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/api/v1/write"),
    };
    if host.is_empty() {
        return Err(invalid("has no host"));
    }
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok((host, path.to_owned()))
}

/// What Prometheus said to one request.
enum Answer {
    Taken,
    /// Refused for good (a 4xx, or a 5xx naming a sample never taken), with its reason.
    Refused(String),
}

/// POSTs one snappy-compressed request; Err: try again later (no answer, or a 5xx).
async fn post(host: &str, path: &str, body: &[u8]) -> std::result::Result<Answer, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("cannot connect to {host}: {e}"))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\nX-Prometheus-Remote-Write-Version: 0.1.0\r\nUser-Agent: edgectl\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {host}: {e}"))?;
        s.write_all(body)
            .await
            .map_err(|e| format!("cannot send to {host}: {e}"))?;
        let mut reply = Vec::new();
        (&mut s)
            .take(64 << 10)
            .read_to_end(&mut reply)
            .await
            .map_err(|e| format!("no answer from {host}: {e}"))?;
        Ok::<_, String>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| format!("no answer from {host} within 30 s"))??;
    let text = String::from_utf8_lossy(&reply);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{host} did not answer HTTP"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .unwrap_or("");
    Ok(answer(status, body)).and_then(|a| a.map_err(|e| format!("{host} {e}")))
}

/// What Prometheus' status and body mean: Err to try again later. A 4xx is a refusal for
/// good, and so is a 5xx naming a sample it will never take: Prometheus before 2.47
/// (Debian 12 ships 2.42) answers 500 for a sample older than its out-of-order window,
/// and retrying that would hold up every scrape behind it.
fn answer(status: u16, body: &str) -> std::result::Result<Answer, String> {
    const NEVER_TAKEN: [&str; 4] = [
        "too old sample",
        "out of bounds",
        "out of order sample",
        "duplicate sample for timestamp",
    ];
    match status {
        200..=299 => Ok(Answer::Taken),
        400..=499 => Ok(Answer::Refused(format!("{status} {body}"))),
        _ if NEVER_TAKEN.iter().any(|n| body.contains(n)) => {
            Ok(Answer::Refused(format!("{status} {body}")))
        }
        _ => Err(format!("answered {status} {body}")),
    }
}

pub(crate) async fn run(cli: &Cli, js: &async_nats::jetstream::Context, args: &Args) -> Result<()> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use async_nats::jetstream::AckKind;
    let (host, path) = split_url(&args.write_url)?;
    let stream = js
        .get_stream(&cli.stream)
        .await
        .map_err(fabricd::Error::core(format!("no stream {}", cli.stream)))?;
    let consumer = stream
        .get_or_create_consumer(
            &args.durable,
            pull::Config {
                durable_name: Some(args.durable.clone()),
                filter_subject: format!("{}.*.*.{}.>", cli.prefix, args.topic),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 256,
                ..Default::default()
            },
        )
        .await
        .map_err(fabricd::Error::core(format!(
            "failed to create consumer {}",
            args.durable
        )))?;
    let mut msgs = consumer
        .messages()
        .await
        .map_err(fabricd::Error::core("failed to read"))?;
    eprintln!(
        "edgectl prometheus: {} -> {}",
        format_args!("{}.*.*.{}.>", cli.prefix, args.topic),
        args.write_url
    );
    let scrapes = async {
        let (mut written, mut refused) = (0u64, 0u64);
        let mut said = std::time::Instant::now();
        while args.count.is_none_or(|c| written + refused < c) {
            let Some(m) = msgs.next().await else { break };
            let m = m.map_err(fabricd::Error::core("failed to read"))?;
            let header = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            let id = header("Nats-Msg-Id").unwrap_or_default();
            let Some(from) = origin(&m.subject, &cli.prefix, &args.topic) else {
                eprintln!(
                    "edgectl prometheus: {} {id}: not a scrape's subject; skipped",
                    m.subject
                );
                let _ = m.ack().await;
                continue;
            };
            let at_ms = header("Fabric-Timestamp")
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| edge_common::unix_ms() as i64);
            let value =
                fabricd::uplink::decode(&m.payload, header("Fabric-Encoding").as_deref(), 64 << 20);
            let failed = header(fabricd::scrape::ERROR_HEADER);
            let text = match (&failed, &value) {
                (Some(_), _) => None,
                (None, Ok(v)) => Some(String::from_utf8_lossy(v).into_owned()),
                (None, Err(e)) => {
                    eprintln!(
                        "edgectl prometheus: {} {id}: {e}; written as up 0",
                        m.subject
                    );
                    None
                }
            };
            let (request, problem) = write_request(&from, at_ms, text.as_deref());
            if !problem.is_empty() {
                eprintln!(
                    "edgectl prometheus: {} {id}: {problem}; written as up 0",
                    m.subject
                );
            }
            let body = snap::raw::Encoder::new()
                .compress_vec(&request.encode_to_vec())
                .map_err(|e| Error::Invalid {
                    what: format!("{} {id}", m.subject),
                    why: format!("cannot be compressed: {e}"),
                })?;
            let mut wait = Duration::from_secs(1);
            let answer = loop {
                match post(&host, &path, &body).await {
                    Ok(a) => break a,
                    Err(why) => {
                        eprintln!("edgectl prometheus: {why}; trying again in {wait:?}");
                        let _ = m.ack_with(AckKind::Progress).await;
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                }
            };
            match answer {
                Answer::Taken => written += 1,
                Answer::Refused(why) => {
                    refused += 1;
                    eprintln!(
                        "edgectl prometheus: {} {id}: Prometheus refused it: {why}",
                        m.subject
                    );
                }
            }
            m.ack()
                .await
                .map_err(fabricd::Error::core("failed to ack"))?;
            if said.elapsed() >= Duration::from_secs(60) {
                eprintln!("edgectl prometheus: {written} scrapes written, {refused} refused");
                said = std::time::Instant::now();
            }
        }
        eprintln!("edgectl prometheus: {written} scrapes written, {refused} refused");
        Ok::<(), Error>(())
    };
    tokio::select! {
        r = scrapes => r,
        r = write_attestations(cli, js, args, &host, &path) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_box_attestation_is_one_series_per_state_one_of_them_1() {
        let boxes = [
            (
                "plant7.edge0".to_owned(),
                Attestation::Trusted {
                    release: "1.2.0".into(),
                    slot: "a".into(),
                },
            ),
            (
                "plant7.edge1".to_owned(),
                Attestation::Refused("old".into()),
            ),
        ];
        let r = attestation_request(&boxes, 5000);
        assert_eq!(r.timeseries.len(), 8);
        let ones: Vec<String> = r
            .timeseries
            .iter()
            .filter(|t| {
                t.samples
                    == vec![Sample {
                        value: 1.0,
                        timestamp: 5000,
                    }]
            })
            .map(|t| {
                let names: Vec<&str> = t.labels.iter().map(|l| l.name.as_str()).collect();
                assert_eq!(names, ["__name__", "job", "machine", "site", "state"]);
                let v: Vec<&str> = t.labels.iter().map(|l| l.value.as_str()).collect();
                v.join(" ")
            })
            .collect();
        assert_eq!(
            ones,
            [
                "edge_attestation core edge0 plant7 trusted",
                "edge_attestation core edge1 plant7 refused"
            ]
        );
    }

    #[test]
    fn a_sample_prometheus_will_never_take_is_refused_not_retried() {
        assert!(matches!(answer(204, ""), Ok(Answer::Taken)));
        assert!(matches!(
            answer(400, "out of order sample"),
            Ok(Answer::Refused(_))
        ));
        assert!(matches!(
            answer(500, "too old sample"),
            Ok(Answer::Refused(_))
        ));
        assert_eq!(
            answer(503, "TSDB not ready").err().as_deref(),
            Some("answered 503 TSDB not ready")
        );
    }

    fn names(ts: &TimeSeries) -> Vec<(&str, &str)> {
        ts.labels
            .iter()
            .map(|l| (l.name.as_str(), l.value.as_str()))
            .collect()
    }

    #[test]
    fn a_scrape_becomes_series_labelled_with_its_box_at_its_own_time() {
        let from = origin("edge.plant7.edge0.metrics.noded", "edge", "metrics").unwrap();
        assert_eq!(
            from,
            Origin {
                site: "plant7",
                machine: "edge0",
                job: "noded"
            }
        );
        assert_eq!(
            origin("edge.plant7.edge0.alarms.x", "edge", "metrics"),
            None
        );
        let text = "# TYPE noded_pods gauge\nnoded_pods{phase=\"running\",site=\"own\"} 3\n";
        let (req, problem) = write_request(&from, 1_700_000_000_123, Some(text));
        assert!(problem.is_empty());
        let [pods, up, stamp] = &req.timeseries[..] else {
            panic!("{req:?}")
        };
        assert_eq!(
            names(pods),
            vec![
                ("__name__", "noded_pods"),
                ("exported_site", "own"),
                ("job", "noded"),
                ("machine", "edge0"),
                ("phase", "running"),
                ("site", "plant7"),
            ]
        );
        assert_eq!(
            pods.samples,
            vec![Sample {
                value: 3.0,
                timestamp: 1_700_000_000_123
            }]
        );
        assert_eq!(names(up)[0], ("__name__", "up"));
        assert_eq!(up.samples[0].value, 1.0);
        assert_eq!(stamp.samples[0].value, 1_700_000_000.123);
        // A failed scrape, and a value that is not an exposition: up 0, nothing else.
        for (value, said) in [(None, false), (Some("garbage here\n"), true)] {
            let (req, problem) = write_request(&from, 5, value);
            assert_eq!(req.timeseries.len(), 2);
            assert_eq!(req.timeseries[0].samples[0].value, 0.0);
            assert_eq!(!problem.is_empty(), said, "{problem}");
        }
    }

    #[test]
    fn the_write_url_is_plain_http() {
        assert_eq!(
            split_url("http://prom:9090/api/v1/write").unwrap(),
            ("prom:9090".into(), "/api/v1/write".into())
        );
        assert_eq!(split_url("http://prom").unwrap().0, "prom:80");
        assert!(split_url("https://prom/api/v1/write").is_err());
        assert!(split_url("http:///x").is_err());
    }
}
