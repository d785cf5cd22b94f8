//! The shipped image joins an upstream Kubernetes control plane (etcd and kube-* built
//! from source by `cargo xtask controlplane`, on the host's loopback) with no rebuild:
//! the site provisions noded's `apiserver_file` and a bootstrap token, with which the box
//! asks for its own node certificate (a CertificateSigningRequest the core approves) for a
//! key it makes in its TPM (`tpm_key`), and the box dials the API server through a guest forward (the core never dials in). The box registers as a Ready Node; a Deployment the operator applies with
//! kubectl is scheduled onto it, runs on the box's containerd, and is Running at the API
//! server. The link is cut past the node-monitor grace period: the Node goes NotReady at
//! the core while the pod keeps running on the box, the Deployment is scaled up at the
//! core meanwhile, the box is powered off and boots again still cut off (the pod comes
//! back from its cache), and once the link heals the box is Ready and runs the new
//! replica. `kubectl logs` and `kubectl exec` of its pod reach the box through the
//! tunnel the box dials out to konnectivity-server (logs again after the cut heals).
//! The Deployment is the README's example (image/examples/telemetry.yaml): its readings
//! are kept on a ReadWriteMany claim of the example storage class, which noded
//! provisions from the box's storaged; they survive the power cut (the sensor resumes
//! after the last one kept), both replicas share the volume, the operator grows the
//! claim under them, and deleting the claim deletes the volume.
//! Deleted at the core, the Deployment stops on the box.

