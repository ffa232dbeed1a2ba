//! faults: the fault suite. Runs every scenario of docs/reliability.md against real
//! components (tansu, redis-server, the BigQuery emulator, and librdkafka's
//! mock cluster for broker faults) with the release binaries, and prints one
//! table: what was produced, what is in the sink, lost, double-counted,
//! dead-lettered, and how long the sink took to catch up after the fault.
//! Exits non-zero if any row shows a loss, a double count, a dead letter
//! without a reason, or anything else off the contract.
//!
//! Run through `make faults`, which builds release binaries and starts the
//! stack. `--only WORD` runs the scenarios whose name contains WORD.
//!
//! Waiting in the scenarios is of two kinds: conditions (progress, catch-up,
//! exit) are awaited; the fault schedule itself (an outage lasts 10 s, a
//! kill comes 0-1.5 s after an instance applied its first batch) is a sleep
//! on purpose.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use e2e::bigquery::{BigQuerySide, Fault, FaultProxy};
use e2e::broker::Broker;
use e2e::generator::{Generator, Truth};
use e2e::pipeline::{Instance, Item, Load, Pipeline, SinkSide, Tally};
use e2e::process::{fail_over, PrivateRedis};
use e2e::redis::RedisSide;
use e2e::service::SHUTDOWN_TIMEOUT;
use e2e::{unique, Stack};
use rand::{Rng, SeedableRng};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// Runs the fault scenarios against the local stack and prints the table.
#[derive(Debug, Parser)]
struct Cli {
    /// Runs only the scenarios whose name contains one of these words
    /// (e.g. `--only sigkill --only poison`, or a service: `--only redis`).
    #[arg(long = "only", value_name = "WORD")]
    only: Vec<String>,
    /// Lists the scenarios and exits.
    #[arg(long)]
    list: bool,
}

#[derive(Debug, Clone, Copy)]
enum Scenario {
    Sigkill,
    Scale,
    RedisDown,
    BigQueryDown,
    BrokerFaults,
    Poison,
    Sigterm,
    StaleConsumer,
    Backlog,
    ZstdInput,
    GroupRename,
    RedisFailover,
    EvictionPolicy,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Sigkill => "SIGKILL x5 under load",
            Self::Scale => "scale 1 -> 3 -> 1 under load",
            Self::RedisDown => "redis-server down 10 s",
            Self::BigQueryDown => "BigQuery 500/429/drops 10 s",
            Self::BrokerFaults => "broker faults (mock cluster)",
            Self::Poison => "poison input",
            Self::Sigterm => "SIGTERM under load + restart",
            Self::StaleConsumer => "stale consumer (SIGSTOP/SIGCONT)",
            Self::Backlog => "1,000,000 backlog, Redis down",
            Self::ZstdInput => "zstd batches as Logstash sends (mock)",
            Self::GroupRename => "group renamed, both groups running",
            Self::RedisFailover => "Redis failover to its replica",
            Self::EvictionPolicy => "eviction policy set for 5 s",
        }
    }
}

/// Every scenario, with each service it applies to.
const PLAN: &[(Scenario, SinkKind)] = &[
    (Scenario::Sigkill, SinkKind::Redis),
    (Scenario::Sigkill, SinkKind::BigQuery),
    (Scenario::Scale, SinkKind::Redis),
    (Scenario::Scale, SinkKind::BigQuery),
    (Scenario::RedisDown, SinkKind::Redis),
    (Scenario::BigQueryDown, SinkKind::BigQuery),
    (Scenario::BrokerFaults, SinkKind::Redis),
    (Scenario::BrokerFaults, SinkKind::BigQuery),
    (Scenario::Poison, SinkKind::Redis),
    (Scenario::Poison, SinkKind::BigQuery),
    (Scenario::Sigterm, SinkKind::Redis),
    (Scenario::Sigterm, SinkKind::BigQuery),
    (Scenario::StaleConsumer, SinkKind::Redis),
    (Scenario::StaleConsumer, SinkKind::BigQuery),
    (Scenario::Backlog, SinkKind::Redis),
    (Scenario::ZstdInput, SinkKind::Redis),
    (Scenario::ZstdInput, SinkKind::BigQuery),
    (Scenario::GroupRename, SinkKind::Redis),
    (Scenario::RedisFailover, SinkKind::Redis),
    (Scenario::EvictionPolicy, SinkKind::Redis),
];

