//! Applying a verified manifest: each item written atomically into `<dir>/<kind>/`,
//! an update's window beside it, withdrawn items removed.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::fetch::{fetch_item, stamp_published, Failure, Objects};
use super::manifest::{for_this_box, verify_manifest, Holds, Item, Manifest};
use super::status::Status;
use super::{version_file, Report};
use crate::error::Error;

#[allow(clippy::too_many_arguments)]
pub(super) async fn apply<'a>(
    key: &str,
    signed: &[u8],
    public_key: &[u8],
    kv: &async_nats::jetstream::kv::Store,
    objects: &Objects,
    dir: &Path,
    holds: Holds<'_>,
    mut report: Report<'a>,
    status: &Status,
) -> Report<'a> {
    let manifest = match verify_manifest(signed, public_key) {
        Ok(m) => m,
        Err(e) => {
            report.refused.push((key.to_owned(), e.to_string()));
            return report;
        }
    };
    report.version = Some(manifest.version);
    let applied = match applied_version(dir) {
        Ok(v) => v,
        Err(e) => {
            report.refused.push((key.to_owned(), e.to_string()));
            return report;
        }
    };
    if manifest.version < applied {
        report.refused.push((
            key.to_owned(),
            format!(
                "manifest version {} is older than the applied {applied}",
                manifest.version
            ),
        ));
        return report;
    }
    // Withdrawn first: a replaced bundle must not be installed while its successor
    // downloads, and a revoked pod or model goes before anything new comes.
    for kind in super::KINDS {
        for name in withdraw(&dir.join(kind), kind, key, &manifest) {
            tracing::info!(kind, name = %name, "withdrawn by the core: removed");
            report.applied.push(format!("{kind}/{name} withdrawn"));
        }
    }
    let wanted = for_this_box(&manifest.items, holds);
    for item in wanted.iter().filter(|i| i.kind == "updates") {
        // A copy already here is stamped before its window changes: init, seeing a
        // window lifted, takes the copy as it then is for the trial's.
        let have = dir.join("updates").join(&item.name);
        if let (Some(ms), true) = (item.published_ms, have.exists()) {
            if let Err(e) = stamp_published(&have, ms) {
                report
                    .refused
                    .push((format!("updates/{}", item.name), e.to_string()));
            }
        }
        if let Err(e) = write_window(&dir.join("updates"), item) {
            report
                .refused
                .push((format!("updates/{}", item.name), e.to_string()));
        }
    }
    for item in wanted {
        match fetch_item(item, kv, objects, dir, status).await {
            Ok(true) => {
                status.applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(kind = %item.kind, name = %item.name, "downlink item verified and written");
                report.applied.push(format!("{}/{}", item.kind, item.name));
            }
            Ok(false) => {}
            Err(Failure::Refused(e)) => {
                status.refused.fetch_add(1, Ordering::Relaxed);
                report
                    .refused
                    .push((format!("{}/{}", item.kind, item.name), e.to_string()))
            }
            // Said as refused. When the core failed it (a key or chunk unanswered), the
            // manifest is applied again (the session starts over after a back-off),
            // resuming what was downloaded; this box's disk failing it waits for the
            // next manifest or session, as a full disk would only fail again.
            Err(Failure::Interrupted(e)) => {
                status.refused.fetch_add(1, Ordering::Relaxed);
                let again = matches!(e, Error::Core { .. } | Error::Object { .. });
                report.interrupted |= again;
                report.refused.push((
                    format!("{}/{}", item.kind, item.name),
                    if again {
                        format!("{e} (will be tried again)")
                    } else {
                        e.to_string()
                    },
                ))
            }
        }
    }
    if report.refused.is_empty() {
        let path = version_file(dir);
        let written = std::fs::create_dir_all(dir).and_then(|()| {
            edge_common::write_atomic(&path, format!("{}\n", manifest.version).as_bytes(), 0o644)
        });
        if let Err(e) = written {
            report.refused.push((
                key.to_owned(),
                crate::Error::io("write", &path)(e).to_string(),
            ));
        }
    }
    report
}

/// The version of the last manifest applied, the floor of what is taken next (anti-replay):
/// 0 before the first. A file that cannot be read or does not hold a number fails closed:
/// every manifest is refused, naming it, rather than an old one taken as new.
pub(super) fn applied_version(dir: &Path) -> crate::Result<u64> {
    let path = version_file(dir);
    match std::fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| crate::Error::NotAVersion(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(crate::Error::io("read", &path)(e)),
    }
}

/// An update's window beside it, `<name>.window`, for init; none: the file goes. Written
/// before the bundle is, so init never sees the bundle without its window.
pub(super) fn write_window(updates: &Path, item: &Item) -> crate::Result<()> {
    let path = updates.join(format!("{}.window", item.name));
    match &item.window {
        Some(w) => std::fs::create_dir_all(updates)
            .and_then(|()| edge_common::write_atomic(&path, format!("{w}\n").as_bytes(), 0o644))
            .map_err(crate::Error::io("write", &path)),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(crate::Error::io("remove", &path)(e))
            }
            _ => Ok(()),
        },
    }
}

/// An item stays on the box only while a manifest offers it: a manifest is the whole
/// set the core wants there, so leaving an item out takes it back. Each manifest's offer
/// of a kind (`key`: the site's or the machine's) is kept in `<kind dir>/.offered.<key>`;
/// an item this manifest offered before and offers no more (a pod or model withdrawn, a
/// bundle cancelled by `edgectl update cancel` or replaced) is removed with its partial
/// download, unless the other manifest offers it. What used it stops with it: noded
/// stops a pod whose manifest file went, init drops a withdrawn bundle. An item written
/// before its kind had an offer file (an older fabricd) is not removed. Returns the
/// names removed.
pub(super) fn withdraw(kind_dir: &Path, kind: &str, key: &str, manifest: &Manifest) -> Vec<String> {
    let offered = |file: &Path| -> Vec<String> {
        std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    };
    let own = kind_dir.join(format!(".offered.{key}"));
    let now: Vec<String> = manifest
        .items
        .iter()
        .filter(|i| i.kind == kind)
        .map(|i| i.name.clone())
        .collect();
    let mut elsewhere = Vec::new();
    if let Ok(entries) = std::fs::read_dir(kind_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".offered.") && e.path() != own {
                elsewhere.extend(offered(&e.path()));
            }
        }
    }
    let mut removed = Vec::new();
    for name in offered(&own) {
        if now.contains(&name) || elsewhere.contains(&name) {
            continue;
        }
        let mut gone = false;
        for f in [
            name.clone(),
            format!("{name}.window"),
            format!(".{name}.partial"),
            format!(".{name}.progress"),
        ] {
            gone |= std::fs::remove_file(kind_dir.join(f)).is_ok();
        }
        if gone {
            removed.push(name);
        }
    }
    if !now.is_empty() || own.exists() {
        let _ = std::fs::create_dir_all(kind_dir);
        let body = serde_json::to_vec(&now).unwrap_or_default();
        if let Err(e) = edge_common::write_atomic(&own, &body, 0o644) {
            tracing::warn!("failed to write {}: {e}", own.display());
        }
    }
    removed
}
