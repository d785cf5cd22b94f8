//! Reading the ext4 superblock of the data partition: is it ext4 at all (else first boot:
//! format it), and did the last shutdown leave the journal needing recovery.

/// The superblock starts 1024 bytes into the device.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC: u16 = 0xEF53;
const OFF_MAGIC: usize = 0x38;
const OFF_STATE: usize = 0x3A;
const OFF_FEATURE_INCOMPAT: usize = 0x60;
/// INCOMPAT_RECOVER: set while mounted with a journal, cleared by a clean unmount.
const INCOMPAT_RECOVER: u32 = 0x4;
/// s_state bit 1: the kernel found errors (EXT4_ERROR_FS); fsck has not run since.
const STATE_ERROR: u16 = 0x2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4State {
    /// The journal has transactions to replay: the file system was not unmounted.
    pub needs_recovery: bool,
    /// The kernel recorded file system errors.
    pub errors: bool,
}

/// `None` when the bytes (starting at the superblock, at least 0x64 long) are not ext2/3/4.
pub fn parse(sb: &[u8]) -> Option<Ext4State> {
    if sb.len() < OFF_FEATURE_INCOMPAT + 4 {
        return None;
    }
    let magic = u16::from_le_bytes([sb[OFF_MAGIC], sb[OFF_MAGIC + 1]]);
    if magic != MAGIC {
        return None;
    }
    let state = u16::from_le_bytes([sb[OFF_STATE], sb[OFF_STATE + 1]]);
    let incompat = u32::from_le_bytes(
        sb[OFF_FEATURE_INCOMPAT..OFF_FEATURE_INCOMPAT + 4]
            .try_into()
            .ok()?,
    );
    Some(Ext4State {
        needs_recovery: incompat & INCOMPAT_RECOVER != 0,
        errors: state & STATE_ERROR != 0,
    })
}

/// Reads the superblock of `path`: `Ok(None)` means "not ext4" (first boot), an I/O error
/// is an error (a disk that cannot be read must not be reformatted).
pub fn read(path: &std::path::Path) -> crate::error::Result<Option<Ext4State>> {
    use crate::error::Error;
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = [0u8; 1024];
    let mut f = std::fs::File::open(path).map_err(Error::io("open", path))?;
    f.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(Error::io("read the superblock of", path))?;
    Ok(parse(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn mkfs(path: &std::path::Path) -> bool {
        let Some(mke2fs) = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            return false;
        };
        std::fs::write(path, vec![0u8; 8 << 20]).unwrap();
        let st = Command::new(mke2fs)
            .args(["-t", "ext4", "-q", "-F", "-L", "data"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
        true
    }

    #[test]
    fn fresh_mkfs_image_is_ext4_and_clean() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        if !mkfs(&img) {
            edge_common::precondition_missing("mke2fs");
            return;
        }
        assert_eq!(
            read(&img).unwrap(),
            Some(Ext4State {
                needs_recovery: false,
                errors: false
            })
        );
    }

    #[test]
    fn recover_flag_in_a_real_image_means_unclean() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        if !mkfs(&img) {
            edge_common::precondition_missing("mke2fs");
            return;
        }
        // What a crash leaves: the kernel sets RECOVER when it mounts a journalled fs and
        // clears it on unmount. Set it by hand in the real image, as the kernel would.
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[1024 + 0x60] |= 0x4;
        std::fs::write(&img, bytes).unwrap();
        assert!(read(&img).unwrap().unwrap().needs_recovery);
    }

    #[test]
    fn zeroed_or_foreign_disk_is_not_ext4() {
        assert_eq!(parse(&[0u8; 1024]), None);
        assert_eq!(parse(&[0u8; 10]), None);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("zero.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert_eq!(read(&img).unwrap(), None);
        // Too short to hold a superblock: an error, never a reason to format.
        std::fs::write(&img, vec![0u8; 1500]).unwrap();
        assert!(read(&img).unwrap_err().to_string().contains("zero.img"));
    }
}
