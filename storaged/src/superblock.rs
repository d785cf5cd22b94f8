//! The pool's on-disk superblock (the first 4 KiB of the claimed device) and the probe
//! that tells an empty device, our own pool and someone else's data apart before
//! anything is written.
//!
//! Layout (little-endian): magic "EDGEPOOL" (8), version u32, flags u32, uuid (16),
//! device bytes at format, then byte offset and length of the catalog area (two slots),
//! of the thin metadata area and of the thin data area (u64 each), the thin data block
//! size in sectors (u32), and at 4092 a crc32c of bytes 0..4092.

pub const MAGIC: &[u8; 8] = b"EDGEPOOL";
pub const VERSION: u32 = 1;
pub const SIZE: usize = 4096;
const MIB: u64 = 1 << 20;
/// 512 KiB thin blocks by default, the size the kernel's thin-provisioning documentation
/// suggests for thin provisioning (64 KiB for heavy snapshotting): the kernel splits
/// every request at block boundaries, so small blocks cut large sequential requests into
/// many (`cargo xtask bench storage` measures each size; docs/decisions.md).
pub const DATA_BLOCK_SECTORS: u32 = 1024;
/// The smallest (64 KiB) and largest (1 GiB) thin blocks the kernel takes.
pub const MIN_DATA_BLOCK_SECTORS: u32 = 128;
pub const MAX_DATA_BLOCK_SECTORS: u32 = 1 << 21;

/// Whether the kernel's thin-pool takes blocks of `sectors` and they map with a shift: a
/// power of two from 64 KiB to 1 GiB.
pub fn valid_block_sectors(sectors: u32) -> bool {
    sectors.is_power_of_two()
        && (MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS).contains(&sectors)
}
/// The smallest device a pool of `block_sectors` blocks fits on: the fixed areas and at
/// least 8 MiB, and one whole block, of data.
pub fn min_device_bytes(block_sectors: u32) -> u64 {
    let block_bytes = u64::from(block_sectors) * 512;
    MIN_DEVICE_BYTES.max(8 * MIB + block_bytes.max(8 * MIB))
}

/// Each catalog slot; two alternate.
pub const CATALOG_SLOT_BYTES: u64 = MIB;
/// The smallest device worth a pool: the fixed areas plus some data.
pub const MIN_DEVICE_BYTES: u64 = 32 * MIB;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub device_bytes: u64,
    pub catalog_offset: u64,
    pub catalog_slot_bytes: u64,
    pub meta_offset: u64,
    pub meta_bytes: u64,
    pub data_offset: u64,
    pub data_bytes: u64,
    pub data_block_sectors: u32,
}

