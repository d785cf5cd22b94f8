//! ELF dependency check: every dynamically linked file shipped in the root must find its
//! interpreter and every DT_NEEDED library inside the root, the way glibc's loader would
//! without /etc/ld.so.cache (which the image does not have).

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// glibc's built-in search path on Debian amd64 when there is no ld.so.cache
/// (`ld.so --help` lists these as the "system search path").
pub const LOADER_DIRS: [&str; 4] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
];

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    pub interp: Option<String>,
    pub needed: Vec<String>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}
fn cstr_at(b: &[u8], off: usize) -> Option<String> {
    let tail = b.get(off..)?;
    let end = tail.iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&tail[..end]).into_owned())
}

pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF")
}

/// Reads PT_INTERP and DT_NEEDED from a 64-bit little-endian ELF file.
pub fn parse(bytes: &[u8]) -> Result<Dynamic> {
    if !is_elf(bytes) {
        bail!("not an ELF file");
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        bail!("not a 64-bit little-endian ELF file");
    }
    let short = || anyhow::anyhow!("truncated ELF headers");
    let phoff = u64_at(bytes, 0x20).ok_or_else(short)? as usize;
    let phentsize = u16_at(bytes, 0x36).ok_or_else(short)? as usize;
    let phnum = u16_at(bytes, 0x38).ok_or_else(short)? as usize;
    // (p_type, p_offset, p_vaddr, p_filesz)
    let mut phdrs = Vec::new();
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        phdrs.push((
            u32_at(bytes, o).ok_or_else(short)?,
            u64_at(bytes, o + 8).ok_or_else(short)?,
            u64_at(bytes, o + 16).ok_or_else(short)?,
            u64_at(bytes, o + 32).ok_or_else(short)?,
        ));
    }
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    let mut dynamic = Dynamic::default();
    if let Some(&(_, off, _, _)) = phdrs.iter().find(|p| p.0 == PT_INTERP) {
        dynamic.interp = Some(cstr_at(bytes, off as usize).ok_or_else(short)?);
    }
    let Some(&(_, dyn_off, _, dyn_size)) = phdrs.iter().find(|p| p.0 == PT_DYNAMIC) else {
        return Ok(dynamic);
    };
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;
    let mut strtab_vaddr = None;
    let mut needed_offs = Vec::new();
    for i in 0..(dyn_size as usize / 16) {
        let o = dyn_off as usize + i * 16;
        let tag = u64_at(bytes, o).ok_or_else(short)?;
        let val = u64_at(bytes, o + 8).ok_or_else(short)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed_offs.push(val),
            DT_STRTAB => strtab_vaddr = Some(val),
            _ => {}
        }
    }
    if needed_offs.is_empty() {
        return Ok(dynamic);
    }
    let strtab_vaddr = strtab_vaddr.context("DT_NEEDED without DT_STRTAB")?;
    // DT_STRTAB is an address; the PT_LOAD segment containing it maps it to a file offset.
    let strtab_off = phdrs
        .iter()
        .filter(|p| p.0 == PT_LOAD)
        .find(|p| strtab_vaddr >= p.2 && strtab_vaddr < p.2 + p.3)
        .map(|p| strtab_vaddr - p.2 + p.1)
        .context("DT_STRTAB is outside every PT_LOAD segment")?;
    for n in needed_offs {
        dynamic
            .needed
            .push(cstr_at(bytes, (strtab_off + n) as usize).ok_or_else(short)?);
    }
    Ok(dynamic)
}

/// Resolves `path` (absolute, as seen from inside the root) to a host path under `root`,
/// following symlinks as if `root` were `/`. None when it does not exist.
pub fn resolve_in_root(root: &Path, path: &str) -> Option<PathBuf> {
    let mut pending: VecDeque<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    let mut parts: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        match c.as_str() {
            "." => continue,
            ".." => {
                parts.pop();
                continue;
            }
            _ => {}
        }
        let mut host = root.to_path_buf();
        host.extend(&parts);
        host.push(&c);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            let target = target.to_string_lossy();
            if target.starts_with('/') {
                parts.clear();
            }
            for (i, t) in target.split('/').filter(|t| !t.is_empty()).enumerate() {
                pending.insert(i, t.to_string());
            }
        } else {
            parts.push(c);
        }
    }
    let mut host = root.to_path_buf();
    host.extend(&parts);
    host.exists().then_some(host)
}

/// Directories the running system mounts over: links into them (e.g. `/etc/mtab` to
/// `/proc/self/mounts`) resolve only at run time.
const RUNTIME_DIRS: [&str; 6] = ["proc", "sys", "dev", "run", "tmp", "var"];

/// Checks that every symlink under `root` resolves inside it (or points into a directory
/// mounted at run time). A package's link whose target was not picked into the image
/// (iptables' `libxt_DNAT.so` is a link to `libxt_NAT.so`) otherwise fails only when
/// the appliance first uses it. Returns how many links it checked.
pub fn check_links(root: &Path) -> Result<usize> {
    let mut dangling = Vec::new();
    let mut n = 0;
    for rel in super::rootfs::list_tree(root)? {
        let host = root.join(&rel);
        let Ok(meta) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        if !meta.file_type().is_symlink() {
            continue;
        }
        n += 1;
        let target = std::fs::read_link(&host)
            .with_context(|| format!("failed to read the link {}", host.display()))?;
        let text = target.to_string_lossy();
        // Where the target lies, as seen from inside the root (lexically: `..` of a
        // relative target counts from the link's directory).
        let mut at: Vec<&str> = if text.starts_with('/') {
            Vec::new()
        } else {
            rel.split('/')
                .collect::<Vec<_>>()
                .split_last()
                .map_or(Vec::new(), |x| x.1.to_vec())
        };
        for c in text.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if c == ".." {
                at.pop();
            } else {
                at.push(c);
            }
        }
        let runtime = at.first().is_some_and(|top| RUNTIME_DIRS.contains(top));
        if !runtime && resolve_in_root(root, &format!("/{rel}")).is_none() {
            dangling.push(format!("/{rel} -> {text}"));
        }
    }
    if !dangling.is_empty() {
        bail!(
            "the root has links to nothing (add their targets to the package's files): {}",
            dangling.join(", ")
        );
    }
    Ok(n)
}

