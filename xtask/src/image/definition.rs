//! The image definition (`image/image.toml`): its typed form, loading and validation.
//! Everything that decides what the image contains lives in that file, not in xtask.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    pub image: ImageMeta,
    pub kernel: Kernel,
    pub boot: Boot,
    #[serde(default)]
    pub tpm: TpmOptions,
    pub partitions: Partitions,
    #[serde(rename = "package")]
    pub packages: Vec<Package>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageMeta {
    pub name: String,
    pub version: String,
    pub pretty_name: String,
    /// The update bundle's security version (docs/update.md): raise it when boxes must
    /// no longer accept bundles of older versions. From 1.
    #[serde(default = "first_security_version")]
    pub security_version: u64,
    /// The root's erofs physical cluster in KiB (`mkfs.erofs -C`): how much compressed
    /// data lz4hc works on at once. Larger compresses better and costs more
    /// decompression per page read (docs/image.md measures both). A power of two from 4
    /// (one block, mkfs.erofs's default) to 1024.
    #[serde(default = "one_block_pcluster")]
    pub erofs_pcluster_kib: u32,
}

fn first_security_version() -> u64 {
    1
}

fn one_block_pcluster() -> u32 {
    4
}

/// Checks an erofs physical cluster size in KiB; `what` names where it came from.
pub fn check_pcluster_kib(what: &str, kib: u32) -> Result<()> {
    if !(4..=1024).contains(&kib) || !kib.is_power_of_two() {
        bail!("{what}: {kib} KiB is not a power of two from 4 to 1024");
    }
    Ok(())
}

/// `[tpm]`: how the data partition's key is sealed (docs/security.md).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TpmOptions {
    /// Bind the data key to PCR 7's value at the first boot as well as to the signed
    /// PCR 11 policy: a change of the firmware's Secure Boot state or keys then locks
    /// the data until the recovery key is used. Off by default.
    #[serde(default)]
    pub bind_pcr7: bool,
}

impl TpmOptions {
    /// The `edge.*` parameters these options put on every slot's command line.
    pub fn cmdline(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.bind_pcr7 {
            out.push("edge.tpm_bind_pcrs=7".to_string());
        }
        out
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub package: String,
    pub version: String,
    pub release: String,
    pub cmdline: String,
    pub initramfs_compression: Compression,
    pub initramfs_modules: Vec<String>,
    pub root_modules: Vec<String>,
    /// Modules the boot does not load: the program that first needs one loads it
    /// (edge-kmod's `load_on_demand`), with its dependencies that the lists above leave
    /// out.
    #[serde(default)]
    pub on_demand_modules: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    pub package: String,
    pub version: String,
    pub loader: String,
    pub stub: String,
    pub tries: u32,
    pub default_entry: String,
    pub timeout: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Partitions {
    pub esp_mib: u64,
    pub root_mib: u64,
    pub verity_mib: u64,
    pub data_mib: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub files: Vec<String>,
}

/// A Debian package pinned to one version, as handed to the fetcher.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pin {
    pub name: String,
    pub version: String,
}

impl Definition {
    pub fn load(path: &Path) -> Result<Definition> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
    }

    /// Parses and validates; errors name the offending key (the caller adds the file).
    pub fn parse(text: &str) -> Result<Definition> {
        let def: Definition = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        def.validate()?;
        Ok(def)
    }

