//! The kernel command line: the `edge.*` parameters that xtask bakes into each UKI.

use std::collections::BTreeMap;

/// The parameters init acts on. `roothash` is the trust anchor of the root file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub slot: String,
    pub version: String,
    pub roothash: String,
    /// Every `edge.*` parameter, without the prefix, for the ones read elsewhere.
    pub extra: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("kernel command line lacks edge.{0}=")]
    Missing(&'static str),
    #[error("kernel command line: edge.slot={0} is neither a nor b")]
    Slot(String),
    #[error("kernel command line: edge.roothash={0} is not a sha256 digest in hex")]
    RootHash(String),
}

pub fn parse(cmdline: &str) -> Result<BootParams, Error> {
    let mut extra = BTreeMap::new();
    for word in cmdline.split_ascii_whitespace() {
        if let Some(rest) = word.strip_prefix("edge.") {
            let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
            extra.insert(k.to_owned(), v.to_owned());
        }
    }
    let take = |key: &'static str| extra.get(key).cloned().ok_or(Error::Missing(key));
    let slot = take("slot")?;
    let version = take("version")?;
    let roothash = take("roothash")?;
    if slot != "a" && slot != "b" {
        return Err(Error::Slot(slot));
    }
    if roothash.len() != 64 || !roothash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::RootHash(roothash));
    }
    Ok(BootParams {
        slot,
        version,
        roothash: roothash.to_ascii_lowercase(),
        extra,
    })
}

/// Reads and parses `/proc/cmdline`.
pub fn read() -> crate::error::Result<BootParams> {
    let text = std::fs::read_to_string("/proc/cmdline")
        .map_err(crate::error::Error::io("read", "/proc/cmdline"))?;
    Ok(parse(&text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_the_edge_parameters() {
        let p = parse(&format!(
            "console=ttyS0 quiet edge.slot=b edge.version=1.2.3 edge.roothash={HASH} edge.debug\n"
        ))
        .unwrap();
        assert_eq!(p.slot, "b");
        assert_eq!(p.version, "1.2.3");
        assert_eq!(p.roothash, HASH);
        assert_eq!(p.extra.get("debug").map(String::as_str), Some(""));
    }

    #[test]
    fn missing_roothash_is_named() {
        let e = parse("edge.slot=a edge.version=1").unwrap_err();
        assert_eq!(e, Error::Missing("roothash"));
    }

    #[test]
    fn bad_slot_and_hash_are_refused() {
        assert!(matches!(
            parse(&format!("edge.slot=c edge.version=1 edge.roothash={HASH}")),
            Err(Error::Slot(_))
        ));
        assert!(matches!(
            parse("edge.slot=a edge.version=1 edge.roothash=xyz"),
            Err(Error::RootHash(_))
        ));
    }
}
