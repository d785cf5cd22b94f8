//! `edgectl logs`: a box's service or pod logs, as its fabricd sent them
//! (fabricd/src/logs.rs): what the core holds, then (`-f`) what arrives.

use std::time::Duration;

use futures_util::StreamExt;

use crate::error::{Error, Result};
use crate::Cli;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[arg(long)]
    site: String,
    #[arg(long, default_value = "*")]
    machine: String,
    /// One service's log (init's name for it: noded, storaged, fabricd, containerd).
    #[arg(long, conflicts_with = "pod")]
    service: Option<String>,
    /// One pod's containers' logs.
    #[arg(long)]
    pod: Option<String>,
    #[arg(long, default_value = "default", requires = "pod")]
    namespace: String,
    /// Keep printing what arrives.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only what the core received in this long before now (`90s`, `10m`, `2h`, `1d`).
    #[arg(long, value_parser = parse_since)]
    since: Option<Duration>,
}

fn parse_since(s: &str) -> std::result::Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not a number and a unit (90s, 10m, 2h, 1d)"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("`{unit}` is not a unit (s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// The subject of the logs asked for.
fn filter(prefix: &str, a: &Args) -> Result<String> {
    let name = |what: &str, v: &str| {
        let t = v.replace('.', "_");
        if fabricd::config::is_token(&t) {
            Ok(t)
        } else {
            Err(Error::Invalid {
                what: format!("--{what} {v}"),
                why: "must be letters, digits, '-', '_' or '.'".into(),
            })
        }
    };
    let (site, machine) = (&a.site, &a.machine);
    let rest = match (&a.service, &a.pod) {
        (Some(s), _) => format!("service.{}", name("service", s)?),
        (None, Some(p)) => format!(
            "pod.{}.{}.*",
            name("namespace", &a.namespace)?,
            name("pod", p)?
        ),
        (None, None) => ">".into(),
    };
    Ok(format!("{prefix}.{site}.{machine}.logs.{rest}"))
}

/// A CRI log line (`<time> <stream> <P|F> <message>`) as its message, with the
/// pieces of a long line (`P`) joined; any other line as it is.
struct Cri {
    partial: String,
}

impl Cri {
    fn line(&mut self, line: &str) -> Option<String> {
        match edge_common::cri_log::parse_line(line) {
            Some(e) => {
                self.partial.push_str(e.content);
                (!e.partial).then(|| std::mem::take(&mut self.partial))
            }
            None => Some(line.to_owned()),
        }
    }
}

pub(crate) async fn run(cli: &Cli, js: &async_nats::jetstream::Context, args: &Args) -> Result<()> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let subject = filter(&cli.prefix, args)?;
    let deliver_policy = match args.since {
        Some(d) => DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::now_utc() - d,
        },
        None => DeliverPolicy::All,
    };
    let stream = js
        .get_stream(&cli.stream)
        .await
        .map_err(fabricd::Error::core(format!("no stream {}", cli.stream)))?;
    let mut consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.clone(),
            ack_policy: AckPolicy::None,
            deliver_policy,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(fabricd::Error::core("failed to create a consumer"))?;
    // What the core holds now: printed, and then the end unless following.
    let held = consumer
        .info()
        .await
        .map_err(fabricd::Error::core("failed to ask the consumer"))?
        .num_pending;
    if held == 0 && !args.follow {
        return Ok(());
    }
    let mut msgs = consumer
        .messages()
        .await
        .map_err(fabricd::Error::core("failed to read"))?;
    // Several sources: each line says whose it is.
    let one_source = args.service.is_some() && args.machine != "*";
    let mut cri: std::collections::HashMap<String, Cri> = Default::default();
    // Subjects whose last record ended inside a line (a line longer than the box's batch).
    let mut cut: std::collections::HashSet<String> = Default::default();
    let mut n = 0u64;
    while args.follow || n < held {
        let Some(m) = msgs.next().await else { break };
        let m = m.map_err(fabricd::Error::core("failed to read"))?;
        n += 1;
        let encoding = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Fabric-Encoding"))
            .map(|v| v.as_str().to_owned());
        let value = match fabricd::uplink::decode(&m.payload, encoding.as_deref(), 64 << 20) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("edgectl logs: {}: {e}", m.subject);
                continue;
            }
        };
        // <prefix>.<site>.<machine>.logs.<service.x | pod.ns.pod.container>
        let tail = m
            .subject
            .strip_prefix(&cli.prefix)
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or(&m.subject);
        let mut t = tail.splitn(4, '.');
        let (_site, machine, source) = (t.next(), t.next().unwrap_or("?"), t.nth(1).unwrap_or("?"));
        let is_pod = source.starts_with("pod.");
        let join = cri.entry(m.subject.to_string()).or_insert(Cri {
            partial: String::new(),
        });
        let continues = m
            .headers
            .as_ref()
            .is_some_and(|h| h.get(fabricd::logs::CONTINUES_HEADER).is_some());
        let text = marked_pieces(
            &String::from_utf8_lossy(&value),
            cut.remove(m.subject.as_str()),
            continues,
        );
        if continues {
            cut.insert(m.subject.to_string());
        }
        for line in text.lines() {
            let line = if is_pod {
                join.line(line)
            } else {
                Some(line.to_owned())
            };
            let Some(line) = line else { continue };
            if one_source {
                println!("{line}");
            } else {
                println!("{machine} {source}: {line}");
            }
        }
    }
    Ok(())
}

/// A record's text with the pieces of a long line marked: `[...]` where a line goes on
/// in the next record (`continues`) and where it goes on from the last (`continued`).
fn marked_pieces(text: &str, continued: bool, continues: bool) -> String {
    let mut out = String::with_capacity(text.len() + 12);
    if continued {
        out.push_str("[...] ");
    }
    out.push_str(text);
    if continues {
        out.push_str(" [...]\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pieces_of_a_long_line_are_marked_and_bad_utf8_shown_replaced() {
        assert_eq!(marked_pieces("aaa", false, true), "aaa [...]\n");
        assert_eq!(marked_pieces("bbb", true, true), "[...] bbb [...]\n");
        assert_eq!(marked_pieces("cc\nnext\n", true, false), "[...] cc\nnext\n");
        let bad = String::from_utf8_lossy(b"ok \xff\xfe end\n");
        assert_eq!(
            marked_pieces(&bad, false, false),
            "ok \u{fffd}\u{fffd} end\n"
        );
    }

    #[test]
    fn since_takes_a_number_and_a_unit() {
        assert_eq!(parse_since("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_since("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_since("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_since("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_since("ten").unwrap_err().contains("not a number"));
        assert!(parse_since("5y").unwrap_err().contains("`y` is not a unit"));
    }

    #[test]
    fn a_cri_line_is_its_message_and_pieces_are_joined() {
        let mut c = Cri {
            partial: String::new(),
        };
        assert_eq!(
            c.line("2026-12-06T04:00:00Z stdout F hello").as_deref(),
            Some("hello")
        );
        assert_eq!(c.line("2026-12-06T04:00:00Z stderr P hel"), None);
        assert_eq!(
            c.line("2026-12-06T04:00:00Z stderr F lo").as_deref(),
            Some("hello")
        );
        assert_eq!(c.line("not cri").as_deref(), Some("not cri"));
    }
}
