//! `cargo xtask controlplane`: the upstream Kubernetes control plane (kube-apiserver,
//! kube-controller-manager, kube-scheduler, kubectl from `k8s.io/kubernetes`), etcd
//! (`go.etcd.io/etcd/server/v3`) and the Konnectivity server
//! (`sigs.k8s.io/apiserver-network-proxy`) built from their pinned source through the Go module
//! proxy into the cache (qemu-tests/src/controlplane.rs names the pins and the place),
//! once per pin. Nothing of theirs enters the repository: the Go modules that name
//! them are written into the cache here.

use anyhow::{bail, Context, Result};
use qemu_tests::controlplane::{
    cache_dir, ETCD, KONNECTIVITY, KUBERNETES, KUBERNETES_STAGING, PROGRAMS,
};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds what is missing; returns the directory of the programs.
pub fn build() -> Result<PathBuf> {
    let dir = cache_dir()?;
    let bin = dir.join("bin");
    if PROGRAMS.iter().all(|p| bin.join(p).is_file()) {
        return Ok(bin);
    }
    let go = crate::go_toolchain::go()?;
    println!(
        "controlplane: building Kubernetes {KUBERNETES}, etcd {ETCD} and Konnectivity \
         {KONNECTIVITY} from source into {} (about 6 minutes on 2 cores, once per pin)",
        dir.display()
    );
    let kube = dir.join("src/kubernetes");
    std::fs::create_dir_all(&kube)?;
    let replaces = staging_replaces(&go, &kube)?;
    std::fs::write(
        kube.join("go.mod"),
        format!(
            "module edgeos.local/controlplane\n\ngo 1.26\n\nrequire k8s.io/kubernetes \
             {KUBERNETES}\n\n// k8s.io/kubernetes names its staging modules v0.0.0 and \
             replaces them with\n// its own tree; outside it they are the published \
             releases of the same version.\n{replaces}"
        ),
    )?;
    // Every tool but the kubelet, which only `bench pods` builds.
    let cmds = &KUBE_TOOLS[..4];
    write_tools(&kube)?;
    go_run(&go, &kube, &["mod", "tidy"])?;
    let mut args = vec!["build", "-trimpath", "-ldflags=-s -w", "-o"];
    let out = format!("{}/", bin.display());
    args.push(&out);
    let pkgs: Vec<String> = cmds
        .iter()
        .map(|c| format!("k8s.io/kubernetes/cmd/{c}"))
        .collect();
    args.extend(pkgs.iter().map(String::as_str));
    go_run(&go, &kube, &args)?;

    let etcd = dir.join("src/etcd");
    std::fs::create_dir_all(&etcd)?;
    std::fs::write(etcd.join("go.mod"), "module edgeos.local/etcd\n\ngo 1.26\n")?;
    // etcd's own main package lives in a module that replaces its siblings with its
    // tree, which `go build` of a dependency refuses; its entry point is etcdmain.
    std::fs::write(
        etcd.join("main.go"),
        "package main\n\nimport (\n\t\"os\"\n\n\t\"go.etcd.io/etcd/server/v3/etcdmain\"\n)\n\n\
         func main() { etcdmain.Main(os.Args) }\n",
    )?;
    go_run(
        &go,
        &etcd,
        &["get", &format!("go.etcd.io/etcd/server/v3@{ETCD}")],
    )?;
    go_run(&go, &etcd, &["mod", "tidy"])?;
    let out = bin.join("etcd").display().to_string();
    go_run(
        &go,
        &etcd,
        &["build", "-trimpath", "-ldflags=-s -w", "-o", &out, "."],
    )?;
    let knp = dir.join("src/konnectivity");
    std::fs::create_dir_all(&knp)?;
    std::fs::write(
        knp.join("go.mod"),
        "module edgeos.local/konnectivity\n\ngo 1.26\n",
    )?;
    std::fs::write(
        knp.join("tools.go"),
        "//go:build tools\n\npackage konnectivity\n\nimport _ \
         \"sigs.k8s.io/apiserver-network-proxy/cmd/server\"\n",
    )?;
    go_run(
        &go,
        &knp,
        &[
            "get",
            &format!("sigs.k8s.io/apiserver-network-proxy@{KONNECTIVITY}"),
        ],
    )?;
    go_run(&go, &knp, &["mod", "tidy"])?;
    let out = bin.join("konnectivity-server").display().to_string();
    go_run(
        &go,
        &knp,
        &[
            "build",
            "-trimpath",
            "-ldflags=-s -w",
            "-o",
            &out,
            "sigs.k8s.io/apiserver-network-proxy/cmd/server",
        ],
    )?;
    for p in PROGRAMS {
        if !bin.join(p).is_file() {
            bail!("{p} was not built into {}", bin.display());
        }
    }
    println!("controlplane: built into {}", bin.display());
    Ok(bin)
}

