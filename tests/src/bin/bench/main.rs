//! bench: throughput and memory of the services against the local stack.
//!
//! `bench redis`: two inputs, each already in a fresh user3-like topic.
//! *uniform*: N generated events in 64 KB uncompressed record batches.
//! *production*: shaped like what Logstash sends (lz4-compressed record
//! batches of its 16 KB, 20,000 users, Zipf-popular keywords and movies,
//! web-server fields, a share of malformed lines: readable JSON objects that
//! are not a search or a view, as Logstash routes them to user3;
//! `Generator::production`; event times in the order the events come, over
//! `--time-spread-secs`), once per `--malformed` share, then once more at
//! 1 % with times shuffled over two hours (`--shuffled-times`, the worst
//! case for the rankings by minute and hour). Measures, for the
//! do-nothing sink (the consumer's own ceiling) and for redis-sink, the time
//! from process start until every offset is applied, events/s, peak RSS,
//! and (redis) Redis commands per event. redis-sink runs against a fresh
//! redis-server of its own each time: on the uniform input with the
//! append-only file (`appendfsync everysec`, what docs/redis-keys.md asks
//! for in production) and without it, which shows what persistence costs;
//! on the production input without it.
//!
//! `bench bigquery`: N events of every kind in a fresh user2-like topic;
//! bigquery-sink (a) against an endpoint that accepts insertAll at once (the
//! sink's own ceiling) and (b) against the emulator; time until every offset
//! is committed, rows/s, peak RSS. For (a) it also prints the steady-state
//! rate (first insertAll to last, start-up excluded) and the CPU the bench
//! process itself (the proxy) used meanwhile. `--skip-emulator` runs (a) only.
//!
//! `bench api`: the read API under concurrent clients, and Redis memory per
//! member (see `api`).
//!
//! `bench cluster`: redis-sink on a Redis Cluster against one Redis, with
//! each node's CPU and what it implies for more nodes (see `cluster`).
//!
//! Run through `make bench`, which builds release binaries and starts the
//! stack.

mod api;
mod cluster;
mod freshness;

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use e2e::bigquery::{expected_row, Fault, FaultProxy, WriteApi};
use e2e::broker::Broker;
use e2e::generator::{Generator, Mix, DEFAULT_SPREAD_MS};
use e2e::grpc_proxy::GrpcFaultProxy;
use e2e::process::{PrivateRedis, Service};
use e2e::redis::applied_offsets;
use e2e::service::ServiceFlags;
use e2e::{kafka, poll_until, unique, Stack, PARTITIONS};

/// `bench redis`'s default spread of the production-shaped input's event
/// times, in arrival order: 300,000 events at 5,000 a second.
const STREAM_SPREAD_SECS: i64 = 60;

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
    /// bigquery-sink: rows/s and peak RSS per write API (insertAll, the
    /// Storage Write API), against an instant endpoint and the emulator.
    Bigquery {
        /// Events in the topic before the sink starts.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Only the instant endpoint (the emulator run takes minutes).
        #[arg(long)]
        skip_emulator: bool,
        /// The production-shaped input (see `bench redis`) with this share
        /// of malformed lines, instead of the uniform one.
        #[arg(long)]
        malformed: Option<f64>,
    },
    /// Both services: the time from an event's produce to its count being
    /// visible in Redis, and to its row being accepted by the instant
    /// endpoint, at a steady rate (p50, p99).
    Freshness {
        /// Events per second.
        #[arg(long, default_value_t = 5_000)]
        rate: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// The read API: requests/s and latency at concurrent clients, Redis commands per request; Redis memory per ranked member and history item.
    Api {
        /// Production-shaped events redis-sink writes before the API is loaded.
        #[arg(long, default_value_t = 300_000)]
        events: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// redis-sink on a Redis Cluster (3 primaries, a replica each) against one Redis, on the production-shaped input: events/s, each node's CPU and commands, peak RSS.
    Cluster {
        /// Events in the topic before the consumer starts.
        #[arg(long, default_value_t = 300_000)]
        events: usize,
        /// Share of malformed lines.
        #[arg(long, default_value_t = 0.01)]
        malformed: f64,
    },
    /// redis-sink: events/s, Redis commands per event, peak RSS.
    Redis {
        /// Events of the uniform input in the topic before the consumer starts.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Distinct users in the uniform input.
        #[arg(long, default_value_t = 100_000)]
        users: u32,
        /// Events of the production-shaped input.
        #[arg(long, default_value_t = 300_000)]
        production_events: usize,
        /// Shares of malformed lines in the production-shaped input, one
        /// run each.
        #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.01, 0.02])]
        malformed: Vec<f64>,
        /// Which inputs to run.
        #[arg(long, value_enum, default_value_t = Inputs::Both)]
        input: Inputs,
        /// The production-shaped input's event times, in the order the
        /// events come (as Logstash ships a live stream or a backlog of one),
        /// over this many seconds up to now: 60 is 300,000 events at 5,000 a
        /// second.
        #[arg(long, default_value_t = STREAM_SPREAD_SECS,
              value_parser = clap::value_parser!(i64).range(1..=7 * 24 * 3600))]
        time_spread_secs: i64,
        /// Also run the 1 % share with event times shuffled over two hours:
        /// every batch then touches every minute of them, the worst case
        /// for the rankings by minute and hour (no stream looks like it).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        shuffled_times: bool,
    },
}

