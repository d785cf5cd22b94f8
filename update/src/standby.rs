//! A fresh disk's standby entry, shipped as the bytes it differs by. Both slots of a
//! fresh disk hold the same root, so slot B's UKI is slot A's but for the command line's
//! `edge.slot` and the signed PCR 11 policy of that line: a few hundred bytes of ten
//! megabytes. The image ships slot A's UKI and a [`Standby`] (at [`PATH`] on the ESP);
//! stage 1 of the first boot writes slot B's UKI from the two, byte for byte the one the
//! build made (its size and SHA-256 are checked), so a box whose slot A fails on its
//! first boots still falls back to slot B.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{hex, Error};

/// Where the image puts it on the ESP (relative to the ESP's root).
pub const PATH: &str = "EFI/edgeos/standby.json";
/// The most differing bytes one may carry: the two UKIs differ in two short sections.
pub const MAX_PATCH_BYTES: usize = 16 << 10;
/// Differing runs closer than this are carried as one.
const JOIN: usize = 16;

/// How to make the standby entry from the entry it differs from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Standby {
    /// The entry it is made from, as named on a fresh disk without its boot counter:
    /// `edgeos-0.1.0-a` (`edgeos-0.1.0-a+3.efi`, `edgeos-0.1.0-a.efi`, ... match).
    pub from: String,
    /// The file it is written as in `EFI/Linux`: `edgeos-0.1.0-b+0.efi`.
    pub entry: String,
    /// The size and SHA-256 (hex) of both files.
    pub size: u64,
    pub from_sha256: String,
    pub sha256: String,
    /// Where the entry's bytes differ from the source's, in order.
    pub patches: Vec<Patch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub offset: u64,
    /// The entry's bytes there, in hex.
    pub bytes: String,
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn err(why: impl Into<String>) -> Error {
    Error::Standby(why.into())
}

impl Standby {
    /// The description of `to` as `from` with a few bytes changed; an error when the two
    /// differ in length or in more than [`MAX_PATCH_BYTES`].
    pub fn make(from_name: &str, entry: &str, from: &[u8], to: &[u8]) -> Result<Standby, Error> {
        if from.len() != to.len() {
            return Err(err(format!(
                "cannot be made from {from_name}: it is {} bytes and the source {}",
                to.len(),
                from.len()
            )));
        }
        let mut patches: Vec<Patch> = Vec::new();
        let mut carried = 0;
        let mut i = 0;
        while i < to.len() {
            if from[i] == to[i] {
                i += 1;
                continue;
            }
            let start = i;
            // The run ends where JOIN equal bytes in a row begin (or at the end).
            let mut end = i + 1;
            while end < to.len() {
                let same = (end..(end + JOIN).min(to.len())).all(|j| from[j] == to[j]);
                if same {
                    break;
                }
                end += 1;
            }
            carried += end - start;
            if carried > MAX_PATCH_BYTES {
                return Err(err(format!(
                    "cannot be made from {from_name}: they differ in more than {MAX_PATCH_BYTES} bytes"
                )));
            }
            patches.push(Patch {
                offset: start as u64,
                bytes: hex(&to[start..end]),
            });
            i = end;
        }
        Ok(Standby {
            from: from_name.to_string(),
            entry: entry.to_string(),
            size: to.len() as u64,
            from_sha256: sha256_hex(from),
            sha256: sha256_hex(to),
            patches,
        })
    }

    /// How many bytes the entry differs from its source by.
    pub fn changed_bytes(&self) -> usize {
        self.patches.iter().map(|p| p.bytes.len() / 2).sum()
    }

    /// Reads a description, checking its shape (not yet the files it names).
    pub fn parse(text: &[u8]) -> Result<Standby, Error> {
        let s: Standby =
            serde_json::from_slice(text).map_err(|e| err(format!("is not valid: {e}")))?;
        for (what, name) in [("from", &s.from), ("entry", &s.entry)] {
            if name.is_empty() || name.contains(['/', '\\', '\0']) || name.starts_with('.') {
                return Err(err(format!(
                    "is not valid: {what} {name:?} is not a file name"
                )));
            }
        }
        if !s.entry.ends_with(".efi") {
            return Err(err(format!(
                "is not valid: entry {:?} does not end in .efi",
                s.entry
            )));
        }
        Ok(s)
    }

    /// Whether `file` (a name in `EFI/Linux`) is the source entry, under any boot counter.
    pub fn is_source(&self, file: &str) -> bool {
        file.strip_prefix(self.from.as_str())
            .is_some_and(|rest| rest == ".efi" || (rest.starts_with('+') && rest.ends_with(".efi")))
    }

