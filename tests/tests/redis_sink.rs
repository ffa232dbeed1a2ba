//! redis-sink end to end: real broker, real redis-server, the real binary.
//! Every test compares the whole Redis state with a model computed from the
//! generator's ground truth.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use e2e::broker::Broker;
use e2e::generator::{Generated, Generator, Mix, Truth};
use e2e::metrics::Scrape;
use e2e::on_both;
use e2e::pipeline::{Instance, Pipeline};
use e2e::process::{fail_over, PrivateRedis, Service};
use e2e::redis::{caught_up, offsets_key, on_stack, pipeline, RedisSide, Topology, HISTORY_SIZE};
use e2e::redis_cluster::PrivateCluster;
use e2e::secured_kafka::{Scram, SecuredKafka};
use e2e::service::{ServiceFlags, SHUTDOWN_TIMEOUT};
use e2e::tcp_front::TcpFront;
use e2e::{kafka, unique, wait_for, wait_for_async, Stack};
use rand::{Rng, SeedableRng};
use redis_sink::access::RedisAccess;

/// Fails unless Redis holds what the model makes of everything `p`
/// produced, each key expiring as the contract says, and the dead-letter
/// topic holds exactly the records the sink must refuse, once each.
async fn assert_model(p: &Pipeline, redis: &RedisSide, since_ms: i64) -> anyhow::Result<()> {
    let state = redis.assert_matches(p.truths()).await?;
    assert_expiries(redis, state.keys(), since_ms).await?;
    p.tally().await?.assert_holds()
}

/// Each key expires as docs/redis-keys.md says: a total never, a minute or
/// hour bucket `--bucket-ttl-secs` after its span ends, a history
/// `--history-ttl-secs` after its last write (defaults), which was between
/// `since_ms` and now.
async fn assert_expiries<'k>(
    redis: &RedisSide,
    keys: impl Iterator<Item = &'k String>,
    since_ms: i64,
) -> anyhow::Result<()> {
    const BUCKET_TTL_MS: i64 = 172_800_000;
    const HISTORY_TTL_MS: i64 = 2_592_000_000;
    let keys: Vec<&String> = keys.collect();
    // A new connection: the key check may follow a restart of that Redis.
    // One command per key: a cluster pipeline must stay within one slot.
    let conn = redis.connect().await?;
    let ttls: Vec<i64> = futures::future::try_join_all(keys.iter().map(|key| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("PTTL")
                .arg(*key)
                .query_async::<i64>(&mut conn)
                .await
        }
    }))
    .await?;
    let now = chrono::Utc::now().timestamp_millis();
    for (key, ttl) in keys.into_iter().zip(ttls) {
        let rest = key.strip_prefix(&redis.prefix).unwrap_or(key);
        let lifetime = if rest.ends_with(":total") {
            None
        } else if rest.starts_with("history:") {
            Some(HISTORY_TTL_MS)
        } else {
            // `…:h:YYYYMMDDHH` or `…:m:YYYYMMDDHHMM`.
            let (_, name) = rest.rsplit_once(':').unwrap_or_default();
            let (start, span) = match name.len() {
                10 => (format!("{name}00"), 3_600_000),
                _ => (name.to_owned(), 60_000),
            };
            let end = chrono::NaiveDateTime::parse_from_str(&start, "%Y%m%d%H%M")
                .with_context(|| format!("bucket name {key}"))?
                .and_utc()
                .timestamp_millis()
                + span;
            // EXPIREAT: exactly the retention after the bucket's end (PTTL
            // read a little before `now`).
            let deadline = now + ttl;
            assert!(
                (end + BUCKET_TTL_MS..=end + BUCKET_TTL_MS + 5_000).contains(&deadline),
                "{key} expires at {deadline}, not {BUCKET_TTL_MS} ms after its end {end}"
            );
            continue;
        };
        match lifetime {
            None => assert_eq!(ttl, -1, "{key} must not expire"),
            Some(lifetime) => {
                // PTTL is rounded to the millisecond: 1 ms of slack.
                let deadline = now + ttl;
                assert!(
                    (since_ms + lifetime - 1..=now + lifetime + 1).contains(&deadline),
                    "{key} expires at {deadline}, not {lifetime} ms after a write between {since_ms} and {now}"
                );
            }
        }
    }
    Ok(())
}

fn events(seed: u64, n: usize, bad_fraction: f64) -> Vec<Generated> {
    let mut generator = Generator::new(seed, Mix::User3, chrono::Utc::now().timestamp_millis())
        .bad_fraction(bad_fraction)
        .users(500);
    (0..n).map(|_| generator.next_event()).collect()
}

on_both!(fifty_thousand_events_equal_the_model);
async fn fifty_thousand_events_equal_the_model(topology: Topology) -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(topology).await?;
    p.produce_events(events(1, 50_000, 0.0)).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}

on_both!(sigkill_three_times_neither_loses_nor_double_counts);
async fn sigkill_three_times_neither_loses_nor_double_counts(
    topology: Topology,
) -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(topology).await?;
    p.produce_events(events(2, 100_000, 0.0)).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut instance = p.start()?;
    for round in 0..3 {
        let target = 100_000 * (round * 25 + rng.random_range(5..20)) / 100;
        p.wait_progress(target, &instance).await?;
        instance.service.kill()?;
        instance = p.restart_alone(&[]).await?;
    }
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}