use anyhow::{bail, Context, Result};
use qemu_tests::controlplane::{built, ControlPlane, GUEST_TUNNEL};
use qemu_tests::core::Link;
use qemu_tests::{Machine, Options};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The box's node name: system.toml's hostname in the image.
const NODE: &str = "edge0";

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn ready(node: &Value) -> bool {
    node["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

#[test]
fn the_appliance_joins_the_control_plane_and_runs_a_deployment() -> Result<()> {
    let Some(bin) = built() else {
        bail!(
            "the control plane is not built: run cargo xtask controlplane (cargo xtask test does)"
        );
    };
    let tmp = tempfile::tempdir()?;
    let cp = ControlPlane::start(&bin, &tmp.path().join("core"))?;

    // The site's provisioning: the API server's address (the guest forward), the zone,
    // and a bootstrap token with the core's CA; the box asks for its own certificate.
    let token = cp.bootstrap_token()?;
    let bundle = cp.provision_bundle("plant-7", &token)?;
    let bundle_path = tmp.path().join("provision.toml");
    std::fs::write(&bundle_path, bundle)?;
    let mut opts = Options::new(&qemu_tests::image_from_env()?);
    // storaged's pool for the claims: a second, empty NVMe disk, as on the edge boxes.
    opts.pool_disk_mib = Some(512);
    let link = Link::start(cp.port)?;
    opts.guestfwd.push(format!(
        "tcp:10.0.2.100:6443-cmd:socat - TCP:127.0.0.1:{}",
        link.port
    ));
    // The box's tunnel to konnectivity-server, through which `kubectl logs` reaches it;
    // cut with the API server's link.
    let tunnel = Link::start(cp.tunnel_port)?;
    opts.guestfwd.push(format!(
        "tcp:{GUEST_TUNNEL}-cmd:socat - TCP:127.0.0.1:{}",
        tunnel.port
    ));
    opts.fw_cfg
        .push(("opt/org.edgeos/provision".into(), bundle_path));
    let mut m = Machine::with_options("kubernetes", opts)?;
    m.boot()?;
    m.wait_ready()?;

    let node = wait(
        "the box Ready at the API server",
        Duration::from_secs(120),
        || cp.get(&["node", NODE]).ok().filter(ready),
    )?;
    assert_eq!(
        node["metadata"]["labels"]["topology.kubernetes.io/zone"], "plant-7",
        "{node}"
    );
    // Under the certificate it asked for with the token, which the core approved.
    let csrs = cp.get(&["csr"])?;
    let (id, _) = token.split_once('.').context("token")?;
    let ours = csrs["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["spec"]["username"] == format!("system:bootstrap:{id}"))
        .with_context(|| format!("no CertificateSigningRequest from the box: {csrs}"))?;
    assert!(
        ours["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Approved"))
            && ours["status"]["certificate"].is_string(),
        "{ours}"
    );
    // Its conditions as measured on the box, and the images its containerd holds.
    let conditions = node["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for kind in [
        "MemoryPressure",
        "DiskPressure",
        "PIDPressure",
        "NetworkUnavailable",
    ] {
        assert!(
            conditions
                .iter()
                .any(|c| c["type"] == kind && c["status"] == "False"),
            "{kind}: {node}"
        );
    }
    let images = wait(
        "the box's images in the Node's status",
        Duration::from_secs(90),
        || {
            cp.get(&["node", NODE]).ok().filter(|n| {
                n["status"]["images"].as_array().is_some_and(|i| {
                    i.iter().any(|i| {
                        i["names"]
                            .as_array()
                            .is_some_and(|n| n.iter().any(|n| n == "edge.local/sensor:1"))
                    })
                })
            })
        },
    );
    assert!(images.is_ok(), "{images:?}");
    assert!(
        node["status"]["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("containerd://")),
        "{node}"
    );

    // The operator's storage classes for storaged (once per cluster) and the README's
    // telemetry Deployment: the image's own sensor image (on its allowlist), named from
    // a ConfigMap, on the pod network (the image's CNI bridge), keeping its readings on
    // a ReadWriteMany claim that noded provisions from the box's storaged.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/examples");
    for file in ["storage.yaml", "telemetry.yaml"] {
        let path = examples.join(file);
        cp.kubectl(["apply", "-f", path.to_str().context("path")?])?;
    }
    let pods = wait(
        "the Deployment's pod Running at the API server",
        Duration::from_secs(180),
        || {
            cp.get(&["pods", "-n", "default", "-l", "app=telemetry"])
                .ok()
                .filter(|l| {
                    l["items"]
                        .as_array()
                        .is_some_and(|i| i.len() == 1 && i[0]["status"]["phase"] == "Running")
                })
        },
    )?;
    let pod = &pods["items"][0];
    assert_eq!(pod["spec"]["nodeName"], NODE, "{pod}");
    // Its claim, bound to the volume noded provisioned on this box for it.
    let pvc = cp.get(&["pvc", "-n", "default", "telemetry-data"])?;
    assert_eq!(pvc["status"]["phase"], "Bound", "{pvc}");
    let pv_name = pvc["spec"]["volumeName"]
        .as_str()
        .context("volumeName")?
        .to_string();
    let pv = cp.get(&["pv", &pv_name])?;
    assert_eq!(pv["spec"]["csi"]["driver"], "storaged.edgeos", "{pv}");
    assert_eq!(
        pv["metadata"]["labels"]["noded.edgeos.io/node"], NODE,
        "{pv}"
    );
    assert_eq!(
        pv_name,
        format!(
            "pvc-{}",
            pvc["metadata"]["uid"].as_str().unwrap_or_default()
        )
    );
    // Its own address from the box's pod network (10-edge.conflist: 10.88.0.0/16),
    // and the box's as its host's.
    let pod_ip = wait(
        "the pod's own address at the API server",
        Duration::from_secs(60),
        || {
            cp.get(&["pods", "-n", "default", "-l", "app=telemetry"])
                .ok()
                .and_then(|l| {
                    l["items"][0]["status"]["podIP"]
                        .as_str()
                        .map(str::to_string)
                })
        },
    )?;
    assert!(pod_ip.starts_with("10.88."), "podIP {pod_ip}");
    assert_eq!(pod["status"]["hostIP"], "10.0.2.15", "{pod}");
    let name = pod["metadata"]["name"]
        .as_str()
        .context("pod name")?
        .to_string();
    // What happened on the box, as `kubectl get events` shows it.
    let selector = format!("involvedObject.name={name}");
    let started = wait("noded's Started event", Duration::from_secs(60), || {
        cp.get(&["events", "-n", "default", "--field-selector", &selector])
            .ok()
            .filter(|l| {
                l["items"].as_array().is_some_and(|i| {
                    i.iter()
                        .any(|e| e["reason"] == "Started" && e["source"]["host"] == NODE)
                })
            })
    });
    assert!(started.is_ok(), "{started:?}");
    // The box runs it: noded lists it, and its container writes readings.
    let on_box = m.pods()?;
    assert!(
        on_box
            .iter()
            .any(|p| p["name"] == name.as_str() && p["state"] == "running"),
        "{name} not running on the box: {on_box:?}"
    );
    let lines = wait(
        "the pod's readings in its log",
        Duration::from_secs(60),
        || {
            m.logs(&format!("default/{name}"), false, 5)
                .ok()
                .filter(|l| l.iter().any(|l| l.contains("k8s0")))
        },
    )?;
    assert!(!lines.is_empty());
    // The same readings as the operator sees them: `kubectl logs`, which the API server
    // serves through the tunnel the box dialled out (the core never dials in).
    let logs = wait(
        "kubectl logs through the tunnel",
        Duration::from_secs(60),
        || {
            // Three readings once the sensor has written that many (one a second).
            cp.kubectl(["logs", "-n", "default", &name, "--tail=3"])
                .ok()
                .filter(|l| l.lines().count() >= 3)
        },
    )?;
    assert!(logs.contains("k8s0"), "kubectl logs: {logs:?}");
    assert_eq!(logs.lines().count(), 3, "kubectl logs --tail=3: {logs:?}");
    // `kubectl exec` the same way, run by the box's containerd in the pod's container
    // (with its variables: the sensor's name from the ConfigMap).
    let once = cp.kubectl(["exec", "-n", "default", &name, "--", "/sensor", "--once"])?;
    assert!(
        once.starts_with('{') && once.contains("k8s0"),
        "kubectl exec: {once:?}"
    );
    // What the operator sees, for the log.
    for args in [
        &["get", "nodes", "-o", "wide"][..],
        &["get", "pods", "-A", "-o", "wide"],
        &["get", "pvc,pv", "-A"],
    ] {
        eprintln!("$ kubectl {}\n{}", args.join(" "), cp.kubectl(args)?);
    }
    eprintln!("$ kubectl exec -n default {name} -- /sensor --once\n{once}");

    // The link is cut for longer than the node-monitor grace period (20 s here): the
    // core marks the Node NotReady; the box keeps its pod running all along.
    link.set_cut(true);
    tunnel.set_cut(true);
    let cut_at = Instant::now();
    wait(
        "the box NotReady at the core",
        Duration::from_secs(90),
        || cp.get(&["node", NODE]).ok().filter(|n| !ready(n)),
    )?;
    let on_box = m.pods()?;
    assert!(
        on_box
            .iter()
            .any(|p| p["name"] == name.as_str() && p["state"] == "running"),
        "{name} stopped on the box while the core was away: {on_box:?}"
    );
    // The operator scales the Deployment meanwhile: the new replica waits, unschedulable
    // on an unreachable node.
    cp.kubectl([
        "scale",
        "-n",
        "default",
        "deployment/telemetry",
        "--replicas=2",
    ])?;
    // The box loses power and boots again while the core is still away: the pod comes
    // back from noded's cache on the data partition, with nobody at the core.
    m.powerdown()?;
    m.wait_exit(Duration::from_secs(90))?;
    m.reboot_same_disk()?;
    m.wait_ready()?;
    wait(
        "the pod running again after the reboot, the core still away",
        Duration::from_secs(120),
        || {
            m.pods().ok().filter(|pods| {
                pods.iter()
                    .any(|p| p["name"] == name.as_str() && p["state"] == "running")
            })
        },
    )?;
    assert!(
        cp.get(&["node", NODE]).is_ok_and(|n| !ready(&n)),
        "the core still sees the box NotReady"
    );
    // Its readings survived the power cut on the claim's volume: the sensor resumes
    // after the last one it kept there.
    let resumed = wait(
        "the sensor resuming from its volume after the power cut",
        Duration::from_secs(60),
        || {
            m.logs(&format!("default/{name}"), false, 200)
                .ok()
                .filter(|l| l.iter().any(|l| l.contains("resuming after seq")))
        },
    );
    assert!(resumed.is_ok(), "{resumed:?}");
    // Cut for longer than the grace period itself, whatever the last renewal was.
    std::thread::sleep(Duration::from_secs(25).saturating_sub(cut_at.elapsed()));
    link.set_cut(false);
    tunnel.set_cut(false);
    eprintln!("link cut for {:?}", cut_at.elapsed());
    wait(
        "the box Ready at the core again",
        Duration::from_secs(120),
        || cp.get(&["node", NODE]).ok().filter(ready),
    )?;
    // The box dialled its tunnel again: its logs reach the operator as before.
    let logs = wait(
        "kubectl logs after the link healed",
        Duration::from_secs(60),
        || {
            cp.kubectl(["logs", "-n", "default", &name, "--tail=1"])
                .ok()
                .filter(|l| l.contains("k8s0"))
        },
    )?;
    assert_eq!(logs.lines().count(), 1, "{logs:?}");
    let both = wait(
        "both replicas Running after the link healed",
        Duration::from_secs(180),
        || {
            cp.get(&["pods", "-n", "default", "-l", "app=telemetry"])
                .ok()
                .filter(|l| {
                    l["items"].as_array().is_some_and(|i| {
                        i.len() == 2 && i.iter().all(|p| p["status"]["phase"] == "Running")
                    })
                })
        },
    )?;
    let names: Vec<String> = both["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        names.contains(&name),
        "the first replica was kept: {names:?}"
    );
    let on_box = m.pods()?;
    for n in &names {
        assert!(
            on_box
                .iter()
                .any(|p| p["name"] == n.as_str() && p["state"] == "running"),
            "{n} not running on the box: {on_box:?}"
        );
    }

    // Both replicas share the one ReadWriteMany volume; the operator grows it, and noded
    // grows the volume and its filesystem under the running pods.
    cp.kubectl([
        "patch",
        "-n",
        "default",
        "pvc/telemetry-data",
        "-p",
        r#"{"spec": {"resources": {"requests": {"storage": "96Mi"}}}}"#,
    ])?;
    let grown = wait("the claim grown to 96Mi", Duration::from_secs(90), || {
        cp.get(&["pvc", "-n", "default", "telemetry-data"])
            .ok()
            .filter(|c| {
                let cap = &c["status"]["capacity"]["storage"];
                *cap == "96Mi" || *cap == "100663296"
            })
    });
    assert!(
        grown.is_ok(),
        "{grown:?}: {:?}",
        cp.kubectl(["get", "events", "-n", "default"])
    );
    let pv = cp.get(&["pv", &pv_name])?;
    let cap = &pv["spec"]["capacity"]["storage"];
    assert!(*cap == "96Mi" || *cap == "100663296", "{pv}");

    // Deleted at the API server: stopped on the box, and gone there once it is.
    cp.kubectl([
        "delete",
        "-n",
        "default",
        "deployment/telemetry",
        "--wait=false",
    ])?;
    wait(
        "the pod gone from the box",
        Duration::from_secs(120),
        || {
            let pods = m.pods().ok()?;
            (!pods.iter().any(|p| p["name"] == name.as_str())).then_some(())
        },
    )?;
    wait(
        "the pod gone at the API server",
        Duration::from_secs(60),
        || {
            cp.get(&["pods", "-n", "default", "-l", "app=telemetry"])
                .ok()
                .filter(|l| l["items"].as_array().is_some_and(|i| i.is_empty()))
        },
    )?;
    // The claim deleted: its volume goes with it (reclaim policy Delete).
    cp.kubectl([
        "delete",
        "-n",
        "default",
        "pvc/telemetry-data",
        "--wait=false",
    ])?;
    wait(
        "the claim's PersistentVolume reclaimed",
        Duration::from_secs(90),
        || {
            cp.get(&["pv"])
                .ok()
                .filter(|l| l["items"].as_array().is_some_and(|i| i.is_empty()))
        },
    )?;
    m.finish();
    Ok(())
}
