//! What a request may ask: access modes and types, file systems, capacity ranges and
//! mount flags, each refused with the code and the field the CSI specification names.

// tonic::Status is the reply itself on every error path; boxing it buys nothing.
#![allow(clippy::result_large_err)]

use tonic::Status;
use volume_capability::{AccessType, Mode};

use crate::catalog::Volume as CatalogVolume;
use crate::csi::api::*;
use crate::mounts::Fs;

use super::DEFAULT_BYTES;

/// A volume capability, checked.
#[derive(Debug, Clone)]
pub(super) struct Cap {
    pub(super) block: bool,
    /// The filesystem asked for; None: what the volume holds, ext4 if it is new.
    pub(super) fs: Option<Fs>,
    pub(super) mount_flags: Vec<String>,
    pub(super) mode: Mode,
}

impl Cap {
    pub(super) fn read_only(&self) -> bool {
        matches!(
            self.mode,
            Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly
        )
    }
}

pub(super) fn mode_name(m: Mode) -> String {
    format!("{m:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
            sep.into_iter()
                .chain(std::iter::once(c.to_ascii_uppercase()))
        })
        .collect()
}

pub(super) fn check_cap(c: &VolumeCapability) -> Result<Cap, Status> {
    let mode = c
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .filter(|m| *m != Mode::Unknown)
        .ok_or_else(|| Status::invalid_argument("volume capability: access_mode is required"))?;
    match &c.access_type {
        None => Err(Status::invalid_argument(
            "volume capability: one of block or mount is required",
        )),
        Some(AccessType::Block(_)) => match mode {
            Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter => Ok(Cap {
                block: true,
                fs: None,
                mount_flags: vec![],
                mode,
            }),
            // Several writers (or readers) of one raw device would need a shared-disk
            // filesystem above it; only filesystem volumes are shared.
            other => Err(Status::invalid_argument(format!(
                "access mode {} is for filesystem volumes only; block volumes are \
                 SINGLE_NODE_WRITER or SINGLE_NODE_SINGLE_WRITER",
                mode_name(other)
            ))),
        },
        Some(AccessType::Mount(m)) => {
            let fs = Fs::parse(&m.fs_type).map_err(Status::invalid_argument)?;
            if !m.volume_mount_group.is_empty() {
                return Err(Status::invalid_argument(
                    "volume_mount_group is not supported",
                ));
            }
            Ok(Cap {
                block: false,
                fs,
                mount_flags: m.mount_flags.clone(),
                mode,
            })
        }
    }
}

pub(super) fn check_caps(caps: &[VolumeCapability], call: &str) -> Result<Vec<Cap>, Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{call}: volume_capabilities are required"
        )));
    }
    caps.iter().map(check_cap).collect()
}

pub(super) fn the_cap(c: Option<&VolumeCapability>, call: &str) -> Result<Cap, Status> {
    check_cap(c.ok_or_else(|| {
        Status::invalid_argument(format!("{call}: volume_capability is required"))
    })?)
}

/// A volume of `size` bytes is too small for a filesystem one of `caps` asks for.
pub(super) fn check_fs_size(caps: &[Cap], name: &str, size: u64) -> Result<(), Status> {
    for fs in caps.iter().filter_map(|c| c.fs) {
        if size < fs.min_bytes() {
            return Err(Status::out_of_range(format!(
                "volume {name}: {size} bytes is too small for {} (at least {} MiB)",
                fs.name(),
                fs.min_bytes() >> 20
            )));
        }
    }
    Ok(())
}

/// The size a capacity range asks for: (size to create, limit or 0).
pub(super) fn wanted_size(range: Option<&CapacityRange>) -> Result<(u64, u64), Status> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: sizes must not be negative",
        ));
    }
    let (req, lim) = (req as u64, lim as u64);
    let size = match (req, lim) {
        (0, 0) => DEFAULT_BYTES,
        (0, l) => l.min(DEFAULT_BYTES),
        (r, _) => r,
    };
    let size = size.checked_next_multiple_of(4096).unwrap_or(u64::MAX);
    if lim > 0 && size > lim {
        return Err(Status::out_of_range(format!(
            "capacity_range: no size in whole 4 KiB blocks between {req} and {lim} bytes"
        )));
    }
    Ok((size, lim))
}

