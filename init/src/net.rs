//! The network: loopback up and a static address, default route and resolver for the
//! uplink, set with the classic SIOC* ioctls (enough for one static IPv4 uplink).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Network;
use crate::error::{Error, Result};

const SIOCADDRT: libc::c_ulong = 0x890B;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891C;
const IFF_UP: i16 = 0x1;
const RTF_UP: u16 = 0x1;
const RTF_GATEWAY: u16 = 0x2;

/// struct ifreq: the name, then a 24-byte union (sockaddr, flags, ...).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

/// struct sockaddr_in as the kernel lays it out.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

/// struct rtentry (linux/route.h).
#[repr(C)]
struct RtEntry {
    pad1: libc::c_ulong,
    dst: SockaddrIn,
    gateway: SockaddrIn,
    genmask: SockaddrIn,
    flags: u16,
    pad2: i16,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: i16,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: u16,
}

fn sin(a: Ipv4Addr) -> SockaddrIn {
    SockaddrIn {
        family: libc::AF_INET as u16,
        port: 0,
        addr: a.octets(),
        zero: [0; 8],
    }
}

/// `10.0.2.15/24` -> (address, netmask).
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let (a, p) = s.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let prefix: u32 = p.parse().ok()?;
    if prefix > 32 {
        return None;
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Some((addr, Ipv4Addr::from(mask)))
}

fn ifreq(name: &str) -> Result<IfReq> {
    if name.is_empty() || name.len() >= 16 {
        return Err(Error::BadInterface {
            name: name.to_owned(),
        });
    }
    let mut r = IfReq {
        name: [0; 16],
        data: [0; 24],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(r)
}

/// The ioctl; `op` says what it does, naming the interface (`bring eth0 up`).
fn ioctl<T>(sock: &OwnedFd, req: libc::c_ulong, arg: &mut T, op: String) -> Result<()> {
    ioctl_errno(sock, req, arg).map_err(|source| Error::Net { op, source })
}

/// The ioctl, its error as the kernel gave it (a caller may tell errors apart by it).
fn ioctl_errno<T>(sock: &OwnedFd, req: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is the struct the request expects, owned and sized for it.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, arg as *mut T) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn socket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::Net {
            op: "open an inet socket".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is fresh and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn up(sock: &OwnedFd, name: &str) -> Result<()> {
    let mut r = ifreq(name)?;
    ioctl(sock, SIOCGIFFLAGS, &mut r, format!("read flags of {name}"))?;
    let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | IFF_UP;
    r.data[..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl(sock, SIOCSIFFLAGS, &mut r, format!("bring {name} up"))
}

fn set_sockaddr(
    sock: &OwnedFd,
    name: &str,
    req: libc::c_ulong,
    a: Ipv4Addr,
    what: &str,
) -> Result<()> {
    let mut r = ifreq(name)?;
    let s = sin(a);
    // SAFETY: SockaddrIn is 16 plain bytes and fits the 24-byte union.
    let bytes: [u8; 16] = unsafe { std::mem::transmute(s) };
    r.data[..16].copy_from_slice(&bytes);
    ioctl(sock, req, &mut r, format!("set {what} {a} on {name}"))
}

/// The uplink: the named interface, or the first non-loopback one in name order.
fn uplink(class: &Path, named: &str) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(class)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    if named.is_empty() {
        names.into_iter().next()
    } else {
        names.into_iter().find(|n| n == named)
    }
}

/// Configures the network. Returns the lines to report (progress and problems).
pub fn setup(cfg: &Network, resolv: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let sock = match socket() {
        Ok(s) => s,
        Err(e) => return vec![e.to_string()],
    };
    if let Err(e) = up(&sock, "lo") {
        out.push(e.to_string());
    }
    let deadline = Instant::now() + Duration::from_millis(cfg.wait_ms);
    let name = loop {
        if let Some(n) = uplink(Path::new("/sys/class/net"), &cfg.interface) {
            break n;
        }
        if Instant::now() >= deadline {
            out.push(format!(
                "network: no uplink interface{} after {} ms",
                if cfg.interface.is_empty() {
                    String::new()
                } else {
                    format!(" `{}`", cfg.interface)
                },
                cfg.wait_ms
            ));
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let result = (|| -> Result<String> {
        if let Some((addr, mask)) = parse_cidr(&cfg.address) {
            set_sockaddr(&sock, &name, SIOCSIFADDR, addr, "address")?;
            set_sockaddr(&sock, &name, SIOCSIFNETMASK, mask, "netmask")?;
        }
        up(&sock, &name)?;
        if let Ok(gw) = cfg.gateway.parse::<Ipv4Addr>() {
            let mut dev = [0u8; 16];
            dev[..name.len()].copy_from_slice(name.as_bytes());
            let mut rt = RtEntry {
                pad1: 0,
                dst: sin(Ipv4Addr::UNSPECIFIED),
                gateway: sin(gw),
                genmask: sin(Ipv4Addr::UNSPECIFIED),
                flags: RTF_UP | RTF_GATEWAY,
                pad2: 0,
                pad3: 0,
                pad4: std::ptr::null_mut(),
                metric: 0,
                dev: dev.as_mut_ptr().cast(),
                mtu: 0,
                window: 0,
                irtt: 0,
            };
            match ioctl_errno(&sock, SIOCADDRT, &mut rt) {
                Ok(()) => {}
                // An existing default route (a second run) is what we wanted.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => {
                    return Err(Error::Net {
                        op: format!("add default route via {gw}"),
                        source,
                    })
                }
            }
        }
        Ok(format!(
            "network: {name} {} gw {}",
            if cfg.address.is_empty() {
                "up"
            } else {
                &cfg.address
            },
            if cfg.gateway.is_empty() {
                "none"
            } else {
                &cfg.gateway
            }
        ))
    })();
    match result {
        Ok(line) => out.push(line),
        Err(e) => out.push(format!("network: {e}")),
    }
    if !cfg.dns.is_empty() {
        let text: String = cfg
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        if let Err(e) = std::fs::write(resolv, text) {
            out.push(format!("failed to write {}: {e}", resolv.display()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_gives_address_and_mask() {
        assert_eq!(
            parse_cidr("10.0.2.15/24"),
            Some((Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(parse_cidr("10.0.2.15/33"), None);
        assert_eq!(parse_cidr("10.0.2.15"), None);
    }

    #[test]
    fn kernel_struct_sizes() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::size_of::<SockaddrIn>(), 16);
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}
