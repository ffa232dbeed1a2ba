//! bench: throughput and memory of the services against the local stack.
//!
//! `bench redis`: N generated events already in a fresh user3-like topic;
//! measures, for the do-nothing sink (the consumer's own ceiling) and for
//! redis-sink, the time from process start until every offset is applied,
//! events/s, peak RSS, and (redis) Redis commands per event. redis-sink runs
//! twice, each time against a fresh redis-server of its own: with the
//! append-only file (`appendfsync everysec`, what docs/redis-keys.md asks
//! for in production) and without it, which shows what persistence costs.
//!
//! `bench bigquery`: N events of every kind in a fresh user2-like topic;
//! bigquery-sink (a) against an endpoint that accepts insertAll at once (the
//! sink's own ceiling) and (b) against the emulator; time until every offset
//! is committed, rows/s, peak RSS. For (a) it also prints the steady-state
//! rate (first insertAll to last, start-up excluded) and the CPU the bench
//! process itself (the proxy) used meanwhile. `--skip-emulator` runs (a) only.
//!
//! Run through `make bench`, which builds release binaries and starts the
//! stack.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use e2e::bigquery::{Fault, FaultProxy, InsertSeen};
use e2e::broker::Broker;
use e2e::generator::{Generator, Mix};
use e2e::process::{PrivateRedis, Service};
use e2e::redis::applied_offsets;
use e2e::service::ServiceFlags;
use e2e::{kafka, poll_until, unique, Stack, PARTITIONS};

/// How long one run may take.
const TIMEOUT: Duration = Duration::from_secs(600);

/// Benchmarks against the local stack (scripts/stack.sh up).
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// bigquery-sink: rows/s and peak RSS, against an instant endpoint and the emulator.
    Bigquery {
        /// Events in the topic before the sink starts.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Only the instant endpoint (the emulator run takes minutes).
        #[arg(long)]
        skip_emulator: bool,
    },
    /// redis-sink: events/s, Redis commands per event, peak RSS.
    Redis {
        /// Events in the topic before the consumer starts.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Distinct users in the generated events.
        #[arg(long, default_value_t = 100_000)]
        users: u32,
    },
}

struct Figures {
    name: &'static str,
    events: usize,
    seconds: f64,
    peak_rss: u64,
    cpu_seconds: f64,
    redis_commands: Option<u64>,
    /// CPU seconds redis-server spent meanwhile (INFO cpu).
    redis_cpu_seconds: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    match Cli::parse().command {
        Command::Redis { events, users } => {
            let topic = fill_topic(&stack, "bench-user3", Mix::User3, events, users).await?;
            let null = run_null(&stack, &topic, events).await?;
            // A fresh redis-server per run, so both start from an empty
            // dataset and append-only file: AOF rewrites depend on what the
            // file already holds.
            let mut figures = vec![null];
            for (append_only, name) in [
                (true, "redis-sink, Redis AOF"),
                (false, "redis-sink, Redis without AOF"),
            ] {
                let dir = stack.dir.join(unique("bench-redis"));
                let redis = if append_only {
                    PrivateRedis::start(dir.clone()).await?
                } else {
                    PrivateRedis::start_without_aof(dir.clone()).await?
                };
                figures.push(run_redis(&stack, &redis.url(), &topic, events, name).await?);
                drop(redis);
                std::fs::remove_dir_all(&dir)?;
            }
            print_figures(&figures);
        }
        Command::Bigquery {
            events,
            skip_emulator,
        } => {
            let topic = fill_topic(&stack, "bench-user2", Mix::All, events, 2_000).await?;
            let proxy = FaultProxy::start(&stack.bigquery_endpoint)?;
            proxy.set_faults(vec![Fault::Accept]);
            let started = Instant::now();
            let cpu_before = own_cpu_seconds();
            let instant = run_bigquery(
                &stack,
                &topic,
                events,
                &proxy.endpoint(),
                "bigquery-sink, instant endpoint",
            )
            .await?;
            let bench_cpu = own_cpu_seconds() - cpu_before;
            let inserts = proxy.inserts();
            let accepted: usize = inserts.iter().map(|i| i.rows).sum();
            anyhow::ensure!(
                accepted >= events,
                "the instant endpoint saw {accepted} rows of {events}"
            );
            let mut figures = vec![instant];
            if !skip_emulator {
                figures.push(
                    run_bigquery(
                        &stack,
                        &topic,
                        events,
                        &stack.bigquery_endpoint,
                        "bigquery-sink, emulator",
                    )
                    .await?,
                );
            }
            print_figures(&figures);
            print_steady_state(started, &inserts, bench_cpu);
        }
    }
    Ok(())
}

