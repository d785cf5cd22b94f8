//! Static pods through the real daemon: noded runs as a process with a temp config
//! against a private containerd, and a manifest dropped into its directory becomes a
//! running pod whose log has the container's line; a container that exits is restarted
//! per policy; a malformed manifest beside it is reported by file and field while the
//! good pod runs; a restarted noded adopts the pod instead of recreating it; removing
//! the manifest stops and removes the pod. Then the pull policies: a pod whose image is
//! on the box starts with the registry away, and a new image the box's registry serves
//! under the same tag (an OS update) is pulled.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use noded::cri::api::*;
use noded::pods::PodReport;

mod common;
use common::*;

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: hello
  labels: {app: hello}
spec:
  hostNetwork: true
  restartPolicy: Always
  terminationGracePeriodSeconds: 1
  volumes:
    - name: scratch
      emptyDir: {}
    - name: model
      hostPath: {path: "@MODEL@", type: File}
  initContainers:
    - name: prepare
      image: edge.local/hello:1
      args: ["init done"]
      env: [{name: HELLO_EXIT, value: "0"}]
  containers:
    - name: steady
      image: edge.local/hello:1
      args: ["steady line"]
      resources:
        limits: {cpu: 500m, memory: 64Mi}
      volumeMounts:
        - {name: scratch, mountPath: /data}
        - {name: model, mountPath: /models/m.txt, readOnly: true}
    - name: blinker
      image: edge.local/hello:1
      args: ["blink"]
      env: [{name: HELLO_EXIT, value: "0"}]
"#;

/// A pod of one container running `image`, with `policy` as its imagePullPolicy (none
/// when empty).
fn one_container_pod(name: &str, image: &str, policy: &str) -> String {
    let policy = if policy.is_empty() {
        String::new()
    } else {
        format!("      imagePullPolicy: {policy}\n")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  hostNetwork: true\n  \
         terminationGracePeriodSeconds: 1\n  containers:\n    - name: {name}\n      image: {image}\n{policy}"
    )
}

const BROKEN: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: broken}
spec:
  containers:
    - name: b
      image: edge.local/hello:1
      livenessProbe: {grpc: {port: 80}}
"#;

fn pod<'a>(pods: &'a [PodReport], file: &str) -> Option<&'a PodReport> {
    pods.iter().find(|p| p.file == file)
}

fn container<'a>(pods: &'a [PodReport], name: &str) -> Option<&'a noded::pods::ContainerReport> {
    pod(pods, "hello.yaml")?
        .containers
        .iter()
        .find(|c| c.name == name)
}

