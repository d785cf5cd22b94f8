//! Fetching an item: small ones from the KV bucket, large ones from the object store
//! chunk by chunk, resumed after a cut from the progress saved beside the partial file,
//! hashed before anything is written, and never when it would fill the data partition.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::manifest::Item;
use super::status::{Download, Status};
use crate::error::{Error, Result};

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Whether `need` more bytes of `name` fit on a file system with `free` of `total` bytes
/// free, leaving a twentieth of it free for the log and the rest of the box: a download
/// that would fill the data partition does not start (it is retried with the next
/// manifest or session, from what it has).
pub(super) fn room_for(name: &str, need: u64, free: u64, total: u64) -> Result<()> {
    let keep = total / 20;
    if need == 0 || free >= need.saturating_add(keep) {
        return Ok(());
    }
    Err(Error::NoRoom {
        name: name.to_owned(),
        need,
        free,
        keep,
    })
}

/// Gives an update's file the time it was published as its modification time.
pub(super) fn stamp_published(path: &Path, ms: u64) -> Result<()> {
    let when = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .map_err(Error::io("open", path))?;
    if file.metadata().and_then(|m| m.modified()).ok() == Some(when) {
        return Ok(());
    }
    file.set_modified(when)
        .and_then(|()| file.sync_all())
        .map_err(Error::io("set the time of", path))
}

/// The sha256 of a file already in place, read in chunks (an update bundle can be
/// larger than the memory to spare); None when it cannot be read.
pub(super) async fn sha256_file(path: &Path) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut buf).await.ok()? {
            0 => return Some(edge_common::hex::encode(ctx.finish().as_ref())),
            n => ctx.update(&buf[..n]),
        }
    }
}

/// Where objects come from: the store (for their info) and its stream (for the chunks,
/// from any sequence).
pub(super) struct Objects {
    pub(super) store: async_nats::jetstream::object_store::ObjectStore,
    pub(super) stream: async_nats::jetstream::stream::Stream,
    pub(super) client: async_nats::Client,
    pub(super) bucket: String,
    pub(super) max_bytes_per_sec: Option<u64>,
}

/// Progress of an interrupted object download, saved beside its partial file.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub(super) struct Progress {
    nuid: String,
    bytes: u64,
    next_seq: u64,
}

pub(super) async fn save_progress(path: &Path, p: &Progress) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, serde_json::to_vec(p).unwrap_or_default()).await?;
    tokio::fs::File::open(&tmp).await?.sync_data().await?;
    tokio::fs::rename(&tmp, path).await
}

/// Why a fetch failed: a transfer that can be resumed later (the core or this box's
/// disk failed it), or bytes that must go.
pub(super) enum Failure {
    Interrupted(Error),
    Refused(Error),
}

/// Streams one item into a temp file beside its destination while hashing it; renames
/// it into place only when the hash matches. An interrupted object download keeps its
/// partial file and progress for the next attempt; a refused item leaves nothing.
pub(super) async fn fetch_item(
    item: &Item,
    kv: &async_nats::jetstream::kv::Store,
    objects: &Objects,
    dir: &Path,
    status: &Status,
) -> Result<bool, Failure> {
    let kind_dir = dir.join(&item.kind);
    tokio::fs::create_dir_all(&kind_dir)
        .await
        .map_err(|e| Failure::Interrupted(Error::io("create", &kind_dir)(e)))?;
    let dest = kind_dir.join(&item.name);
    if sha256_file(&dest).await.as_deref() == Some(item.sha256.to_ascii_lowercase().as_str()) {
        return Ok(false);
    }
    let tmp = kind_dir.join(format!(".{}.partial", item.name));
    let progress = kind_dir.join(format!(".{}.progress", item.name));
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let fetched = if item.store == "kv" {
        fetch_kv(item, kv, &tmp, &mut ctx, status).await
    } else {
        // No download shown once this one ends, or is dropped (a newer manifest came).
        struct Shown<'a>(&'a Status);
        impl Drop for Shown<'_> {
            fn drop(&mut self) {
                self.0.set_downloading(None);
            }
        }
        let _shown = Shown(status);
        fetch_object(item, objects, &tmp, &progress, &mut ctx, status).await
    };
    let digest = edge_common::hex::encode(ctx.finish().as_ref());
    let verdict = fetched.and_then(|()| {
        if digest.eq_ignore_ascii_case(&item.sha256) {
            Ok(())
        } else {
            Err(Failure::Refused(Error::HashMismatch {
                name: item.name.clone(),
                store: item.store.clone(),
                key: item.key.clone(),
                digest: digest.clone(),
                expected: item.sha256.clone(),
            }))
        }
    });
    if let Err(failure) = verdict {
        if let Failure::Refused(_) = failure {
            let _ = tokio::fs::remove_file(&tmp).await;
            let _ = tokio::fs::remove_file(&progress).await;
        }
        return Err(failure);
    }
    place(item, &tmp, &progress, &dest, &kind_dir)
        .await
        .map_err(Failure::Interrupted)?;
    Ok(true)
}

