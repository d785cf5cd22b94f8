//! The light-VM test program: PID 1 of a Debian kernel booted by qemu-tests' `lightvm`
//! with raw virtio disks. It loads the modules listed in /modules.order, finds the disks by
//! serial number, runs the scenarios of `vmtest.phase=` on the real kernel
//! device-mapper (`first`, `second`: the pool; `csi`, `csi-reboot`: the CSI endpoint, in
//! `csi.rs`; `kill`: the daemon killed during CSI calls, in `kill.rs`; `xfs`,
//! `xfs-reboot`: XFS volumes, in `xfs.rs`; `part`, `part-reboot`, `part-refused`: the
//! pool partition on the system disk, in `part.rs`),
//! prints `TEST <name> ok|FAILED: <why>` and powers off.

// Each scenario is a closure called in place, so `?` reports its first failure.
#![allow(clippy::redundant_closure_call)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use storaged::{Error, Options, Pool};
use storaged_guest::disk;

mod csi;
mod kill;
mod metrics;
mod part;
mod xfs;

const MIB: u64 = 1 << 20;

fn main() {
    storaged_guest::setup(Default::default());
    let phase = std::fs::read_to_string("/proc/cmdline")
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vmtest.phase=").map(str::to_owned))
        .unwrap_or_default();
    match phase.as_str() {
        "first" => first(),
        "second" => second(),
        "csi" => csi::run(false),
        "csi-reboot" => csi::run(true),
        "kill" => kill::run(),
        "part" => part::first(),
        "part-reboot" => part::reboot(),
        "part-refused" => part::refused(),
        "xfs" => xfs::run(false),
        "xfs-reboot" => xfs::run(true),
        other => report("phase", Err(format!("unknown vmtest.phase {other:?}"))),
    }
    println!("VMTEST DONE");
    // SAFETY: plain syscalls; powering off is the point.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}

fn report(name: &str, r: Result<(), String>) {
    match r {
        Ok(()) => println!("TEST {name} ok"),
        Err(e) => println!("TEST {name} FAILED: {}", e.replace('\n', " ")),
    }
}

fn opts() -> Options {
    Options {
        overcommit_percent: 300,
        ..Default::default()
    }
}

fn e2s(e: Error) -> String {
    e.to_string()
}

/// Deterministic content of 4 KiB block `block` for pattern `seed`.
fn pattern(seed: u64, block: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    let mut x =
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for _ in 0..512 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

fn open_rw(path: &Path) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))
}

fn write_pattern(path: &Path, seed: u64, bytes: u64) -> Result<(), String> {
    let f = open_rw(path)?;
    for blk in 0..bytes / 4096 {
        f.write_all_at(&pattern(seed, blk), blk * 4096)
            .map_err(|e| format!("write {} block {blk}: {e}", path.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))
}

fn check_pattern(path: &Path, seed: u64, bytes: u64) -> Result<(), String> {
    let f = open_rw(path)?;
    let mut buf = vec![0u8; 4096];
    for blk in 0..bytes / 4096 {
        f.read_exact_at(&mut buf, blk * 4096)
            .map_err(|e| format!("read {} block {blk}: {e}", path.display()))?;
        if buf != pattern(seed, blk) {
            return Err(format!(
                "{} block {blk} does not hold pattern {seed}",
                path.display()
            ));
        }
    }
    Ok(())
}

fn size_of(path: &Path) -> Result<u64, String> {
    use std::io::Seek;
    open_rw(path)?
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| e.to_string())
}

