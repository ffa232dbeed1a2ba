//! `redis-sink`: the consumer (`redis-sink` or `redis-sink run`), the read
//! API (`redis-sink serve`) and the read-back commands (`redis-sink top`,
//! `redis-sink history`).

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use redis_sink::access::RedisAccess;
use redis_sink::api::Api;
use redis_sink::client::{connect, open, open_for_reads, warn_if_fewer_replicas};
use redis_sink::config::{RedisSettings, ReplicaAcks};
use redis_sink::decode::{DecodeRules, Kind};
use redis_sink::keys::Keys;
use redis_sink::legacy::{move_old_layout, RecentHours};
use redis_sink::plan::Retention;
use redis_sink::query;
use redis_sink::sink::RedisSink;
use redis_sink::window::Window;
use sink_core::{ConsumerArgs, ServiceDefaults};

mod text_table;

/// jemalloc, not glibc's malloc: the loop allocates each batch on one thread
/// and a writer frees it on another, which glibc handles badly (measured:
/// docs/benchmarks.md); mimalloc, as fast, takes peak RSS to 95 MB. It is
/// librdkafka's `malloc` too (unprefixed: the workspace Cargo.toml).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const DEFAULTS: ServiceDefaults = ServiceDefaults {
    topic: "user3",
    group_id: "redis-sink",
    batch_max_events: 5_000,
    batch_max_bytes: 4 << 20,
    batch_linger_ms: 100,
    // Redis bounds its speed: with 1 MB ahead (the flag's least) it ran within
    // 2 % of 2 MB on average, which held about 3 MB more at peak, 4 MB about
    // 9 MB (docs/benchmarks.md). Brokers across a slow network may need more.
    prefetch_kbytes: 1_024,
};

/// Live rankings and per-user history in Redis from search / movie_detail events.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `None` under `top` / `history`: their required Kafka flags must not
    /// be asked for there.
    #[command(flatten)]
    run: Option<RunArgs>,
}

/// The consumer's arguments alone (see `main`).
#[derive(Debug, Parser)]
#[command(name = "redis-sink", version, about)]
struct RunOnly {
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume the topic into Redis (the default).
    Run(Box<RunArgs>),
    /// Serve the read API (HTTP/JSON) and the live page; reads only.
    Serve(ServeArgs),
    /// Print the most searched keywords or most viewed movies.
    Top(TopArgs),
    /// Print a user's recent searches or viewed movies, newest first.
    History(HistoryArgs),
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Redis")]
struct RedisArgs {
    #[command(flatten)]
    access: RedisAccess,
    /// Prepended to every key (see docs/redis-keys.md); no braces.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "", value_parser = key_prefix)]
    key_prefix: String,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    consumer: ConsumerArgs,
    #[command(flatten)]
    redis: RedisArgs,
    /// Longest keyword kept, in characters after normalization; longer ones go to the DLQ.
    #[arg(long, env = "MAX_KEYWORD_CHARS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_keyword_chars: u64,
    /// Longest user id or movie id kept, in characters; longer ones go to the DLQ.
    #[arg(long, env = "MAX_ID_CHARS", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_id_chars: u64,
    /// How far an event's @timestamp may lie ahead of both its Kafka timestamp and this service's clock; later ones go to the DLQ.
    #[arg(long, env = "MAX_FUTURE_SKEW_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    max_future_skew_secs: u64,
    #[command(flatten)]
    retention: BucketRetention,
    /// Members each all-time ranking keeps: after every batch, those below the highest this many are removed (their count starts again from 0 if they come back).
    #[arg(long, env = "MAX_RANKED_MEMBERS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(10..=100_000_000))]
    max_ranked_members: u64,
    /// Items kept per user history.
    #[arg(long, env = "HISTORY_SIZE", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    history_size: u64,
    /// User histories expire this long after their last write.
    #[arg(long, env = "HISTORY_TTL_SECS", default_value_t = 2_592_000, value_parser = clap::value_parser!(u64).range(60..=315_360_000))]
    history_ttl_secs: u64,
    /// Replicas of each Redis primary that must hold a batch's histories before its counts and offset move (WAIT); 0 does not wait. Worth it on a cluster: docs/redis-keys.md.
    #[arg(long, env = "REDIS_WAIT_REPLICAS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=16))]
    redis_wait_replicas: u32,
    /// How long a write waits for those replicas before it fails and is retried (at most 5000).
    #[arg(long, env = "REDIS_WAIT_TIMEOUT_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=redis_sink::access::MAX_WAIT_MS))]
    redis_wait_timeout_ms: u64,
}

/// How long ranking buckets are kept: the writer's retention, and so the
/// longest window a reader may ask for.
#[derive(Debug, Args)]
struct BucketRetention {
    /// Minute and hour ranking buckets are kept this long after their minute or hour ends: the longest window readers can ask for. redis-sink records it in Redis, and readers follow the recorded value; theirs applies only where none is recorded.
    #[arg(long, env = "BUCKET_TTL_SECS", default_value_t = 172_800, value_parser = clap::value_parser!(u64).range(3_600..=31_536_000))]
    bucket_ttl_secs: u64,
}

impl BucketRetention {
    /// The longest window a reader may read now: what the writers recorded
    /// in Redis, else this flag (a Redis filled by an older redis-sink).
    async fn writers(
        &self,
        conn: &mut redis_sink::client::RedisConn,
        keys: &Keys,
    ) -> anyhow::Result<u64> {
        let recorded = query::recorded_retention(conn, keys)
            .await
            .context("cannot read the writers' --bucket-ttl-secs from Redis")?;
        Ok(recorded.map_or(self.bucket_ttl_secs, |r| r.kept_secs(now_ms())))
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    retention: BucketRetention,
    /// Where to serve HTTP.
    #[arg(long, env = "API_LISTEN", default_value = "0.0.0.0:8080")]
    listen: std::net::SocketAddr,
    /// How long a ranking read from Redis is served to every request: the API's cost to Redis, and how stale a ranking may be.
    #[arg(long, env = "API_CACHE_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    cache_ms: u64,
    /// On a Redis Cluster, read from each primary's replicas (a standalone reader reads a replica by its --redis-url).
    #[arg(long, env = "REDIS_READ_FROM_REPLICAS")]
    read_from_replicas: bool,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = sink_core::telemetry::LogFormat::Pretty)]
    log_format: sink_core::telemetry::LogFormat,
}