pub(super) fn fits(v: &CatalogVolume, range: Option<&CapacityRange>) -> bool {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    v.size_bytes >= req.max(0) as u64 && (lim <= 0 || v.size_bytes <= lim as u64)
}

/// Mount flags the kernel takes as flags; the rest go to ext4 as options.
pub(super) fn split_flags(flags: &[String]) -> (libc::c_ulong, String) {
    let mut bits = 0;
    let mut data = Vec::new();
    for f in flags {
        match f.as_str() {
            "ro" => bits |= libc::MS_RDONLY,
            "noatime" => bits |= libc::MS_NOATIME,
            "nodiratime" => bits |= libc::MS_NODIRATIME,
            "relatime" => bits |= libc::MS_RELATIME,
            "nosuid" => bits |= libc::MS_NOSUID,
            "nodev" => bits |= libc::MS_NODEV,
            "noexec" => bits |= libc::MS_NOEXEC,
            "sync" => bits |= libc::MS_SYNCHRONOUS,
            "dirsync" => bits |= libc::MS_DIRSYNC,
            "rw" | "defaults" => {}
            other => data.push(other.to_owned()),
        }
    }
    (bits, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(block: bool, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(if block {
                AccessType::Block(volume_capability::BlockVolume {})
            } else {
                AccessType::Mount(volume_capability::MountVolume::default())
            }),
            access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn shared_access_modes_are_for_filesystems_only() {
        for m in [
            Mode::SingleNodeMultiWriter,
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeReaderOnly,
            Mode::SingleNodeReaderOnly,
        ] {
            assert!(check_cap(&cap(false, m)).is_ok(), "{m:?}");
            let e = check_cap(&cap(true, m)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(&mode_name(m)), "{}", e.message());
        }
        assert!(check_cap(&cap(true, Mode::SingleNodeWriter)).is_ok());
        assert_eq!(
            mode_name(Mode::MultiNodeMultiWriter),
            "MULTI_NODE_MULTI_WRITER"
        );
        assert!(check_cap(&cap(false, Mode::Unknown)).is_err());
    }

    #[test]
    fn fs_types_ext4_and_xfs_only() {
        let with = |fs: &str| VolumeCapability {
            access_type: Some(AccessType::Mount(volume_capability::MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
            access_mode: Some(volume_capability::AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert_eq!(check_cap(&with("")).unwrap().fs, None);
        assert_eq!(check_cap(&with("ext4")).unwrap().fs, Some(Fs::Ext4));
        let xfs = check_cap(&with("xfs")).unwrap();
        assert_eq!(xfs.fs, Some(Fs::Xfs));
        let e = check_cap(&with("btrfs")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("btrfs"), "{}", e.message());
        let small = check_fs_size(std::slice::from_ref(&xfs), "v", 100 << 20).unwrap_err();
        assert_eq!(small.code(), tonic::Code::OutOfRange);
        assert!(small.message().contains("xfs"), "{}", small.message());
        assert!(check_fs_size(&[xfs], "v", 300 << 20).is_ok());
    }

    #[test]
    fn capacity_ranges() {
        let r = |req, lim| CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(wanted_size(None).unwrap().0, DEFAULT_BYTES);
        assert_eq!(wanted_size(Some(&r(5000, 0))).unwrap().0, 8192);
        assert_eq!(wanted_size(Some(&r(0, 4096))).unwrap().0, 4096);
        assert_eq!(
            wanted_size(Some(&r(5000, 6000))).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        assert_eq!(
            wanted_size(Some(&r(-1, 0))).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn mount_flags_split_into_bits_and_options() {
        let (bits, data) = split_flags(&["noatime".into(), "ro".into(), "data=ordered".into()]);
        assert_eq!(bits, libc::MS_NOATIME | libc::MS_RDONLY);
        assert_eq!(data, "data=ordered");
    }
}
