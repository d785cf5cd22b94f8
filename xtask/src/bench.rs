//! `cargo xtask bench boot`: boots one disk once to set it up (the first boot, which
//! formats and seals the data partition, reported on its own), then measures N later
//! boots of it, the figure users live with; ends with one JSON line for machines to read.
//! Before it, where one later boot's time went: firmware and loader, kernel, stage 1,
//! each service to ready.

use anyhow::{anyhow, bail, Context, Result};
use qemu_tests::{Machine, Options};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::Duration;

/// One boot's figures.
struct Sample {
    /// Stage 1's time on the TPM and the sealed data partition.
    tpm_ms: u64,
    /// From QEMU's start to the `ready` line, as the host saw it.
    ready_s: f64,
    /// The guest's uptime at `ready`.
    uptime_s: f64,
    mem_used_kib: u64,
    /// Once the image's static pods run.
    mem_used_pods_kib: u64,
    rss_kib: Map<String, Value>,
    /// Where the used memory sits, from the guest's /proc/meminfo.
    breakdown: String,
    /// Where the boot's time went, in words.
    phases: String,
    /// Stage 1's line on the unlock (its breakdown), from the console.
    unlock: Option<String>,
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

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
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

fn mem_used(st: &Value) -> Result<u64> {
    Ok(u64_field(st, "mem_total_kib")?.saturating_sub(u64_field(st, "mem_available_kib")?))
}

/// Where a boot's time went, from the host's clock and the status: firmware and loader
/// (QEMU's start to the kernel: the host's time to ready less the guest's uptime),
/// kernel (to stage 1), stage 1, stage 2's set-up, then each service in the order it
/// became ready.
fn phases(st: &Value, ready_s: f64, uptime_s: f64) -> String {
    let ms = |k: &str| st.get(k).and_then(Value::as_u64).map(|v| v as f64 / 1000.0);
    let mut out = vec![format!(
        "firmware and loader {:.1} s",
        (ready_s - uptime_s).max(0.0)
    )];
    let (start, stage1) = (ms("stage1_start_ms"), ms("stage1_ms"));
    if let Some(k) = start {
        out.push(format!("kernel {k:.1} s"));
    }
    if let Some(s1) = stage1 {
        out.push(format!("stage 1 {s1:.1} s"));
    }
    let mut at = start.unwrap_or(0.0) + stage1.unwrap_or(0.0);
    // From the switch to the root until the services start.
    if let Some(services) = ms("services_start_ms") {
        out.push(format!("stage 2 set-up {:.1} s", (services - at).max(0.0)));
        at = services;
    }
    let mut services: Vec<(f64, String)> = st
        .get("services")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|s| {
                    let t = s.get("ready_uptime_ms")?.as_u64()? as f64 / 1000.0;
                    Some((t, s.get("name")?.as_str()?.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    services.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (t, name) in services {
        out.push(format!("{name} +{:.1} s", (t - at).max(0.0)));
        at = t;
    }
    out.push(format!("ready at {uptime_s:.1} s of uptime"));
    out.join(", ")
}

/// The figures of the boot `m` is in, once ready (and once its static pods run).
fn sample(m: &mut Machine) -> Result<Sample> {
    let ready = m.wait_ready()?;
    let ready_s = m.since_start().as_secs_f64();
    let uptime_s = ready.uptime_ms as f64 / 1000.0;
    let st = m.status()?;
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
    // The last such line: this boot's.
    let console = std::fs::read_to_string(m.console_log()).unwrap_or_default();
    let unlock = console
        .lines()
        .rev()
        .find(|l| l.contains("unlocked by the TPM") || l.contains("sealed to the TPM"))
        .map(|l| l.trim().to_string());
    m.wait_pods_started(&["sensor", "inference"])?;
    let mem_used_pods_kib = mem_used(&m.status()?)?;
    Ok(Sample {
        tpm_ms: u64_field(&st, "tpm_ms")?,
        ready_s,
        uptime_s,
        mem_used_kib: mem_used(&st)?,
        mem_used_pods_kib,
        rss_kib,
        breakdown,
        phases: phases(&st, ready_s, uptime_s),
        unlock,
    })
}

fn print(label: &str, s: &Sample) {
    println!(
        "{label}: ready after {:.1} s (guest uptime {:.1} s), memory used {} KiB at ready, {} KiB with the static pods; TPM and data partition {} ms",
        s.ready_s, s.uptime_s, s.mem_used_kib, s.mem_used_pods_kib, s.tpm_ms
    );
    println!("  where the time went: {}", s.phases);
    println!("  used memory (KiB): {}", s.breakdown);
    if let Some(l) = &s.unlock {
        println!("  {l}");
    }
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

/// One first boot of a fresh disk of `out`'s image, then `runs` later boots of it.
fn measure(out: &crate::image::ImageOutputs, runs: u32) -> Result<(Sample, Vec<Sample>)> {
    let mut m = Machine::with_options("bench-boot", Options::new(&out.raw))?;
    m.boot()?;
    let first = sample(&mut m).context("the first boot failed")?;
    print("first boot", &first);
    let mut samples = Vec::new();
    for i in 1..=runs {
        m.powerdown()?;
        m.wait_exit(Duration::from_secs(90))?;
        m.reboot_same_disk()?;
        let s = sample(&mut m).with_context(|| format!("later boot {i} of {runs} failed"))?;
        print(&format!("later boot {i}/{runs}"), &s);
        samples.push(s);
    }
    m.finish();
    Ok((first, samples))
}

/// `pcluster_kib`: erofs physical cluster sizes to build and boot the same tree with
/// as well, in this run, for their size and boot time against the definition's.
pub fn run(runs: u32, pcluster_kib: &[u32]) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    crate::host::ensure_packages(crate::run::VM_PACKAGES)?;
    let out = crate::image::build(&crate::image::BuildOptions::default())
        .context("failed to build the image")?;
    let (image_bytes, root_bytes, uki_bytes) = sizes(&out.manifest)?;
    println!(
        "bench boot: one first boot of a fresh disk, then {runs} later boot(s) of it \
         (about {} s under TCG), for {} image(s)",
        45 * (runs + 1),
        1 + pcluster_kib.len()
    );
    let (first, samples) = measure(&out, runs)?;
    let med =
        |samples: &[Sample], f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let secs = |v: f64| (v * 100.0).round() / 100.0;
    let mut candidates = Vec::new();
    for &kib in pcluster_kib {
        println!("bench boot: the same tree with an erofs physical cluster of {kib} KiB");
        let c = crate::image::build(&crate::image::BuildOptions {
            erofs_pcluster_kib: Some(kib),
            ..Default::default()
        })
        .with_context(|| format!("failed to build the image with a {kib} KiB cluster"))?;
        let (c_image, c_root, _) = sizes(&c.manifest)?;
        let (c_first, c_samples) = measure(&c, runs)?;
        let line = json!({
            "pcluster_kib": kib,
            "image_bytes": c_image,
            "root_bytes": c_root,
            "ready_s": secs(med(&c_samples, &|s| s.ready_s)),
            "uptime_s": secs(med(&c_samples, &|s| s.uptime_s)),
            "first_boot_ready_s": secs(c_first.ready_s),
        });
        println!(
            "erofs cluster {kib} KiB: root {c_root} bytes ({:.2}x the definition's), \
             image {c_image} bytes, later boot ready after {:.2} s ({:.2}x), uptime {:.2} s",
            c_root as f64 / root_bytes as f64,
            med(&c_samples, &|s| s.ready_s),
            med(&c_samples, &|s| s.ready_s) / med(&samples, &|s| s.ready_s),
            med(&c_samples, &|s| s.uptime_s),
        );
        candidates.push(line);
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
    let med = |f: &dyn Fn(&Sample) -> f64| med(&samples, f);
    let mut result = json!({
        "bench": "boot",
        "later_boots": runs,
        "ready_s": secs(med(&|s| s.ready_s)),
        "uptime_s": secs(med(&|s| s.uptime_s)),
        "first_boot_ready_s": secs(first.ready_s),
        "first_boot_uptime_s": secs(first.uptime_s),
        "mem_used_kib": med(&|s| s.mem_used_kib as f64).round() as u64,
        "mem_used_pods_kib": med(&|s| s.mem_used_pods_kib as f64).round() as u64,
        "image_bytes": image_bytes,
        "root_bytes": root_bytes,
        "uki_bytes": uki_bytes,
        "rss_kib": rss,
        "tpm_ms": med(&|s| s.tpm_ms as f64).round() as u64,
        "tpm_first_boot_ms": first.tpm_ms,
    });
    if !candidates.is_empty() {
        result["erofs_pcluster"] = Value::Array(candidates);
    }
    println!("{result}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{median, phases};
    use serde_json::json;

    #[test]
    fn a_boots_time_is_told_phase_by_phase_in_the_order_services_became_ready() {
        let mut st = json!({"stage1_start_ms": 2100, "stage1_ms": 1400, "services": [
            {"name": "noded", "ready_uptime_ms": 6000},
            {"name": "containerd", "ready_uptime_ms": 4500},
            {"name": "fabricd", "ready_uptime_ms": null}]});
        assert_eq!(
            phases(&st, 9.0, 6.2),
            "firmware and loader 2.8 s, kernel 2.1 s, stage 1 1.4 s, containerd +1.0 s, \
             noded +1.5 s, ready at 6.2 s of uptime"
        );
        // An init that says when it started the services: the services' times count
        // from then, not from the end of stage 1.
        st["services_start_ms"] = json!(4200);
        assert_eq!(
            phases(&st, 9.0, 6.2),
            "firmware and loader 2.8 s, kernel 2.1 s, stage 1 1.4 s, stage 2 set-up 0.7 s, \
             containerd +0.3 s, noded +1.5 s, ready at 6.2 s of uptime"
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
