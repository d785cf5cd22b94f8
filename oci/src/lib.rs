//! OCI image-layout archives: writing a one-layer image deterministically, and reading
//! an archive back with every blob verified against its digest and size.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

pub mod tar;

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The index annotation naming an image in a layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("malformed tar: {0}")]
    Tar(String),
    #[error("truncated archive: {0}")]
    Truncated(String),
    #[error("archive has no {0}")]
    Missing(String),
    #[error("bad digest of blob {blob}: content hashes to {actual}")]
    BadDigest { blob: String, actual: String },
    #[error("blob {blob} is {actual} bytes, its descriptor says {expected}")]
    BadSize {
        blob: String,
        expected: u64,
        actual: u64,
    },
    #[error("unsupported media type {media_type} in {place}")]
    Unsupported { media_type: String, place: String },
    #[error("invalid {file}: {message}")]
    Invalid { file: String, message: String },
}

/// A file to place in the image's layer.
#[derive(Clone, Debug)]
pub struct File {
    /// Path inside the image, relative (`bin/pause`); parent directories are added.
    pub path: String,
    pub data: Vec<u8>,
    /// Permission bits (`0o755`).
    pub mode: u32,
}

/// What to build: one layer of `files` and the process the image runs.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    /// The index's `org.opencontainers.image.ref.name` (`pause:1`).
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub files: Vec<File>,
}

/// `sha256:<hex>` of `data`.
pub fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn layer_tar(files: &[File]) -> Result<Vec<u8>, Error> {
    let mut files: Vec<&File> = files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut dirs = std::collections::BTreeSet::new();
    for f in &files {
        let path = f.path.trim_start_matches('/');
        if path.is_empty() || path.split('/').any(|c| c.is_empty() || c == "..") {
            return Err(Error::Invalid {
                file: "image spec".into(),
                message: format!("file path {:?} is not a clean relative path", f.path),
            });
        }
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            dirs.insert(&path[..at + i]);
            at += i + 1;
        }
    }
    // Directories first (sorted, so parents precede children), then files sorted:
    // the order is a function of the input set alone.
    let mut entries: Vec<tar::Entry> = dirs
        .iter()
        .map(|d| tar::Entry {
            path: d,
            data: b"",
            mode: 0o755,
            dir: true,
        })
        .collect();
    for f in &files {
        entries.push(tar::Entry {
            path: f.path.trim_start_matches('/'),
            data: &f.data,
            mode: f.mode,
            dir: false,
        });
    }
    tar::write(&entries)
}

fn to_json(v: &serde_json::Value) -> Vec<u8> {
    // Keys come out sorted (serde_json's map is a BTreeMap), so the bytes depend
    // only on the values.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Builds the image-layout archive for `spec`. The same spec always gives the same bytes.
pub fn write_image(spec: &ImageSpec) -> Result<Vec<u8>, Error> {
    let layer = layer_tar(&spec.files)?;
    let layer_digest = digest(&layer);
    let config = to_json(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": spec.env,
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }));
    let config_digest = digest(&config);
    let manifest = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len() }],
    }));
    let manifest_digest = digest(&manifest);
    let index = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": { REF_NAME: spec.name },
            "platform": { "architecture": "amd64", "os": "linux" },
        }],
    }));
    let layout = to_json(&json!({ "imageLayoutVersion": "1.0.0" }));

    let mut blobs = [
        (config_digest, config),
        (layer_digest, layer),
        (manifest_digest, manifest),
    ];
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    let paths: Vec<String> = blobs
        .iter()
        .map(|(d, _)| format!("blobs/sha256/{}", d.trim_start_matches("sha256:")))
        .collect();
    let mut entries = vec![
        tar::Entry {
            path: "blobs",
            data: b"",
            mode: 0o755,
            dir: true,
        },
        tar::Entry {
            path: "blobs/sha256",
            data: b"",
            mode: 0o755,
            dir: true,
        },
    ];
    for ((_, data), path) in blobs.iter().zip(&paths) {
        entries.push(tar::Entry {
            path,
            data,
            mode: 0o644,
            dir: false,
        });
    }
    entries.push(tar::Entry {
        path: "index.json",
        data: &index,
        mode: 0o644,
        dir: false,
    });
    entries.push(tar::Entry {
        path: "oci-layout",
        data: &layout,
        mode: 0o644,
        dir: false,
    });
    tar::write(&entries)
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Layout {
    image_layout_version: String,
}

/// One image of an archive: its manifest, config and layers, all verified.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// The index's ref-name annotation, if it has one.
    pub name: Option<String>,
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A verified archive: its images and every blob they reference, by digest.
#[derive(Clone, Debug)]
pub struct Archive {
    pub images: Vec<Image>,
    pub blobs: BTreeMap<String, Vec<u8>>,
}

impl Archive {
    /// The blob with `digest` (`sha256:<hex>`), if the archive holds it.
    pub fn blob(&self, digest: &str) -> Option<&[u8]> {
        self.blobs.get(digest).map(Vec::as_slice)
    }
}

fn parse<T: serde::de::DeserializeOwned>(file: &str, data: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(data).map_err(|e| Error::Invalid {
        file: file.to_string(),
        message: e.to_string(),
    })
}