/// What a scenario found.
struct Outcome {
    tally: Tally,
    /// From the end of the last fault until everything produced is applied.
    recovery: Option<Duration>,
    notes: Vec<String>,
}

impl Outcome {
    fn new(tally: Tally) -> Self {
        Self {
            tally,
            recovery: None,
            notes: Vec::new(),
        }
    }

    fn recovered_in(mut self, recovery: Duration) -> Self {
        self.recovery = Some(recovery);
        self
    }

    fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    /// Records a broken promise that the tally cannot see.
    fn problem(mut self, problem: impl Into<String>) -> Self {
        self.tally.problems.push(problem.into());
        self
    }
}

struct Row {
    scenario: Scenario,
    kind: SinkKind,
    seconds: f64,
    outcome: anyhow::Result<Outcome>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match run_suite(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_suite(cli: Cli) -> anyhow::Result<()> {
    let selected: Vec<(Scenario, SinkKind)> = PLAN
        .iter()
        .copied()
        .filter(|(scenario, kind)| {
            let name = format!("{} {}", scenario.name(), kind.binary()).to_lowercase();
            cli.only.is_empty() || cli.only.iter().any(|w| name.contains(&w.to_lowercase()))
        })
        .collect();
    if cli.list || selected.is_empty() {
        for (scenario, kind) in PLAN {
            println!("{:<36} {}", scenario.name(), kind.binary());
        }
        if selected.is_empty() {
            bail!("no scenario matches --only {:?}", cli.only);
        }
        return Ok(());
    }
    let stack = Stack::get()?;
    let mut rows = Vec::new();
    for (scenario, kind) in selected {
        eprintln!("faults: {} / {} ...", scenario.name(), kind.binary());
        let started = Instant::now();
        let outcome = run(&stack, scenario, kind).await;
        let row = Row {
            scenario,
            kind,
            seconds: started.elapsed().as_secs_f64(),
            outcome,
        };
        eprintln!("faults: {}", status(&row));
        rows.push(row);
    }
    print!("{}", table(&rows));
    let failed = rows.iter().filter(|r| status(r) != "ok").count();
    if failed > 0 {
        for row in &rows {
            match &row.outcome {
                Err(err) => eprintln!("\n{} / {}: {err:#}", row.scenario.name(), row.kind.binary()),
                Ok(o) if !o.tally.holds() => eprintln!(
                    "\n{} / {}:\n  {}",
                    row.scenario.name(),
                    row.kind.binary(),
                    o.tally.problems.join("\n  ")
                ),
                Ok(_) => {}
            }
        }
        bail!("{failed} of {} scenarios failed", rows.len());
    }
    Ok(())
}

fn status(row: &Row) -> &'static str {
    match &row.outcome {
        Ok(o) if o.tally.holds() => "ok",
        Ok(_) => "FAILED",
        Err(_) => "ERROR",
    }
}

/// The results as a Markdown table (readable as is, and pasted into
/// docs/reliability.md).
fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "\n| scenario | service | produced | in sink | lost | double-counted | raw duplicates | DLQ'd | DLQ without reason | recovery s | result | notes |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
    );
    for row in rows {
        let (name, service) = (row.scenario.name(), row.kind.binary());
        match &row.outcome {
            Ok(o) => {
                let t = &o.tally;
                let raw = match row.kind {
                    SinkKind::BigQuery => t.raw_duplicates.to_string(),
                    SinkKind::Redis => "-".into(),
                };
                let recovery = o
                    .recovery
                    .map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()));
                let mut notes = o.notes.clone();
                if !t.dlq_codes.is_empty() {
                    let codes: Vec<String> = t
                        .dlq_codes
                        .iter()
                        .map(|(c, n)| format!("{c} {n}"))
                        .collect();
                    notes.push(format!("DLQ codes: {}", codes.join(", ")));
                }
                notes.push(format!("{:.0} s", row.seconds));
                let _ = writeln!(
                    out,
                    "| {name} | {service} | {} | {} | {} | {} | {raw} | {} | {} | {recovery} | {} | {} |",
                    t.produced,
                    t.in_sink,
                    t.lost,
                    t.double_counted,
                    t.dlq,
                    t.dlq_without_reason,
                    status(row),
                    notes.join("; ")
                );
            }
            Err(err) => {
                let err = format!("{err:#}");
                let first = err.lines().next().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "| {name} | {service} | | | | | | | | | ERROR | {first} |"
                );
            }
        }
    }
    out
}

