//! The signed manifest and its items: the signature checked with the image's key, each
//! item's kind, name and source checked, and which update items are this box's.

use std::path::Path;

use super::KINDS;
use crate::error::{Error, Result};

#[derive(Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Grows with every manifest; an older one is refused (no rollback by replay).
    pub version: u64,
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub kind: String,
    pub name: String,
    /// `kv` (key in the bucket) or `object` (name in the object store).
    pub store: String,
    pub key: String,
    /// Lowercase hex.
    pub sha256: String,
    /// An update's window (`HH:MM-HH:MM`, UTC): the box reboots into it only then.
    /// fabricd writes it beside the bundle as `<name>.window` for init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// An update's version: a box already running it fetches nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// A delta's base, the version it is made from: only a box running that version
    /// fetches it, and such a box then fetches no whole bundle of the same manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// When the operator published an update (unix ms): the box's copy gets it as its
    /// modification time, so that init takes a copy published anew for a new one (a
    /// version it rolled back from is tried again only then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_ms: Option<u64>,
}

/// The versions a box holds, for which updates are its own: the one it runs (init's
/// boot record) and the one its other slot holds (init's hint beside it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Holds<'a> {
    pub running: Option<&'a str>,
    pub other: Option<&'a str>,
}

/// The items a box fetches: all but the updates that are not for it (its own version;
/// a delta from a version it does not hold; a whole bundle when a delta it can use is
/// offered). A delta from the running version comes first; one from the version the
/// other slot holds (the one before, or one rolled back from) next. A box that does
/// not know what it runs fetches them all and leaves the choice to init.
pub fn for_this_box<'m>(items: &'m [Item], holds: Holds) -> Vec<&'m Item> {
    let Some(running) = holds.running else {
        return items.iter().collect();
    };
    let offered = |v: &str| {
        items
            .iter()
            .any(|i| i.kind == "updates" && i.base.as_deref() == Some(v))
    };
    let from = [Some(running), holds.other]
        .into_iter()
        .flatten()
        .find(|v| offered(v));
    items
        .iter()
        .filter(|i| {
            i.kind != "updates"
                || (i.version.as_deref() != Some(running) && i.base.as_deref() == from)
        })
        .collect()
}

/// Splits and verifies a signed manifest.
pub fn verify_manifest(signed: &[u8], public_key: &[u8]) -> Result<Manifest> {
    let body = edge_common::signed::open(signed, public_key).map_err(Error::Signature)?;
    let m: Manifest =
        serde_json::from_slice(body).map_err(Error::json("signed manifest is not valid"))?;
    for item in &m.items {
        check_item(item)?;
    }
    Ok(m)
}

pub(super) fn check_item(item: &Item) -> Result<()> {
    let bad = |detail: String| Error::Item {
        name: item.name.clone(),
        detail,
    };
    if !KINDS.contains(&item.kind.as_str()) {
        return Err(bad(format!("unknown kind `{}`", item.kind)));
    }
    let safe = !item.name.is_empty()
        && !item.name.starts_with('.')
        && item
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !safe {
        return Err(Error::ItemName(item.name.clone()));
    }
    if item.store != "kv" && item.store != "object" {
        return Err(bad("store must be kv or object".into()));
    }
    if item.kind != "updates"
        && (item.version.is_some() || item.base.is_some() || item.published_ms.is_some())
    {
        return Err(bad(
            "only an update has a version, a base and a publishing time".into(),
        ));
    }
    if let Some(w) = &item.window {
        if item.kind != "updates" {
            return Err(bad("only an update has a window".into()));
        }
        edge_update::window::Window::parse(w).map_err(|e| bad(e.to_string()))?;
    }
    if item.sha256.len() != 64 || !item.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("sha256 must be 64 hex digits".into()));
    }
    Ok(())
}

/// Reads the public key file: 64 hex digits (whitespace around is fine).
pub fn load_public_key(path: &Path) -> Result<Vec<u8>> {
    edge_common::signed::read_public_key(path, "downlink.public_key").map_err(|detail| {
        Error::PublicKey {
            path: path.to_owned(),
            detail,
        }
    })
}
