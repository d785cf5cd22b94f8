//! The OS update bundle (docs/update.md): one POSIX ustar archive per build, written by
//! `cargo xtask image`, holding a manifest signed with the image's update key and the
//! parts a box installs into its inactive slot. The root comes with a block index (a
//! SHA-256 per 4 KiB block) so that a box can later fetch only the blocks it does not
//! already hold.
//!
//! [`write`] makes a bundle; [`open`] reads one as a stream and checks everything before
//! anything is used: the archive's shape, the signature against the trusted key, the
//! format version, every field of the manifest, each part's size and SHA-256, and every
//! block of the root against the index. Each refusal names what was wrong.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub mod delta;
pub mod standby;
pub mod window;

use edge_oci::tar;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The format version this code writes and reads.
pub const FORMAT: u32 = 1;
/// The block of the root's index.
pub const BLOCK_SIZE: u64 = 4096;
/// The first two entries of every bundle.
pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.sig";
/// The largest manifest read (it lists a handful of parts).
pub const MAX_MANIFEST: u64 = 64 << 10;
/// The parts of a format 1 bundle, in archive order: the signed release (PCR 11 per
/// slot, for the core), each slot's UKI, the root's verity tree, the root's block index,
/// then the root itself (after its index, so a streaming reader checks each block).
pub const PARTS: [&str; 6] = [
    "pcr11.json",
    "uki-a.efi",
    "uki-b.efi",
    "root.verity",
    "root.blockhash",
    "root.erofs",
];
const ROOT: &str = "root.erofs";
const INDEX: &str = "root.blockhash";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a bundle, or one cut short: the archive itself.
    #[error("not a readable update bundle: {0}")]
    Archive(String),
    #[error("the bundle's manifest is not signed by the trusted update key: {0}")]
    Signature(String),
    #[error("the bundle's manifest: {0}")]
    Manifest(String),
    #[error("the bundle's part {part}: {why}")]
    Part { part: String, why: String },
    #[error("{path}: {why}")]
    Io { path: String, why: String },
    /// A fresh disk's standby entry and its description (standby.rs).
    #[error("the standby entry {0}")]
    Standby(String),
    /// An update's window (`HH:MM-HH:MM`) that is not one.
    #[error("window {text:?} {why}")]
    Window { text: String, why: &'static str },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

/// One part: its entry name, size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// What the update key signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// The image's name (`edgeos`): a box refuses another product's bundle.
    pub name: String,
    pub version: String,
    /// Raised by the operator when an older version must no longer be installed; a box
    /// refuses a bundle below the lowest it accepts.
    pub security_version: u64,
    pub kernel_release: String,
    /// The dm-verity root hash of `root.erofs`, as each UKI's command line carries it.
    pub roothash: String,
    pub block_size: u64,
    pub parts: Vec<Part>,
}

impl Manifest {
    /// Copies part `name` from a file that holds it alone (a part the box rebuilt and
    /// staged), checking its size and SHA-256 against this manifest on the way.
    pub fn copy_part_file(
        &self,
        path: &Path,
        name: &str,
        out: &mut dyn Write,
    ) -> Result<u64, Error> {
        let part = self.part(name).ok_or_else(|| Error::Part {
            part: name.into(),
            why: "not in this manifest".into(),
        })?;
        let len = std::fs::metadata(path).map_err(io(path))?.len();
        if len != part.size {
            return Err(Error::Part {
                part: name.into(),
                why: format!(
                    "{} is {len} bytes; the manifest says {}",
                    path.display(),
                    part.size
                ),
            });
        }
        copy_checked(path, 0, part.size, part, out)
    }

    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// Number of blocks of the root (its index has one SHA-256 per block).
    pub fn root_blocks(&self) -> u64 {
        self.part(ROOT).map_or(0, |p| p.size / self.block_size)
    }

