//! Reading a GUID partition table, so tests can find a partition's bytes by its label.

use anyhow::{bail, ensure, Context, Result};

/// Logical block size our images use (the builder writes 512-byte sectors).
pub const SECTOR: u64 = 512;

/// One used entry of the partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    /// Type GUID in the usual text form, lower case.
    pub type_guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Partition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// How many bytes from the start of the disk hold the header and the entry array
/// of a table with the usual 128 entries of 128 bytes (LBA 0..=33).
pub const TABLE_BYTES: usize = 34 * SECTOR as usize;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// GUIDs are stored mixed-endian: the first three fields little-endian, the rest as bytes.
fn guid_text(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        u32_at(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// Parses the primary table from the first bytes of a disk (at least the header and
/// the whole entry array it points to).
pub fn parse(disk: &[u8]) -> Result<Vec<Partition>> {
    let sector = SECTOR as usize;
    ensure!(
        disk.len() >= 2 * sector,
        "disk is too short for a GPT header"
    );
    let hdr = &disk[sector..2 * sector];
    if &hdr[0..8] != b"EFI PART" {
        bail!("no GPT header at LBA 1 (signature missing)");
    }
    let entries_lba = u64_at(hdr, 72);
    let count = u32_at(hdr, 80) as usize;
    let entry_size = u32_at(hdr, 84) as usize;
    ensure!(
        entry_size >= 128,
        "GPT entry size {entry_size} is below 128"
    );
    let start = entries_lba as usize * sector;
    let end = start + count * entry_size;
    ensure!(
        disk.len() >= end,
        "GPT entry array ends at byte {end}, only {} bytes were read",
        disk.len()
    );
    let mut parts = Vec::new();
    for e in disk[start..end].chunks_exact(entry_size) {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16(&units).context("GPT partition name is not UTF-16")?;
        parts.push(Partition {
            name,
            type_guid: guid_text(&e[0..16]),
            first_lba: u64_at(e, 32),
            last_lba: u64_at(e, 40),
        });
    }
    Ok(parts)
}

/// Finds a partition by its label.
pub fn find<'a>(parts: &'a [Partition], name: &str) -> Result<&'a Partition> {
    parts.iter().find(|p| p.name == name).with_context(|| {
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        format!("no partition labelled {name:?} (found {names:?})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT_TYPE: [u8; 16] = [
        0xe3, 0xbc, 0x68, 0x4f, 0xcd, 0xe8, 0xb1, 0x4d, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7,
        0x09,
    ];

    fn disk_with(entries: &[(&[u8; 16], u64, u64, &str)]) -> Vec<u8> {
        let mut d = vec![0u8; TABLE_BYTES];
        let h = 512;
        d[h..h + 8].copy_from_slice(b"EFI PART");
        d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, (ty, first, last, name)) in entries.iter().enumerate() {
            let e = 1024 + i * 128;
            d[e..e + 16].copy_from_slice(*ty);
            d[e + 16] = 1; // unique GUID, any non-zero
            d[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            d[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
            for (j, u) in name.encode_utf16().enumerate() {
                d[e + 56 + 2 * j..e + 58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        d
    }

    #[test]
    fn finds_partition_by_label_with_offset_and_size() {
        let d = disk_with(&[
            (&[1; 16], 2048, 4095, "esp"),
            (&ROOT_TYPE, 4096, 8191, "root-a"),
        ]);
        let parts = parse(&d).unwrap();
        assert_eq!(parts.len(), 2);
        let root = find(&parts, "root-a").unwrap();
        assert_eq!(root.offset(), 4096 * 512);
        assert_eq!(root.size(), 4096 * 512);
        assert_eq!(root.type_guid, "4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
    }

    #[test]
    fn skips_empty_entries_and_reports_missing_label() {
        let mut d = disk_with(&[(&[1; 16], 2048, 4095, "esp")]);
        // A used entry after an empty one still counts.
        let e = 1024 + 5 * 128;
        d[e] = 7;
        d[e + 32..e + 40].copy_from_slice(&5000u64.to_le_bytes());
        d[e + 40..e + 48].copy_from_slice(&5999u64.to_le_bytes());
        let parts = parse(&d).unwrap();
        assert_eq!(parts.len(), 2);
        let err = find(&parts, "root-b").unwrap_err().to_string();
        assert!(err.contains("root-b") && err.contains("esp"), "{err}");
    }

    #[test]
    fn rejects_disk_without_gpt() {
        let d = vec![0u8; TABLE_BYTES];
        assert!(parse(&d).unwrap_err().to_string().contains("GPT"));
    }
}
