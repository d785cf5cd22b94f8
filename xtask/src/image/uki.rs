//! Unified kernel images: the per-slot kernel command line and the assembly of
//! systemd-stub + .osrel + .cmdline + .pcrpkey + .pcrsig + .initrd + .linux with objcopy,
//! checked against the PE headers so that what the stub measures is what `pcr.rs`
//! predicted.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::keys::PcrPolicyKey;
use super::{cmd, pcr};

/// The full kernel command line of one slot (format in docs/contracts.md).
pub fn cmdline(
    static_part: &str,
    options: &[String],
    slot: char,
    version: &str,
    security_version: u64,
    roothash: &str,
) -> String {
    let mut words: Vec<&str> = static_part.split_whitespace().collect();
    words.extend(options.iter().map(String::as_str));
    let words = words.join(" ");
    format!(
        "{words} edge.slot={slot} edge.version={version} \
         edge.security_version={security_version} edge.roothash={roothash}"
    )
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

/// One entry of a PE image's section table.
#[derive(Debug, PartialEq, Eq)]
pub struct PeSection {
    /// The 8-byte name field as stored (NUL-padded).
    pub raw_name: [u8; 8],
    pub virtual_size: u32,
    pub virtual_address: u32,
    pub raw_size: u32,
    pub raw_offset: u32,
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The section table of a PE image.
pub fn pe_sections(image: &[u8]) -> Result<Vec<PeSection>> {
    let pe = le32(image, 0x3c).context("too short for a DOS header")? as usize;
    if image.get(pe..pe + 4) != Some(b"PE\0\0") {
        bail!("no PE signature at 0x{pe:x}");
    }
    let coff = pe + 4;
    let count = le16(image, coff + 2).context("truncated COFF header")?;
    let optional = le16(image, coff + 16).context("truncated COFF header")?;
    let table = coff + 20 + optional as usize;
    (0..count as usize)
        .map(|i| {
            let at = table + 40 * i;
            let field = |off| le32(image, at + off).context("truncated section table");
            Ok(PeSection {
                raw_name: image
                    .get(at..at + 8)
                    .context("truncated section table")?
                    .try_into()?,
                virtual_size: field(8)?,
                virtual_address: field(12)?,
                raw_size: field(16)?,
                raw_offset: field(20)?,
            })
        })
        .collect()
}

/// The bytes the firmware's loader puts at the section's address, VirtualSize long: its
/// raw data, cut or zero-padded. systemd-stub 252 measures exactly these
/// (pe_memory_locate_sections reports VirtualSize).
pub fn loaded_bytes(image: &[u8], s: &PeSection) -> Result<Vec<u8>> {
    let n = s.virtual_size.min(s.raw_size) as usize;
    let start = s.raw_offset as usize;
    let mut v = image
        .get(start..start + n)
        .context("section data past the end of the file")?
        .to_vec();
    v.resize(s.virtual_size as usize, 0);
    Ok(v)
}

/// The UKI sections systemd-stub 252 finds in `image`, as it finds them: a table entry
/// whose name field starts with the section name, the last such entry winning. Includes
/// `.pcrsig`, which the stub passes on but does not measure.
pub fn stub_view(image: &[u8]) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let table = pe_sections(image)?;
    let mut out = Vec::new();
    for name in pcr::MEASURED_SECTIONS.into_iter().chain([".pcrsig"]) {
        if let Some(s) = table
            .iter()
            .rev()
            .find(|s| s.raw_name.starts_with(name.as_bytes()))
        {
            if s.virtual_size > 0 {
                out.push((name, loaded_bytes(image, s)?));
            }
        }
    }
    Ok(out)
}

pub struct UkiParts<'a> {
    pub stub: &'a Path,
    pub osrel: &'a Path,
    pub cmdline: &'a Path,
    pub initrd: &'a Path,
    pub linux: &'a Path,
    /// Signs `.pcrsig`; its public PEM file is `.pcrpkey`.
    pub pcr_key: &'a PcrPolicyKey,
    /// Where to write the `.pcrsig` JSON for objcopy.
    pub pcrsig: &'a Path,
}

/// What a UKI makes of PCR 11 (SHA-256 bank).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcr11 {
    /// After the stub's measurements and systemd-pcrphase's "enter-initrd": the value the
    /// `.pcrsig` signs.
    pub enter_initrd: pcr::Digest,
}

