//! `edgectl tail`: a box's records of one topic as they reach the core.

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
    #[arg(long, default_value = ">")]
    topic: String,
    #[arg(long)]
    all: bool,
    /// Stop after this many records.
    #[arg(long)]
    count: Option<usize>,
    /// Print who produced each record (the Edge-Producer fabricd stamped: an address,
    /// `local:<program>/uid=<n>` or `pod:<namespace>/<name>`) after its id.
    #[arg(long)]
    producer: bool,
}

pub(crate) async fn run(cli: &Cli, js: &async_nats::jetstream::Context, args: &Args) -> Result<()> {
    let Args {
        site,
        machine,
        topic,
        all,
        count,
        producer,
    } = args;
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let stream = js
        .get_stream(&cli.stream)
        .await
        .map_err(fabricd::Error::core(format!("no stream {}", cli.stream)))?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: format!("{}.{site}.{machine}.{topic}", cli.prefix),
            ack_policy: AckPolicy::None,
            deliver_policy: if *all {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(fabricd::Error::core("failed to create a consumer"))?;
    let mut msgs = consumer
        .messages()
        .await
        .map_err(fabricd::Error::core("failed to read"))?;
    let mut n = 0;
    while count.is_none_or(|c| n < c) {
        let Some(m) = msgs.next().await else { break };
        let m = m.map_err(fabricd::Error::core("failed to read"))?;
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let by = match m
            .headers
            .as_ref()
            .and_then(|h| h.get(fabricd::produce::PRODUCER_HEADER))
        {
            Some(v) if *producer => format!(" {}", v.as_str()),
            None if *producer => " -".to_owned(),
            _ => String::new(),
        };
        let encoding = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Fabric-Encoding"))
            .map(|v| v.as_str().to_owned());
        let value = fabricd::uplink::decode(&m.payload, encoding.as_deref(), 64 << 20)
            .map_err(Error::within(format_args!("{} {id}", m.subject)))?;
        println!(
            "{} {id}{by} {}",
            m.subject,
            String::from_utf8_lossy(&value).escape_debug()
        );
        n += 1;
    }
    Ok(())
}