/// A fresh topic (and its DLQ) holding `events` generated events, produced
/// in record batches of the size Logstash makes.
async fn fill_topic(
    stack: &Stack,
    prefix: &str,
    mix: Mix,
    events: usize,
    users: u32,
) -> anyhow::Result<String> {
    let broker = Broker::tansu(stack);
    let topic = broker.topic_with_dlq(prefix).await?;
    eprintln!("bench: producing {events} events into {topic} ...");
    // Batched (not `Broker::producer`'s one record per batch): nothing here
    // resumes mid-stream.
    let producer = kafka::producer_with(broker.bootstrap(), false)?;
    let mut generator = Generator::new(42, mix, chrono::Utc::now().timestamp_millis()).users(users);
    let mut bytes = 0usize;
    let mut produced = 0usize;
    while produced < events {
        let n = (events - produced).min(50_000);
        let chunk: Vec<(i32, Vec<u8>)> = (0..n)
            .map(|i| {
                let payload = generator.next_event().payload;
                bytes += payload.len();
                (((produced + i) % PARTITIONS as usize) as i32, payload)
            })
            .collect();
        kafka::produce(&producer, &topic, chunk).await?;
        produced += n;
    }
    eprintln!("bench: {events} events, {:.0} MB", bytes as f64 / 1e6);
    Ok(topic)
}

fn print_figures(figures: &[Figures]) {
    println!();
    println!(
        "{:<34} {:>10} {:>9} {:>12} {:>13} {:>10} {:>12} {:>12}",
        "consumer",
        "events",
        "seconds",
        "events/s",
        "peak RSS MB",
        "CPU s",
        "cmds/event",
        "Redis CPU s"
    );
    for f in figures {
        println!(
            "{:<34} {:>10} {:>9.2} {:>12.0} {:>13.1} {:>10.2} {:>12} {:>12}",
            f.name,
            f.events,
            f.seconds,
            f.events as f64 / f.seconds,
            f.peak_rss as f64 / (1024.0 * 1024.0),
            f.cpu_seconds,
            f.redis_commands.map_or("-".to_owned(), |c| format!(
                "{:.3}",
                c as f64 / f.events as f64
            )),
            f.redis_cpu_seconds
                .map_or("-".to_owned(), |c| format!("{c:.2}")),
        );
    }
}

/// The instant endpoint's run without start-up: from the first insertAll
/// request to the last (rows after the first request over that span).
fn print_steady_state(started: Instant, inserts: &[InsertSeen], bench_cpu: f64) {
    let (Some(first), Some(last)) = (inserts.first(), inserts.last()) else {
        return;
    };
    let span = last.at.duration_since(first.at).as_secs_f64();
    let rows: usize = inserts[1..].iter().map(|i| i.rows).sum();
    println!();
    println!(
        "instant endpoint: first insertAll {:.2} s after start; steady state (first to last \
         insertAll, {} requests): {rows} rows in {span:.2} s = {:.0} rows/s; bench process \
         (proxy, polling) CPU {bench_cpu:.2} s",
        first.at.duration_since(started).as_secs_f64(),
        inserts.len(),
        rows as f64 / span.max(f64::EPSILON),
    );
}

/// User + system CPU seconds of this process so far (0 if unreadable).
fn own_cpu_seconds() -> f64 {
    e2e::process::cpu_seconds("self").unwrap_or(0.0)
}

/// A service's flags in the benchmark: the defaults but for JSON logs.
fn bench_flags(flags: ServiceFlags) -> ServiceFlags {
    flags.set("--log-format", "json")
}

async fn run_null(stack: &Stack, topic: &str, events: usize) -> anyhow::Result<Figures> {
    let group = unique("bench-null");
    let flags = bench_flags(ServiceFlags::null_sink(&stack.kafka, topic, &group));
    let figures = run_until_committed(stack, topic, events, &group, &flags).await?;
    Ok(Figures {
        name: "null sink (ceiling)",
        ..figures
    })
}

async fn run_bigquery(
    stack: &Stack,
    topic: &str,
    events: usize,
    endpoint: &str,
    name: &'static str,
) -> anyhow::Result<Figures> {
    let group = unique("bench-bq");
    let table = group.replace('-', "_");
    let flags = bench_flags(ServiceFlags::bigquery_sink(
        &stack.kafka,
        topic,
        &group,
        endpoint,
        &stack.bigquery_project,
        &stack.bigquery_dataset,
        &table,
    ));
    let figures = run_until_committed(stack, topic, events, &group, &flags).await?;
    Ok(Figures { name, ..figures })
}