#[derive(Debug, Args)]
struct TopArgs {
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    retention: BucketRetention,
    /// Which ranking.
    #[arg(long, value_enum)]
    kind: Kind,
    /// The last N minutes (15m), hours (6h) or days (2d), the current minute included; or all.
    #[arg(long, default_value = "all", value_parser = parse_window)]
    window: Window,
    /// How many to print.
    #[arg(long, default_value_t = 10)]
    limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct HistoryArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// Which history.
    #[arg(long, value_enum)]
    kind: Kind,
    /// The user id.
    #[arg(long)]
    user: String,
    /// How many to print.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_window(text: &str) -> Result<Window, String> {
    text.parse()
        .map_err(|err: redis_sink::window::WindowError| err.to_string())
}

/// A prefix with braces would take the place of the `{rank}` hash tag and
/// could split the ranking keys over a cluster's slots.
fn key_prefix(prefix: &str) -> Result<String, String> {
    if prefix.contains(['{', '}']) {
        return Err(
            "a key prefix must not contain { or }: Redis Cluster places keys by the text in \
             braces, and redis-sink's {rank} tag must be the first"
                .to_owned(),
        );
    }
    Ok(prefix.to_owned())
}

fn main() -> ExitCode {
    let cli: Cli = sink_core::parse_args(&DEFAULTS);
    let command = match (cli.command, cli.run) {
        (Some(command), _) => command,
        (None, Some(run)) => Command::Run(Box::new(run)),
        // clap leaves an optional flattened group out when none of its
        // flags is on the command line, even if the environment sets them
        // all (as in a container): parse the same arguments as `run` alone,
        // which also names whatever is missing.
        (None, None) => Command::Run(Box::new(sink_core::parse_args::<RunOnly>(&DEFAULTS).run)),
    };
    let log_format = match &command {
        Command::Run(run) => run.consumer.log_format,
        Command::Serve(serve) => serve.log_format,
        _ => sink_core::telemetry::LogFormat::Pretty,
    };
    sink_core::telemetry::init(log_format);
    sink_core::block_on_main(async move {
        match command {
            Command::Run(args) => run(*args).await,
            Command::Serve(args) => serve(args).await,
            Command::Top(args) => top(args).await,
            Command::History(args) => history(args).await,
        }
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.consumer.validate()?;
    let settings = RedisSettings {
        keys: Keys::new(args.redis.key_prefix.clone()),
        group: args.consumer.group_id.clone(),
        retention: Retention {
            bucket_ttl_secs: args.retention.bucket_ttl_secs,
            ranked_cap: args.max_ranked_members,
            history_size: usize::try_from(args.history_size).context("--history-size")?,
            history_ttl_secs: args.history_ttl_secs,
        },
        rules: DecodeRules {
            max_keyword_chars: usize::try_from(args.max_keyword_chars)
                .context("--max-keyword-chars")?,
            max_id_chars: usize::try_from(args.max_id_chars).context("--max-id-chars")?,
            max_future_skew_ms: i64::try_from(args.max_future_skew_secs)
                .context("--max-future-skew-secs")?
                * 1000,
        },
        replica_acks: (args.redis_wait_replicas > 0).then_some(ReplicaAcks {
            replicas: args.redis_wait_replicas,
            timeout_ms: args.redis_wait_timeout_ms,
        }),
    };
    let recent = RecentHours {
        from_ms: now_ms()
            - i64::try_from(args.retention.bucket_ttl_secs).context("--bucket-ttl-secs")? * 1000
            - 2 * 3_600_000,
        to_ms: now_ms() + settings.rules.max_future_skew_ms + 2 * 3_600_000,
    };
    let connect = async {
        let primary = connect(&args.redis.access).await?;
        if args.redis_wait_replicas > 0 {
            // Advice only: a node not answering now must not stop the start.
            if let Err(err) =
                warn_if_fewer_replicas(&mut primary.get().inner, args.redis_wait_replicas).await
            {
                tracing::warn!(error = %err, "cannot count the Redis primaries' replicas");
            }
        }
        move_old_layout(
            &mut primary.get().inner,
            &args.redis.key_prefix,
            &args.consumer.topic,
            &args.consumer.group_id,
            recent,
        )
        .await?;
        let ttl = args.retention.bucket_ttl_secs;
        let before =
            query::record_retention(&mut primary.get().inner, &settings.keys, ttl, now_ms())
                .await
                .context("cannot record --bucket-ttl-secs in Redis for the readers")?;
        if let Some(before) = before.filter(|b| b.ttl_secs != ttl) {
            tracing::warn!(
                recorded = before.ttl_secs,
                bucket_ttl_secs = ttl,
                "another --bucket-ttl-secs was recorded: readers move to this one as the older buckets age; give every redis-sink the same"
            );
        }
        Ok(RedisSink::new(primary, settings))
    };
    sink_core::run_connecting(&args.consumer, connect, sink_core::shutdown::signal()).await
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let conn = open_for_reads(&args.redis.access, args.read_from_replicas).await?;
    let api = Api::new(
        conn,
        Keys::new(args.redis.key_prefix),
        args.retention.bucket_ttl_secs,
        std::time::Duration::from_millis(args.cache_ms),
    );
    api.refresh_retention()
        .await
        .map_err(|err| anyhow::anyhow!("cannot read the writers' --bucket-ttl-secs: {err}"))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on --listen {}: is the port in use?",
                args.listen
            )
        })?;
    tracing::info!(addr = %listener.local_addr()?, "serving the read API and the live page");
    axum::serve(listener, api.router())
        .with_graceful_shutdown(sink_core::shutdown::signal())
        .await
        .context("the read API stopped")
}

