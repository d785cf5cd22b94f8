//! The host containerd harness shared by the integration tests: a private containerd
//! with a temp config (killed with its shims and mounts on drop), our static test
//! programs and OCI archives of them.
#![allow(dead_code)] // each test file uses a part

pub mod csi;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use noded::cri::api::*;
use noded::cri::Client;
use noded::pods::PodReport;

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const GREETING: &str = "hello from an edge container";

/// containerd, the shims it starts and the mounts they leave, all gone on drop, so a
/// failing assertion leaves nothing running.
pub struct Containerd {
    child: Child,
    dir: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims outlive containerd by design; ours are the ones whose command line
        // names our private socket directory.
        for pid in pids_mentioning(&self.dir) {
            // SAFETY: plain kill(2) on a pid we just found.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
        for pid in pids_mentioning(&self.dir) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Rootfs and shm mounts under our directory, deepest first.
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| Path::new(m).starts_with(&self.dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: c is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

pub fn pids_mentioning(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

pub fn ensure_containerd() {
    if Path::new(CONTAINERD).exists() {
        return;
    }
    // xtask's host package list installs these; this is the fallback for a bare
    // `cargo test`.
    let ok = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            "containerd",
            "runc",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok && Path::new(CONTAINERD).exists(),
        "containerd is not installed and apt-get could not install it"
    );
}

/// Builds one of our test programs as a static executable: the images hold nothing
/// else, so there is no libc in them to link against.
pub fn build_static(name: &str, path: &str, out: &Path) -> Vec<u8> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let exe = out.join(name);
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "opt-level=s",
        ])
        .args(["-C", "panic=abort", "-C", "strip=symbols", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("failed to run rustc");
    assert!(status.success(), "rustc failed to build {}", src.display());
    std::fs::read(&exe).unwrap()
}

pub fn archive(name: &str, exe: &str, bytes: Vec<u8>, cmd: &[&str]) -> Vec<u8> {
    edge_oci::write_image(&edge_oci::ImageSpec {
        name: name.into(),
        entrypoint: vec![format!("/{exe}")],
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/".into()],
        files: vec![edge_oci::File {
            path: exe.into(),
            data: bytes,
            mode: 0o755,
        }],
    })
    .unwrap()
}

pub fn overlay_works() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("overlay"))
}

pub fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

pub fn start_containerd(dir: &Path, registry_port: u16) -> Containerd {
    let certs = dir.join("certs.d").display().to_string();
    start_containerd_with_config_path(dir, registry_port, &certs)
}

