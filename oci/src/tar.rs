//! A minimal ustar writer and reader: regular files and directories only, fixed owner
//! and mtime, which is all an image layout and our layers need. Reading accepts what
//! common tar tools emit around that (pax and GNU long-name headers are skipped) and
//! never trusts a size it has not checked against the buffer.

use crate::Error;

/// Tar's block: headers and data padding come in these.
pub const BLOCK: usize = 512;

/// One entry to write: a regular file (`data`) or a directory (`dir`).
pub struct Entry<'a> {
    pub path: &'a str,
    pub data: &'a [u8],
    pub mode: u32,
    pub dir: bool,
}

fn octal(field: &mut [u8], value: u64) -> Result<(), Error> {
    // Octal digits, zero-padded, NUL-terminated: the field's last byte is the NUL.
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    if s.len() > digits {
        return Err(Error::Tar(format!(
            "value {value} does not fit a {digits}-digit tar field"
        )));
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    Ok(())
}

/// Splits `path` into ustar's prefix (155 bytes) and name (100 bytes) fields.
fn split_path(path: &str) -> Result<(&str, &str), Error> {
    if path.len() <= 100 {
        return Ok(("", path));
    }
    for (i, _) in path.match_indices('/') {
        let (prefix, name) = (&path[..i], &path[i + 1..]);
        if prefix.len() <= 155 && name.len() <= 100 && !name.is_empty() {
            return Ok((prefix, name));
        }
    }
    Err(Error::Tar(format!(
        "path {path:?} is too long for a ustar header"
    )))
}

fn header(e: &Entry) -> Result<[u8; BLOCK], Error> {
    let path = if e.dir && !e.path.ends_with('/') {
        format!("{}/", e.path)
    } else {
        e.path.to_string()
    };
    let size = if e.dir { 0 } else { e.data.len() as u64 };
    make_header(&path, size, e.mode, e.dir)
}

/// The header of a regular file of `size` bytes, for a writer that streams the data
/// itself (followed by `padding(size)` zero bytes, and the archive by two zero blocks).
pub fn file_header(path: &str, size: u64, mode: u32) -> Result<[u8; BLOCK], Error> {
    make_header(path, size, mode, false)
}

/// The zero bytes after `size` bytes of data, up to the next 512-byte block.
pub fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

fn make_header(path: &str, size: u64, mode: u32, dir: bool) -> Result<[u8; BLOCK], Error> {
    let mut h = [0u8; BLOCK];
    let (prefix, name) = split_path(path)?;
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], u64::from(mode & 0o7777))?;
    octal(&mut h[108..116], 0)?; // uid
    octal(&mut h[116..124], 0)?; // gid
    octal(&mut h[124..136], size)?;
    octal(&mut h[136..148], 0)?; // mtime: fixed, so builds are reproducible
    h[156] = if dir { b'5' } else { b'0' };
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

/// Writes `entries` in the given order, followed by the two zero blocks that end a tar.
pub fn write(entries: &[Entry]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for e in entries {
        let h = header(e)?;
        out.extend_from_slice(&h);
        if !e.dir {
            out.extend_from_slice(e.data);
            let pad = padding(e.data.len() as u64);
            out.resize(out.len() + pad, 0);
        }
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    Ok(out)
}

/// A regular file found while reading.
pub struct File<'a> {
    pub path: String,
    pub data: &'a [u8],
}

fn parse_octal(field: &[u8], what: &str, at: u64) -> Result<u64, Error> {
    let text: Vec<u8> = field
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .filter(|b| *b != b' ')
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    let s = std::str::from_utf8(&text)
        .map_err(|_| Error::Tar(format!("header at byte {at}: {what} is not text")))?;
    u64::from_str_radix(s, 8)
        .map_err(|_| Error::Tar(format!("header at byte {at}: {what} {s:?} is not octal")))
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// One header, as a reader that streams an archive sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub path: String,
    /// Bytes of data that follow the header (then `padding(size)`).
    pub size: u64,
    /// A regular file (not a directory, link or extended header).
    pub regular: bool,
}

