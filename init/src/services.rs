//! The service table (`/etc/edge/services.toml`): parsing each `[[service]]` entry into a
//! typed spec and checking the table as a whole (names, dependencies, cycles). A bad entry
//! is reported and skipped so that one typo cannot keep the rest of the box down.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::logs::Level;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// Ready as soon as the process is running.
    None,
    /// Ready when `READY=1` arrives on the pipe named by `NOTIFY_FD`.
    Notify,
    /// Ready when a connect() to the unix socket `socket` succeeds.
    Socket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// One `[[service]]` entry as written. Unknown keys are errors: a misspelt limit must not
/// silently run the service without it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    exec: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<PathBuf>,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
    #[serde(default)]
    alongside: Vec<String>,
    #[serde(default = "default_ready")]
    ready: Readiness,
    socket: Option<PathBuf>,
    #[serde(default = "default_ready_timeout")]
    ready_timeout_ms: u64,
    health: Option<String>,
    #[serde(default = "default_restart")]
    restart: RestartPolicy,
    #[serde(default = "default_backoff_initial")]
    backoff_initial_ms: u64,
    #[serde(default = "default_backoff_max")]
    backoff_max_ms: u64,
    #[serde(default = "default_restart_limit")]
    restart_limit: u32,
    #[serde(default = "default_restart_window")]
    restart_window_s: u64,
    #[serde(default = "default_retry_failed")]
    retry_failed_s: u64,
    #[serde(default = "default_stop_timeout")]
    stop_timeout_ms: u64,
    memory_max: Option<String>,
    cpu_max: Option<String>,
    pids_max: Option<String>,
    #[serde(default = "default_console")]
    console: String,
    #[serde(default)]
    kill: KillMode,
}

/// What a stop or the main process's exit takes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KillMode {
    /// Everything the service left in its process group and cgroup: a restart starts
    /// clean.
    #[default]
    Group,
    /// The main process only. For a runtime whose helpers must outlive it: containerd's
    /// shims keep the containers (and their logs) running while containerd restarts.
    Main,
}

fn default_ready() -> Readiness {
    Readiness::None
}
fn default_ready_timeout() -> u64 {
    60_000
}
fn default_restart() -> RestartPolicy {
    RestartPolicy::Always
}
fn default_backoff_initial() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    30_000
}
fn default_restart_limit() -> u32 {
    5
}
fn default_restart_window() -> u64 {
    60
}
fn default_retry_failed() -> u64 {
    600
}
fn default_stop_timeout() -> u64 {
    10_000
}
fn default_console() -> String {
    "warn".into()
}

/// A validated service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub name: String,
    pub exec: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub after: Vec<String>,
    pub requires: Vec<String>,
    /// Started once these have been started, without waiting for their readiness (the
    /// service waits for what it needs of them itself); stopped before them.
    pub alongside: Vec<String>,
    pub ready: Readiness,
    pub socket: Option<PathBuf>,
    pub ready_timeout: Duration,
    /// What the service's `HEALTHY=1` says holds (after `READY=1`, on the notify
    /// pipe): a trial boot of an update is blessed only once every such service said
    /// it.
    pub health: Option<String>,
    pub restart: RestartPolicy,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub restart_limit: u32,
    pub restart_window: Duration,
    /// How long a service given up (crash loop) stays `failed` before it is started
    /// again with a clean count; `None` (`retry_failed_s = 0`): until a `restart`.
    pub retry_failed: Option<Duration>,
    pub stop_timeout: Duration,
    /// cgroup v2 interface files and their values, e.g. `("memory.max", "512M")`.
    pub limits: Vec<(&'static str, String)>,
    /// Lines at or above this level also go to the console; `None` = never.
    pub console: Option<Level>,
    pub kill: KillMode,
}

impl ServiceSpec {
    /// Every service this one is ordered after, requirement, ordering and start
    /// alike.
    pub fn deps(&self) -> impl Iterator<Item = &String> {
        self.requires
            .iter()
            .chain(self.after.iter())
            .chain(self.alongside.iter())
    }
}

/// The result of loading a table: the services that passed, and one message per problem,
/// each naming the service and the key.
#[derive(Debug, Default)]
pub struct Table {
    pub services: Vec<ServiceSpec>,
    pub problems: Vec<String>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.starts_with('-')
}

