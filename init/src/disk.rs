//! Finding partitions by GPT label: `/sys/class/block/*/uevent` names each block device's
//! partition label (PARTNAME), node name and device number. Device nodes are made here when
//! devtmpfs has not made them yet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// One block device as the kernel describes it in its uevent file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// e.g. `nvme0n1p2`, `vda2`, `dm-0`.
    pub devname: String,
    pub partname: Option<String>,
    pub major: u32,
    pub minor: u32,
}

impl BlockDev {
    pub fn node(&self, dev_dir: &Path) -> PathBuf {
        dev_dir.join(&self.devname)
    }
}

/// Parses a uevent file (`KEY=value` lines). `None` when it lacks a name or device number.
pub fn parse_uevent(text: &str) -> Option<BlockDev> {
    let mut devname = None;
    let mut partname = None;
    let mut major = None;
    let mut minor = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "DEVNAME" => devname = Some(value.to_owned()),
            "PARTNAME" => partname = Some(value.to_owned()),
            "MAJOR" => major = value.parse().ok(),
            "MINOR" => minor = value.parse().ok(),
            _ => {}
        }
    }
    Some(BlockDev {
        devname: devname?,
        partname,
        major: major?,
        minor: minor?,
    })
}

/// Every block device under `class_dir` (normally `/sys/class/block`) that has a readable
/// uevent file. Devices that vanish mid-scan are skipped: the next poll sees the truth.
pub fn scan(class_dir: &Path) -> Vec<BlockDev> {
    let Ok(entries) = std::fs::read_dir(class_dir) else {
        return Vec::new();
    };
    let mut devs: Vec<BlockDev> = entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("uevent")).ok())
        .filter_map(|t| parse_uevent(&t))
        .collect();
    devs.sort_by(|a, b| a.devname.cmp(&b.devname));
    devs
}

/// Picks, for each wanted label, the device carrying it. A label found twice (two disks
/// with our layout) takes the first in name order, so the choice is at least stable.
pub fn find_labels<'a>(devs: &'a [BlockDev], labels: &[&str]) -> BTreeMap<String, &'a BlockDev> {
    let mut found = BTreeMap::new();
    for label in labels {
        if let Some(d) = devs.iter().find(|d| d.partname.as_deref() == Some(*label)) {
            found.insert((*label).to_owned(), d);
        }
    }
    found
}

/// Polls `class_dir` until every label is present or `timeout` passes. On timeout the error
/// names the missing labels and the block devices that do exist, which is what an operator
/// needs to tell "no disk" from "wrong partition table".
pub fn wait_for_labels(
    class_dir: &Path,
    labels: &[&str],
    timeout: Duration,
    interval: Duration,
) -> Result<BTreeMap<String, BlockDev>> {
    let deadline = Instant::now() + timeout;
    loop {
        let devs = scan(class_dir);
        let found = find_labels(&devs, labels);
        if found.len() == labels.len() {
            return Ok(found.into_iter().map(|(k, v)| (k, v.clone())).collect());
        }
        if Instant::now() >= deadline {
            let missing: Vec<String> = labels
                .iter()
                .filter(|l| !found.contains_key(**l))
                .map(|l| (*l).to_owned())
                .collect();
            let present: Vec<String> = devs
                .iter()
                .map(|d| match &d.partname {
                    Some(p) => format!("{} ({p})", d.devname),
                    None => d.devname.clone(),
                })
                .collect();
            return Err(Error::MissingPartitions {
                missing,
                secs: timeout.as_secs(),
                present,
            });
        }
        std::thread::sleep(interval);
    }
}

/// Makes sure `dev_dir/<devname>` is a block node for the device, creating it when
/// devtmpfs has not (yet). An existing node is trusted: devtmpfs made it from the same data.
pub fn ensure_node(dev: &BlockDev, dev_dir: &Path) -> Result<PathBuf> {
    let node = dev.node(dev_dir);
    if node.exists() {
        return Ok(node);
    }
    if let Some(parent) = node.parent() {
        // DEVNAME may contain a directory (e.g. `mapper/x`); it is usually just a name.
        let _ = std::fs::create_dir_all(parent);
    }
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &node,
        rustix::fs::FileType::BlockDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(dev.major, dev.minor),
    )
    .map_err(|e| Error::DeviceNode {
        path: node.clone(),
        major: dev.major,
        minor: dev.minor,
        source: e.into(),
    })?;
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NVME_PART: &str =
        "MAJOR=259\nMINOR=3\nDEVNAME=nvme0n1p2\nDEVTYPE=partition\nDISKSEQ=1\nPARTN=2\nPARTNAME=root-a\n";

    #[test]
    fn uevent_of_a_partition_gives_label_name_and_number() {
        let d = parse_uevent(NVME_PART).unwrap();
        assert_eq!(
            d,
            BlockDev {
                devname: "nvme0n1p2".into(),
                partname: Some("root-a".into()),
                major: 259,
                minor: 3
            }
        );
    }

    #[test]
    fn uevent_of_a_whole_disk_has_no_label_and_incomplete_ones_are_refused() {
        let d = parse_uevent("MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n").unwrap();
        assert_eq!(d.partname, None);
        assert_eq!(parse_uevent("MAJOR=254\nDEVNAME=vda\n"), None);
    }

    fn fake_sysfs(dir: &Path, entries: &[(&str, &str)]) {
        for (name, uevent) in entries {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("uevent"), uevent).unwrap();
        }
    }

    #[test]
    fn waiting_finds_virtio_partitions_by_label() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(
            dir.path(),
            &[
                ("vda", "MAJOR=254\nMINOR=0\nDEVNAME=vda\n"),
                (
                    "vda2",
                    "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nPARTNAME=root-a\n",
                ),
                (
                    "vda3",
                    "MAJOR=254\nMINOR=3\nDEVNAME=vda3\nPARTNAME=root-a-verity\n",
                ),
                ("vda6", "MAJOR=254\nMINOR=6\nDEVNAME=vda6\nPARTNAME=data\n"),
            ],
        );
        let found = wait_for_labels(
            dir.path(),
            &["root-a", "root-a-verity", "data"],
            Duration::from_millis(10),
            Duration::from_millis(5),
        )
        .unwrap();
        assert_eq!(found["root-a"].devname, "vda2");
        assert_eq!(found["root-a-verity"].devname, "vda3");
        assert_eq!(found["data"].minor, 6);
    }

    #[test]
    fn timeout_names_what_is_missing_and_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(
            dir.path(),
            &[
                ("sda", "MAJOR=8\nMINOR=0\nDEVNAME=sda\n"),
                ("sda1", "MAJOR=8\nMINOR=1\nDEVNAME=sda1\nPARTNAME=root-a\n"),
            ],
        );
        let err = wait_for_labels(
            dir.path(),
            &["root-a", "root-a-verity", "data"],
            Duration::from_millis(20),
            Duration::from_millis(5),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("missing partition(s) root-a-verity, data after"),
            "{err}"
        );
        assert!(err.contains("sda, sda1 (root-a)"), "{err}");
    }
}
