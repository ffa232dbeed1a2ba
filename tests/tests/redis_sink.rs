//! redis-sink end to end: real broker, real redis-server, the real binary.
//! Every test compares the whole Redis state with a model computed from the
//! generator's ground truth.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use e2e::generator::{Generated, Generator, Mix, Truth};
use e2e::process::{fail_over, restart_alone, PrivateRedis, Service};
use e2e::redis::{applied_offsets, connect, group_offsets_key, offsets_key, stored_offsets};
use e2e::redis_model::{diff, dump, expected};
use e2e::service::ServiceFlags;
use e2e::{kafka, poll_until, unique, wait_for, wait_for_async, Check, Stack};
use rand::{Rng, SeedableRng};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use redis::aio::MultiplexedConnection;

const PARTITIONS: i32 = 3;
const HISTORY_SIZE: usize = 50;

struct Fixture {
    stack: Stack,
    redis_url: String,
    topic: String,
    group: String,
    prefix: String,
    redis: MultiplexedConnection,
    producer: rdkafka::producer::FutureProducer,
    /// Messages produced per partition.
    produced: [i64; PARTITIONS as usize],
    truths: Vec<Truth>,
    services: usize,
    /// When the fixture was made: every key is written after it.
    created_ms: i64,
    /// The in-process broker `stack.kafka` points at, for fixtures made
    /// with [`Fixture::on_mock_cluster`].
    mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl Fixture {
    async fn new() -> anyhow::Result<Self> {
        let stack = Stack::get()?;
        let url = stack.redis_url.clone();
        Self::with_redis(stack, url).await
    }

    async fn with_redis(stack: Stack, redis_url: String) -> anyhow::Result<Self> {
        let topic = unique("user3");
        kafka::create_topic(&stack.kafka, &topic, PARTITIONS).await?;
        kafka::create_topic(&stack.kafka, &format!("{topic}.dlq"), PARTITIONS).await?;
        Self::on_topic(stack, redis_url, topic, None).await
    }

    /// On librdkafka's mock cluster (3 brokers, in this process), which
    /// serves batched and compressed record batches as Kafka does, fed by a
    /// producer set as Logstash's kafka output with `compression`.
    async fn on_mock_cluster(compression: &str) -> anyhow::Result<Self> {
        let mock = MockCluster::new(3)?;
        let topic = unique("user3");
        mock.create_topic(&topic, PARTITIONS, 3)?;
        mock.create_topic(&format!("{topic}.dlq"), PARTITIONS, 3)?;
        let mut stack = Stack::get()?;
        stack.kafka = mock.bootstrap_servers();
        let url = stack.redis_url.clone();
        let mut f = Self::on_topic(stack, url, topic, Some(mock)).await?;
        f.producer = kafka::logstash_producer(&f.stack.kafka, compression)?;
        Ok(f)
    }

    async fn on_topic(
        stack: Stack,
        redis_url: String,
        topic: String,
        mock: Option<MockCluster<'static, DefaultProducerContext>>,
    ) -> anyhow::Result<Self> {
        let redis = connect(&redis_url).await?;
        Ok(Self {
            redis_url,
            producer: kafka::producer(&stack.kafka)?,
            group: unique("redis-sink"),
            prefix: format!("{topic}:"),
            topic,
            stack,
            redis,
            produced: [0; PARTITIONS as usize],
            truths: Vec::new(),
            services: 0,
            created_ms: chrono::Utc::now().timestamp_millis(),
            mock,
        })
    }

    /// Produces events round-robin over the partitions, remembering the truth.
    async fn produce(&mut self, events: Vec<Generated>) -> anyhow::Result<()> {
        let mut messages = Vec::with_capacity(events.len());
        for event in events {
            let partition = (self.produced.iter().sum::<i64>() % i64::from(PARTITIONS)) as i32;
            self.produced[partition as usize] += 1;
            if let Some(truth) = event.truth.filter(|_| event.valid) {
                self.truths.push(truth);
            }
            messages.push((partition, event.payload));
        }
        kafka::produce(&self.producer, &self.topic, messages).await
    }

    fn flags(&self) -> ServiceFlags {
        ServiceFlags::redis_sink(
            &self.stack.kafka,
            &self.topic,
            &self.group,
            &self.redis_url,
            &self.prefix,
        )
        .for_tests()
    }

    fn start(&mut self) -> anyhow::Result<Service> {
        self.start_with(&[])
    }

    /// Starts an instance with more flags; a flag of the fixture's given
    /// again in `extra` takes the value given there.
    fn start_with(&mut self, extra: &[&str]) -> anyhow::Result<Service> {
        self.services += 1;
        let name = format!("{}-{}", self.topic, self.services);
        self.flags()
            .extra(extra)
            .start(&self.stack.dir.join("logs"), &name)
    }

    /// Next offsets stored in Redis per partition.
    async fn applied(&self) -> anyhow::Result<[i64; PARTITIONS as usize]> {
        let stored = applied_offsets(
            &mut self.redis.clone(),
            &self.prefix,
            &self.topic,
            PARTITIONS,
        )
        .await?;
        Ok(std::array::from_fn(|p| stored[p]))
    }

    /// Waits until Redis has applied at least `target` records in total.
    async fn wait_applied_at_least(&self, target: i64, service: &Service) -> anyhow::Result<()> {
        let applied = poll_until(
            Duration::from_secs(300),
            Duration::from_millis(20),
            &format!("{target} records applied"),
            || async {
                let applied: i64 = self.applied().await?.iter().sum();
                Ok(Check::done_if(applied >= target, || {
                    format!("{applied} applied")
                }))
            },
        )
        .await;
        service.with_log(applied)
    }

    /// Waits until `group` has committed every produced record in Kafka.
    async fn wait_group_committed(&self, group: &str, service: &Service) -> anyhow::Result<()> {
        let offsets = kafka::OffsetReader::new(&self.stack.kafka, group, &self.topic, PARTITIONS)?;
        let want: Vec<Option<i64>> = self.produced.iter().map(|p| Some(*p)).collect();
        let committed = wait_for_async(Duration::from_secs(120), "the group's commits", || {
            let done = offsets.committed().is_ok_and(|c| c == want);
            async move { Ok(done) }
        })
        .await;
        service.with_log(committed.with_context(|| format!("group {group}")))
    }

    /// Waits until every produced record is applied.
    async fn wait_all_applied(&self, service: &Service) -> anyhow::Result<()> {
        let total = self.produced.iter().sum();
        self.wait_applied_at_least(total, service).await?;
        assert_eq!(
            self.applied().await?,
            self.produced,
            "stored offsets = produced per partition"
        );
        Ok(())
    }

    async fn assert_state_matches_model(&mut self) -> anyhow::Result<()> {
        let want = expected(&self.prefix, &self.truths, HISTORY_SIZE);
        let got = dump(&mut self.redis, &self.prefix).await?;
        assert!(
            want == got,
            "Redis state differs from the model: {}",
            diff(&want, &got)
        );
        self.assert_expiries(got.keys()).await
    }

    /// Each key expires as docs/redis-keys.md says: a total never, an hourly
    /// bucket `--bucket-ttl-secs` and a history `--history-ttl-secs` after
    /// its last write (defaults), which was between the fixture's creation
    /// and now.
    async fn assert_expiries<'k>(
        &mut self,
        keys: impl Iterator<Item = &'k String>,
    ) -> anyhow::Result<()> {
        const BUCKET_TTL_MS: i64 = 172_800_000;
        const HISTORY_TTL_MS: i64 = 2_592_000_000;
        let keys: Vec<&String> = keys.collect();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("PTTL").arg(*key);
        }
        let ttls: Vec<i64> = pipe.query_async(&mut self.redis).await?;
        let now = chrono::Utc::now().timestamp_millis();
        for (key, ttl) in keys.into_iter().zip(ttls) {
            let rest = key.strip_prefix(&self.prefix).unwrap_or(key);
            let lifetime = if rest.ends_with(":total") {
                None
            } else if rest.starts_with("history:") {
                Some(HISTORY_TTL_MS)
            } else {
                Some(BUCKET_TTL_MS)
            };
            match lifetime {
                None => assert_eq!(ttl, -1, "{key} must not expire"),
                Some(lifetime) => {
                    // PTTL is rounded to the millisecond: 1 ms of slack.
                    let deadline = now + ttl;
                    assert!(
                        (self.created_ms + lifetime - 1..=now + lifetime + 1).contains(&deadline),
                        "{key} expires at {deadline}, not {lifetime} ms after a write between {} and {now}",
                        self.created_ms
                    );
                }
            }
        }
        Ok(())
    }
}

