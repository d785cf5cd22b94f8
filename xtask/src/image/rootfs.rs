//! The root filesystem: assembling the staging tree (merged-/usr layout, package files,
//! our binaries, modules, overlay), then the erofs image and its dm-verity hash tree.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::definition::{glob_match, Definition};
use super::{cmd, derive_uuid, Inputs};

/// Debian's merged-/usr: these top-level names are symlinks into /usr.
const MERGED: [(&str, &str); 4] = [
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];

const MOUNT_POINTS: [&str; 7] = ["proc", "sys", "dev", "run", "tmp", "var", "efi"];

/// Where a package path lands in the merged-/usr root.
pub fn merged_path(pkg_path: &str) -> String {
    for (top, usr) in MERGED {
        if let Some(rest) = pkg_path.strip_prefix(top).and_then(|r| r.strip_prefix('/')) {
            return format!("{usr}/{rest}");
        }
    }
    pkg_path.to_string()
}

pub fn os_release(def: &Definition) -> String {
    let i = &def.image;
    format!(
        "NAME=\"{}\"\nID={}\nVERSION_ID={}\nVERSION=\"{}\"\nPRETTY_NAME=\"{} {}\"\n",
        i.pretty_name, i.name, i.version, i.version, i.pretty_name, i.version
    )
}

/// The initramfs's `/etc/initrd-release`: what it is, not which version (stage 1 reads
/// the version from the command line). Without the version the initramfs is the same
/// bytes from one version to the next while init is, so an update's delta carries no
/// block of it (docs/update.md).
pub fn initrd_release(def: &Definition) -> String {
    let i = &def.image;
    format!(
        "NAME=\"{}\"\nID={}\nPRETTY_NAME=\"{} initrd\"\n",
        i.pretty_name, i.name, i.pretty_name
    )
}

fn mkdirs(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("failed to create {}", p.display()))
}

/// Copies a file or symlink, normalising modes so the image does not depend on the umask
/// of whoever unpacked it.
pub fn copy_entry(src: &Path, dst: &Path) -> Result<()> {
    if let Some(parent) = dst.parent() {
        mkdirs(parent)?;
    }
    let meta = std::fs::symlink_metadata(src)
        .with_context(|| format!("failed to stat {}", src.display()))?;
    if dst.symlink_metadata().is_ok() {
        std::fs::remove_file(dst)
            .with_context(|| format!("failed to replace {}", dst.display()))?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(src)?;
        symlink(&target, dst)
            .with_context(|| format!("failed to create symlink {}", dst.display()))?;
    } else if meta.is_file() {
        std::fs::copy(src, dst)
            .with_context(|| format!("failed to copy {} to {}", src.display(), dst.display()))?;
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))?;
    } else {
        bail!("{}: not a file or symlink", src.display());
    }
    Ok(())
}

/// All files and symlinks under `dir`, as sorted paths relative to it.
pub fn list_tree(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        let rd =
            std::fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))?;
        for e in rd {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(root, &e.path(), out)?;
            } else {
                out.push(e.path().strip_prefix(root)?.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// The root's kernel modules, each in load order (dependencies first): those stage 2
/// loads, and per on-demand module the list its first user loads.
pub struct RootModules {
    pub boot: Vec<String>,
    pub on_demand: BTreeMap<String, Vec<String>>,
}

/// Builds the staging tree at `root` (created fresh). `extracted` maps a package name to
/// the directory it was unpacked into.
pub fn assemble(
    def: &Definition,
    inputs: &Inputs,
    extracted: &BTreeMap<String, PathBuf>,
    modules: &RootModules,
    root: &Path,
) -> Result<()> {
    if root.exists() {
        std::fs::remove_dir_all(root)
            .with_context(|| format!("failed to remove {}", root.display()))?;
    }
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "etc/edge",
    ] {
        mkdirs(&root.join(d))?;
    }
    for (top, usr) in MERGED {
        symlink(usr, root.join(top)).with_context(|| format!("failed to link /{top}"))?;
    }
    for m in MOUNT_POINTS {
        mkdirs(&root.join(m))?;
    }

    for pkg in &def.packages {
        let dir = &extracted[&pkg.name];
        let entries = list_tree(dir)?;
        for pattern in &pkg.files {
            let hits: Vec<&String> = entries.iter().filter(|e| glob_match(pattern, e)).collect();
            if hits.is_empty() {
                bail!(
                    "package {} {}: no file matches {pattern:?}",
                    pkg.name,
                    pkg.version
                );
            }
            for h in hits {
                copy_entry(&dir.join(h), &root.join(merged_path(h)))?;
            }
        }
    }
    // The loader path every binary names; Debian's libc6 ships the same link.
    let ld = root.join("usr/lib64/ld-linux-x86-64.so.2");
    if !ld.exists() {
        symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", &ld)
            .context("failed to link the ELF loader")?;
    }

    copy_entry(&inputs.binary("init"), &root.join("usr/sbin/init"))?;
    for b in ["storaged", "fabricd", "noded", "edge-tpm"] {
        copy_entry(&inputs.binary(b), &root.join("usr/bin").join(b))?;
    }
    // The bundled workloads as OCI archives, which noded serves to containerd, and the
    // image allowlist of their manifest digests, signed with the operator's key, which
    // the image trusts (`/etc/edge/core-ed25519.pub`; noded and fabricd check with it).
    let mut allowed = Vec::new();
    for (bin, _, name) in super::WORKLOAD_IMAGES {
        let data = std::fs::read(inputs.binary(bin))
            .with_context(|| format!("failed to read {}", inputs.binary(bin).display()))?;
        let archive = edge_oci::write_image(&edge_oci::ImageSpec {
            name: name.into(),
            entrypoint: vec![format!("/{bin}")],
            files: vec![edge_oci::File {
                path: bin.into(),
                data,
                mode: 0o755,
            }],
            ..Default::default()
        })
        .with_context(|| format!("failed to build the OCI archive {name}"))?;
        let file = name.split(':').next().unwrap_or(name);
        write_bytes(
            &root.join(format!("usr/share/edge/images/{file}.tar")),
            &archive,
        )?;
        let read = edge_oci::read_archive(&archive)
            .with_context(|| format!("the OCI archive {name} does not read back"))?;
        allowed.extend(read.images.iter().map(|i| i.manifest.digest.clone()));
    }
    // Version 1: a list the core delivers supersedes it with any higher version.
    let list = serde_json::to_vec(&serde_json::json!({"version": 1, "digests": allowed}))?;
    write_bytes(
        &root.join("usr/share/edge/images/allowlist"),
        &inputs.key.sign_framed(&list),
    )?;
    write(
        &root.join("etc/edge/core-ed25519.pub"),
        &format!("{}\n", inputs.key.public_hex),
    )?;
    // The key the box will check update bundles with (edge-update, docs/update.md).
    write(
        &root.join("etc/edge/update-ed25519.pub"),
        &format!("{}\n", inputs.update_key.key.public_hex),
    )?;

    let kroot = &extracted[&def.kernel.package];
    let kver = &def.kernel.release;
    for m in modules
        .boot
        .iter()
        .chain(modules.on_demand.values().flatten())
    {
        copy_entry(
            &kroot.join("lib/modules").join(kver).join(m),
            &root.join("usr/lib/modules").join(kver).join(m),
        )?;
    }
    write(&root.join("etc/edge/modules"), &lines(&modules.boot))?;
    for (name, list) in &modules.on_demand {
        // edge_kmod::ON_DEMAND_DIR
        write(
            &root.join("etc/edge/modules-on-demand").join(name),
            &lines(list),
        )?;
    }
    write(&root.join("etc/os-release"), &os_release(def))?;

    // The overlay last: it may replace package defaults such as containerd's config.
    for dir in std::iter::once(&inputs.overlay).chain(&inputs.extra_overlay) {
        for rel in list_tree(dir)? {
            copy_entry(&dir.join(&rel), &root.join(&rel))?;
        }
    }
    normalise_dirs(root)?;
    Ok(())
}

pub fn lines(items: &[String]) -> String {
    items.iter().map(|m| format!("{m}\n")).collect()
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    write_bytes(path, text.as_bytes())
}

pub fn write_bytes(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        mkdirs(parent)?;
    }
    std::fs::write(path, data).with_context(|| format!("failed to write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

fn normalise_dirs(dir: &Path) -> Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            normalise_dirs(&e.path())?;
        }
    }
    Ok(())
}