/// Which inputs `bench redis` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Inputs {
    Uniform,
    Production,
    Both,
}

/// What a topic is filled with.
#[derive(Debug, Clone, Copy)]
enum Input {
    /// The generator's default events, 64 KB uncompressed record batches.
    Uniform { users: u32 },
    /// `Generator::production` with this share of malformed lines, in
    /// lz4-compressed record batches as Logstash sends them.
    Production {
        malformed: f64,
        /// Event times spread over this many ms.
        spread_ms: i64,
        /// In the order the events come ([`Generator::in_time_order`]),
        /// or at random over the spread.
        in_order: bool,
    },
}

impl Input {
    /// The production-shaped input with event times drawn at random over
    /// the generator's two hours: every batch touches every minute of them.
    fn shuffled(malformed: f64) -> Self {
        Self::Production {
            malformed,
            spread_ms: DEFAULT_SPREAD_MS,
            in_order: false,
        }
    }
}

struct Figures {
    name: String,
    events: usize,
    seconds: f64,
    peak_rss: u64,
    cpu_seconds: f64,
    redis_commands: Option<u64>,
    /// CPU seconds redis-server spent meanwhile (INFO cpu).
    redis_cpu_seconds: Option<f64>,
    /// Events a second one redis-server could take at the CPU this sink's
    /// commands cost it per event: events / its CPU seconds. Single-server
    /// runs only (a cluster prints its own bound per node).
    redis_bound: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    match Cli::parse().command {
        Command::Redis {
            events,
            users,
            production_events,
            malformed,
            input,
            time_spread_secs,
            shuffled_times,
        } => {
            let mut figures = Vec::new();
            if input != Inputs::Production {
                let uniform = Input::Uniform { users };
                let (topic, _) =
                    fill_topic(&stack, "bench-user3", Mix::User3, events, uniform).await?;
                figures.push(run_null(&stack, &topic, events, "uniform").await?);
                for append_only in [true, false] {
                    figures.push(
                        run_private_redis(&stack, &topic, events, "uniform", append_only).await?,
                    );
                }
            }
            if input != Inputs::Uniform {
                let in_order = malformed.iter().map(|share| {
                    let mut label = format!("production {:.0}% bad, times in order", share * 100.0);
                    if time_spread_secs != STREAM_SPREAD_SECS {
                        label += &format!(" over {time_spread_secs} s");
                    }
                    let production = Input::Production {
                        malformed: *share,
                        spread_ms: time_spread_secs * 1000,
                        in_order: true,
                    };
                    (production, label)
                });
                let shuffled = shuffled_times.then(|| {
                    (
                        Input::shuffled(0.01),
                        "production 1% bad, times shuffled over 2 h".to_owned(),
                    )
                });
                for (production, label) in in_order.chain(shuffled) {
                    let (topic, _) = fill_topic(
                        &stack,
                        "bench-user3",
                        Mix::User3,
                        production_events,
                        production,
                    )
                    .await?;
                    figures.push(run_null(&stack, &topic, production_events, &label).await?);
                    figures.push(
                        run_private_redis(&stack, &topic, production_events, &label, false).await?,
                    );
                }
            }
            print_figures(&figures);
        }
        Command::Cluster { events, malformed } => cluster::run(&stack, events, malformed).await?,
        Command::Api {
            events,
            clients,
            seconds,
        } => api::run(&stack, events, clients, seconds).await?,
        Command::Freshness { rate, seconds } => {
            freshness::print(&freshness::redis(&stack, rate, seconds).await?);
            freshness::print(&freshness::api(&stack, rate, seconds).await?);
            freshness::print(&freshness::bigquery(&stack, rate, seconds).await?);
        }
        Command::Bigquery {
            events,
            skip_emulator,
            malformed,
        } => {
            let input = match malformed {
                Some(malformed) => Input::shuffled(malformed),
                None => Input::Uniform { users: 2_000 },
            };
            let (topic, rows) = fill_topic(&stack, "bench-user2", Mix::All, events, input).await?;
            let proxy = FaultProxy::start(&stack.bigquery_endpoint)?;
            proxy.set_faults(vec![Fault::Accept]);
            let insert_all_started = Instant::now();
            let cpu_before = own_cpu_seconds();
            let instant = run_bigquery(
                &stack,
                &topic,
                events,
                (WriteApi::InsertAll, &proxy.endpoint()),
                "bigquery-sink insertAll, instant endpoint".into(),
            )
            .await?;
            let bench_cpu = own_cpu_seconds() - cpu_before;
            let inserts = proxy.inserts();
            let accepted: usize = inserts.iter().map(|i| i.rows).sum();
            anyhow::ensure!(
                accepted == rows,
                "the instant endpoint saw {accepted} rows of {rows}"
            );
            let mut figures = vec![instant];
            // The Storage Write API's instant endpoint: the tests' gRPC
            // proxy answering every append at once.
            let instant_grpc = GrpcFaultProxy::start(None).await?;
            let storage_started = Instant::now();
            let cpu_before = own_cpu_seconds();
            figures.push(
                run_bigquery(
                    &stack,
                    &topic,
                    events,
                    (WriteApi::Storage, &instant_grpc.endpoint()),
                    "bigquery-sink storage, instant endpoint".into(),
                )
                .await?,
            );
            // The gRPC endpoint decodes every append in full: on a
            // 2-core machine its CPU is the sink's loss.
            let grpc_cpu = own_cpu_seconds() - cpu_before;
            let appends = instant_grpc.appends();
            let appended: usize = appends.iter().map(|a| a.rows).sum();
            anyhow::ensure!(
                appended == rows,
                "the instant gRPC endpoint saw {appended} rows of {rows}"
            );
            let instant_pending = GrpcFaultProxy::start(None).await?;
            figures.push(
                run_bigquery(
                    &stack,
                    &topic,
                    events,
                    (WriteApi::StorageExactlyOnce, &instant_pending.endpoint()),
                    "bigquery-sink storage-exactly-once, instant endpoint".into(),
                )
                .await?,
            );
            let appended: usize = instant_pending.appends().iter().map(|a| a.rows).sum();
            anyhow::ensure!(
                appended == rows,
                "the instant gRPC endpoint saw {appended} rows of {rows} (exactly-once)"
            );
            if !skip_emulator {
                for (api, endpoint, name) in [
                    (WriteApi::InsertAll, &stack.bigquery_endpoint, "insertAll"),
                    (WriteApi::Storage, &stack.bigquery_grpc_endpoint, "storage"),
                    (
                        WriteApi::StorageExactlyOnce,
                        &stack.bigquery_grpc_endpoint,
                        "storage-exactly-once",
                    ),
                ] {
                    figures.push(
                        run_bigquery(
                            &stack,
                            &topic,
                            events,
                            (api, endpoint),
                            format!("bigquery-sink {name}, emulator"),
                        )
                        .await?,
                    );
                }
            }
            print_figures(&figures);
            println!();
            print_steady_state(
                "insertAll",
                insert_all_started,
                &inserts.iter().map(|i| (i.at, i.rows)).collect::<Vec<_>>(),
                bench_cpu,
            );
            print_steady_state(
                "storage",
                storage_started,
                &appends.iter().map(|a| (a.at, a.rows)).collect::<Vec<_>>(),
                grpc_cpu,
            );
        }
    }
    Ok(())
}

