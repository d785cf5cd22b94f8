//! dm-verity for the root slot: the veritysetup superblock in block 0 of the hash partition
//! (cryptsetup's on-disk format, 512 bytes, little endian) and the verity target table
//! built from it and the root hash on the kernel command line.

use crate::error::{Error, Result};

/// The superblock fields the table needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// 1 for the normal format (0 is Chrome OS's, which salts differently).
    pub hash_type: u32,
    pub algorithm: String,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

pub const SUPERBLOCK_SIZE: usize = 512;
const SIGNATURE: &[u8; 8] = b"verity\0\0";

fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Parses the superblock. Layout: signature[8] @0, version u32 @8, hash_type u32 @12,
/// uuid[16] @16, algorithm[32] @32, data_block_size u32 @64, hash_block_size u32 @68,
/// data_blocks u64 @72, salt_size u16 @80, pad[6], salt[256] @88, pad[168] -> 512.
pub fn parse_superblock(b: &[u8]) -> Result<Superblock> {
    let bad = |detail: String| Error::Verity { path: None, detail };
    if b.len() < SUPERBLOCK_SIZE {
        return Err(bad(format!(
            "verity superblock truncated ({} bytes)",
            b.len()
        )));
    }
    if &b[0..8] != SIGNATURE {
        return Err(bad(
            "no verity superblock (signature \"verity\" missing)".to_owned()
        ));
    }
    let version = le_u32(b, 8);
    if version != 1 {
        return Err(bad(format!(
            "unsupported verity superblock version {version}"
        )));
    }
    let hash_type = le_u32(b, 12);
    if hash_type > 1 {
        return Err(bad(format!("unsupported verity hash type {hash_type}")));
    }
    let alg = &b[32..64];
    let alg_len = alg.iter().position(|&c| c == 0).unwrap_or(alg.len());
    let algorithm = std::str::from_utf8(&alg[..alg_len])
        .ok()
        .filter(|a| !a.is_empty() && a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'))
        .ok_or_else(|| bad("verity superblock names no valid hash algorithm".into()))?
        .to_owned();
    let data_block_size = le_u32(b, 64);
    let hash_block_size = le_u32(b, 68);
    for (what, size) in [("data", data_block_size), ("hash", hash_block_size)] {
        if !(512..=1 << 20).contains(&size) || !size.is_power_of_two() {
            return Err(bad(format!("verity {what} block size {size} is invalid")));
        }
    }
    let data_blocks =
        u64::from_le_bytes(b[72..80].try_into().map_err(|_| bad("short".to_owned()))?);
    if data_blocks == 0 {
        return Err(bad("verity superblock says 0 data blocks".to_owned()));
    }
    let salt_size = u16::from_le_bytes([b[80], b[81]]) as usize;
    if salt_size > 256 {
        return Err(bad(format!("verity salt size {salt_size} exceeds 256")));
    }
    Ok(Superblock {
        hash_type,
        algorithm,
        data_block_size,
        hash_block_size,
        data_blocks,
        salt: b[88..88 + salt_size].to_vec(),
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Superblock {
    /// Length of the verified device in 512-byte sectors.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * u64::from(self.data_block_size) / 512
    }

    /// The verity target parameters:
    /// `<hash_type> <data dev> <hash dev> <data bs> <hash bs> <data blocks> <hash start>
    /// <algorithm> <root hash> <salt>`. The hash tree starts at hash block 1 because block
    /// 0 holds this superblock (with 4096-byte hash blocks, as the contract fixes).
    /// The algorithm comes from the superblock, but it is part of the tree, so the root
    /// hash pins it as well as the salt and sizes.
    pub fn table(&self, data_dev: &str, hash_dev: &str, root_hash: &str) -> String {
        let salt = if self.salt.is_empty() {
            "-".to_owned()
        } else {
            hex(&self.salt)
        };
        format!(
            "{} {data_dev} {hash_dev} {} {} {} 1 {} {root_hash} {salt}",
            self.hash_type,
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            self.algorithm,
        )
    }
}

/// Reads the superblock from the start of the hash device.
pub fn read_superblock(path: &std::path::Path) -> Result<Superblock> {
    use std::io::Read;
    let mut buf = [0u8; SUPERBLOCK_SIZE];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(Error::io("read", path))?;
    parse_superblock(&buf).map_err(|e| match e {
        Error::Verity { detail, .. } => Error::Verity {
            path: Some(path.to_path_buf()),
            detail,
        },
        other => other,
    })
}

/// Whether a verity status string (`V`, `C`, with FEC or check-at-most-once extras after)
/// reports a corrupted block.
pub fn status_is_corrupt(status: &str) -> bool {
    status.trim_start().starts_with('C')
}

/// The device-mapper name of the verified root, in both stages.
pub const ROOT_DM_NAME: &str = "root";

/// Whether the verified root has met a block that did not verify since it was opened
/// (the kernel's verity status turns from `V` to `C` and stays so). Any read counts: a
/// program's page, a library, a file a service opened. `false` when the status cannot be
/// read.
pub fn root_is_corrupt(dev_dir: &std::path::Path) -> bool {
    crate::dm::Control::open(dev_dir)
        .and_then(|c| c.status(ROOT_DM_NAME))
        .map(|s| s.iter().any(|t| status_is_corrupt(t)))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn veritysetup() -> Option<&'static str> {
        ["/usr/sbin/veritysetup", "/sbin/veritysetup"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
    }

    /// Runs a real `veritysetup format` over a small data file and returns the hash file
    /// contents and the printed root hash and salt.
    fn real_format(dir: &std::path::Path, extra: &[&str]) -> (Vec<u8>, String, String) {
        let data = dir.join("data.img");
        let hash = dir.join("hash.img");
        let content: Vec<u8> = (0..40960u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&data, content).unwrap();
        let out = Command::new(veritysetup().unwrap())
            .arg("format")
            .args(extra)
            .arg(&data)
            .arg(&hash)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap()
        };
        (
            std::fs::read(&hash).unwrap(),
            field("Root hash:"),
            field("Salt:"),
        )
    }

    #[test]
    fn parses_a_real_veritysetup_superblock() {
        let Some(_) = veritysetup() else {
            edge_common::precondition_missing("veritysetup");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (hash, root, salt) = real_format(dir.path(), &[]);
        let sb = parse_superblock(&hash).unwrap();
        assert_eq!(sb.hash_type, 1);
        assert_eq!(sb.algorithm, "sha256");
        assert_eq!(sb.data_block_size, 4096);
        assert_eq!(sb.hash_block_size, 4096);
        assert_eq!(sb.data_blocks, 10);
        assert_eq!(hex(&sb.salt), salt);
        assert_eq!(sb.data_sectors(), 80);
        assert_eq!(
            sb.table("259:2", "259:3", &root),
            format!("1 259:2 259:3 4096 4096 10 1 sha256 {root} {salt}")
        );
    }

    #[test]
    fn honours_other_sizes_and_an_empty_salt() {
        let Some(_) = veritysetup() else {
            edge_common::precondition_missing("veritysetup");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (hash, root, _) = real_format(
            dir.path(),
            &["--data-block-size=1024", "--salt=-", "--hash=sha512"],
        );
        let sb = parse_superblock(&hash).unwrap();
        assert_eq!(sb.data_block_size, 1024);
        assert_eq!(sb.data_blocks, 40);
        assert_eq!(sb.algorithm, "sha512");
        assert!(sb.salt.is_empty());
        assert!(sb
            .table("a", "b", &root)
            .ends_with(&format!("sha512 {root} -")));
    }

    #[test]
    fn refuses_what_is_not_a_superblock() {
        assert!(parse_superblock(&[0u8; 512])
            .unwrap_err()
            .to_string()
            .contains("signature"));
        assert!(parse_superblock(b"verity\0\0")
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut b = [0u8; 512];
        b[..8].copy_from_slice(SIGNATURE);
        b[8] = 1;
        b[12] = 1;
        b[32..38].copy_from_slice(b"sha256");
        b[64..68].copy_from_slice(&4096u32.to_le_bytes());
        b[68..72].copy_from_slice(&4096u32.to_le_bytes());
        b[72] = 1;
        b[80..82].copy_from_slice(&300u16.to_le_bytes());
        assert!(parse_superblock(&b)
            .unwrap_err()
            .to_string()
            .contains("salt size 300"));
        b[80..82].copy_from_slice(&0u16.to_le_bytes());
        assert!(parse_superblock(&b).is_ok());
        b[64..68].copy_from_slice(&4000u32.to_le_bytes());
        assert!(parse_superblock(&b)
            .unwrap_err()
            .to_string()
            .contains("data block size 4000"));
    }

    #[test]
    fn corruption_status_is_recognised() {
        assert!(status_is_corrupt("C"));
        assert!(status_is_corrupt("C 0"));
        assert!(!status_is_corrupt("V"));
        assert!(!status_is_corrupt(""));
    }
}