/// Predicts PCR 11 at [`pcr::SIGNED_PHASE`] for these sections, and signs the policy for
/// it: returns the prediction and the `.pcrsig` JSON.
pub fn sign_pcr11(sections: &[(&str, &[u8])], key: &PcrPolicyKey) -> Result<(Pcr11, String)> {
    let value = pcr::after_phases(&pcr::after_sections(sections), pcr::SIGNED_PHASE);
    let pol = pcr::policy_pcr11(&value);
    let sig = key.sign(&pol)?;
    let json = pcr::signature_json(&key.fingerprint(), &pol, &sig);
    Ok((
        Pcr11 {
            enter_initrd: value,
        },
        json,
    ))
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("failed to read {}", p.display()))
}

/// Assembles the UKI at `out` and returns what it will measure into PCR 11. The kernel
/// goes last: it may need room to grow in memory.
pub fn assemble(parts: &UkiParts, out: &Path) -> Result<Pcr11> {
    let objdump = cmd::stdout(Command::new("objdump").arg("-h").arg(parts.stub))?;
    let existing = parse_objdump_sections(&objdump);
    if existing.is_empty() {
        bail!("objdump -h {} listed no sections", parts.stub.display());
    }
    for s in &existing {
        if pcr::MEASURED_SECTIONS
            .into_iter()
            .chain([".pcrsig"])
            .any(|n| s.name.starts_with(n))
        {
            bail!(
                "{} already has a section {}: the PCR 11 prediction would not hold",
                parts.stub.display(),
                s.name
            );
        }
    }
    let pcrpkey = parts.pcr_key.public_pem_path.as_path();
    let mut new: Vec<(&str, &Path, Vec<u8>)> = vec![
        (".osrel", parts.osrel, read(parts.osrel)?),
        (".cmdline", parts.cmdline, read(parts.cmdline)?),
        (".pcrpkey", pcrpkey, read(pcrpkey)?),
        // The kernel before the initramfs: its place in the file then depends only on the
        // small sections before it, so it is the same blocks from one version to the next
        // (an update's delta carries none of it). The stub finds sections by name.
        (".linux", parts.linux, read(parts.linux)?),
        (".initrd", parts.initrd, read(parts.initrd)?),
    ];
    let measured: Vec<(&str, &[u8])> = new.iter().map(|(n, _, b)| (*n, b.as_slice())).collect();
    let (pcr11, json) = sign_pcr11(&measured, parts.pcr_key)?;
    std::fs::write(parts.pcrsig, &json)
        .with_context(|| format!("failed to write {}", parts.pcrsig.display()))?;
    new.insert(3, (".pcrsig", parts.pcrsig, json.into_bytes()));

    let sizes: Vec<u64> = new.iter().map(|(_, _, b)| b.len() as u64).collect();
    let vmas = plan_vmas(&existing, &sizes);
    let mut c = Command::new("objcopy");
    for ((name, path, _), vma) in new.iter().zip(&vmas) {
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
    for ((name, _, _), vma) in new.iter().zip(&vmas) {
        match check.iter().find(|s| &s.name == name) {
            Some(s) if s.vma == *vma => {}
            other => bail!(
                "{}: section {name} is {other:?}, wanted VMA 0x{vma:x}",
                out.display()
            ),
        }
    }
    // And the stub must measure exactly the bytes we predicted from (VirtualSize equal to
    // the file's length), and hand on exactly the signature we made.
    let view = stub_view(&read(out)?).with_context(|| format!("{}: bad PE", out.display()))?;
    let found: Vec<&str> = view.iter().map(|(n, _)| *n).collect();
    let mut wanted: Vec<&str> = new.iter().map(|(n, _, _)| *n).collect();
    wanted.sort_by_key(|n| {
        pcr::MEASURED_SECTIONS
            .iter()
            .chain(&[".pcrsig"])
            .position(|m| m == n)
    });
    if found != wanted {
        bail!(
            "{}: systemd-stub would find the sections {found:?}, not {wanted:?}",
            out.display()
        );
    }
    for (name, bytes) in &view {
        let (_, path, input) = new.iter().find(|(n, _, _)| n == name).expect("listed");
        if bytes != input {
            bail!(
                "{}: systemd-stub would read {} bytes of {name}, not the {} bytes of {}",
                out.display(),
                bytes.len(),
                input.len(),
                path.display()
            );
        }
    }
    Ok(pcr11)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_appends_slot_versions_and_hash() {
        assert_eq!(
            cmdline(
                "console=ttyS0,115200  quiet panic=10\n",
                &[],
                'b',
                "0.1.0",
                1,
                "abcd"
            ),
            "console=ttyS0,115200 quiet panic=10 edge.slot=b edge.version=0.1.0 \
             edge.security_version=1 edge.roothash=abcd"
        );
        assert_eq!(
            cmdline("quiet", &["edge.tpm_bind_pcrs=7".into()], 'a', "1", 3, "ff"),
            "quiet edge.tpm_bind_pcrs=7 edge.slot=a edge.version=1 edge.security_version=3 \
             edge.roothash=ff"
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

    #[test]
    fn loaded_bytes_are_the_raw_data_cut_or_zero_padded_to_virtual_size() {
        // A DOS stub pointing at "PE\0\0", a COFF header with two sections and no
        // optional header, the table, then the data.
        let mut img = vec![0u8; 0x40];
        img[0x3c] = 0x40;
        img.extend_from_slice(b"PE\0\0");
        let mut coff = [0u8; 20];
        coff[2] = 2;
        img.extend_from_slice(&coff);
        let data_at = 0x40 + 4 + 20 + 2 * 40;
        for (name, vsize, rsize, off) in [
            (b".osrel\0\0", 3u32, 8u32, data_at as u32),
            (b".linux\0\0", 6, 4, data_at as u32 + 8),
        ] {
            img.extend_from_slice(name);
            for v in [vsize, 0x1000, rsize, off] {
                img.extend_from_slice(&v.to_le_bytes());
            }
            img.extend_from_slice(&[0; 16]);
        }
        img.extend_from_slice(b"abcdefghWXYZ");
        let t = pe_sections(&img).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(loaded_bytes(&img, &t[0]).unwrap(), b"abc");
        assert_eq!(loaded_bytes(&img, &t[1]).unwrap(), b"WXYZ\0\0");
        assert_eq!(
            stub_view(&img).unwrap(),
            vec![
                (".linux", b"WXYZ\0\0".to_vec()),
                (".osrel", b"abc".to_vec())
            ]
        );
        assert!(pe_sections(&img[..0x50]).is_err());
    }

    /// Small section files and a key made in `dir`, as both `assemble` and
    /// systemd-measure take them.
    struct Fixture {
        dir: std::path::PathBuf,
        key: PcrPolicyKey,
    }

    impl Fixture {
        fn new(dir: &Path) -> Fixture {
            let w = |name: &str, data: &[u8]| std::fs::write(dir.join(name), data).unwrap();
            w(
                "linux",
                &(0..5000u32)
                    .map(|i| (i * 7 % 251) as u8)
                    .collect::<Vec<_>>(),
            );
            w("osrel", b"ID=edgeos\nVERSION_ID=0.1.0\n");
            w("cmdline", b"console=ttyS0 edge.slot=a");
            w("initrd", &[0x5a; 3001]);
            let key = super::super::keys::pcr_policy_key(&dir.join("keys")).unwrap();
            Fixture {
                dir: dir.to_path_buf(),
                key,
            }
        }

        fn path(&self, name: &str) -> std::path::PathBuf {
            self.dir.join(name)
        }

        fn sections(&self) -> Vec<(&'static str, Vec<u8>)> {
            vec![
                (".linux", std::fs::read(self.path("linux")).unwrap()),
                (".osrel", std::fs::read(self.path("osrel")).unwrap()),
                (".cmdline", std::fs::read(self.path("cmdline")).unwrap()),
                (".initrd", std::fs::read(self.path("initrd")).unwrap()),
                (".pcrpkey", self.key.public_pem().unwrap()),
            ]
        }

        fn signed(&self) -> (Pcr11, String) {
            let s = self.sections();
            let s: Vec<(&str, &[u8])> = s.iter().map(|(n, b)| (*n, b.as_slice())).collect();
            sign_pcr11(&s, &self.key).unwrap()
        }

        fn measure(&self, verb: &str) -> Command {
            let tool = Path::new("/lib/systemd/systemd-measure");
            assert!(
                tool.exists(),
                "{} is missing (Debian 12 package systemd): this test checks our PCR 11 against it",
                tool.display()
            );
            let mut c = Command::new(tool);
            c.arg(verb);
            for s in ["linux", "osrel", "cmdline", "initrd"] {
                c.arg(format!("--{s}={}", self.path(s).display()));
            }
            c.arg(format!("--pcrpkey={}", self.key.public_pem_path.display()))
                .args(["--bank=sha256", "--phase=enter-initrd"]);
            c
        }
    }

    #[test]
    fn prediction_equals_systemd_measure_calculate() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Fixture::new(tmp.path());
        let out = cmd::stdout(&mut f.measure("calculate")).unwrap();
        let theirs = out
            .lines()
            .find_map(|l| l.strip_prefix("11:sha256="))
            .unwrap_or_else(|| panic!("no 11:sha256= line in {out:?}"));
        assert_eq!(pcr::hex(&f.signed().0.enter_initrd), theirs);
    }

    /// A software TPM on a unix socket in its own directory, stopped on drop:
    /// systemd-measure 252 computes the policy digest in a TPM trial session.
    struct Swtpm {
        child: std::process::Child,
        sock: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Swtpm {
        fn start() -> Swtpm {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("sock");
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", dir.path().display()))
                .arg("--server")
                .arg(format!("type=unixio,path={}", sock.display()))
                .arg("--ctrl")
                .arg(format!("type=unixio,path={}.ctrl", sock.display()))
                .args(["--flags", "not-need-init,startup-clear"])
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("swtpm is missing (Debian 12 packages swtpm and libtss2-tcti-swtpm0)");
            let t = Swtpm {
                child,
                sock,
                _dir: dir,
            };
            for _ in 0..200 {
                if t.sock.exists() {
                    return t;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            panic!("swtpm did not make {}", t.sock.display());
        }
    }

    impl Drop for Swtpm {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn pcrsig_equals_systemd_measure_sign() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Fixture::new(tmp.path());
        let tpm = Swtpm::start();
        let dir = f.key.public_pem_path.parent().unwrap();
        let mut c = f.measure("sign");
        c.arg(format!("--tpm2-device=swtpm:path={}", tpm.sock.display()))
            .arg(format!(
                "--private-key={}",
                dir.join("pcr-policy.key").display()
            ))
            .arg(format!("--public-key={}", f.key.public_pem_path.display()))
            .arg("--json=short");
        let theirs = cmd::stdout(&mut c).unwrap();
        let ours = f.signed().1;
        let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let (t, o) = (parse(&theirs), parse(&ours));
        for field in ["pcrs", "pkfp", "pol", "sig"] {
            assert_eq!(o["sha256"][0][field], t["sha256"][0][field], "{field}");
        }
        assert_eq!(o, t);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn the_assembled_uki_measures_what_was_predicted() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Fixture::new(tmp.path());
        // A stand-in for systemd-stub: a PE image with one small .data section.
        std::fs::write(f.path("stub-data"), b"not really a stub").unwrap();
        cmd::output(
            Command::new("objcopy")
                .args(["-I", "binary", "-O", "pei-x86-64", "-B", "i386:x86-64"])
                .arg(f.path("stub-data"))
                .arg(f.path("stub.efi")),
        )
        .unwrap();
        let out = f.path("uki.efi");
        let got = assemble(
            &UkiParts {
                stub: &f.path("stub.efi"),
                osrel: &f.path("osrel"),
                cmdline: &f.path("cmdline"),
                initrd: &f.path("initrd"),
                linux: &f.path("linux"),
                pcr_key: &f.key,
                pcrsig: &f.path("pcrsig.json"),
            },
            &out,
        )
        .unwrap();
        let (want, json) = f.signed();
        assert_eq!(got, want);

        // Read back as the stub does: each section's VirtualSize bytes.
        let view = stub_view(&std::fs::read(&out).unwrap()).unwrap();
        let mut expected = f.sections();
        expected.push((".pcrsig", json.into_bytes()));
        assert_eq!(view, expected);
        for s in pe_sections(&std::fs::read(&out).unwrap()).unwrap() {
            if s.raw_name.starts_with(b".linux") {
                assert_eq!(s.virtual_size, 5000);
            }
        }
        let measured: Vec<(&str, &[u8])> = view.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        assert_eq!(
            pcr::after_phases(&pcr::after_sections(&measured), "enter-initrd"),
            want.enter_initrd
        );
    }
}