/// A fresh topic (and its DLQ) holding `events` generated events of
/// `input`, spread round-robin over the partitions; and how many of them
/// make a BigQuery row.
async fn fill_topic(
    stack: &Stack,
    prefix: &str,
    mix: Mix,
    events: usize,
    input: Input,
) -> anyhow::Result<(String, usize)> {
    let broker = Broker::tansu(stack);
    let topic = broker.topic_with_dlq(prefix).await?;
    eprintln!("bench: producing {events} events ({input:?}) into {topic} ...");
    // Batched (not `Broker::producer`'s one record per batch): nothing here
    // resumes mid-stream.
    let now = chrono::Utc::now().timestamp_millis();
    let (producer, mut generator) = match input {
        Input::Uniform { users } => (
            kafka::producer_with(broker.bootstrap(), false)?,
            Generator::new(42, mix, now).users(users),
        ),
        Input::Production {
            malformed,
            spread_ms,
            in_order,
        } => {
            let generator = Generator::new(42, mix, now)
                .production()
                .bad_fraction(malformed)
                .spread(spread_ms);
            (
                kafka::logstash_producer(broker.bootstrap(), "lz4")?,
                if in_order {
                    generator.in_time_order(events)
                } else {
                    generator
                },
            )
        }
    };
    let mut bytes = 0usize;
    let mut rows = 0usize;
    let mut produced = 0usize;
    while produced < events {
        let n = (events - produced).min(50_000);
        let chunk: Vec<(i32, Vec<u8>)> = (0..n)
            .map(|i| {
                let payload = generator.next_event().payload;
                bytes += payload.len();
                rows += usize::from(expected_row(&payload).is_some());
                (((produced + i) % PARTITIONS as usize) as i32, payload)
            })
            .collect();
        kafka::produce(&producer, &topic, chunk).await?;
        produced += n;
    }
    eprintln!("bench: {events} events, {:.0} MB", bytes as f64 / 1e6);
    Ok((topic, rows))
}

