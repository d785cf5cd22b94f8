//! `edgectl status`: each box as the core sees it: its records in the stream, what it
//! last reported (acked offset, lag, drops), its last contact and its boot report; and,
//! when the core is a cluster, how the records stream's replicas stand.

use std::path::PathBuf;

use futures_util::StreamExt;

use crate::error::Result;
use crate::{accepted_releases, kv_keys, unix_now, Cli};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Count only these topics (a NATS pattern, e.g. `sensors.>`).
    #[arg(long, default_value = ">")]
    topic: String,
    /// Releases the core accepts, NAME=PATH of their pcr11.json (repeat): each
    /// enrolled box's last boot report is replayed against them.
    #[arg(long = "release", requires = "release_key")]
    releases: Vec<String>,
    /// The key the releases must be signed by (as for `enroll`).
    #[arg(long)]
    release_key: Option<PathBuf>,
    /// A boot report older than this (by the box's clock against ours) is refused.
    #[arg(long, default_value_t = 900)]
    report_max_age_secs: u64,
}

/// One box as `status` shows it: what the core holds of it, and what it last said.
#[derive(Default)]
pub(crate) struct MachineRow {
    records: usize,
    last_offset: u64,
    /// Newest message of any subject from the box (unix seconds).
    contact: i64,
    status: Option<fabricd::uplink::BoxStatus>,
    /// When the core took the box's last status report (unix ms, the core's clock).
    reported_ms: i64,
}

pub(crate) async fn run(cli: &Cli, js: &async_nats::jetstream::Context, args: &Args) -> Result<()> {
    let Args {
        topic,
        releases,
        release_key,
        report_max_age_secs,
    } = args;
    let releases = accepted_releases(releases, release_key.as_deref())?;
    let stream = js
        .get_stream(&cli.stream)
        .await
        .map_err(fabricd::Error::core(format!("no stream {}", cli.stream)))?;
    let mut subjects = stream
        .info_with_subjects(format!("{}.*.*.{topic}", cli.prefix))
        .await
        .map_err(fabricd::Error::core("failed to list subjects"))?;
    let mut machines: std::collections::BTreeMap<String, MachineRow> = Default::default();
    while let Some(item) = subjects.next().await {
        let (subject, count) = item.map_err(fabricd::Error::core("failed to list subjects"))?;
        let tokens: Vec<&str> = subject.splitn(4, '.').collect();
        if tokens.len() < 4 || tokens[3].starts_with("_downlink") {
            continue;
        }
        let last = stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .map_err(fabricd::Error::core(format!(
                "failed to read the last of {subject}"
            )))?;
        let row = machines
            .entry(format!("{}.{}", tokens[1], tokens[2]))
            .or_default();
        row.contact = row.contact.max(last.time.unix_timestamp());
        let offset = last
            .headers
            .get("Nats-Msg-Id")
            .and_then(|v| fabricd::uplink::parse_message_id(v.as_str()).map(|(_, o, _)| o))
            .unwrap_or(0);
        row.records += count;
        row.last_offset = row.last_offset.max(offset);
    }
    for (key, (created_ms, report)) in reports(cli, js).await? {
        let row = machines.entry(key).or_default();
        row.contact = row.contact.max(created_ms.div_euclid(1000));
        row.reported_ms = created_ms;
        row.status = Some(report);
    }
    let enrolled = enrolled(cli, js).await;
    let now = unix_now() as i64;
    let mut below = Vec::new();
    // `box acked` and the lag are what the box last reported (`?`: no report yet).
    // `health`: init's word (`ready`, `starting`, `degraded`, `?`), the details below.
    // `boot`: the release and slot its last boot report replays to (`quoted`: its
    // quote checks, no --release given; `-`: not enrolled; `MISSING`: enrolled
    // but no boot report; `REFUSED`: the reason is printed below the table).
    println!(
        "{:<28} {:>10} {:>12} {:>10} {:>12} {:>12} {:>8} {:>14} {:>9} {:>14}",
        "site.machine",
        "records",
        "last offset",
        "box acked",
        "lag records",
        "lag bytes",
        "dropped",
        "last contact",
        "health",
        "boot"
    );
    for (m, row) in machines {
        let [acked, lag, lag_bytes, dropped] = match &row.status {
            Some(s) => {
                let sum = |f: fn(&fabricd::uplink::ClassStatus) -> u64| {
                    s.classes.iter().map(f).sum::<u64>().to_string()
                };
                [
                    s.classes
                        .iter()
                        .filter_map(|c| c.acked)
                        .max()
                        .map_or("-".into(), |a| a.to_string()),
                    sum(|c| c.lag_records),
                    sum(|c| c.lag_bytes),
                    sum(|c| c.dropped_records),
                ]
            }
            None => ["?", "?", "?", "?"].map(String::from),
        };
        let boot = match attestation(
            enrolled.get(&m),
            row.status.as_ref(),
            now as u64,
            *report_max_age_secs,
            &releases,
        ) {
            Some(Attestation::Trusted { release, slot }) => format!("{release}/{slot}"),
            Some(Attestation::Quoted) => "quoted".into(),
            Some(Attestation::Refused(e)) => {
                below.push(format!("{m}: boot report refused: {e}"));
                "REFUSED".into()
            }
            Some(Attestation::Missing) => {
                below.push(format!(
                    "{m}: enrolled, but its last status report has no boot report"
                ));
                "MISSING".into()
            }
            None => "-".into(),
        };
        // A log restored from a backup: said by the box, once it found the core holding
        // a record its log does not.
        for c in row.status.iter().flat_map(|s| &s.classes) {
            if let Some(d) = &c.diverged {
                below.push(format!("{m}: LOG RESTORED? class {}: {d}", c.class));
            }
        }
        if let Some(note) = row
            .status
            .as_ref()
            .and_then(|s| clock_note(s.time_ms, row.reported_ms))
        {
            below.push(format!("{m}: {note}"));
        }
        let health = row.status.as_ref().and_then(|s| s.health.as_ref());
        let (word, notes) = health_of(health, now as u64 * 1000);
        below.extend(notes.into_iter().map(|n| format!("{m}: {n}")));
        println!(
                "{m:<28} {:>10} {:>12} {acked:>10} {lag:>12} {lag_bytes:>12} {dropped:>8} {:>12}s ago {word:>9} {boot:>14}",
                row.records,
                row.last_offset,
                now - row.contact
            );
    }
    for r in below {
        println!("{r}");
    }
    let info = stream.cached_info();
    if let Some(line) = replicas_line(&cli.stream, info.config.num_replicas, info.cluster.as_ref())
    {
        println!("{line}");
    }
    Ok(())
}