/// As [`start_containerd`], with CRI's registry `config_path` given (a `:`-separated
/// list of directories; `<dir>/certs.d` holds edge.local's hosts.toml).
pub fn start_containerd_with_config_path(
    dir: &Path,
    registry_port: u16,
    config_path: &str,
) -> Containerd {
    // The registry is configured as the host for edge.local through hosts.toml
    // (config_path): unlike the older `registry.mirrors` table, it does not fall back
    // to https://edge.local after the mirror answers 404, so a missing image is
    // reported as missing rather than as a DNS failure.
    let certs = dir.join("certs.d/edge.local");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(
        certs.join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:{registry_port}\"\n\n\
             [host.\"http://127.0.0.1:{registry_port}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .unwrap();
    let snapshotter = if overlay_works() {
        "overlayfs"
    } else {
        "native"
    };
    // CRI gives the sandbox oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE,
    // which some CI sandboxes withhold even from root (runc then fails with "failed
    // to update /proc/self/oom_score_adj: Permission denied"). There, containerd is
    // told to clamp to its own score; the appliance keeps the real setting.
    let restrict_oom = !has_cap_sys_resource();
    let d = dir.display();
    let config = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "edge.local/pause:1"
  restrict_oom_score_adj = {restrict_oom}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{config_path}"
"#
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let child = Command::new(CONTAINERD)
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("failed to start containerd");
    Containerd {
        child,
        dir: dir.to_path_buf(),
    }
}

pub async fn connect(socket: &Path, dir: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = Client::connect(socket).await {
            if c.version(VersionRequest::default()).await.is_ok() {
                return c;
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
            panic!("containerd's CRI did not answer within 20 s; its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// noded, killed on drop so a failing assertion leaves nothing running.
pub struct Noded(pub Child);

impl Drop for Noded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_noded(config: &Path, log: &Path) -> Noded {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_noded"))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("failed to start noded");
    Noded(child)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Env {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub noded_log: PathBuf,
}

impl Env {
    pub fn noded_log(&self) -> String {
        std::fs::read_to_string(&self.noded_log).unwrap_or_default()
    }

    /// Polls the control socket until `ok` holds for the pods, or fails with both logs.
    pub async fn wait_for(&self, what: &str, ok: impl Fn(&[PodReport]) -> bool) -> Vec<PodReport> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = Vec::new();
        loop {
            if let Ok(p) = noded::control::pods(&self.socket).await {
                if ok(&p) {
                    return p;
                }
                last = p;
            }
            if Instant::now() > deadline {
                let containerd =
                    std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
                let errors: Vec<&str> = containerd
                    .lines()
                    .filter(|l| l.contains("level=error"))
                    .collect();
                panic!(
                    "{what}: not within 30 s; pods: {last:#?}\nnoded's log:\n{}\ncontainerd's errors:\n{}",
                    self.noded_log(),
                    errors.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `noded <args> --socket <ours>`; returns success, stdout and stderr.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_noded"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A private containerd serving pause and hello, and a noded configured against it
/// with `extra` config lines; manifests go into `<dir>/manifests`.
pub struct Node {
    pub env: Env,
    pub manifests: PathBuf,
    pub cri: Client,
    pub noded: Option<Noded>,
    // Dropped last, in this order: noded before containerd before the directory.
    pub containerd: Containerd,
    pub tmp: tempfile::TempDir,
}

impl Node {
    pub async fn start(prefix: &str, extra: &str) -> Node {
        Self::start_with(prefix, extra, |_| {}).await
    }

    /// As [`Node::start`], with `prepare` run on the directory before noded starts.
    pub async fn start_with(prefix: &str, extra: &str, prepare: impl FnOnce(&Path)) -> Node {
        ensure_containerd();
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/tmp")
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        let pause = build_static("pause", "src/bin/pause.rs", &dir);
        let hello = build_static("hello", "tests/programs/hello.rs", &dir);
        std::fs::write(
            images.join("pause.tar"),
            archive("pause:1", "pause", pause, &[]),
        )
        .unwrap();
        // The same program under another name and command: an image with its own digest.
        std::fs::write(
            images.join("other.tar"),
            archive("other:1", "hello", hello.clone(), &["other"]),
        )
        .unwrap();
        std::fs::write(
            images.join("hello.tar"),
            archive("hello:1", "hello", hello, &[]),
        )
        .unwrap();
        let port = free_port();
        let containerd = start_containerd(&dir, port);
        let cri = connect(&dir.join("containerd.sock"), &dir).await;
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        let config = dir.join("noded.toml");
        std::fs::write(
            &config,
            format!(
                "containerd_socket = \"{d}/containerd.sock\"\n\
                 manifests_dir = \"{d}/manifests\"\n\
                 images_dir = \"{d}/images\"\n\
                 registry_listen = \"127.0.0.1:{port}\"\n\
                 log_dir = \"{d}/logs\"\n\
                 state_dir = \"{d}/state\"\n\
                 restart_backoff_base_ms = 300\n\
                 control_socket = \"{d}/run/noded.sock\"\n{extra}\n",
                d = dir.display(),
                extra = extra.replace("{dir}", &dir.display().to_string())
            ),
        )
        .unwrap();
        let env = Env {
            dir: dir.clone(),
            socket: dir.join("run/noded.sock"),
            noded_log: dir.join("noded.log"),
        };
        prepare(&dir);
        let noded = Some(start_noded(&config, &env.noded_log));
        Node {
            env,
            manifests,
            cri,
            noded,
            containerd,
            tmp,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.noded.take();
        eprintln!("noded's log:\n{}", self.env.noded_log());
    }
}

/// A host-network pod of one container `main` running `image`.
pub fn manifest(name: &str, image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
    - name: main
      image: {image}
"#
    )
}

/// A signed image allowlist in noded's format: the signature, then the JSON it signs.
pub fn signed(kp: &ring::signature::Ed25519KeyPair, version: u64, digests: &[&str]) -> Vec<u8> {
    let body = serde_json::json!({"version": version, "digests": digests}).to_string();
    let mut out = kp.sign(body.as_bytes()).as_ref().to_vec();
    out.extend_from_slice(body.as_bytes());
    out
}