fn print_figures(figures: &[Figures]) {
    println!();
    println!(
        "{:<48} {:>10} {:>9} {:>12} {:>13} {:>10} {:>12} {:>12} {:>14}",
        "consumer",
        "events",
        "seconds",
        "events/s",
        "peak RSS MB",
        "CPU s",
        "cmds/event",
        "Redis CPU s",
        "Redis-bound/s"
    );
    for f in figures {
        println!(
            "{:<48} {:>10} {:>9.2} {:>12.0} {:>13.1} {:>10.2} {:>12} {:>12} {:>14}",
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
            f.redis_bound.map_or("-".to_owned(), |b| format!("{b:.0}")),
        );
    }
}

/// The instant endpoint's run without start-up: from the first request
/// (`(when, rows)`, in arrival order) to the last, the rows after the
/// first over that span; and the bench process's CPU meanwhile (its
/// endpoint shares the sink's cores).
fn print_steady_state(api: &str, started: Instant, requests: &[(Instant, usize)], bench_cpu: f64) {
    let (Some(&(first, _)), Some(&(last, _))) = (requests.first(), requests.last()) else {
        return;
    };
    let span = last.duration_since(first).as_secs_f64();
    let rows: usize = requests[1..].iter().map(|&(_, rows)| rows).sum();
    println!(
        "instant endpoint, {api}: first request {:.2} s after start; steady state (first to \
         last request, {} requests): {rows} rows after the first in {span:.2} s = {:.0} rows/s; \
         bench process (endpoint, polling) CPU {bench_cpu:.2} s",
        first.duration_since(started).as_secs_f64(),
        requests.len(),
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

async fn run_null(
    stack: &Stack,
    topic: &str,
    events: usize,
    input: &str,
) -> anyhow::Result<Figures> {
    let group = unique("bench-null");
    let flags = bench_flags(ServiceFlags::null_sink(&stack.kafka, topic, &group));
    let figures = run_until_committed(stack, topic, events, &group, &flags).await?;
    Ok(Figures {
        name: format!("{input}: null sink (ceiling)"),
        ..figures
    })
}

/// redis-sink against a fresh redis-server of its own, so every run starts
/// from an empty dataset and append-only file (AOF rewrites depend on what
/// the file already holds).
async fn run_private_redis(
    stack: &Stack,
    topic: &str,
    events: usize,
    input: &str,
    append_only: bool,
) -> anyhow::Result<Figures> {
    let dir = stack.dir.join(unique("bench-redis"));
    let redis = if append_only {
        PrivateRedis::start(dir.clone()).await?
    } else {
        PrivateRedis::start_without_aof(dir.clone()).await?
    };
    let aof = if append_only { "AOF" } else { "without AOF" };
    let name = format!("{input}: redis-sink, Redis {aof}");
    let figures = run_redis(stack, &redis.url(), topic, events, name).await?;
    drop(redis);
    std::fs::remove_dir_all(&dir)?;
    Ok(figures)
}

/// `--batch-max-events` of exactly-once runs (docs/bigquery.md).
const EXACTLY_ONCE_BATCH: &str = "15000";

/// bigquery-sink with `api`, whose endpoint is `endpoint` (the other
/// API's is the emulator's).
async fn run_bigquery(
    stack: &Stack,
    topic: &str,
    events: usize,
    (api, endpoint): (WriteApi, &str),
    name: String,
) -> anyhow::Result<Figures> {
    let group = unique("bench-bq");
    let table = group.replace('-', "_");
    let (rest, grpc) = match api {
        WriteApi::InsertAll => (endpoint, stack.bigquery_grpc_endpoint.as_str()),
        WriteApi::Storage | WriteApi::StorageExactlyOnce => {
            (stack.bigquery_endpoint.as_str(), endpoint)
        }
    };
    let flags = bench_flags(
        ServiceFlags::bigquery_sink(
            &stack.kafka,
            topic,
            &group,
            rest,
            &stack.bigquery_project,
            &stack.bigquery_dataset,
            &table,
        )
        .set("--write-api", api.flag())
        .set("--bigquery-grpc-endpoint", grpc),
    );
    // Exactly-once writes one batch per --stream-interval-ms (1 s): with
    // the batch size docs/bigquery.md recommends for it.
    let flags = if api == WriteApi::StorageExactlyOnce {
        flags.set("--batch-max-events", EXACTLY_ONCE_BATCH)
    } else {
        flags
    };
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
        name: String::new(),
        events,
        seconds,
        peak_rss: peak,
        cpu_seconds: cpu,
        redis_commands: None,
        redis_cpu_seconds: None,
        redis_bound: None,
    })
}

