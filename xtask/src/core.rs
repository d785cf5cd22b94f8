//! `cargo xtask core up|down|env`: a local core for the appliance to join, on loopback:
//! the upstream Kubernetes control plane built from source (xtask/src/controlplane.rs),
//! with its CA, the operator's kubeconfig, a node credential for the box and a
//! bootstrap token for boxes that ask for their own; the fabric's core (Debian's
//! nats-server with JetStream on 127.0.0.1:4222, mutual TLS, the access configuration
//! for site0 and `edgectl setup` done); Debian's Prometheus on 127.0.0.1:9090 with the
//! alert rules of image/observability/, fed by `edgectl prometheus` from the boxes'
//! metrics streams. All left running until `core down`. Its state lives in
//! `<cache>/core` (the fabric's PKI in `fabric/`, a box's provisioning in
//! `provision.toml` and what `run --core` needs besides in `box.json`).

use anyhow::{bail, Context, Result};
use qemu_tests::controlplane::ControlPlane;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

#[path = "../../fabricd/tests/common/prometheus.rs"]
mod prometheus;

/// Where boxes and the operator reach the fabric's core (edgectl's default).
pub const NATS_PORT: u16 = 4222;
/// The core's Prometheus, as its users expect it.
pub const PROMETHEUS_PORT: u16 = 9090;
/// Host packages of the core besides the control plane.
pub const CORE_PACKAGES: &[&str] = &["nats-server", "openssl", "prometheus"];

/// The node name the box's credential is for (system.toml's hostname in the image).
pub const BOX_NODE: &str = "edge0";

fn state_dir() -> Result<PathBuf> {
    Ok(crate::image::debs::cache_root()?.join("core"))
}

fn pids_file() -> Result<PathBuf> {
    Ok(state_dir()?.join("pids"))
}

/// Process group ids of a running core, from its pid file, those still alive.
fn running() -> Result<Vec<(String, i32)>> {
    let Ok(text) = std::fs::read_to_string(pids_file()?) else {
        return Ok(Vec::new());
    };
    Ok(text
        .lines()
        .filter_map(|l| {
            let (name, pid) = l.split_once(' ')?;
            Some((name.to_string(), pid.trim().parse().ok()?))
        })
        .filter(|(_, pid)| alive(*pid))
        .collect())
}

/// Running, not a zombie waiting for its parent.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

pub fn up() -> Result<()> {
    if !running()?.is_empty() {
        bail!("a core is already running (cargo xtask core down stops it)");
    }
    crate::host::ensure_packages(CORE_PACKAGES)?;
    let bin = crate::controlplane::build()?;
    let edgectl = build_edgectl()?;
    let dir = state_dir()?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("failed to clear {}", dir.display()))?;
    }
    let cp = ControlPlane::start(&bin, &dir)?;
    let node = cp.node_kubeconfig(BOX_NODE)?;
    // What a site provisions for its boxes (noded's `bootstrap_kubeconfig`): a token
    // they ask for their own certificates with. This one names the core on this host's
    // loopback; a box in QEMU reaches it through a guest forward (docs/node.md).
    let token = cp.bootstrap_token()?;
    let bootstrap = dir.join("bootstrap.kubeconfig");
    std::fs::write(
        &bootstrap,
        ControlPlane::bootstrap_kubeconfig(&cp.url, &dir.join("ca.pem"), &token),
    )
    .with_context(|| format!("failed to write {}", bootstrap.display()))?;
    // Each part stops again (dropped) if a later one fails to start.
    let fabric = dir.join("fabric");
    std::fs::create_dir_all(&fabric)?;
    qemu_tests::core::make_pki(&fabric)?;
    let nats = qemu_tests::core::Core::start_on(&fabric, &edgectl, NATS_PORT)?;
    let op = qemu_tests::core::Operator {
        edgectl: edgectl.clone(),
        dir: fabric.clone(),
        port: NATS_PORT,
    };
    qemu_tests::core::run(op.cmd().arg("setup"))?;
    // What a box of site0 is provisioned with to reach this core from QEMU, and the
    // guest forwards it dials through (`cargo xtask run --core` gives both to the box).
    let mut bundle = qemu_tests::core::provision_bundle(&fabric, "")?;
    bundle.push_str(&cp.provision_bundle("local", &token)?);
    std::fs::write(dir.join("provision.toml"), bundle)?;
    let joining = Joining {
        provision: dir.join("provision.toml"),
        guestfwd: vec![
            format!("tcp:10.0.2.100:4222-cmd:socat - TCP:127.0.0.1:{NATS_PORT}"),
            format!("tcp:10.0.2.100:6443-cmd:socat - TCP:127.0.0.1:{}", cp.port),
            format!(
                "tcp:{}-cmd:socat - TCP:127.0.0.1:{}",
                qemu_tests::controlplane::GUEST_TUNNEL,
                cp.tunnel_port
            ),
        ],
        fabric: fabric.clone(),
        edgectl: edgectl.clone(),
    };
    std::fs::write(dir.join("box.json"), serde_json::to_vec_pretty(&joining)?)?;
    let prom = prometheus::Prometheus::try_start(&dir.join("prometheus"), PROMETHEUS_PORT, "15s")
        .map_err(anyhow::Error::msg)?;
    let bridge_log = fabric.join("edgectl-prometheus.log");
    let bridge = op
        .cmd()
        .args(["prometheus", "--write-url", &prom.write_url()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&bridge_log)?)
        .process_group(0)
        .spawn()
        .context("failed to start edgectl prometheus")?;
    let admin = cp.admin_kubeconfig();
    let url = cp.url.clone();
    let mut pids: Vec<(String, u32, PathBuf)> = cp
        .detach()
        .into_iter()
        .map(|(n, p)| {
            let log = dir.join(format!("{n}.log"));
            (n, p, log)
        })
        .collect();
    pids.push(("nats-server".into(), nats.detach(), fabric.join("nats.log")));
    pids.push((
        "prometheus".into(),
        prom.detach(),
        dir.join("prometheus/prometheus.log"),
    ));
    pids.push(("edgectl-prometheus".into(), bridge.id(), bridge_log));
    let text: String = pids.iter().map(|(n, p, _)| format!("{n} {p}\n")).collect();
    std::fs::write(pids_file()?, text)?;
    println!("core: up in {}", dir.display());
    for (name, pid, log) in &pids {
        println!("  {name:<24} pid {pid:<8} log {}", log.display());
    }
    println!("  fabric (NATS JetStream)  tls://127.0.0.1:{NATS_PORT}");
    println!(
        "  Prometheus               http://127.0.0.1:{PROMETHEUS_PORT} (rules: image/observability/alerts.yml)"
    );
    println!(
        "  a box's provisioning     {} (cargo xtask run --core boots one with it)",
        dir.join("provision.toml").display()
    );
    println!("  API server               {url}");
    println!("  operator's kubeconfig    {}", admin.display());
    println!(
        "  {:<24} {}",
        format!("the box's ({BOX_NODE})"),
        node.display()
    );
    println!("  boxes' bootstrap token   {}", bootstrap.display());
    println!(
        "  CA                       {}",
        dir.join("ca.pem").display()
    );
    println!(
        "eval \"$(cargo xtask core env)\" puts kubectl, the kubeconfig and edgectl (as the operator) in this shell"
    );
    Ok(())
}

