//! Names and quantities as Kubernetes writes them: DNS labels, volume ids, CPU and
//! memory quantities, and the path joiner the errors use.

use serde_yaml::Value;

use crate::error::{Error, Result};

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Quantities may be written as YAML numbers (`cpu: 2`) or strings (`cpu: "500m"`).
pub(super) fn quantity_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Names become parts of containerd's names, log directories and label values.
pub(super) fn check_dns_label(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::bad_value(
            s,
            "must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'",
        ))
    }
}

/// storaged's rule for volume ids (its catalog names); the id also names noded's
/// staging directory, so it can never be `..` or hold a `/`.
pub(super) fn check_volume_id(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && !s.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::bad_value(
            s,
            "must be 1-64 of a-z, 0-9, '.', '_' or '-', not starting with '.' or '-'",
        ))
    }
}

/// A CPU quantity in millicores: "500m", "2", "0.5".
pub fn parse_cpu(s: &str) -> Result<i64> {
    let bad = || Error::bad_value(s, "is not a CPU quantity (like 500m, 2 or 0.5)");
    let millis = if let Some(m) = s.strip_suffix('m') {
        m.parse::<i64>().map_err(|_| bad())?
    } else {
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let frac_millis: i64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<3}").parse().map_err(|_| bad())?
        };
        whole
            .checked_mul(1000)
            .and_then(|w| w.checked_add(frac_millis))
            .ok_or_else(bad)?
    };
    if millis <= 0 {
        return Err(Error::bad_value(s, "must be more than zero"));
    }
    Ok(millis)
}

/// A memory quantity in bytes: "64Mi", "1G", "1048576", "1e6".
pub fn parse_memory(s: &str) -> Result<i64> {
    let bad = || Error::bad_value(s, "is not a memory quantity (like 64Mi, 1G or 1048576)");
    const SUFFIXES: &[(&str, i64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (digits, mult) = SUFFIXES
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|d| (d, *m)))
        .unwrap_or((s, 1));
    let (digits, mult) = match digits.split_once(['e', 'E']) {
        Some((d, exp)) if mult == 1 => {
            let exp: u32 = exp.parse().map_err(|_| bad())?;
            (d, 10i64.checked_pow(exp).ok_or_else(bad)?)
        }
        _ => (digits, mult),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if bytes <= 0 {
        return Err(Error::bad_value(s, "must be more than zero"));
    }
    Ok(bytes)
}