/// How a clustered stream's replicas stand, as `status` says it last: its leader and
/// each other replica, current or not; `None` for a stream of one replica. A replica
/// behind (a server back with an empty store copying the stream, or a slow one) or
/// offline, or a stream without a leader (records wait on the boxes until it has one),
/// is said in capitals.
fn replicas_line(
    stream: &str,
    replicas: usize,
    cluster: Option<&async_nats::jetstream::stream::ClusterInfo>,
) -> Option<String> {
    if replicas <= 1 {
        return None;
    }
    let mut said = vec![match cluster.and_then(|c| c.leader.as_deref()) {
        Some(leader) => format!("leader {leader}"),
        None => "NO LEADER (the cluster lost its quorum for it: records wait on the boxes)".into(),
    }];
    let peers = cluster.map_or(&[][..], |c| &c.replicas[..]);
    for p in peers {
        said.push(if p.offline {
            format!(
                "{} OFFLINE (last seen {} s ago)",
                p.name,
                p.active.as_secs()
            )
        } else if !p.current || p.lag.unwrap_or(0) > 0 {
            format!(
                "{} CATCHING UP ({} operations behind)",
                p.name,
                p.lag.unwrap_or(0)
            )
        } else {
            format!("{} current", p.name)
        });
    }
    if peers.len() + 1 < replicas {
        said.push(format!(
            "{} of its {replicas} replicas MISSING",
            replicas - 1 - peers.len()
        ));
    }
    Some(format!(
        "stream {stream}: {replicas} replicas: {}",
        said.join(", ")
    ))
}

/// How far a box's clock may be from the core's before `status` says so: a report is
/// put within an ack timeout of its writing.
const CLOCK_SLACK_MS: i64 = 60_000;

/// What `status` says of a box whose clock is off: its status report's time (`box_ms`,
/// its clock) against when the core took it (`core_ms`).
fn clock_note(box_ms: u64, core_ms: i64) -> Option<String> {
    let off = i64::try_from(box_ms).ok()?.checked_sub(core_ms)?;
    if off.abs() <= CLOCK_SLACK_MS {
        return None;
    }
    // To the nearest second: the report's put takes a few ms.
    let secs = (off.unsigned_abs() + 500) / 1000;
    let span = match secs {
        s if s >= 86_400 => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} min {} s", s / 60, s % 60),
    };
    Some(format!(
        "CLOCK OFF: its clock is {span} {} the core's ({}{secs} s): its records' \
         Fabric-Timestamp, boot reports and update windows go by it",
        if off > 0 { "ahead of" } else { "behind" },
        if off > 0 { "+" } else { "-" },
    ))
}

