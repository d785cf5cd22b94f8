//! The shipped image joins an upstream Kubernetes control plane (etcd and kube-* built
//! from source by `cargo xtask controlplane`, on the host's loopback) with no rebuild:
//! the site provisions noded's `apiserver_file` and a kubeconfig with the box's node
//! certificate, and the box dials the API server through a guest forward (the core never
//! dials in). The box registers as a Ready Node; a Deployment the operator applies with
//! kubectl is scheduled onto it, runs on the box's containerd, and is Running at the API
//! server; deleted there, it stops on the box.

use anyhow::{bail, Context, Result};
use qemu_tests::controlplane::{built, ControlPlane};
use qemu_tests::core::toml_string;
use qemu_tests::{Machine, Options};
use serde_json::Value;
use std::time::{Duration, Instant};

/// The box's node name: system.toml's hostname in the image.
const NODE: &str = "edge0";
/// Where provisioning puts the credential on the box.
const KUBE: &str = "/var/lib/edge/provision/kube";

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
    // and the box's node credential.
    let server = "https://10.0.2.100:6443";
    let mut bundle = toml_string(
        "noded-apiserver.toml",
        &format!("kubeconfig = \"{KUBE}/kubeconfig\"\nzone = \"plant-7\"\n"),
    );
    for (name, contents) in cp.node_credential(NODE, server, std::path::Path::new(KUBE))? {
        bundle.push_str(&toml_string(&format!("kube/{name}"), &contents));
    }
    let bundle_path = tmp.path().join("provision.toml");
    std::fs::write(&bundle_path, bundle)?;
    let mut opts = Options::new(&qemu_tests::image_from_env()?);
    opts.guestfwd.push(format!(
        "tcp:10.0.2.100:6443-cmd:socat - TCP:127.0.0.1:{}",
        cp.port
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
    assert!(
        node["status"]["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("containerd://")),
        "{node}"
    );

    // The operator's Deployment: the image's own sensor image (on its allowlist), host
    // network (no pod network yet), no service-account token (none at the edge).
    cp.apply(
        r#"{"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "telemetry", "namespace": "default"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "telemetry"}},
              "template": {"metadata": {"labels": {"app": "telemetry"}},
                "spec": {"hostNetwork": true, "automountServiceAccountToken": false,
                  "terminationGracePeriodSeconds": 2,
                  "containers": [{"name": "sensor", "image": "edge.local/sensor:1",
                    "env": [{"name": "SENSOR_NAME", "value": "k8s0"}]}]}}}}"#,
    )?;
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
    let name = pod["metadata"]["name"]
        .as_str()
        .context("pod name")?
        .to_string();
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
    m.finish();
    Ok(())
}
