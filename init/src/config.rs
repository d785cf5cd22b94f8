//! init's own configuration, `/etc/edge/system.toml`: hostname, network, watchdog, logs.
//! Every key has a default, so a missing or broken file still gives a working box.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct System {
    pub hostname: String,
    pub network: Network,
    pub watchdog: Watchdog,
    pub logs: Logs,
    pub update: Update,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// The uplink; empty = the first interface that is not loopback.
    pub interface: String,
    /// `address/prefix`; empty leaves the uplink unconfigured (only brought up).
    pub address: String,
    pub gateway: String,
    pub dns: Vec<String>,
    /// How long to wait for the uplink to appear.
    pub wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Watchdog {
    pub device: PathBuf,
    pub timeout_s: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Logs {
    pub dir: PathBuf,
    /// Size at which `<service>.log` is rotated to `.1`.
    pub max_bytes: u64,
    /// Below this much free space the data partition counts as full.
    pub min_free_mib: u64,
}

/// Over-the-air updates (docs/update.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Update {
    /// Where fabricd's downlink puts update bundles (its `<dir>/updates`).
    pub bundles: PathBuf,
    /// How long a new slot's first boot has to get every service ready.
    pub health_limit_s: u64,
    /// The boots systemd-boot gives a new slot before it goes back to the old one.
    pub tries: u32,
}

impl Default for Update {
    fn default() -> Self {
        Update {
            bundles: "/var/lib/edge/downlink/updates".into(),
            health_limit_s: 120,
            tries: 1,
        }
    }
}

impl Default for System {
    fn default() -> Self {
        System {
            hostname: "edgeos".into(),
            network: Network::default(),
            watchdog: Watchdog::default(),
            logs: Logs::default(),
            update: Update::default(),
        }
    }
}

impl Default for Network {
    fn default() -> Self {
        Network {
            interface: String::new(),
            address: String::new(),
            gateway: String::new(),
            dns: Vec::new(),
            wait_ms: 5000,
        }
    }
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            device: "/dev/watchdog".into(),
            timeout_s: 30,
        }
    }
}

impl Default for Logs {
    fn default() -> Self {
        Logs {
            dir: "/var/log".into(),
            max_bytes: 1 << 20,
            min_free_mib: 64,
        }
    }
}

pub fn parse(text: &str, origin: &str) -> Result<System, String> {
    let sys: System = toml::from_str(text)
        .map_err(|e| format!("{origin}: {}", e.to_string().trim_end().replace('\n', " ")))?;
    if sys.watchdog.timeout_s < 3 {
        return Err(format!(
            "{origin}: key `watchdog.timeout_s`: must be at least 3"
        ));
    }
    if !(1..=3).contains(&sys.update.tries) {
        return Err(format!("{origin}: key `update.tries`: must be 1 to 3"));
    }
    if sys.update.health_limit_s < 10 {
        return Err(format!(
            "{origin}: key `update.health_limit_s`: must be at least 10"
        ));
    }
    if !sys.network.address.is_empty() && crate::net::parse_cidr(&sys.network.address).is_none() {
        return Err(format!(
            "{origin}: key `network.address`: `{}` is not address/prefix",
            sys.network.address
        ));
    }
    Ok(sys)
}

/// Loads the file; on any problem returns the defaults and the message to report.
pub fn load(path: &std::path::Path) -> (System, Option<String>) {
    match std::fs::read_to_string(path) {
        Ok(text) => match parse(&text, &path.display().to_string()) {
            Ok(s) => (s, None),
            Err(e) => (System::default(), Some(format!("{e}; using defaults"))),
        },
        Err(e) => (
            System::default(),
            Some(format!(
                "failed to read {}: {e}; using defaults",
                path.display()
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_config_parses() {
        let s = parse(
            include_str!("../../image/overlay/etc/edge/system.toml"),
            "system.toml",
        )
        .unwrap();
        assert_eq!(s.network.address, "10.0.2.15/24");
        assert_eq!(s.watchdog.timeout_s, 30);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("hostnam = \"x\"\n", "sys.toml").unwrap_err();
        assert!(e.contains("hostnam") && e.contains("sys.toml"), "{e}");
    }
}