    fn validate(&self) -> Result<()> {
        check_semver("image.version", &self.image.version)?;
        if self.image.security_version == 0 {
            bail!("image.security_version: versions start at 1");
        }
        check_pcluster_kib("image.erofs_pcluster_kib", self.image.erofs_pcluster_kib)?;
        check_word("image.name", &self.image.name)?;
        check_deb_name("kernel.package", &self.kernel.package)?;
        check_deb_version("kernel.version", &self.kernel.version)?;
        check_word("kernel.release", &self.kernel.release)?;
        if self.kernel.cmdline.contains("edge.") {
            bail!("kernel.cmdline: must not set edge.* parameters (xtask appends them per slot)");
        }
        if self.kernel.cmdline.chars().any(|c| c.is_control()) {
            bail!("kernel.cmdline: contains control characters");
        }
        for (key, list) in [
            ("kernel.initramfs_modules", &self.kernel.initramfs_modules),
            ("kernel.root_modules", &self.kernel.root_modules),
            ("kernel.on_demand_modules", &self.kernel.on_demand_modules),
        ] {
            for m in list {
                check_word(key, m)?;
            }
        }
        check_deb_name("boot.package", &self.boot.package)?;
        check_deb_version("boot.version", &self.boot.version)?;
        check_rel_path("boot.loader", &self.boot.loader)?;
        check_rel_path("boot.stub", &self.boot.stub)?;
        if !(1..=9).contains(&self.boot.tries) {
            bail!("boot.tries: {} is out of range 1..=9", self.boot.tries);
        }
        if self.boot.default_entry.is_empty()
            || self.boot.default_entry.contains(char::is_whitespace)
        {
            bail!("boot.default_entry: must be a non-empty glob without spaces");
        }
        let p = &self.partitions;
        for (key, v, min) in [
            ("partitions.esp_mib", p.esp_mib, 33),
            ("partitions.root_mib", p.root_mib, 8),
            ("partitions.verity_mib", p.verity_mib, 1),
            ("partitions.data_mib", p.data_mib, 16),
        ] {
            // FAT32 needs 65525 clusters: 33 MiB at 512-byte clusters.
            if v < min || v > 1 << 20 {
                bail!("{key}: {v} MiB is out of range {min}..=1048576");
            }
        }
        if self.packages.is_empty() {
            bail!("package: at least one package is needed");
        }
        for (i, pkg) in self.packages.iter().enumerate() {
            check_deb_name(&format!("package[{i}].name"), &pkg.name)?;
            check_deb_version(
                &format!("package[{i}].version ({})", pkg.name),
                &pkg.version,
            )?;
            if pkg.files.is_empty() {
                bail!(
                    "package[{i}].files ({}): empty; list the files to take",
                    pkg.name
                );
            }
            for f in &pkg.files {
                check_rel_path(&format!("package[{i}].files ({})", pkg.name), f)?;
            }
            if self.packages[..i].iter().any(|o| o.name == pkg.name) {
                bail!("package[{i}].name: {} is listed twice", pkg.name);
            }
        }
        Ok(())
    }

    /// Every package the build fetches: the kernel, systemd-boot and the root's packages.
    pub fn pins(&self) -> Vec<Pin> {
        let mut pins = vec![
            Pin {
                name: self.kernel.package.clone(),
                version: self.kernel.version.clone(),
            },
            Pin {
                name: self.boot.package.clone(),
                version: self.boot.version.clone(),
            },
        ];
        pins.extend(self.packages.iter().map(|p| Pin {
            name: p.name.clone(),
            version: p.version.clone(),
        }));
        pins
    }
}

fn check_semver(key: &str, v: &str) -> Result<()> {
    let parts: Vec<&str> = v.split('.').collect();
    let ok = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        bail!("{key}: {v:?} is not a version of the form MAJOR.MINOR.PATCH");
    }
    Ok(())
}

fn check_word(key: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if !ok {
        bail!("{key}: {v:?} must be non-empty and use only letters, digits, '-', '_', '.', '+'");
    }
    Ok(())
}

/// Debian policy 5.6.1: lower case letters, digits, '+', '-', '.'; at least two chars.
fn check_deb_name(key: &str, v: &str) -> Result<()> {
    let ok = v.len() >= 2
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    if !ok {
        bail!("{key}: {v:?} is not a Debian package name");
    }
    Ok(())
}

