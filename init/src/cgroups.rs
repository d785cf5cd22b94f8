//! cgroup v2: mounting the hierarchy, enabling the controllers services are limited by,
//! and one group per service (`<root>/<service>/`) with its limits.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const CONTROLLERS: [&str; 4] = ["cpu", "memory", "pids", "io"];

/// Mounts cgroup2 at `root` (if not yet) and enables the controllers for child groups.
/// Returns one message per problem; none of them is fatal.
pub fn setup(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    if !root.join("cgroup.controllers").exists() {
        let _ = std::fs::create_dir_all(root);
        if let Err(e) = rustix::mount::mount(
            "cgroup2",
            root,
            "cgroup2",
            rustix::mount::MountFlags::NOSUID
                | rustix::mount::MountFlags::NODEV
                | rustix::mount::MountFlags::NOEXEC,
            None,
        ) {
            problems.push(format!(
                "failed to mount cgroup2 at {}: {}",
                root.display(),
                std::io::Error::from(e)
            ));
            return problems;
        }
    }
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    for c in CONTROLLERS {
        if !available.split_whitespace().any(|a| a == c) {
            problems.push(format!("cgroup controller {c} is not available"));
            continue;
        }
        let path = root.join("cgroup.subtree_control");
        if let Err(e) = std::fs::write(&path, format!("+{c}")) {
            problems.push(format!("failed to enable +{c} in {}: {e}", path.display()));
        }
    }
    problems
}

/// A service's group: created on first start, limits rewritten on each start.
pub fn prepare(root: &Path, service: &str, limits: &[(&'static str, String)]) -> Result<PathBuf> {
    let dir = root.join(service);
    if let Err(e) = std::fs::create_dir(&dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(Error::io("create cgroup", &dir)(e));
        }
    }
    for (key, value) in limits {
        let path = dir.join(key);
        std::fs::write(&path, value).map_err(Error::io_to("set", &path, "to", value))?;
    }
    Ok(dir)
}

/// Kills every process left in a group (the service's forked helpers after its main
/// process is gone). `cgroup.kill` (Linux 5.14) does it atomically.
pub fn kill_all(group: &Path) {
    if std::fs::write(group.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    if let Ok(pids) = std::fs::read_to_string(group.join("cgroup.procs")) {
        for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