/// The Kubernetes programs the module's `tools.go` names: the control plane's and the
/// kubelet (built only for `bench pods`, [`kubelet`]), so that one `go mod tidy` covers
/// both.
const KUBE_TOOLS: [&str; 5] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
];

fn write_tools(kube: &Path) -> Result<()> {
    let imports: String = KUBE_TOOLS
        .iter()
        .map(|c| format!("\t_ \"k8s.io/kubernetes/cmd/{c}\"\n"))
        .collect();
    let path = kube.join("tools.go");
    std::fs::write(
        &path,
        format!("//go:build tools\n\npackage controlplane\n\nimport (\n{imports})\n"),
    )
    .with_context(|| format!("failed to write {}", path.display()))
}

/// The upstream kubelet of the same pinned release, static (no cgo) so that it runs on
/// the appliance's root: `bench pods` runs it as noded's peer. Built once per pin,
/// beside the control plane's programs; returns its path.
pub fn kubelet() -> Result<PathBuf> {
    let bin = build()?;
    let kubelet = bin.join("kubelet");
    if kubelet.is_file() {
        return Ok(kubelet);
    }
    let go = crate::go_toolchain::go()?;
    println!("controlplane: building the kubelet {KUBERNETES} from source (about 3 minutes, once per pin)");
    let kube = cache_dir()?.join("src/kubernetes");
    write_tools(&kube)?;
    go_run(&go, &kube, &["mod", "tidy"])?;
    let out = kubelet.display().to_string();
    // Built as a dependency, it has no version stamped: the node would report v0.0.0.
    // The release's own build stamps the same variable.
    let ldflags =
        format!("-ldflags=-s -w -X k8s.io/component-base/version.gitVersion={KUBERNETES}");
    go_run_with(
        &go,
        &kube,
        &[
            "build",
            "-trimpath",
            &ldflags,
            "-o",
            &out,
            "k8s.io/kubernetes/cmd/kubelet",
        ],
        &[("CGO_ENABLED", "0")],
    )?;
    if !kubelet.is_file() {
        bail!(
            "go build k8s.io/kubernetes/cmd/kubelet made no {}",
            kubelet.display()
        );
    }
    Ok(kubelet)
}

/// `replace k8s.io/x => k8s.io/x <version>` for each module k8s.io/kubernetes's go.mod
/// takes from its staging tree.
fn staging_replaces(go: &Path, dir: &Path) -> Result<String> {
    let out = Command::new(go)
        .current_dir(dir)
        .args(["mod", "download", "-json"])
        .arg(format!("k8s.io/kubernetes@{KUBERNETES}"))
        .output()
        .context("failed to run go mod download")?;
    if !out.status.success() {
        bail!(
            "go mod download k8s.io/kubernetes@{KUBERNETES} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("go mod download -json printed no JSON")?;
    let gomod = info["GoMod"]
        .as_str()
        .context("go mod download named no go.mod")?;
    let text = std::fs::read_to_string(gomod).with_context(|| format!("failed to read {gomod}"))?;
    let lines: Vec<String> = staging_modules(&text)
        .into_iter()
        .map(|m| format!("replace {m} => {m} {KUBERNETES_STAGING}\n"))
        .collect();
    if lines.is_empty() {
        bail!("{gomod} replaces no staging module: not the go.mod of k8s.io/kubernetes expected");
    }
    Ok(lines.concat())
}

/// The modules a go.mod replaces with `./staging/...` directories.
fn staging_modules(gomod: &str) -> Vec<String> {
    gomod
        .lines()
        .map(|l| l.trim().trim_start_matches("replace").trim())
        .filter_map(|l| {
            let (m, target) = l.split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| m.trim().to_string())
        })
        .collect()
}

fn go_run(go: &Path, dir: &Path, args: &[&str]) -> Result<()> {
    go_run_with(go, dir, args, &[])
}

/// `go_run` with more environment variables.
fn go_run_with(go: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let st = Command::new(go)
        .current_dir(dir)
        .args(args)
        // Module mode from the proxy; the pinned versions, never newer ones.
        .env("GOFLAGS", "-mod=mod")
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("failed to run go {}", args.join(" ")))?;
    if !st.success() {
        bail!("go {} failed ({st}) in {}", args.join(" "), dir.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staging_modules_are_read_from_the_replace_block() {
        let gomod = "module k8s.io/kubernetes\n\nrequire (\n\tk8s.io/api v0.0.0\n)\n\n\
                     replace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\
                     \tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\
                     \tgithub.com/x/y => github.com/x/y v1.0.0\n)\n\
                     replace k8s.io/kms => ./staging/src/k8s.io/kms\n";
        assert_eq!(
            staging_modules(gomod),
            ["k8s.io/api", "k8s.io/client-go", "k8s.io/kms"]
        );
    }
}
