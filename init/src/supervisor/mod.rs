//! Supervision of the service table: starting services when their dependencies are ready,
//! readiness (notify pipe, unix socket, none), capturing output, restart with backoff and
//! the crash-loop limit, and stopping in reverse dependency order. Everything here is
//! non-blocking and driven by [`Supervisor::step`], so the same code runs as PID 1 and in
//! host tests against a temp dir.
//!
//! This file holds the table, its states and the step loop (dependencies, timers, stop
//! and shutdown order, requests); each room beside it one concern: `spawn` starting a
//! process, `output` its pipes and logs, `readiness` its notify pipe, `restart` the
//! restart policy and crash-loop limit.

mod output;
mod readiness;
mod restart;
mod spawn;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::logs::LogStore;
use crate::services::{KillMode, Readiness, ServiceSpec};

use output::Stream;
use restart::CrashLoop;
use spawn::signal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Waiting,
    Starting,
    Ready,
    Backoff,
    Stopping,
    Stopped,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Ready => "ready",
            State::Backoff => "backoff",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

/// A control request about service `name` refused, saying why.
fn refused(name: &str, detail: String) -> Error {
    Error::Service {
        name: name.to_owned(),
        detail,
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn from_status(status: i32) -> Exit {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
    fn success(self) -> bool {
        self == Exit::Code(0)
    }
    fn json(self) -> Value {
        match self {
            Exit::Code(c) => json!({"code": c}),
            Exit::Signal(s) => json!({"signal": s}),
        }
    }
    fn describe(self) -> String {
        match self {
            Exit::Code(c) => format!("exit code {c}"),
            Exit::Signal(s) => format!("signal {s}"),
        }
    }
}

/// What the supervisor wants said: console lines and control-port events. The caller
/// decides where they go (the console and port as PID 1, a Vec in tests).
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    Console(String),
    Event(Value),
}

pub struct Options {
    /// Where `<service>.log` files go; `None` keeps none.
    pub log_dir: Option<PathBuf>,
    pub log_max_bytes: u64,
    /// The cgroup2 mount; `None` runs services without groups (tests, or no cgroup2).
    pub cgroup_root: Option<PathBuf>,
    /// As PID 1 every orphan is ours to reap: `waitpid(-1)`. In tests only our own
    /// children may be waited for (other tests' children share the process).
    pub reap_any: bool,
}

/// What happens once a stopping service's process is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    /// Stay stopped (shutdown, or a stop request).
    Stay,
    /// Start again at once (a restart request).
    Start,
    /// Count it as a failure and apply the restart policy (readiness timeout).
    Policy,
}

struct Service {
    spec: ServiceSpec,
    state: State,
    pid: Option<i32>,
    restarts: u32,
    crash: CrashLoop,
    started: Instant,
    /// Backoff end, readiness deadline or SIGKILL time, by state.
    deadline: Option<Instant>,
    after_stop: AfterStop,
    notify: Option<File>,
    notify_buf: Vec<u8>,
    /// Said `HEALTHY=1` since it last started (services with a `health` only).
    healthy: bool,
    streams: Vec<Stream>,
    last_exit: Option<Exit>,
    cgroup: Option<PathBuf>,
    /// The box's uptime when it last became ready (where a boot's time goes).
    ready_uptime_ms: Option<u64>,
}

impl Service {
    /// With `kill = "group"`, SIGKILL to what the process `pid` forked: its process group
    /// and its cgroup. (pid > 1 always holds for a child; the check keeps -pid from ever
    /// meaning "everyone".)
    fn kill_helpers(&self, pid: i32) {
        if self.spec.kill == KillMode::Group {
            if pid > 1 {
                signal(-pid, libc::SIGKILL);
            }
            if let Some(g) = &self.cgroup {
                crate::cgroups::kill_all(g);
            }
        }
    }
}

pub struct Supervisor {
    services: Vec<Service>,
    opts: Options,
    pub logs: LogStore,
    notes: Vec<Note>,
    shutting_down: bool,
}

