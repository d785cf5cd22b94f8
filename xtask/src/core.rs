//! `cargo xtask core up|down|env`: a local core for the appliance to join, on loopback:
//! the upstream Kubernetes control plane built from source (xtask/src/controlplane.rs),
//! with its CA, the operator's kubeconfig, a node credential for the box and a
//! bootstrap token for boxes that ask for their own, left
//! running until `core down`. Its state lives in `<cache>/core`.

use anyhow::{bail, Context, Result};
use qemu_tests::controlplane::ControlPlane;
use std::path::PathBuf;

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
    let bin = crate::controlplane::build()?;
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
    let admin = cp.admin_kubeconfig();
    let url = cp.url.clone();
    let pids = cp.detach();
    let text: String = pids.iter().map(|(n, p)| format!("{n} {p}\n")).collect();
    std::fs::write(pids_file()?, text)?;
    println!("core: up in {}", dir.display());
    for (name, pid) in &pids {
        println!(
            "  {name:<24} pid {pid:<8} log {}",
            dir.join(format!("{name}.log")).display()
        );
    }
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
    println!("eval \"$(cargo xtask core env)\" puts kubectl and the kubeconfig in this shell");
    Ok(())
}

pub fn down() -> Result<()> {
    let procs = running()?;
    if procs.is_empty() {
        println!("core: nothing running");
    }
    // The API server and the controllers before etcd.
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
    Ok(())
}
