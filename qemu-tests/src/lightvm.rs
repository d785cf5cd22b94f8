//! The light VM: Debian's kernel booted directly (no firmware, no image) with a generated
//! initramfs whose /init is a static test program, plus raw virtio disks (see `boot` for
//! why not NVMe). For subsystems the host kernel lacks (device-mapper): a boot takes
//! seconds under TCG.
//!
//! The kernel and its modules come from the same pinned package the image uses
//! (`image/image.toml` [kernel]), from the image builder's .deb cache. The test program
//! prints `TEST <name> ok` or `TEST <name> FAILED: <why>` on the console and powers off.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cpio;

/// The workspace root (qemu-tests' parent). Cargo sets CARGO_MANIFEST_DIR when it runs
/// a test, and that is preferred: the compile-time value can name another clone that
/// shares the target directory (its build of the same path looks fresh to cargo).
pub fn workspace_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Cargo's target directory for this workspace: CARGO_TARGET_DIR (relative paths are
/// taken from the workspace root, as cargo does) or `target/`. CI keeps it outside the
/// clone, so nothing may assume `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

/// The unpacked kernel package: vmlinuz and its module tree with modules.dep.
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    pub release: String,
    deps: BTreeMap<String, Vec<String>>,
    by_name: BTreeMap<String, String>,
}

fn kernel_pin(image_toml: &str) -> Result<(String, String, String)> {
    let mut in_kernel = false;
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for line in image_toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_kernel = line == "[kernel]";
            continue;
        }
        if let (true, Some((k, v))) = (in_kernel, line.split_once('=')) {
            let k = k.trim();
            if ["package", "version", "release"].contains(&k) {
                found.insert(k.to_owned(), v.trim().trim_matches('"').to_owned());
            }
        }
    }
    match (
        found.get("package"),
        found.get("version"),
        found.get("release"),
    ) {
        (Some(p), Some(v), Some(r)) => Ok((p.clone(), v.clone(), r.clone())),
        _ => bail!("image/image.toml: [kernel] needs package, version and release"),
    }
}

fn deb_cache() -> Result<PathBuf> {
    let base = match std::env::var_os("EDGEOS_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/edgeos"),
    };
    Ok(base.join("debs"))
}

impl Kernel {
    /// Unpacks the pinned kernel package once into `target/lightvm/` (fetching the .deb
    /// into the image builder's cache if it is not there) and runs depmod on it.
    pub fn get() -> Result<Kernel> {
        let root = workspace_root();
        let toml_path = root.join("image/image.toml");
        let text = std::fs::read_to_string(&toml_path)
            .with_context(|| format!("failed to read {}", toml_path.display()))?;
        let (package, version, release) = kernel_pin(&text)?;
        let cache = deb_cache()?;
        let deb = cache.join(format!(
            "{package}_{}_amd64.deb",
            version.replace(':', "%3a")
        ));
        if !deb.is_file() {
            std::fs::create_dir_all(&cache)?;
            let st = Command::new("apt-get")
                .args(["download", &format!("{package}={version}")])
                .current_dir(&cache)
                .status()
                .context("failed to run apt-get download")?;
            if !st.success() || !deb.is_file() {
                bail!(
                    "could not fetch {package}={version} into {}",
                    cache.display()
                );
            }
        }
        let dir = target_dir()
            .join("lightvm")
            .join(format!("kernel-{version}"));
        let modules_dir = dir.join("lib/modules").join(&release);
        let done = dir.join(".unpacked");
        if !done.exists() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let st = Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(&dir)
                .status()?;
            if !st.success() {
                bail!("dpkg-deb -x {} failed", deb.display());
            }
            let depmod = ["/usr/sbin/depmod", "/sbin/depmod"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .unwrap_or("depmod");
            let st = Command::new(depmod)
                .arg("-b")
                .arg(&dir)
                .arg(&release)
                .status()?;
            if !st.success() {
                bail!("depmod on {} failed", dir.display());
            }
            std::fs::write(&done, "")?;
        }
        let dep_path = modules_dir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_path)
            .with_context(|| format!("failed to read {}", dep_path.display()))?;
        let mut deps = BTreeMap::new();
        let mut by_name = BTreeMap::new();
        for line in dep.lines() {
            if let Some((m, d)) = line.split_once(':') {
                by_name.insert(edge_kmod::module_name(m), m.to_owned());
                deps.insert(
                    m.to_owned(),
                    d.split_whitespace().map(String::from).collect(),
                );
            }
        }
        Ok(Kernel {
            vmlinuz: dir.join("boot").join(format!("vmlinuz-{release}")),
            modules_dir,
            release,
            deps,
            by_name,
        })
    }

    /// Module paths (relative to the module directory) for `wanted`, dependencies
    /// first, each once. Names not in modules.dep are taken as built in.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>> {
        fn visit(
            k: &Kernel,
            p: &str,
            seen: &mut BTreeSet<String>,
            out: &mut Vec<String>,
        ) -> Result<()> {
            if !seen.insert(p.to_owned()) {
                return Ok(());
            }
            let deps = k
                .deps
                .get(p)
                .with_context(|| format!("modules.dep lacks {p}"))?;
            for d in deps {
                visit(k, d, seen, out)?;
            }
            out.push(p.to_owned());
            Ok(())
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for w in wanted {
            if let Some(p) = self.by_name.get(&w.replace('-', "_")) {
                visit(self, p, &mut seen, &mut out)?;
            }
        }
        Ok(out)
    }
}

