//! Freshness: how long an event takes from its produce to being served, at
//! a steady rate, with each service's default settings: for redis-sink, to
//! its count being visible in Redis, and through the read API; for
//! bigquery-sink, to the insertAll request that carries its row being
//! accepted.
//!
//! One event in 50 is a probe: a search for a keyword of its own, sent
//! anonymously (it writes no history). The bench notes when it hands each
//! probe to the producer. Through the read API every probe searches one
//! keyword, on one partition (so probes count in the order sent), seeded
//! with 1,000 searches so that it ranks among the top 100 from the start:
//! probe n is visible once `GET /api/v1/top/search?window=5m&limit=100`
//! counts n. For redis-sink it asks Redis for the waiting
//! probes' counts (`ZMSCORE` on the all-time search ranking) once per 10 ms
//! tick of the load, every 5 ms after it; a probe's latency is the first
//! look that sees it less its send time, so it reads up to 10 ms long. For
//! bigquery-sink the instant endpoint (the harness's fault proxy answering
//! every insertAll at once) keeps each request's body and arrival time; a
//! probe's latency is the arrival of the first request holding it. The rest
//! of the load is `Generator::production` events, 1 % of them malformed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use e2e::bigquery::{Fault, FaultProxy};
use e2e::broker::Broker;
use e2e::generator::{Generator, Mix};
use e2e::process::{PrivateRedis, Service};
use e2e::service::ServiceFlags;
use e2e::{kafka, unique, Stack, PARTITIONS};
use rdkafka::producer::FutureRecord;

/// The share of malformed lines in the load, as in production (batches
/// then hold dead letters, which redis-sink sends before its write).
const MALFORMED: f64 = 0.01;
/// One event in this many is a probe.
const PROBE_EVERY: usize = 50;
/// How often the bench looks for probes once the load is produced.
const POLL: Duration = Duration::from_millis(5);
/// How long the service may take to join its group and serve the first
/// probe.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(60);

/// What a freshness run measured.
pub struct Freshness {
    /// The service and what it was measured to.
    pub what: &'static str,
    /// The setting that trades freshness against cost.
    pub knob: &'static str,
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

/// Every probe keyword starts with this; the rest is `[a-z0-9]`.
const PROBE_PREFIX: &str = "fresh-probe-";

/// Probes sent and not seen yet, and the latencies of those seen.
#[derive(Default)]
struct Probes {
    waiting: BTreeMap<String, Instant>,
    latencies: Vec<Duration>,
}

impl Probes {
    /// Notes that `keyword` was seen at `at`, if it was waiting.
    fn seen(&mut self, keyword: &str, at: Instant) {
        if let Some(sent) = self.waiting.remove(keyword) {
            self.latencies.push(at.saturating_duration_since(sent));
        }
    }
}

/// Where the bench looks for probes.
enum Watch {
    /// redis-sink's all-time search ranking.
    Redis {
        conn: redis::aio::MultiplexedConnection,
        ranking: String,
    },
    /// The read API's 5-minute search ranking, where every probe counts
    /// for [`API_PROBE`].
    Api {
        client: reqwest::Client,
        url: String,
        /// Probes sent so far (with the seed): the next one's number.
        sent: u64,
    },
    /// The requests bigquery-sink sent to the instant endpoint.
    Proxy {
        proxy: FaultProxy,
        /// Requests already searched.
        scanned: usize,
    },
}

/// The keyword every probe through the read API searches.
const API_PROBE: &str = "fresh-probe-api";
/// Searches for [`API_PROBE`] before the probes: it ranks from the start.
const API_SEED: u64 = 1_000;

impl Watch {
    /// The next probe, named `label` where probes have names of their own:
    /// its key in [`Probes::waiting`], its payload, and the partition it
    /// must go to (`None`: any).
    fn next_probe(&mut self, label: &str) -> (String, Vec<u8>, Option<i32>) {
        match self {
            Self::Api { sent, .. } => {
                *sent += 1;
                (format!("{:012}", *sent), probe(API_PROBE), Some(0))
            }
            _ => {
                let keyword = format!("{PROBE_PREFIX}{label}");
                (keyword.clone(), probe(&keyword), None)
            }
        }
    }

