//! What several scenarios share: building their pipeline, their load, and
//! the steps of a fault (an outage's length, a graceful stop, the catch-up
//! after it).

use std::time::{Duration, Instant};

use e2e::broker::Broker;
use e2e::generator::Generator;
use e2e::pipeline::{Instance, Item, Load, Pipeline};
use e2e::redis::RedisSide;
use e2e::service::SHUTDOWN_TIMEOUT;
use e2e::Stack;

use crate::SinkKind;

/// A pipeline of `kind` on the stack's tansu.
pub async fn pipeline(stack: &Stack, kind: SinkKind) -> anyhow::Result<Pipeline> {
    Pipeline::new(stack, Broker::tansu(stack), kind.side(stack).await?).await
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

/// Events of the pipeline's topic: `n` of them, produced over `seconds`.
/// bigquery-sink's load is smaller: the emulator stores about 3,000 rows/s.
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
