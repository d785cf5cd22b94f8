//! noded against a real containerd (Debian's, as on the appliance): CRI answers over
//! our hand-written protocol, images built by edge-oci reach containerd through the
//! local registry, and, where the host lets runc run containers, a pod runs and its
//! output lands in the CRI log.

use std::path::Path;
use std::time::{Duration, Instant};

use noded::cri::api::*;
use noded::cri::Client;
use noded::registry::Registry;

mod common;
use common::*;

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
