//! The `/metrics` text every daemon answers: the daemon reads its values at scrape time
//! and names each family here; prometheus-client writes them (the OpenMetrics text
//! format, which Prometheus reads, with `# HELP`, `# TYPE` and the escaping done once).
//!
//! A counter is named with its `_total` (`fabricd_records_in_total`): that is the name of
//! its samples; OpenMetrics names the family without it in the `# TYPE` line. Label values
//! are escaped here (`\\`, `\"`, `\n`): prometheus-client writes them as given
//! (prometheus/client_rust#151).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The exposition's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A sample's labels, in order, their values escaped for the text format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    /// A sample without labels.
    pub fn none() -> Labels {
        Labels::default()
    }
}

/// Labels from (name, value) pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    Labels(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), escape(v)))
            .collect(),
    )
}

/// A label value as the text format wants it: backslash, double quote and line feed
/// escaped.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug)]
enum Samples {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, i64)>),
    GaugeF64(Vec<(Labels, f64)>),
    CounterF64(Vec<(Labels, f64)>),
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    samples: Samples,
}

/// The families of one scrape, in the order they are added.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// A counter family; `name` ends in `_total`.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        debug_assert!(
            name.ends_with("_total"),
            "{name}: a counter's name ends in _total"
        );
        self.push(name, help, Samples::Counter(samples.into_iter().collect()));
    }

    /// A counter family of fractions (seconds spent); `name` ends in `_total`.
    pub fn counter_f64(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        debug_assert!(
            name.ends_with("_total"),
            "{name}: a counter's name ends in _total"
        );
        self.push(
            name,
            help,
            Samples::CounterF64(samples.into_iter().collect()),
        );
    }

    /// A gauge family of counts or bytes.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let whole = samples
            .into_iter()
            .map(|(l, v)| (l, i64::try_from(v).unwrap_or(i64::MAX)))
            .collect();
        self.push(name, help, Samples::Gauge(whole));
    }

    /// A gauge family of fractions (seconds, ratios).
    pub fn gauge_f64(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        self.push(name, help, Samples::GaugeF64(samples.into_iter().collect()));
    }

    fn push(&mut self, name: &str, help: &str, samples: Samples) {
        self.families.push(Family {
            name: name.to_string(),
            help: help.to_string(),
            samples,
        });
    }

    /// The text of every family.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String fails only if a value's Display does, which ours do not.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            match &f.samples {
                Samples::Counter(s) => {
                    let name = f.name.strip_suffix("_total").unwrap_or(&f.name);
                    let m = encoder.encode_descriptor(name, &f.help, None, MetricType::Counter)?;
                    samples(m, s, |v| ConstCounter::new(*v))?;
                }
                Samples::CounterF64(s) => {
                    let name = f.name.strip_suffix("_total").unwrap_or(&f.name);
                    let m = encoder.encode_descriptor(name, &f.help, None, MetricType::Counter)?;
                    samples(m, s, |v| ConstCounter::new(*v))?;
                }
                Samples::Gauge(s) => {
                    let m = encoder.encode_descriptor(&f.name, &f.help, None, MetricType::Gauge)?;
                    samples(m, s, |v| ConstGauge::new(*v))?;
                }
                Samples::GaugeF64(s) => {
                    let m = encoder.encode_descriptor(&f.name, &f.help, None, MetricType::Gauge)?;
                    samples(m, s, |v| ConstGauge::new(*v))?;
                }
            }
        }
        Ok(())
    }
}

/// One family's samples; a family of one sample without labels is written `name value`.
fn samples<V, M: EncodeMetric>(
    mut m: MetricEncoder,
    samples: &[(Labels, V)],
    metric: impl Fn(&V) -> M,
) -> Result<(), std::fmt::Error> {
    if let [(labels, v)] = samples {
        if labels.0.is_empty() {
            return metric(v).encode(m);
        }
    }
    for (labels, v) in samples {
        metric(v).encode(m.encode_family(&labels.0)?)?;
    }
    Ok(())
}