on_both!(replicas_joining_and_leaving_mid_stream_equal_the_model);
async fn replicas_joining_and_leaving_mid_stream_equal_the_model(
    topology: Topology,
) -> anyhow::Result<()> {
    scale_one_three_one(topology, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_joining_and_leaving_with_eager_rebalances_equal_the_model() -> anyhow::Result<()>
{
    scale_one_three_one(
        Topology::Standalone,
        &["--kafka-option", "partition.assignment.strategy=range"],
    )
    .await
}

/// Scales 1 -> 3 -> 2 while events arrive, with the default (cooperative)
/// assignment strategy or the flags given. (Down to one replica is the
/// fault suite's scale row: with two members leaving in turn, tansu 0.6
/// sometimes keeps partitions with a member that left, see
/// `Pipeline::restart_alone`.)
async fn scale_one_three_one(topology: Topology, strategy: &[&str]) -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(topology).await?;
    let all = events(3, 60_000, 0.0);
    let mut chunks = all.chunks(15_000).map(<[Generated]>::to_vec);
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    let first = p.start_with(strategy)?;
    p.wait_progress(5_000, &first).await?;
    let second = p.start_with(strategy)?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    let mut third = p.start_with(strategy)?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    third.service.signal("TERM")?;
    assert_eq!(
        third.service.wait(Duration::from_secs(30)).await?,
        Some(0),
        "graceful exit"
    );
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    caught_up(&p, &second).await?;
    drop(first);
    assert_model(&p, &redis, since).await
}

on_both!(a_closed_log_pipe_stops_neither_the_work_nor_a_clean_exit);
/// Whoever reads the log may go away (`redis-sink | head`, a log shipper
/// that died): lines that cannot be written are dropped, and the service
/// goes on and stops cleanly, instead of panicking on its next log line
/// and then hanging on SIGTERM while leaving the consumer group.
async fn a_closed_log_pipe_stops_neither_the_work_nor_a_clean_exit(
    topology: Topology,
) -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(topology).await?;
    let metrics_port = e2e::free_port()?;
    let args = p.flags().metrics_port(metrics_port).args();
    let (service, log) = Service::start_logging_to_pipe(p.binary(), &args)?;
    let mut instance = Instance {
        service,
        metrics_port,
    };
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
    p.produce_events(events(8, 5_000, 0.01)).await?;
    caught_up(&p, &instance).await?;
    instance.service.signal("TERM")?;
    assert_eq!(
        instance.service.wait(Duration::from_secs(30)).await?,
        Some(0),
        "graceful exit"
    );
    assert_model(&p, &redis, since).await
}

on_both!(malformed_and_off_topic_events_go_to_the_dlq_with_a_reason);
async fn malformed_and_off_topic_events_go_to_the_dlq_with_a_reason(
    topology: Topology,
) -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(topology).await?;
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
    p.produce_events(batch).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await?;
    // The `bad` letters, then 3 s more for any beyond them.
    let letters = kafka::read_at_least(
        p.broker.bootstrap(),
        &p.dlq(),
        bad,
        Duration::from_secs(60),
        Duration::from_secs(3),
    )?;
    assert_eq!(letters.len(), bad, "one dead letter per bad event");
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for letter in &letters {
        let reason = letter.headers.get("error").context("error header")?;
        assert!(!reason.is_empty(), "a dead letter without a reason");
        assert_eq!(letter.headers.get("source.topic"), Some(&p.topic));
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
    Ok(())
}

