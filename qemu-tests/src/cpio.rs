//! The initramfs archive: a newc ("070701") cpio writer with fixed owners, times and inode
//! numbers, so the same tree always gives the same bytes.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

pub struct Writer<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer {
            out,
            ino: 0,
            written: 0,
        }
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> Result<()> {
        self.entry(name, 0o040000 | perm, 2, &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.entry(name, 0o100000 | perm, 1, data)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> Result<()> {
        self.ino += 1;
        let ino = self.ino;
        self.raw(name, ino, mode, nlink, data)
    }

    fn raw(&mut self, name: &str, ino: u32, mode: u32, nlink: u32, data: &[u8]) -> Result<()> {
        let size = u32::try_from(data.len()).context("file too large for cpio newc")?;
        let namesize = name.len() as u32 + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .context("failed to write the cpio archive")?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        self.raw("TRAILER!!!", 0, 0, 1, &[])?;
        Ok(self.out)
    }
}

/// Archives the directory tree at `root` (directories and regular files only), in sorted
/// order with parents first, names relative to it.
pub fn archive_tree<W: Write>(root: &Path, w: &mut Writer<W>) -> Result<()> {
    fn walk<W: Write>(root: &Path, dir: &Path, w: &mut Writer<W>) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("failed to read {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let name = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let ft = e.file_type()?;
            if ft.is_dir() {
                w.dir(&name, 0o755)?;
                walk(root, &path, w)?;
            } else if ft.is_file() {
                use std::os::unix::fs::PermissionsExt;
                let perm = e.metadata()?.permissions().mode() & 0o777;
                let data = std::fs::read(&path)
                    .with_context(|| format!("failed to read {}", path.display()))?;
                w.file(&name, perm, &data)?;
            } else {
                anyhow::bail!(
                    "{}: only directories and regular files go into the initramfs",
                    path.display()
                );
            }
        }
        Ok(())
    }
    walk(root, root, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_what_the_kernel_reads() {
        let mut w = Writer::new(Vec::new());
        w.dir("etc", 0o755).unwrap();
        w.file("etc/x", 0o644, b"hello").unwrap();
        let out = w.finish().unwrap();
        // Every header starts 4-byte aligned with the newc magic.
        assert!(out.starts_with(b"070701"));
        let hdr = &out[..110];
        let field = |i: usize| {
            u32::from_str_radix(
                std::str::from_utf8(&hdr[6 + i * 8..14 + i * 8]).unwrap(),
                16,
            )
            .unwrap()
        };
        assert_eq!(field(1), 0o040755); // mode
        assert_eq!(field(11), 4); // "etc\0"
                                  // 110 + 4 = 114, padded to 116.
        assert_eq!(&out[116..122], b"070701");
        let second = &out[116..];
        assert_eq!(&second[110..116], b"etc/x\0");
        // 110 + 6 = 116 already aligned; data follows, padded to 4.
        assert_eq!(&second[116..121], b"hello");
        let trailer = &second[124..];
        assert!(trailer.starts_with(b"070701"));
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn same_tree_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("b/c")).unwrap();
        std::fs::write(dir.path().join("b/c/f"), b"1").unwrap();
        std::fs::write(dir.path().join("a"), b"2").unwrap();
        let build = || {
            let mut w = Writer::new(Vec::new());
            archive_tree(dir.path(), &mut w).unwrap();
            w.finish().unwrap()
        };
        let one = build();
        assert_eq!(one, build());
        // Sorted, parents first: "a" then "b", "b/c", "b/c/f".
        let text = String::from_utf8_lossy(&one);
        let pos = |s: &str| text.find(s).unwrap();
        assert!(
            pos("a\0") < pos("b\0") && pos("b\0") < pos("b/c\0") && pos("b/c\0") < pos("b/c/f\0")
        );
    }
}