    /// Parses and checks a manifest: the format version first (a newer format is named
    /// as such, not as a parse error), then every field.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, Error> {
        let bad = |why: String| Error::Manifest(why);
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        match v.get("format").and_then(serde_json::Value::as_u64) {
            Some(f) if f == u64::from(FORMAT) => {}
            Some(f) => {
                return Err(bad(format!(
                    "format version {f} is unknown (this reads version {FORMAT})"
                )))
            }
            None => return Err(bad("no format version".into())),
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), Error> {
        let bad = |why: String| Error::Manifest(why);
        let token = |what: &str, v: &str| {
            if v.is_empty()
                || v.len() > 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b))
            {
                return Err(bad(format!(
                    "{what} {v:?} is not 1 to 64 letters, digits or ._+-~"
                )));
            }
            Ok(())
        };
        token("name", &self.name)?;
        token("version", &self.version)?;
        token("kernel_release", &self.kernel_release)?;
        if self.security_version == 0 {
            return Err(bad("security_version is 0; versions start at 1".into()));
        }
        if !is_sha256_hex(&self.roothash) {
            return Err(bad(format!(
                "roothash {:?} is not 64 hex digits",
                self.roothash
            )));
        }
        if self.block_size != BLOCK_SIZE {
            return Err(bad(format!(
                "block_size {} (format {FORMAT} uses {BLOCK_SIZE})",
                self.block_size
            )));
        }
        let names: Vec<&str> = self.parts.iter().map(|p| p.name.as_str()).collect();
        if names != PARTS {
            return Err(bad(format!(
                "parts {names:?}; format {FORMAT} has exactly {PARTS:?}, in that order"
            )));
        }
        for p in &self.parts {
            if !is_sha256_hex(&p.sha256) {
                return Err(bad(format!(
                    "part {}: sha256 {:?} is not 64 hex digits",
                    p.name, p.sha256
                )));
            }
        }
        let root = self.part(ROOT).map_or(0, |p| p.size);
        if root == 0 || !root.is_multiple_of(BLOCK_SIZE) {
            return Err(bad(format!(
                "{ROOT} is {root} bytes, not a whole number of {BLOCK_SIZE}-byte blocks"
            )));
        }
        let index = self.part(INDEX).map_or(0, |p| p.size);
        if index != self.root_blocks() * 32 {
            return Err(bad(format!(
                "{INDEX} is {index} bytes; {} blocks of {ROOT} need {}",
                self.root_blocks(),
                self.root_blocks() * 32
            )));
        }
        Ok(())
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The block index of a root: SHA-256 of each `BLOCK_SIZE` block, concatenated. The
/// root must be a whole number of blocks.
pub fn block_index(root: impl Read, size: u64) -> std::io::Result<Vec<u8>> {
    Ok(index_and_digest(root, size)?.0)
}

/// The block index of a root and the SHA-256 of the whole root, in one read.
fn index_and_digest(mut root: impl Read, size: u64) -> std::io::Result<(Vec<u8>, String)> {
    if !size.is_multiple_of(BLOCK_SIZE) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{size} bytes is not a whole number of {BLOCK_SIZE}-byte blocks"),
        ));
    }
    let mut index = Vec::with_capacity((size / BLOCK_SIZE * 32) as usize);
    let mut whole = Sha256::new();
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    for _ in 0..size / BLOCK_SIZE {
        root.read_exact(&mut block)?;
        index.extend_from_slice(&Sha256::digest(&block));
        whole.update(&block);
    }
    Ok((index, hex(&whole.finalize())))
}

/// What the manifest says of the image, besides its parts.
pub struct Identity<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub security_version: u64,
    pub kernel_release: &'a str,
    pub roothash: &'a str,
}

/// The files of a bundle's parts, by part name (all of `PARTS` but the block index,
/// which is made here from the root).
pub struct Sources<'a> {
    pub files: &'a [(&'a str, &'a Path)],
}