/// Each box's latest status report, keyed `<site>.<machine>`, with when the core took it
/// (unix ms, the core's clock). An unreadable one is said and left out.
pub(crate) async fn reports(
    cli: &Cli,
    js: &async_nats::jetstream::Context,
) -> Result<std::collections::BTreeMap<String, (i64, fabricd::uplink::BoxStatus)>> {
    let bucket = js
        .get_key_value(&cli.status_bucket)
        .await
        .map_err(fabricd::Error::core(format!(
            "no KV bucket {}",
            cli.status_bucket
        )))?;
    let mut out = std::collections::BTreeMap::new();
    for key in kv_keys(js, &cli.status_bucket).await? {
        let Ok(Some(entry)) = bucket.entry(&key).await else {
            continue;
        };
        if entry.operation != async_nats::jetstream::kv::Operation::Put {
            continue;
        }
        match serde_json::from_slice::<fabricd::uplink::BoxStatus>(&entry.value) {
            Ok(s) => {
                let ms = entry.created.unix_timestamp_nanos() / 1_000_000;
                out.insert(key, (ms as i64, s));
            }
            Err(e) => eprintln!("{key}: unreadable status report: {e}"),
        }
    }
    Ok(out)
}

/// Each enrolled box's record, keyed `<site>.<machine>` (none before any enrollment, or
/// for boxes given a certificate by hand). An unreadable one is said and left out.
pub(crate) async fn enrolled(
    cli: &Cli,
    js: &async_nats::jetstream::Context,
) -> std::collections::HashMap<String, edge_tpm::enrollment::Enrolled> {
    let mut enrolled = std::collections::HashMap::new();
    if let Ok(bucket) = js.get_key_value(&cli.enrolled_bucket).await {
        if let Ok(keys) = kv_keys(js, &cli.enrolled_bucket).await {
            for key in keys {
                if let Ok(Some(v)) = bucket.get(&key).await {
                    match serde_json::from_slice::<edge_tpm::enrollment::Enrolled>(&v) {
                        Ok(e) => {
                            enrolled.insert(key, e);
                        }
                        Err(e) => eprintln!("{key}: unreadable enrollment record: {e}"),
                    }
                }
            }
        }
    }
    enrolled
}

/// What the core makes of an enrolled box's last boot report.
#[derive(Debug, PartialEq)]
pub(crate) enum Attestation {
    /// Its quote checks and its boot replays to one of the accepted releases.
    Trusted { release: String, slot: String },
    /// Its quote checks; no releases were given to replay its boot against.
    Quoted,
    /// Refused, and why.
    Refused(String),
    /// Enrolled, and no boot report in its last status report: a box that stopped
    /// quoting (or never reported) is not taken on trust.
    Missing,
}

/// The attestation of a box from its enrollment and last report; None when it is not
/// enrolled.
pub(crate) fn attestation(
    enrolled: Option<&edge_tpm::enrollment::Enrolled>,
    report: Option<&fabricd::uplink::BoxStatus>,
    now: u64,
    max_age: u64,
    releases: &[edge_tpm::replay::Release],
) -> Option<Attestation> {
    let e = enrolled?;
    let Some(boot) = report.and_then(|r| r.boot.as_ref()) else {
        return Some(Attestation::Missing);
    };
    Some(
        match edge_tpm::enrollment::check_report(e, boot, now, max_age, releases) {
            Ok(Some((release, slot))) => Attestation::Trusted { release, slot },
            Ok(None) => Attestation::Quoted,
            Err(e) => Attestation::Refused(e.to_string()),
        },
    )
}

/// The health column's word, and the lines an operator must read about it.
fn health_of(h: Option<&fabricd::uplink::Health>, now_ms: u64) -> (&'static str, Vec<String>) {
    let Some(h) = h else {
        return ("?", Vec::new());
    };
    let mut notes = Vec::new();
    if !h.failed.is_empty() {
        let since = h.degraded_since_ms.map_or(String::new(), |t| {
            format!(" for {} s", now_ms.saturating_sub(t) / 1000)
        });
        notes.push(format!(
            "degraded{since}: given up after crash loops (retried later): {}",
            h.failed.join(", ")
        ));
    }
    if h.previous_boot == "reset by the watchdog" {
        notes.push("its previous boot was reset by the watchdog (init hung)".into());
    }
    if h.root_corrupt {
        notes
            .push("its running root met a block that did not verify (dm-verity): update it".into());
    }
    if !h.undeclared_listeners.is_empty() {
        notes.push(format!(
            "listening on the network, not declared: {}",
            h.undeclared_listeners.join(", ")
        ));
    }
    let word = if !h.failed.is_empty() {
        "degraded"
    } else if h.ready {
        "ready"
    } else {
        "starting"
    };
    (word, notes)
}