fn first() {
    report(
        "foreign_data_refused",
        (|| {
            let d = disk("foreign0")?;
            match Pool::open(&d, opts()) {
                Err(e @ Error::ForeignData { .. })
                    if e.to_string().contains(&*d.to_string_lossy()) =>
                {
                    Ok(())
                }
                Err(e) => Err(format!("wrong error: {e}")),
                Ok(_) => Err("claimed a disk with a partition table".into()),
            }
        })(),
    );
    let pool = disk("pool0").and_then(|d| Pool::open(&d, opts()).map_err(e2s));
    let mut pool = match pool {
        Ok(p) if p.formatted => {
            report("create_pool", Ok(()));
            p
        }
        Ok(_) => return report("create_pool", Err("empty disk was not formatted".into())),
        Err(e) => return report("create_pool", Err(e)),
    };
    report(
        "two_volumes_write_and_read",
        (|| {
            pool.create_volume("a", 32 * MIB).map_err(e2s)?;
            pool.create_volume("b", 32 * MIB).map_err(e2s)?;
            let (a, b) = (
                pool.activate("a").map_err(e2s)?,
                pool.activate("b").map_err(e2s)?,
            );
            write_pattern(&a, 1, 8 * MIB)?;
            write_pattern(&b, 2, 8 * MIB)?;
            check_pattern(&a, 1, 8 * MIB)?;
            check_pattern(&b, 2, 8 * MIB)
        })(),
    );
    report(
        "snapshot_keeps_old_data",
        (|| {
            pool.snapshot("a", "a-snap").map_err(e2s)?;
            let a = pool.activate("a").map_err(e2s)?;
            write_pattern(&a, 3, 8 * MIB)?;
            let s = pool.activate("a-snap").map_err(e2s)?;
            check_pattern(&s, 1, 8 * MIB)?;
            check_pattern(&a, 3, 8 * MIB)
        })(),
    );
    report(
        "delete_returns_space",
        (|| {
            pool.create_volume("c", 32 * MIB).map_err(e2s)?;
            let c = pool.activate("c").map_err(e2s)?;
            write_pattern(&c, 4, 8 * MIB)?;
            let before = pool.status().map_err(e2s)?.used_data_blocks;
            pool.delete("c").map_err(e2s)?;
            let after = pool.status().map_err(e2s)?.used_data_blocks;
            let blocks = 8 * MIB / (u64::from(pool.superblock().data_block_sectors) * 512);
            if before < after + blocks {
                return Err(format!("used data blocks went from {before} to {after}"));
            }
            if pool.volume("c").is_ok() {
                return Err("deleted volume still listed".into());
            }
            Ok(())
        })(),
    );
    report(
        "expand_keeps_data",
        (|| {
            pool.expand("b", 48 * MIB).map_err(e2s)?;
            let b = pool.activate("b").map_err(e2s)?;
            let size = size_of(&b)?;
            if size != 48 * MIB {
                return Err(format!("b is {size} bytes after expanding to 48 MiB"));
            }
            check_pattern(&b, 2, 8 * MIB)
        })(),
    );
    report(
        "bad_requests_are_named_errors",
        (|| {
            let dup = pool.create_volume("a", MIB).map(|_| ()).map_err(e2s);
            let huge = pool.create_volume("huge", 1 << 40).map(|_| ()).map_err(e2s);
            let gone = pool.delete("nope").map_err(e2s);
            match (dup, huge, gone) {
                (Err(d), Err(h), Err(g))
                    if d.contains("already exists")
                        && h.contains("overcommit")
                        && g.contains("nope") =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        })(),
    );
    report("close", pool.close().map_err(e2s));
}

fn second() {
    // The near-full warnings are log lines: on the console for the host to check.
    let _ = edge_common::init_logging("info");
    let mut pool = match disk("pool0").and_then(|d| Pool::open(&d, opts()).map_err(e2s)) {
        Ok(p) if !p.formatted => p,
        Ok(_) => {
            return report(
                "catalog_survives_reboot",
                Err("pool was formatted again".into()),
            )
        }
        Err(e) => return report("catalog_survives_reboot", Err(e)),
    };
    let check = |pool: &Pool| -> Result<(), String> {
        // "big" is the full-pool test's own volume.
        let names: Vec<&str> = pool
            .volumes()
            .iter()
            .map(|v| v.name.as_str())
            .filter(|n| *n != "big")
            .collect();
        if names != ["a", "b", "a-snap"] && names != ["a", "a-snap", "b"] {
            return Err(format!("volumes after reboot: {names:?}"));
        }
        check_pattern(&pool.activate("a").map_err(e2s)?, 3, 8 * MIB)?;
        check_pattern(&pool.activate("a-snap").map_err(e2s)?, 1, 8 * MIB)?;
        let b = pool.activate("b").map_err(e2s)?;
        if size_of(&b)? != 48 * MIB {
            return Err("b lost its expansion".into());
        }
        check_pattern(&b, 2, 8 * MIB)
    };
    report("data_survives_reboot", check(&pool));
    report(
        "full_pool_errors_and_keeps_data",
        (|| {
            pool.create_volume("big", 160 * MIB).map_err(e2s)?;
            let big = pool.activate("big").map_err(e2s)?;
            // O_DIRECT: each write reaches the pool and fails by itself when it is full,
            // instead of failing later in page-cache writeback.
            let f = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&big)
                    .map_err(|e| format!("open {}: {e}", big.display()))?
            };
            let mut raw = vec![0u8; 2 * MIB as usize];
            let off = raw.as_ptr().align_offset(4096);
            let buf = &mut raw[off..off + MIB as usize];
            let mut failed = None;
            for mib in 0..160u64 {
                for (i, blk) in buf.chunks_mut(4096).enumerate() {
                    blk.copy_from_slice(&pattern(9, mib * 256 + i as u64));
                }
                if let Err(e) = f.write_all_at(buf, mib * MIB) {
                    failed = Some(e);
                    break;
                }
                // What the daemon's timer does, once per MiB: each threshold crossed
                // is logged once.
                pool.check_fullness().map_err(e2s)?;
            }
            let Some(err) = failed else {
                return Err("160 MiB fit a pool of about 120 MiB with 24 MiB used".into());
            };
            println!("full pool write error: {err}");
            drop(f);
            let st = pool.status().map_err(e2s)?;
            if st.used_data_blocks != st.total_data_blocks {
                return Err(format!(
                    "write failed ({err}) with the pool not full: {st:?}"
                ));
            }
            match pool.create_volume("more", MIB) {
                Err(Error::OutOfSpace { .. }) => {}
                other => return Err(format!("create on a full pool: {other:?}")),
            }
            check(&pool)
        })(),
    );
    report(
        "near_full_warnings",
        (|| {
            let n = pool.near_full();
            if n.data != 95 {
                return Err(format!("full pool: near-full levels {n:?}"));
            }
            // Freeing the filler brings the pool back below 80%: one INFO line.
            pool.delete("big").map_err(e2s)?;
            let st = pool.check_fullness().map_err(e2s)?;
            let n = pool.near_full();
            if n.data != 0 {
                return Err(format!("after freeing: {n:?} at {st:?}"));
            }
            let text = storaged::metrics::render(Some(&pool));
            if !text.contains("storaged_pool_near_full{resource=\"data\"} 0\n") {
                return Err(format!("metrics after freeing:\n{text}"));
            }
            Ok(())
        })(),
    );
}
