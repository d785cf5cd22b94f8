//! Kernel modules: running depmod on the unpacked kernel, reading modules.dep and turning
//! the definition's module names into ordered load lists (dependencies first).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use edge_kmod::module_name;

use super::cmd;

/// modules.dep as a map from module name (`-` written as `_`) to its path and its
/// dependency paths.
#[derive(Debug, Default)]
pub struct DepTable {
    by_name: BTreeMap<String, String>,
    deps: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

impl DepTable {
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Result<DepTable> {
        let mut t = DepTable::default();
        for (n, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (module, deps) = line
                .split_once(':')
                .with_context(|| format!("modules.dep line {}: no ':'", n + 1))?;
            t.by_name.insert(module_name(module), module.to_string());
            t.deps.insert(
                module.to_string(),
                deps.split_whitespace().map(String::from).collect(),
            );
        }
        t.builtin = modules_builtin.lines().map(module_name).collect();
        Ok(t)
    }

    /// Paths (relative to /lib/modules/<kver>/) to load for `wanted`, dependencies first,
    /// each once, leaving out built-in modules and those in `skip`.
    pub fn load_order(&self, wanted: &[String], skip: &BTreeSet<String>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut done: BTreeSet<String> = skip.clone();
        for name in wanted {
            let norm = name.replace('-', "_");
            match self.by_name.get(&norm) {
                Some(path) => self.visit(path, &mut done, &mut out, 0)?,
                None if self.builtin.contains(&norm) => {}
                None => bail!("kernel module {name} is neither in modules.dep nor built in"),
            }
        }
        Ok(out)
    }

    fn visit(
        &self,
        path: &str,
        done: &mut BTreeSet<String>,
        out: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if done.contains(path) {
            return Ok(());
        }
        if depth > 64 {
            bail!("modules.dep: dependency cycle through {path}");
        }
        let deps = self
            .deps
            .get(path)
            .with_context(|| format!("modules.dep: {path} is not listed"))?;
        for d in deps {
            self.visit(d, done, out, depth + 1)?;
        }
        done.insert(path.to_string());
        out.push(path.to_string());
        Ok(())
    }
}

/// Runs depmod over the unpacked kernel package and reads the resulting tables.
pub fn depmod(kernel_root: &Path, release: &str) -> Result<DepTable> {
    let depmod = ["/usr/sbin/depmod", "/sbin/depmod"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("depmod");
    cmd::output(Command::new(depmod).arg("-b").arg(kernel_root).arg(release))?;
    let dir = kernel_root.join("lib/modules").join(release);
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .with_context(|| format!("failed to read {}/{f}", dir.display()))
    };
    DepTable::parse(&read("modules.dep")?, &read("modules.builtin")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-bufio.ko: kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-mod.ko:
";

    fn table() -> DepTable {
        DepTable::parse(DEP, "kernel/crypto/sha256_generic.ko\n").unwrap()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let order = table()
            .load_order(
                &["dm_verity".into(), "dm-mod".into(), "ext4".into()],
                &BTreeSet::new(),
            )
            .unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/md/dm-mod.ko",
                "kernel/drivers/md/dm-bufio.ko",
                "kernel/drivers/md/dm-verity.ko",
                "kernel/lib/crc16.ko",
                "kernel/fs/mbcache.ko",
                "kernel/fs/jbd2/jbd2.ko",
                "kernel/fs/ext4/ext4.ko",
            ]
        );
    }

    #[test]
    fn skipped_and_builtin_modules_are_left_out() {
        let skip: BTreeSet<String> = ["kernel/drivers/md/dm-mod.ko".to_string()].into();
        let order = table()
            .load_order(&["dm_bufio".into(), "sha256_generic".into()], &skip)
            .unwrap();
        assert_eq!(order, ["kernel/drivers/md/dm-bufio.ko"]);
    }

    #[test]
    fn unknown_module_is_an_error_naming_it() {
        let err = table()
            .load_order(&["nvme".into()], &BTreeSet::new())
            .unwrap_err();
        assert!(err.to_string().contains("nvme"));
    }
}