on_both!(hostile_ids_and_times_go_to_the_dlq_and_the_rest_applies);
/// What input from the internet could do to Redis (a 200,000-character
/// movie id in the all-time ranking, a 200,000-character or `\r\n` user id
/// as a key, an event time that pins an item atop a history for good) is
/// dead-lettered with its reason; everything else is applied as usual.
async fn hostile_ids_and_times_go_to_the_dlq_and_the_rest_applies(
    topology: Topology,
) -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(topology).await?;
    let mut batch = events(5, 2_000, 0.0);
    let now = chrono::Utc::now();
    let stamp = now.to_rfc3339();
    let in_a_day = (now + chrono::Duration::days(1)).to_rfc3339();
    let long = "x".repeat(200_000);
    let hostile = [
        (
            format!(r#"{{"@timestamp":"{stamp}","info":"movie_detail","movie_id":"{long}"}}"#),
            "id_too_long",
        ),
        (
            format!(
                r#"{{"@timestamp":"{stamp}","info":"search","keyword":"k","user_id":"{long}"}}"#
            ),
            "id_too_long",
        ),
        (
            format!(
                r#"{{"@timestamp":"{stamp}","info":"search","keyword":"k","user_id":"u\r\nx"}}"#
            ),
            "id_control_character",
        ),
        (
            format!(
                r#"{{"@timestamp":"{in_a_day}","info":"movie_detail","movie_id":"m1","user_id":"u1"}}"#
            ),
            "time_in_future",
        ),
    ];
    for (payload, _) in &hostile {
        batch.push(Generated {
            info: "search",
            payload: payload.clone().into_bytes(),
            truth: None,
            valid: false,
        });
    }
    p.produce_events(batch).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await?;
    let tally = p.tally().await?;
    for (_, code) in &hostile {
        let expected = hostile.iter().filter(|(_, c)| c == code).count();
        assert_eq!(
            tally.dlq_codes.get(*code),
            Some(&expected),
            "{:?}",
            tally.dlq_codes
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_stream_equals_the_model() -> anyhow::Result<()> {
    // A redis-server of this test's own: restarting the shared one would
    // disturb the tests running beside this one.
    let stack = Stack::get()?;
    let mut server = PrivateRedis::start(stack.dir.join(unique("redis-restart"))).await?;
    let (mut p, redis, since) = pipeline(&stack, Broker::tansu(&stack), &server.url()).await?;
    p.produce_events(events(5, 60_000, 0.0)).await?;
    let instance = p.start()?;
    p.wait_progress(15_000, &instance).await?;
    // The Redis side reads over a new connection each time: it reads on.
    server.restart().await?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}

/// A managed Redis with in-transit encryption and AUTH: TLS only, a server
/// certificate from a private CA, a client certificate required (mutual
/// TLS), the password in a mounted file. The service and the read-back
/// commands reach it with the CA, certificate and password files, and count
/// exactly; without the CA file, or without the client certificate, the
/// service stops at start with a message that says which is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_mutual_tls_and_a_password_file_reach_redis() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let dir = stack.dir.join(unique("redis-tls"));
    let pki = e2e::tls::TestPki::generate(&dir.join("pki"))?;
    let server = PrivateRedis::start_secured(
        dir.join("redis"),
        pki,
        "from-a-mounted-file",
        "TLSv1.2 TLSv1.3",
    )
    .await?;
    let since = chrono::Utc::now().timestamp_millis();
    let redis = RedisSide::with_access(server.access()).await?;
    let mut p = Pipeline::new(&stack, Broker::tansu(&stack), Box::new(redis.clone())).await?;
    p.produce_events(events(12, 3_000, 0.0)).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await?;

    // The read side takes the same flags.
    let output = read_back(
        &[
            "top",
            "--kind",
            "search",
            "--json",
            "--key-prefix",
            &redis.prefix,
        ],
        &redis.access,
    )?
    .output()?;
    anyhow::ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
    assert_eq!(rows.len(), 10, "{rows:?}");

    // Missing the CA (public roots only) or the client certificate, the
    // service stops at start and says what the server refused.
    let without_ca = RedisAccess {
        redis_ca_file: None,
        ..redis.access.clone()
    };
    let without_cert = RedisAccess {
        redis_cert_file: None,
        redis_key_file: None,
        ..redis.access.clone()
    };
    for (what, access, says) in [
        ("without the CA file", without_ca, "--redis-ca-file"),
        (
            "without the client certificate",
            without_cert,
            "--redis-cert-file",
        ),
    ] {
        let flags = ServiceFlags::redis_sink(
            &stack.kafka,
            "redis-tls-refused",
            "unused",
            &access,
            &redis.prefix,
        )
        .metrics_port(e2e::free_port()?);
        let mut service = flags.start(&stack.dir.join("logs"), &unique("redis-tls-refused"))?;
        let code = service.wait(Duration::from_secs(60)).await?;
        let log = service.log_tail();
        assert!(
            code.is_some_and(|c| c != 0),
            "{what}: still running or exit 0 ({code:?}): {log}"
        );
        assert!(log.contains(says), "{what}: the error names {says}: {log}");
    }
    Ok(())
}

/// A pipeline, as [`pipeline`] makes it, on a [`SecuredKafka`] of its own
/// whose user logs in with `scram`, with `events` produced to it; and the
/// directory of its files.
///
/// The broker (tansu behind stunnel) is the tests' fixture, not what they
/// check, and no service has started yet: if making it or producing to it
/// fails, a fresh broker is made once more. The first error (with tansu's
/// and stunnel's logs) goes to `fixture-retries.log` in the stack's logs,
/// which `make test` prints: a passing test's output is not shown.
async fn on_secured_kafka(
    scram: Scram,
    events: Vec<Generated>,
) -> anyhow::Result<(Pipeline, RedisSide, i64, std::path::PathBuf)> {
    let stack = Stack::get()?;
    let attempt = || async {
        let dir = stack.dir.join(unique("kafka-secured"));
        let pki = e2e::tls::TestPki::generate(&dir.join("pki"))?;
        let kafka = SecuredKafka::start(&dir.join("kafka"), &pki, scram, "scram-password").await?;
        let (mut p, redis, since) =
            pipeline(&stack, Broker::secured(kafka), &stack.redis_url).await?;
        p.produce_events(events.clone()).await?;
        anyhow::Ok((p, redis, since, dir))
    };
    match attempt().await {
        Ok(made) => Ok(made),
        Err(err) => {
            let record =
                format!("the SASL_SSL broker fixture failed; trying a fresh one: {err:#}\n");
            eprint!("{record}");
            let logs = stack.dir.join("logs");
            std::fs::create_dir_all(&logs)?;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(logs.join("fixture-retries.log"))
                .and_then(|mut file| std::io::Write::write_all(&mut file, record.as_bytes()))?;
            attempt().await
        }
    }
}

/// A read-back command (`top`, `history`) reaching Redis with `access`.
fn read_back(args: &[&str], access: &RedisAccess) -> anyhow::Result<std::process::Command> {
    let mut command = std::process::Command::new(e2e::process::binary("redis-sink")?);
    command.env_remove("KAFKA_BOOTSTRAP_SERVERS").args(args);
    for (flag, value) in e2e::redis::access_flags(access) {
        command.args([flag, value.as_str()]);
    }
    Ok(command)
}

/// Managed Kafka (Confluent Cloud, MSK, a self-hosted SASL cluster): the
/// broker is reached only over TLS, from a private CA, with a client
/// certificate and SCRAM-SHA-512 credentials, all in a
/// `--kafka-options-file`. The service consumes, commits and dead-letters
/// over it (the Kafka client settings are sink-core's, shared by both
/// sinks) and counts exactly; with a wrong password it says why it cannot
/// start consuming and is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sasl_ssl_broker_with_client_certificates_is_consumed_exactly() -> anyhow::Result<()> {
    let (mut p, redis, since, dir) =
        on_secured_kafka(Scram::Sha512, events(13, 2_000, 0.02)).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await?;
    assert!(
        p.tally().await?.dlq > 0,
        "malformed events were dead-lettered"
    );

    let options_file = p
        .flags()
        .args()
        .windows(2)
        .find(|w| w[0] == "--kafka-options-file")
        .map(|w| PathBuf::from(&w[1]))
        .context("the pipeline's --kafka-options-file")?;

    let wrong = dir.join("wrong.properties");
    e2e::secured_kafka::properties_with(
        &options_file,
        &wrong,
        &[("sasl.password", "not-the-password")],
    )?;
    p.rename_group();
    let refused = p.start_with(&["--kafka-options-file", &wrong.display().to_string()])?;
    let refusal = "Kafka refused this client's TLS or credentials";
    let log = refused
        .service
        .wait_for_log(Duration::from_secs(60), refusal, |log| {
            log.contains(refusal)
        })
        .await?;
    assert!(!log.contains("not-the-password"), "{log}");
    let refusals = refused.metrics().await?.sum_of(
        "sink_retries_total",
        &[("operation", "consume"), ("kind", "kafka_authentication")],
    );
    assert!(refusals >= 1.0, "refused logins counted: {refusals}");
    assert!(
        !refused.ready().await?,
        "ready without being able to log in"
    );
    Ok(())
}

/// A slot half moved while the sink writes: MIGRATING on its primary,
/// IMPORTING on another, some of its history keys moved already. The sink
/// must not write a copy on the new node of a key still on the old one,
/// which would block the move (MIGRATE: BUSYKEY): it waits for the move to
/// end (`redis_slot_moving`), then every event counts once. Every user's id
/// carries the hash tag `{t}`, so all histories share that slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_in_a_slot_being_moved_land_where_their_keys_are() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let cluster = PrivateCluster::start(stack.dir.join(unique("cluster"))).await?;
    let (mut p, redis, since) = pipeline(&stack, Broker::tansu(&stack), cluster.url()).await?;
    let tagged: Vec<Generated> = events(26, 8_000, 0.0).into_iter().map(tag_user).collect();
    let (before, after) = tagged.split_at(4_000);
    p.produce_events(before.to_vec()).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;

    let key = format!("{}history:search:{{t}}", redis.prefix);
    let to = cluster
        .primary_other_than(cluster.primary_of(&key).await?)
        .await?;
    let moving = cluster.begin_moving(&key, to).await?;
    let moved = cluster.move_keys(&moving, 40).await?;
    assert_eq!(moved, 40, "keys of the slot moved before the writes");
    p.produce_events(after.to_vec()).await?;
    write_retried(&instance, "redis_slot_moving").await?;
    cluster.finish_moving(&moving).await?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}

