use super::*;
use tokio::io::AsyncReadExt;

fn image(name: &str, payload: &[u8]) -> Vec<u8> {
    edge_oci::write_image(&edge_oci::ImageSpec {
        name: name.into(),
        entrypoint: vec!["/pause".into()],
        files: vec![edge_oci::File {
            path: "pause".into(),
            data: payload.to_vec(),
            mode: 0o755,
        }],
        ..Default::default()
    })
    .unwrap()
}

struct Reply {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: edge.local\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

async fn serve(archives: &[(&str, Vec<u8>)]) -> (SocketAddr, edge_oci::Archive) {
    let mut registry = Registry::default();
    let mut first = None;
    for (source, bytes) in archives {
        let archive = edge_oci::read_archive(bytes).unwrap();
        first.get_or_insert_with(|| archive.clone());
        registry.add(source, archive).unwrap();
    }
    let (addr, _task) = registry
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    (addr, first.unwrap())
}

fn error_code(r: &Reply) -> String {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["errors"][0]["code"].as_str().unwrap().to_string()
}

#[test]
fn ref_names_split_into_repository_and_tag() {
    let s = |n| split_ref(n).map(|(r, t)| format!("{r} {t}"));
    assert_eq!(s("pause:1").as_deref(), Some("pause 1"));
    assert_eq!(s("edge.local/pause:1").as_deref(), Some("pause 1"));
    assert_eq!(
        s("localhost:5000/lib/sensor").as_deref(),
        Some("lib/sensor latest")
    );
    assert_eq!(s("lib/sensor:2").as_deref(), Some("lib/sensor 2"));
    assert_eq!(s(""), None);
    assert_eq!(s("pause:"), None);
}

#[tokio::test]
async fn the_version_check_answers() {
    let (addr, _) = serve(&[("a", image("pause:1", b"p"))]).await;
    let r = request(addr, "GET", "/v2/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["docker-distribution-api-version"], "registry/2.0");
}

#[tokio::test]
async fn a_manifest_is_served_by_tag_and_by_digest_with_its_type_and_digest() {
    let (addr, archive) = serve(&[("a", image("pause:1", b"p"))]).await;
    let m = &archive.images[0].manifest;
    let head = request(addr, "HEAD", "/v2/pause/manifests/1").await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-type"], edge_oci::MEDIA_MANIFEST);
    assert_eq!(head.headers["docker-content-digest"], m.digest);
    assert_eq!(head.headers["content-length"], m.size.to_string());
    assert!(head.body.is_empty());

    let get = request(addr, "GET", &format!("/v2/pause/manifests/{}", m.digest)).await;
    assert_eq!(get.status, 200);
    assert_eq!(edge_oci::digest(&get.body), m.digest);
}

#[tokio::test]
async fn blobs_are_served_byte_exact() {
    let (addr, archive) = serve(&[("a", image("pause:1", b"p"))]).await;
    let layer = &archive.images[0].layers[0].digest;
    let r = request(addr, "GET", &format!("/v2/pause/blobs/{layer}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(&edge_oci::digest(&r.body), layer);
    assert_eq!(&r.headers["docker-content-digest"], layer);
    let head = request(addr, "HEAD", &format!("/v2/pause/blobs/{layer}")).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-length"], r.body.len().to_string());
}

#[tokio::test]
async fn unknown_names_tags_and_blobs_are_404_with_distribution_codes() {
    let (addr, archive) =
        serve(&[("a", image("pause:1", b"p")), ("b", image("other:1", b"o"))]).await;
    let r = request(addr, "GET", "/v2/nope/manifests/1").await;
    assert_eq!((r.status, error_code(&r).as_str()), (404, "NAME_UNKNOWN"));
    let r = request(addr, "GET", "/v2/pause/manifests/2").await;
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    let missing = edge_oci::digest(b"nothing");
    let r = request(addr, "GET", &format!("/v2/pause/blobs/{missing}")).await;
    assert_eq!((r.status, error_code(&r).as_str()), (404, "BLOB_UNKNOWN"));
    // A blob of one repository is not served under another's name.
    let layer = &archive.images[0].layers[0].digest;
    let r = request(addr, "GET", &format!("/v2/other/blobs/{layer}")).await;
    assert_eq!(r.status, 404);
    let r = request(addr, "DELETE", "/v2/pause/manifests/1").await;
    assert_eq!(r.status, 405);
}

#[test]
fn a_tampered_archive_in_the_directory_is_rejected_by_name_and_the_rest_served() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.tar"), image("pause:1", b"p")).unwrap();
    let mut bad = image("bad:1", b"payload that will be altered");
    let at = bad.windows(8).position(|w| w == b"payload ").unwrap();
    bad[at] = b'P';
    std::fs::write(dir.path().join("bad.tar"), bad).unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    let (registry, rejected) = Registry::load_dir(dir.path()).unwrap();
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].path.ends_with("bad.tar"));
    assert!(
        rejected[0].reason.to_string().contains("bad digest"),
        "{}",
        rejected[0].reason
    );
    assert!(registry.repos.contains_key("pause"));
    assert!(!registry.repos.contains_key("bad"));
}

#[tokio::test]
async fn an_image_directorys_blobs_are_served_from_their_files_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    // A layer larger than one read of the file, so that it is served in several.
    let payload: Vec<u8> = (0..FILE_CHUNK * 2 + 12_345)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let bytes = image("model:2", &payload);
    std::fs::write(dir.path().join("model.tar"), &bytes).unwrap();
    let archive = edge_oci::read_archive(&bytes).unwrap();
    let (registry, rejected) = Registry::load_dir(dir.path()).unwrap();
    assert!(rejected.is_empty());
    assert!(registry
        .blobs
        .values()
        .all(|b| matches!(b, Body::File { .. })));
    let (addr, _task) = registry
        .spawn("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let image = &archive.images[0];
    assert!(archive.blobs[&image.layers[0].digest].len() > FILE_CHUNK * 2);
    for digest in image
        .layers
        .iter()
        .map(|l| &l.digest)
        .chain([&image.config.digest])
    {
        let r = request(addr, "GET", &format!("/v2/model/blobs/{digest}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(&edge_oci::digest(&r.body), digest);
        assert_eq!(r.body, archive.blobs[digest]);
    }
    let m = request(addr, "GET", "/v2/model/manifests/2").await;
    assert_eq!(m.status, 200);
    assert_eq!(edge_oci::digest(&m.body), image.manifest.digest);
}