fn events(seed: u64, n: usize, bad_fraction: f64) -> Vec<Generated> {
    let mut generator = Generator::new(seed, Mix::User3, chrono::Utc::now().timestamp_millis())
        .bad_fraction(bad_fraction)
        .users(500);
    (0..n).map(|_| generator.next_event()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_events_equal_the_model() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(1, 50_000, 0.0)).await?;
    let service = f.start()?;
    f.wait_all_applied(&service).await?;
    f.assert_state_matches_model().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_three_times_neither_loses_nor_double_counts() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(2, 100_000, 0.0)).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut service = f.start()?;
    for round in 0..3 {
        let target = 100_000 * (round * 25 + rng.random_range(5..20)) / 100;
        f.wait_applied_at_least(target, &service).await?;
        service.kill()?;
        service = restart_alone(|| f.start()).await?;
    }
    f.wait_all_applied(&service).await?;
    f.assert_state_matches_model().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_joining_and_leaving_mid_stream_equal_the_model() -> anyhow::Result<()> {
    scale_one_three_one(&[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_joining_and_leaving_with_eager_rebalances_equal_the_model() -> anyhow::Result<()>
{
    scale_one_three_one(&["--kafka-option", "partition.assignment.strategy=range"]).await
}

/// Scales 1 -> 3 -> 2 while events arrive, with the default (cooperative)
/// assignment strategy or the flags given. (Down to one replica is the
/// fault suite's scale row: with two members leaving in turn, tansu 0.6
/// sometimes keeps partitions with a member that left, see
/// `process::restart_alone`.)
async fn scale_one_three_one(strategy: &[&str]) -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    let all = events(3, 60_000, 0.0);
    let mut chunks = all.chunks(15_000).map(<[Generated]>::to_vec);
    f.produce(chunks.next().unwrap_or_default()).await?;
    let first = f.start_with(strategy)?;
    f.wait_applied_at_least(5_000, &first).await?;
    let second = f.start_with(strategy)?;
    f.produce(chunks.next().unwrap_or_default()).await?;
    let mut third = f.start_with(strategy)?;
    f.produce(chunks.next().unwrap_or_default()).await?;
    third.signal("TERM")?;
    assert_eq!(
        third.wait(Duration::from_secs(30)).await?,
        Some(0),
        "graceful exit"
    );
    f.produce(chunks.next().unwrap_or_default()).await?;
    f.wait_all_applied(&second).await?;
    drop(first);
    f.assert_state_matches_model().await
}

/// Whoever reads the log may go away (`redis-sink | head`, a log shipper
/// that died): lines that cannot be written are dropped, and the service
/// goes on and stops cleanly, instead of panicking on its next log line
/// and then hanging on SIGTERM while leaving the consumer group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_log_pipe_stops_neither_the_work_nor_a_clean_exit() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    let (mut service, log) = Service::start_logging_to_pipe("redis-sink", &f.flags().args())?;
    // Read until the instance has its partitions; the pipe closes when the
    // reader is dropped at the end of the closure.
    let joined = tokio::task::spawn_blocking(move || {
        std::io::BufRead::lines(std::io::BufReader::new(log))
            .map_while(Result::ok)
            .any(|line| line.contains("partitions assigned"))
    });
    anyhow::ensure!(
        tokio::time::timeout(Duration::from_secs(60), joined).await??,
        "the log ended before partitions were assigned"
    );
    f.produce(events(8, 5_000, 0.01)).await?;
    f.wait_all_applied(&service).await?;
    service.signal("TERM")?;
    assert_eq!(
        service.wait(Duration::from_secs(30)).await?,
        Some(0),
        "graceful exit"
    );
    f.assert_state_matches_model().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_off_topic_events_go_to_the_dlq_with_a_reason() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    let mut batch = events(4, 5_000, 0.1);
    let now = chrono::Utc::now().to_rfc3339();
    for i in 0..50 {
        let info = ["login", "play", "logout"][i % 3];
        let payload =
            format!(r#"{{"@timestamp":"{now}","info":"{info}","user_id":"u{i}"}}"#).into_bytes();
        batch.push(Generated {
            info,
            payload,
            truth: None,
            valid: false,
        });
    }
    let bad = batch.iter().filter(|e| !e.valid).count();
    f.produce(batch).await?;
    let service = f.start()?;
    f.wait_all_applied(&service).await?;
    f.assert_state_matches_model().await?;
    let letters = kafka::read_messages(
        &f.stack.kafka,
        &format!("{}.dlq", f.topic),
        bad,
        Duration::from_secs(60),
    )?;
    assert_eq!(letters.len(), bad);
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for letter in &letters {
        let reason = letter.headers.get("error").context("error header")?;
        assert!(!reason.is_empty(), "a dead letter without a reason");
        assert_eq!(letter.headers.get("source.topic"), Some(&f.topic));
        *codes
            .entry(
                letter
                    .headers
                    .get("error.code")
                    .cloned()
                    .unwrap_or_default(),
            )
            .or_default() += 1;
    }
    assert_eq!(codes.get("off_topic"), Some(&50), "{codes:?}");
    // Nothing more than the bad ones: the DLQ holds exactly `bad` letters.
    let extra = kafka::read_messages(
        &f.stack.kafka,
        &format!("{}.dlq", f.topic),
        bad + 1,
        Duration::from_secs(3),
    );
    assert!(extra.is_err(), "more dead letters than bad events");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_stream_equals_the_model() -> anyhow::Result<()> {
    // A redis-server of this test's own: restarting the shared one would
    // disturb the tests running beside this one.
    let stack = Stack::get()?;
    let mut redis = PrivateRedis::start(stack.dir.join(unique("redis-restart"))).await?;
    let mut f = Fixture::with_redis(stack, redis.url()).await?;
    f.produce(events(5, 60_000, 0.0)).await?;
    let service = f.start()?;
    f.wait_applied_at_least(15_000, &service).await?;
    redis.restart().await?;
    // A fresh connection: the test's own one died with the server.
    f.redis = connect(&redis.url()).await?;
    f.wait_all_applied(&service).await?;
    f.assert_state_matches_model().await
}

/// A managed Redis fails over: the replica is promoted, the old primary
/// becomes its replica and the service's address (a DNS name; here a TCP
/// front) moves to the new primary. Connections opened before still reach
/// the old primary, which now answers READONLY: the sink must reconnect,
/// and count every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_the_replica_loses_and_double_counts_nothing() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let dir = stack.dir.join(unique("failover"));
    let old = PrivateRedis::start_without_aof(dir.join("a")).await?;
    let new = PrivateRedis::start_without_aof(dir.join("b")).await?;
    new.replicate(&old).await?;
    let front = e2e::tcp_front::TcpFront::start(old.addr()).await?;
    let mut f = Fixture::with_redis(stack, format!("redis://{}", front.addr())).await?;
    let all = events(9, 40_000, 0.0);
    let (before, after) = all.split_at(20_000);
    f.produce(before.to_vec()).await?;
    let service = f.start()?;
    f.wait_applied_at_least(5_000, &service).await?;
    fail_over(&old, &new, &front).await?;
    f.redis = new.connection().await?;
    f.produce(after.to_vec()).await?;
    f.wait_all_applied(&service).await?;
    f.assert_state_matches_model().await
}

/// Redis does not answer when the service starts: the service must not
/// look dead (a startup probe would kill it without a trace) but say it is
/// waiting: /healthz ok, /readyz not, `sink_starting` 1 and the connect
/// attempts counted. Once Redis answers, it starts as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_waiting_for_redis_at_start_says_so() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    let nothing = std::net::SocketAddr::from(([127, 0, 0, 1], e2e::free_port()?));
    let front = e2e::tcp_front::TcpFront::start(nothing).await?;
    let url = format!("redis://{}", front.addr());
    let port = e2e::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let service = f.start_with(&["--redis-url", &url, "--metrics-addr", &metrics])?;
    wait_for_async(
        Duration::from_secs(60),
        "two connect attempts on /metrics",
        || {
            metric_at_least(
                port,
                "sink_retries_total{operation=\"connect\",kind=\"redis_unreachable\"}",
                2.0,
            )
        },
    )
    .await?;
    assert!(metric_at_least(port, "sink_starting", 1.0).await?);
    let live = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await?;
    assert!(
        live.status().is_success(),
        "not live while waiting for Redis"
    );
    assert!(!e2e::ready(port).await?, "ready before Redis answered");

    let redis_addr = f
        .redis_url
        .trim_start_matches("redis://")
        .parse()
        .context("the stack's REDIS_URL")?;
    front.switch(redis_addr);
    f.produce(events(10, 2_000, 0.0)).await?;
    f.wait_all_applied(&service).await?;
    f.assert_state_matches_model().await?;
    assert!(!metric_at_least(port, "sink_starting", 1.0).await?);
    Ok(())
}

/// Whether the sample `series` on /metrics at `port` is at least `value`
/// (false while nothing listens or the series is absent).
async fn metric_at_least(port: u16, series: &str, value: f64) -> anyhow::Result<bool> {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return Ok(false);
    };
    let text = response.text().await?;
    Ok(text.lines().any(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .is_some_and(|v| v >= value)
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_and_history_print_what_the_model_says() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(6, 5_000, 0.0)).await?;
    let service = f.start()?;
    f.wait_all_applied(&service).await?;
    let model = expected(&f.prefix, &f.truths, HISTORY_SIZE);

    // Ties are ordered as ZRANGE REV does: score, then member, both descending.
    let ranked = |key: &str, limit: usize| -> Vec<(String, i64)> {
        let mut rows: Vec<(String, i64)> = model
            .get(key)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
        rows.truncate(limit);
        rows
    };
    // A read-back command against the fixture's keys.
    let command = |args: &[&str]| -> anyhow::Result<std::process::Command> {
        let mut command = std::process::Command::new(e2e::process::binary("redis-sink")?);
        // The read-back commands need Redis only: they once asked for the
        // consumer's --bootstrap-servers.
        command
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .args(args)
            .args(["--redis-url", &f.redis_url, "--key-prefix", &f.prefix]);
        Ok(command)
    };
    let cli = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let output = command(args)?.arg("--json").output()?;
        anyhow::ensure!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(serde_json::from_slice(&output.stdout)?)
    };
    let as_rows = |value: serde_json::Value, score: &str| -> Vec<(String, i64)> {
        value
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        (
                            r["member"].as_str().unwrap_or_default().to_owned(),
                            r[score].as_i64().unwrap_or(-1),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let top_search = as_rows(cli(&["top", "--kind", "search", "--limit", "5"])?, "count");
    assert_eq!(
        top_search,
        ranked(&format!("{}rank:search:total", f.prefix), 5)
    );
    // Every generated event is from the last two hours: three hours = all time.
    let top_movies_3h = as_rows(
        cli(&["top", "--kind", "movie", "--hours", "3", "--limit", "7"])?,
        "count",
    );
    assert_eq!(
        top_movies_3h,
        ranked(&format!("{}rank:movie:total", f.prefix), 7)
    );

    let user = f
        .truths
        .iter()
        .find_map(|t| t.user.clone().filter(|_| t.info == "search"))
        .context("a user")?;
    let history = as_rows(
        cli(&["history", "--kind", "search", "--user", &user])?,
        "time_ms",
    );
    assert!(!history.is_empty());
    assert_eq!(
        history,
        ranked(&format!("{}history:search:{user}", f.prefix), HISTORY_SIZE)
    );

    // The table form is aligned and lists the same members.
    let output = command(&["top", "--kind", "search", "--limit", "3"])?.output()?;
    let table = String::from_utf8(output.stdout)?;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("#  keyword"), "{table}");
    for (line, (member, count)) in lines[1..].iter().zip(&top_search) {
        assert!(
            line.contains(member.as_str()) && line.trim_end().ends_with(&count.to_string()),
            "{line}"
        );
    }

    // A reader that stops early (`| head`): no panic, success.
    let mut child = command(&["history", "--kind", "search", "--user", &user, "--json"])?
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Closed at once: the command connects to Redis and queries it before it
    // prints, so the pipe is closed by then (without the fix: exit 101).
    drop(child.stdout.take());
    let output = child.wait_with_output()?;
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A key holding something else than a ZSET stops its partition (nothing
/// applied, nothing committed past it) until an operator removes it; then
/// every event counts exactly once. A bad history key fails the script
/// among its (idempotent) history writes, a bad ranking key before the first
/// increment: the retries after either must not count anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_the_wrong_type_blocks_until_removed_and_nothing_counts_twice(
) -> anyhow::Result<()> {
    for bad in ["history", "rank"] {
        let mut f = Fixture::new().await?;
        // Offset 0 of partition 0, and its user's only event: only the first
        // batch writes that user's history.
        let now = chrono::Utc::now();
        let only_once = Generated {
            info: "search",
            payload: serde_json::json!({
                "@timestamp": now.to_rfc3339(),
                "info": "search",
                "keyword": "parasite",
                "user_id": "only-once",
            })
            .to_string()
            .into_bytes(),
            truth: Some(Truth {
                info: "search",
                member: "parasite".into(),
                user: Some("only-once".into()),
                time_ms: now.timestamp_millis(),
            }),
            valid: true,
        };
        let mut all = vec![only_once];
        all.extend(events(6, 3_000, 0.0));
        f.produce(all).await?;
        let key = if bad == "history" {
            format!("{}history:search:only-once", f.prefix)
        } else {
            format!("{}rank:search:total", f.prefix)
        };
        redis::cmd("SET")
            .arg(&key)
            .arg("not a sorted set")
            .query_async::<()>(&mut f.redis)
            .await?;
        // Small batches: while the first one fails, the second (which holds
        // partition 0 too, with nothing stored for it yet) is in flight
        // beside it and must not be counted first.
        let service = f.start_with(&["--batch-max-events", "300"])?;
        // Three failed attempts: at least one retry after a backoff, long
        // enough for the second batch to have been counted if it could be.
        let failed = wait_for(Duration::from_secs(60), "three WRONGTYPE errors", || {
            std::fs::read_to_string(&service.log)
                .is_ok_and(|log| log.matches("WRONGTYPE").count() >= 3)
        })
        .await;
        service.with_log(failed.with_context(|| format!("a bad {bad} key")))?;
        assert_eq!(
            f.applied().await?[0],
            0,
            "partition 0 moved past a batch that failed on the bad {bad} key"
        );
        redis::cmd("DEL")
            .arg(&key)
            .query_async::<()>(&mut f.redis)
            .await?;
        f.wait_all_applied(&service).await?;
        f.assert_state_matches_model().await?;
    }
    Ok(())
}

/// The stored offsets fence the rankings, not a consumer group: a group
/// renamed (a blue/green deploy) continues where the old one stopped, and
/// two groups running at once count every event once between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_group_and_two_groups_at_once_count_every_event_once() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    let all = events(11, 9_000, 0.0);
    let mut chunks = all.chunks(3_000).map(<[Generated]>::to_vec);
    f.produce(chunks.next().unwrap_or_default()).await?;
    let mut first = f.start()?;
    f.wait_all_applied(&first).await?;
    first.signal("TERM")?;
    assert_eq!(first.wait(Duration::from_secs(30)).await?, Some(0));

    // Renamed: the new group has no Kafka offsets and reads from the start.
    f.group = unique("renamed");
    let renamed = f.start()?;
    f.produce(chunks.next().unwrap_or_default()).await?;
    f.wait_group_committed(&f.group.clone(), &renamed).await?;

    // And a third group beside it, both running.
    let renamed_group = f.group.clone();
    f.group = unique("beside");
    let beside = f.start()?;
    f.produce(chunks.next().unwrap_or_default()).await?;
    f.wait_group_committed(&renamed_group, &renamed).await?;
    f.wait_group_committed(&f.group.clone(), &beside).await?;
    f.wait_all_applied(&beside).await?;
    f.assert_state_matches_model().await
}

/// Versions before the per-topic fence kept a group's offsets under
/// `offsets:{group}:{topic}`, and during a rolling upgrade or a rollback old
/// and new versions run side by side: the fence is the larger of the two
/// hashes, and both are written, so each version sees what the other
/// applied and nothing counts twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_an_older_version_stored_under_the_group_still_fence() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(12, 3_000, 0.0)).await?;
    let mut before = f.start()?;
    f.wait_all_applied(&before).await?;
    before.signal("TERM")?;
    assert_eq!(before.wait(Duration::from_secs(30)).await?, Some(0));
    // An older version of a group with no Kafka offsets (so that it reads
    // the topic from the start) applied everything and kept it in its own
    // hash; the per-topic one is behind (partition 1 stands at 1).
    f.group = unique("upgraded");
    let by_topic = offsets_key(&f.prefix, &f.topic);
    let by_group = group_offsets_key(&f.prefix, &f.group, &f.topic);
    redis::cmd("COPY")
        .arg(&by_topic)
        .arg(&by_group)
        .query_async::<()>(&mut f.redis)
        .await?;
    redis::cmd("HSET")
        .arg(&by_topic)
        .arg(1)
        .arg(1)
        .query_async::<()>(&mut f.redis)
        .await?;
    let upgraded = f.start()?;
    f.produce(events(13, 3_000, 0.0)).await?;
    f.wait_group_committed(&f.group.clone(), &upgraded).await?;
    f.wait_all_applied(&upgraded).await?;
    f.assert_state_matches_model().await?;
    // What an older version (rolled back to) reads.
    let by_group = stored_offsets(&mut f.redis, &by_group, PARTITIONS).await?;
    assert_eq!(
        by_group,
        f.produced.to_vec(),
        "the group's own hash kept in step"
    );
    Ok(())
}