/// Waits until `instance` has retried a write for an error of `kind`.
async fn write_retried(instance: &Instance, kind: &str) -> anyhow::Result<()> {
    wait_for_async(
        Duration::from_secs(60),
        &format!("a write retried after {kind}"),
        || async {
            let retries = instance.metrics().await?.sum_of(
                "sink_retries_total",
                &[("operation", "write"), ("kind", kind)],
            );
            Ok(retries >= 1.0)
        },
    )
    .await
}

/// `event` with its user id (if any) given the hash tag `{t}`.
fn tag_user(mut event: Generated) -> Generated {
    let Some(truth) = event.truth.as_mut() else {
        return event;
    };
    let Some(user) = truth.user.as_mut() else {
        return event;
    };
    *user = format!("{{t}}{user}");
    if let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&event.payload) {
        json["user_id"] = serde_json::Value::String(user.clone());
        event.payload = serde_json::to_vec(&json).unwrap_or_default();
    }
    event
}

/// `--redis-wait-replicas 1`: while a primary's replica is down, no batch's
/// counts or offset move (its histories may be on that primary, and a
/// failover would lose them behind the fence); the sink says why and is
/// not ready. Once the replica is back, every event counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_replicas_holds_the_counts_until_a_replica_is_back() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let cluster = PrivateCluster::start(stack.dir.join(unique("cluster"))).await?;
    let (mut p, redis, since) = pipeline(&stack, Broker::tansu(&stack), cluster.url()).await?;
    let all = events(24, 12_000, 0.0);
    let (before, after) = all.split_at(6_000);
    p.produce_events(before.to_vec()).await?;
    let instance = p.start_with(&[
        "--redis-wait-replicas",
        "1",
        "--redis-wait-timeout-ms",
        "100",
    ])?;
    caught_up(&p, &instance).await?;
    let applied = p.applied().await?;

    let mut conn = redis.connect().await?;
    let (_, primary) = e2e::redis::primaries(&mut conn)
        .await?
        .into_iter()
        .next()
        .context("a primary")?;
    let replica = cluster.replica_of(primary).await?;
    cluster.kill(replica)?;
    p.produce_events(after.to_vec()).await?;
    write_retried(&instance, "redis_replicas_behind").await?;
    assert_eq!(
        p.applied().await?,
        applied,
        "offsets moved without the replica"
    );
    assert!(
        !instance.ready().await?,
        "ready while writes wait for a replica"
    );

    cluster.start_again(replica)?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}

/// Managed Redis offerings that stop at TLS 1.2: the read side reaches one
/// (a build of redis-sink alone spoke TLS 1.3 only), and without the client
/// certificate the refusal, which TLS 1.2 words as a plain handshake
/// failure, still stops the command with the flag to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_speaks_only_tls_1_2_is_reached() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let dir = stack.dir.join(unique("redis-tls12"));
    let pki = e2e::tls::TestPki::generate(&dir.join("pki"))?;
    let server = PrivateRedis::start_secured(dir.join("redis"), pki, "pw", "TLSv1.2").await?;
    let top = |access: &RedisAccess| -> anyhow::Result<std::process::Output> {
        Ok(read_back(&["top", "--kind", "search", "--json"], access)?.output()?)
    };
    let output = top(&server.access())?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let without_cert = RedisAccess {
        redis_cert_file: None,
        redis_key_file: None,
        ..server.access()
    };
    let output = top(&without_cert)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("--redis-cert-file"), "{stderr}");
    Ok(())
}

/// SCRAM-SHA-256 over TLS, on a broker of its own (see [`Scram`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scram_sha_256_login_is_consumed_exactly() -> anyhow::Result<()> {
    let (mut p, redis, since, _) = on_secured_kafka(Scram::Sha256, events(14, 1_000, 0.0)).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}