async fn run(stack: &Stack, scenario: Scenario, kind: SinkKind) -> anyhow::Result<Outcome> {
    match scenario {
        Scenario::Sigkill => sigkill(stack, kind).await,
        Scenario::Scale => scale(stack, kind).await,
        Scenario::RedisDown => redis_down(stack).await,
        Scenario::BigQueryDown => bigquery_down(stack).await,
        Scenario::BrokerFaults => broker_faults(stack, kind).await,
        Scenario::Poison => poison(stack, kind).await,
        Scenario::Sigterm => sigterm(stack, kind).await,
        Scenario::StaleConsumer => stale_consumer(stack, kind).await,
        Scenario::Backlog => backlog(stack).await,
        Scenario::ZstdInput => zstd_input(stack, kind).await,
        Scenario::GroupRename => group_rename(stack).await,
        Scenario::RedisFailover => redis_failover(stack).await,
        Scenario::EvictionPolicy => eviction_policy(stack).await,
    }
}

/// Which service a row of the plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkKind {
    Redis,
    BigQuery,
}

impl SinkKind {
    fn binary(self) -> &'static str {
        match self {
            Self::Redis => "redis-sink",
            Self::BigQuery => "bigquery-sink",
        }
    }
}

/// The sink of `kind` on the stack.
async fn side(stack: &Stack, kind: SinkKind) -> anyhow::Result<Box<dyn SinkSide>> {
    Ok(match kind {
        SinkKind::Redis => Box::new(RedisSide::on_stack(stack).await?),
        SinkKind::BigQuery => Box::new(BigQuerySide::on_stack(stack)?),
    })
}

/// A pipeline of `kind` on the stack's tansu.
async fn pipeline(stack: &Stack, kind: SinkKind) -> anyhow::Result<Pipeline> {
    Pipeline::new(stack, Broker::tansu(stack), side(stack, kind).await?).await
}

/// Events of the pipeline's topic: `n` of them, produced over `seconds`.
/// bigquery-sink's load is smaller: the emulator stores about 3,000 rows/s.
fn load(p: &Pipeline, seed: u64, seconds: usize) -> (Vec<Item>, usize) {
    let per_second = match p.binary() {
        "redis-sink" => 2_000,
        _ => 400,
    };
    (events(p, seed, per_second * seconds), per_second)
}

fn events(p: &Pipeline, seed: u64, n: usize) -> Vec<Item> {
    let mut generator =
        Generator::new(seed, p.mix(), chrono::Utc::now().timestamp_millis()).users(500);
    (0..n).map(|_| p.item(generator.next_event())).collect()
}

async fn sigkill(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    // Long enough for 5 rounds of (re)join, which takes up to a session
    // timeout while the group waits for the killed member.
    let (items, rate) = load(&p, 1, 60);
    let load = p.start_load(items, rate);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut instance = p.start()?;
    let mut kills = Vec::new();
    let mut applied = 0;
    for _ in 0..5 {
        // A random moment while this instance is applying.
        p.wait_progress(applied, &instance).await?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1_500))).await;
        applied = p.applied_total().await?;
        kills.push(applied);
        instance.service.kill()?;
        instance = p.start()?;
    }
    let recovery = p.recover(Some(&load), &instance).await?;
    p.finish(load).await?;
    p.wait_caught_up(&instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!("killed at {kills:?} applied")))
}

