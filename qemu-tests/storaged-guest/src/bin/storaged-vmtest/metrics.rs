//! The metrics scenario of the CSI phase: `/metrics` fetched over the guest's loopback
//! from the endpoint the daemon serves, and the figures a dashboard relies on moving
//! with a create, a write and a delete.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use storaged::csi::api::*;
use storaged::csi::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volume_capability::Mode;

use super::csi::{call, cap, create, stage, unstage};
use super::pattern;

pub const ADDR: &str = "127.0.0.1:9402";
const MIB: i64 = 1 << 20;

/// GET /metrics at `addr`, as name{labels} -> value.
pub async fn scrape(addr: &str) -> Result<HashMap<String, u64>, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .await
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP reply from {addr}: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") || !head.contains("application/openmetrics-text") {
        return Err(format!("reply: {head:?}"));
    }
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

fn get(m: &HashMap<String, u64>, key: &str) -> Result<u64, String> {
    m.get(key)
        .copied()
        .ok_or_else(|| format!("/metrics has no {key}"))
}

/// A block volume: created, written through its device, deleted; the figures follow.
pub async fn metrics_move(c: &Client) -> Result<(), String> {
    let before = scrape(ADDR).await?;
    if get(&before, "storaged_pool_present")? != 1 {
        return Err("storaged_pool_present is not 1".into());
    }
    let volumes = r#"storaged_volumes{kind="volume"}"#;
    let used = "storaged_pool_data_used_blocks";
    let block = cap(true, Mode::SingleNodeWriter);
    let _: CreateVolumeResponse = call(
        c,
        "/csi.v1.Controller/CreateVolume",
        create("metered", 16 * MIB, block.clone()),
    )
    .await?;
    let created = scrape(ADDR).await?;
    if get(&created, volumes)? != get(&before, volumes)? + 1 {
        return Err(format!(
            "volume count {} -> {} after a create",
            before[volumes], created[volumes]
        ));
    }
    let size = get(&created, r#"storaged_volume_size_bytes{volume="metered"}"#)?;
    let promised = "storaged_pool_provisioned_bytes";
    if size != 16 << 20 || get(&created, promised)? != get(&before, promised)? + size {
        return Err(format!("size {size}, provisioned {}", created[promised]));
    }
    let staging = "/csi/staging/metered";
    let _: NodeStageVolumeResponse = call(
        c,
        "/csi.v1.Node/NodeStageVolume",
        stage("metered", staging, block.clone()),
    )
    .await?;
    let dev = Path::new("/dev/mapper/edgepool-v-metered");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| format!("open {}: {e}", dev.display()))?;
    for blk in 0..1024u64 {
        f.write_all_at(&pattern(77, blk), blk * 4096)
            .map_err(|e| format!("write {}: {e}", dev.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", dev.display()))?;
    drop(f);
    let written = scrape(ADDR).await?;
    let mapped = get(
        &written,
        r#"storaged_volume_mapped_bytes{volume="metered"}"#,
    )?;
    let wbytes = get(
        &written,
        r#"storaged_volume_written_bytes_total{volume="metered"}"#,
    )?;
    let writes = get(
        &written,
        r#"storaged_volume_writes_completed_total{volume="metered"}"#,
    )?;
    let block_bytes = get(&written, "storaged_pool_data_block_bytes")?;
    let grew = get(&written, used)? - get(&created, used)?;
    println!(
        "metrics: mapped {mapped} bytes, written {wbytes} bytes in {writes} writes, \
         data used +{grew} blocks of {block_bytes} bytes"
    );
    if mapped < 4 << 20 || wbytes < 4 << 20 || writes == 0 || grew * block_bytes < 4 << 20 {
        return Err(format!(
            "after writing 4 MiB: mapped {mapped}, written {wbytes} in {writes}, \
             data used +{grew} blocks"
        ));
    }
    let _: NodeUnstageVolumeResponse = call(
        c,
        "/csi.v1.Node/NodeUnstageVolume",
        unstage("metered", staging),
    )
    .await?;
    let _: DeleteVolumeResponse = call(
        c,
        "/csi.v1.Controller/DeleteVolume",
        DeleteVolumeRequest {
            volume_id: "metered".into(),
        },
    )
    .await?;
    let deleted = scrape(ADDR).await?;
    if get(&deleted, volumes)? != get(&before, volumes)?
        || get(&deleted, used)? > get(&before, used)?
        || deleted.contains_key(r#"storaged_volume_size_bytes{volume="metered"}"#)
    {
        return Err(format!(
            "after the delete: {} volumes, {} data blocks used (before: {}, {})",
            deleted[volumes], deleted[used], before[volumes], before[used]
        ));
    }
    // Each CSI call counted under its method (absent before its first call).
    let ok = |m: &HashMap<String, u64>, method: &str| {
        m.get(&format!(
            r#"storaged_csi_calls_total{{method="{method}",result="ok"}}"#
        ))
        .copied()
        .unwrap_or(0)
    };
    for method in [
        "CreateVolume",
        "NodeStageVolume",
        "NodeUnstageVolume",
        "DeleteVolume",
    ] {
        if ok(&deleted, method) != ok(&before, method) + 1 {
            return Err(format!(
                "storaged_csi_calls_total of {method}: {} before one call, {} after",
                ok(&before, method),
                ok(&deleted, method)
            ));
        }
    }
    Ok(())
}
