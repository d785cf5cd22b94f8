//! A site's registry mirror, with the real containerd configured as the image ships it:
//! CRI's `config_path` is the image's own directory, then the site provisioning
//! bundle's `registry/`. A pod of an image only a mirror has fails naming the image
//! until the site's `registry/<host>/hosts.toml` names the mirror; then it runs, pulled
//! from there (the mirror sees the connections), and its digest must still be on the
//! image allowlist. A site entry for `edge.local` does not take it from noded's
//! registry.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use noded::pods::PodReport;
use noded::registry::Registry;
use ring::signature::KeyPair;
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::*;

const MIRRORED: &str = "registry.site.example/app:1";
const MIRROR_LINE: &str = "served by the site mirror";

/// The image's `config_path`, with its directories moved under `dir`:
/// `/etc/containerd/certs.d` to `<dir>/certs.d` (where the harness writes edge.local's
/// hosts.toml) and `/var/lib/edge/provision` to `<dir>/provision`.
fn shipped_config_path(dir: &Path) -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/overlay/etc/containerd/config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("config_path = "))
        .unwrap_or_else(|| panic!("no config_path in {}", path.display()))
        .trim_matches('"');
    let d = dir.display();
    let mapped = value
        .replace("/etc/containerd/certs.d", &format!("{d}/certs.d"))
        .replace("/var/lib/edge/provision", &format!("{d}/provision"));
    assert_eq!(
        mapped.split(':').count(),
        2,
        "the image's config_path should name its own directory and the site's: {value}"
    );
    mapped
}

/// What the site bundle's `registry/<host>/hosts.toml` holds for a mirror.
fn hosts_toml(mirror_port: u16) -> String {
    format!(
        "server = \"http://127.0.0.1:{mirror_port}\"\n\n\
         [host.\"http://127.0.0.1:{mirror_port}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// Forwards connections on a loopback port to `to`, counting them: the registry has
/// no hook, and a connection is what shows containerd went to the mirror.
async fn counting_proxy(to: std::net::SocketAddr) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (port, count)
}

fn pod<'a>(pods: &'a [PodReport], name: &str) -> Option<&'a PodReport> {
    pods.iter().find(|p| p.name == name)
}

fn running(pods: &[PodReport], name: &str) -> bool {
    pod(pods, name).is_some_and(|p| p.state == "running")
}