async fn scale(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    let (items, rate) = load(&p, 2, 20);
    let load = p.start_load(items, rate);
    let first = p.start()?;
    p.wait_progress(0, &first).await?;
    let mut joined = vec![p.start()?, p.start()?];
    // Three replicas share the partitions under load for a while.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut exits = Vec::new();
    for instance in &mut joined {
        exits.push(graceful_stop(instance).await?);
    }
    let recovery = p.recover(Some(&load), &first).await?;
    p.finish(load).await?;
    p.wait_caught_up(&first).await?;
    let mut outcome = Outcome::new(p.tally().await?).recovered_in(recovery);
    for (code, took) in exits {
        outcome = outcome.note(format!("leaver exit {code:?} in {took:.1} s"));
        if code != Some(0) || took > SHUTDOWN_TIMEOUT.as_secs_f64() {
            outcome = outcome.problem(format!(
                "a leaving replica exited {code:?} after {took:.1} s"
            ));
        }
    }
    Ok(outcome)
}

/// SIGTERM; returns the exit code and the seconds it took.
async fn graceful_stop(instance: &mut Instance) -> anyhow::Result<(Option<i32>, f64)> {
    let started = Instant::now();
    instance.service.signal("TERM")?;
    let code = instance
        .service
        .wait(SHUTDOWN_TIMEOUT + Duration::from_secs(20))
        .await?;
    Ok((code, started.elapsed().as_secs_f64()))
}

/// A redis-sink pipeline writing to the Redis at `redis_url` (one the
/// scenario controls) instead of the stack's.
async fn on_redis(stack: &Stack, redis_url: String) -> anyhow::Result<Pipeline> {
    let side = RedisSide::new(&redis_url).await?;
    Pipeline::new(stack, Broker::tansu(stack), Box::new(side)).await
}

/// The opening of an outage scenario: `seconds` of load (seed `seed`)
/// produced in the background, one instance, and something applied.
async fn load_and_start(
    p: &mut Pipeline,
    seed: u64,
    seconds: usize,
) -> anyhow::Result<(Load, Instance)> {
    let (items, rate) = load(p, seed, seconds);
    let load = p.start_load(items, rate);
    let instance = p.start()?;
    p.wait_progress(0, &instance).await?;
    Ok((load, instance))
}

async fn redis_down(stack: &Stack) -> anyhow::Result<Outcome> {
    let mut redis = PrivateRedis::start(stack.dir.join(unique("faults-redis"))).await?;
    let mut p = on_redis(stack, redis.url()).await?;
    let (load, instance) = load_and_start(&mut p, 3, 20).await?;
    redis.stop()?;
    let outage = outage(&instance, Duration::from_secs(10)).await?;
    redis.start_again().await?;
    let recovery = p.recover(Some(&load), &instance).await?;
    p.finish(load).await?;
    p.wait_caught_up(&instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(outage))
}

/// Lets an outage last `length`; describes the sink's CPU use and state.
async fn outage(instance: &Instance, length: Duration) -> anyhow::Result<String> {
    let cpu = instance.service.cpu_seconds()?;
    tokio::time::sleep(length).await;
    let used = instance.service.cpu_seconds()? - cpu;
    let paused = instance.counter("sink_paused").await? > 0.0;
    Ok(format!(
        "CPU {used:.2} s during the {} s outage, paused at its end: {paused}",
        length.as_secs()
    ))
}

async fn bigquery_down(stack: &Stack) -> anyhow::Result<Outcome> {
    let proxy = FaultProxy::start(&stack.bigquery_endpoint)?;
    let side = BigQuerySide::on_stack(stack)?.via(proxy.endpoint());
    let mut p = Pipeline::new(stack, Broker::tansu(stack), Box::new(side)).await?;
    let (load, instance) = load_and_start(&mut p, 4, 20).await?;
    // DropAfterForward: BigQuery stored the rows but the reply is lost.
    proxy.set_faults(vec![
        Fault::Status(500),
        Fault::Status(429),
        Fault::Drop,
        Fault::DropAfterForward,
    ]);
    let outage = outage(&instance, Duration::from_secs(10)).await?;
    proxy.clear_faults();
    let recovery = p.recover(Some(&load), &instance).await?;
    p.finish(load).await?;
    p.wait_caught_up(&instance).await?;
    let served: Vec<String> = proxy
        .served()
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(outage)
        .note(format!("faults served: {}", served.join(", "))))
}