/// What a box needs to join the running core (`<cache>/core/box.json`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Joining {
    /// Site provisioning: the fabric's core and enrollment certificate of site0, the
    /// API server's bootstrap credential.
    pub provision: PathBuf,
    /// The guest forwards to the core's ports on this host's loopback.
    pub guestfwd: Vec<String>,
    /// The fabric's PKI (the CA enrolls the box).
    pub fabric: PathBuf,
    pub edgectl: PathBuf,
}

/// What a box needs to join the core that runs, or why it cannot.
pub fn joining() -> Result<Joining> {
    let procs = running()?;
    if !procs.iter().any(|(n, _)| n == "nats-server") {
        bail!("no core is running: start one with `cargo xtask core up`");
    }
    let path = state_dir()?.join("box.json");
    let bytes =
        std::fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} does not parse", path.display()))
}

/// `edgectl` (debug build, as the tests use it), built if stale.
fn build_edgectl() -> Result<PathBuf> {
    let repo = crate::image::repo()?;
    let st =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "-q", "-p", "fabricd", "--bin", "edgectl"])
            .current_dir(&repo)
            .status()
            .context("failed to run cargo build -p fabricd --bin edgectl")?;
    if !st.success() {
        bail!("cargo build -p fabricd --bin edgectl failed ({st})");
    }
    Ok(crate::image::target_dir(&repo).join("debug/edgectl"))
}

/// The operator's edgectl against this core, as a shell alias.
fn edgectl_alias(edgectl: &Path, fabric: &Path) -> String {
    format!(
        "alias edgectl='{} --server tls://127.0.0.1:{NATS_PORT} --ca {} --cert {} --key {}'",
        edgectl.display(),
        fabric.join("ca.pem").display(),
        fabric.join("operator.pem").display(),
        fabric.join("operator.key").display()
    )
}

pub fn down() -> Result<()> {
    let procs = running()?;
    if procs.is_empty() {
        println!("core: nothing running");
    }
    // The bridge before Prometheus and the fabric, the API server and the controllers
    // before etcd: the reverse of their start.
    for (name, pid) in procs.iter().rev() {
        // kill(1) on the process group: SIGTERM, which each of them handles.
        let st = std::process::Command::new("kill")
            .args(["-TERM", "--", &format!("-{pid}")])
            .status()?;
        println!(
            "core: stopped {name} (pid {pid}){}",
            if st.success() { "" } else { " (already gone)" }
        );
    }
    // Each is given 10 s to finish, then killed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline && procs.iter().any(|(_, pid)| alive(*pid)) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for (name, pid) in procs.iter().filter(|(_, pid)| alive(*pid)) {
        println!("core: {name} (pid {pid}) did not stop within 10 s: killed");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
    }
    let _ = std::fs::remove_file(pids_file()?);
    Ok(())
}

pub fn env() -> Result<()> {
    let dir = state_dir()?;
    let bin = qemu_tests::controlplane::cache_dir()?.join("bin");
    println!(
        "export KUBECONFIG={}",
        dir.join("admin.kubeconfig").display()
    );
    println!("export PATH={}:$PATH", bin.display());
    let repo = crate::image::repo()?;
    println!(
        "{}",
        edgectl_alias(
            &crate::image::target_dir(&repo).join("debug/edgectl"),
            &dir.join("fabric")
        )
    );
    Ok(())
}