/// Under any eviction policy but noeviction Redis may drop counted keys
/// while the stored offsets say they were applied: refused at start with
/// the fix in the message, and while running a changed policy stops the
/// writes (readiness false) until it is set back; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_policy_stops_the_sink_until_it_is_noeviction() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let redis = PrivateRedis::start_without_aof(stack.dir.join(unique("redis-eviction"))).await?;
    let mut f = Fixture::with_redis(stack, redis.url()).await?;
    let policy_conn = f.redis.clone();
    let set_policy = |policy: &'static str| {
        let mut conn = policy_conn.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg(policy)
                .query_async::<()>(&mut conn)
                .await
        }
    };
    set_policy("volatile-lru").await?;
    let mut refused = f.start()?;
    assert_eq!(
        refused.wait(Duration::from_secs(30)).await?,
        Some(1),
        "started under volatile-lru"
    );
    let log = std::fs::read_to_string(&refused.log)?;
    assert!(
        log.contains("maxmemory-policy is volatile-lru")
            && log.contains("CONFIG SET maxmemory-policy noeviction"),
        "{log}"
    );

    set_policy("noeviction").await?;
    f.produce(events(14, 2_000, 0.0)).await?;
    let port = e2e::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let service = f.start_with(&["--metrics-addr", &metrics])?;
    f.wait_all_applied(&service).await?;
    e2e::wait_for_async(Duration::from_secs(30), "readiness", || e2e::ready(port)).await?;

    set_policy("allkeys-lru").await?;
    e2e::wait_for_async(
        Duration::from_secs(30),
        "readiness to turn false",
        || async { Ok(!e2e::ready(port).await?) },
    )
    .await?;
    let applied = f.applied().await?;
    f.produce(events(15, 2_000, 0.0)).await?;
    wait_for(
        Duration::from_secs(60),
        "writes refused for the policy",
        || {
            std::fs::read_to_string(&service.log)
                .is_ok_and(|log| log.matches("maxmemory-policy is allkeys-lru").count() >= 2)
        },
    )
    .await?;
    assert_eq!(f.applied().await?, applied, "applied under allkeys-lru");

    set_policy("noeviction").await?;
    f.wait_all_applied(&service).await?;
    e2e::wait_for_async(Duration::from_secs(30), "readiness again", || {
        e2e::ready(port)
    })
    .await?;
    f.assert_state_matches_model().await
}