/// A pipeline of `kind` on librdkafka's mock cluster (3 brokers,
/// replication 3).
async fn on_mock_cluster(stack: &Stack, kind: SinkKind) -> anyhow::Result<Pipeline> {
    Pipeline::new(stack, Broker::mock_cluster(3)?, side(stack, kind).await?).await
}

async fn broker_faults(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = on_mock_cluster(stack, kind).await?;
    let topic = p.topic.clone();
    let mock = p.broker.mock().context("a mock cluster")?;
    let (items, rate) = load(&p, 5, 25);
    let load = p.start_load(items, rate);
    let instance = p.start()?;
    let mut applied = p.wait_progress(0, &instance).await?;
    let mut done = Vec::new();

    // Every partition's leader moves to another broker.
    for partition in 0..3 {
        mock.partition_leader(&topic, partition, Some((partition + 1) % 3 + 1))?;
    }
    applied = p.wait_progress(applied, &instance).await?;
    done.push("leaders moved");

    // A broker goes down (connections refused) and comes back.
    mock.broker_down(2)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    mock.broker_up(2)?;
    applied = p.wait_progress(applied, &instance).await?;
    done.push("broker 2 down 3 s");

    // Fetch and OffsetCommit answer errors (and cut the connection) a few times.
    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::Fetch,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR__TRANSPORT,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        ],
    );
    mock.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    p.wait_progress(applied, &instance).await?;
    done.push("Fetch/OffsetCommit errors");
    let recovery = p.recover(Some(&load), &instance).await?;
    p.finish(load).await?;
    p.wait_caught_up(&instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(done.join(", ")))
}

/// zstd-compressed record batches of many records, as Logstash's kafka
/// output sends with `compression_type => zstd`, on the mock cluster (tansu
/// mishandles fetches inside batches), with a restart mid-stream so that a
/// partition resumes inside a batch.
async fn zstd_input(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = on_mock_cluster(stack, kind).await?;
    p.logstash_production("zstd")?;
    let (items, rate) = load(&p, 9, 20);
    let load = p.start_load(items, rate);
    let mut instance = p.start()?;
    let applied = p.wait_progress(0, &instance).await?;
    instance.service.kill()?;
    instance = p.start()?;
    p.wait_progress(applied, &instance).await?;
    let recovery = p.recover(Some(&load), &instance).await?;
    p.finish(load).await?;
    p.wait_caught_up(&instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note("SIGKILL once mid-stream"))
}

/// A deployment under a new consumer group id against the same Redis and
/// key prefix, started while the old one still runs, which then stops: the
/// fence is the data's, so nothing is counted twice.
async fn group_rename(stack: &Stack) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, SinkKind::Redis).await?;
    let (items, rate) = load(&p, 10, 20);
    let load = p.start_load(items, rate);
    let mut old = p.start()?;
    let applied = p.wait_progress(0, &old).await?;
    p.rename_group();
    let renamed = p.start()?;
    p.wait_progress(applied, &renamed).await?;
    let (code, took) = graceful_stop(&mut old).await?;
    let recovery = p.recover(Some(&load), &renamed).await?;
    p.finish(load).await?;
    p.wait_caught_up(&renamed).await?;
    let already = renamed.counter("sink_already_applied_total").await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!(
            "old group exit {code:?} in {took:.1} s; batches the new group found applied: {already}"
        )))
}

/// A managed failover: the replica is promoted once it has everything, the
/// old primary becomes its replica, and the address (a TCP front here)
/// moves; connections opened before still reach the old primary.
async fn redis_failover(stack: &Stack) -> anyhow::Result<Outcome> {
    let dir = stack.dir.join(unique("faults-failover"));
    let old = PrivateRedis::start(dir.join("a")).await?;
    let new = PrivateRedis::start(dir.join("b")).await?;
    new.replicate(&old).await?;
    let front = e2e::tcp_front::TcpFront::start(old.addr()).await?;
    let mut p = on_redis(stack, format!("redis://{}", front.addr())).await?;
    let (load, instance) = load_and_start(&mut p, 11, 20).await?;
    let started = Instant::now();
    fail_over(&old, &new, &front).await?;
    let switched = started.elapsed();
    let recovery = p.recover(Some(&load), &instance).await?;
    p.finish(load).await?;
    p.wait_caught_up(&instance).await?;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!("failover took {:.1} s", switched.as_secs_f64())))
}

