//! The box's metrics, sent to the core: every `interval_secs` fabricd scrapes each of the
//! box's own `/metrics` endpoints and exposition files (init's; a file not rewritten for
//! 60 s counts as failed) (`[scrape]` in fabricd.toml) and appends what it read
//! as one record on `<topic>.<job>`, stamped with the time of the scrape. The records go
//! up like any other: a cut delays them (within their class's retention) and loses
//! none, and the uplink compresses them. At the core, `edgectl prometheus` writes them
//! into Prometheus with these timestamps, so a cut shows there as a late backfill.
//!
//! A scrape that fails (no answer, an error status, a stale file, or text that is not
//! the exposition format: checked here with `edge_metrics::parse`, so the core is not
//! sent what it cannot read) is still a record: an empty value with [`ERROR_HEADER`]
//! saying why, which the core turns into `up 0`. Failures are counted per job
//! ([`Stats`], `fabricd_scrape_failures_total` on fabricd's own `/metrics`) and logged
//! when a job starts failing or fails for another reason, and when it works again, not
//! every interval. Scraping is pull: it never holds up the service scraped, and a record
//! the log refuses (over its limits) is logged and dropped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::ScrapeConfig;
use crate::produce::Ingest;
use crate::record::Record;

/// The record header of a failed scrape: what went wrong.
pub const ERROR_HEADER: &str = "Scrape-Error";
/// Who the scrape records are from (their `Edge-Producer`).
pub const PRODUCER: &str = "fabricd/scrape";
/// The largest exposition read from one endpoint.
const LIMIT: usize = 4 << 20;
/// A file target not rewritten for this long is a failed scrape: its writer is stuck.
const STALE: Duration = Duration::from_secs(60);

