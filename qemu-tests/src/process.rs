//! Child processes the harness owns: each in its own process group, killed with
//! everything it started when the handle goes away (also while a test panics).

use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

pub struct Group {
    name: String,
    child: Child,
    /// Whether the child leads its own process group (so the group can be killed).
    own_group: bool,
    exited: Option<ExitStatus>,
}

impl Group {
    /// Starts `cmd` as the leader of a new process group.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Group> {
        cmd.process_group(0);
        Self::start(name, cmd, true)
    }

    /// Starts `cmd` in our own process group, for a child that must own the terminal
    /// (the interactive console of `cargo xtask run`).
    pub fn spawn_foreground(name: &str, cmd: Command) -> Result<Group> {
        Self::start(name, cmd, false)
    }

    fn start(name: &str, mut cmd: Command, own_group: bool) -> Result<Group> {
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {name} ({:?})", cmd.get_program()))?;
        Ok(Group {
            name: name.to_string(),
            child,
            own_group,
            exited: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Non-blocking: the exit status if the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("failed to poll {}", self.name))?;
        }
        Ok(self.exited)
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits without a limit (the interactive run, where the user decides).
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        let s = self
            .child
            .wait()
            .with_context(|| format!("failed to wait for {}", self.name))?;
        self.exited = Some(s);
        Ok(s)
    }

    /// Lets the process outlive this handle (and this program): its process group id.
    pub fn detach(self) -> u32 {
        let pid = self.pid();
        std::mem::forget(self);
        pid
    }

    /// SIGKILL to the whole group, then reap the leader.
    pub fn kill(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // The group may hold children of the leader even after the leader exited.
        if self.own_group {
            // SAFETY: kill(2) with a negative pid signals the group we created.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        } else if self.exited.is_none() {
            let _ = self.child.kill();
        }
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_a_group_kills_its_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("sleep 300 & echo $! > {}; wait", pidfile.display()));
        let g = Group::spawn("sh", cmd).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
            assert!(Instant::now() < deadline, "shell never wrote the pid");
            std::thread::sleep(Duration::from_millis(20));
        }
        let sleep_pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        drop(g);
        // The orphaned sleep is reparented and reaped by init; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // SAFETY: signal 0 only probes whether the pid exists.
            let alive = unsafe { libc::kill(sleep_pid, 0) } == 0
                && !std::fs::read_to_string(format!("/proc/{sleep_pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true);
            if !alive {
                break;
            }
            assert!(Instant::now() < deadline, "grandchild {sleep_pid} survived");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn wait_timeout_reports_a_process_that_keeps_running() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut g = Group::spawn("sleep", cmd).unwrap();
        assert!(g
            .wait_timeout(Duration::from_millis(200))
            .unwrap()
            .is_none());
        g.kill();
        assert!(g.try_wait().unwrap().is_some());
    }
}