#[cfg(test)]
mod tests {
    use super::{clock_note, health_of, replicas_line};
    use async_nats::jetstream::stream::{ClusterInfo, PeerInfo};
    use fabricd::uplink::Health;
    use std::time::Duration;

    #[test]
    fn a_replica_offline_or_behind_and_a_stream_without_leader_are_said() {
        assert_eq!(replicas_line("EDGE", 1, None), None);
        let peer = |name: &str, current, offline, lag| PeerInfo {
            name: name.into(),
            current,
            offline,
            lag,
            active: Duration::from_secs(12),
        };
        let mut c = ClusterInfo {
            leader: Some("n1".into()),
            replicas: vec![
                peer("n0", true, false, None),
                peer("n2", true, false, Some(0)),
            ],
            ..Default::default()
        };
        assert_eq!(
            replicas_line("EDGE", 3, Some(&c)).unwrap(),
            "stream EDGE: 3 replicas: leader n1, n0 current, n2 current"
        );
        c.replicas[1] = peer("n2", false, false, Some(4096));
        assert_eq!(
            replicas_line("EDGE", 3, Some(&c)).unwrap(),
            "stream EDGE: 3 replicas: leader n1, n0 current, n2 CATCHING UP (4096 operations behind)"
        );
        c.replicas[1] = peer("n2", false, true, None);
        c.replicas.remove(0);
        assert_eq!(
            replicas_line("EDGE", 3, Some(&c)).unwrap(),
            "stream EDGE: 3 replicas: leader n1, n2 OFFLINE (last seen 12 s ago), 1 of its 3 replicas MISSING"
        );
        c.leader = None;
        assert!(replicas_line("EDGE", 3, Some(&c))
            .unwrap()
            .starts_with("stream EDGE: 3 replicas: NO LEADER"));
    }

    #[test]
    fn a_degraded_or_watchdog_reset_box_is_named_with_why_and_since_when() {
        assert_eq!(health_of(None, 0), ("?", vec![]));
        let ok = Health {
            ready: true,
            previous_boot: "shut down cleanly".into(),
            ..Health::default()
        };
        assert_eq!(health_of(Some(&ok), 0), ("ready", vec![]));
        let bad = Health {
            ready: true,
            failed: vec!["noded".into(), "storaged".into()],
            degraded_since_ms: Some(10_000),
            previous_boot: "reset by the watchdog".into(),
            undeclared_listeners: vec!["tcp/0.0.0.0:22".into()],
            root_corrupt: true,
        };
        let (word, notes) = health_of(Some(&bad), 70_000);
        assert_eq!(word, "degraded");
        assert_eq!(
            notes,
            [
                "degraded for 60 s: given up after crash loops (retried later): noded, storaged",
                "its previous boot was reset by the watchdog (init hung)",
                "its running root met a block that did not verify (dm-verity): update it",
                "listening on the network, not declared: tcp/0.0.0.0:22"
            ]
        );
        let starting = Health::default();
        assert_eq!(health_of(Some(&starting), 0).0, "starting");
    }

    #[test]
    fn a_clock_more_than_a_minute_off_is_said_with_how_far_and_which_way() {
        let core = 1_800_000_000_000i64;
        assert_eq!(clock_note(core as u64, core), None);
        assert_eq!(clock_note(core as u64 - 59_000, core), None);
        let ahead = clock_note(core as u64 + 90_061_000, core).unwrap();
        assert!(
            ahead.starts_with("CLOCK OFF: its clock is 1 d 1 h ahead of the core's (+90061 s)"),
            "{ahead}"
        );
        let behind = clock_note(core as u64 - 125_000, core).unwrap();
        assert!(
            behind.starts_with("CLOCK OFF: its clock is 2 min 5 s behind the core's (-125 s)"),
            "{behind}"
        );
        // A box at the epoch (no RTC, no time yet).
        assert!(clock_note(0, core).unwrap().contains("20833 d 8 h behind"));
    }
}