/// A verified download put in place: synced, stamped, renamed over `dest`.
async fn place(
    item: &Item,
    tmp: &Path,
    progress: &Path,
    dest: &Path,
    kind_dir: &Path,
) -> Result<()> {
    // The daemon's runtime is single-threaded: file I/O goes through tokio::fs so a
    // sync does not stall the producers.
    let synced = match tokio::fs::OpenOptions::new().write(true).open(tmp).await {
        Ok(f) => f.sync_all().await,
        Err(e) => Err(e),
    };
    synced.map_err(Error::io("sync", tmp))?;
    // Stamped before it is in place: init never sees the copy with another time.
    if let Some(ms) = item.published_ms {
        stamp_published(tmp, ms)?;
    }
    tokio::fs::rename(tmp, dest)
        .await
        .map_err(|source| Error::Rename {
            from: tmp.to_owned(),
            source,
        })?;
    let _ = tokio::fs::remove_file(progress).await;
    sync_dir(kind_dir).map_err(Error::io("sync", kind_dir))
}

pub(super) async fn fetch_kv(
    item: &Item,
    kv: &async_nats::jetstream::kv::Store,
    tmp: &Path,
    ctx: &mut ring::digest::Context,
    status: &Status,
) -> Result<(), Failure> {
    let value = kv
        .get(&item.key)
        .await
        .map_err(|e| {
            Failure::Interrupted(Error::core(format!("failed to get KV key {}", item.key))(e))
        })?
        .ok_or_else(|| Failure::Refused(Error::NoKvKey(item.key.clone())))?;
    status
        .fetched_bytes
        .fetch_add(value.len() as u64, Ordering::Relaxed);
    ctx.update(&value);
    tokio::fs::write(tmp, &value)
        .await
        .map_err(|e| Failure::Interrupted(Error::io("write", tmp)(e)))
}