/// Writes the bundle to `out` (through a temporary file renamed into place): hashes
/// every part, makes the root's block index, signs the manifest with `sign` (an Ed25519
/// signature of its bytes) and streams the parts in. Returns the manifest.
pub fn write(
    out: &Path,
    id: &Identity,
    sources: &Sources,
    sign: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<Manifest, Error> {
    let source = |name: &str| {
        sources
            .files
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p.to_path_buf())
            .ok_or_else(|| Error::Part {
                part: name.into(),
                why: "no file given for it".into(),
            })
    };
    let root_path = source(ROOT)?;
    let root_size = std::fs::metadata(&root_path).map_err(io(&root_path))?.len();
    let (index, root_sha256) = index_and_digest(
        std::fs::File::open(&root_path).map_err(io(&root_path))?,
        root_size,
    )
    .map_err(io(&root_path))?;

    let mut parts = Vec::new();
    let mut paths: Vec<Option<PathBuf>> = Vec::new();
    for name in PARTS {
        if name == INDEX {
            parts.push(Part {
                name: name.into(),
                size: index.len() as u64,
                sha256: hex(&Sha256::digest(&index)),
            });
            paths.push(None);
            continue;
        }
        let path = source(name)?;
        if name == ROOT {
            // Hashed with its index above.
            parts.push(Part {
                name: name.into(),
                size: root_size,
                sha256: root_sha256.clone(),
            });
            paths.push(Some(path));
            continue;
        }
        let mut f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut h = Sha256::new();
        let size = std::io::copy(&mut f, &mut h).map_err(io(&path))?;
        parts.push(Part {
            name: name.into(),
            size,
            sha256: hex(&h.finalize()),
        });
        paths.push(Some(path));
    }
    let manifest = Manifest {
        format: FORMAT,
        name: id.name.into(),
        version: id.version.into(),
        security_version: id.security_version,
        kernel_release: id.kernel_release.into(),
        roothash: id.roothash.into(),
        block_size: BLOCK_SIZE,
        parts,
    };
    manifest.check()?;
    let mut json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Manifest(e.to_string()))?;
    json.push(b'\n');
    let signature = sign(&json);

    let tmp = out.with_extension("bundle.tmp");
    let written = (|| -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let entry = |w: &mut std::io::BufWriter<std::fs::File>, name: &str, size: u64| {
            let h = tar::file_header(name, size, 0o644)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            w.write_all(&h)
        };
        let pad = |w: &mut std::io::BufWriter<std::fs::File>, size: u64| {
            w.write_all(&vec![0u8; tar::padding(size)])
        };
        for (name, data) in [(MANIFEST, &json[..]), (SIGNATURE, &signature[..])] {
            entry(&mut w, name, data.len() as u64)?;
            w.write_all(data)?;
            pad(&mut w, data.len() as u64)?;
        }
        for (part, path) in manifest.parts.iter().zip(&paths) {
            entry(&mut w, &part.name, part.size)?;
            match path {
                None => w.write_all(&index)?,
                Some(p) => {
                    let copied = std::io::copy(&mut std::fs::File::open(p)?, &mut w)?;
                    if copied != part.size {
                        return Err(std::io::Error::other(format!(
                            "{} changed while the bundle was written",
                            p.display()
                        )));
                    }
                }
            }
            pad(&mut w, part.size)?;
        }
        w.write_all(&[0u8; 2 * tar::BLOCK])?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(manifest)
}

/// A part's place in the bundle file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// A bundle that passed every check.
#[derive(Debug)]
pub struct Bundle {
    pub manifest: Manifest,
    /// The signed manifest's bytes, as they were signed.
    pub manifest_bytes: Vec<u8>,
    pub signature: Vec<u8>,
    pub parts: Vec<Located>,
}

impl Bundle {
    pub fn located(&self, name: &str) -> Option<&Located> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// Copies part `name` from the bundle file at `path` (the one [`open`] checked) into
    /// `out`, hashing it again on the way: a file changed since it was checked is caught
    /// here, naming the part. Returns the bytes copied.
    pub fn copy_part(&self, path: &Path, name: &str, out: &mut dyn Write) -> Result<u64, Error> {
        let (at, part) = match (self.located(name), self.manifest.part(name)) {
            (Some(at), Some(part)) => (at, part),
            _ => {
                return Err(Error::Part {
                    part: name.into(),
                    why: "not in this bundle".into(),
                })
            }
        };
        copy_checked(path, at.offset, at.size, part, out)
    }
}

