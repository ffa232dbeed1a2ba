//! gen-events: realistic movie-service log events into Kafka, reproducibly.
//!
//! `--route logstash` does what the Logstash pipeline does: every event to
//! user2, search / movie_detail ones also to user3 (malformed lines only to
//! user2: Logstash cannot read their `info`). `--topic T` sends everything to
//! one topic instead.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use e2e::generator::{Generator, Mix};
use e2e::kafka;

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
            let partition = (sent % 3) as i32;
            match &route {
                Route::One(_) => user2.push((partition, event.payload)),
                Route::Logstash => {
                    if event.valid && matches!(event.info, "search" | "movie_detail") {
                        user3.push((partition, event.payload.clone()));
                    }
                    user2.push((partition, event.payload));
                }
            }
            sent += 1;
        }
        let first = match &route {
            Route::One(topic) => topic.as_str(),
            Route::Logstash => args.user2_topic.as_str(),
        };
        kafka::produce(&producer, first, std::mem::take(&mut user2)).await?;
        if !user3.is_empty() {
            kafka::produce(&producer, &args.user3_topic, std::mem::take(&mut user3)).await?;
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