/// Redis loses a partition's fence with the counts it guarded, as a
/// failover to a replica that missed the last writes does (here: the
/// `{rank}` keys deleted). While the instance that began the fence runs,
/// it goes back to where it began it and counts everything again. An
/// instance that found the fence when it took the partition cannot know
/// what was lost: it writes nothing for it, says why (error, metric,
/// readiness), and goes on once an operator puts a fence back.
async fn a_lost_fence_is_counted_again_or_stops_the_partition(
    topology: Topology,
) -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(topology).await?;
    let all = events(31, 9_000, 0.0);
    let mut chunks = all.chunks(3_000).map(<[Generated]>::to_vec);
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    let mut began = p.start()?;
    caught_up(&p, &began).await?;
    let mut conn = redis.connect().await?;
    let lose_rank_keys = |mut conn: e2e::redis::RedisConn| {
        let pattern = format!("{}{{rank}}*", redis.prefix);
        async move {
            let keys = e2e::redis::scan_keys(&mut conn, &pattern).await?;
            anyhow::ensure!(!keys.is_empty(), "no {pattern} keys to lose");
            for key in keys {
                redis::cmd("DEL").arg(&key).exec_async(&mut conn).await?;
            }
            anyhow::Ok(())
        }
    };
    lose_rank_keys(conn.clone()).await?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    caught_up(&p, &began).await?;
    assert_model(&p, &redis, since).await?;

    began.service.signal("TERM")?;
    began
        .service
        .wait(SHUTDOWN_TIMEOUT + Duration::from_secs(20))
        .await?;
    let found = p.restart_alone(&[]).await?;
    found.wait_metrics().await?;
    let ends_before = p.produced_ends();
    lose_rank_keys(conn.clone()).await?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    wait_for_async(
        Duration::from_secs(60),
        "redis_fence_lost retries",
        || async {
            Ok(found
                .metrics()
                .await?
                .sum_of("sink_retries_total", &[("kind", "redis_fence_lost")])
                >= 2.0)
        },
    )
    .await?;
    assert!(!found.ready().await?, "ready with a lost fence");
    let rank_keys = e2e::redis::scan_keys(&mut conn, &format!("{}{{rank}}*", redis.prefix)).await?;
    assert_eq!(
        rank_keys,
        Vec::<String>::new(),
        "written after the fence was lost"
    );
    // What the error tells the operator: HSET <fence> <partition> <offset>.
    for (partition, end) in ends_before.iter().enumerate() {
        redis::cmd("HSET")
            .arg(offsets_key(&redis.prefix, &p.topic))
            .arg(partition)
            .arg(end)
            .exec_async(&mut conn)
            .await?;
    }
    caught_up(&p, &found).await?;
    assert!(found.ready().await?, "not ready once the fence is back");
    Ok(())
}

on_both!(a_lost_fence_is_counted_again_or_stops_the_partition);

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
    let front = TcpFront::start(old.addr()).await?;
    let url = format!("redis://{}", front.addr());
    let (mut p, redis, since) = pipeline(&stack, Broker::tansu(&stack), &url).await?;
    let all = events(9, 40_000, 0.0);
    let (before, after) = all.split_at(20_000);
    p.produce_events(before.to_vec()).await?;
    let instance = p.start()?;
    p.wait_progress(5_000, &instance).await?;
    // The Redis side reads over new connections, which reach the new
    // primary through the front.
    fail_over(&old, &new, &front).await?;
    p.produce_events(after.to_vec()).await?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}

/// Redis does not answer when the service starts: the service must not
/// look dead (a startup probe would kill it without a trace) but say it is
/// waiting: /healthz ok, /readyz not, `sink_starting` 1 and the connect
/// attempts counted. Once Redis answers, it starts as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_waiting_for_redis_at_start_says_so() -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(Topology::Standalone).await?;
    let nothing = std::net::SocketAddr::from(([127, 0, 0, 1], e2e::free_port()?));
    let front = TcpFront::start(nothing).await?;
    let url = format!("redis://{}", front.addr());
    let instance = p.start_with(&["--redis-url", &url])?;
    waiting_to_start(&instance, "redis_unreachable").await?;

    let redis_addr = redis
        .access
        .redis_url
        .trim_start_matches("redis://")
        .parse()
        .context("the stack's REDIS_URL")?;
    front.switch(redis_addr);
    p.produce_events(events(10, 2_000, 0.0)).await?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await?;
    assert!(instance.counter("sink_starting").await? < 1.0);
    Ok(())
}

/// A cluster that cannot serve when the service starts (its nodes up, the
/// cluster not created yet, as before a deployment's create job ran): the
/// service waits as for a standalone Redis that is not up yet, and starts
/// once every slot is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_waiting_for_a_cluster_to_serve_at_start_says_so() -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let cluster = PrivateCluster::uncreated(stack.dir.join(unique("cluster")))?;
    let (mut p, redis, since) = pipeline(&stack, Broker::tansu(&stack), cluster.url()).await?;
    let instance = p.start()?;
    waiting_to_start(&instance, "redis_cluster_down").await?;

    cluster.create_alone().await?;
    p.produce_events(events(12, 2_000, 0.0)).await?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await?;
    assert!(instance.counter("sink_starting").await? < 1.0);
    Ok(())
}

/// Fails unless `instance` says it is waiting to start: connect attempts of
/// `kind` counted, `sink_starting`, live but not ready.
async fn waiting_to_start(instance: &Instance, kind: &str) -> anyhow::Result<()> {
    wait_for_async(
        Duration::from_secs(60),
        "two connect attempts on /metrics",
        || async {
            let connects = Scrape::or_empty(instance.metrics_port).await.sum_of(
                "sink_retries_total",
                &[("operation", "connect"), ("kind", kind)],
            );
            Ok(connects >= 2.0)
        },
    )
    .await?;
    assert!(instance.counter("sink_starting").await? >= 1.0);
    let live = reqwest::get(format!(
        "http://127.0.0.1:{}/healthz",
        instance.metrics_port
    ))
    .await?;
    assert!(
        live.status().is_success(),
        "not live while waiting for Redis"
    );
    assert!(!instance.ready().await?, "ready before Redis answered");
    Ok(())
}

