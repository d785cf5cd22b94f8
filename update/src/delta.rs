//! Deltas (docs/update.md, "Deltas"): a bundle's parts as lists of block hashes, and a
//! pack of only the blocks a box running the base version does not already hold.
//!
//! The delta carries the target's signed manifest unchanged. A box rebuilds each part
//! from blocks it finds among its own (its running root and verity tree, its UKI, the
//! block index of its root) and blocks from the pack, checks every block against its
//! hash, and each rebuilt part against the manifest's size and SHA-256. Nothing in a delta
//! but the manifest needs to be trusted: blocks that are wrong, missing or mixed up give a
//! part whose SHA-256 does not match, which is refused like a bad bundle.
//!
//! A ustar archive, in this order: `delta.json` ([`Info`]), `manifest.json`,
//! `manifest.sig` (the target bundle's), then for each part but the root
//! `<part>.blocks` (SHA-256 of each 4096-byte block of the part, the last one possibly
//! short; the root's list is its block index, itself a part), `pack.blocks` (the SHA-256
//! of each packed block) and `pack.bin` (the packed blocks, 4096 bytes each, a short one
//! padded with zeros).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use edge_oci::tar;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{hex, io, Bundle, Error, Manifest, Reader, BLOCK_SIZE, INDEX, ROOT};

pub const INFO: &str = "delta.json";
pub const PACK_INDEX: &str = "pack.blocks";
pub const PACK: &str = "pack.bin";
/// The format of `delta.json` and the entries after it.
pub const DELTA_FORMAT: u32 = 1;

/// What a delta starts from and leads to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Info {
    pub format: u32,
    /// The version a box must run to use this delta.
    pub base_version: String,
    /// How much of the running root and verity partitions hold the base's root and tree.
    pub base_root_bytes: u64,
    pub base_verity_bytes: u64,
    pub target_version: String,
}

type Hash = [u8; 32];

fn digest(b: &[u8]) -> Hash {
    Sha256::digest(b).into()
}

/// The hashes of `data`'s blocks, the last one as long as what is left.
fn block_hashes(data: &[u8]) -> Vec<Hash> {
    data.chunks(BLOCK_SIZE as usize).map(digest).collect()
}

fn read_part(bundle: &Bundle, path: &Path, name: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    bundle.copy_part(path, name, &mut out)?;
    Ok(out)
}

/// How big a written delta is and what it packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub packed_blocks: u64,
}

/// Writes the delta from the checked bundle `base` to the checked bundle `target` (each
/// with the file it was opened from). A box has the base's root and verity tree (its
/// running slot), the root's block index (it hashes its root), and only one of the two
/// UKIs: of those, only the blocks both UKIs share are counted as held.
pub fn write(
    base: (&Bundle, &Path),
    target: (&Bundle, &Path),
    out: &Path,
) -> Result<Written, Error> {
    let (b, bp) = base;
    let (t, tp) = target;
    if b.manifest.name != t.manifest.name {
        return Err(Error::Manifest(format!(
            "the base is {} and the target {}",
            b.manifest.name, t.manifest.name
        )));
    }
    let mut held: HashSet<Hash> = HashSet::new();
    for name in [ROOT, "root.verity", INDEX] {
        held.extend(block_hashes(&read_part(b, bp, name)?));
    }
    let uki_a: HashSet<Hash> = block_hashes(&read_part(b, bp, "uki-a.efi")?)
        .into_iter()
        .collect();
    for h in block_hashes(&read_part(b, bp, "uki-b.efi")?) {
        if uki_a.contains(&h) {
            held.insert(h);
        }
    }

    let mut lists: Vec<(String, Vec<u8>)> = Vec::new();
    let mut pack_index: Vec<u8> = Vec::new();
    let mut pack: Vec<u8> = Vec::new();
    let mut packed: HashSet<Hash> = HashSet::new();
    for part in &t.manifest.parts {
        let data = read_part(t, tp, &part.name)?;
        let hashes = block_hashes(&data);
        for (h, block) in hashes.iter().zip(data.chunks(BLOCK_SIZE as usize)) {
            if !held.contains(h) && packed.insert(*h) {
                pack_index.extend_from_slice(h);
                pack.extend_from_slice(block);
                pack.resize(
                    pack.len().div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize,
                    0,
                );
            }
        }
        if part.name != ROOT {
            lists.push((format!("{}.blocks", part.name), hashes.concat()));
        }
    }
    let info = Info {
        format: DELTA_FORMAT,
        base_version: b.manifest.version.clone(),
        base_root_bytes: b.manifest.part(ROOT).map_or(0, |p| p.size),
        base_verity_bytes: b.manifest.part("root.verity").map_or(0, |p| p.size),
        target_version: t.manifest.version.clone(),
    };
    let info_json = serde_json::to_vec_pretty(&info).map_err(|e| Error::Manifest(e.to_string()))?;
    let mut entries: Vec<(String, &[u8])> = vec![
        (INFO.into(), &info_json),
        (crate::MANIFEST.into(), &t.manifest_bytes),
        (crate::SIGNATURE.into(), &t.signature),
    ];
    for (name, list) in &lists {
        entries.push((name.clone(), list));
    }
    entries.push((PACK_INDEX.into(), &pack_index));
    entries.push((PACK.into(), &pack));

    let tmp = out.with_extension("delta.tmp");
    let written = (|| -> std::io::Result<u64> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let mut bytes = 0u64;
        for (name, data) in &entries {
            let h = tar::file_header(name, data.len() as u64, 0o644)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            w.write_all(&h)?;
            w.write_all(data)?;
            w.write_all(&vec![0u8; tar::padding(data.len() as u64)])?;
            bytes += (tar::BLOCK + data.len() + tar::padding(data.len() as u64)) as u64;
        }
        w.write_all(&[0u8; 2 * tar::BLOCK])?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(bytes + 2 * tar::BLOCK as u64)
    })();
    match written {
        Ok(bytes) => {
            std::fs::rename(&tmp, out).map_err(io(out))?;
            Ok(Written {
                bytes,
                packed_blocks: packed.len() as u64,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io(&tmp)(e))
        }
    }
}