fn check_limit(key: &'static str, value: &str) -> crate::error::Result<()> {
    let ok = match key {
        // "max", or a byte count with an optional K/M/G suffix (as the kernel accepts).
        "memory.max" | "pids.max" => {
            value == "max" || {
                let digits = if key == "memory.max" {
                    value.trim_end_matches(['K', 'M', 'G', 'k', 'm', 'g'])
                } else {
                    value
                };
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            }
        }
        // "<quota|max> <period>" in microseconds, e.g. "50000 100000".
        "cpu.max" => {
            let mut parts = value.split(' ');
            let quota = parts.next().unwrap_or("");
            let period = parts.next();
            let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            (quota == "max" || number(quota)) && period.is_none_or(number) && parts.next().is_none()
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(crate::error::Error::Limit {
            key,
            value: value.to_owned(),
        })
    }
}

fn convert(e: Entry) -> Result<ServiceSpec, (String, String)> {
    let bad = |key: &str, msg: String| (key.to_owned(), msg);
    if e.exec.is_empty() || e.exec[0].is_empty() {
        return Err(bad("exec", "must name a program".into()));
    }
    if !e.exec[0].starts_with('/') {
        return Err(bad(
            "exec",
            format!("`{}` is not an absolute path", e.exec[0]),
        ));
    }
    match (e.ready, &e.socket) {
        (Readiness::Socket, None) => {
            return Err(bad(
                "socket",
                "ready = \"socket\" needs a socket path".into(),
            ))
        }
        (Readiness::Socket, Some(_)) | (_, None) => {}
        (_, Some(_)) => {
            return Err(bad(
                "socket",
                "only meaningful with ready = \"socket\"".into(),
            ))
        }
    }
    if e.backoff_initial_ms == 0 || e.backoff_max_ms < e.backoff_initial_ms {
        return Err(bad(
            "backoff_max_ms",
            "backoff_initial_ms must be > 0 and <= backoff_max_ms".into(),
        ));
    }
    if e.restart_window_s == 0 {
        return Err(bad("restart_window_s", "must be > 0".into()));
    }
    if e.ready_timeout_ms == 0 {
        return Err(bad("ready_timeout_ms", "must be > 0".into()));
    }
    match &e.health {
        Some(_) if e.ready != Readiness::Notify => {
            return Err(bad(
                "health",
                "needs ready = \"notify\" (HEALTHY=1 comes on the notify pipe)".into(),
            ))
        }
        Some(h) if h.trim().is_empty() || h.len() > 80 => {
            return Err(bad(
                "health",
                "must say in a few words what holds once the service is healthy".into(),
            ))
        }
        _ => {}
    }
    if e.env.contains_key("NOTIFY_FD") {
        return Err(bad("env", "NOTIFY_FD is set by init".into()));
    }
    let console = if e.console == "off" {
        None
    } else {
        Some(Level::parse(&e.console).ok_or_else(|| {
            bad(
                "console",
                format!(
                    "`{}` is not off, error, warn, info, debug or trace",
                    e.console
                ),
            )
        })?)
    };
    let mut limits = Vec::new();
    for (key, value) in [
        ("memory.max", e.memory_max),
        ("cpu.max", e.cpu_max),
        ("pids.max", e.pids_max),
    ] {
        if let Some(v) = value {
            let toml_key = key.replace('.', "_");
            check_limit(key, &v).map_err(|m| bad(&toml_key, m.to_string()))?;
            limits.push((key, v));
        }
    }
    Ok(ServiceSpec {
        name: e.name,
        exec: e.exec,
        env: e.env,
        workdir: e.workdir,
        after: e.after,
        requires: e.requires,
        alongside: e.alongside,
        ready: e.ready,
        socket: e.socket,
        ready_timeout: Duration::from_millis(e.ready_timeout_ms),
        health: e.health,
        restart: e.restart,
        backoff_initial: Duration::from_millis(e.backoff_initial_ms),
        backoff_max: Duration::from_millis(e.backoff_max_ms),
        restart_limit: e.restart_limit,
        restart_window: Duration::from_secs(e.restart_window_s),
        retry_failed: (e.retry_failed_s > 0).then(|| Duration::from_secs(e.retry_failed_s)),
        stop_timeout: Duration::from_millis(e.stop_timeout_ms),
        limits,
        console,
        kill: e.kill,
    })
}

/// Parses a whole table. `origin` names the file in messages.
pub fn parse(text: &str, origin: &str) -> Table {
    let mut table = Table::default();
    let doc: toml::Table = match toml::from_str(text) {
        Ok(d) => d,
        Err(e) => {
            table.problems.push(format!(
                "{origin}: {}",
                e.to_string().trim_end().replace('\n', " ")
            ));
            return table;
        }
    };
    for key in doc.keys().filter(|k| *k != "service") {
        table.problems.push(format!(
            "{origin}: unknown top-level key `{key}` (expected [[service]] entries)"
        ));
    }
    let entries = match doc.get("service") {
        None => Vec::new(),
        Some(toml::Value::Array(a)) => a.clone(),
        Some(_) => {
            table
                .problems
                .push(format!("{origin}: `service` must be written [[service]]"));
            Vec::new()
        }
    };

    let mut specs = Vec::new();
    for (i, value) in entries.into_iter().enumerate() {
        let label = value
            .get("name")
            .and_then(|n| n.as_str())
            .map(|n| format!("service `{n}`"))
            .unwrap_or_else(|| format!("service #{}", i + 1));
        let entry: Entry = match value.try_into() {
            Ok(e) => e,
            Err(e) => {
                let msg = e.to_string().trim_end().replace('\n', " ");
                table
                    .problems
                    .push(format!("{origin}: {label}: {msg}; skipped"));
                continue;
            }
        };
        if !valid_name(&entry.name) {
            table.problems.push(format!(
                "{origin}: {label}: key `name`: use letters, digits, - and _ only; skipped"
            ));
            continue;
        }
        match convert(entry) {
            Ok(spec) => {
                if specs.iter().any(|s: &ServiceSpec| s.name == spec.name) {
                    table.problems.push(format!(
                        "{origin}: {label}: key `name`: defined twice; later entry skipped"
                    ));
                } else {
                    specs.push(spec);
                }
            }
            Err((key, msg)) => table
                .problems
                .push(format!("{origin}: {label}: key `{key}`: {msg}; skipped")),
        }
    }
    check_graph(&mut specs, origin, &mut table.problems);
    table.services = specs;
    table
}

/// Drops services whose dependencies are unknown, skipped, or form a cycle, until what
/// remains can all be started in some order.
fn check_graph(specs: &mut Vec<ServiceSpec>, origin: &str, problems: &mut Vec<String>) {
    loop {
        let names: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let mut drop: Option<(String, String)> = None;
        'find: for s in specs.iter() {
            for (key, list) in [
                ("requires", &s.requires),
                ("after", &s.after),
                ("alongside", &s.alongside),
            ] {
                for d in list {
                    if !names.contains(d.as_str()) {
                        drop = Some((
                            s.name.clone(),
                            format!("key `{key}`: unknown or skipped service `{d}`"),
                        ));
                        break 'find;
                    }
                }
            }
        }
        if drop.is_none() {
            if let Some(cycle) = find_cycle(specs) {
                // Every member of the cycle is skipped: none of them could ever start.
                for name in &cycle {
                    problems.push(format!(
                        "{origin}: service `{name}`: key `requires`/`after`/`alongside`: dependency cycle {}; skipped",
                        cycle.join(" -> ")
                    ));
                }
                specs.retain(|s| !cycle.contains(&s.name));
                continue;
            }
        }
        match drop {
            Some((name, msg)) => {
                problems.push(format!("{origin}: service `{name}`: {msg}; skipped"));
                specs.retain(|s| s.name != name);
            }
            None => return,
        }
    }
}