impl Supervisor {
    pub fn new(specs: Vec<ServiceSpec>, opts: Options) -> Supervisor {
        let now = Instant::now();
        let logs = LogStore::new(opts.log_dir.clone(), opts.log_max_bytes);
        let services = specs
            .into_iter()
            .map(|spec| Service {
                crash: CrashLoop::new(&spec),
                spec,
                state: State::Waiting,
                pid: None,
                restarts: 0,
                started: now,
                deadline: None,
                after_stop: AfterStop::Policy,
                notify: None,
                notify_buf: Vec::new(),
                healthy: false,
                streams: Vec::new(),
                last_exit: None,
                ready_uptime_ms: None,
                cgroup: None,
            })
            .collect();
        Supervisor {
            services,
            opts,
            logs,
            notes: Vec::new(),
            shutting_down: false,
        }
    }

    /// Console lines and events produced since the last call.
    pub fn take_notes(&mut self) -> Vec<Note> {
        std::mem::take(&mut self.notes)
    }

    fn say(&mut self, text: String) {
        self.notes.push(Note::Console(text));
    }

    pub fn warn(&mut self, message: String) {
        self.notes
            .push(Note::Console(format!("warning: {message}")));
        self.notes
            .push(Note::Event(json!({"event": "warning", "message": message})));
    }

    fn set_state(&mut self, i: usize, state: State) {
        let s = &mut self.services[i];
        if s.state == state {
            return;
        }
        s.state = state;
        let ev = json!({"event": "service", "service": s.spec.name, "state": state.as_str(),
                        "pid": s.pid, "restarts": s.restarts});
        self.notes.push(Note::Event(ev));
    }

    /// Descriptors worth waking up for (pipes); the caller polls them for input.
    pub fn poll_fds(&self) -> Vec<RawFd> {
        let mut fds = Vec::new();
        for s in &self.services {
            if let Some(n) = &s.notify {
                fds.push(n.as_raw_fd());
            }
            fds.extend(s.streams.iter().map(|st| st.file.as_raw_fd()));
        }
        fds
    }