on_both!(top_and_history_print_what_the_model_says);
async fn top_and_history_print_what_the_model_says(topology: Topology) -> anyhow::Result<()> {
    let (mut p, redis, _) = on_stack(topology).await?;
    p.produce_events(events(6, 5_000, 0.0)).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    let model = redis.expected(p.truths());

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
    // A read-back command against the pipeline's keys.
    let command = |args: &[&str]| -> anyhow::Result<std::process::Command> {
        let mut command = std::process::Command::new(e2e::process::binary("redis-sink")?);
        // The read-back commands need Redis only: they once asked for the
        // consumer's --bootstrap-servers.
        command
            .env_remove("KAFKA_BOOTSTRAP_SERVERS")
            .args(args)
            .args([
                "--redis-url",
                &redis.access.redis_url,
                "--key-prefix",
                &redis.prefix,
            ]);
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
        ranked(&format!("{}{{rank}}:search:total", redis.prefix), 5)
    );
    // Every generated event is from the last two hours: three hours = all time.
    let top_movies_3h = as_rows(
        cli(&["top", "--kind", "movie", "--window", "3h", "--limit", "7"])?,
        "count",
    );
    assert_eq!(
        top_movies_3h,
        ranked(&format!("{}{{rank}}:movie:total", redis.prefix), 7)
    );

    let user = p
        .truths()
        .find_map(|t| t.user.clone().filter(|_| t.info == "search"))
        .context("a user")?;
    let history = as_rows(
        cli(&["history", "--kind", "search", "--user", &user])?,
        "time_ms",
    );
    assert!(!history.is_empty());
    assert_eq!(
        history,
        ranked(
            &format!("{}history:search:{user}", redis.prefix),
            HISTORY_SIZE
        )
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

on_both!(a_key_of_the_wrong_type_blocks_until_removed_and_nothing_counts_twice);
/// A key holding something else than a ZSET stops its partition (nothing
/// applied, nothing committed past it) until an operator removes it; then
/// every event counts exactly once. A bad history key fails the script
/// among its (idempotent) history writes, a bad ranking key before the first
/// increment: the retries after either must not count anything twice.
async fn a_key_of_the_wrong_type_blocks_until_removed_and_nothing_counts_twice(
    topology: Topology,
) -> anyhow::Result<()> {
    for bad in ["history", "rank"] {
        let (mut p, redis, since) = on_stack(topology).await?;
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
        p.produce_events(all).await?;
        let key = if bad == "history" {
            format!("{}history:search:only-once", redis.prefix)
        } else {
            format!("{}{{rank}}:search:total", redis.prefix)
        };
        let mut conn = redis.connect().await?;
        redis::cmd("SET")
            .arg(&key)
            .arg("not a sorted set")
            .query_async::<()>(&mut conn)
            .await?;
        // Small batches: while the first one fails, the second (which holds
        // partition 0 too, with nothing stored for it yet) is in flight
        // beside it and must not be counted first.
        let instance = p.start_with(&["--batch-max-events", "300"])?;
        // Three failed attempts: at least one retry after a backoff, long
        // enough for the second batch to have been counted if it could be.
        instance
            .service
            .wait_for_log(
                Duration::from_secs(60),
                &format!("three WRONGTYPE errors for a bad {bad} key"),
                |log| log.matches("WRONGTYPE").count() >= 3,
            )
            .await?;
        assert_eq!(
            p.applied().await?[0],
            0,
            "partition 0 moved past a batch that failed on the bad {bad} key"
        );
        redis::cmd("DEL")
            .arg(&key)
            .query_async::<()>(&mut conn)
            .await?;
        caught_up(&p, &instance).await?;
        assert_model(&p, &redis, since).await?;
    }
    Ok(())
}

on_both!(a_renamed_group_and_two_groups_at_once_count_every_event_once);
/// The stored offsets fence the rankings, not a consumer group: a group
/// renamed (a blue/green deploy) continues where the old one stopped, and
/// two groups running at once count every event once between them.
async fn a_renamed_group_and_two_groups_at_once_count_every_event_once(
    topology: Topology,
) -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(topology).await?;
    let all = events(11, 9_000, 0.0);
    let mut chunks = all.chunks(3_000).map(<[Generated]>::to_vec);
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    let mut first = p.start()?;
    caught_up(&p, &first).await?;
    first.service.signal("TERM")?;
    assert_eq!(first.service.wait(Duration::from_secs(30)).await?, Some(0));

    // Renamed: the new group has no Kafka offsets and reads from the start.
    p.rename_group();
    let renamed = p.start()?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    p.wait_committed_by(&p.group, &renamed).await?;

    // And a third group beside it, both running.
    let renamed_group = p.group.clone();
    p.rename_group();
    let beside = p.start()?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    p.wait_committed_by(&renamed_group, &renamed).await?;
    p.wait_committed_by(&p.group, &beside).await?;
    caught_up(&p, &beside).await?;
    assert_model(&p, &redis, since).await
}

/// A Redis written by versions before the `{rank}` hash tag (`rank:*`,
/// `offsets:{topic}`, and before that `offsets:{group}:{topic}`) is moved
/// to the present layout at start: the counts carry over, the old fences
/// (the larger per partition) still fence, and the old offsets keys then
/// refuse an older version's writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_before_the_rank_tag_is_moved_once_and_still_fences() -> anyhow::Result<()> {
    let (mut p, redis, since) = on_stack(Topology::Standalone).await?;
    p.produce_events(events(12, 3_000, 0.0)).await?;
    let mut before = p.start()?;
    caught_up(&p, &before).await?;
    before.service.signal("TERM")?;
    assert_eq!(before.service.wait(Duration::from_secs(30)).await?, Some(0));
    // Turn what it wrote into the old layout: rankings under rank:*, the
    // per-topic fence behind on partition 1, and (older still) a group's
    // hash holding all of it, for a group with no Kafka offsets, which
    // therefore reads the topic from the start.
    p.rename_group();
    let mut conn = redis.connect().await?;
    let old_fence = format!("{}offsets:{}", redis.prefix, p.topic);
    let old_group_fence = format!("{}offsets:{}:{}", redis.prefix, p.group, p.topic);
    let new_fence = offsets_key(&redis.prefix, &p.topic);
    let mut old_layout = redis::pipe();
    old_layout
        .cmd("COPY")
        .arg(&new_fence)
        .arg(&old_group_fence)
        .cmd("RENAME")
        .arg(&new_fence)
        .arg(&old_fence)
        .cmd("HSET")
        .arg(&old_fence)
        .arg(1)
        .arg(1);
    let mut rankings = Vec::new();
    for kind in ["search", "movie"] {
        let pattern = format!("{}{{rank}}:{kind}:*", redis.prefix);
        rankings.extend(e2e::redis::scan_keys(&mut conn, &pattern).await?);
    }
    assert!(rankings.len() >= 4, "{rankings:?}");
    // The old layout had no minute buckets: the mover leaves those the
    // first run wrote where they are, as it would leave none.
    for key in rankings.iter().filter(|k| !k.contains(":m:")) {
        let old = key.replacen("{rank}:", "rank:", 1);
        old_layout.cmd("RENAME").arg(key).arg(old);
    }
    old_layout.query_async::<()>(&mut conn).await?;

    let upgraded = p.start()?;
    p.produce_events(events(13, 3_000, 0.0)).await?;
    p.wait_committed_by(&p.group, &upgraded).await?;
    caught_up(&p, &upgraded).await?;
    assert_model(&p, &redis, since).await?;
    // What an older version still running reads first: its fence, now a
    // note saying where it went.
    for old in [&old_fence, &old_group_fence] {
        let note: String = redis::cmd("GET").arg(old).query_async(&mut conn).await?;
        assert!(note.starts_with("moved by redis-sink"), "{old}: {note}");
        let read = redis::cmd("HGET")
            .arg(old)
            .arg(0)
            .query_async::<Option<i64>>(&mut conn)
            .await;
        assert!(
            read.as_ref().is_err_and(|e| e.code() == Some("WRONGTYPE")),
            "{read:?}"
        );
    }
    let left = e2e::redis::scan_keys(&mut conn, &format!("{}rank:*", redis.prefix)).await?;
    assert_eq!(
        left,
        Vec::<String>::new(),
        "no ranking left under the old names"
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
    let server = PrivateRedis::start_without_aof(stack.dir.join(unique("redis-eviction"))).await?;
    let (mut p, redis, since) = pipeline(&stack, Broker::tansu(&stack), &server.url()).await?;
    let conn = redis.connect().await?;
    let set_policy = |policy: &'static str| {
        let mut conn = conn.clone();
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
    let mut refused = p.start()?;
    assert_eq!(
        refused.service.wait(Duration::from_secs(30)).await?,
        Some(1),
        "started under volatile-lru"
    );
    let log = std::fs::read_to_string(&refused.service.log)?;
    assert!(
        log.contains("maxmemory-policy is volatile-lru")
            && log.contains("CONFIG SET maxmemory-policy noeviction"),
        "{log}"
    );

    set_policy("noeviction").await?;
    p.produce_events(events(14, 2_000, 0.0)).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    wait_for_async(Duration::from_secs(30), "readiness", || instance.ready()).await?;

    set_policy("allkeys-lru").await?;
    wait_for_async(
        Duration::from_secs(30),
        "readiness to turn false",
        || async { Ok(!instance.ready().await?) },
    )
    .await?;
    let applied = p.applied().await?;
    p.produce_events(events(15, 2_000, 0.0)).await?;
    instance
        .service
        .wait_for_log(
            Duration::from_secs(60),
            "writes refused for the policy",
            |log| log.matches("maxmemory-policy is allkeys-lru").count() >= 2,
        )
        .await?;
    assert_eq!(p.applied().await?, applied, "applied under allkeys-lru");

    set_policy("noeviction").await?;
    caught_up(&p, &instance).await?;
    wait_for_async(Duration::from_secs(30), "readiness again", || {
        instance.ready()
    })
    .await?;
    assert_model(&p, &redis, since).await
}

on_both!(a_batch_redis_has_already_passed_counts_as_applied);
/// A retry that finds its partition's stored offset at or past the batch's
/// end (an earlier attempt got through before its reply was lost, and the
/// next batch after it) is applied: nothing is counted again and the loop is
/// not sent back to re-read what Redis holds. Inside the batch's range the
/// stored offset still says where to resume.
async fn a_batch_redis_has_already_passed_counts_as_applied(
    topology: Topology,
) -> anyhow::Result<()> {
    use redis_sink::client::connect;
    use redis_sink::config::RedisSettings;
    use redis_sink::sink::RedisSink;
    use sink_core::{Batch, Entry, PartitionRange, Record, Sink, WriteOutcome};

    let stack = Stack::get()?;
    let prefix = format!("{}:", unique("passed"));
    let keys = redis_sink::keys::Keys::new(prefix.as_str());
    let primary = connect(&redis_sink::access::RedisAccess::url(topology.url(&stack)?)).await?;
    let mut conn = primary.get().inner;
    let sink = RedisSink::new(
        primary,
        RedisSettings {
            keys: keys.clone(),
            group: "g".into(),
            retention: redis_sink::plan::Retention {
                bucket_ttl_secs: 3_600,
                ranked_cap: 0,
                history_size: 50,
                history_ttl_secs: 3_600,
            },
            rules: redis_sink::decode::DecodeRules {
                max_keyword_chars: 200,
                max_id_chars: 128,
                max_future_skew_ms: 600_000,
            },
            replica_acks: None,
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
                staged: None,
            },
            "stored offset {stored}, batch 10..20"
        );
    }
    let counted: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}{{rank}}:search:total"))
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
async fn compressed_batches_equal_the_model(
    topology: Topology,
    compression: &str,
) -> anyhow::Result<()> {
    let stack = Stack::get()?;
    let broker = Broker::mock_cluster(3)?;
    let (mut p, redis, since) = pipeline(&stack, broker, topology.url(&stack)?).await?;
    p.logstash_production(compression)?;
    p.produce_events(events(16, 6_000, 0.01)).await?;
    let instance = p.start()?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}