/// A file target's exposition, unless it is missing, too large or stale.
fn read_file(path: &std::path::Path, stale: Duration) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > LIMIT as u64 {
        return Err(format!("{} is over {LIMIT} bytes", path.display()));
    }
    let age = meta
        .modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .unwrap_or_default();
    if age > stale {
        return Err(format!(
            "{} not rewritten for {} s",
            path.display(),
            age.as_secs()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Scrapes made and failed, per job, since fabricd started.
#[derive(Debug, Default)]
pub struct Stats {
    jobs: Mutex<BTreeMap<String, JobStats>>,
}

#[derive(Debug, Default, Clone)]
struct JobStats {
    scrapes: u64,
    failures: u64,
    /// Why the last scrape failed; None when it worked.
    last_error: Option<String>,
}

impl Stats {
    /// Counts one scrape of `job`; logs a failure that is new (the job worked, or failed
    /// otherwise, before) and a recovery.
    fn count(&self, job: &str, result: &Result<String, String>) {
        let mut jobs = edge_common::lock(&self.jobs);
        let s = jobs.entry(job.to_owned()).or_default();
        s.scrapes += 1;
        match result {
            Ok(_) => {
                if s.last_error.take().is_some() {
                    tracing::info!(%job, "scrape works again");
                }
            }
            Err(why) => {
                s.failures += 1;
                if s.last_error.as_ref() != Some(why) {
                    tracing::warn!(%job, "scrape failed: {why} (sent to the core as up 0; said again only if the reason changes)");
                    s.last_error = Some(why.clone());
                }
            }
        }
    }

    /// (job, scrapes, failures), by job.
    pub fn snapshot(&self) -> Vec<(String, u64, u64)> {
        let jobs = edge_common::lock(&self.jobs);
        jobs.iter()
            .map(|(j, s)| (j.clone(), s.scrapes, s.failures))
            .collect()
    }
}

/// The exposition as scraped, unless it is not the text format.
fn checked(text: String) -> Result<String, String> {
    match edge_common::metrics::parse(&text) {
        Ok(_) => Ok(text),
        Err(e) => Err(format!("not the exposition format: {e}")),
    }
}

/// Scrapes every target each interval, for as long as fabricd runs.
pub async fn run(config: ScrapeConfig, ingest: Arc<Ingest>, stats: Arc<Stats>) {
    let every = Duration::from_secs(config.interval_secs);
    // A scrape must end before the next is due.
    let timeout = every.min(Duration::from_secs(10));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let at = edge_common::unix_ms() as i64;
        let files = config
            .files
            .iter()
            .map(|(job, path)| (job, read_file(path, STALE)));
        let mut results: Vec<(&String, Result<String, String>)> = files.collect();
        for (job, addr) in &config.targets {
            results.push((job, scrape(*addr, timeout, LIMIT).await));
        }
        for (job, result) in results {
            let result = result.and_then(checked);
            stats.count(job, &result);
            let rec = record(&config.topic, job, at, result);
            match ingest.submit(rec, PRODUCER).await {
                // Durable soon; nothing waits for it.
                Ok(_) => {}
                Err(refused) => tracing::warn!(%job, "scrape not kept: {}", refused.message),
            }
        }
    }
}

/// One scrape's record: the exposition, or an empty value naming what failed.
fn record(topic: &str, job: &str, at_ms: i64, result: Result<String, String>) -> Record {
    let (value, headers) = match result {
        Ok(text) => (text.into_bytes(), Vec::new()),
        Err(why) => (
            Vec::new(),
            vec![(ERROR_HEADER.to_owned(), why.into_bytes())],
        ),
    };
    Record {
        topic: format!("{topic}.{job}"),
        key: None,
        headers,
        timestamp_ms: at_ms,
        value,
    }
}

/// `GET /metrics` at `addr` (a daemon's loopback endpoint): the body of a 200 answer, or
/// why there is none. Waits at most `timeout` in all and reads at most `limit` bytes.
async fn scrape(
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
    limit: usize,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("cannot send: {e}"))?;
        let mut reply = Vec::new();
        (&mut s)
            .take(limit as u64 + 1)
            .read_to_end(&mut reply)
            .await
            .map_err(|e| format!("cannot read: {e}"))?;
        if reply.len() > limit {
            return Err(format!("the answer is over {limit} bytes"));
        }
        Ok(reply)
    };
    let reply = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    let text = String::from_utf8(reply).map_err(|_| "the answer is not UTF-8".to_owned())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the answer is not HTTP")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
        return Err(format!("answered `{status}`"));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_target_is_read_unless_missing_or_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("init.prom");
        assert!(read_file(&f, STALE).unwrap_err().contains("init.prom"));
        std::fs::write(&f, "init_ready 1\n").unwrap();
        assert_eq!(read_file(&f, STALE).unwrap(), "init_ready 1\n");
        std::thread::sleep(Duration::from_millis(20));
        let e = read_file(&f, Duration::from_millis(10)).unwrap_err();
        assert!(e.contains("not rewritten for"), "{e}");
    }

    #[test]
    fn text_that_is_not_the_exposition_format_fails_and_failures_are_counted() {
        let good = "# TYPE up gauge\nup 1\n".to_owned();
        assert_eq!(checked(good.clone()), Ok(good.clone()));
        let bad = checked("<html>oops</html>\n".into()).unwrap_err();
        assert!(bad.starts_with("not the exposition format: "), "{bad}");
        let stats = Stats::default();
        stats.count("noded", &Ok(good));
        stats.count("noded", &Err(bad.clone()));
        stats.count("noded", &Err(bad));
        stats.count("init", &Err("stale".into()));
        assert_eq!(
            stats.snapshot(),
            vec![("init".into(), 1, 1), ("noded".into(), 3, 2)]
        );
    }

    #[test]
    fn a_failed_scrape_is_a_record_that_says_why() {
        let ok = record("metrics", "noded", 7, Ok("up 1\n".into()));
        assert_eq!(ok.topic, "metrics.noded");
        assert_eq!((ok.timestamp_ms, &ok.value[..]), (7, &b"up 1\n"[..]));
        assert!(ok.headers.is_empty());
        let failed = record("metrics", "noded", 8, Err("cannot connect: refused".into()));
        assert!(failed.value.is_empty());
        assert_eq!(
            failed.headers,
            vec![(ERROR_HEADER.to_owned(), b"cannot connect: refused".to_vec())]
        );
    }
}