    /// Notes every waiting probe that is now visible.
    async fn look(&mut self, probes: &mut Probes) -> anyhow::Result<()> {
        if probes.waiting.is_empty() {
            return Ok(());
        }
        match self {
            Self::Redis { conn, ranking } => {
                let waiting: Vec<String> = probes.waiting.keys().cloned().collect();
                let scores: Vec<Option<f64>> = redis::cmd("ZMSCORE")
                    .arg(&*ranking)
                    .arg(&waiting)
                    .query_async(conn)
                    .await?;
                let now = Instant::now();
                for (keyword, score) in waiting.iter().zip(scores) {
                    if score.is_some() {
                        probes.seen(keyword, now);
                    }
                }
            }
            Self::Api { client, url, .. } => {
                let reply: serde_json::Value =
                    client.get(url.as_str()).send().await?.json().await?;
                let now = Instant::now();
                let count = reply["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| m["member"] == API_PROBE)
                    .and_then(|m| m["count"].as_u64())
                    .unwrap_or(0);
                let visible: Vec<String> = probes
                    .waiting
                    .range(..=format!("{count:012}"))
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in visible {
                    probes.seen(&key, now);
                }
            }
            Self::Proxy { proxy, scanned } => {
                let inserts = proxy.inserts_after(*scanned);
                *scanned += inserts.len();
                for insert in inserts {
                    let body = insert.body.context("the proxy keeps no bodies")?;
                    for keyword in probe_keywords(&body) {
                        probes.seen(&keyword, insert.at);
                    }
                }
            }
        }
        Ok(())
    }
}

/// The probe keywords a request body holds.
fn probe_keywords(body: &[u8]) -> Vec<String> {
    let prefix = PROBE_PREFIX.as_bytes();
    let mut found = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.windows(prefix.len()).position(|w| w == prefix) {
        let tail = &rest[at + prefix.len()..];
        let len = tail
            .iter()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            .count();
        found.push(format!(
            "{PROBE_PREFIX}{}",
            String::from_utf8_lossy(&tail[..len])
        ));
        rest = &tail[len..];
    }
    found
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
        ServiceFlags::redis_sink(broker.bootstrap(), &topic, &group, &redis.access(), &prefix)
            .set("--log-format", "json")
            .start(&stack.dir.join("logs"), &group)?;
    let watch = Watch::Redis {
        conn: e2e::redis::connect_to_node(&redis.access()).await?,
        ranking: redis_sink::keys::Keys::new(&prefix).total(redis_sink::decode::Kind::Search),
    };
    let figures = load(&broker, &topic, Mix::User3, watch, &service, rate, seconds).await;
    drop(service);
    drop(redis);
    std::fs::remove_dir_all(&dir)?;
    Ok(Freshness {
        what: "redis-sink with its defaults (Redis without AOF): produce to count visible",
        knob: "--batch-linger-ms, default 100, trades it against Redis round trips per event",
        ..figures?
    })
}

/// Runs redis-sink and the read API (both with their defaults, a fresh
/// redis-server without AOF) on a fresh topic fed at `rate` events/s for
/// `seconds`.
pub async fn api(stack: &Stack, rate: usize, seconds: u64) -> anyhow::Result<Freshness> {
    let dir = stack.dir.join(unique("bench-fresh-api"));
    let redis = PrivateRedis::start_without_aof(dir.clone()).await?;
    let broker = Broker::tansu(stack);
    let topic = broker.topic_with_dlq("bench-fresh").await?;
    let group = unique("bench-fresh");
    let prefix = format!("{group}:");
    let logs = stack.dir.join("logs");
    let service =
        ServiceFlags::redis_sink(broker.bootstrap(), &topic, &group, &redis.access(), &prefix)
            .set("--log-format", "json")
            .start(&logs, &group)?;
    let read_api = e2e::read_api::ReadApi::start(&redis.access(), &prefix, &[], &logs).await?;
    let producer = kafka::producer(broker.bootstrap())?;
    kafka::produce(
        &producer,
        &topic,
        (0..API_SEED).map(|_| (0, probe(API_PROBE))),
    )
    .await?;
    let watch = Watch::Api {
        client: reqwest::Client::new(),
        url: format!("{}/api/v1/top/search?window=5m&limit=100", read_api.base),
        sent: API_SEED,
    };
    let figures = load(&broker, &topic, Mix::User3, watch, &service, rate, seconds).await;
    drop(read_api);
    drop(service);
    drop(redis);
    std::fs::remove_dir_all(&dir)?;
    Ok(Freshness {
        what: "redis-sink and the read API with their defaults (Redis without AOF): produce to count served",
        knob: "the API's --cache-ms, default 1000, trades it against Redis reads; then redis-sink's --batch-linger-ms",
        ..figures?
    })
}

/// Runs bigquery-sink (defaults) against the instant endpoint on a fresh
/// topic fed at `rate` events/s for `seconds`.
pub async fn bigquery(stack: &Stack, rate: usize, seconds: u64) -> anyhow::Result<Freshness> {
    let proxy = FaultProxy::start(&stack.bigquery_endpoint)?;
    proxy.set_faults(vec![Fault::Accept]);
    proxy.keep_bodies();
    let broker = Broker::tansu(stack);
    let topic = broker.topic_with_dlq("bench-fresh").await?;
    let group = unique("bench-fresh");
    let service = ServiceFlags::bigquery_sink(
        broker.bootstrap(),
        &topic,
        &group,
        &proxy.endpoint(),
        &stack.bigquery_project,
        &stack.bigquery_dataset,
        &group.replace('-', "_"),
    )
    .set("--log-format", "json")
    .start(&stack.dir.join("logs"), &group)?;
    let watch = Watch::Proxy { proxy, scanned: 0 };
    let figures = load(&broker, &topic, Mix::All, watch, &service, rate, seconds).await?;
    Ok(Freshness {
        what: "bigquery-sink with its defaults, instant endpoint: produce to the insertAll request carrying the row",
        knob: "--batch-max-events, default 500, and --batch-linger-ms, default 1000, \
               trade it against insertAll requests per row",
        ..figures
    })
}

/// Feeds `topic` at `rate` events/s for `seconds`, one probe in
/// [`PROBE_EVERY`], and measures when `watch` sees each probe.
async fn load(
    broker: &Broker,
    topic: &str,
    mix: Mix,
    mut watch: Watch,
    service: &Service,
    rate: usize,
    seconds: u64,
) -> anyhow::Result<Freshness> {
    let producer = kafka::logstash_producer(broker.bootstrap(), "lz4")?;
    let send = |payload: Vec<u8>, partition: i32| {
        producer
            .send_result(
                FutureRecord::<(), _>::to(topic)
                    .partition(partition)
                    .payload(&payload),
            )
            .map_err(|(err, _)| anyhow::anyhow!("cannot queue a record: {err}"))
    };
    let mut probes = Probes::default();

    // Until one probe is visible, the group joins (and redis-sink loads its
    // scripts, bigquery-sink reads the table): not what freshness means.
    let (warm_up, payload, partition) = watch.next_probe("warmup");
    probes.waiting.insert(warm_up, Instant::now());
    drop(send(payload, partition.unwrap_or(0))?);
    let warm = async {
        let deadline = Instant::now() + WARM_UP_TIMEOUT;
        while !probes.waiting.is_empty() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the warm-up probe was not seen within {WARM_UP_TIMEOUT:?}"
            );
            watch.look(&mut probes).await?;
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    };
    service.with_log(warm.await)?;
    probes.latencies.clear();

