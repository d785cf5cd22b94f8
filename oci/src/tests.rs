use super::*;

fn spec() -> ImageSpec {
    ImageSpec {
        name: "pause:1".into(),
        entrypoint: vec!["/pause".into()],
        cmd: vec![],
        env: vec!["PATH=/".into()],
        files: vec![
            File {
                path: "pause".into(),
                data: b"\x7fELF pretend".to_vec(),
                mode: 0o755,
            },
            File {
                path: "etc/motd".into(),
                data: b"hi\n".to_vec(),
                mode: 0o644,
            },
        ],
    }
}

/// The archive's files as a map, to tamper with and write back.
fn unpack(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
    tar::read(archive)
        .unwrap()
        .into_iter()
        .map(|f| (f.path, f.data.to_vec()))
        .collect()
}

fn pack(files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let entries: Vec<tar::Entry> = files
        .iter()
        .map(|(p, d)| tar::Entry {
            path: p,
            data: d,
            mode: 0o644,
            dir: false,
        })
        .collect();
    tar::write(&entries).unwrap()
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// Replaces the manifest by `edit(manifest)`, stored under its new digest and
/// referenced from index.json, so only the edit itself is wrong.
fn edit_manifest(files: &mut BTreeMap<String, Vec<u8>>, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let old = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest: serde_json::Value = serde_json::from_slice(&files[&blob_path(&old)]).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let new = digest(&bytes);
    files.remove(&blob_path(&old));
    files.insert(blob_path(&new), bytes.clone());
    index["manifests"][0]["digest"] = json!(new);
    index["manifests"][0]["size"] = json!(bytes.len());
    files.insert("index.json".into(), serde_json::to_vec(&index).unwrap());
}

#[test]
fn two_builds_are_byte_identical() {
    let a = write_image(&spec()).unwrap();
    let b = write_image(&spec()).unwrap();
    assert_eq!(a, b);
    // File order in the spec does not matter either.
    let mut reordered = spec();
    reordered.files.reverse();
    assert_eq!(a, write_image(&reordered).unwrap());
    let mut other = spec();
    other.files[0].data.push(0);
    assert_ne!(a, write_image(&other).unwrap());
}

#[test]
fn an_archive_reads_back_with_its_name_config_and_files() {
    let archive = read_archive(&write_image(&spec()).unwrap()).unwrap();
    assert_eq!(archive.images.len(), 1);
    let image = &archive.images[0];
    assert_eq!(image.name.as_deref(), Some("pause:1"));
    assert_eq!(image.manifest.media_type, MEDIA_MANIFEST);
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.layers[0].media_type, MEDIA_LAYER);

    let config: serde_json::Value =
        serde_json::from_slice(archive.blob(&image.config.digest).unwrap()).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["Entrypoint"], json!(["/pause"]));
    assert_eq!(config["config"]["Env"], json!(["PATH=/"]));
    assert_eq!(
        config["rootfs"]["diff_ids"],
        json!([image.layers[0].digest])
    );

    let layer = tar::read(archive.blob(&image.layers[0].digest).unwrap()).unwrap();
    let paths: Vec<&str> = layer.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["etc/motd", "pause"]);
    assert_eq!(layer[1].data, b"\x7fELF pretend");
    // The manifest is served by digest too (the registry needs it).
    assert!(archive.blob(&image.manifest.digest).is_some());
}

#[test]
fn layer_entries_carry_mode_and_no_owner_or_time() {
    let archive = read_archive(&write_image(&spec()).unwrap()).unwrap();
    let layer = archive.blob(&archive.images[0].layers[0].digest).unwrap();
    // Headers in order: etc/ (dir), etc/motd, pause.
    let pause = &layer[3 * 512..4 * 512];
    assert_eq!(&pause[..5], b"pause");
    assert_eq!(&pause[100..107], b"0000755");
    assert_eq!(&pause[108..115], b"0000000");
    assert_eq!(&pause[136..147], b"00000000000");
    assert_eq!(layer[156], b'5', "the first entry is the etc directory");
}

#[test]
fn unclean_paths_are_refused() {
    for bad in ["../x", "a//b", "", "a/../b"] {
        let mut s = spec();
        s.files[0].path = bad.into();
        assert!(
            matches!(write_image(&s), Err(Error::Invalid { .. })),
            "{bad:?} was accepted"
        );
    }
}