/// Parses the 512-byte header at byte `at` of an archive: `None` for a zero block (the
/// end of the archive). A header whose checksum fails is an error.
pub fn parse_header(h: &[u8], at: u64) -> Result<Option<Header>, Error> {
    let h = h
        .get(..BLOCK)
        .ok_or_else(|| Error::Truncated(format!("header at byte {at} is cut short")))?;
    if h.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let stored = parse_octal(&h[148..156], "checksum", at)?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    if stored != sum {
        return Err(Error::Tar(format!(
            "header at byte {at}: checksum {stored} does not match {sum}"
        )));
    }
    let size = parse_octal(&h[124..136], "size", at)?;
    let name = String::from_utf8_lossy(cstr(&h[..100])).into_owned();
    let prefix = if &h[257..262] == b"ustar" {
        String::from_utf8_lossy(cstr(&h[345..500])).into_owned()
    } else {
        String::new()
    };
    let path = if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    };
    let regular = matches!(h[156], b'0' | 0) && !path.ends_with('/');
    let path = path.strip_prefix("./").unwrap_or(&path).to_string();
    Ok(Some(Header {
        path,
        size,
        regular,
    }))
}

/// Reads every regular file of a tar; directories, links and extended headers are
/// skipped. A header whose checksum fails, or data running past the end, is an error.
pub fn read(buf: &[u8]) -> Result<Vec<File<'_>>, Error> {
    let mut files = Vec::new();
    let mut at = 0usize;
    loop {
        let Some(h) = buf.get(at..at + BLOCK) else {
            // A tar that ends without its zero blocks lost its tail on the way.
            return Err(Error::Truncated(format!(
                "tar ends at byte {} inside or before a header",
                buf.len()
            )));
        };
        let Some(header) = parse_header(h, at as u64)? else {
            return Ok(files);
        };
        let size = usize::try_from(header.size).map_err(|_| {
            Error::Tar(format!(
                "header at byte {at}: size {} too large",
                header.size
            ))
        })?;
        let data_start = at + BLOCK;
        let data = data_start
            .checked_add(size)
            .and_then(|end| buf.get(data_start..end))
            .ok_or_else(|| {
                Error::Truncated(format!(
                    "entry at byte {at} claims {size} bytes, the tar has {}",
                    buf.len().saturating_sub(data_start)
                ))
            })?;
        if header.regular {
            files.push(File {
                path: header.path,
                data,
            });
        }
        at = data_start + size.div_ceil(BLOCK) * BLOCK;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_dirs_round_trip() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        let tar = write(&[
            Entry {
                path: "etc",
                data: b"",
                mode: 0o755,
                dir: true,
            },
            Entry {
                path: "etc/hostname",
                data: b"edge\n",
                mode: 0o644,
                dir: false,
            },
            Entry {
                path: &long,
                data: &[7u8; 1000],
                mode: 0o600,
                dir: false,
            },
        ])
        .unwrap();
        assert_eq!(tar.len() % BLOCK, 0);
        let files = read(&tar).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].path, "etc/hostname");
        assert_eq!(files[0].data, b"edge\n");
        assert_eq!(files[1].path, long);
        assert_eq!(files[1].data, &[7u8; 1000][..]);
    }

    #[test]
    fn a_path_that_fits_no_header_is_refused() {
        let path = "x".repeat(300);
        let err = write(&[Entry {
            path: &path,
            data: b"",
            mode: 0o644,
            dir: false,
        }]);
        assert!(matches!(err, Err(Error::Tar(m)) if m.contains("too long")));
    }

    #[test]
    fn cut_tars_and_bad_checksums_are_errors() {
        let tar = write(&[Entry {
            path: "a",
            data: &[1u8; 700],
            mode: 0o644,
            dir: false,
        }])
        .unwrap();
        for cut in [0, 100, 600, 1500] {
            assert!(
                matches!(read(&tar[..cut]), Err(Error::Truncated(_))),
                "cut at {cut}"
            );
        }
        let mut bad = tar.clone();
        bad[0] = b'b';
        assert!(matches!(read(&bad), Err(Error::Tar(m)) if m.contains("checksum")));
    }
}
