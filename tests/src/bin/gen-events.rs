//! gen-events: realistic movie-service log events into Kafka, reproducibly.
//!
//! `--route logstash` does what deploy/logstash/pipeline.conf does: every
//! event to user2, search / movie_detail ones also to user3; a malformed line
//! Logstash cannot read (not a JSON object, an `@timestamp` it cannot parse)
//! only to user2, one it can read by its `info`. `--topic T` sends everything
//! to one topic instead.
//!
//! Messages are keyed as Logstash keys them: by `user_id`, and without a key
//! for an event without one (absent, null, `""` or `false`; see
//! [`e2e::generator::logstash_route`]). They go to the partition the Java
//! client that Logstash's kafka output uses would pick
//! ([`e2e::generator::JavaPartitioner`]): for a key, murmur2 of the key made
//! positive, modulo the topic's partition count, so one user's events stay in
//! one partition, in the order generated; without a key, one partition for
//! about a batch (16 KiB) of such messages, then the next in turn, so
//! anonymous events spread over all partitions as the Java client's sticky
//! partitioner spreads them.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use e2e::generator::{logstash_route, Generator, JavaPartitioner, Mix};
use e2e::kafka;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

/// Generates movie-service log events into Kafka.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    /// Send every event to this topic (instead of --route).
    #[arg(long, conflicts_with = "route")]
    topic: Option<String>,
    /// `logstash`: every event to --user2-topic, search/movie_detail also to --user3-topic.
    #[arg(long, value_parser = ["logstash"])]
    route: Option<String>,
    /// Topic of every event in logstash routing.
    #[arg(long, default_value = "user2")]
    user2_topic: String,
    /// Topic of search/movie_detail events in logstash routing.
    #[arg(long, default_value = "user3")]
    user3_topic: String,
    /// Only search and movie_detail events (with --topic).
    #[arg(long)]
    user3_only: bool,
    /// Number of events.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Events per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Stop after this many seconds even if --count is not reached.
    #[arg(long)]
    seconds: Option<u64>,
    /// Seed: the same seed gives the same events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of malformed lines, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    bad_fraction: f64,
    /// Distinct users.
    #[arg(long, default_value_t = 2_000)]
    users: u32,
    /// Batch messages (faster; see e2e::kafka::producer for why tests do not).
    #[arg(long)]
    batch: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (mix, route) = match (&args.topic, &args.route) {
        (Some(topic), None) => (
            if args.user3_only {
                Mix::User3
            } else {
                Mix::All
            },
            Route::One(topic.clone()),
        ),
        (None, Some(_)) => (Mix::All, Route::Logstash),
        _ => bail!("give either --topic TOPIC or --route logstash"),
    };
    let producer = kafka::producer_with(&args.bootstrap_servers, !args.batch)?;
    let mut generator = Generator::new(args.seed, mix, chrono::Utc::now().timestamp_millis())
        .bad_fraction(args.bad_fraction)
        .users(args.users);
    // Partitions are picked as the Java client picks them, so their counts are needed.
    let first = match &route {
        Route::One(topic) => topic.clone(),
        Route::Logstash => args.user2_topic.clone(),
    };
    let mut first_partitioner = JavaPartitioner::new(partition_count(&producer, &first)?);
    let mut user3_partitioner = JavaPartitioner::new(match &route {
        Route::One(_) => 1,
        Route::Logstash => partition_count(&producer, &args.user3_topic)?,
    });
    let started = Instant::now();
    let deadline = args.seconds.map(|s| started + Duration::from_secs(s));
    // Send in slices of 10 ms so a rate is smooth, not bursty.
    let per_tick = if args.rate == 0 {
        10_000
    } else {
        (args.rate / 100).max(1)
    };
    let mut tick =
        tokio::time::interval(Duration::from_millis(if args.rate == 0 { 1 } else { 10 }));
    let (mut sent, mut user2, mut user3) = (0u64, Vec::new(), Vec::new());
    while sent < args.count && deadline.is_none_or(|d| Instant::now() < d) {
        tick.tick().await;
        let n = per_tick.min(args.count - sent);
        for _ in 0..n {
            let event = generator.next_event();
            let to = logstash_route(&event.payload);
            let key = to.key.as_deref().map(str::as_bytes);
            if matches!(route, Route::Logstash) && to.user3 {
                user3.push(Keyed {
                    key: to.key.clone(),
                    partition: user3_partitioner.partition(key, event.payload.len()),
                    payload: event.payload.clone(),
                });
            }
            user2.push(Keyed {
                partition: first_partitioner.partition(key, event.payload.len()),
                key: to.key,
                payload: event.payload,
            });
            sent += 1;
        }
        produce_keyed(&producer, &first, std::mem::take(&mut user2)).await?;
        if !user3.is_empty() {
            produce_keyed(&producer, &args.user3_topic, std::mem::take(&mut user3)).await?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "gen-events: sent {sent} events in {secs:.1} s ({:.0}/s)",
        sent as f64 / secs.max(1e-9)
    );
    Ok(())
}

enum Route {
    One(String),
    Logstash,
}

/// One message: its key (if any), the partition the Java client would pick
/// for it, and the payload.
struct Keyed {
    key: Option<String>,
    partition: i32,
    payload: Vec<u8>,
}

/// The partition count of `topic`, which must exist.
fn partition_count(producer: &FutureProducer, topic: &str) -> anyhow::Result<i32> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("metadata of topic {topic}"))?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .with_context(|| format!("no metadata for topic {topic}"))?;
    if let Some(err) = found.error() {
        bail!("topic {topic}: {err:?}");
    }
    let n = i32::try_from(found.partitions().len())?;
    ensure!(n > 0, "topic {topic} has no partitions (does it exist?)");
    Ok(n)
}

/// Produces messages with their keys (or none) to their partitions and waits
/// for every delivery (e2e::kafka::produce sends without keys).
async fn produce_keyed(
    producer: &FutureProducer,
    topic: &str,
    messages: Vec<Keyed>,
) -> anyhow::Result<()> {
    for chunk in messages.chunks(5_000) {
        let pending = chunk.iter().map(|m| {
            let record = FutureRecord::to(topic)
                .partition(m.partition)
                .payload(&m.payload);
            let record = match &m.key {
                Some(key) => record.key(key.as_bytes()),
                None => record,
            };
            producer.send(record, Timeout::After(Duration::from_secs(30)))
        });
        for result in futures::future::join_all(pending).await {
            result.map_err(|(err, _)| anyhow::anyhow!("delivery to {topic} failed: {err}"))?;
        }
    }
    Ok(())
}
