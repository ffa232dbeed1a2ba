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
//!
//! This file holds the suite (plan, runner, table); each scenario is a
//! module of its own, and `common` holds what several of them share.

mod backlog;
mod bigquery_down;
mod broker_faults;
mod common;
mod eviction_policy;
mod group_rename;
mod poison;
mod redis_down;
mod redis_failover;
mod scale;
mod sigkill;
mod sigterm;
mod stale_consumer;
mod zstd_input;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use e2e::bigquery::{BigQuerySide, WriteApi};
use e2e::pipeline::{SinkSide, Tally};
use e2e::redis::RedisSide;
use e2e::Stack;

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
            Self::RedisDown => "Redis down 10 s",
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

    /// Runs the scenario against `kind`'s service. The scenarios without a
    /// `kind` exist for one service only (see [`PLAN`]): they fault that
    /// service's own backend (BigQuery behind a fault proxy).
    async fn run(self, stack: &Stack, kind: SinkKind) -> anyhow::Result<Outcome> {
        match self {
            Self::Sigkill => sigkill::run(stack, kind).await,
            Self::Scale => scale::run(stack, kind).await,
            Self::RedisDown => redis_down::run(stack, kind).await,
            Self::BigQueryDown => bigquery_down::run(stack, kind).await,
            Self::BrokerFaults => broker_faults::run(stack, kind).await,
            Self::Poison => poison::run(stack, kind).await,
            Self::Sigterm => sigterm::run(stack, kind).await,
            Self::StaleConsumer => stale_consumer::run(stack, kind).await,
            Self::Backlog => backlog::run(stack, kind).await,
            Self::ZstdInput => zstd_input::run(stack, kind).await,
            Self::GroupRename => group_rename::run(stack, kind).await,
            Self::RedisFailover => redis_failover::run(stack, kind).await,
            Self::EvictionPolicy => eviction_policy::run(stack, kind).await,
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
    // Every bigquery-sink row again with --write-api storage.
    (Scenario::Sigkill, SinkKind::BigQueryStorage),
    (Scenario::Scale, SinkKind::BigQueryStorage),
    (Scenario::BigQueryDown, SinkKind::BigQueryStorage),
    (Scenario::BrokerFaults, SinkKind::BigQueryStorage),
    (Scenario::Poison, SinkKind::BigQueryStorage),
    (Scenario::Sigterm, SinkKind::BigQueryStorage),
    (Scenario::StaleConsumer, SinkKind::BigQueryStorage),
    (Scenario::ZstdInput, SinkKind::BigQueryStorage),
    // And with --write-api storage-exactly-once, on the mock cluster (tansu
    // 0.6.0 forgets commit metadata, where it records its streams).
    (Scenario::Sigkill, SinkKind::BigQueryExactlyOnce),
    (Scenario::Scale, SinkKind::BigQueryExactlyOnce),
    (Scenario::BigQueryDown, SinkKind::BigQueryExactlyOnce),
    (Scenario::BrokerFaults, SinkKind::BigQueryExactlyOnce),
    (Scenario::Poison, SinkKind::BigQueryExactlyOnce),
    (Scenario::Sigterm, SinkKind::BigQueryExactlyOnce),
    (Scenario::StaleConsumer, SinkKind::BigQueryExactlyOnce),
    (Scenario::ZstdInput, SinkKind::BigQueryExactlyOnce),
    (Scenario::GroupRename, SinkKind::Redis),
    (Scenario::RedisFailover, SinkKind::Redis),
    (Scenario::EvictionPolicy, SinkKind::Redis),
    // Every redis-sink row again on a Redis Cluster (3 primaries, a replica
    // each): the stack's, or one of the scenario's own where it faults Redis.
    // Moved slots are `make test`'s
    // cluster_failovers_and_moved_slots_mid_stream_count_every_event_once.
    (Scenario::Sigkill, SinkKind::RedisCluster),
    (Scenario::Scale, SinkKind::RedisCluster),
    (Scenario::RedisDown, SinkKind::RedisCluster),
    (Scenario::BrokerFaults, SinkKind::RedisCluster),
    (Scenario::Poison, SinkKind::RedisCluster),
    (Scenario::Sigterm, SinkKind::RedisCluster),
    (Scenario::StaleConsumer, SinkKind::RedisCluster),
    (Scenario::Backlog, SinkKind::RedisCluster),
    (Scenario::ZstdInput, SinkKind::RedisCluster),
    (Scenario::GroupRename, SinkKind::RedisCluster),
    (Scenario::RedisFailover, SinkKind::RedisCluster),
    (Scenario::EvictionPolicy, SinkKind::RedisCluster),
];

/// Which service a row of the plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkKind {
    /// redis-sink on the stack's standalone Redis.
    Redis,
    /// redis-sink on the stack's Redis Cluster.
    RedisCluster,
    /// bigquery-sink with insertAll.
    BigQuery,
    /// bigquery-sink with the Storage Write API.
    BigQueryStorage,
    /// bigquery-sink with the Storage Write API, exactly once per batch.
    BigQueryExactlyOnce,
}

impl SinkKind {
    /// The service's binary. (Known without a [`SinkSide`], which needs the
    /// stack: `--list` and the table's labels do not.)
    fn binary(self) -> &'static str {
        match self {
            Self::Redis => "redis-sink",
            Self::RedisCluster => "redis-sink (cluster)",
            Self::BigQuery => "bigquery-sink",
            Self::BigQueryStorage => "bigquery-sink (storage)",
            Self::BigQueryExactlyOnce => "bigquery-sink (storage-exactly-once)",
        }
    }

    /// Whether the row runs redis-sink.
    fn is_redis(self) -> bool {
        matches!(self, Self::Redis | Self::RedisCluster)
    }

    /// The service's sink on the stack: the one place a scenario's sink
    /// comes from, unless the scenario faults a sink of its own.
    async fn side(self, stack: &Stack) -> anyhow::Result<Box<dyn SinkSide>> {
        Ok(match self {
            Self::Redis => Box::new(RedisSide::on_stack(stack).await?),
            Self::RedisCluster => Box::new(RedisSide::on_stack_cluster(stack).await?),
            Self::BigQuery => Box::new(BigQuerySide::on_stack(stack)?),
            Self::BigQueryStorage => {
                Box::new(BigQuerySide::on_stack(stack)?.with(WriteApi::Storage))
            }
            Self::BigQueryExactlyOnce => {
                Box::new(BigQuerySide::on_stack(stack)?.with(WriteApi::StorageExactlyOnce))
            }
        })
    }
}

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
        let outcome = scenario.run(&stack, kind).await;
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
                // Only bigquery-sink writes a raw table that may repeat rows
                // (its at-least-once window); Redis has nothing to count there.
                let raw = match row.kind {
                    SinkKind::BigQuery
                    | SinkKind::BigQueryStorage
                    | SinkKind::BigQueryExactlyOnce => t.raw_duplicates.to_string(),
                    SinkKind::Redis | SinkKind::RedisCluster => "-".into(),
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