/// Checks every regular ELF file under `root`: its interpreter and the transitive closure
/// of its DT_NEEDED libraries must resolve inside the root. Returns how many it checked.
pub fn check_closure(root: &Path) -> Result<usize> {
    let mut files = Vec::new();
    collect_files(root, root, &mut files)?;
    let mut checked = 0;
    for rel in files {
        let host = root.join(&rel);
        let bytes =
            std::fs::read(&host).with_context(|| format!("failed to read {}", host.display()))?;
        if !is_elf(&bytes) || rel.starts_with("lib/modules") || rel.starts_with("usr/lib/modules") {
            continue;
        }
        let shown = format!("/{}", rel.display());
        let dynamic =
            parse(&bytes).with_context(|| format!("{shown}: cannot read its ELF headers"))?;
        if let Some(interp) = &dynamic.interp {
            if resolve_in_root(root, interp).is_none() {
                bail!("{shown}: its interpreter {interp} is not in the root");
            }
        }
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<String> = dynamic.needed.into();
        while let Some(lib) = queue.pop_front() {
            if !seen.insert(lib.clone()) {
                continue;
            }
            let found = LOADER_DIRS
                .iter()
                .find_map(|d| resolve_in_root(root, &format!("{d}/{lib}")));
            let Some(found) = found else {
                bail!(
                    "{shown}: needs {lib}, which is not in the root's library directories ({})",
                    LOADER_DIRS.join(", ")
                );
            };
            let lib_bytes = std::fs::read(&found)
                .with_context(|| format!("failed to read {}", found.display()))?;
            let lib_dyn =
                parse(&lib_bytes).with_context(|| format!("{}: bad ELF", found.display()))?;
            queue.extend(lib_dyn.needed);
        }
        checked += 1;
    }
    Ok(checked)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))?;
    for entry in rd {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            collect_files(root, &entry.path(), out)?;
        } else if ft.is_file() {
            out.push(entry.path().strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn host_elf(path: &str) -> Option<Vec<u8>> {
        std::fs::read(path).ok()
    }

    #[test]
    fn reads_needed_and_interp_of_a_host_binary() {
        let Some(bytes) = host_elf("/usr/bin/cp") else {
            return;
        };
        let d = parse(&bytes).unwrap();
        assert_eq!(d.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        assert!(d.needed.iter().any(|n| n == "libc.so.6"), "{:?}", d.needed);
    }

    #[test]
    fn rejects_non_elf() {
        assert!(parse(b"#!/bin/sh\n").is_err());
    }

    #[test]
    fn resolves_symlinks_relative_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::fs::write(r.join("usr/lib/x86_64-linux-gnu/libfoo.so.1.2"), b"x").unwrap();
        symlink(
            "libfoo.so.1.2",
            r.join("usr/lib/x86_64-linux-gnu/libfoo.so.1"),
        )
        .unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib64")).unwrap();
        symlink("usr/lib64", r.join("lib64")).unwrap();
        symlink(
            "/lib/x86_64-linux-gnu/libfoo.so.1",
            r.join("usr/lib64/ld.so"),
        )
        .unwrap();
        let want = r.join("usr/lib/x86_64-linux-gnu/libfoo.so.1.2");
        assert_eq!(
            resolve_in_root(r, "/lib/x86_64-linux-gnu/libfoo.so.1"),
            Some(want.clone())
        );
        assert_eq!(resolve_in_root(r, "/lib64/ld.so"), Some(want));
        assert_eq!(
            resolve_in_root(r, "/lib/x86_64-linux-gnu/libbar.so.1"),
            None
        );
    }

    #[test]
    fn a_link_to_nothing_is_named_and_runtime_links_pass() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/lib/xt")).unwrap();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("usr/lib/xt/libxt_NAT.so"), b"x").unwrap();
        symlink("libxt_NAT.so", r.join("usr/lib/xt/libxt_DNAT.so")).unwrap();
        symlink("/proc/self/mounts", r.join("etc/mtab")).unwrap();
        symlink("../run/resolv.conf", r.join("etc/resolv.conf")).unwrap();
        assert_eq!(check_links(r).unwrap(), 3);
        std::fs::remove_file(r.join("usr/lib/xt/libxt_NAT.so")).unwrap();
        let err = format!("{:#}", check_links(r).unwrap_err());
        assert!(
            err.contains("/usr/lib/xt/libxt_DNAT.so -> libxt_NAT.so"),
            "{err}"
        );
    }

    #[test]
    fn missing_library_names_binary_and_library() {
        let Some(bytes) = host_elf("/usr/bin/cp") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::write(r.join("usr/bin/cp"), &bytes).unwrap();
        // Give it its interpreter but no libraries.
        std::fs::create_dir_all(r.join("lib64")).unwrap();
        std::fs::write(r.join("lib64/ld-linux-x86-64.so.2"), b"x").unwrap();
        let err = format!("{:#}", check_closure(r).unwrap_err());
        assert!(err.contains("/usr/bin/cp") && err.contains(".so"), "{err}");
    }
}