/// Writes an initramfs: `init` as /init, the modules for `wanted` under
/// /lib/modules/<release>/ and their load order in /modules.order.
pub fn initramfs(kernel: &Kernel, init: &Path, wanted: &[&str], out: &Path) -> Result<()> {
    initramfs_with_files(kernel, init, wanted, &[], out)
}

/// Like [`initramfs`], plus host files: each (host path, path in the archive without
/// the leading `/`), e.g. a program and the shared libraries it needs.
pub fn initramfs_with_files(
    kernel: &Kernel,
    init: &Path,
    wanted: &[&str],
    files: &[(PathBuf, String)],
    out: &Path,
) -> Result<()> {
    let order = kernel.load_order(wanted)?;
    let file = std::fs::File::create(out)
        .with_context(|| format!("failed to create {}", out.display()))?;
    let mut c = cpio::Writer::new(std::io::BufWriter::new(file));
    let bin = std::fs::read(init).with_context(|| format!("failed to read {}", init.display()))?;
    c.file("init", 0o755, &bin)?;
    let mut dirs = BTreeSet::new();
    // Each parent of `path` not yet in the archive, outermost first.
    let mut parents =
        |c: &mut cpio::Writer<std::io::BufWriter<std::fs::File>>, path: &str| -> Result<()> {
            for (i, _) in path.match_indices('/') {
                if dirs.insert(path[..i].to_owned()) {
                    c.dir(&path[..i], 0o755)?;
                }
            }
            Ok(())
        };
    for (host, inside) in files {
        parents(&mut c, inside)?;
        let data =
            std::fs::read(host).with_context(|| format!("failed to read {}", host.display()))?;
        c.file(inside, 0o755, &data)?;
    }
    let mut list = String::new();
    for m in &order {
        let full = format!("lib/modules/{}/{m}", kernel.release);
        parents(&mut c, &full)?;
        let data = std::fs::read(kernel.modules_dir.join(m))
            .with_context(|| format!("failed to read module {m}"))?;
        c.file(&full, 0o644, &data)?;
        list.push_str(&format!("/{full}\n"));
    }
    c.file("modules.order", 0o644, list.as_bytes())?;
    c.finish()?
        .flush()
        .with_context(|| format!("failed to write {}", out.display()))
}

/// One result line of the test program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestLine {
    pub name: String,
    /// `None` if it passed, else why it failed.
    pub failure: Option<String>,
}

/// The `TEST <name> ok` / `TEST <name> FAILED: <why>` lines of a console log.
pub fn parse_tests(console: &str) -> Vec<TestLine> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.trim_end_matches('\r').split_once("TEST ")?.1;
            let (name, verdict) = rest.split_once(' ')?;
            let failure = match verdict {
                "ok" => None,
                v => Some(v.strip_prefix("FAILED: ").unwrap_or(v).to_owned()),
            };
            Some(TestLine {
                name: name.to_owned(),
                failure,
            })
        })
        .collect()
}

pub struct Boot<'a> {
    pub kernel: &'a Kernel,
    pub initramfs: &'a Path,
    /// Raw disks and the serial number each reports.
    pub disks: Vec<(PathBuf, String)>,
    /// Appended to the kernel command line (e.g. `vmtest.phase=second`).
    pub append: String,
    pub console: PathBuf,
    pub timeout: Duration,
    /// KVM with the host's CPU instead of TCG (only where /dev/kvm works; on these
    /// build machines it hangs).
    pub kvm: bool,
    /// Console lines that begin with this are printed as they come (`  guest [N s]:
    /// <line>`), for a long run to show its progress.
    pub progress: Option<&'a str>,
}

