//! `cargo xtask bench boot`: boots the image N times on fresh disks and reports the
//! medians, ending with one JSON line for machines to read. Each disk is booted a second
//! time for `tpm_ms`, the unlock of the sealed data partition on a later boot.

use anyhow::{anyhow, bail, Context, Result};
use qemu_tests::{Machine, Options};
use serde_json::{json, Map, Value};
use std::path::Path;

/// One boot's figures.
struct Sample {
    /// Stage 1's time on the TPM and the sealed data partition: on the fresh disk (seal,
    /// make LUKS2 and ext4), then on a second boot of it (unseal and open).
    tpm_first_ms: u64,
    tpm_ms: u64,
    ready_s: f64,
    uptime_s: f64,
    mem_used_kib: u64,
    rss_kib: Map<String, Value>,
    /// Where the used memory sits, from the guest's /proc/meminfo.
    breakdown: String,
}

/// The /proc/meminfo fields that account for most of "used" on this appliance.
const BREAKDOWN: [&str; 8] = [
    "AnonPages",
    "Shmem",
    "Slab",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "Percpu",
    "Unevictable",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn u64_field(v: &Value, key: &str) -> Result<u64> {
    v.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("status has no number {key:?}: {v}"))
}

fn boot_once(image: &Path, run: u32) -> Result<Sample> {
    let mut m = Machine::with_options(&format!("bench{run}"), Options::new(image))?;
    m.boot()?;
    let ready = m.wait_ready()?;
    let ready_s = m.since_start().as_secs_f64();
    let st = m.status()?;
    let mem_used_kib =
        u64_field(&st, "mem_total_kib")?.saturating_sub(u64_field(&st, "mem_available_kib")?);
    let mut rss_kib = Map::new();
    rss_kib.insert("init".into(), json!(u64_field(&st, "init_rss_kib")?));
    for s in st
        .get("services")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("status has no services: {st}"))?
    {
        let name = s.get("name").and_then(Value::as_str).unwrap_or("?");
        rss_kib.insert(name.to_string(), json!(u64_field(s, "rss_kib")?));
    }
    let breakdown = BREAKDOWN
        .iter()
        .map(|k| {
            let v = st
                .pointer(&format!("/meminfo_kib/{k}"))
                .and_then(Value::as_u64);
            format!("{k} {}", v.map_or("?".into(), |v| v.to_string()))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let tpm_first_ms = u64_field(&st, "tpm_ms")?;
    // A later boot of the same disk: what the unlock costs every day.
    m.powerdown()?;
    m.wait_exit(std::time::Duration::from_secs(90))?;
    m.reboot_same_disk()?;
    m.wait_ready()?;
    let tpm_ms = u64_field(&m.status()?, "tpm_ms")?;
    // Where the unlock's time went, as stage 1 tells it (the last such console line).
    let console = std::fs::read_to_string(m.console_log()).unwrap_or_default();
    if let Some(line) = console
        .lines()
        .rev()
        .find(|l| l.contains("unlocked by the TPM"))
    {
        eprintln!("bench boot: run {run}: {}", line.trim());
    }
    m.finish();
    Ok(Sample {
        tpm_first_ms,
        tpm_ms,
        breakdown,
        ready_s,
        uptime_s: ready.uptime_ms as f64 / 1000.0,
        mem_used_kib,
        rss_kib,
    })
}

/// Sizes as shipped, from the builder's manifest: the ESP's files (loader and both
/// UKIs), one root and its verity tree.
fn sizes(manifest: &Path) -> Result<(u64, u64, u64)> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("failed to read {}", manifest.display()))?;
    let m: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", manifest.display()))?;
    let get = |k: &str| {
        m.pointer(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("{} has no number at {k}", manifest.display()))
    };
    let esp = get("/sizes/esp_content")?;
    let root = get("/sizes/root.erofs")?;
    let verity = get("/sizes/root.verity")?;
    let uki = get("/sizes/uki-a.efi")?;
    Ok((esp + root + verity, root, uki))
}

pub fn run(runs: u32) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::host::ensure_packages(crate::run::VM_PACKAGES)?;
    let out = crate::image::build(&crate::image::BuildOptions::default())
        .context("failed to build the image")?;
    let (image_bytes, root_bytes, uki_bytes) = sizes(&out.manifest)?;
    let mut samples = Vec::new();
    for i in 1..=runs {
        let s = boot_once(&out.raw, i).with_context(|| format!("boot {i} of {runs} failed"))?;
        println!(
            "boot {i}/{runs}: ready after {:.1} s (guest uptime {:.1} s), memory used {} KiB; TPM and data partition {} ms (fresh disk), {} ms (next boot)",
            s.ready_s, s.uptime_s, s.mem_used_kib, s.tpm_first_ms, s.tpm_ms
        );
        println!("  used memory (KiB): {}", s.breakdown);
        samples.push(s);
    }
    let mut rss = Map::new();
    for name in ["init", "containerd", "storaged", "fabricd", "noded"] {
        let v: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.rss_kib.get(name).and_then(Value::as_u64))
            .map(|x| x as f64)
            .collect();
        if v.is_empty() {
            bail!("no RSS figure for {name} in any status reply");
        }
        rss.insert(name.into(), json!(median(v).round() as u64));
    }
    let result = json!({
        "bench": "boot",
        "ready_s": (median(samples.iter().map(|s| s.ready_s).collect()) * 100.0).round() / 100.0,
        "uptime_s": (median(samples.iter().map(|s| s.uptime_s).collect()) * 100.0).round() / 100.0,
        "mem_used_kib": median(samples.iter().map(|s| s.mem_used_kib as f64).collect()).round() as u64,
        "image_bytes": image_bytes,
        "root_bytes": root_bytes,
        "uki_bytes": uki_bytes,
        "rss_kib": rss,
        "tpm_ms": median(samples.iter().map(|s| s.tpm_ms as f64).collect()).round() as u64,
        "tpm_first_boot_ms": median(samples.iter().map(|s| s.tpm_first_ms as f64).collect()).round() as u64,
    });
    println!("{result}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
