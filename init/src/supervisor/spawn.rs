//! Starting a service's process: its command and clean environment, the notify pipe
//! (`NOTIFY_FD`) and the output pipes, its own session, its cgroup joined before exec,
//! and the signals sent to it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::logs::LineSplitter;
use crate::services::Readiness;

use super::output::Stream;
use super::Supervisor;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

pub(super) fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

impl Supervisor {
    /// Starts service `i`'s process; its pid. The exit is collected by `reap`.
    pub(super) fn try_spawn(&mut self, i: usize) -> Result<i32> {
        let cgroup = match &self.opts.cgroup_root {
            Some(root) => {
                let spec = &self.services[i].spec;
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
        let s = &mut self.services[i];
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
            let (r, w) = pipe().map_err(|e| Error::Service {
                name: spec.name.clone(),
                detail: format!("failed to create the notify pipe: {e}"),
            })?;
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
        let mut child = cmd.spawn().map_err(Error::io("start", &spec.exec[0]))?;
        let pid = child.id() as i32;
        let pipes: [(Option<OwnedFd>, &'static str); 2] = [
            (child.stdout.take().map(Into::into), "out"),
            (child.stderr.take().map(Into::into), "err"),
        ];
        let mut streams = Vec::new();
        for (fd, name) in pipes {
            if let Some(fd) = fd {
                set_nonblocking(fd.as_raw_fd());
                streams.push(Stream {
                    file: File::from(fd),
                    split: LineSplitter::default(),
                    name,
                });
            }
        }
        // The Child handle is dropped without waiting: exits are collected by `reap`.
        drop(child);
        s.streams = streams;
        s.notify = notify.map(|(r, _w)| r);
        s.notify_buf.clear();
        s.healthy = false;
        Ok(pid)
    }
}