fn pod_log_dir(logs: &Path) -> Option<PathBuf> {
    std::fs::read_dir(logs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("default_hello_"))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_pods_run_restart_are_reported_adopted_and_removed() {
    let started = Instant::now();
    ensure_containerd();
    let tmp = tempfile::Builder::new()
        .prefix("noded-pods-")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path().to_path_buf();

    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let pause = build_static("pause", "src/bin/pause.rs", &dir);
    let hello_exe = build_static("hello", "tests/programs/hello.rs", &dir);
    std::fs::write(
        images.join("pause.tar"),
        archive("pause:1", "pause", pause, &[]),
    )
    .unwrap();
    std::fs::write(
        images.join("hello.tar"),
        archive("hello:1", "hello", hello_exe.clone(), &[]),
    )
    .unwrap();
    std::fs::write(images.join("torn.tar"), b"not an archive").unwrap();

    let port = free_port();
    let metrics_port = free_port();
    let _containerd = start_containerd(&dir, port);
    let cri = connect(&dir.join("containerd.sock"), &dir).await;

    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let env = Env {
        dir: dir.clone(),
        socket: dir.join("run/noded.sock"),
        noded_log: dir.join("noded.log"),
    };
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
             control_socket = \"{d}/run/noded.sock\"\n\
             metrics_listen = \"127.0.0.1:{metrics_port}\"\n\
             fabric_pod_channels = \"{d}/channels\"\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut noded = start_noded(&config, &env.noded_log);

    std::fs::write(manifests.join("broken.yaml"), BROKEN).unwrap();
    // A model the pod reads, as the core's downlink delivers one.
    let model = dir.join("downlink/models/m.txt");
    std::fs::create_dir_all(model.parent().unwrap()).unwrap();
    std::fs::write(&model, "model v1").unwrap();
    std::fs::write(
        manifests.join("hello.yaml"),
        POD.replace("@MODEL@", &model.display().to_string()),
    )
    .unwrap();

    // The good pod runs: init container first, then both app containers.
    let pods = env
        .wait_for("hello pod running", |p| {
            container(p, "steady").is_some_and(|c| c.state == "running")
        })
        .await;
    let prepare = container(&pods, "prepare").unwrap();
    assert_eq!(
        (prepare.state.as_str(), prepare.exit_code),
        ("completed", Some(0))
    );
    assert_eq!(pod(&pods, "hello.yaml").unwrap().state, "running");
    // Its fabric channel: a directory named for it, which fabricd listens in.
    let channels = || -> Vec<String> {
        std::fs::read_dir(dir.join("channels"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        channels().iter().any(|n| n.starts_with("default_hello_")),
        "{:?}",
        channels()
    );

    // Its output is in the CRI log under the configured log directory.
    let logs = dir.join("logs");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = pod_log_dir(&logs)
            .and_then(|d| std::fs::read_to_string(d.join("steady/0.log")).ok())
            .unwrap_or_default();
        if text.lines().any(|l| l.ends_with(" stdout F steady line")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no line in steady/0.log: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pod_logs = pod_log_dir(&logs).unwrap();
    let init_log = std::fs::read_to_string(pod_logs.join("prepare/0.log")).unwrap();
    assert!(init_log.contains("stdout F init done"), "{init_log:?}");

    // The malformed manifest is named with its field, in the status and in the log.
    let broken = pod(&pods, "broken.yaml").expect("broken.yaml is not reported");
    assert_eq!(broken.state, "invalid");
    let why = broken.error.as_deref().unwrap_or("");
    assert!(
        why.ends_with("broken.yaml: spec.containers[0].livenessProbe.grpc is not supported yet"),
        "{why}"
    );
    let log = env.noded_log();
    assert!(
        log.lines()
            .any(|l| l.contains("broken.yaml: spec.containers[0].livenessProbe.grpc")),
        "{log}"
    );
    // `noded pods` prints the same.
    let out = Command::new(env!("CARGO_BIN_EXE_noded"))
        .args(["pods", "--socket"])
        .arg(&env.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("default/hello  running  (hello.yaml)"),
        "{text}"
    );
    assert!(text.contains("broken.yaml  invalid"), "{text}");

    // The metrics endpoint counts the running pod and the refused manifest.
    let metrics = get_metrics(metrics_port).await;
    for line in [
        "noded_pods{state=\"running\"} 1",
        "noded_pods_refused{reason=\"invalid_manifest\"} 1",
        "noded_containers{state=\"completed\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "noded_container_restarts_total{namespace=\"default\",pod=\"hello\",container=\"steady\"} "
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nnoded_reconcile_pass_seconds "),
        "{metrics}"
    );

    // So is the archive that is not one, while the others are served.
    assert!(
        log.lines()
            .any(|l| l.contains("torn.tar") && l.contains("rejected")),
        "{log}"
    );

    // The container that exits is restarted (restartPolicy Always), with a new attempt.
    let pods = env
        .wait_for("blinker restarted", |p| {
            container(p, "blinker").is_some_and(|c| c.restarts >= 2)
        })
        .await;
    let blinker = container(&pods, "blinker").unwrap();
    assert_eq!(blinker.exit_code, Some(0));
    assert!(pod_logs.join("blinker/1.log").exists());
    assert_eq!(container(&pods, "steady").unwrap().restarts, 0);

    // A new noded adopts the running pod: same sandbox, same steady container.
    let before = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap()
        .items;
    assert_eq!(before.len(), 1, "{before:?}");
    let steady_before = running_steady(&cri).await;
    drop(noded);
    noded = start_noded(&config, &env.noded_log);
    let blinks = blinker.restarts;
    // Restart counts carry over: they come from containerd's attempt numbers.
    env.wait_for("pod adopted", |p| {
        container(p, "steady").is_some_and(|c| c.state == "running")
            && container(p, "blinker").is_some_and(|c| c.restarts > blinks)
    })
    .await;
    let after = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap()
        .items;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].id, before[0].id);
    assert_eq!(running_steady(&cri).await, steady_before);
    assert!(env.noded_log().contains("adopted a running pod"));

    // The core withdraws the model: the pod that reads it stops, saying why, and runs
    // again once a model is back.
    std::fs::remove_file(&model).unwrap();
    let pods = env
        .wait_for("hello stopped for its model", |p| {
            pod(p, "hello.yaml").is_some_and(|p| p.state != "running")
        })
        .await;
    let why = pod(&pods, "hello.yaml")
        .unwrap()
        .error
        .clone()
        .unwrap_or_default();
    assert!(
        why.starts_with("stopped: volume model: its hostPath") && why.ends_with("m.txt is gone"),
        "{why}"
    );
    let pods = env
        .wait_for("hello refused while its model is gone", |p| {
            pod(p, "hello.yaml").is_some_and(|p| {
                p.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("volume model: no hostPath"))
            })
        })
        .await;
    assert_eq!(pod(&pods, "hello.yaml").unwrap().state, "pending");
    std::fs::write(&model, "model v2").unwrap();
    env.wait_for("hello running with the new model", |p| {
        container(p, "steady").is_some_and(|c| c.state == "running")
    })
    .await;

    // Removing the manifest stops and removes the pod, its emptyDir, its logs and its
    // fabric channel.
    std::fs::remove_file(manifests.join("hello.yaml")).unwrap();
    env.wait_for("hello pod gone from status", |p| {
        pod(p, "hello.yaml").is_none()
    })
    .await;
    no_sandboxes(&cri, "the hello pod removed").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while pod_log_dir(&logs).is_some()
        || dir
            .join("state/pods")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some())
    {
        assert!(Instant::now() < deadline, "pod directories left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(channels(), Vec::<String>::new(), "the channel left behind");

    // Cut off from its registry (a new noded serves it on a port containerd does not
    // pull from), the box still starts a pod whose image it has: `hello:1` is tagged,
    // so it is pulled only when absent. An image pulled `Always`, or absent under
    // `Never`, is its pod's error, naming the image.
    drop(noded);
    let registry = format!("registry_listen = \"127.0.0.1:{port}\"");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&registry), "{text}");
    let offline = dir.join("offline.toml");
    let elsewhere = format!("registry_listen = \"127.0.0.1:{}\"", free_port());
    std::fs::write(&offline, text.replace(&registry, &elsewhere)).unwrap();
    noded = start_noded(&offline, &env.noded_log);
    let pulled = [
        ("cached", "edge.local/hello:1", ""),
        ("fresh", "edge.local/hello:1", "Always"),
        ("never", "edge.local/absent:1", "Never"),
    ];
    for (name, image, policy) in pulled {
        std::fs::write(
            manifests.join(format!("{name}.yaml")),
            one_container_pod(name, image, policy),
        )
        .unwrap();
    }
    let error = |p: &[PodReport], file| pod(p, file).and_then(|p| p.error.clone());
    let pods = env
        .wait_for("the cached image's pod running, the others refused", |p| {
            pod(p, "cached.yaml").is_some_and(|p| p.state == "running")
                && error(p, "fresh.yaml").is_some()
                && error(p, "never.yaml").is_some()
        })
        .await;
    let fresh = error(&pods, "fresh.yaml").unwrap();
    assert!(fresh.starts_with("image edge.local/hello:1: "), "{fresh}");
    assert_eq!(
        error(&pods, "never.yaml").unwrap(),
        "image edge.local/absent:1: not on the box, and imagePullPolicy is Never"
    );
    for (name, _, _) in pulled {
        std::fs::remove_file(manifests.join(format!("{name}.yaml"))).unwrap();
    }
    no_sandboxes(&cri, "the cached pod removed").await;

    // An OS update ships a new image under the same tag: the box's registry now serves
    // another digest for `hello:1`, and a pod's start pulls it although a `hello:1` is
    // on the box (an image of the box's own registry is current only at the digest the
    // registry serves).
    drop(noded);
    let updated = dir.join("images-updated");
    std::fs::create_dir_all(&updated).unwrap();
    let newer = archive("hello:1", "hello", hello_exe.clone(), &["updated"]);
    let digest = edge_oci::read_archive(&newer).unwrap().images[0]
        .manifest
        .digest
        .clone();
    std::fs::write(updated.join("hello.tar"), newer).unwrap();
    std::fs::copy(images.join("pause.tar"), updated.join("pause.tar")).unwrap();
    let images_line = format!("images_dir = \"{}\"", images.display());
    assert!(text.contains(&images_line), "{text}");
    let after_update = dir.join("updated.toml");
    let updated_line = format!("images_dir = \"{}\"", updated.display());
    std::fs::write(&after_update, text.replace(&images_line, &updated_line)).unwrap();
    noded = start_noded(&after_update, &env.noded_log);
    let cached = manifests.join("cached.yaml");
    std::fs::write(
        &cached,
        one_container_pod("cached", "edge.local/hello:1", ""),
    )
    .unwrap();
    env.wait_for("the updated image's pod running", |p| {
        pod(p, "cached.yaml").is_some_and(|p| p.state == "running")
    })
    .await;
    let held = cri
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: "edge.local/hello:1".into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .image
        .unwrap();
    let want = format!("edge.local/hello@{digest}");
    assert!(held.repo_digests.contains(&want), "{want} not in {held:?}");
    std::fs::remove_file(&cached).unwrap();
    no_sandboxes(&cri, "the updated pod removed").await;
    drop(noded);
    eprintln!("noded's log:\n{}", env.noded_log());
    eprintln!("took {:?}", started.elapsed());
}

/// Waits until containerd holds no pod sandbox.
async fn no_sandboxes(cri: &noded::cri::Client, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = cri
            .list_pod_sandbox(ListPodSandboxRequest::default())
            .await
            .unwrap()
            .items;
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 15 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn running_steady(cri: &noded::cri::Client) -> String {
    let listed = cri
        .list_containers(ListContainersRequest::default())
        .await
        .unwrap()
        .containers;
    let steady: Vec<&Container> = listed
        .iter()
        .filter(|c| c.metadata.as_ref().is_some_and(|m| m.name == "steady"))
        .collect();
    assert_eq!(steady.len(), 1, "{listed:?}");
    assert_eq!(steady[0].state, ContainerState::ContainerRunning as i32);
    steady[0].id.clone()
}

/// The body of `GET /metrics` on 127.0.0.1:`port`.
async fn get_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the metrics port does not answer");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    body.to_string()
}
