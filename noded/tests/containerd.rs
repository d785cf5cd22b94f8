//! noded against a real containerd (Debian's, as on the appliance): CRI answers over
//! our hand-written protocol, images built by edge-oci reach containerd through the
//! local registry, and, where the host lets runc run containers, a pod runs and its
//! output lands in the CRI log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use noded::cri::api::*;
use noded::cri::Client;
use noded::registry::Registry;

const CONTAINERD: &str = "/usr/bin/containerd";
const GREETING: &str = "hello from an edge container";

/// containerd, the shims it starts and the mounts they leave, all gone on drop, so a
/// failing assertion leaves nothing running.
struct Containerd {
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

fn pids_mentioning(dir: &Path) -> Vec<i32> {
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

fn ensure_containerd() {
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
fn build_static(name: &str, path: &str, out: &Path) -> Vec<u8> {
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

fn archive(name: &str, exe: &str, bytes: Vec<u8>, cmd: &[&str]) -> Vec<u8> {
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

fn overlay_works() -> bool {
    std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("overlay"))
}

fn has_cap_sys_resource() -> bool {
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

fn start_containerd(dir: &Path, registry_port: u16) -> Containerd {
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
    config_path = "{d}/certs.d"
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

async fn connect(socket: &Path, dir: &Path) -> Client {
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

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_our_images_from_the_local_registry_and_runs_a_pod() {
    let started = Instant::now();
    ensure_containerd();
    let tmp = tempfile::Builder::new()
        .prefix("noded-containerd-")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path().to_path_buf();

    let pause = archive(
        "pause:1",
        "pause",
        build_static("pause", "src/bin/pause.rs", &dir),
        &[],
    );
    let hello = archive(
        "hello:1",
        "hello",
        build_static("hello", "tests/programs/hello.rs", &dir),
        &[GREETING],
    );
    let pause_image = edge_oci::read_archive(&pause).unwrap().images.remove(0);
    let mut registry = Registry::default();
    registry
        .add("pause", edge_oci::read_archive(&pause).unwrap())
        .unwrap();
    registry
        .add("hello", edge_oci::read_archive(&hello).unwrap())
        .unwrap();
    let (addr, _registry_task) = registry
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    let _containerd = start_containerd(&dir, addr.port());
    let cri = connect(&dir.join("containerd.sock"), &dir).await;

    let version = cri
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");
    eprintln!(
        "runtime {} {}",
        version.runtime_name, version.runtime_version
    );

    // The pause image arrives through the registry, and containerd knows it by the
    // digests we built.
    let pulled = cri
        .pull_image(PullImageRequest {
            image: spec("edge.local/pause:1"),
            ..Default::default()
        })
        .await
        .unwrap();
    let status = cri
        .image_status(ImageStatusRequest {
            image: spec("edge.local/pause:1"),
            verbose: false,
        })
        .await
        .unwrap();
    let image = status
        .image
        .expect("ImageStatus has no image after a successful pull");
    assert_eq!(image.id, pause_image.config.digest);
    assert_eq!(pulled.image_ref, pause_image.config.digest);
    assert!(
        image.repo_tags.contains(&"edge.local/pause:1".to_string()),
        "{image:?}"
    );
    let by_digest = format!("edge.local/pause@{}", pause_image.manifest.digest);
    assert!(image.repo_digests.contains(&by_digest), "{image:?}");
    let listed = cri.list_images(ListImagesRequest::default()).await.unwrap();
    assert!(listed.images.iter().any(|i| i.id == image.id));

    // An image the registry does not have is a clear failure, not a hang.
    let missing = cri
        .pull_image(PullImageRequest {
            image: spec("edge.local/nope:1"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    eprintln!("pulling a missing image: {missing}");
    assert_ne!(missing.code(), tonic::Code::Ok);
    assert!(
        missing.to_string().contains("edge.local/nope:1"),
        "{missing}"
    );
    assert!(missing.to_string().contains("not found"), "{missing}");
    let none = cri
        .image_status(ImageStatusRequest {
            image: spec("edge.local/nope:1"),
            verbose: false,
        })
        .await
        .unwrap();
    assert!(none.image.is_none());

    run_a_pod(&cri, &dir).await;

    eprintln!("took {:?}", started.elapsed());
}

async fn run_a_pod(cri: &Client, dir: &Path) {
    cri.pull_image(PullImageRequest {
        image: spec("edge.local/hello:1"),
        ..Default::default()
    })
    .await
    .unwrap();
    let logs = dir.join("logs/default_hello_1");
    std::fs::create_dir_all(&logs).unwrap();
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "hello".into(),
            uid: "1".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        // With the host's network the pod shares the host's UTS namespace, and runc
        // refuses to set a hostname there; CRI allows it empty in exactly this case.
        hostname: String::new(),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                // The host network needs no CNI, which this host does not have.
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = match cri
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.pod_sandbox_id,
        Err(e) => {
            let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
            let errors: Vec<&str> = log.lines().filter(|l| l.contains("level=error")).collect();
            panic!(
                "RunPodSandbox failed: {e}\ncontainerd's errors:\n{}",
                errors.join("\n")
            );
        }
    };
    let status = cri
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap();
    assert_eq!(
        status.status.unwrap().state,
        PodSandboxState::SandboxReady as i32
    );

    let created = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "hello".into(),
                    attempt: 0,
                }),
                image: spec("edge.local/hello:1"),
                log_path: "hello/0.log".into(),
                envs: vec![KeyValue {
                    key: "SITE".into(),
                    value: "test".into(),
                }],
                linux: Some(LinuxContainerConfig {
                    resources: Some(LinuxContainerResources {
                        memory_limit_in_bytes: 64 << 20,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox),
        })
        .await
        .unwrap();
    let id = created.container_id;
    cri.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();

    // CRI log format: "<RFC 3339 time> <stream> <P|F> <text>".
    let log_file = logs.join("hello/0.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let text = std::fs::read_to_string(&log_file).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.ends_with(GREETING)) {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no greeting in {} after 10 s: {text:?}",
            log_file.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("container log: {line}");
    let fields: Vec<&str> = line.splitn(4, ' ').collect();
    assert_eq!(fields[1..], ["stdout", "F", GREETING], "{line}");
    assert!(fields[0].contains('T') && fields[0].len() > 20, "{line}");

    let status = cri
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.state, ContainerState::ContainerRunning as i32);
    assert_eq!(status.log_path, log_file.display().to_string());
    let listed = cri
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert_eq!(listed.containers.len(), 1);

    cri.stop_container(StopContainerRequest {
        container_id: id.clone(),
        timeout: 1,
    })
    .await
    .unwrap();
    let status = cri
        .container_status(ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    cri.remove_container(RemoveContainerRequest { container_id: id })
        .await
        .unwrap();
    cri.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    cri.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    let pods = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap();
    assert!(pods.items.is_empty(), "{:?}", pods.items);
}