/// Copies `size` bytes at `offset` of `path` into `out`, hashing them: they must be
/// `part` as the manifest describes it.
fn copy_checked(
    path: &Path,
    offset: u64,
    size: u64,
    part: &Part,
    out: &mut dyn Write,
) -> Result<u64, Error> {
    use std::io::{Seek, SeekFrom};
    let name = part.name.as_str();
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    file.seek(SeekFrom::Start(offset)).map_err(io(path))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, file).take(size);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| Error::Io {
            path: format!("the copy of {name}"),
            why: e.to_string(),
        })?;
        copied += n as u64;
    }
    let got = hex(&h.finalize());
    if copied != size || got != part.sha256 {
        return Err(Error::Part {
            part: name.into(),
            why: format!(
                "it changed since it was checked ({copied} bytes, SHA-256 {got}; the manifest says {} bytes, {})",
                part.size, part.sha256
            ),
        });
    }
    Ok(copied)
}

/// Whether `signature` is `public_key`'s Ed25519 signature of the manifest `bytes`.
pub fn verify(public_key: &[u8], bytes: &[u8], signature: &[u8]) -> Result<(), Error> {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(bytes, signature)
        .map_err(|_| {
            Error::Signature(format!(
                "the signature does not verify with {}",
                hex(public_key)
            ))
        })
}

/// Reads the bundle at `path` and checks all of it against the update key `public_key`
/// (32 bytes, Ed25519). Nothing of a part is trusted before the manifest's signature is.
pub fn open(path: &Path, public_key: &[u8]) -> Result<Bundle, Error> {
    let (mut r, manifest_bytes, signature, manifest) = read_head(path, public_key)?;

    let mut parts = Vec::new();
    let mut index: Vec<u8> = Vec::new();
    for part in &manifest.parts {
        let (offset, _) = r.expect_entry(&part.name, Some(part.size))?;
        let mut h = Sha256::new();
        let mut left = part.size;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut block = 0u64;
        while left > 0 {
            let n = left.min(BLOCK_SIZE) as usize;
            r.fill(&mut buf[..n], &part.name)?;
            h.update(&buf[..n]);
            if part.name == INDEX {
                index.extend_from_slice(&buf[..n]);
            } else if part.name == ROOT {
                // The index has passed its own hash already: every block must match it.
                let at = (block * 32) as usize;
                if index.get(at..at + 32) != Some(&Sha256::digest(&buf[..n])[..]) {
                    return Err(Error::Part {
                        part: part.name.clone(),
                        why: format!("block {block} does not match the block index"),
                    });
                }
                block += 1;
            }
            left -= n as u64;
        }
        let got = hex(&h.finalize());
        if got != part.sha256 {
            return Err(Error::Part {
                part: part.name.clone(),
                why: format!("its SHA-256 is {got}; the manifest says {}", part.sha256),
            });
        }
        r.skip(tar::padding(part.size) as u64, &part.name)?;
        parts.push(Located {
            name: part.name.clone(),
            offset,
            size: part.size,
        });
    }
    let mut end = [0u8; tar::BLOCK];
    r.fill(&mut end, "the end of the archive")?;
    if let Some(h) = tar::parse_header(&end, r.at - tar::BLOCK as u64)
        .map_err(|e| Error::Archive(e.to_string()))?
    {
        return Err(Error::Archive(format!(
            "an entry {:?} after the last part",
            h.path
        )));
    }
    Ok(Bundle {
        manifest,
        manifest_bytes,
        signature,
        parts,
    })
}

