//! The image has no way in: no shell, no remote login, no setuid or setgid file. Nobody
//! logs into the box; a shell or an SSH server that slipped in with a package (a
//! maintainer script's dependency, a debug aid) would be one. The build refuses a root or
//! initramfs tree holding one, naming each file.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Result};

use super::rootfs::list_tree;

/// Programs that let a person in or run what they type, by file name.
const FORBIDDEN: &[&str] = &[
    "sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "busybox", "toybox",
    "sshd", "ssh", "dropbear", "telnetd", "login", "su", "sudo", "getty", "agetty",
];

/// Every file of `tree` that is one of those programs, or setuid or setgid.
pub fn ways_in(tree: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for rel in list_tree(tree)? {
        let name = rel.rsplit('/').next().unwrap_or(&rel);
        let meta = std::fs::symlink_metadata(tree.join(&rel))?;
        if FORBIDDEN.contains(&name) {
            found.push(format!("{rel} (a shell or login program)"));
        } else if !meta.file_type().is_symlink() && meta.permissions().mode() & 0o6000 != 0 {
            found.push(format!("{rel} (setuid or setgid)"));
        }
    }
    Ok(found)
}

/// Refuses `tree` (`what`: "the root", "the initramfs") if it has a way in.
pub fn check(tree: &Path, what: &str) -> Result<()> {
    let found = ways_in(tree)?;
    if !found.is_empty() {
        bail!(
            "{what} has a way in, which the image must not: {}",
            found.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shells_logins_and_setuid_files_are_named_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        std::fs::create_dir_all(t.join("usr/bin")).unwrap();
        std::fs::create_dir_all(t.join("usr/sbin")).unwrap();
        std::fs::write(t.join("usr/bin/noded"), "x").unwrap();
        std::fs::write(t.join("usr/bin/shell-words"), "x").unwrap();
        check(t, "the root").expect("a tree without a way in passes");

        std::fs::write(t.join("usr/bin/dash"), "x").unwrap();
        std::os::unix::fs::symlink("dash", t.join("usr/bin/sh")).unwrap();
        std::fs::write(t.join("usr/sbin/sshd"), "x").unwrap();
        let tool = t.join("usr/bin/mount-helper");
        std::fs::write(&tool, "x").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let e = check(t, "the root").unwrap_err().to_string();
        for named in [
            "usr/bin/dash (a shell",
            "usr/bin/sh (a shell",
            "usr/sbin/sshd (a shell or login",
            "usr/bin/mount-helper (setuid",
        ] {
            assert!(e.contains(named), "{named} not named: {e}");
        }
        assert!(!e.contains("noded") && !e.contains("shell-words"), "{e}");
    }
}