/// One sample read back from an exposition: its metric name, its labels in the order
/// written (values unescaped) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Reads the samples of an exposition (the OpenMetrics text every daemon here writes, or
/// Prometheus' own text format): `# ` lines are skipped, as are a sample's timestamp and
/// exemplar (the reader stamps the samples with the time it scraped them). A line that
/// is not a sample is an error naming its number and what was wrong, and nothing of the
/// exposition is taken.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|why| format!("line {}: {why}", i + 1))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value after the name")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("`{name}` is not a metric name"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("a label without `=`")?;
            let label = rest[..eq].trim();
            if !is_label_name(label) {
                return Err(format!("`{label}` is not a label name"));
            }
            let quoted = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or_else(|| format!("label {label}'s value is not quoted"))?;
            let (value, after) = unquote(quoted)
                .ok_or_else(|| format!("label {label}'s value has no closing quote"))?;
            labels.push((label.to_owned(), value));
            rest = after;
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("no value after the name")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("`{v}` is not a number"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A quoted label value up to its closing quote (unescaped), and what follows it.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
    None
}

fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// A label name (letters, digits and `_`, not starting with a digit).
pub fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_as_openmetrics_text_with_labels_escaped() {
        let mut e = Exposition::new();
        e.counter(
            "x_records_in_total",
            "Records made durable.",
            [
                (labels(&[("class", "a\"b")]), 5),
                (labels(&[("class", "c")]), 0),
            ],
        );
        e.gauge(
            "x_disk_bytes",
            "Bytes on disk.",
            [(Labels::none(), 1 << 40)],
        );
        e.gauge_f64("x_pass_seconds", "How long.", [(Labels::none(), 0.25)]);
        let text = e.render();
        let want = "# HELP x_records_in Records made durable.\n\
                    # TYPE x_records_in counter\n\
                    x_records_in_total{class=\"a\\\"b\"} 5\n\
                    x_records_in_total{class=\"c\"} 0\n\
                    # HELP x_disk_bytes Bytes on disk.\n\
                    # TYPE x_disk_bytes gauge\n\
                    x_disk_bytes 1099511627776\n\
                    # HELP x_pass_seconds How long.\n\
                    # TYPE x_pass_seconds gauge\n\
                    x_pass_seconds 0.25\n\
                    # EOF\n";
        assert_eq!(text, want);
        assert_eq!(
            labels(&[("a", "plain-name.1")]),
            Labels(vec![("a".into(), "plain-name.1".into())])
        );
        assert_eq!(labels(&[("a", "x\\y\nz")]).0[0].1, "x\\\\y\\nz");
    }

    #[test]
    fn an_exposition_reads_back_and_a_bad_line_is_named() {
        let mut e = Exposition::new();
        e.counter(
            "x_in_total",
            "In.",
            [(labels(&[("class", "a\"b\\c\nd"), ("k", "v")]), 5)],
        );
        e.gauge_f64("x_seconds", "S.", [(Labels::none(), 0.25)]);
        let got = parse(&e.render()).unwrap();
        assert_eq!(
            got,
            vec![
                Sample {
                    name: "x_in_total".into(),
                    labels: vec![
                        ("class".into(), "a\"b\\c\nd".into()),
                        ("k".into(), "v".into())
                    ],
                    value: 5.0
                },
                Sample {
                    name: "x_seconds".into(),
                    labels: vec![],
                    value: 0.25
                },
            ]
        );
        // Prometheus' own format: a timestamp after the value, special values.
        let p = parse("up 1 1700000000000\nx{a=\"1\",} +Inf\ny NaN\n").unwrap();
        assert_eq!(p[0].value, 1.0);
        assert_eq!(p[1].labels, vec![("a".into(), "1".into())]);
        assert!(p[1].value.is_infinite() && p[2].value.is_nan());
        for (bad, why) in [
            ("x_total\n", "line 1: no value after the name"),
            ("# c\nx 1\n9x 1\n", "line 3: `9x` is not a metric name"),
            ("x{a=1} 2\n", "line 1: label a's value is not quoted"),
            (
                "x{a=\"1} 2\n",
                "line 1: label a's value has no closing quote",
            ),
            ("x{a=\"1\"} two\n", "line 1: `two` is not a number"),
            ("x{-a=\"1\"} 2\n", "line 1: `-a` is not a label name"),
        ] {
            assert_eq!(parse(bad).unwrap_err(), why, "{bad:?}");
        }
    }
}
