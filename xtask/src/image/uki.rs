//! Unified kernel images: the per-slot kernel command line and the assembly of
//! systemd-stub + .osrel + .cmdline + .initrd + .linux with objcopy.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cmd;

/// The full kernel command line of one slot (format in docs/contracts.md).
pub fn cmdline(static_part: &str, slot: char, version: &str, roothash: &str) -> String {
    let static_part = static_part.split_whitespace().collect::<Vec<_>>().join(" ");
    format!("{static_part} edge.slot={slot} edge.version={version} edge.roothash={roothash}")
}

/// One section of `objdump -h` output: name, size and VMA.
#[derive(Debug, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub size: u64,
    pub vma: u64,
}

pub fn parse_objdump_sections(text: &str) -> Vec<Section> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "Idx Name Size VMA LMA FileOff Algn", Idx numeric.
            if f.len() != 7 || f[0].parse::<u32>().is_err() {
                return None;
            }
            Some(Section {
                name: f[1].to_string(),
                size: u64::from_str_radix(f[2], 16).ok()?,
                vma: u64::from_str_radix(f[3], 16).ok()?,
            })
        })
        .collect()
}

/// VMAs for new sections of the given sizes, placed after the stub's last section, each
/// page-aligned so none overlaps the next.
pub fn plan_vmas(existing: &[Section], sizes: &[u64]) -> Vec<u64> {
    const ALIGN: u64 = 0x1000;
    let align = |v: u64| v.div_ceil(ALIGN) * ALIGN;
    let mut next = align(existing.iter().map(|s| s.vma + s.size).max().unwrap_or(0));
    sizes
        .iter()
        .map(|&size| {
            let vma = next;
            next = align(vma + size.max(1));
            vma
        })
        .collect()
}

pub struct UkiParts<'a> {
    pub stub: &'a Path,
    pub osrel: &'a Path,
    pub cmdline: &'a Path,
    pub initrd: &'a Path,
    pub linux: &'a Path,
}

/// Assembles the UKI at `out`. The kernel goes last: it may need room to grow in memory.
pub fn assemble(parts: &UkiParts, out: &Path) -> Result<()> {
    let objdump = cmd::stdout(Command::new("objdump").arg("-h").arg(parts.stub))?;
    let existing = parse_objdump_sections(&objdump);
    if existing.is_empty() {
        bail!("objdump -h {} listed no sections", parts.stub.display());
    }
    let new = [
        (".osrel", parts.osrel),
        (".cmdline", parts.cmdline),
        (".initrd", parts.initrd),
        (".linux", parts.linux),
    ];
    let mut sizes = Vec::new();
    for (_, p) in &new {
        sizes.push(
            std::fs::metadata(p)
                .with_context(|| format!("failed to stat {}", p.display()))?
                .len(),
        );
    }
    let vmas = plan_vmas(&existing, &sizes);
    let mut c = Command::new("objcopy");
    for ((name, path), vma) in new.iter().zip(&vmas) {
        c.arg("--add-section")
            .arg(format!("{name}={}", path.display()));
        c.arg("--set-section-flags")
            .arg(format!("{name}=data,readonly"));
        c.arg("--change-section-vma")
            .arg(format!("{name}=0x{vma:x}"));
    }
    c.arg(parts.stub).arg(out);
    cmd::output(&mut c)?;
    // objcopy must have kept our VMAs; a wrong layout would only show at boot.
    let check = parse_objdump_sections(&cmd::stdout(Command::new("objdump").arg("-h").arg(out))?);
    for ((name, _), vma) in new.iter().zip(&vmas) {
        match check.iter().find(|s| &s.name == name) {
            Some(s) if s.vma == *vma => {}
            other => bail!(
                "{}: section {name} is {other:?}, wanted VMA 0x{vma:x}",
                out.display()
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_appends_slot_version_and_hash() {
        assert_eq!(
            cmdline(
                "console=ttyS0,115200  quiet panic=10\n",
                'b',
                "0.1.0",
                "abcd"
            ),
            "console=ttyS0,115200 quiet panic=10 edge.slot=b edge.version=0.1.0 edge.roothash=abcd"
        );
    }

    const OBJDUMP: &str = "
/usr/lib/systemd/boot/efi/linuxx64.efi.stub:     file format pei-x86-64

Sections:
Idx Name          Size      VMA               LMA               File off  Algn
  0 .text         0000bff0  0000000000004000  0000000000004000  00000400  2**4
                  CONTENTS, ALLOC, LOAD, READONLY, CODE
  6 .sbat         000000e2  0000000000019000  0000000000019000  00011000  2**2
  7 .sdmagic      00000034  0000000000019100  0000000000019100  00011200  2**2
                  CONTENTS, ALLOC, LOAD, READONLY, DATA
";

    #[test]
    fn parses_objdump_sections() {
        let s = parse_objdump_sections(OBJDUMP);
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[2],
            Section {
                name: ".sdmagic".into(),
                size: 0x34,
                vma: 0x19100
            }
        );
    }

    #[test]
    fn new_sections_follow_the_stub_without_overlap() {
        let s = parse_objdump_sections(OBJDUMP);
        let v = plan_vmas(&s, &[0x100, 0x1000, 0x2001, 5]);
        assert_eq!(v, [0x1a000, 0x1b000, 0x1c000, 0x1f000]);
    }
}
