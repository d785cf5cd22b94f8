//! `cargo xtask bench pods`: boots the image with M pod manifests in its site
//! provisioning bundle and watches noded bring them up. A pod's manifest-to-running time
//! runs from noded's `new pod pod=<name>` console line (it has read the manifest) to its
//! `container started pod=<name>` line, both timed by the host as they appear (the
//! console is read every 100 ms). noded's `pods` answer cannot time this: noded answers
//! its control socket between reconcile passes, and one pass starts all M pods. At the
//! end, init's control port confirms every pod running and gives the RSS figures.
//! Prints human lines, then one JSON line last.

use anyhow::{anyhow, bail, Context, Result};
use qemu_tests::{Machine, Options};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How long M pods may take under TCG before the bench gives up.
const TIMEOUT: Duration = Duration::from_secs(600);

/// One bench pod: the bundled sensor, printing to its log only.
fn manifest(i: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: bench{i}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: sensor
      image: edge.local/sensor:1
      env:
        - name: SENSOR_NAME
          value: bench{i}
      resources:
        limits:
          cpu: 50m
          memory: 16Mi
"#
    )
}

fn running(p: &Value) -> bool {
    p["state"] == "running"
        && p["containers"]
            .as_array()
            .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["state"] == "running"))
}

fn rss_of(status: &Value, service: &str) -> Result<u64> {
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == service))
        .and_then(|s| s["rss_kib"].as_u64())
        .ok_or_else(|| anyhow!("status has no RSS for {service}: {status}"))
}

pub fn run(pods: u32) -> Result<()> {
    if pods == 0 {
        bail!("--pods must be at least 1");
    }
    crate::host::ensure_packages(crate::run::VM_PACKAGES)?;
    let out = crate::image::build(&crate::image::BuildOptions::default())
        .context("failed to build the image")?;
    let tmp = std::env::temp_dir().join(format!("edgeos-bench-pods-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?;
    let bundle = tmp.join("provision.toml");
    let text: String = (0..pods)
        .map(|i| format!("\"pods/bench{i}.yaml\" = '''\n{}'''\n", manifest(i)))
        .collect();
    std::fs::write(&bundle, text)
        .with_context(|| format!("failed to write {}", bundle.display()))?;
    let mut opts = Options::new(&out.raw);
    opts.fw_cfg
        .push(("opt/org.edgeos/provision".into(), bundle.clone()));
    let result = measure(opts, pods);
    let _ = std::fs::remove_dir_all(&tmp);
    let (times, span, noded_rss, containerd_rss) = result?;

    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let per_min = times.len() as f64 / span.max(0.001) * 60.0;
    println!(
        "{} pods running; manifest to running: median {median:.1} s, fastest {:.1} s, slowest {:.1} s",
        times.len(),
        sorted[0],
        sorted[sorted.len() - 1]
    );
    println!("{per_min:.1} pods a minute (first manifest seen to last pod running: {span:.1} s)");
    println!("RSS with all pods running: noded {noded_rss} KiB, containerd {containerd_rss} KiB");
    println!("(TCG on the build host: absolute times are slow; compare runs on the same host)");
    println!(
        "{}",
        json!({
            "bench": "pods",
            "pods_running": times.len(),
            "manifest_to_running_s": (median * 100.0).round() / 100.0,
            "pods_per_min": (per_min * 10.0).round() / 10.0,
            "noded_rss_kib": noded_rss,
            "containerd_rss_kib": containerd_rss,
        })
    );
    Ok(())
}

/// Boots and polls; returns each pod's manifest-to-running seconds, the span from the
/// first manifest seen to the last pod running, and noded's and containerd's RSS then.
fn measure(opts: Options, pods: u32) -> Result<(Vec<f64>, f64, u64, u64)> {
    let mut m = Machine::with_options("bench-pods", opts)?;
    m.boot()?;
    m.wait_ready()?;
    let deadline = Instant::now() + TIMEOUT;
    let mut seen: BTreeMap<String, Instant> = BTreeMap::new();
    let mut up: BTreeMap<String, Instant> = BTreeMap::new();
    let mut offset = 0usize;
    while up.len() < pods as usize {
        if Instant::now() >= deadline {
            bail!(
                "only {} of {pods} pods started after {TIMEOUT:?} ({} seen)",
                up.len(),
                seen.len()
            );
        }
        let console = std::fs::read(m.console_log()).unwrap_or_default();
        let now = Instant::now();
        // Whole lines only: a line still being written is read on the next round.
        let end = console
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        for line in String::from_utf8_lossy(&console[offset.min(end)..end]).lines() {
            if let Some(name) = pod_in(line, "new pod pod=") {
                seen.entry(name).or_insert(now);
            } else if let Some(name) = pod_in(line, "container started pod=") {
                up.entry(name).or_insert(now);
            } else if line.contains("rejected pod manifest") && line.contains("bench") {
                bail!("a bench pod was refused: {line}");
            }
        }
        offset = end.max(offset);
        std::thread::sleep(Duration::from_millis(100));
    }
    m.wait_pods(TIMEOUT, "every bench pod running", |p| {
        p.iter()
            .filter(|p| {
                p["file"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("site/bench"))
            })
            .filter(|p| running(p))
            .count()
            == pods as usize
    })
    .context("noded's status never showed every bench pod running")?;
    let status = m.status()?;
    let noded = rss_of(&status, "noded")?;
    let containerd = rss_of(&status, "containerd")?;
    m.finish();
    let times = up
        .iter()
        .filter_map(|(p, t)| Some(t.duration_since(*seen.get(p)?).as_secs_f64()))
        .collect::<Vec<f64>>();
    if times.len() != pods as usize {
        bail!(
            "noded started {} bench pods it never announced",
            pods as usize - times.len()
        );
    }
    let first = seen.values().min().copied().unwrap_or_else(Instant::now);
    let last = up.values().max().copied().unwrap_or(first);
    Ok((
        times,
        last.duration_since(first).as_secs_f64(),
        noded,
        containerd,
    ))
}

/// The bench pod a noded console line names after `marker`, e.g. `bench3`.
fn pod_in(line: &str, marker: &str) -> Option<String> {
    let name = line.split(marker).nth(1)?.split_whitespace().next()?;
    name.starts_with("bench").then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_manifests_are_pods_noded_reads() {
        let m = manifest(3);
        assert!(m.contains("name: bench3\n"));
        let v: serde_json::Value = serde_json::to_value(
            toml::from_str::<toml::Value>(&format!("\"x\" = '''\n{m}'''\n")).unwrap(),
        )
        .unwrap();
        assert_eq!(v["x"].as_str().unwrap(), m);
    }

    #[test]
    fn console_lines_name_their_pod() {
        let l = "edgeos: noded:  INFO noded::pods: container started pod=bench7 container=sensor attempt=0";
        assert_eq!(pod_in(l, "container started pod="), Some("bench7".into()));
        assert_eq!(pod_in(l, "new pod pod="), None);
        let l = "edgeos: noded:  INFO noded::pods: container started pod=sensor container=sensor";
        assert_eq!(pod_in(l, "container started pod="), None);
    }

    #[test]
    fn running_needs_every_container_running() {
        let p = json!({"state":"running","containers":[{"state":"running"},{"state":"waiting"}]});
        assert!(!running(&p));
        let p = json!({"state":"running","containers":[{"state":"running"}]});
        assert!(running(&p));
        assert!(!running(&json!({"state":"running","containers":[]})));
    }
}
