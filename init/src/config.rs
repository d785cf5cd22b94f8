//! init's own configuration, `/etc/edge/system.toml`: hostname, network, watchdog, logs.
//! Every key has a default, so a missing or broken file still gives a working box.
//!
//! The kernel command line can override any key for one box or one boot without a new
//! image: `edgeos.<table>.<key>=<value>` (`edgeos.watchdog.timeout_s=60`,
//! `edgeos.hostname=plant7-cam`, `edgeos.network.dns=10.0.0.1,10.0.0.2`). A flag wins over
//! the file; the value is read as the key's type (a list is comma-separated). A flag that
//! names no key or does not read as its type is reported and ignored, the rest stand.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct System {
    pub hostname: String,
    pub network: Network,
    pub watchdog: Watchdog,
    pub logs: Logs,
    pub update: Update,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// What may listen on an address that is not loopback, as `tcp/7400` or `udp/53`;
    /// anything else that does is reported (listeners.rs).
    pub listeners: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Watchdog {
    pub device: PathBuf,
    pub timeout_s: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Logs {
    pub dir: PathBuf,
    /// Size at which `<service>.log` is rotated to `.1`.
    pub max_bytes: u64,
    /// Below this much free space the data partition counts as full.
    pub min_free_mib: u64,
}

/// Over-the-air updates (docs/update.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
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
            listeners: Vec::new(),
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

/// The prefix of the kernel command-line flags that override system.toml's keys.
pub const FLAG_PREFIX: &str = "edgeos.";

pub fn parse(text: &str, origin: &str) -> Result<System> {
    let sys: System = toml::from_str(text).map_err(|e| Error::Config {
        origin: origin.to_owned(),
        detail: e.to_string().trim_end().replace('\n', " "),
    })?;
    check(&sys, origin)?;
    Ok(sys)
}

/// The checks serde's types cannot make.
fn check(sys: &System, origin: &str) -> Result<()> {
    let bad = |detail: String| {
        Err(Error::Config {
            origin: origin.to_owned(),
            detail,
        })
    };
    if sys.watchdog.timeout_s < 3 {
        return bad("key `watchdog.timeout_s`: must be at least 3".into());
    }
    if !(1..=3).contains(&sys.update.tries) {
        return bad("key `update.tries`: must be 1 to 3".into());
    }
    if sys.update.health_limit_s < 10 {
        return bad("key `update.health_limit_s`: must be at least 10".into());
    }
    if let Some(l) = sys.network.listeners.iter().find(|l| {
        let (proto, port) = l.split_once('/').unwrap_or_default();
        !matches!(proto, "tcp" | "udp") || port.parse::<u16>().is_err()
    }) {
        return bad(format!(
            "key `network.listeners`: `{l}` is not tcp/<port> or udp/<port>"
        ));
    }
    if !sys.network.address.is_empty() && crate::net::parse_cidr(&sys.network.address).is_none() {
        return bad(format!(
            "key `network.address`: `{}` is not address/prefix",
            sys.network.address
        ));
    }
    Ok(())
}

/// Where the `edgeos.*` flags come from, in messages.
const CMDLINE: &str = "kernel command line";

/// The `edgeos.*` flags of a kernel command line, as (key path, value).
pub fn flags(cmdline: &str) -> Vec<(String, String)> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix(FLAG_PREFIX))
        .map(|w| {
            let (k, v) = w.split_once('=').unwrap_or((w, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// Sets `key` (dotted) in `table` to `value`, read as the type the key has in `defaults`.
fn set_flag(table: &mut toml::Table, defaults: &toml::Table, key: &str, value: &str) -> Result<()> {
    let flag = format!("{FLAG_PREFIX}{key}={value}");
    let bad = |detail: String| Error::Config {
        origin: CMDLINE.to_owned(),
        detail: format!("{flag}: {detail}"),
    };
    let (path, last) = match key.rsplit_once('.') {
        Some((p, l)) => (p.split('.').collect::<Vec<_>>(), l),
        None => (Vec::new(), key),
    };
    let mut def = defaults;
    let mut here = table;
    for part in &path {
        def = def
            .get(*part)
            .and_then(toml::Value::as_table)
            .ok_or_else(|| bad(format!("there is no table `{part}`")))?;
        here = here
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| bad(format!("`{part}` is not a table")))?;
    }
    let typed = match def.get(last) {
        None | Some(toml::Value::Table(_)) => return Err(bad(format!("there is no key `{key}`"))),
        Some(toml::Value::String(_)) => toml::Value::String(value.to_string()),
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            value
                .parse()
                .map_err(|_| bad("not a whole number".into()))?,
        ),
        Some(toml::Value::Boolean(_)) => {
            toml::Value::Boolean(value.parse().map_err(|_| bad("not true or false".into()))?)
        }
        Some(toml::Value::Array(_)) => toml::Value::Array(
            value
                .split(',')
                .filter(|v| !v.is_empty())
                .map(|v| toml::Value::String(v.to_string()))
                .collect(),
        ),
        Some(_) => return Err(bad("cannot be set here".into())),
    };
    here.insert(last.to_string(), typed);
    Ok(())
}

/// system.toml's `text` (from `origin`) with the command line's `flags` over it. Returns
/// the configuration and what was wrong: a broken file gives the defaults with the flags
/// over them, a bad flag is left out, and flags that together fail the checks are all
/// left out.
pub fn layered(
    text: Option<&str>,
    origin: &str,
    flags: &[(String, String)],
) -> (System, Vec<String>) {
    let mut problems = Vec::new();
    let file = match text.map(|t| parse(t, origin)) {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            problems.push(format!("{e}; using defaults"));
            System::default()
        }
        None => System::default(),
    };
    if flags.is_empty() {
        return (file, problems);
    }
    let (Ok(base), Ok(defaults)) = (
        toml::Table::try_from(&file),
        toml::Table::try_from(System::default()),
    ) else {
        problems.push("the configuration could not be written as TOML".into());
        return (file, problems);
    };
    let mut merged = base;
    for (key, value) in flags {
        if let Err(e) = set_flag(&mut merged, &defaults, key, value) {
            problems.push(format!("{e}; ignored"));
        }
    }
    let layered = System::deserialize(merged)
        .map_err(|e| Error::Config {
            origin: CMDLINE.to_owned(),
            detail: e.to_string(),
        })
        .and_then(|s| check(&s, CMDLINE).map(|()| s));
    match layered {
        Ok(s) => (s, problems),
        Err(e) => {
            problems.push(format!("{e}; the {FLAG_PREFIX}* flags are ignored"));
            (file, problems)
        }
    }
}

/// Loads the file with the kernel command line's flags over it; every problem is
/// returned to be reported, and what could not be read stands at its default.
pub fn load(path: &std::path::Path, cmdline: &str) -> (System, Vec<String>) {
    let origin = path.display().to_string();
    let (text, unread) = match std::fs::read_to_string(path) {
        Ok(t) => (Some(t), None),
        Err(e) => (
            None,
            Some(format!("failed to read {origin}: {e}; using defaults")),
        ),
    };
    let (sys, mut problems) = layered(text.as_deref(), &origin, &flags(cmdline));
    problems.splice(0..0, unread);
    (sys, problems)
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
        let e = parse("hostnam = \"x\"\n", "sys.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hostnam") && e.contains("sys.toml"), "{e}");
    }

    #[test]
    fn kernel_flags_override_the_file_read_as_each_keys_type() {
        let file = "hostname = \"box\"\n[watchdog]\ntimeout_s = 30\n";
        let cmdline = "BOOT_IMAGE=x edge.slot=a edgeos.watchdog.timeout_s=60 edgeos.hostname=plant7-cam edgeos.network.dns=10.0.0.1,10.0.0.2 edgeos.update.tries=2 quiet";
        let (s, problems) = layered(Some(file), "system.toml", &flags(cmdline));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(s.watchdog.timeout_s, 60);
        assert_eq!(s.hostname, "plant7-cam");
        assert_eq!(s.network.dns, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(s.update.tries, 2);
        // Keys no flag names keep the file's value or the default.
        assert_eq!(s.watchdog.device, PathBuf::from("/dev/watchdog"));
        // Flags also stand over the defaults when the file is broken.
        let (s, problems) = layered(Some("hostname = ["), "system.toml", &flags(cmdline));
        assert_eq!(
            (s.hostname.as_str(), s.watchdog.timeout_s),
            ("plant7-cam", 60)
        );
        assert!(problems[0].contains("system.toml"), "{problems:?}");
    }

    #[test]
    fn a_bad_flag_is_named_and_ignored_and_the_others_stand() {
        let cmdline = "edgeos.watchdog.timeout_s=soon edgeos.watchdg.timeout_s=5 edgeos.logs.max_bytes=2048 edgeos.network=x";
        let (s, problems) = layered(None, "system.toml", &flags(cmdline));
        assert_eq!(s.logs.max_bytes, 2048);
        assert_eq!(s.watchdog.timeout_s, 30);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("edgeos.watchdog.timeout_s=soon: not a whole number"));
        assert!(
            problems[1].contains("there is no table `watchdg`"),
            "{}",
            problems[1]
        );
        assert!(
            problems[2].contains("there is no key `network`"),
            "{}",
            problems[2]
        );
        // Flags that pass their types but fail the checks are all dropped.
        let (s, problems) = layered(
            Some("hostname = \"box\"\n"),
            "system.toml",
            &flags("edgeos.watchdog.timeout_s=1 edgeos.hostname=x"),
        );
        assert_eq!((s.hostname.as_str(), s.watchdog.timeout_s), ("box", 30));
        assert!(
            problems[0].contains("watchdog.timeout_s`: must be at least 3"),
            "{problems:?}"
        );
    }

    #[test]
    fn declared_listeners_must_name_a_protocol_and_a_port() {
        let ok = parse(
            "[network]\nlisteners = [\"tcp/7400\", \"udp/53\"]\n",
            "system.toml",
        )
        .unwrap();
        assert_eq!(ok.network.listeners, ["tcp/7400", "udp/53"]);
        for bad in ["sctp/1", "tcp/http", "tcp/70000", "7400"] {
            let e = parse(
                &format!("[network]\nlisteners = [\"{bad}\"]\n"),
                "system.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("`{bad}` is not tcp/<port> or udp/<port>")),
                "{e}"
            );
        }
    }
}