/// Reads the object's chunks from its stream, from the start or from where an earlier
/// attempt stopped.
pub(super) async fn fetch_object(
    item: &Item,
    objects: &Objects,
    tmp: &Path,
    progress_file: &Path,
    ctx: &mut ring::digest::Context,
    status: &Status,
) -> Result<(), Failure> {
    use async_nats::jetstream::consumer::{push, DeliverPolicy};
    let interrupted = |what: &str, e: &dyn std::fmt::Display| {
        Failure::Interrupted(Error::Object {
            what: what.to_owned(),
            key: item.key.clone(),
            detail: e.to_string(),
        })
    };
    let info = objects
        .store
        .info(&item.key)
        .await
        .map_err(|e| interrupted("failed to get", &e))?;
    let size = info.size as u64;
    let saved: Option<Progress> = std::fs::read(progress_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(tmp)
        .await
        .map_err(|e| interrupted(&format!("failed to open {} for", tmp.display()), &e))?;
    let have = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    // Resume only the same object (the nuid changes when it is put again), and only up
    // to what was synced before the progress was saved.
    let (mut bytes, deliver) = match saved {
        Some(p) if p.nuid == info.nuid && p.bytes <= have && p.bytes <= size && p.bytes > 0 => {
            tracing::info!(object = %item.key, at = p.bytes, of = size, "resuming the download");
            status.resumed_bytes.fetch_add(p.bytes, Ordering::Relaxed);
            (
                p.bytes,
                DeliverPolicy::ByStartSequence {
                    start_sequence: p.next_seq,
                },
            )
        }
        _ => (0, DeliverPolicy::All),
    };
    let write_err = |e: std::io::Error| Failure::Interrupted(Error::io("write", tmp)(e));
    file.set_len(bytes).await.map_err(write_err)?;
    if let Some(dir) = tmp.parent() {
        if let Ok(st) = rustix::fs::statvfs(dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let total = st.f_blocks.saturating_mul(st.f_frsize);
            room_for(&item.name, size.saturating_sub(bytes), free, total)
                .map_err(Failure::Interrupted)?;
        }
    }
    {
        // The bytes kept are hashed again from the disk: cheaper than fetching them.
        use tokio::io::AsyncReadExt;
        let mut kept = (&mut file).take(bytes);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = kept.read(&mut buf).await.map_err(write_err)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
    }
    if bytes == size {
        return Ok(());
    }
    let mut shown = Download {
        kind: item.kind.clone(),
        name: item.name.clone(),
        bytes,
        size,
    };
    status.set_downloading(Some(shown.clone()));
    let mut chunks = objects
        .stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: objects.client.new_inbox(),
            filter_subject: format!("$O.{}.C.{}", objects.bucket, info.nuid),
            deliver_policy: deliver,
            ..Default::default()
        })
        .await
        .map_err(|e| interrupted("failed to read", &e))?
        .messages()
        .await
        .map_err(|e| interrupted("failed to read", &e))?;
    let started = Instant::now();
    let mut this_session = 0u64;
    let mut last_save = Instant::now();
    let mut saved_at = bytes;
    while bytes < size {
        let chunk = tokio::time::timeout(Duration::from_secs(30), chunks.next())
            .await
            .map_err(|_| interrupted("no chunk for 30 s from", &"timed out"))?
            .ok_or_else(|| interrupted("the chunks ended early for", &"end of stream"))?
            .map_err(|e| interrupted("failed to read", &e))?;
        let seq = chunk
            .info()
            .map_err(|e| interrupted("bad chunk of", &e))?
            .stream_sequence;
        if bytes + chunk.payload.len() as u64 > size {
            return Err(Failure::Refused(Error::ObjectTooLong {
                key: item.key.clone(),
                size,
            }));
        }
        {
            use tokio::io::AsyncWriteExt;
            file.write_all(&chunk.payload).await.map_err(write_err)?;
        }
        ctx.update(&chunk.payload);
        bytes += chunk.payload.len() as u64;
        this_session += chunk.payload.len() as u64;
        status
            .fetched_bytes
            .fetch_add(chunk.payload.len() as u64, Ordering::Relaxed);
        // Saved every half second or MiB: what a cut loses is fetched again.
        if last_save.elapsed() > Duration::from_millis(500)
            || bytes - saved_at >= 1 << 20
            || bytes == size
        {
            {
                use tokio::io::AsyncWriteExt;
                file.flush().await.map_err(write_err)?;
            }
            file.sync_data().await.map_err(write_err)?;
            let p = Progress {
                nuid: info.nuid.clone(),
                bytes,
                next_seq: seq + 1,
            };
            save_progress(progress_file, &p)
                .await
                .map_err(|e| Failure::Interrupted(Error::io("write", progress_file)(e)))?;
            last_save = Instant::now();
            saved_at = bytes;
            shown.bytes = bytes;
            status.set_downloading(Some(shown.clone()));
        }
        if let Some(rate) = objects.max_bytes_per_sec {
            let due = Duration::from_secs_f64(this_session as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(())
}