/// Boots, waits for power-off (or the timeout, which kills QEMU and is an error), and
/// returns the console log. Disks are virtio-blk: Debian 12's QEMU 7.2 NVMe model stalls
/// whole queues under sustained writes from Linux 6.1 (seen as I/O timeouts in about one
/// run in two of the thin-pool test), which virtio-blk never did in the same trials.
/// They have `ioeventfd=off` (QEMU takes the guest's virtqueue notifications in the vCPU
/// thread instead of through an eventfd): with QEMU's default, the storage bench's guest
/// went idle for good with a request never answered in four of six long runs, and the
/// thin-pool test's guest once blocked in the kernel for two minutes (CI, 2026-12-06).
pub fn boot(b: &Boot) -> Result<String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    match b.kvm {
        true => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        false => cmd.args(["-accel", "tcg"]),
    };
    cmd.args(["-m", "1024", "-smp", "1", "-display", "none"])
        .args(["-no-reboot", "-nic", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", b.console.display()))
        .arg("-kernel")
        .arg(&b.kernel.vmlinuz)
        .arg("-initrd")
        .arg(b.initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 loglevel=5 panic=-1 {}", b.append));
    for (i, (path, serial)) in b.disks.iter().enumerate() {
        cmd.arg("-drive")
            .arg(format!(
                "file={},if=none,id=d{i},format=raw",
                path.display()
            ))
            .arg("-device")
            .arg(format!(
                "virtio-blk-pci,drive=d{i},serial={serial},ioeventfd=off"
            ));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("failed to start qemu-system-x86_64")?;
    let start = Instant::now();
    let mut shown = 0;
    loop {
        if let Some(prefix) = b.progress {
            shown = show_progress(&b.console, shown, prefix, start);
        }
        if let Some(st) = child.try_wait()? {
            if let Some(prefix) = b.progress {
                show_progress(&b.console, shown, prefix, start);
            }
            let console = std::fs::read_to_string(&b.console).unwrap_or_default();
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("qemu exited with {st}: {err}\nconsole:\n{console}");
            }
            return Ok(console);
        }
        if start.elapsed() > b.timeout {
            let _ = child.kill();
            let _ = child.wait();
            let console = std::fs::read_to_string(&b.console).unwrap_or_default();
            bail!(
                "light VM did not power off within {:?}; console:\n{console}",
                b.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Prints the whole lines of `console` past byte `shown` that begin with `prefix`;
/// returns the offset after the last whole line. Reads only what is new.
fn show_progress(console: &Path, shown: u64, prefix: &str, start: Instant) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let mut new = Vec::new();
    let read = std::fs::File::open(console).and_then(|mut f| {
        f.seek(SeekFrom::Start(shown))?;
        f.read_to_end(&mut new)
    });
    if read.is_err() {
        return shown;
    }
    let Some(end) = new.iter().rposition(|&c| c == b'\n').map(|i| i + 1) else {
        return shown;
    };
    for line in String::from_utf8_lossy(&new[..end]).lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with(prefix) {
            println!("  guest [{:4} s]: {line}", start.elapsed().as_secs());
        }
    }
    shown + end as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_on_from_the_last_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        std::fs::write(&console, "[ 0.7] acpi\nbench raw: 1\nbench rw").unwrap();
        let start = Instant::now();
        let shown = show_progress(&console, 0, "bench ", start);
        assert_eq!(shown, "[ 0.7] acpi\nbench raw: 1\n".len() as u64);
        assert_eq!(show_progress(&console, shown, "bench ", start), shown);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .unwrap();
        f.write_all(b"o: 2\r\n").unwrap();
        let len = std::fs::metadata(&console).unwrap().len();
        assert_eq!(show_progress(&console, shown, "bench ", start), len);
        assert_eq!(
            show_progress(&dir.path().join("none"), 5, "bench ", start),
            5
        );
    }

    #[test]
    fn test_lines_are_parsed() {
        let log = "[ 1.0] boot\nTEST a ok\r\nTEST b FAILED: volume x: gone\nnoise TEST\n";
        assert_eq!(
            parse_tests(log),
            vec![
                TestLine {
                    name: "a".into(),
                    failure: None
                },
                TestLine {
                    name: "b".into(),
                    failure: Some("volume x: gone".into())
                },
            ]
        );
    }

    #[test]
    fn kernel_pin_is_read_from_the_kernel_section() {
        let t = "[image]\nversion = \"9\"\n[kernel]\npackage = \"linux-image-x\"\nversion = \"1.2\"\nrelease = \"6.1.0-x\"\n";
        assert_eq!(
            kernel_pin(t).unwrap(),
            ("linux-image-x".into(), "1.2".into(), "6.1.0-x".into())
        );
        assert!(kernel_pin("[image]\nversion = \"1\"\n").is_err());
    }
}