/// Reads and checks only the bundle's signed manifest (the first two entries): enough to
/// decide whether the rest is worth reading.
pub fn head(path: &Path, public_key: &[u8]) -> Result<Manifest, Error> {
    read_head(path, public_key).map(|(_, _, _, m)| m)
}

fn read_head(
    path: &Path,
    public_key: &[u8],
) -> Result<(Reader, Vec<u8>, Vec<u8>, Manifest), Error> {
    let mut r = Reader::open(path)?;
    let (manifest_bytes, signature, manifest) = r.signed_manifest(public_key)?;
    Ok((r, manifest_bytes, signature, manifest))
}

/// Reads an update key's public half as the build writes it (`update.pub`, and the
/// image's `/etc/edge/update-ed25519.pub`): 64 hex digits, whitespace around allowed.
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, Error> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let t = text.trim();
    let key: Option<Vec<u8>> = (t.len() == 64 && t.is_ascii())
        .then(|| {
            (0..32)
                .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok())
                .collect()
        })
        .flatten();
    key.ok_or_else(|| Error::Io {
        path: path.display().to_string(),
        why: "not an update key (64 hex digits)".into(),
    })
}

struct Reader {
    inner: std::io::BufReader<std::fs::File>,
    at: u64,
}

impl Reader {
    fn open(path: &Path) -> Result<Reader, Error> {
        let file = std::fs::File::open(path).map_err(io(path))?;
        Ok(Reader {
            inner: std::io::BufReader::with_capacity(1 << 20, file),
            at: 0,
        })
    }

    /// The next two entries, `manifest.json` and `manifest.sig`: the signature checked
    /// against `public_key`, then the manifest parsed and checked.
    fn signed_manifest(
        &mut self,
        public_key: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>, Manifest), Error> {
        let manifest_bytes = self.small_entry(MANIFEST, MAX_MANIFEST)?;
        let signature = self.small_entry(SIGNATURE, 64)?;
        verify(public_key, &manifest_bytes, &signature)?;
        let manifest = Manifest::parse(&manifest_bytes)?;
        Ok((manifest_bytes, signature, manifest))
    }

    fn fill(&mut self, buf: &mut [u8], inside: &str) -> Result<(), Error> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Archive(format!("it ends inside {inside} (byte {})", self.at))
            } else {
                Error::Archive(format!("reading {inside} at byte {}: {e}", self.at))
            }
        })?;
        self.at += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, n: u64, inside: &str) -> Result<(), Error> {
        let mut pad = vec![0u8; n as usize];
        self.fill(&mut pad, inside)
    }

    /// The next header, which must be the regular file `name` (of `size` bytes when
    /// given); returns where its data starts, and its size.
    fn expect_entry(&mut self, name: &str, size: Option<u64>) -> Result<(u64, u64), Error> {
        let mut h = [0u8; tar::BLOCK];
        let at = self.at;
        self.fill(&mut h, &format!("the header of {name}"))?;
        let header = tar::parse_header(&h, at)
            .map_err(|e| Error::Archive(e.to_string()))?
            .ok_or_else(|| Error::Archive(format!("it ends where {name} should be")))?;
        if header.path != name || !header.regular {
            return Err(Error::Archive(format!(
                "entry {:?} where {name} should be",
                header.path
            )));
        }
        if let Some(want) = size {
            if header.size != want {
                return Err(Error::Part {
                    part: name.into(),
                    why: format!("{} bytes; the manifest says {want}", header.size),
                });
            }
        }
        Ok((self.at, header.size))
    }

    /// A whole small entry (`name`, at most `max` bytes), with its padding.
    fn small_entry(&mut self, name: &str, max: u64) -> Result<Vec<u8>, Error> {
        let (_, size) = self.expect_entry(name, None)?;
        if size > max {
            return Err(Error::Archive(format!(
                "{name} is {size} bytes; at most {max} are read"
            )));
        }
        let mut data = vec![0u8; size as usize];
        self.fill(&mut data, name)?;
        self.skip(tar::padding(size) as u64, name)?;
        Ok(data)
    }
}