    // The load, paced in ticks of 10 ms; probes noted as they are queued.
    let total = rate * usize::try_from(seconds)?;
    let per_tick = (rate / 100).max(1);
    let mut generator = Generator::new(7, mix, chrono::Utc::now().timestamp_millis())
        .production()
        .bad_fraction(MALFORMED);
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(total);
    let mut i = 0;
    while i < total {
        for _ in 0..per_tick.min(total - i) {
            let mut partition = (i % PARTITIONS as usize) as i32;
            let payload = if i % PROBE_EVERY == 0 {
                let (key, payload, to) = watch.next_probe(&i.to_string());
                partition = to.unwrap_or(partition);
                probes.waiting.insert(key, Instant::now());
                payload
            } else {
                generator.next_event().payload
            };
            deliveries.push(send(payload, partition)?);
            i += 1;
        }
        watch.look(&mut probes).await?;
        let due = started + Duration::from_millis(10) * u32::try_from(i / per_tick)?;
        tokio::time::sleep_until(due.into()).await;
    }
    // The last probes, for up to 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probes.waiting.is_empty() && Instant::now() < deadline {
        watch.look(&mut probes).await?;
        tokio::time::sleep(POLL).await;
    }
    let missing = probes.waiting.len();
    service.with_log(if missing == 0 {
        Ok(())
    } else {
        Err(anyhow::anyhow!("{missing} probes never became visible"))
    })?;
    for delivery in deliveries {
        delivery
            .await
            .context("a delivery was cancelled")?
            .map_err(|(err, _)| anyhow::anyhow!("a delivery failed: {err}"))?;
    }
    let mut latencies = probes.latencies;
    latencies.sort_unstable();
    Ok(Freshness {
        what: "",
        knob: "",
        rate,
        seconds,
        latencies,
    })
}

/// Prints the figures, and the knob that trades them.
pub fn print(f: &Freshness) {
    println!();
    println!(
        "freshness, {}, {} events/s for {} s: p50 {} ms, p99 {} ms, max {} ms over {} probes ({})",
        f.what,
        f.rate,
        f.seconds,
        f.percentile(50).as_millis(),
        f.percentile(99).as_millis(),
        f.latencies.last().copied().unwrap_or_default().as_millis(),
        f.latencies.len(),
        f.knob,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_keywords_are_read_whole_from_a_request_body() {
        let body = br#"{"rows":[{"insertId":"a","json":{"keyword":"fresh-probe-12"}},{"json":{"raw":"{\"keyword\":\"fresh-probe-3\"}"}},{"json":{"keyword":"fresh-probe-warmup"}}]}"#;
        assert_eq!(
            probe_keywords(body),
            ["fresh-probe-12", "fresh-probe-3", "fresh-probe-warmup"]
        );
    }
}