/// Debian policy 5.6.12, loosely: [epoch:]upstream[-revision], starting with a digit.
fn check_deb_version(key: &str, v: &str) -> Result<()> {
    let upstream = v.split_once(':').map_or(v, |(epoch, rest)| {
        if epoch.bytes().all(|b| b.is_ascii_digit()) && !epoch.is_empty() {
            rest
        } else {
            ""
        }
    });
    let ok = upstream.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && upstream
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".+-~".contains(&b));
    if !ok {
        bail!("{key}: {v:?} is not an exact Debian version (like 1.2.3-1+deb12u1)");
    }
    Ok(())
}

fn check_rel_path(key: &str, v: &str) -> Result<()> {
    if v.is_empty() || v.starts_with('/') || v.split('/').any(|c| c == ".." || c.is_empty()) {
        bail!("{key}: {v:?} must be a relative path inside the package, without '..'");
    }
    Ok(())
}

/// Matches one path against a glob where `*` and `?` stay within a path component.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let pc: Vec<&str> = pattern.split('/').collect();
    let fc: Vec<&str> = path.split('/').collect();
    pc.len() == fc.len()
        && pc
            .iter()
            .zip(&fc)
            .all(|(p, f)| component_match(p.as_bytes(), f.as_bytes()))
}

fn component_match(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| component_match(rest, &s[i..])),
        Some((b'?', rest)) => !s.is_empty() && component_match(rest, &s[1..]),
        Some((c, rest)) => s.first() == Some(c) && component_match(rest, &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../image/image.toml");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn shipped_definition_is_valid() {
        let def = Definition::parse(&shipped()).unwrap();
        assert_eq!(def.image.version, "0.1.0");
        assert_eq!(def.kernel.release, "6.1.0-56-amd64");
        assert!(def
            .pins()
            .iter()
            .any(|p| p.name == "linux-image-6.1.0-56-amd64"));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = shipped().replace("[partitions]", "[partitions]\nswap_mib = 3");
        let err = format!("{:#}", Definition::parse(&text).unwrap_err());
        assert!(err.contains("swap_mib"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let text = shipped().replace("data_mib = 1024", "");
        let err = format!("{:#}", Definition::parse(&text).unwrap_err());
        assert!(err.contains("data_mib"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("version = \"0.1.0\"", "version = \"0.1\"", "image.version"),
            ("esp_mib = 64", "esp_mib = 2", "partitions.esp_mib"),
            (
                "version = \"6.1.192-2\"",
                "version = \"latest\"",
                "kernel.version",
            ),
            ("tries = 3", "tries = 0", "boot.tries"),
            (
                "erofs_pcluster_kib = 128",
                "erofs_pcluster_kib = 96",
                "image.erofs_pcluster_kib",
            ),
            (
                "\"usr/sbin/runc\"",
                "\"/usr/sbin/runc\"",
                "package[3].files (runc)",
            ),
        ];
        for (from, to, key) in cases {
            let text = shipped().replacen(from, to, 1);
            assert_ne!(text, shipped(), "{from} not in the definition");
            let err = format!("{:#}", Definition::parse(&text).unwrap_err());
            assert!(err.contains(key), "{key} not in {err}");
        }
    }

    #[test]
    fn load_prefixes_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("image.toml");
        std::fs::write(&p, "[image]\nname = 1\n").unwrap();
        let err = format!("{:#}", Definition::load(&p).unwrap_err());
        assert!(err.starts_with(&p.display().to_string()), "{err}");
    }

    #[test]
    fn globs_stay_in_one_component() {
        assert!(glob_match(
            "usr/lib/x/libuuid.so.1*",
            "usr/lib/x/libuuid.so.1.3.0"
        ));
        assert!(glob_match("usr/lib/cni/*", "usr/lib/cni/bridge"));
        assert!(!glob_match("usr/lib/*", "usr/lib/cni/bridge"));
        assert!(glob_match("a/b?c", "a/bxc"));
        assert!(!glob_match("a/b?c", "a/bc"));
    }
}