/// A retry that finds its partition's stored offset at or past the batch's
/// end (an earlier attempt got through before its reply was lost, and the
/// next batch after it) is applied: nothing is counted again and the loop is
/// not sent back to re-read what Redis holds. Inside the batch's range the
/// stored offset still says where to resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_redis_has_already_passed_counts_as_applied() -> anyhow::Result<()> {
    use redis_sink::client::connect;
    use redis_sink::config::RedisSettings;
    use redis_sink::sink::RedisSink;
    use sink_core::{Batch, Entry, PartitionRange, Record, Sink, WriteOutcome};

    let stack = Stack::get()?;
    let prefix = format!("{}:", unique("passed"));
    let keys = redis_sink::keys::Keys::new(prefix.as_str());
    let primary = connect(&stack.redis_url).await?;
    let mut conn = primary.get().inner;
    let sink = RedisSink::new(
        primary,
        RedisSettings {
            keys: keys.clone(),
            group: "g".into(),
            retention: redis_sink::plan::Retention {
                bucket_ttl_secs: 3_600,
                history_size: 50,
                history_ttl_secs: 3_600,
            },
            rules: redis_sink::decode::DecodeRules {
                max_keyword_chars: 200,
            },
        },
    );
    let record = |offset| Record {
        topic: "user3".into(),
        partition: 0,
        offset,
        timestamp_ms: Some(chrono::Utc::now().timestamp_millis()),
        key: None,
        payload: br#"{"info":"search","keyword":"parasite","user_id":"u1"}"#.to_vec(),
        headers: None,
    };
    let entries = (10..20)
        .map(|offset| {
            let record = record(offset);
            let item = sink
                .decode(&record)
                .map_err(|r| anyhow::anyhow!(r.reason))?;
            Ok(Entry { record, item })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let batch = Batch {
        topic: "user3".into(),
        entries,
        ranges: vec![PartitionRange {
            partition: 0,
            first: 10,
            next: 20,
        }],
    };
    for (stored, expected) in [
        (20, vec![]),
        (35, vec![]),
        (15, vec![(0, 15)]),
        (4, vec![(0, 4)]),
    ] {
        redis::cmd("HSET")
            .arg(offsets_key(&prefix, "user3"))
            .arg(0)
            .arg(stored)
            .query_async::<()>(&mut conn)
            .await?;
        let outcome = sink.write(&batch).await?;
        assert_eq!(
            outcome,
            WriteOutcome {
                rejected: vec![],
                already_applied: expected,
            },
            "stored offset {stored}, batch 10..20"
        );
    }
    let counted: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}rank:search:total"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await?;
    assert_eq!(counted, vec![], "nothing counted");
    Ok(())
}

