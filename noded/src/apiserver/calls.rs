//! Every call to the server: a timeout, a retry with back-off, and failures logged
//! once and then at most every [`LOG_EVERY`].

use std::fmt::Display;
use std::time::{Duration, Instant};

use super::{CALL_TIMEOUT, LOG_EVERY};
use crate::error::{Error, Result};

/// A call with its timeout; a failure is [`Error::ApiCall`], with the HTTP status when
/// the server answered.
pub(super) async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(kube::Error::Api(s))) => Err(Error::ApiCall {
            code: Some(s.code),
            message: format!("{} ({} {})", s.message, s.code, s.reason),
        }),
        Ok(Err(e)) => Err(Error::ApiCall {
            code: None,
            message: e.to_string(),
        }),
        Err(_) => Err(Error::ApiCall {
            code: None,
            message: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        }),
    }
}

/// Logs a failing operation once, then at most every [`LOG_EVERY`], and says when it
/// works again: an outage is a few lines, not one per retry.
pub(super) struct Limited {
    what: &'static str,
    failing: bool,
    last: Option<Instant>,
    suppressed: u32,
}

impl Limited {
    pub(super) fn new(what: &'static str) -> Self {
        Limited {
            what,
            failing: false,
            last: None,
            suppressed: 0,
        }
    }

    pub(super) fn fail(&mut self, e: &dyn Display) {
        self.failing = true;
        if self.last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            let more = match self.suppressed {
                0 => String::new(),
                n => format!(" ({n} more failures since the last message)"),
            };
            tracing::warn!("{} failed: {e}{more}", self.what);
            self.last = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    pub(super) fn ok(&mut self) {
        if self.failing {
            tracing::info!("{}: the API server answers again", self.what);
        }
        self.failing = false;
        self.last = None;
        self.suppressed = 0;
    }
}

/// 200 ms, doubling up to a ceiling; also the watcher's back-off (kube's trait, which
/// the shared type cannot take here).
pub(super) struct Retry(edge_common::Backoff);

impl Retry {
    pub(super) fn new(max: Duration) -> Self {
        Retry(edge_common::Backoff::new(Duration::from_millis(200), max))
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        self.0.next_delay()
    }

    pub(super) fn reset(&mut self) {
        self.0.reset()
    }
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(self.next_delay())
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {
        Retry::reset(self)
    }
}