impl Superblock {
    /// Lays out a device of `device_bytes`: superblock and padding in the first MiB, the
    /// two catalog slots, the thin metadata area (48 bytes per data block as the kernel
    /// documentation sizes it, at least 4 MiB), and the data area of whole thin blocks of
    /// `block_sectors`, all MiB-aligned.
    pub fn layout(uuid: [u8; 16], device_bytes: u64, block_sectors: u32) -> Option<Superblock> {
        if device_bytes < MIN_DEVICE_BYTES || !valid_block_sectors(block_sectors) {
            return None;
        }
        let block_bytes = u64::from(block_sectors) * 512;
        let catalog_offset = MIB;
        let meta_offset = catalog_offset + 2 * CATALOG_SLOT_BYTES + MIB;
        let meta_bytes = (48 * (device_bytes / block_bytes))
            .div_ceil(MIB)
            .saturating_mul(MIB)
            .clamp(4 * MIB, 16 << 30);
        let data_offset = meta_offset + meta_bytes;
        let data_bytes = device_bytes.checked_sub(data_offset)? / block_bytes * block_bytes;
        if data_bytes < 8 * MIB {
            return None;
        }
        Some(Superblock {
            uuid,
            device_bytes,
            catalog_offset,
            catalog_slot_bytes: CATALOG_SLOT_BYTES,
            meta_offset,
            meta_bytes,
            data_offset,
            data_bytes,
            data_block_sectors: block_sectors,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        for (i, v) in [
            self.device_bytes,
            self.catalog_offset,
            self.catalog_slot_bytes,
            self.meta_offset,
            self.meta_bytes,
            self.data_offset,
            self.data_bytes,
        ]
        .into_iter()
        .enumerate()
        {
            b[32 + i * 8..40 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        b[88..92].copy_from_slice(&self.data_block_sectors.to_le_bytes());
        let crc = crc32c::crc32c(&b[..SIZE - 4]);
        b[SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a block that starts with our magic; errors say what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<Superblock, String> {
        if b.len() < SIZE || &b[0..8] != MAGIC {
            return Err("no pool superblock".into());
        }
        let stored = u32::from_le_bytes(b[SIZE - 4..SIZE].try_into().unwrap_or_default());
        if crc32c::crc32c(&b[..SIZE - 4]) != stored {
            return Err("pool superblock checksum mismatch (damaged superblock)".into());
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(format!(
                "pool superblock version {version}, this storaged reads {VERSION}"
            ));
        }
        let u =
            |i: usize| u64::from_le_bytes(b[32 + i * 8..40 + i * 8].try_into().unwrap_or_default());
        let sb = Superblock {
            uuid: b[16..32].try_into().unwrap_or_default(),
            device_bytes: u(0),
            catalog_offset: u(1),
            catalog_slot_bytes: u(2),
            meta_offset: u(3),
            meta_bytes: u(4),
            data_offset: u(5),
            data_bytes: u(6),
            data_block_sectors: u32::from_le_bytes(b[88..92].try_into().unwrap_or_default()),
        };
        let ends_ok = sb.catalog_offset + 2 * sb.catalog_slot_bytes <= sb.meta_offset
            && sb.meta_offset + sb.meta_bytes <= sb.data_offset
            && sb.data_offset + sb.data_bytes <= sb.device_bytes
            && valid_block_sectors(sb.data_block_sectors)
            && sb.data_bytes.is_multiple_of(512);
        if !ends_ok {
            return Err("pool superblock has an impossible layout".into());
        }
        Ok(sb)
    }

    pub fn uuid_string(&self) -> String {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// What the start of a device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// All zeros: free to claim.
    Empty,
    /// Our superblock (possibly damaged: the string says how).
    Pool(Result<Superblock, String>),
    /// Something else, named.
    Foreign(String),
}

/// Bytes to read from the start of the device for [`probe`]: 64 KiB and the 4 KiB
/// after, where btrfs keeps its first superblock (its first 64 KiB may be all zeros).
pub const PROBE_BYTES: usize = 68 * 1024;

/// Looks at the first [`PROBE_BYTES`] of a device. Known signatures are named; any other
/// non-zero byte is "unrecognized data", because a pool must never overwrite something
/// it cannot name.
pub fn probe(head: &[u8]) -> Probe {
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    if at(0, MAGIC) {
        return Probe::Pool(Superblock::decode(head));
    }
    let found = if at(0, b"LUKS\xba\xbe") {
        Some("a LUKS header")
    } else if at(0, b"XFSB") {
        Some("an XFS filesystem")
    } else if at(1024 + 56, &[0x53, 0xef]) {
        Some("an ext2/3/4 filesystem")
    } else if at(65536 + 64, b"_BHRfS_M") {
        Some("a btrfs filesystem")
    } else if at(1024, &0xe0f5_e1e2u32.to_le_bytes()) {
        Some("an erofs filesystem")
    } else if at(0, b"hsqs") {
        Some("a squashfs filesystem")
    } else if at(512, b"LABELONE") {
        Some("an LVM physical volume")
    } else if at(4086, b"SWAPSPACE2") {
        Some("a swap area")
    } else if at(0, b"verity\0\0") {
        Some("a dm-verity hash tree")
    } else if at(512, b"EFI PART") {
        Some("a GPT partition table")
    } else if at(510, &[0x55, 0xaa]) {
        Some("an MBR partition table or boot sector")
    } else {
        None
    };
    match found {
        Some(f) => Probe::Foreign(f.into()),
        None if head.iter().any(|&b| b != 0) => Probe::Foreign("unrecognized data".into()),
        None => Probe::Empty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_roundtrips_and_areas_do_not_overlap() {
        let sb = Superblock::layout([7; 16], 256 << 20, DATA_BLOCK_SECTORS).unwrap();
        assert_eq!(sb.catalog_offset, 1 << 20);
        assert!(sb.catalog_offset + 2 * sb.catalog_slot_bytes <= sb.meta_offset);
        assert_eq!(sb.meta_bytes, 4 << 20);
        assert_eq!(sb.data_offset, sb.meta_offset + sb.meta_bytes);
        assert!(sb.data_offset + sb.data_bytes <= 256 << 20);
        assert_eq!(sb.data_bytes % (512 * 1024), 0);
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        // 1 TiB: metadata grows with the number of blocks.
        let big = Superblock::layout([0; 16], 1 << 40, DATA_BLOCK_SECTORS).unwrap();
        assert_eq!(big.meta_bytes, 96 << 20);
    }

    #[test]
    fn the_block_size_is_the_formats_choice_and_bad_ones_get_no_layout() {
        let sb = Superblock::layout([7; 16], 256 << 20, 128).unwrap();
        assert_eq!(sb.data_block_sectors, 128);
        assert_eq!(sb.data_bytes % (64 * 1024), 0);
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
        for bad in [0, 64, 127, 192, 1000, MAX_DATA_BLOCK_SECTORS * 2] {
            assert!(
                Superblock::layout([7; 16], 256 << 20, bad).is_none(),
                "{bad}"
            );
        }
        // The largest blocks need a device of one block and the fixed areas.
        let min = min_device_bytes(MAX_DATA_BLOCK_SECTORS);
        assert_eq!(min, (1 << 30) + (8 << 20));
        assert!(Superblock::layout([7; 16], min, MAX_DATA_BLOCK_SECTORS).is_some());
        assert!(Superblock::layout([7; 16], min - (1 << 20), MAX_DATA_BLOCK_SECTORS).is_none());
        assert_eq!(min_device_bytes(DATA_BLOCK_SECTORS), MIN_DEVICE_BYTES);
        assert!(Superblock::layout([7; 16], MIN_DEVICE_BYTES, DATA_BLOCK_SECTORS).is_some());
        // A stored block size the kernel would refuse is a damaged superblock.
        let mut odd = sb.clone();
        odd.data_block_sectors = 192;
        assert!(Superblock::decode(&odd.encode()).is_err());
    }

    #[test]
    fn too_small_device_gets_no_layout() {
        assert!(Superblock::layout([0; 16], 16 << 20, DATA_BLOCK_SECTORS).is_none());
    }

    #[test]
    fn damaged_superblock_is_reported_not_trusted() {
        let mut b = Superblock::layout([1; 16], 64 << 20, DATA_BLOCK_SECTORS)
            .unwrap()
            .encode();
        b[40] ^= 1;
        match probe(&b) {
            Probe::Pool(Err(e)) => assert!(e.contains("checksum")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn probe_names_foreign_signatures() {
        let mut head = vec![0u8; PROBE_BYTES];
        assert_eq!(probe(&head), Probe::Empty);
        head[1080] = 0x53;
        head[1081] = 0xef;
        assert_eq!(
            probe(&head),
            Probe::Foreign("an ext2/3/4 filesystem".into())
        );
        let mut gpt = vec![0u8; PROBE_BYTES];
        gpt[510] = 0x55;
        gpt[511] = 0xaa;
        gpt[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(probe(&gpt), Probe::Foreign("a GPT partition table".into()));
        let mut xfs = vec![0u8; PROBE_BYTES];
        xfs[..4].copy_from_slice(b"XFSB");
        assert_eq!(probe(&xfs), Probe::Foreign("an XFS filesystem".into()));
        let mut btrfs = vec![0u8; PROBE_BYTES];
        btrfs[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");
        assert_eq!(probe(&btrfs), Probe::Foreign("a btrfs filesystem".into()));
        let mut other = vec![0u8; PROBE_BYTES];
        other[40000] = 1;
        assert_eq!(probe(&other), Probe::Foreign("unrecognized data".into()));
    }
}
