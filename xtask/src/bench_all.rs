//! `cargo xtask bench all`: every bench in turn, each as `cargo xtask bench <name>` with
//! its own output shown as it runs, then one table of our figure, what it is measured
//! against in the same run (the peer an edge user would pick instead, the disk's own
//! limit, or a baseline) and their ratio, and last one JSON object holding every bench's
//! line.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The benches in the order they run, with how long each takes on 2 cores under TCG
/// (builds warm), in minutes.
const BENCHES: &[(&str, u64)] = &[
    ("fabric", 6),
    ("fleet", 8),
    ("storage", 12),
    ("boot", 5),
    ("pods", 5),
    ("update", 6),
];

/// One row of the table: the bench, what is compared, the JSON pointer to our figure
/// and to what it is measured against in the same run (none: nothing is).
struct Row {
    bench: &'static str,
    figure: &'static str,
    ours: &'static str,
    against: Option<&'static str>,
}

const fn row(
    bench: &'static str,
    figure: &'static str,
    ours: &'static str,
    against: Option<&'static str>,
) -> Row {
    Row {
        bench,
        figure,
        ours,
        against,
    }
}

const ROWS: &[Row] = &[
    row(
        "fabric",
        "ingest 1 KiB, MiB/s, vs a JetStream leaf node",
        "/ingest_mib_s_1k",
        Some("/leaf_ingest_mib_s_1k"),
    ),
    row(
        "fabric",
        "ingest 1 KiB, MiB/s, vs the disk at our fsyncs",
        "/ingest_mib_s_1k",
        Some("/disk_mib_s_1k"),
    ),
    row(
        "fabric",
        "end to end, records/s, vs the leaf node",
        "/e2e_msgs_s",
        Some("/leaf_e2e_msgs_s"),
    ),
    row(
        "fabric",
        "end to end, records/s, vs direct JetStream",
        "/e2e_msgs_s",
        Some("/direct_msgs_s"),
    ),
    row(
        "fabric",
        "catch-up, records/s, vs the leaf node",
        "/catchup_msgs_s",
        Some("/leaf_catchup_msgs_s"),
    ),
    row(
        "fleet",
        "records/s at the core, all sites",
        "/records_s",
        None,
    ),
    row("fleet", "records lost", "/lost", None),
    row("fleet", "records stored twice", "/duplicated", None),
    row("fleet", "catch-up after the cut, s", "/catchup_s", None),
    row(
        "fleet",
        "core memory per site, MiB",
        "/core_rss_mib_per_site",
        None,
    ),
    row(
        "fleet",
        "core CPU per 1,000 sites, % of a core",
        "/core_cpu_pct_per_1k_sites",
        None,
    ),
    row(
        "fleet",
        "core heap per site, KiB, one stream vs a stream per site",
        "/layout/one_stream_heap_kib_per_site",
        Some("/layout/stream_per_site_heap_kib_per_site"),
    ),
    row(
        "storage",
        "RWO 4 KiB randread, IOPS, vs LVM thin",
        "/rwo/randread_iops",
        Some("/lvmthin/randread_iops"),
    ),
    row(
        "storage",
        "RWO 4 KiB randwrite, IOPS, vs LVM thin",
        "/rwo/randwrite_iops",
        Some("/lvmthin/randwrite_iops"),
    ),
    row(
        "storage",
        "RWO 1 MiB seq, MiB/s, vs LVM thin",
        "/rwo/seq_mib_s",
        Some("/lvmthin/seq_mib_s"),
    ),
    row(
        "storage",
        "RWO 4 KiB randread, IOPS, vs the raw disk",
        "/rwo/randread_iops",
        Some("/raw/randread_iops"),
    ),
    row(
        "storage",
        "RWO 4 KiB randwrite, IOPS, vs the raw disk",
        "/rwo/randwrite_iops",
        Some("/raw/randwrite_iops"),
    ),
    row(
        "storage",
        "RWO 1 MiB seq, MiB/s, vs the raw disk",
        "/rwo/seq_mib_s",
        Some("/raw/seq_mib_s"),
    ),
    row(
        "storage",
        "RWX 4 readers, MiB/s, vs NFS",
        "/rwx/read_mib_s",
        Some("/rwx/nfs_read_mib_s"),
    ),
    row("boot", "later boot, ready, s", "/ready_s", None),
    row("boot", "later boot, guest uptime, s", "/uptime_s", None),
    row("boot", "memory at ready, KiB", "/mem_used_kib", None),
    row("boot", "image, bytes", "/image_bytes", None),
    row(
        "pods",
        "manifest to running, s",
        "/manifest_to_running_s",
        None,
    ),
    row(
        "pods",
        "apply to Running, s, vs the upstream kubelet",
        "/apply_to_running_s",
        Some("/kubelet_apply_to_running_s"),
    ),
    row(
        "pods",
        "node agent RSS, KiB, vs the upstream kubelet",
        "/noded_rss_api_kib",
        Some("/kubelet_rss_kib"),
    ),
    row(
        "update",
        "small change, bytes, vs the whole bundle",
        "/delta_bytes_small_change",
        Some("/bundle_bytes"),
    ),
    row(
        "update",
        "publish to blessed, s",
        "/publish_to_blessed_s",
        None,
    ),
    row("update", "publish to rolled back, s", "/rollback_s", None),
];

