//! Host tools: making sure the Debian packages xtask runs are installed.

use std::process::Command;

use anyhow::{bail, Context, Result};

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"ii"))
}

fn candidate(pkg: &str) -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["policy", pkg])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Candidate:")
                .map(|c| c.trim().to_string())
        })
        .filter(|c| c != "(none)")
}

/// The `apt-get install` arguments for `missing`. qemu-utils is pinned to
/// qemu-system-x86's version: a newer backported qemu-utils conflicts with bookworm's
/// qemu-system-x86, and apt would otherwise refuse or keep the mismatch.
fn install_args(missing: &[&str], qemu_system_version: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = ["install", "-y", "--no-install-recommends"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let pin = missing
        .contains(&"qemu-utils")
        .then_some(qemu_system_version)
        .flatten();
    if pin.is_some() {
        args.push("--allow-downgrades".into());
    }
    for p in missing {
        match (*p, pin) {
            ("qemu-utils", Some(v)) => args.push(format!("qemu-utils={v}")),
            _ => args.push(p.to_string()),
        }
    }
    args
}

/// Installs whichever of `pkgs` are missing (as root), or fails with the command to run.
pub fn ensure_packages(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let qemu_pairs = missing.contains(&"qemu-utils")
        && (pkgs.contains(&"qemu-system-x86") || installed("qemu-system-x86"));
    // `id -u` rather than geteuid(): keeps xtask free of a libc dependency.
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("failed to run id -u")?;
    let is_root = String::from_utf8_lossy(&uid.stdout).trim() == "0";
    if !is_root {
        let qv = if qemu_pairs {
            candidate("qemu-system-x86")
        } else {
            None
        };
        bail!(
            "missing host packages {}; install them with:\n  sudo apt-get update && sudo apt-get {}",
            missing.join(" "),
            install_args(&missing, qv.as_deref()).join(" ")
        );
    }
    println!("host: installing {}", missing.join(" "));
    let st = Command::new("apt-get")
        .arg("update")
        .status()
        .context("failed to run apt-get update")?;
    if !st.success() {
        bail!("apt-get update failed ({st})");
    }
    // The candidate is only meaningful after the update.
    let qv = if qemu_pairs {
        candidate("qemu-system-x86")
    } else {
        None
    };
    let args = install_args(&missing, qv.as_deref());
    let st = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("failed to run apt-get install")?;
    if !st.success() {
        bail!("apt-get {} failed ({st})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_utils_is_pinned_to_qemu_system() {
        let args = install_args(&["qemu-system-x86", "qemu-utils"], Some("1:7.2+dfsg-7"));
        assert!(args.contains(&"--allow-downgrades".to_string()));
        assert!(args.contains(&"qemu-utils=1:7.2+dfsg-7".to_string()));
        assert!(args.contains(&"qemu-system-x86".to_string()));
    }

    #[test]
    fn plain_packages_are_not_pinned() {
        let args = install_args(&["mtools", "cpio"], None);
        assert_eq!(
            args,
            ["install", "-y", "--no-install-recommends", "mtools", "cpio"]
        );
    }

    #[test]
    fn installed_packages_need_nothing() {
        // dpkg itself is always installed on a Debian host.
        if installed("dpkg") {
            ensure_packages(&["dpkg"]).unwrap();
        }
    }
}