/// What Logstash sends with each `compression_type`: batched, compressed
/// record batches, on a broker that serves them as Kafka does. Every event
/// counts once.
async fn compressed_batches_equal_the_model(compression: &str) -> anyhow::Result<()> {
    let mut f = Fixture::on_mock_cluster(compression).await?;
    f.produce(events(16, 6_000, 0.01)).await?;
    let service = f.start()?;
    f.wait_all_applied(&service).await?;
    f.assert_state_matches_model().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_batches_equal_the_model() -> anyhow::Result<()> {
    compressed_batches_equal_the_model("gzip").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snappy_batches_equal_the_model() -> anyhow::Result<()> {
    compressed_batches_equal_the_model("snappy").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lz4_batches_equal_the_model() -> anyhow::Result<()> {
    compressed_batches_equal_the_model("lz4").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_batches_equal_the_model() -> anyhow::Result<()> {
    compressed_batches_equal_the_model("zstd").await
}

/// After a rebalance, a replica shows per-partition lag and offsets only for
/// the partitions it still owns: the last lag of a partition that moved to
/// another replica would stay on dashboards forever beside the new owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_only_the_partitions_a_replica_owns() -> anyhow::Result<()> {
    let mut f = Fixture::new().await?;
    f.produce(events(17, 3_000, 0.0)).await?;
    let port = e2e::free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let first = f.start_with(&["--metrics-addr", &metrics])?;
    f.wait_all_applied(&first).await?;
    let lag_partitions = || async {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await?
            .text()
            .await?;
        let mut partitions: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("sink_consumer_lag{"))
            .filter_map(|l| l.split_once("partition=\"")?.1.split_once('"'))
            .map(|(p, _)| p.to_owned())
            .collect();
        partitions.sort();
        anyhow::Ok(partitions)
    };
    e2e::wait_for_async(
        Duration::from_secs(30),
        "lag of all 3 partitions",
        || async { Ok(lag_partitions().await?.len() == 3) },
    )
    .await?;
    let second = f.start()?;
    wait_for(
        Duration::from_secs(60),
        "the partitions dealt again",
        || {
            [&first, &second].iter().all(|s| {
                s.last_assignment()
                    .is_some_and(|l| !l.ends_with("[]") && !l.ends_with("[0, 1, 2]"))
            })
        },
    )
    .await?;
    let line = first.last_assignment().unwrap_or_default();
    let kept: Vec<String> = line
        .rsplit_once('[')
        .map(|(_, list)| list.trim_end_matches(']'))
        .unwrap_or_default()
        .split(", ")
        .map(str::to_owned)
        .collect();
    let shown = lag_partitions().await?;
    assert!(
        shown.len() < 3 && shown.iter().all(|p| kept.contains(p)),
        "the first replica now owns {kept:?}, its /metrics shows lag of partitions {shown:?}"
    );
    Ok(())
}

/// SIGTERM exits within --shutdown-timeout-secs even when the broker stops
/// answering (the final commit and leaving the group then wait on it): a
/// container runtime kills what outlives its grace period, and a service
/// that hangs on exit holds its partitions until the session times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_in_time_when_the_broker_stops_answering() -> anyhow::Result<()> {
    let mut f = Fixture::on_mock_cluster("lz4").await?;
    f.produce(events(18, 2_000, 0.0)).await?;
    let mut service = f.start()?;
    f.wait_all_applied(&service).await?;
    let mock = f.mock.as_ref().context("a mock cluster")?;
    for broker in 1..=3 {
        mock.broker_round_trip_time(broker, Duration::from_secs(300))?;
    }
    let asked = std::time::Instant::now();
    service.signal("TERM")?;
    // The fixture's --shutdown-timeout-secs is 10.
    let code = service.wait(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    let code = code.context("no exit within 30 s")?;
    assert_eq!(code, Some(0), "exit status; log:\n{}", service.log_tail());
    // The timeout, and a little for the process to end once it gave up.
    assert!(took <= Duration::from_secs(12), "exit took {took:?}");
    Ok(())
}