pub fn run() -> Result<()> {
    let exe = std::env::current_exe().context("cannot find xtask's own program")?;
    let total: u64 = BENCHES.iter().map(|b| b.1).sum();
    println!(
        "bench all: {} in turn, about {total} minutes: {}",
        BENCHES.len(),
        BENCHES
            .iter()
            .map(|(n, m)| format!("{n} ~{m} min"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let start = Instant::now();
    let mut lines = Map::new();
    let mut failed = Vec::new();
    let mut left = total;
    for (i, (name, minutes)) in BENCHES.iter().enumerate() {
        println!(
            "bench all: [{}/{}] {name}, about {minutes} minutes ({left} minutes left in all; {:.0} minutes so far)",
            i + 1,
            BENCHES.len(),
            start.elapsed().as_secs_f64() / 60.0
        );
        left -= minutes;
        let began = Instant::now();
        match one(&exe, name) {
            Ok(v) => {
                lines.insert((*name).into(), v);
            }
            Err(e) => {
                println!("bench all: {name} failed: {e:#}");
                failed.push(*name);
            }
        }
        println!(
            "bench all: {name} took {:.1} minutes",
            began.elapsed().as_secs_f64() / 60.0
        );
    }
    print!("{}", table(&lines));
    let mut all = Map::new();
    all.insert("bench".into(), "all".into());
    all.extend(lines);
    println!("{}", Value::Object(all));
    if !failed.is_empty() {
        bail!("these benches failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Runs `xtask bench <name>`, echoing its output; its last line, the JSON one.
fn one(exe: &std::path::Path, name: &str) -> Result<Value> {
    let mut child = Command::new(exe)
        .args(["bench", name])
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to run xtask bench {name}"))?;
    let mut last = None;
    let out = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(out).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(v) = json_line(&line, name) {
            last = Some(v);
        }
    }
    let st = child.wait().context("waiting for the bench")?;
    if !st.success() {
        bail!("xtask bench {name} exited with {st}");
    }
    last.with_context(|| format!("xtask bench {name} printed no JSON line"))
}

/// `line` as bench `name`'s JSON line: an object whose `bench` is `name`, wherever that
/// key falls (serde_json writes a `json!` object's keys in sorted order).
fn json_line(line: &str, name: &str) -> Option<Value> {
    if !line.starts_with('{') {
        return None;
    }
    let v: Value = serde_json::from_str(line).ok()?;
    (v.get("bench").and_then(Value::as_str) == Some(name)).then_some(v)
}

/// The table of every row whose bench ran: ours, what it is measured against, the
/// ratio (`-` where the run measures nothing to compare with; `?` where a figure is
/// missing from the bench's line).
fn table(lines: &Map<String, Value>) -> String {
    let fmt = |v: Option<f64>| match v {
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "?".into(),
    };
    let mut out = format!(
        "{:<8} {:<48} {:>14} {:>14} {:>8}\n",
        "bench", "figure", "ours", "against", "ratio"
    );
    for r in ROWS {
        let Some(line) = lines.get(r.bench) else {
            continue;
        };
        let ours = line.pointer(r.ours).and_then(Value::as_f64);
        let (against, ratio) = match r.against {
            None => ("-".to_string(), "-".to_string()),
            Some(p) => {
                let a = line.pointer(p).and_then(Value::as_f64);
                let ratio = match (ours, a) {
                    (Some(o), Some(a)) if a != 0.0 => format!("{:.3}", o / a),
                    _ => "?".into(),
                };
                (fmt(a), ratio)
            }
        };
        out += &format!(
            "{:<8} {:<48} {:>14} {:>14} {:>8}\n",
            r.bench,
            r.figure,
            fmt(ours),
            against,
            ratio
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_bench_line_is_found_wherever_its_bench_key_falls() {
        // The pods bench's line, keys sorted: `bench` is not the first.
        let pods = r#"{"apply_to_running_s":8.68,"bench":"pods","noded_rss_kib":10332}"#;
        assert_eq!(json_line(pods, "pods").unwrap()["apply_to_running_s"], 8.68);
        assert!(json_line(pods, "boot").is_none(), "another bench's line");
        assert!(json_line("{\"bench\": \"pods\", cut", "pods").is_none());
        assert!(json_line("bench pods: 10 pods running", "pods").is_none());
    }

    #[test]
    fn the_table_shows_ours_what_it_is_measured_against_and_the_ratio() {
        let mut lines = Map::new();
        lines.insert(
            "fabric".into(),
            json!({"bench": "fabric", "ingest_mib_s_1k": 300.0, "leaf_ingest_mib_s_1k": 7.5,
                   "disk_mib_s_1k": 600.0, "e2e_msgs_s": 130000, "leaf_e2e_msgs_s": 6500,
                   "direct_msgs_s": 200000, "catchup_msgs_s": 140000}),
        );
        lines.insert(
            "boot".into(),
            json!({"bench": "boot", "ready_s": 14.5, "uptime_s": 6.5,
                   "mem_used_kib": 90000, "image_bytes": 78488467}),
        );
        let t = table(&lines);
        let row = |figure: &str| {
            t.lines()
                .find(|l| l.contains(figure))
                .unwrap_or_else(|| panic!("no row {figure} in\n{t}"))
                .split_whitespace()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("vs a JetStream leaf node"),
            ["40.000", "7.50", "300.00"]
        );
        assert_eq!(
            row("vs the disk at our fsyncs"),
            ["0.500", "600.00", "300.00"]
        );
        assert_eq!(
            row("end to end, records/s, vs the leaf"),
            ["20.000", "6500", "130000"]
        );
        // Missing from the line: shown as unknown, not as zero.
        assert_eq!(row("catch-up"), ["?", "?", "140000"]);
        assert_eq!(row("later boot, ready"), ["-", "-", "14.50"]);
        // Benches that did not run have no rows.
        assert!(!t.contains("storage") && !t.contains("update"), "{t}");
    }
}