/// Runs a service until its group has committed every offset.
async fn run_until_committed(
    stack: &Stack,
    topic: &str,
    events: usize,
    group: &str,
    flags: &ServiceFlags,
) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let service = flags.start(&stack.dir.join("logs"), group)?;
    let per_partition: Vec<Option<i64>> = per_partition(events).into_iter().map(Some).collect();
    let offsets = kafka::OffsetReader::new(&stack.kafka, group, topic, PARTITIONS)?;
    measure(started, &service, events, || {
        // Off the runtime's workers: the instant endpoint runs on them.
        let committed = tokio::task::block_in_place(|| offsets.committed());
        std::future::ready(committed.map(|c| c == per_partition))
    })
    .await
}

/// Samples the service's peak RSS and CPU every 20 ms until `done` holds;
/// the figures of a run that started at `started`.
async fn measure<F, Fut>(
    started: Instant,
    service: &Service,
    events: usize,
    mut done: F,
) -> anyhow::Result<Figures>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let mut peak = 0;
    let mut cpu = 0.0;
    let finished = poll_until(
        TIMEOUT,
        Duration::from_millis(20),
        "every offset applied",
        || {
            peak = service.peak_rss().unwrap_or(0).max(peak);
            cpu = service.cpu_seconds().unwrap_or(cpu);
            let done = done();
            async move { Ok(done.await?.then_some(()).into()) }
        },
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    service.with_log(finished)?;
    Ok(Figures {
        name: "",
        events,
        seconds,
        peak_rss: peak,
        cpu_seconds: cpu,
        redis_commands: None,
        redis_cpu_seconds: None,
    })
}

async fn run_redis(
    stack: &Stack,
    redis_url: &str,
    topic: &str,
    events: usize,
    name: &'static str,
) -> anyhow::Result<Figures> {
    let group = unique("bench-redis");
    let prefix = format!("{group}:");
    let mut conn = e2e::redis::connect(redis_url).await?;
    // Redis may not answer within the client's default 500 ms while it runs
    // a batch's script or forks for an AOF rewrite: that is not a failure of
    // the run being measured.
    conn.set_response_timeout(Duration::from_secs(30));
    let calls_before = total_calls(&mut conn).await?;
    let redis_cpu_before = redis_cpu(&mut conn).await?;
    let flags = bench_flags(ServiceFlags::redis_sink(
        &stack.kafka,
        topic,
        &group,
        redis_url,
        &prefix,
    ));
    let started = Instant::now();
    let service = flags.start(&stack.dir.join("logs"), &group)?;
    let total = events as i64;
    let mut polls = 0u64;
    let figures = measure(started, &service, events, || {
        polls += 1;
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            let applied = applied_offsets(&mut conn, &prefix, topic, PARTITIONS).await?;
            Ok(applied.iter().sum::<i64>() >= total)
        }
    })
    .await?;
    // Our own commands are not the sink's: every HGETALL, and the first INFO
    // (counted once it completed).
    let calls_after = total_calls(&mut conn).await?;
    let redis_cpu_seconds = redis_cpu(&mut conn).await? - redis_cpu_before;
    Ok(Figures {
        name,
        redis_commands: Some(
            calls_after
                .saturating_sub(calls_before)
                .saturating_sub(polls + 1),
        ),
        redis_cpu_seconds: Some(redis_cpu_seconds),
        ..figures
    })
}

/// The text of redis-server's INFO `section`.
async fn info(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
) -> anyhow::Result<String> {
    redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .with_context(|| format!("INFO {section}"))
}

/// Sum of `calls=` over INFO commandstats (commands run inside scripts count).
async fn total_calls(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    Ok(info(conn, "commandstats")
        .await?
        .lines()
        .filter_map(|l| l.split("calls=").nth(1))
        .filter_map(|rest| rest.split(',').next())
        .filter_map(|n| n.parse::<u64>().ok())
        .sum())
}

/// used_cpu_user + used_cpu_sys of redis-server (its main thread and the
/// rest of the process), in seconds.
async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    Ok(info(conn, "cpu")
        .await?
        .lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum())
}

fn per_partition(events: usize) -> Vec<i64> {
    (0..PARTITIONS as usize)
        .map(|p| ((events + PARTITIONS as usize - 1 - p) / PARTITIONS as usize) as i64)
        .collect()
}