#[test]
fn missing_index_or_layout_is_named() {
    let good = unpack(&write_image(&spec()).unwrap());
    for name in ["index.json", "oci-layout"] {
        let mut files = good.clone();
        files.remove(name);
        assert_eq!(
            read_archive(&pack(&files)).unwrap_err(),
            Error::Missing(name.into())
        );
    }
}

#[test]
fn a_tampered_blob_is_named_by_its_digest() {
    let archive = write_image(&spec()).unwrap();
    let layer_digest = read_archive(&archive).unwrap().images[0].layers[0]
        .digest
        .clone();
    let mut files = unpack(&archive);
    let layer = files.get_mut(&blob_path(&layer_digest)).unwrap();
    let last = layer.len() - 1030; // inside the file data, before the end blocks
    layer[last] ^= 1;
    match read_archive(&pack(&files)).unwrap_err() {
        Error::BadDigest { blob, actual } => {
            assert_eq!(blob, layer_digest);
            assert_ne!(actual, layer_digest);
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn a_missing_layer_blob_is_named() {
    let archive = write_image(&spec()).unwrap();
    let layer_digest = read_archive(&archive).unwrap().images[0].layers[0]
        .digest
        .clone();
    let mut files = unpack(&archive);
    files.remove(&blob_path(&layer_digest));
    let err = read_archive(&pack(&files)).unwrap_err();
    assert!(
        matches!(&err, Error::Missing(m) if m.contains(&layer_digest)),
        "{err}"
    );
}

#[test]
fn a_wrong_size_in_a_descriptor_is_reported() {
    let mut files = unpack(&write_image(&spec()).unwrap());
    edit_manifest(&mut files, |m| m["layers"][0]["size"] = json!(1));
    let err = read_archive(&pack(&files)).unwrap_err();
    assert!(matches!(err, Error::BadSize { expected: 1, .. }), "{err}");
}

#[test]
fn an_unsupported_layer_media_type_is_named() {
    let mut files = unpack(&write_image(&spec()).unwrap());
    let foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
    edit_manifest(&mut files, |m| m["layers"][0]["mediaType"] = json!(foreign));
    let err = read_archive(&pack(&files)).unwrap_err();
    assert!(
        matches!(&err, Error::Unsupported { media_type, .. } if media_type == foreign),
        "{err}"
    );
}

#[test]
fn a_diff_id_that_is_not_the_layer_is_reported() {
    let mut files = unpack(&write_image(&spec()).unwrap());
    // Point the manifest at a config whose diff_id is wrong.
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [digest(b"other")] },
    }))
    .unwrap();
    let cd = digest(&config);
    files.insert(blob_path(&cd), config.clone());
    edit_manifest(&mut files, |m| {
        m["config"]["digest"] = json!(cd);
        m["config"]["size"] = json!(config.len());
    });
    let err = read_archive(&pack(&files)).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { message, .. } if message.contains("diff_id")),
        "{err}"
    );
}

#[test]
fn an_index_that_is_not_json_is_named() {
    let mut files = unpack(&write_image(&spec()).unwrap());
    files.insert("index.json".into(), b"{not json".to_vec());
    let err = read_archive(&pack(&files)).unwrap_err();
    assert!(
        matches!(&err, Error::Invalid { file, .. } if file == "index.json"),
        "{err}"
    );
}

#[test]
fn truncated_or_garbage_archives_are_errors_not_panics() {
    let archive = write_image(&spec()).unwrap();
    let err = read_archive(&archive[..archive.len() / 2]).unwrap_err();
    assert!(matches!(err, Error::Truncated(_)), "{err}");
    // Any cut before the end-of-archive blocks loses content.
    for cut in (0..archive.len() - 1024).step_by(97) {
        assert!(read_archive(&archive[..cut]).is_err());
    }
    let mut flipped = archive.clone();
    for i in (0..flipped.len()).step_by(251) {
        flipped[i] ^= 0x5a;
        let _ = read_archive(&flipped);
        flipped[i] ^= 0x5a;
    }
    assert!(read_archive(&[0xffu8; 4096]).is_err());
}
