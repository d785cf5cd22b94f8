//! Pods' csi volumes through the real daemon and a real containerd: noded creates,
//! stages and publishes a storaged volume before the pod's container starts, the
//! container writes into it, a second pod shares it read-only, removing a pod
//! unpublishes its mount and unstages the volume only when no pod uses it any more,
//! the data stays, and a CSI error (RESOURCE_EXHAUSTED) is the pod's error naming the
//! volume, retried, while the other pods run.
//!
//! The CSI server here is a test double, not storaged: storaged's volumes are
//! device-mapper thin devices and the host kernel has no device-mapper (storaged runs
//! in the QEMU tests). The double speaks the same wire format (storaged's own
//! `csi::api` messages over gRPC on a unix socket), records every call, and stands in
//! for a volume with a directory: stage bind-mounts it on the staging path, publish
//! bind-mounts the staging path on the target (read-only when asked), as storaged does
//! with the ext4 mount (tests/common/csi.rs).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edge_csi::api::volume_capability;
use tonic::Code;

mod common;
use common::*;

use common::csi::*;

const WRITER: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: writer}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  volumes:
    - name: data
      csi:
        driver: storaged.edgeos
        fsType: ext4
        volumeAttributes: {volume: shared, size: 64Mi, accessMode: ReadWriteMany}
  containers:
    - name: w
      image: edge.local/writer:1
      args: [/data/from-writer, "written in a container"]
      volumeMounts:
        - {name: data, mountPath: /data}
"#;

/// The same volume, published read-only into a second pod.
const READER: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: reader}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  volumes:
    - name: model
      csi:
        driver: storaged.edgeos
        readOnly: true
        volumeAttributes: {volume: shared, size: 64Mi, accessMode: ReadWriteMany}
  containers:
    - name: w
      image: edge.local/writer:1
      args: [/model/from-reader, "must not land"]
      volumeMounts:
        - {name: model, mountPath: /model}
"#;

/// A volume the double's pool has no room for.
const FULL: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: full}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  volumes:
    - name: big
      csi:
        driver: storaged.edgeos
        volumeAttributes: {volume: huge, size: 1Ti}
  containers:
    - name: w
      image: edge.local/writer:1
      args: [/big/x, "y"]
      volumeMounts:
        - {name: big, mountPath: /big}
"#;