fn find_cycle(specs: &[ServiceSpec]) -> Option<Vec<String>> {
    let index: HashMap<&str, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut mark = vec![0u8; specs.len()];
    let mut path = Vec::new();
    fn visit(
        i: usize,
        specs: &[ServiceSpec],
        index: &HashMap<&str, usize>,
        mark: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        mark[i] = 1;
        path.push(i);
        for d in specs[i].deps() {
            let Some(&j) = index.get(d.as_str()) else {
                continue;
            };
            if mark[j] == 1 {
                let start = path.iter().position(|&p| p == j).unwrap_or(0);
                return Some(
                    path[start..]
                        .iter()
                        .map(|&p| specs[p].name.clone())
                        .collect(),
                );
            }
            if mark[j] == 0 {
                if let Some(c) = visit(j, specs, index, mark, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        mark[i] = 2;
        None
    }
    for i in 0..specs.len() {
        if mark[i] == 0 {
            if let Some(c) = visit(i, specs, &index, &mut mark, &mut path) {
                return Some(c);
            }
        }
    }
    None
}

/// Reads and parses a table file. An unreadable file is one problem and an empty table.
pub fn load(path: &std::path::Path) -> Table {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &path.display().to_string()),
        Err(e) => Table {
            services: Vec::new(),
            problems: vec![format!("failed to read {}: {e}", path.display())],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(t: &Table) -> Vec<&str> {
        t.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn the_image_table_loads_without_problems() {
        let text = include_str!("../../image/overlay/etc/edge/services.toml");
        let t = parse(text, "services.toml");
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(
            names(&t),
            ["containerd", "storaged", "fabricd", "noded"],
            "the image's services"
        );
        let noded = &t.services[3];
        assert_eq!(noded.alongside, ["containerd"]);
        assert!(noded.requires.is_empty());
        assert_eq!(noded.ready, Readiness::Notify);
        assert_eq!(noded.health.as_deref(), Some("static pods running"));
        let containerd = &t.services[0];
        assert_eq!(containerd.ready, Readiness::Socket);
        assert!(containerd.limits.iter().any(|(k, _)| *k == "memory.max"));
    }

    #[test]
    fn defaults_fill_in_optional_keys() {
        let t = parse("[[service]]\nname = \"a\"\nexec = [\"/bin/true\"]\n", "t");
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        let s = &t.services[0];
        assert_eq!(s.restart, RestartPolicy::Always);
        assert_eq!(s.ready, Readiness::None);
        assert_eq!(s.console, Some(Level::Warn));
        assert_eq!(s.restart_limit, 5);
    }

    #[test]
    fn missing_exec_unknown_key_and_bad_limit_skip_only_that_service() {
        let text = r#"
[[service]]
name = "noexec"

[[service]]
name = "typo"
exec = ["/bin/true"]
restrat = "always"

[[service]]
name = "badmem"
exec = ["/bin/true"]
memory_max = "lots"

[[service]]
name = "good"
exec = ["/bin/sleep", "10"]
"#;
        let t = parse(text, "svc.toml");
        assert_eq!(names(&t), ["good"]);
        let all = t.problems.join("\n");
        assert!(all.contains("`noexec`") && all.contains("exec"), "{all}");
        assert!(all.contains("`typo`") && all.contains("restrat"), "{all}");
        assert!(
            all.contains("`badmem`") && all.contains("memory_max"),
            "{all}"
        );
        assert!(all.contains("svc.toml"), "{all}");
    }

    #[test]
    fn unknown_dependency_skips_the_service_and_its_dependents() {
        let text = r#"
[[service]]
name = "a"
exec = ["/bin/true"]
requires = ["ghost"]

[[service]]
name = "b"
exec = ["/bin/true"]
after = ["a"]

[[service]]
name = "c"
exec = ["/bin/true"]

[[service]]
name = "d"
exec = ["/bin/true"]
alongside = ["b"]
"#;
        let t = parse(text, "t");
        assert_eq!(names(&t), ["c"]);
        let all = t.problems.join("\n");
        assert!(all.contains("`a`") && all.contains("ghost"), "{all}");
        assert!(all.contains("`b`") && all.contains("after"), "{all}");
        assert!(all.contains("`d`") && all.contains("alongside"), "{all}");
    }

    #[test]
    fn dependency_cycle_is_reported_and_skipped() {
        let text = r#"
[[service]]
name = "x"
exec = ["/bin/true"]
requires = ["y"]

[[service]]
name = "y"
exec = ["/bin/true"]
after = ["x"]

[[service]]
name = "z"
exec = ["/bin/true"]

[[service]]
name = "v"
exec = ["/bin/true"]
alongside = ["w"]

[[service]]
name = "w"
exec = ["/bin/true"]
alongside = ["v"]
"#;
        let t = parse(text, "t");
        assert_eq!(names(&t), ["z"]);
        let all = t.problems.join("\n");
        assert!(
            all.contains("cycle") && all.contains("`x`") && all.contains("`y`"),
            "{all}"
        );
    }

    #[test]
    fn socket_readiness_needs_a_path() {
        let t = parse(
            "[[service]]\nname = \"s\"\nexec = [\"/bin/true\"]\nready = \"socket\"\n",
            "t",
        );
        assert!(t.services.is_empty());
        assert!(t.problems[0].contains("socket"), "{:?}", t.problems);
    }

    #[test]
    fn health_comes_on_the_notify_pipe() {
        let t = parse(
            "[[service]]\nname = \"s\"\nexec = [\"/bin/true\"]\nhealth = \"its pods running\"\n",
            "t",
        );
        assert!(t.services.is_empty());
        assert!(
            t.problems[0].contains("health") && t.problems[0].contains("notify"),
            "{:?}",
            t.problems
        );
        let t = parse(
            "[[service]]\nname = \"s\"\nexec = [\"/bin/true\"]\nready = \"notify\"\nhealth = \"its pods running\"\n",
            "t",
        );
        assert_eq!(t.services[0].health.as_deref(), Some("its pods running"));
    }

    #[test]
    fn cpu_max_forms() {
        assert!(check_limit("cpu.max", "50000 100000").is_ok());
        assert!(check_limit("cpu.max", "max").is_ok());
        assert!(check_limit("cpu.max", "fast").is_err());
        assert!(check_limit("pids.max", "128").is_ok());
        assert!(check_limit("memory.max", "512M").is_ok());
    }
}
