//! `cargo xtask bench pods`: boots the image with M pod manifests in its site
//! provisioning bundle and watches noded bring them up. A pod's manifest-to-running time
//! runs from noded's `new pod pod=<name>` console line (it has read the manifest) to its
//! `container started pod=<name>` line, both timed by the host as they appear (the
//! console is read every 100 ms). noded's `pods` answer cannot time this: noded answers
//! its control socket between reconcile passes, and one pass starts all M pods. At the
//! end, init's control port confirms every pod running and gives the RSS figures.
//!
//! Then the API path: a fresh box joins the upstream control plane (built from source
//! by `cargo xtask controlplane`, on loopback, reached through guest forwards as in
//! qemu-tests/tests/kubernetes.rs), a Deployment of the same M sensor pods is applied
//! with kubectl, and the bench times the apply to every replica `Running` in status at
//! the API server (`kubectl get pods` every 250 ms), then each scale from none back to
//! M ([`ROUNDS`] rounds in all; the figure is their median), then reads noded's RSS with
//! the API path on.
//!
//! Then the peer: the upstream kubelet of the control plane's release (built from the
//! same pinned source, `cargo xtask controlplane`), as a service of its own in an image
//! that is the shipped one plus the kubelet ([`kubelet_image`]), runs the same
//! Deployment on the same containerd, joined to a fresh control plane the same way, and
//! is timed and measured the same way. noded runs there too, without the API path: it
//! serves the image's registry the pods' images come from and runs the static pods, as
//! on noded's box.
//! Prints human lines, then one JSON line last.

use anyhow::{anyhow, bail, Context, Result};
use qemu_tests::controlplane::GUEST_KUBE;
use qemu_tests::{Machine, Options};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::bench::median;

/// How long M pods may take under TCG before the bench gives up.
const TIMEOUT: Duration = Duration::from_secs(600);

/// How many times each agent takes the Deployment from no replicas to M Running: its
/// figure is their median, since one run's time swings by a fifth under TCG.
const ROUNDS: usize = 3;

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
    let mut packages = crate::run::VM_PACKAGES.to_vec();
    // The guest forwards' relay to the control plane on the host's loopback.
    packages.push("socat");
    crate::host::ensure_packages(&packages)?;
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
    let (times, span, noded_rss, containerd_rss) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    println!("bench pods: the API path, {pods} replicas of a Deployment applied with kubectl");
    let api = measure_api(&out.raw, &tmp, pods, Agent::Noded).and_then(|noded| {
        println!("bench pods: the peer, the same Deployment under the upstream kubelet");
        let image = kubelet_image(&tmp)?;
        Ok((noded, measure_api(&image, &tmp, pods, Agent::Kubelet)?))
    });
    let _ = std::fs::remove_dir_all(&tmp);
    let ((noded_rounds, noded_api_rss), (kubelet_rounds, kubelet_rss)) = api?;
    let (apply_to_running, kubelet_apply) =
        (median(noded_rounds.clone()), median(kubelet_rounds.clone()));

    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = median(times.clone());
    let per_min = times.len() as f64 / span.max(0.001) * 60.0;
    println!(
        "{} pods running; manifest to running: median {median:.1} s, fastest {:.1} s, slowest {:.1} s",
        times.len(),
        sorted[0],
        sorted[sorted.len() - 1]
    );
    println!("{per_min:.1} pods a minute (first manifest seen to last pod running: {span:.1} s)");
    println!("RSS with all pods running: noded {noded_rss} KiB, containerd {containerd_rss} KiB");
    let listed = |r: &[f64]| {
        r.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "API path: kubectl apply to {pods} replicas Running at the API server {apply_to_running:.1} s \
         (median of {ROUNDS}: {} s); noded's RSS then {noded_api_rss} KiB",
        listed(&noded_rounds)
    );
    let time_vs_kubelet = apply_to_running / kubelet_apply.max(0.001);
    let rss_vs_kubelet = noded_api_rss as f64 / kubelet_rss.max(1) as f64;
    println!(
        "peer: the kubelet {} on the same image's containerd: apply to Running {kubelet_apply:.1} s \
         (median of {ROUNDS}: {} s), its RSS then {kubelet_rss} KiB; noded/kubelet: time {time_vs_kubelet:.2}, \
         RSS {rss_vs_kubelet:.2}",
        qemu_tests::controlplane::KUBERNETES,
        listed(&kubelet_rounds),
    );
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
            "apply_to_running_s": (apply_to_running * 100.0).round() / 100.0,
            "noded_rss_api_kib": noded_api_rss,
            "kubelet_apply_to_running_s": (kubelet_apply * 100.0).round() / 100.0,
            "apply_to_running_rounds_s": hundredths(&noded_rounds),
            "kubelet_apply_to_running_rounds_s": hundredths(&kubelet_rounds),
            "kubelet_rss_kib": kubelet_rss,
            "rss_vs_kubelet": (rss_vs_kubelet * 1000.0).round() / 1000.0,
            "apply_to_running_vs_kubelet": (time_vs_kubelet * 1000.0).round() / 1000.0,
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

