//! A line of a container's CRI log file, as containerd writes them: `<RFC3339Nano
//! timestamp> <stdout|stderr> <P|F>[:tags] <content>`, where `P` marks a partial line
//! continued by the next line of the same stream. noded reads the files back
//! (noded/src/logs.rs) and edgectl prints the lines the core received (`edgectl logs`).

/// One parsed log line: its stream, whether it is complete, and its content.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub stderr: bool,
    pub partial: bool,
    pub content: &'a str,
}

/// Parses one CRI log line; `None` for a line that is not in the format.
pub fn parse_line(line: &str) -> Option<Entry<'_>> {
    let (ts, rest) = line.split_once(' ')?;
    if !is_rfc3339(ts) {
        return None;
    }
    let (stream, rest) = rest.split_once(' ')?;
    let stderr = match stream {
        "stdout" => false,
        "stderr" => true,
        _ => return None,
    };
    // An empty output line is written as "<tag> " or, by some writers, just "<tag>".
    let (tags, content) = rest.split_once(' ').unwrap_or((rest, ""));
    let partial = match tags.split(':').next() {
        Some("P") => true,
        Some("F") => false,
        _ => return None,
    };
    Some(Entry {
        stderr,
        partial,
        content,
    })
}

/// `2026-11-21T21:30:51.123456789Z` or with a `+01:00` offset; the fraction is optional.
fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .is_some_and(|d| d.len() == r.len() && d.iter().all(u8::is_ascii_digit))
    };
    if !(digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && matches!(b.get(10), Some(b'T' | b't'))
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', ..] => {
            let r = &s[i + 1..];
            r.len() == 5
                && r.as_bytes()[2] == b':'
                && r.bytes()
                    .enumerate()
                    .all(|(k, c)| k == 2 || c.is_ascii_digit())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: &str = "2026-11-21T21:30:51.123456789Z";

    #[test]
    fn lines_are_parsed_by_stream_and_tag() {
        let l = format!("{TS} stdout F hello world");
        assert_eq!(
            parse_line(&l),
            Some(Entry {
                stderr: false,
                partial: false,
                content: "hello world"
            })
        );
        let p = "2026-11-21T21:30:51+01:00 stderr P:x part";
        assert_eq!(
            parse_line(p),
            Some(Entry {
                stderr: true,
                partial: true,
                content: "part"
            })
        );
        assert_eq!(parse_line(&format!("{TS} stdout F ")).unwrap().content, "");
        assert_eq!(parse_line(&format!("{TS} stdout F")).unwrap().content, "");
        for bad in [
            "",
            "garbage",
            &format!("{TS} stdin F x"),
            &format!("{TS} stdout X x"),
            "2026-11-21 stdout F x",
            "2026-11-21T21:30:51.Z stdout F x",
            "2026-11-21T21:30:51+0100 stdout F x",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
    }
}
