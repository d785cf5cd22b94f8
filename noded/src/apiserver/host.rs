//! What the Node says of the host: its name, architecture, OS image, memory and
//! address, and the times in the formats Kubernetes uses.

use std::net::Ipv4Addr;
use std::time::SystemTime;

use serde_json::Value;

use super::check_subdomain;
use crate::error::{Error, Result};

pub(super) fn time_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Now as a MicroTime (`2026-11-22T00:35:00.123456Z`, as the Lease's renewTime carries).
pub(super) fn micro_now() -> Value {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = i64::try_from(now.as_secs()).unwrap_or(0);
    let whole = k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.to_string())
        .unwrap_or_default();
    match whole.strip_suffix('Z') {
        Some(w) => format!("{w}.{:06}Z", now.subsec_micros()).into(),
        None => Value::Null,
    }
}

pub(super) fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| Error::NodeName {
            detail: format!("is unreadable: {e}"),
        })?
        .trim()
        .to_lowercase();
    check_subdomain(&name).map_err(|e| Error::NodeName {
        detail: format!("{name:?} cannot be a node name: {e}"),
    })?;
    Ok(name)
}

pub(super) fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub(super) fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "edgeos".into())
}

/// A field of `/proc/meminfo` (`MemTotal`, `MemAvailable`), in KiB.
pub(super) fn meminfo_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The first IPv4 address of an interface that is up, loopback aside.
pub(super) fn first_ipv4() -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list it points `list` at; it is walked read-only
    // and freed once below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut p = list;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its type.
        if up
            && !ifa.ifa_addr.is_null()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() {
                found = Some(ip);
                break;
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: list came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_in_kubernetes_formats() {
        let t = time_now();
        assert_eq!((t.len(), &t[10..11], &t[19..]), (20, "T", "Z"), "{t}");
        let m = micro_now();
        let m = m.as_str().unwrap();
        assert_eq!((m.len(), &m[19..20], &m[26..]), (27, ".", "Z"), "{m}");
        assert!(m[20..26].bytes().all(|b| b.is_ascii_digit()), "{m}");
    }
}