async fn run_redis(
    stack: &Stack,
    redis_url: &str,
    topic: &str,
    events: usize,
    name: String,
) -> anyhow::Result<Figures> {
    let group = unique("bench-redis");
    let prefix = format!("{group}:");
    let mut conn =
        e2e::redis::connect_to_node(&redis_sink::access::RedisAccess::url(redis_url)).await?;
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
        &redis_sink::access::RedisAccess::url(redis_url),
        &prefix,
    ));
    let (figures, polls) =
        run_until_applied(stack, &flags, &group, &prefix, &conn, topic, events).await?;
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
        // Below a tenth of a second the bench's own polls weigh too much.
        redis_bound: (redis_cpu_seconds >= 0.1).then(|| events as f64 / redis_cpu_seconds),
        ..figures
    })
}

/// Runs redis-sink with `flags` (its group `group`, key prefix `prefix`)
/// until the offsets it stores (read over `reader`) cover `events`: its
/// figures, and how many times the bench read those offsets (commands that
/// are not the sink's).
async fn run_until_applied<C>(
    stack: &Stack,
    flags: &ServiceFlags,
    group: &str,
    prefix: &str,
    reader: &C,
    topic: &str,
    events: usize,
) -> anyhow::Result<(Figures, u64)>
where
    C: redis::aio::ConnectionLike + Clone + Send,
{
    let started = Instant::now();
    let service = flags.start(&stack.dir.join("logs"), group)?;
    let total = events as i64;
    let mut polls = 0u64;
    let figures = measure(started, &service, events, || {
        polls += 1;
        let mut reader = reader.clone();
        async move {
            let applied = applied_offsets(&mut reader, prefix, topic, PARTITIONS).await?;
            Ok(applied.iter().sum::<i64>() >= total)
        }
    })
    .await?;
    Ok((figures, polls))
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