/// A delta whose manifest passed its signature and checks, and whose lists and pack are
/// in order. Its blocks are checked as they are used.
#[derive(Debug)]
pub struct Delta {
    pub path: PathBuf,
    pub info: Info,
    pub manifest: Manifest,
    lists: HashMap<String, Vec<Hash>>,
    /// Each packed block's place in the file.
    pack: HashMap<Hash, u64>,
}

/// Reads the signed manifest of the delta at `path` and its lists (not the packed blocks).
pub fn open(path: &Path, public_key: &[u8]) -> Result<Delta, Error> {
    let mut r = Reader::open(path)?;
    let info_bytes = r.small_entry(INFO, 4096)?;
    let info: Info = serde_json::from_slice(&info_bytes)
        .map_err(|e| Error::Archive(format!("{INFO} is not valid: {e}")))?;
    if info.format != DELTA_FORMAT {
        return Err(Error::Archive(format!(
            "delta format {} is unknown (this reads {DELTA_FORMAT})",
            info.format
        )));
    }
    let (_, _, manifest) = r.signed_manifest(public_key)?;
    if manifest.version != info.target_version {
        return Err(Error::Archive(format!(
            "{INFO} says it leads to {}, and its manifest is {}'s",
            info.target_version, manifest.version
        )));
    }
    let mut lists = HashMap::new();
    for part in manifest.parts.iter().filter(|p| p.name != ROOT) {
        let name = format!("{}.blocks", part.name);
        let want = part.size.div_ceil(BLOCK_SIZE) * 32;
        let bytes = r.small_entry(&name, want)?;
        if bytes.len() as u64 != want {
            return Err(Error::Archive(format!(
                "{name} lists {} blocks; the part has {}",
                bytes.len() / 32,
                want / 32
            )));
        }
        lists.insert(part.name.clone(), as_hashes(&bytes));
    }
    let index = r.small_entry(PACK_INDEX, 1 << 26)?;
    if index.len() % 32 != 0 {
        return Err(Error::Archive(format!(
            "{PACK_INDEX} is {} bytes, not a list of SHA-256",
            index.len()
        )));
    }
    let (at, size) = r.expect_entry(PACK, None)?;
    let blocks = index.len() as u64 / 32;
    if size != blocks * BLOCK_SIZE {
        return Err(Error::Archive(format!(
            "{PACK} is {size} bytes; {PACK_INDEX} lists {blocks} blocks of {BLOCK_SIZE}"
        )));
    }
    let file_len = std::fs::metadata(path).map_err(io(path))?.len();
    if at + size > file_len {
        return Err(Error::Archive(format!(
            "it ends inside {PACK} (byte {file_len})"
        )));
    }
    let pack = as_hashes(&index)
        .into_iter()
        .enumerate()
        .map(|(i, h)| (h, at + i as u64 * BLOCK_SIZE))
        .collect();
    Ok(Delta {
        path: path.to_path_buf(),
        info,
        manifest,
        lists,
        pack,
    })
}

fn as_hashes(bytes: &[u8]) -> Vec<Hash> {
    bytes
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap_or([0; 32]))
        .collect()
}

/// Blocks a box already holds, by SHA-256: ranges of its own files and bytes in memory.
#[derive(Default)]
pub struct Seeds {
    /// Open for the whole rebuild: a block is read with one positioned read.
    files: Vec<(PathBuf, std::fs::File)>,
    memory: Vec<Vec<u8>>,
    map: HashMap<Hash, Held>,
}

/// Where a held block is: which source, at what offset, how long.
#[derive(Clone, Copy)]
struct Held {
    source: Source,
    at: u64,
    len: usize,
}