    #[cfg(test)]
    fn named(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.spec.name == name)
    }

    #[cfg(test)]
    pub fn state(&self, name: &str) -> Option<State> {
        self.named(name).map(|s| s.state)
    }

    #[cfg(test)]
    pub fn pid(&self, name: &str) -> Option<i32> {
        self.named(name).and_then(|s| s.pid)
    }

    #[cfg(test)]
    pub fn restarts(&self, name: &str) -> Option<u32> {
        self.named(name).map(|s| s.restarts)
    }

    /// Every service is ready, or will not become ready without help: failed (given up),
    /// stopped for good, or waiting on a requirement that failed. This is when the box
    /// says `ready`.
    pub fn settled(&self) -> bool {
        self.services.iter().all(|s| match s.state {
            State::Ready | State::Failed | State::Stopped => true,
            State::Waiting => self.blocked_by_failure(s, 0),
            _ => false,
        })
    }

    fn blocked_by_failure(&self, s: &Service, depth: usize) -> bool {
        if depth > self.services.len() {
            return false;
        }
        s.spec.requires.iter().any(|r| {
            self.services.iter().any(|d| {
                d.spec.name == *r
                    && (d.state == State::Failed
                        || (d.state == State::Waiting && self.blocked_by_failure(d, depth + 1)))
            })
        })
    }

    /// Names of the services that were given up.
    pub fn failed(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.state == State::Failed)
            .map(|s| s.spec.name.clone())
            .collect()
    }

    /// The services with a `health` that have not said `HEALTHY=1` since they last
    /// started (those given up are in [`Supervisor::failed`]), as `name (what)`.
    pub fn unhealthy(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| !s.healthy && s.state != State::Failed)
            .filter_map(|s| Some(format!("{} ({})", s.spec.name, s.spec.health.as_ref()?)))
            .collect()
    }

    /// One step: read pipes, reap exits, advance readiness, timers and starts.
    pub fn step(&mut self) {
        let now = Instant::now();
        for i in 0..self.services.len() {
            self.read_streams(i, false);
            self.read_notify(i, now);
        }
        self.reap();
        for i in 0..self.services.len() {
            self.advance(i, now);
        }
    }

    fn reap(&mut self) {
        if self.opts.reap_any {
            loop {
                let mut status = 0;
                // SAFETY: waitpid writes the status into our integer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                self.exited(pid, status);
            }
        } else {
            let pids: Vec<i32> = self.services.iter().filter_map(|s| s.pid).collect();
            for pid in pids {
                let mut status = 0;
                // SAFETY: as above; only our own child is waited for.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if r == pid {
                    self.exited(pid, status);
                }
            }
        }
    }

    /// A process ended. Returns false when it was none of ours (an orphan reaped as PID 1).
    pub fn exited(&mut self, pid: i32, status: i32) -> bool {
        let Some(i) = self.services.iter().position(|s| s.pid == Some(pid)) else {
            return false;
        };
        let exit = Exit::from_status(status);
        let now = Instant::now();
        self.read_streams(i, true);
        let s = &mut self.services[i];
        s.pid = None;
        s.notify = None;
        s.notify_buf.clear();
        s.last_exit = Some(exit);
        // Helpers the service forked die with it, so a restart starts clean (unless the
        // service's helpers are meant to outlive it: `kill = "main"`).
        s.kill_helpers(pid);
        let name = s.spec.name.clone();
        let was = s.state;
        let after = s.after_stop;
        if was == State::Stopping && after != AfterStop::Policy {
            self.say(format!("service {name}: stopped ({})", exit.describe()));
            self.set_state(i, State::Stopped);
            if after == AfterStop::Start && !self.shutting_down {
                self.services[i].restarts += 1;
                self.spawn(i, now);
            }
            return true;
        }
        self.failure(i, exit, now);
        true
    }

    fn deps_met(&self, i: usize) -> bool {
        let spec = &self.services[i].spec;
        let state_of = |n: &str| {
            self.services
                .iter()
                .find(|s| s.spec.name == n)
                .map(|s| s.state)
        };
        let required_ready = spec
            .requires
            .iter()
            .all(|r| state_of(r).is_none_or(|st| st == State::Ready));
        // `after` only orders: it waits while the other is on its way, not for success.
        let ordered = spec.after.iter().all(|a| {
            state_of(a).is_none_or(|st| matches!(st, State::Ready | State::Failed | State::Stopped))
        });
        // `alongside` waits only for the other to have been started at all.
        let started = spec
            .alongside
            .iter()
            .all(|a| state_of(a).is_none_or(|st| st != State::Waiting));
        required_ready && ordered && started
    }

    fn advance(&mut self, i: usize, now: Instant) {
        match self.services[i].state {
            State::Waiting if !self.shutting_down && self.deps_met(i) => self.spawn(i, now),
            State::Backoff
                if !self.shutting_down && self.services[i].deadline.is_some_and(|d| now >= d) =>
            {
                self.services[i].restarts += 1;
                self.spawn(i, now);
            }
            State::Failed
                if !self.shutting_down && self.services[i].deadline.is_some_and(|d| now >= d) =>
            {
                let s = &mut self.services[i];
                s.crash.clear(&s.spec);
                s.restarts += 1;
                let msg = format!(
                    "service {}: given up {} s ago, trying again",
                    s.spec.name,
                    s.spec.retry_failed.unwrap_or_default().as_secs()
                );
                self.say(msg);
                self.spawn(i, now);
            }
            State::Starting => {
                let s = &self.services[i];
                if s.spec.ready == Readiness::Socket {
                    if let Some(path) = &s.spec.socket {
                        if std::os::unix::net::UnixStream::connect(path).is_ok() {
                            self.became_ready(i, now);
                            return;
                        }
                    }
                }
                let s = &self.services[i];
                if s.deadline.is_some_and(|d| now >= d) {
                    let msg = format!(
                        "service {}: not ready after {} ms, stopping it",
                        s.spec.name,
                        s.spec.ready_timeout.as_millis()
                    );
                    self.warn(msg);
                    self.stop(i, AfterStop::Policy, now);
                }
            }
            State::Stopping => {
                let s = &mut self.services[i];
                if s.deadline.is_some_and(|d| now >= d) {
                    s.deadline = None;
                    if let Some(pid) = s.pid {
                        let msg = format!(
                            "service {}: still running {} ms after SIGTERM, sending SIGKILL",
                            s.spec.name,
                            s.spec.stop_timeout.as_millis()
                        );
                        signal(pid, libc::SIGKILL);
                        s.kill_helpers(pid);
                        self.say(msg);
                    }
                }
            }
            _ => {}
        }
    }

    fn spawn(&mut self, i: usize, now: Instant) {
        let name = self.services[i].spec.name.clone();
        match self.try_spawn(i) {
            Ok(pid) => {
                let s = &mut self.services[i];
                s.pid = Some(pid);
                s.started = now;
                s.after_stop = AfterStop::Policy;
                s.deadline = Some(now + s.spec.ready_timeout);
                let immediate = s.spec.ready == Readiness::None;
                self.say(format!("service {name}: started, pid {pid}"));
                self.set_state(i, State::Starting);
                if immediate {
                    self.became_ready(i, now);
                }
            }
            Err(e) => {
                let s = &mut self.services[i];
                s.started = now;
                self.warn(format!("service {name}: {e}"));
                // A missing binary fails like a crash: backoff, then the crash-loop limit.
                self.failure(i, Exit::Code(127), now);
            }
        }
    }

    /// Sends SIGTERM and arms the SIGKILL deadline.
    fn stop(&mut self, i: usize, after: AfterStop, now: Instant) {
        let s = &mut self.services[i];
        s.after_stop = after;
        match s.pid {
            Some(pid) => {
                signal(pid, libc::SIGTERM);
                s.deadline = Some(now + s.spec.stop_timeout);
                self.set_state(i, State::Stopping);
            }
            None => {
                s.deadline = None;
                let start = after == AfterStop::Start && !self.shutting_down;
                self.set_state(i, State::Stopped);
                if start {
                    self.spawn(i, now);
                }
            }
        }
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.services
            .iter()
            .position(|s| s.spec.name == name)
            .ok_or_else(|| refused(name, format!("no service named `{name}`")))
    }

    /// Signals a service's main process (the `kill` request).
    pub fn kill(&mut self, name: &str, sig: i32) -> Result<()> {
        let i = self.index(name)?;
        if !(1..=64).contains(&sig) {
            return Err(refused(name, format!("signal {sig} is out of range")));
        }
        let pid = self.services[i]
            .pid
            .ok_or_else(|| refused(name, format!("service `{name}` is not running")))?;
        signal(pid, sig);
        Ok(())
    }

    /// Stops and starts a service (the `restart` request). A failed or stopped service
    /// starts afresh, with its crash-loop count cleared.
    pub fn restart(&mut self, name: &str) -> Result<()> {
        if self.shutting_down {
            return Err(refused(name, "shutting down".into()));
        }
        let i = self.index(name)?;
        let now = Instant::now();
        let s = &mut self.services[i];
        s.crash.clear(&s.spec);
        match s.state {
            State::Starting | State::Ready => self.stop(i, AfterStop::Start, now),
            State::Stopping => s.after_stop = AfterStop::Start,
            State::Backoff | State::Failed | State::Stopped => {
                s.restarts += 1;
                self.spawn(i, now);
            }
            State::Waiting => {
                return Err(refused(
                    name,
                    format!("service `{name}` is waiting for its dependencies"),
                ))
            }
        }
        Ok(())
    }

    /// Begins an orderly stop of everything: no more starts, and each service gets its
    /// SIGTERM once nothing that depends on it is still running.
    pub fn begin_shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        for i in 0..self.services.len() {
            if matches!(self.services[i].state, State::Waiting | State::Backoff) {
                self.services[i].deadline = None;
                self.set_state(i, State::Stopped);
            }
        }
    }

    /// Drives the shutdown; true once every service is down.
    pub fn shutdown_step(&mut self) -> bool {
        self.step();
        let now = Instant::now();
        for i in 0..self.services.len() {
            if !matches!(self.services[i].state, State::Starting | State::Ready) {
                continue;
            }
            let name = self.services[i].spec.name.clone();
            let dependents_up = self
                .services
                .iter()
                .any(|d| d.pid.is_some() && d.spec.deps().any(|n| *n == name));
            if !dependents_up {
                self.say(format!("service {name}: stopping"));
                self.stop(i, AfterStop::Stay, now);
            }
        }
        self.services.iter().all(|s| s.pid.is_none())
    }

    /// The status objects of all services, for the `status` reply.
    pub fn status(&self) -> Vec<Value> {
        self.services
            .iter()
            .map(|s| {
                json!({
                    "name": s.spec.name,
                    "state": s.state.as_str(),
                    "pid": s.pid,
                    "restarts": s.restarts,
                    "rss_kib": s.pid.and_then(crate::status::rss_kib),
                    "last_exit": s.last_exit.map(Exit::json),
                    "healthy": s.spec.health.as_ref().map(|_| s.healthy),
                    "ready_uptime_ms": s.ready_uptime_ms,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
