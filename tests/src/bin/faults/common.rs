//! What several scenarios share: building their pipeline, their load, and
//! the steps of a fault (an outage's length, a graceful stop, the catch-up
//! after it).

use std::time::{Duration, Instant};

use e2e::broker::Broker;
use e2e::generator::Generator;
use e2e::pipeline::{Instance, Item, Load, Pipeline};
use e2e::process::PrivateRedis;
use e2e::redis::RedisSide;
use e2e::redis_cluster::PrivateCluster;
use e2e::service::SHUTDOWN_TIMEOUT;
use e2e::{unique, Stack};

use crate::SinkKind;

/// A pipeline of `kind` on the stack's tansu.
pub async fn pipeline(stack: &Stack, kind: SinkKind) -> anyhow::Result<Pipeline> {
    Pipeline::new(stack, broker(stack, kind)?, kind.side(stack).await?).await
}

/// The broker a row of `kind` runs on: tansu, but the mock cluster for
/// exactly-once bigquery-sink, which records its streams in commit
/// metadata (tansu 0.6.0 forgets it).
pub fn broker(stack: &Stack, kind: SinkKind) -> anyhow::Result<Broker> {
    Ok(if kind == SinkKind::BigQueryExactlyOnce {
        Broker::mock_cluster(3)?
    } else {
        Broker::tansu(stack)
    })
}

/// A pipeline of `kind` on librdkafka's mock cluster (3 brokers,
/// replication 3): for faults tansu cannot inject, and for record batches
/// tansu cannot serve from their middle.
pub async fn on_mock_cluster(stack: &Stack, kind: SinkKind) -> anyhow::Result<Pipeline> {
    Pipeline::new(stack, Broker::mock_cluster(3)?, kind.side(stack).await?).await
}

/// A redis-sink pipeline writing to the Redis at `redis_url` (one the
/// scenario controls) instead of the stack's.
pub async fn on_redis(stack: &Stack, redis_url: String) -> anyhow::Result<Pipeline> {
    let side = RedisSide::new(&redis_url).await?;
    Pipeline::new(stack, Broker::tansu(stack), Box::new(side)).await
}

/// A Redis of the scenario's own, which it can take down: a redis-server, or
/// a cluster (3 primaries, a replica each) of which the `{rank}` shard goes
/// down, its primary and that primary's replica, so that no node serves the
/// counts and the fence.
pub enum OwnRedis {
    Standalone(PrivateRedis),
    Cluster {
        cluster: PrivateCluster,
        /// The nodes taken down, primary first.
        down: Vec<u16>,
    },
}

impl OwnRedis {
    /// Starts the backend `kind` (a redis-sink kind) writes to.
    pub async fn start(stack: &Stack, kind: SinkKind) -> anyhow::Result<Self> {
        let dir = stack.dir.join(unique("faults-redis"));
        Ok(match kind {
            SinkKind::Redis => Self::Standalone(PrivateRedis::start(dir).await?),
            SinkKind::RedisCluster => Self::Cluster {
                cluster: PrivateCluster::start(dir).await?,
                down: Vec::new(),
            },
            SinkKind::BigQuery | SinkKind::BigQueryStorage | SinkKind::BigQueryExactlyOnce => {
                anyhow::bail!("bigquery-sink writes to no Redis")
            }
        })
    }

    /// A redis-sink pipeline writing to it.
    pub async fn pipeline(&self, stack: &Stack) -> anyhow::Result<Pipeline> {
        let url = match self {
            Self::Standalone(redis) => redis.url(),
            Self::Cluster { cluster, .. } => cluster.url().to_owned(),
        };
        on_redis(stack, url).await
    }

    /// Takes it down: redis-server stops (SIGTERM); on a cluster, the `{rank}`
    /// shard is killed (SIGKILL), its replica first so that it is not promoted.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Standalone(redis) => redis.stop(),
            Self::Cluster { cluster, down } => {
                let primary = cluster.primary_of("{rank}").await?;
                let replica = cluster.replica_of(primary).await?;
                cluster.kill(replica)?;
                cluster.kill(primary)?;
                *down = vec![primary, replica];
                Ok(())
            }
        }
    }

    /// Brings it back, on the same data (the primary first, so that it keeps
    /// its slots), until it serves every slot again.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Standalone(redis) => redis.start_again().await,
            Self::Cluster { cluster, down } => {
                for port in down.drain(..) {
                    cluster.start_again(port)?;
                }
                cluster.wait_ok().await
            }
        }
    }
}

/// Events of the pipeline's topic: `n` of them, produced over `seconds`.
/// bigquery-sink's load is smaller: the emulator stores about 11,000 rows/s
/// by insertAll (`make bench`).
pub fn load(p: &Pipeline, seed: u64, seconds: usize) -> (Vec<Item>, usize) {
    let per_second = match p.binary() {
        "redis-sink" => 2_000,
        _ => 400,
    };
    (events(p, seed, per_second * seconds), per_second)
}

/// `n` events of the pipeline's topic (seed `seed`), as its sink must
/// treat them.
pub fn events(p: &Pipeline, seed: u64, n: usize) -> Vec<Item> {
    let mut generator =
        Generator::new(seed, p.mix(), chrono::Utc::now().timestamp_millis()).users(500);
    (0..n).map(|_| p.item(generator.next_event())).collect()
}

/// The opening of a scenario under load: `seconds` of load (seed `seed`)
/// produced in the background, one instance, and something applied.
pub async fn load_and_start(
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

/// The end of a scenario under load, once its last fault is over: returns
/// the recovery time (until `instance` applied everything produced so far),
/// then waits for the rest of `load` to be produced and applied.
pub async fn catch_up(
    p: &mut Pipeline,
    load: Load,
    instance: &Instance,
) -> anyhow::Result<Duration> {
    let recovery = p.recover(Some(&load), instance).await?;
    p.finish(load).await?;
    p.wait_caught_up(instance).await?;
    Ok(recovery)
}

/// Lets an outage last `length`; describes the sink's CPU use and state.
pub async fn outage(instance: &Instance, length: Duration) -> anyhow::Result<String> {
    let cpu = instance.service.cpu_seconds()?;
    tokio::time::sleep(length).await;
    let used = instance.service.cpu_seconds()? - cpu;
    let paused = instance.counter("sink_paused").await? > 0.0;
    Ok(format!(
        "CPU {used:.2} s during the {} s outage, paused at its end: {paused}",
        length.as_secs()
    ))
}

/// SIGTERM; returns the exit code and the seconds it took.
pub async fn graceful_stop(instance: &mut Instance) -> anyhow::Result<(Option<i32>, f64)> {
    let started = Instant::now();
    instance.service.signal("TERM")?;
    let code = instance
        .service
        .wait(SHUTDOWN_TIMEOUT + Duration::from_secs(20))
        .await?;
    Ok((code, started.elapsed().as_secs_f64()))
}

/// Whether a graceful stop that exited `code` after `took` seconds kept the
/// promise: exit 0 within `--shutdown-timeout-secs`.
pub fn stopped_in_time(code: Option<i32>, took: f64) -> bool {
    code == Some(0) && took <= SHUTDOWN_TIMEOUT.as_secs_f64()
}