on_both!(gzip_batches_equal_the_model);
async fn gzip_batches_equal_the_model(topology: Topology) -> anyhow::Result<()> {
    compressed_batches_equal_the_model(topology, "gzip").await
}

on_both!(snappy_batches_equal_the_model);
async fn snappy_batches_equal_the_model(topology: Topology) -> anyhow::Result<()> {
    compressed_batches_equal_the_model(topology, "snappy").await
}

on_both!(lz4_batches_equal_the_model);
async fn lz4_batches_equal_the_model(topology: Topology) -> anyhow::Result<()> {
    compressed_batches_equal_the_model(topology, "lz4").await
}

on_both!(zstd_batches_equal_the_model);
async fn zstd_batches_equal_the_model(topology: Topology) -> anyhow::Result<()> {
    compressed_batches_equal_the_model(topology, "zstd").await
}

on_both!(metrics_show_only_the_partitions_a_replica_owns);
/// After a rebalance, a replica shows per-partition lag and offsets only for
/// the partitions it still owns: the last lag of a partition that moved to
/// another replica would stay on dashboards forever beside the new owner's.
async fn metrics_show_only_the_partitions_a_replica_owns(topology: Topology) -> anyhow::Result<()> {
    let (mut p, _, _) = on_stack(topology).await?;
    p.produce_events(events(17, 3_000, 0.0)).await?;
    let first = p.start()?;
    caught_up(&p, &first).await?;
    // Every partition label of the topic's lag series, whatever it is.
    let topic = p.topic.clone();
    let lag_partitions = || async {
        let scrape = first.metrics().await?;
        let mut shown: Vec<String> = scrape
            .matching(sink_core::metrics::CONSUMER_LAG, &[("topic", &topic)])
            .iter()
            .filter_map(|sample| {
                sample
                    .labels
                    .split(',')
                    .find_map(|pair| pair.strip_prefix("partition=\""))
                    .map(|value| value.trim_end_matches('"').to_owned())
            })
            .collect();
        shown.sort();
        shown.dedup();
        anyhow::Ok(shown)
    };
    wait_for_async(
        Duration::from_secs(30),
        "lag of all 3 partitions",
        || async { Ok(lag_partitions().await?.len() == 3) },
    )
    .await?;
    let second = p.start()?;
    wait_for(
        Duration::from_secs(60),
        "the partitions dealt again",
        || {
            [&first, &second].iter().all(|i| {
                i.service
                    .last_assignment()
                    .is_some_and(|l| !l.ends_with("[]") && !l.ends_with("[0, 1, 2]"))
            })
        },
    )
    .await?;
    let line = first.service.last_assignment().unwrap_or_default();
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
    let stack = Stack::get()?;
    let broker = Broker::mock_cluster(3)?;
    let (mut p, _, _) = pipeline(&stack, broker, &stack.redis_url).await?;
    p.logstash_production("lz4")?;
    p.produce_events(events(18, 2_000, 0.0)).await?;
    let mut instance = p.start()?;
    caught_up(&p, &instance).await?;
    let mock = p.broker.mock().context("a mock cluster")?;
    for broker in 1..=3 {
        mock.broker_round_trip_time(broker, Duration::from_secs(300))?;
    }
    let asked = std::time::Instant::now();
    instance.service.signal("TERM")?;
    let code = instance.service.wait(Duration::from_secs(30)).await;
    let took = asked.elapsed();
    let code = code.context("no exit within 30 s")?;
    assert_eq!(
        code,
        Some(0),
        "exit status; log:\n{}",
        instance.service.log_tail()
    );
    // The timeout, and a little for the process to end once it gave up.
    assert!(
        took <= SHUTDOWN_TIMEOUT + Duration::from_secs(2),
        "exit took {took:?}"
    );
    Ok(())
}

