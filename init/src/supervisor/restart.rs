//! The restart policy after a service's unplanned end: whether it restarts at all (its
//! `restart`), after a backoff doubling from `backoff_initial` up to `backoff_max`, and
//! the crash-loop limit (`restart_limit` failures within `restart_window`), past which it
//! is given up, until `retry_failed` later (a box nobody visits must not stay degraded
//! for want of a `restart`). `CrashLoop::after_exit` decides; `Supervisor::failure` acts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::services::{RestartPolicy, ServiceSpec};

use super::{Exit, State, Supervisor};

/// A service's failures within its window, and its next backoff.
#[derive(Debug)]
pub(super) struct CrashLoop {
    recent: VecDeque<Instant>,
    backoff: Duration,
}

/// What follows an unplanned end.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Not restarted (its policy, or shutting down).
    Stop,
    /// Restarted too often within the window: given up.
    GiveUp { restarts: usize },
    /// Started again after `delay`.
    Restart { delay: Duration },
}

impl CrashLoop {
    pub(super) fn new(spec: &ServiceSpec) -> CrashLoop {
        CrashLoop {
            recent: VecDeque::new(),
            backoff: spec.backoff_initial,
        }
    }

    /// Forgets the failures: the next backoff is the first again.
    pub(super) fn clear(&mut self, spec: &ServiceSpec) {
        self.recent.clear();
        self.backoff = spec.backoff_initial;
    }

    /// The verdict on an end with `exit` of a process started at `started`.
    pub(super) fn after_exit(
        &mut self,
        spec: &ServiceSpec,
        exit: Exit,
        started: Instant,
        now: Instant,
        shutting_down: bool,
    ) -> Verdict {
        let restart = !shutting_down
            && match spec.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !exit.success(),
                RestartPolicy::Never => false,
            };
        if !restart {
            return Verdict::Stop;
        }
        // A service that ran longer than the window was healthy: start the count afresh.
        if now.duration_since(started) > spec.restart_window {
            self.clear(spec);
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > spec.restart_window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= spec.restart_limit as usize {
            return Verdict::GiveUp {
                restarts: self.recent.len(),
            };
        }
        self.recent.push_back(now);
        let delay = self.backoff;
        self.backoff = (self.backoff * 2).min(spec.backoff_max);
        Verdict::Restart { delay }
    }
}

impl Supervisor {
    /// Applies the restart policy after an unplanned end (or a failed spawn).
    pub(super) fn failure(&mut self, i: usize, exit: Exit, now: Instant) {
        let shutting_down = self.shutting_down;
        let s = &mut self.services[i];
        let name = s.spec.name.clone();
        match s
            .crash
            .after_exit(&s.spec, exit, s.started, now, shutting_down)
        {
            Verdict::Stop => {
                self.say(format!("service {name}: exited ({})", exit.describe()));
                self.set_state(i, State::Stopped);
            }
            Verdict::GiveUp { restarts } => {
                let msg = format!(
                    "service {name} failed: {restarts} restarts within {} s, last {}; giving up{}",
                    s.spec.restart_window.as_secs(),
                    exit.describe(),
                    match s.spec.retry_failed {
                        Some(d) => format!(", trying again in {} s", d.as_secs()),
                        None => String::new(),
                    }
                );
                // Failed, with the deadline of its next try (`Supervisor::advance`).
                s.deadline = s.spec.retry_failed.map(|d| now + d);
                self.set_state(i, State::Failed);
                self.warn(msg);
            }
            Verdict::Restart { delay } => {
                s.deadline = Some(now + delay);
                self.say(format!(
                    "service {name}: {}, restarting in {} ms",
                    exit.describe(),
                    delay.as_millis()
                ));
                self.set_state(i, State::Backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> ServiceSpec {
        let t = crate::services::parse(
            &format!(
                "[[service]]\nname = \"s\"\nexec = [\"/bin/true\"]\nbackoff_initial_ms = 100\nbackoff_max_ms = 300\nrestart_limit = 3\n{extra}"
            ),
            "test.toml",
        );
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        t.services.into_iter().next().unwrap()
    }

    #[test]
    fn backs_off_doubling_then_gives_up_within_the_window() {
        let spec = spec("");
        let mut c = CrashLoop::new(&spec);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let crash = Exit::Code(1);
        let verdicts: Vec<Verdict> = (0..4)
            .map(|n| c.after_exit(&spec, crash, t0, t0 + ms(n), false))
            .collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Restart { delay: ms(100) },
                Verdict::Restart { delay: ms(200) },
                Verdict::Restart { delay: ms(300) },
                Verdict::GiveUp { restarts: 3 },
            ]
        );
        // A run longer than the window was healthy: the count and the backoff start over.
        let later = t0 + spec.restart_window + ms(10);
        let mut c = CrashLoop::new(&spec);
        for n in 0..3 {
            c.after_exit(&spec, crash, t0, t0 + ms(n), false);
        }
        assert_eq!(
            c.after_exit(&spec, crash, t0, later, false),
            Verdict::Restart { delay: ms(100) }
        );
    }

    #[test]
    fn the_policy_and_a_shutdown_decide_whether_it_restarts_at_all() {
        let t = Instant::now();
        let on_failure = spec("restart = \"on-failure\"");
        let mut c = CrashLoop::new(&on_failure);
        assert_eq!(
            c.after_exit(&on_failure, Exit::Code(0), t, t, false),
            Verdict::Stop
        );
        assert!(matches!(
            c.after_exit(&on_failure, Exit::Signal(9), t, t, false),
            Verdict::Restart { .. }
        ));
        let never = spec("restart = \"never\"");
        assert_eq!(
            CrashLoop::new(&never).after_exit(&never, Exit::Code(1), t, t, false),
            Verdict::Stop
        );
        let always = spec("");
        assert_eq!(
            CrashLoop::new(&always).after_exit(&always, Exit::Code(1), t, t, true),
            Verdict::Stop
        );
    }
}