/// What runs the API server's pods on the box in [`measure_api`].
#[derive(Debug, Clone, Copy, PartialEq)]
enum Agent {
    Noded,
    /// The peer: the upstream kubelet of the control plane's release, on the same
    /// image's containerd ([`kubelet_image`]).
    Kubelet,
}

impl Agent {
    /// Its service in init's status, whose RSS is read.
    fn service(self) -> &'static str {
        match self {
            Agent::Noded => "noded",
            Agent::Kubelet => "kubelet",
        }
    }
}

/// The API path (see the module's doc): seconds from `kubectl apply` of a Deployment of
/// `replicas` to all of them Running at the API server, then from each scale from none
/// back to `replicas` ([`ROUNDS`] in all), and the agent's RSS after the last. Each
/// agent gets a control plane of its own, started fresh, so neither inherits the other's
/// node, pods or images.
fn measure_api(
    image: &std::path::Path,
    tmp: &std::path::Path,
    replicas: u32,
    agent: Agent,
) -> Result<(Vec<f64>, u64)> {
    use qemu_tests::controlplane::{ControlPlane, GUEST_TUNNEL};
    let bin = crate::controlplane::build()?;
    let service = agent.service();
    let cp = ControlPlane::start(&bin, &tmp.join(format!("core-{service}")))?;
    let token = cp.bootstrap_token()?;
    let bundle = tmp.join(format!("provision-{service}.toml"));
    let text = match agent {
        Agent::Noded => cp.provision_bundle("bench", &token)?,
        // noded stays as it is in the image (its static pods, its loopback registry
        // the pods' images come from) but does not join: the kubelet does.
        Agent::Kubelet => cp.kube_bundle(&token)?,
    };
    std::fs::write(&bundle, text)
        .with_context(|| format!("failed to write {}", bundle.display()))?;
    let mut opts = Options::new(image);
    opts.fw_cfg
        .push(("opt/org.edgeos/provision".into(), bundle));
    opts.guestfwd.push(format!(
        "tcp:10.0.2.100:6443-cmd:socat - TCP:127.0.0.1:{}",
        cp.port
    ));
    opts.guestfwd.push(format!(
        "tcp:{GUEST_TUNNEL}-cmd:socat - TCP:127.0.0.1:{}",
        cp.tunnel_port
    ));
    let mut m = Machine::with_options(&format!("bench-pods-{service}"), opts)?;
    m.boot()?;
    m.wait_ready()?;
    let until = |what: &str, timeout: Duration, f: &mut dyn FnMut() -> bool| -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !f() {
            if Instant::now() >= deadline {
                bail!("{what}: not within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    };
    until("the box Ready at the API server", TIMEOUT, &mut || {
        cp.get(&["node", "edge0"]).is_ok_and(|n| {
            n["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
    })?;
    let running = |count: usize| {
        cp.get(&["pods", "-n", "default", "-l", "app=bench"])
            .is_ok_and(|l| {
                l["items"].as_array().is_some_and(|i| {
                    i.len() == count && i.iter().all(|p| p["status"]["phase"] == "Running")
                })
            })
    };
    let mut rounds = Vec::new();
    let start = Instant::now();
    cp.apply(&format!(
        r#"{{"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {{"name": "bench", "namespace": "default"}},
            "spec": {{"replicas": {replicas}, "selector": {{"matchLabels": {{"app": "bench"}}}},
              "template": {{"metadata": {{"labels": {{"app": "bench"}}}},
                "spec": {{"automountServiceAccountToken": false, "hostNetwork": true,
                  "terminationGracePeriodSeconds": 1,
                  "containers": [{{"name": "sensor", "image": "edge.local/sensor:1",
                    "resources": {{"limits": {{"cpu": "50m", "memory": "16Mi"}}}}}}]}}}}}}}}"#
    ))?;
    until(
        "every replica Running at the API server",
        TIMEOUT,
        &mut || running(replicas as usize),
    )?;
    rounds.push(start.elapsed().as_secs_f64());
    // Again from no replicas: scaled to none (gone at the API server only once the
    // agent has stopped their containers), then back.
    let scale = |n: u32| cp.kubectl(["scale", "deployment/bench", &format!("--replicas={n}")]);
    while rounds.len() < ROUNDS {
        scale(0)?;
        until("every replica gone", TIMEOUT, &mut || running(0))?;
        let start = Instant::now();
        scale(replicas)?;
        until("every replica Running again", TIMEOUT, &mut || {
            running(replicas as usize)
        })?;
        rounds.push(start.elapsed().as_secs_f64());
    }
    let rss = rss_of(&m.status()?, service)?;
    m.finish();
    Ok((rounds, rss))
}

fn hundredths(values: &[f64]) -> Vec<f64> {
    values.iter().map(|t| (t * 100.0).round() / 100.0).collect()
}

/// The kubelet's service on the peer's image: joins with the provisioning bundle's
/// bootstrap kubeconfig as the node `edge0`, on the image's containerd.
fn kubelet_service() -> String {
    format!(
        r#"
[[service]]
name = "kubelet"
exec = ["/usr/bin/kubelet", "--config=/etc/kubernetes/kubelet.yaml",
        "--bootstrap-kubeconfig={GUEST_KUBE}/bootstrap.kubeconfig",
        "--kubeconfig=/var/lib/kubelet/kubeconfig", "--hostname-override=edge0"]
requires = ["containerd"]
restart = "always"
memory_max = "1G"
# klog's lines carry no level init reads: all would be warnings, and a console flooded
# under TCG would slow the peer's box. They stay in the box's log.
console = "error"
"#
    )
}

/// Its configuration: the cgroupfs driver as containerd's runc is configured, no swap
/// check (the box has none), the API server's clients authenticated and authorized as
/// noded does.
fn kubelet_config() -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {GUEST_KUBE}/ca.pem}}
authorization: {{mode: Webhook}}
volumePluginDir: /var/lib/kubelet/volume-plugins
resolvConf: /etc/resolv.conf
serializeImagePulls: false
# The box's 1 GiB data partition: the defaults (15 % of the image filesystem free)
# would start evicting at once.
evictionHard: {{memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"
    )
}

/// The shipped image's service table, which the peer's image extends.
fn shipped_services() -> Result<String> {
    let path = crate::image::repo()?.join("image/overlay/etc/edge/services.toml");
    std::fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))
}