/// A Redis Cluster mid-stream: the primary of the `{rank}` slot fails over
/// to its replica (managed, as a maintenance window does it), the `{rank}`
/// slot and a history slot move to another primary (`ASK` while they move,
/// `MOVED` after), then the `{rank}` primary is killed (`CLUSTERDOWN` until
/// its replica takes over) and comes back as a replica. Every event counts
/// once: a batch's fence lives with its counts, and its histories were
/// acknowledged before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failovers_and_moved_slots_mid_stream_count_every_event_once() -> anyhow::Result<()>
{
    let stack = Stack::get()?;
    let cluster = PrivateCluster::start(stack.dir.join(unique("cluster"))).await?;
    let (mut p, redis, since) = pipeline(&stack, Broker::tansu(&stack), cluster.url()).await?;
    let rank_key =
        redis_sink::keys::Keys::new(redis.prefix.as_str()).total(redis_sink::decode::Kind::Search);
    let all = events(21, 60_000, 0.0);
    let mut chunks = all.chunks(12_000).map(<[Generated]>::to_vec);
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    let instance = p.start()?;

    let rank_primary = cluster.primary_of(&rank_key).await?;
    p.wait_progress(3_000, &instance).await?;
    let rank_primary = cluster.fail_over(rank_primary).await?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    p.wait_progress(15_000, &instance).await?;

    let other = cluster.primary_other_than(rank_primary).await?;
    let mut conn = redis.connect().await?;
    cluster.move_slot_of(&rank_key, other).await?;
    let history = e2e::redis::scan_keys(&mut conn, &format!("{}history:*", redis.prefix))
        .await?
        .into_iter()
        .next()
        .context("a history key")?;
    let history_from = cluster.primary_of(&history).await?;
    let history_to = cluster.primary_other_than(history_from).await?;
    cluster.move_slot_of(&history, history_to).await?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    p.wait_progress(27_000, &instance).await?;

    cluster.kill(other)?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    // The test reads the fence on the `{rank}` node: once its replica took over.
    cluster.wait_taken_over(other).await?;
    p.wait_progress(39_000, &instance).await?;
    cluster.start_again(other)?;
    p.produce_events(chunks.next().unwrap_or_default()).await?;
    caught_up(&p, &instance).await?;
    assert_model(&p, &redis, since).await
}