/// The container's first log file of a pod, once it has `needle`.
async fn wait_log(logs: &Path, pod: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_dir(logs)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&format!("default_{pod}_")))
            })
            .and_then(|e| std::fs::read_to_string(e.path().join("w/0.log")).ok())
            .unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "pod {pod}: no {needle:?} in its log within 30 s: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_calls(double: &Double, what: &str, ok: impl Fn(&[Call]) -> bool) -> Vec<Call> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let calls = double.calls();
        if ok(&calls) {
            return calls;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 30 s; calls: {calls:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits up to 10 s for `ok`: for what noded does after a CSI call returns.
async fn until(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn position(calls: &[Call], method: &str, path_has: &str) -> Option<usize> {
    calls
        .iter()
        .position(|c| c.method == method && c.path.contains(path_has))
}

/// A node whose noded has a CSI socket and the writer image.
async fn start_node(prefix: &str) -> Node {
    Node::start_with(prefix, "csi_socket = \"{dir}/csi.sock\"", |dir| {
        let writer = build_static("writer", "tests/programs/writer.rs", dir);
        std::fs::write(
            dir.join("images/writer.tar"),
            archive("writer:1", "writer", writer, &[]),
        )
        .unwrap();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_volumes_are_published_before_the_container_and_released_after_the_pod() {
    let mut node = start_node("noded-csi-").await;
    let dir = node.env.dir.clone();
    let double = serve(&dir.join("csi.sock"), &dir.join("double-volumes"));
    double.state.lock().unwrap().refuse.insert(
        "huge".into(),
        (
            Code::ResourceExhausted,
            "volume huge: 1099511627776 bytes is more than the overcommit limit leaves".into(),
        ),
    );
    let state = dir.join("state");
    let staging = state.join("csi/staging/shared");

    std::fs::write(node.manifests.join("writer.yaml"), WRITER).unwrap();
    std::fs::write(node.manifests.join("full.yaml"), FULL).unwrap();

    // The pool's refusal is the pod's error, naming the pod's volume, storaged's
    // volume and the CSI code; the other pod runs regardless.
    let pods = node
        .env
        .wait_for("writer running, full refused", |p| {
            let writer = p.iter().find(|p| p.file == "writer.yaml");
            let full = p.iter().find(|p| p.file == "full.yaml");
            writer.is_some_and(|w| w.state == "running") && full.is_some_and(|f| f.error.is_some())
        })
        .await;
    let full = pods.iter().find(|p| p.file == "full.yaml").unwrap();
    let err = full.error.as_deref().unwrap();
    assert_eq!(full.state, "pending");
    assert!(
        err.contains("volume big")
            && err.contains("huge")
            && err.contains("CreateVolume: RESOURCE_EXHAUSTED")
            && err.contains("overcommit limit"),
        "{err}"
    );

    // What the container wrote is in the volume: the publish was in place before the
    // container started (else the write would have landed in the bare target
    // directory, not in the volume).
    wait_log(
        &node.env.dir.join("logs"),
        "writer",
        "wrote /data/from-writer",
    )
    .await;
    assert_eq!(
        std::fs::read_to_string(double.backing("shared").join("from-writer")).unwrap(),
        "written in a container"
    );
    let calls = double.calls();
    let shared: Vec<&Call> = calls.iter().filter(|c| c.volume == "shared").collect();
    let methods: Vec<&str> = shared.iter().map(|c| c.method).collect();
    assert_eq!(
        methods,
        ["CreateVolume", "NodeStageVolume", "NodePublishVolume"],
        "{calls:#?}"
    );
    let rwx = volume_capability::Mode::SingleNodeMultiWriter as i32;
    assert_eq!((shared[0].size, shared[0].mode), (64 << 20, rwx));
    assert_eq!(shared[1].path, staging.display().to_string());
    let writer_target = PathBuf::from(&shared[2].path);
    assert!(
        writer_target.starts_with(state.join("csi/pods")) && writer_target.ends_with("data"),
        "{writer_target:?}"
    );
    assert!(!shared[2].read_only);

    // Back-off retries of the refused volume; it was never staged.
    wait_calls(&double, "a second CreateVolume of huge", |c| {
        c.iter().filter(|c| c.volume == "huge").count() >= 2
    })
    .await;
    assert!(double
        .calls()
        .iter()
        .all(|c| c.volume != "huge" || c.method == "CreateVolume"));

    // A second pod shares the volume read-only: one staging, its own publish, and the
    // kernel refuses its write.
    std::fs::write(node.manifests.join("reader.yaml"), READER).unwrap();
    let log = wait_log(&node.env.dir.join("logs"), "reader", "/model/from-reader").await;
    assert!(log.contains("write to /model/from-reader failed"), "{log}");
    assert!(!double.backing("shared").join("from-reader").exists());
    let calls = double.calls();
    let reader_publish = calls
        .iter()
        .find(|c| c.method == "NodePublishVolume" && c.path.ends_with("/model"))
        .expect("the reader's publish");
    assert!(reader_publish.read_only);
    let reader_target = PathBuf::from(&reader_publish.path);

    // The writer goes: its publish is released, but the volume stays staged for the
    // reader.
    std::fs::remove_file(node.manifests.join("writer.yaml")).unwrap();
    wait_calls(&double, "the writer's unpublish", |c| {
        position(
            c,
            "NodeUnpublishVolume",
            &writer_target.display().to_string(),
        )
        .is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        position(&double.calls(), "NodeUnstageVolume", "").is_none(),
        "unstaged while the reader still uses it: {:#?}",
        double.calls()
    );
    assert!(mounted(&staging) && mounted(&reader_target) && !mounted(&writer_target));

    // The last user goes: unpublish, then unstage; the data stays.
    std::fs::remove_file(node.manifests.join("reader.yaml")).unwrap();
    let calls = wait_calls(&double, "the volume's unstage", |c| {
        position(c, "NodeUnstageVolume", "").is_some()
    })
    .await;
    let unpublish = position(
        &calls,
        "NodeUnpublishVolume",
        &reader_target.display().to_string(),
    )
    .expect("the reader's unpublish");
    let unstage = position(&calls, "NodeUnstageVolume", "").unwrap();
    assert!(unpublish < unstage, "{calls:#?}");
    assert_eq!(calls[unstage].path, staging.display().to_string());
    assert!(!mounted(&staging) && !mounted(&reader_target));
    assert_eq!(
        std::fs::read_to_string(double.backing("shared").join("from-writer")).unwrap(),
        "written in a container"
    );
    // Pods gone, their per-pod directories with them; nothing ever deleted a volume.
    // (noded removes them after the unstage call returns.)
    until("the pods' volume directories removed", || {
        !writer_target.parent().unwrap().exists() && !reader_target.parent().unwrap().exists()
    })
    .await;

    // The refused pod goes without a CSI call for a volume it never had.
    let before = double.calls().len();
    std::fs::remove_file(node.manifests.join("full.yaml")).unwrap();
    node.env
        .wait_for("full removed", |p| p.iter().all(|p| p.file != "full.yaml"))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<Call> = double.calls()[before..].to_vec();
    assert!(
        after.iter().all(|c| c.method == "CreateVolume"),
        "{after:#?}"
    );

    // A pod that goes while noded is down: the next noded removes its sandbox and
    // releases the volume it held (from noded's record of it).
    std::fs::write(node.manifests.join("writer.yaml"), WRITER).unwrap();
    let calls = wait_calls(&double, "the writer's second publish", |c| {
        c.iter()
            .filter(|c| c.method == "NodePublishVolume" && c.path.ends_with("/data"))
            .count()
            == 2
    })
    .await;
    let target = PathBuf::from(&calls.last().unwrap().path);
    node.env
        .wait_for("writer running again", |p| {
            p.iter()
                .any(|p| p.file == "writer.yaml" && p.state == "running")
        })
        .await;
    let records = || -> Vec<PathBuf> {
        std::fs::read_dir(state.join("csi/pods"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect()
    };
    assert_eq!(records().len(), 1, "{:?}", records());
    node.noded.take();
    std::fs::remove_file(node.manifests.join("writer.yaml")).unwrap();
    node.noded = Some(start_noded(&dir.join("noded.toml"), &node.env.noded_log));
    let calls = wait_calls(&double, "the second unstage", |c| {
        c.iter().filter(|c| c.method == "NodeUnstageVolume").count() == 2
    })
    .await;
    let unpublish = position(&calls, "NodeUnpublishVolume", &target.display().to_string())
        .expect("the gone pod's unpublish");
    assert!(unpublish < calls.len() - 1, "{calls:#?}");
    assert!(!mounted(&target) && !mounted(&staging));
    until("the gone pod's record removed", || records().is_empty()).await;
}

fn hello_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  hostNetwork: true\n  \
         terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: edge.local/hello:1\n"
    )
}

/// A pod whose volume is slow to come (its publish held by the double) neither holds
/// up the pods beside it nor the status: while it waits, `pods` answers with it
/// pending and the others running, and a container beside it that exits is restarted
/// again and again meanwhile. (Stepped one after another, as noded once did, the
/// others would wait for it and the status would stay empty until all ran; stepped
/// together but a pass at a time, nothing would be restarted while it waits.) A pod
/// whose manifest goes while it is mid-start is stopped once the start returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_slow_to_start_holds_up_neither_the_others_nor_the_status() {
    let node = start_node("noded-slow-").await;
    let dir = node.env.dir.clone();
    let double = serve(&dir.join("csi.sock"), &dir.join("double-volumes"));
    double.state.lock().unwrap().hold_publish = true;
    // The slow pod's file sorts first: it is the first pod a pass comes to.
    std::fs::write(node.manifests.join("a-slow.yaml"), WRITER).unwrap();
    for name in ["b", "c", "d"] {
        std::fs::write(node.manifests.join(format!("{name}.yaml")), hello_pod(name)).unwrap();
    }
    let blinker = hello_pod("e") + "    env: [{name: HELLO_EXIT, value: \"0\"}]\n";
    std::fs::write(node.manifests.join("e.yaml"), blinker).unwrap();
    // Staged: its publish is next, and held.
    wait_calls(&double, "the slow pod's stage", |c| {
        position(c, "NodeStageVolume", "").is_some()
    })
    .await;
    let pods = node
        .env
        .wait_for("the other pods running while the slow one waits", |p| {
            ["b.yaml", "c.yaml", "d.yaml"]
                .iter()
                .all(|f| p.iter().any(|p| p.file == *f && p.state == "running"))
                && p.iter().any(|p| {
                    p.file == "e.yaml" && p.containers.first().is_some_and(|c| c.restarts >= 3)
                })
        })
        .await;
    let slow = pods.iter().find(|p| p.file == "a-slow.yaml");
    assert_eq!(slow.map(|p| p.state.as_str()), Some("pending"), "{pods:#?}");
    // Its publish is still held: it was mid-start all along.
    assert!(position(&double.calls(), "NodePublishVolume", "").is_none());
    // Once its volume comes, it runs too.
    double.state.lock().unwrap().hold_publish = false;
    node.env
        .wait_for("the slow pod running", |p| {
            p.iter()
                .any(|p| p.file == "a-slow.yaml" && p.state == "running")
        })
        .await;
    wait_log(&dir.join("logs"), "writer", "wrote /data/from-writer").await;
    let first_target = double
        .calls()
        .iter()
        .find(|c| c.method == "NodePublishVolume")
        .map(|c| c.path.clone())
        .unwrap();

    // Another slow one, whose manifest goes while its publish is held: it leaves the
    // status at once, and is stopped and its volume released when its start returns.
    double.state.lock().unwrap().hold_publish = true;
    std::fs::write(
        node.manifests.join("z-late.yaml"),
        WRITER.replace("name: writer", "name: late"),
    )
    .unwrap();
    wait_calls(&double, "the late pod's stage", |c| {
        c.iter().filter(|c| c.method == "NodeStageVolume").count() == 2
    })
    .await;
    node.env
        .wait_for("the late pod pending", |p| {
            p.iter()
                .any(|p| p.file == "z-late.yaml" && p.state == "pending")
        })
        .await;
    std::fs::remove_file(node.manifests.join("z-late.yaml")).unwrap();
    node.env
        .wait_for("the late pod gone from the status", |p| {
            p.iter().all(|p| p.file != "z-late.yaml")
        })
        .await;
    double.state.lock().unwrap().hold_publish = false;
    let calls = wait_calls(&double, "the late pod's unpublish", |c| {
        c.iter().any(|c| c.method == "NodeUnpublishVolume")
    })
    .await;
    let unpublished: Vec<&Call> = calls
        .iter()
        .filter(|c| c.method == "NodeUnpublishVolume")
        .collect();
    assert_eq!(unpublished.len(), 1, "{calls:#?}");
    assert_ne!(unpublished[0].path, first_target);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sandboxes = node
            .cri
            .list_pod_sandbox(noded::cri::api::ListPodSandboxRequest::default())
            .await
            .unwrap()
            .items;
        let names: Vec<String> = sandboxes
            .iter()
            .filter_map(|s| s.metadata.as_ref().map(|m| m.name.clone()))
            .collect();
        if !names.iter().any(|n| n == "late") {
            assert!(names.iter().any(|n| n == "writer"), "{names:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late pod still runs: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The first slow pod was not disturbed.
    assert!(mounted(Path::new(&first_target)));
}

/// A raw device for a container, and the same volume read-only in a second one.
const RAW: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: raw}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  volumes:
    - name: disk
      csi:
        driver: storaged.edgeos
        volumeAttributes: {volume: rawdisk, size: 8Mi, volumeMode: Block}
  containers:
    - name: w
      image: edge.local/writer:1
      args: [/dev/xvdb, "written to a raw device"]
      volumeDevices:
        - {name: disk, devicePath: /dev/xvdb}
"#;

const RAW_READER: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: rawro}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  volumes:
    - name: disk
      csi:
        driver: storaged.edgeos
        readOnly: true
        volumeAttributes: {volume: rawdisk, size: 8Mi, volumeMode: Block}
  containers:
    - name: w
      image: edge.local/writer:1
      args: [/dev/xvdc, "must not land"]
      volumeDevices:
        - {name: disk, devicePath: /dev/xvdc}
"#;

/// A Block volume reaches the container as a device node at `devicePath`: noded
/// publishes it through CSI with a block capability (the double binds a loop device
/// onto the target file), passes the target to containerd as a CRI device, and what
/// the container writes to the device lands in the volume's backing file. Read-only
/// it can be read but not written. Manifests that mix up the two modes are refused
/// naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volumes_are_devices_in_containers() {
    if !Path::new("/dev/loop-control").exists() {
        edge_common::precondition_missing("loop devices (/dev/loop-control)");
        return;
    }
    let node = start_node("noded-block-").await;
    let dir = node.env.dir.clone();
    let double = serve(&dir.join("csi.sock"), &dir.join("double-volumes"));
    let _loops = Loops(double.state.clone());

    std::fs::write(node.manifests.join("raw.yaml"), RAW).unwrap();
    wait_log(&dir.join("logs"), "raw", "wrote /dev/xvdb").await;
    let image = double.root.join("rawdisk.img");
    let data = std::fs::read(&image).unwrap();
    assert!(
        data.starts_with(b"written to a raw device"),
        "{:?}",
        String::from_utf8_lossy(&data[..64])
    );
    let calls = double.calls();
    let methods: Vec<&str> = calls.iter().map(|c| c.method).collect();
    assert_eq!(
        methods,
        ["CreateVolume", "NodeStageVolume", "NodePublishVolume"],
        "{calls:#?}"
    );
    let target = PathBuf::from(&calls[2].path);
    assert!(
        target.ends_with("disk") && !calls[2].read_only,
        "{calls:#?}"
    );
    assert_eq!(
        calls[0].mode,
        volume_capability::Mode::SingleNodeWriter as i32
    );

    std::fs::write(node.manifests.join("rawro.yaml"), RAW_READER).unwrap();
    let log = wait_log(&dir.join("logs"), "rawro", "/dev/xvdc").await;
    assert!(log.contains("write to /dev/xvdc failed"), "{log}");
    assert!(std::fs::read(&image)
        .unwrap()
        .starts_with(b"written to a raw device"));
    assert!(double
        .calls()
        .iter()
        .any(|c| c.method == "NodePublishVolume" && c.read_only));

    // The pod goes: its device's publish is released, the target file with it.
    std::fs::remove_file(node.manifests.join("raw.yaml")).unwrap();
    wait_calls(&double, "the raw pod's unpublish", |c| {
        position(c, "NodeUnpublishVolume", &target.display().to_string()).is_some()
    })
    .await;
    assert!(!mounted(&target));

    // Mixed-up modes and missing volumes are refused naming the field.
    for (file, text, want) in [
        (
            "fs-as-device.yaml",
            WRITER.replace(
                "volumeMounts:\n        - {name: data, mountPath: /data}",
                "volumeDevices:\n        - {name: data, devicePath: /dev/xvdb}",
            ),
            "spec.containers[0].volumeDevices[0].name names volume \"data\", which is not a Block csi volume",
        ),
        (
            "block-as-mount.yaml",
            RAW.replace(
                "volumeDevices:\n        - {name: disk, devicePath: /dev/xvdb}",
                "volumeMounts:\n        - {name: disk, mountPath: /data}",
            ),
            "spec.containers[0].volumeMounts[0].name names volume \"disk\", a Block volume",
        ),
        (
            "no-volume.yaml",
            RAW.replace("{name: disk, devicePath", "{name: nothing, devicePath"),
            "spec.containers[0].volumeDevices[0].name names volume \"nothing\", which spec.volumes does not list",
        ),
    ] {
        assert_ne!(text, RAW);
        assert_ne!(text, WRITER);
        std::fs::write(node.manifests.join(file), text).unwrap();
        let pods = node
            .env
            .wait_for(file, |p| p.iter().any(|p| p.file == file))
            .await;
        let pod = pods.iter().find(|p| p.file == file).unwrap();
        let err = pod.error.as_deref().unwrap_or("");
        assert_eq!(pod.state, "invalid", "{err}");
        assert!(err.contains(&format!("{file}: {want}")), "{err}");
    }
}
