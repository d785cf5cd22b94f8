//! What listens on the box's network from outside: every TCP socket in LISTEN and every
//! unconnected UDP socket bound to an address that is not loopback, read from the
//! kernel's `/proc/net/{tcp,tcp6,udp,udp6}` (init's network namespace: the daemons and
//! any host-network pod). Each is held against system.toml's `network.listeners`; one
//! not declared there is a door nobody meant to open, so init names it on the console,
//! in its status and in the health file the core hears (docs/contracts.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// One socket open to the network: `tcp/0.0.0.0:7400`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub proto: &'static str,
    pub addr: IpAddr,
    pub port: u16,
}

impl Listener {
    /// How system.toml declares it: `tcp/7400`.
    pub fn declared_as(&self) -> String {
        format!("{}/{}", self.proto, self.port)
    }
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{}/{a}:{}", self.proto, self.port),
            IpAddr::V6(a) => write!(f, "{}/[{a}]:{}", self.proto, self.port),
        }
    }
}

// TCP_LISTEN and TCP_CLOSE (an unconnected UDP socket) from include/net/tcp_states.h.
const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// The box's listeners on addresses that are not loopback, sorted, from `proc_net`
/// (`/proc/net`). A table that cannot be read is left out.
pub fn open_to_the_network(proc_net: &Path) -> Vec<Listener> {
    let mut all = Vec::new();
    for (file, proto, state) in [
        ("tcp", "tcp", TCP_LISTEN),
        ("tcp6", "tcp", TCP_LISTEN),
        ("udp", "udp", UDP_UNCONNECTED),
        ("udp6", "udp", UDP_UNCONNECTED),
    ] {
        if let Ok(text) = std::fs::read_to_string(proc_net.join(file)) {
            all.extend(parse_table(&text, proto, state));
        }
    }
    all.sort();
    all.dedup();
    all
}

/// The rows of one table in `state` whose local address is not loopback. Rows that do
/// not read are skipped: the kernel's format, not input anyone else writes.
fn parse_table(text: &str, proto: &'static str, state: &str) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace().skip(1);
            let (local, remote, st) = (cols.next()?, cols.next()?, cols.next()?);
            if st != state || (proto == "udp" && !remote.trim_start_matches(['0', ':']).is_empty())
            {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let addr = parse_addr(addr)?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let loopback = match addr {
                IpAddr::V4(a) => a.is_loopback(),
                IpAddr::V6(a) => {
                    a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
                }
            };
            (!loopback).then_some(Listener { proto, addr, port })
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address as the host reads it (`%08X`).
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Those of `open` that `declared` (system.toml's `network.listeners`) does not name.
pub fn undeclared<'a>(open: &'a [Listener], declared: &[String]) -> Vec<&'a Listener> {
    open.iter()
        .filter(|l| !declared.contains(&l.declared_as()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex4(a: [u8; 4]) -> String {
        format!("{:08X}", u32::from_ne_bytes(a))
    }

    #[test]
    fn listeners_on_the_network_are_found_and_loopback_ones_are_not() {
        let tcp = format!(
            "  sl  local_address rem_address   st tx_queue\n\
             0: {}:1CE8 00000000:0000 0A 00000000:00000000\n\
             1: {}:1388 00000000:0000 0A 00000000:00000000\n\
             2: {}:C350 {}:1CE8 01 00000000:00000000\n\
             3: {}:0016 00000000:0000 0A 00000000:00000000\n\
             garbage line\n",
            hex4([0, 0, 0, 0]),
            hex4([127, 0, 0, 1]),
            hex4([10, 0, 2, 15]),
            hex4([10, 0, 2, 2]),
            hex4([10, 0, 2, 15]),
        );
        let mut v6 = [0u8; 16];
        v6[15] = 1; // ::1
        let words: String = v6
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes(c.try_into().unwrap())))
            .collect();
        let any6 = "0".repeat(32);
        let tcp6 = format!(
            "  sl  local_address remote_address st\n\
             0: {words}:1F90 {any6}:0000 0A\n\
             1: {any6}:01BB {any6}:0000 0A\n"
        );
        let udp = format!(
            "  sl  local_address rem_address   st\n\
             0: {}:0035 00000000:0000 07\n\
             1: {}:D431 {}:0035 01\n",
            hex4([0, 0, 0, 0]),
            hex4([10, 0, 2, 15]),
            hex4([10, 0, 2, 3]),
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tcp"), tcp).unwrap();
        std::fs::write(dir.path().join("tcp6"), tcp6).unwrap();
        std::fs::write(dir.path().join("udp"), udp).unwrap();
        let open = open_to_the_network(dir.path());
        let shown: Vec<String> = open.iter().map(|l| l.to_string()).collect();
        assert_eq!(
            shown,
            [
                "tcp/0.0.0.0:7400",
                "tcp/10.0.2.15:22",
                "tcp/[::]:443",
                "udp/0.0.0.0:53"
            ],
            "loopback, connected and unreadable rows are not listeners"
        );
        let declared = vec!["tcp/7400".to_string(), "udp/53".to_string()];
        let extra: Vec<String> = undeclared(&open, &declared)
            .iter()
            .map(|l| l.to_string())
            .collect();
        assert_eq!(extra, ["tcp/10.0.2.15:22", "tcp/[::]:443"]);
    }
}
