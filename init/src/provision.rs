//! Site provisioning: the core's address and this box's TLS identity are not image
//! content (the root is byte-reproducible and holds no private keys), so they come
//! from outside. In QEMU that is the fw_cfg item `opt/org.edgeos/provision`: a TOML
//! table of `"relative/path" = "file contents"`, unpacked into
//! `/var/lib/edge/provision/` (directories 0700, files 0600, each written atomically).
//! On hardware it is the file `edgeos/provision.toml` the user puts on the ESP (the FAT
//! partition any workstation can write), in the same format: applied once the data
//! partition is open, then removed from the ESP, so that the site's secrets rest only on
//! the encrypted partition (stage2.rs, `provision_from_esp`). Each item is measured into
//! the TPM before it is unpacked. No item, nothing happens; a bad one is reported and
//! skipped, never fatal.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

pub const FW_CFG_ITEM: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.edgeos/provision/raw";
pub const DIR: &str = "/var/lib/edge/provision";
/// The provisioning file on the ESP, relative to its root.
pub const ESP_FILE: &str = "edgeos/provision.toml";

/// The largest item taken: a bundle of a few certificates, keys and manifests is tens of
/// KiB, and PID 1 reads it whole.
pub const MAX_BYTES: u64 = 1 << 20;

/// The item at `source`: `None` when there is none, an error naming what is wrong with
/// it (unreadable, too large).
pub fn read(source: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let file = match fs::File::open(source) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", source)(e)),
    };
    // By reading, not by the file's size: sysfs (fw_cfg) reports none.
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::io("read", source))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(Error::TooLarge {
            path: source.to_path_buf(),
            max: MAX_BYTES,
        });
    }
    Ok(Some(bytes))
}

/// What `apply` did: console lines, and whether every file of the item was written.
#[derive(Debug, Default)]
pub struct Applied {
    pub lines: Vec<String>,
    pub complete: bool,
}

/// Unpacks the bundle at `source` (if present) into `dir`.
pub fn apply(source: &Path, dir: &Path) -> Applied {
    let incomplete = |lines| Applied {
        lines,
        complete: false,
    };
    let text = match read(source) {
        Ok(Some(t)) => t,
        Ok(None) => return Applied::default(),
        Err(e) => return incomplete(vec![format!("warning: {e}")]),
    };
    let table: toml::Table = match std::str::from_utf8(&text)
        .map_err(|e| e.to_string())
        .and_then(|t| toml::from_str(t).map_err(|e| e.to_string()))
    {
        Ok(t) => t,
        Err(e) => {
            return incomplete(vec![format!(
                "warning: provisioning {} is not a TOML table of files: {}",
                source.display(),
                e.trim_end().replace('\n', " ")
            )])
        }
    };
    if let Err(e) = make_dir(dir) {
        return incomplete(vec![format!(
            "warning: failed to create {}: {e}",
            dir.display()
        )]);
    }
    let mut lines = Vec::new();
    let mut written = 0;
    for (name, value) in &table {
        let result = match value.as_str() {
            None => Err(Error::BadItem {
                name: name.clone(),
                detail: "the value is not a string",
            }),
            Some(contents) => target(dir, name).and_then(|path| {
                write_file(dir, &path, contents.as_bytes()).map_err(Error::io("write", &path))
            }),
        };
        match result {
            Ok(()) => written += 1,
            Err(e) => lines.push(format!("warning: provisioning `{name}` skipped: {e}")),
        }
    }
    lines.push(format!(
        "provisioning: {written} file(s) from {} into {}",
        source.display(),
        dir.display()
    ));
    Applied {
        complete: written == table.len(),
        lines,
    }
}

/// `name` under `dir`, refusing anything that could leave it.
fn target(dir: &Path, name: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Error::BadItem {
            name: name.to_owned(),
            detail: "the path must be relative, without `..` or `.`",
        });
    }
    Ok(dir.join(rel))
}

