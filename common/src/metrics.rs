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
}