    /// The standby entry's bytes from the source's, checked against the build's.
    pub fn apply(&self, from: &[u8]) -> Result<Vec<u8>, Error> {
        if from.len() as u64 != self.size || sha256_hex(from) != self.from_sha256 {
            return Err(err(format!(
                "cannot be made: the source {} is not the one the image shipped ({} bytes, SHA-256 {}; expected {} bytes, {})",
                self.from,
                from.len(),
                sha256_hex(from),
                self.size,
                self.from_sha256
            )));
        }
        let mut out = from.to_vec();
        for p in &self.patches {
            let bytes = unhex(&p.bytes).ok_or_else(|| {
                err(format!(
                    "is not valid: the patch at {} is not hex",
                    p.offset
                ))
            })?;
            let start = usize::try_from(p.offset).unwrap_or(usize::MAX);
            let end = start.checked_add(bytes.len()).filter(|&e| e <= out.len());
            let Some(end) = end else {
                return Err(err(format!(
                    "is not valid: the patch at {} runs past the file's {} bytes",
                    p.offset,
                    out.len()
                )));
            };
            out[start..end].copy_from_slice(&bytes);
        }
        let got = sha256_hex(&out);
        if got != self.sha256 {
            return Err(err(format!(
                "came out with SHA-256 {got}, not the build's {}",
                self.sha256
            )));
        }
        Ok(out)
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Vec<u8>, Vec<u8>) {
        let a: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut b = a.clone();
        b[1000] ^= 1; // edge.slot=a -> b
        b[50_000..50_300]
            .iter_mut()
            .for_each(|x| *x = x.wrapping_add(3)); // .pcrsig
        b[99_999] = 0;
        (a, b)
    }

    #[test]
    fn the_standby_comes_out_as_the_build_made_it() {
        let (a, b) = pair();
        let s = Standby::make("edgeos-0.1.0-a", "edgeos-0.1.0-b+0.efi", &a, &b).unwrap();
        assert_eq!(s.patches.len(), 3, "{s:?}");
        let text = serde_json::to_vec(&s).unwrap();
        assert!(text.len() < 2000, "{} bytes", text.len());
        let back = Standby::parse(&text).unwrap();
        assert_eq!(back.apply(&a).unwrap(), b);
    }

    #[test]
    fn another_source_is_refused_naming_it() {
        let (a, b) = pair();
        let s = Standby::make("edgeos-0.1.0-a", "edgeos-0.1.0-b+0.efi", &a, &b).unwrap();
        let mut other = a.clone();
        other[5] ^= 0xff;
        let e = s.apply(&other).unwrap_err().to_string();
        assert!(
            e.contains("edgeos-0.1.0-a is not the one the image shipped"),
            "{e}"
        );
        let e = s.apply(&a[1..]).unwrap_err().to_string();
        assert!(e.contains("99999 bytes"), "{e}");
    }

    #[test]
    fn a_patch_that_does_not_give_the_build_s_bytes_is_refused() {
        let (a, b) = pair();
        let mut s = Standby::make("edgeos-0.1.0-a", "edgeos-0.1.0-b+0.efi", &a, &b).unwrap();
        s.patches[0].bytes = "00".into();
        let e = s.apply(&a).unwrap_err().to_string();
        assert!(e.contains("not the build's"), "{e}");
        s.patches[0].bytes = "0g".into();
        assert!(s.apply(&a).unwrap_err().to_string().contains("not hex"));
        s.patches[0] = Patch {
            offset: 99_999,
            bytes: "0000".into(),
        };
        let e = s.apply(&a).unwrap_err().to_string();
        assert!(e.contains("runs past"), "{e}");
        s.patches[0].offset = u64::MAX;
        assert!(s.apply(&a).unwrap_err().to_string().contains("runs past"));
    }

    #[test]
    fn files_that_differ_much_or_in_length_are_not_described() {
        let (a, _) = pair();
        let other: Vec<u8> = a.iter().map(|x| !x).collect();
        let e = Standby::make("x", "y.efi", &a, &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 16384 bytes"), "{e}");
        let e = Standby::make("x", "y.efi", &a, &a[1..])
            .unwrap_err()
            .to_string();
        assert!(e.contains("99999 bytes and the source 100000"), "{e}");
    }

    #[test]
    fn bad_descriptions_are_named() {
        for (text, says) in [
            (&b"{"[..], "is not valid"),
            (br#"{"from":"../a","entry":"b.efi","size":1,"from_sha256":"","sha256":"","patches":[]}"#, "from \"../a\" is not a file name"),
            (br#"{"from":"a","entry":"b","size":1,"from_sha256":"","sha256":"","patches":[]}"#, "does not end in .efi"),
            (br#"{"from":"a","entry":"b.efi","size":1,"from_sha256":"","sha256":"","patches":[],"x":1}"#, "unknown field"),
        ] {
            let e = Standby::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(e.starts_with("the standby entry"), "{e}");
        }
    }

    #[test]
    fn the_source_is_known_under_any_boot_counter() {
        let (a, b) = pair();
        let s = Standby::make("edgeos-0.1.0-a", "edgeos-0.1.0-b+0.efi", &a, &b).unwrap();
        for yes in [
            "edgeos-0.1.0-a+3.efi",
            "edgeos-0.1.0-a+1-2.efi",
            "edgeos-0.1.0-a.efi",
        ] {
            assert!(s.is_source(yes), "{yes}");
        }
        for no in [
            "edgeos-0.1.0-b+0.efi",
            "edgeos-0.1.0-a1.efi",
            "edgeos-0.1.0-a+3.efi.tmp",
        ] {
            assert!(!s.is_source(no), "{no}");
        }
    }
}