fn make_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // An existing directory keeps its mode on create: make sure.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Writes a temp file beside `path`, syncs it and renames it over `path`.
fn write_file(dir: &Path, path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(dir);
    if parent != dir {
        make_dir(parent)?;
    }
    write_atomic(path, contents, 0o600)
}

/// Writes `contents` to `path` whole or not at all, across a power cut too: a dot-named
/// temp file beside it (made with `mode`), fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{file_name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_unpacked_private_and_escapes_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("raw");
        fs::write(
            &src,
            "\"fabricd-core.toml\" = \"[core]\\n\"\n\"tls/client.key\" = \"KEY\"\n\
             \"../evil\" = \"x\"\n\"/etc/evil\" = \"x\"\n\"n\" = 3\n",
        )
        .unwrap();
        let dir = tmp.path().join("var/lib/edge/provision");
        let applied = apply(&src, &dir);
        assert!(!applied.complete, "three entries were skipped");
        let lines = applied.lines;
        assert_eq!(
            fs::read(dir.join("fabricd-core.toml")).unwrap(),
            b"[core]\n"
        );
        assert_eq!(fs::read(dir.join("tls/client.key")).unwrap(), b"KEY");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("tls")), 0o700);
        assert_eq!(mode(&dir.join("tls/client.key")), 0o600);
        assert!(!tmp.path().join("var/lib/edge/evil").exists());
        assert_eq!(
            lines.iter().filter(|l| l.contains("skipped")).count(),
            3,
            "{lines:?}"
        );
        assert!(lines.last().unwrap().contains("2 file(s)"), "{lines:?}");
    }

    #[test]
    fn a_registry_mirror_lands_where_containerd_looks() {
        // containerd's config_path names <dir>/registry; a host's hosts.toml is two
        // levels below it, and a host name with a port (`:`) is one path component.
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("raw");
        fs::write(
            &src,
            "\"registry/registry.site.example/hosts.toml\" = \"server = 1\"\n\
             \"registry/mirror:5000/hosts.toml\" = \"server = 2\"\n\
             \"registry/../../evil/hosts.toml\" = \"x\"\n",
        )
        .unwrap();
        let dir = tmp.path().join("p");
        let lines = apply(&src, &dir).lines;
        assert_eq!(
            fs::read(dir.join("registry/registry.site.example/hosts.toml")).unwrap(),
            b"server = 1"
        );
        assert_eq!(
            fs::read(dir.join("registry/mirror:5000/hosts.toml")).unwrap(),
            b"server = 2"
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("registry")), 0o700);
        assert!(!tmp.path().join("evil").exists());
        assert!(lines.last().unwrap().contains("2 file(s)"), "{lines:?}");
    }

    #[test]
    fn no_item_does_nothing_and_garbage_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        assert!(apply(&tmp.path().join("absent"), &dir).lines.is_empty());
        assert!(!dir.exists());
        let src = tmp.path().join("raw");
        fs::write(&src, "not = toml = at all").unwrap();
        let applied = apply(&src, &dir);
        assert!(!applied.complete);
        assert!(applied.lines[0].contains("not a TOML table"), "{applied:?}");
        assert!(!dir.exists());
    }

    #[test]
    fn an_item_too_large_is_refused_by_its_size() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("raw");
        fs::write(&src, vec![b' '; MAX_BYTES as usize + 1]).unwrap();
        let applied = apply(&src, &tmp.path().join("p"));
        assert!(!applied.complete);
        assert!(applied.lines[0].contains("larger than"), "{applied:?}");
        assert!(read(&src).is_err());
    }

    #[test]
    fn an_item_whose_files_all_land_is_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("raw");
        fs::write(&src, "\"a\" = \"1\"\n\"b/c\" = \"2\"\n").unwrap();
        let applied = apply(&src, &tmp.path().join("p"));
        assert!(applied.complete, "{applied:?}");
    }
}