pub struct RootImage {
    pub erofs: PathBuf,
    pub verity: PathBuf,
    pub roothash: String,
}

/// Makes the erofs image and its hash tree from the staging tree, deterministically: fixed
/// times and owners, UUIDs derived from the version. The verity salt is derived from the
/// image's name, not its version: with one salt for every version, the hash tree's
/// blocks over unchanged data stay the same bytes, and an update's delta carries only
/// the tree blocks over what changed (docs/update.md).
pub fn make_images(def: &Definition, root: &Path, out_dir: &Path) -> Result<RootImage> {
    let version = &def.image.version;
    let erofs = out_dir.join("root.erofs");
    let verity = out_dir.join("root.verity");
    for f in [&erofs, &verity] {
        if f.exists() {
            std::fs::remove_file(f)?;
        }
    }
    cmd::output(
        Command::new("mkfs.erofs")
            .arg("-zlz4hc")
            .arg(format!("-C{}", def.image.erofs_pcluster_kib * 1024))
            // A compressed file's last piece inline beside its inode, not in a block of
            // its own (Linux 5.17 and later read it): 147 KB less on this root.
            .arg("-Eztailpacking")
            .arg("-T0")
            .arg("--all-root")
            .arg(format!("-U{}", derive_uuid(version, "root-erofs")))
            .arg("--quiet")
            .arg(&erofs)
            .arg(root)
            .env("SOURCE_DATE_EPOCH", "0"),
    )?;
    let salt = super::derive_hex(&def.image.name, "verity-salt");
    let out = cmd::stdout(
        Command::new("veritysetup")
            .arg("format")
            .arg("--hash=sha256")
            .arg("--data-block-size=4096")
            .arg("--hash-block-size=4096")
            .arg(format!("--salt={salt}"))
            .arg(format!("--uuid={}", derive_uuid(version, "root-verity")))
            .arg(&erofs)
            .arg(&verity),
    )?;
    let roothash = out
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:").map(|h| h.trim().to_string()))
        .with_context(|| format!("veritysetup format printed no root hash:\n{out}"))?;
    if roothash.len() != 64 || !roothash.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("veritysetup printed an odd root hash {roothash:?}");
    }
    Ok(RootImage {
        erofs,
        verity,
        roothash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_paths_land_under_usr() {
        assert_eq!(merged_path("sbin/mke2fs"), "usr/sbin/mke2fs");
        assert_eq!(
            merged_path("lib/x86_64-linux-gnu/libc.so.6"),
            "usr/lib/x86_64-linux-gnu/libc.so.6"
        );
        assert_eq!(merged_path("usr/bin/containerd"), "usr/bin/containerd");
        assert_eq!(merged_path("etc/mke2fs.conf"), "etc/mke2fs.conf");
        assert_eq!(merged_path("libexec/x"), "libexec/x");
    }
}
