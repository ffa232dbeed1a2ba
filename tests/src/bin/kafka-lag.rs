//! kafka-lag: a consumer group's committed lag on a topic (high watermark
//! minus committed offset, summed over partitions), printed as one number.
//! `make demo` uses it to know when the services have caught up.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Prints a consumer group's lag on a topic.
#[derive(Debug, Parser)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// Topic.
    #[arg(long)]
    topic: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap_servers)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .create()
        .context("consumer")?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(&args.topic), timeout)?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&args.topic, p as i32);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut lag = 0i64;
    for p in 0..partitions as i32 {
        let (_, high) = consumer.fetch_watermarks(&args.topic, p, timeout)?;
        let done = match committed.find_partition(&args.topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        };
        lag += (high - done).max(0);
    }
    println!("{lag}");
    Ok(())
}
