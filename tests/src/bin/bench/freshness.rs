//! Freshness: how long an event takes from its produce to its count being
//! visible in Redis, at a steady rate, with redis-sink's default settings.
//!
//! One event in 50 is a probe: a search for a keyword of its own, sent
//! anonymously (it writes no history). The bench notes when it hands each
//! probe to the producer and asks Redis for the probes' counts (`ZMSCORE`
//! on the all-time search ranking) once per 10 ms tick of the load, every
//! 5 ms after it; a probe's latency is the first look that sees it less
//! its send time, so it reads up to 10 ms long. The rest of the load is
//! `Generator::production` events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::broker::Broker;
use e2e::generator::{Generator, Mix};
use e2e::process::PrivateRedis;
use e2e::service::ServiceFlags;
use e2e::{kafka, poll_until, unique, Stack, PARTITIONS};
use rdkafka::producer::FutureRecord;

/// One event in this many is a probe.
const PROBE_EVERY: usize = 50;
/// How often Redis is asked for the probes once the load is produced.
const POLL: Duration = Duration::from_millis(5);

/// What a freshness run measured.
pub struct Freshness {
    /// Events per second produced.
    pub rate: usize,
    /// Seconds of load.
    pub seconds: u64,
    /// Probe latencies, sorted.
    pub latencies: Vec<Duration>,
}

impl Freshness {
    /// The `p`-th percentile (0..=100) of the probe latencies.
    pub fn percentile(&self, p: usize) -> Duration {
        let n = self.latencies.len();
        self.latencies
            .get((n * p / 100).min(n.saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }
}

/// A search for `keyword`, anonymous, timed now.
fn probe(keyword: &str) -> Vec<u8> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({"@timestamp": now, "info": "search", "keyword": keyword})
        .to_string()
        .into_bytes()
}

/// Runs redis-sink (defaults, a fresh redis-server without AOF) on a fresh
/// topic fed at `rate` events/s for `seconds`.
pub async fn redis(stack: &Stack, rate: usize, seconds: u64) -> anyhow::Result<Freshness> {
    let dir = stack.dir.join(unique("bench-fresh"));
    let redis = PrivateRedis::start_without_aof(dir.clone()).await?;
    let broker = Broker::tansu(stack);
    let topic = broker.topic_with_dlq("bench-fresh").await?;
    let group = unique("bench-fresh");
    let prefix = format!("{group}:");
    let service =
        ServiceFlags::redis_sink(broker.bootstrap(), &topic, &group, &redis.url(), &prefix)
            .set("--log-format", "json")
            .start(&stack.dir.join("logs"), &group)?;
    let producer = kafka::logstash_producer(broker.bootstrap(), "lz4")?;
    let mut conn = e2e::redis::connect(&redis.url()).await?;
    let ranking = format!("{prefix}rank:search:total");

    // Until one probe is visible, the group joins and the scripts load:
    // not what freshness means.
    let send = |payload: Vec<u8>, partition: i32| {
        producer
            .send_result(
                FutureRecord::<(), _>::to(&topic)
                    .partition(partition)
                    .payload(&payload),
            )
            .map_err(|(err, _)| anyhow::anyhow!("cannot queue a record: {err}"))
    };
    drop(send(probe("warm up"), 0)?);
    let warm = poll_until(Duration::from_secs(60), POLL, "the warm-up probe", || {
        let mut conn = conn.clone();
        let ranking = ranking.clone();
        async move {
            let score: Option<f64> = redis::cmd("ZSCORE")
                .arg(&ranking)
                .arg("warm up")
                .query_async(&mut conn)
                .await?;
            Ok(score.map(|_| ()).into())
        }
    })
    .await;
    service.with_log(warm)?;

    // The load, paced in ticks of 10 ms; probes noted as they are queued.
    let sent: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
    let total = rate * usize::try_from(seconds)?;
    let per_tick = (rate / 100).max(1);
    let mut generator =
        Generator::new(7, Mix::User3, chrono::Utc::now().timestamp_millis()).production();
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(total);
    let mut latencies = Vec::new();
    let mut i = 0;
    while i < total {
        for _ in 0..per_tick.min(total - i) {
            let partition = (i % PARTITIONS as usize) as i32;
            let payload = if i % PROBE_EVERY == 0 {
                let keyword = format!("probe {i}");
                let payload = probe(&keyword);
                lock(&sent).insert(keyword, Instant::now());
                payload
            } else {
                generator.next_event().payload
            };
            deliveries.push(send(payload, partition)?);
            i += 1;
        }
        see_probes(&mut conn, &ranking, &sent, &mut latencies).await?;
        let due = started + Duration::from_millis(10) * u32::try_from(i / per_tick)?;
        tokio::time::sleep_until(due.into()).await;
    }
    // The last probes, for up to 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lock(&sent).is_empty() && Instant::now() < deadline {
        see_probes(&mut conn, &ranking, &sent, &mut latencies).await?;
        tokio::time::sleep(POLL).await;
    }
    let missing = lock(&sent).len();
    anyhow::ensure!(missing == 0, "{missing} probes never became visible");
    for delivery in deliveries {
        delivery
            .await
            .context("a delivery was cancelled")?
            .map_err(|(err, _)| anyhow::anyhow!("a delivery failed: {err}"))?;
    }
    drop(service);
    drop(redis);
    std::fs::remove_dir_all(&dir)?;
    latencies.sort_unstable();
    Ok(Freshness {
        rate,
        seconds,
        latencies,
    })
}

/// Asks Redis for every probe not seen yet; notes the latency of those it
/// now holds.
async fn see_probes(
    conn: &mut redis::aio::MultiplexedConnection,
    ranking: &str,
    sent: &Mutex<BTreeMap<String, Instant>>,
    latencies: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    let waiting: Vec<String> = lock(sent).keys().cloned().collect();
    if waiting.is_empty() {
        return Ok(());
    }
    let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
        .arg(ranking)
        .arg(&waiting)
        .query_async(conn)
        .await?;
    let now = Instant::now();
    let mut sent = lock(sent);
    for (keyword, score) in waiting.iter().zip(scores) {
        if score.is_some() {
            if let Some(at) = sent.remove(keyword) {
                latencies.push(now.duration_since(at));
            }
        }
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Prints the figures, and the knob that trades them.
pub fn print(f: &Freshness) {
    println!();
    println!(
        "freshness, redis-sink with its defaults (Redis without AOF), {} events/s for {} s: \
         produce to count visible p50 {} ms, p99 {} ms, max {} ms over {} probes \
         (--batch-linger-ms, default 100, trades this against Redis round trips per event)",
        f.rate,
        f.seconds,
        f.percentile(50).as_millis(),
        f.percentile(99).as_millis(),
        f.latencies.last().copied().unwrap_or_default().as_millis(),
        f.latencies.len()
    );
}