async fn top(args: TopArgs) -> anyhow::Result<()> {
    let mut conn = open(&args.redis.access).await?;
    let keys = Keys::new(args.redis.key_prefix);
    let retention = args.retention.writers(&mut conn, &keys).await?;
    let window = args
        .window
        .check(1, retention)
        .map_err(|err| anyhow::anyhow!("--window: {err}"))?;
    let now_ms = now_ms();
    let counts = query::counts(&mut conn, &keys, args.kind, window, 0, now_ms, args.limit).await?;
    let rows = query::top(counts, args.limit);
    let body: Vec<Vec<String>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| vec![(i + 1).to_string(), r.member.clone(), r.count.to_string()])
        .collect();
    print_rows(
        &rows,
        args.json,
        &["#", args.kind.member_label(), "count"],
        &body,
    )
}

async fn history(args: HistoryArgs) -> anyhow::Result<()> {
    let mut conn = open(&args.redis.access).await?;
    let keys = Keys::new(args.redis.key_prefix);
    let rows = query::history(&mut conn, &keys, args.kind, &args.user, args.limit).await?;
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let time = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(r.time_ms)
                .map_or_else(
                    || r.time_ms.to_string(),
                    |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                );
            vec![time, r.member.clone()]
        })
        .collect();
    print_rows(
        &rows,
        args.json,
        &["time (UTC)", args.kind.member_label()],
        &body,
    )
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Prints query results as JSON, or as an aligned table of `body`.
fn print_rows<T: serde::Serialize>(
    rows: &[T],
    json: bool,
    header: &[&str],
    body: &[Vec<String>],
) -> anyhow::Result<()> {
    let text = if json {
        serde_json::to_string_pretty(rows)? + "\n"
    } else {
        text_table::render(header, body)
    };
    let mut out = std::io::stdout().lock();
    // A reader that stops early (`| head`) has what it wanted: print! would
    // panic on the broken pipe.
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("cannot write to stdout"),
    }
}
