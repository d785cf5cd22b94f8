//! Running the root's programs from stage 1. The initramfs holds only init; mke2fs,
//! cryptsetup and edge-tpm (which links the TPM libraries a static init cannot) live on
//! the verified root, so stage 1 runs them chrooted into /sysroot with /dev, /proc, /sys
//! and /run bound there while it needs them. Stage 2 runs the same programs directly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// The binds of /dev /proc /sys /run into a new root; undone on drop, so that the real
/// mounts can be moved there afterwards.
pub struct Binds {
    root: PathBuf,
    bound: Vec<PathBuf>,
}

impl Binds {
    pub fn new(root: &Path) -> Result<Binds> {
        let mut binds = Binds {
            root: root.to_path_buf(),
            bound: Vec::new(),
        };
        for fs in ["/dev", "/proc", "/sys", "/run"] {
            let target = root.join(&fs[1..]);
            rustix::mount::mount_bind(fs, &target)
                .map_err(Error::io_to("bind", fs, "into", &target))?;
            binds.bound.push(target);
        }
        Ok(binds)
    }

    /// A command for `program` (a path on the new root) that runs chrooted into it.
    pub fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(program);
        let root = self.root.clone();
        // SAFETY: chroot and chdir are async-signal-safe syscalls; the path was
        // allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::chroot(&root)?;
                rustix::process::chdir("/")?;
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for Binds {
    fn drop(&mut self) {
        for target in self.bound.iter().rev() {
            if let Err(e) = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH) {
                crate::say!(
                    "failed to unmount {}: {}",
                    target.display(),
                    std::io::Error::from(e)
                );
            }
        }
    }
}

/// How a run ended badly: the exit code (None: killed or not started), what the program
/// said on stderr (its last line; empty when it said nothing or did not run), and all of
/// it in one line, or why it could not run. Callers decide on `code`, never on the words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failed {
    pub code: Option<i32>,
    pub said: String,
    pub message: String,
}

/// Runs `cmd` with `input` on stdin; its stdout, or how it failed.
pub fn run(mut cmd: Command, input: &[u8]) -> Result<Vec<u8>, Failed> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failed {
            code: None,
            said: String::new(),
            message: format!("failed to run {name}: {e}"),
        })?;
    // Small inputs (keys, tokens): the pipe holds them whole, so writing before reading
    // cannot deadlock.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let out = child.wait_with_output().map_err(|e| Failed {
        code: None,
        said: String::new(),
        message: format!("failed to wait for {name}: {e}"),
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    Err(Failed {
        code: out.status.code(),
        said: last.to_owned(),
        message: if last.is_empty() {
            format!("{name} failed ({})", out.status)
        } else {
            format!("{name} failed ({}): {last}", out.status)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdout_comes_back_and_failures_carry_the_last_stderr_line() {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", "cat; echo done"]);
        assert_eq!(run(c, b"key:").unwrap(), b"key:done\n");
        let mut c = Command::new("/bin/sh");
        c.args(["-c", "echo first >&2; echo 'the real reason' >&2; exit 2"]);
        let f = run(c, b"").unwrap_err();
        assert_eq!(f.code, Some(2));
        assert!(f.message.ends_with("the real reason"), "{}", f.message);
        assert_eq!(f.said, "the real reason");
        let f = run(Command::new("/nonexistent/program"), b"").unwrap_err();
        assert_eq!(f.code, None);
        assert!(f.message.contains("/nonexistent/program"), "{}", f.message);
    }
}
