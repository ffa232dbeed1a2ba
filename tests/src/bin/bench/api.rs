//! `bench api`: the read API (`redis-sink serve`, defaults) over a Redis
//! that redis-sink filled with production-shaped events: requests/s and
//! p50/p99 latency at `--clients` concurrent clients asking for the live
//! page's four rankings, the Redis commands each request cost, and what
//! the rankings and histories take in Redis memory per member.
//!
//! The clients run in the bench process, on the same two cores as the API
//! and Redis: the figures are what this machine serves with all three on
//! it.

use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::generator::Mix;
use e2e::process::PrivateRedis;
use e2e::read_api::ReadApi;
use e2e::service::ServiceFlags;
use e2e::{unique, Stack};

use super::{bench_flags, fill_topic, run_until_applied, total_calls, Input};

/// What the page asks for, each poll.
const PAGE: [&str; 4] = [
    "/api/v1/top/search?window=15m&limit=10",
    "/api/v1/top/movie?window=15m&limit=10",
    "/api/v1/rising/search?window=15m&limit=10",
    "/api/v1/rising/movie?window=15m&limit=10",
];

/// Fills a Redis, serves it, loads the API and prints the figures.
pub async fn run(stack: &Stack, events: usize, clients: usize, seconds: u64) -> anyhow::Result<()> {
    let (topic, _) = fill_topic(
        stack,
        "bench-api",
        Mix::User3,
        events,
        Input::shuffled(0.01),
    )
    .await?;
    let dir = stack.dir.join(unique("bench-api"));
    let redis = PrivateRedis::start_without_aof(dir.clone()).await?;
    let group = unique("bench-api");
    let prefix = format!("{group}:");
    let flags = bench_flags(ServiceFlags::redis_sink(
        &stack.kafka,
        &topic,
        &group,
        &redis.access(),
        &prefix,
    ));
    let mut conn = redis.connection().await?;
    run_until_applied(stack, &flags, &group, &prefix, &conn, &topic, events).await?;
    memory(&mut conn, &prefix, events).await?;

    let api = ReadApi::start(&redis.access(), &prefix, &[], &stack.dir.join("logs")).await?;
    let client = reqwest::Client::new();
    // Every ranking read once: the load measures the served path.
    for path in PAGE {
        api.ok(path).await?;
    }
    let calls_before = total_calls(&mut conn).await?;
    let cpu_before = api.service.cpu_seconds()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, base) = (client.clone(), api.base.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = c;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let response = client
                        .get(format!("{base}{}", PAGE[i % PAGE.len()]))
                        .send()
                        .await?;
                    anyhow::ensure!(response.status().is_success(), "{}", response.status());
                    response.bytes().await?;
                    latencies.push(sent.elapsed());
                    i += 1;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.context("client task")??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = api.service.cpu_seconds()? - cpu_before;
    // Less the INFO that read the count before.
    let calls = total_calls(&mut conn)
        .await?
        .saturating_sub(calls_before + 1);
    latencies.sort_unstable();
    let at = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    let requests = latencies.len();
    println!();
    println!(
        "read API (redis-sink serve, --cache-ms 1000), {clients} clients for {seconds} s on the \
         page's four rankings (15m): {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms; \
         API CPU {cpu:.1} s; Redis: {calls} commands, {:.5} per request ({:.1}/s)",
        requests as f64 / elapsed,
        at(50).as_secs_f64() * 1e3,
        at(99).as_secs_f64() * 1e3,
        calls as f64 / requests as f64,
        calls as f64 / elapsed,
    );
    drop(api);
    drop(redis);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Prints what each kind of key takes per entry (`MEMORY USAGE`, every
/// element sampled) after `events` events.
async fn memory(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    events: usize,
) -> anyhow::Result<()> {
    println!();
    println!("Redis memory after {events} production-shaped events (MEMORY USAGE ... SAMPLES 0):");
    for (what, pattern, per) in [
        (
            "all-time rankings",
            format!("{prefix}{{rank}}:*:total"),
            "member",
        ),
        ("hour buckets", format!("{prefix}{{rank}}:*:h:*"), "member"),
        (
            "minute buckets",
            format!("{prefix}{{rank}}:*:m:*"),
            "member",
        ),
        ("histories", format!("{prefix}history:*"), "item"),
    ] {
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(conn)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let (mut bytes, mut entries) = (0u64, 0u64);
        for key in &keys {
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0)
                .query_async(conn)
                .await?;
            let card: u64 = redis::cmd("ZCARD").arg(key).query_async(conn).await?;
            bytes += used.unwrap_or(0);
            entries += card;
        }
        println!(
            "  {what:<18} {:>6} keys, {entries:>8} {per}s, {bytes:>10} bytes: {:.0} bytes per {per}, {:.0} per key",
            keys.len(),
            bytes as f64 / entries.max(1) as f64,
            bytes as f64 / keys.len().max(1) as f64,
        );
    }
    Ok(())
}
