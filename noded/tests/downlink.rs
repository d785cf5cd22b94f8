//! Manifests the core delivers: noded reconciles fabricd's downlink `pods` directory
//! beside its static manifests. A manifest written there (atomically, as fabricd does)
//! starts a pod and removing it stops the pod; a pod defined in both places is refused
//! with both files named while the others run, and runs from the delivered file once
//! the static one goes. The site's provisioned directory is reconciled the same way.

use std::path::Path;
use std::time::{Duration, Instant};

use noded::cri::api::*;
use noded::pods::PodReport;

mod common;
use common::*;

/// The common host-network pod, its container saying its name.
fn manifest(name: &str) -> String {
    format!(
        "{}      args: [\"{name} here\"]\n",
        common::manifest(name, "edge.local/hello:1")
    )
}

/// As fabricd writes downlink items: a dot-named temp file, then a rename.
fn deliver(dir: &Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(format!(".{file}.partial"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

fn running(pods: &[PodReport], file: &str, name: &str) -> bool {
    pods.iter().any(|p| {
        p.file == file && p.name == name && p.containers.iter().all(|c| c.state == "running")
    })
}

async fn sandboxes(cri: &noded::cri::Client) -> Vec<String> {
    let mut names: Vec<String> = cri
        .list_pod_sandbox(ListPodSandboxRequest::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.state == PodSandboxState::SandboxReady as i32)
        .filter_map(|s| s.metadata.map(|m| m.name))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_manifests_start_and_stop_pods_beside_static_ones() {
    let started = Instant::now();
    // fabricd creates the directory when it writes its first item.
    let node = Node::start(
        "noded-downlink-",
        "downlink_manifests_dir = \"{dir}/downlink/pods\"\n\
         site_manifests_dir = \"{dir}/provision/pods\"",
    )
    .await;
    let env = &node.env;
    let downlink = env.dir.join("downlink/pods");
    std::fs::write(node.manifests.join("a.yaml"), manifest("alpha")).unwrap();
    env.wait_for("alpha running", |p| running(p, "a.yaml", "alpha"))
        .await;
    assert!(
        !env.noded_log().contains("downlink/pods"),
        "a missing downlink directory is not an error: {}",
        env.noded_log()
    );

    deliver(&downlink, "beta.yaml", &manifest("beta"));
    env.wait_for("beta running", |p| running(p, "downlink/beta.yaml", "beta"))
        .await;

    // The site's provisioned pods are a third source, known as `site/<file>`.
    deliver(
        &env.dir.join("provision/pods"),
        "g.yaml",
        &manifest("gamma"),
    );
    env.wait_for("gamma running", |p| running(p, "site/g.yaml", "gamma"))
        .await;
    std::fs::remove_file(env.dir.join("provision/pods/g.yaml")).unwrap();
    env.wait_for("gamma gone", |p| !p.iter().any(|p| p.name == "gamma"))
        .await;

    // The same pod from the core: refused, naming both files; the others run on.
    deliver(&downlink, "alpha.yaml", &manifest("alpha"));
    let pods = env
        .wait_for("duplicate refused", |p| {
            p.iter()
                .any(|p| p.file == "downlink/alpha.yaml" && p.state == "invalid")
        })
        .await;
    let dup = pods
        .iter()
        .find(|p| p.file == "downlink/alpha.yaml")
        .unwrap();
    assert_eq!(
        dup.error.as_deref(),
        Some(
            format!(
                "{}: metadata.name: pod default/alpha is already defined by {}",
                downlink.join("alpha.yaml").display(),
                node.manifests.join("a.yaml").display()
            )
            .as_str()
        )
    );
    assert!(running(&pods, "a.yaml", "alpha") && running(&pods, "downlink/beta.yaml", "beta"));
    assert_eq!(sandboxes(&node.cri).await, ["alpha", "beta"]);

    // The static one goes: the delivered one takes over.
    std::fs::remove_file(node.manifests.join("a.yaml")).unwrap();
    env.wait_for("alpha from the downlink", |p| {
        running(p, "downlink/alpha.yaml", "alpha") && !p.iter().any(|p| p.file == "a.yaml")
    })
    .await;

    // Removing a delivered manifest stops its pod.
    std::fs::remove_file(downlink.join("beta.yaml")).unwrap();
    env.wait_for("beta gone", |p| !p.iter().any(|p| p.name == "beta"))
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while sandboxes(&node.cri).await != ["alpha"] {
        assert!(
            Instant::now() < deadline,
            "beta's sandbox not removed: {:?}",
            sandboxes(&node.cri).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("took {:?}", started.elapsed());
}