fn check_digest_syntax(d: &Descriptor, place: &str) -> Result<String, Error> {
    let hex = d
        .digest
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::Invalid {
            file: place.to_string(),
            message: format!("digest {:?} is not sha256", d.digest),
        })?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Error::Invalid {
            file: place.to_string(),
            message: format!("digest {:?} is not 64 lowercase hex digits", d.digest),
        });
    }
    Ok(hex.to_string())
}

/// Fetches the blob `d` points at, checking its size against the descriptor.
fn referenced<'a>(
    blobs: &BTreeMap<String, &'a [u8]>,
    d: &Descriptor,
    place: &str,
) -> Result<&'a [u8], Error> {
    check_digest_syntax(d, place)?;
    let data = blobs
        .get(&d.digest)
        .copied()
        .ok_or_else(|| Error::Missing(format!("blob {} (referenced by {place})", d.digest)))?;
    if data.len() as u64 != d.size {
        return Err(Error::BadSize {
            blob: d.digest.clone(),
            expected: d.size,
            actual: data.len() as u64,
        });
    }
    Ok(data)
}

/// Reads and verifies an image-layout archive.
pub fn read_archive(buf: &[u8]) -> Result<Archive, Error> {
    let files = tar::read(buf)?;
    let mut layout = None;
    let mut index = None;
    let mut blobs: BTreeMap<String, &[u8]> = BTreeMap::new();
    for f in &files {
        match f.path.as_str() {
            "oci-layout" => layout = Some(f.data),
            "index.json" => index = Some(f.data),
            p => {
                if let Some(hex) = p.strip_prefix("blobs/sha256/") {
                    let actual = digest(f.data);
                    let named = format!("sha256:{hex}");
                    if actual != named {
                        return Err(Error::BadDigest {
                            blob: named,
                            actual,
                        });
                    }
                    blobs.insert(named, f.data);
                }
            }
        }
    }
    let layout: Layout = parse(
        "oci-layout",
        layout.ok_or(Error::Missing("oci-layout".into()))?,
    )?;
    if layout.image_layout_version != "1.0.0" {
        return Err(Error::Invalid {
            file: "oci-layout".into(),
            message: format!(
                "imageLayoutVersion {:?} is not 1.0.0",
                layout.image_layout_version
            ),
        });
    }
    let index: Index = parse(
        "index.json",
        index.ok_or(Error::Missing("index.json".into()))?,
    )?;
    if index.schema_version != 2 {
        return Err(Error::Invalid {
            file: "index.json".into(),
            message: format!("schemaVersion {} is not 2", index.schema_version),
        });
    }
    if index.manifests.is_empty() {
        return Err(Error::Invalid {
            file: "index.json".into(),
            message: "it lists no manifests".into(),
        });
    }

    let mut images = Vec::new();
    let mut kept = BTreeMap::new();
    for m in index.manifests {
        if m.media_type != MEDIA_MANIFEST {
            return Err(Error::Unsupported {
                media_type: m.media_type,
                place: "index.json".into(),
            });
        }
        let place = format!("manifest {}", m.digest);
        let data = referenced(&blobs, &m, "index.json")?;
        let manifest: Manifest = parse(&place, data)?;
        kept.insert(m.digest.clone(), data);
        if manifest.schema_version != 2 {
            return Err(Error::Invalid {
                file: place,
                message: format!("schemaVersion {} is not 2", manifest.schema_version),
            });
        }
        if manifest.config.media_type != MEDIA_CONFIG {
            return Err(Error::Unsupported {
                media_type: manifest.config.media_type,
                place,
            });
        }
        let config_data = referenced(&blobs, &manifest.config, &place)?;
        let config: Config = parse(&format!("config {}", manifest.config.digest), config_data)?;
        kept.insert(manifest.config.digest.clone(), config_data);
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(Error::Invalid {
                file: format!("config {}", manifest.config.digest),
                message: format!(
                    "{} diff_ids for {} layers",
                    config.rootfs.diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            let media = layer.media_type.as_str();
            if ![MEDIA_LAYER, MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD].contains(&media) {
                return Err(Error::Unsupported {
                    media_type: layer.media_type.clone(),
                    place: place.clone(),
                });
            }
            let data = referenced(&blobs, layer, &place)?;
            // An uncompressed layer is its own diff; compressed ones would need
            // decompressing to check, which the runtime does when it unpacks.
            if media == MEDIA_LAYER && diff_id != &layer.digest {
                return Err(Error::Invalid {
                    file: format!("config {}", manifest.config.digest),
                    message: format!(
                        "diff_id {diff_id} is not the digest of layer {}",
                        layer.digest
                    ),
                });
            }
            kept.insert(layer.digest.clone(), data);
        }
        images.push(Image {
            name: m.annotations.get(REF_NAME).cloned(),
            manifest: m,
            config: manifest.config,
            layers: manifest.layers,
        });
    }
    Ok(Archive {
        images,
        blobs: kept.into_iter().map(|(k, v)| (k, v.to_vec())).collect(),
    })
}

#[cfg(test)]
mod tests;
