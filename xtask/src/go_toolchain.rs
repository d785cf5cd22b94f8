//! The Go the control plane is built with: the host's when it is new enough, else the
//! pinned release taken the way the go command's own toolchain switch takes it: the
//! module `golang.org/toolchain` at `v0.0.1-<release>.linux-amd64` from the Go module
//! proxy, its zip checked against the SHA-256 pinned here and unpacked under
//! `~/.cache/edgeos/go/`. A fresh Debian 12 has Go 1.19 (or none), too old for
//! Kubernetes v1.37; the README's commands still do all the set-up there.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest Go the pinned Kubernetes builds with (its go.mod's `go` line).
pub const GO_MIN: (u32, u32) = (1, 26);
/// The release fetched when the host has no Go of at least [`GO_MIN`].
pub const RELEASE: &str = "go1.27.3";
/// SHA-256 of the proxy's zip of `golang.org/toolchain@v0.0.1-go1.27.3.linux-amd64`.
const ZIP_SHA256: &str = "af4c06478303fdd1bfb335fab86c7ccb9b12e529044a946a16a1c4bcc779f8d7";
/// The Go module proxy (the go command's default `GOPROXY`).
const PROXY: &str = "https://proxy.golang.org";
/// `EDGEOS_GO=fetch` takes the pinned release even when the host's Go would do.
const FORCE_VAR: &str = "EDGEOS_GO";

/// A `go` of at least [`GO_MIN`]: on PATH, Go's own install place, or the pinned
/// release (fetched once).
pub fn go() -> Result<PathBuf> {
    let force = std::env::var(FORCE_VAR).is_ok_and(|v| v == "fetch");
    let mut seen = Vec::new();
    if !force {
        for go in [PathBuf::from("go"), PathBuf::from("/usr/local/go/bin/go")] {
            let Ok(out) = Command::new(&go).arg("version").output() else {
                continue;
            };
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            match go_version(&text) {
                Some(v) if v >= GO_MIN => return Ok(go),
                _ => seen.push(format!("{}: {}", go.display(), text.trim())),
            }
        }
        println!(
            "go: the control plane needs Go {}.{} or newer; found {}: taking {RELEASE} \
             from the Go module proxy",
            GO_MIN.0,
            GO_MIN.1,
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join("; ")
            }
        );
    }
    fetched()
}

/// The pinned release under the cache, fetched and checked if it is not there yet.
fn fetched() -> Result<PathBuf> {
    let root = crate::image::debs::cache_root()?.join("go");
    let module = format!("golang.org/toolchain@v0.0.1-{RELEASE}.linux-amd64");
    let home = root.join(RELEASE);
    let go = home.join("bin/go");
    if go.is_file() {
        return Ok(go);
    }
    crate::host::ensure_packages(&["curl", "unzip"])?;
    std::fs::create_dir_all(&root)?;
    let zip = root.join(format!("{RELEASE}.zip"));
    let url = format!("{PROXY}/golang.org/toolchain/@v/v0.0.1-{RELEASE}.linux-amd64.zip");
    println!("go: fetching {url}");
    let st = Command::new("curl")
        .args(["-fsSL", "--retry", "3", "-o"])
        .arg(&zip)
        .arg(&url)
        .status()
        .context("failed to run curl")?;
    if !st.success() {
        bail!("fetching {url} failed ({st})");
    }
    check_sha256(&zip, ZIP_SHA256)?;
    let unpack = root.join(format!(".{RELEASE}.unpack"));
    if unpack.exists() {
        std::fs::remove_dir_all(&unpack)?;
    }
    let st = Command::new("unzip")
        .args(["-q", "-d"])
        .arg(&unpack)
        .arg(&zip)
        .status()
        .context("failed to run unzip")?;
    if !st.success() {
        bail!("unzip {} failed ({st})", zip.display());
    }
    // A module zip need not keep file modes; the go command marks these itself too.
    let tree = unpack.join(&module);
    for dir in [tree.join("bin"), tree.join("pkg/tool/linux_amd64")] {
        for e in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let p = e?.path();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    if home.exists() {
        std::fs::remove_dir_all(&home)?;
    }
    std::fs::rename(&tree, &home)?;
    std::fs::remove_dir_all(&unpack)?;
    std::fs::remove_file(&zip)?;
    if !go.is_file() {
        bail!("{module} holds no bin/go");
    }
    println!("go: {RELEASE} in {}", home.display());
    Ok(go)
}

/// The file's SHA-256 must be `want` (hex); a mismatch removes the file and names both.
fn check_sha256(path: &Path, want: &str) -> Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    let got = crate::image::sha256_hex(&bytes);
    if got != want {
        let _ = std::fs::remove_file(path);
        bail!(
            "{}: its SHA-256 is {got}, the pinned one {want}: refused and removed",
            path.display()
        );
    }
    Ok(())
}

/// `go version go1.26.8 linux/amd64` → (1, 26).
fn go_version(text: &str) -> Option<(u32, u32)> {
    let v = text.split_whitespace().nth(2)?.strip_prefix("go")?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_versions_are_read_and_compared() {
        assert_eq!(go_version("go version go1.26.8 linux/amd64"), Some((1, 26)));
        assert_eq!(go_version("go version go1.19.8 linux/amd64"), Some((1, 19)));
        assert_eq!(go_version("go version devel"), None);
        assert!(go_version("go version go1.19.8 linux/amd64").unwrap() < GO_MIN);
        let pinned = format!("go version {RELEASE} linux/amd64");
        assert!(go_version(&pinned).unwrap() >= GO_MIN);
    }

    #[test]
    fn a_download_whose_hash_differs_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.zip");
        std::fs::write(&p, b"abc").unwrap();
        check_sha256(
            &p,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        )
        .unwrap();
        let e = check_sha256(&p, ZIP_SHA256).unwrap_err().to_string();
        assert!(e.contains("pinned one") && e.contains("ba7816bf"), "{e}");
        assert!(!p.exists());
    }
}
