//! Supervision of the service table: starting services when their dependencies are ready,
//! readiness (notify pipe, unix socket, none), capturing output, restart with backoff and
//! the crash-loop limit, and stopping in reverse dependency order. Everything here is
//! non-blocking and driven by [`Supervisor::step`], so the same code runs as PID 1 and in
//! host tests against a temp dir.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::logs::{line_level, Level, LineSplitter, LogStore};
use crate::services::{KillMode, Readiness, RestartPolicy, ServiceSpec};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

struct Stream {
    file: File,
    split: LineSplitter,
    name: &'static str,
}

struct Svc {
    spec: ServiceSpec,
    state: State,
    pid: Option<i32>,
    restarts: u32,
    /// Failure restarts within the crash-loop window.
    recent: VecDeque<Instant>,
    backoff: Duration,
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
}

pub struct Supervisor {
    svcs: Vec<Svc>,
    opts: Options,
    pub logs: LogStore,
    notes: Vec<Note>,
    shutting_down: bool,
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own; flags are plain integers.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

fn pipe() -> std::io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { Ok((File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))) }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

impl Supervisor {
    pub fn new(specs: Vec<ServiceSpec>, opts: Options) -> Supervisor {
        let now = Instant::now();
        let logs = LogStore::new(opts.log_dir.clone(), opts.log_max_bytes);
        let svcs = specs
            .into_iter()
            .map(|spec| Svc {
                backoff: spec.backoff_initial,
                spec,
                state: State::Waiting,
                pid: None,
                restarts: 0,
                recent: VecDeque::new(),
                started: now,
                deadline: None,
                after_stop: AfterStop::Policy,
                notify: None,
                notify_buf: Vec::new(),
                healthy: false,
                streams: Vec::new(),
                last_exit: None,
                cgroup: None,
            })
            .collect();
        Supervisor {
            svcs,
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
        let s = &mut self.svcs[i];
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
        for s in &self.svcs {
            if let Some(n) = &s.notify {
                fds.push(n.as_raw_fd());
            }
            fds.extend(s.streams.iter().map(|st| st.file.as_raw_fd()));
        }
        fds
    }

    #[cfg(test)]
    pub fn state(&self, name: &str) -> Option<State> {
        self.svcs
            .iter()
            .find(|s| s.spec.name == name)
            .map(|s| s.state)
    }

    #[cfg(test)]
    pub fn pid(&self, name: &str) -> Option<i32> {
        self.svcs
            .iter()
            .find(|s| s.spec.name == name)
            .and_then(|s| s.pid)
    }

    #[cfg(test)]
    pub fn restarts(&self, name: &str) -> Option<u32> {
        self.svcs
            .iter()
            .find(|s| s.spec.name == name)
            .map(|s| s.restarts)
    }

    /// Every service is ready, or will not become ready without help: failed (given up),
    /// stopped for good, or waiting on a requirement that failed. This is when the box
    /// says `ready`.
    pub fn settled(&self) -> bool {
        self.svcs.iter().all(|s| match s.state {
            State::Ready | State::Failed | State::Stopped => true,
            State::Waiting => self.blocked_by_failure(s, 0),
            _ => false,
        })
    }

    fn blocked_by_failure(&self, s: &Svc, depth: usize) -> bool {
        if depth > self.svcs.len() {
            return false;
        }
        s.spec.requires.iter().any(|r| {
            self.svcs.iter().any(|d| {
                d.spec.name == *r
                    && (d.state == State::Failed
                        || (d.state == State::Waiting && self.blocked_by_failure(d, depth + 1)))
            })
        })
    }

    /// Names of the services that were given up.
    pub fn failed(&self) -> Vec<String> {
        self.svcs
            .iter()
            .filter(|s| s.state == State::Failed)
            .map(|s| s.spec.name.clone())
            .collect()
    }

    /// The services with a `health` that have not said `HEALTHY=1` since they last
    /// started (those given up are in [`Supervisor::failed`]), as `name (what)`.
    pub fn unhealthy(&self) -> Vec<String> {
        self.svcs
            .iter()
            .filter(|s| !s.healthy && s.state != State::Failed)
            .filter_map(|s| Some(format!("{} ({})", s.spec.name, s.spec.health.as_ref()?)))
            .collect()
    }

    /// One step: read pipes, reap exits, advance readiness, timers and starts.
    pub fn step(&mut self) {
        let now = Instant::now();
        for i in 0..self.svcs.len() {
            self.read_streams(i, false);
            self.read_notify(i, now);
        }
        self.reap();
        for i in 0..self.svcs.len() {
            self.advance(i, now);
        }
    }

    fn read_streams(&mut self, i: usize, final_drain: bool) {
        let mut lines = Vec::new();
        let mut buf = [0u8; 4096];
        let s = &mut self.svcs[i];
        let mut k = 0;
        while k < s.streams.len() {
            let st = &mut s.streams[k];
            let mut closed = false;
            // A bounded number of reads per step keeps one chatty service from starving
            // the rest of the loop.
            for _ in 0..16 {
                match st.file.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        for l in st.split.push(&buf[..n]) {
                            lines.push((st.name, l));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            if closed || final_drain {
                if let Some(l) = st.split.finish() {
                    lines.push((st.name, l));
                }
            }
            if closed {
                s.streams.remove(k);
            } else {
                k += 1;
            }
        }
        if final_drain {
            s.streams.clear();
        }
        for (stream, line) in lines {
            self.log_line(i, stream, &line);
        }
    }

    fn log_line(&mut self, i: usize, stream: &'static str, line: &str) {
        let name = self.svcs[i].spec.name.clone();
        if let Some(w) = self.logs.write(&name, stream, line) {
            self.warn(w);
        }
        let default = if stream == "err" {
            Level::Warn
        } else {
            Level::Info
        };
        if let Some(max) = self.svcs[i].spec.console {
            if line_level(line, default) <= max {
                self.say(format!("{name}: {line}"));
            }
        }
    }

    fn read_notify(&mut self, i: usize, now: Instant) {
        let s = &mut self.svcs[i];
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
        // Whole lines only; a line cut between two reads is read whole next time.
        let whole = s
            .notify_buf
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let said = |what: &[u8]| {
            s.notify_buf[..whole]
                .split(|&b| b == b'\n')
                .any(|l| l.trim_ascii() == what)
        };
        let (said_ready, said_healthy) = (said(b"READY=1"), said(b"HEALTHY=1"));
        s.notify_buf.drain(..whole);
        if said_ready && s.state == State::Starting {
            self.became_ready(i, now);
        }
        let s = &mut self.svcs[i];
        if said_healthy && s.state == State::Ready && !s.healthy {
            if let Some(what) = &s.spec.health {
                s.healthy = true;
                let ms = now.duration_since(s.started).as_millis();
                let text = format!("service {}: healthy ({what}) after {ms} ms", s.spec.name);
                self.say(text);
            }
        }
        // Read on while the service has something left to say: readiness, then health.
        let s = &mut self.svcs[i];
        let more = s.state == State::Starting
            || (s.state == State::Ready && s.spec.health.is_some() && !s.healthy);
        if closed || !more {
            s.notify = None;
            s.notify_buf.clear();
        }
    }

    fn became_ready(&mut self, i: usize, now: Instant) {
        let s = &mut self.svcs[i];
        s.deadline = None;
        let ms = now.duration_since(s.started).as_millis();
        let text = format!("service {}: ready after {ms} ms", s.spec.name);
        self.set_state(i, State::Ready);
        self.say(text);
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
            let pids: Vec<i32> = self.svcs.iter().filter_map(|s| s.pid).collect();
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
        let Some(i) = self.svcs.iter().position(|s| s.pid == Some(pid)) else {
            return false;
        };
        let exit = Exit::from_status(status);
        let now = Instant::now();
        self.read_streams(i, true);
        let s = &mut self.svcs[i];
        s.pid = None;
        s.notify = None;
        s.notify_buf.clear();
        s.last_exit = Some(exit);
        // Helpers the service forked die with it, so a restart starts clean (unless the
        // service's helpers are meant to outlive it: `kill = "main"`). (pid > 1 always
        // holds for a child; the check keeps -pid from ever meaning "everyone".)
        if s.spec.kill == KillMode::Group {
            if pid > 1 {
                signal(-pid, libc::SIGKILL);
            }
            if let Some(g) = &s.cgroup {
                crate::cgroups::kill_all(g);
            }
        }
        let name = s.spec.name.clone();
        let was = s.state;
        let after = s.after_stop;
        if was == State::Stopping && after != AfterStop::Policy {
            self.say(format!("service {name}: stopped ({})", exit.describe()));
            self.set_state(i, State::Stopped);
            if after == AfterStop::Start && !self.shutting_down {
                self.svcs[i].restarts += 1;
                self.spawn(i, now);
            }
            return true;
        }
        self.failure(i, exit, now);
        true
    }

    /// Applies the restart policy after an unplanned end (or a failed spawn).
    fn failure(&mut self, i: usize, exit: Exit, now: Instant) {
        let s = &mut self.svcs[i];
        let name = s.spec.name.clone();
        let restart = !self.shutting_down
            && match s.spec.restart {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !exit.success(),
                RestartPolicy::Never => false,
            };
        if !restart {
            self.say(format!("service {name}: exited ({})", exit.describe()));
            self.set_state(i, State::Stopped);
            return;
        }
        // A service that ran longer than the window was healthy: start the count afresh.
        if now.duration_since(s.started) > s.spec.restart_window {
            s.recent.clear();
            s.backoff = s.spec.backoff_initial;
        }
        while s
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > s.spec.restart_window)
        {
            s.recent.pop_front();
        }
        if s.recent.len() >= s.spec.restart_limit as usize {
            let msg = format!(
                "service {name} failed: {} restarts within {} s, last {}; giving up",
                s.recent.len(),
                s.spec.restart_window.as_secs(),
                exit.describe()
            );
            s.deadline = None;
            self.set_state(i, State::Failed);
            self.warn(msg);
            return;
        }
        s.recent.push_back(now);
        let delay = s.backoff;
        s.backoff = (s.backoff * 2).min(s.spec.backoff_max);
        s.deadline = Some(now + delay);
        self.say(format!(
            "service {name}: {}, restarting in {} ms",
            exit.describe(),
            delay.as_millis()
        ));
        self.set_state(i, State::Backoff);
    }

    fn deps_met(&self, i: usize) -> bool {
        let spec = &self.svcs[i].spec;
        let state_of = |n: &str| self.svcs.iter().find(|s| s.spec.name == n).map(|s| s.state);
        let required_ready = spec
            .requires
            .iter()
            .all(|r| state_of(r).is_none_or(|st| st == State::Ready));
        // `after` only orders: it waits while the other is on its way, not for success.
        let ordered = spec.after.iter().all(|a| {
            state_of(a).is_none_or(|st| matches!(st, State::Ready | State::Failed | State::Stopped))
        });
        required_ready && ordered
    }

    fn advance(&mut self, i: usize, now: Instant) {
        match self.svcs[i].state {
            State::Waiting if !self.shutting_down && self.deps_met(i) => self.spawn(i, now),
            State::Backoff
                if !self.shutting_down && self.svcs[i].deadline.is_some_and(|d| now >= d) =>
            {
                self.svcs[i].restarts += 1;
                self.spawn(i, now);
            }
            State::Starting => {
                let s = &self.svcs[i];
                if s.spec.ready == Readiness::Socket {
                    if let Some(path) = &s.spec.socket {
                        if std::os::unix::net::UnixStream::connect(path).is_ok() {
                            self.became_ready(i, now);
                            return;
                        }
                    }
                }
                let s = &self.svcs[i];
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
                let s = &mut self.svcs[i];
                if s.deadline.is_some_and(|d| now >= d) {
                    s.deadline = None;
                    if let Some(pid) = s.pid {
                        let msg = format!(
                            "service {}: still running {} ms after SIGTERM, sending SIGKILL",
                            s.spec.name,
                            s.spec.stop_timeout.as_millis()
                        );
                        signal(pid, libc::SIGKILL);
                        if s.spec.kill == KillMode::Group {
                            if pid > 1 {
                                signal(-pid, libc::SIGKILL);
                            }
                            if let Some(g) = &s.cgroup {
                                crate::cgroups::kill_all(g);
                            }
                        }
                        self.say(msg);
                    }
                }
            }
            _ => {}
        }
    }

    fn spawn(&mut self, i: usize, now: Instant) {
        let name = self.svcs[i].spec.name.clone();
        match self.try_spawn(i) {
            Ok(pid) => {
                let s = &mut self.svcs[i];
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
                let s = &mut self.svcs[i];
                s.started = now;
                self.warn(format!("service {name}: {e}"));
                // A missing binary fails like a crash: backoff, then the crash-loop limit.
                self.failure(i, Exit::Code(127), now);
            }
        }
    }

    fn try_spawn(&mut self, i: usize) -> Result<i32, String> {
        let cgroup = match &self.opts.cgroup_root {
            Some(root) => {
                let spec = &self.svcs[i].spec;
                match crate::cgroups::prepare(root, &spec.name, &spec.limits) {
                    Ok(g) => Some(g),
                    Err(e) => {
                        // Running without the limit beats not running at all.
                        self.warn(format!("service {}: {e}", spec.name));
                        None
                    }
                }
            }
            None => None,
        };
        let s = &mut self.svcs[i];
        s.cgroup = cgroup;
        let spec = &s.spec;
        let mut cmd = Command::new(&spec.exec[0]);
        cmd.args(&spec.exec[1..])
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &spec.workdir {
            cmd.current_dir(dir);
        }
        let notify = if spec.ready == Readiness::Notify {
            let (r, w) = pipe().map_err(|e| format!("failed to create the notify pipe: {e}"))?;
            set_nonblocking(r.as_raw_fd());
            cmd.env("NOTIFY_FD", w.as_raw_fd().to_string());
            Some((r, w))
        } else {
            None
        };
        let notify_w = notify.as_ref().map_or(-1, |(_, w)| w.as_raw_fd());
        let procs = match &s.cgroup {
            Some(g) => std::fs::OpenOptions::new()
                .write(true)
                .open(g.join("cgroup.procs"))
                .ok(),
            None => None,
        };
        let procs_fd = procs.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (sigprocmask, setsid, fcntl, write) on descriptors that exist in the
        // child.
        unsafe {
            cmd.pre_exec(move || {
                // PID 1 blocks the signals it reads from a signalfd, and a child inherits
                // the mask (std's Command does not reset it): unblocked, or a service that
                // does not reset it itself (tokio's do not) never sees its SIGTERM.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                // Own session and process group: a stop signals the service's whole group.
                libc::setsid();
                if procs_fd >= 0 {
                    // Joining the group before exec puts every later fork under its limits.
                    libc::write(procs_fd, b"0".as_ptr().cast(), 1);
                }
                if notify_w >= 0 && libc::fcntl(notify_w, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("failed to start {}: {e}", spec.exec[0]))?;
        let pid = child.id() as i32;
        let mut streams = Vec::new();
        if let Some(out) = child.stdout.take() {
            let fd: OwnedFd = out.into();
            set_nonblocking(fd.as_raw_fd());
            streams.push(Stream {
                file: File::from(fd),
                split: LineSplitter::default(),
                name: "out",
            });
        }
        if let Some(err) = child.stderr.take() {
            let fd: OwnedFd = err.into();
            set_nonblocking(fd.as_raw_fd());
            streams.push(Stream {
                file: File::from(fd),
                split: LineSplitter::default(),
                name: "err",
            });
        }
        // The Child handle is dropped without waiting: exits are collected by `reap`.
        drop(child);
        s.streams = streams;
        s.notify = notify.map(|(r, _w)| r);
        s.notify_buf.clear();
        s.healthy = false;
        Ok(pid)
    }

    /// Sends SIGTERM and arms the SIGKILL deadline.
    fn stop(&mut self, i: usize, after: AfterStop, now: Instant) {
        let s = &mut self.svcs[i];
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

    fn index(&self, name: &str) -> Result<usize, String> {
        self.svcs
            .iter()
            .position(|s| s.spec.name == name)
            .ok_or_else(|| format!("no service named `{name}`"))
    }

    /// Signals a service's main process (the `kill` request).
    pub fn kill(&mut self, name: &str, sig: i32) -> Result<(), String> {
        let i = self.index(name)?;
        if !(1..=64).contains(&sig) {
            return Err(format!("signal {sig} is out of range"));
        }
        let pid = self.svcs[i]
            .pid
            .ok_or_else(|| format!("service `{name}` is not running"))?;
        signal(pid, sig);
        Ok(())
    }

    /// Stops and starts a service (the `restart` request). A failed or stopped service
    /// starts afresh, with its crash-loop count cleared.
    pub fn restart(&mut self, name: &str) -> Result<(), String> {
        if self.shutting_down {
            return Err("shutting down".into());
        }
        let i = self.index(name)?;
        let now = Instant::now();
        let s = &mut self.svcs[i];
        s.recent.clear();
        s.backoff = s.spec.backoff_initial;
        match s.state {
            State::Starting | State::Ready => self.stop(i, AfterStop::Start, now),
            State::Stopping => s.after_stop = AfterStop::Start,
            State::Backoff | State::Failed | State::Stopped => {
                s.restarts += 1;
                self.spawn(i, now);
            }
            State::Waiting => {
                return Err(format!("service `{name}` is waiting for its dependencies"))
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
        for i in 0..self.svcs.len() {
            if matches!(self.svcs[i].state, State::Waiting | State::Backoff) {
                self.svcs[i].deadline = None;
                self.set_state(i, State::Stopped);
            }
        }
    }

    /// Drives the shutdown; true once every service is down.
    pub fn shutdown_step(&mut self) -> bool {
        self.step();
        let now = Instant::now();
        for i in 0..self.svcs.len() {
            if !matches!(self.svcs[i].state, State::Starting | State::Ready) {
                continue;
            }
            let name = self.svcs[i].spec.name.clone();
            let dependents_up = self
                .svcs
                .iter()
                .any(|d| d.pid.is_some() && d.spec.deps().any(|n| *n == name));
            if !dependents_up {
                self.say(format!("service {name}: stopping"));
                self.stop(i, AfterStop::Stay, now);
            }
        }
        self.svcs.iter().all(|s| s.pid.is_none())
    }

    /// The status objects of all services, for the `status` reply.
    pub fn status(&self) -> Vec<Value> {
        self.svcs
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
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supervisor(table: &str, log_dir: Option<&std::path::Path>) -> Supervisor {
        let t = crate::services::parse(table, "test.toml");
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        Supervisor::new(
            t.services,
            Options {
                log_dir: log_dir.map(|d| d.to_owned()),
                log_max_bytes: 1 << 20,
                cgroup_root: None,
                reap_any: false,
            },
        )
    }

    /// Steps until `cond` holds; the notes seen so far are returned. Panics after `secs`.
    fn run_until(
        sup: &mut Supervisor,
        secs: u64,
        what: &str,
        mut cond: impl FnMut(&Supervisor) -> bool,
    ) -> Vec<Note> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut notes = Vec::new();
        loop {
            sup.step();
            notes.extend(sup.take_notes());
            if cond(sup) {
                return notes;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {notes:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn shut_down(sup: &mut Supervisor, secs: u64) -> Vec<Note> {
        sup.begin_shutdown();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut notes = Vec::new();
        while !sup.shutdown_step() {
            notes.extend(sup.take_notes());
            assert!(Instant::now() < deadline, "shutdown hung: {notes:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        notes.extend(sup.take_notes());
        notes
    }

    fn console(notes: &[Note]) -> String {
        notes
            .iter()
            .filter_map(|n| match n {
                Note::Console(l) => Some(l.as_str()),
                Note::Event(_) => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn events(notes: &[Note]) -> Vec<Value> {
        notes
            .iter()
            .filter_map(|n| match n {
                Note::Event(e) => Some(e.clone()),
                Note::Console(_) => None,
            })
            .collect()
    }

    #[test]
    fn crash_loop_is_given_up_while_other_services_keep_running() {
        let mut sup = supervisor(
            r#"
[[service]]
name = "crasher"
exec = ["/bin/sh", "-c", "exit 1"]
backoff_initial_ms = 10
backoff_max_ms = 40
restart_limit = 3
restart_window_s = 60

[[service]]
name = "steady"
exec = ["/bin/sleep", "30"]
"#,
            None,
        );
        let notes = run_until(&mut sup, 10, "crasher to fail", |s| {
            s.state("crasher") == Some(State::Failed)
        });
        assert_eq!(
            sup.restarts("crasher"),
            Some(3),
            "three restarts, then given up"
        );
        let text = console(&notes);
        assert!(
            text.contains("service crasher failed") && text.contains("giving up"),
            "{text}"
        );
        assert!(
            events(&notes).iter().any(|e| e["event"] == "service"
                && e["service"] == "crasher"
                && e["state"] == "failed"),
            "a failed event is emitted"
        );
        assert!(
            events(&notes).iter().any(|e| e["event"] == "warning"),
            "the give-up is a warning event"
        );
        let steady_pid = sup.pid("steady").expect("steady runs");
        assert_eq!(sup.state("steady"), Some(State::Ready));
        // Failed services do not hold up readiness of the box.
        assert!(sup.settled());
        assert_eq!(sup.failed(), ["crasher"]);
        std::thread::sleep(Duration::from_millis(200));
        sup.step();
        assert_eq!(sup.state("crasher"), Some(State::Failed), "stays given up");
        assert_eq!(
            sup.pid("steady"),
            Some(steady_pid),
            "steady was never restarted"
        );
        shut_down(&mut sup, 10);
        assert_eq!(sup.state("steady"), Some(State::Stopped));
    }

    #[test]
    fn helpers_die_with_their_service_unless_kill_is_main() {
        let dir = tempfile::tempdir().unwrap();
        let alive = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
        for (mode, survives) in [("group", false), ("main", true)] {
            let pidfile = dir.path().join(format!("{mode}.pid"));
            // The main process leaves a helper in its process group, then exits.
            let mut sup = supervisor(
                &format!(
                    r#"
[[service]]
name = "runtime"
exec = ["/bin/sh", "-c", "sleep 30 & echo $! > {}; sleep 0.2; exit 0"]
restart = "never"
kill = "{mode}"
"#,
                    pidfile.display()
                ),
                None,
            );
            run_until(&mut sup, 10, "the main process to exit", |s| {
                s.pid("runtime").is_none() && s.state("runtime") != Some(State::Starting)
            });
            let helper: i32 = std::fs::read_to_string(&pidfile)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            // A killed helper may linger a moment, then as a zombie until a reaper takes
            // it (kill(pid, 0) succeeds for a zombie): look at its state for a while.
            let running = || {
                let state = std::fs::read_to_string(format!("/proc/{helper}/stat"))
                    .ok()
                    .and_then(|st| {
                        let rest = st.rsplit(')').next()?.to_string();
                        rest.split_whitespace().next().map(str::to_string)
                    });
                alive(helper) && state.as_deref().is_some_and(|s| s != "Z" && s != "X")
            };
            let deadline = Instant::now() + Duration::from_secs(2);
            while running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let running = running();
            assert_eq!(running, survives, "kill = {mode}");
            if running {
                unsafe { libc::kill(helper, libc::SIGKILL) };
            }
            shut_down(&mut sup, 10);
        }
    }

    #[test]
    fn health_is_said_after_readiness_and_forgotten_at_a_restart() {
        let mut sup = supervisor(
            r#"
[[service]]
name = "pods"
exec = ["/bin/sh", "-c", "echo READY=1 >&$NOTIFY_FD; sleep 0.5; echo HEALTHY=1 >&$NOTIFY_FD; exec sleep 30"]
ready = "notify"
health = "its pods running"

[[service]]
name = "plain"
exec = ["/bin/sleep", "30"]
"#,
            None,
        );
        run_until(&mut sup, 5, "pods to be ready", |s| {
            s.state("pods") == Some(State::Ready)
        });
        assert_eq!(sup.unhealthy(), vec!["pods (its pods running)".to_string()]);
        let notes = run_until(&mut sup, 5, "pods to be healthy", |s| {
            s.unhealthy().is_empty()
        });
        assert!(
            notes.iter().any(
                |n| matches!(n, Note::Console(t) if t.starts_with("service pods: healthy (its pods running) after"))
            ),
            "{notes:?}"
        );
        let st = sup.status();
        assert_eq!(st[0]["healthy"], true, "{st:?}");
        assert_eq!(st[1]["healthy"], Value::Null, "{st:?}");
        // A restart starts from unhealthy again.
        sup.restart("pods").unwrap();
        run_until(&mut sup, 5, "pods to restart", |s| {
            !s.unhealthy().is_empty()
        });
        run_until(&mut sup, 5, "pods to be healthy again", |s| {
            s.unhealthy().is_empty()
        });
        shut_down(&mut sup, 10);
    }

    #[test]
    fn notify_readiness_gates_the_services_that_require_it() {
        let mut sup = supervisor(
            r#"
[[service]]
name = "base"
exec = ["/bin/sh", "-c", "sleep 0.3; echo READY=1 >&$NOTIFY_FD; exec sleep 30"]
ready = "notify"

[[service]]
name = "top"
exec = ["/bin/sleep", "30"]
requires = ["base"]
"#,
            None,
        );
        run_until(&mut sup, 5, "base to start", |s| {
            s.state("base") == Some(State::Starting)
        });
        assert_eq!(
            sup.state("top"),
            Some(State::Waiting),
            "top waits while base is starting"
        );
        assert!(!sup.settled());
        let notes = run_until(&mut sup, 10, "top to be ready", |s| {
            s.state("top") == Some(State::Ready)
        });
        assert_eq!(sup.state("base"), Some(State::Ready));
        let order: Vec<(String, String)> = events(&notes)
            .iter()
            .filter(|e| e["state"] == "ready" || e["state"] == "starting")
            .map(|e| {
                (
                    e["service"].as_str().unwrap().to_owned(),
                    e["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let base_ready = order
            .iter()
            .position(|p| p == &("base".into(), "ready".into()))
            .unwrap();
        let top_start = order
            .iter()
            .position(|p| p == &("top".into(), "starting".into()))
            .unwrap();
        assert!(base_ready < top_start, "{order:?}");
        assert!(sup.settled());

        // Reverse dependency order on the way down: top stops before base.
        let notes = shut_down(&mut sup, 15);
        let stopped: Vec<String> = events(&notes)
            .iter()
            .filter(|e| e["state"] == "stopped")
            .map(|e| e["service"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(stopped, ["top", "base"]);
    }

    #[test]
    fn socket_readiness_waits_for_a_connectable_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("svc.sock");
        let mut sup = supervisor(
            &format!(
                "[[service]]\nname = \"sock\"\nexec = [\"/bin/sleep\", \"30\"]\nready = \"socket\"\nsocket = \"{}\"\n",
                sock.display()
            ),
            None,
        );
        run_until(&mut sup, 5, "start", |s| {
            s.state("sock") == Some(State::Starting)
        });
        std::thread::sleep(Duration::from_millis(100));
        sup.step();
        assert_eq!(sup.state("sock"), Some(State::Starting), "no socket yet");
        // The listener stands in for the service opening its socket.
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        run_until(&mut sup, 5, "ready", |s| {
            s.state("sock") == Some(State::Ready)
        });
        shut_down(&mut sup, 10);
    }

    #[test]
    fn readiness_timeout_stops_the_service_and_applies_the_policy() {
        let mut sup = supervisor(
            r#"
[[service]]
name = "mute"
exec = ["/bin/sleep", "30"]
ready = "notify"
ready_timeout_ms = 300
restart = "never"
"#,
            None,
        );
        let notes = run_until(&mut sup, 10, "mute to stop", |s| {
            s.state("mute") == Some(State::Stopped)
        });
        let text = console(&notes);
        assert!(text.contains("not ready after 300 ms"), "{text}");
        assert_eq!(sup.pid("mute"), None);
    }

    #[test]
    fn output_is_logged_with_timestamps_and_stderr_echoed_to_console() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = supervisor(
            r#"
[[service]]
name = "talker"
exec = ["/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2; printf no-newline"]
restart = "never"
"#,
            Some(dir.path()),
        );
        let notes = run_until(&mut sup, 10, "talker to exit", |s| {
            s.state("talker") == Some(State::Stopped)
        });
        let log = std::fs::read_to_string(dir.path().join("talker.log")).unwrap();
        assert!(log.contains(" out to-stdout\n"), "{log}");
        assert!(log.contains(" err to-stderr\n"), "{log}");
        assert!(log.contains(" out no-newline\n"), "{log}");
        assert!(log.lines().all(|l| l.starts_with('[')), "{log}");
        let text = console(&notes);
        assert!(text.contains("talker: to-stderr"), "{text}");
        assert!(
            !text.contains("talker: to-stdout"),
            "stdout is below the console level: {text}"
        );
    }

    #[test]
    fn stop_timeout_escalates_to_sigkill() {
        let mut sup = supervisor(
            r#"
[[service]]
name = "stubborn"
exec = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
stop_timeout_ms = 300
"#,
            None,
        );
        run_until(&mut sup, 5, "ready", |s| {
            s.state("stubborn") == Some(State::Ready)
        });
        // Give sh time to install its trap.
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        let notes = shut_down(&mut sup, 10);
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "SIGTERM was ignored, so it waited"
        );
        assert!(console(&notes).contains("sending SIGKILL"), "{notes:?}");
        assert_eq!(sup.state("stubborn"), Some(State::Stopped));
    }

    #[test]
    fn a_service_starts_with_no_signal_blocked_even_when_init_blocks_them() {
        // As PID 1 does (stage2::block_signals), on this thread: fork copies its mask.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        }
        let dir = tempfile::tempdir().unwrap();
        // grep, not a shell: dash unblocks signals itself, tokio's daemons do not.
        let mut sup = supervisor(
            r#"
[[service]]
name = "mask"
exec = ["/bin/grep", "SigBlk", "/proc/self/status"]
restart = "never"
"#,
            Some(dir.path()),
        );
        run_until(&mut sup, 10, "mask to exit", |s| {
            s.state("mask") == Some(State::Stopped)
        });
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        let log = std::fs::read_to_string(dir.path().join("mask.log")).unwrap();
        assert!(log.contains("SigBlk:\t0000000000000000"), "{log}");
    }

    #[test]
    fn restart_request_and_kill_request() {
        let mut sup = supervisor(
            "[[service]]\nname = \"s\"\nexec = [\"/bin/sleep\", \"30\"]\nbackoff_initial_ms = 10\n",
            None,
        );
        run_until(&mut sup, 5, "ready", |s| s.state("s") == Some(State::Ready));
        let first = sup.pid("s").unwrap();
        sup.restart("s").unwrap();
        run_until(&mut sup, 10, "new pid", |s| {
            s.state("s") == Some(State::Ready) && s.pid("s").is_some_and(|p| p != first)
        });
        assert_eq!(sup.restarts("s"), Some(1));
        let second = sup.pid("s").unwrap();
        sup.kill("s", libc::SIGKILL).unwrap();
        run_until(&mut sup, 10, "restart after kill", |s| {
            s.state("s") == Some(State::Ready) && s.pid("s").is_some_and(|p| p != second)
        });
        let st = sup.status();
        assert_eq!(st[0]["last_exit"], json!({"signal": 9}));
        assert!(sup.kill("nope", 9).unwrap_err().contains("nope"));
        shut_down(&mut sup, 10);
    }

    #[test]
    fn missing_binary_backs_off_then_fails() {
        let mut sup = supervisor(
            "[[service]]\nname = \"ghost\"\nexec = [\"/nonexistent/bin\"]\nbackoff_initial_ms = 10\nbackoff_max_ms = 20\nrestart_limit = 2\n",
            None,
        );
        let notes = run_until(&mut sup, 5, "failed", |s| {
            s.state("ghost") == Some(State::Failed)
        });
        assert!(console(&notes).contains("/nonexistent/bin"), "{notes:?}");
    }

    #[test]
    fn control_socket_answers_status_and_kill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.sock");
        let mut ctl = crate::control::Control::new();
        ctl.listen(&path).unwrap();
        let mut sup = supervisor(
            "[[service]]\nname = \"s\"\nexec = [\"/bin/sleep\", \"30\"]\n",
            None,
        );
        run_until(&mut sup, 5, "ready", |s| s.state("s") == Some(State::Ready));

        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                use std::io::{BufRead, BufReader, Write};
                let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"{\"cmd\":\"status\"}\n{\"cmd\":\"kill\",\"service\":\"x\",\"signal\":9}\nbad\n")
                    .unwrap();
                let mut r = BufReader::new(s);
                let mut lines = Vec::new();
                for _ in 0..3 {
                    let mut l = String::new();
                    r.read_line(&mut l).unwrap();
                    lines.push(serde_json::from_str::<Value>(&l).unwrap());
                }
                lines
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.is_finished() {
            assert!(Instant::now() < deadline, "no replies");
            ctl.step(&mut |req| match req {
                crate::control::Request::Status => {
                    let st = crate::status::build(&Default::default(), false, false, sup.status());
                    json!({"reply": "status", "ok": true, "status": st})
                }
                crate::control::Request::Kill { service, signal } => {
                    match sup.kill(&service, signal) {
                        Ok(()) => crate::control::ok_reply("kill"),
                        Err(e) => crate::control::error_reply("kill", &e),
                    }
                }
                other => crate::control::error_reply(other.name(), "not in this test"),
            });
            std::thread::sleep(Duration::from_millis(10));
        }
        let replies = client.join().unwrap();
        assert_eq!(replies[0]["reply"], "status");
        assert_eq!(replies[0]["ok"], true);
        let svc = &replies[0]["status"]["services"][0];
        assert_eq!(svc["name"], "s");
        assert_eq!(svc["state"], "ready");
        assert!(svc["rss_kib"].as_u64().is_some(), "{svc}");
        assert!(replies[0]["status"]["mem_total_kib"].as_u64().unwrap() > 0);
        assert_eq!(replies[1]["reply"], "kill");
        assert_eq!(replies[1]["ok"], false);
        assert_eq!(replies[2]["ok"], false);
        shut_down(&mut sup, 10);
    }
}