#[derive(Clone, Copy)]
enum Source {
    File(usize),
    Memory(usize),
}

impl Seeds {
    /// The blocks of the first `len` bytes of `path` (a partition); returns the block
    /// index of those bytes (a root's, for [`Seeds::add_bytes`]).
    pub fn add_file(&mut self, path: &Path, len: u64) -> Result<Vec<u8>, Error> {
        let file = std::fs::File::open(path).map_err(io(path))?;
        let source = Source::File(self.files.len());
        let mut f = std::io::BufReader::with_capacity(1 << 20, &file).take(len);
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut index = Vec::new();
        let mut at = 0u64;
        loop {
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]).map_err(io(path))? {
                    0 => break,
                    k => n += k,
                }
            }
            if n == 0 {
                break;
            }
            let h = digest(&buf[..n]);
            index.extend_from_slice(&h);
            self.map.entry(h).or_insert(Held { source, at, len: n });
            at += n as u64;
            if n < buf.len() {
                break;
            }
        }
        self.files.push((path.to_path_buf(), file));
        Ok(index)
    }

    /// The blocks of `bytes` (a UKI read from the ESP, a root's block index).
    pub fn add_bytes(&mut self, bytes: Vec<u8>) {
        let source = Source::Memory(self.memory.len());
        for (i, block) in bytes.chunks(BLOCK_SIZE as usize).enumerate() {
            self.map.entry(digest(block)).or_insert(Held {
                source,
                at: i as u64 * BLOCK_SIZE,
                len: block.len(),
            });
        }
        self.memory.push(bytes);
    }

    fn get(&self, h: &Hash) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let held = self.map.get(h)?;
        match held.source {
            Source::File(i) => {
                let mut b = vec![0u8; held.len];
                self.files.get(i)?.1.read_exact_at(&mut b, held.at).ok()?;
                Some(b)
            }
            Source::Memory(i) => {
                let at = held.at as usize;
                self.memory
                    .get(i)?
                    .get(at..at + held.len)
                    .map(<[u8]>::to_vec)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// How one part was rebuilt.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    pub bytes: u64,
    /// Blocks taken from the box's own, and from the pack.
    pub held: u64,
    pub packed: u64,
}

impl Delta {
    /// Rebuilds part `name` into `out` from `seeds` and the pack, checking each block
    /// against its hash and the whole against the manifest. The root needs its block
    /// index, rebuilt before it (`index`).
    pub fn rebuild(
        &self,
        name: &str,
        seeds: &Seeds,
        index: Option<&[u8]>,
        out: &mut dyn Write,
    ) -> Result<Rebuilt, Error> {
        let bad = |why: String| Error::Part {
            part: name.into(),
            why,
        };
        let part = self
            .manifest
            .part(name)
            .ok_or_else(|| bad("not in this delta's manifest".into()))?;
        let hashes: Vec<Hash> = if name == ROOT {
            as_hashes(index.ok_or_else(|| bad("rebuilt before its block index".into()))?)
        } else {
            self.lists
                .get(name)
                .cloned()
                .ok_or_else(|| bad("the delta lists no blocks for it".into()))?
        };
        if hashes.len() as u64 != part.size.div_ceil(BLOCK_SIZE) {
            return Err(bad(format!(
                "{} blocks listed for {} bytes",
                hashes.len(),
                part.size
            )));
        }
        let pack = std::fs::File::open(&self.path).map_err(io(&self.path))?;
        let mut whole = Sha256::new();
        let mut done = Rebuilt::default();
        for (i, h) in hashes.iter().enumerate() {
            let len = (part.size - i as u64 * BLOCK_SIZE).min(BLOCK_SIZE) as usize;
            let block = match seeds.get(h).filter(|b| b.len() == len) {
                Some(b) => {
                    done.held += 1;
                    b
                }
                None => {
                    let at = *self.pack.get(h).ok_or_else(|| {
                        bad(format!(
                            "block {i} ({}) is neither held nor packed",
                            hex(&h[..8])
                        ))
                    })?;
                    let mut b = vec![0u8; len];
                    std::os::unix::fs::FileExt::read_exact_at(&pack, &mut b, at)
                        .map_err(io(&self.path))?;
                    done.packed += 1;
                    b
                }
            };
            if digest(&block) != *h {
                return Err(bad(format!("block {i} does not match its hash")));
            }
            whole.update(&block);
            out.write_all(&block).map_err(|e| Error::Io {
                path: format!("the copy of {name}"),
                why: e.to_string(),
            })?;
            done.bytes += len as u64;
        }
        let got = hex(&whole.finalize());
        if got != part.sha256 {
            return Err(bad(format!(
                "rebuilt, its SHA-256 is {got}; the manifest says {}",
                part.sha256
            )));
        }
        Ok(done)
    }
}
