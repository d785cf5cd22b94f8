//! The image allowlist through the real daemon: with no valid list nothing runs; a pod
//! whose image digest is on the image's signed list runs while one whose image is not
//! is refused with a status and a log line naming the image, its digest and the list;
//! a tampered list from the core is left out and named; a valid newer one from the core
//! lets the refused pod run.

use std::path::Path;
use std::time::Instant;

use noded::cri::api::*;
use noded::pods::PodReport;
use ring::signature::KeyPair;

mod common;
use common::*;

fn write_atomic(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn digest(cri: &noded::cri::Client, image: &str) -> String {
    let spec = || {
        Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        })
    };
    // noded's registry comes up a moment after noded starts.
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while let Err(e) = cri
        .pull_image(PullImageRequest {
            image: spec(),
            ..Default::default()
        })
        .await
    {
        assert!(Instant::now() < deadline, "{e}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let status = cri
        .image_status(ImageStatusRequest {
            image: spec(),
            verbose: false,
        })
        .await
        .unwrap();
    let repo = &status.image.unwrap().repo_digests[0];
    repo.rsplit_once('@').unwrap().1.to_string()
}

fn pod<'a>(pods: &'a [PodReport], name: &str) -> Option<&'a PodReport> {
    pods.iter().find(|p| p.name == name)
}

fn running(pods: &[PodReport], name: &str) -> bool {
    pod(pods, name).is_some_and(|p| p.state == "running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_images_run() {
    let started = Instant::now();
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let key_hex: String = kp
        .public_key()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let node = Node::start_with(
        "noded-allowlist-",
        "image_allowlist = \"{dir}/image.allowlist\"\n\
         downlink_image_allowlist = \"{dir}/downlink/config/image-allowlist\"\n\
         image_allowlist_public_key = \"{dir}/allowlist.key\"",
        |dir| std::fs::write(dir.join("allowlist.key"), &key_hex).unwrap(),
    )
    .await;
    let env = &node.env;
    let (image_list, core_list) = (
        env.dir.join("image.allowlist"),
        env.dir.join("downlink/config/image-allowlist"),
    );
    let hello = digest(&node.cri, "edge.local/hello:1").await;
    let other = digest(&node.cri, "edge.local/other:1").await;
    assert_ne!(hello, other);

    // No list yet: nothing runs, and the pod says why.
    std::fs::write(
        node.manifests.join("ok.yaml"),
        manifest("ok", "edge.local/hello:1"),
    )
    .unwrap();
    let pods = env
        .wait_for("ok refused", |p| {
            pod(p, "ok").is_some_and(|p| p.error.is_some())
        })
        .await;
    assert_eq!(
        pod(&pods, "ok").unwrap().error.as_deref(),
        Some(
            format!(
                "image edge.local/hello:1 ({hello}) is not allowed: there is no valid image allowlist"
            )
            .as_str()
        )
    );

    write_atomic(&image_list, &signed(&kp, 1, &[&hello]));
    std::fs::write(
        node.manifests.join("bad.yaml"),
        manifest("bad", "edge.local/other:1"),
    )
    .unwrap();
    let pods = env
        .wait_for("ok running, bad refused", |p| {
            running(p, "ok") && pod(p, "bad").is_some_and(|p| p.error.is_some())
        })
        .await;
    let why = format!(
        "image edge.local/other:1 ({other}) is not allowed by the image allowlist ({} version 1)",
        image_list.display()
    );
    let bad = pod(&pods, "bad").unwrap();
    assert_eq!(
        (bad.state.as_str(), bad.error.as_deref()),
        ("pending", Some(why.as_str()))
    );
    assert!(
        env.noded_log()
            .lines()
            .any(|l| l.contains("pod failed to start") && l.contains(&why)),
        "{}",
        env.noded_log()
    );

    // A tampered list from the core is left out, named; the image's list still holds.
    let mut tampered = signed(&kp, 2, &[&hello, &other]);
    let n = tampered.len();
    tampered[n - 5] ^= 1;
    write_atomic(&core_list, &tampered);
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    let named = format!(
        "image allowlist left out: {}: signature does not verify",
        core_list.display()
    );
    while !env.noded_log().contains(&named) {
        assert!(Instant::now() < deadline, "{}", env.noded_log());
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let pods = noded::control::pods(&env.socket).await.unwrap();
    assert!(!running(&pods, "bad"));

    // A valid newer list from the core allows the other image.
    write_atomic(&core_list, &signed(&kp, 2, &[&hello, &other]));
    env.wait_for("bad running", |p| running(p, "bad") && running(p, "ok"))
        .await;

    // The core revokes the other image's digest: the pod running it is stopped and says
    // which list refused it; the allowed one runs on untouched.
    let ok_before = pod(&noded::control::pods(&env.socket).await.unwrap(), "ok")
        .unwrap()
        .containers[0]
        .restarts;
    write_atomic(&core_list, &signed(&kp, 3, &[&hello]));
    let pods = env
        .wait_for("bad stopped", |p| {
            pod(p, "bad").is_some_and(|p| p.state != "running" && p.error.is_some())
        })
        .await;
    let why = format!(
        "stopped: image edge.local/other:1 ({other}) is not allowed by the image allowlist ({} version 3)",
        core_list.display()
    );
    assert_eq!(
        pod(&pods, "bad").unwrap().error.as_deref(),
        Some(why.as_str())
    );
    assert!(running(&pods, "ok"), "{pods:?}");
    assert_eq!(pod(&pods, "ok").unwrap().containers[0].restarts, ok_before);
    eprintln!("took {:?}", started.elapsed());
}