fn manifest_digest(archive: &[u8]) -> String {
    edge_oci::read_archive(archive).unwrap().images[0]
        .manifest
        .digest
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_go_to_the_mirror_the_site_configures() {
    let started = Instant::now();
    ensure_containerd();
    let tmp = tempfile::Builder::new()
        .prefix("noded-mirror-")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path().to_path_buf();

    // noded's registry (edge.local) has pause and hello; only the mirror has app.
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let pause = build_static("pause", "src/bin/pause.rs", &dir);
    let hello = build_static("hello", "tests/programs/hello.rs", &dir);
    let hello_tar = archive("hello:1", "hello", hello.clone(), &[]);
    std::fs::write(
        images.join("pause.tar"),
        archive("pause:1", "pause", pause, &[]),
    )
    .unwrap();
    std::fs::write(images.join("hello.tar"), &hello_tar).unwrap();
    let app_tar = archive("app:1", "hello", hello.clone(), &[MIRROR_LINE]);
    // Another image at the mirror, left off the allowlist.
    let unlisted_tar = archive("unlisted:1", "hello", hello, &["not on the list"]);
    let mut mirror = Registry::default();
    mirror
        .add("app", edge_oci::read_archive(&app_tar).unwrap())
        .unwrap();
    mirror
        .add("unlisted", edge_oci::read_archive(&unlisted_tar).unwrap())
        .unwrap();
    let (mirror_addr, _mirror_task) = mirror.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (mirror_port, mirror_connections) = counting_proxy(mirror_addr).await;

    // The site's bundle tries to send edge.local to the mirror too; the image's own
    // entry comes first in config_path and must keep it at noded's registry (the
    // mirror has no pause or hello: a pull there would fail).
    let site = dir.join("provision/registry");
    std::fs::create_dir_all(site.join("edge.local")).unwrap();
    std::fs::write(site.join("edge.local/hosts.toml"), hosts_toml(mirror_port)).unwrap();

    let port = free_port();
    let config_path = shipped_config_path(&dir);
    let _containerd = start_containerd_with_config_path(&dir, port, &config_path);
    let _cri = connect(&dir.join("containerd.sock"), &dir).await;

    // The allowlist in force names both images the pods use, by manifest digest.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let key_hex: String = kp
        .public_key()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(dir.join("allowlist.key"), key_hex).unwrap();
    let (hello_digest, app_digest) = (manifest_digest(&hello_tar), manifest_digest(&app_tar));
    std::fs::write(
        dir.join("image.allowlist"),
        signed(&kp, 1, &[&hello_digest, &app_digest]),
    )
    .unwrap();

    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let config = dir.join("noded.toml");
    let d = dir.display();
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
             image_allowlist = \"{d}/image.allowlist\"\n\
             image_allowlist_public_key = \"{d}/allowlist.key\"\n"
        ),
    )
    .unwrap();
    let env = Env {
        dir: dir.clone(),
        socket: dir.join("run/noded.sock"),
        noded_log: dir.join("noded.log"),
    };
    let _noded = start_noded(&config, &env.noded_log);

    // No mirror for the site's registry yet: the pod fails naming its image (there is
    // no such host to fall back to), and the local pod runs from noded's registry.
    std::fs::write(
        manifests.join("local.yaml"),
        manifest("local", "edge.local/hello:1"),
    )
    .unwrap();
    std::fs::write(manifests.join("app.yaml"), manifest("app", MIRRORED)).unwrap();
    let pods = env
        .wait_for("local running, app failing", |p| {
            running(p, "local") && pod(p, "app").is_some_and(|p| p.error.is_some())
        })
        .await;
    let app = pod(&pods, "app").unwrap();
    let error = app.error.as_deref().unwrap();
    eprintln!("without a mirror: {error}");
    assert_eq!(app.state, "pending", "{app:?}");
    assert!(error.contains(&format!("image {MIRRORED}")), "{error}");
    assert_eq!(
        mirror_connections.load(Ordering::SeqCst),
        0,
        "edge.local went to the site's mirror"
    );

    // The site's bundle names the mirror: the next attempt pulls from it and runs.
    let host_dir = site.join("registry.site.example");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("hosts.toml"), hosts_toml(mirror_port)).unwrap();
    env.wait_for("app running", |p| running(p, "app") && running(p, "local"))
        .await;
    assert!(mirror_connections.load(Ordering::SeqCst) > 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = env.cli(&["logs", "app"]);
        if ok && out.contains(MIRROR_LINE) {
            break;
        }
        assert!(Instant::now() < deadline, "app's log: {out} {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The allowlist holds for mirrored images as for the image's own.
    let unlisted = "registry.site.example/unlisted:1";
    std::fs::write(
        manifests.join("unlisted.yaml"),
        manifest("unlisted", unlisted),
    )
    .unwrap();
    let pods = env
        .wait_for("unlisted refused", |p| {
            pod(p, "unlisted").is_some_and(|p| p.error.is_some())
        })
        .await;
    let why = format!(
        "image {unlisted} ({}) is not allowed by the image allowlist ({} version 1)",
        manifest_digest(&unlisted_tar),
        dir.join("image.allowlist").display()
    );
    assert_eq!(
        pod(&pods, "unlisted").unwrap().error.as_deref(),
        Some(why.as_str())
    );
    eprintln!(
        "mirror connections: {}; took {:?}",
        mirror_connections.load(Ordering::SeqCst),
        started.elapsed()
    );
}
