//! Pinned Debian packages: fetching them into the cache with `apt-get download` and
//! unpacking them with `dpkg-deb -x`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cmd;
use super::definition::Pin;

/// What xtask keeps between runs: `$EDGEOS_CACHE`, else `$HOME/.cache/edgeos`.
pub fn cache_root() -> Result<PathBuf> {
    Ok(match std::env::var_os("EDGEOS_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").context("neither EDGEOS_CACHE nor HOME is set")?;
            PathBuf::from(home).join(".cache/edgeos")
        }
    })
}

/// Where fetched .debs are kept between builds: `<cache root>/debs`.
pub fn cache_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join("debs"))
}

/// The file name apt-get gives a download: the epoch's ':' is escaped as `%3a`.
fn deb_file_name(pin: &Pin, arch: &str) -> String {
    format!(
        "{}_{}_{arch}.deb",
        pin.name,
        pin.version.replace(':', "%3a")
    )
}

/// Makes sure every pinned package is in the cache; returns their paths in `pins` order.
pub fn fetch_all(pins: &[Pin]) -> Result<Vec<PathBuf>> {
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut updated = false;
    let mut paths = Vec::new();
    for pin in pins {
        let path = find_cached(&dir, pin)?;
        let path = match path {
            Some(p) => p,
            None => {
                println!("image: fetching {}={}", pin.name, pin.version);
                match download(&dir, pin) {
                    Ok(p) => p,
                    Err(first) if !updated => {
                        // Missing or stale package lists are the usual cause: refresh once.
                        println!("image: download failed ({first:#}); running apt-get update");
                        updated = true;
                        cmd::output(Command::new("apt-get").arg("update"))?;
                        download(&dir, pin)?
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        paths.push(path);
    }
    Ok(paths)
}

fn find_cached(dir: &Path, pin: &Pin) -> Result<Option<PathBuf>> {
    // apt names files by the package's architecture, which is `all` for some.
    for arch in ["amd64", "all"] {
        let p = dir.join(deb_file_name(pin, arch));
        if p.is_file() {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

fn download(dir: &Path, pin: &Pin) -> Result<PathBuf> {
    let spec = format!("{}={}", pin.name, pin.version);
    let out = Command::new("apt-get")
        .args(["download", &spec])
        .current_dir(dir)
        .output()
        .context("failed to start apt-get download")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let candidate = candidate(&pin.name).unwrap_or_else(|| "none".into());
        bail!(
            "package {} version {} is not available (apt candidate: {candidate}): {}",
            pin.name,
            pin.version,
            stderr.trim()
        );
    }
    find_cached(dir, pin)?.with_context(|| {
        format!(
            "apt-get download {spec} succeeded but left no .deb in {}",
            dir.display()
        )
    })
}

/// apt's candidate version of `name`, for error messages.
fn candidate(name: &str) -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["policy", name])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.trim()
            .strip_prefix("Candidate:")
            .map(|c| c.trim().to_string())
    })
}

/// Unpacks `deb` into `dest` (created fresh).
pub fn extract(deb: &Path, dest: &Path) -> Result<()> {
    if dest.exists() {
        std::fs::remove_dir_all(dest)
            .with_context(|| format!("failed to remove {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest)
        .with_context(|| format!("failed to create {}", dest.display()))?;
    cmd::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_is_escaped_like_apt_does() {
        let pin = Pin {
            name: "qemu-utils".into(),
            version: "1:7.2+dfsg-7".into(),
        };
        assert_eq!(
            deb_file_name(&pin, "amd64"),
            "qemu-utils_1%3a7.2+dfsg-7_amd64.deb"
        );
    }
}