/// An operator sets an evicting policy under the running sink, then sets
/// it back: writes stop meanwhile and nothing is lost or counted twice.
async fn eviction_policy(stack: &Stack) -> anyhow::Result<Outcome> {
    let redis = PrivateRedis::start(stack.dir.join(unique("faults-eviction"))).await?;
    let mut conn = redis.connection().await?;
    let mut p = on_redis(stack, redis.url()).await?;
    let (load, instance) = load_and_start(&mut p, 12, 20).await?;
    let policy = |value: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("maxmemory-policy").arg(value);
        cmd
    };
    policy("volatile-lru").exec_async(&mut conn).await?;
    let outage = outage(&instance, Duration::from_secs(5)).await?;
    let retries = instance.counter("sink_retries_total").await?;
    policy("noeviction").exec_async(&mut conn).await?;
    let recovery = p.recover(Some(&load), &instance).await?;
    p.finish(load).await?;
    p.wait_caught_up(&instance).await?;
    let mut outcome = Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(outage);
    if retries == 0.0 {
        outcome = outcome.problem("the sink kept writing under volatile-lru");
    }
    Ok(outcome)
}

/// Poison records, each with whether the service must keep it.
fn poison_items(kind: SinkKind) -> Vec<(&'static str, Item)> {
    let now = chrono::Utc::now();
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let redis = kind == SinkKind::Redis;
    let item = |payload: Vec<u8>, kept: bool, truth: Option<Truth>| Item {
        payload,
        kept,
        truth: truth.filter(|_| redis),
    };
    vec![
        (
            "not JSON",
            item(b"GET /search?q=x HTTP/1.1".to_vec(), false, None),
        ),
        ("empty message", item(Vec::new(), false, None)),
        (
            "invalid UTF-8",
            item(
                [
                    format!(r#"{{"@timestamp":"{ts}","info":"search","keyword":""#).as_bytes(),
                    &[0xff, 0xfe],
                    br#""}"#,
                ]
                .concat(),
                false,
                None,
            ),
        ),
        (
            "a JSON array",
            item(br#"[{"info":"search"}]"#.to_vec(), false, None),
        ),
        (
            "wrong field types",
            item(
                format!(
                    r#"{{"@timestamp":"{ts}","info":"search","keyword":42,"user_id":{{"id":1}}}}"#
                )
                .into_bytes(),
                !redis,
                None,
            ),
        ),
        (
            "300 KB keyword",
            item(
                format!(
                    r#"{{"@timestamp":"{ts}","info":"search","user_id":"u1","keyword":"{}"}}"#,
                    "k".repeat(300_000)
                )
                .into_bytes(),
                !redis,
                None,
            ),
        ),
        (
            // Anonymous: counts in the rankings, writes no history.
            "missing user_id",
            item(
                format!(r#"{{"@timestamp":"{ts}","info":"search","keyword":"anonymous search"}}"#)
                    .into_bytes(),
                true,
                Some(Truth {
                    info: "search",
                    member: "anonymous search".into(),
                    user: None,
                    time_ms: now.timestamp_millis(),
                }),
            ),
        ),
        (
            "off-topic info",
            item(
                format!(r#"{{"@timestamp":"{ts}","info":"login","user_id":"u2"}}"#).into_bytes(),
                !redis,
                None,
            ),
        ),
    ]
}

async fn poison(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    // Each poison record 3 times, between valid events on every partition.
    let poison = poison_items(kind);
    let mut items = Vec::new();
    let mut valid = events(&p, 6, 3_000).into_iter();
    for _ in 0..3 {
        for (_, item) in &poison {
            items.extend(valid.by_ref().take(100));
            items.push(item.clone());
        }
    }
    items.extend(valid);
    p.produce(items).await?;
    let instance = p.start()?;
    p.wait_caught_up(&instance).await?;
    let kinds: Vec<&str> = poison
        .iter()
        .map(|(name, item)| if item.kept { "" } else { *name })
        .filter(|n| !n.is_empty())
        .collect();
    Ok(Outcome::new(p.tally().await?).note(format!("dead-lettered kinds: {}", kinds.join(", "))))
}

async fn sigterm(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut p = pipeline(stack, kind).await?;
    let (items, rate) = load(&p, 7, 20);
    let items_len = items.len();
    let load = p.start_load(items, rate);
    let mid_load = (items_len / 4) as i64;
    let mut first = p.start()?;
    p.wait_progress(mid_load, &first).await?;
    let (code, took) = graceful_stop(&mut first).await?;
    let applied_at_exit: i64 = p.applied_total().await?;
    let committed_at_exit: i64 = p.committed().await?.iter().sum();
    let second = p.start()?;
    let recovery = p.recover(Some(&load), &second).await?;
    p.finish(load).await?;
    p.wait_caught_up(&second).await?;
    let produced = p.produced() as i64;
    let consumed = second.counter("sink_events_consumed_total").await? as i64;
    let redelivered = consumed - (produced - applied_at_exit);
    let mut outcome = Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!("exit {code:?} in {took:.1} s"))
        .note(format!(
            "at exit: applied {applied_at_exit}, Kafka committed {committed_at_exit}"
        ))
        .note(format!("re-delivered after restart: {redelivered}"));
    if code != Some(0) || took > SHUTDOWN_TIMEOUT.as_secs_f64() {
        outcome = outcome.problem(format!(
            "SIGTERM: exit {code:?} after {took:.1} s (--shutdown-timeout-secs {})",
            SHUTDOWN_TIMEOUT.as_secs()
        ));
    }
    if redelivered != 0 {
        outcome = outcome.problem(format!(
            "the restarted instance consumed {consumed} records, {} were left: {redelivered} re-delivered",
            produced - applied_at_exit
        ));
    }
    Ok(outcome)
}

/// One of two instances stops (SIGSTOP) until its partitions have moved to
/// the others, and then continues (SIGCONT). For
/// redis-sink the instance is stopped while its Redis is down, so that it
/// holds batches it has not written yet: its late writes, which the
/// script must refuse because the other instance applied that range.
async fn stale_consumer(stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
    let mut redis = match kind {
        SinkKind::Redis => Some(PrivateRedis::start(stack.dir.join(unique("faults-redis"))).await?),
        SinkKind::BigQuery => None,
    };
    let side: Box<dyn SinkSide> = match &redis {
        Some(redis) => Box::new(RedisSide::new(&redis.url()).await?),
        None => side(stack, kind).await?,
    };
    let mut p = Pipeline::new(stack, Broker::tansu(stack), side).await?;
    let (items, rate) = load(&p, 8, 30);
    let load = p.start_load(items, rate);
    let mut stale = p.start()?;
    let mut other = p.start()?;
    for instance in [&stale, &other] {
        instance.wait_metrics().await?;
    }
    // Both have partitions once both consume.
    e2e::wait_for_async(
        Duration::from_secs(60),
        "both instances to consume",
        || async {
            Ok(stale.counter("sink_events_consumed_total").await? > 0.0
                && other.counter("sink_events_consumed_total").await? > 0.0)
        },
    )
    .await?;
    if let Some(redis) = &mut redis {
        redis.stop()?;
        e2e::wait_for_async(
            Duration::from_secs(60),
            "the instance to hold batches it cannot write",
            || async { Ok(stale.counter("sink_paused").await? > 0.0) },
        )
        .await?;
    }
    stale.service.signal("STOP")?;
    let stopped = Instant::now();
    if let Some(redis) = &mut redis {
        redis.start_again().await?;
    }
    // The stopped instance's partitions stay where they are until they move.
    let at_stop = p.applied().await?;
    // tansu moves a silent member's partitions only when the group
    // rebalances, so a third replica joins (as an autoscaler would add one).
    let mut third = p.start()?;
    // The stale instance's partitions have moved once every partition
    // advances again.
    e2e::wait_for_async(
        Duration::from_secs(120),
        "every partition to advance without the stopped instance",
        || async {
            let now = p.applied().await?;
            Ok(now.iter().zip(&at_stop).all(|(n, s)| n > s))
        },
    )
    .await?;
    stale.service.signal("CONT")?;
    let stopped_for = stopped.elapsed();
    let recovery = p.recover(Some(&load), &other).await?;
    p.finish(load).await?;
    p.wait_caught_up(&other).await?;
    let mut refused = (0, 0);
    if kind == SinkKind::Redis {
        // The stale instance's held batches are retried once it runs again.
        let _ = e2e::wait_for_async(
            Duration::from_secs(30),
            "the stale instance's late writes to be refused",
            || async { Ok(stale.counter("sink_already_applied_total").await? > 0.0) },
        )
        .await;
        refused = (
            stale.counter("sink_already_applied_total").await? as u64,
            other.counter("sink_already_applied_total").await? as u64
                + third.counter("sink_already_applied_total").await? as u64,
        );
    }
    let mut exits = Vec::new();
    for instance in [&mut stale, &mut other, &mut third] {
        exits.push(graceful_stop(instance).await?.0);
    }
    let mut outcome = Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!(
            "stopped {:.1} s, until its partitions moved",
            stopped_for.as_secs_f64()
        ))
        .note(format!("exits {exits:?}"));
    if kind == SinkKind::Redis {
        outcome = outcome.note(format!(
            "late batches refused: {} from the stale instance, {} from the others",
            refused.0, refused.1
        ));
        if refused == (0, 0) {
            outcome =
                outcome.problem("no late write was refused: the scenario did not exercise one");
        }
    }
    Ok(outcome)
}

/// A Redis outage while 1,000,000 events pile up, long enough for the
/// consumer to hold, fill what it may buffer, and pause fetching.
///
/// On resume a consumer fetches from the next offset it has not taken,
/// which with batched producers is usually inside a record batch, and
/// tansu 0.6.0 then skips the rest of that batch (README, known limits),
/// while a million single-record batches slow tansu to a crawl. So the
/// records the consumer takes before it pauses are single-record batches,
/// and the million that pile up while it is paused come in 64 KB batches
/// as Logstash sends them.
async fn backlog(stack: &Stack) -> anyhow::Result<Outcome> {
    const BACKLOG: usize = 1_000_000;
    const BEFORE_PAUSE: usize = 60_000;
    let mut redis = PrivateRedis::start(stack.dir.join(unique("faults-redis"))).await?;
    let mut p = on_redis(stack, redis.url()).await?;
    let mut all = events(&p, 9, 3_000 + BEFORE_PAUSE + BACKLOG);
    let backlog = all.split_off(3_000 + BEFORE_PAUSE);
    let before_pause = all.split_off(3_000);
    p.produce(all).await?;
    let instance = p.start()?;
    p.wait_caught_up(&instance).await?;
    let rss_before = instance.service.peak_rss()?;
    redis.stop()?;
    let cpu = instance.service.cpu_seconds()?;
    let outage_started = Instant::now();
    p.produce(before_pause).await?;
    e2e::wait_for(Duration::from_secs(60), "the consumer to pause", || {
        std::fs::read_to_string(&instance.service.log)
            .is_ok_and(|log| log.contains("fetching paused"))
    })
    .await?;
    p.batch_production()?;
    p.produce(backlog).await?;
    let waited = outage_started.elapsed().as_secs_f64();
    let cpu_down = instance.service.cpu_seconds()? - cpu;
    let rss_waiting = instance.service.peak_rss()?;
    redis.start_again().await?;
    let recovery = p.recover(None, &instance).await?;
    let rss_after = instance.service.peak_rss()?;
    let mb = |b: u64| b as f64 / 1e6;
    Ok(Outcome::new(p.tally().await?)
        .recovered_in(recovery)
        .note(format!(
            "peak RSS {:.1} MB before, {:.1} MB with {} waiting, {:.1} MB after catching up",
            mb(rss_before),
            mb(rss_waiting),
            BEFORE_PAUSE + BACKLOG,
            mb(rss_after)
        ))
        .note(format!(
            "CPU {cpu_down:.2} s while Redis was down ({waited:.0} s)"
        )))
}
