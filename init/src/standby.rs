//! A fresh disk's standby entry, written by stage 1 of its first boot. The image ships
//! slot A's UKI and, in place of slot B's, the bytes B's differs by
//! (`EFI/edgeos/standby.json`, edge_update::standby): both slots hold the same root, so
//! B's UKI is A's with another `edge.slot` on its signed command line. Stage 1 writes
//! B's entry (`edgeos-<v>-b+0.efi`) from the two before it opens the root, so a box whose
//! slot A fails on its first boot still falls back to B, and removes the description.
//! Each later boot finds no description and leaves the ESP as it is.

use std::path::Path;

use edge_update::standby::{self, Standby};

use crate::error::{Error, Result};
use crate::say;

/// Writes the standby entry if the ESP still ships its description. Never fails the
/// boot: a failure is said and the boot goes on without the standby.
pub fn write_if_shipped() {
    match crate::esp::with_esp(write) {
        Ok(Ok(Some(line))) => say!("{line}"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) | Err(e) => say!("warning: no standby entry written: {e}"),
    }
}

/// The standby entry from the description at `esp`/[`standby::PATH`]; `None` when
/// there is none.
fn write(esp: &Path) -> Result<Option<String>> {
    let desc = esp.join(standby::PATH);
    // Read as the ESP's provisioning file is: bounded, absent is `None`.
    let Some(text) = crate::provision::read(&desc)? else {
        return Ok(None);
    };
    let dir = esp.join("EFI/Linux");
    let parsed = Standby::parse(&text);
    let s = match parsed {
        Ok(s) => s,
        Err(e) => {
            // Not one to act on at any later boot either.
            remove(&desc);
            return Err(e.into());
        }
    };
    let mut source = None;
    for e in std::fs::read_dir(&dir)
        .map_err(Error::io("list", &dir))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == s.entry
            || s.entry.split_once('+').is_some_and(|(stem, _)| {
                name.starts_with(stem) && name[stem.len()..].starts_with(['+', '.'])
            })
        {
            // B's entry is there already (under any boot counter, or installed by an
            // update): nothing to write.
            remove(&desc);
            return Ok(Some(format!("standby entry: {name} is there already")));
        }
        if s.is_source(&name) {
            source = Some(name);
        }
    }
    let Some(source) = source else {
        remove(&desc);
        return Err(edge_update::Error::Standby(format!(
            "{} cannot be made: no {}[+...].efi in {}",
            s.entry,
            s.from,
            dir.display()
        ))
        .into());
    };
    let from = dir.join(&source);
    let bytes = std::fs::read(&from).map_err(Error::io("read", &from))?;
    let out = match s.apply(&bytes) {
        Ok(out) => out,
        Err(e) => {
            remove(&desc);
            return Err(e.into());
        }
    };
    let tmp = dir.join(format!(".{}.tmp", s.entry));
    let to = dir.join(&s.entry);
    let written = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io("write", &tmp)(e));
    }
    std::fs::rename(&tmp, &to).map_err(Error::io_to("rename", &tmp, "to", &to))?;
    remove(&desc);
    Ok(Some(format!(
        "standby entry written: {} ({} bytes, from {source} and {} changed bytes)",
        s.entry,
        out.len(),
        s.changed_bytes()
    )))
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        say!("warning: failed to remove {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        d
    }

    fn shipped() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let a: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let mut b = a.clone();
        b[700] = b'b';
        let s = Standby::make("edgeos-0.1.0-a", "edgeos-0.1.0-b+0.efi", &a, &b).unwrap();
        (a, b, serde_json::to_vec(&s).unwrap())
    }

    #[test]
    fn the_first_boot_writes_the_standby_and_later_ones_leave_it() {
        let (a, b, desc) = shipped();
        let esp = esp_with(&[
            ("EFI/Linux/edgeos-0.1.0-a+2-1.efi", &a),
            (standby::PATH, &desc),
        ]);
        let line = write(esp.path()).unwrap().unwrap();
        assert!(
            line.contains("standby entry written: edgeos-0.1.0-b+0.efi"),
            "{line}"
        );
        let linux = esp.path().join("EFI/Linux");
        assert_eq!(
            std::fs::read(linux.join("edgeos-0.1.0-b+0.efi")).unwrap(),
            b
        );
        assert!(!esp.path().join(standby::PATH).exists());
        assert_eq!(
            std::fs::read_dir(&linux).unwrap().count(),
            2,
            "no temporary file left"
        );
        assert_eq!(write(esp.path()).unwrap(), None);
    }

    #[test]
    fn an_entry_already_there_is_kept() {
        let (a, _, desc) = shipped();
        let esp = esp_with(&[
            ("EFI/Linux/edgeos-0.1.0-a.efi", &a),
            ("EFI/Linux/edgeos-0.1.0-b.efi", b"blessed"),
            (standby::PATH, &desc),
        ]);
        let line = write(esp.path()).unwrap().unwrap();
        assert!(
            line.contains("edgeos-0.1.0-b.efi is there already"),
            "{line}"
        );
        let b = esp.path().join("EFI/Linux/edgeos-0.1.0-b.efi");
        assert_eq!(std::fs::read(b).unwrap(), b"blessed");
        assert!(!esp.path().join(standby::PATH).exists());
    }

    #[test]
    fn a_changed_source_or_a_bad_description_writes_nothing() {
        let (a, _, desc) = shipped();
        let mut changed = a.clone();
        changed[0] ^= 1;
        let esp = esp_with(&[
            ("EFI/Linux/edgeos-0.1.0-a+3.efi", &changed),
            (standby::PATH, &desc),
        ]);
        let e = write(esp.path()).unwrap_err().to_string();
        assert!(
            e.contains("edgeos-0.1.0-a is not the one the image shipped"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_dir(esp.path().join("EFI/Linux"))
                .unwrap()
                .count(),
            1
        );

        let esp = esp_with(&[(standby::PATH, &desc), ("EFI/Linux/other.efi", b"")]);
        let e = write(esp.path()).unwrap_err().to_string();
        assert!(e.contains("no edgeos-0.1.0-a[+...].efi"), "{e}");

        let esp = esp_with(&[(standby::PATH, b"{\"from\""), ("EFI/Linux/x.efi", b"")]);
        let e = write(esp.path()).unwrap_err().to_string();
        assert!(e.contains("the standby entry is not valid"), "{e}");
        assert!(
            !esp.path().join(standby::PATH).exists(),
            "not tried at every boot"
        );
    }
}