/// The peer's image: the shipped definition with the upstream kubelet (built from the
/// control plane's pinned source) added as a service beside noded, built as version
/// `0.1.0-kubelet` into its own output directory. Returns its raw disk.
fn kubelet_image(tmp: &std::path::Path) -> Result<std::path::PathBuf> {
    let kubelet = crate::controlplane::kubelet()?;
    let overlay = tmp.join("kubelet-overlay");
    let services = shipped_services()?;
    for dir in ["usr/bin", "etc/edge", "etc/kubernetes"] {
        let dir = overlay.join(dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
    }
    let copy = overlay.join("usr/bin/kubelet");
    std::fs::copy(&kubelet, &copy)
        .with_context(|| format!("failed to copy {} to {}", kubelet.display(), copy.display()))?;
    for (rel, text) in [
        ("etc/edge/services.toml", services + &kubelet_service()),
        ("etc/kubernetes/kubelet.yaml", kubelet_config()),
        // The kubelet reads the user database for its user-namespace mappings (a user
        // `kubelet`); the appliance's root has none.
        (
            "etc/passwd",
            "root:x:0:0:root:/:/usr/sbin/nologin\n".to_string(),
        ),
        ("etc/group", "root:x:0:\n".to_string()),
    ] {
        let path = overlay.join(rel);
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    let out = crate::image::build(&crate::image::BuildOptions {
        version: Some("0.1.0-kubelet".into()),
        overlay: Some(overlay),
        ..Default::default()
    })
    .context("failed to build the kubelet peer's image")?;
    Ok(out.raw)
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
    fn the_kubelets_service_joins_the_shipped_table_and_reads_the_bundles_files() {
        let table: toml::Value =
            toml::from_str(&(shipped_services().unwrap() + &kubelet_service())).unwrap();
        let services = table["service"].as_array().unwrap();
        let kubelet = services
            .iter()
            .find(|s| s["name"].as_str() == Some("kubelet"));
        let exec = kubelet.unwrap()["exec"].as_array().unwrap();
        assert_eq!(exec[0].as_str(), Some("/usr/bin/kubelet"));
        assert!(exec.iter().any(|a| a.as_str()
            == Some("--bootstrap-kubeconfig=/var/lib/edge/provision/kube/bootstrap.kubeconfig")));
        // noded and containerd stay: the pods' images come from noded's registry.
        for name in ["containerd", "noded"] {
            assert!(services.iter().any(|s| s["name"].as_str() == Some(name)));
        }
        assert!(kubelet_config().contains("clientCAFile: /var/lib/edge/provision/kube/ca.pem"));
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
